"""Training data: text files -> a tensorstore token store (built once, cached) -> deterministic windows.

Documents are whole `.txt` files or the records of `.jsonl` files; the default corpus is the Python
standard library's own sources (found through `sysconfig`), one document per file. Document i (in
sorted file order) goes to the validation split when floor((i+1) f) > floor(i f), f = val_fraction,
which spreads validation documents evenly. Each split is one flat array of token ids in which every
document is followed by EOS, stored with tensorstore (zarr3) under a key that hashes the file list
(paths, sizes, modification times), the tokenizer and the split rule, so a later run over the same
corpus opens the store instead of tokenizing again.

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
import sysconfig
import uuid
from typing import Iterator, List, Sequence

import ml_collections
import numpy as np
import tensorstore as ts
from tqdm import tqdm

STORE_VERSION = 1
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


def read_documents(path: str, text_field: str) -> Iterator[str]:
    """The non-empty documents of one file: the whole text, or each record's `text_field` for .jsonl."""
    with open(path, encoding="utf-8", errors="replace") as f:
        if not path.endswith(".jsonl"):
            text = f.read()
            if text:
                yield text
            return
        for line_number, line in enumerate(f, 1):
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


def _documents(files: Sequence[str], text_field: str) -> Iterator[str]:
    for path in tqdm(files, desc="tokenizing", unit="file", leave=False):
        yield from read_documents(path, text_field)


def _batches(items: Iterator[str], size: int) -> Iterator[List[str]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def is_validation(document: int, val_fraction: float) -> bool:
    return math.floor((document + 1) * val_fraction) > math.floor(document * val_fraction)


def store_key(files: Sequence[str], data_cfg: ml_collections.ConfigDict, tokenizer) -> str:
    """Hash of everything the stored tokens depend on."""
    listing = []
    for f in files:
        st = os.stat(f)
        listing.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    blob = json.dumps(dict(version=STORE_VERSION, files=listing, tokenizer=tokenizer.fingerprint,
                           text_field=data_cfg.text_field, val_fraction=data_cfg.val_fraction),
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
        self.size, self.documents, self.bytes = 0, 0, 0
        self._buffer: List[np.ndarray] = []
        self._buffered = 0

    def add(self, ids: np.ndarray, num_bytes: int) -> None:
        """ids: [n] token ids of one document, EOS included."""
        self._buffer.append(ids.astype(self.dtype))
        self._buffered += len(ids)
        self.documents += 1
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
        document = 0
        for texts in _batches(_documents(files, data_cfg.text_field), _ENCODE_BATCH):
            for text, ids in zip(texts, tokenizer.encode_batch(texts)):
                ids = np.asarray(ids + [tokenizer.eos_id], np.int64)
                split = "val" if is_validation(document, data_cfg.val_fraction) else "train"
                writers[split].add(ids, len(text.encode("utf-8")))
                counts += np.bincount(ids, minlength=tokenizer.vocab_size)
                document += 1
        for w in writers.values():
            w.flush()
        if document == 0:
            raise ValueError(f"The data files ({len(files)} of them, first {files[0]!r}) hold no text; "
                             "point config.data.path at non-empty files.")
        p = counts[counts > 0] / counts.sum()
        meta = dict(version=STORE_VERSION, files=len(files), tokenizer=tokenizer.fingerprint,
                    vocab_size=tokenizer.vocab_size, unigram_entropy=float(-(p * np.log(p)).sum()),
                    splits={s: dict(tokens=w.size, documents=w.documents, bytes=w.bytes)
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
            os.makedirs(os.path.dirname(self.directory), exist_ok=True)
            _build_store(files, data_cfg, tokenizer, self.directory)
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
            warnings.append("the data or tokenizer changed since this checkpoint was written, so "
                            "batches after it differ from the original run's")
        for name in ("seed", "batch_size"):
            if state.get(name) != getattr(self, name):
                warnings.append(f"the loader {name} was {state.get(name)} and is now "
                                f"{getattr(self, name)}, so batches differ from the original run's")
        return warnings
