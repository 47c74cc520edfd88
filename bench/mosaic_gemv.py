"""The one-row products of the 1B layer as Mosaic GPU kernels whose multiply-adds run on the tensor
cores (wgmma), against the library's Pallas Triton `gemv` in the same run.

A one-row product y = x @ W has no matrix for the tensor cores, so the Triton kernels do their
multiply-adds with the row repeated as 16 rows (`pallas_kernels.decode.gemv`), and summing tiles
in registers cost a Mosaic GPU kernel 6 µs a layer (bench/mosaic_stream.py, rows64). Here each
block streams its column tile of W through shared memory (TMA, `plgpu.emit_pipeline`) and hands
every tile to wgmma as the transposed left operand: acc [tile_n, 8] += W_tile^T @ X^T, where X is
the row padded with zeros to the instruction's smallest width of 8 (`x8`, [8, K] bf16). The
tensor cores then do 8x the useful arithmetic (~1 µs of their time a layer), the registers hold
only the [tile_n, 8] float32 accumulator, and the weight tiles go from shared memory to the tensor
cores without passing through registers.

The kernel computes the products only: the row's norm, gate and bf16 rounding, the sum over K
splits and the residual are XLA's work here (they are a prologue and epilogue in a fused kernel),
and `kernel µs` is the Mosaic kernel's own time against the Triton kernel's (which does all of
it). Each variant is checked against the float32 reference of the fused product first. Eight
copies of each weight are cycled so that none is found in L2.

    python3 bench/mosaic_gemv.py            # the library's Hopper kernels against the Triton ones
    python3 bench/mosaic_gemv.py --probe    # and the probe kernel over its tilings (call 59)

Needs a Hopper GPU (there is no CPU mode). Prints a line per variant and a table; writes
$OUT/mosaic_gemv.json (OUT defaults to ./bench_out).
"""
import dataclasses
import functools
import itertools
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench import report  # noqa: E402
from bench.gemv import (EPS, FLAGS, PRODUCTS, fusion_kwargs, pallas_fn, product_operands,  # noqa: E402
                        reference, time_product, xla_read)
from pallas_kernels import decode_hopper  # noqa: E402
from pallas_kernels.decode import tiling_for  # noqa: E402
from tnllm.model import srms_norm  # noqa: E402

# 128-byte swizzled (8, 64) bf16 tiles: the shared-memory layout wgmma reads.
TRANSFORMS = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
PROBE_SMEM_BYTES = 200 * 1024
HEAD = (2048, 64000)  # the 1B's output head: K = d_model, N = vocab (configs/1b.py)

flags.DEFINE_bool("head", True, "Also the output head: SRMSNorm(x) @ E^T with the 1B's embedding E "
                  "[64000, 2048], as the fused step computes it (XLA) and as the Hopper kernel reading "
                  "E transposed.")
flags.DEFINE_bool("probe", False, "Also the probe kernel (row as wgmma's N = 8 operand, prepared by "
                  "XLA) over its tilings (call 59).")


def mosaic_gemv(x8, ws, tile_n, tile_k, stages, split):
    """x8 [8, K] bf16 (the row, then zero rows) times each of ws (1 or 2 weights [K, N] bf16):
    [split, len(ws), N, 8] f32, the partial sums of each K split (column 0 the row's)."""
    k, n = ws[0].shape
    steps = k // split // tile_k
    nw = len(ws)

    def body(x_ref, *refs):
        w_refs, o_ref = refs[:nw], refs[nw]
        j, s = lax.axis_index("n"), lax.axis_index("s")

        def scope(*accs):
            def step(_, x_smem, *w_smem):
                for acc, w in zip(accs, w_smem):
                    plgpu.wgmma(acc, plgpu.transpose_ref(w, (1, 0)), plgpu.transpose_ref(x_smem, (1, 0)))
                plgpu.wgmma_wait(nw)  # this step's products may run on; the previous step's are done

            spec = lambda shape, index: plgpu.BlockSpec(  # noqa: E731
                shape, index, transforms=TRANSFORMS, delay_release=1)
            plgpu.emit_pipeline(
                step, grid=(steps,),
                in_specs=[spec((8, tile_k), lambda i: (0, s * steps + i))]
                + [spec((tile_k, tile_n), lambda i: (s * steps + i, j))] * nw,
                max_concurrent_steps=stages)(x_ref, *w_refs)
            plgpu.wgmma_wait(0)
            for p, acc in enumerate(accs):
                o_ref[s, p, pl.ds(j * tile_n, tile_n)] = acc[...]

        pl.run_scoped(scope, *[plgpu.ACC((tile_n, 8), jnp.float32) for _ in range(nw)])

    return plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((split, nw, n, 8), jnp.float32),
        grid=(n // tile_n, split), grid_names=("n", "s"), kernel_name="mosaic_gemv")(x8, *ws)


def mosaic_fn(fusion, tile_n, tile_k, stages, split):
    """The fused product (bench/gemv.py's signature) with the Mosaic kernel for the products."""
    def fn(x, u, r, w, w2):
        if "n" in fusion:
            x = srms_norm(x, EPS)
        if "g" in fusion:
            x = x * u
        x8 = jnp.pad(x.astype(jnp.bfloat16), ((0, 7), (0, 0)))
        ws = (w, w2) if "2" in fusion else (w,)
        sums = mosaic_gemv(x8, ws, tile_n, tile_k, stages, split).sum(0)[:, :, 0]  # [nw, N]
        y = sums[0] * sums[1] if "2" in fusion else sums[0]
        return y[None] + r if "r" in fusion else y[None]
    return fn


def hopper_fn(fusion, tiling):
    """The library's Hopper kernel (pallas_kernels.decode_hopper), everything fused in."""
    def fn(x, u, r, w, w2):
        return decode_hopper.gemv(x, w, **fusion_kwargs(fusion, u, r, w2), tiling=tiling)
    return fn


def head_variants(x, want):
    """(name, fn(x, u, r, e, _), expected) of the output head, e the embedding [vocab, K]."""
    def xla_dot(x, u, r, e, e2):  # tnllm.fused_decode.step's head before the Hopper kernel took it
        return jnp.dot(srms_norm(x, EPS).astype(jnp.bfloat16), e.T, preferred_element_type=jnp.float32)

    def hopper(t):
        return lambda x, u, r, e, e2: decode_hopper.gemv(x, e, norm=True, eps=EPS, tiling=t, transposed=True)

    out = [("xla read", lambda x, u, r, e, e2: jnp.sum(e, axis=1, dtype=jnp.float32), None),
           ("xla dot (the step's head)", xla_dot, want)]
    for c in itertools.product((64, 128, 256), (64, 128), (4,), ("m64", "n8")):
        t = decode_hopper.HopperTiling(c[0], c[1], 1, *c[2:])
        if decode_hopper.smem_bytes(t, x.shape[1], "n") <= decode_hopper.SMEM_BYTES and not (
                t.form == "m64" and t.block_n > 128):
            out.append((f"hopper transposed {t}", hopper(t), want))
    return out


def hopper_tilings(k, n, fusion):
    """The library's tiling, the same in the other form, then others of 64-264 blocks that
    `decode_hopper.gemv` takes."""
    out = [decode_hopper.tiling_for(fusion, k, n)]
    out += [dataclasses.replace(out[0], form="m64" if out[0].form == "n8" else "n8")]  # the other form
    for c in itertools.product((64, 128), (64, 128), (1, 4, 8), (4,), ("m64", "n8")):
        t = decode_hopper.HopperTiling(*c)
        steps = k // (t.split * t.block_k)
        fits = decode_hopper.smem_bytes(t, k, fusion) <= decode_hopper.SMEM_BYTES
        divides = not n % t.block_n and not k % (t.split * t.block_k) and 2 <= t.stages <= steps
        allowed = ("2" not in fusion or t.split == 1) and not ("g" in fusion and t.block_n == t.block_k == 128)
        if t not in out and fits and divides and allowed and 64 <= n // t.block_n * t.split <= 264:
            out.append(t)
    return out


def configs(k, n, fusion):
    """(tile_n, tile_k, stages, split) with 64-264 blocks that fit shared memory."""
    nw = 2 if "2" in fusion else 1
    out = []
    for tile_n, tile_k, stages, split in itertools.product(
            (64, 128, 256), (64, 128), (4, 8), (1, 2, 4, 8)):
        blocks = n // tile_n * split
        stage_bytes = 2 * tile_k * (8 + nw * tile_n)
        if (n % tile_n or k % (split * tile_k) or not 64 <= blocks <= 264
                or stages * stage_bytes > PROBE_SMEM_BYTES or (k // split // tile_k) < stages):
            continue
        out.append((tile_n, tile_k, stages, split))
    return out


def main(argv):
    del argv
    out_dir = Path(os.environ.get("OUT", "bench_out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(date=time.strftime("%Y-%m-%d"), device=jax.devices()[0].device_kind,
                jax_version=jax.__version__, command=" ".join(sys.argv))
    print(meta, flush=True)
    rows = []
    for product, k, n, fusion in PRODUCTS:
        start = time.perf_counter()  # each product gets an equal share of --budget_s
        x, u, r, copies = product_operands(k, n)
        want = np.asarray(reference(fusion, x, u, r, *copies[0]))
        variants = [("xla read", xla_read(fusion), None),
                    (f"pallas {tiling_for(fusion, k, n)}", pallas_fn(fusion, tiling_for(fusion, k, n), False),
                     want)]
        variants += [(f"hopper {t}", hopper_fn(fusion, t), want) for t in hopper_tilings(k, n, fusion)]
        variants += [(f"mosaic n{c[0]} k{c[1]} s{c[2]} x{c[3]}", mosaic_fn(fusion, *c), want)
                     for c in (configs(k, n, fusion) if FLAGS.probe else [])]
        weight_mb = k * n * 2 * (2 if "2" in fusion else 1) / 1e6
        for name, fn, expect in variants:
            if time.perf_counter() - start > FLAGS.budget_s / len(PRODUCTS) and not name.startswith(("xla", "pallas")):
                continue

            run = functools.partial(time_product, fn=fn, expect=expect, x=x, u=u, r=r, copies=copies,
                                    repeats=FLAGS.repeats, weight_mb=weight_mb)
            report.measure(rows, dict(product=product, weight_mb=weight_mb, variant=name), run,
                           out_dir / "mosaic_gemv.json", meta)

    if FLAGS.head:  # two copies of 262 MB: neither fits in L2
        k, n = HEAD
        keys = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(keys[0], (1, k), jnp.float32)
        copies = [((jax.random.normal(key, (n, k), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16), None)
                  for key in keys[1:]]
        want = np.asarray(reference("n", x, None, None, copies[0][0].T, None))
        for name, fn, expect in head_variants(x, want):
            run = functools.partial(time_product, fn=fn, expect=expect, x=x, u=None, r=None, copies=copies,
                                    repeats=FLAGS.repeats, weight_mb=k * n * 2 / 1e6)
            report.measure(rows, dict(product="head", weight_mb=k * n * 2 / 1e6, variant=name), run,
                           out_dir / "mosaic_gemv.json", meta)

    best = []
    for product in [p[0] for p in PRODUCTS] + ["head"]:
        ok = [r for r in rows if r["product"] == product and r.get("kernel_us")]
        for prefix in ("pallas", "hopper", "mosaic", "xla"):
            cands = [r for r in ok if r["variant"].startswith(prefix)]
            if cands:
                best.append(min(cands, key=lambda r: r["kernel_us"]))
    report.table(best, [("product", "product", ">8"), ("variant", "variant", ">40"),
                        ("MB", "weight_mb", ">6.1f"), ("kernel µs", "kernel_us", ">9.2f"),
                        ("all µs", "us", ">7.2f"), ("rel err", "rel_err", ">8.1e")])


if __name__ == "__main__":
    app.run(main)
