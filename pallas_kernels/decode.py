"""The matrix products of a one-row decoding step as Pallas GPU kernels (Triton lowering), each with
the small operations around it fused in.

At batch 1 a decoding step reads every weight once; XLA runs each product as a GEMM and the norms,
the gate, the GLU product and the residual adds between them as ~8 small kernels a layer
(docs/benchmarks.md), each of which pays a launch and a ramp. `gemv` computes

    y = epilogue(prologue(x) @ W)

for one row x [1, K] and a bf16 weight W [K, N] (two weights W1, W2 for the GLU), where the
prologue is TNL's SRMSNorm of x (`norm`) and/or a gate u multiplied in (`gate`), and the epilogue
the GLU product (xW1 * xW2) and/or a residual add (`residual`). Each program owns `block_n`
output columns: it computes the row's norm itself (K elements, a few KB from L2: cheaper than a
kernel of its own) and walks K in `block_k` steps, the row repeated as the 16 rows of a
tensor-core product (Triton's smallest) so that Triton's software pipeline overlaps each step's
weight loads with the steps before: a float32 multiply-and-sum form streamed the weights at half
the rate on an H200 (docs/kernels.md). The gated row enters the product in W's
dtype, as in the model (normalised first, or, where a program sums all of K, with the norm's
scalar scale applied to the sums instead); the products, the GLU product and the residual sum stay
float32 and are rounded once, to `out_dtype`, at the end. For the narrow products (N = d_model)
`Tiling.split` also splits K over programs, which add their partial sums atomically to the float32
output that starts as the residual: more programs in flight, no kernel to sum the parts.

On a machine without a GPU the same kernels run in Pallas interpret mode.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import pl_triton

Array = jax.Array

_ROWS = 16  # the smallest M of Triton's dot


@dataclasses.dataclass(frozen=True)
class Tiling:
    """block_n: output columns per program; block_k: rows of W per loop step (divides K / split);
    split: programs per output column block, each summing K / split rows of W and adding its
    partial sum to the float32 output atomically (not with the GLU, whose product needs both sums
    whole); num_warps, num_stages: Triton launch parameters."""

    block_n: int = 32
    block_k: int = 256
    split: int = 1
    num_warps: int = 4
    num_stages: int = 3


def _kernel(*refs, norm: bool, gate: bool, glu: bool, residual: bool, block_k: int, steps: int,
            split: bool, eps: float):
    """x [1, K] (u [1, K]) W [K / split, block_n] (W2) (res [1, block_n]) -> o [1, block_n]; with
    split, o is res (aliased) and this program adds its part of the product to it atomically."""
    refs = list(refs)
    o_ref = refs.pop()
    x_ref = refs.pop(0)
    u_ref = refs.pop(0) if gate else None
    w_refs = [refs.pop(0) for _ in range(2 if glu else 1)]
    res_ref = refs.pop(0) if residual else None
    f32 = jnp.float32
    # SRMSNorm's scale rsqrt(mean(x^2) + eps) over the whole row. It is a scalar, so it factors
    # out of the product: a program that sums all of K gathers mean(x^2) from the row's slices in
    # its loop and scales the sums at the end, instead of a pass over the row before its first
    # weight load (0.3 µs of a q/k/v/u product on an H200). A program with
    # a split of K needs the whole row's norm first.
    late = norm and not split
    if norm and split:
        x = x_ref[...].astype(f32)
        scale = lax.rsqrt(jnp.sum(x * x) / x.size + eps)

    first = pl.program_id(1) * steps * block_k  # this program's first row of W

    def body(i, carry):
        accs, squares = carry
        ks = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        xs = pl.ds(pl.multiple_of(first + i * block_k, block_k), block_k)
        row = x_ref[0, xs].astype(f32)
        if late:
            squares = squares + jnp.sum(row * row)
        elif norm:
            row = row * scale
        if gate:
            row = row * u_ref[0, xs].astype(f32)
        # The row repeated as the _ROWS rows of a matrix product: tensor-core dots are what
        # Triton's software pipeline overlaps with the next steps' weight loads.
        rows = jnp.broadcast_to(row.astype(w_refs[0].dtype)[None, :], (_ROWS, block_k))
        return tuple(acc + jnp.dot(rows, w[ks, :], preferred_element_type=f32)
                     for acc, w in zip(accs, w_refs)), squares

    block_n = o_ref.shape[-1]
    accs, squares = lax.fori_loop(
        0, steps, body, (tuple(jnp.zeros((_ROWS, block_n), f32) for _ in w_refs), jnp.float32(0)))
    accs = [jnp.max(acc, axis=0) for acc in accs]  # the rows are equal; Triton cannot slice one
    if late:
        scale = lax.rsqrt(squares / (steps * block_k) + eps)
        accs = [acc * scale for acc in accs]
    y = accs[0] * accs[1] if glu else accs[0]
    if split:
        pl_triton.atomic_add(o_ref, (pl.ds(0, 1), pl.ds(0, block_n)), y[None, :])
        return
    if residual:
        y = res_ref[0, :].astype(f32) + y
    o_ref[0, :] = y.astype(o_ref.dtype)


def fusions(norm: bool, gate: bool, glu: bool, residual: bool) -> str:
    """A letter per operation fused into the product (n: norm, g: gate, 2: GLU, r: residual), e.g.
    "ngr" for TNL's output projection: the key of its tiling and the end of its kernel's name."""
    return "".join(c for c, on in zip("ng2r", (norm, gate, glu, residual)) if on)


def fusion_kwargs(fusion: str, *, u: Optional[Array] = None, w2: Optional[Array] = None,
                  residual: Optional[Array] = None, eps: float = 1e-6) -> dict:
    """The keyword arguments of `gemv` (and `gemv_reference`, `decode_hopper.gemv`) for the
    operations named by `fusion` (`fusions`): the operands of the others are left out."""
    return dict(norm="n" in fusion, u=u if "g" in fusion else None,
                w2=w2 if "2" in fusion else None, residual=residual if "r" in fusion else None,
                eps=eps)


def gemv_reference(x: Array, w: Array, *, w2: Optional[Array] = None, u: Optional[Array] = None,
                   u_block: int = 0, residual: Optional[Array] = None, norm: bool = False,
                   eps: float = 1e-6, scale_sums: bool = False) -> Array:
    """What `gemv` computes, in float32 with exact products: the reference its tests and
    benchmarks check the kernels against.

    The row enters the product rounded to w's dtype, as in the kernels: normalised and gated first,
    or, with `scale_sums`, gated only, the norm's scalar scale then applied to the sums (what a
    program that sums all of K does: `gemv` with `Tiling.split` 1, and every `decode_hopper.gemv`).
    Arguments as `gemv`; returns [1, N] float32.
    """
    f32 = jnp.float32
    k = x.shape[-1]
    x = x.astype(f32)
    scale = lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps) if norm else 1.0
    row = x if scale_sums else x * scale
    if u is not None:
        row = row * u[:, u_block * k:(u_block + 1) * k].astype(f32)
    row = row.astype(w.dtype).astype(f32)
    after = scale if scale_sums else 1.0
    dot = lambda m: jnp.dot(row, m.astype(f32), precision=lax.Precision.HIGHEST) * after  # noqa: E731
    y = dot(w) * dot(w2) if w2 is not None else dot(w)
    return y + residual.astype(f32) if residual is not None else y


def kernel_name(norm: bool, gate: bool, glu: bool, residual: bool) -> str:
    """The kernel's name in profiles, e.g. decode_gemv_ngr."""
    return "decode_gemv_" + fusions(norm, gate, glu, residual)


@functools.partial(jax.jit,
                   static_argnames=("norm", "eps", "u_block", "out_dtype", "tiling", "interpret"))
def gemv(x: Array, w: Array, *, w2: Optional[Array] = None, u: Optional[Array] = None,
         u_block: int = 0, residual: Optional[Array] = None, norm: bool = False, eps: float = 1e-6,
         out_dtype=None, tiling: Optional[Tiling] = None, interpret: Optional[bool] = None) -> Array:
    """epilogue(prologue(x) @ w) for one row.

    Args:
      x: [1, K], any float dtype; w, w2: [K, N] (bf16 in the model).
      u: [1, K] or None: the row is multiplied by u after the norm (TNL's output gate); or
        [1, m K], of which the kernel reads columns u_block K to (u_block + 1) K (the gate inside
        the merged q/k/v/u projection's output, without a slice kernel before this one).
      residual: [1, N] or None: added to the product (the layer's residual stream).
      norm: apply SRMSNorm (no weight) to x first, with `eps`.
      w2: None, or the GLU's second weight: the result is (x' w) * (x' w2).
      out_dtype: the result's dtype; None: x's. At one row the result is a few KB, so float32
        costs nothing and saves a rounding. float32 when tiling.split > 1 (atomic adds).
      tiling: None: `tiling_for` these fusions and shapes.
    Returns:
      [1, N] in out_dtype.
    """
    (m, k), n = x.shape, w.shape[1]
    if tiling is None:
        tiling = tiling_for(fusions(norm, u is not None, w2 is not None, residual is not None), k, n)
    split = tiling.split
    if m != 1 or w.shape[0] != k:
        raise ValueError(f"gemv takes one row x [1, K] and w [K, N], got x {x.shape} and w {w.shape}.")
    if u is not None and u.shape[-1] < (u_block + 1) * k:
        raise ValueError(f"u {u.shape} has no block {u_block} of K = {k} columns.")
    if n % tiling.block_n or k % (split * tiling.block_k):
        raise ValueError(f"{tiling} does not divide w {w.shape}: block_n must divide N and "
                         f"split * block_k must divide K.")
    if split > 1 and w2 is not None:
        raise ValueError(f"{tiling} splits K, which the GLU's product of two sums cannot take: "
                         f"use split=1.")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    row = pl.BlockSpec((1, k), lambda j, s: (0, 0))
    cols = pl.BlockSpec((k // split, tiling.block_n), lambda j, s: (s, j))
    out = pl.BlockSpec((1, tiling.block_n), lambda j, s: (0, j))
    operands = [(x, row)]
    if u is not None:
        operands.append((u, pl.BlockSpec((1, k), lambda j, s: (0, u_block))))
    operands += [(w, cols)] + ([(w2, cols)] if w2 is not None else [])
    name = kernel_name(norm, u is not None, w2 is not None, residual is not None)
    out_dtype = jnp.float32 if split > 1 else (out_dtype or x.dtype)
    if split > 1:  # the output starts as the residual (or zeros) and the programs add to it
        residual = (jnp.zeros((1, n), jnp.float32) if residual is None else residual.astype(jnp.float32))
    if residual is not None:
        operands.append((residual, out))
    kernel = functools.partial(_kernel, norm=norm, gate=u is not None, glu=w2 is not None,
                               residual=residual is not None, block_k=tiling.block_k,
                               steps=k // (split * tiling.block_k), split=split > 1, eps=eps)
    return pl.pallas_call(
        kernel, grid=(n // tiling.block_n, split),
        in_specs=[spec for _, spec in operands], out_specs=out,
        out_shape=jax.ShapeDtypeStruct((1, n), out_dtype),
        input_output_aliases={len(operands) - 1: 0} if split > 1 else {},
        compiler_params=pl_triton.CompilerParams(num_warps=tiling.num_warps,
                                                 num_stages=tiling.num_stages),
        interpret=interpret, name=name,
    )(*[a for a, _ in operands])


# The best tiling of each of a layer's four products for the 1B at one row on an H200
# (docs/kernels.md), by the operations fused into it (`fusions`).
_MEASURED = {
    "n": Tiling(64, 128, 1, 4, 5),  # q/k/v/u: 2048 -> 8192
    "ngr": Tiling(64, 128, 4, 4, 4),  # the output projection: 2048 -> 2048
    "n2": Tiling(64, 256, 1, 4, 3),  # l1 and l2: 2048 -> 2 x 5632
    "r": Tiling(64, 128, 4, 4, 4),  # l3: 5632 -> 2048
}


def tiling_for(fusion: str, k: int, n: int) -> Tiling:
    """The measured tiling for a product with `fusion` (`fusions`; the q/k/v/u one for others),
    narrowed until it divides w [k, n]: fewer splits of K first, then shorter K steps, then fewer
    columns a program."""
    t = _MEASURED.get(fusion, _MEASURED["n"])
    while k % (t.split * t.block_k) and t.split > 1:
        t = dataclasses.replace(t, split=t.split // 2)
    while k % t.block_k and t.block_k > 16:
        t = dataclasses.replace(t, block_k=t.block_k // 2)
    while n % t.block_n and t.block_n > 16:
        t = dataclasses.replace(t, block_n=t.block_n // 2)
    if k % t.block_k or n % t.block_n:
        raise ValueError(f"No tiling of 16-multiples divides a [{k}, {n}] weight: the fused decoding "
                         f"step needs d_model, glu_dim and heads x head_dim that are multiples of 16.")
    return t


def recurrence_tile(decrement, q, k, v, state) -> Tuple[Array, Array]:
    """One token of TNL's recurrence on a state tile, inside a kernel: decrement (expm1(-slope))
    f32; q, k [d] and v [block_v] before their SiLUs (q, k) in any float dtype; state [d, block_v]
    f32 -> (the new state, o [block_v] f32)."""
    f32 = jnp.float32
    q, k = jax.nn.silu(q.astype(f32)), jax.nn.silu(k.astype(f32))
    # The decrement form of tnllm.attention.lightning_attention_step (exact for tiny slopes).
    state = state + (decrement * state + k[:, None] * v.astype(f32)[None, :])
    return state, jnp.sum(q[:, None] * state, axis=0)


def _state_kernel(decrement_ref, q_ref, k_ref, v_ref, state_ref, o_ref, new_state_ref):
    """decrement [1] f32; q, k [d]; v [block_v]; state, new_state [d, block_v] f32 (one buffer);
    o [block_v]."""
    state, o = recurrence_tile(decrement_ref[0], q_ref[...], k_ref[...], v_ref[...], state_ref[...])
    new_state_ref[...] = state
    o_ref[...] = o.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_v", "num_warps", "interpret"))
def state_step(qkvu: Array, state: Array, slopes: Array, *, block_v: int = 16, num_warps: int = 2,
               interpret: Optional[bool] = None) -> Tuple[Array, Array]:
    """TNL's token-mixer recurrence for one token, read straight from the merged projection's output:
    q, k = silu(q), silu(k); S <- lambda S + k^T v; o = q S (`lightning_attention_step`).

    One program per (value tile of `block_v` columns, head, row) reads its head's q and k, its tile
    of v and of the state, and writes the tile back in place (the state is aliased: donate it).
    Default tiling: the fastest at batch 1 on an H200 (docs/kernels.md).

    Args:
      qkvu: [batch, 4, heads, d], any float dtype (q, k, v, u); state: [batch, heads, d, d] f32;
      slopes: [heads] f32.
    Returns:
      o [batch, heads, d] in qkvu's dtype and the new state.
    """
    batch, _, heads, d = qkvu.shape
    if state.shape != (batch, heads, d, d) or d % block_v:
        raise ValueError(f"state_step takes qkvu [batch, 4, heads, d] and a state [batch, heads, d, d] "
                         f"with block_v dividing d, got {qkvu.shape}, {state.shape} and block_v "
                         f"{block_v}.")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    row = lambda i: pl.BlockSpec((None, None, None, d), lambda j, h, b: (b, i, h, 0))  # noqa: E731
    tile = pl.BlockSpec((None, None, d, block_v), lambda j, h, b: (b, h, 0, j))
    return pl.pallas_call(
        _state_kernel,
        grid=(d // block_v, heads, batch),  # value tiles fastest: they share q and k
        in_specs=[pl.BlockSpec((1,), lambda j, h, b: (h,)), row(0), row(1),
                  pl.BlockSpec((None, None, None, block_v), lambda j, h, b: (b, 2, h, j)), tile],
        out_specs=[pl.BlockSpec((None, None, block_v), lambda j, h, b: (b, h, j)), tile],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, d), qkvu.dtype),
                   jax.ShapeDtypeStruct(state.shape, jnp.float32)],
        input_output_aliases={4: 1},
        compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name="decode_state_step",
    )(jnp.expm1(-slopes.astype(jnp.float32)), qkvu, qkvu, qkvu, state)
