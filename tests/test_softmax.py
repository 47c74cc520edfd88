"""The softmax-attention baseline (tnllm/softmax.py): the quadratic reference, RoPE, KV-cache decoding,
parameter parity with TNL, the cache-length error."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_prefill_then_decode_matches_forward, param_count, rel_err

from tnllm import config, convert, softmax
from tnllm.generate import generate
from tnllm.model import TransNormerLLM
from tnllm.softmax import SoftmaxAttention, rope

# A larger init_std than training's 0.02 so that attention weights are far from uniform; a short cache
# keeps decoding cheap.
CFG = config.model_config(config.load("configs/softmax_tiny.py")).replace(init_std=0.3, max_cache_len=32)


@pytest.fixture(scope="module")
def params():
    variables = jax.jit(TransNormerLLM(CFG).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    return nn.unbox(variables)["params"]


def _reference_rope(x, positions):
    """Rotate-half RoPE in float64: pairs (i, i + hd/2) turn by t * 10000^(-2i/hd)."""
    half = x.shape[-1] // 2
    angle = positions[:, :, None, None] * 10000.0 ** (-np.arange(half) / half)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                           x2 * np.cos(angle) + x1 * np.sin(angle)], axis=-1)


def test_attention_matches_the_quadratic_reference():
    """softmax((q kᵀ) / √hd + causal mask) v with RoPE, in float64 from the module's own weights."""
    batch, seq = 2, 11
    x = jax.random.normal(jax.random.key(1), (batch, seq, CFG.d_model))
    positions = jnp.broadcast_to(jnp.arange(seq) + 3, (batch, seq))
    module = SoftmaxAttention(CFG)
    variables = module.init(jax.random.key(2), x, positions, None, None)
    got, state = module.apply(variables, x, positions, None, None)
    assert state is None

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(variables)["params"])
    qkv = np.einsum("btd,dqhk->btqhk", np.asarray(x, np.float64), p["qkv_proj"]["kernel"])
    q, k, v = (qkv[:, :, i] for i in range(3))
    pos = np.asarray(positions, np.float64)
    q, k = _reference_rope(q, pos), _reference_rope(k, pos)
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(CFG.head_dim)
    scores = np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshd->bthd", weights, v)
    want = np.einsum("bthk,hkd->btd", o, p["out_proj"]["kernel"])
    assert rel_err(got, want) <= 1e-5


def test_rope_scores_depend_on_relative_position_only():
    q = jax.random.normal(jax.random.key(3), (1, 9, 2, 16))
    k = jax.random.normal(jax.random.key(4), (1, 9, 2, 16))
    pos = jnp.arange(9)[None]
    scores = lambda shift: jnp.einsum("bthd,bshd->bhts", rope(q, pos + shift), rope(k, pos + shift))  # noqa: E731
    for shift in (1, 500):
        assert rel_err(scores(shift), scores(0)) <= 1e-4
    assert not np.allclose(scores(0), jnp.einsum("bthd,bshd->bhts", q, k))


def test_prefill_then_decode_steps_match_one_forward_pass(params):
    """Left-padded rows of 13, 6 and 1 tokens, prefilled in two segments through the KV cache, then
    decoded token by token: each row gives the logits of its own unpadded forward pass."""
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [200, 17, 45, 3, 99, 128], [42]]
    assert_prefill_then_decode_matches_forward(params, CFG, prompts, chunk=8)


def test_greedy_generation_follows_the_forward_pass(params):
    prompt = [5, 6, 7]
    out = generate(params, CFG, [prompt], max_new_tokens=6, prefill_chunk=8)
    sequence = jnp.asarray([prompt + out.tokens[0].tolist()])
    logits, _ = TransNormerLLM(CFG).apply({"params": params}, sequence)
    np.testing.assert_array_equal(out.tokens[0], np.argmax(logits[0, len(prompt) - 1:-1], axis=-1))


def test_generation_past_the_cache_is_refused(params):
    with pytest.raises(ValueError, match=r"The longest prompt \(30 tokens\) plus max_new_tokens \(3\) "
                                         r"exceeds the KV cache of config.model.max_cache_len = 32"):
        generate(params, CFG, [[1] * 30, [2]], max_new_tokens=3)


@pytest.mark.parametrize("name", ["tiny", "385m", "1b"])
def test_parameter_count_within_2_percent_of_tnl(name):
    tnl = config.model_config(config.load(f"configs/{name}.py"))
    soft = config.model_config(config.load(f"configs/softmax_{name}.py"))
    assert (soft.d_model, soft.num_layers, soft.num_heads, soft.vocab_size) == (
        tnl.d_model, tnl.num_layers, tnl.num_heads, tnl.vocab_size)
    assert soft.glu_dim % (8 if name == "tiny" else 128) == 0
    assert abs(param_count(soft) / param_count(tnl) - 1) <= 0.02


@pytest.mark.parametrize("impl, want", [("auto", "xla"), ("xla", "xla"), ("cudnn", "cudnn"),
                                        ("recurrent", "xla")])
def test_the_config_names_the_form_and_auto_is_xla_off_gpus(monkeypatch, impl, want):
    """config.model.attention_impl reaches jax.nn.dot_product_attention, with and without a cache;
    a form of TNL's GLA only (generation asks every mixer for "recurrent") leaves the choice to auto."""
    seen = []
    attend = jax.nn.dot_product_attention

    def record(*args, implementation, **kwargs):
        seen.append(implementation)
        return attend(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", record)
    cfg = CFG.replace(attention_impl=impl)
    x = jnp.ones((1, 3, cfg.d_model), jnp.float32)
    positions = jnp.arange(3)[None]
    layer = SoftmaxAttention(cfg, 0)
    variables = layer.init(jax.random.key(0), x, positions, None, None)
    layer.apply(variables, x, positions, None, None)
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), softmax.cache_spec(cfg, 1))
    layer.apply(variables, x, positions, None, cache)
    assert seen == [want] * 3


def test_odd_head_dim_is_refused():
    with pytest.raises(ValueError, match="head_dim = hidden_dim / num_heads = 21 is odd"):
        CFG.replace(d_model=42, hidden_dim=42)


def test_conversion_to_the_released_layout_is_refused():
    with pytest.raises(ValueError, match="token_mixer 'softmax' \\(not 'gla'\\) cannot be converted"):
        convert.layout(CFG)
