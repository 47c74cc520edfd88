"""Shared test helpers."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tnllm.decode import decode_step, left_pad, prefill, prompt_bucket
from tnllm.model import TransNormerLLM, state_specs
from tnllm.testing import rel_err  # noqa: F401 -- the test files take it from here

jax.config.update("jax_default_matmul_precision", "highest")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(**extra) -> dict:
    """The environment of a test's child Python: this repository first on PYTHONPATH, the caller's
    entries kept (on the GPU machine they hold carried packages), then `extra`."""
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


def random_qkv(key, batch, seq, heads, dk, dv, dtype=jnp.float32):
    """Fresh random q, k, v of the operator's layout; q and k positive like silu features."""
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (batch, seq, heads, dk), jnp.float32) / np.sqrt(dk)
    k = jax.random.normal(kk, (batch, seq, heads, dk), jnp.float32) / np.sqrt(dk)
    v = jax.random.normal(kv, (batch, seq, heads, dv), jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def param_count(cfg) -> int:
    """Parameters of TransNormerLLM(cfg), from shapes only (jax.eval_shape: nothing is allocated)."""
    shapes = jax.eval_shape(lambda: TransNormerLLM(cfg).init(jax.random.PRNGKey(0),
                                                             jnp.zeros((1, 4), jnp.int32)))
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nn.meta.unbox(shapes["params"])))


def assert_prefill_then_decode_matches_forward(params, cfg, prompts, chunk, tol=1e-5):
    """Row r: prefill of its n_r prompt tokens, then total - n_r decode steps of given tokens, in one
    left-padded batch (segments of `chunk` tokens), against one unpadded forward pass over all
    `total` = len(prompts[0]) + 5 tokens of the row (prompts[0] must be the longest)."""
    total = len(prompts[0]) + 5
    rng = np.random.default_rng(0)
    sequences = np.stack([p + rng.integers(0, cfg.vocab_size, total - len(p)).tolist() for p in prompts])
    want, _ = jax.jit(TransNormerLLM(cfg).apply)({"params": params}, jnp.asarray(sequences))

    tokens, mask = left_pad(prompts, prompt_bucket(len(prompts[0]), chunk))
    pre = prefill(params, tokens, mask, cfg=cfg, prefill_chunk=chunk)
    got = [pre.logits]
    states, positions = pre.states, pre.positions
    for _ in range(total - min(len(p) for p in prompts)):
        # Rows whose sequence is complete feed its last token again; their logits are not compared.
        idx = np.minimum(np.asarray(positions), total - 1)
        logits, states = decode_step(params, jnp.asarray(sequences[np.arange(len(prompts)), idx]),
                                     positions, states, cfg=cfg)
        got.append(logits)
        positions = positions + 1
    got = jnp.stack(got, axis=1)  # [batch, steps + 1, vocab]: logits at positions n_r - 1 + i
    for row, prompt in enumerate(prompts):
        n = len(prompt)
        assert rel_err(got[row, :total - n + 1], want[row, n - 1:]) <= tol, row
    spec = lambda x: (x.shape, x.dtype)  # noqa: E731
    assert jax.tree.map(spec, states) == jax.tree.map(spec, state_specs(cfg, len(prompts)))
