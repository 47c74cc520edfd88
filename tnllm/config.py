"""Configuration: the frozen `ModelConfig` the modules take, and loading of `configs/*.py` files.

A config file defines `get_config()` returning an `ml_collections.ConfigDict` whose `model` field holds
the `ModelConfig` fields; `load(path)` runs it and `model_config(cfg)` checks and freezes the model part.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Mapping, Tuple

import ml_collections

from tnllm import attention

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "save_dots")
TOKEN_MIXERS = ("gla", "cosformer")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The TransNormerLLM architecture (SPEC.md §1, §5) and how to compute it.

    hidden_dim (h) defaults to d_model when 0; head_dim = hidden_dim // num_heads. token_mixer "gla" is
    TransNormerLLM's gated linear attention (lrpe_layers and attention_impl apply to it); "cosformer"
    is causal cosFormer attention (SPEC.md §10) with the fixed horizon M = cosformer_max_len, which
    must cover the longest context (prompt and generated tokens together).
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
    attention_impl: str = "blockwise"
    chunk_size: int = 64
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    token_mixer: str = "gla"
    cosformer_max_len: int = 2048

    def __post_init__(self):
        object.__setattr__(self, "lrpe_layers", tuple(int(i) for i in self.lrpe_layers))
        if self.hidden_dim == 0:
            object.__setattr__(self, "hidden_dim", self.d_model)
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "glu_dim", "hidden_dim",
                     "chunk_size", "cosformer_max_len"):
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
        if not self.init_std > 0 or not self.norm_eps > 0:
            raise ValueError("config.model.init_std and config.model.norm_eps must be positive.")
        try:
            attention.check_impl(self.attention_impl)
        except ValueError as e:
            raise ValueError(f"config.model.attention_impl: {e}") from None
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(
                    f"config.model.{name} is {getattr(self, name)!r}; choose one of {', '.join(DTYPES)}."
                )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"config.model.remat_policy is {self.remat_policy!r}; choose one of "
                f"{', '.join(REMAT_POLICIES)}."
            )
        if self.token_mixer not in TOKEN_MIXERS:
            raise ValueError(
                f"config.model.token_mixer is {self.token_mixer!r}; choose one of {', '.join(TOKEN_MIXERS)}."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

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
        d = dataclasses.asdict(self)
        d["lrpe_layers"] = list(self.lrpe_layers)
        return d

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
    """The fields every config file starts from; size files override `model`."""
    cfg = ml_collections.ConfigDict()
    cfg.model = ml_collections.ConfigDict(ModelConfig().to_dict())
    cfg.model.hidden_dim = 0  # 0 = d_model, whatever size file overrides d_model
    return cfg
