"""Tokenizers behind one small interface: byte-level, SentencePiece and Hugging Face `tokenizer.json`.

A tokenizer spec (`config.data.tokenizer`) is either `"byte"` or the path of a SentencePiece `.model`
file (the released TransNormerLLM tokenizer is one) or of a Hugging Face `tokenizer.json`.

Every tokenizer has `encode(str) -> list[int]` (no special tokens added), `encode_batch`,
`decode(list[int]) -> str` (special tokens dropped), `vocab_size`, `bos_id`, `eos_id`, `pad_id` and
`fingerprint` (changes whenever the mapping from text to ids may change; keys the token cache).

Byte-level ids: byte b is id b (0..255), then PAD = 256, BOS = 257, EOS = 258; vocab_size = 259.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import List, Optional, Sequence

BYTE_SPEC = "byte"


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_json_object(path: str, fix: str) -> dict:
    """The JSON object in `path`; a damaged file is one ValueError naming it, the line and `fix`."""
    with open(path, encoding="utf-8") as f:
        try:
            value = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); {fix}.") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object; {fix}.")
    return value


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus PAD 256, BOS 257, EOS 258."""

    vocab_size = 259
    pad_id, bos_id, eos_id = 256, 257, 258
    fingerprint = "byte-v1"
    path: Optional[str] = None

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece `.model` file; without a pad piece, pad_id falls back to eos_id."""

    def __init__(self, path: str):
        import sentencepiece as spm

        self.path = path
        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except RuntimeError as e:  # SentencePiece's error for bytes that are no model
            raise ValueError(f"Tokenizer file {path!r} is not a SentencePiece model ({e}); point "
                             "config.data.tokenizer at the .model file, downloaded whole.") from None
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"SentencePiece model {path!r} defines no EOS piece; train it with --eos_id.")
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else self.eos_id
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
        self.fingerprint = "sentencepiece-" + _file_digest(path)

    def encode(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


# Special-token spellings of common Hugging Face tokenizers, used when no tokenizer_config.json says.
_HF_SPECIALS = {
    "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]"),
    "bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[CLS]"),
    "pad": ("<pad>", "<|pad|>", "[PAD]"),
}


class HuggingFaceTokenizer:
    """A Hugging Face `tokenizer.json`; BOS/EOS/PAD come from a `tokenizer_config.json` beside it
    when there is one, else from well-known special-token spellings (bos and pad fall back to eos)."""

    def __init__(self, path: str):
        import tokenizers

        self.path = path
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the tokenizers library raises plain Exception for a malformed file
            raise ValueError(f"Tokenizer file {path!r} is not a Hugging Face tokenizer.json ({e}); "
                             "point config.data.tokenizer at the tokenizer.json, downloaded whole.") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        names = self._declared_specials(os.path.join(os.path.dirname(path), "tokenizer_config.json"))
        ids = {}
        for role, spellings in _HF_SPECIALS.items():
            candidates = ([names[role]] if role in names else []) + list(spellings)
            ids[role] = next((self._tok.token_to_id(s) for s in candidates
                              if self._tok.token_to_id(s) is not None), None)
        if ids["eos"] is None:
            raise ValueError(
                f"Tokenizer {path!r} has no recognisable end-of-sequence token; put a "
                "tokenizer_config.json with an eos_token entry next to it.")
        self.eos_id = ids["eos"]
        self.bos_id = self.eos_id if ids["bos"] is None else ids["bos"]
        self.pad_id = self.eos_id if ids["pad"] is None else ids["pad"]
        self.fingerprint = "huggingface-" + _file_digest(path)

    @staticmethod
    def _declared_specials(config_path: str) -> dict:
        if not os.path.isfile(config_path):
            return {}
        config = read_json_object(config_path, "restore it or remove it")
        names = {}
        for role in ("eos", "bos", "pad"):
            value = config.get(f"{role}_token")
            if isinstance(value, dict):  # serialised AddedToken
                value = value.get("content")
            if isinstance(value, str):
                names[role] = value
        return names

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(spec: str):
    """Returns the tokenizer named by `spec`: "byte", a SentencePiece `.model` or a `tokenizer.json`."""
    if spec == BYTE_SPEC:
        return ByteTokenizer()
    if not os.path.isfile(spec):
        raise FileNotFoundError(
            f"Tokenizer file {spec!r} does not exist; set config.data.tokenizer to 'byte', a "
            "SentencePiece .model file or a Hugging Face tokenizer.json.")
    if spec.endswith(".json"):
        return HuggingFaceTokenizer(spec)
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec)
    raise ValueError(
        f"config.data.tokenizer {spec!r} is neither 'byte' nor a .model (SentencePiece) or .json "
        "(Hugging Face) file; pass one of those.")
