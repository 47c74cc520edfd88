"""The sliced cross-entropy (tnllm.loss) against the full-logits loss: values and gradients."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tnllm import config, train_lib
from tnllm.loss import cross_entropy_sum
from tnllm.model import TransNormerLLM


def _full(hidden, embedding, labels, weights):
    logits = jnp.einsum("bsd,vd->bsv", hidden.astype(jnp.float32), embedding.astype(jnp.float32))
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels) * weights)


@pytest.mark.parametrize("tokens_per_slice", [1, 6, 7, 64, 1000])  # slices that do not divide seq
def test_sliced_loss_and_gradients_equal_the_full_logits(tokens_per_slice):
    k = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(k[0], (3, 11, 16))
    embedding = jax.random.normal(k[1], (37, 16)) * 0.5
    labels = jax.random.randint(k[2], (3, 11), 0, 37)
    weights = jax.random.uniform(k[3], (3, 11))
    args = (hidden, embedding, labels, weights)
    got, got_grads = jax.value_and_grad(
        lambda h, e: cross_entropy_sum(h, e, labels, weights, tokens_per_slice), argnums=(0, 1))(
            hidden, embedding)
    want, want_grads = jax.value_and_grad(_full, argnums=(0, 1))(*args)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
    # The cotangent scales the saved gradients: d(3 L)/dh = 3 dL/dh.
    tripled = jax.grad(lambda h: 3 * cross_entropy_sum(h, embedding, labels, weights,
                                                       tokens_per_slice))(hidden)
    np.testing.assert_allclose(tripled, 3 * want_grads[0], rtol=1e-4, atol=1e-6)


def test_bf16_hidden_gives_float32_loss_and_bf16_gradients_near_the_float32_ones():
    k = jax.random.split(jax.random.key(1), 3)
    hidden = jax.random.normal(k[0], (2, 9, 32))
    embedding = jax.random.normal(k[1], (50, 32)) * 0.3
    labels = jax.random.randint(k[2], (2, 9), 0, 50)
    weights = jnp.ones((2, 9))
    got, (d_h, d_e) = jax.value_and_grad(
        lambda h, e: cross_entropy_sum(h, e, labels, weights, 4), argnums=(0, 1))(
            hidden.astype(jnp.bfloat16), embedding)
    want, (w_h, w_e) = jax.value_and_grad(_full, argnums=(0, 1))(hidden, embedding, labels, weights)
    assert got.dtype == jnp.float32 and d_h.dtype == jnp.bfloat16 and d_e.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=2e-2)
    for g, w in ((d_h, w_h), (d_e, w_e)):
        rel = np.linalg.norm(np.float32(g) - w) / np.linalg.norm(w)
        assert rel < 2e-2, rel


def test_train_step_with_loss_chunk_equals_the_full_logits_step():
    cfg = dict(vocab_size=259, d_model=32, num_layers=1, glu_dim=64, attention_impl="reference")
    batch = jax.random.randint(jax.random.key(1), (1, 4, 13), 0, 259)
    schedule = optax.constant_schedule(0.1)
    results = []
    for chunk in (0, 10):  # 10 tokens: 2 positions of the 4 rows per slice, 6 slices, the last padded
        model = TransNormerLLM(config.ModelConfig(**cfg, loss_chunk=chunk))
        params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
        state = train_lib.TrainState.create(apply_fn=model.apply, params=params,
                                            tx=optax.sgd(schedule))
        results.append(jax.jit(train_lib.make_train_step(model, schedule))(state, batch))
        eval_weights = jnp.array([1.0, 1.0, 0.5, 0.0])
        results[-1] += (jax.jit(train_lib.make_eval_step(model))(params, batch[0], eval_weights),)
    (full, m_full, e_full), (sliced, m_sliced, e_sliced) = results
    np.testing.assert_allclose(m_full["loss"], m_sliced["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_full["grad_norm"], m_sliced["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(e_full, e_sliced, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(sliced.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_loss_chunk_must_be_a_non_negative_integer():
    with pytest.raises(ValueError, match="config.model.loss_chunk must be 0"):
        config.ModelConfig(loss_chunk=-1)


_SEGMENT_CASES = {  # tiny models of every recurrent mixer, float32, 20 tokens split into 8 + 8 + 4
    "gla": dict(),
    "gla, loss in slices": dict(loss_chunk=12),
    "cosformer": dict(token_mixer="cosformer", lrpe_layers=()),
}


@pytest.mark.parametrize("case", _SEGMENT_CASES)
def test_training_in_segments_equals_the_whole_sequence(case):
    base = dict(vocab_size=97, d_model=32, num_layers=2, num_heads=2, glu_dim=64, chunk_size=4,
                **_SEGMENT_CASES[case])
    tokens = jax.random.randint(jax.random.key(3), (3, 21), 0, 97)
    weights = jax.random.uniform(jax.random.key(4), (3, 20))
    model = TransNormerLLM(config.ModelConfig(**base))
    params = nn.unbox(model.init(jax.random.key(0), tokens[:, :4])["params"])
    results = []
    for segment in (0, 8):  # 8 positions: a multiple of the chunk; the last segment padded
        model = TransNormerLLM(config.ModelConfig(**base, train_segment=segment))
        results.append(jax.jit(jax.value_and_grad(
            lambda p, m=model: train_lib.weighted_loss(m, p, tokens, weights)))(params))
    (whole, whole_grads), (segmented, segmented_grads) = results
    np.testing.assert_allclose(segmented, whole, rtol=1e-5)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(segmented_grads),
                            jax.tree.leaves(whole_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_training_in_segments_needs_a_recurrent_mixer():
    with pytest.raises(ValueError, match="train_segment carries recurrent states"):
        config.ModelConfig(token_mixer="softmax", lrpe_layers=(), train_segment=8)
    with pytest.raises(ValueError, match="config.model.train_segment must be 0"):
        config.ModelConfig(train_segment=-2)


def test_training_in_segments_holds_one_segments_activations():
    """Compiled temporary memory of a gradient: flat in seq_len in segments, linear without."""
    def temp_bytes(seq_len, segment):
        cfg = config.ModelConfig(vocab_size=256, d_model=64, num_layers=2, num_heads=2, glu_dim=128,
                                 chunk_size=16, loss_chunk=64, train_segment=segment)
        model = TransNormerLLM(cfg)
        params = jax.eval_shape(lambda: nn.unbox(
            model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]))
        grad = jax.jit(jax.grad(lambda p, t, w: train_lib.weighted_loss(model, p, t, w)))
        compiled = grad.lower(params, jax.ShapeDtypeStruct((2, seq_len + 1), jnp.int32),
                              jax.ShapeDtypeStruct((2, seq_len), jnp.float32)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    # 16x the length: 3.3 -> 6.3 MB in segments of 64 (the carried states of each segment and the
    # token ids grow), 10 -> 181 MB without on jax 0.10.2's CPU backend.
    assert temp_bytes(4096, 64) < 2.5 * temp_bytes(256, 64)
    assert temp_bytes(4096, 0) > 10 * temp_bytes(256, 0)
