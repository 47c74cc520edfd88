"""GPU benchmark of the Pallas Lightning Attention kernels (KERNELS.md §3 and §5).

Checks every variant against a float32 reference on the inputs it times, then times forward and
forward+backward of our kernels, the blockwise XLA form, cuDNN softmax flash attention and (in a
separate process, when `fla-core` is installed) FLA's `chunk_simple_gla`, and measures the peak
device memory of forward+backward against sequence length. Writes under --out: results.json,
table.md, speed_vs_length.png, memory_vs_length.png.

    python bench/kernels.py --out /tmp/bench                      # everything
    python bench/kernels.py --out /tmp/bench --stages check,table  # a part

Stages: tests (tests/test_pallas.py on this device), check, sweep (one Blocks for all four kernel
calls, --sweep), segments (sequence split), table, fla, memory, speed (against length), plots. Timings are medians over groups of
back-to-back calls (async dispatch keeps the GPU busy), inputs alternate between two random sets.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = [  # batch, seq, heads, head dim (KERNELS.md §3)
    (1, 8192, 96, 128),
    (2, 16384, 16, 128),
    (4, 4096, 64, 128),
    (4, 2048, 16, 128),
    (4, 8192, 32, 128),
    (8, 2048, 32, 128),
]
# Few (batch x head) programs, where splitting the sequence matters most: the 385M (8 heads) and
# the 1B (16 heads) at batch 1 and 32K tokens, the longest rows of bench/train_throughput.py.
SEGMENT_SHAPES = [(1, 32768, 8, 128), (1, 32768, 16, 128)]
LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]  # memory and speed against length
LENGTH_BH = (1, 16)  # batch, heads of the length sweep
# Ragged lengths, an initial state, float32 and dk != dv (layer 0 of the releases): checked, not
# timed. Shapes are batch, seq, heads, dk, dv.
EXTRA_CHECKS = [((2, 1000, 4, 128, 128), "bfloat16", True), ((2, 1000, 4, 128, 128), "float32", True),
                ((1, 777, 8, 64, 64), "float32", False), ((2, 1000, 4, 256, 128), "bfloat16", True),
                ((1, 999, 4, 256, 128), "float32", True), ((1, 500, 4, 64, 128), "bfloat16", False)]
FLA_CHECK_SHAPE = (1, 4096, 8, 128)
BYTES = 2  # bf16
# Minimum HBM bytes per token and head, as KERNELS.md §2 counts them (d = e = head dim):
# forward reads q, k, v and writes o; the backward floor reads q, k, v, dO and writes dq, dk, dv.
FWD_ELEMS, FWD_BWD_ELEMS = 4, 7
BF16_TOL, F32_TOL = 5e-3, 1e-5


def log(*args):
    print(*args, flush=True)


# ----------------------------------------------------------------------------------------------
# JAX side
# ----------------------------------------------------------------------------------------------
def jax_setup():
    # Imported here: the FLA worker process of this script runs torch without JAX.
    global jax, jnp, attention, lightning, time_ms
    import jax  # noqa: F811
    import jax.numpy as jnp  # noqa: F811

    from bench.timing import time_ms  # noqa: F811
    from pallas_kernels import lightning  # noqa: F811
    from tnllm import attention  # noqa: F811


def make_inputs(seed, batch, seq, heads, dk, dtype, dv=None):
    """q, k (silu features, like the model's), v and an output cotangent dO: random, never zeros."""
    dv = dk if dv is None else dv
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.nn.silu(jax.random.normal(keys[0], (batch, seq, heads, dk))).astype(dtype)
    k = jax.nn.silu(jax.random.normal(keys[1], (batch, seq, heads, dk))).astype(dtype)
    v = jax.random.normal(keys[2], (batch, seq, heads, dv)).astype(dtype)
    do = jax.random.normal(keys[3], (batch, seq, heads, dv)).astype(dtype)
    return q, k, v, do


def rel_rms(x, ref):
    x, ref = jnp.asarray(x, jnp.float32), jnp.asarray(ref, jnp.float32)
    return float(jnp.linalg.norm((x - ref).ravel()) / jnp.linalg.norm(ref.ravel()))


def variant_fns(slopes):
    """name -> o = f(q, k, v) for every timed variant."""

    def ours(q, k, v):
        return lightning.lightning_attention(q, k, v, slopes)[0]

    def blockwise(q, k, v):
        return attention.lightning_attention(q, k, v, slopes, impl="blockwise")[0]

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    return {"ours": ours, "blockwise": blockwise, "cudnn": cudnn}


def fwd_and_fwd_bwd(f):
    """Jitted forward, and forward+backward returning o too (so the forward is not dropped)."""

    def fwd_bwd(q, k, v, do):
        o, pullback = jax.vjp(f, q, k, v)
        return o, pullback(do)

    return jax.jit(f), jax.jit(fwd_bwd)


def floor_ms(batch, seq, heads, dim, elems, bandwidth):
    return batch * seq * heads * dim * BYTES * elems / bandwidth * 1e3


def measure_bandwidth():
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), as KERNELS.md §2."""
    x = jnp.ones((1 << 28,), jnp.bfloat16)  # 512 MiB
    copy = jax.jit(lambda a: a + jnp.bfloat16(1))
    ms = time_ms(copy, [(x,)], group_ms=100, groups=5)
    return 2 * x.size * 2 / (ms * 1e-3)


def stage_tests(results):
    log("== tests/test_pallas.py on", jax.devices()[0].device_kind)
    # This process already holds most of the GPU (JAX preallocates): the tests take what they use.
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           os.path.join(ROOT, "tests", "test_pallas.py")],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]
    log(tail)
    if proc.returncode:
        log(proc.stdout[-6000:], proc.stderr[-3000:])
    results["tests"] = {"returncode": proc.returncode, "summary": tail}


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
    return {n: rel_rms(a, b) for n, a, b in zip(names, got, want) if a is not None}


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
    # The other timed variants, on the smallest shape: blockwise in bf16, and cuDNN against XLA's
    # float32 softmax attention.
    shape = min(SHAPES, key=np.prod)
    q, k, v, _ = make_inputs(2, *shape, jnp.bfloat16)
    slopes = attention.alibi_slopes(shape[2])
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    bw = attention.lightning_attention(q, k, v, slopes, impl="blockwise")[0]
    ref = attention.lightning_attention(*up, slopes, impl="blockwise")[0]
    extra = {"blockwise_bf16": rel_rms(bw, ref)}
    try:
        fa = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        fa_ref = jax.nn.dot_product_attention(*up, is_causal=True, implementation="xla")
        extra["cudnn_bf16"] = rel_rms(fa, fa_ref)
    except Exception as e:  # no cuDNN attention on this device: recorded, not fatal
        extra["cudnn_bf16"] = f"unavailable: {type(e).__name__}: {str(e)[:200]}"
    log("other variants:", extra)
    results["checks"] = {"cases": checks, "others": extra, "passed": ok}
    return ok


def stage_sweep(results, configs, shapes):
    """Forward and forward+backward of ours with one Blocks for all four kernel calls and the
    default segments for it; the forward output checked against the float32 blockwise form."""
    log("== block-size sweep: forward and forward+backward (ms)")
    rows = []
    for shape in shapes:
        batch, seq, heads, dim = shape
        sets = [make_inputs(s, batch, seq, heads, dim, jnp.bfloat16) for s in (3, 4)]
        slopes = attention.alibi_slopes(heads)
        ref = attention.lightning_attention(*(x.astype(jnp.float32) for x in sets[0][:3]), slopes,
                                            impl="blockwise")[0]
        for blocks in configs:
            plan = lightning.Plan(fwd=blocks, dq=blocks, dk=blocks, dv=blocks)
            fwd, fwd_bwd = fwd_and_fwd_bwd(
                lambda q, k, v, plan=plan: lightning.lightning_attention(q, k, v, slopes,
                                                                         plan=plan)[0])
            row = {"shape": shape, "blocks": blocks.__dict__}
            try:  # a config that does not compile is a result too
                row["o_error"] = rel_rms(fwd(*sets[0][:3]), ref)
                row["fwd"] = time_ms(fwd, [s[:3] for s in sets])
                row["fwd_bwd"] = time_ms(fwd_bwd, sets)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            log(json.dumps(row))
    results["sweep"] = rows


def stage_segments(results, shapes):
    """Forward and forward+backward of ours with the sequence cut into 1, 2, 4, ... segments,
    up to four waves of programs; the default choice is marked."""
    log("== sequence segments (ms)")
    cores = jax.devices()[0].core_count if jax.default_backend() == "gpu" else 132
    rows = []
    for shape in shapes:
        batch, seq, heads, dim = shape
        sets = [make_inputs(s, batch, seq, heads, dim, jnp.bfloat16) for s in (12, 13)]
        slopes = attention.alibi_slopes(heads)
        base = lightning.default_plan(dim, dim)
        programs = dim // base.fwd.block_v * heads * batch
        auto = lightning.default_segments(programs, seq // base.fwd.chunk, cores)
        segments = 1
        while segments == 1 or (programs * segments <= 4 * cores
                                and seq // base.fwd.chunk >= segments * 2):
            plan = dataclasses.replace(base, segments=segments)
            fwd, fwd_bwd = fwd_and_fwd_bwd(
                lambda q, k, v, plan=plan: lightning.lightning_attention(q, k, v, slopes,
                                                                         plan=plan)[0])
            row = {"shape": shape, "segments": segments, "default": segments == auto,
                   "fwd": time_ms(fwd, [s[:3] for s in sets]), "fwd_bwd": time_ms(fwd_bwd, sets)}
            rows.append(row)
            log(json.dumps(row))
            segments *= 2
    results["segments"] = rows


def stage_table(results, bandwidth):
    log("== forward and forward+backward, ms")
    rows = []
    for shape in SHAPES:
        batch, seq, heads, dim = shape
        sets = [make_inputs(s, batch, seq, heads, dim, jnp.bfloat16) for s in (5, 6)]
        slopes = attention.alibi_slopes(heads)
        ref = attention.lightning_attention(*(x.astype(jnp.float32) for x in sets[0][:3]), slopes,
                                            impl="blockwise")[0]
        row = {"shape": shape,
               "floor_fwd": floor_ms(*shape, FWD_ELEMS, bandwidth),
               "floor_fwd_bwd": floor_ms(*shape, FWD_BWD_ELEMS, bandwidth)}
        for name, f in variant_fns(slopes).items():
            fwd, fwd_bwd = fwd_and_fwd_bwd(f)
            if name != "cudnn":  # the timed inputs, checked first (the check stage covers grads)
                row[f"{name}_o_error"] = rel_rms(fwd(*sets[0][:3]), ref)
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
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return (total - m.alias_size_in_bytes) / 2**20


def fwd_bwd_ms(fwd_bwd, shape):
    sets = [make_inputs(s, *shape, jnp.bfloat16) for s in (9, 10)]
    return time_ms(fwd_bwd, sets, group_ms=20, groups=5)


def stage_lengths(results, key, unit, measure):
    """measure(forward+backward, shape) of every variant at every length of the length sweep."""
    log(f"== {key} of forward+backward against length ({unit}), batch, heads =", LENGTH_BH)
    batch, heads = LENGTH_BH
    rows = []
    for seq in LENGTHS:
        shape = (batch, seq, heads, 128)
        row = {"seq": seq}
        for name, f in variant_fns(attention.alibi_slopes(heads)).items():
            try:
                row[name] = measure(fwd_and_fwd_bwd(f)[1], shape)
            except Exception as e:
                row[name] = None
                log(f"{name} at {seq} failed: {type(e).__name__}: {str(e)[:200]}")
        rows.append(row)
        log(json.dumps(row))
    results[key] = rows


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


# ----------------------------------------------------------------------------------------------
# FLA side (its own process: torch and XLA each manage device memory)
# ----------------------------------------------------------------------------------------------
def fla_worker(out):
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
        return float((a.float() - b).norm() / b.norm())

    res["check"] = {"o": rel(o, t["o"]), "dq": rel(q.grad, t["dq"]), "dk": rel(k.grad, t["dk"]),
                    "dv": rel(v.grad, t["dv"])}
    print("FLA check", res["check"], flush=True)
    def b2b_ms(f, arg_sets, group_ms=30.0, groups=7):
        """time_ms's method on the torch side: means of back-to-back calls, median of groups."""
        for args in arg_sets:
            f(*args)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        f(*arg_sets[0])
        torch.cuda.synchronize()
        n = max(2, int(group_ms / max((time.perf_counter() - t0) * 1e3, 1e-3)))
        means = []
        for _ in range(groups):
            t0 = time.perf_counter()
            for i in range(n):
                f(*arg_sets[i % len(arg_sets)])
            torch.cuda.synchronize()
            means.append((time.perf_counter() - t0) * 1e3 / n)
        return statistics.median(means)

    for shape in SHAPES:
        batch, seq, heads, dim = shape
        gen = torch.Generator(device=dev).manual_seed(0)

        def randn(*s):
            return torch.randn(*s, device=dev, generator=gen)

        sets = []
        for _ in range(2):  # two input sets, alternated by the back-to-back timing like ours
            q = torch.nn.functional.silu(randn(batch, seq, heads, dim)).bfloat16().requires_grad_()
            k = torch.nn.functional.silu(randn(batch, seq, heads, dim)).bfloat16().requires_grad_()
            v = randn(batch, seq, heads, dim).bfloat16().requires_grad_()
            sets.append((q, k, v, randn(batch, seq, heads, dim).bfloat16()))
        q, k, v, do = sets[0]
        slopes = t[f"slopes_{heads}"]

        def fwd_bwd(q, k, v, do):
            o = attn(q, k, v, slopes)
            return o, torch.autograd.grad(o, (q, k, v), do)

        with torch.no_grad():
            fwd = triton.testing.do_bench(lambda: attn(q, k, v, slopes), return_mode="median")
            fwd_b2b = b2b_ms(lambda q, k, v, do: attn(q, k, v, slopes), sets)
        fwd_bwd_do_bench = triton.testing.do_bench(lambda: attn(q, k, v, slopes).backward(do),
                                                   grad_to_none=[q, k, v], return_mode="median")
        res["rows"].append({"shape": shape, "fla_fwd": fwd_b2b, "fla_fwd_bwd": b2b_ms(fwd_bwd, sets),
                            "fla_fwd_do_bench": fwd, "fla_fwd_bwd_do_bench": fwd_bwd_do_bench})
        print("FLA", res["rows"][-1], flush=True)
        with open(os.path.join(out, "fla.json"), "w") as f:  # after each shape: partial results count
            json.dump(res, f)


def stage_fla(results):
    log("== FLA chunk_simple_gla (separate process)")
    with tempfile.TemporaryDirectory() as work:
        write_fla_check(os.path.join(work, "fla_check.npz"))
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--out", work,
                               "--fla-worker"], env=env)
        path = os.path.join(work, "fla.json")
        results["fla"] = json.load(open(path)) if os.path.exists(path) else {}
    results["fla"]["returncode"] = proc.returncode


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def markdown_table(results):
    fla = {tuple(r["shape"]): r for r in results.get("fla", {}).get("rows", [])}
    head = ("| B, T, H, D | ours fwd | ours fwd+bwd | blockwise fwd | blockwise fwd+bwd "
            "| ours vs blockwise (fwd+bwd) | cuDNN flash fwd | cuDNN flash fwd+bwd | FLA fwd "
            "| FLA fwd+bwd | FLA / ours fwd | FLA / ours fwd+bwd | floor fwd | floor fwd+bwd "
            "| of floor fwd | of floor fwd+bwd |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results.get("table", []):
        f = fla.get(tuple(r["shape"]), {})

        def ratio(a, b):
            return None if a is None or b is None else a / b

        lines.append("| " + " | ".join([
            ", ".join(map(str, r["shape"])), fmt(r.get("ours_fwd")), fmt(r.get("ours_fwd_bwd")),
            fmt(r.get("blockwise_fwd")), fmt(r.get("blockwise_fwd_bwd")),
            fmt(ratio(r.get("blockwise_fwd_bwd"), r.get("ours_fwd_bwd")), ".1f") + "×",
            fmt(r.get("cudnn_fwd")), fmt(r.get("cudnn_fwd_bwd")),
            fmt(f.get("fla_fwd")), fmt(f.get("fla_fwd_bwd")),
            fmt(ratio(f.get("fla_fwd"), r.get("ours_fwd")), ".2f"),
            fmt(ratio(f.get("fla_fwd_bwd"), r.get("ours_fwd_bwd")), ".2f"),
            fmt(r["floor_fwd"]), fmt(r["floor_fwd_bwd"]),
            fmt(ratio(r["floor_fwd"], r.get("ours_fwd")), ".0%"),
            fmt(ratio(r["floor_fwd_bwd"], r.get("ours_fwd_bwd")), ".0%"),
        ]) + " |")
    return "\n".join(lines)


def plots(results, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, ylabel, fname in (("speed", "forward+backward (ms)", "speed_vs_length.png"),
                               ("memory", "peak memory of forward+backward (MiB)",
                                "memory_vs_length.png")):
        rows = results.get(key)
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, label in (("ours", "ours (Pallas)"), ("blockwise", "blockwise XLA"),
                            ("cudnn", "cuDNN softmax flash attention")):
            pts = [(r["seq"], r[name]) for r in rows if r.get(name) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"sequence length (batch {LENGTH_BH[0]}, {LENGTH_BH[1]} heads, head dim 128, bf16)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=120)
        plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for results.json, table.md, plots")
    parser.add_argument("--stages", default="tests,check,table,fla,memory,speed,plots")
    parser.add_argument("--sweep", default="", help="block configs C:bv:warps:stages,... for 'sweep'")
    parser.add_argument("--sweep_shapes", default="0,1,2",
                        help="indices into SHAPES of the shapes 'sweep' runs")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, to check this script end to end on a CPU")
    parser.add_argument("--fla-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        global SHAPES, LENGTHS, LENGTH_BH, FLA_CHECK_SHAPE, EXTRA_CHECKS, SEGMENT_SHAPES
        SHAPES, LENGTHS, LENGTH_BH = [(1, 128, 2, 64), (2, 64, 1, 64)], [64, 128], (1, 2)
        SEGMENT_SHAPES = [(1, 512, 1, 64)]
        EXTRA_CHECKS = [((1, 50, 2, 32, 16), "float32", True)]
        FLA_CHECK_SHAPE = (1, 64, 2, 64)
    os.makedirs(args.out, exist_ok=True)
    if args.fla_worker:
        return fla_worker(args.out)

    jax_setup()
    stages = args.stages.split(",")
    results = {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
               "cores": getattr(jax.devices()[0], "core_count", None),
               "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    log(results)
    results["bandwidth"] = measure_bandwidth()
    log(f"copy bandwidth {results['bandwidth'] / 1e12:.2f} TB/s")

    def save():
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)

    for stage in stages:
        start = time.perf_counter()
        if stage == "tests":
            stage_tests(results)
        elif stage == "check":
            if not stage_check(results):
                log("Correctness check failed: nothing is timed.")
                save()
                sys.exit(1)
        elif stage == "sweep":
            configs = [lightning.Blocks(*map(int, c.split(":"))) for c in args.sweep.split(",")]
            stage_sweep(results, configs, [SHAPES[int(i)] for i in args.sweep_shapes.split(",")
                                          if int(i) < len(SHAPES)])
        elif stage == "segments":
            stage_segments(results, SHAPES + SEGMENT_SHAPES)
        elif stage == "table":
            stage_table(results, results["bandwidth"])
        elif stage == "fla":
            stage_fla(results)
        elif stage == "memory":
            stage_lengths(results, "memory", "MiB", peak_mib)
        elif stage == "speed":
            stage_lengths(results, "speed", "ms", fwd_bwd_ms)
        elif stage == "plots":
            plots(results, args.out)
        else:
            raise SystemExit(f"Unknown stage {stage!r}: see --help.")
        log(f"-- stage {stage} took {time.perf_counter() - start:.0f} s")
        save()
    table = markdown_table(results)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    log(table)


if __name__ == "__main__":
    main()
