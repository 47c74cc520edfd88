"""A one-row decoding step of TNL's layers: XLA's compilation of the model against fused Pallas GEMVs.

At batch 1 the 1B's step runs ~12 kernels a layer: four GEMMs (q/k/v/u, the output projection, the
merged l1/l2, l3) and ~8 small kernels between them (norms, gate, GLU product, residual adds), each
paying a launch and a ramp (docs/benchmarks.md). `pallas_kernels.decode.gemv` fuses those small
operations into the products' prologues and epilogues, leaving five kernels a layer
(`tnllm.fused_decode`).

This measures a step through the 1B's 15 layers without LRPE, with random weights (each layer its
own), as XLA compiles the model's layer (`tnllm.model.DecoderLayer`, the row run twice as
`tnllm.generate.decode` runs it at batch 1; with and without XLA's exhaustive GEMM tiling search)
and as the Pallas path with several tilings of its Triton kernels and, on a Hopper GPU, with its
Hopper kernels (`pallas_kernels.decode_hopper`). Each is checked first: the stack's output and states
against a float32 run of the model's layer on the same bf16 weights, with the Pallas path asked to
be within 1.5x of XLA's bf16 error or 1e-2 (on a CPU XLA keeps bf16 intermediates in float32).
Reported: wall µs per layer (`bench/timing.py`, back-to-back steps), GPU busy µs per layer and
kernels per layer from a profiler trace, and GPU µs per layer of each Pallas kernel. Idle µs per
layer: the trace's short gaps between kernels (`bench/profiling.py`); JAX traces without XLA's
command buffers unless XLA_FLAGS=--xla_enable_command_buffers_during_profiling=true, which gives
the gaps of the timed step.

    python3 bench/decode_layer.py           # the GPU run
    python3 bench/decode_layer.py --smoke   # a tiny config on a CPU (interpret mode)
    python3 bench/decode_layer.py --kinds= --autotune=false   # the library's steps only

Prints a line per variant and a table last; writes $OUT/decode_layer.json (OUT defaults to
./bench_out).
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
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench import profiling, report, timing  # noqa: E402
from pallas_kernels import decode_hopper  # noqa: E402
from pallas_kernels.decode import Tiling, tiling_for  # noqa: E402
from tnllm import config as config_lib, fused_decode  # noqa: E402
from tnllm.model import DecoderLayer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The four products of a layer and the fusions of each (`pallas_kernels.decode.fusions`).
KINDS = {"qkvu": "n", "out": "ngr", "glu": "n2", "l3": "r"}

flags.DEFINE_string("config", "1b", "Config file (configs/NAME.py).")
flags.DEFINE_integer("budget_s", 300, "Stop trying new tilings after this many seconds.")
flags.DEFINE_bool("smoke", False, "A tiny config, two tilings, interpret mode.")
flags.DEFINE_list("kinds", list(KINDS), "The products whose candidate tilings are tried.")
flags.DEFINE_bool("autotune", True, "Also XLA's step with its exhaustive GEMM tiling search.")
FLAGS = flags.FLAGS


def random_layers(cfg, layers, key):
    """Each layer's params in the model's layout, bf16, weights ~ N(0, 1/fan_in)."""
    d, h, hd, g = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.glu_dim
    shapes = {("token_mixer", "qkvu_proj"): (d, 4, h, hd), ("token_mixer", "out_proj"): (h, hd, d),
              ("channel_mixer", "l1"): (d, g), ("channel_mixer", "l2"): (d, g),
              ("channel_mixer", "l3"): (g, d)}
    out = []
    for key in jax.random.split(key, len(layers)):
        p = {"token_mixer": {}, "channel_mixer": {}}
        for (mod, name), shape in shapes.items():
            key, sub = jax.random.split(key)
            fan_in = shape[0] * (shape[1] if name == "out_proj" else 1)
            p[mod][name] = {"kernel": (jax.random.normal(sub, shape, jnp.float32)
                                       / np.sqrt(fan_in)).astype(jnp.bfloat16)}
        out.append(p)
    return out


def xla_stack(cfg, layers):
    """The model's layers on the row run twice; x [1, d] bf16, states [1, h, hd, hd] f32."""
    rcfg = cfg.replace(attention_impl="recurrent")

    def step(params, x, states):
        x2 = jnp.concatenate([x, x])[:, None]
        pos = jnp.zeros((2, 1), jnp.int32)
        new = []
        for p, i, s in zip(params, layers, states):
            x2, s = DecoderLayer(rcfg, i).apply({"params": p}, x2, pos, None, s)
            new.append(s)
        return x2[:1, 0], tuple(new)

    return step


def pallas_stack(cfg, layers, tilings, kernels="triton"):
    """The same step as `tnllm.fused_decode` runs it with `kernels`; tilings: {kind: Tiling or
    HopperTiling}."""
    by_fusion = {KINDS[kind]: t for kind, t in tilings.items()}

    def step(params, x, states):
        new, x = [], x.astype(jnp.float32)
        pos = jnp.zeros((1,), jnp.int32)
        for p, i, s in zip(params, layers, states):
            x, s = fused_decode.layer_step(p, x, pos, s, cfg=cfg, layer=i, tilings=by_fusion,
                                           kernels=kernels)
            new.append(s)
        return x.astype(jnp.bfloat16), tuple(new)

    return step


def f32_reference(cfg, layers, params, x, states):
    f32 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)  # noqa: E731
    step = xla_stack(cfg.replace(dtype="float32"), layers)
    with jax.default_matmul_precision("highest"):
        return jax.jit(step)(f32(params), f32(x), states)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# Tilings (block_n, block_k, split, num_warps, num_stages) tried for each product, one product at a
# time, the others at the library's choice (`tiling_for`, from call 36 on an H200).
CANDIDATES = {
    "qkvu": [(32, 256, 1, 4, 3), (32, 128, 2, 4, 4), (64, 128, 2, 4, 4), (64, 256, 2, 4, 3),
             (32, 256, 2, 4, 4), (64, 128, 4, 4, 4)],
    "out": [(32, 128, 4, 4, 4), (32, 256, 2, 4, 4), (64, 128, 4, 4, 4), (16, 128, 4, 4, 4),
            (32, 128, 8, 4, 3), (64, 256, 2, 4, 3)],
    "glu": [(64, 128, 1, 4, 4), (32, 256, 1, 4, 4), (32, 512, 1, 4, 3), (64, 128, 1, 4, 6),
            (32, 128, 1, 4, 6), (64, 256, 1, 8, 3)],
    "l3": [(32, 128, 4, 4, 4), (64, 128, 4, 4, 4), (32, 256, 2, 4, 4), (64, 256, 2, 4, 4),
           (64, 128, 11, 4, 3), (32, 256, 11, 4, 3)],
}


def weight_shapes(cfg):
    """{kind: (K, N)} of the four products' weights."""
    hidden = cfg.num_heads * cfg.head_dim
    return {"qkvu": (cfg.d_model, 4 * hidden), "out": (hidden, cfg.d_model),
            "glu": (cfg.d_model, cfg.glu_dim), "l3": (cfg.glu_dim, cfg.d_model)}


def tilings_to_try(cfg, smoke):
    """[(kind, tilings of the four products)]: the library's, then each product's candidates in turn."""
    base = {kind: tiling_for(KINDS[kind], *shape) for kind, shape in weight_shapes(cfg).items()}
    candidates = ({kind: [(32, 64, 1 if kind == "glu" else 2, 4, 3)] for kind in KINDS} if smoke
                  else CANDIDATES)
    return [(None, base)] + [(kind, dict(base, **{kind: Tiling(*c)})) for kind in FLAGS.kinds
                             for c in candidates[kind]]


def main(argv):
    del argv
    out_dir = Path(os.environ.get("OUT", "bench_out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "tiny" if FLAGS.smoke else FLAGS.config
    cfg = config_lib.model_config(config_lib.load(str(REPO / "configs" / f"{name}.py")))
    if FLAGS.smoke:
        cfg = cfg.replace(dtype="bfloat16", d_model=256, hidden_dim=256, num_heads=2, glu_dim=512,
                          num_layers=3, lrpe_layers=())
    layers = [i for i in range(cfg.num_layers) if i not in cfg.lrpe_layers]
    meta = dict(date=time.strftime("%Y-%m-%d"), device=jax.devices()[0].device_kind,
                jax_version=jax.__version__, config=name, layers=len(layers), command=" ".join(sys.argv))
    print(json.dumps(meta), flush=True)
    keys = jax.random.split(jax.random.key(0), 3)
    params = random_layers(cfg, layers, keys[0])
    x = jax.random.normal(keys[1], (1, cfg.d_model), jnp.float32).astype(jnp.bfloat16)
    states = tuple(0.1 * jax.random.normal(k, (1, cfg.num_heads, cfg.head_dim, cfg.head_dim), jnp.float32)
                   for k in jax.random.split(keys[2], len(layers)))
    want_x, want_s = f32_reference(cfg, layers, params, x, states)

    def check(fn):
        got_x, got_s = fn(params, x, states)
        return rel_err(got_x, want_x), max(rel_err(a, b) for a, b in zip(got_s, want_s))

    per_layer = 1e3 / len(layers)
    variants = [("xla", jax.jit(xla_stack(cfg, layers)))]
    if not FLAGS.smoke and FLAGS.autotune:
        tuned = jax.jit(xla_stack(cfg, layers)).lower(params, x, states).compile(
            compiler_options={"xla_gpu_exhaustive_tiling_search": True})
        variants.append(("xla autotuned", tuned))
    if decode_hopper.available():  # the Hopper kernels (pallas_kernels.decode_hopper), their tilings
        variants.append(("hopper base", jax.jit(pallas_stack(cfg, layers, {}, "hopper"))))
    tried = tilings_to_try(cfg, FLAGS.smoke)
    variants += [(f"pallas {kind or 'base'} {tilings[kind] if kind else ''}",
                  jax.jit(pallas_stack(cfg, layers, tilings))) for kind, tilings in tried]
    rows, start, xla_err, path = [], time.perf_counter(), None, out_dir / "decode_layer.json"

    def run(row, label, fn):
        """Checks the step fn (against XLA's error once "xla" has run) and times it into row."""
        nonlocal xla_err
        err_x, err_s = check(fn)
        row.update(err_x=err_x, err_state=err_s)
        if label == "xla":
            xla_err = max(err_x, 1e-4)
        elif err_x > max(1.5 * xla_err, 1e-2):
            raise ValueError(f"output error {err_x:.2e} is over 1.5x XLA's {xla_err:.2e} and 1e-2")
        row["wall_us_per_layer"] = per_layer * timing.time_ms(fn, [(params, x, states)])
        trace = profiling.gpu_time(lambda: [fn(params, x, states) for _ in range(20)])
        if "error" not in trace:  # idle: between kernels (XLA_FLAGS, bench/profiling.py)
            row.update(gpu_us_per_layer=per_layer * trace["gpu_ms"] / 20,
                       idle_short_us_per_layer=per_layer * trace["idle_short_ms"] / 20,
                       idle_before_ms=trace["idle_before_ms"],
                       kernels_per_layer=trace["kernels"] / 20 / len(layers),
                       kernel_us_per_layer={n: per_layer * ms / 20 for n, ms in trace["top_kernels_ms"]
                                            if "gemv" in n or "gemm" in n})

    for label, fn in variants:
        if time.perf_counter() - start > FLAGS.budget_s and not label.startswith("xla"):
            report.record(rows, dict(variant=label, error="skipped: --budget_s spent"), path, meta)
            continue
        report.measure(rows, dict(variant=label), functools.partial(run, label=label, fn=fn), path, meta)

    # The best tiling of each kernel (GPU µs from the traces), combined into one step.
    best = dict(tried[0][1])
    for kind, fusion in KINDS.items():
        kernel = "decode_gemv_" + fusion
        timed = [(us, tilings[kind]) for (_, tilings), r in zip(tried, rows[-len(tried):])
                 for n, us in r.get("kernel_us_per_layer", {}).items()
                 if n == kernel or (n.startswith(kernel) and not n[len(kernel)].isalnum())]
        if timed:
            best[kind] = min(timed, key=lambda t: t[0])[1]
    label = "pallas best per kernel"
    report.measure(rows, dict(variant=label, tilings={k: str(t) for k, t in best.items()}),
                   functools.partial(run, label=label, fn=jax.jit(pallas_stack(cfg, layers, best))),
                   path, meta)
    report.table(rows, [("variant", "variant", ">48"), ("err x", "err_x", ">8.1e"),
                        ("wall µs/layer", "wall_us_per_layer", ">14.2f"),
                        ("GPU µs/layer", "gpu_us_per_layer", ">13.2f"),
                        ("idle µs/layer", "idle_short_us_per_layer", ">14.2f"),
                        ("kernels/layer", "kernels_per_layer", ">14.1f")])


if __name__ == "__main__":
    app.run(main)
