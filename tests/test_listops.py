"""ListOps: the generator against an independent evaluator, seeding, and the encoder classifier."""
import concurrent.futures

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tnllm import listops, softmax

SMALL = listops.Grammar(max_depth=6, max_args=5, min_length=20, max_length=120)
RULES = {"[MIN": min, "[MAX": max, "[MED": lambda a: int(np.median(a)), "[SM": lambda a: sum(a) % 10}


def evaluate(ids):
    """Evaluates a token sequence with a stack; returns (value, operator nesting, argument counts)."""
    words = [listops.VOCAB[i] for i in ids]
    stack, nesting, arg_counts, value = [], 0, [], None
    for w in words:
        if w in RULES:
            stack.append((w, []))
            nesting = max(nesting, len(stack))
            continue
        if w == "]":
            op, args = stack.pop()
            arg_counts.append(len(args))
            x = RULES[op](args)
        else:
            x = int(w)
        if stack:
            stack[-1][1].append(x)
        else:
            assert value is None, "a second expression after the first"
            value = x
    assert not stack, "unclosed operator"
    return value, nesting, arg_counts


def test_examples_follow_the_grammar():
    tokens, labels = listops.generate("train", 40, grammar=SMALL)
    assert tokens.shape == (40, SMALL.max_length - 1) and tokens.dtype == np.int32
    for row, label in zip(tokens, labels):
        length = int(np.sum(row != listops.PAD))
        assert np.all(row[length:] == listops.PAD)  # padding only at the end
        assert SMALL.min_length < length < SMALL.max_length
        value, nesting, arg_counts = evaluate(row[:length])
        assert value == label and 0 <= label < listops.NUM_CLASSES
        assert nesting <= SMALL.max_depth - 1  # operators sit above depth max_depth: digits only there
        assert all(2 <= n <= SMALL.max_args for n in arg_counts)


def test_lra_defaults():
    assert listops.SPLITS == {"train": 96_000, "validation": 2_000, "test": 2_000}
    assert listops.Grammar() == listops.Grammar(max_depth=10, max_args=10, min_length=500, max_length=2000)
    ids, label = listops.example("test", 0)
    assert 500 < len(ids) < 2000 and evaluate(ids)[0] == label


def test_generation_is_seeded_prefix_stable_and_parallel_safe():
    tokens, labels = listops.generate("train", 12, grammar=SMALL)
    again, again_labels = listops.generate("train", 5, grammar=SMALL)
    np.testing.assert_array_equal(again, tokens[:5])
    np.testing.assert_array_equal(again_labels, labels[:5])
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        pooled, pooled_labels = listops.generate("train", 12, grammar=SMALL, executor=pool)
    np.testing.assert_array_equal(pooled, tokens)
    np.testing.assert_array_equal(pooled_labels, labels)
    # Two spawned processes: the same examples again.
    splits = listops.generate_splits({"train": 12, "test": 3}, grammar=SMALL, workers=2)
    np.testing.assert_array_equal(splits["train"][0], tokens)
    np.testing.assert_array_equal(splits["train"][1], labels)
    np.testing.assert_array_equal(splits["test"][0], listops.generate("test", 3, grammar=SMALL)[0])
    for other in (listops.generate("test", 12, grammar=SMALL)[0],
                  listops.generate("train", 12, seed=1, grammar=SMALL)[0]):
        assert not np.array_equal(other, tokens)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="split"):
        listops.generate("dev", 1)
    with pytest.raises(ValueError, match="min_length"):
        listops.Grammar(min_length=2000)
    with pytest.raises(ValueError, match="token_mixer"):
        listops.ClassifierConfig(token_mixer="lstm")
    with pytest.raises(ValueError, match="softmax_impl is 'flash'; choose one of auto, xla, cudnn"):
        listops.ClassifierConfig(softmax_impl="flash")
    with pytest.raises(ValueError, match="Unknown config.train field.s. stpes; known fields are batch_size"):
        listops.from_config(listops.TrainConfig, {"steps": 5, "stpes": 5}, "train")
    assert (listops.from_config(listops.Grammar, {"max_depth": 3, "seed": 1}, "data", ignore=("seed",))
            == listops.Grammar(max_depth=3))
    with pytest.raises(ValueError, match="max_len"):
        cfg = listops.ClassifierConfig(num_layers=1, d_model=8, num_heads=2, mlp_dim=8, max_len=4)
        listops.ListOpsClassifier(cfg).init(jax.random.PRNGKey(0), jnp.ones((1, 5), jnp.int32))


@pytest.mark.parametrize("mixer,dtype", [("cosformer", "float32"), ("softmax", "float32"),
                                         ("cosformer", "bfloat16")])
def test_classifier_ignores_padding_and_has_gradients(mixer, dtype):
    cfg = listops.ClassifierConfig(token_mixer=mixer, num_layers=1, d_model=16, num_heads=2, mlp_dim=32,
                                   max_len=48, dtype=dtype)
    tol = 1e-5 if dtype == "float32" else 2e-2
    net = listops.ListOpsClassifier(cfg)
    tokens, labels = listops.generate("train", 3, grammar=listops.Grammar(4, 4, 10, 32))
    padded = np.pad(tokens, ((0, 0), (0, 16)))  # 16 more padding tokens
    params = jax.jit(net.init)(jax.random.PRNGKey(0), tokens)

    @jax.jit
    def run(params):  # one compilation for everything
        def loss(p):
            return -jnp.mean(jax.nn.log_softmax(net.apply(p, tokens))[jnp.arange(3), labels])

        return net.apply(params, tokens), net.apply(params, padded), jax.grad(loss)(params)

    logits, logits_padded, grads = run(params)
    assert logits.shape == (3, listops.NUM_CLASSES) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits_padded, logits, rtol=tol, atol=tol)
    grads = jax.tree_util.tree_leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in grads) > 0


def test_cudnn_branch_pads_lengths_and_masks_the_padding(monkeypatch):
    """The cuDNN call itself needs a GPU: here XLA stands in for it, taking the same arguments, so
    that the padding to a multiple of CUDNN_LENGTH_MULTIPLE and the key lengths are checked on CPU."""
    xla_attention = jax.nn.dot_product_attention
    shapes = []

    def fake_cudnn(query, key, value, *, key_value_seq_lengths, implementation):
        assert implementation == "cudnn"
        shapes.append((query.shape[1], key.shape[1]))
        return xla_attention(query, key, value, key_value_seq_lengths=key_value_seq_lengths,
                             implementation="xla")

    rng = np.random.default_rng(0)
    query, key, value = (jnp.asarray(rng.standard_normal((2, 37, 2, 8)), jnp.float32) for _ in range(3))
    mask = (np.arange(37)[None, :] < np.array([[37], [20]]))[:, None, None, :]  # padding at the end
    want = softmax.encoder_attention(query, key, value, jnp.asarray(mask), impl="xla")
    monkeypatch.setattr(jax.nn, "dot_product_attention", fake_cudnn)
    got = softmax.encoder_attention(query, key, value, jnp.asarray(mask), impl="cudnn")
    assert shapes == [(64, 64)] and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_cudnn_softmax_matches_xla():
    tokens, _ = listops.generate("train", 4, grammar=listops.Grammar(4, 4, 10, 64))
    nets = [listops.ListOpsClassifier(listops.ClassifierConfig(
        token_mixer="softmax", num_layers=1, d_model=64, num_heads=2, mlp_dim=64, max_len=64,
        dtype="bfloat16", softmax_impl=impl)) for impl in ("xla", "cudnn")]
    params = jax.jit(nets[0].init)(jax.random.PRNGKey(0), tokens)
    xla, cudnn = (jax.jit(net.apply)(params, tokens) for net in nets)
    assert float(jnp.linalg.norm(cudnn - xla) / jnp.linalg.norm(xla)) <= 5e-3 * 4  # two bf16 runs


def test_training_learns_a_small_set_and_accuracy_counts_every_example_once():
    cfg = listops.ClassifierConfig(num_layers=1, d_model=16, num_heads=2, mlp_dim=32, max_len=32)
    tc = listops.TrainConfig(steps=60, batch_size=4, learning_rate=1e-2, warmup_steps=2)
    tokens, labels = listops.generate("train", 8, grammar=listops.Grammar(4, 4, 10, 32))
    params, stats = listops.train_classifier(cfg, tc, tokens, labels)
    steps, losses = zip(*stats["loss_curve"])
    assert steps == (0, 10, 20, 30, 40, 50, 59)
    # 8 examples, 30 epochs: learned by heart (chance is 10 %).
    assert losses[-1] < 0.5 * losses[0] and listops.accuracy(cfg, params, tokens, labels, 4) >= 75.0
    # 7 examples in batches of 4: the last batch is padded with repeats, which are not counted.
    predicted = np.argmax(listops.ListOpsClassifier(cfg).apply(params, tokens[:7]), -1)
    want = 100.0 * np.mean(predicted == labels[:7])
    assert listops.accuracy(cfg, params, tokens[:7], labels[:7], 4) == pytest.approx(want)
    with pytest.raises(ValueError, match="warmup_steps"):
        listops.TrainConfig(steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="fewer than config.train.batch_size"):
        listops.train_classifier(cfg, tc, tokens[:3], labels[:3])
