"""TransNormerLLM in Flax Linen, as released (docs/spec.md §1-3), and its softmax-attention baseline.

Every parameter carries logical axis names (`vocab`, `embed`, `qkvu`, `heads`, `head_dim`, `mlp`); only
the sharding code maps them onto mesh axes. Every token mixer takes the form config.model.attention_impl
names, "auto" chosen by one policy for all of them (`tnllm.attention.choose_impl`).

config.model.token_mixer picks the layer's token mixer (`token_mixer`); "softmax" builds the LLaMA-style
Transformer baseline of docs/spec.md §11, whose norms (`norm`) and channel mixer (`channel_mixer`) come with it:
RMSNorm with a learned weight and SwiGLU instead of SRMSNorm and SGLU.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from tnllm import cosformer, sharding, softmax
from tnllm.attention import document_positions, layer_slopes, lightning_attention
from tnllm.config import ModelConfig

Array = jax.Array

_REMAT = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def srms_scale(x: Array, eps: float = 1e-6, axes: Sequence[int] = (-1,)) -> Array:
    """SRMSNorm's row scale rsqrt(mean(x^2) + eps) over `axes`, float32, the axes kept as size 1."""
    return jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), axis=tuple(axes),
                                  keepdims=True) + eps)


def srms_norm(x: Array, eps: float = 1e-6, axes: Sequence[int] = (-1,)) -> Array:
    """SRMSNorm: x * rsqrt(mean(x^2) + eps) over `axes`, computed in float32, returned in x's dtype."""
    return (x.astype(jnp.float32) * srms_scale(x, eps, axes)).astype(x.dtype)


def lrpe_theta_init(num_heads: int, head_dim: int):
    """theta[h, j] = 10000^(-2i/D), i = h*head_dim + j, D = num_heads*head_dim (docs/spec.md §3)."""

    def init(key, shape, dtype=jnp.float32):
        del key
        d = num_heads * head_dim
        i = jnp.arange(d, dtype=jnp.float32)
        return (10000.0 ** (-2.0 * i / d)).reshape(shape).astype(dtype)

    return init


def lrpe(x: Array, theta: Array, positions: Array) -> Array:
    """LRPE: x -> [x cos(theta t), x sin(theta t)] along the feature axis.

    x: [batch, seq, heads, hd]; theta: [heads, hd]; positions: [batch, seq] int absolute positions.
    Returns [batch, seq, heads, 2*hd] in x's dtype; phases are float32.
    """
    phase = positions.astype(jnp.float32)[:, :, None, None] * theta.astype(jnp.float32)[None, None]
    xf = x.astype(jnp.float32)
    return jnp.concatenate([xf * jnp.cos(phase), xf * jnp.sin(phase)], axis=-1).astype(x.dtype)


def _init(cfg: ModelConfig, names: Tuple[Optional[str], ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=cfg.init_std), names)


class RMSNorm(nn.Module):
    """RMSNorm with a learned weight (initialised to ones): srms_norm(x) * scale, scale [d_model]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [batch, seq, d_model] -> the same shape and dtype."""
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), self.cfg.param_dtype)
        return srms_norm(x, self.cfg.norm_eps) * scale.astype(x.dtype)


def norm(cfg: ModelConfig, name: str) -> Callable[[Array], Array]:
    """The pre-norm of the model: SRMSNorm (no parameter) for TNL's mixers, RMSNorm for softmax."""
    if cfg.token_mixer == "softmax":
        return RMSNorm(cfg, name=name)
    return functools.partial(srms_norm, eps=cfg.norm_eps)


class SGLU(nn.Module):
    """GLU channel mixer: (act(x W1) * x W2) W3, no biases. act is the identity in TNL's SGLU and silu
    in SwiGLU (`swish`), the channel mixer of the softmax baseline."""

    cfg: ModelConfig
    swish: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [batch, seq, d_model] -> [batch, seq, d_model]."""
        cfg = self.cfg
        dense = lambda feats, names, name: nn.DenseGeneral(  # noqa: E731
            feats, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            kernel_init=_init(cfg, names), name=name)
        x1 = dense(cfg.glu_dim, ("embed", "mlp"), "l1")(x)
        x2 = dense(cfg.glu_dim, ("embed", "mlp"), "l2")(x)
        x1 = nn.with_logical_constraint(x1, ("batch", "length", "mlp"))
        if self.swish:
            x1 = nn.silu(x1)
        return dense(cfg.d_model, ("mlp", "embed"), "l3")(x1 * x2)


class GatedLinearAttention(nn.Module):
    """GLA token mixer of one layer (docs/spec.md §1): decayed causal linear attention with gate u."""

    cfg: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x: Array, positions: Array, mask: Optional[Array],
                 initial_state: Optional[Array],
                 segment_ids: Optional[Array] = None) -> Tuple[Array, Array]:
        """x: [batch, seq, d_model]; positions: [batch, seq] int; mask: [batch, seq] bool or None
        (False = padding: its key is zeroed so it contributes nothing); initial_state:
        [batch, heads, dk, head_dim] f32 or None; segment_ids: [batch, seq] int packed documents
        (`tnllm.attention.lightning_attention`) or None.

        Returns the output [batch, seq, d_model] and the final state [batch, heads, dk, head_dim] f32,
        where dk = 2*head_dim in LRPE layers and head_dim elsewhere.
        """
        cfg = self.cfg
        h, hd = cfg.num_heads, cfg.head_dim
        # nn.Einsum, not nn.DenseGeneral: DenseGeneral initialises a flattened 2-D kernel and applies
        # the 4-D logical constraint to it whenever a mesh is current (flax 0.12), which fails.
        qkvu = nn.Einsum(
            (cfg.d_model, 4, h, hd), "btd,dqhk->btqhk", use_bias=False, dtype=cfg.dtype,
            param_dtype=cfg.param_dtype, kernel_init=_init(cfg, ("embed", "qkvu", "heads", "head_dim")),
            name="qkvu_proj")(x)
        qkvu = nn.with_logical_constraint(qkvu, ("batch", "length", "qkvu", "heads", "head_dim"))
        q, k, v, u = (qkvu[:, :, i] for i in range(4))
        q, k = nn.silu(q), nn.silu(k)
        if self.layer in cfg.lrpe_layers:
            theta = self.param(
                "theta", nn.with_logical_partitioning(lrpe_theta_init(h, hd), ("heads", "head_dim")),
                (h, hd), cfg.param_dtype)
            q, k = lrpe(q, theta, positions), lrpe(k, theta, positions)
        if mask is not None:
            k = jnp.where(mask[:, :, None, None], k, jnp.zeros_like(k))
        slopes = layer_slopes(h, self.layer, cfg.num_layers)
        o, state = lightning_attention(q, k, v, slopes, impl=cfg.attention_impl,
                                       chunk_size=cfg.chunk_size, initial_state=initial_state,
                                       segment_ids=segment_ids)
        o = nn.with_logical_constraint(o, ("batch", "length", "heads", "head_dim"))
        out_proj = nn.Einsum(
            (h, hd, cfg.d_model), "bthk,hkd->btd", use_bias=False, dtype=cfg.dtype,
            param_dtype=cfg.param_dtype, kernel_init=_init(cfg, ("heads", "head_dim", "embed")),
            name="out_proj")
        # The norm spans all heads together (the released code), not each head.
        return out_proj(srms_norm(o, cfg.norm_eps, axes=(-2, -1)) * u), state


_TOKEN_MIXERS = {"gla": GatedLinearAttention, "cosformer": cosformer.CosformerAttention,
                 "softmax": softmax.SoftmaxAttention}


def token_mixer(cfg: ModelConfig, layer: int) -> nn.Module:
    """The token mixer of layer `layer` named by config.model.token_mixer, the one place that chooses it.

    Every mixer is built as Mixer(cfg, layer), picks its form from cfg.attention_impl through
    `tnllm.attention.choose_impl`, and is called as mixer(x, positions, mask, initial_state,
    segment_ids=None) -> (y, final_state), with x and y [batch, seq, d_model] and its own state
    (`state_specs`).
    """
    return _TOKEN_MIXERS[cfg.token_mixer](cfg, layer, name="token_mixer")


def channel_mixer(cfg: ModelConfig) -> SGLU:
    """TNL's SGLU, or SwiGLU for the softmax baseline."""
    return SGLU(cfg, swish=cfg.token_mixer == "softmax", name="channel_mixer")


class DecoderLayer(nn.Module):
    """Pre-norm residual layer: x + TokenMixer(Norm(x)), then x + ChannelMixer(Norm(x))."""

    cfg: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x, positions, mask, initial_state, segment_ids=None):
        cfg = self.cfg
        y, state = token_mixer(cfg, self.layer)(norm(cfg, "token_mixer_norm")(x), positions, mask,
                                                initial_state, segment_ids=segment_ids)
        x = x + y
        x = x + channel_mixer(cfg)(norm(cfg, "channel_mixer_norm")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x, state


class TransNormerLLM(nn.Module):
    """The language model: scaled tied embedding, `num_layers` decoder layers, norm, tied head.

    With token_mixer "softmax" it is the softmax baseline; the name stays for every mixer.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens: Array, positions: Optional[Array] = None,
                 mask: Optional[Array] = None,
                 initial_states: Optional[Sequence[Array]] = None,
                 return_hidden: bool = False,
                 segment_ids: Optional[Array] = None) -> Tuple[Array, Tuple[Array, ...]]:
        """Forward pass.

        Args:
          tokens: [batch, seq] int token ids.
          positions: [batch, seq] int absolute positions (LRPE and cosFormer phases); default 0..seq-1.
          mask: [batch, seq] bool, False at padding (zeroes its key); default all real.
          initial_states: one state per layer (from a prefill; shapes: `state_specs`), or None.
          return_hidden: return the final normed hidden states [batch, seq, d_model] in cfg.dtype
            instead of the logits (the training loss applies the tied head in slices: tnllm.loss).
          segment_ids: [batch, seq] int, equal within each packed document, or None: no document
            sees another and default positions restart at 0 in each, as if each ran alone; the
            initial states continue the first document, the final states are the last one's.
        Returns:
          logits [batch, seq, vocab] float32 (or the hidden states), and each layer's final state (a
          tuple of num_layers; None for softmax layers run without a cache).
        """
        cfg = self.cfg
        if positions is None and segment_ids is not None:
            positions = document_positions(segment_ids)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        embed = nn.Embed(
            cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            embedding_init=_init(cfg, ("vocab", "embed")), name="embed_tokens")
        # Gather the table's full width before the lookup, as for every other weight under FSDP:
        # left split by width, the looked-up rows would have to change layout by full replication.
        table = nn.with_logical_constraint(embed.embedding, ("vocab", None))
        x = jnp.take(table, tokens, axis=0).astype(cfg.dtype)
        if cfg.scale_embedding:
            x = x * jnp.asarray(cfg.d_model ** 0.5, x.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        layer_cls = DecoderLayer
        if cfg.remat_policy != "none":
            layer_cls = nn.remat(DecoderLayer, policy=_REMAT[cfg.remat_policy], static_argnums=())
        states = []
        for i in range(cfg.num_layers):
            s0 = None if initial_states is None else initial_states[i]
            x, s = layer_cls(cfg, i, name=f"layers_{i}")(x, positions, mask, s0, segment_ids)
            states.append(s)
        x = norm(cfg, "final_norm")(x)
        if return_hidden:
            return x, tuple(states)
        logits = embed.attend(x).astype(jnp.float32)
        return logits, tuple(states)


def state_specs(cfg: ModelConfig, batch: int) -> Tuple[Any, ...]:
    """Each layer's decoding state as a pytree of jax.ShapeDtypeStructs, one entry per layer.

    GLA: [batch, heads, dk, head_dim] f32, dk doubled by LRPE; cosFormer: [batch, heads, 2*head_dim,
    head_dim+1] f32 (key sums of numerator and denominator); softmax: a `softmax.KVCache` of k and v
    [batch, max_cache_len, heads, head_dim] in cfg.dtype.
    """
    if cfg.token_mixer == "softmax":
        return (softmax.cache_spec(cfg, batch),) * cfg.num_layers
    if cfg.token_mixer == "cosformer":
        shapes = (cosformer.state_shape(batch, cfg.num_heads, cfg.head_dim),) * cfg.num_layers
    else:
        shapes = tuple((batch, cfg.num_heads, cfg.head_dim * (2 if i in cfg.lrpe_layers else 1),
                        cfg.head_dim) for i in range(cfg.num_layers))
    return tuple(jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes)


def zero_states(cfg: ModelConfig, batch: int) -> Tuple[Any, ...]:
    """The states before any token (`state_specs` filled with zeros): what a prefill starts from."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state_specs(cfg, batch))


def check_sharding(cfg: ModelConfig, mesh: Mesh) -> None:
    """Raises a one-sentence error, before anything compiles, when the model's parameters cannot be
    split over `mesh` (`sharding.check_params` on their shapes; nothing is allocated)."""
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    sharding.check_params(jax.eval_shape(TransNormerLLM(cfg).init, jax.random.key(0), tokens), mesh)
