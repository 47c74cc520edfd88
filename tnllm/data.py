"""Training data: text files -> a tensorstore token store (built once, cached) -> deterministic windows.

Documents are whole `.txt` files; the records of JSON-lines files (`.jsonl`, or compressed as
`.jsonl.gz` or `.jsonl.zst`); the rows of `.parquet` files; or the rows of a directory that Hugging
Face `datasets` wrote with `save_to_disk`. Records and rows give their text in the field or column
`data.text_field`. The default corpus is the Python standard library's own sources (found through
`sysconfig`), one document per file. The zstandard, parquet and `datasets` readers are the optional
`data` extra. A `.txt` file that does not decode as UTF-8, or holds a NUL byte, is binary and skipped;
a record that is not UTF-8 is skipped; empty documents are skipped; one warning counts each kind and
names the first file (the standard library's few test modules in other encodings are skipped without
one).

Each document's tokens are cut into pieces of seq_len tokens (the last one shorter), so that a corpus
of a few long documents, even one file, still yields a validation split. Piece i, counted over the
whole corpus in sorted file order, goes to the validation split when floor((i+1) f) > floor(i f),
f = val_fraction, which spreads validation pieces evenly and keeps documents shorter than seq_len
whole. Each split is one flat array of token ids; EOS follows the end of every document and every
place where the text jumps (the next piece of the document went to the other split). The arrays are
stored with tensorstore (zarr3) under a key that hashes the file list (paths, sizes, modification
times), the tokenizer, the split rule (val_fraction, seq_len) and the store format, so a later run
over the same corpus and split opens the store instead of tokenizing again.

Tokenization runs in `data.num_workers` processes: this process reads the files in blocks of records,
the workers decode and tokenize blocks, and this process lays their tokens out in block order, so the
store is the same, bit for bit, for any number of workers. It is written in a temporary directory and
renamed into place when complete; a lock file beside it makes other processes that need the same store
(the other hosts of a run, on a shared filesystem) wait for it instead of tokenizing it again.

Training batches are windows of seq_len + 1 tokens starting at multiples of seq_len; epoch e visits
them in a permutation drawn from (seed, e). Batch n is therefore a pure function of (seed, n), which
is what makes a resumed run see exactly the batches an uninterrupted one would, and what lets each
host read only the rows of a batch that its own devices hold.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import functools
import glob
import gzip
import hashlib
import importlib
import io
import json
import math
import multiprocessing
import os
import shutil
import sys
import sysconfig
import uuid
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import ml_collections
import numpy as np
import tensorstore as ts
from tqdm import tqdm

from tnllm.tokenizer import BYTE_SPEC, load_tokenizer

STORE_VERSION = 2  # 2: documents cut into pieces of seq_len tokens before the split
SPLITS = ("train", "val")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
DATA_SUFFIXES = (".txt", *JSONL_SUFFIXES, ".parquet")
_WRITE_BUFFER_TOKENS = 1 << 22
_CHUNK_TOKENS = 1 << 18
_BLOCK_BYTES = 1 << 22  # text per unit of work handed to a tokenizer process
_BLOCKS_IN_FLIGHT = 2   # per worker: enough to keep each busy, few enough to bound memory


def cache_root(data_cfg: ml_collections.ConfigDict) -> str:
    """The token-store cache directory: data.cache_dir, else $TNLLM_CACHE, else ~/.cache/tnllm."""
    return os.path.expanduser(
        data_cfg.cache_dir or os.environ.get("TNLLM_CACHE") or os.path.join("~", ".cache", "tnllm"))


def num_workers(data_cfg: ml_collections.ConfigDict) -> int:
    """Tokenizer processes: data.num_workers, or 0 for every core this process may run on."""
    workers = data_cfg.num_workers
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise ValueError(f"config.data.num_workers must be 0 (one per core) or a positive integer, "
                         f"got {workers!r}.")
    return workers or len(os.sched_getaffinity(0))


def stdlib_files() -> List[str]:
    """The `.py` files of this Python's standard library (third-party site-packages excluded), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        files += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(files)


def is_saved_dataset(path: str) -> bool:
    """Whether `path` is a directory written by `datasets.Dataset.save_to_disk`."""
    return all(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_info.json"))


def _check_not_dataset_dict(path: str) -> None:
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        splits = sorted(d for d in os.listdir(path) if is_saved_dataset(os.path.join(path, d)))
        raise ValueError(f"config.data.path {path!r} is a DatasetDict with splits {', '.join(splits)}; "
                         f"point it at one split's directory, e.g. {os.path.join(path, splits[0])!r}."
                         if splits else f"config.data.path {path!r} is an empty DatasetDict.")


def find_files(path: str) -> List[str]:
    """The sorted sources that `config.data.path` names: a file, a saved `datasets` directory, a
    directory (searched recursively for data files and saved datasets) or a glob; "" names the
    standard library corpus."""
    if not path:
        files = stdlib_files()
    elif os.path.isfile(path) or is_saved_dataset(path):
        files = [path]
    elif os.path.isdir(path):
        _check_not_dataset_dict(path)
        files = []
        for dirpath, dirnames, names in os.walk(path):
            datasets = [d for d in dirnames if is_saved_dataset(os.path.join(dirpath, d))]
            dirnames[:] = [d for d in dirnames if d not in datasets]
            files += [os.path.join(dirpath, f) for f in datasets + names
                      if f in datasets or f.endswith(DATA_SUFFIXES)]
        files.sort()
    else:
        files = sorted(f for f in glob.glob(os.path.expanduser(path), recursive=True)
                       if os.path.isfile(f) or is_saved_dataset(f))
    if not files:
        raise FileNotFoundError(
            f"config.data.path {path!r} names no data files; point it at a .txt, .jsonl, .jsonl.gz, "
            ".jsonl.zst or .parquet file, a saved `datasets` directory, a directory holding some, or "
            "a glob.")
    return files


def _optional(module: str, what: str):
    """Imports an optional reader, or says in one sentence how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"Reading {what} needs the {module} package; install tnllm's data extra "
                         "(`pip install 'tnllm[data]'`).") from None


class NotText(ValueError):
    """A data file that is not UTF-8 text (binary, or another encoding)."""


@dataclasses.dataclass
class _Block:
    """A unit of tokenization work: consecutive records of one source.

    kind: "txt" (records: the file's bytes), "jsonl" (records: lines as bytes; first_line numbers
    the first) or "column" (records: str or None, from parquet or `datasets`). disk_bytes: the
    source bytes read for this block, for the progress bar.
    """
    path: str
    kind: str
    records: list
    first_line: int = 1
    disk_bytes: int = 0


def _chunked(path: str, kind: str, records: Iterable[Tuple[object, int, int]]) -> Iterator[_Block]:
    """Groups (record, its size in bytes, source position after it) into blocks of about
    _BLOCK_BYTES; the last block of a source ends at the source's size."""
    block, size, line, done = [], 0, 1, 0
    for record, nbytes, position in records:
        block.append(record)
        size += nbytes
        if size >= _BLOCK_BYTES:
            yield _Block(path, kind, block, line, position - done)
            line, done, block, size = line + len(block), position, [], 0
    yield _Block(path, kind, block, line, _source_size(path) - done)


def _source_size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(path) for f in names)
    return os.path.getsize(path)


def _jsonl_lines(path: str) -> Iterator[Tuple[bytes, int, int]]:
    """(line, its size, compressed bytes read) for each line of a .jsonl, .jsonl.gz or .jsonl.zst."""
    damaged: Tuple[type, ...] = (EOFError, gzip.BadGzipFile)  # gzip's errors for a cut or bad file
    with open(path, "rb") as raw:
        lines = raw
        if path.endswith(".gz"):
            lines = gzip.GzipFile(fileobj=raw)
        elif path.endswith(".zst"):
            zstd = _optional("zstandard", f"{path} (a .zst file)")
            damaged += (zstd.ZstdError,)
            # Frame after frame, as `zstd` writes large inputs and `cat a.zst b.zst` joins files.
            lines = io.BufferedReader(zstd.ZstdDecompressor().stream_reader(
                raw, read_across_frames=True), 1 << 20)
        try:
            for line in lines:
                yield line, len(line), raw.tell()
        except damaged as e:
            raise ValueError(f"{path} is damaged ({e or type(e).__name__}); download or compress it "
                             "again, or remove it from config.data.path.") from None


def _column(path: str, values: Iterator[Tuple[list, float]]) -> Iterator[Tuple[object, int, int]]:
    """(value, size, position) from batches of column values, each with the share of the source
    read once it is done; a batch's records count as read when its last one is."""
    size, position = _source_size(path), 0
    for batch, fraction in values:
        for k, value in enumerate(batch):
            if k == len(batch) - 1:
                position = int(size * fraction)
            yield value, len(value) if isinstance(value, str) else 0, position


def _missing_column(path: str, field: str, columns: Sequence[str]) -> ValueError:
    return ValueError(f"{path} has no column {field!r} (it has {', '.join(columns)}); set "
                      "config.data.text_field to the column that holds the text.")


def _parquet_values(path: str, field: str) -> Iterator[Tuple[list, float]]:
    pq = _optional("pyarrow.parquet", f"{path} (a parquet file)")
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow.ArrowInvalid and friends for bytes that are no parquet file
        raise ValueError(f"{path} is not a readable parquet file ({e}); write it again or remove it "
                         "from config.data.path.") from None
    if field not in parquet.schema_arrow.names:
        raise _missing_column(path, field, parquet.schema_arrow.names)
    for group in range(parquet.num_row_groups):
        column = parquet.read_row_group(group, columns=[field]).column(0)
        yield _strings(path, field, column), (group + 1) / parquet.num_row_groups


def _dataset_values(path: str, field: str) -> Iterator[Tuple[list, float]]:
    datasets = _optional("datasets", f"{path} (a saved `datasets` directory)")
    dataset = datasets.load_from_disk(path)
    if field not in dataset.column_names:
        raise _missing_column(path, field, dataset.column_names)
    rows, done = max(len(dataset), 1), 0
    for batch in dataset.select_columns([field]).with_format("arrow").iter(batch_size=4096):
        done += batch.num_rows
        yield _strings(path, field, batch.column(0)), done / rows


def _strings(path: str, field: str, column) -> list:
    import pyarrow as pa

    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
            or pa.types.is_null(column.type)):
        raise ValueError(f"{path} column {field!r} holds {column.type}, not text; set "
                         "config.data.text_field to the column that holds the text.")
    return column.to_pylist()


def _blocks(path: str, text_field: str) -> Iterator[_Block]:
    """The blocks of one source, read in order."""
    if os.path.isdir(path):
        return _chunked(path, "column", _column(path, _dataset_values(path, text_field)))
    if path.endswith(".parquet"):
        return _chunked(path, "column", _column(path, _parquet_values(path, text_field)))
    if path.endswith(JSONL_SUFFIXES):
        return _chunked(path, "jsonl", _jsonl_lines(path))
    with open(path, "rb") as f:
        raw = f.read()
    return iter([_Block(path, "txt", [raw], disk_bytes=len(raw))])


@dataclasses.dataclass
class _Skipped:
    """What was left out of the documents, counted."""
    files: List[str] = dataclasses.field(default_factory=list)  # not UTF-8 text
    empty: int = 0
    not_utf8: int = 0
    first_not_utf8: str = ""

    def add(self, other: "_Skipped") -> None:
        self.files += other.files
        self.empty += other.empty
        self.not_utf8 += other.not_utf8
        self.first_not_utf8 = self.first_not_utf8 or other.first_not_utf8


def _texts(block: _Block, text_field: str, skipped: _Skipped) -> List[str]:
    """The non-empty documents of a block; what it leaves out is counted in `skipped`.

    Raises NotText for a .txt file that is not UTF-8 text; a JSON line that is not an object with
    the string field `text_field` is an error naming file and line.
    """
    if block.kind == "txt":
        try:
            text = block.records[0].decode("utf-8")
        except UnicodeDecodeError:
            raise NotText(f"{block.path} is not UTF-8 text") from None
        if "\0" in text:  # valid UTF-8, but no text file holds NUL: UTF-16 or binary data
            raise NotText(f"{block.path} is not UTF-8 text")
        return [text] if text else []
    texts = []
    for line_number, record in enumerate(block.records, block.first_line):
        if block.kind == "jsonl":
            try:
                line = record.decode("utf-8")
            except UnicodeDecodeError:
                skipped.not_utf8 += 1
                skipped.first_not_utf8 = skipped.first_not_utf8 or f"{block.path}:{line_number}"
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line).get(text_field)
            except (json.JSONDecodeError, AttributeError):
                raise ValueError(f"{block.path}:{line_number} is not a JSON object; JSON-lines files "
                                 "need one object per line.") from None
            if not isinstance(record, str):
                raise ValueError(
                    f"{block.path}:{line_number} has no string field {text_field!r}; set "
                    "config.data.text_field to the field that holds the text.")
        if record:
            texts.append(record)
        else:
            skipped.empty += 1
    return texts


def read_documents(path: str, text_field: str) -> Iterator[str]:
    """The non-empty documents of one source, in order (records that are not UTF-8 left out).

    Raises NotText, before yielding anything, for a .txt file that is not UTF-8 text.
    """
    for block in _blocks(path, text_field):
        yield from _texts(block, text_field, _Skipped())


@dataclasses.dataclass
class Tokenized:
    """A block's documents as token ids ([n] int32 each) with their UTF-8 sizes."""
    ids: List[np.ndarray]
    num_bytes: List[int]
    skipped: _Skipped


def _tokenize(block: _Block, text_field: str, tokenizer) -> Tokenized:
    skipped = _Skipped()
    try:
        texts = _texts(block, text_field, skipped)
    except NotText:
        skipped.files.append(block.path)
        texts = []
    ids = [np.asarray(t, np.int32) for t in tokenizer.encode_batch(texts)] if texts else []
    return Tokenized(ids, [len(t.encode("utf-8")) for t in texts], skipped)


_worker_tokenizer = None  # set in each tokenizer process by _start_worker


def _start_worker(spec: str, fingerprint: str) -> None:
    """Loads the tokenizer in a worker from its file, not a pickled copy: a process starts while
    the next one boots only when what it is sent fits in a pipe's buffer."""
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(spec)
    if _worker_tokenizer.fingerprint != fingerprint:
        raise ValueError(f"The tokenizer file {spec!r} changed while the corpus was tokenized; run "
                         "again once it stays put.")


def _tokenize_in_worker(block: _Block, text_field: str) -> Tokenized:
    return _tokenize(block, text_field, _worker_tokenizer)


def _tokenized_blocks(blocks: Iterable[_Block], text_field: str, tokenizer, workers: int
                      ) -> Iterator[Tuple[_Block, Tokenized]]:
    """Each block with its tokens, in block order, tokenized by `workers` processes."""
    if workers <= 1:
        for block in blocks:
            yield block, _tokenize(block, text_field, tokenizer)
        return
    # Spawned, not forked: this process may hold JAX's threads, which a fork would copy mid-work.
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
        initargs=(tokenizer.path or BYTE_SPEC, tokenizer.fingerprint))
    pending = collections.deque()
    try:
        for block in blocks:
            pending.append((block, pool.submit(_tokenize_in_worker, block, text_field)))
            if len(pending) >= _BLOCKS_IN_FLIGHT * workers:
                block, future = pending.popleft()
                yield block, future.result()
        while pending:
            block, future = pending.popleft()
            yield block, future.result()
    except concurrent.futures.process.BrokenProcessPool:
        raise RuntimeError("A tokenizer process died (out of memory, or killed) and nothing was "
                           "stored; run again, with a lower config.data.num_workers if memory is "
                           "short.") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def tokenize_files(files: Sequence[str], data_cfg: ml_collections.ConfigDict, tokenizer
                   ) -> Iterator[Tokenized]:
    """The documents of `files` tokenized block by block, in order, by config.data.num_workers
    processes, with a progress bar over the bytes read. Files that are not UTF-8 text yield no
    documents and are named in their block's `skipped.files`."""
    blocks = (block for path in files for block in _blocks(path, data_cfg.text_field))
    total = sum(map(_source_size, files))
    # No more processes than blocks: starting one costs about a second.
    workers = min(num_workers(data_cfg), -(-total // _BLOCK_BYTES))
    documents = 0
    with tqdm(total=total, desc="tokenizing", unit="B", unit_scale=True, leave=False) as bar:
        for block, result in _tokenized_blocks(blocks, data_cfg.text_field, tokenizer, workers):
            yield result
            documents += len(result.ids)
            bar.update(block.disk_bytes)
            bar.set_postfix_str(f"{documents:,} documents, "
                                f"{documents / max(bar.format_dict['elapsed'], 1e-9):,.0f}/s",
                                refresh=False)


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


def source_stamp(path: str) -> list:
    """What identifies a source's contents: path, size and modification time of each of its files."""
    files = [path] if not os.path.isdir(path) else sorted(
        os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
    stats = [(f, os.stat(f)) for f in files]
    return [[os.path.abspath(f), st.st_size, st.st_mtime_ns] for f, st in stats]


def store_key(files: Sequence[str], data_cfg: ml_collections.ConfigDict, tokenizer) -> str:
    """Hash of everything the stored tokens depend on."""
    blob = json.dumps(dict(version=STORE_VERSION, files=[source_stamp(f) for f in files],
                           tokenizer=tokenizer.fingerprint, text_field=data_cfg.text_field,
                           val_fraction=data_cfg.val_fraction, seq_len=data_cfg.seq_len),
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


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _report_skipped(skipped: _Skipped, files: Sequence[str], long_documents: int, seq_len: int
                    ) -> None:
    """One warning for each kind of record left out or cut, counting them."""
    if skipped.files:
        _warn(f"skipped {len(skipped.files)} of the {len(files)} data files (first "
              f"{skipped.files[0]!r}) because they are not UTF-8 text; convert them to UTF-8 or "
              "narrow config.data.path.")
    if skipped.not_utf8:
        _warn(f"skipped {skipped.not_utf8} records that are not UTF-8 (first {skipped.first_not_utf8}); "
              "re-encode them to train on them.")
    if skipped.empty:
        _warn(f"skipped {skipped.empty} empty records.")
    if long_documents:
        _warn(f"cut {long_documents} documents longer than config.data.seq_len ({seq_len} tokens) "
              "into pieces of seq_len tokens; each piece is trained on without the text before it.")


def _build_store(files: Sequence[str], data_cfg, tokenizer, directory: str) -> None:
    """Tokenizes `files` into `directory` (train, val arrays and meta.json), written in a temporary
    directory first and renamed into place, so a store that exists is always complete."""
    tmp = f"{directory}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        dtype = ts.uint16 if tokenizer.vocab_size <= 1 << 16 else ts.uint32
        writers = {s: _SplitWriter(os.path.join(tmp, s), dtype) for s in SPLITS}
        counts = np.zeros(tokenizer.vocab_size, np.int64)
        documents, piece, long_documents, skipped = 0, 0, 0, _Skipped()
        seq_len, val_fraction = data_cfg.seq_len, data_cfg.val_fraction  # read once: per document
        eos = np.array([tokenizer.eos_id], np.int32)
        for result in tokenize_files(files, data_cfg, tokenizer):
            if result.ids:  # one count per block: a count per document costs vocab_size each
                counts += np.bincount(np.concatenate(result.ids), minlength=tokenizer.vocab_size)
                counts[tokenizer.eos_id] += len(result.ids)
            for ids, num_bytes in zip(result.ids, result.num_bytes):
                n = max(len(ids), 1)
                long_documents += len(ids) > seq_len
                for start, end, val, ends_with_eos in pieces(len(ids), seq_len, piece, val_fraction):
                    # A piece's bytes are its share of the document's; the shares sum to the whole.
                    share = num_bytes * end // n - num_bytes * start // n
                    writers["val" if val else "train"].add(
                        np.concatenate([ids[start:end], eos[:int(ends_with_eos)]]), share)
                    piece += 1
            documents += len(result.ids)
            skipped.add(result.skipped)
        for w in writers.values():
            w.flush()
        if data_cfg.path:  # not for the stdlib's few test modules in other encodings
            _report_skipped(skipped, files, long_documents, data_cfg.seq_len)
        if documents == 0:
            raise ValueError(f"The data files ({len(files)} of them, first {files[0]!r}"
                             f"{f', {len(skipped.files)} not UTF-8 text' if skipped.files else ''}"
                             ") hold no text; point config.data.path at non-empty UTF-8 text files.")
        p = counts[counts > 0] / counts.sum()
        meta = dict(version=STORE_VERSION, files=len(files), skipped_files=len(skipped.files),
                    skipped_records=dict(empty=skipped.empty, not_utf8=skipped.not_utf8),
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


@contextlib.contextmanager
def _build_lock(directory: str) -> Iterator[bool]:
    """Holds the lock that says who builds the store `directory`; yields whether it is exclusive.

    Another process holding it is tokenizing the same store, so this one waits. The operating system
    releases the lock when its holder dies, however it dies, so an interrupted build never blocks a
    later one. On a filesystem without locks (some network filesystems) every process builds its
    own copy; the rename into place keeps that safe.
    """
    parent, name = os.path.split(directory)
    with open(os.path.join(parent, f".{name}.lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"Waiting for another process to finish tokenizing into {directory} ...",
                  file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            yield False
            return
        yield True


class TokenStore:
    """The tokenized corpus: `splits[name]` is a 1-D tensorstore of token ids, `meta` its counts,
    `built` whether this call had to tokenize (False when the cache served it)."""

    def __init__(self, data_cfg: ml_collections.ConfigDict, tokenizer):
        files = find_files(data_cfg.path)
        self.key = store_key(files, data_cfg, tokenizer)
        self.directory = os.path.join(cache_root(data_cfg), f"tokens-{self.key}")
        meta = os.path.join(self.directory, "meta.json")
        self.built = False
        if not os.path.isfile(meta):
            try:
                os.makedirs(os.path.dirname(self.directory), exist_ok=True)
                with _build_lock(self.directory) as exclusive:
                    if not os.path.isfile(meta):  # else another process built it while this waited
                        if exclusive:  # temporary directories of builds that were killed
                            for leftover in glob.glob(glob.escape(self.directory) + ".tmp-*"):
                                shutil.rmtree(leftover, ignore_errors=True)
                        _build_store(files, data_cfg, tokenizer, self.directory)
                        self.built = True
            except OSError as e:
                if not e.filename or not os.path.abspath(e.filename).startswith(
                        os.path.abspath(cache_root(data_cfg))):
                    raise  # a data file, named by the error itself
                # A bad config value, so the same error type as the other config checks.
                raise ValueError(f"Cannot write the token store in {cache_root(data_cfg)!r} "
                                 f"({e.strerror}); set config.data.cache_dir (or $TNLLM_CACHE) to a "
                                 "writable directory.") from None
        with open(meta) as f:
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

    def batch(self, seed: int, index: int, batch_size: int,
              rows: Optional[Sequence[int]] = None) -> np.ndarray:
        """Rows `rows` (default: all) of batch `index` of the shuffled stream:
        [len(rows), seq_len + 1] int32. Only those rows' windows are read."""
        sample = index * batch_size + np.arange(batch_size)[rows if rows is not None else slice(None)]
        epoch, position = np.divmod(sample, self.num_windows)
        return self.read([int(self._order(seed, int(e))[p]) for e, p in zip(epoch, position)])

    def spread(self, count: int) -> np.ndarray:
        """`count` window ids (at most all of them) spread evenly over the split, for evaluation."""
        return np.unique(np.linspace(0, self.num_windows - 1, min(count, self.num_windows)).round()
                         .astype(np.int64))


class BatchStream:
    """A training batch stream with its position; `state()` is what checkpoints save.

    windows: the training split's batch source, whose `batch(seed, n, batch_size, rows)` gives rows
    `rows` of batch n as a pure function of its arguments (`Windows`, `tnllm.instruct.Batches`), so
    a stream restored to a saved position goes on exactly as the original one did.
    """

    def __init__(self, windows, store_key: str, batch_size: int, seed: int):
        self.windows, self.store_key, self.batch_size, self.seed = windows, store_key, batch_size, seed
        self.next_batch = 0

    def __next__(self):
        """The next batch, as `windows.batch` gives it."""
        return self.next_rows(None)

    def next_rows(self, rows: Optional[Sequence[int]]):
        """Rows `rows` (positions in the batch; None: all) of the next batch, reading only their
        windows, as a host does for the rows its devices hold."""
        batch = self.windows.batch(self.seed, self.next_batch, self.batch_size, rows)
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


class Loader(BatchStream):
    """The stream of a token store's training windows: each batch is [batch_size, seq_len + 1]
    int32 token ids (`Windows.batch`)."""

    def __init__(self, store: TokenStore, seq_len: int, batch_size: int, seed: int):
        super().__init__(Windows(store.splits["train"], seq_len), store.key, batch_size, seed)
