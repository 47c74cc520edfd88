"""Training data: text files -> a tensorstore token store (built once, cached) -> deterministic windows.

Documents are whole `.txt` files or the records of `.jsonl` files; the default corpus is the Python
standard library's own sources (found through `sysconfig`), one document per file. Files must be UTF-8
text: a file that does not decode as UTF-8, or holds a NUL byte, is binary; it is skipped, and one
warning counts the skipped files and names the first (the standard library's few test modules in
other encodings are skipped without one).

Each document's tokens are cut into pieces of seq_len tokens (the last one shorter), so that a corpus
of a few long documents, even one file, still yields a validation split. Piece i, counted over the
whole corpus in sorted file order, goes to the validation split when floor((i+1) f) > floor(i f),
f = val_fraction, which spreads validation pieces evenly and keeps documents shorter than seq_len
whole. Each split is one flat array of token ids; EOS follows the end of every document and every
place where the text jumps (the next piece of the document went to the other split). The arrays are
stored with tensorstore (zarr3) under a key that hashes the file list (paths, sizes, modification
times), the tokenizer, the split rule (val_fraction, seq_len) and the store format, so a later run
over the same corpus and split opens the store instead of tokenizing again.

Training batches are windows of seq_len + 1 tokens starting at multiples of seq_len; epoch e visits
them in a permutation drawn from (seed, e). Batch n is therefore a pure function of (seed, n), which
is what makes a resumed run see exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import uuid
from typing import Iterator, List, Sequence, Tuple

import ml_collections
import numpy as np
import tensorstore as ts
from tqdm import tqdm

STORE_VERSION = 2  # 2: documents cut into pieces of seq_len tokens before the split
SPLITS = ("train", "val")
_WRITE_BUFFER_TOKENS = 1 << 22
_CHUNK_TOKENS = 1 << 18
_ENCODE_BATCH = 256  # documents per tokenizer call


def cache_root(data_cfg: ml_collections.ConfigDict) -> str:
    """The token-store cache directory: data.cache_dir, else $TNLLM_CACHE, else ~/.cache/tnllm."""
    return os.path.expanduser(
        data_cfg.cache_dir or os.environ.get("TNLLM_CACHE") or os.path.join("~", ".cache", "tnllm"))


def stdlib_files() -> List[str]:
    """The `.py` files of this Python's standard library (third-party site-packages excluded), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        files += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(files)


def find_files(path: str) -> List[str]:
    """The sorted files that `config.data.path` names: a file, a directory (searched recursively for
    .txt and .jsonl) or a glob; "" names the standard library corpus."""
    if not path:
        files = stdlib_files()
    elif os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names
                       if f.endswith((".txt", ".jsonl")))
    else:
        files = sorted(f for f in glob.glob(os.path.expanduser(path), recursive=True)
                       if os.path.isfile(f))
    if not files:
        raise FileNotFoundError(
            f"config.data.path {path!r} names no data files; point it at a .txt or .jsonl file, a "
            "directory holding some, or a glob.")
    return files


class NotText(ValueError):
    """A data file that is not UTF-8 text (binary, or another encoding)."""


def read_documents(path: str, text_field: str) -> Iterator[str]:
    """The non-empty documents of one file: the whole text, or each record's `text_field` for .jsonl.

    Raises NotText, before yielding anything, for a .txt file that is not UTF-8 text; a .jsonl line
    that is not UTF-8 or not a JSON object with that string field is an error naming file and line.
    """
    if not path.endswith(".jsonl"):
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise NotText(f"{path} is not UTF-8 text") from None
        if "\0" in text:  # valid UTF-8, but no text file holds NUL: UTF-16 or binary data
            raise NotText(f"{path} is not UTF-8 text")
        if text:
            yield text
        return
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, 1):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{line_number} is not UTF-8 text; .jsonl files must be "
                                 "UTF-8, so re-encode the file or remove the line.") from None
            if not line.strip():
                continue
            try:
                text = json.loads(line).get(text_field)
            except (json.JSONDecodeError, AttributeError):
                raise ValueError(f"{path}:{line_number} is not a JSON object; .jsonl files need one "
                                 "object per line.") from None
            if not isinstance(text, str):
                raise ValueError(
                    f"{path}:{line_number} has no string field {text_field!r}; set "
                    "config.data.text_field to the field that holds the text.")
            if text:
                yield text


class _Documents:
    """The documents of `files` in order, skipping files that are not text; `skipped` lists those."""

    def __init__(self, files: Sequence[str], text_field: str):
        self.files, self.text_field = files, text_field
        self.skipped: List[str] = []

    def __iter__(self) -> Iterator[str]:
        for path in tqdm(self.files, desc="tokenizing", unit="file", leave=False):
            try:
                yield from read_documents(path, self.text_field)
            except NotText:
                self.skipped.append(path)


def _batches(items: Iterator[str], size: int) -> Iterator[List[str]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def is_validation(piece: int, val_fraction: float) -> bool:
    """Whether piece `piece` (counted over the corpus) is held out: an even spread of val_fraction."""
    return math.floor((piece + 1) * val_fraction) > math.floor(piece * val_fraction)


def pieces(num_tokens: int, seq_len: int, first_piece: int, val_fraction: float
           ) -> Iterator[Tuple[int, int, bool, bool]]:
    """The pieces of one document of `num_tokens` tokens whose first piece has corpus index
    `first_piece`: (start, end, is_validation, ends_with_eos) for each, in order. EOS ends the
    document's last piece and every piece whose successor goes to the other split."""
    starts = range(0, max(num_tokens, 1), seq_len)
    for k, start in enumerate(starts):
        i = first_piece + k
        val = is_validation(i, val_fraction)
        jump = k == len(starts) - 1 or is_validation(i + 1, val_fraction) != val
        yield start, min(start + seq_len, num_tokens), val, jump


def store_key(files: Sequence[str], data_cfg: ml_collections.ConfigDict, tokenizer) -> str:
    """Hash of everything the stored tokens depend on."""
    listing = []
    for f in files:
        st = os.stat(f)
        listing.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    blob = json.dumps(dict(version=STORE_VERSION, files=listing, tokenizer=tokenizer.fingerprint,
                           text_field=data_cfg.text_field, val_fraction=data_cfg.val_fraction,
                           seq_len=data_cfg.seq_len),
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _array_spec(path: str) -> dict:
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}


class _SplitWriter:
    """Appends token arrays to a resizable 1-D tensorstore array, in large writes."""

    def __init__(self, path: str, dtype):
        spec = _array_spec(path)
        spec["metadata"] = {
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [_CHUNK_TOKENS]}},
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}]}
        self.array = ts.open(spec, create=True, dtype=dtype, shape=[0]).result()
        self.dtype = np.dtype(dtype.numpy_dtype)
        self.size, self.pieces, self.bytes = 0, 0, 0
        self._buffer: List[np.ndarray] = []
        self._buffered = 0

    def add(self, ids: np.ndarray, num_bytes: int) -> None:
        """ids: [n] token ids of one piece, with its EOS if any."""
        self._buffer.append(ids.astype(self.dtype))
        self._buffered += len(ids)
        self.pieces += 1
        self.bytes += num_bytes
        if self._buffered >= _WRITE_BUFFER_TOKENS:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        tokens = np.concatenate(self._buffer)
        self.array = self.array.resize(exclusive_max=[self.size + len(tokens)]).result()
        self.array[self.size:self.size + len(tokens)].write(tokens).result()
        self.size += len(tokens)
        self._buffer, self._buffered = [], 0


def _build_store(files: Sequence[str], data_cfg, tokenizer, directory: str) -> None:
    """Tokenizes `files` into `directory` (train, val arrays and meta.json), written in a temporary
    directory first and renamed into place, so a store that exists is always complete."""
    tmp = f"{directory}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        dtype = ts.uint16 if tokenizer.vocab_size <= 1 << 16 else ts.uint32
        writers = {s: _SplitWriter(os.path.join(tmp, s), dtype) for s in SPLITS}
        counts = np.zeros(tokenizer.vocab_size, np.int64)
        documents, piece = 0, 0
        eos = np.array([tokenizer.eos_id], np.int64)
        source = _Documents(files, data_cfg.text_field)
        for texts in _batches(iter(source), _ENCODE_BATCH):
            for text, ids in zip(texts, tokenizer.encode_batch(texts)):
                ids = np.asarray(ids, np.int64)
                num_bytes, n = len(text.encode("utf-8")), max(len(ids), 1)
                for start, end, val, ends_with_eos in pieces(len(ids), data_cfg.seq_len, piece,
                                                             data_cfg.val_fraction):
                    # A piece's bytes are its share of the document's; the shares sum to the whole.
                    share = num_bytes * end // n - num_bytes * start // n
                    writers["val" if val else "train"].add(
                        np.concatenate([ids[start:end], eos[:int(ends_with_eos)]]), share)
                    piece += 1
                counts += np.bincount(ids, minlength=tokenizer.vocab_size)
                counts[tokenizer.eos_id] += 1
                documents += 1
        for w in writers.values():
            w.flush()
        if source.skipped and data_cfg.path:  # not for the stdlib's few test modules in other encodings
            print(f"warning: skipped {len(source.skipped)} of the {len(files)} data files (first "
                  f"{source.skipped[0]!r}) because they are not UTF-8 text; convert them to UTF-8 or "
                  "narrow config.data.path.", file=sys.stderr)
        if documents == 0:
            raise ValueError(f"The data files ({len(files)} of them, first {files[0]!r}"
                             f"{f', {len(source.skipped)} not UTF-8 text' if source.skipped else ''}"
                             ") hold no text; point config.data.path at non-empty UTF-8 text files.")
        p = counts[counts > 0] / counts.sum()
        meta = dict(version=STORE_VERSION, files=len(files), skipped_files=len(source.skipped),
                    documents=documents, tokenizer=tokenizer.fingerprint,
                    vocab_size=tokenizer.vocab_size, unigram_entropy=float(-(p * np.log(p)).sum()),
                    splits={s: dict(tokens=w.size, pieces=w.pieces, bytes=w.bytes)
                            for s, w in writers.items()})
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        try:
            os.rename(tmp, directory)
        except OSError:  # another process finished the same store first; theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class TokenStore:
    """The tokenized corpus: `splits[name]` is a 1-D tensorstore of token ids, `meta` its counts,
    `built` whether this call had to tokenize (False when the cache served it)."""

    def __init__(self, data_cfg: ml_collections.ConfigDict, tokenizer):
        files = find_files(data_cfg.path)
        self.key = store_key(files, data_cfg, tokenizer)
        self.directory = os.path.join(cache_root(data_cfg), f"tokens-{self.key}")
        self.built = not os.path.isfile(os.path.join(self.directory, "meta.json"))
        if self.built:
            try:
                os.makedirs(os.path.dirname(self.directory), exist_ok=True)
                _build_store(files, data_cfg, tokenizer, self.directory)
            except OSError as e:
                if not e.filename or not os.path.abspath(e.filename).startswith(
                        os.path.abspath(cache_root(data_cfg))):
                    raise  # a data file, named by the error itself
                # A bad config value, so the same error type as the other config checks.
                raise ValueError(f"Cannot write the token store in {cache_root(data_cfg)!r} "
                                 f"({e.strerror}); set config.data.cache_dir (or $TNLLM_CACHE) to a "
                                 "writable directory.") from None
        with open(os.path.join(self.directory, "meta.json")) as f:
            self.meta = json.load(f)
        context = ts.Context({"cache_pool": {"total_bytes_limit": 1 << 28}})
        self.splits = {s: ts.open(_array_spec(os.path.join(self.directory, s)), read=True,
                                  context=context).result() for s in SPLITS}

    def tokens_per_byte(self, split: str) -> float:
        s = self.meta["splits"][split]
        return s["tokens"] / max(s["bytes"], 1)


class Windows:
    """Windows of seq_len + 1 tokens of one split: shuffled per epoch for training, or spread evenly.

    tokens: 1-D tensorstore of token ids; window w holds tokens [w seq_len, (w+1) seq_len + 1).
    """

    def __init__(self, tokens: ts.TensorStore, seq_len: int, split: str = "train"):
        self.tokens, self.seq_len = tokens, seq_len
        self._order = functools.lru_cache(maxsize=2)(self._permutation)
        self.num_windows = (tokens.shape[0] - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(
                f"The {split} split holds {tokens.shape[0]} tokens, fewer than config.data.seq_len + 1 "
                f"= {seq_len + 1}; add data, lower seq_len or raise config.data.val_fraction.")

    def _permutation(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(self.num_windows)

    def read(self, windows: Sequence[int]) -> np.ndarray:
        """The token ids of `windows`: [len(windows), seq_len + 1] int32."""
        futures = [self.tokens[w * self.seq_len:(w + 1) * self.seq_len + 1].read() for w in windows]
        return np.stack([f.result() for f in futures]).astype(np.int32)

    def batch(self, seed: int, index: int, batch_size: int) -> np.ndarray:
        """Batch `index` of the shuffled stream: [batch_size, seq_len + 1] int32."""
        sample = index * batch_size + np.arange(batch_size)
        epoch, position = np.divmod(sample, self.num_windows)
        return self.read([int(self._order(seed, int(e))[p]) for e, p in zip(epoch, position)])

    def spread(self, count: int) -> np.ndarray:
        """`count` window ids (at most all of them) spread evenly over the split, for evaluation."""
        return np.unique(np.linspace(0, self.num_windows - 1, min(count, self.num_windows)).round()
                         .astype(np.int64))


class Loader:
    """The training batch stream with its position; `state()` is what checkpoints save."""

    def __init__(self, store: TokenStore, seq_len: int, batch_size: int, seed: int):
        self.windows = Windows(store.splits["train"], seq_len)
        self.store_key, self.batch_size, self.seed = store.key, batch_size, seed
        self.next_batch = 0

    def __next__(self) -> np.ndarray:
        """The next batch: [batch_size, seq_len + 1] int32 token ids."""
        batch = self.windows.batch(self.seed, self.next_batch, self.batch_size)
        self.next_batch += 1
        return batch

    def state(self) -> dict:
        return dict(seed=self.seed, next_batch=self.next_batch, batch_size=self.batch_size,
                    store=self.store_key)

    def restore(self, state: dict) -> List[str]:
        """Continues from a saved position; returns warnings for what differs from when it was saved."""
        self.next_batch = int(state["next_batch"])
        warnings = []
        if state.get("store") != self.store_key:
            warnings.append("the data, tokenizer or split changed since this checkpoint was written, so "
                            "batches after it differ from the original run's")
        for name in ("seed", "batch_size"):
            if state.get(name) != getattr(self, name):
                warnings.append(f"the loader {name} was {state.get(name)} and is now "
                                f"{getattr(self, name)}, so batches differ from the original run's")
        return warnings
