"""`pallas_kernels.lightning.decay_attention` as a Mosaic GPU kernel for Hopper: TMA copies and wgmma.

The same sweep as the Triton-lowering kernel (one program per (segment and value tile, head,
batch); chunks walked in order, in reverse for the anti-causal sums of the backward pass), with
the same arguments and results, so `pallas_kernels.lightning`'s forward and backward use either.
Per chunk of C tokens, with the float32 state S [dk, block_v] carried in registers:

    scores = Q K^T                 wgmma, both operands in shared memory       [C, C]
    inter  = Q S                   wgmma, S rounded to the input dtype in shared memory
    O      = (scores * D) V + lambda^e * inter     the masked scores from registers
    S      = lambda^len S + K^T (lambda^e' * V)    K transposed in shared memory; the decayed V
                                                   written there by the warpgroup

q, k, v arrive through a ring of TMA copies (`plgpu.emit_pipeline`) and O leaves by TMA. One
warpgroup (128 threads) does the arithmetic. GPU only, Hopper or later (`available`); bf16 inputs
with head dims that are multiples of 64 (`supports`).
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

Array = jax.Array

BLOCK_V = 64  # value columns a program owns: one 128-byte swizzled tile of bf16
# 128-byte swizzled (8, 64) tiles of bf16: the shared-memory layout wgmma reads its operands in.
_TRANSFORMS = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


# Bits of `decay_attention`'s document_rows: the reach row, then three flags.
REACH, SEES_STATE, BUILDS_STATE, PASSES_STATE = 255, 256, 512, 1024

SMEM_BYTES = 227 * 1024  # an H100's or H200's shared memory per block


def smem_bytes(dqk: int, chunk: int, stages: int, output: bool) -> int:
    """Shared memory of one program: the ring of q and o (with `output`), k and v chunks (and room
    for the document rows, given or not), the decayed v, the state in the input dtype (with
    `output`), and ~1 KB of barriers."""
    copies = 2 if output else 1  # (q and k, or k alone) of dqk columns; (v and o, or v) of BLOCK_V
    ring = stages * chunk * (copies * (dqk + BLOCK_V) * 2 + 4)
    return ring + chunk * BLOCK_V * 2 + (dqk * BLOCK_V * 2 if output else 0) + 1024


def max_stages(dqk: int, chunk: int, output: bool, limit: int) -> int:
    """The deepest TMA ring, up to `limit`, that fits shared memory (at least 1)."""
    return max([s for s in range(1, limit + 1) if smem_bytes(dqk, chunk, s, output) <= SMEM_BYTES]
               or [1])


def available() -> bool:
    """Whether these kernels run here: a GPU of compute capability 9.0 or later."""
    if jax.default_backend() != "gpu":
        return False
    return float(getattr(jax.devices()[0], "compute_capability", "0")) >= 9.0


def supports(q: Array, k: Array, v: Array, chunk: int) -> bool:
    """Whether `decay_attention` takes these inputs: bf16, dk and dv multiples of 64 up to 256, and
    a chunk of 64 (wgmma's M)."""
    dk, dv = q.shape[-1], v.shape[-1]
    return (q.dtype == k.dtype == v.dtype == jnp.bfloat16 and chunk == 64
            and dk % 64 == 0 and dv % 64 == 0 and dk <= 256 and dv <= 256)


def _kernel(slope_ref, *refs, seq_len: int, chunk: int, seg_chunks: int, tiles: int,
            reverse: bool, has_initial: bool, output: bool, store_state: bool, stages: int,
            has_documents: bool):
    """Refs: slopes [heads] f32; (q) k [batch, seq_pad, heads, dqk]; v [batch, seq_pad, heads, dv];
    (the document rows [batch, seq_pad] int32, see `decay_attention`); (the states entering the
    segments [batch, heads, segments, dqk, dv] f32); (o like v); (the states leaving the segments,
    like the entering ones)."""
    refs = list(refs)
    q_ref = refs.pop(0) if output else None
    k_ref, v_ref = refs.pop(0), refs.pop(0)
    doc_ref = refs.pop(0) if has_documents else None
    s0_ref = refs.pop(0) if has_initial else None
    o_ref = refs.pop(0) if output else None
    s_out_ref = refs.pop(0) if store_state else None
    dqk, dtype = k_ref.shape[-1], k_ref.dtype
    f32, c_len, bv = jnp.float32, chunk, BLOCK_V
    j, h, b = lax.axis_index("j"), lax.axis_index("h"), lax.axis_index("b")
    seg, tile = lax.div(j, tiles), lax.rem(j, tiles)
    neg_s = -slope_ref[h]
    wgmma_layout = plgpu.Layout.WGMMA

    def iota(shape, dim):
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=wgmma_layout)

    # Intra-chunk decay D[t, j] = lambda^|t-j| on the causal side (j <= t; t <= j in reverse).
    if output:
        t_idx, j_idx = iota((c_len, c_len), 0), iota((c_len, c_len), 1)
        causal = (j_idx <= t_idx) if not reverse else (j_idx >= t_idx)
        dist = jnp.abs(t_idx - j_idx).astype(f32)
        intra_decay = jnp.where(causal, jnp.exp(neg_s * dist), 0.0)
    # Token index within the chunk as a per-row vector: the decays are computed once per row (a
    # few exponentials a thread) and broadcast over the columns they scale.
    row_layout = wgmma_layout.reduce(1)
    rows = plgpu.broadcasted_iota(jnp.int32, (c_len,), 0, layout=row_layout)

    def by_row(x, columns):
        return lax.broadcast_in_dim(x, (c_len, columns), [0])

    def scope(s_smem, vs_smem):
        state_at = lambda ref: ref.at[b, h, seg, :, pl.ds(tile * bv, bv)]  # noqa: E731
        if has_initial:  # straight into registers: no shared memory held for the whole sweep
            state = plgpu.load(state_at(s0_ref), (), layout=wgmma_layout, optimized=False)
        else:
            state = plgpu.layout_cast(jnp.zeros((dqk, bv), f32), wgmma_layout)
        if output:
            s_smem[...] = state.astype(dtype)
            plgpu.commit_smem()

        chunk_of = ((lambda i: seg * seg_chunks + seg_chunks - 1 - i) if reverse
                    else (lambda i: seg * seg_chunks + i))

        def step(idx, *bufs):
            *bufs, state = bufs
            length = jnp.clip(seq_len - chunk_of(idx[0]) * c_len, 0, c_len)
            valid = rows < length
            if reverse:  # row t sees the state of later tokens through lambda^(len-1-t)
                q_exp, k_exp = length - 1 - rows, rows + 1
            else:  # row t sees the state of earlier tokens through lambda^(t+1)
                q_exp, k_exp = rows + 1, length - 1 - rows
            if output:
                q_s, k_s, v_s, *bufs = bufs
            else:
                k_s, v_s, *bufs = bufs
            doc_s = bufs.pop(0) if has_documents else None
            o_s = bufs.pop(0) if output else None
            # Each read of the document rows sits after the first products are issued, so that
            # it overlaps them; shared-memory reads are cheap to repeat.

            def rows_with(flag):  # the chunk's valid rows whose document flags hold `flag`
                if not has_documents:
                    return valid
                doc = plgpu.load(doc_s, (), layout=row_layout, optimized=False)
                return valid & ((doc & flag) != 0)

            def passes():  # no document starts in the chunk: a scalar read, the same on every row
                return (doc_s[0] & PASSES_STATE) != 0

            def state_decay():  # lambda^len, or 0 where a document starts in the chunk
                decay = jnp.exp(neg_s * length.astype(f32))
                return jnp.where(passes(), decay, 0.0) if has_documents else decay

            def within_documents(p):  # the decayed scores [C, C] f32, cross-document pairs zeroed
                if not has_documents:
                    return p

                def one_document(p):  # k_j shares q_t's document iff j is between t and reach_t
                    doc = plgpu.load(doc_s, (), layout=row_layout, optimized=False)
                    reach = by_row(doc & REACH, c_len)
                    # A fresh column index, not the setup's `j_idx`, which the loop would then
                    # keep live (32 values a thread) for the whole sweep.
                    cols = iota((c_len, c_len), 1)
                    return jnp.where((cols <= reach) if reverse else (cols >= reach), p, 0.0)

                # Most chunks hold no document start: they skip the mask. The branch takes the
                # product, which dies here, not the decay, which stays live for the next chunk,
                # so that its result may reuse the product's registers: taking the decay, the
                # kernel copied 32 registers a thread on every chunk (Nsight Compute).
                return lax.cond(passes(), lambda p: p, one_document, p)

            def decay_values():
                # The value rows scaled by their decay to the chunk's far edge, for the update.
                k_decay = jnp.where(rows_with(BUILDS_STATE), jnp.exp(neg_s * k_exp.astype(f32)), 0.0)
                v = plgpu.layout_cast(v_s[...], wgmma_layout)
                vs_smem[...] = (v.astype(f32) * by_row(k_decay, bv)).astype(dtype)
                plgpu.commit_smem()

            if output:
                def scores_and_inter(refs):
                    acc_qk, acc_qs = refs
                    plgpu.wgmma(acc_qk, q_s, plgpu.transpose_ref(k_s, (1, 0)))
                    plgpu.wgmma(acc_qs, q_s, s_smem)
                    decay_values()  # while the tensor cores work

                zeros_cc = plgpu.layout_cast(jnp.zeros((c_len, c_len), f32), wgmma_layout)
                zeros_cv = plgpu.layout_cast(jnp.zeros((c_len, bv), f32), wgmma_layout)
                scores, inter = pl.run_state(scores_and_inter)(
                    (plgpu.ACC.init(zeros_cc), plgpu.ACC.init(zeros_cv)))
                q_decay = jnp.where(rows_with(SEES_STATE), jnp.exp(neg_s * q_exp.astype(f32)), 0.0)
                p = within_documents(scores * intra_decay).astype(dtype)
                o = inter * by_row(q_decay, bv)

                def products(refs):
                    acc_o, acc_s = refs
                    plgpu.wgmma(acc_o, p, v_s)
                    plgpu.wgmma(acc_s, plgpu.transpose_ref(k_s, (1, 0)), vs_smem)

                o, state = pl.run_state(products)(
                    (plgpu.ACC.init(o), plgpu.ACC.init(state * state_decay())))
                o_s[...] = o.astype(dtype)
                s_smem[...] = state.astype(dtype)
                plgpu.commit_smem()
            else:
                decay_values()

                def update(acc_s):
                    plgpu.wgmma(acc_s, plgpu.transpose_ref(k_s, (1, 0)), vs_smem)

                state = pl.run_state(update)(plgpu.ACC.init(state * state_decay()))
            return state

        qk_spec = plgpu.BlockSpec((c_len, dqk), lambda i: (chunk_of(i), 0), transforms=_TRANSFORMS)
        v_spec = plgpu.BlockSpec((c_len, bv), lambda i: (chunk_of(i), tile), transforms=_TRANSFORMS)
        head = lambda ref: ref.at[b, :, h, :]  # noqa: E731
        in_specs = ([qk_spec] if output else []) + [qk_spec, v_spec]
        ins = ([head(q_ref)] if output else []) + [head(k_ref), head(v_ref)]
        if has_documents:  # the rows' document flags ride the same ring as q, k and v
            in_specs.append(plgpu.BlockSpec((c_len,), lambda i: (chunk_of(i),)))
            ins.append(doc_ref.at[b])
        outs = [head(o_ref)] if output else []
        state = plgpu.emit_pipeline(step, grid=(seg_chunks,), in_specs=in_specs,
                                    out_specs=[v_spec] if output else [],
                                    max_concurrent_steps=min(stages, seg_chunks,
                                                             max_stages(dqk, c_len, output, stages)),
                                    init_carry=state)(*ins, *outs)
        if store_state:
            state_at(s_out_ref)[...] = state

    pl.run_scoped(scope,
                  plgpu.SMEM((dqk, bv), dtype, transforms=_TRANSFORMS) if output else None,
                  plgpu.SMEM((c_len, bv), dtype, transforms=_TRANSFORMS))


def decay_attention(q: Array, k: Array, v: Array, slopes: Array, initial_states: Optional[Array],
                    *, seq_len: int, reverse: bool, output: bool, store_states: bool,
                    segments: int, chunk: int = 64, stages: int = 2,
                    document_rows: Optional[Array] = None) -> Tuple[Optional[Array], Optional[Array]]:
    """`pallas_kernels.lightning.decay_attention` on Hopper's TMA and tensor cores: the same
    arguments and results, with packed documents given per row (`document_rows`).

    Args:
      q, k: [batch, seq_pad, heads, dqk]; v: [batch, seq_pad, heads, dv], bf16, seq_pad a multiple
        of `chunk` and rows from seq_len on zero; dqk and dv multiples of 64.
      slopes: [heads] f32; initial_states: None or [batch, heads, segments, dqk, dv] f32.
      stages: chunks of q, k and v in flight (TMA ring depth).
      document_rows: None (one document) or [batch, seq_pad] int32, per row and for this sweep's
        direction: the row within its chunk of its document's first row (last in reverse) in the
        low bits (`REACH`), and the flags `SEES_STATE` (the row belongs to the document of the
        state entering the chunk), `BUILDS_STATE` (to that of the state leaving it) and
        `PASSES_STATE` (on every row of a chunk with no document start: the state passes
        through it).
    Returns:
      o [batch, seq_pad, heads, dv] bf16 or None; the states leaving the segments or None.
    """
    batch, seq_pad, heads, dqk = q.shape
    dv = v.shape[-1]
    tiles = dv // BLOCK_V
    num_chunks = seq_pad // chunk
    out_type = []
    if output:
        out_type.append(jax.ShapeDtypeStruct(v.shape, v.dtype))
    if store_states:
        out_type.append(jax.ShapeDtypeStruct((batch, heads, segments, dqk, dv), jnp.float32))
    kernel = functools.partial(
        _kernel, seq_len=seq_len, chunk=chunk, seg_chunks=num_chunks // segments, tiles=tiles,
        reverse=reverse, has_initial=initial_states is not None, output=output,
        store_state=store_states, stages=stages, has_documents=document_rows is not None)
    name = "lightning_attention_hopper_" + ("reverse" if reverse else "forward")
    call = plgpu.kernel(kernel, out_type=tuple(out_type),
                        # Mosaic GPU runs the last grid axis fastest: a head's value tiles
                        # then run side by side and share their q and k reads in L2.
                        grid=(batch, heads, segments * tiles), grid_names=("b", "h", "j"),
                        compiler_params=plgpu.CompilerParams(approx_math=True),
                        kernel_name=name if output else name + "_states")
    args = [slopes.astype(jnp.float32)] + ([q] if output else []) + [k, v]
    if document_rows is not None:
        args.append(document_rows)
    if initial_states is not None:
        args.append(initial_states)
    outs = list(call(*args))
    o = outs.pop(0) if output else None
    return o, (outs.pop(0) if store_states else None)
