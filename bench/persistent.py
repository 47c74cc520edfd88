"""Kernel boundaries against a grid-wide barrier inside one Pallas kernel, for a layer's weight streams.

At batch 1 each product of the fused decoding step runs within ~10 % of one kernel reading its
weights, and one kernel reading 8-46 MB pays ~2 µs over the rate of a long read (bench/NOTES.md,
calls 40-42): five kernels a layer cost the 1B ~0.16 ms a token. This measures what one kernel
for several products would save, before building one: the weight streams of a 1B layer's four
products (q/k/v/u [2048, 8192], the output projection [2048, 2048], l1 and l2 as [2048, 11264],
l3 [5632, 2048]), each a dot of a row of ones with the weight tiles (no activations, so no data
flows between the streams), run

- `kernels`: as four kernels of PROGRAMS programs each;
- `barrier`: as one kernel of PROGRAMS programs that wait for each other between the streams: each
  program adds 1 to a counter in HBM (an atomic add with release semantics) and spins until the
  counter reaches PROGRAMS (atomic reads, bounded by MAX_SPIN so that a program that is not
  resident cannot hang the GPU; the number that gave up is reported);
- `barrier+N tiles`: the same, each program loading its first N weight tiles of the next stream
  (into registers) before it waits.

Each stream's (BK x BN) tiles are dealt to the programs in equal contiguous runs (K fastest); every
program writes the column sums of its tiles, and the check is that all of them add up to the
weights' sum. GPU time per layer from a profiler trace.

    python3 bench/persistent.py          # the GPU run (the barrier variants need a GPU)
    python3 bench/persistent.py --smoke  # `kernels` on tiny shapes in interpret mode

Prints a table; writes $OUT/persistent.json (OUT defaults to ./bench_out).
"""
import functools
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import app, flags
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench import profiling, report, timing  # noqa: E402

PROGRAMS = 128
BN, BK = 64, 128
MAX_SPIN = 1 << 20
PREFETCH_TILES = (0, 1, 2, 4)  # tiles of the next stream each program loads before a barrier
STREAMS = (("qkvu", 2048, 8192), ("out", 2048, 2048), ("glu", 2048, 11264), ("l3", 5632, 2048))
SMOKE = (("a", 256, 512), ("b", 256, 256))

flags.DEFINE_bool("smoke", False, "Tiny shapes, interpret mode, the four-kernel variant only.")
flags.DEFINE_integer("repeats", 20, "Layers per timing.")
FLAGS = flags.FLAGS


def _tile(w_ref, t, steps):
    """Tile t of w (K fastest): [BK, BN]."""
    cb, ks = t // steps, t % steps
    return w_ref[pl.ds(pl.multiple_of(ks * BK, BK), BK), pl.ds(pl.multiple_of(cb * BN, BN), BN)]


def _stream(w_ref, out_ref, first=()):
    """This program's run of w's tiles, summed by columns into out [1, BN] (first: its first tiles,
    loaded already)."""
    k, n = w_ref.shape
    steps = k // BK
    per = steps * (n // BN) // PROGRAMS
    start = pl.program_id(0) * per
    ones = jnp.ones((16, BK), w_ref.dtype)
    acc = jnp.zeros((16, BN), jnp.float32)
    for tile in first:
        acc = acc + jnp.dot(ones, tile, preferred_element_type=jnp.float32)
    acc = lax.fori_loop(len(first), per,
                        lambda i, acc: acc + jnp.dot(ones, _tile(w_ref, start + i, steps),
                                                     preferred_element_type=jnp.float32), acc)
    out_ref[...] = jnp.max(acc, axis=0)[None, :]


# The counters' forms tried (call 44): (dtype, width), width None for a 1-D array of counters, else
# a 2-D [slots, width] array whose rows are one counter repeated. Call 43's (int32, None) counted
# nothing on the H200.
FORMS = (("int32", None), ("int32", 16), ("float32", 1), ("float32", 16), ("int32", 1))


def _slot(bar_ref, i):
    """The indexer of counter i and a ones value of its shape."""
    if bar_ref.ndim == 1:
        return (pl.ds(i, 1),), jnp.ones((1,), bar_ref.dtype)
    width = bar_ref.shape[1]
    return (pl.ds(i, 1), pl.ds(0, width)), jnp.ones((1, width), bar_ref.dtype)


def _arrive(bar_ref, i):
    idx, one = _slot(bar_ref, i)
    pl_triton.atomic_add(bar_ref, idx, one)


def _barrier(bar_ref, i, programs):
    """Waits until `programs` programs have arrived at barrier i; bar_ref [barriers + 1, ...] counts
    the arrivals, its last slot the programs that stopped spinning at MAX_SPIN."""
    pl_triton.debug_barrier()  # every thread's loads and stores of this stream are issued
    _arrive(bar_ref, i)
    idx, one = _slot(bar_ref, i)

    def spin(c):
        return jnp.min(pl_triton.atomic_add(bar_ref, idx, 0 * one)).astype(jnp.int32), c[1] + 1

    arrived, _ = lax.while_loop(lambda c: (c[0] < programs) & (c[1] < MAX_SPIN), spin,
                                (jnp.int32(0), jnp.int32(0)))

    @pl.when(arrived < programs)
    def _():
        _arrive(bar_ref, bar_ref.shape[0] - 1)

    pl_triton.debug_barrier()


def counter(form, slots):
    dtype, width = form
    return jnp.zeros((slots,) if width is None else (slots, width), dtype)


def _whole(a):
    return pl.BlockSpec(a.shape, lambda p: (0,) * a.ndim)


def atomics_check(form, programs=PROGRAMS):
    """Each of `programs` programs adds 1 to counter 0 and then waits at barrier 1 (the spin
    bounded by MAX_SPIN): [arrivals at 0, arrivals at 1, programs that gave up] (want programs,
    programs, 0)."""
    def kernel(bar_in, bar_ref):
        del bar_in
        _arrive(bar_ref, 0)
        _barrier(bar_ref, 1, programs)

    bar = counter(form, 3)
    out = pl.pallas_call(kernel, grid=(programs,), in_specs=[_whole(bar)], out_specs=_whole(bar),
                         out_shape=jax.ShapeDtypeStruct(bar.shape, bar.dtype),
                         input_output_aliases={0: 0}, name="atomics_check")(bar)
    return [int(v) for v in jnp.min(out.reshape(3, -1), axis=1)]


def _one_kernel(*refs, n: int, prefetch: int):
    ws, outs, bar_ref = refs[:n], refs[n + 1:2 * n + 1], refs[2 * n + 1]
    first = ()
    for i, (w_ref, out_ref) in enumerate(zip(ws, outs)):
        _stream(w_ref, out_ref, first)
        if i + 1 < n:
            nxt = ws[i + 1]
            steps = nxt.shape[0] // BK
            per = steps * (nxt.shape[1] // BN) // PROGRAMS
            first = tuple(_tile(nxt, pl.program_id(0) * per + t, steps) for t in range(prefetch))
            _barrier(bar_ref, i, PROGRAMS)


def _out_spec():
    return pl.BlockSpec((None, 1, BN), lambda p: (p, 0, 0))


def kernels(ws, interpret):
    """Each stream its own kernel: [programs, 1, BN] column sums per stream."""
    return [pl.pallas_call(
        lambda w_ref, o_ref: _stream(w_ref, o_ref), grid=(PROGRAMS,),
        in_specs=[pl.BlockSpec(w.shape, lambda p: (0, 0))], out_specs=_out_spec(),
        out_shape=jax.ShapeDtypeStruct((PROGRAMS, 1, BN), jnp.float32),
        compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=4),
        interpret=interpret, name="stream")(w) for w in ws]


def one_kernel(ws, prefetch, form):
    """All streams in one kernel with a grid-wide barrier between them: (sums, counters [n]: the
    arrivals at each of the n - 1 barriers, then the programs that gave up spinning)."""
    n = len(ws)
    bar = counter(form, n)
    outs = pl.pallas_call(
        functools.partial(_one_kernel, n=n, prefetch=prefetch), grid=(PROGRAMS,),
        in_specs=[pl.BlockSpec(w.shape, lambda p: (0, 0)) for w in ws] + [_whole(bar)],
        out_specs=[_out_spec() for _ in ws] + [_whole(bar)],
        out_shape=[jax.ShapeDtypeStruct((PROGRAMS, 1, BN), jnp.float32) for _ in ws]
        + [jax.ShapeDtypeStruct(bar.shape, bar.dtype)],
        input_output_aliases={n: n},
        compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=4),
        name="streams_barrier")(*ws, bar)
    return outs[:n], jnp.min(outs[n].reshape(n, -1), axis=1)


def main(argv):
    del argv
    out_dir = Path(os.environ.get("OUT", "bench_out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    global PROGRAMS
    streams = SMOKE if FLAGS.smoke else STREAMS
    if FLAGS.smoke:
        PROGRAMS = 4
    meta = dict(date=time.strftime("%Y-%m-%d"), device=jax.devices()[0].device_kind,
                jax_version=jax.__version__, programs=PROGRAMS, command=" ".join(sys.argv))
    print(json.dumps(meta), flush=True)
    keys = jax.random.split(jax.random.key(0), 2 * len(streams))
    layers = [[jax.random.normal(keys[c * len(streams) + i], (k, n), jnp.float32).astype(jnp.bfloat16)
               for i, (_, k, n) in enumerate(streams)] for c in range(2)]
    want = [float(jnp.sum(w.astype(jnp.float32))) for w in layers[0]]
    total_mb = sum(k * n * 2 for _, k, n in streams) / 1e6
    variants = [("kernels", jax.jit(lambda ws: (kernels(ws, FLAGS.smoke), None)))]
    rows, form = [], None
    if not FLAGS.smoke:
        for f in FORMS:
            try:
                counts = atomics_check(f)
            except Exception as e:  # noqa: BLE001 - a form that does not compile is a result
                counts = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            report.record(rows, dict(variant=f"atomics {f}", counts=str(counts)),
                          out_dir / "persistent.json", meta)
            if form is None and counts == [PROGRAMS, PROGRAMS, 0]:
                form = f
    if form is not None:
        variants += [(f"barrier+{t} tiles {form}" if t else f"barrier {form}",
                      jax.jit(functools.partial(one_kernel, prefetch=t, form=form)))
                     for t in PREFETCH_TILES]
    path = out_dir / "persistent.json"
    for name, fn in variants:
        def run(row, fn=fn):
            sums, bar = fn(layers[0])
            got = [float(jnp.sum(s)) for s in sums]  # column sums of ones x tiles: one row each
            row["rel_err"] = max(abs(g - w) / max(abs(w), 1.0) for g, w in zip(got, want))
            if bar is not None:
                row["barrier_counts"] = [int(b) for b in bar[:-1]]
                row["gave_up"] = int(bar[-1])
            if row["rel_err"] > 1e-3:
                raise ValueError(f"wrong sums: {got} against {want}")
            row["wall_us_per_layer"] = 1e3 * timing.time_ms(lambda ws: fn(ws)[0], [(w,) for w in layers])
            trace = profiling.gpu_time(lambda: [fn(layers[r % 2]) for r in range(FLAGS.repeats)])
            row.update(profiling.per_call(trace, FLAGS.repeats, "layer"))
            if "gpu_us_per_layer" in row:
                row["tb_per_s"] = total_mb / row["gpu_us_per_layer"]

        report.measure(rows, dict(variant=name, weight_mb=total_mb), run, path, meta)
    report.table(rows, [("variant", "variant", ">30"), ("counts", "counts", ">15"),
                        ("MB", "weight_mb", ">7.1f"), ("GPU µs/layer", "gpu_us_per_layer", ">13.2f"),
                        ("TB/s", "tb_per_s", ">6.2f"), ("wall µs/layer", "wall_us_per_layer", ">14.2f"),
                        ("kernels", "kernels_per_layer", ">8.1f")])

if __name__ == "__main__":
    app.run(main)
