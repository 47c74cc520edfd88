"""The three XLA forms of Lightning Attention agree (docs/spec.md §2, §4)."""
import functools
import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_qkv, rel_err

from tnllm.attention import (alibi_slopes, choose_impl, layer_slopes, lightning_attention,
                             lightning_attention_step)

FORMS = ("reference", "blockwise", "recurrent")
_seed = itertools.count(100)


def fresh_key():
    return jax.random.PRNGKey(next(_seed))


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def attend(q, k, v, slopes, s0, *, impl, chunk_size=64):
    """lightning_attention compiled once per case (op-by-op dispatch is several times slower)."""
    return lightning_attention(q, k, v, slopes, impl=impl, chunk_size=chunk_size, initial_state=s0)


def test_slopes_power_of_two():
    np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)], rtol=1e-7)


def test_slopes_not_power_of_two():
    # H = 20: the 16 slopes for 16 heads, then entries 0, 2, 4, 6 of the slopes for 32 heads.
    s16 = [2.0 ** (-8 * (i + 1) / 16) for i in range(16)]
    s32 = [2.0 ** (-8 * (i + 1) / 32) for i in range(32)]
    np.testing.assert_allclose(alibi_slopes(20), s16 + s32[0:8:2], rtol=1e-7)
    assert alibi_slopes(3).shape == (3,)


def test_layer_factor():
    base = alibi_slopes(4)
    np.testing.assert_allclose(layer_slopes(4, 0, 5), base * (1 + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(layer_slopes(4, 2, 5), base * (0.5 + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(layer_slopes(4, 4, 5), base * 1e-5, rtol=1e-5)
    np.testing.assert_allclose(layer_slopes(4, 0, 1), base * (1 + 1e-5), rtol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        layer_slopes(4, 5, 5)


def _inputs(batch, seq, heads, dk, dv, with_state):
    q, k, v = random_qkv(fresh_key(), batch, seq, heads, dk, dv)
    # A mix of fast and slow decays, as in the first and last layers of a model.
    slopes = jnp.concatenate([alibi_slopes(heads)[: (heads + 1) // 2],
                              layer_slopes(heads, 3, 4)[(heads + 1) // 2:]])
    s0 = jax.random.normal(fresh_key(), (batch, heads, dk, dv)) if with_state else None
    return q, k, v, slopes, s0


CASES = [
    # seq, chunk, heads, dk, dv, initial state
    (37, 16, 2, 16, 16, False),
    (100, 16, 3, 32, 16, True),
    (130, 64, 2, 16, 32, False),
    (200, 64, 5, 256, 128, True),
    (61, 128, 2, 32, 32, True),
    (128, 128, 1, 16, 16, True),
]


@pytest.mark.parametrize("seq,chunk,heads,dk,dv,with_state", CASES)
def test_forms_agree(seq, chunk, heads, dk, dv, with_state):
    q, k, v, slopes, s0 = _inputs(2, seq, heads, dk, dv, with_state)
    o_ref, s_ref = attend(q, k, v, slopes, s0, impl="reference")
    for impl in ("blockwise", "recurrent"):
        o, s = attend(q, k, v, slopes, s0, impl=impl, chunk_size=chunk)
        assert o.shape == (2, seq, heads, dv) and o.dtype == jnp.float32
        assert s.shape == (2, heads, dk, dv) and s.dtype == jnp.float32
        assert rel_err(o, o_ref) <= 1e-5, impl
        assert rel_err(s, s_ref) <= 1e-5, impl


@pytest.mark.parametrize("seq,chunk,heads,dk,dv", [(45, 16, 3, 32, 16), (70, 64, 2, 64, 32)])
def test_gradients_agree(seq, chunk, heads, dk, dv):
    q, k, v, slopes, s0 = _inputs(2, seq, heads, dk, dv, True)
    w_o = jax.random.normal(fresh_key(), (2, seq, heads, dv))
    w_s = jax.random.normal(fresh_key(), (2, heads, dk, dv))

    def loss(q, k, v, s0, impl):
        o, s = attend(q, k, v, slopes, s0, impl=impl, chunk_size=chunk)
        return jnp.sum(o * w_o) + jnp.sum(s * w_s)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), static_argnames="impl")
    grads = {impl: grad(q, k, v, s0, impl=impl) for impl in FORMS}
    for impl in ("blockwise", "recurrent"):
        for name, g, g_ref in zip("q k v s0".split(), grads[impl], grads["reference"]):
            assert rel_err(g, g_ref) <= 1e-5, (impl, name)


def test_recurrent_is_robust_over_65536_tokens():
    """The paper's claim: the recurrent form stays finite at any length, here with the slowest decay."""
    seq, heads = 65536, 2
    q, k, v = random_qkv(fresh_key(), 1, seq, heads, 16, 16)
    slopes = layer_slopes(heads, 7, 8)  # last layer: s = s_h * 1e-5, lambda closest to 1
    o_rec, s_rec = attend(q, k, v, slopes, None, impl="recurrent")
    o_blk, s_blk = attend(q, k, v, slopes, None, impl="blockwise")
    assert bool(jnp.all(jnp.isfinite(o_rec))) and bool(jnp.all(jnp.isfinite(s_rec)))
    assert rel_err(o_rec, o_blk) <= 1e-5
    assert rel_err(s_rec, s_blk) <= 1e-5


def test_step_continues_a_prefill():
    q, k, v, slopes, _ = _inputs(2, 30, 2, 16, 16, False)
    o_all, s_all = lightning_attention(q, k, v, slopes, impl="reference")
    _, state = lightning_attention(q[:, :29], k[:, :29], v[:, :29], slopes, impl="blockwise",
                                   chunk_size=8)
    o_last, state = lightning_attention_step(q[:, 29], k[:, 29], v[:, 29], slopes, state)
    assert rel_err(o_last, o_all[:, 29]) <= 1e-5
    assert rel_err(state, s_all) <= 1e-5


def test_bf16_inputs_keep_dtype_and_accuracy():
    q, k, v, slopes, _ = _inputs(1, 96, 2, 32, 32, False)
    o_ref, _ = attend(q, k, v, slopes, None, impl="reference")
    cast = lambda x: x.astype(jnp.bfloat16)  # noqa: E731
    for impl in FORMS:
        o, s = attend(cast(q), cast(k), cast(v), slopes, None, impl=impl, chunk_size=32)
        assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
        assert rel_err(o.astype(jnp.float32), o_ref) <= 5e-3, impl


def test_auto_is_blockwise_without_a_gpu():
    q, k, v, slopes, s0 = _inputs(2, 50, 2, 16, 16, True)
    assert jax.default_backend() == "cpu"
    assert choose_impl("gla", "auto", q, k, v, chunk_size=16) == "blockwise"
    for got, want in zip(attend(q, k, v, slopes, s0, impl="auto", chunk_size=16),
                         attend(q, k, v, slopes, s0, impl="blockwise", chunk_size=16)):
        np.testing.assert_array_equal(got, want)


def test_auto_takes_the_kernels_on_an_nvidia_gpu_where_they_fit(monkeypatch):
    bf16 = lambda dk, dv: (jnp.zeros((1, 8, 2, dk), jnp.bfloat16),) * 2 + (  # noqa: E731
        jnp.zeros((1, 8, 2, dv), jnp.bfloat16),)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace(compute_capability="9.0")])
    auto = lambda *qkv, chunk_size=64: choose_impl("gla", "auto", *qkv, chunk_size=chunk_size)  # noqa: E731
    assert auto(*bf16(128, 128)) == "pallas"
    assert auto(*bf16(256, 128)) == "pallas"  # layer 0 of the releases (LRPE doubles dk)
    assert auto(*bf16(96, 96)) == "blockwise"  # a head dim the kernels do not take
    assert auto(*bf16(128, 128), chunk_size=48) == "blockwise"  # nor this chunk size
    half = [x.astype(jnp.float16) for x in bf16(128, 128)]
    assert auto(*half) == "blockwise"  # nor float16
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace()])  # a GPU without CUDA
    assert auto(*bf16(128, 128)) == "blockwise"


def test_one_auto_policy_chooses_every_mixers_form(monkeypatch):
    """cosFormer and softmax attention ask the same policy; a named form is taken as it is."""
    qkv = lambda dtype, hd: (jnp.zeros((1, 8, 2, hd), dtype),) * 3  # noqa: E731
    assert choose_impl("cosformer", "auto", *qkv(jnp.bfloat16, 64)) == "linear"
    assert choose_impl("softmax", "auto", *qkv(jnp.bfloat16, 64)) == "xla"  # no GPU here
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert choose_impl("cosformer", "auto", *qkv(jnp.bfloat16, 64)) == "linear"
    assert choose_impl("softmax", "auto", *qkv(jnp.bfloat16, 128)) == "cudnn"
    assert choose_impl("softmax", "auto", *qkv(jnp.float16, 64)) == "cudnn"
    assert choose_impl("softmax", "auto", *qkv(jnp.float32, 128)) == "xla"
    assert choose_impl("softmax", "auto", *qkv(jnp.bfloat16, 256)) == "xla"  # head too wide
    assert choose_impl("softmax", "auto", *qkv(jnp.bfloat16, 60)) == "xla"  # not a multiple of 8
    assert choose_impl("softmax", "auto", *qkv(jnp.bfloat16, 128), masked=True) == "xla"
    for mixer, impl in (("gla", "recurrent"), ("cosformer", "reference"), ("softmax", "cudnn")):
        assert choose_impl(mixer, impl, *qkv(jnp.float32, 60)) == impl
    with pytest.raises(ValueError, match="Unknown attention impl 'pallas' for token mixer 'softmax'"):
        choose_impl("softmax", "pallas", *qkv(jnp.float32, 64))


def test_bad_inputs_are_refused():
    q, k, v, slopes, _ = _inputs(1, 8, 2, 16, 16, False)
    with pytest.raises(ValueError, match="Unknown attention impl 'flash'"):
        lightning_attention(q, k, v, slopes, impl="flash")
    with pytest.raises(ValueError, match="slopes must have shape"):
        lightning_attention(q, k, v, slopes[:1])
    with pytest.raises(ValueError, match="q and k must have the same shape"):
        lightning_attention(q, k[..., :8], v, slopes)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        lightning_attention(q, k, v, slopes, initial_state=jnp.zeros((1, 2, 16, 8)))
    with pytest.raises(ValueError, match="batch, seq, heads, dim"):
        lightning_attention(q[0], k[0], v[0], slopes)
