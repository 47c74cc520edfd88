"""Softmax attention with rotary positions: the token mixer of the LLaMA-style Transformer baseline.

config.model.token_mixer = "softmax" builds the model the paper compares TransNormerLLM
against: causal multi-head attention softmax(q kᵀ / √head_dim) v with RoPE on q and k, in a layer
stack with RMSNorm (learned weight) and SwiGLU (`tnllm.model` chooses those). Its decoding state is a
KV cache of fixed length `config.model.max_cache_len`: slot t of a row holds the key and value of the
row's token at position t, so the cache, like the linear mixers' states, has the same shape whatever
the context length (but bounds it). `encoder_attention` is the bidirectional form that the ListOps
encoder (`tnllm.listops`) runs. Every form runs jax.nn.dot_product_attention with the implementation
(XLA or cuDNN flash attention) that `tnllm.attention.choose_impl` picks for "auto".
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels import lightning
from tnllm import sharding
from tnllm.attention import choose_impl
from tnllm.config import ModelConfig, check_context_mixer

Array = jax.Array

ROPE_BASE = 10000.0
# jax's cuDNN check wants even lengths when training; 64 also fills its attention tiles.
CUDNN_LENGTH_MULTIPLE = 64


class KVCache(NamedTuple):
    """One layer's decoding state; slots not yet written hold zeros and are never attended to."""

    k: Array  # [batch, max_cache_len, heads, head_dim] in cfg.dtype, after RoPE
    v: Array  # [batch, max_cache_len, heads, head_dim] in cfg.dtype


def cache_spec(cfg: ModelConfig, batch: int) -> KVCache:
    """The shapes and dtypes of one layer's KVCache, as jax.ShapeDtypeStructs."""
    slot = jax.ShapeDtypeStruct((batch, cfg.max_cache_len, cfg.num_heads, cfg.head_dim),
                                jnp.dtype(cfg.dtype))
    return KVCache(slot, slot)


def rope(x: Array, positions: Array, base: float = ROPE_BASE) -> Array:
    """Rotary position embedding in the rotate-half layout of LLaMA's Hugging Face code.

    Feature pairs (i, i + hd/2) turn by the angle t * base^(-2i/hd), so q_t · k_s depends on t - s only.
    x: [batch, seq, heads, hd], hd even; positions: [batch, seq] int absolute positions.
    Returns [batch, seq, heads, hd] in x's dtype; phases and rotation are float32.
    """
    half = x.shape[-1] // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    phase = positions.astype(jnp.float32)[:, :, None, None] * freq
    cos, sin = jnp.cos(phase), jnp.sin(phase)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def causal_attention(q: Array, k: Array, v: Array, mask: Optional[Array], impl: str = "auto",
                     segment_ids: Optional[Array] = None) -> Array:
    """Causal softmax attention over one sequence, scale 1/√head_dim.

    q, k, v: [batch, seq, heads, head_dim]; mask: [batch, seq] bool (False = padding, never attended
    to) or None; impl: "auto", "xla" or "cudnn"; segment_ids: [batch, seq] int, equal within each
    packed document, or None: a block-diagonal causal mask keeps documents apart. Returns
    [batch, seq, heads, head_dim] in q's dtype.
    """
    impl = choose_impl("softmax", impl, q, k, v, masked=mask is not None or segment_ids is not None)
    if mask is None and segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    seq = q.shape[1]
    causal = jnp.arange(seq)[None, :] <= jnp.arange(seq)[:, None]  # [query, key]
    allowed = causal[None, None]
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    if segment_ids is not None:
        ids = lightning.document_ids(segment_ids)
        allowed = allowed & (ids[:, None, :, None] == ids[:, None, None, :])
    return jax.nn.dot_product_attention(q, k, v, mask=allowed, implementation=impl)


def write_cache(cache: KVCache, k: Array, v: Array, positions: Array, mask: Optional[Array]) -> KVCache:
    """Writes each real token's k and v into slot `position` of its row.

    k, v: [batch, seq, heads, head_dim]; positions: [batch, seq] int; mask: [batch, seq] bool or None.
    Padded tokens get the out-of-range slot max_cache_len and are dropped, as are positions past the
    cache (`tnllm.generate` refuses requests that would reach them).
    """
    length = cache.k.shape[1]
    slots = positions if mask is None else jnp.where(mask, positions, length)
    rows = jnp.arange(k.shape[0])[:, None]
    return KVCache(cache.k.at[rows, slots].set(k.astype(cache.k.dtype), mode="drop"),
                   cache.v.at[rows, slots].set(v.astype(cache.v.dtype), mode="drop"))


def cached_attention(q: Array, cache: KVCache, positions: Array, impl: str = "auto") -> Array:
    """Softmax attention of queries at `positions` over the cache slots 0..position.

    q: [batch, seq, heads, head_dim]; positions: [batch, seq] int. Slot j ≤ t of a row was written
    before query t attends: positions count the row's real tokens, and every real token writes its
    own slot (`write_cache`) before it attends, so the mask needs no separate record of writes.
    impl: "auto", "xla" or "cudnn". Returns [batch, seq, heads, head_dim] in q's dtype.
    """
    slots = jnp.arange(cache.k.shape[1])
    allowed = slots[None, None, None, :] <= positions[:, None, :, None]  # [batch, 1, query, slot]
    impl = choose_impl("softmax", impl, q, cache.k, cache.v, masked=True)
    return jax.nn.dot_product_attention(q, cache.k, cache.v, mask=allowed, implementation=impl)


def encoder_attention(query: Array, key: Array, value: Array, mask: Array, impl: str = "auto") -> Array:
    """Bidirectional softmax attention over each row's real keys, which come first (padding at the
    end); in the signature of Flax's attention_fn (nn.MultiHeadDotProductAttention).

    query: [batch, tq, heads, d]; key, value: [batch, tk, heads, d]; mask: [batch, 1, 1, tk] bool,
    False at padded keys; impl: "auto", "xla" or "cudnn". Returns [batch, tq, heads, d] in query's
    dtype. "xla" materialises the [batch, heads, tq, tk] float32 logits. "cudnn" (flash attention)
    takes key lengths instead of the mask, so it needs the padding at the end; it refuses odd lengths
    in training ("Unsupported sequence length Q 1999, KV 1999"), so both lengths are padded up to a
    multiple of CUDNN_LENGTH_MULTIPLE: the key lengths exclude the extra keys and the extra queries'
    rows are cut off.
    """
    impl = choose_impl("softmax", impl, query, key, value)  # key lengths: no mask for cuDNN
    if impl == "cudnn":
        lengths = jnp.sum(mask[:, 0, 0, :], axis=-1, dtype=jnp.int32)

        def pad(x):
            return jnp.pad(x, ((0, 0), (0, -x.shape[1] % CUDNN_LENGTH_MULTIPLE), (0, 0), (0, 0)))

        out = jax.nn.dot_product_attention(pad(query), pad(key), pad(value),
                                           key_value_seq_lengths=lengths, implementation="cudnn")
        return out[:, :query.shape[1]]
    return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation="xla")


class SoftmaxAttention(nn.Module):
    """Causal multi-head softmax attention with RoPE; no biases, no gate, no output norm.

    Parameters: qkv_proj [d_model, 3, heads, head_dim] (q, k, v in that order) and out_proj
    [heads, head_dim, d_model], 4·d·h weights against GLA's 5·d·h.
    """

    cfg: ModelConfig
    layer: int = 0  # every token mixer is built as Mixer(cfg, layer); softmax layers are all alike

    @nn.compact
    def __call__(self, x: Array, positions: Array, mask: Optional[Array],
                 cache: Optional[KVCache],
                 segment_ids: Optional[Array] = None) -> Tuple[Array, Optional[KVCache]]:
        """x: [batch, seq, d_model]; positions: [batch, seq] int; mask: [batch, seq] bool or None
        (False = padding); cache: this layer's KVCache or None; segment_ids: [batch, seq] int
        packed documents (`causal_attention`), only without a cache.

        Without a cache (training, scoring) the sequence attends to itself and nothing is kept: the
        returned state is None. With one, the segment's real tokens are written into it first and
        every query attends over the cache up to its position; the updated cache is returned.
        Returns the output [batch, seq, d_model] and the state.
        """
        check_context_mixer(sharding.parts("length"), "softmax")
        cfg = self.cfg
        h, hd = cfg.num_heads, cfg.head_dim
        init = lambda names: nn.with_logical_partitioning(  # noqa: E731
            nn.initializers.normal(stddev=cfg.init_std), names)
        qkv = nn.Einsum(
            (cfg.d_model, 3, h, hd), "btd,dqhk->btqhk", use_bias=False, dtype=cfg.dtype,
            param_dtype=cfg.param_dtype, kernel_init=init(("embed", "qkvu", "heads", "head_dim")),
            name="qkv_proj")(x)
        qkv = nn.with_logical_constraint(qkv, ("batch", "length", "qkvu", "heads", "head_dim"))
        q, k, v = (qkv[:, :, i] for i in range(3))
        q, k = rope(q, positions), rope(k, positions)
        if cache is None:
            o = causal_attention(q, k, v, mask, cfg.mixer_impl, segment_ids)
        elif segment_ids is not None:
            raise ValueError("segment_ids separate packed documents in training and scoring; a KV "
                             "cache holds one document per row: pass no segment_ids with it.")
        else:
            cache = write_cache(cache, k, v, positions, mask)
            o = cached_attention(q, cache, positions, cfg.mixer_impl)
        o = nn.with_logical_constraint(o, ("batch", "length", "heads", "head_dim"))
        out = nn.Einsum(
            (h, hd, cfg.d_model), "bthk,hkd->btd", use_bias=False, dtype=cfg.dtype,
            param_dtype=cfg.param_dtype, kernel_init=init(("heads", "head_dim", "embed")),
            name="out_proj")(o)
        return out, cache
