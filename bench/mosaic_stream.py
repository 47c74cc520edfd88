"""A layer's weight streams as Mosaic GPU kernels (TMA copies into shared memory): as four kernels,
with and without Programmatic Dependent Launch, and as one persistent kernel whose copy ring runs
on across the products (against the Pallas Triton kernels of bench/persistent.py: 34.3-34.9 µs a
layer on an H200).

Kernel boundaries and grid-wide barriers both drain the weight stream between the products of the
fused decoding step (bench/NOTES.md, calls 41-51). Weights do not depend on activations, so a
kernel could keep copying the next product's weights while it waits for the current product's
output. This measures, for the 1B layer's four weight streams of bench/persistent.py, each stream
read as (BK x BN) tiles and the first `rows` rows of each tile summed (the copies bring the whole
tile; the sums check the tiles' addresses):

- `kernels`: four kernels, each a `plgpu.emit_pipeline` over its grid's tiles, chained by data
  dependence; `kernels_pdl`: the same, each signalling its dependents at its start and waiting for
  its predecessor only at its first tile (after its first copies are issued);
- `ringS`: one kernel of one block per SM. Each block's tiles of all four streams form one
  sequence (each stream's tiles dealt to the blocks in equal contiguous runs), copied through a
  ring of S shared-memory slots: the copy of tile g + S is issued as tile g is consumed, so at a
  product's end the next product's first S tiles are already in flight. Between products every
  block signals a GMEM semaphore and waits until all blocks have (a grid-wide barrier, as the
  decoding step needs: the next product's row is the whole previous output); `ringS_nobarrier`
  leaves the barriers out (the floor: one stream); `ringS_rows64` sums whole tiles (the register
  work of a product's multiply-adds);
- `wsS[_dynC]`: the same, warp-specialised: a producer warpgroup issues the copies and a consumer
  warpgroup sums and waits at the barriers; with dynC each stream's tiles go out in runs of C from
  a GMEM counter to whichever block's producer asks next, instead of equal contiguous shares
  (`--profile`: each block's waits for its slots and at the barriers, from Mosaic GPU's profiler).

Needs a GPU with Mosaic GPU (Hopper); there is no CPU mode. GPU time per layer from a profiler
trace of LAYERS chained layers in one program: busy (the kernels' durations) and span (first
start to last end: the timeline, where kernels that overlap count once).

    python3 bench/mosaic_stream.py [--variants=kernels,ring8,ws8_dyn2] [--profile]

Prints a table; writes $OUT/mosaic_stream.json (OUT defaults to ./bench_out).
"""
import functools
import json
import os
import re
import sys
import tempfile
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

from bench import profiling, report, timing  # noqa: E402

BK, BN, ROWS, STAGES = 64, 128, 8, 4
# (name, K, N, K splits of the four-kernel form): about 128 blocks each.
STREAMS = (("qkvu", 2048, 8192, 2), ("out", 2048, 2048, 8), ("glu", 2048, 11264, 2),
           ("l3", 5632, 2048, 8))
VARIANTS = ("kernels", "kernels_pdl", "ring4", "ring8", "ring12", "ring8_nobarrier", "ring8_rows64",
            "ws8", "ws8_dyn1", "ws8_dyn2", "ws8_dyn4", "ws8_dyn2_rows64", "ws4_dyn2", "ws12_dyn2",
            "ws8_dyn2_nobarrier")

flags.DEFINE_list("variants", list(VARIANTS), f"Which of {VARIANTS} to run.")
flags.DEFINE_bool("profile", False, "Also profile each ring variant's blocks (Mosaic GPU's profiler).")
FLAGS = flags.FLAGS


def _zeros(rows):
    """Zero sums in the layout that the loads of bf16 tile rows give them (a loop's carry keeps
    one layout; jax 0.10 does not infer it from the zeros)."""
    return plgpu.layout_cast(jnp.zeros((rows, BN), jnp.float32),
                             plgpu.Layout.WG_STRIDED((rows, BN), vec_size=4))


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
            max_concurrent_steps=STAGES, init_carry=_zeros(ROWS))(w_ref)
        o_ref[s, j] = acc

    return plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((split, n // BN, ROWS, BN), jnp.float32),
        grid=(n // BN, split), grid_names=("n", "s"))(dep, w)


def kernels_layer(ws, dep, pdl):
    dep, outs = jnp.zeros((8,), jnp.float32) if dep is None else dep, []
    for w, (_, _, _, split) in zip(ws, STREAMS):
        dep = mosaic_stream(w, dep, split, pdl)
        outs.append(dep)
    return outs


def _blocks():
    return jax.devices()[0].core_count  # one block per SM: all resident, so the barrier cannot hang


def _stream_tiles(k, n, split):
    """(steps, column tiles, tiles) of a stream whose tile t is unit t // steps = s * ncol + j
    (K split s, column tile j), K step t % steps."""
    steps, ncol = k // split // BK, n // BN
    return steps, ncol, ncol * split * steps


def _tile(w_ref, plan, t):
    """Tile t of a stream (`_stream_tiles` order) as a GMEM slice of w: [BK, BN]."""
    steps, ncol, _ = plan
    unit, i = t // steps, t % steps
    s, j = unit // ncol, unit % ncol
    return w_ref.at[pl.ds((s * steps + i) * BK, BK), pl.ds(j * BN, BN)]


def _profiled(profile_dir, space):
    """Compiler params that have Mosaic GPU's profiler write `space` events a warpgroup to
    profile_dir, or None without one."""
    return plgpu.CompilerParams(profile_space=space, profile_dir=profile_dir) if profile_dir else None


def ring_layer(ws, dep, stages, barrier, rows, profile_dir=None):
    """One persistent kernel over the four streams: [blocks, 4, rows, BN] f32, each block's sums of
    the first `rows` rows of its tiles of each stream. With profile_dir, Mosaic GPU's profiler
    writes each block's times of its streams ("p0".."p3") and barrier waits ("w0".."w2") there."""
    blocks = _blocks()
    plans = [_stream_tiles(k, n, split) for _, k, n, split in STREAMS]

    def body(dep_ref, *refs):
        del dep_ref
        w_refs, o_ref, smem, bars = refs[:4], refs[4], refs[5], refs[6]
        b = lax.axis_index("b")
        lo = [b * t // blocks for _, _, t in plans]
        count = [(b + 1) * t // blocks - l for (_, _, t), l in zip(plans, lo)]
        start = [jnp.int32(0)]
        for c in count:
            start.append(start[-1] + c)
        total = start[-1]
        sem = pl.get_global(plgpu.SemaphoreType.REGULAR) if barrier else None

        def fetch(g, slot):
            """Issues the copy of the block's tile g (of whichever stream it falls in) into slot."""
            for p, (plan, w_ref) in enumerate(zip(plans, w_refs)):
                @pl.when((g >= start[p]) & (g < start[p + 1]))
                def _():
                    plgpu.copy_gmem_to_smem(_tile(w_ref, plan, lo[p] + g - start[p]),
                                            smem.at[slot], bars.at[slot])

        for g in range(stages):
            @pl.when(g < total)
            def _():
                fetch(jnp.int32(g), g)

        def step(g, acc):
            slot = g % stages
            plgpu.barrier_wait(bars.at[slot])
            acc = acc + smem[slot, pl.ds(0, rows), :].astype(jnp.float32)

            @pl.when(g + stages < total)
            def _():
                fetch(g + stages, slot)
            return acc

        for p in range(len(plans)):
            with jax.named_scope(f"p{p}"):
                o_ref[b, p] = lax.fori_loop(start[p], start[p + 1], step, _zeros(rows))
            if barrier and p + 1 < len(plans):
                with jax.named_scope(f"w{p}"):
                    plgpu.semaphore_signal(sem, 1, memory_scope="gpu")
                    plgpu.semaphore_wait(sem, blocks * (p + 1), decrement=False, memory_scope="gpu")

    dep = jnp.zeros((8,), jnp.float32) if dep is None else dep
    out = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((blocks, len(plans), rows, BN), jnp.float32),
        grid=(blocks,), grid_names=("b",), compiler_params=_profiled(profile_dir, 64),
        scratch_types=[plgpu.SMEM((stages, BK, BN), jnp.bfloat16),
                       plgpu.Barrier(num_barriers=stages)])(dep, *ws)
    return [out]


ID_STRIDE = 1 << 20  # a ring slot's id: stream * ID_STRIDE + tile; NSTREAMS * ID_STRIDE ends the run


@functools.cache
def _take_chunk():
    """An atomic fetch-and-add of 1 on a GMEM counter by one thread of the warpgroup, its old value
    given to all 128 threads through `cell` (an SMEM word). Pallas's own atomics return nothing."""
    from jax._src.lib.mlir import ir  # noqa: PLC0415 - only where Mosaic GPU lowers
    from jax._src.lib.mlir.dialects import llvm, memref
    from jax.experimental.mosaic import gpu as mgpu

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType()),
                       return_type=plgpu.ShapeDtypeStruct((), jnp.int32, layout=plgpu.Layout.WG_SPLAT(())))
    def take(ctx, counter, cell):
        del ctx
        i32, index = ir.IntegerType.get_signless(32), ir.IndexType.get()
        zero = mgpu.utils.c(0, index)
        with mgpu.utils.single_thread(scope=mgpu.utils.ThreadSubset.WARPGROUP):
            old = llvm.inline_asm(i32, [mgpu.utils.memref_ptr(counter)],
                                  "atom.relaxed.gpu.global.add.u32 $0, [$1], 1;", "=r,l",
                                  has_side_effects=True)
            memref.store(old, cell, [zero])
        mgpu.utils.warpgroup_barrier()
        old = memref.load(cell, [zero])
        mgpu.utils.warpgroup_barrier()  # all have read it before the next take writes the cell
        return mgpu.FragmentedArray.splat(old, (), layout=mgpu.WGSplatFragLayout(()), is_signed=True)

    return take


def ws_layer(ws, dep, stages, chunk, rows, barrier=True, profile_dir=None):
    """As `ring_layer`, with the copies issued by a producer warpgroup and the sums and barriers
    done by a consumer warpgroup, so that the thread that waits at the grid barrier has no copies
    of its own in flight. chunk 0: each stream's tiles dealt to the blocks in equal contiguous runs;
    chunk C: runs of C tiles taken from a per-stream GMEM counter by whichever block's producer
    asks next (blocks that stream faster take more). The producer writes each slot's id (stream and
    tile) next to it; a slot of the next stream (or the end mark) tells the consumer that its
    stream ended. With profile_dir, the profile has the consumer's waits for each slot ("full")
    and at each barrier ("wait")."""
    blocks, nstreams = _blocks(), len(STREAMS)
    plans = [_stream_tiles(k, n, split) for _, k, n, split in STREAMS]

    def body(dep_ref, *refs):
        del dep_ref
        w_refs, o_ref, smem, full, empty, ids, cell = refs[:4], *refs[4:]
        b, wg = lax.axis_index("b"), lax.axis_index("wg")
        sem = pl.get_global(plgpu.SemaphoreType.REGULAR)
        counters = [pl.get_global(plgpu.SemaphoreType.REGULAR) for _ in plans] if chunk else None

        def issue(g, p, t):
            """Copies tile t of stream p into slot g % stages (once the consumer freed it)."""
            slot = g % stages

            @pl.when(g >= stages)
            def _():
                plgpu.barrier_wait(empty.at[slot])
            ids[slot] = p * ID_STRIDE + t
            plgpu.copy_gmem_to_smem(_tile(w_refs[p], plans[p], t), smem.at[slot], full.at[slot])

        @pl.when(wg == 0)
        def _producer():
            g = jnp.int32(0)
            for p, (_, _, total) in enumerate(plans):
                if chunk:
                    def more(c, total=total):
                        return c[1] * chunk < total

                    def run(c, p=p, total=total):
                        g, ticket = c
                        for k in range(chunk):
                            @pl.when(ticket * chunk + k < total)
                            def _():
                                issue(g + k, p, ticket * chunk + k)
                        g = g + jnp.minimum(chunk, total - ticket * chunk)
                        return g, _take_chunk()(counters[p], cell)

                    g, _ = lax.while_loop(more, run, (g, _take_chunk()(counters[p], cell)))
                else:
                    lo = b * total // blocks
                    count = (b + 1) * total // blocks - lo
                    def one(k, g, p=p, lo=lo):
                        issue(g, p, lo + k)
                        return g + 1

                    g = lax.fori_loop(0, count, one, g)
            slot = g % stages  # the end mark

            @pl.when(g >= stages)
            def _():
                plgpu.barrier_wait(empty.at[slot])
            ids[slot] = nstreams * ID_STRIDE
            plgpu.barrier_arrive(full.at[slot])

        @pl.when(wg == 1)
        def _consumer():
            def running(c):
                return c[1] < nstreams

            def step(c):
                g, p, acc = c
                slot = g % stages
                with jax.named_scope("full"):
                    plgpu.barrier_wait(full.at[slot])
                q = ids[slot] // ID_STRIDE  # this slot's stream: past p, p (and any empty ones) ended

                def end(r, c):
                    p, acc = c
                    o_ref[b, r] = acc

                    @pl.when(r + 1 < nstreams if barrier else False)
                    def _():
                        with jax.named_scope("wait"):
                            plgpu.semaphore_signal(sem, 1, memory_scope="gpu")
                            plgpu.semaphore_wait(sem, blocks * (r + 1), decrement=False,
                                                 memory_scope="gpu")
                    return p + 1, _zeros(rows)

                p, acc = lax.fori_loop(p, q, end, (p, acc))
                acc = acc + smem[slot, pl.ds(0, rows), :].astype(jnp.float32)  # the end mark's slot adds junk to nothing kept
                plgpu.barrier_arrive(empty.at[slot])
                return g + 1, p, acc

            lax.while_loop(running, step, (jnp.int32(0), jnp.int32(0), _zeros(rows)))

    dep = jnp.zeros((8,), jnp.float32) if dep is None else dep
    out = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((blocks, nstreams, rows, BN), jnp.float32),
        grid=(blocks,), grid_names=("b",), num_threads=2, thread_name="wg",
        compiler_params=_profiled(profile_dir, 512),
        scratch_types=[plgpu.SMEM((stages, BK, BN), jnp.bfloat16),
                       plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
                       plgpu.SMEM((stages,), jnp.int32), plgpu.SMEM((1,), jnp.int32)])(dep, *ws)
    return [out]


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


def _tiles(w, split):
    """w's tiles in the order of `_stream_tiles`: [T, BK, BN] f32."""
    k, n = w.shape
    steps, ncol, _ = _stream_tiles(k, n, split)
    t = np.asarray(w.astype(jnp.float32)).reshape(split, steps, BK, ncol, BN)
    return t.transpose(0, 3, 1, 2, 4).reshape(-1, BK, BN)


def want_kernels(ws):
    outs = []
    for w, (_, k, n, split) in zip(ws, STREAMS):
        t = _tiles(w, split)[:, :ROWS].reshape(split, n // BN, k // split // BK, ROWS, BN)
        outs.append(t.sum(axis=2))  # [split, N / BN, ROWS, BN]
    return outs


def want_ring(ws, rows):
    blocks, per_stream = _blocks(), []
    for w, (_, _, _, split) in zip(ws, STREAMS):
        t = _tiles(w, split)[:, :rows]
        cuts = [b * len(t) // blocks for b in range(blocks + 1)]
        per_stream.append(np.stack([t[a:z].sum(axis=0) for a, z in zip(cuts, cuts[1:])]))
    return [np.stack(per_stream, axis=1)]  # [blocks, 4, rows, BN]


SM_GHZ = 1.98  # the H200's SM clock under load (nvidia-smi, call 52): the profiler counts cycles


def block_times(trace_path):
    """Per named scope of a Mosaic GPU profile, µs: each occurrence's mean, min and max duration,
    the spread of its end times across the blocks (the last end minus the first), and the sum
    over a warpgroup's occurrences (mean, min and max over the warpgroups that have it)."""
    events = json.loads(Path(trace_path).read_text())["traceEvents"]
    by_tid, scopes = {}, {}
    for e in events:
        by_tid.setdefault(e["tid"], []).append(e)
    for tid, evs in by_tid.items():
        # The dump gives a block's first event the block's globaltimer start (ns) and later ones
        # that start plus clock cycles since the first: back to ns here.
        ts0, opened = evs[0]["ts"], {}
        for e in evs:
            ns = ts0 * 1e3 + (e["ts"] - ts0) * 1e3 / SM_GHZ
            if e["ph"] == "B":
                opened[e["name"]] = ns
            else:
                scopes.setdefault(e["name"], []).append((tid, ns - opened.pop(e["name"]), ns))
    out = {}
    for name, spans in sorted(scopes.items()):
        dur, end = np.array([d for _, d, _ in spans]) / 1e3, np.array([t for _, _, t in spans]) / 1e3
        totals = {}
        for tid, d, _ in spans:
            totals[tid] = totals.get(tid, 0.0) + d / 1e3
        tot = np.array(list(totals.values()))
        out[name] = {k: round(float(v), 3) for k, v in dict(
            mean=dur.mean(), min=dur.min(), max=dur.max(), end_spread=np.ptp(end),
            total_mean=tot.mean(), total_min=tot.min(), total_max=tot.max()).items()}
        out[name]["count"] = len(spans)
    return out


def want_totals(ws, rows):
    """The sums over the blocks of `want_ring`: what every dealing of the tiles gives."""
    return [np.stack([_tiles(w, split)[:, :rows].sum(axis=0)
                      for w, (_, _, _, split) in zip(ws, STREAMS)])]  # [4, rows, BN]


def variant(name):
    """(layer function, expected outputs of layer 0's weights)."""
    if name.startswith("kernels"):
        return functools.partial(kernels_layer, pdl=name.endswith("pdl")), want_kernels
    kind, stages, *opts = re.fullmatch(r"(ring|ws)(\d+)((?:_[a-z]+\d*)*)", name).groups()
    stages, opts = int(stages), opts[0].split("_")[1:]
    rows = 64 if "rows64" in opts else ROWS
    if kind == "ring":
        return (functools.partial(ring_layer, stages=stages, barrier="nobarrier" not in opts,
                                  rows=rows), functools.partial(want_ring, rows=rows))
    chunk = next((int(o[3:]) for o in opts if o.startswith("dyn")), 0)
    return (functools.partial(ws_layer, stages=stages, chunk=chunk, rows=rows,
                              barrier="nobarrier" not in opts),
            functools.partial(want_totals, rows=rows))


def main(argv):
    del argv
    out_dir = Path(os.environ.get("OUT", "bench_out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(date=time.strftime("%Y-%m-%d"), device=jax.devices()[0].device_kind,
                jax_version=jax.__version__, command=" ".join(sys.argv), blocks=_blocks())
    print(json.dumps(meta), flush=True)
    keys = jax.random.split(jax.random.key(0), 2 * len(STREAMS))
    layers = [[jax.random.normal(keys[c * len(STREAMS) + i], (k, n), jnp.float32).astype(jnp.bfloat16)
               for i, (_, k, n, _) in enumerate(STREAMS)] for c in range(2)]
    total_mb = sum(k * n * 2 for _, k, n, _ in STREAMS) / 1e6
    rows = []
    for name in FLAGS.variants:
        if name not in VARIANTS:
            raise ValueError(f"--variants: unknown variant {name!r}; choose from {VARIANTS}")

        def run(row, name=name):
            layer, want = variant(name)
            fn, chain = jax.jit(functools.partial(layer, dep=None)), jax.jit(stack(layer))
            got = fn(layers[0])
            if name.startswith("ws"):  # dealt at run time: only the totals are fixed
                got = [o.sum(axis=0) for o in got]
            row["max_err"] = max(float(np.max(np.abs(np.asarray(o) - w)))
                                 for o, w in zip(got, want(layers[0])))
            if row["max_err"] > 1e-2:
                raise ValueError(f"wrong sums: max error {row['max_err']:.3g}")
            row["wall_us_per_layer"] = 1e3 * timing.time_ms(chain, [tuple(layers)]) / LAYERS
            trace = profiling.gpu_time(lambda: chain(*layers))
            row.update(profiling.per_call(trace, LAYERS, "layer"), top_kernels_ms=trace.get("top_kernels_ms"))
            if FLAGS.profile and not name.startswith("kernels"):
                try:
                    with tempfile.TemporaryDirectory() as d:
                        jax.block_until_ready(jax.jit(functools.partial(
                            layer, dep=None, profile_dir=d))(layers[1]))
                        row["block_us"] = block_times(next(Path(d).glob("*.json")))
                except Exception as e:  # noqa: BLE001 - the timings above stand without it
                    row["block_us"] = f"{type(e).__name__}: {str(e)[:500]}"
            if "span_us_per_layer" in row:
                row["tb_per_s"] = total_mb / row["span_us_per_layer"]  # MB/µs = TB/s

        report.measure(rows, dict(variant=name, weight_mb=total_mb), run, out_dir / "mosaic_stream.json", meta)
    report.table(rows, [("variant", "variant", ">16"), ("MB", "weight_mb", ">7.1f"),
                        ("GPU µs/layer", "gpu_us_per_layer", ">13.2f"),
                        ("span µs/layer", "span_us_per_layer", ">14.2f"),
                        ("TB/s (span)", "tb_per_s", ">12.2f"),
                        ("wall µs/layer", "wall_us_per_layer", ">14.2f")])


if __name__ == "__main__":
    app.run(main)
