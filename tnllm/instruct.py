"""Instruction data: JSON-lines records rendered by a template, loss masks, windows of whole documents.

Records are `{"prompt": ..., "response": ...}` or `{"messages": [{"role": ..., "content": ...}, ...]}`
with roles system, user and assistant. A template (config.data.template: a built-in name from
TEMPLATES or a JSON file of the same form) gives each role a format string around "{content}".
A record becomes one document: BOS, its turns, EOS. Only what the assistant says is a target (its
content, the template text after it and the EOS that ends the record); the template text before it
and every other turn are context the loss ignores. config.data.template = "tokenizer" renders with
the chat template of a Hugging Face tokenizer instead (`chat_encoder`).

Documents are packed whole into windows of seq_len + 1 tokens (`pack`): one that does not fit starts
the next window, the rest of a window is padding, and every window carries its documents' segment
ids, which the model uses to keep them apart (`tnllm.model.TransNormerLLM`). Epoch e packs the
training documents in a permutation drawn from (seed, e), so batch n is a pure function of (seed, n)
and a resumed run sees exactly the batches an uninterrupted one would.

Records that cannot be used (not JSON, a missing or empty field, an unknown role, no assistant turn,
or a prompt that fills the whole window) are skipped, and one warning counts them by reason; a
record longer than the window is cut to it and counted too.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import json
import os
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import jinja2.sandbox
import numpy as np

from tnllm import data

ROLES = ("system", "user", "assistant")
TEMPLATES: Dict[str, Dict[str, str]] = {
    "plain": {"system": "{content}\n\n", "user": "### Instruction:\n{content}\n\n### Response:\n",
              "assistant": "{content}\n\n"},
    "chatml": {"system": "<|im_start|>system\n{content}<|im_end|>\n",
               "user": "<|im_start|>user\n{content}<|im_end|>\n",
               "assistant": "<|im_start|>assistant\n{content}<|im_end|>\n"},
}

TOKENIZER_TEMPLATE = "tokenizer"  # config.data.template: the tokenizer's own chat template

Document = Tuple[np.ndarray, np.ndarray]  # tokens [n] int32, targets [n] bool
Encoder = Callable[[Sequence[Tuple[str, str]]], Document]  # (role, content) turns -> a document


def load_template(spec: str) -> Dict[str, str]:
    """The role -> format string map named by config.data.template: a TEMPLATES name or a JSON file
    with one string per role, each holding "{content}" once."""
    if spec in TEMPLATES:
        template = TEMPLATES[spec]
    elif os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            try:
                template = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"config.data.template {spec!r} is not valid JSON ({e}); write an "
                                 "object of role: format strings.") from None
    else:
        raise ValueError(f"config.data.template {spec!r} is neither a built-in template "
                         f"({', '.join(TEMPLATES)}) nor a JSON file; name one of those.")
    for role in ROLES:
        if not isinstance(template, dict) or not isinstance(template.get(role), str) \
                or template[role].count("{content}") != 1:
            raise ValueError(f"config.data.template {spec!r} needs for role {role!r} a string holding "
                             "\"{content}\" exactly once.")
    return template


def parse_record(record) -> Tuple[Optional[List[Tuple[str, str]]], str]:
    """(role, content) turns of one record, or (None, the reason it cannot be used)."""
    if not isinstance(record, dict):
        return None, "not a JSON object"
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return None, "empty or non-list messages"
        turns = []
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return None, "a message without a known role and a string content"
            turns.append((m["role"], m["content"]))
        if not any(role == "assistant" for role, _ in turns):
            return None, "no assistant message"
        return turns, ""
    if not isinstance(record.get("prompt"), str) or not isinstance(record.get("response"), str) \
            or not record["response"]:
        return None, "a missing prompt or response"
    return [("user", record["prompt"]), ("assistant", record["response"])], ""


def encode(turns: Sequence[Tuple[str, str]], template: Dict[str, str], tokenizer) -> Document:
    """BOS, the rendered turns and EOS as (tokens [n] int32, targets [n] bool).

    targets[i] marks token i as one the loss predicts: the assistant's content, the template text
    after it, and the final EOS when the record ends with an assistant turn.
    """
    tokens, targets = [tokenizer.bos_id], [False]
    for role, content in turns:
        before, after = template[role].split("{content}")
        answer = role == "assistant"
        for text, target in ((before, False), (content + after, answer)):
            ids = tokenizer.encode(text) if text else []
            tokens += ids
            targets += [target] * len(ids)
    tokens.append(tokenizer.eos_id)
    targets.append(turns[-1][0] == "assistant")
    return np.asarray(tokens, np.int32), np.asarray(targets, bool)


def chat_encoder(tokenizer_spec: str, tokenizer) -> Encoder:
    """Turns -> a document rendered by the `chat_template` of the tokenizer_config.json beside a
    Hugging Face tokenizer.json (Jinja, as Hugging Face renders it; the template writes BOS and the
    end-of-turn tokens itself). Assistant turn i is a target from where the conversation rendered up
    to it with the generation prompt ends to where the conversation including it ends."""
    config_path = os.path.join(os.path.dirname(tokenizer_spec), "tokenizer_config.json")
    chat = None
    if tokenizer_spec.endswith(".json") and os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            settings = json.load(f)
        chat = settings.get("chat_template")
        if isinstance(chat, list):  # named templates: the default one
            chat = next((t.get("template") for t in chat if t.get("name") == "default"), None)
    if not isinstance(chat, str):
        raise ValueError(f"config.data.template = {TOKENIZER_TEMPLATE!r} needs a chat_template in "
                         f"{config_path}, and there is none; name a template of TEMPLATES or a JSON file.")
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    specials = {f"{name}_token": settings.get(f"{name}_token") for name in ("bos", "eos")}
    specials = {k: v.get("content") if isinstance(v, dict) else (v or "") for k, v in specials.items()}
    template = env.from_string(chat)

    def render(turns, generation_prompt: bool) -> str:
        messages = [{"role": role, "content": content} for role, content in turns]
        return template.render(messages=messages, add_generation_prompt=generation_prompt, **specials)

    def encode_chat(turns: Sequence[Tuple[str, str]]) -> Document:
        text = render(turns, False)
        pieces, done = [], 0  # (text, target) in order
        for i, (role, _) in enumerate(turns):
            if role != "assistant":
                continue
            start, end = len(render(turns[:i], True)), len(render(turns[:i + 1], False))
            if not (done <= start <= end <= len(text)):
                raise ValueError("The tokenizer's chat_template renders a conversation that does not "
                                 "begin with its earlier turns; name a template of TEMPLATES instead.")
            pieces += [(text[done:start], False), (text[start:end], True)]
            done = end
        pieces.append((text[done:], False))
        tokens, targets = [], []
        for piece, target in pieces:
            ids = tokenizer.encode(piece) if piece else []
            tokens += ids
            targets += [target] * len(ids)
        return np.asarray(tokens, np.int32), np.asarray(targets, bool)

    return encode_chat


def make_encoder(data_cfg, tokenizer) -> Encoder:
    """The encoder config.data.template names: `chat_encoder` for "tokenizer", else `encode` with
    `load_template`'s template."""
    if data_cfg.template == TOKENIZER_TEMPLATE:
        return chat_encoder(data_cfg.tokenizer, tokenizer)
    template = load_template(data_cfg.template)
    return lambda turns: encode(turns, template, tokenizer)


def read_documents(path: str, encoder: Encoder, window: int) -> List[Document]:
    """The usable records of a JSON-lines file as documents of at most `window` tokens; one warning
    counts the records skipped or cut, by reason, naming the first line of each kind."""
    documents, problems = [], collections.OrderedDict()

    def note(reason: str, line: int) -> None:
        count, first = problems.get(reason, (0, line))
        problems[reason] = (count + 1, first)

    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                note("not valid JSON", number)
                continue
            turns, reason = parse_record(record)
            if turns is None:
                note(reason, number)
                continue
            tokens, targets = encoder(turns)
            if not targets[1:window].any():  # the first token is never predicted
                note(f"no response token within the window of {window} tokens", number)
                continue
            if len(tokens) > window:
                note(f"longer than the window of {window} tokens (cut to it)", number)
                tokens, targets = tokens[:window], targets[:window]
            documents.append((tokens, targets))
    if problems:
        skipped = sum(count for reason, (count, _) in problems.items() if "cut to it" not in reason)
        details = "; ".join(f"{count} with {reason} (first on line {first})"
                            for reason, (count, first) in problems.items())
        warnings.warn(f"{path}: {skipped} record(s) skipped and "
                      f"{sum(c for c, _ in problems.values()) - skipped} cut: {details}.", stacklevel=2)
    if not documents:
        raise ValueError(f"{path} holds no usable instruction record; see the warning above for why.")
    return documents


def text_documents(data_cfg, tokenizer, window: int) -> List[Document]:
    """The plain-text documents of config.data.path, read and tokenized as `tnllm.data` does
    (`data.tokenize_files`: config.data.num_workers processes, a progress bar), for packing
    whole (config.data.packing = "documents" without a template): BOS, the text, EOS, every token a
    target. One longer than the window is cut into pieces of `window` tokens, each packed as a
    document of its own; consecutive pieces share one token, the last of one and the first of the
    next (context only), so every token but BOS is a target once. Files that are not UTF-8 text are
    skipped with one warning."""
    documents, skipped = [], []
    bos, eos = np.array([tokenizer.bos_id], np.int32), np.array([tokenizer.eos_id], np.int32)
    for result in data.tokenize_files(data.find_files(data_cfg.path), data_cfg, tokenizer):
        skipped += result.skipped.files
        for ids in result.ids:
            tokens = np.concatenate([bos, ids, eos])
            for start in range(0, len(tokens) - 1, window - 1):
                piece = tokens[start:start + window]
                targets = np.ones(len(piece), bool)
                targets[0] = False  # a piece's first token has nothing before it to predict it from
                documents.append((piece, targets))
    if skipped:
        warnings.warn(f"{len(skipped)} file(s) of config.data.path are not UTF-8 text and were skipped, "
                      f"the first {skipped[0]}.", stacklevel=2)
    return documents


def pack(lengths: Sequence[int], order: Sequence[int], window: int) -> List[List[int]]:
    """Documents (indices into lengths, taken in `order`) packed whole into windows of `window`
    tokens: each window is filled in order and a document that does not fit starts the next one."""
    windows, current, used = [], [], 0
    for i in order:
        if current and used + lengths[i] > window:
            windows.append(current)
            current, used = [], 0
        current.append(int(i))
        used += lengths[i]
    if current:
        windows.append(current)
    return windows


def window_arrays(documents: Sequence[Document], members: Sequence[int], window: int,
                  pad_id: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One window's (tokens [window] int32, weights [window - 1] f32, segment_ids [window - 1] int32).

    weights[t] = 1 where token t + 1 is a target (the label of input t), segment_ids number the
    documents from 1 and give the padding after them an id of its own.
    """
    tokens = np.full(window, pad_id, np.int32)
    targets = np.zeros(window, bool)
    segments = np.full(window, len(members) + 1, np.int32)
    at = 0
    for n, i in enumerate(members, 1):
        doc_tokens, doc_targets = documents[i]
        tokens[at:at + len(doc_tokens)] = doc_tokens
        targets[at:at + len(doc_tokens)] = doc_targets
        segments[at:at + len(doc_tokens)] = n
        at += len(doc_tokens)
    return tokens, targets[1:].astype(np.float32), segments[:-1]


class Batches:
    """Packed windows of one split's documents: shuffled per epoch for training, in file order for
    validation; `batch(seed, n, size)` is a pure function of its arguments."""

    def __init__(self, documents: Sequence[Document], seq_len: int, pad_id: int):
        self.documents, self.window, self.pad_id = list(documents), seq_len + 1, pad_id
        self.lengths = [len(t) for t, _ in self.documents]
        self._counts: Dict[Tuple[int, int], int] = {}  # windows per (seed, epoch)
        # Every step of an epoch reads its packing, and a batch spans at most two epochs: packed once.
        self.epoch = functools.lru_cache(maxsize=2)(self._epoch)
        self.in_order = functools.lru_cache(maxsize=1)(self._in_order)

    def _epoch(self, seed: int, epoch: int) -> List[List[int]]:
        """The windows of training epoch `epoch`: the documents packed in a permutation of (seed, epoch)."""
        order = np.random.default_rng([seed, epoch]).permutation(len(self.documents))
        windows = pack(self.lengths, order, self.window)
        self._counts[seed, epoch] = len(windows)
        return windows

    def _in_order(self) -> List[List[int]]:
        """The windows of the documents packed in file order (validation, samples)."""
        return pack(self.lengths, range(len(self.documents)), self.window)

    def waste(self) -> float:
        """Share of window tokens that are padding when the documents are packed in file order."""
        return 1.0 - sum(self.lengths) / (len(self.in_order()) * self.window)

    def arrays(self, windows: Sequence[Sequence[int]]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """tokens [n, seq_len + 1] int32, weights [n, seq_len] f32, segment_ids [n, seq_len] int32."""
        rows = [window_arrays(self.documents, w, self.window, self.pad_id) for w in windows]
        return tuple(np.stack(parts) for parts in zip(*rows))

    def batch(self, seed: int, n: int, size: int, rows: Optional[Sequence[int]] = None
              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Training batch n: windows n * size ... (n + 1) * size - 1 of the epochs one after another
        (only its rows `rows`, when given; `tnllm.data.BatchStream.next_rows`)."""
        start, epoch = n * size, 0
        while start >= self._counts.get((seed, epoch), float("inf")):  # epochs already counted
            start -= self._counts[seed, epoch]
            epoch += 1
        windows: List[List[int]] = []
        while len(windows) < size:
            packed = self.epoch(seed, epoch)
            if start >= len(packed):
                start -= len(packed)
            else:
                windows += packed[start:start + size - len(windows)]
                start = 0
            epoch += 1
        return self.arrays(windows if rows is None else [windows[r] for r in rows])

    def read(self, windows: Sequence[int]) -> np.ndarray:
        """Tokens [len(windows), seq_len + 1] of windows in file order (validation, samples)."""
        packed = self.in_order()
        return self.arrays([packed[w] for w in windows])[0]


class Store:
    """The documents of config.data.path for packing whole: instruction records when
    config.data.template is set, else plain text (`text_documents`), as training and validation.

    Record i goes to validation when floor((i+1) f) > floor(i f), f = config.data.val_fraction, the
    rule of `tnllm.data`. `meta` and `tokens_per_byte` count target tokens, those the loss averages.
    """

    def __init__(self, data_cfg, tokenizer):
        if data_cfg.template:
            if not os.path.isfile(data_cfg.path):
                raise FileNotFoundError(f"config.data.path = {data_cfg.path!r} is no file; instruction "
                                        "data (config.data.template is set) is one JSON-lines file.")
            documents = read_documents(data_cfg.path, make_encoder(data_cfg, tokenizer),
                                       data_cfg.seq_len + 1)
        else:
            documents = text_documents(data_cfg, tokenizer, data_cfg.seq_len + 1)
        f = data_cfg.val_fraction
        val = [data.is_validation(i, f) for i in range(len(documents))]
        parts = {"train": [d for d, v in zip(documents, val) if not v],
                 "val": [d for d, v in zip(documents, val) if v]}
        for split, docs in parts.items():
            if not docs:
                raise ValueError(f"{data_cfg.path} leaves no {split} record at config.data.val_fraction "
                                 f"= {f}; add records or change the fraction.")
        self.splits = {split: Batches(docs, data_cfg.seq_len, tokenizer.pad_id)
                       for split, docs in parts.items()}
        self.built, self.directory = True, data_cfg.path or "the standard library"
        files = [data.source_stamp(p) for p in data.find_files(data_cfg.path)]
        # A hash, as `data.store_key`: the key goes into every checkpoint and is compared on resume.
        self.key = hashlib.sha256(json.dumps([files, data_cfg.template, data_cfg.text_field,
                                              data_cfg.seq_len, f, tokenizer.fingerprint]).encode()
                                  ).hexdigest()[:20]
        splits = {}
        for split, docs in parts.items():
            answers = [t[m] for t, m in docs]
            splits[split] = dict(tokens=int(sum(len(a) for a in answers)),
                                 bytes=sum(len(tokenizer.decode(a.tolist()).encode()) for a in answers))
        counts = np.bincount(np.concatenate([t[m] for t, m in parts["train"]]))
        p = counts[counts > 0] / counts.sum()
        self.meta = dict(files=len(files), splits=splits, unigram_entropy=float(-(p * np.log(p)).sum()))

    def tokens_per_byte(self, split: str) -> float:
        s = self.meta["splits"][split]
        return s["tokens"] / max(s["bytes"], 1)


class Loader(data.BatchStream):
    """The stream of a packed store's training windows: each batch is (tokens, weights,
    segment_ids) (`Batches.batch`)."""

    def __init__(self, store: Store, batch_size: int, seed: int):
        super().__init__(store.splits["train"], store.key, batch_size, seed)
