"""The TransNormerLLM model: causality, LRPE shift invariance, mixed precision."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from tnllm import config
from tnllm.model import TransNormerLLM, lrpe, lrpe_theta_init, srms_norm, state_specs

IMPLS = ("reference", "blockwise", "recurrent", "pallas")  # pallas: interpret mode on a CPU


@functools.partial(jax.jit, static_argnames="cfg")
def forward(params, tokens, positions=None, mask=None, *, cfg, initial_states=None):
    """The model compiled once per config (op-by-op dispatch is several times slower)."""
    return TransNormerLLM(cfg).apply(
        {"params": params}, tokens, positions=positions, mask=mask, initial_states=initial_states)


def _model(path):
    cfg = config.model_config(config.load(path)).replace(chunk_size=16, num_layers=3)
    params = TransNormerLLM(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return cfg, nn.meta.unbox(params)


@pytest.fixture(scope="module")
def tiny():
    return _model("configs/tiny.py")


@pytest.fixture(scope="module")
def softmax_tiny():
    return _model("configs/softmax_tiny.py")


MODELS = ("tiny", "softmax_tiny")  # the tests of position and padding handling run on both


def _tokens(key, batch, seq, vocab):
    return jax.random.randint(key, (batch, seq), 0, vocab)


def test_srms_norm():
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 8)) * 4
    y = srms_norm(x)
    np.testing.assert_allclose(jnp.mean(y ** 2, -1), 1.0, rtol=1e-4)
    y2 = srms_norm(x, axes=(-2, -1))
    np.testing.assert_allclose(jnp.mean(y2 ** 2, (-2, -1)), 1.0, rtol=1e-4)


def test_logit_shapes_and_states(tiny):
    cfg, params = tiny
    logits, states = forward(params, _tokens(jax.random.PRNGKey(2), 2, 21, cfg.vocab_size), cfg=cfg)
    assert logits.shape == (2, 21, cfg.vocab_size) and logits.dtype == jnp.float32
    assert [(s.shape, s.dtype) for s in states] == [(s.shape, s.dtype) for s in state_specs(cfg, 2)]
    assert states[0].shape[2] == 2 * cfg.head_dim  # LRPE doubles dk in layer 0


@pytest.mark.parametrize("impl", IMPLS)
def test_causality(tiny, impl):
    cfg, params = tiny
    cfg = cfg.replace(attention_impl=impl)
    tokens = _tokens(jax.random.PRNGKey(3), 2, 40, cfg.vocab_size)
    t = 23
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % cfg.vocab_size)
    a, _ = forward(params, tokens, cfg=cfg)
    b, _ = forward(params, changed, cfg=cfg)
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert not np.allclose(a[:, t:], b[:, t:])


def test_impls_agree_in_the_model(tiny):
    cfg, params = tiny
    tokens = _tokens(jax.random.PRNGKey(4), 2, 45, cfg.vocab_size)
    ref, ref_states = forward(params, tokens, cfg=cfg.replace(attention_impl="reference"))
    for impl in ("blockwise", "recurrent"):
        out, states = forward(params, tokens, cfg=cfg.replace(attention_impl=impl))
        assert rel_err(out, ref) <= 1e-5, impl
        for s, s_ref in zip(states, ref_states):
            assert rel_err(s, s_ref) <= 1e-5, impl


def test_lrpe_scores_are_shift_invariant():
    heads, hd, seq = 2, 16, 12
    theta = lrpe_theta_init(heads, hd)(None, (heads, hd))
    q = jax.random.normal(jax.random.PRNGKey(5), (1, seq, heads, hd))
    k = jax.random.normal(jax.random.PRNGKey(6), (1, seq, heads, hd))
    pos = jnp.arange(seq)[None]

    def scores(shift):
        qq, kk = lrpe(q, theta, pos + shift), lrpe(k, theta, pos + shift)
        return jnp.einsum("bthd,bshd->bhts", qq, kk)

    base = scores(0)
    for shift in (1, 77, 5000):
        assert rel_err(scores(shift), base) <= 1e-4
    # And the scores are not shift-invariant in the trivial way: relative position matters.
    assert not np.allclose(base[..., 0, 1], base[..., 0, 2])


@pytest.mark.parametrize("model", MODELS)
def test_model_is_shift_invariant_in_positions(request, model):
    cfg, params = request.getfixturevalue(model)
    tokens = _tokens(jax.random.PRNGKey(7), 1, 30, cfg.vocab_size)
    pos = jnp.arange(30)[None]
    a, _ = forward(params, tokens, pos, cfg=cfg)
    b, _ = forward(params, tokens, pos + 1000, cfg=cfg)
    assert rel_err(b, a) <= 1e-4


def test_bf16_matches_float32(tiny):
    cfg, params = tiny
    tokens = _tokens(jax.random.PRNGKey(8), 2, 64, cfg.vocab_size)
    f32, _ = forward(params, tokens, cfg=cfg)
    bf16, _ = forward(params, tokens, cfg=cfg.replace(dtype="bfloat16"))
    assert bf16.dtype == jnp.float32
    assert rel_err(bf16, f32) <= 2e-2


@pytest.mark.parametrize("model", MODELS)
def test_padding_mask_zeroes_keys(request, model):
    """A left-padded row gives its real tokens the logits of the unpadded row."""
    cfg, params = request.getfixturevalue(model)
    tokens = _tokens(jax.random.PRNGKey(9), 1, 20, cfg.vocab_size)
    pad = 7
    padded = jnp.concatenate([jnp.zeros((1, pad), tokens.dtype), tokens], axis=1)
    mask = jnp.arange(20 + pad)[None] >= pad
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    a, _ = forward(params, tokens, cfg=cfg)
    b, _ = forward(params, padded, positions, mask, cfg=cfg)
    assert rel_err(b[:, pad:], a) <= 1e-5


def test_remat_policies_give_the_same_gradients(tiny):
    cfg, params = tiny
    tokens = _tokens(jax.random.PRNGKey(10), 2, 24, cfg.vocab_size)

    def loss(p, c):
        logits, _ = TransNormerLLM(c).apply({"params": p}, tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1))

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g = grad(params, cfg)
    for policy in ("full", "save_dots"):
        g2 = grad(params, cfg.replace(remat_policy=policy))
        for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g)):
            assert rel_err(a, b) <= 1e-5, policy
