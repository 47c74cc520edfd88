"""Pallas Lightning Attention kernels against the float32 reference form (docs/spec.md §4).

On a machine without a GPU the kernels run in interpret mode; on a GPU the same tests check the
compiled kernels (bench/kernels.py runs them there before timing anything). Shapes are small and
chunks short so that every case has several chunks and a ragged last one.
"""
import dataclasses
import warnings

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import lightning, lightning_hopper
from tnllm import attention
from tnllm.config import ModelConfig
from tnllm.model import TransNormerLLM
from tnllm.testing import rel_err

F32_TOL = 1e-5  # docs/spec.md §4, float32 forms
BF16_TOL = 5e-3  # docs/spec.md §4, bf16 inputs against the float32 reference


def random_inputs(seed, batch, seq, heads, dk, dv, dtype, with_state):
    """q, k, v, slopes, initial state and the two output cotangents, all representable in dtype."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    # silu-like features (the model's q, k) and slopes spanning fast to almost no decay.
    q = jax.nn.silu(jax.random.normal(keys[0], (batch, seq, heads, dk))).astype(dtype)
    k = jax.nn.silu(jax.random.normal(keys[1], (batch, seq, heads, dk))).astype(dtype)
    v = jax.random.normal(keys[2], (batch, seq, heads, dv)).astype(dtype)
    slopes = attention.alibi_slopes(heads)
    s0 = jax.random.normal(keys[3], (batch, heads, dk, dv)) if with_state else None
    do = jax.random.normal(keys[4], (batch, seq, heads, dv)).astype(dtype).astype(jnp.float32)
    d_final = jax.random.normal(keys[5], (batch, heads, dk, dv))
    return q, k, v, slopes, s0, do, d_final


def value_and_grads(attn, q, k, v, s0, do, d_final):
    """(o, final state) of attn(q, k, v, s0) and the gradients of <o, do> + <final, d_final>
    w.r.t. q, k, v (and s0)."""

    def loss(q, k, v, s0):
        o, final = attn(q, k, v, s0)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(final * d_final), (o, final)

    argnums = (0, 1, 2, 3) if s0 is not None else (0, 1, 2)
    grads, outs = jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))(q, k, v, s0)
    return outs, grads


def impl_attention(impl, slopes, chunk_size):
    def attn(q, k, v, s0):
        return attention.lightning_attention(q, k, v, slopes, impl=impl, chunk_size=chunk_size,
                                             initial_state=s0)
    return attn


def assert_matches_reference(outs, grads, q, k, v, slopes, s0, do, d_final):
    """Outputs and gradients against the float32 reference form on the same (upcast) inputs."""
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    reference = lambda q, k, v, s0: lightning.lightning_reference(q, k, v, slopes, s0)  # noqa: E731
    (o_ref, final_ref), grads_ref = value_and_grads(reference, *up, s0, do, d_final)
    (o, final) = outs
    tol = F32_TOL if q.dtype == jnp.float32 else BF16_TOL
    assert o.shape == o_ref.shape and o.dtype == q.dtype
    assert final.shape == final_ref.shape and final.dtype == jnp.float32
    assert rel_err(o, o_ref) <= tol
    assert rel_err(final, final_ref) <= tol
    names = ("dq", "dk", "dv", "d_initial_state")
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert g.shape == g_ref.shape, name
        assert rel_err(g, g_ref) <= tol, (name, rel_err(g, g_ref))


CASES = [
    # batch, seq, heads, dk, dv, dtype, initial state, chunk
    pytest.param(2, 50, 2, 64, 64, jnp.float32, True, 16, id="f32-d64-ragged-state"),
    pytest.param(1, 37, 2, 64, 32, jnp.float32, False, 16, id="f32-dk64-dv32-ragged"),
    pytest.param(1, 45, 2, 256, 128, jnp.bfloat16, True, 16, id="bf16-dk256-dv128-ragged-state"),
    pytest.param(1, 64, 3, 32, 64, jnp.bfloat16, False, 32, id="bf16-dk32-dv64-exact-chunks"),
]


@pytest.mark.parametrize("batch,seq,heads,dk,dv,dtype,with_state,chunk", CASES)
def test_outputs_states_and_gradients_match_reference(batch, seq, heads, dk, dv, dtype, with_state,
                                                      chunk):
    q, k, v, slopes, s0, do, d_final = random_inputs(0, batch, seq, heads, dk, dv, dtype, with_state)
    outs, grads = value_and_grads(impl_attention("pallas", slopes, chunk), q, k, v, s0, do, d_final)
    assert outs[1].shape == (batch, heads, dk, dv)
    assert_matches_reference(outs, grads, q, k, v, slopes, s0, do, d_final)


@pytest.mark.parametrize("batch,seq,heads,dk,dv,dtype,with_state,segments", [
    pytest.param(2, 50, 2, 32, 32, jnp.float32, True, 3, id="f32-ragged-state-3-segments"),
    pytest.param(1, 37, 1, 16, 16, jnp.float32, False, 8, id="f32-segments-past-the-end"),
    pytest.param(1, 100, 2, 64, 32, jnp.bfloat16, True, 4, id="bf16-dk64-dv32-state-4-segments"),
])
def test_sequence_segments_match_reference(batch, seq, heads, dk, dv, dtype, with_state, segments):
    """The sequence split across programs (entering states from the segments' own states) gives
    the same outputs, final state and gradients as one sweep, also with padding segments."""
    q, k, v, slopes, s0, do, d_final = random_inputs(5, batch, seq, heads, dk, dv, dtype, with_state)
    plan = dataclasses.replace(lightning.default_plan(dk, dv, 16), segments=segments)

    def attn(q, k, v, s0):
        return lightning.lightning_attention(q, k, v, slopes, initial_state=s0, plan=plan)

    outs, grads = value_and_grads(attn, q, k, v, s0, do, d_final)
    assert_matches_reference(outs, grads, q, k, v, slopes, s0, do, d_final)


def test_default_segments_follow_the_cost_model():
    # Few programs on 132 multiprocessors: split until one wave (measured fastest).
    assert lightning.default_segments(16, 512, 132) == 8  # the 385M at batch 1, 32K tokens
    assert lightning.default_segments(32, 512, 132) == 4  # the 1B likewise
    assert lightning.default_segments(64, 256, 132) == 2  # B=2, H=16, two value tiles, 16K
    # A full wave or more already: the states pass would cost more than the idle SMs.
    assert lightning.default_segments(128, 32, 132) == 1
    assert lightning.default_segments(192, 128, 132) == 1
    # Too few chunks to split, and the shortest segment of MIN_SEGMENT_CHUNKS chunks.
    assert lightning.default_segments(16, 7, 132) == 1
    assert lightning.default_segments(1, 4 * lightning.MIN_SEGMENT_CHUNKS, 132) == 4
    # No GPU (one "multiprocessor"): never split.
    assert lightning.default_segments(1, 1024, 1) == 1


def test_default_plan_fits_shared_memory_and_fills_waves():
    h100 = dict(multiprocessors=132, shared_memory=232448)
    # The kernels' shapes at bf16: the pipeline 4 chunks deep (4 x 40 KiB of q, k, v) ...
    plan = lightning.default_plan(128, 128, batch_heads=4 * 64, seq_len=4096, **h100)
    assert (plan.fwd.block_v, plan.fwd.num_warps, plan.fwd.num_stages, plan.segments) == (64, 4, 4, 1)
    # ... except when 192 programs would leave a second wave 45 % full: two per multiprocessor.
    plan = lightning.default_plan(128, 128, batch_heads=96, seq_len=8192, **h100)
    assert plan.fwd.num_stages == plan.dv.num_stages == 2 and plan.segments == 1
    # Few programs: the sequence is split, and the split programs fill one wave.
    plan = lightning.default_plan(128, 128, batch_heads=2 * 16, seq_len=16384, **h100)
    assert plan.segments == 2 and plan.fwd.num_stages == 4
    # Larger chunks of q, k, v (key dim 256, float32) take fewer stages within shared memory.
    for dk, dv, itemsize in ((256, 128, 2), (128, 128, 4), (256, 128, 4)):
        plan = lightning.default_plan(dk, dv, itemsize=itemsize, **h100)
        for blocks, key_dim in ((plan.fwd, dk), (plan.dq, dv), (plan.dk, dv), (plan.dv, dk)):
            stage_bytes = blocks.chunk * (2 * key_dim + blocks.block_v) * itemsize
            assert 1 <= blocks.num_stages and blocks.num_stages * stage_bytes <= 232448
    assert lightning.default_plan(256, 128, **h100).fwd.num_stages == 3


def test_single_token_and_many_heads():
    """seq = 1 (a chunk that is almost all padding) and batch x heads = 24 programs."""
    for batch, seq, heads in ((1, 1, 1), (2, 19, 12)):
        q, k, v, slopes, s0, _, _ = random_inputs(1, batch, seq, heads, 16, 16, jnp.float32, True)
        o, final = lightning.lightning_attention(q, k, v, slopes, initial_state=s0, chunk_size=16)
        o_ref, final_ref = lightning.lightning_reference(q, k, v, slopes, s0)
        assert rel_err(o, o_ref) <= F32_TOL
        assert rel_err(final, final_ref) <= F32_TOL


def test_prefill_then_continue_equals_one_pass():
    """The final state of a prefix, fed back as the initial state, continues the sequence exactly."""
    q, k, v, slopes, _, _, _ = random_inputs(2, 1, 40, 2, 32, 32, jnp.float32, False)
    o_all, final_all = lightning.lightning_attention(q, k, v, slopes, chunk_size=16)
    o_head, state = lightning.lightning_attention(q[:, :23], k[:, :23], v[:, :23], slopes,
                                                  chunk_size=16)
    o_tail, final = lightning.lightning_attention(q[:, 23:], k[:, 23:], v[:, 23:], slopes,
                                                  chunk_size=16, initial_state=state)
    assert rel_err(jnp.concatenate([o_head, o_tail], axis=1), o_all) <= F32_TOL
    assert rel_err(final, final_all) <= F32_TOL


def test_model_with_pallas_matches_blockwise_under_jit_and_grad():
    """impl="pallas" through the model: LRPE layer 0 (dk = 2 dv) and a plain layer, ragged seq."""
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, glu_dim=64, chunk_size=16)
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 21), 0, cfg.vocab_size)
    params = TransNormerLLM(cfg).init(jax.random.PRNGKey(5), tokens)["params"]

    def loss(params, impl):
        model = TransNormerLLM(cfg.replace(attention_impl=impl))
        logits, states = model.apply({"params": params}, tokens)
        return jnp.mean(logits**2) + sum(jnp.mean(s) for s in states)

    value, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, "pallas")
    value_ref, grads_ref = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, "blockwise")
    assert abs(float(value) - float(value_ref)) <= F32_TOL * abs(float(value_ref))
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        assert rel_err(g, g_ref) <= F32_TOL


def test_interpret_mode_warns_once_without_gpu():
    q, k, v, slopes, _, _, _ = random_inputs(3, 1, 16, 1, 16, 16, jnp.float32, False)
    lightning._warn_interpret.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            lightning.lightning_attention(q, k, v, slopes, chunk_size=16)
    interpret_warnings = [w for w in caught if "interpret mode" in str(w.message)]
    assert len(interpret_warnings) == (0 if jax.default_backend() == "gpu" else 1)


@pytest.mark.parametrize("change,match", [
    (dict(dtype=jnp.float16), "bfloat16 or float32"),
    (dict(v_dtype=jnp.float32), "one dtype"),
    (dict(dk=48), "dk"),
    (dict(dv=512), "dv"),
    (dict(chunk=48), "chunk_size"),
    (dict(seq=0), "at least one token"),
    (dict(segments=0), "segments"),
])
def test_unsupported_inputs_fail_with_a_clear_error(change, match):
    shape = dict(seq=8, dk=16, dv=16, chunk=16, dtype=jnp.bfloat16)
    shape.update(change)
    q = jnp.ones((1, shape["seq"], 2, shape["dk"]), shape["dtype"])
    v = jnp.ones((1, shape["seq"], 2, shape["dv"]), change.get("v_dtype", shape["dtype"]))
    plan = None
    if "segments" in change:
        plan = dataclasses.replace(lightning.default_plan(16, 16, 16), segments=change["segments"])
    with pytest.raises(ValueError, match=match):
        lightning.lightning_attention(q, q, v, attention.alibi_slopes(2), chunk_size=shape["chunk"],
                                      plan=plan)


# ----------------------------------------------------------------------------------------------
# the Mosaic GPU kernels (pallas_kernels.lightning_hopper), selected by Plan.kernel
# ----------------------------------------------------------------------------------------------
MOSAIC_CASES = [
    # batch, seq, heads, dk, dv, initial state, segments (None: default_segments)
    pytest.param(2, 1000, 4, 128, 128, True, None, id="ragged-state"),
    pytest.param(2, 1000, 4, 128, 128, True, 4, id="ragged-state-4-segments"),
    pytest.param(1, 777, 3, 64, 64, False, None, id="d64-ragged"),
    pytest.param(2, 1000, 4, 256, 128, True, 2, id="dk256-dv128-state-2-segments"),
    pytest.param(1, 500, 4, 64, 128, True, 3, id="dk64-dv128-state-3-segments"),
]


def mosaic_attention(slopes, batch, seq, heads, dk, dv, segments, interpret=None):
    plan = lightning.default_plan(dk, dv, 64, batch_heads=batch * heads, seq_len=seq,
                                  kernel="mosaic")
    plan = dataclasses.replace(plan, segments=segments)

    def attn(q, k, v, s0):
        return lightning.lightning_attention(q, k, v, slopes, initial_state=s0, plan=plan,
                                             interpret=interpret)
    return attn


@pytest.mark.gpu
@pytest.mark.parametrize("batch,seq,heads,dk,dv,with_state,segments", MOSAIC_CASES)
def test_mosaic_kernels_match_reference(batch, seq, heads, dk, dv, with_state, segments):
    """Compiled on a Hopper GPU: outputs, final state and gradients of every sweep (forward, the
    segments' states pass, dQ, dK, dV) against the float32 reference."""
    q, k, v, slopes, s0, do, d_final = random_inputs(11, batch, seq, heads, dk, dv, jnp.bfloat16,
                                                     with_state)
    attn = mosaic_attention(slopes, batch, seq, heads, dk, dv, segments)
    outs, grads = value_and_grads(attn, q, k, v, s0, do, d_final)
    assert_matches_reference(outs, grads, q, k, v, slopes, s0, do, d_final)


@pytest.mark.parametrize("batch,seq,heads,dk,dv,with_state,segments", MOSAIC_CASES)
def test_mosaic_kernels_lower_for_gpus(batch, seq, heads, dk, dv, with_state, segments):
    """Without a GPU: forward and backward lower to Mosaic GPU kernels alone (Pallas's CPU
    interpreter does not run these kernels; what it cannot check, the GPU test above does)."""
    q, k, v, slopes, s0, do, d_final = random_inputs(11, batch, seq, heads, dk, dv, jnp.bfloat16,
                                                     with_state)
    attn = mosaic_attention(slopes, batch, seq, heads, dk, dv, segments, interpret=False)

    def loss(q, k, v, s0):
        o, final = attn(q, k, v, s0)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(final * d_final)

    argnums = (0, 1, 2, 3) if with_state else (0, 1, 2)
    text = jax.jit(jax.value_and_grad(loss, argnums=argnums)).trace(q, k, v, s0).lower(
        lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if "stablehlo.custom_call" in line]
    # forward (and its states pass), dQ, dK, dV (and their states pass)
    assert sum("mosaic_gpu" in line for line in calls) >= 4
    assert not any("triton" in line for line in calls)


@pytest.mark.parametrize("change,match", [
    (dict(dtype=jnp.float32), "bf16"),
    (dict(dk=32), "multiples of 64"),
    (dict(interpret=True), "compiled on a Hopper GPU"),
])
def test_mosaic_plan_refuses_what_it_cannot_run(change, match):
    shape = dict(dk=64, dtype=jnp.bfloat16)
    shape.update(change)
    q = jnp.ones((1, 70, 2, shape["dk"]), shape["dtype"])
    plan = lightning.default_plan(shape["dk"], shape["dk"], 64, kernel="mosaic")
    with pytest.raises(ValueError, match=match):
        lightning.lightning_attention(q, q, q, attention.alibi_slopes(2), plan=plan,
                                      interpret=change.get("interpret", False))


def test_the_default_plan_takes_the_mosaic_kernels_only_on_hopper():
    """On a CPU (and GPUs before Hopper) the default plan keeps the Triton-lowering kernels."""
    q = jnp.ones((1, 70, 2, 128), jnp.bfloat16)
    assert lightning.default_kernel(q, q, q, 64, interpret=False) == (
        "mosaic" if lightning_hopper.available() else "triton")
    assert lightning.default_kernel(q, q, q, 64, interpret=True) == "triton"
    assert lightning.default_kernel(q.astype(jnp.float32), q, q, 64, interpret=False) == "triton"


_NO_TRITON = '''
import sys, warnings
sys.modules["jax.experimental.pallas.triton"] = None  # JAX without Pallas's Triton backend
import jax.numpy as jnp
import pallas_kernels
from pallas_kernels import lightning, lightning_hopper
from tnllm import attention, config
from tnllm.decode import loop
assert not pallas_kernels.TRITON
attention.pallas_compiles = loop.pallas_compiles = lambda: True  # as on a GPU
q = jnp.ones((1, 8, 2, 16), jnp.bfloat16)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    print([attention.choose_impl("gla", "auto", q, q, q) for _ in range(2)])
print(sum("Triton backend" in str(w.message) for w in caught))
print(loop.DecodeOptions().resolve(config.ModelConfig(dtype="bfloat16"), 1).fused)
for call in (lambda: lightning.lightning_attention(q, q, q, attention.alibi_slopes(2)),
             lambda: loop.DecodeOptions(fused=True).resolve(config.ModelConfig(dtype="bfloat16"), 1)):
    try:
        call()
    except ValueError as e:
        print(e)
'''


def test_without_the_triton_backend_auto_falls_back_with_one_warning():
    """A JAX without Pallas's Triton backend (deprecated in 0.11): the library imports, "auto"
    runs the blockwise form after one warning, the fused decoding step is not chosen, and asking
    for the Triton kernels gives one sentence."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _NO_TRITON], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == "['blockwise', 'blockwise']"
    assert out[1] == "1"  # one warning, however often "auto" is resolved
    assert out[2] == "False"
    assert out[3].startswith("impl='pallas' cannot run: this JAX has no Pallas Triton backend")
    assert "DecodeOptions(fused=True) cannot decode this: this JAX has no Pallas Triton" in out[4]
    assert len(out) == 5
