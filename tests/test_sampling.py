"""Samplers keep exactly the right tokens and sample from the right distribution."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tnllm.sampling import Chain, Greedy, Temperature, TopK, TopP, make_sampler

# Row 0 has distinct probabilities 0.5, 0.3, 0.15, 0.05 (ids 2, 0, 3, 1); row 1 ties ids 1 and 3.
PROBS = np.array([[0.3, 0.05, 0.5, 0.15], [0.1, 0.3, 0.3, 0.3]], np.float32)
LOGITS = jnp.log(jnp.asarray(PROBS))


def kept(logits):
    return [set(np.flatnonzero(np.isfinite(row)).tolist()) for row in np.asarray(logits)]


def draw(sampler, logits, n, seed=0):
    """n draws per row: [n, batch]."""
    keys = jax.random.split(jax.random.key(seed), n)
    return np.asarray(jax.vmap(lambda key: sampler(logits, key))(keys))


def test_greedy_takes_the_argmax_and_ignores_the_key():
    assert draw(Greedy(), LOGITS, 5).tolist() == [[2, 1]] * 5  # row 1's tie goes to the lowest id
    assert kept(Greedy().filter(LOGITS)) == [{2}, {1}]


@pytest.mark.parametrize("k, want", [(1, [{2}, {1}]), (2, [{2, 0}, {1, 2}]), (3, [{2, 0, 3}, {1, 2, 3}]),
                                     (4, [{0, 1, 2, 3}] * 2), (99, [{0, 1, 2, 3}] * 2)])
def test_top_k_keeps_exactly_the_k_most_likely(k, want):
    filtered = TopK(k).filter(LOGITS)
    assert kept(filtered) == want
    np.testing.assert_array_equal(np.where(np.isfinite(filtered), filtered, 0),
                                  np.where(np.isfinite(filtered), LOGITS, 0))
    samples = draw(TopK(k), LOGITS, 200)
    for row in range(2):
        assert set(samples[:, row].tolist()) <= want[row]


@pytest.mark.parametrize("p, want_row0", [(0.01, {2}), (0.49, {2}), (0.51, {2, 0}), (0.79, {2, 0}),
                                          (0.81, {2, 0, 3}), (0.94, {2, 0, 3}), (0.96, {0, 1, 2, 3}),
                                          (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_set_reaching_p(p, want_row0):
    filtered = TopP(p).filter(LOGITS)
    assert kept(filtered)[0] == want_row0
    # The kept tokens keep their relative probabilities.
    renormalised = np.where([t in want_row0 for t in range(4)], PROBS[0], 0)
    np.testing.assert_allclose(jax.nn.softmax(filtered[0]), renormalised / renormalised.sum(),
                               rtol=1e-6, atol=1e-7)


def test_top_p_breaks_ties_by_id():
    assert kept(TopP(0.35).filter(LOGITS))[1] == {1, 2}


def test_temperature_samples_from_the_tempered_softmax():
    n = 20000
    for temperature in (0.5, 2.0):
        samples = draw(Temperature(temperature), LOGITS, n)[:, 0]
        want = PROBS[0] ** (1 / temperature) / np.sum(PROBS[0] ** (1 / temperature))
        freq = np.bincount(samples, minlength=4) / n
        # Within 5 standard errors of a binomial frequency.
        assert np.all(np.abs(freq - want) <= 5 * np.sqrt(want * (1 - want) / n)), (freq, want)


def test_same_key_same_tokens_other_key_other_tokens():
    logits = jax.random.normal(jax.random.key(1), (8, 1000))
    a, b, c = (draw(Temperature(1.0), logits, 1, seed)[0] for seed in (3, 3, 4))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_chain_applies_filters_in_order():
    chain = Chain((Temperature(0.5), TopK(3), TopP(0.8)))
    tempered = PROBS[0] ** 2 / np.sum(PROBS[0] ** 2)  # 0.69, 0.25, 0.06, 0.007 for ids 2, 0, 3, 1
    assert tempered[2] + tempered[0] > 0.8
    assert kept(chain.filter(LOGITS))[0] == {2, 0}
    assert set(draw(chain, LOGITS, 200)[:, 0].tolist()) == {2, 0}
    assert kept(Chain((TopK(3), Greedy())).filter(LOGITS)) == [{2}, {1}]


def test_samplers_are_hashable_static_arguments():
    assert hash(Chain((Temperature(0.7), TopK(40)))) == hash(Chain((Temperature(0.7), TopK(40))))


@pytest.mark.parametrize("make, match", [
    (lambda: Temperature(0.0), "Greedy"), (lambda: TopK(0), "TopK.k"), (lambda: TopK(2.5), "TopK.k"),
    (lambda: TopP(0.0), "TopP.p"), (lambda: TopP(1.5), "TopP.p"), (lambda: Chain(()), "Chain"),
])
def test_bad_parameters_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_make_sampler_maps_the_usual_knobs():
    assert make_sampler(temperature=0, top_k=5) == Greedy()
    assert make_sampler() == Temperature(1.0)
    assert make_sampler(top_k=40) == TopK(40)
    assert make_sampler(temperature=0.7, top_k=40, top_p=0.9) == Chain((Temperature(0.7), TopK(40), TopP(0.9)))
    with pytest.raises(ValueError, match="TopP.p"):
        make_sampler(top_p=0)
