"""cosFormer attention: forms against the quadratic reference, padding, decoding, memory, the LM mixer."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import rel_err

from tnllm import config, model
from tnllm.cosformer import (CosformerAttention, cosformer_attention, cosformer_attention_step,
                             state_shape)

TOL = 1e-5  # docs/spec.md §4: float32 relative error
attend = jax.jit(cosformer_attention, static_argnames=("m", "causal", "impl", "chunk_size", "eps"))


def normal(seed, *shape):
    # numpy draws: jax.random would compile a kernel for every shape.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def qkv(seed, b=2, tq=37, tk=37, h=3, d=8, dv=5):
    return normal(seed, b, tq, h, d), normal(seed + 100, b, tk, h, d), normal(seed + 200, b, tk, h, dv)


# 37 queries/keys: not a multiple of the chunk size 8; cross attention with 13 queries, 29 keys.
FORMS = [dict(causal=True, tq=37, tk=37), dict(causal=False, tq=37, tk=37),
         dict(causal=False, tq=13, tk=29)]


@pytest.mark.parametrize("case", FORMS, ids=["causal", "bidirectional", "cross"])
def test_linear_matches_reference_outputs_and_gradients(case):
    q, k, v = qkv(0, tq=case["tq"], tk=case["tk"])
    w = normal(1, 2, case["tq"], 3, 5)

    def run(impl):
        def loss(q, k, v):
            o, state = attend(q, k, v, m=40, causal=case["causal"], impl=impl, chunk_size=8)
            return jnp.sum(o * w), (o, state)

        (_, (o, state)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return o, state, grads

    o_lin, s_lin, g_lin = run("linear")
    o_ref, s_ref, g_ref = run("reference")
    assert rel_err(o_lin, o_ref) <= TOL
    assert rel_err(s_lin, s_ref) <= TOL
    for g, r in zip(g_lin, g_ref):
        assert rel_err(g, r) <= TOL


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_bf16_matches_float32(causal):
    """docs/spec.md §4 tolerance for bf16 inputs: relative RMS error <= 5e-3, outputs and gradients."""
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv(9, tq=50, tk=50, d=16, dv=16))

    def run(impl, *qkv_):
        def loss(q, k, v):
            o, _ = cosformer_attention(q, k, v, m=64, causal=causal, impl=impl, chunk_size=16)
            return jnp.sum(o.astype(jnp.float32) ** 2), o

        (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(*qkv_)
        return (o, *grads)

    got = run("linear", q, k, v)
    want = run("reference", *(x.astype(jnp.float32) for x in (q, k, v)))
    for g, w in zip(got, want):
        assert g.dtype == jnp.bfloat16 and rel_err(g, w) <= 5e-3


def test_reference_is_the_cos_reweighted_formula():
    """One query, two keys, written out: the linear features must reproduce cos(pi/2 (i-j)/M)."""
    q = jnp.array([1.0, -2.0]).reshape(1, 1, 1, 2)
    k = jnp.array([[0.5, 3.0], [2.0, 1.0]]).reshape(1, 2, 1, 2)
    v = jnp.array([[1.0], [4.0]]).reshape(1, 2, 1, 1)
    pos_q, pos_k, m = jnp.array([[3]]), jnp.array([[0, 5]]), 8.0
    w = np.cos(np.pi / 2 * np.array([3 - 0, 3 - 5]) / m) * np.array([0.5, 2.0])  # relu(q).relu(k_j)
    want = (w @ np.array([1.0, 4.0])) / w.sum()
    for impl in ("linear", "reference"):
        o, _ = attend(q, k, v, m=m, causal=False, q_positions=pos_q, k_positions=pos_k,
                                   impl=impl)
        np.testing.assert_allclose(float(o[0, 0, 0, 0]), want, rtol=1e-6)


def test_denominator_is_clamped_not_shifted():
    v = jnp.full((1, 1, 1, 1), 3.0)
    for scale, want in ((1.0, 3.0), (1e-4, 3.0 * 1e-8 / 1e-6)):  # q'.k' = 1e-8 < eps -> num / eps
        q = k = jnp.full((1, 1, 1, 1), scale)
        o, _ = attend(q, k, v, m=1, causal=True)
        np.testing.assert_allclose(float(o.ravel()[0]), want, rtol=1e-6)
    o, _ = attend(-jnp.ones((1, 4, 1, 2)), *qkv(0, b=1, tq=4, tk=4, h=1, d=2)[1:], m=4,
                               causal=False)
    assert jnp.all(o == 0)  # all-zero features: 0 / eps, never NaN


@pytest.mark.parametrize("impl", ["linear", "reference"])
def test_padded_keys_change_nothing(impl):
    q, k, v = qkv(2, tq=11, tk=19)
    pad = 7
    garbage_k = 100.0 * normal(3, 2, pad, 3, 8)
    garbage_v = jnp.full((2, pad, 3, 5), jnp.nan)
    real = jnp.ones((2, 19), bool)
    mask = jnp.concatenate([real, jnp.zeros((2, pad), bool)], axis=1)
    # Bidirectional/cross: padded keys appended after the real ones.
    o, s = attend(q, k, v, m=40, causal=False, impl=impl)
    o_pad, s_pad = attend(q, jnp.concatenate([k, garbage_k], 1),
                                       jnp.concatenate([v, garbage_v], 1), m=40, causal=False,
                                       key_mask=mask, impl=impl)
    np.testing.assert_allclose(o_pad, o, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s_pad, s, rtol=1e-6, atol=1e-7)
    # Causal, left padding: the real tokens keep their positions 0..18.
    q, k, v = qkv(4, tq=19, tk=19)
    o, _ = attend(q, k, v, m=40, causal=True, impl=impl, chunk_size=8)
    left = lambda x, g: jnp.concatenate([g, x], 1)  # noqa: E731
    positions = jnp.broadcast_to(jnp.arange(-pad, 19), (2, 19 + pad))
    o_pad, _ = attend(left(q, garbage_k), left(k, garbage_k), left(v, garbage_v), m=40,
                                   causal=True, key_mask=mask[:, ::-1], q_positions=positions,
                                   k_positions=positions, impl=impl, chunk_size=8)
    np.testing.assert_allclose(o_pad[:, pad:], o, rtol=1e-6, atol=1e-7)


def test_decoding_equals_causal_forward():
    q, k, v = qkv(5, b=2, tq=23, tk=23)
    m, prefill = 64, 9
    o_full, s_full = attend(q, k, v, m=m, causal=True, chunk_size=4)
    positions = jnp.broadcast_to(jnp.arange(23), (2, 23))
    o_pre, prefill_state = attend(q[:, :prefill], k[:, :prefill], v[:, :prefill], m=m,
                                               causal=True, chunk_size=4)
    outs, state = [o_pre], prefill_state
    step = jax.jit(functools.partial(cosformer_attention_step, m=m))
    for t in range(prefill, 23):
        o_t, state = step(q[:, t], k[:, t], v[:, t], positions[:, t], state)
        outs.append(o_t[:, None])
    assert rel_err(jnp.concatenate(outs, 1), o_full) <= TOL
    assert rel_err(state, s_full) <= TOL
    # A continued chunk (the LM's prefill-then-forward path) agrees as well.
    rest = slice(prefill, None)
    o_rest, _ = attend(q[:, rest], k[:, rest], v[:, rest], m=m, causal=True,
                                    initial_state=prefill_state, q_positions=positions[:, rest],
                                    k_positions=positions[:, rest])
    assert rel_err(o_rest, o_full[:, rest]) <= TOL


def _largest_intermediate(fn, *args) -> int:
    """Elements of the largest value in fn's jaxpr, looking inside scan/jit/cond bodies."""

    def walk(jaxpr):
        sizes = [0]
        for eqn in jaxpr.eqns:
            sizes += [int(np.prod(o.aval.shape)) for o in eqn.outvars if hasattr(o.aval, "shape")]
            for p in eqn.params.values():
                for sub in p if isinstance(p, (tuple, list)) else (p,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        sizes.append(walk(inner))
        return max(sizes)

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def test_causal_form_memory_is_linear_in_length():
    b, t, h, d = 1, 1024, 2, 32
    q, k, v = qkv(6, b=b, tq=t, tk=t, h=h, d=d, dv=d)
    features = b * t * h * 2 * d  # the doubled [sin, cos] features themselves
    causal = lambda q, k, v: cosformer_attention(q, k, v, m=t, causal=True, chunk_size=64)  # noqa: E731
    assert _largest_intermediate(causal, q, k, v) <= features

    def prefix_sums(q, k, v):  # the official causal form: a [t, 2d, dv] cumulative sum per head
        return jnp.einsum("bthf,bthfe->bthe", q, jnp.cumsum(jnp.einsum("bthf,bthe->bthfe", k, v), 1))

    # The probe does see such a tensor: length x d x d is d times the bound.
    assert _largest_intermediate(prefix_sums, q, k, v) >= features * d // 2


def test_bad_inputs_are_named():
    q, k, v = qkv(0, tq=13, tk=29)
    with pytest.raises(ValueError, match="M"):
        attend(q, k, v, m=20, causal=False)
    with pytest.raises(ValueError, match="cross attention"):
        attend(q, k, v, m=40, causal=True)
    with pytest.raises(ValueError, match="positions"):
        attend(q, q, q[..., :5], m=40, causal=True,
                            initial_state=jnp.zeros(state_shape(2, 3, 8, 5)))


def test_module_self_cross_and_token_by_token():
    """Built from the config as every token mixer: heads, M, chunk and form come from cfg."""
    x, mem = normal(7, 2, 21, 24), normal(8, 2, 9, 16)
    cfg = config.ModelConfig(d_model=24, num_heads=4, token_mixer="cosformer", lrpe_layers=(),
                             cosformer_max_len=32, chunk_size=8, init_std=0.3)
    enc = CosformerAttention(cfg, causal=False)
    params = jax.jit(enc.init)(jax.random.PRNGKey(0), x)
    out, _ = jax.jit(enc.apply)(params, x)
    reference = CosformerAttention(cfg.replace(attention_impl="reference"), causal=False)
    out_ref, _ = jax.jit(reference.apply)(params, x)
    assert out.shape == (2, 21, 24) and rel_err(out, out_ref) <= TOL

    cross = CosformerAttention(cfg.replace(d_model=10, hidden_dim=24), causal=False)
    params = jax.jit(cross.init)(jax.random.PRNGKey(1), x, inputs_kv=mem)
    out, state = jax.jit(cross.apply)(params, x, inputs_kv=mem)
    assert out.shape == (2, 21, 10) and state.shape == (2, 4, 12, 7)
    assert params["params"]["k_proj"]["kernel"].value.shape == (16, 4, 6)

    dec = CosformerAttention(cfg, 1)  # the language model's mixer: causal
    params = jax.jit(dec.init)(jax.random.PRNGKey(2), x)
    full, _ = jax.jit(dec.apply)(params, x)
    positions = jnp.broadcast_to(jnp.arange(21), (2, 21))
    state = jnp.zeros(state_shape(2, 4, 6))
    steps = []
    step = jax.jit(dec.apply)
    for t in range(21):
        y, state = step(params, x[:, t:t + 1], positions[:, t:t + 1], None, state)
        steps.append(y)
    assert rel_err(jnp.concatenate(steps, 1), full) <= TOL


@pytest.fixture(scope="module")
def lm():
    cfg = config.model_config(config.load("configs/cosformer.py")).replace(chunk_size=8,
                                                                           cosformer_max_len=64)
    net = model.TransNormerLLM(cfg)
    tokens = jnp.asarray(np.random.default_rng(9).integers(0, cfg.vocab_size, (2, 19)), jnp.int32)
    params = nn.meta.unbox(jax.jit(net.init)(jax.random.PRNGKey(0), tokens))
    return cfg, net, params, tokens


def test_lm_with_cosformer_mixer_learns(lm):
    cfg, net, params, tokens = lm
    assert "q_proj" in params["params"]["layers_0"]["token_mixer"]

    def loss_fn(p):
        logits, _ = net.apply(p, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    opt = optax.adam(1e-2)
    opt_state = opt.init(params)
    step = jax.jit(lambda p, s: (lambda l, g: (l, *opt.update(g, s, p)))(*jax.value_and_grad(loss_fn)(p)))
    losses = []
    for _ in range(5):
        loss, updates, opt_state = step(params, opt_state)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1


def test_lm_decoding_matches_forward(lm):
    cfg, net, params, tokens = lm
    logits, states = jax.jit(net.apply)(params, tokens)
    assert [s.shape for s in states] == [s.shape for s in model.state_specs(cfg, 2)]
    prefill = 11
    _, carry = jax.jit(net.apply)(params, tokens[:, :prefill])
    positions = jnp.broadcast_to(jnp.arange(19), (2, 19))
    step = jax.jit(lambda p, tok, pos, states: net.apply(p, tok, pos, initial_states=states))
    for t in range(prefill, 19):
        step_logits, carry = step(params, tokens[:, t:t + 1], positions[:, t:t + 1], carry)
        assert rel_err(step_logits[:, 0], logits[:, t]) <= TOL


def test_lm_config_errors_name_the_field(lm):
    cfg, net, params, tokens = lm
    with pytest.raises(ValueError, match="token_mixer"):
        cfg.replace(token_mixer="mamba")
    with pytest.raises(ValueError, match="M"):
        model.TransNormerLLM(cfg.replace(cosformer_max_len=8)).apply(params, tokens)
