"""The decoding step of Lightning Attention as one Pallas GPU kernel (Triton lowering).

For every (batch, head), one token:  S <- lambda S + k^T v,  o = q S  (SPEC.md §7), with the
float32 state updated in place. XLA runs this step as two kernels, the update and a column
reduction for q S, each reading the whole state (issue 10's profile of the 1B decode step: 15 us
of a layer's ~80 us at batch 1). Here one program per (value tile, head, batch) reads its
[dk, block_v] tile of the state once, writes it back and computes its slice of o on the way.

The arithmetic is that of `tnllm.attention.lightning_attention_step` (the decrement
expm1(-s) S is added together with k^T v, so that a tiny s is not lost to rounding), all float32.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

Array = jax.Array

BLOCK_V = 32  # value columns per program: 64 programs for 16 heads at batch 1


def _decay_step_kernel(decrement_ref, q_ref, k_ref, v_ref, state_ref, o_ref, new_state_ref):
    """Refs: decrement [1] f32 (expm1(-s) of the head); q, k [dk]; v [block_v]; state and
    new_state [dk, block_v] f32 (the same buffer); o [block_v]."""
    f32 = jnp.float32
    state = state_ref[...]
    kv = k_ref[...].astype(f32)[:, None] * v_ref[...].astype(f32)[None, :]
    state = state + (decrement_ref[0] * state + kv)
    new_state_ref[...] = state
    o_ref[...] = jnp.sum(q_ref[...].astype(f32)[:, None] * state, axis=0).astype(o_ref.dtype)


def _call(q: Array, k: Array, v: Array, slopes: Array, state: Array, block_v: int,
          interpret: bool) -> Tuple[Array, Array]:
    batch, heads, dk = q.shape
    dv = v.shape[-1]
    grid = (dv // block_v, heads, batch)  # value tiles fastest: they share q and k
    qk_spec = pl.BlockSpec((None, None, dk), lambda j, h, b: (b, h, 0))
    v_spec = pl.BlockSpec((None, None, block_v), lambda j, h, b: (b, h, j))
    state_spec = pl.BlockSpec((None, None, dk, block_v), lambda j, h, b: (b, h, 0, j))
    return pl.pallas_call(
        _decay_step_kernel,
        grid=grid,
        in_specs=[pl.BlockSpec((1,), lambda j, h, b: (h,)), qk_spec, qk_spec, v_spec, state_spec],
        out_specs=[v_spec, state_spec],
        out_shape=[jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(state.shape, jnp.float32)],
        input_output_aliases={4: 1},  # the state is updated in place
        compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="lightning_attention_step",
    )(jnp.expm1(-slopes), q, k, v, state)


def _reference_step(q, k, v, slopes, state):
    from tnllm.attention import lightning_attention_step  # lazily: tnllm imports this package

    return lightning_attention_step(q, k, v, slopes, state)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _step(q, k, v, slopes, state, block_v, interpret):
    return _call(q, k, v, slopes, state, block_v, interpret)


def _step_fwd(q, k, v, slopes, state, block_v, interpret):
    return _call(q, k, v, slopes, state, block_v, interpret), (q, k, v, slopes, state)


def _step_bwd(block_v, interpret, residuals, cotangents):
    # Decoding needs no gradient; should one be asked for, it is the XLA step's.
    _, vjp = jax.vjp(_reference_step, *residuals)
    return vjp(cotangents)


_step.defvjp(_step_fwd, _step_bwd)


def decay_step(q: Array, k: Array, v: Array, slopes: Array, state: Array, *,
               block_v: Optional[int] = None, interpret: Optional[bool] = None) -> Tuple[Array, Array]:
    """One decoding step of Lightning Attention: S <- lambda S + k^T v, o = q S.

    Args:
      q, k: [batch, heads, dk]; v: [batch, heads, dv] (bf16 or f32; dk, dv powers of two).
      slopes: [heads] f32 decay rates s (lambda = exp(-s)).
      state: [batch, heads, dk, dv] f32; its buffer is reused for the new state when donated.
      block_v: value columns per program (divides dv); default min(BLOCK_V, dv).
      interpret: Pallas interpret mode; default: only when JAX has no GPU.
    Returns:
      o [batch, heads, dv] in v's dtype and the new state [batch, heads, dk, dv] f32.
    """
    dv = v.shape[-1]
    block_v = min(BLOCK_V, dv) if block_v is None else block_v
    if dv % block_v:
        raise ValueError(f"block_v ({block_v}) must divide the value head dim ({dv}).")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    return _step(q, k, v, jnp.asarray(slopes, jnp.float32), state.astype(jnp.float32), block_v,
                 bool(interpret))
