"""The TransNormerLLM model: causality, LRPE shift invariance, mixed precision."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from tnllm import config
from tnllm.model import SGLU, TransNormerLLM, lrpe, lrpe_theta_init, srms_norm, state_specs

IMPLS = ("reference", "blockwise", "recurrent", "pallas")  # pallas: interpret mode on a CPU


@functools.partial(jax.jit, static_argnames=("cfg", "fold_norms"))
def forward(params, tokens, positions=None, mask=None, *, cfg, initial_states=None, fold_norms=False):
    """The model compiled once per config (op-by-op dispatch is several times slower)."""
    return TransNormerLLM(cfg, fold_norms=fold_norms).apply(
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


def test_a_state_of_one_row_serves_repeated_rows(tiny):
    """tnllm.generate.decode runs a batch-1 step as two copies of its row with one state row: each
    copy's logits and the one new state equal those of the row alone."""
    cfg, params = tiny
    cfg = cfg.replace(attention_impl="recurrent")
    prompt = _tokens(jax.random.PRNGKey(7), 1, 9, cfg.vocab_size)
    _, states = forward(params, prompt, cfg=cfg)
    token, position = prompt[:, :1], jnp.full((1, 1), 9)
    alone, alone_states = forward(params, token, positions=position, cfg=cfg, initial_states=states)
    twice, twice_states = forward(params, jnp.concatenate([token] * 2),
                                  positions=jnp.concatenate([position] * 2), cfg=cfg,
                                  initial_states=states)
    assert [s.shape for s in twice_states] == [s.shape for s in states]
    for copy in twice:
        np.testing.assert_allclose(copy, alone[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(twice_states, alone_states):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="one state row per input row"):
        forward(params, jnp.concatenate([token] * 3), positions=jnp.concatenate([position] * 3),
                cfg=cfg, initial_states=tuple(jnp.concatenate([s] * 2) for s in states))
    with pytest.raises(ValueError, match="one state row per input row"):  # 2 rows for 4
        forward(params, jnp.concatenate([token] * 4), positions=jnp.concatenate([position] * 4),
                cfg=cfg, initial_states=tuple(jnp.concatenate([s] * 2) for s in states))


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


def test_folded_norms_compute_the_same_function(tiny):
    """fold_norms (the decoding step's order: each SRMSNorm's scale after the product that follows
    it) equals the released order in float32, and in bf16 is as close to float32 as it."""
    cfg, params = tiny
    cfg = cfg.replace(attention_impl="recurrent")
    tokens = _tokens(jax.random.PRNGKey(11), 2, 29, cfg.vocab_size)
    prefix_states = forward(params, tokens[:, :11], cfg=cfg)[1]
    run = functools.partial(forward, params, tokens[:, 11:], jnp.arange(11, 29)[None],
                            initial_states=prefix_states)
    want, want_states = run(cfg=cfg)
    got, got_states = run(cfg=cfg, fold_norms=True)
    assert rel_err(got, want) <= 1e-5
    for a, b in zip(got_states, want_states):
        assert rel_err(a, b) <= 1e-5
    bf16 = cfg.replace(dtype="bfloat16")
    released, folded = (run(cfg=bf16, fold_norms=fold)[0] for fold in (False, True))
    assert folded.dtype == jnp.float32
    assert rel_err(folded, want) <= 1.5 * rel_err(released, want)


def test_folded_norms_need_the_tnl_mixer(softmax_tiny):
    cfg, params = softmax_tiny
    with pytest.raises(ValueError, match="fold_norms needs TNL's token mixer"):
        forward(params, _tokens(jax.random.PRNGKey(12), 1, 4, cfg.vocab_size), cfg=cfg,
                fold_norms=True)
    x = jnp.ones((1, 2, cfg.d_model))
    with pytest.raises(ValueError, match="SwiGLU cannot take a folded norm scale"):
        SGLU(cfg, swish=True).init(jax.random.PRNGKey(0), x, row_scale=jnp.ones((1, 2, 1)))


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
