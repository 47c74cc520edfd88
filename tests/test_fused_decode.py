"""The fused one-row decoding step: its GEMV kernels against plain products, and the step and the
decoding loop against the float32 model (interpret mode on a CPU, compiled on a GPU)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from pallas_kernels import decode_hopper
from pallas_kernels.decode import (Tiling, fusion_kwargs, gemv, gemv_reference, state_step,
                                    tiling_for)
from pallas_kernels.decode_hopper import HopperTiling
from tnllm import config
from tnllm.attention import lightning_attention_step
from tnllm.decode import (DecodeOptions, Sampling, decode, decode_step, fused, left_pad, prefill,
                          prompt_bucket)
from tnllm.generate import serving_params
from tnllm.model import TransNormerLLM
from tnllm.sampling import Greedy

# tiny with LRPE in layer 0 and head_dim 32; bf16 as served; init_std as in test_generate.
CFG = config.model_config(config.load("configs/tiny.py")).replace(chunk_size=8, init_std=0.3,
                                                                   dtype="bfloat16")
F32 = CFG.replace(dtype="float32")
PROMPT = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


def _row(shape, key):
    return jax.random.normal(key, shape, jnp.float32)


def _operands(k, n, seed):
    keys = jax.random.split(jax.random.key(seed), 5)
    x, u, res = _row((1, k), keys[0]), _row((1, k), keys[1]), _row((1, n), keys[2])
    w, w2 = ((_row((k, n), key) / 16).astype(jnp.bfloat16) for key in keys[3:])
    return x, u, res, w, w2


FUSIONS = [("n", 1), ("n", 2), ("ngr", 1), ("ngr", 2), ("n2", 1), ("r", 1), ("r", 2)]


# The GLU's product of two sums cannot split K (test_gemv_refuses_what_it_cannot_tile).
@pytest.mark.parametrize("fusion, split", FUSIONS)
def test_gemv_fusions_equal_their_plain_products(fusion, split):
    x, u, res, w, w2 = _operands(256, 128, split)
    kwargs = fusion_kwargs(fusion, u=u, w2=w2, residual=res)
    got = gemv(x, w, **kwargs, tiling=Tiling(32, 64, split, 4, 2))
    # A program that sums all of K (split 1) scales the sums by the norm's scale.
    want = gemv_reference(x, w, **kwargs, scale_sums=split == 1)
    assert got.shape == (1, 128) and got.dtype == jnp.float32
    assert rel_err(got, want) < 1e-5


# A gate with 128 x 128 tiles is refused (test_hopper_gemv_refuses_what_it_cannot_tile).
HOPPER_CASES = [(fusion, split, block_n, block_k, form) for fusion, split in FUSIONS
                for block_n, block_k in [(64, 64), (128, 64), (64, 128), (128, 128)]
                for form in ("m64", "n8")
                if not ("g" in fusion and block_n == block_k == 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("fusion, split, block_n, block_k, form", HOPPER_CASES)
def test_hopper_gemv_fusions_equal_their_plain_products(fusion, split, block_n, block_k, form):
    """K = 768: 12 or 6 steps of 64 rows a block, 6 or 3 of 128; N = 384: six or three column
    blocks; 2 stages (128 x 128 tiles of two GLU weights fill shared memory at 3)."""
    x, u, res, w, w2 = _operands(768, 384, split)
    kwargs = fusion_kwargs(fusion, u=u, w2=w2, residual=res)
    got = decode_hopper.gemv(x, w, **kwargs, tiling=HopperTiling(block_n, block_k, split, 2, form))
    want = gemv_reference(x, w, **kwargs, scale_sums=True)  # the Hopper kernel always scales the sums
    assert got.shape == (1, 384) and got.dtype == jnp.float32
    assert rel_err(got, want) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("block_n, block_k, form", [(64, 64, "m64"), (128, 128, "m64"), (64, 128, "n8"),
                                                    (256, 64, "n8")])
def test_hopper_gemv_reads_a_weight_stored_transposed(block_n, block_k, form):
    """The output head: SRMSNorm(x) @ E^T, the embedding E [N, K] read as it is stored."""
    x, _, _, w, _ = _operands(768, 512, 3)
    got = decode_hopper.gemv(x, jnp.asarray(w.T), norm=True, transposed=True,
                             tiling=HopperTiling(block_n, block_k, 1, 2, form))
    assert rel_err(got, gemv_reference(x, w, norm=True, scale_sums=True)) < 1e-5


@pytest.mark.gpu
def test_hopper_gemv_reads_the_gate_from_a_block_of_a_wider_row():
    k, n = 256, 128
    x, _, res, w, _ = _operands(k, n, 5)
    wide = _row((1, 4 * k), jax.random.key(6))
    got = decode_hopper.gemv(x, w, u=wide, u_block=3, residual=res, norm=True)
    want = decode_hopper.gemv(x, w, u=wide[:, 3 * k:], residual=res, norm=True)
    assert rel_err(got, want) < 1e-6


def test_hopper_tilings_fall_back_where_the_kernel_cannot_run():
    """Products the Hopper kernels cannot take go to the Triton ones (`fused.layer_step`)."""
    assert decode_hopper.tiling_for("ngr", 2048, 2048) == HopperTiling(128, 64, 8, 4, "n8")
    assert decode_hopper.tiling_for("ngr", 2048, 192) == HopperTiling(64, 64, 8, 4, "n8")  # N of 3 x 64
    assert decode_hopper.tiling_for("n", 64, 256) is None  # one step of 64 rows
    assert decode_hopper.tiling_for("r", 96, 256) is None  # K not a multiple of 64
    big = decode_hopper.tiling_for("r", 4096 * 16, 2048)  # the float32 row fills shared memory
    assert big is None and not decode_hopper.supports((1, 4096 * 16), (4096 * 16, 2048), "r")
    t = decode_hopper.tiling_for("r", 4096, 2048)
    assert decode_hopper.smem_bytes(t, 4096, "r") <= decode_hopper.SMEM_BYTES


def test_hopper_gemv_refuses_what_it_cannot_tile():
    x, w = jnp.ones((1, 256)), jnp.ones((256, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="block_n must divide N"):
        decode_hopper.gemv(x, w, tiling=HopperTiling(256, 64))
    with pytest.raises(ValueError, match="use 2 to that many"):
        decode_hopper.gemv(x, w, tiling=HopperTiling(64, 128, 1, 4))
    with pytest.raises(ValueError, match="use split=1"):
        decode_hopper.gemv(x, w, w2=w, tiling=HopperTiling(64, 64, 2, 2))
    with pytest.raises(ValueError, match="streams bf16 weights"):
        decode_hopper.gemv(x, w.astype(jnp.float32))
    with pytest.raises(ValueError, match="multiples of 64"):
        decode_hopper.gemv(jnp.ones((1, 96)), jnp.ones((96, 128), jnp.bfloat16))
    with pytest.raises(ValueError, match=r"w \[N, K\]"):  # w [K, N] passed as transposed
        decode_hopper.gemv(x, jnp.ones((256, 128), jnp.bfloat16), transposed=True)
    with pytest.raises(ValueError, match="use 'm64' or 'n8'"):
        decode_hopper.gemv(x, w, tiling=HopperTiling(64, 64, 1, 2, "m8"))
    with pytest.raises(ValueError, match="bytes of shared memory"):  # the row's 256 KB in float32
        decode_hopper.gemv(jnp.ones((1, 65536)), jnp.ones((65536, 64), jnp.bfloat16),
                           tiling=HopperTiling(64, 64, 1, 2))
    with pytest.raises(ValueError, match="with a gate gives wrong sums"):
        decode_hopper.gemv(x, w, u=x, tiling=HopperTiling(128, 128, 1, 2))


def test_gemv_refuses_what_it_cannot_tile():
    x, w = jnp.ones((1, 256)), jnp.ones((256, 96), jnp.bfloat16)
    with pytest.raises(ValueError, match="block_n must divide N"):
        gemv(x, w, tiling=Tiling(64, 64))
    with pytest.raises(ValueError, match="use split=1"):
        gemv(x, w, w2=w, tiling=Tiling(32, 64, 2))
    with pytest.raises(ValueError, match="one row"):
        gemv(jnp.ones((2, 256)), w)


@pytest.mark.parametrize("name", ["385m", "1b", "3b", "7b"])
def test_every_released_product_has_a_tiling(name):
    cfg = config.model_config(config.load(f"configs/{name}.py"))
    hidden = cfg.num_heads * cfg.head_dim
    for fusion, k, n in (("n", cfg.d_model, 4 * hidden), ("ngr", hidden, cfg.d_model),
                         ("n2", cfg.d_model, cfg.glu_dim), ("r", cfg.glu_dim, cfg.d_model)):
        t = tiling_for(fusion, k, n)
        assert n % t.block_n == 0 and k % (t.split * t.block_k) == 0 and t.block_k >= 16
        assert fusion != "n2" or t.split == 1
        h = decode_hopper.tiling_for(fusion, k, n)  # every released shape runs on the Hopper kernels
        steps = k // (h.split * h.block_k)
        assert n % h.block_n == 0 and k % (h.split * h.block_k) == 0 and 2 <= h.stages <= steps
        assert fusion != "n2" or h.split == 1


@pytest.fixture(scope="module")
def params():
    variables = jax.jit(TransNormerLLM(CFG).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    return serving_params(nn.unbox(variables)["params"], CFG)  # bf16 weights, float32 LRPE angles


@pytest.fixture(scope="module")
def prefilled(params):
    tokens, mask = left_pad(PROMPT, prompt_bucket(len(PROMPT[0]), 8))
    return prefill(params, tokens, mask, cfg=CFG, prefill_chunk=8)


def test_fused_step_is_closer_to_the_float32_model_than_the_bf16_model(params, prefilled):
    """One step after an 11-token prompt (LRPE layer included): logits and every layer's state."""
    token, pos = jnp.asarray([17]), prefilled.positions
    f32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    want, want_states = decode_step(f32, token, pos, prefilled.states, cfg=F32)
    bf16, bf16_states = decode_step(params, token, pos, prefilled.states, cfg=CFG, copies=2)
    got, got_states = jax.jit(fused.step, static_argnames="cfg")(params, token, pos,
                                                                prefilled.states, cfg=CFG)
    assert got.shape == want.shape and got.dtype == jnp.float32
    assert rel_err(got, want) < min(1e-2, rel_err(bf16, want))
    for g, b, w in zip(got_states, bf16_states, want_states):
        assert g.shape == w.shape
        assert rel_err(g, w) < max(rel_err(b, w), 1e-5) + 1e-5


def test_fused_decoding_is_as_close_to_the_float32_model_as_the_bf16_model(params, prefilled):
    """Eight greedy tokens through the decoding loop (positions and states carried between steps),
    fused and through the model's bf16 layers: the log-probabilities of the chosen tokens against
    the float32 model's on the generated sequence."""
    f32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    errors = []
    for on in (True, False):
        out = jax.device_get(decode(params, prefilled, jax.random.key(0), cfg=CFG,
                                    sampling=Sampling(8, Greedy(), return_logprobs=True),
                                    options=DecodeOptions(fused=on)))
        sequence = jnp.asarray([PROMPT[0] + out.tokens[0].tolist()])
        logits = TransNormerLLM(F32).apply({"params": f32}, sequence)[0][0, len(PROMPT[0]) - 1:-1]
        logprobs = np.asarray(jax.nn.log_softmax(logits))
        chosen = np.take_along_axis(logprobs, out.tokens[0][:, None], -1)[:, 0]
        errors.append(np.abs(out.logprobs[0] - chosen).max())
        assert len(np.unique(out.tokens)) > 3
    assert errors[0] < max(1.5 * errors[1], 1e-2), errors


@pytest.mark.parametrize("cfg, rows, match", [(CFG, 2, "the batch has 2 rows"),
                                              (F32, 1, "config.model.dtype is 'float32'")])
def test_fused_decoding_refuses_what_it_cannot_run(params, cfg, rows, match):
    tokens, mask = left_pad(PROMPT * rows, 16)
    pre = prefill(params, tokens, mask, cfg=cfg, prefill_chunk=8)
    with pytest.raises(ValueError, match=match):
        decode(params, pre, jax.random.key(0), cfg=cfg, sampling=Sampling(2),
               options=DecodeOptions(fused=True))


def test_fused_step_refuses_unknown_kernels(params, prefilled):
    with pytest.raises(ValueError, match="choose one of"):
        fused.step(params, jnp.asarray([17]), prefilled.positions, prefilled.states, cfg=CFG,
                   kernels="cuda")
    if not decode_hopper.available():
        with pytest.raises(ValueError, match="compute capability 9.0"):
            fused.step(params, jnp.asarray([17]), prefilled.positions, prefilled.states,
                       cfg=CFG, kernels="hopper")


@pytest.mark.gpu
def test_hopper_step_is_as_close_to_the_float32_model_as_the_triton_step():
    """One step after the prompt with every product and the head on the Hopper kernels (d_model
    128: K >= 128)."""
    cfg = CFG.replace(d_model=128, hidden_dim=128, glu_dim=256, vocab_size=320)  # 5 x 64 for the head
    hidden = cfg.num_heads * cfg.head_dim
    for fusion, k, n in (("n", cfg.d_model, 4 * hidden), ("ngr", hidden, cfg.d_model),
                         ("n2", cfg.d_model, cfg.glu_dim), ("r", cfg.glu_dim, cfg.d_model)):
        assert decode_hopper.supports((1, k), (k, n), fusion)
    assert decode_hopper.supports((1, cfg.d_model), (cfg.vocab_size, cfg.d_model), "n", transposed=True)
    variables = jax.jit(TransNormerLLM(cfg).init)(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))
    params = serving_params(nn.unbox(variables)["params"], cfg)
    tokens, mask = left_pad(PROMPT, prompt_bucket(len(PROMPT[0]), 8))
    pre = prefill(params, tokens, mask, cfg=cfg, prefill_chunk=8)
    token, pos = jnp.asarray([17]), pre.positions
    f32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    want, want_states = decode_step(f32, token, pos, pre.states, cfg=cfg.replace(dtype="float32"))
    step = jax.jit(fused.step, static_argnames=("cfg", "kernels"))
    errors = {}
    for kernels in fused.KERNELS:
        got, states = step(params, token, pos, pre.states, cfg=cfg, kernels=kernels)
        errors[kernels] = (rel_err(got, want), max(rel_err(g, w) for g, w in zip(states, want_states)))
    assert errors["hopper"][0] < max(1.5 * errors["triton"][0], 1e-3), errors
    assert errors["hopper"][1] < max(1.5 * errors["triton"][1], 1e-5), errors


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_state_step_is_the_recurrence_step(dtype):
    batch, heads, d = 2, 3, 32
    keys = jax.random.split(jax.random.key(7), 2)
    qkvu = (_row((batch, 4, heads, d), keys[0]) / 4).astype(dtype)
    state = _row((batch, heads, d, d), keys[1])
    slopes = jnp.asarray([0.5, 1e-3, 4e-8], jnp.float32)  # the last below half an ulp of 1
    want_o, want_s = lightning_attention_step(jax.nn.silu(qkvu[:, 0].astype(jnp.float32)),
                                              jax.nn.silu(qkvu[:, 1].astype(jnp.float32)),
                                              qkvu[:, 2].astype(jnp.float32), slopes, state)
    o, s = state_step(qkvu, state, slopes, block_v=16)
    assert o.dtype == dtype and o.shape == (batch, heads, d)
    assert rel_err(s, want_s) < 1e-6 and rel_err(o, want_o) < (1e-6 if dtype == jnp.float32 else 4e-3)


def test_gemv_reads_the_gate_from_a_block_of_a_wider_row():
    k, n = 128, 64
    keys = jax.random.split(jax.random.key(3), 3)
    x, wide = _row((1, k), keys[0]), _row((1, 4 * k), keys[1])
    w = (_row((k, n), keys[2]) / 16).astype(jnp.bfloat16)
    got = gemv(x, w, u=wide, u_block=3, norm=True)
    np.testing.assert_array_equal(got, gemv(x, w, u=wide[:, 3 * k:], norm=True))
    with pytest.raises(ValueError, match="no block 4"):
        gemv(x, w, u=wide, u_block=4)
