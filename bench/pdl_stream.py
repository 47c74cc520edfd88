"""A layer's weight streams as Mosaic GPU kernels (TMA pipelines), with and without Programmatic
Dependent Launch (against the Pallas Triton kernels of bench/persistent.py: 34.3-34.9 µs a layer
on an H200).

Kernel boundaries and grid-wide barriers both drain the weight stream between the products of the
fused decoding step (bench/NOTES.md, calls 41-49). Pallas's Mosaic GPU backend streams tiles into
shared memory with TMA copies and exposes PDL (`plgpu.griddepcontrol_launch_dependents` and
`griddepcontrol_wait`): a kernel launched early could have its first weight copies in flight
before it waits for its predecessor, since weights do not depend on activations. This measures,
for the 1B layer's four weight streams of bench/persistent.py, each kernel reading (BK x BN) tiles
of its weight through `plgpu.emit_pipeline` and summing the first 8 rows of each tile (the copies
bring the whole tile; the sums check the tiles' addresses), chained by data dependence:

- `mosaic kernels`: four Mosaic GPU kernels;
- `mosaic kernels + PDL`: the same, each signalling its dependents at its start and waiting for its
  predecessor only at its first tile (after its first copies are issued).

Needs a GPU with Mosaic GPU (Hopper); there is no CPU mode. GPU time per layer from a profiler
trace of LAYERS chained layers in one program: busy (the kernels' durations) and span (first
start to last end: the timeline, where kernels that overlap count once).

    python3 bench/pdl_stream.py

Prints a table; writes $OUT/pdl_stream.json (OUT defaults to ./bench_out).
"""
import functools
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench import profiling, report, timing  # noqa: E402

BK, BN, ROWS, STAGES = 64, 128, 8, 4
# (name, K, N, K splits): about 128 blocks each.
STREAMS = (("qkvu", 2048, 8192, 2), ("out", 2048, 2048, 8), ("glu", 2048, 11264, 2),
           ("l3", 5632, 2048, 8))



def mosaic_stream(w, dep, split, pdl):
    """Sums of the first ROWS rows of each of w's tiles: [split, N / BN, ROWS, BN] f32. dep: the
    previous kernel's output (orders the kernels; read by none)."""
    k, n = w.shape
    steps = k // split // BK

    def body(dep_ref, w_ref, o_ref):
        del dep_ref
        j, s = lax.axis_index("n"), lax.axis_index("s")
        if pdl:
            plgpu.griddepcontrol_launch_dependents()

        def step(idx, w_smem, acc):
            if pdl:
                @pl.when(idx[0] == 0)
                def _():
                    plgpu.griddepcontrol_wait()
            return acc + w_smem[pl.ds(0, ROWS), :].astype(jnp.float32)

        acc = plgpu.emit_pipeline(
            step, grid=(steps,),
            in_specs=[plgpu.BlockSpec((BK, BN), lambda i: (s * steps + i, j))],
            max_concurrent_steps=STAGES, init_carry=jnp.zeros((ROWS, BN), jnp.float32))(w_ref)
        o_ref[s, j] = acc

    return plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((split, n // BN, ROWS, BN), jnp.float32),
        grid=(n // BN, split), grid_names=("n", "s"))(dep, w)


def mosaic_layer(ws, pdl, dep=None):
    dep, outs = jnp.zeros((8,), jnp.float32) if dep is None else dep, []
    for w, (_, _, _, split) in zip(ws, STREAMS):
        dep = mosaic_stream(w, dep, split, pdl)
        outs.append(dep)
    return outs


LAYERS = 8  # layers a timed call runs, alternating two weight copies


def stack(layer):
    """LAYERS layers in one program, each starting after the previous one's last kernel, so that
    the wall time per layer is the GPU's timeline, launch gaps and overlaps included."""
    def fn(ws0, ws1):
        dep, outs = None, []
        for i in range(LAYERS):
            outs += layer(ws1 if i % 2 else ws0, dep=dep)
            dep = outs[-1]
        return outs  # all of them: an output left unused would let XLA drop its kernel
    return fn


def want_sums(w, split):
    k, n = w.shape
    t = np.asarray(w.astype(jnp.float32)).reshape(split, k // split // BK, BK, n // BN, BN)
    return t[:, :, :ROWS].sum(axis=1).transpose(0, 2, 1, 3)  # [split, N / BN, ROWS, BN]


def main(argv):
    del argv
    out_dir = Path(os.environ.get("OUT", "bench_out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(date=time.strftime("%Y-%m-%d"), device=jax.devices()[0].device_kind,
                jax_version=jax.__version__, command=" ".join(sys.argv))
    print(json.dumps(meta), flush=True)
    keys = jax.random.split(jax.random.key(0), 2 * len(STREAMS))
    layers = [[jax.random.normal(keys[c * len(STREAMS) + i], (k, n), jnp.float32).astype(jnp.bfloat16)
               for i, (_, k, n, _) in enumerate(STREAMS)] for c in range(2)]
    total_mb = sum(k * n * 2 for _, k, n, _ in STREAMS) / 1e6
    # (bench/persistent.py's Triton kernels are not chained here: without a dependence between
    # layers XLA merges the identical layers, call 51.)
    variants = [("mosaic kernels", functools.partial(mosaic_layer, pdl=False)),
                ("mosaic kernels + PDL", functools.partial(mosaic_layer, pdl=True))]
    rows = []
    for name, layer in variants:
        def run(row, layer=layer):
            fn, chain = jax.jit(layer), jax.jit(stack(layer))
            outs = fn(layers[0])
            row["max_err"] = max(float(np.max(np.abs(np.asarray(o) - want_sums(w, split))))
                                 for o, w, (_, _, _, split) in zip(outs, layers[0], STREAMS))
            if row["max_err"] > 1e-2:
                raise ValueError(f"wrong sums: max error {row['max_err']:.3g}")
            row["wall_us_per_layer"] = 1e3 * timing.time_ms(chain, [tuple(layers)]) / LAYERS
            trace = profiling.gpu_time(lambda: chain(*layers))
            row.update(profiling.per_call(trace, LAYERS, "layer"), top_kernels_ms=trace.get("top_kernels_ms"))

        report.measure(rows, dict(variant=name, weight_mb=total_mb), run, out_dir / "pdl_stream.json", meta)
    report.table(rows, [("variant", "variant", ">22"), ("MB", "weight_mb", ">7.1f"),
                        ("GPU µs/layer", "gpu_us_per_layer", ">13.2f"),
                        ("span µs/layer", "span_us_per_layer", ">14.2f"),
                        ("wall µs/layer", "wall_us_per_layer", ">14.2f")])

if __name__ == "__main__":
    app.run(main)
