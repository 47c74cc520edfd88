"""Import and export of released TransNormerLLM Hugging Face checkpoints (docs/spec.md §6).

    python -m tnllm.convert import --hf_dir=DIR --out=EXPORT_DIR [--dtype=float32|bfloat16]
        [--tokenizer=tokenizer.model]
    python -m tnllm.convert export --checkpoint=DIR --out=HF_DIR [--dtype=bfloat16|float32]

`import` reads `config.json` and the weights of a Hugging Face checkpoint directory
(`model.safetensors` or `*.safetensors` shards, with or without `model.safetensors.index.json`;
`pytorch_model.bin` or `pytorch_model-*.bin` shards with `pytorch_model.bin.index.json`) and writes a
tnllm export whose tokenizer is the directory's SentencePiece `tokenizer.model`. Reading `.bin` files
needs PyTorch, an optional dependency; `.safetensors` files do not.

`export` writes `model.safetensors` (tied LM head, so no `lm_head.weight`) and a `config.json` that the
released modelling code (`TransnormerForCausalLM`, loaded with `trust_remote_code`) accepts.

Layouts: PyTorch Linear weights are (out, in), tnllm kernels (in, out) with the attention width split
into heads: W_qkvu (4h, d) <-> (d, 4, H, hd), W_out (d, h) <-> (H, hd, d); LRPE θ (H, 1, hd) <-> (H, hd).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import flax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import safetensors.numpy

from tnllm import checkpoint, tokenizer
from tnllm.config import ModelConfig, base_config, model_config

# TransnormerConfig's defaults in the released configuration code: a field that config.json leaves
# out takes this value there, so it does here.
HF_DEFAULTS: Dict[str, Any] = dict(
    vocab_size=64000, decoder_embed_dim=1024, decoder_layers=24, decoder_attention_heads=8,
    hidden_dim=1024, glu_dim=2816, no_scale_embedding=False, linear_use_lrpe_list=[],
    linear_act_fun="silu", norm_type="simplermsnorm", bias=False, init_std=0.02,
    pad_token_id=0, bos_token_id=1, eos_token_id=2)
ACTIVATIONS = ("swish", "silu")  # both mean silu in the released code
# The released SimpleRMSNorm hard-codes its epsilon; config.json has no field for it.
RELEASED_NORM_EPS = 1e-6
LM_HEAD = "lm_head.weight"
DTYPES = ("float32", "bfloat16")
_RESTORE = "restore it from the release"


def model_config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """Maps a Hugging Face TransNormerLLM `config.json` (as a dict) to a tnllm ModelConfig.

    Refuses what tnllm does not compute: biases, a norm other than simplermsnorm, an activation other
    than swish/silu, and other model types.
    """
    hf = {**HF_DEFAULTS, **hf}
    model_type = hf.get("model_type", "transnormer")
    if model_type != "transnormer":
        raise ValueError(f"config.json has model_type {model_type!r}; only 'transnormer' "
                         "(TransNormerLLM) checkpoints can be converted.")
    if hf["bias"]:
        raise ValueError("config.json sets bias: true, but tnllm's layers have no biases; only "
                         "checkpoints with bias: false can be converted.")
    if hf["norm_type"] != "simplermsnorm":
        raise ValueError(f"config.json has norm_type {hf['norm_type']!r}; tnllm implements only "
                         "'simplermsnorm' (SRMSNorm), so this checkpoint cannot be converted.")
    if hf["linear_act_fun"] not in ACTIVATIONS:
        raise ValueError(f"config.json has linear_act_fun {hf['linear_act_fun']!r}; tnllm implements "
                         f"only {' or '.join(ACTIVATIONS)}, so this checkpoint cannot be converted.")
    d, layers = hf["decoder_embed_dim"], hf["decoder_layers"]
    flags = list(hf["linear_use_lrpe_list"])
    if not flags and "linear_use_lrpe" in hf:  # the released code then uses one flag for every layer
        flags = [hf["linear_use_lrpe"]] * layers
    if len(flags) != layers:
        raise ValueError(f"config.json's linear_use_lrpe_list has {len(flags)} entries for "
                         f"decoder_layers={layers}; give one 0/1 entry per layer.")
    glu_dim = d if hf["glu_dim"] == -1 else hf["glu_dim"]  # -1 means d in the released code
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], d_model=d, num_layers=layers,
            num_heads=hf["decoder_attention_heads"], glu_dim=glu_dim, hidden_dim=hf["hidden_dim"],
            scale_embedding=not hf["no_scale_embedding"],
            lrpe_layers=tuple(i for i, f in enumerate(flags) if f), init_std=hf["init_std"],
            norm_eps=RELEASED_NORM_EPS)
    except ValueError as e:
        raise ValueError(f"config.json describes an invalid model: {e}") from None


def hf_config_from_model(cfg: ModelConfig, *, dtype: str = "bfloat16", pad_id: int = 0,
                         bos_id: int = 1, eos_id: int = 2) -> Dict[str, Any]:
    """The `config.json` dict of the released modelling code for `cfg` (inverse of
    `model_config_from_hf`); refuses models that code cannot run."""
    if cfg.norm_eps != RELEASED_NORM_EPS:
        raise ValueError(f"config.model.norm_eps is {cfg.norm_eps}, but the released code fixes it at "
                         f"{RELEASED_NORM_EPS}; only models with that value can be exported.")
    if cfg.num_layers == 1:
        raise ValueError("config.model.num_layers is 1, but the released code divides by "
                         "num_layers - 1 for the decay rates; only models of 2+ layers can be exported.")
    if cfg.lrpe_layers and cfg.hidden_dim != cfg.d_model:
        raise ValueError(f"config.model.hidden_dim ({cfg.hidden_dim}) differs from d_model "
                         f"({cfg.d_model}) in a model with LRPE, which the released code sizes by "
                         "d_model; only models with hidden_dim = d_model can be exported.")
    return {
        "architectures": ["TransnormerForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_transnormer.TransnormerConfig",
                     "AutoModelForCausalLM": "modeling_transnormer.TransnormerForCausalLM"},
        "model_type": "transnormer",
        "pad_token_id": pad_id, "bos_token_id": bos_id, "eos_token_id": eos_id,
        "vocab_size": cfg.vocab_size, "use_cache": True, "init_std": cfg.init_std,
        "decoder_embed_dim": cfg.d_model, "decoder_layers": cfg.num_layers,
        "decoder_attention_heads": cfg.num_heads, "no_scale_embedding": not cfg.scale_embedding,
        "add_bos_token": False, "norm_type": "simplermsnorm",
        "linear_use_lrpe_list": [int(i in cfg.lrpe_layers) for i in range(cfg.num_layers)],
        "hidden_dim": cfg.hidden_dim, "linear_act_fun": "swish", "glu_dim": cfg.glu_dim,
        "bias": False, "tie_word_embeddings": True, "torch_dtype": dtype,
    }


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One released tensor: its state-dict key and shape, and its place and shape in tnllm params."""

    hf_key: str
    path: Tuple[str, ...]
    hf_shape: Tuple[int, ...]
    shape: Tuple[int, ...]
    linear: bool  # a PyTorch Linear weight, (out, in): transposed between the layouts

    def to_tnllm(self, w: np.ndarray) -> np.ndarray:
        return (w.T if self.linear else w).reshape(self.shape)

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        if self.linear:
            return np.ascontiguousarray(w.reshape(self.hf_shape[::-1]).T)
        return w.reshape(self.hf_shape)


def layout(cfg: ModelConfig) -> List[Tensor]:
    """Every tensor of the released state dict for `cfg` (docs/spec.md §6), embedding first."""
    if cfg.token_mixer != "gla":
        raise ValueError(f"Only TransNormerLLM's layout exists on Hugging Face; a model with "
                         f"config.model.token_mixer {cfg.token_mixer!r} (not 'gla') cannot be converted.")
    d, h, g, heads, hd = cfg.d_model, cfg.hidden_dim, cfg.glu_dim, cfg.num_heads, cfg.head_dim
    tensors = [Tensor("model.embed_tokens.weight", ("embed_tokens", "embedding"),
                      (cfg.vocab_size, d), (cfg.vocab_size, d), linear=False)]
    for i in range(cfg.num_layers):
        key, path = f"model.layers.{i}.", (f"layers_{i}",)
        mixer, glu = path + ("token_mixer",), path + ("channel_mixer",)
        tensors += [
            Tensor(key + "token_mixer.qkvu_proj.weight", mixer + ("qkvu_proj", "kernel"),
                   (4 * h, d), (d, 4, heads, hd), linear=True),
            Tensor(key + "token_mixer.out_proj.weight", mixer + ("out_proj", "kernel"),
                   (d, h), (heads, hd, d), linear=True),
            Tensor(key + "channel_mixer.l1.weight", glu + ("l1", "kernel"), (g, d), (d, g), linear=True),
            Tensor(key + "channel_mixer.l2.weight", glu + ("l2", "kernel"), (g, d), (d, g), linear=True),
            Tensor(key + "channel_mixer.l3.weight", glu + ("l3", "kernel"), (d, g), (g, d), linear=True),
        ]
        if i in cfg.lrpe_layers:
            tensors.append(Tensor(key + "token_mixer.lrpe.theta", mixer + ("theta",),
                                  (heads, 1, hd), (heads, hd), linear=False))
    return tensors


def _check_names_and_shapes(found: Mapping[str, Tuple[int, ...]],
                            expected: Mapping[str, Tuple[int, ...]], what: str, fix: str) -> None:
    """Raises one ValueError naming every missing, unexpected and wrongly shaped tensor."""

    def listed(names: Sequence[str]) -> str:
        return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")

    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k} (expected {tuple(expected[k])}, found {tuple(found[k])})"
             for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    problems = [f"{label} {listed(names)}" for label, names in (
        ("missing", missing), ("unexpected", unexpected), ("shape mismatches:", wrong)) if names]
    if problems:
        raise ValueError(f"{what} do not match the model config: {'; '.join(problems)}; {fix}.")


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], cfg: ModelConfig,
                           dtype: str = "float32") -> Dict[str, Any]:
    """Released state dict (key -> (out, in) array) -> tnllm params (nested dict of `dtype` arrays).

    A `lm_head.weight` must duplicate the embedding: tnllm ties the LM head (docs/spec.md §1).
    """
    tensors = layout(cfg)
    embedding = tensors[0].hf_key
    found = {k: tuple(v.shape) for k, v in state_dict.items() if k != LM_HEAD}
    _check_names_and_shapes(found, {t.hf_key: t.hf_shape for t in tensors}, "The checkpoint's tensors",
                            "check that config.json belongs to these weights")
    if LM_HEAD in state_dict and not np.array_equal(state_dict[LM_HEAD], state_dict[embedding]):
        raise ValueError(f"The checkpoint's {LM_HEAD} differs from {embedding}, but tnllm ties the LM "
                         "head to the embedding; only checkpoints with a tied head can be imported.")
    flat = {t.path: t.to_tnllm(np.asarray(state_dict[t.hf_key])).astype(jnp.dtype(dtype))
            for t in tensors}
    return flax.traverse_util.unflatten_dict(flat)


def state_dict_from_params(params: Mapping[str, Any], cfg: ModelConfig,
                           dtype: str = "bfloat16") -> Dict[str, np.ndarray]:
    """tnllm params (plain or boxed arrays) -> released state dict of contiguous `dtype` arrays."""
    flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(params))
    tensors = layout(cfg)
    _check_names_and_shapes({"/".join(p): np.shape(v) for p, v in flat.items()},
                            {"/".join(t.path): t.shape for t in tensors}, "The parameters",
                            "check that they belong to this config")
    return {t.hf_key: t.to_hf(np.asarray(flat[t.path]).astype(jnp.dtype(dtype))) for t in tensors}


def _weight_files(hf_dir: str) -> List[str]:
    """The weight files of a checkpoint directory, safetensors preferred, an index's list if any."""
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"),
                                ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        index = os.path.join(hf_dir, index_name)
        if os.path.isfile(index):
            weight_map = tokenizer.read_json_object(index, _RESTORE).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index} has no weight_map; restore the index file from the release.")
            files = sorted(set(weight_map.values()))
            absent = [name for name in files if not os.path.isfile(os.path.join(hf_dir, name))]
            if absent:
                raise FileNotFoundError(f"{index} lists weight files {', '.join(absent)} that are "
                                        f"not in {hf_dir}; download them too.")
            return [os.path.join(hf_dir, name) for name in files]
        files = sorted(glob.glob(os.path.join(hf_dir, pattern)))
        if files:
            return files
    raise FileNotFoundError(
        f"No weights in {hf_dir}: expected model.safetensors (or *.safetensors shards), "
        "pytorch_model.bin, or pytorch_model-*.bin shards with pytorch_model.bin.index.json.")


def _read_torch(path: str) -> Dict[str, np.ndarray]:
    try:
        import torch  # optional: only the .bin format needs it
    except ImportError:
        raise ImportError(f"Reading {path} needs PyTorch: install tnllm's hf extra "
                          "(`pip install 'tnllm[hf]'`; the CPU wheel of torch is enough), or convert "
                          "from a .safetensors copy of the checkpoint.") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap can only be used" not in str(e):
            raise
        state = torch.load(path, map_location="cpu", weights_only=True)  # the pre-zip format

    def to_numpy(t):
        if t.dtype == torch.bfloat16:  # NumPy has no bfloat16: reinterpret the bits as ml_dtypes'
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    return {k: to_numpy(v) for k, v in state.items()}


def _read_weight_file(path: str) -> Dict[str, np.ndarray]:
    """The tensors of one weight file; a file the readers cannot parse is named as damaged."""
    try:
        if path.endswith(".safetensors"):
            return safetensors.numpy.load_file(path)
        return _read_torch(path)
    except ImportError:
        raise
    except OSError as e:
        if e.filename:  # the system's error names the file and the cause (permissions, a device)
            raise
        reason = e.strerror or str(e)
    except Exception as e:  # safetensors, torch and pickle each raise their own types for bad bytes
        reason = str(e).split(". ")[0].rstrip(".") or type(e).__name__
    if os.path.getsize(path) == 0:
        reason = "the file is empty"
    raise ValueError(f"{path} cannot be read ({reason}): it is damaged or incomplete, for example "
                     "an interrupted download; download it again.")


def read_state_dict(hf_dir: str) -> Dict[str, np.ndarray]:
    """All tensors of the checkpoint in `hf_dir` (one file or shards), keyed by state-dict name."""
    state_dict: Dict[str, np.ndarray] = {}
    for path in _weight_files(hf_dir):
        part = _read_weight_file(path)
        repeated = sorted(state_dict.keys() & part.keys())
        if repeated:
            raise ValueError(f"{', '.join(repeated[:8])} appear(s) in more than one weight file of "
                             f"{hf_dir} (again in {os.path.basename(path)}); remove the stray file.")
        state_dict.update(part)
    return state_dict


def _hf_config_path(hf_dir: str) -> str:
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{hf_dir} has no config.json; pass the directory of a Hugging Face "
                                "TransNormerLLM checkpoint.")
    return config_path


def load_hf(hf_dir: str, dtype: str = "float32") -> Tuple[ml_collections.ConfigDict, Dict[str, Any]]:
    """Reads a Hugging Face TransNormerLLM checkpoint directory.

    Returns the full tnllm config (`config.model` from config.json, parameters and compute in `dtype`)
    and the params (nested dict of NumPy arrays of `dtype`).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype is {dtype!r}; choose one of {', '.join(DTYPES)}.")
    hf = tokenizer.read_json_object(_hf_config_path(hf_dir), _RESTORE)
    model = model_config_from_hf(hf).replace(dtype=dtype, param_dtype=dtype)
    params = params_from_state_dict(read_state_dict(hf_dir), model, dtype)
    config = base_config()
    config.model.update(model.to_dict())
    return config, params


def import_hf(hf_dir: str, out_dir: str, *, dtype: str = "float32",
              tokenizer_path: Optional[str] = None) -> None:
    """Converts the checkpoint in `hf_dir` into a tnllm export at `out_dir` (`tnllm.generate` loads it);
    the tokenizer is `tokenizer_path`, by default the checkpoint's `tokenizer.model`."""
    _hf_config_path(hf_dir)  # a wrong directory is named as such, before its tokenizer
    tokenizer_path = tokenizer_path or os.path.join(hf_dir, "tokenizer.model")
    if not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(f"Tokenizer {tokenizer_path} does not exist; download the release's "
                                "tokenizer.model into the checkpoint directory or pass --tokenizer.")
    config, params = load_hf(hf_dir, dtype)
    vocab = tokenizer.load_tokenizer(tokenizer_path).vocab_size
    if vocab > config.model.vocab_size:
        raise ValueError(f"Tokenizer {tokenizer_path} has {vocab} tokens, more than the model's "
                         f"vocab_size {config.model.vocab_size}; pass the checkpoint's own tokenizer.")
    checkpoint.save_export(out_dir, config, params, tokenizer_path=tokenizer_path)


def export_hf(checkpoint_dir: str, out_dir: str, *, dtype: str = "bfloat16") -> None:
    """Writes the tnllm export or training work directory `checkpoint_dir` as a Hugging Face checkpoint:
    `out_dir` gets config.json, model.safetensors and the SentencePiece tokenizer.model if there is one.
    `out_dir` appears complete or not at all."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype is {dtype!r}; choose one of {', '.join(DTYPES)}.")
    if os.path.exists(out_dir):
        raise FileExistsError(f"{out_dir} already exists; choose a new --out directory.")
    config, params = checkpoint.load_model(checkpoint_dir)
    model = model_config(config)
    spec = config.data.tokenizer
    tok = tokenizer.load_tokenizer(spec)
    hf = hf_config_from_model(model, dtype=dtype, pad_id=tok.pad_id, bos_id=tok.bos_id,
                              eos_id=tok.eos_id)
    state_dict = state_dict_from_params(params, model, dtype)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    try:
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        # transformers loads only safetensors files that declare the PyTorch format.
        safetensors.numpy.save_file(state_dict, os.path.join(staging, "model.safetensors"),
                                    metadata={"format": "pt"})
        if spec.endswith(".model"):
            shutil.copyfile(spec, os.path.join(staging, "tokenizer.model"))
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


COMMANDS = ("import", "export")
# The flags each command takes; a flag of the other command is refused rather than ignored.
_COMMAND_FLAGS = {"import": ("hf_dir", "out", "dtype", "tokenizer"),
                  "export": ("checkpoint", "out", "dtype")}
_REQUIRED = {"import": ("hf_dir", "out"), "export": ("checkpoint", "out")}
_DEFAULT_DTYPE = {"import": "float32", "export": "bfloat16"}


def _define_flags(flag_values=None):
    """Defines the flags in `flag_values` (absl's global FLAGS by default). Called only when run as a
    program, so importing this module adds no global absl flags."""
    from absl import flags

    kw = dict(flag_values=flags.FLAGS if flag_values is None else flag_values)
    flags.DEFINE_string("hf_dir", None, "import: Hugging Face checkpoint directory (config.json and "
                        "the weights).", **kw)
    flags.DEFINE_string("checkpoint", None, "export: tnllm export or training work directory.", **kw)
    flags.DEFINE_string("out", None, "import: export directory to write; export: new directory for "
                        "config.json and model.safetensors.", **kw)
    flags.DEFINE_enum("dtype", None, list(DTYPES), "Parameter dtype of the result (default: float32 "
                      "for import, bfloat16 for export).", **kw)
    flags.DEFINE_string("tokenizer", None, "import: SentencePiece model (default: "
                        "HF_DIR/tokenizer.model).", **kw)


def _command(argv: Sequence[str], flag_values) -> str:
    """The subcommand named by the positional arguments, its flags checked; raises ValueError."""
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise ValueError(f"Name one command, import or export, as in `python -m tnllm.convert import "
                         f"--hf_dir=DIR --out=EXPORT_DIR`; got {' '.join(argv[1:]) or 'none'}.")
    command = argv[1]
    other = sorted(name for names in _COMMAND_FLAGS.values() for name in names
                   if name not in _COMMAND_FLAGS[command] and flag_values[name].present)
    if other:
        raise ValueError(f"{command} takes no {', '.join('--' + n for n in other)}; its flags are "
                         f"{', '.join('--' + n for n in _COMMAND_FLAGS[command])}.")
    missing = [name for name in _REQUIRED[command] if flag_values[name].value is None]
    if missing:
        raise ValueError(f"{command} needs {' and '.join('--' + n for n in missing)}.")
    return command


def main(argv: Sequence[str]) -> None:
    from absl import flags

    f = flags.FLAGS
    try:
        command = _command(argv, f)
        dtype = f.dtype or _DEFAULT_DTYPE[command]
        if command == "import":
            import_hf(f.hf_dir, f.out, dtype=dtype, tokenizer_path=f.tokenizer)
        else:
            export_hf(f.checkpoint, f.out, dtype=dtype)
    except (ValueError, OSError, ImportError) as e:  # bad input: one line naming the fix
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {f.out}")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
