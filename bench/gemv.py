"""The one-row products of the fused decoding step, one at a time: `pallas_kernels.decode.gemv` with
several tilings, against XLA's product and XLA reading the same bytes.

At batch 1 a decoding step reads every weight once, so its products run at the speed at which they
stream their weights from HBM. This measures the four products of a 1B layer with the operations
`tnllm.fused_decode` fuses into each (q/k/v/u with the norm; the output projection with the norm,
the gate and the residual; l1 and l2 with the norm and the GLU product; l3 with the residual), as

- `xla read`: a row sum over the weight(s), the time to stream those bytes once in one kernel;
- `xla dot`: XLA's product of the row with the weight(s), nothing fused;
- `pallas ...`: the kernel: a program reads block_n columns of W [K, N], block_n * 2 contiguous
  bytes out of every row (call 40 also tried W stored [N, K], each program's weights one
  contiguous region: no faster, bench/NOTES.md);
- `probe ...` (q/k/v/u only): the kernel's structure with the row entering the product in other
  ways, down to no row at all (`PROBES`);
- `merged ...` (l1 and l2 only): the two weights as one [K, 2N] weight through the q/k/v/u kernel
  and XLA's row sum over it: one weight stream a program instead of two.

Eight copies of each weight are cycled so that no product finds its weight in L2 (50 MB). GPU time
per product from a profiler trace. Each variant is checked against a float32 product first.

    python3 bench/gemv.py                 # the GPU run
    python3 bench/gemv.py --smoke         # tiny shapes in interpret mode: checks the logic on a CPU

Prints a line per variant, then the best tiling per product and the probes' times; writes
$OUT/gemv.json (OUT defaults to ./bench_out).
"""
import functools
import itertools
import json
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
from jax.experimental.pallas import triton as pl_triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench import profiling, report  # noqa: E402
from pallas_kernels.decode import Tiling, gemv, tiling_for  # noqa: E402
from tnllm.model import srms_norm  # noqa: E402

# (product, K, N, fusions) of the 1B config's layer (`pallas_kernels.decode.fusions`).
PRODUCTS = (("qkvu", 2048, 8192, "n"), ("out", 2048, 2048, "ngr"), ("glu", 2048, 5632, "n2"),
            ("l3", 5632, 2048, "r"))
SMOKE = (("qkvu", 128, 256, "n"), ("out", 128, 64, "ngr"), ("glu", 128, 96, "n2"),
         ("l3", 192, 64, "r"))
COPIES = 8
EPS = 1e-6

flags.DEFINE_integer("repeats", 10, "Passes over the weight copies per timing.")
flags.DEFINE_integer("budget_s", 330, "Stop trying new variants after this many seconds.")
flags.DEFINE_bool("smoke", False, "Tiny shapes, interpret mode, a few variants.")
FLAGS = flags.FLAGS


def reference(fusion, x, u, r, w, w2):
    """The fused product in float32 (x, u, r [1, *] f32; w, w2 [K, N])."""
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        if "n" in fusion:
            x = srms_norm(x, EPS)
        if "g" in fusion:
            x = x * u
        x = f32(x.astype(jnp.bfloat16))
        y = x @ f32(w)
        if "2" in fusion:
            y = y * (x @ f32(w2))
        return y + r if "r" in fusion else y


def fusion_kwargs(fusion, u, r, w2):
    """A fused product's keyword arguments to `gemv` (and `decode_hopper.gemv`) for `fusion`."""
    return dict(w2=w2 if "2" in fusion else None, u=u if "g" in fusion else None,
                residual=r if "r" in fusion else None, norm="n" in fusion, eps=EPS)


def pallas_fn(fusion, tiling, interpret):
    def fn(x, u, r, w, w2):
        return gemv(x, w, **fusion_kwargs(fusion, u, r, w2), out_dtype=jnp.float32, tiling=tiling,
                    interpret=interpret)
    return fn


def xla_dot(fusion):
    def fn(x, u, r, w, w2):
        y = jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)
        if "2" in fusion:
            y = y * jnp.dot(x.astype(w.dtype), w2, preferred_element_type=jnp.float32)
        return y
    return fn


def xla_read(fusion):
    def fn(x, u, r, w, w2):
        s = jnp.sum(w, axis=1, dtype=jnp.float32)
        return s + jnp.sum(w2, axis=1, dtype=jnp.float32) if "2" in fusion else s
    return fn


# How the row enters the q/k/v/u product (fusion "n"), to find where the kernel loses to a read of
# the same bytes: "lib" the norm's scale from the whole row first, then each step's slice of the
# row scaled, rounded and repeated as 16 rows (`gemv` before call 45; still its form for programs
# that split K); "late" the scale applied to the sums at the end, the sum of squares gathered from
# the same slices in the loop (`gemv`'s form since call 45 where a program sums all of K);
# "rows16" the normalised row prepared by XLA as 16 bf16 rows and loaded as the dot's operand;
# "ones" no row at all (the kernel's weight stream alone).
PROBES = ("lib", "late", "rows16", "ones")
# Tilings of l1 and l2 merged into one [K, 2N] weight, run as the q/k/v/u product ("n"; call 47).
MERGED_TILINGS = (Tiling(64, 128, 1, 4, 5), Tiling(128, 128, 1, 8, 4), Tiling(64, 128, 1, 8, 5),
                  Tiling(32, 256, 1, 4, 4))
# Other tilings of the weight stream alone ("ones").
STREAM_TILINGS = (Tiling(64, 64, 1, 4, 8), Tiling(128, 64, 1, 4, 6), Tiling(32, 256, 1, 4, 4),
                  Tiling(64, 128, 1, 8, 5), Tiling(128, 128, 1, 8, 4), Tiling(64, 256, 1, 4, 3))


def _probe_kernel(x_ref, w_ref, o_ref, *, form, block_k, steps):
    f32 = jnp.float32
    scale = None
    if form == "lib":
        x = x_ref[...].astype(f32)
        scale = lax.rsqrt(jnp.sum(x * x) / x.size + EPS)

    def body(i, carry):
        acc, sq = carry
        ks = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        if form == "rows16":
            a = x_ref[:, ks]
        elif form == "ones":
            a = jnp.ones((16, block_k), w_ref.dtype)
        else:
            row = x_ref[0, ks].astype(f32)
            if form == "late":
                sq = sq + jnp.sum(row * row)
            else:
                row = row * scale
            a = jnp.broadcast_to(row.astype(w_ref.dtype)[None, :], (16, block_k))
        return acc + jnp.dot(a, w_ref[ks, :], preferred_element_type=f32), sq

    acc, sq = lax.fori_loop(0, steps, body, (jnp.zeros((16, o_ref.shape[-1]), f32), jnp.float32(0)))
    y = jnp.max(acc, axis=0)
    if form == "late":
        y = y * lax.rsqrt(sq / (steps * block_k) + EPS)
    o_ref[0, :] = y


def probe_fn(form, tiling, interpret):
    def fn(x, u, r, w, w2):
        k, n = w.shape
        if form == "rows16":
            x = jnp.broadcast_to(srms_norm(x, EPS).astype(w.dtype), (16, k))
        return pl.pallas_call(
            functools.partial(_probe_kernel, form=form, block_k=tiling.block_k,
                              steps=k // tiling.block_k),
            grid=(n // tiling.block_n,),
            in_specs=[pl.BlockSpec(x.shape, lambda j: (0, 0)),
                      pl.BlockSpec((k, tiling.block_n), lambda j: (0, j))],
            out_specs=pl.BlockSpec((1, tiling.block_n), lambda j: (0, j)),
            out_shape=jax.ShapeDtypeStruct((1, n), jnp.float32),
            compiler_params=pl_triton.CompilerParams(num_warps=tiling.num_warps,
                                                     num_stages=tiling.num_stages),
            interpret=interpret, name="probe_" + form)(x, w)
    return fn


def product_operands(k, n):
    """x, u [1, k] and r [1, n] float32, and COPIES pairs of bf16 weights [k, n] ~ N(0, 1/k)."""
    keys = jax.random.split(jax.random.key(k * n), 2 * COPIES + 3)
    x, u = (jax.random.normal(key, (1, k), jnp.float32) for key in keys[:2])
    r = jax.random.normal(keys[2], (1, n), jnp.float32)
    kn = [(jax.random.normal(key, (k, n), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
          for key in keys[3:]]
    return x, u, r, list(zip(kn[::2], kn[1::2]))


def time_product(row, fn, expect, x, u, r, copies, repeats, weight_mb):
    """Checks fn(x, u, r, w, w2) against expect (None: unchecked) to a relative error of 1e-2, then
    fills row from a profile of `repeats` passes over the weight copies: GPU µs a call (us, and
    kernel_us in the products' own kernels, those named *gemv* or *probe*; all of it for XLA), TB/s
    of the weights, kernels a call and the longest kernels."""
    f = jax.jit(fn)
    if expect is not None:
        got = np.asarray(f(x, u, r, *copies[0]))
        row["rel_err"] = float(np.linalg.norm(got - expect) / np.linalg.norm(expect))
        if row["rel_err"] > 1e-2:
            raise ValueError(f"wrong result: relative error {row['rel_err']:.2e}")
    for w, w2 in copies:  # warm-up
        f(x, u, r, w, w2).block_until_ready()
    trace = profiling.gpu_time(lambda: [f(x, u, r, w, w2) for _ in range(repeats) for w, w2 in copies])
    if "error" in trace:
        raise RuntimeError(trace["error"])
    calls = repeats * len(copies)
    us = 1e3 * trace["gpu_ms"] / calls
    own = 1e3 * sum(ms for name, ms in trace["top_kernels_ms"] if "gemv" in name or "probe" in name) / calls
    if not own and not row["variant"].startswith("xla"):
        raise RuntimeError("no gemv or probe kernel in the trace")
    row.update(us=us, kernel_us=own or us, tb_per_s=weight_mb / us,
               kernels_per_product=trace["kernels"] / calls, top=trace["top_kernels_ms"][:4])


def tilings(k, n, fusion, smoke):
    """Candidate tilings for w [k, n]: the library's, then wide column blocks with K split over
    programs (where the GLU's product allows a split)."""
    if smoke:
        return [tiling_for(fusion, k, n), Tiling(32, 64, 1, 4, 3)] + (
            [Tiling(16, 64, 2, 4, 3)] if "2" not in fusion else [])
    splits = (1,) if "2" in fusion else (1, 2, 4, 8, 11, 16, 22)
    out = [tiling_for(fusion, k, n)]
    for block_n, (block_k, stages), split, warps in itertools.product(
            (256, 512), ((32, 4), (64, 3)), splits, (4, 8)):
        programs = n // block_n * split
        if n % block_n or k % (split * block_k) or not 100 <= programs <= 600:
            continue
        out.append(Tiling(block_n, block_k, split, warps, stages))
    return out


def main(argv):
    del argv
    out_dir = Path(os.environ.get("OUT", "bench_out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    products = SMOKE if FLAGS.smoke else PRODUCTS
    repeats = 1 if FLAGS.smoke else FLAGS.repeats
    meta = dict(date=time.strftime("%Y-%m-%d"), device=jax.devices()[0].device_kind,
                jax_version=jax.__version__, command=" ".join(sys.argv))
    print(json.dumps(meta), flush=True)
    rows, start = [], time.perf_counter()
    for product, k, n, fusion in products:
        x, u, r, copies = product_operands(k, n)
        want = np.asarray(reference(fusion, x, u, r, *copies[0]))
        plain = reference("2" if "2" in fusion else "", x, u, r, *copies[0])
        variants = [("xla read", xla_read(fusion), None), ("xla dot", xla_dot(fusion), plain)]
        variants += [(f"pallas {tiling}", pallas_fn(fusion, tiling, FLAGS.smoke), want)
                     for tiling in tilings(k, n, fusion, FLAGS.smoke)]
        if fusion == "n":
            t = tiling_for(fusion, k, n)
            ones = np.asarray(reference("", jnp.ones_like(x), u, r, *copies[0]))
            variants += [(f"probe {form} {t}", probe_fn(form, t, FLAGS.smoke),
                          ones if form == "ones" else want) for form in PROBES]
            variants += [(f"probe ones {t}", probe_fn("ones", t, FLAGS.smoke), ones)
                         for t in ([] if FLAGS.smoke else STREAM_TILINGS)]
        weight_mb = k * n * 2 * (2 if "2" in fusion else 1) / 1e6
        variants = [(name, fn, expect, copies) for name, fn, expect in variants]
        if fusion == "n2":  # l1 and l2 as one [K, 2N] weight: one stream instead of two
            merged = [(jnp.concatenate([w, w2], axis=1), None) for w, w2 in copies]
            both = np.asarray(reference("n", x, u, r, merged[0][0], None))
            variants += [(f"merged n {t}", pallas_fn("n", t, FLAGS.smoke), both, merged)
                         for t in ([Tiling(32, 64, 1, 4, 3)] if FLAGS.smoke else MERGED_TILINGS)]
            variants.append(("merged xla read", xla_read("n"), None, merged))
        for name, fn, expect, copies in variants:
            if time.perf_counter() - start > FLAGS.budget_s and not name.startswith("xla"):
                continue

            run = functools.partial(time_product, fn=fn, expect=expect, x=x, u=u, r=r, copies=copies,
                                    repeats=repeats, weight_mb=weight_mb)
            report.measure(rows, dict(product=product, k=k, n=n, fusion=fusion, weight_mb=weight_mb,
                                      variant=name), run, out_dir / "gemv.json", meta)

    print(f"\n{'product':>8} {'MB':>6} {'read µs':>8} {'xla dot µs':>10} {'best pallas':>72} {'µs':>6}")
    for product, k, n, fusion in products:
        ok = [r for r in rows if r["product"] == product and "us" in r]
        us = {r["variant"]: r["us"] for r in ok}
        best = min((r for r in ok if r["variant"].startswith("pallas")), key=lambda r: r["us"], default=None)
        cell = f"{best['variant'][7:]:>72} {best['us']:>6.2f}" if best else f"{'-':>72} {'-':>6}"
        print(f"{product:>8} {ok[0]['weight_mb'] if ok else 0:>6.1f} {us.get('xla read', float('nan')):>8.2f} "
              f"{us.get('xla dot', float('nan')):>10.2f} {cell}")
    for r in rows:
        if r["variant"].startswith("probe") and "us" in r:
            print(f"{r['variant'][:60]:>60}: {r['us']:.2f} µs ({r['kernel_us']:.2f} in the kernel)")


if __name__ == "__main__":
    app.run(main)
