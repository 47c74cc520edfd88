"""Checkpoints and exports with Orbax, and the lock of a training work directory.

Training work directory: `WORKDIR/checkpoints/<step>/` is an Orbax `CheckpointManager` step with four
items: `params` and `opt_state` (array trees), `meta` (JSON: step, loader position and a fingerprint
of every array) and `config` (JSON: the full ml_collections config). Orbax writes each step into a
temporary directory and renames it into place once complete, and deletes old steps only after a new
one is committed, so a failed or killed save never replaces or removes a good checkpoint.

Resuming tells three faults apart:
  - a damaged step (unreadable or missing files, a fingerprint that does not match, non-finite
    values) is moved to `WORKDIR/damaged_checkpoints/` and the previous step is used;
  - a step that does not fit the current config (parameter shapes, optimizer state layout) stops the
    run with the differing config fields; nothing is moved;
  - a read error that may pass (I/O, timeouts) is retried, then stops the run; nothing is moved.
`WORKDIR/lock` is held (flock) by the training run that owns the directory.

Export directory (parameters only, for inference): `config.json` (the full config), `params/` (an Orbax
array tree, float32 or bfloat16) and, for file-based tokenizers, a copy of the tokenizer file that
`config.data.tokenizer` names relative to the export. The directory is assembled under a temporary
name and renamed into place.

    python -m tnllm.checkpoint export --workdir DIR --out EXPORT_DIR [--dtype bfloat16]
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
import uuid
from typing import Any, Dict, Iterator, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from tnllm import config as config_lib
from tnllm.model import TransNormerLLM
from tnllm.tokenizer import BYTE_SPEC

CHECKPOINTS = "checkpoints"
DAMAGED = "damaged_checkpoints"
LOCK = "lock"
EXPORT_CONFIG = "config.json"
EXPORT_PARAMS = "params"
ARRAY_ITEMS = ("params", "opt_state")
# Files copied with a Hugging Face tokenizer.json when present: they name its special tokens.
_TOKENIZER_COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json")
# Read errors worth another try: the file system may answer next time (network disks, a busy server).
_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EINTR, errno.EIO, errno.ETIMEDOUT, errno.EBUSY,
                     errno.ESTALE, errno.ECONNRESET, errno.ECONNREFUSED, errno.ENETUNREACH,
                     errno.EHOSTUNREACH, errno.ENOMEM}
_TRANSIENT_STATUS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED")
READ_TRIES = 3


class StorageError(ValueError):
    """A problem with a work or export directory or its checkpoints, said in one sentence that names
    the path and the fix. A ValueError, so that every command line reports it as bad input."""


class DamagedCheckpoint(Exception):
    """A checkpoint step that exists but whose bytes cannot be trusted."""


def abstract_params(model_cfg: config_lib.ModelConfig) -> Any:
    """The parameter tree of a model config as jax.ShapeDtypeStruct leaves (nothing is allocated)."""
    model = TransNormerLLM(model_cfg)
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), tokens)["params"]))


def _key_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def check_shapes(expected: Any, found: Any, where: str, fix: str, item: str = "params") -> None:
    """Raises a ValueError naming the first key whose presence or shape differs between two trees,
    and then `fix` (`shape_difference` says what the trees are)."""
    difference = shape_difference(expected, found, where, item)
    if difference:
        raise ValueError(f"{difference}; {fix}.")


def shape_difference(expected: Any, found: Any, where: str, item: str = "params") -> Optional[str]:
    """The first key whose presence or shape differs between two trees, as a clause; None if none.

    expected, found: trees with `.shape` leaves (arrays, ShapeDtypeStructs or Orbax metadata);
    where: what holds `found`; item: the name the keys are shown under.
    """
    want = {_key_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(expected)}
    have = {_key_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(found)}
    for key in sorted(want.keys() | have.keys()):
        if key not in have:
            return f"{where} lacks {item}/{key} (shape {want[key]}) that the config expects"
        if key not in want:
            return f"{where} holds {item}/{key} (shape {have[key]}) that the config does not have"
        if want[key] != have[key]:
            return f"{where} holds {item}/{key} of shape {have[key]} but the config expects {want[key]}"
    return None


def _metadata_tree(metadata: Any) -> Any:
    return getattr(metadata, "tree", metadata)  # TreeMetadata in recent Orbax, a plain tree before


def _read_json(path: str) -> ml_collections.ConfigDict:
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return type(error).__name__ + (f": {text.splitlines()[0]}" if text else "")


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _errno(error: BaseException) -> Optional[int]:
    """The first OS error number in `error`'s chain (Orbax and tensorstore wrap them)."""
    for e in _causes(error):
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno
        if "No space left on device" in str(e):
            return errno.ENOSPC
    return None


def _is_transient(error: BaseException) -> bool:
    return _errno(error) in _TRANSIENT_ERRNOS or any(
        status in str(e) for e in _causes(error) for status in _TRANSIENT_STATUS)


# ----------------------------------------------------------------------------- integrity


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    """Two uint32 sums over the bits of `x`: Σ bits·(2i+1) and Σ mix(bits)+i, wrapping mod 2³².

    Any change of one element changes the first (an odd multiplier keeps every bit flip visible);
    the second, non-linear, catches what cancels in the first. Integer sums wrap identically in any
    order, so the value does not depend on how the array is sharded or which mesh restores it.
    """
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)
    i = jax.lax.iota(jnp.uint32, bits.size)
    mixed = bits * jnp.uint32(0x9E3779B1)
    mixed = (mixed ^ (mixed >> 15)) * jnp.uint32(0x85EBCA77)
    return jnp.stack([jnp.sum(bits * (2 * i + 1), dtype=jnp.uint32),
                      jnp.sum((mixed ^ (mixed >> 13)) + i, dtype=jnp.uint32)])


@jax.jit
def _value_table(tree: Any) -> jax.Array:
    """[leaves, 3] uint32, a row per array of `tree` in `jax.tree.leaves` order: its two fingerprint
    sums and 1 when all its values are finite. One array, so that one transfer brings them all back
    (a tree of small arrays would be one transfer each)."""
    def row(x):
        finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.floating) else True
        return jnp.append(_leaf_fingerprint(x), jnp.uint32(finite))

    return jnp.stack([row(x) for x in jax.tree.leaves(tree)] or [jnp.zeros(3, jnp.uint32)])


def _value_rows(tree: Any) -> Iterator[Tuple[Any, np.ndarray]]:
    """(key path, [fingerprint sum, fingerprint sum, finite]) of every array of `tree`, computed
    where the arrays live in one device call."""
    table = np.asarray(jax.device_get(_value_table(tree)))
    return zip((p for p, _ in jax.tree_util.tree_leaves_with_path(tree)), table)


def fingerprints(items: Dict[str, Any]) -> Dict[str, Dict[str, List[int]]]:
    """{item: {key: [two uint32 sums]}} of every array of each tree in `items`, all computed where
    the arrays live in one device call and brought back in one transfer.

    Why fingerprints of the arrays and not checksums of Orbax's files: they are computed on the
    devices in one pass at save time (no file is read back), do not depend on Orbax's file layout or
    compression, hold for arrays sharded over many hosts (each host writes only its shards), and
    check the values that training actually gets after a restore, whatever path they took.
    """
    sums: Dict[str, Dict[str, List[int]]] = {name: {} for name in items}
    for path, row in _value_rows(items):
        sums[path[0].key][_key_name(path[1:])] = [int(v) for v in row[:2]]
    return sums


def verify(tree: Any, saved: Optional[Dict[str, List[int]]], item: str) -> None:
    """Raises DamagedCheckpoint when a restored tree holds non-finite values or differs from the
    fingerprints saved with it (`saved` None: a checkpoint written before fingerprints existed)."""
    rows = [(_key_name(path), row) for path, row in _value_rows(tree)]
    for key, row in rows:
        if not row[2]:
            raise DamagedCheckpoint(f"{item}/{key} holds NaN or infinite values")
    if saved is None:
        return
    for key, row in rows:
        if saved.get(key) != [int(v) for v in row[:2]]:
            raise DamagedCheckpoint(f"the fingerprint of {item}/{key} differs from the one saved "
                                    "with it")


# ----------------------------------------------------------------------------- the work-directory lock


class WorkdirLock:
    """An exclusive flock on WORKDIR/lock, which holds "pid host" of the owner for messages.

    The kernel drops a flock when its process dies, however it dies, so a lock left by a killed run
    is free to take; its stale "pid host" line is how we know one was left.
    """

    def __init__(self, workdir: str):
        check_writable_dir(workdir, "work directory", "--workdir")
        self.path = os.path.join(workdir, LOCK)
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().split() or ["?", "?"]
            self._file.close()
            raise StorageError(
                f"Work directory {workdir} is in use by another training run (pid {holder[0]} on "
                f"host {holder[-1]}); wait for it to end or pass another --workdir.") from None
        self._file.seek(0)
        stale = self._file.read().split()
        if stale:
            print(f"Took over {self.path} from pid {stale[0]} on host {stale[-1]}, which ended "
                  "without releasing it.", file=sys.stderr)
        self._file.truncate(0)
        self._file.write(f"{os.getpid()} {socket.gethostname()}\n")
        self._file.flush()

    def release(self) -> None:
        self._file.truncate(0)  # an empty lock file says its last owner ended cleanly
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


def check_writable_dir(path: str, what: str, flag: str) -> None:
    """Creates directory `path` if needed; a one-sentence StorageError when it is a file or cannot be
    written (a read-only or full disk, missing permissions)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise StorageError(f"The {what} {path} is an existing file; pass a directory as {flag}.")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{uuid.uuid4().hex[:8]}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise StorageError(f"The {what} {path} cannot be written ({e.strerror}); pass a writable "
                           f"{flag}.") from None


# ----------------------------------------------------------------------------- training checkpoints


def _config_diffs(saved: ml_collections.ConfigDict, current: ml_collections.ConfigDict) -> List[str]:
    """'config.a.b (X in the checkpoint, Y now)' for each field that differs, model and optim first."""
    def flat(d, prefix="config"):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}.{k}")
            else:
                yield f"{prefix}.{k}", v
    a, b = dict(flat(saved.to_dict())), dict(flat(current.to_dict()))
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731 -- JSON turns tuples to lists
    keys = [k for k in sorted(a.keys() | b.keys()) if norm(a.get(k)) != norm(b.get(k))]
    keys.sort(key=lambda k: (not k.startswith(("config.model.", "config.optim.")), k))
    return [f"{k} ({a.get(k)!r} in the checkpoint, {b.get(k)!r} now)" for k in keys]


class TrainCheckpoints:
    """The checkpoints of one training work directory (an Orbax CheckpointManager)."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        """read_only: for readers beside a possibly running training, which must neither create
        nor clean up anything (the cleanup would delete an in-progress save)."""
        self.workdir = workdir
        # A reader does not use Orbax's read_only option, which warns on every open: creating,
        # cleaning and deleting are off, and a reader never saves.
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.path.join(workdir, CHECKPOINTS)),
            # Named handlers let a fresh manager read item metadata before any restore.
            item_handlers=dict(params=ocp.StandardCheckpointHandler(),
                               opt_state=ocp.StandardCheckpointHandler(),
                               meta=ocp.JsonCheckpointHandler(), config=ocp.JsonCheckpointHandler()),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=None if read_only else keep, create=not read_only,
                cleanup_tmp_directories=not read_only, enable_async_checkpointing=async_save))
        self._saving: Optional[int] = None

    def steps(self) -> List[int]:
        return sorted(self.manager.all_steps())

    def committed_steps(self) -> List[int]:
        """The steps on disk now, read afresh (not the manager's cached list)."""
        self.manager.reload()
        return self.steps()

    def save(self, step: int, params: Any, opt_state: Any, loader: dict,
             cfg: ml_collections.ConfigDict) -> None:
        """Starts saving (in the background when async); a step that exists already is left alone.

        The arrays' fingerprints are taken first, on the devices, before training can donate them."""
        if step in self.manager.all_steps():
            return
        self.wait()  # a failed earlier save is reported under its own step, before this one starts
        meta = dict(step=step, loader=loader,
                    fingerprints=fingerprints(dict(params=params, opt_state=opt_state)))
        with self._disk_errors(step):
            self.manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta),
                config=ocp.args.JsonSave(json.loads(cfg.to_json()))))
        self._saving = step

    def wait(self) -> None:
        """Returns once the last save is committed; a failed save raises its StorageError here."""
        with self._disk_errors(self._saving):
            self.manager.wait_until_finished()
        self._saving = None

    def _disk_errors(self, step: Optional[int]):
        return _DiskErrors(self, step)

    def close(self) -> None:
        """Closes the manager. A failed save raises from `wait`, which callers run first; Orbax
        raises it again on closing, and that second report is dropped."""
        try:
            self.manager.close()
        except Exception as e:  # noqa: BLE001 -- only the disk errors that `wait` reported
            if _errno(e) not in _DISK_ERRNOS:
                raise

    def _quarantine(self, step: int, error: DamagedCheckpoint) -> None:
        src = os.path.join(self.workdir, CHECKPOINTS, str(step))
        dst = os.path.join(self.workdir, DAMAGED, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.move(src, dst)
        self.manager.reload()
        print(f"Checkpoint step {step} in {self.workdir} is damaged ({error}); "
              f"moved it to {dst}.", file=sys.stderr)

    def read_config(self, step: int) -> ml_collections.ConfigDict:
        """The config saved with `step`; raises DamagedCheckpoint when it cannot be read."""
        return ml_collections.ConfigDict(self._restore(
            step, dict(config=ocp.args.JsonRestore()))["config"])

    def _restore(self, step: int, items: dict) -> dict:
        """manager.restore with retries: an error that may pass is tried READ_TRIES times and then
        stops the run (StorageError); any other error means damaged bytes (DamagedCheckpoint)."""
        for attempt in range(READ_TRIES):
            try:
                return self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001 -- classified below
                if _errno(e) in (errno.EACCES, errno.EPERM):
                    raise StorageError(f"Checkpoint step {step} in {self.workdir} cannot be read "
                                       f"({_first_line(e)}); fix its permissions and rerun.") from e
                if not _is_transient(e):
                    raise DamagedCheckpoint(_first_line(e)) from e
                if attempt + 1 == READ_TRIES:
                    raise StorageError(
                        f"Reading checkpoint step {step} in {self.workdir} failed {READ_TRIES} times "
                        f"({_first_line(e)}); nothing was moved or changed, so check the disk and "
                        "rerun the same command.") from e
                time.sleep(0.5 * 2 ** attempt)
        raise AssertionError("unreachable")

    def read(self, step: int, targets: Dict[str, Any],
             cfg: Optional[ml_collections.ConfigDict] = None) -> dict:
        """Restores and verifies the array items `targets` (name -> tree of ShapeDtypeStructs with
        shardings) of `step`, plus its `meta`.

        Raises DamagedCheckpoint when the step cannot be trusted; StorageError when it holds arrays
        that do not fit the targets (naming the first key and, given the current `cfg`, the config
        fields that differ from the saved ones) or when reading keeps failing.
        """
        try:
            metadata = self.manager.item_metadata(step)
            found = {name: _metadata_tree(metadata[name]) for name in targets}
            if not all(jax.tree_util.tree_leaves(tree) for tree in found.values()):
                raise ValueError("an array item has no metadata")
        except Exception as e:  # noqa: BLE001 -- missing or unreadable metadata: a damaged step
            raise DamagedCheckpoint(_first_line(e)) from e
        where = f"Work directory {self.workdir} (checkpoint step {step})"
        for name, target in targets.items():
            difference = shape_difference(target, found[name], where, item=name)
            if difference:
                raise StorageError(self._mismatch(step, difference, cfg))
        restored = self._restore(step, dict(meta=ocp.args.JsonRestore(), **{
            name: ocp.args.StandardRestore(target) for name, target in targets.items()}))
        saved = restored["meta"].get("fingerprints", {})
        for name in targets:
            verify(restored[name], saved.get(name), name)
        return restored

    def _mismatch(self, step: int, what: str, cfg: Optional[ml_collections.ConfigDict]) -> str:
        fix = "pass another --workdir or the model settings it was trained with"
        if cfg is None:
            return f"{what}; {fix}."
        try:
            diffs = _config_diffs(self.read_config(step), cfg)
        except DamagedCheckpoint:
            diffs = []
        if not diffs:
            return (f"{what}, although its saved config matches this one (it was written by another "
                    f"version of tnllm); pass a new --workdir.")
        shown = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
        return (f"{what}: it was trained with other settings ({shown}); rerun with the checkpoint's "
                "values of these fields to resume, or pass a new --workdir to start another run.")

    def restore_latest(self, targets: Dict[str, Any],
                       cfg: Optional[ml_collections.ConfigDict] = None) -> Optional[Tuple[int, dict]]:
        """Restores `targets` (see `read`) from the newest good step, moving damaged steps aside.

        Returns (step, restored items), or None when the directory holds no checkpoint. Raises
        StorageError when every step is damaged, when a step does not fit the config, or when reading
        keeps failing; none of these moves a readable step.
        """
        steps = self.steps()
        for step in reversed(steps):
            try:
                return step, self.read(step, targets, cfg)
            except DamagedCheckpoint as damaged:
                self._quarantine(step, damaged)
        if steps:
            raise StorageError(
                f"All {len(steps)} checkpoints in {self.workdir} are damaged (moved to "
                f"{os.path.join(self.workdir, DAMAGED)}); restore them from a backup, or pass "
                "--from_scratch to train again from step 0 in this directory.")
        return None


_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # a full or read-only disk


class _DiskErrors:
    """Turns a full or read-only disk during a save into one StorageError naming the last good step."""

    def __init__(self, checkpoints: TrainCheckpoints, step: Optional[int]):
        self.checkpoints, self.step = checkpoints, step

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or not isinstance(error, Exception) or _errno(error) not in _DISK_ERRNOS:
            return False
        good = [s for s in self.checkpoints.committed_steps() if s != self.step]
        kept = (f"the last good checkpoint (step {good[-1]}) is kept" if good
                else "no checkpoint was written before")
        raise StorageError(
            f"Saving checkpoint step {self.step} in {self.checkpoints.workdir} failed "
            f"({os.strerror(_errno(error))}); {kept}; free space on that disk or pass a --workdir on "
            "another one, then rerun.") from None


# ----------------------------------------------------------------------------- exports
def _on_one_device(tree: Any) -> Any:
    """Restore targets for `tree`'s shapes and dtypes on the first local device, whatever mesh the
    arrays were saved from."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree)


def save_export(out_dir: str, cfg: ml_collections.ConfigDict, params: Any,
                tokenizer_path: Optional[str] = None, dtype: Optional[str] = None) -> str:
    """Writes a parameters-only export: config.json, params/ and a copy of the tokenizer file.

    cfg: the full config (its `model` section must describe `params`); params: plain arrays;
    tokenizer_path: a SentencePiece .model or tokenizer.json to copy (default: the file that
    `cfg.data.tokenizer` names, if it is not "byte"); dtype: cast floating params to this
    ("float32" or "bfloat16"), default as they are. Refuses an existing `out_dir`. Returns out_dir.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        raise FileExistsError(f"Export directory {out_dir} already exists; pass a new --out or "
                              "remove it.")
    model_cfg = config_lib.model_config(cfg)
    check_shapes(abstract_params(model_cfg), params, "The parameters to export",
                 "export with the config the parameters belong to")
    if dtype is not None:
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"Export dtype {dtype!r} is not supported; use float32 or bfloat16.")
        params = jax.tree.map(
            lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    tmp = f"{out_dir}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(tmp)
    except OSError as e:
        raise StorageError(f"The export directory {out_dir} cannot be written ({e.strerror}); pass "
                           "an --out on a writable disk.") from None
    try:
        tokenizer_path = tokenizer_path or (None if cfg.data.tokenizer == BYTE_SPEC
                                            else cfg.data.tokenizer)
        if tokenizer_path is not None:
            name = os.path.basename(tokenizer_path)
            shutil.copyfile(tokenizer_path, os.path.join(tmp, name))
            for companion in _TOKENIZER_COMPANIONS:
                src = os.path.join(os.path.dirname(tokenizer_path), companion)
                if name.endswith(".json") and os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(tmp, companion))
            cfg.data.tokenizer = name  # relative: load_model resolves it against the export
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(os.path.join(tmp, EXPORT_PARAMS), params)
        with open(os.path.join(tmp, EXPORT_CONFIG), "w") as f:
            f.write(cfg.to_json(indent=1))
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _load_export(export_dir: str) -> Tuple[ml_collections.ConfigDict, Any]:
    cfg = _read_json(os.path.join(export_dir, EXPORT_CONFIG))
    if cfg.data.tokenizer != BYTE_SPEC and not os.path.isabs(cfg.data.tokenizer):
        cfg.data.tokenizer = os.path.join(export_dir, cfg.data.tokenizer)
    path = os.path.join(export_dir, EXPORT_PARAMS)
    with ocp.StandardCheckpointer() as checkpointer:
        found = _metadata_tree(checkpointer.metadata(path).item_metadata)
        check_shapes(abstract_params(config_lib.model_config(cfg)), found, f"Export {export_dir}",
                     "its config.json and params/ do not belong together, so export it again")
        params = checkpointer.restore(path, _on_one_device(found))
    return cfg, params


def _load_workdir(workdir: str) -> Tuple[ml_collections.ConfigDict, Any]:
    """The newest good step of a work directory; damaged steps are skipped, not moved, since a
    training run may own the directory."""
    checkpoints = TrainCheckpoints(workdir, read_only=True)
    try:
        for step in reversed(checkpoints.steps()):
            try:
                cfg = checkpoints.read_config(step)
                expected = _on_one_device(abstract_params(config_lib.model_config(cfg)))
                return cfg, checkpoints.read(step, dict(params=expected))["params"]
            except DamagedCheckpoint as damaged:
                print(f"Skipping damaged checkpoint step {step} of {workdir} ({damaged}).",
                      file=sys.stderr)
    finally:
        checkpoints.close()
    raise FileNotFoundError(f"{workdir} holds no readable checkpoint; train into it first or pass "
                            "an export directory.")


def load_model(path: str) -> Tuple[ml_collections.ConfigDict, Any]:
    """Loads (config, params) from an export or a training work directory (its latest good step).

    config: the full ml_collections ConfigDict (`tnllm.config.model_config(config)` gives the
    ModelConfig; `config.data.tokenizer` the tokenizer spec, an absolute path for files);
    params: the `params` collection as plain arrays (`model.apply({"params": params}, ...)`).
    Shapes are checked against the config; a mismatch names the key and both shapes.
    """
    if os.path.isfile(os.path.join(path, EXPORT_CONFIG)):
        return _load_export(os.path.abspath(path))
    if os.path.isdir(os.path.join(path, CHECKPOINTS)):
        return _load_workdir(os.path.abspath(path))
    raise FileNotFoundError(f"{path} is neither an export (no {EXPORT_CONFIG}) nor a training work "
                            f"directory (no {CHECKPOINTS}/); pass one of those.")


def export_workdir(workdir: str, out_dir: str, dtype: Optional[str] = None) -> str:
    """Exports the parameters of the latest good checkpoint of `workdir` to `out_dir`."""
    if not os.path.isdir(os.path.join(workdir, CHECKPOINTS)):
        raise FileNotFoundError(f"{workdir} is not a training work directory (no {CHECKPOINTS}/); "
                                "pass the --workdir that train.py wrote.")
    cfg, params = _load_workdir(os.path.abspath(workdir))
    return save_export(out_dir, cfg, params, dtype=dtype)


def _define_flags():
    # Defined only when run as a program, so importing this module adds no global absl flags.
    from absl import flags

    flags.DEFINE_string("workdir", None, "Training work directory to export.", required=True)
    flags.DEFINE_string("out", None, "New export directory.", required=True)
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                      "Cast the parameters (default: as trained).")


def main(argv) -> None:
    from absl import app, flags, logging

    if argv[1:] != ["export"]:
        raise app.UsageError("Usage: python -m tnllm.checkpoint export --workdir DIR --out EXPORT_DIR "
                             "[--dtype bfloat16]")
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every checkpoint it opens at INFO
        logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    try:
        out = export_workdir(f.workdir, f.out, f.dtype)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"Exported {f.workdir} to {out}.")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
