"""Lightning Attention as Pallas GPU kernels (Triton lowering), forward and backward.

One kernel, `decay_attention`, computes the causal operator (docs/spec.md §4) per (batch, head):

    o_t = sum_{j <= t} lambda^(t-j) (q_t . k_j) v_j + lambda^(t+1) q_t S_0,    lambda = exp(-s),

chunk by chunk (Lightning Attention-2): an intra-chunk masked product plus an inter-chunk product
with a float32 state S [dk, dv] that stays in registers for the whole sequence, so only q, k, v
and o cross HBM. With `reverse=True` it runs the mirror image (anti-causal sums, chunks walked
from the end), which is what the backward pass needs. The backward pass is three more calls of
the same kernel with the roles of the tensors exchanged (docs/kernels.md, docs/spec.md §4):

    dQ = op(dO, V, K; state S^T)             forward sweep
    dK = op_rev(V, dO, Q; state dS^T)        reverse sweep, from the final-state cotangent
    dV = op_rev(K, Q, dO; state dS)          reverse sweep; its final state is d(initial state)

On Hopper and later, the default plan runs the same sweeps with `pallas_kernels.lightning_hopper`'s
Mosaic GPU kernel where it takes the inputs (`default_kernel`: bf16, head dims multiples of 64,
chunks of 64); a plan with `kernel="triton"` keeps this module's kernel.

Each program owns one (batch, head) and one `block_v`-wide tile of the value dimension: the rows
of the state are independent, so value tiles split the work without any reduction. When batch x
heads x tiles is too small to fill the GPU, the sequence is also cut into segments swept in
parallel: a first pass (the same kernel without outputs) gives each segment's own state, a small
product over segments (`entering_states`) gives the state entering each one, and the sweeps then
start from those states. The forward states are kept for dQ; dK and dV share one reverse pass.

Packed documents (`segment_ids`) become int32 document ids, one per token, from which XLA derives
what the kernel reads (`_chunk_documents`): per chunk, how many rows belong to the document of the
state entering it and how many to the one leaving it (scalars), and per token the first row of its
document within its chunk (its last in reverse). Within a chunk the decay matrix is masked to one
document, the carried state reaches only the rows of the document it belongs to, and a chunk
holding a document start passes no state on, so no decay crosses a boundary; the states entering
segments combine only within one document (`entering_states`). The Mosaic GPU kernel reads the
same facts per row (`_document_rows`), through the ring of copies that brings q, k and v.

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

from pallas_kernels import TRITON, lightning_hopper, pl_triton, triton_missing

Array = jax.Array

DTYPES = (jnp.bfloat16, jnp.float32)
HEAD_DIMS = (16, 32, 64, 128, 256)
CHUNK_SIZES = (16, 32, 64, 128)
KERNELS = ("triton", "mosaic")  # Plan.kernel: this module's kernel, or lightning_hopper's
_MAX_GRID_YZ = 65535  # CUDA limit on the grid's y and z extents (heads, batch)
MIN_SEGMENT_CHUNKS = 4  # shortest sequence segment a program sweeps alone (default_segments)
STATES_PASS_COST = 0.4  # the segments' states pass, as a fraction of a sweep (measured on H100)
_STATE_ELEMS = 128 * 64  # float32 state elements per program: 64 registers a thread at 4 warps
MAX_STAGES = 4  # deepest software pipeline of the default plan (measured best on H100)
# Shared memory one program may use, by compute capability (CUDA's opt-in limit per block); the
# pipeline keeps num_stages chunks of q, k and v there.
_SHARED_MEMORY = {"9.0": 232448, "8.0": 166912, "8.7": 166912}
_SHARED_MEMORY_OTHER = 101376  # sm_86 / sm_89 and unknown devices

@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tiling and launch parameters of one `decay_attention` call.

    chunk: tokens per chunk C (the intra-chunk product is C x C).
    block_v: width of the value-dimension tile a program owns; divides the value head dim.
    num_warps, num_stages: Triton launch parameters (warps per program, software-pipeline depth).
    """

    chunk: int = 64
    block_v: int = 64
    num_warps: int = 4
    num_stages: int = 4


@dataclasses.dataclass(frozen=True)
class Plan:
    """Blocks of the four kernel calls (forward, and the dQ, dK, dV calls of the backward pass)
    and the number of sequence segments each (batch, head) is split into."""

    fwd: Blocks
    dq: Blocks
    dk: Blocks
    dv: Blocks
    segments: Optional[int] = None  # sequence segments per (batch, head); None: default_segments
    kernel: str = "triton"  # "triton": this module's kernel; "mosaic": `lightning_hopper`'s (Hopper)


def default_plan(dk: int, dv: int, chunk_size: int = 64, *, itemsize: int = 2,
                 batch_heads: Optional[int] = None, seq_len: Optional[int] = None,
                 multiprocessors: int = 1, shared_memory: int = _SHARED_MEMORY["9.0"],
                 kernel: str = "triton") -> Plan:
    """Blocks for head dims dk (of q, k) and dv (of v), measured on the H100 (docs/kernels.md).

    Each program keeps its [key dim, block_v] float32 state in registers: value tiles hold at
    most _STATE_ELEMS elements (64 columns for key dim 128, 32 for 256, up to 128 for 64), at 4
    warps. The software pipeline is as deep as shared memory allows, up to MAX_STAGES chunks,
    except where a second program per multiprocessor pays more: when one program each would
    leave a last wave less than half full, 2 stages let two share a multiprocessor in one wave.

    Args:
      dk, dv: head dims; chunk_size: tokens per chunk; itemsize: bytes of an input element.
      batch_heads, seq_len: batch x heads and the sequence length of the call; with them the
        plan's segments come from `default_segments` and the pipeline depth from the waves.
      multiprocessors, shared_memory: of the GPU (bytes per program).
      kernel: "triton", or "mosaic" for `lightning_hopper`'s kernel (one warpgroup and a 64-wide
        value tile a program, a ring of three TMA stages; no further tuning).
    """
    if kernel == "mosaic":
        blocks = Blocks(chunk=chunk_size, block_v=lightning_hopper.BLOCK_V, num_stages=3)
        segments = None
        if batch_heads is not None and seq_len is not None:
            segments = default_segments(dv // blocks.block_v * batch_heads,
                                        -(-seq_len // chunk_size), multiprocessors)
        return Plan(blocks, blocks, blocks, blocks, segments=segments, kernel="mosaic")
    segments = None
    if batch_heads is not None and seq_len is not None:
        tiles = dv // max(16, min(dv, _STATE_ELEMS // dk))
        segments = default_segments(tiles * batch_heads, -(-seq_len // chunk_size), multiprocessors)

    def blocks(key_dim: int, value_dim: int) -> Blocks:
        block_v = max(16, min(value_dim, _STATE_ELEMS // key_dim))
        stage_bytes = chunk_size * (2 * key_dim + block_v) * itemsize  # q, k and v of one chunk
        stages = max(1, min(MAX_STAGES, shared_memory // stage_bytes))
        if segments is not None:
            programs = value_dim // block_v * batch_heads * segments
            if (multiprocessors < programs <= 1.5 * multiprocessors
                    and 2 * 2 * stage_bytes <= shared_memory):
                stages = 2
        return Blocks(chunk=chunk_size, block_v=block_v, num_warps=4, num_stages=stages)

    # dQ = op(dO, V, K): key dim dv, value dim dk; dK = op(V, dO, Q) likewise; dV = op(K, Q, dO).
    return Plan(fwd=blocks(dk, dv), dq=blocks(dv, dk), dk=blocks(dv, dk), dv=blocks(dk, dv),
                segments=segments)


def default_segments(programs: int, num_chunks: int, multiprocessors: int) -> int:
    """Sequence segments per (batch, head), from a cost model of one sweep.

    A program sweeps its chunks one after another (each chunk waits for the state of the one
    before) and one program fills a multiprocessor, so a sweep takes about waves x chunks per
    segment, waves = ceil(programs x segments / multiprocessors). Segments beyond one add the
    pass that computes their own states, measured at ~40 % of a sweep on the H100. Among powers
    of two with segments of at least MIN_SEGMENT_CHUNKS chunks the cheapest wins; of equal costs,
    the largest that keeps the programs within one wave (measured fastest with the default plan's
    deep pipeline).
    """

    def cost(segments: int) -> float:
        waves = -(-programs * segments // multiprocessors)
        return waves * num_chunks / segments * (1.0 if segments == 1 else 1.0 + STATES_PASS_COST)

    candidates = [1]
    while num_chunks >= 2 * candidates[-1] * MIN_SEGMENT_CHUNKS:
        candidates.append(2 * candidates[-1])
    best = min(cost(s) for s in candidates)
    cheapest = [s for s in candidates if cost(s) <= best * (1 + 1e-9)]
    one_wave = [s for s in cheapest if programs * s <= multiprocessors]
    return max(one_wave) if one_wave else min(cheapest)


# ----------------------------------------------------------------------------------------------
# the kernel
# ----------------------------------------------------------------------------------------------
def _decay_attention_kernel(slope_ref, q_ref, k_ref, v_ref, *refs, seq_len: int, chunk: int,
                            seg_chunks: int, tiles: int, reverse: bool, has_initial: bool,
                            output: bool, store_state: bool, has_ids: bool = False):
    """One (segment and value tile, head, batch) program: the chunks of one sequence segment.

    Refs: slope [1] f32; q, k [seq_pad, dqk]; v [seq_pad, block_v]; with `has_ids` the three
    arrays of `_chunk_documents`: reach [seq_pad], entering_rows and leaving_rows [num_chunks], all
    int32; then optionally the state entering the segment [dqk, block_v] f32, the output o
    [seq_pad, block_v] (when `output`), and the state leaving the segment (when `store_state`).
    Without `output` q is never read: the program only accumulates the segment's state.

    With document ids, (q_t . k_j) counts only within one document, the state reaches only rows
    of its own document, and a chunk holding a document start passes no state through (the state
    resets there).
    """
    refs = list(refs)
    reach_ref, entering_ref, leaving_ref = (refs.pop(0) for _ in range(3)) if has_ids else (None,) * 3
    s0_ref = refs.pop(0) if has_initial else None
    o_ref = refs.pop(0) if output else None
    s_out_ref = refs.pop(0) if store_state else None
    dqk, block_v = k_ref.shape[1], v_ref.shape[1]
    first_chunk = (pl.program_id(0) // tiles) * seg_chunks
    f32 = jnp.float32
    dot = functools.partial(lax.dot_general, precision=lax.Precision.HIGHEST,
                            preferred_element_type=f32)

    neg_s = -slope_ref[0]
    r = jnp.arange(chunk, dtype=jnp.int32)
    if output:
        # Intra-chunk decay D[t, j] = lambda^|t-j| on the causal side (j <= t; t <= j in
        # reverse), built from token indices once per program.
        causal = (r[None, :] <= r[:, None]) if not reverse else (r[None, :] >= r[:, None])
        dist = jnp.abs(r[:, None] - r[None, :]).astype(f32)
        intra_decay = jnp.where(causal, jnp.exp(neg_s * dist), 0.0)

    def body(i, state):
        c = first_chunk + (seg_chunks - 1 - i if reverse else i)
        start = pl.multiple_of(c * chunk, chunk)
        rows = pl.ds(start, chunk)
        k = k_ref[rows, :]
        v = v_ref[rows, :]
        # Chunks past the true length are padding (zeros); exponents use each chunk's true length
        # so that padding rows neither decay the state nor receive it.
        length = jnp.clip(seq_len - start, 0, chunk)
        valid = r < length
        if reverse:  # row t sees the state of tokens after the chunk through lambda^(len-1-t)
            q_exp, k_exp = length - 1 - r, r + 1
        else:  # row t sees the state of tokens before the chunk through lambda^(t+1)
            q_exp, k_exp = r + 1, length - 1 - r
        k_valid, q_valid = valid, valid
        chunk_decay = jnp.exp(neg_s * length.astype(f32))
        if has_ids:
            # Two scalars decide which rows see the entering state and which build the leaving
            # one: compared with the row index they need no reduction over the chunk and no
            # data moved between threads. The state's document holds the chunk's first rows
            # (its last in reverse), the leaving state's its last rows (first in reverse).
            entering, leaving = entering_ref[c], leaving_ref[c]
            if reverse:
                q_valid, k_valid = valid & (r >= chunk - entering), valid & (r < leaving)
            else:
                q_valid, k_valid = valid & (r < entering), valid & (r >= chunk - leaving)
            # Only a chunk wholly in the state's document (no start in it) passes the state on.
            chunk_decay = jnp.where(entering == chunk, chunk_decay, 0.0)
        k_decay = jnp.where(k_valid, jnp.exp(neg_s * k_exp.astype(f32)), 0.0)
        if output:
            q = q_ref[rows, :]
            q_decay = jnp.where(q_valid, jnp.exp(neg_s * q_exp.astype(f32)), 0.0)
            scores = dot(q, k, (((1,), (1,)), ((), ())))  # [C, C]
            decay = intra_decay
            if has_ids:
                # Documents are contiguous: on the causal side, k_j shares q_t's document iff j
                # lies between t and reach_t. One [C] vector against the column index: a single
                # broadcast orientation, so the load can land in the product's row layout.
                reach = reach_ref[rows]
                same = (r[None, :] <= reach[:, None]) if reverse else (r[None, :] >= reach[:, None])
                decay = jnp.where(same, intra_decay, 0.0)
            o = dot((scores * decay).astype(v.dtype), v, (((1,), (0,)), ((), ())))
            # Row scaling commutes with the product: (lambda^e * Q) S = lambda^e * (Q S), so q
            # stays exact and only the state is rounded to the operand dtype.
            o += q_decay[:, None] * dot(q, state.astype(q.dtype), (((1,), (0,)), ((), ())))
            o_ref[rows, :] = o.astype(o_ref.dtype)
        k_scaled = (k * k_decay[:, None]).astype(k.dtype)
        return chunk_decay * state + dot(k_scaled, v, (((0,), (0,)), ((), ())))  # [dqk, block_v]

    state = s0_ref[...] if has_initial else jnp.zeros((dqk, block_v), f32)
    state = lax.fori_loop(0, seg_chunks, body, state)
    if store_state:
        s_out_ref[...] = state


def decay_attention(q: Array, k: Array, v: Array, slopes: Array, initial_states: Optional[Array],
                    *, seq_len: int, reverse: bool, output: bool, store_states: bool,
                    segments: int, blocks: Blocks, interpret: bool,
                    ids: Optional[Array] = None) -> Tuple[Optional[Array], Optional[Array]]:
    """One kernel launch over padded inputs, one program per (segment, value tile, head, batch).

    The sequence is cut into `segments` equal runs of whole chunks, each swept by its own
    programs from the state that enters it.

    Args:
      q, k: [batch, seq_pad, heads, dqk]; v: [batch, seq_pad, heads, dv], one dtype, seq_pad a
        multiple of blocks.chunk and rows from seq_len on zero.
      slopes: [heads] f32.
      initial_states: None (zero states) or [batch, heads, segments, dqk, dv] f32, the state
        entering each segment (from its end when reverse).
      seq_len: true sequence length; reverse: anti-causal sums, states entering from the end.
      output: compute o; without it only the segments' states are computed and q is not read.
      store_states: return the state leaving each segment, computed from its entering state.
      segments: sequence segments, dividing seq_pad / blocks.chunk.
      ids: None (one document) or [batch, seq_pad] int32 `document_ids`, padding rows repeating
        the last id: the state resets at every document start.
    Returns:
      o: [batch, seq_pad, heads, dv] in v's dtype (rows from seq_len on are not meaningful) or
      None; the states leaving the segments, [batch, heads, segments, dqk, dv] f32, or None.
    """
    batch, seq_pad, heads, dqk = q.shape
    dv = v.shape[-1]
    bv = blocks.block_v
    tiles = dv // bv
    num_chunks = seq_pad // blocks.chunk
    grid = (segments * tiles, heads, batch)  # value tiles vary fastest: they share q, k in L2
    qk_spec = pl.BlockSpec((None, seq_pad, None, dqk), lambda j, h, b: (b, 0, h, 0))
    v_spec = pl.BlockSpec((None, seq_pad, None, bv), lambda j, h, b: (b, 0, h, j % tiles))
    state_spec = pl.BlockSpec((None, None, None, dqk, bv),
                              lambda j, h, b: (b, h, j // tiles, 0, j % tiles))
    in_specs = [pl.BlockSpec((1,), lambda j, h, b: (h,)), qk_spec, qk_spec, v_spec]
    args = [slopes, q, k, v]
    if ids is not None:
        in_specs += [pl.BlockSpec((None, seq_pad), lambda j, h, b: (b, 0))]
        in_specs += [pl.BlockSpec((None, num_chunks), lambda j, h, b: (b, 0))] * 2
        args += _chunk_documents(ids, chunk=blocks.chunk, seq_len=seq_len, reverse=reverse)
    if initial_states is not None:
        in_specs.append(state_spec)
        args.append(initial_states)
    out_specs, out_shape = [], []
    if output:
        out_specs.append(v_spec)
        out_shape.append(jax.ShapeDtypeStruct(v.shape, v.dtype))
    if store_states:
        out_specs.append(state_spec)
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, segments, dqk, dv), jnp.float32))
    kernel = functools.partial(
        _decay_attention_kernel, seq_len=seq_len, chunk=blocks.chunk,
        seg_chunks=num_chunks // segments, tiles=tiles, reverse=reverse,
        has_initial=initial_states is not None, output=output, store_state=store_states,
        has_ids=ids is not None)
    name = "lightning_attention_" + ("reverse" if reverse else "forward")
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pl_triton.CompilerParams(num_warps=blocks.num_warps,
                                                 num_stages=blocks.num_stages),
        interpret=interpret,
        name=name if output else name + "_states",
    )(*args)
    outs = list(outs)
    o = outs.pop(0) if output else None
    return o, (outs.pop(0) if store_states else None)


# ----------------------------------------------------------------------------------------------
# documents
# ----------------------------------------------------------------------------------------------
def document_ids(segment_ids: Array) -> Array:
    """Documents numbered 0, 1, 2... along each row: [batch, seq] int32, nondecreasing.

    segment_ids: [batch, seq] int, equal for neighbouring tokens of one document; a document starts
    wherever the id changes. The first document continues the initial state (it is the document
    of the earlier tokens that built it), so a row's first token starts no new document.
    """
    starts = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.pad(jnp.cumsum(starts, axis=1, dtype=jnp.int32), ((0, 0), (1, 0)))


def _boundary_ids(ids: Array, positions: Array, *, seq_len: int, reverse: bool) -> Array:
    """The document whose tokens the state at each boundary holds: [batch, len(positions)].

    Position p is the boundary before token p. Sweeping forward the state there holds the
    document of token p - 1 (the initial state's, 0, at p = 0); in reverse that of token p (the
    last token's, whose final state the reverse sweep starts from, at p >= seq_len).
    """
    if reverse:
        return ids[:, jnp.minimum(positions, seq_len - 1)]
    return jnp.pad(ids, ((0, 0), (1, 0)))[:, jnp.minimum(positions, seq_len)]


def _chunk_documents(ids: Array, *, chunk: int, seq_len: int,
                    reverse: bool) -> Tuple[Array, Array, Array]:
    """What the kernel reads of the document ids, for sweeps forward or in reverse.

    Args:
      ids: [batch, seq_pad] int32 `document_ids`, padding rows repeating the last id; chunk
        divides seq_pad.
    Returns:
      reach: [batch, seq_pad] int32, per token the row (within its chunk) of its document's first
        token in the chunk (its last when reverse): the token attends rows from there to itself.
      entering_rows: [batch, num_chunks] int32, the chunk's rows in the document of the state
        entering it (its first rows; its last when reverse): they see that state. All of them
        (chunk) when no document starts in the chunk, the case where the state passes on.
      leaving_rows: [batch, num_chunks] int32, the chunk's rows in the document of the state
        leaving it (its last rows; its first when reverse): their keys build that state.
    """
    batch, seq_pad = ids.shape
    chunks = ids.reshape(batch, seq_pad // chunk, chunk)
    # The ids never decrease, so a token's document starts in the chunk after the rows of earlier
    # documents, and ends before those of later ones: counts of a [chunk, chunk] comparison, one
    # fused reduction (a cumulative max over rows would lower to a windowed reduction per chunk).
    count_rows = functools.partial(jnp.sum, axis=-1, dtype=jnp.int32)
    if reverse:  # a document's last row in the chunk
        reach = count_rows(chunks[..., None, :] <= chunks[..., :, None]) - 1
        leaving = chunks[..., 0]
    else:  # a document's first row in the chunk
        reach = count_rows(chunks[..., None, :] < chunks[..., :, None])
        leaving = chunks[..., -1]
    # The state entering a chunk is the one at its boundary (after it when reverse).
    edges = jnp.arange(seq_pad // chunk) * chunk + (chunk if reverse else 0)
    entering = _boundary_ids(ids, edges, seq_len=seq_len, reverse=reverse)
    count = lambda doc: count_rows(chunks == doc[..., None])  # noqa: E731
    return reach.reshape(batch, seq_pad), count(entering), count(leaving)


def _document_rows(ids: Array, *, chunk: int, seq_len: int, reverse: bool) -> Array:
    """`_chunk_documents` per row, for `lightning_hopper.decay_attention`: [batch, seq_pad] int32
    of the reach row and the flags (`lightning_hopper.SEES_STATE` ...), so that the kernel reads
    them with q, k and v through its ring of copies and loads no scalar from global memory."""
    batch, seq_pad = ids.shape
    reach, entering, leaving = _chunk_documents(ids, chunk=chunk, seq_len=seq_len, reverse=reverse)
    row = jnp.arange(chunk, dtype=jnp.int32)
    entering, leaving = entering[..., None], leaving[..., None]
    if reverse:
        sees, builds = row >= chunk - entering, row < leaving
    else:
        sees, builds = row < entering, row >= chunk - leaving
    flags = (jnp.where(sees, lightning_hopper.SEES_STATE, 0)
             + jnp.where(builds, lightning_hopper.BUILDS_STATE, 0)
             + jnp.where(entering == chunk, lightning_hopper.PASSES_STATE, 0))
    return reach + flags.reshape(batch, seq_pad).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# sequence segments: the states that enter them
# ----------------------------------------------------------------------------------------------
def entering_states(local: Array, initial_state: Optional[Array], slopes: Array, *, seq_len: int,
                    seg_len: int, reverse: bool, ids: Optional[Array] = None) -> Array:
    """The state entering every segment, and the state after the whole sequence.

    A segment's own state (its tokens swept from a zero state) reaches a later position p
    decayed by lambda^(p - its end), an earlier one (reverse) by lambda^(its start - p), so the
    states entering all segments are one small product over segments instead of a serial pass.

    Args:
      local: [batch, heads, segments, dk, dv] f32, each segment's own state (decay_attention
        with store_states and no initial states).
      initial_state: None or [batch, heads, dk, dv] f32, the state before the first token (after
        the last one when reverse).
      slopes: [heads] f32; seq_len: true length; seg_len: tokens per segment (padded).
      ids: None or [batch, seq_pad] int32 `document_ids`: a segment's state then reaches only
        the boundaries of its own document (its last one's; its first one's when reverse).
    Returns:
      [batch, heads, segments + 1, dk, dv] f32: row s < segments enters segment s (at its start;
      at its end when reverse), the last row is the state after the whole sequence.
    """
    segments = local.shape[2]
    t = jnp.arange(segments)
    begin = jnp.minimum(t * seg_len, seq_len)
    end = jnp.minimum((t + 1) * seg_len, seq_len)
    rows = jnp.arange(segments + 1)
    last = jnp.array([seq_len if not reverse else 0])
    if not reverse:  # row s: the position before segment s; segments t < s reach it
        position = jnp.concatenate([begin, last])
        dist, reaches = position[:, None] - end[None, :], t[None, :] < rows[:, None]
        initial_dist = position
    else:  # row s: the position after segment s; segments t > s reach it
        position = jnp.concatenate([end, last])
        dist = begin[None, :] - position[:, None]
        reaches = (t[None, :] > rows[:, None]) | (rows[:, None] == segments)
        initial_dist = seq_len - position
    neg_s = -slopes.astype(jnp.float32)[:, None, None]
    weights = jnp.where(reaches, jnp.exp(neg_s * dist.astype(jnp.float32)), 0.0)  # [H, S+1, S]
    if ids is None:
        states = jnp.einsum("hrt,bhtkv->bhrkv", weights, local, precision=lax.Precision.HIGHEST)
    else:
        boundary = functools.partial(_boundary_ids, ids, seq_len=seq_len, reverse=reverse)
        row_ids = boundary(position)  # [b, S+1]
        same = row_ids[:, :, None] == boundary(begin if reverse else end)[:, None, :]  # [b, S+1, S]
        weights = jnp.where(same[:, None], weights[None], 0.0)  # [b, H, S+1, S]
        states = jnp.einsum("bhrt,bhtkv->bhrkv", weights, local, precision=lax.Precision.HIGHEST)
    if initial_state is not None:
        initial_decay = jnp.exp(neg_s[..., 0] * initial_dist.astype(jnp.float32))  # [H, S+1]
        initial_decay = initial_decay[None, :, :, None, None]
        if ids is not None:  # the initial state belongs to document 0 (the last one's when reverse)
            owner = ids[:, seq_len - 1:seq_len] if reverse else 0
            initial_decay = jnp.where((row_ids == owner)[:, None, :, None, None], initial_decay, 0.0)
        states += initial_decay * initial_state[:, :, None]
    return states


# ----------------------------------------------------------------------------------------------
# forward + backward as one differentiable function
# ----------------------------------------------------------------------------------------------
def _sweep(plan: Plan):
    """The kernel that runs the plan's sweeps: `decay_attention`, or its Mosaic GPU twin."""
    if plan.kernel == "triton":
        return decay_attention

    def mosaic(q, k, v, *, slopes, initial_states, seq_len, reverse, output, store_states,
               segments, blocks, interpret, ids):
        del interpret  # lightning_attention refuses it for this kernel
        rows = None if ids is None else _document_rows(ids, chunk=blocks.chunk, seq_len=seq_len,
                                                       reverse=reverse)
        return lightning_hopper.decay_attention(
            q, k, v, slopes, initial_states, seq_len=seq_len, reverse=reverse, output=output,
            store_states=store_states, segments=segments, chunk=blocks.chunk,
            stages=blocks.num_stages, document_rows=rows)

    return mosaic


def _forward(q, k, v, slopes, initial_state, ids, seq_len, plan, segments, interpret):
    """(o, final state) and the states entering the segments (None for one segment)."""
    call = functools.partial(_sweep(plan), slopes=slopes, seq_len=seq_len, reverse=False,
                             segments=segments, blocks=plan.fwd, interpret=interpret, ids=ids)
    if segments == 1:  # one sweep per (batch, head): the state leaving it is the final state
        s0 = None if initial_state is None else initial_state[:, :, None]
        o, final = call(q, k, v, initial_states=s0, output=True, store_states=True)
        return (o, final[:, :, 0]), None
    _, local = call(q, k, v, initial_states=None, output=False, store_states=True)
    states = entering_states(local, initial_state, slopes, seq_len=seq_len,
                             seg_len=q.shape[1] // segments, reverse=False, ids=ids)
    o, _ = call(q, k, v, initial_states=states[:, :, :-1], output=True, store_states=False)
    return (o, states[:, :, -1]), states[:, :, :-1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _lightning(q, k, v, slopes, initial_state, ids, seq_len, plan, segments, interpret):
    return _forward(q, k, v, slopes, initial_state, ids, seq_len, plan, segments, interpret)[0]


def _lightning_fwd(q, k, v, slopes, initial_state, ids, seq_len, plan, segments, interpret):
    out, entering = _forward(q, k, v, slopes, initial_state, ids, seq_len, plan, segments, interpret)
    return out, (q, k, v, slopes, initial_state, ids, entering)


def _lightning_bwd(seq_len, plan, segments, interpret, residuals, cotangents):
    q, k, v, slopes, initial_state, ids, entering = residuals
    do, d_final = cotangents
    call = functools.partial(_sweep(plan), slopes=slopes, seq_len=seq_len, segments=segments,
                             interpret=interpret, ids=ids)
    t = functools.partial(jnp.swapaxes, axis1=-1, axis2=-2)
    # dQ sweeps forward with the transposed forward states; dK and dV sweep in reverse with dS
    # (and its transpose), which enters from the end as the final state's cotangent.
    if segments == 1:
        s_fwd = None if initial_state is None else t(initial_state)[:, :, None]
        ds = d_final[:, :, None]
    else:
        s_fwd = t(entering)
        _, local = call(k, q, do, initial_states=None, reverse=True, output=False, store_states=True,
                        blocks=plan.dv)
        ds_all = entering_states(local, d_final, slopes, seq_len=seq_len,
                                 seg_len=q.shape[1] // segments, reverse=True, ids=ids)
        ds = ds_all[:, :, :-1]
    dq, _ = call(do, v, k, initial_states=s_fwd, reverse=False, output=True, store_states=False, blocks=plan.dq)
    dk, _ = call(v, do, q, initial_states=t(ds), reverse=True, output=True, store_states=False, blocks=plan.dk)
    store = segments == 1 and initial_state is not None
    dv, d_initial = call(k, q, do, initial_states=ds, reverse=True, output=True, store_states=store,
                         blocks=plan.dv)
    if initial_state is None:
        d_initial = None
    elif segments == 1:
        d_initial = d_initial[:, :, 0]
    else:
        d_initial = ds_all[:, :, -1]
    # The slopes are fixed decay rates (docs/spec.md §2), not parameters: no gradient flows to them.
    # Document ids are integers: no cotangent (None).
    return dq, dk, dv, jnp.zeros_like(slopes), d_initial, None


_lightning.defvjp(_lightning_fwd, _lightning_bwd)


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _warn_interpret() -> None:
    warnings.warn("No GPU found: impl='pallas' runs its Pallas kernels in interpret mode, which is "
                  "slow; use impl='blockwise' for speed on this machine.", stacklevel=4)


@functools.lru_cache(maxsize=None)
def _gpu() -> Tuple[int, int]:
    """Streaming multiprocessors and shared memory per program of the local GPU; (1, H100's)
    elsewhere (interpret mode: no splitting)."""
    device = jax.local_devices()[0]
    if device.platform != "gpu":
        return 1, _SHARED_MEMORY["9.0"]
    capability = str(getattr(device, "compute_capability", ""))
    return (getattr(device, "core_count", None) or 1,
            _SHARED_MEMORY.get(capability, _SHARED_MEMORY_OTHER))


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
        if plan.kernel not in KERNELS:
            raise ValueError(f"plan.kernel must be one of {KERNELS}, got {plan.kernel!r}.")
        if plan.kernel == "mosaic" and not lightning_hopper.supports(q, k, v, plan.fwd.chunk):
            raise ValueError("The Mosaic GPU kernels take bf16 q, k, v with dk and dv multiples of "
                             f"64 up to 256 and chunks of 64, got {q.dtype}, dk {q.shape[-1]}, dv "
                             f"{v.shape[-1]}, chunk {plan.fwd.chunk}: use kernel='triton'.")
        for name, blocks, value_dim in (("fwd", plan.fwd, v.shape[-1]), ("dq", plan.dq, q.shape[-1]),
                                        ("dk", plan.dk, q.shape[-1]), ("dv", plan.dv, v.shape[-1])):
            if blocks.chunk not in CHUNK_SIZES or value_dim % blocks.block_v:
                raise ValueError(f"plan.{name} = {blocks} does not fit: its chunk must be one of "
                                 f"{CHUNK_SIZES} and its block_v divide {value_dim}.")
        if plan.segments is not None and plan.segments < 1:
            raise ValueError(f"plan.segments must be at least 1 (or None to choose), got "
                             f"{plan.segments}.")


def check_segment_ids(q: Array, segment_ids: Optional[Array]) -> None:
    """One sentence unless segment_ids is None or integers of shape q.shape[:2] ([batch, seq])."""
    if segment_ids is not None and (segment_ids.shape != q.shape[:2]
                                    or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
        raise ValueError(f"segment_ids must be integers of shape [batch, seq] = {q.shape[:2]}, got "
                         f"{segment_ids.dtype} {segment_ids.shape}.")


def plan_for(q: Array, v: Array, chunk_size: int, kernel: str) -> Plan:
    """`default_plan` for these inputs on the local GPU, with the given kernel ("triton" or
    "mosaic"): the plan `lightning_attention` uses when given none (with `default_kernel`)."""
    multiprocessors, shared_memory = _gpu()
    return default_plan(q.shape[-1], v.shape[-1], chunk_size, itemsize=q.dtype.itemsize,
                        batch_heads=q.shape[0] * q.shape[2], seq_len=q.shape[1],
                        multiprocessors=multiprocessors, shared_memory=shared_memory,
                        kernel=kernel)


def default_kernel(q: Array, k: Array, v: Array, chunk_size: int, interpret: bool) -> str:
    """The kernel of the default plan: the Mosaic GPU one on Hopper and later where it takes the
    inputs (bf16, head dims multiples of 64, chunks of 64), else the Triton-lowering one."""
    if not interpret and lightning_hopper.available() and lightning_hopper.supports(
            q, k, v, chunk_size):
        return "mosaic"
    return "triton"


def supports(q: Array, k: Array, v: Array, chunk_size: int) -> bool:
    """Whether `lightning_attention` takes these inputs with its default plan (`tnllm.attention.
    choose_impl` asks before choosing the kernels for impl="auto")."""
    try:
        _check(q, k, v, chunk_size, None)
    except ValueError:
        return False
    return TRITON or default_kernel(q, k, v, chunk_size, jax.default_backend() != "gpu") == "mosaic"


def lightning_attention(q: Array, k: Array, v: Array, slopes: Array, *,
                        initial_state: Optional[Array] = None, chunk_size: int = 64,
                        plan: Optional[Plan] = None,
                        interpret: Optional[bool] = None,
                        segment_ids: Optional[Array] = None) -> Tuple[Array, Array]:
    """Causal linear attention with per-head decay, as Pallas GPU kernels (docs/spec.md §4).

    Differentiable (a custom VJP made of the same kernels) with respect to q, k, v and
    initial_state; usable under jit and grad.

    Args:
      q, k: [batch, seq, heads, dk]; v: [batch, seq, heads, dv]; one dtype, bf16 or f32; dk and
        dv powers of two from 16 to 256; any seq >= 1.
      slopes: [heads] f32 decay rates s (lambda = exp(-s)); they get no gradient.
      initial_state: optional [batch, heads, dk, dv] f32 state of earlier tokens.
      chunk_size: tokens per chunk, 16, 32, 64 or 128 (of the default plan).
      plan: block sizes of the four kernel calls, chunks included, sequence segments, and the
        kernel that runs them (`Plan.kernel`; `default_plan(..., kernel="mosaic")` for the Mosaic
        GPU one on Hopper); default `plan_for` these inputs with `default_kernel`; a plan without
        segments gets `default_segments`.
      interpret: run in Pallas interpret mode; default: only when JAX has no GPU.
      segment_ids: optional [batch, seq] int, equal within a document (`document_ids`): the state
        resets at each document start, initial_state continues the first document and the final
        state is the last one's.
    Returns:
      o: [batch, seq, heads, dv] in v's dtype; final_state: [batch, heads, dk, dv] f32.
    """
    _check(q, k, v, chunk_size, plan)
    check_segment_ids(q, segment_ids)
    batch, seq_len, heads = q.shape[:3]
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
        if interpret:
            _warn_interpret()
    if plan is None:
        plan = plan_for(q, v, chunk_size, default_kernel(q, k, v, chunk_size, interpret))
    chunk_size = max(b.chunk for b in (plan.fwd, plan.dq, plan.dk, plan.dv))
    if plan.kernel == "triton" and not TRITON:
        raise ValueError(f"impl='pallas' cannot run: {triton_missing()}; use impl='blockwise' "
                         "(or, on Hopper, a plan with kernel='mosaic').")
    older_gpu = jax.default_backend() == "gpu" and not lightning_hopper.available()
    if plan.kernel == "mosaic" and (interpret or older_gpu):
        raise ValueError("The Mosaic GPU kernels run compiled on a Hopper GPU only; use the "
                         "Triton kernels here (default_plan(..., kernel='triton')).")
    if initial_state is not None:
        initial_state = initial_state.astype(jnp.float32)
    segments = plan.segments
    if segments is None:
        programs = v.shape[-1] // plan.fwd.block_v * heads * batch
        segments = default_segments(programs, -(-seq_len // chunk_size), _gpu()[0])
    # Whole chunks of every kernel call in every segment; padding rows are zeros.
    pad = -seq_len % (chunk_size * segments)
    ids = None
    if segment_ids is not None:  # padding rows repeat the last id: they start no document
        ids = jnp.pad(document_ids(segment_ids), ((0, 0), (0, pad)), mode="edge")
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    o, final_state = _lightning(q, k, v, jnp.asarray(slopes, jnp.float32), initial_state, ids,
                                seq_len, plan, segments, bool(interpret))
    return o[:, :seq_len], final_state


# ----------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------
def lightning_reference(q: Array, k: Array, v: Array, slopes: Array,
                        initial_state: Optional[Array] = None,
                        segment_ids: Optional[Array] = None) -> Tuple[Array, Array]:
    """The same operator in its quadratic masked form O = ((Q K^T) * D) V, D[t, j] = lambda^(t-j)
    for j <= t: what the kernels are tested against (on float32 inputs, IEEE float32 throughout).
    With segment_ids, D[t, j] is also zero across documents.

    Takes and returns what `lightning_attention` does (any float dtype; float32 accumulation).
    Memory grows with seq^2: for tests and short sequences.
    """
    check_segment_ids(q, segment_ids)
    if segment_ids is not None:
        return _documents_reference(q, k, v, slopes, initial_state, document_ids(segment_ids))
    slopes = jnp.asarray(slopes, jnp.float32)
    t = q.shape[1]
    pos = jnp.arange(t)
    causal = pos[None, :] <= pos[:, None]  # [t, j]
    dist = jnp.where(causal, pos[:, None] - pos[None, :], 0).astype(jnp.float32)
    decay = jnp.where(causal[None], jnp.exp(-slopes[:, None, None] * dist[None]), 0.0)  # [h, t, j]
    # float32 inputs must stay float32 on GPUs too (XLA would otherwise use TF32 there).
    prec = lax.Precision.HIGHEST if jnp.float32 in (q.dtype, k.dtype, v.dtype) else None
    scores = jnp.einsum("bthd,bjhd->bhtj", q, k, precision=prec, preferred_element_type=jnp.float32)
    o = jnp.einsum("bhtj,bjhe->bthe", scores * decay, v.astype(jnp.float32), precision=prec)
    # Positions counted from the initial state: token t sees it through lambda^(t+1).
    tail = jnp.exp(-slopes[:, None] * (t - 1 - pos[None, :]).astype(jnp.float32))  # lambda^(T-1-j)
    s_t = jnp.einsum("bjhd,bjhe,hj->bhde", k.astype(jnp.float32), v.astype(jnp.float32), tail,
                     precision=lax.Precision.HIGHEST)
    if initial_state is not None:
        head_decay = jnp.exp(-slopes[:, None] * (pos[None, :] + 1).astype(jnp.float32))  # [h, t]
        o = o + jnp.einsum("bthd,bhde,ht->bthe", q.astype(jnp.float32), initial_state, head_decay,
                           precision=lax.Precision.HIGHEST)
        s_t = s_t + jnp.exp(-slopes * t)[None, :, None, None] * initial_state
    return o.astype(v.dtype), s_t


def _documents_reference(q, k, v, slopes, initial_state, ids):
    """lightning_reference with document ids [batch, seq]: the decay matrix masked per row."""
    slopes = jnp.asarray(slopes, jnp.float32)
    t = q.shape[1]
    pos = jnp.arange(t)
    causal = pos[None, :] <= pos[:, None]
    dist = jnp.where(causal, pos[:, None] - pos[None, :], 0).astype(jnp.float32)
    decay = jnp.where(causal[None], jnp.exp(-slopes[:, None, None] * dist[None]), 0.0)  # [h, t, j]
    same = ids[:, :, None] == ids[:, None, :]  # [b, t, j]
    decay = jnp.where(same[:, None], decay[None], 0.0)  # [b, h, t, j]
    prec = lax.Precision.HIGHEST if jnp.float32 in (q.dtype, k.dtype, v.dtype) else None
    scores = jnp.einsum("bthd,bjhd->bhtj", q, k, precision=prec, preferred_element_type=jnp.float32)
    o = jnp.einsum("bhtj,bjhe->bthe", scores * decay, v.astype(jnp.float32), precision=prec)
    in_last = ids == ids[:, -1:]  # [b, j]: the final state holds the last document only
    tail = jnp.exp(-slopes[:, None] * (t - 1 - pos[None, :]).astype(jnp.float32))  # [h, j]
    tail = jnp.where(in_last[:, None], tail[None], 0.0)  # [b, h, j]
    s_t = jnp.einsum("bjhd,bjhe,bhj->bhde", k.astype(jnp.float32), v.astype(jnp.float32), tail,
                     precision=lax.Precision.HIGHEST)
    if initial_state is not None:  # it continues document 0
        head_decay = jnp.exp(-slopes[:, None] * (pos[None, :] + 1).astype(jnp.float32))  # [h, t]
        head_decay = jnp.where((ids == 0)[:, None], head_decay[None], 0.0)  # [b, h, t]
        o = o + jnp.einsum("bthd,bhde,bht->bthe", q.astype(jnp.float32), initial_state, head_decay,
                           precision=lax.Precision.HIGHEST)
        keep = jnp.where(ids[:, -1:] == 0, jnp.exp(-slopes * t)[None], 0.0)  # [b, h]
        s_t = s_t + keep[:, :, None, None] * initial_state
    return o.astype(v.dtype), s_t
