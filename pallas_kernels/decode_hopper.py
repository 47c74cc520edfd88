"""The fused one-row products of the decoding step (`pallas_kernels.decode.gemv`) as Mosaic GPU kernels
for Hopper: the weights streamed by TMA, the multiply-adds on the tensor cores (wgmma).

`pallas_kernels.decode.gemv` (Pallas Triton) feeds Triton's tensor-core dot with the row repeated as
16 rows, and its weight tiles pass through registers. Here each block streams its [block_k,
block_n] tiles of W into shared memory through a ring of `stages` TMA copies
(`plgpu.emit_pipeline`), and wgmma reads them there as its right operand: acc [64, block_n] +=
X [64, block_k] @ W_tile, where X is the row's slice repeated as the 64 rows of wgmma's fixed M, in
registers. The 64 rows of acc are equal and one is kept. The tensor cores thus do 64x the useful
arithmetic (by count, about a quarter of their peak rate while the weights stream at HBM speed;
not measured), and nothing of the weights goes through registers. The output projection runs the
other way round ("n8", `HopperTiling.form`), and W may be stored [N, K] (`transposed`: the output
head's embedding table). On an H200 these kernels run the 1B layer's four products and its output
head faster than the Triton kernels do (docs/kernels.md; the decoding numbers are in
docs/benchmarks.md).

The fusions are `pallas_kernels.decode.gemv`'s (norm, gate, GLU product, residual). The block's
row (and gate) arrive in shared memory by one TMA copy each at the start, next to the first weight
tiles; SRMSNorm's scale is a scalar, so it multiplies the sums at the end, from the whole row in
shared memory. The result leaves by a TMA copy of one row of acc: a plain store, or, with a
residual, an add into the output, which is the residual buffer itself (aliased): so K can be split
over blocks (`HopperTiling.split`), each adding its partial sums, with no kernel to sum them.

GPU only (Hopper or later, `available`); `tnllm.fused_decode` uses these kernels there and the Triton
ones elsewhere (and in interpret mode on a CPU).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import fragmented_array as mgpu_fa
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.decode import fusions, kernel_name

Array = jax.Array

_M = 64  # wgmma's M: the row is repeated as 64 rows
# 128-byte swizzled (8, 64) tiles of bf16: the shared-memory layout in which wgmma reads W's tiles.
_TRANSFORMS = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
# An [8, 64] register array that stores into one such tile without bank conflicts: each warp two
# rows, a row's 64 columns over the 32 lanes in pairs ("n8" form).
_ROW8 = plgpu.Layout.TILED(mgpu_fa.Tiling(((8, 64), (2, 64), (2,))), warp_dims=(-5,), lane_dims=(-2,),
                           vector_dim=-1)


@dataclasses.dataclass(frozen=True)
class HopperTiling:
    """block_n: output columns per block (a multiple of 64); block_k: rows of W per pipeline step
    (a multiple of 64, at most 256); split: blocks per column block, each summing K / split rows of
    W and adding its part to the output (with a residual, or zeros); stages: TMA copies in flight
    per block (2 to the block's steps: a tile's slot is released a step after its product).

    form: how wgmma multiplies a tile. "m64": the row's slice repeated in registers as wgmma's 64
    rows times the tile (right operand). "n8": the tile transposed as the left operand times the
    row as 8 equal columns, written once per block into shared memory. On an H200 "n8" is faster
    for the output projection and slower for the other products (docs/kernels.md)."""

    block_n: int = 64
    block_k: int = 128
    split: int = 1
    stages: int = 4
    form: str = "m64"


# The fastest tilings of the 1B's products on an H200 (measured; docs/kernels.md):
# 128 blocks, four 16 KB tiles in flight each (88 blocks for the GLU, whose product cannot split K).
_MEASURED = {
    "n": HopperTiling(64, 128, 1, 4),  # q/k/v/u: 2048 -> 8192
    "ngr": HopperTiling(128, 64, 8, 4, "n8"),  # the output projection: 2048 -> 2048
    "n2": HopperTiling(64, 128, 1, 4),  # l1 and l2: 2048 -> 2 x 5632
    "r": HopperTiling(64, 128, 4, 4),  # l3: 5632 -> 2048
    "nT": HopperTiling(64, 128, 1, 4, "n8"),  # the output head, E [64000, 2048] transposed
}


def available() -> bool:
    """Whether these kernels run here: a GPU of compute capability 9.0 or later."""
    if jax.default_backend() != "gpu":
        return False
    capability = getattr(jax.devices()[0], "compute_capability", "0")
    return float(capability) >= 9.0


SMEM_BYTES = 227 * 1024  # an H100's or H200's shared memory per block


def smem_bytes(tiling: HopperTiling, k: int, fusion: str) -> int:
    """Shared memory of `gemv`'s kernel: the row (and gate) in float32, the ring of weight tiles,
    the result's staging tile ([64, block_n], or one row for "n8"), "n8"'s bf16 operand [8, K /
    split], and ~1 KB of barriers and alignment."""
    rows = k * 4 * (2 if "g" in fusion else 1)
    ring = tiling.stages * tiling.block_k * tiling.block_n * 2 * (2 if "2" in fusion else 1)
    if tiling.form == "n8":
        return rows + ring + 16 * (k // tiling.split) + tiling.block_n * 4 + 1024
    return rows + ring + _M * tiling.block_n * 4 + 1024


def tiling_for(fusion: str, k: int, n: int, transposed: bool = False) -> Optional[HopperTiling]:
    """The measured tiling for a product with `fusion` (the q/k/v/u one for others), narrowed until
    it divides w [k, n] ([n, k] transposed) with at least two pipeline steps a block: fewer K
    splits, then 64-row steps and 64 columns, then fewer stages; None where no tiling of
    64-multiples does (K of at least 128) or its row does not fit shared memory."""
    t = _MEASURED.get(fusion + "T" * transposed, _MEASURED["n"])
    steps = lambda t: k // (t.split * t.block_k)  # noqa: E731
    while (k % (t.split * t.block_k) or steps(t) < 2) and t.split > 1:
        t = dataclasses.replace(t, split=t.split // 2)
    if k % t.block_k or steps(t) < 2:
        t = dataclasses.replace(t, block_k=64)
    if n % t.block_n:
        t = dataclasses.replace(t, block_n=64)
    if k % (t.split * t.block_k) or n % t.block_n or steps(t) < 2:
        return None
    t = dataclasses.replace(t, stages=min(t.stages, steps(t)))
    return t if smem_bytes(t, k, fusion) <= SMEM_BYTES else None


def supports(x_shape, w_shape, fusion: str, transposed: bool = False) -> bool:
    """Whether `gemv` takes a product of these shapes (x [1, K], w [K, N], or [N, K] transposed)
    and fusions."""
    k, n = reversed(w_shape) if transposed else w_shape
    return x_shape == (1, k) and tiling_for(fusion, k, n, transposed) is not None


def _write_row_operand(x8, x_smem, u_smem, first: int, steps: int, bk: int):
    """The "n8" form's right operand: the block's K range of the row (times the gate), rounded to
    bf16 and repeated as the 8 rows of x8 [8, steps * bk] (shared memory, wgmma's swizzled tiles),
    64 columns at a time. x_smem, u_smem: [K / bk, bk] f32, the block's rows from `first`."""
    col = _ROW8.reduce(0)

    def chunk(i, carry):
        for h in range(bk // 64):
            v = plgpu.load(x_smem.at[first + i, pl.ds(h * 64, 64)], None, layout=col)
            if u_smem is not None:
                v = v * plgpu.load(u_smem.at[first + i, pl.ds(h * 64, 64)], None, layout=col)
            v = plgpu.layout_cast(lax.broadcast_in_dim(v.astype(jnp.bfloat16), (8, 64), [1]), _ROW8)
            x8.at[:, pl.ds(i * bk + h * 64, 64)][...] = v
        return carry

    lax.fori_loop(0, steps, chunk, None)
    plgpu.commit_smem()  # the stores, before wgmma reads them


def _kernel(*refs, norm: bool, gate: bool, glu: bool, add: bool, tiling: HopperTiling, k: int,
            u_block: int, eps: float, transposed: bool):
    """Refs: x [K / block_k, block_k] f32, (u [m K / block_k, block_k] f32, of which block u_block
    is the gate), W [K, N] bf16 ([N, K] if transposed), (W2), o [1, N] f32 (with `add` a mutable
    input: the residual, to which the block adds its sums)."""
    refs = list(refs)
    x_ref = refs.pop(0)
    u_ref = refs.pop(0) if gate else None
    w_refs = [refs.pop(0) for _ in range(2 if glu else 1)]
    [o_ref] = refs
    bk, bn, n8 = tiling.block_k, tiling.block_n, tiling.form == "n8"
    steps = k // tiling.split // bk
    j, s = lax.axis_index("n"), lax.axis_index("s")

    def scope(x_smem, u_smem, x8, row_barriers, out_smem, *accs):
        # The whole row (for the norm) and the gate, copied while the weights' first tiles are.
        plgpu.copy_gmem_to_smem(x_ref, x_smem, row_barriers.at[0])
        if gate:
            plgpu.copy_gmem_to_smem(u_ref.at[pl.ds(u_block * (k // bk), k // bk)], u_smem,
                                    row_barriers.at[1])

        def step(idx, *w_smem):
            i = idx[0]

            @pl.when(i == 0)
            def _():
                plgpu.barrier_wait(row_barriers.at[0])
                if gate:
                    plgpu.barrier_wait(row_barriers.at[1])
                if n8:
                    _write_row_operand(x8, x_smem, u_smem, s * steps, steps, bk)

            if n8:  # acc [block_n, 8] += W_tile^T @ (the row as 8 equal columns)
                rows = plgpu.transpose_ref(x8.at[:, pl.ds(i * bk, bk)], (1, 0))
                for acc, w in zip(accs, w_smem):
                    plgpu.wgmma(acc, w if transposed else plgpu.transpose_ref(w, (1, 0)), rows)
            else:  # acc [64, block_n] += (the row as 64 equal rows) @ W_tile
                col = plgpu.Layout.WGMMA.reduce(0)  # a [block_k] vector that broadcasts to wgmma's rows
                row = plgpu.load(x_smem.at[s * steps + i], None, layout=col)
                if gate:
                    row = row * plgpu.load(u_smem.at[s * steps + i], None, layout=col)
                rows = lax.broadcast_in_dim(row.astype(w_refs[0].dtype), (_M, bk), [1])
                for acc, w in zip(accs, w_smem):
                    plgpu.wgmma(acc, rows, plgpu.transpose_ref(w, (1, 0)) if transposed else w)
            plgpu.wgmma_wait(len(accs))  # this step's products run on; the last step's are done

        if transposed:  # W stored [N, K]: its [block_n, block_k] tiles
            spec = plgpu.BlockSpec((bn, bk), lambda i: (j, s * steps + i), transforms=_TRANSFORMS,
                                   delay_release=1)
        else:
            spec = plgpu.BlockSpec((bk, bn), lambda i: (s * steps + i, j), transforms=_TRANSFORMS,
                                   delay_release=1)
        plgpu.emit_pipeline(step, grid=(steps,), in_specs=[spec] * len(w_refs),
                            max_concurrent_steps=tiling.stages)(*w_refs)
        plgpu.wgmma_wait(0)
        # The sums: n8 any of acc's 8 equal columns, m64 its 64 equal rows (one row is copied out).
        sums = [jnp.max(acc[...], axis=1) if n8 else acc[...] for acc in accs]
        y = sums[0]
        if norm:  # the scale of SRMSNorm, from the whole row (on both sums of the GLU)
            x = x_smem[...]
            scale = lax.rsqrt(jnp.sum(x * x) / k + eps)
            y = y * (scale * scale if glu else scale)
        if glu:
            y = y * sums[1]
        if n8:
            out_smem[0, :] = y
        else:
            out_smem[...] = y
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem.at[pl.ds(0, 1)], o_ref.at[:, pl.ds(j * bn, bn)],
                                reduction_op="add" if add else None)
        # Only the staging tile's reads are waited for (it is freed at exit); the write completes
        # with the kernel, before the next one in the stream starts, without holding this block.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    row = plgpu.SMEM((k // bk, bk), jnp.float32)
    x8 = plgpu.SMEM((8, k // tiling.split), jnp.bfloat16, transforms=_TRANSFORMS) if n8 else None
    acc = plgpu.ACC((bn, 8) if n8 else (_M, bn), jnp.float32)
    pl.run_scoped(scope, row, row if gate else None, x8, plgpu.Barrier(num_barriers=2),
                  plgpu.SMEM((1 if n8 else _M, bn), jnp.float32), *[acc for _ in w_refs])


@functools.partial(jax.jit, static_argnames=("norm", "eps", "u_block", "tiling", "transposed"))
def gemv(x: Array, w: Array, *, w2: Optional[Array] = None, u: Optional[Array] = None,
         u_block: int = 0, residual: Optional[Array] = None, norm: bool = False, eps: float = 1e-6,
         tiling: Optional[HopperTiling] = None, transposed: bool = False) -> Array:
    """`pallas_kernels.decode.gemv` (same arguments and result) on Hopper's TMA and tensor cores;
    the result is float32. w, w2 must be bf16; K and N multiples of 64 (`supports`). transposed:
    w (and w2) are stored [N, K], and x @ w.T is computed (e.g. an embedding table as the output
    head). Its reference is `pallas_kernels.decode.gemv_reference(..., scale_sums=True)` (of w.T
    when transposed): these kernels always apply the norm's scale to the sums."""
    m, k = x.shape
    n, w_k = w.shape if transposed else w.shape[::-1]
    fusion = fusions(norm, u is not None, w2 is not None, residual is not None)
    tiling = tiling or tiling_for(fusion, k, n, transposed)
    if m != 1 or w_k != k or tiling is None:
        raise ValueError(f"The Hopper gemv takes one row x [1, K] and w [{'N, K' if transposed else 'K, N'}] "
                         f"with K and N multiples of 64, got x {x.shape} and w {w.shape}.")
    bk, bn, split = tiling.block_k, tiling.block_n, tiling.split
    if n % bn or k % (split * bk) or bn % 64 or bk % 64 or bk > 256:
        raise ValueError(f"{tiling} does not divide w {w.shape}: block_n must divide N, split * "
                         f"block_k must divide K, and both blocks be multiples of 64 (block_k <= 256).")
    if tiling.form not in ("m64", "n8"):
        raise ValueError(f"{tiling} has form {tiling.form!r}; use 'm64' or 'n8'.")
    if smem_bytes(tiling, k, fusion) > SMEM_BYTES:
        raise ValueError(f"{tiling} takes {smem_bytes(tiling, k, fusion)} bytes of shared memory a "
                         f"block, over the {SMEM_BYTES} there are: use fewer stages or smaller tiles.")
    if not 2 <= tiling.stages <= k // (split * bk):
        raise ValueError(f"{tiling} has {tiling.stages} stages for {k // (split * bk)} steps a block: "
                         f"use 2 to that many.")
    if split > 1 and w2 is not None:
        raise ValueError(f"{tiling} splits K, which the GLU's product of two sums cannot take: use split=1.")
    if u is not None and bn > 64 and bk > 64:
        # On jax 0.11.2 a gated product with 128 x 128 tiles gives wrong sums (docs/spec.md §13; the
        # other 128-wide tilings and every 64-wide one are right).
        raise ValueError(f"{tiling} with a gate gives wrong sums on this Mosaic GPU: use block_n or "
                         f"block_k 64.")
    if w.dtype != jnp.bfloat16 or (w2 is not None and w2.dtype != jnp.bfloat16):
        raise ValueError(f"The Hopper gemv streams bf16 weights, got {w.dtype}.")
    if u is not None and u.shape[-1] < (u_block + 1) * k:
        raise ValueError(f"u {u.shape} has no block {u_block} of K = {k} columns.")
    f32 = jnp.float32
    # The row as [K / block_k, block_k]: one TMA copy (each dimension at most 256), then a row a step.
    operands = [x.astype(f32).reshape(k // bk, bk)]
    if u is not None:
        operands.append(u.astype(f32).reshape(-1, bk))  # the kernel copies block u_block of it
    operands += [w] + ([w2] if w2 is not None else [])
    add = residual is not None or split > 1
    kernel = pl.kernel(
        functools.partial(_kernel, norm=norm, gate=u is not None, glu=w2 is not None, add=add,
                          tiling=tiling, k=k, u_block=u_block, eps=eps, transposed=transposed),
        out_type=() if add else jax.ShapeDtypeStruct((1, n), f32),
        mesh=plgpu.Mesh(grid=(n // bn, split), grid_names=("n", "s")),
        compiler_params=plgpu.CompilerParams(),
        name=kernel_name(norm, u is not None, w2 is not None, residual is not None) + "_hopper")
    if not add:
        return kernel(*operands)
    # The output starts as the residual (or zeros) and the blocks add to it in place: a mutable
    # array, which XLA aliases to the kernel's output.
    out = jax.new_ref(jnp.zeros((1, n), f32) if residual is None else residual.astype(f32))
    kernel(*operands, out)
    return out[...]
