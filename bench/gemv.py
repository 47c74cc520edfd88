"""Matrix-vector products of a decoding step: XLA's against Pallas kernels, in bytes per second.

A decoding step at batch 1 reads every weight once, so its matrix products run at the speed at
which they stream their weights from HBM. This measures the products of the 1B config's layers
(x [batch, K] @ W [K, N], bf16 weights, float32 accumulation) as XLA compiles them and as Pallas
Triton kernels with several tilings: each program owns `block_n` output columns (and, with
`split` > 1, one of `split` slices of K, summed afterwards) and walks K in `block_k` steps.
Eight weight copies of each shape are cycled so that no product finds its weight in L2 (50 MB).

    python3 bench/gemv.py                 # the H100 run
    python3 bench/gemv.py --smoke         # a tiny shape in interpret mode: checks the logic on a CPU

Prints one line per variant (GPU µs per product from a profiler trace, TB/s of weight bytes) and a
table of the best per shape last; writes $OUT/gemv.json (OUT defaults to ./bench_out).
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

from bench import profiling  # noqa: E402

# (name, K, N) of the 1B config: the fused q/k/v/u projection, the output projection, the GLU's
# input and output projections, and the tied head.
SHAPES = (("qkvu", 2048, 8192), ("out", 2048, 2048), ("glu_in", 2048, 5632), ("glu_out", 5632, 2048),
          ("head", 2048, 64000))
COPIES = 8

flags.DEFINE_integer("batch", 1, "Rows of x (padded to 16 for the dot kernels).")
flags.DEFINE_integer("repeats", 10, "Passes over the weight copies per timing.")
flags.DEFINE_integer("budget_s", 200, "Stop trying new variants after this many seconds.")
flags.DEFINE_bool("smoke", False, "One tiny shape, interpret mode, two variants.")
FLAGS = flags.FLAGS


def _kernel(x_ref, w_ref, o_ref, *, block_k: int, steps: int, dot: bool):
    """x [M, K/split]; w [K/split, block_n]; o [M, block_n] f32 (this split's partial sum)."""
    f32 = jnp.float32

    def body(i, acc):
        ks = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        x, w = x_ref[:, ks], w_ref[ks, :]
        if dot:
            return acc + jnp.dot(x, w, preferred_element_type=f32)
        return acc + jnp.sum(x.astype(f32)[0][:, None] * w.astype(f32), axis=0)[None]

    o_ref[...] = lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, f32))


def pallas_gemv(x, w, *, block_n: int, block_k: int, split: int, num_warps: int, num_stages: int,
                dot: bool, interpret: bool = False):
    """x [M, K] @ w [K, N] -> [M, N] f32; M padded to 16 for the dot form (Triton's smallest)."""
    m, k = x.shape
    n = w.shape[1]
    rows = max(16, m) if dot else m
    xp = jnp.pad(x, ((0, rows - m), (0, 0)))
    ks = k // split
    out = pl.pallas_call(
        functools.partial(_kernel, block_k=block_k, steps=ks // block_k, dot=dot),
        grid=(n // block_n, split),
        in_specs=[pl.BlockSpec((rows, ks), lambda j, s: (0, s)),
                  pl.BlockSpec((ks, block_n), lambda j, s: (s, j))],
        out_specs=pl.BlockSpec((None, rows, block_n), lambda j, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((split, rows, n), jnp.float32),
        compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="gemv",
    )(xp, w)
    return jnp.sum(out, axis=0)[:m]


def xla_gemv(x, w):
    return jnp.dot(x, w, preferred_element_type=jnp.float32)


def variants(k, n, smoke):
    yield "xla", xla_gemv
    grid = ([(32, 64, 1, 4, 1, False), (32, 64, 2, 4, 1, True)] if smoke else
            itertools.product((64, 128), (128, 256), (1, 2, 4), (4,), (4,), (True, False)))
    for block_n, block_k, split, warps, stages, dot in grid:
        if n % block_n or k % (split * block_k):
            continue
        if not smoke and n // block_n * split > 8 * 132:  # more than 8 waves of programs: skip
            continue
        name = f"pallas {'dot16' if dot else 'fma'} n{block_n} k{block_k} s{split} w{warps} st{stages}"
        yield name, functools.partial(pallas_gemv, block_n=block_n, block_k=block_k, split=split,
                                      num_warps=warps, num_stages=stages, dot=dot,
                                      interpret=smoke)


def main(argv):
    del argv
    out_dir = Path(os.environ.get("OUT", "bench_out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    shapes = (("tiny", 128, 64),) if FLAGS.smoke else SHAPES
    repeats = 1 if FLAGS.smoke else FLAGS.repeats
    meta = dict(date=time.strftime("%Y-%m-%d"), device=jax.devices()[0].device_kind,
                jax_version=jax.__version__, batch=FLAGS.batch, command=" ".join(sys.argv))
    print(json.dumps(meta))
    rows, start = [], time.perf_counter()
    for shape, k, n in shapes:
        keys = jax.random.split(jax.random.key(k * n), COPIES + 1)
        x = jax.random.normal(keys[0], (FLAGS.batch, k), jnp.float32).astype(jnp.bfloat16)
        weights = [(jax.random.normal(key, (k, n), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
                   for key in keys[1:]]
        want = np.asarray(jnp.dot(x.astype(jnp.float32), weights[0].astype(jnp.float32),
                                  precision=lax.Precision.HIGHEST))
        for name, fn in variants(k, n, FLAGS.smoke):
            if time.perf_counter() - start > FLAGS.budget_s and name != "xla":
                continue
            row = dict(shape=shape, k=k, n=n, variant=name)
            try:
                f = jax.jit(fn)
                got = np.asarray(f(x, weights[0]))
                row["rel_err"] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
                if row["rel_err"] > 1e-2:
                    raise ValueError(f"wrong result: relative error {row['rel_err']:.2e}")
                for w in weights:  # warm-up
                    f(x, w).block_until_ready()
                trace = profiling.gpu_time(lambda: [f(x, w) for _ in range(repeats) for w in weights])
                if "error" in trace:
                    raise RuntimeError(trace["error"])
                us = 1e3 * trace["gpu_ms"] / (repeats * COPIES)
                row.update(us=us, tb_per_s=k * n * 2 / us / 1e6,
                           kernels_per_product=trace["kernels"] / (repeats * COPIES))
            except Exception as e:  # noqa: BLE001 - a tiling that does not compile is a result too
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
            (out_dir / "gemv.json").write_text(json.dumps(dict(meta, results=rows), indent=1))
    print(f"\n{'shape':>8} {'MB':>6} {'xla µs':>8} {'xla TB/s':>9} {'best pallas':>44} {'µs':>7} {'TB/s':>6}")
    for shape, k, n in shapes:
        ok = [r for r in rows if r["shape"] == shape and "us" in r]
        xla = next((r for r in ok if r["variant"] == "xla"), None)
        best = min((r for r in ok if r["variant"] != "xla"), key=lambda r: r["us"], default=None)
        if xla is None or best is None:
            print(f"{shape:>8}  incomplete")
            continue
        print(f"{shape:>8} {k * n * 2 / 1e6:>6.1f} {xla['us']:>8.1f} {xla['tb_per_s']:>9.2f} "
              f"{best['variant']:>44} {best['us']:>7.1f} {best['tb_per_s']:>6.2f}")


if __name__ == "__main__":
    app.run(main)
