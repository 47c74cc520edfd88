"""Lightning Attention as Pallas GPU kernels (Triton lowering), forward and backward.

One kernel, `decay_attention`, computes the causal operator of SPEC.md §4 for every (batch, head):

    o_t = sum_{j <= t} lambda^(t-j) (q_t . k_j) v_j + lambda^(t+1) q_t S_0,    lambda = exp(-s),

chunk by chunk (Lightning Attention-2): an intra-chunk masked product plus an inter-chunk product
with a float32 state S [dk, dv] that stays in registers for the whole sequence, so only q, k, v
and o cross HBM. With `reverse=True` it runs the mirror image (anti-causal sums, chunks walked
from the end), which is what the backward pass needs. The backward pass is three more calls of
the same kernel with the roles of the tensors exchanged (KERNELS.md §1):

    dQ = op(dO, V, K; state S^T)             forward sweep
    dK = op_rev(V, dO, Q; state dS^T)        reverse sweep, from the final-state cotangent
    dV = op_rev(K, Q, dO; state dS)          reverse sweep; its final state is d(initial state)

Each program owns one (batch, head) and one `block_v`-wide tile of the value dimension: the rows
of the state are independent, so value tiles split the work without any reduction.

Matmul operands are the input dtype (bf16 on the fast path) with float32 accumulation; the state,
the decay factors and every sum are float32. float32 inputs use IEEE float32 dots (no TF32).
On a machine without a GPU the same kernels run in Pallas interpret mode.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

Array = jax.Array

DTYPES = (jnp.bfloat16, jnp.float32)
HEAD_DIMS = (16, 32, 64, 128, 256)
CHUNK_SIZES = (16, 32, 64, 128)
_MAX_GRID_YZ = 65535  # CUDA limit on the grid's y and z extents (heads, batch)
_STATE_ELEMS = 128 * 64  # float32 state elements per program: 32 registers a thread at 8 warps


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tiling and launch parameters of one `decay_attention` call.

    chunk: tokens per chunk C (the intra-chunk product is C x C).
    block_v: width of the value-dimension tile a program owns; divides the value head dim.
    num_warps, num_stages: Triton launch parameters (warps per program, software-pipeline depth).
    """

    chunk: int = 64
    block_v: int = 64
    num_warps: int = 8
    num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class Plan:
    """Blocks of the four kernel calls: forward, and the dQ, dK, dV calls of the backward pass."""

    fwd: Blocks
    dq: Blocks
    dk: Blocks
    dv: Blocks


def default_plan(dk: int, dv: int, chunk_size: int = 64) -> Plan:
    """Blocks for head dims dk (of q, k) and dv (of v).

    Each program keeps its [key dim, block_v] float32 state in registers. The measured
    configuration (bench/NOTES.md: chunk 64, a [128, 64] state, 8 warps, 2 stages) compiles for
    sm_90 without spills; larger states spill, so value tiles are sized to hold at most that
    many elements: 64 columns for key dim 128, 32 for 256, up to 128 for 64.
    """

    def blocks(key_dim: int, value_dim: int) -> Blocks:
        block_v = max(16, min(value_dim, _STATE_ELEMS // key_dim))
        return Blocks(chunk=chunk_size, block_v=block_v, num_warps=8, num_stages=2)

    # dQ = op(dO, V, K): key dim dv, value dim dk; dK = op(V, dO, Q) likewise; dV = op(K, Q, dO).
    return Plan(fwd=blocks(dk, dv), dq=blocks(dv, dk), dk=blocks(dv, dk), dv=blocks(dk, dv))


# ----------------------------------------------------------------------------------------------
# the kernel
# ----------------------------------------------------------------------------------------------
def _decay_attention_kernel(slope_ref, q_ref, k_ref, v_ref, *refs, seq_len: int, chunk: int,
                            reverse: bool, has_initial: bool, store_final: bool):
    """One (value tile, head, batch) program.

    Refs: slope [1] f32; q, k [seq_pad, dqk]; v [seq_pad, block_v]; then optionally the initial
    state [dqk, block_v] f32, the output o [seq_pad, block_v], optionally the final state.
    """
    refs = list(refs)
    s0_ref = refs.pop(0) if has_initial else None
    o_ref = refs.pop(0)
    s_final_ref = refs.pop(0) if store_final else None
    num_chunks = q_ref.shape[0] // chunk
    dqk, block_v = q_ref.shape[1], v_ref.shape[1]
    f32 = jnp.float32
    dot = functools.partial(lax.dot_general, precision=lax.Precision.HIGHEST,
                            preferred_element_type=f32)

    neg_s = -slope_ref[0]
    r = jnp.arange(chunk, dtype=jnp.int32)
    # Intra-chunk decay D[t, j] = lambda^|t-j| on the causal side (j <= t; t <= j in reverse),
    # built from token indices once per program.
    causal = (r[None, :] <= r[:, None]) if not reverse else (r[None, :] >= r[:, None])
    dist = jnp.abs(r[:, None] - r[None, :]).astype(f32)
    intra_decay = jnp.where(causal, jnp.exp(neg_s * dist), 0.0)

    def body(i, state):
        c = num_chunks - 1 - i if reverse else i
        start = pl.multiple_of(c * chunk, chunk)
        rows = pl.ds(start, chunk)
        q = q_ref[rows, :]
        k = k_ref[rows, :]
        v = v_ref[rows, :]
        # Only the last chunk can be short; exponents use its true length so that padding rows
        # (zeros) neither decay the state nor receive it.
        length = jnp.minimum(chunk, seq_len - start)
        valid = r < length
        if reverse:  # row t sees the state of tokens after the chunk through lambda^(len-1-t)
            q_exp, k_exp = length - 1 - r, r + 1
        else:  # row t sees the state of tokens before the chunk through lambda^(t+1)
            q_exp, k_exp = r + 1, length - 1 - r
        q_decay = jnp.where(valid, jnp.exp(neg_s * q_exp.astype(f32)), 0.0)
        k_decay = jnp.where(valid, jnp.exp(neg_s * k_exp.astype(f32)), 0.0)
        chunk_decay = jnp.exp(neg_s * length.astype(f32))

        scores = dot(q, k, (((1,), (1,)), ((), ())))  # [C, C]
        o = dot((scores * intra_decay).astype(v.dtype), v, (((1,), (0,)), ((), ())))
        # Row scaling commutes with the product: (lambda^e * Q) S = lambda^e * (Q S), so q stays
        # exact and only the state is rounded to the operand dtype.
        o += q_decay[:, None] * dot(q, state.astype(q.dtype), (((1,), (0,)), ((), ())))
        o_ref[rows, :] = o.astype(o_ref.dtype)
        k_scaled = (k * k_decay[:, None]).astype(k.dtype)
        return chunk_decay * state + dot(k_scaled, v, (((0,), (0,)), ((), ())))  # [dqk, block_v]

    state = s0_ref[...] if has_initial else jnp.zeros((dqk, block_v), f32)
    state = lax.fori_loop(0, num_chunks, body, state)
    if store_final:
        s_final_ref[...] = state


def decay_attention(q: Array, k: Array, v: Array, slopes: Array, initial_state: Optional[Array],
                    *, seq_len: int, reverse: bool, store_final: bool, blocks: Blocks,
                    interpret: bool) -> Tuple[Array, Optional[Array]]:
    """One kernel launch over padded inputs.

    Args:
      q, k: [batch, seq_pad, heads, dqk]; v: [batch, seq_pad, heads, dv], one dtype, seq_pad a
        multiple of blocks.chunk and rows from seq_len on zero.
      slopes: [heads] f32. initial_state: None or [batch, heads, dqk, dv] f32.
      seq_len: true sequence length; reverse: anti-causal sums, state entering from the end.
    Returns:
      o: [batch, seq_pad, heads, dv] in v's dtype (rows from seq_len on are not meaningful), and
      the state after the last (first, when reverse) token, [batch, heads, dqk, dv] f32, or None.
    """
    batch, seq_pad, heads, dqk = q.shape
    dv = v.shape[-1]
    bv = blocks.block_v
    has_initial = initial_state is not None
    grid = (dv // bv, heads, batch)  # value tiles vary fastest: a head's tiles share q, k in L2
    qk_spec = pl.BlockSpec((None, seq_pad, None, dqk), lambda j, h, b: (b, 0, h, 0))
    v_spec = pl.BlockSpec((None, seq_pad, None, bv), lambda j, h, b: (b, 0, h, j))
    state_spec = pl.BlockSpec((None, None, dqk, bv), lambda j, h, b: (b, h, 0, j))
    in_specs = [pl.BlockSpec((1,), lambda j, h, b: (h,)), qk_spec, qk_spec, v_spec]
    args = [slopes, q, k, v]
    if has_initial:
        in_specs.append(state_spec)
        args.append(initial_state)
    out_specs = [v_spec]
    out_shape = [jax.ShapeDtypeStruct(v.shape, v.dtype)]
    if store_final:
        out_specs.append(state_spec)
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, dqk, dv), jnp.float32))
    kernel = functools.partial(_decay_attention_kernel, seq_len=seq_len, chunk=blocks.chunk,
                               reverse=reverse, has_initial=has_initial, store_final=store_final)
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pl_triton.CompilerParams(num_warps=blocks.num_warps,
                                                 num_stages=blocks.num_stages),
        interpret=interpret,
        name="lightning_attention_" + ("reverse" if reverse else "forward"),
    )(*args)
    return outs[0], (outs[1] if store_final else None)


# ----------------------------------------------------------------------------------------------
# forward + backward as one differentiable function
# ----------------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _lightning(q, k, v, slopes, initial_state, seq_len, plan, interpret):
    o, final_state = decay_attention(q, k, v, slopes, initial_state, seq_len=seq_len, reverse=False,
                                     store_final=True, blocks=plan.fwd, interpret=interpret)
    return o, final_state


def _lightning_fwd(q, k, v, slopes, initial_state, seq_len, plan, interpret):
    out = _lightning(q, k, v, slopes, initial_state, seq_len, plan, interpret)
    return out, (q, k, v, slopes, initial_state)


def _lightning_bwd(seq_len, plan, interpret, residuals, cotangents):
    q, k, v, slopes, initial_state = residuals
    do, d_final = cotangents
    call = functools.partial(decay_attention, slopes=slopes, seq_len=seq_len, interpret=interpret)
    t = functools.partial(jnp.swapaxes, axis1=-1, axis2=-2)
    s0_t = None if initial_state is None else t(initial_state)
    dq, _ = call(do, v, k, initial_state=s0_t, reverse=False, store_final=False, blocks=plan.dq)
    dk, _ = call(v, do, q, initial_state=t(d_final), reverse=True, store_final=False, blocks=plan.dk)
    dv, d_initial = call(k, q, do, initial_state=d_final, reverse=True,
                         store_final=initial_state is not None, blocks=plan.dv)
    # The slopes are fixed decay rates (SPEC.md §2), not parameters: no gradient flows to them.
    return dq, dk, dv, jnp.zeros_like(slopes), d_initial


_lightning.defvjp(_lightning_fwd, _lightning_bwd)


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _warn_interpret() -> None:
    warnings.warn("No GPU found: impl='pallas' runs its Pallas kernels in interpret mode, which is "
                  "slow; use impl='blockwise' for speed on this machine.", stacklevel=4)


def _check(q: Array, k: Array, v: Array, chunk_size: int, plan: Optional[Plan]) -> None:
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        raise ValueError("impl='pallas' needs q, k and v of one dtype, bfloat16 or float32; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}: cast them first.")
    for name, dim in (("dk (head dim of q and k)", q.shape[-1]), ("dv (head dim of v)", v.shape[-1])):
        if dim not in HEAD_DIMS:
            raise ValueError(f"impl='pallas' supports {name} in {HEAD_DIMS}, got {dim}: use "
                             "impl='blockwise' for other head sizes.")
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"impl='pallas' needs chunk_size in {CHUNK_SIZES}, got {chunk_size}: "
                         "set config.model.chunk_size to one of them.")
    batch, seq, heads = q.shape[:3]
    if seq < 1:
        raise ValueError("impl='pallas' needs a sequence of at least one token, got seq = 0.")
    if batch > _MAX_GRID_YZ or heads > _MAX_GRID_YZ:
        raise ValueError(f"impl='pallas' launches one program per (batch, head): batch ({batch}) "
                         f"and heads ({heads}) must each be at most {_MAX_GRID_YZ}; split the batch.")
    if plan is not None:
        for name, blocks, value_dim in (("fwd", plan.fwd, v.shape[-1]), ("dq", plan.dq, q.shape[-1]),
                                        ("dk", plan.dk, q.shape[-1]), ("dv", plan.dv, v.shape[-1])):
            if blocks.chunk not in CHUNK_SIZES or value_dim % blocks.block_v:
                raise ValueError(f"plan.{name} = {blocks} does not fit: its chunk must be one of "
                                 f"{CHUNK_SIZES} and its block_v divide {value_dim}.")


def lightning_attention(q: Array, k: Array, v: Array, slopes: Array, *,
                        initial_state: Optional[Array] = None, chunk_size: int = 64,
                        plan: Optional[Plan] = None,
                        interpret: Optional[bool] = None) -> Tuple[Array, Array]:
    """Causal linear attention with per-head decay, as Pallas GPU kernels (SPEC.md §4).

    Differentiable (a custom VJP made of the same kernels) with respect to q, k, v and
    initial_state; usable under jit and grad.

    Args:
      q, k: [batch, seq, heads, dk]; v: [batch, seq, heads, dv]; one dtype, bf16 or f32; dk and
        dv powers of two from 16 to 256; any seq >= 1.
      slopes: [heads] f32 decay rates s (lambda = exp(-s)); they get no gradient.
      initial_state: optional [batch, heads, dk, dv] f32 state of earlier tokens.
      chunk_size: tokens per chunk, 16, 32, 64 or 128 (of the default plan).
      plan: block sizes of the four kernel calls, chunks included; default
        `default_plan(dk, dv, chunk_size)`.
      interpret: run in Pallas interpret mode; default: only when JAX has no GPU.
    Returns:
      o: [batch, seq, heads, dv] in v's dtype; final_state: [batch, heads, dk, dv] f32.
    """
    _check(q, k, v, chunk_size, plan)
    if plan is None:
        plan = default_plan(q.shape[-1], v.shape[-1], chunk_size)
    chunk_size = max(b.chunk for b in (plan.fwd, plan.dq, plan.dk, plan.dv))
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
        if interpret:
            _warn_interpret()
    if initial_state is not None:
        initial_state = initial_state.astype(jnp.float32)
    seq_len = q.shape[1]
    pad = -seq_len % chunk_size
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    o, final_state = _lightning(q, k, v, jnp.asarray(slopes, jnp.float32), initial_state, seq_len,
                                plan, bool(interpret))
    return o[:, :seq_len], final_state
