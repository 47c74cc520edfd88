"""Tokenizers: byte-level, SentencePiece and Hugging Face tokenizer.json behind one interface."""
import json

import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import models, pre_tokenizers

from tnllm.tokenizer import ByteTokenizer, load_tokenizer

TEXT = "def f(x):\n    return x * 2  # héllo ✓\n"


def test_byte_tokenizer_round_trip_and_special_ids():
    tok = load_tokenizer("byte")
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8"))
    assert tok.decode(ids) == TEXT
    specials = {tok.pad_id, tok.bos_id, tok.eos_id}
    assert specials == {256, 257, 258} and tok.vocab_size == 259
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == TEXT
    assert tok.encode_batch([TEXT, "a"]) == [ids, [97]]


def _corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}" for i in range(300)]
    path.write_text("\n".join(lines))
    return path


def test_sentencepiece_model(tmp_path):
    prefix = tmp_path / "sp"
    spm.SentencePieceTrainer.train(input=str(_corpus_file(tmp_path)), model_prefix=str(prefix),
                                   vocab_size=320, model_type="bpe", byte_fallback=True,
                                   pad_id=-1, bos_id=1, eos_id=2, unk_id=0,
                                   minloglevel=2)
    tok = load_tokenizer(f"{prefix}.model")
    assert tok.vocab_size == 320
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.pad_id == tok.eos_id  # the model defines no pad piece
    text = "the lazy fox"
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "dog"]) == [ids, tok.encode("dog")]


def _hf_tokenizer(path, specials):
    vocab = {w: i for i, w in enumerate(["[UNK]", "the", "fox", "dog", "lazy", *specials])}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    tok.save(str(path))
    return vocab


def test_hugging_face_tokenizer_json(tmp_path):
    vocab = _hf_tokenizer(tmp_path / "tokenizer.json", ["<s>", "</s>"])
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert tok.vocab_size == len(vocab)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (vocab["<s>"], vocab["</s>"], vocab["</s>"])
    ids = tok.encode("the lazy fox")
    assert ids == [vocab["the"], vocab["lazy"], vocab["fox"]]
    assert tok.decode(ids + [tok.eos_id]) == "the lazy fox"


def test_hugging_face_specials_from_tokenizer_config(tmp_path):
    vocab = _hf_tokenizer(tmp_path / "tokenizer.json", ["<|end|>", "<|pad|>"])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|end|>"}}))
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (vocab["<|end|>"], vocab["<|end|>"], vocab["<|pad|>"])


def test_hugging_face_without_eos_is_refused(tmp_path):
    _hf_tokenizer(tmp_path / "tokenizer.json", ["<mask>"])
    with pytest.raises(ValueError, match="end-of-sequence"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))


def test_bad_specs_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.data.tokenizer"):
        load_tokenizer(str(tmp_path / "missing.model"))
    other = tmp_path / "vocab.txt"
    other.write_text("x")
    with pytest.raises(ValueError, match="neither 'byte' nor"):
        load_tokenizer(str(other))


def test_fingerprints_tell_tokenizers_apart(tmp_path):
    _hf_tokenizer(tmp_path / "a.json", ["</s>"])
    _hf_tokenizer(tmp_path / "b.json", ["</s>", "<pad>"])
    prints = {load_tokenizer(str(tmp_path / f)).fingerprint for f in ("a.json", "b.json")}
    assert len(prints | {ByteTokenizer.fingerprint}) == 3
