"""cosFormer attention (arXiv 2202.08791, docs/spec.md §10): ReLU features with a cos re-weighting.

For queries i and keys j, with q' = ReLU(q), k' = ReLU(k) and a fixed horizon M >= every |i - j|:

    o_i = sum_j (q'_i . k'_j) cos(pi/2 (i - j)/M) v_j  /  max(sum_j (q'_i . k'_j) cos(pi/2 (i - j)/M), eps)

cos(a - b) = cos a cos b + sin a sin b makes it linear: with the doubled features
q~_i = [q'_i sin(pi i/2M), q'_i cos(pi i/2M)] (k~_j likewise), the score is q~_i . k~_j, so one state
S = sum_j k~_j^T [v_j, 1] of shape [2d, dv + 1] carries numerator (first dv columns) and denominator
(last column) together. Causal attention sums over j <= i, bidirectional and cross attention over all
keys (query and key lengths may differ; both count positions against the same M).

Forms (`impl`), all exact:
  reference  the quadratic form with cos(pi/2 (i - j)/M) taken directly; for tests.
  linear     bidirectional/cross: one state over all keys. Causal: a `lax.scan` over chunks that
             carries S, so the forward holds O(length * d + chunk^2 + d^2) per head, never the
             length x 2d x dv prefix sums of the official code. (Its gradient keeps one S per chunk.)
  auto       (the default) linear (`tnllm.attention.choose_impl`).
`cosformer_attention_step` is one decoding step; it equals the causal form at the same M and positions.

Padded keys (key_mask False) are dropped from numerator and denominator alike. M is fixed by the
caller, never taken from the padded length, so padding and decoding leave the weights unchanged.
States and normalisers are float32; outputs come back in v's dtype.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import lightning
from tnllm import sharding
from tnllm.attention import choose_impl, document_positions, lightning_attention_blockwise
from tnllm.config import ModelConfig, check_context_mixer

Array = jax.Array

EPS = 1e-6  # the denominator's floor in the language model and the ListOps encoder


def _precision(x: Array):
    # float32 inputs must stay float32 on GPUs too (XLA would otherwise use TF32 there); bf16 values
    # are exact in TF32, so the default suffices for them.
    return lax.Precision.HIGHEST if x.dtype == jnp.float32 else None


def _einsum(spec: str, a: Array, b: Array, precision) -> Array:
    """einsum of float32 operands, float32 result. (XLA's CPU backend cannot run every bf16 x bf16 ->
    f32 dot; bf16 values lose nothing as float32 operands.)"""
    return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32), precision=precision)


def cos_features(x: Array, positions: Array, m: float) -> Array:
    """The re-weighted features [x sin(pi t/2M), x cos(pi t/2M)].

    x: [batch, seq, heads, d] (already ReLU'd); positions: [batch, seq] int. Returns
    [batch, seq, heads, 2d] in x's dtype; the angles are float32.
    """
    angle = (math.pi / (2.0 * m)) * positions.astype(jnp.float32)[:, :, None, None]
    xf = x.astype(jnp.float32)
    return jnp.concatenate([xf * jnp.sin(angle), xf * jnp.cos(angle)], axis=-1).astype(x.dtype)


def _with_ones(v: Array) -> Array:
    """[v, 1]: the extra column turns the numerator's sums into the denominator's."""
    return jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)


def _normalise(o_aug: Array, eps: float, dtype) -> Array:
    """[..., dv + 1] numerator and denominator -> numerator / max(denominator, eps), in `dtype`."""
    return (o_aug[..., :-1] / jnp.maximum(o_aug[..., -1:], eps)).astype(dtype)


def _key_sums(kf: Array, va: Array) -> Array:
    """sum_j k~_j^T [v_j, 1]: [batch, seq, heads, 2d] x [batch, seq, heads, dv+1] -> [b, h, 2d, dv+1] f32."""
    return _einsum("bjhf,bjhe->bhfe", kf, va, _precision(kf))


def _query_state(qf: Array, state: Array) -> Array:
    """q~_i S: [batch, seq, heads, 2d] x [batch, heads, 2d, dv+1] -> [batch, seq, heads, dv+1] f32."""
    return _einsum("bthf,bhfe->bthe", qf, state, lax.Precision.HIGHEST)


# ----------------------------------------------------------------------------------------------
# forms: qf, kf the cos features (padded keys zeroed), va = [v, 1] (zero at padded keys),
# s0 the f32 state of earlier keys. Each returns the unnormalised [.., dv + 1] output and the state.
# ----------------------------------------------------------------------------------------------
def _reference(q, k, qf, kf, va, s0, *, q_positions, k_positions, m, causal, key_mask, chunk_size,
               segment_ids=None):
    del chunk_size
    scores = _einsum("bihd,bjhd->bhij", nn.relu(q), nn.relu(k), _precision(q))
    distance = (q_positions[:, :, None] - k_positions[:, None, :]).astype(jnp.float32)
    scores = scores * jnp.cos((math.pi / (2.0 * m)) * distance)[:, None]
    keep = key_mask[:, None, :]  # [b, 1, j]
    if causal:  # from token order, never from positions
        t = q.shape[1]
        keep = keep & (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None])[None]
    if segment_ids is not None:  # each document alone: the state holds the last one's keys
        ids = lightning.document_ids(segment_ids)
        keep = keep & (ids[:, :, None] == ids[:, None, :])
        qf = jnp.where((ids == 0)[:, :, None, None], qf, 0.0)
        kf = jnp.where((ids == ids[:, -1:])[:, :, None, None], kf, 0.0)
        s0 = jnp.where((ids[:, -1] == 0)[:, None, None, None], s0, 0.0)
    scores = jnp.where(keep[:, None], scores, 0.0)
    o = _einsum("bhij,bjhe->bihe", scores, va, lax.Precision.HIGHEST)
    return o + _query_state(qf, s0), s0 + _key_sums(kf, va)


def _linear(q, k, qf, kf, va, s0, *, q_positions, k_positions, m, causal, key_mask, chunk_size,
            segment_ids=None):
    del q, k, q_positions, k_positions, m, key_mask
    if segment_ids is not None:
        # The causal scan is Lightning Attention without decay (lambda = 1), whose blockwise form
        # resets the state at every document start; called directly, as the inputs are checked.
        no_decay = jnp.zeros(qf.shape[2], jnp.float32)
        return lightning_attention_blockwise(qf, kf, va.astype(jnp.float32), no_decay, s0, chunk_size, segment_ids)
    if causal:
        return _causal_scan(qf, kf, va, s0, chunk_size)
    state = s0 + _key_sums(kf, va)
    return _query_state(qf, state), state


def _causal_scan(qf: Array, kf: Array, va: Array, s0: Array, chunk_size: int) -> Tuple[Array, Array]:
    """Chunk by chunk: o_c = tril(Q_c K_c^T) [V_c, 1] + Q_c S, then S += K_c^T [V_c, 1]."""
    b, t, h, f = qf.shape
    e = va.shape[-1]
    c = min(chunk_size, t)
    n = -(-t // c)
    pad = ((0, 0), (0, n * c - t), (0, 0), (0, 0))  # zero keys: padding adds nothing to S

    def chunks(x):  # [b, t, h, x] -> [n, b, h, c, x]
        x = jnp.pad(x, pad)
        return x.reshape(b, n, c, h, x.shape[-1]).transpose(1, 0, 3, 2, 4)

    tril = jnp.arange(c)[None, :] <= jnp.arange(c)[:, None]
    prec = _precision(qf)

    def step(state, chunk):
        q_c, k_c, v_c = chunk
        scores = _einsum("bhif,bhjf->bhij", q_c, k_c, prec)
        o_c = _einsum("bhij,bhje->bhie", jnp.where(tril, scores, 0.0), v_c, prec)
        o_c = o_c + _einsum("bhif,bhfe->bhie", q_c, state, lax.Precision.HIGHEST)
        state = state + _einsum("bhjf,bhje->bhfe", k_c, v_c, prec)
        return state, o_c

    final, o = lax.scan(step, s0, (chunks(qf), chunks(kf), chunks(va)))
    o = o.transpose(1, 0, 3, 2, 4).reshape(b, n * c, h, e)[:, :t]
    return o, final


_FORMS = {"reference": _reference, "linear": _linear}


def state_shape(batch: int, heads: int, head_dim: int, value_dim: Optional[int] = None):
    """Shape of the cosFormer state S = sum_j k~_j^T [v_j, 1]: [batch, heads, 2*head_dim, dv + 1]."""
    dv = head_dim if value_dim is None else value_dim
    return (batch, heads, 2 * head_dim, dv + 1)


def _check_inputs(q, k, v, m, causal, key_mask, q_positions, k_positions, initial_state):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError("cosformer_attention expects q, k, v of shape [batch, seq, heads, dim], got "
                         f"{q.shape}, {k.shape}, {v.shape}.")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError("q [b, tq, h, d], k [b, tk, h, d] and v [b, tk, h, dv] disagree: got "
                         f"{q.shape}, {k.shape}, {v.shape}.")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"Causal cosFormer needs as many queries as keys, got {q.shape[1]} and "
                         f"{k.shape[1]}; use causal=False for cross attention.")
    if not m >= max(q.shape[1], k.shape[1]):
        raise ValueError(f"cosFormer's M ({m}) must be at least the query and key lengths "
                         f"({q.shape[1]}, {k.shape[1]}); raise M (config.model.cosformer_max_len in the "
                         "language model) to the longest context.")
    b, tq, h, d = q.shape
    for name, x, want in (("key_mask", key_mask, (b, k.shape[1])), ("q_positions", q_positions, (b, tq)),
                          ("k_positions", k_positions, (b, k.shape[1]))):
        if x is not None and x.shape != want:
            raise ValueError(f"{name} must have shape {want}, got {x.shape}.")
    if initial_state is not None:
        want = state_shape(b, h, d, v.shape[-1])
        if initial_state.shape != want:
            raise ValueError(f"initial_state must have shape [batch, heads, 2*d, dv+1] = {want}, "
                             f"got {initial_state.shape}.")
        if q_positions is None or k_positions is None:
            raise ValueError("Pass q_positions and k_positions when continuing from an initial_state: "
                             "the new tokens' positions follow those already in the state.")


def _default_positions(x: Array, positions: Optional[Array]) -> Array:
    if positions is not None:
        return positions
    return jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])


@functools.partial(jax.named_call, name="cosformer_attention")
def cosformer_attention(q: Array, k: Array, v: Array, *, m: float, causal: bool,
                        key_mask: Optional[Array] = None, q_positions: Optional[Array] = None,
                        k_positions: Optional[Array] = None, initial_state: Optional[Array] = None,
                        impl: str = "auto", chunk_size: int = 64,
                        eps: float = EPS, segment_ids: Optional[Array] = None) -> Tuple[Array, Array]:
    """cosFormer attention of projected queries, keys and values (ReLU is applied here).

    Args:
      q: [batch, tq, heads, d]; k: [batch, tk, heads, d]; v: [batch, tk, heads, dv] (any float dtype).
      m: the re-weighting horizon M, at least every |i - j| (e.g. the longest context); fixed, so
        that padding and decoding keep the weights.
      causal: key j attends to query i only for j <= i (token order; needs tq == tk).
      key_mask: [batch, tk] bool, False at padded keys, which then count in neither sum.
      q_positions, k_positions: [batch, tq] / [batch, tk] int positions i, j; default 0..len-1.
      initial_state: [batch, heads, 2d, dv+1] f32 sums of earlier keys (from a prefill).
      impl: "auto" (`choose_impl`: linear), "linear" or "reference" (quadratic, for tests).
      chunk_size: chunk length of the causal scan.
      eps: floor of the denominator (a clamp, as in the paper's code, not an addition).
      segment_ids: [batch, seq] int, equal within each packed document (causal only): no document
        sees another, default positions restart per document, initial_state continues the first
        one and the state returned holds the last one's keys.
    Returns:
      o: [batch, tq, heads, dv] in v's dtype; state: [batch, heads, 2d, dv+1] f32, the key sums
      (all keys, plus initial_state): the prefix state for decoding, or a cache of cross-attention keys.
    """
    _check_inputs(q, k, v, m, causal, key_mask, q_positions, k_positions, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    impl = choose_impl("cosformer", impl, q, k, v, chunk_size=chunk_size)
    if segment_ids is not None:
        if not causal:
            raise ValueError("segment_ids separate documents of one causal sequence; drop them or set "
                             "causal=True.")
        lightning.check_segment_ids(q, segment_ids)
        q_positions = document_positions(segment_ids) if q_positions is None else q_positions
        k_positions = q_positions if k_positions is None else k_positions
    q_positions = _default_positions(q, q_positions)
    k_positions = _default_positions(k, k_positions)
    key_mask = jnp.ones(k.shape[:2], bool) if key_mask is None else key_mask
    keep = key_mask[:, :, None, None]
    qf = cos_features(nn.relu(q), q_positions, m)
    kf = jnp.where(keep, cos_features(nn.relu(k), k_positions, m), 0)
    va = jnp.where(keep, _with_ones(v), 0)  # also drops NaN or inf values at padding
    b, _, h, d = q.shape
    s0 = (jnp.zeros(state_shape(b, h, d, v.shape[-1]), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))
    o, state = _FORMS[impl](q, k, qf, kf, va, s0, q_positions=q_positions, k_positions=k_positions,
                            m=m, causal=causal, key_mask=key_mask, chunk_size=chunk_size,
                            segment_ids=segment_ids)
    return _normalise(o, eps, v.dtype), state


def cosformer_attention_step(q: Array, k: Array, v: Array, position: Array, state: Array, *,
                             m: float, eps: float = EPS) -> Tuple[Array, Array]:
    """One causal decoding step: S <- S + k~^T [v, 1], o = q~ S (numerator / clamped denominator).

    Args:
      q, k: [batch, heads, d] projections of the new token; v: [batch, heads, dv].
      position: [batch] int position of the new token (its phase pi t/2M).
      state: [batch, heads, 2d, dv+1] f32 key sums of the earlier tokens (zeros at the start).
      m: the same M as the prefill's.
    Returns:
      o: [batch, heads, dv] in v's dtype, and the new state [batch, heads, 2d, dv+1] f32.
    """
    if state.shape != state_shape(*q.shape, v.shape[-1]):
        raise ValueError(f"state must have shape {state_shape(*q.shape, v.shape[-1])}, got {state.shape}.")
    def feature(x):  # [batch, heads, d] -> [batch, heads, 2d] f32
        return cos_features(nn.relu(x)[:, None], position[:, None], m)[:, 0].astype(jnp.float32)

    va = _with_ones(v).astype(jnp.float32)
    state = state + feature(k)[..., :, None] * va[..., None, :]
    o = _einsum("bhf,bhfe->bhe", feature(q), state, lax.Precision.HIGHEST)
    return _normalise(o, eps, v.dtype), state


class CosformerAttention(nn.Module):
    """Multi-head cosFormer attention with q/k/v/out projections, all with biases (docs/spec.md §10).

    Built from the config as every token mixer is, `CosformerAttention(cfg, layer)`: cfg.num_heads
    heads of cfg.head_dim (contiguous slices of the projections), the horizon M =
    cfg.cosformer_max_len (at least the longest context, query or key length), an output of
    cfg.d_model features, the causal scan's cfg.chunk_size and the form cfg.attention_impl names
    (`ModelConfig.mixer_impl`). Parameters carry the logical axis names `embed`, `heads`, `head_dim`.

    Attributes:
      cfg: the model config; layer: unused (cosFormer layers are all alike).
      causal: causal self attention, the language model's token mixer (a prefix scan; the state
        enables decoding); False for bidirectional self attention or, with `inputs_kv`, cross
        attention (the ListOps encoder).
      kernel_init: the projections' initialiser; default normal(cfg.init_std), as every weight of
        the language model.
    """

    cfg: ModelConfig
    layer: int = 0
    causal: bool = True
    kernel_init: Optional[Callable] = None

    @nn.compact
    def __call__(self, inputs_q: Array, positions: Optional[Array] = None, mask: Optional[Array] = None,
                 initial_state: Optional[Array] = None, *, inputs_kv: Optional[Array] = None,
                 kv_positions: Optional[Array] = None,
                 segment_ids: Optional[Array] = None) -> Tuple[Array, Array]:
        """Attends from inputs_q to inputs_kv (default: inputs_q itself).

        Args:
          inputs_q: [batch, tq, features]; inputs_kv: [batch, tk, features_kv] or None.
          positions: [batch, tq] int query positions; default 0..tq-1.
          mask: [batch, tk] bool, False at padded keys (they contribute nothing).
          initial_state: [batch, heads, 2*head_dim, head_dim+1] f32 key sums of earlier tokens.
          kv_positions: [batch, tk] int key positions; default `positions` in self attention,
            0..tk-1 in cross attention.
          segment_ids: [batch, tq] int packed documents of causal self attention, or None
            (`cosformer_attention`).
        Returns:
          out: [batch, tq, cfg.d_model] in cfg.dtype, and the state [batch, heads, 2*head_dim,
          head_dim+1] f32 (see `cosformer_attention`).
        """
        check_context_mixer(sharding.parts("length"), "cosformer")
        if inputs_kv is None:
            inputs_kv = inputs_q
            kv_positions = positions if kv_positions is None else kv_positions
        elif self.causal:
            raise ValueError("Causal cosFormer attends within one sequence; pass no inputs_kv, or set "
                             "causal=False for cross attention.")
        cfg = self.cfg
        names = ("embed", "heads", "head_dim")
        kernel_init = self.kernel_init or nn.initializers.normal(stddev=cfg.init_std)

        # nn.Einsum, not nn.DenseGeneral, for the reason given in tnllm.model.GatedLinearAttention.
        def project(x, name):
            return nn.Einsum(
                (x.shape[-1], cfg.num_heads, cfg.head_dim), "btd,dhk->bthk", dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                kernel_init=nn.with_logical_partitioning(kernel_init, names),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), names[1:]),
                name=name)(x)

        q, k, v = project(inputs_q, "q_proj"), project(inputs_kv, "k_proj"), project(inputs_kv, "v_proj")
        o, state = cosformer_attention(
            q, k, v, m=cfg.cosformer_max_len, causal=self.causal, key_mask=mask, q_positions=positions,
            k_positions=kv_positions, initial_state=initial_state, impl=cfg.mixer_impl,
            chunk_size=cfg.chunk_size, segment_ids=segment_ids)
        o = nn.with_logical_constraint(o, ("batch", "length", "heads", "head_dim"))
        out = nn.Einsum(
            (cfg.num_heads, cfg.head_dim, cfg.d_model), "bthk,hkd->btd",
            dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            kernel_init=nn.with_logical_partitioning(kernel_init, names[1:] + names[:1]),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), names[:1]),
            name="out_proj")(o)
        return out, state
