"""Configuration: the frozen `ModelConfig` the modules take, and loading of `configs/*.py` files.

A config file defines `get_config()` returning an `ml_collections.ConfigDict` whose `model` field holds
the `ModelConfig` fields; `load(path)` runs it and `model_config(cfg)` checks and freezes the model part.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import numbers
import os
from typing import Any, Mapping, Tuple

import ml_collections

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "save_dots")
PACKINGS = ("concat", "documents")  # config.data.packing
# The forms each token mixer can run, named by config.model.attention_impl. "auto", the default,
# lets `tnllm.attention.choose_impl` pick the fastest form for the inputs and the device.
#   gla        reference, blockwise, recurrent: XLA (tnllm.attention); pallas: the GPU kernels.
#   cosformer  reference (quadratic, for tests); linear (tnllm.cosformer).
#   softmax    xla; cudnn: cuDNN flash attention (jax.nn.dot_product_attention).
IMPLS = {
    "gla": ("auto", "reference", "blockwise", "recurrent", "pallas"),
    "cosformer": ("auto", "reference", "linear"),
    "softmax": ("auto", "xla", "cudnn"),
}
TOKEN_MIXERS = tuple(IMPLS)
# The loss slice of the released sizes: 8,192 tokens x 64,000 words of float32 logits (2 GB) at a
# time. On the H100 it trains as fast as all logits at once (±4 %) and holds 8.4 GiB less at 32K
# tokens per step (docs/benchmarks.md); the tiny configs keep 0, all at once.
LOSS_CHUNK = 8192


def check_positive(name: str, value) -> int:
    """`value` as an int, or a one-sentence error naming `name` (a flag, argument or config field)
    and the fix where it is not an integer of at least 1 (bools refused, numpy integers taken)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}; set it to 1 or more.")
    return int(value)


def check_impl(impl: str, token_mixer: str = "gla") -> None:
    """Raises a one-sentence error when `impl` names no form of `token_mixer` (`IMPLS`)."""
    if impl not in IMPLS[token_mixer]:
        raise ValueError(f"Unknown attention impl {impl!r} for token mixer {token_mixer!r}: choose "
                         f"one of {', '.join(IMPLS[token_mixer])}.")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The TransNormerLLM architecture (docs/spec.md §1, §5) and how to compute it.

    hidden_dim (h) defaults to d_model when 0; head_dim = hidden_dim // num_heads. token_mixer "gla" is
    TransNormerLLM's gated linear attention (lrpe_layers apply to it); "cosformer"
    is causal cosFormer attention (docs/spec.md §10) with the fixed horizon M = cosformer_max_len, which
    must cover the longest context (prompt and generated tokens together). "softmax" is the LLaMA-style
    Transformer baseline (softmax attention with RoPE, RMSNorm with a learned weight, SwiGLU of width
    glu_dim); its KV cache holds max_cache_len tokens, which bounds prompt and generated tokens
    together in generation (not the training length). loss_chunk > 0 computes the training and
    evaluation loss that many tokens at a time (tnllm.loss) instead of materialising all logits;
    train_segment > 0 runs training and evaluation that many positions at a time, carrying the
    recurrent states (GLA and cosFormer), so activation memory does not grow with seq_len.
    attention_impl names the form every layer's token mixer runs (`IMPLS`; "auto" chooses).
    """

    vocab_size: int = 256
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 2
    glu_dim: int = 128
    hidden_dim: int = 0
    scale_embedding: bool = True
    lrpe_layers: Tuple[int, ...] = (0,)
    init_std: float = 0.02
    norm_eps: float = 1e-6
    attention_impl: str = "auto"
    chunk_size: int = 64
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    loss_chunk: int = 0
    train_segment: int = 0
    token_mixer: str = "gla"
    cosformer_max_len: int = 2048
    max_cache_len: int = 2048

    def __post_init__(self):
        try:
            object.__setattr__(self, "lrpe_layers", tuple(int(i) for i in self.lrpe_layers))
        except (TypeError, ValueError):
            raise ValueError(
                f"config.model.lrpe_layers must hold layer indices, got {self.lrpe_layers!r}; on the "
                "command line spell it --config.model.lrpe_layers=0,2 (or '()' for none).") from None
        if self.hidden_dim == 0:
            object.__setattr__(self, "hidden_dim", self.d_model)
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "glu_dim", "hidden_dim",
                     "chunk_size", "cosformer_max_len", "max_cache_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config.model.{name} must be a positive integer, got {value!r}.")
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"config.model.hidden_dim ({self.hidden_dim}) must be divisible by "
                f"config.model.num_heads ({self.num_heads}); change one of them."
            )
        for i in self.lrpe_layers:
            if not 0 <= i < self.num_layers:
                raise ValueError(
                    f"config.model.lrpe_layers holds {i}, out of range for num_layers="
                    f"{self.num_layers}; use indices 0..{self.num_layers - 1}."
                )
        if self.token_mixer not in TOKEN_MIXERS:
            raise ValueError(
                f"config.model.token_mixer is {self.token_mixer!r}; choose one of {', '.join(TOKEN_MIXERS)}."
            )
        if not self.init_std > 0 or not self.norm_eps > 0:
            raise ValueError("config.model.init_std and config.model.norm_eps must be positive.")
        if self.attention_impl not in IMPLS["gla"] + IMPLS[self.token_mixer]:
            raise ValueError(
                f"config.model.attention_impl: Unknown attention impl {self.attention_impl!r}: choose "
                f"one of {', '.join(dict.fromkeys(IMPLS['gla'] + IMPLS[self.token_mixer]))}.")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(
                    f"config.model.{name} is {getattr(self, name)!r}; choose one of {', '.join(DTYPES)}."
                )
        for name, zero in (("loss_chunk", "all logits at once"), ("train_segment", "the whole sequence")):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"config.model.{name} must be 0 ({zero}) or a positive number of "
                                 f"tokens, got {value!r}.")
        if self.train_segment and self.token_mixer == "softmax":
            raise ValueError("config.model.train_segment carries recurrent states between segments, "
                             "but the softmax baseline has none (its attention needs every earlier "
                             "token): set it to 0.")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"config.model.remat_policy is {self.remat_policy!r}; choose one of "
                f"{', '.join(REMAT_POLICIES)}."
            )
        if self.token_mixer == "softmax" and self.head_dim % 2:
            raise ValueError(
                f"config.model.token_mixer 'softmax' rotates feature pairs (RoPE), but head_dim = "
                f"hidden_dim / num_heads = {self.head_dim} is odd; make it even."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    @property
    def mixer_impl(self) -> str:
        """The form of the configured token mixer that attention_impl names: attention_impl itself,
        or "auto" where it names a form of TNL's GLA only (generation asks every mixer for the
        "recurrent" form; cosFormer and softmax have none and choose as for "auto")."""
        return self.attention_impl if self.attention_impl in IMPLS[self.token_mixer] else "auto"

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> "ModelConfig":
        """Builds a ModelConfig, refusing unknown fields by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(
                f"Unknown config.model field(s) {', '.join(unknown)}; known fields are "
                f"{', '.join(sorted(known))}."
            )
        return cls(**dict(fields))

    def to_dict(self) -> dict:
        # lrpe_layers stays a tuple: ml_collections' config_flags can override tuple fields from the
        # command line (--config.model.lrpe_layers=0,2), not list fields.
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def load(path: str) -> ml_collections.ConfigDict:
    """Runs `get_config()` of the config file at `path` and returns its ConfigDict."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file {path!r} does not exist; pass a file from configs/.")
    spec = importlib.util.spec_from_file_location(f"tnllm_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"Config file {path!r} defines no get_config() function.")
    return module.get_config()


def model_config(cfg: ml_collections.ConfigDict) -> ModelConfig:
    """Checks and freezes the `model` part of a full config."""
    return ModelConfig.from_dict(cfg.model.to_dict())


def base_config() -> ml_collections.ConfigDict:
    """The fields every config file starts from; size files override `model` and training defaults."""
    cfg = ml_collections.ConfigDict()
    cfg.model = ml_collections.ConfigDict(ModelConfig().to_dict())
    cfg.model.hidden_dim = 0  # 0 = d_model, whatever size file overrides d_model
    cfg.data = ml_collections.ConfigDict(dict(
        path="",            # a file, a directory or a glob (.txt, .jsonl[.gz|.zst], .parquet, a saved
                            # `datasets` directory); "" = Python's stdlib sources
        text_field="text",  # the field of each JSON record, or the column, that holds its text
        num_workers=0,      # tokenizer processes; 0 = one per core
        tokenizer="byte",   # "byte", a SentencePiece .model or a Hugging Face tokenizer.json
        cache_dir="",       # where token stores live; "" = $TNLLM_CACHE or ~/.cache/tnllm
        val_fraction=0.05,  # share of documents held out for validation
        seq_len=2048,       # tokens per training sequence (windows hold seq_len + 1)
        packing="concat",   # "concat": documents run on into each other; "documents": whole ones per window
        template="",        # instruction records' template (tnllm.instruct.TEMPLATES or a JSON file)
    ))
    cfg.optim = ml_collections.ConfigDict(dict(
        lr=3e-4,            # peak learning rate, reached after warmup_steps
        warmup_steps=1000,
        min_lr_ratio=0.1,   # the cosine decays to lr * min_lr_ratio at train.steps
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,   # on weight matrices and the embedding only
        grad_clip=1.0,      # global-norm clipping threshold; 0 = off
    ))
    cfg.train = ml_collections.ConfigDict(dict(
        steps=20000,          # optimizer steps
        seed=0,               # parameter initialisation and data order: batch n depends on (seed, n)
        batch_size=32,        # sequences per optimizer step, over all devices and micro-batches
        grad_accum_steps=1,   # micro-batches per step (batch_size must divide evenly)
        log_every=10,
        eval_every=1000,
        eval_batches=8,       # validation batches per evaluation, spread over the validation split
        sample_tokens=200,    # length of the sample printed at the end; 0 = none
        peak_tflops=0.0,      # per-device peak for MFU; 0 = look up the device kind
        init_from="",         # an export to start from (parameters only; fresh optimizer and schedule)
    ))
    cfg.checkpoint = ml_collections.ConfigDict(dict(
        every=1000,         # steps between checkpoints (one is also saved at the end and on SIGTERM)
        keep=3,             # how many recent checkpoints to keep
        async_save=True,    # write in the background while training continues
    ))
    cfg.mesh = ml_collections.ConfigDict(dict(
        data=1,             # devices along the data-parallel axis; -1 = all remaining devices
        fsdp=1,
        context=1,          # devices one sequence is split over (TNL's gla mixer; docs/parallelism.md)
        tensor=1,
    ))
    return cfg


def check_context_mixer(parts: int, token_mixer: str) -> None:
    """Raises a one-sentence error when `parts` > 1 devices would split the sequences of a token
    mixer other than TNL's gla: only Lightning Attention combines slices from their states."""
    if parts > 1 and token_mixer != "gla":
        raise ValueError(f"config.mesh.context ({parts}) splits sequences for TNL's gla token mixer "
                         f"only, not {token_mixer!r}; set config.mesh.context to 1.")


def _check_context(cfg: ml_collections.ConfigDict, model: ModelConfig) -> None:
    """The context axis splits every sequence (and every training segment) into equal slices, and
    only TNL's Lightning Attention can combine slices from their states."""
    n = cfg.mesh.get("context", 1)  # configs saved before the axis existed have none
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"config.mesh.context must be a positive number of devices (not -1: the "
                         f"sequence length must divide by it), got {n!r}.")
    if n == 1:
        return
    check_context_mixer(n, model.token_mixer)
    for field, length in (("config.data.seq_len", cfg.data.seq_len),
                          ("config.model.train_segment", model.train_segment)):
        if length % n:
            raise ValueError(f"{field} ({length}) must be divisible by config.mesh.context ({n}), "
                             "which splits every sequence into equal slices; change one of them.")


def check(cfg: ml_collections.ConfigDict) -> ModelConfig:
    """Refuses unknown sections and fields and out-of-range training values, naming the field.

    Returns the checked ModelConfig.
    """
    base = base_config()
    unknown = sorted(set(cfg.keys()) - set(base.keys()))
    if unknown:
        raise ValueError(f"Unknown config section(s) {', '.join(unknown)}; known sections are "
                         f"{', '.join(sorted(base.keys()))}.")
    for section in sorted(base.keys()):
        if section == "model":
            continue
        if section not in cfg:
            raise ValueError(f"The config has no {section} section; start config files from "
                             "tnllm.config.base_config().")
        unknown = sorted(set(cfg[section].keys()) - set(base[section].keys()))
        if unknown:
            raise ValueError(
                f"Unknown config.{section} field(s) {', '.join(unknown)}; known fields are "
                f"{', '.join(sorted(base[section].keys()))}.")
    model = model_config(cfg)
    positive = {"data": ("seq_len",),
                "train": ("steps", "batch_size", "grad_accum_steps", "log_every", "eval_every",
                          "eval_batches"),
                "checkpoint": ("every", "keep")}
    for section, names in positive.items():
        for name in names:
            value = cfg[section][name]
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config.{section}.{name} must be a positive integer, got {value!r}.")
    if not isinstance(cfg.train.seed, int) or cfg.train.seed < 0:
        raise ValueError(f"config.train.seed must be a non-negative integer, got {cfg.train.seed!r}.")
    if not 0 < cfg.data.val_fraction < 1:
        raise ValueError(f"config.data.val_fraction must lie strictly between 0 and 1, got "
                         f"{cfg.data.val_fraction}.")
    if cfg.data.packing not in PACKINGS:
        raise ValueError(f"config.data.packing must be one of {', '.join(PACKINGS)}, got "
                         f"{cfg.data.packing!r}.")
    if cfg.data.template and cfg.data.packing != "documents":
        raise ValueError("Instruction records are packed as whole documents: set "
                         "config.data.packing = 'documents' with config.data.template.")
    if cfg.train.batch_size % cfg.train.grad_accum_steps:
        raise ValueError(
            f"config.train.batch_size ({cfg.train.batch_size}) must be a multiple of "
            f"config.train.grad_accum_steps ({cfg.train.grad_accum_steps}).")
    if not cfg.optim.lr > 0 or not 0 <= cfg.optim.min_lr_ratio <= 1:
        raise ValueError(f"config.optim needs lr > 0 and 0 <= min_lr_ratio <= 1, got lr={cfg.optim.lr} "
                         f"and min_lr_ratio={cfg.optim.min_lr_ratio}.")
    _check_context(cfg, model)
    if not 0 <= cfg.optim.warmup_steps < cfg.train.steps:
        raise ValueError(
            f"config.optim.warmup_steps ({cfg.optim.warmup_steps}) must be at least 0 and below "
            f"config.train.steps ({cfg.train.steps}); lower it for short runs.")
    return model
