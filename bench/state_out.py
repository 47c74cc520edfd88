"""The decoding step's recurrence and output projection as one kernel, against the two kernels of
`tnllm.fused_decode` (`state_step`, then `gemv` with the norm, gate and residual).

At batch 1 the 1B's layer runs five kernels, and each kernel boundary drains and refills the weight
stream (bench/NOTES.md, calls 41-56). The output projection's input is the recurrence's output o
(normalised over the whole row, times the gate u). Its norm is one scalar, rsqrt(mean(o^2) + eps),
which can be applied after the product (the model's `fold_norms` form): so a program of the
recurrence, which computes block_v entries of o for one head, can multiply them (times u) by their
block_v rows of W_out itself and add the [1, D] partial product to a float32 sum P atomically,
and its entries' squares to a float32 sum of squares. The next product's prologue (the GLU's norm)
would then take x + rsqrt(ss / H d + eps) P as its row; here XLA computes it after the kernel.

`merged` variants: block_v (o's entries a program), num_warps, and how a program reads its W_out rows:
`whole` (the [block_v, D] tile loaded at the start, next to the state tile, and summed elementwise)
or `loop` (block_d columns a step, through tensor-core dots as `gemv` does). The 1B's 15 layers
without LRPE in one program (each layer its own state and W_out: 126 MB, so no layer finds its
weights in L2), checked against a float64 step; GPU µs a layer of each kernel from a profiler
trace.

    python3 bench/state_out.py            # the GPU run
    python3 bench/state_out.py --smoke    # tiny shapes in interpret mode

Prints a table; writes $OUT/state_out.json (OUT defaults to ./bench_out).
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
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench import profiling, report  # noqa: E402
from pallas_kernels.decode import gemv, recurrence_tile, state_step  # noqa: E402

EPS = 1e-6
# (heads, head_dim, d_model, layers): the 1B's layers without LRPE, and a tiny smoke shape.
SHAPES = {"1b": (16, 128, 2048, 15), "smoke": (2, 32, 64, 2)}
# (block_v, num_warps, form, block_d)
MERGED = [(16, 4, "whole", 0), (16, 8, "whole", 0), (32, 8, "whole", 0), (16, 4, "loop", 256),
          (16, 4, "loop", 512), (32, 4, "loop", 256), (32, 8, "loop", 512)]
SMOKE_MERGED = [(16, 4, "whole", 0), (16, 4, "loop", 32)]

flags.DEFINE_bool("smoke", False, "Tiny shapes, interpret mode.")
FLAGS = flags.FLAGS


def _merged_kernel(dec_ref, q_ref, k_ref, v_ref, u_ref, state_ref, w_ref, p_in, ss_in,
                   new_state_ref, p_ref, ss_ref, *, form, block_d):
    """q, k [d]; v, u [block_v]; state [d, block_v] f32 (aliased to new_state); w [block_v, D]
    (this tile's rows of W_out); p [1, D] and ss [1, 16] f32 sums (aliased), added to."""
    del p_in, ss_in
    f32 = jnp.float32
    if form == "whole":
        w = w_ref[...]  # first, so that its loads are in flight with the state's
    state, o = recurrence_tile(dec_ref[0], q_ref[...], k_ref[...], v_ref[...], state_ref[...])
    new_state_ref[...] = state
    squares = jnp.sum(o * o)
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, 16), 1)
    pl_triton.atomic_add(ss_ref, (pl.ds(0, 1), pl.ds(0, 16)), jnp.where(lane == 0, squares, 0.0))
    row = (o * u_ref[...].astype(f32)).astype(w_ref.dtype)  # the model's fold_norms rounding
    if form == "whole":
        part = jnp.sum(row.astype(f32)[:, None] * w.astype(f32), axis=0)
        pl_triton.atomic_add(p_ref, (pl.ds(0, 1), pl.ds(0, part.shape[0])), part[None, :])
        return
    rows = jnp.broadcast_to(row[None, :], (16, row.shape[0]))

    def step(c, carry):
        cols = pl.ds(pl.multiple_of(c * block_d, block_d), block_d)
        part = jnp.max(jnp.dot(rows, w_ref[:, cols], preferred_element_type=f32), axis=0)
        pl_triton.atomic_add(p_ref, (pl.ds(0, 1), cols), part[None, :])
        return carry

    jax.lax.fori_loop(0, w_ref.shape[1] // block_d, step, 0)


def merged(qkvu, state, slopes, w_out, *, block_v, num_warps, form, block_d, interpret):
    """qkvu [1, 4, H, d] f32; state [1, H, d, d] f32; w_out [H d, D] -> (P [1, D], ss [1, 16],
    new state)."""
    _, _, heads, d = qkvu.shape
    dm = w_out.shape[1]
    row = lambda i: pl.BlockSpec((None, None, None, d), lambda j, h: (0, i, h, 0))  # noqa: E731
    part = lambda i: pl.BlockSpec((None, None, None, block_v), lambda j, h: (0, i, h, j))  # noqa: E731
    tile = pl.BlockSpec((None, None, d, block_v), lambda j, h: (0, h, 0, j))
    whole = lambda n: pl.BlockSpec((1, n), lambda j, h: (0, 0))  # noqa: E731
    new_state, p, ss = pl.pallas_call(
        functools.partial(_merged_kernel, form=form, block_d=block_d),
        grid=(d // block_v, heads),
        in_specs=[pl.BlockSpec((1,), lambda j, h: (h,)), row(0), row(1), part(2), part(3), tile,
                  pl.BlockSpec((block_v, dm), lambda j, h: (h * (d // block_v) + j, 0)),
                  whole(dm), whole(16)],
        out_specs=[tile, whole(dm), whole(16)],
        out_shape=[jax.ShapeDtypeStruct(state.shape, jnp.float32),
                   jax.ShapeDtypeStruct((1, dm), jnp.float32), jax.ShapeDtypeStruct((1, 16), jnp.float32)],
        input_output_aliases={5: 0, 7: 1, 8: 2},
        compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=3),
        interpret=interpret, name="decode_state_out",
    )(jnp.expm1(-slopes), qkvu, qkvu, qkvu, qkvu, state, w_out,
      jnp.zeros((1, dm), jnp.float32), jnp.zeros((1, 16), jnp.float32))
    return p, ss, new_state


def merged_layer(x, qkvu, state, slopes, w_out, **kw):
    p, ss, new_state = merged(qkvu, state, slopes, w_out, **kw)
    scale = jax.lax.rsqrt(ss[0, 0] / (w_out.shape[0]) + EPS)
    return x + scale * p, new_state


def current_layer(x, qkvu, state, slopes, w_out, interpret):
    o, new_state = state_step(qkvu, state, slopes, interpret=interpret)
    return gemv(o.reshape(1, -1), w_out, u=qkvu.reshape(1, -1), u_block=3, residual=x, norm=True,
                eps=EPS, out_dtype=jnp.float32, interpret=interpret), new_state


def stack(layer):
    """All layers in one program, x flowing through them."""
    def fn(x, qkvus, states, slopes, w_outs):
        new = []
        for qkvu, s, w in zip(qkvus, states, w_outs):
            x, s = layer(x, qkvu, s, slopes, w)
            new.append(s)
        return x, new
    return fn


def reference(x, qkvus, states, slopes, w_outs):
    """float64 numpy."""
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    x, lam, new = f(x), np.exp(-f(slopes))[:, None, None], []
    silu = lambda t: t / (1 + np.exp(-t))  # noqa: E731
    for qkvu, s, w in zip(qkvus, states, w_outs):
        qkvu = f(qkvu)[0]
        q, k, v, u = silu(qkvu[0]), silu(qkvu[1]), qkvu[2], qkvu[3]
        s = lam * f(s)[0] + k[:, :, None] * v[:, None, :]
        o = np.einsum("hd,hde->he", q, s).reshape(1, -1)
        x = x + (o / np.sqrt(np.mean(o * o) + EPS) * u.reshape(1, -1)) @ f(w.astype(jnp.float32))
        new.append(s[None])
    return x, new


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(argv):
    del argv
    out_dir = Path(os.environ.get("OUT", "bench_out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    interpret = FLAGS.smoke
    heads, d, dm, layers = SHAPES["smoke" if FLAGS.smoke else "1b"]
    meta = dict(date=time.strftime("%Y-%m-%d"), device=jax.devices()[0].device_kind,
                jax_version=jax.__version__, command=" ".join(sys.argv), shape=[heads, d, dm, layers])
    print(json.dumps(meta), flush=True)
    keys = jax.random.split(jax.random.key(0), 3 * layers + 1)
    x = jax.random.normal(keys[-1], (1, dm), jnp.float32)
    qkvus = [jax.random.normal(keys[i], (1, 4, heads, d), jnp.float32) for i in range(layers)]
    states = [0.1 * jax.random.normal(keys[layers + i], (1, heads, d, d), jnp.float32) for i in range(layers)]
    w_outs = [(jax.random.normal(keys[2 * layers + i], (heads * d, dm), jnp.float32) / np.sqrt(heads * d))
              .astype(jnp.bfloat16) for i in range(layers)]
    slopes = jnp.linspace(0.01, 0.5, heads, dtype=jnp.float32)
    want_x, want_s = reference(x, qkvus, states, slopes, w_outs)
    variants = [("current (2 kernels)", functools.partial(current_layer, interpret=interpret))]
    for bv, nw, form, bd in (SMOKE_MERGED if FLAGS.smoke else MERGED):
        variants.append((f"merged {form} bv{bv} w{nw}" + (f" bd{bd}" if bd else ""),
                         functools.partial(merged_layer, block_v=bv, num_warps=nw, form=form,
                                           block_d=bd, interpret=interpret)))
    rows = []
    for name, layer in variants:
        def run(row, layer=layer):
            fn = jax.jit(stack(layer))
            got_x, got_s = fn(x, qkvus, states, slopes, w_outs)
            row.update(err_x=rel(got_x - x, want_x - np.asarray(x, np.float64)),
                       err_state=max(rel(a, b) for a, b in zip(got_s, want_s)))
            if row["err_x"] > 1e-2 or row["err_state"] > 1e-5:
                raise ValueError(f"wrong: errors {row['err_x']:.2e}, {row['err_state']:.2e}")
            if FLAGS.smoke:
                return
            trace = profiling.gpu_time(lambda: [fn(x, qkvus, states, slopes, w_outs) for _ in range(10)])
            row.update(profiling.per_call(trace, 10 * layers, "layer"))
            row["kernel_us_per_layer"] = {n: 1e3 * ms / (10 * layers) for n, ms in trace.get("top_kernels_ms", [])}

        report.measure(rows, dict(variant=name), run, out_dir / "state_out.json", meta)
    report.table(rows, [("variant", "variant", ">28"), ("err x", "err_x", ">8.1e"),
                        ("GPU µs/layer", "gpu_us_per_layer", ">13.2f"),
                        ("kernels/layer", "kernels_per_layer", ">14.1f")])


if __name__ == "__main__":
    app.run(main)
