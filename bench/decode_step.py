"""The decoding step's state update three ways: XLA's fusion, a Pallas kernel and a raw Triton kernel.

Issue 10 asks for jax-triton (raw Triton-language kernels called from JAX) wherever a raw Triton
kernel measures faster than Pallas, the decoding step being the candidate. This measures that
step's attention part, from the projection's merged output qkvu [batch, 4, heads, head_dim] bf16
(q, k, v, u; `tnllm.model.GatedLinearAttention`) and the float32 state of one layer:

    q, k = silu(q), silu(k);   S <- lambda S + k^T v;   o = q S        (SPEC.md §7)

  xla     the model's code (`tnllm.attention.lightning_attention_step`), which XLA compiles to one
          fusion per layer;
  pallas  `pallas_kernels.decode.state_step` (Triton lowering): one program per (batch, head, value tile)
          reads q, k and its slice of v straight from qkvu, applies the SiLUs and updates its
          [head_dim, block_v] tile of the state in place (input_output_aliases);
  triton  the same program written in the Triton language and called through
          `jax_triton.triton_call`, also in place.

Every variant is first checked against a float64 NumPy step on the inputs it is timed with (o to
SPEC.md §4's bf16 tolerance, the state too, since the model's SiLUs round q and k to bf16). Then
one decoding step of all layers is timed: the 15 layers of the 1B without LRPE (16 heads of 128,
each layer's decay), each layer's qkvu made opaque to the next layer's kernel by an optimization
barrier with the previous layer's o, so that, as in the model, no kernel of one layer is fused
with another's. Reported per layer: GPU busy µs and kernels from a profiler trace of back-to-back
steps, and the wall time of a step (states donated and fed back), at each batch size and for each
block_v and warp count.

    pip install jax-triton==0.3.1           # once, on a GPU machine (not in requirements.txt)
    python3 bench/decode_step.py            # the GPU run (2026-11-28: docs/benchmarks.md)
    python3 bench/decode_step.py --smoke    # tiny shapes on a CPU: xla and pallas (interpret mode)

Prints a line per variant and a table of the best of each kind last; writes $OUT/decode_step.json
(OUT defaults to ./bench_out).
"""
import functools
import itertools
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench import profiling, timing  # noqa: E402
from pallas_kernels.decode import state_step  # noqa: E402
from tnllm.attention import layer_slopes, lightning_attention_step  # noqa: E402

flags.DEFINE_list("batches", ["1", "8", "64"], "Batch sizes.")
flags.DEFINE_list("block_v", ["16", "32", "64", "128"], "Value columns per program (kernels).")
flags.DEFINE_list("num_warps", ["2", "4"], "Warps per program (kernels).")
flags.DEFINE_integer("steps", 50, "Decoding steps per profiled and per timed group.")
flags.DEFINE_bool("smoke", False, "Tiny shapes on a CPU: xla and pallas in interpret mode.")
FLAGS = flags.FLAGS

NUM_LAYERS, HEADS, HEAD_DIM = 16, 16, 128  # the 1B (SPEC.md §5); layer 0 has LRPE and is left out
# SPEC.md §4's bf16 tolerance, for o and for the state: the model's SiLUs round to bf16 before k^T v.
BF16_TOL = 5e-3


# ----------------------------------------------------------------------------------------------
# the three variants: update(qkvu [b, 4, h, d] bf16, state [b, h, d, d] f32) -> (o [b, h, d], state)
# ----------------------------------------------------------------------------------------------
def xla_update(slopes):
    def update(qkvu, state):
        q, k = jax.nn.silu(qkvu[:, 0]), jax.nn.silu(qkvu[:, 1])
        return lightning_attention_step(q, k, qkvu[:, 2], slopes, state)

    return update


def pallas_update(slopes, block_v, num_warps, interpret=False):
    return functools.partial(state_step, slopes=slopes, block_v=block_v, num_warps=num_warps,
                             interpret=interpret)


@functools.lru_cache(maxsize=None)
def _triton_kernel():
    """The raw Triton program (defined lazily: triton and jax-triton exist on the GPU machine only)."""
    import triton
    import triton.language as tl

    @triton.jit
    def decode_step_triton(qkvu_ptr, decrement_ptr, state_ptr, o_ptr, new_state_ptr,
                           HEADS: tl.constexpr, D: tl.constexpr, BLOCK_V: tl.constexpr):
        # Program (batch * heads + head, value tile); qkvu is [batch, 4, heads, D] row-major, the
        # state [batch, heads, D, D] and o [batch, heads, D].
        bh, j = tl.program_id(0), tl.program_id(1)
        b, h = bh // HEADS, bh % HEADS
        rows, cols = tl.arange(0, D), j * BLOCK_V + tl.arange(0, BLOCK_V)
        base = qkvu_ptr + b * 4 * HEADS * D + h * D
        q = tl.load(base + rows).to(tl.float32)
        k = tl.load(base + HEADS * D + rows).to(tl.float32)
        v = tl.load(base + 2 * HEADS * D + cols).to(tl.float32)
        q, k = q * tl.sigmoid(q), k * tl.sigmoid(k)
        tile = bh * D * D + rows[:, None] * D + cols[None, :]
        state = tl.load(state_ptr + tile)
        state = state + (tl.load(decrement_ptr + h) * state + k[:, None] * v[None, :])
        tl.store(new_state_ptr + tile, state)
        o = tl.sum(q[:, None] * state, axis=0)
        tl.store(o_ptr + bh * D + cols, o.to(o_ptr.dtype.element_ty))

    return decode_step_triton


def triton_update(slopes, block_v, num_warps):
    import jax_triton

    def update(qkvu, state):
        batch, _, heads, d = qkvu.shape
        return jax_triton.triton_call(
            qkvu, jnp.expm1(-slopes), state, kernel=_triton_kernel(),
            out_shape=[jax.ShapeDtypeStruct((batch, heads, d), qkvu.dtype),
                       jax.ShapeDtypeStruct(state.shape, jnp.float32)],
            grid=(batch * heads, d // block_v), input_output_aliases={2: 1},
            num_warps=num_warps, num_stages=1, HEADS=heads, D=d, BLOCK_V=block_v)

    return update


# ----------------------------------------------------------------------------------------------
# checking and timing
# ----------------------------------------------------------------------------------------------
def layer_decays(layers, heads):
    """slopes [heads] f32 of each timed layer (the 1B's layers 1..15)."""
    return [np.asarray(layer_slopes(heads, i, NUM_LAYERS), np.float32) for i in layers]


def reference_step(qkvu, slopes, state):
    """float64 NumPy: (o, new state)."""
    x = np.asarray(qkvu, np.float64)
    silu = lambda t: t / (1 + np.exp(-t))  # noqa: E731
    q, k, v = silu(x[:, 0]), silu(x[:, 1]), x[:, 2]
    s = np.asarray(state, np.float64)
    s = s + (np.expm1(-slopes.astype(np.float64))[None, :, None, None] * s
             + k[..., :, None] * v[..., None, :])
    return np.einsum("bhd,bhde->bhe", q, s), s


def rel_rms(x, ref):
    x = np.asarray(x, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def make_inputs(batch, heads, d, layers, seed=0):
    """Per layer: qkvu [batch, 4, heads, d] bf16 and a state [batch, heads, d, d] f32, random."""
    keys = jax.random.split(jax.random.key(seed), 2 * len(layers))
    qkvus = [jax.random.normal(keys[2 * i], (batch, 4, heads, d)).astype(jnp.bfloat16)
             for i in range(len(layers))]
    states = [jax.random.normal(keys[2 * i + 1], (batch, heads, d, d), jnp.float32)
              for i in range(len(layers))]
    return qkvus, states


def check(update, qkvu, slopes, state):
    """Relative RMS errors of o and the new state against the float64 step."""
    ref_o, ref_s = reference_step(qkvu, slopes, state)
    o, s = jax.jit(update)(qkvu, state + 0)  # a copy: the state may be updated in place
    return rel_rms(o, ref_o), rel_rms(s, ref_s)


def decoding_step(updates):
    """One decoding step of all layers, jitted with the states donated: (qkvus, states) ->
    (o of the last layer, new states). Each layer's input waits on the previous layer's o."""

    def step(qkvus, states):
        o, new = None, []
        for update, qkvu, state in zip(updates, qkvus, states):
            if o is not None:  # opaque to fusion, like the products between layers in the model
                qkvu, _ = lax.optimization_barrier((qkvu, o))
            o, state = update(qkvu, state)
            new.append(state)
        return o, new

    return jax.jit(step, donate_argnums=1)


def measure(step, qkvus, states, steps):
    """(GPU trace of `steps` back-to-back decoding steps, wall ms per step as `timing.time_ms`
    times: the states are donated, so each call feeds the last one's states back)."""
    box = [states]

    def run(n):
        o = None
        for _ in range(n):
            o, box[0] = step(qkvus, box[0])
        return o

    wall_ms = timing.time_ms(lambda: run(1), [()])  # compiles and warms up first
    return profiling.gpu_time(lambda: run(steps)), wall_ms


def variants(smoke):
    """(kind, block_v, num_warps, factory(slopes) -> update) of every timed variant."""
    out = [("xla", None, None, xla_update)]
    blocks = [int(b) for b in FLAGS.block_v]
    warps = [int(w) for w in FLAGS.num_warps]
    for bv, nw in itertools.product(blocks, warps):
        out.append(("pallas", bv, nw, functools.partial(pallas_update, block_v=bv, num_warps=nw,
                                                        interpret=smoke)))
        if not smoke:
            out.append(("triton", bv, nw, functools.partial(triton_update, block_v=bv,
                                                            num_warps=nw)))
    return out


def main(_):
    out_dir = Path(os.environ.get("OUT", "bench_out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if FLAGS.smoke:
        FLAGS.batches, FLAGS.block_v, FLAGS.num_warps, FLAGS.steps = ["2"], ["16"], ["4"], 2
        heads, d, layers = 4, 32, [1, 2]
    else:
        heads, d, layers = HEADS, HEAD_DIM, list(range(1, NUM_LAYERS))
    slopes = layer_decays(layers, heads)
    info = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "layers": len(layers), "heads": heads, "head_dim": d}
    print(info, flush=True)
    rows = []
    for batch in [int(b) for b in FLAGS.batches]:
        qkvus, states = make_inputs(batch, heads, d, layers)
        for kind, bv, nw, factory in variants(FLAGS.smoke):
            if bv is not None and d % bv:
                continue
            row = {"batch": batch, "kind": kind, "block_v": bv, "num_warps": nw}
            try:
                updates = [factory(s) for s in slopes]
                err_o, err_s = check(updates[0], qkvus[0], slopes[0], states[0])
                row.update(err_o=err_o, err_state=err_s, passed=max(err_o, err_s) <= BF16_TOL)
                if row["passed"]:
                    trace, wall_ms = measure(decoding_step(updates), qkvus,
                                                [s + 0 for s in states], FLAGS.steps)
                    n = FLAGS.steps * len(layers)
                    row.update(wall_us_per_layer=wall_ms * 1e3 / len(layers))
                    if "error" not in trace:
                        row.update(gpu_us_per_layer=trace["gpu_ms"] * 1e3 / n,
                                   span_us_per_layer=trace["span_ms"] * 1e3 / n,
                                   kernels_per_layer=trace["kernels"] / n,
                                   top_kernels_ms=trace["top_kernels_ms"][:4])
                    else:
                        row.update(trace_error=trace["error"])
            except Exception as e:  # noqa: BLE001 - a variant that fails is recorded, the run goes on
                row.update(error=f"{type(e).__name__}: {str(e)[:400]}")
            rows.append(row)
            print({k: v for k, v in row.items() if k != "top_kernels_ms"}, flush=True)
            (out_dir / "decode_step.json").write_text(json.dumps({**info, "rows": rows}, indent=1))
    # Bytes a layer must move: the state read and written, q/k/v read, o written.
    print("\n| batch | kind | block_v | warps | GPU µs/layer | kernels/layer | wall µs/layer | "
          "state TB/s | o err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch in sorted({r["batch"] for r in rows}):
        for kind in ("xla", "pallas", "triton"):
            timed = [r for r in rows if r["batch"] == batch and r["kind"] == kind
                     and "wall_us_per_layer" in r]
            if not timed:
                failed = [r for r in rows if r["batch"] == batch and r["kind"] == kind]
                if failed:
                    print(f"| {batch} | {kind} | | | failed: {failed[0].get('error', 'check')} | | | | |")
                continue
            r = min(timed, key=lambda r: r.get("gpu_us_per_layer", r["wall_us_per_layer"]))
            gpu_us = r.get("gpu_us_per_layer", float("nan"))  # nan: no GPU trace (--smoke)
            state_bytes = 2 * batch * heads * d * d * 4
            print(f"| {batch} | {kind} | {r['block_v'] or ''} | {r['num_warps'] or ''} | "
                  f"{gpu_us:.2f} | {r.get('kernels_per_layer', float('nan')):.1f} | "
                  f"{r['wall_us_per_layer']:.2f} | {state_bytes / gpu_us / 1e6:.2f} | "
                  f"{r['err_o']:.1e} |")


if __name__ == "__main__":
    app.run(main)
