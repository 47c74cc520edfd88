"""The Lightning Attention Pallas kernels against FLA's `chunk_simple_gla` (in its own process), the
blockwise XLA form and cuDNN flash attention: checked against float32 first, then timed (bench.timing).

    python -m bench.kernels --out /tmp/k --stages check,table,fla,memory,plots
    python -m bench.kernels --out /tmp/k --stages sweep --sweep 64:64:4:4,64:128:8:3
    python -m bench.kernels --out /tmp/k --stages sweep --sweep_kernel mosaic --sweep 64:64:4:2,64:64:4:3
    python -m bench.kernels --out /tmp/k --smoke          # tiny shapes on a CPU, interpret mode

The fla stage needs `fla-core` and a CUDA build of PyTorch beside JAX (not in requirements.txt).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import report
from bench.timing import time_ms
from pallas_kernels import lightning, lightning_hopper
from tnllm import attention
from tnllm.testing import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = [(1, 8192, 96, 128), (2, 16384, 16, 128), (4, 4096, 64, 128),  # batch, seq, heads, head
          (4, 2048, 16, 128), (4, 8192, 32, 128), (8, 2048, 32, 128)]   # dim: FLA's benchmark shapes
# Few (batch x head) programs, where splitting the sequence matters most: the 385M (8 heads) and
# the 1B (16 heads) at batch 1 and 32K tokens, the longest rows of bench/train_throughput.py.
SEGMENT_SHAPES = [(1, 32768, 8, 128), (1, 32768, 16, 128)]
LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]  # memory against length
LENGTH_BH = (1, 16)  # batch, heads of the length sweep
# Ragged lengths, an initial state, float32 and dk != dv (layer 0 of the releases): checked, not
# timed. Shapes are batch, seq, heads, dk, dv.
EXTRA_CHECKS = [((2, 1000, 4, 128, 128), "bfloat16", True), ((2, 1000, 4, 128, 128), "float32", True),
                ((1, 777, 8, 64, 64), "float32", False), ((2, 1000, 4, 256, 128), "bfloat16", True),
                ((1, 999, 4, 256, 128), "float32", True), ((1, 500, 4, 64, 128), "bfloat16", False)]
FLA_CHECK_SHAPE = (1, 4096, 8, 128)
BYTES = 2  # bf16
# Minimum HBM bytes per token and head (d = e = head dim):
# forward reads q, k, v and writes o; the backward floor reads q, k, v, dO and writes dq, dk, dv.
FWD_ELEMS, FWD_BWD_ELEMS = 4, 7
BF16_TOL, F32_TOL = 5e-3, 1e-5


log = functools.partial(print, flush=True)


def make_inputs(seed, batch, seq, heads, dk, dtype, dv=None):
    """q, k (silu features, like the model's), v and an output cotangent dO: random, never zeros."""
    dv = dk if dv is None else dv
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k = (jax.nn.silu(jax.random.normal(key, (batch, seq, heads, dk))).astype(dtype) for key in keys[:2])
    v, do = (jax.random.normal(key, (batch, seq, heads, dv)).astype(dtype) for key in keys[2:])
    return q, k, v, do


def variant_fns(slopes, only=""):
    """name -> o = f(q, k, v) per timed variant (those in `only`, if any): "ours" is the default
    plan (the Mosaic kernels on Hopper), "triton" and "mosaic" (on Hopper) each kernel's plan."""
    fns = {"ours": lambda q, k, v: lightning.lightning_attention(q, k, v, slopes)[0],
           "triton": lambda q, k, v: lightning.lightning_attention(q, k, v, slopes, plan=lightning.plan_for(q, v, 64, "triton"))[0],
           "blockwise": lambda q, k, v: attention.lightning_attention(q, k, v, slopes, impl="blockwise")[0],
           "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")}
    if lightning_hopper.available():
        fns["mosaic"] = lambda q, k, v: lightning.lightning_attention(q, k, v, slopes, plan=lightning.plan_for(q, v, 64, "mosaic"))[0]
    return {name: f for name, f in fns.items() if not only or name in only.split(",")}


def fwd_and_fwd_bwd(f):
    """Jitted forward, and forward+backward returning o too (so the forward is not dropped)."""

    def fwd_bwd(q, k, v, do):
        o, pullback = jax.vjp(f, q, k, v)
        return o, pullback(do)

    return jax.jit(f), jax.jit(fwd_bwd)


def floor_ms(batch, seq, heads, dim, elems, bandwidth):
    return batch * seq * heads * dim * BYTES * elems / bandwidth * 1e3


def measure_bandwidth(elements=1 << 28):
    """Device-to-device copy bandwidth in bytes/s (bytes read + written) over 2 * elements bytes."""
    x = jnp.ones((elements,), jnp.bfloat16)  # 512 MiB by default
    copy = jax.jit(lambda a: a + jnp.bfloat16(1))
    ms = time_ms(copy, [(x,)], group_ms=100, groups=5)
    return 2 * x.size * 2 / (ms * 1e-3)


def check_shape(shape, dtype, with_state=False):
    """Relative RMS errors of ours against the float32 blockwise form on the same inputs."""
    batch, seq, heads, dk, dv = shape
    q, k, v, do = make_inputs(1, batch, seq, heads, dk, dtype, dv)
    slopes = attention.alibi_slopes(heads)
    s0 = jax.random.normal(jax.random.PRNGKey(7), (batch, heads, dk, dv)) if with_state else None
    d_final = jax.random.normal(jax.random.PRNGKey(8), (batch, heads, dk, dv))

    def run(impl, q, k, v):
        def f(q, k, v, s0):
            if impl == "ours":
                return lightning.lightning_attention(q, k, v, slopes, initial_state=s0)
            return attention.lightning_attention(q, k, v, slopes, impl=impl, initial_state=s0)

        (o, final), pullback = jax.vjp(f, q, k, v, s0)
        grads = pullback((do.astype(o.dtype), d_final))
        return [o, final, *grads]

    got = jax.jit(functools.partial(run, "ours"))(q, k, v)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    want = jax.jit(functools.partial(run, "blockwise"))(*up)
    names = ["o", "final_state", "dq", "dk", "dv", "d_initial_state"]
    return {n: rel_err(a, b) for n, a, b in zip(names, got, want) if a is not None}


def stage_check(results):
    log("== correctness of the compiled kernels against the float32 blockwise form")
    checks, ok = [], True
    cases = [((*s, s[-1]), "bfloat16", False) for s in SHAPES] + EXTRA_CHECKS
    for shape, dtype, with_state in cases:
        errs = check_shape(shape, jnp.dtype(dtype), with_state)
        tol = BF16_TOL if dtype == "bfloat16" else F32_TOL
        passed = all(e <= tol for e in errs.values())
        ok &= passed
        checks.append({"shape": shape, "dtype": dtype, "initial_state": with_state, "errors": errs,
                       "tol": tol, "passed": passed})
        log(f"{str(shape):28s} {dtype:9s} state={with_state!s:5s} max err "
            f"{max(errs.values()):.2e} (tol {tol:g}) {'ok' if passed else 'FAIL'}")
    results["checks"] = {"cases": checks, "passed": ok}
    return ok


def time_plans(shape, plans, seed):
    """For each (row, plan): the forward and forward+backward ms of ours with that plan (and the
    forward's error against the float32 blockwise form), added to row; a plan that does not compile
    is a result too. Returns the rows."""
    batch, seq, heads, dim = shape
    sets = [make_inputs(s, batch, seq, heads, dim, jnp.bfloat16) for s in (seed, seed + 1)]
    slopes = attention.alibi_slopes(heads)
    ref = attention.lightning_attention(*(x.astype(jnp.float32) for x in sets[0][:3]), slopes,
                                        impl="blockwise")[0]
    for row, plan in plans:
        fwd, fwd_bwd = fwd_and_fwd_bwd(
            lambda q, k, v, plan=plan: lightning.lightning_attention(q, k, v, slopes, plan=plan)[0])
        try:
            row.update(o_error=rel_err(fwd(*sets[0][:3]), ref), fwd=time_ms(fwd, [s[:3] for s in sets]),
                       fwd_bwd=time_ms(fwd_bwd, sets))
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        log(json.dumps(row))
    return [row for row, _ in plans]


def stage_sweep(results, configs, shapes, kernel):
    """One Blocks for all four kernel calls of `kernel`, with the default segments for it."""
    log(f"== block-size sweep ({kernel}): forward and forward+backward (ms)")
    results["sweep"] = [row for shape in shapes for row in time_plans(
        shape, [({"shape": shape, "kernel": kernel, "blocks": b.__dict__},
                 lightning.Plan(fwd=b, dq=b, dk=b, dv=b, kernel=kernel)) for b in configs], seed=3)]


def stage_segments(results, shapes):
    """The default plan with the sequence cut into 1, 2, 4, ... segments, up to four waves of
    programs; the default choice is marked."""
    log("== sequence segments (ms)")
    on_gpu = jax.default_backend() == "gpu"
    cores = jax.devices()[0].core_count if on_gpu else 132
    results["segments"] = []
    for shape in shapes:
        batch, seq, heads, dim = shape
        x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
        base = lightning.plan_for(x, x, 64, lightning.default_kernel(x, x, x, 64, not on_gpu))
        programs, chunks = dim // base.fwd.block_v * heads * batch, seq // base.fwd.chunk
        auto = lightning.default_segments(programs, chunks, cores)
        counts = [n for n in (2 ** i for i in range(12))  # up to four waves, two chunks a segment
                  if n == 1 or (programs * n <= 4 * cores and chunks >= 2 * n)]
        results["segments"] += time_plans(shape, [({"shape": shape, "segments": n, "default": n == auto},
                                                    dataclasses.replace(base, segments=n)) for n in counts],
                                          seed=12)


def stage_boundaries(results, document_tokens=512):
    """Ours on packed documents (a start every ~document_tokens) against no boundaries, same inputs;
    o and the gradients of both checked against the float32 blockwise form first."""
    log("== packed documents against none, forward and forward+backward (ms)")
    results["boundaries"] = []
    for batch, seq, heads, dim in SHAPES:
        sets = [make_inputs(s, batch, seq, heads, dim, jnp.bfloat16) for s in (5, 6)]
        starts = np.random.default_rng(0).random((batch, seq)) < 1 / document_tokens
        row, slopes = {"shape": (batch, seq, heads, dim)}, attention.alibi_slopes(heads)
        for name, ids in (("plain", None), ("documents", jnp.asarray(np.cumsum(starts, 1), jnp.int32))):
            fwd, fwd_bwd = fwd_and_fwd_bwd(lambda q, k, v, ids=ids: lightning.lightning_attention(
                q, k, v, slopes, segment_ids=ids)[0])
            _, want = fwd_and_fwd_bwd(lambda q, k, v, ids=ids: attention.lightning_attention(
                q, k, v, slopes, impl="blockwise", segment_ids=ids)[0])
            got = jax.tree.leaves(fwd_bwd(*sets[0]))
            ref = jax.tree.leaves(want(*(x.astype(jnp.float32) for x in sets[0])))
            row[f"{name}_error"] = max(rel_err(a, b) for a, b in zip(got, ref))
            if row[f"{name}_error"] > BF16_TOL:
                raise SystemExit(f"{name} on {row['shape']}: error {row[f'{name}_error']:.2e} "
                                 f"against float32 over {BF16_TOL}; nothing timed.")
            row[name] = [time_ms(fwd, [s[:3] for s in sets]), time_ms(fwd_bwd, sets)]
        row["cost"] = [d / p - 1 for d, p in zip(row["documents"], row["plain"])]
        results["boundaries"].append(row)
        log(json.dumps(row))


def stage_table(results, bandwidth, only=""):
    log("== forward and forward+backward, ms")
    rows = []
    for shape in SHAPES:
        batch, seq, heads, dim = shape
        sets = [make_inputs(s, batch, seq, heads, dim, jnp.bfloat16) for s in (5, 6)]
        slopes = attention.alibi_slopes(heads)
        ref = attention.lightning_attention(*(x.astype(jnp.float32) for x in sets[0][:3]), slopes,
                                            impl="blockwise")[0]
        row = {"shape": shape, "floor_fwd": floor_ms(*shape, FWD_ELEMS, bandwidth),
               "floor_fwd_bwd": floor_ms(*shape, FWD_BWD_ELEMS, bandwidth)}
        for name, f in variant_fns(slopes, only).items():
            fwd, fwd_bwd = fwd_and_fwd_bwd(f)
            if name != "cudnn":  # the timed inputs, checked first (the check stage covers grads)
                row[f"{name}_o_error"] = rel_err(fwd(*sets[0][:3]), ref)
            for key, g, args in ((f"{name}_fwd", fwd, [s[:3] for s in sets]),
                                 (f"{name}_fwd_bwd", fwd_bwd, sets)):
                try:
                    row[key] = time_ms(g, args)
                except Exception as e:
                    row[key] = None
                    log(f"{key} failed: {type(e).__name__}: {str(e)[:300]}")
        rows.append(row)
        log(json.dumps(row))
    results["table"] = rows


def peak_mib(fwd_bwd, shape):
    """Peak device memory XLA plans for the compiled program: arguments + outputs + temps."""
    spec = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    m = fwd_bwd.lower(spec, spec, spec, spec).compile().memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes) / 2**20


def stage_memory(results):
    """Peak memory of every variant's forward+backward at every length of LENGTHS."""
    log("== memory of forward+backward against length (MiB), batch, heads =", LENGTH_BH)
    (batch, heads), results["memory"] = LENGTH_BH, []
    for seq in LENGTHS:
        row = {"seq": seq}
        for name, f in variant_fns(attention.alibi_slopes(heads)).items():
            try:
                row[name] = peak_mib(fwd_and_fwd_bwd(f)[1], (batch, seq, heads, 128))
            except Exception as e:
                row[name] = None
                log(f"{name} at {seq} failed: {type(e).__name__}: {str(e)[:200]}")
        results["memory"].append(row)
        log(json.dumps(row))


def write_fla_check(path):
    """Inputs and float32 reference outputs on which the FLA process checks chunk_simple_gla."""
    batch, seq, heads, dim = FLA_CHECK_SHAPE
    q, k, v, do = make_inputs(11, batch, seq, heads, dim, jnp.bfloat16)
    slopes = attention.alibi_slopes(heads)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    o, pullback = jax.vjp(lambda q, k, v: attention.lightning_attention(
        q, k, v, slopes, impl="blockwise")[0], *up)
    dq, dk, dv = pullback(do.astype(jnp.float32))
    arrays = dict(q=q, k=k, v=v, do=do, o=o, dq=dq, dk=dk, dv=dv, slopes=slopes)
    arrays.update({f"slopes_{s[2]}": attention.alibi_slopes(s[2]) for s in SHAPES})
    np.savez(path, **{n: np.asarray(a, np.float32) for n, a in arrays.items()})


def fla_worker(out):
    """FLA's check and timings, in a process of its own: torch and XLA each manage device memory."""
    import torch
    import triton.testing
    from fla.ops.simple_gla import chunk_simple_gla

    dev = "cuda"
    res = {"version": __import__("fla").__version__, "rows": []}

    def attn(q, k, v, slopes):
        return chunk_simple_gla(q, k, v, g_gamma=-slopes, scale=1.0)[0]

    ref = np.load(os.path.join(out, "fla_check.npz"))
    t = {n: torch.tensor(ref[n], device=dev) for n in ref.files}
    q, k, v = (t[n].bfloat16().requires_grad_() for n in "qkv")
    o = attn(q, k, v, t["slopes"])
    o.backward(t["do"].bfloat16())

    def rel(a, b):
        return rel_err(a.detach().float().cpu().numpy(), b.cpu().numpy())

    res["check"] = {"o": rel(o, t["o"]), "dq": rel(q.grad, t["dq"]), "dk": rel(k.grad, t["dk"]),
                    "dv": rel(v.grad, t["dv"])}
    print("FLA check", res["check"], flush=True)

    def do_bench_ms(f, args):  # FLA's own benchmarks' method: triton.testing.do_bench, median
        return triton.testing.do_bench(lambda: f(*args), quantiles=[0.5])

    for shape in SHAPES:
        batch, seq, heads, dim = shape
        gen = torch.Generator(device=dev).manual_seed(0)
        randn = lambda *s: torch.randn(*s, device=dev, generator=gen)  # noqa: E731
        q, k = (torch.nn.functional.silu(randn(batch, seq, heads, dim)).bfloat16().requires_grad_()
                for _ in "qk")
        args = (q, k, randn(batch, seq, heads, dim).bfloat16().requires_grad_(),
                randn(batch, seq, heads, dim).bfloat16())
        slopes = t[f"slopes_{heads}"]

        def fwd_bwd(q, k, v, do):
            o = attn(q, k, v, slopes)
            return o, torch.autograd.grad(o, (q, k, v), do)

        with torch.no_grad():
            fwd = do_bench_ms(lambda q, k, v, do: attn(q, k, v, slopes), args)
        res["rows"].append({"shape": shape, "fla_fwd": fwd, "fla_fwd_bwd": do_bench_ms(fwd_bwd, args)})
        print("FLA", res["rows"][-1], flush=True)
        with open(os.path.join(out, "fla.json"), "w") as f:  # after each shape: partial results count
            json.dump(res, f)


def stage_fla(results):
    log("== FLA chunk_simple_gla (separate process)")
    with tempfile.TemporaryDirectory() as work:
        write_fla_check(os.path.join(work, "fla_check.npz"))
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        proc = subprocess.run([sys.executable, "-m", "bench.kernels", "--out", work, "--fla-worker"],
                              cwd=ROOT, env=env)
        path = os.path.join(work, "fla.json")
        results["fla"] = json.load(open(path)) if os.path.exists(path) else {}
    results["fla"]["returncode"] = proc.returncode


def markdown_table(results):
    """Times in ms; FLA / ours > 1 means ours is faster; floor: the HBM bytes at the copy rate."""
    fla = {tuple(r["shape"]): r for r in results.get("fla", {}).get("rows", [])}
    rows = []
    for r in results.get("table", []):
        row = {**r, **fla.get(tuple(r["shape"]), {}), "shape": ", ".join(map(str, r["shape"]))}
        if row.get("fla_fwd_bwd") and row.get("ours_fwd_bwd"):
            row["fla_ratio"] = row["fla_fwd_bwd"] / row["ours_fwd_bwd"]
        if row.get("ours_fwd"):
            row["of_floor"] = row["ours_fwd"] / row["floor_fwd"]
            row["of_floor_bwd"] = row["ours_fwd_bwd"] / row["floor_fwd_bwd"]
        rows.append(row)
    return report.markdown(rows, [(h, k, "" if k == "shape" else ".3f") for h, k in (
        ("B, T, H, D", "shape"), ("ours fwd", "ours_fwd"), ("ours fwd+bwd", "ours_fwd_bwd"),
        ("Triton fwd", "triton_fwd"), ("Triton fwd+bwd", "triton_fwd_bwd"),
        ("Mosaic fwd", "mosaic_fwd"), ("Mosaic fwd+bwd", "mosaic_fwd_bwd"), ("floor fwd+bwd", "floor_fwd_bwd"),
        ("blockwise fwd+bwd", "blockwise_fwd_bwd"), ("cuDNN flash fwd+bwd", "cudnn_fwd_bwd"),
        ("FLA fwd", "fla_fwd"), ("FLA fwd+bwd", "fla_fwd_bwd"), ("FLA / ours, fwd+bwd", "fla_ratio"),
        ("floor fwd", "floor_fwd"), ("ours fwd / floor", "of_floor"),
        ("ours fwd+bwd / floor", "of_floor_bwd"))])


def plot_memory(rows, out):
    report.line_plot({label: [(r["seq"], r[name]) for r in rows if r.get(name) is not None]
                      for name, label in (("ours", "ours (Pallas)"), ("blockwise", "blockwise XLA"),
                                          ("cudnn", "cuDNN softmax flash attention"))},
                     os.path.join(out, "memory_vs_length.png"), logy=True,
                     xlabel="sequence length (batch {}, {} heads, head dim 128, bf16)".format(*LENGTH_BH),
                     ylabel="peak memory of forward+backward (MiB)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for results.json, table.md, plots")
    parser.add_argument("--stages", default=None, help="of check, sweep, segments, table, fla, memory, "
                        "boundaries, plots; default check,table,fla,memory,plots (--smoke: all but fla)")
    parser.add_argument("--sweep", default="", help="block configs C:bv:warps:stages,... for 'sweep'")
    parser.add_argument("--sweep_kernel", default="triton", choices=lightning.KERNELS,
                        help="the kernel 'sweep' runs (mosaic: Hopper, C 64, bv 64, warps unused)")
    parser.add_argument("--variants", default="", help="'table' times only these (ours,mosaic,...)")
    parser.add_argument("--sweep_shapes", default="0,1,2",
                        help="indices into SHAPES of the shapes 'sweep' runs")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, to check this script end to end on a CPU")
    parser.add_argument("--fla-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        global SHAPES, LENGTHS, LENGTH_BH, FLA_CHECK_SHAPE, EXTRA_CHECKS, SEGMENT_SHAPES
        SHAPES, LENGTHS, LENGTH_BH, SEGMENT_SHAPES = [(1, 128, 2, 64)], [64], (1, 2), []
        EXTRA_CHECKS = [((1, 50, 2, 32, 16), "float32", True)]
        FLA_CHECK_SHAPE = (1, 64, 2, 64)
        args.sweep = args.sweep or "64:64:4:1"
    os.makedirs(args.out, exist_ok=True)
    if args.fla_worker:
        return fla_worker(args.out)

    stages = (args.stages or ("check,sweep,segments,table,memory,boundaries,plots" if args.smoke else
                              "check,table,fla,memory,plots")).split(",")
    results = {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
               "cores": getattr(jax.devices()[0], "core_count", None),
               "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    log(results)
    results["bandwidth"] = measure_bandwidth(1 << 16 if args.smoke else 1 << 28)
    log(f"copy bandwidth {results['bandwidth'] / 1e12:.2f} TB/s")

    def save():
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)

    run = {"sweep": lambda: stage_sweep(
               results, [lightning.Blocks(*map(int, c.split(":"))) for c in args.sweep.split(",")],
               [SHAPES[int(i)] for i in args.sweep_shapes.split(",") if int(i) < len(SHAPES)],
               args.sweep_kernel),
           "segments": lambda: stage_segments(results, SHAPES + SEGMENT_SHAPES),
           "table": lambda: stage_table(results, results["bandwidth"], args.variants),
           "fla": lambda: stage_fla(results), "memory": lambda: stage_memory(results),
           "boundaries": lambda: stage_boundaries(results),
           "plots": lambda: results.get("memory") and plot_memory(results["memory"], args.out)}
    for stage in stages:
        start = time.perf_counter()
        if stage == "check" and not stage_check(results):
            log("Correctness check failed: nothing is timed.")
            save()
            sys.exit(1)
        elif stage != "check":
            if stage not in run:
                raise SystemExit(f"Unknown stage {stage!r}: see --help.")
            run[stage]()
        log(f"-- stage {stage} took {time.perf_counter() - start:.0f} s")
        save()
    table = markdown_table(results)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    log(table)


if __name__ == "__main__":
    main()
