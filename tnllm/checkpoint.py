"""Checkpoints and exports with Orbax.

Training work directory: `WORKDIR/checkpoints/<step>/` is an Orbax `CheckpointManager` step with four
items: `params` and `opt_state` (array trees), `meta` (JSON: step and loader position) and `config`
(JSON: the full ml_collections config). Orbax writes each step into a temporary directory and renames
it into place once complete, and deletes old steps only after a new one is committed, so a failed save
never replaces or removes a good checkpoint. A step directory that cannot be read (truncated, damaged)
is moved to `WORKDIR/damaged_checkpoints/` and the previous step is used instead.

Export directory (parameters only, for inference): `config.json` (the full config), `params/` (an Orbax
array tree, float32 or bfloat16) and, for file-based tokenizers, a copy of the tokenizer file that
`config.data.tokenizer` names relative to the export. The directory is assembled under a temporary
name and renamed into place.

    python -m tnllm.checkpoint export --workdir DIR --out EXPORT_DIR [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from tnllm import config as config_lib
from tnllm.model import TransNormerLLM
from tnllm.tokenizer import BYTE_SPEC

CHECKPOINTS = "checkpoints"
DAMAGED = "damaged_checkpoints"
EXPORT_CONFIG = "config.json"
EXPORT_PARAMS = "params"
# Files copied with a Hugging Face tokenizer.json when present: they name its special tokens.
_TOKENIZER_COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json")


def abstract_params(model_cfg: config_lib.ModelConfig) -> Any:
    """The parameter tree of a model config as jax.ShapeDtypeStruct leaves (nothing is allocated)."""
    model = TransNormerLLM(model_cfg)
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), tokens)["params"]))


def _key_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def check_shapes(expected: Any, found: Any, where: str, fix: str) -> None:
    """Raises a ValueError naming the first key whose presence or shape differs between two trees.

    expected, found: trees with `.shape` leaves (arrays, ShapeDtypeStructs or Orbax metadata).
    """
    want = {_key_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(expected)}
    have = {_key_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(found)}
    for key in sorted(want.keys() | have.keys()):
        if key not in have:
            raise ValueError(f"{where} lacks params/{key} (shape {want[key]}) that the config "
                             f"expects; {fix}.")
        if key not in want:
            raise ValueError(f"{where} holds params/{key} (shape {have[key]}) that the config does "
                             f"not have; {fix}.")
        if want[key] != have[key]:
            raise ValueError(f"{where} holds params/{key} of shape {have[key]} but the config "
                             f"expects {want[key]}; {fix}.")


def _metadata_tree(metadata: Any) -> Any:
    return getattr(metadata, "tree", metadata)  # TreeMetadata in recent Orbax, a plain tree before


def _read_json(path: str) -> ml_collections.ConfigDict:
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


# ----------------------------------------------------------------------------- training checkpoints


class TrainCheckpoints:
    """The checkpoints of one training work directory (an Orbax CheckpointManager)."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        """read_only: for readers beside a possibly running training, which must neither create
        nor clean up anything (the cleanup would delete an in-progress save)."""
        self.workdir = workdir
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.path.join(workdir, CHECKPOINTS)),
            # Named handlers let a fresh manager read item metadata before any restore.
            item_handlers=dict(params=ocp.StandardCheckpointHandler(),
                               opt_state=ocp.StandardCheckpointHandler(),
                               meta=ocp.JsonCheckpointHandler(), config=ocp.JsonCheckpointHandler()),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=None if read_only else keep, create=not read_only, read_only=read_only,
                save_interval_steps=0 if read_only else 1,  # Orbax warns when a reader keeps 1
                cleanup_tmp_directories=not read_only, enable_async_checkpointing=async_save))

    def steps(self):
        return sorted(self.manager.all_steps())

    def save(self, step: int, params: Any, opt_state: Any, loader: dict,
             cfg: ml_collections.ConfigDict) -> None:
        """Starts saving (in the background when async); a step that exists already is left alone."""
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(dict(step=step, loader=loader)),
            config=ocp.args.JsonSave(json.loads(cfg.to_json()))))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def _quarantine(self, step: int, error: Exception) -> None:
        src = os.path.join(self.workdir, CHECKPOINTS, str(step))
        dst = os.path.join(self.workdir, DAMAGED, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.move(src, dst)
        self.manager.reload()
        print(f"Checkpoint step {step} in {self.workdir} cannot be read ({_first_line(error)}); "
              f"moved it to {dst} and using the previous one.", file=sys.stderr)

    def read_config(self, step: int) -> ml_collections.ConfigDict:
        """The config saved with `step`; raises DamagedCheckpoint when it cannot be read."""
        try:
            return ml_collections.ConfigDict(self.manager.restore(
                step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])
        except Exception as e:  # noqa: BLE001 -- whatever fails, the step is unusable
            raise DamagedCheckpoint(e) from e

    def read(self, step: int, items: dict, expected_params: Any) -> dict:
        """Restores `items` (name -> Orbax restore args) of `step` once its parameter shapes match
        `expected_params`. Raises DamagedCheckpoint when the step cannot be read, and ValueError
        (naming the key and both shapes) when it holds a different model."""
        try:
            found = _metadata_tree(self.manager.item_metadata(step)["params"])
            if not jax.tree_util.tree_leaves(found):
                raise ValueError("the params item has no array metadata")
        except Exception as e:  # noqa: BLE001
            raise DamagedCheckpoint(e) from e
        check_shapes(expected_params, found,
                     f"Work directory {self.workdir} (checkpoint step {step})",
                     "pass another --workdir or the model settings it was trained with")
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001
            raise DamagedCheckpoint(e) from e

    def restore_latest(self, items: dict, expected_params: Any) -> Optional[Tuple[int, dict]]:
        """Restores `items` from the newest readable step, moving unreadable steps aside.

        Returns (step, restored items), or None when the directory holds no checkpoint.
        """
        for step in reversed(self.steps()):
            try:
                return step, self.read(step, items, expected_params)
            except DamagedCheckpoint as damaged:
                self._quarantine(step, damaged.__cause__)
        return None


class DamagedCheckpoint(Exception):
    """A checkpoint step that exists but cannot be read."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return type(error).__name__ + (f": {text.splitlines()[0]}" if text else "")


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
    os.makedirs(tmp)
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
    """The newest readable step of a work directory; damaged steps are skipped, not moved, since a
    training run may own the directory."""
    checkpoints = TrainCheckpoints(workdir, read_only=True)
    try:
        for step in reversed(checkpoints.steps()):
            try:
                cfg = checkpoints.read_config(step)
                expected = abstract_params(config_lib.model_config(cfg))
                params = checkpoints.read(
                    step, dict(params=ocp.args.StandardRestore(_on_one_device(expected))),
                    expected)["params"]
                return cfg, params
            except DamagedCheckpoint as damaged:
                print(f"Skipping unreadable checkpoint step {step} of {workdir} "
                      f"({_first_line(damaged.__cause__)}).", file=sys.stderr)
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tnllm.checkpoint", description=__doc__.split(
        "\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="export parameters of a training work directory")
    export.add_argument("--workdir", required=True, help="training work directory")
    export.add_argument("--out", required=True, help="new export directory")
    export.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="cast the parameters (default: as trained)")
    args = parser.parse_args(argv)
    try:
        out = export_workdir(args.workdir, args.out, args.dtype)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")
    print(f"Exported {args.workdir} to {out}.")


if __name__ == "__main__":
    main()
