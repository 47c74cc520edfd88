"""Next-token cross-entropy through the tied vocabulary head, one slice of the sequence at a time.

At long sequences the full logits dominate a training step's memory: [tokens, vocab] float32 is
8.4 GB for 32K tokens of the 64,000-word vocabulary, and autodiff keeps them and their gradient
(docs/benchmarks.md, longest sequence at batch 1). `cross_entropy_sum` walks the sequence in slices
with `lax.scan` and computes each slice's gradient (softmax minus one-hot, times the head) in the
same pass as its loss, so no slice's logits outlive it and nothing is recomputed: the loss is a
scalar, so the backward pass only scales the saved gradients by its one-number cotangent.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def sequence_slices(x: Array, positions: int) -> Array:
    """[batch, seq, ...] -> [seq / positions, batch, positions, ...], the sequence zero-padded.

    The batch axis stays whole (and sharded as it was); a scan walks the new leading axis."""
    b, s = x.shape[:2]
    x = jnp.pad(x, [(0, 0), (0, -s % positions)] + [(0, 0)] * (x.ndim - 2))
    return jnp.swapaxes(x.reshape((b, -1, positions) + x.shape[2:]), 0, 1)


def _scan(hidden, embedding, labels, weights, tokens_per_slice: int, with_grad: bool):
    """The slice loop: the weighted loss sum, and with_grad its gradients wrt hidden and embedding."""
    b, s, d = hidden.shape
    positions = max(1, min(s, tokens_per_slice // b))
    table = embedding.astype(hidden.dtype)  # the head computes in the compute dtype, as Embed.attend

    def body(carry, xs):
        loss, d_table = carry
        h, y, w = xs  # [b, positions, d], [b, positions], [b, positions]
        logits = jnp.einsum("bpd,vd->bpv", h, table, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        loss = loss + jnp.sum(w * (lse - target))
        if not with_grad:
            return (loss, d_table), None
        one_hot = jnp.arange(logits.shape[-1]) == y[..., None]
        g = ((jnp.exp(logits - lse[..., None]) - one_hot) * w[..., None]).astype(hidden.dtype)
        d_h = jnp.einsum("bpv,vd->bpd", g, table, preferred_element_type=jnp.float32)
        d_table = d_table + jnp.einsum("bpv,bpd->vd", g, h, preferred_element_type=jnp.float32)
        return (loss, d_table), d_h.astype(hidden.dtype)

    zeros = jnp.zeros(table.shape if with_grad else (), jnp.float32)
    (loss, d_table), d_h = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), zeros),
        (sequence_slices(hidden, positions), sequence_slices(labels, positions),
         sequence_slices(weights.astype(jnp.float32), positions)))
    if not with_grad:
        return loss
    d_h = jnp.swapaxes(d_h, 0, 1).reshape(b, -1, d)[:, :s]
    return loss, d_h, d_table.astype(embedding.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def cross_entropy_sum(hidden: Array, embedding: Array, labels: Array, weights: Array,
                      tokens_per_slice: int) -> Array:
    """Σ weights · cross-entropy(hidden @ embeddingᵀ, labels), computed `tokens_per_slice` at a time.

    Args:
      hidden: [batch, seq, d] final hidden states in the compute dtype.
      embedding: [vocab, d] the tied head (any float dtype; cast to hidden's for the product).
      labels: [batch, seq] int target ids.
      weights: [batch, seq] per-token weights (not differentiated).
      tokens_per_slice: tokens of one slice: each covers the whole batch and
        max(1, tokens_per_slice // batch) positions, so its float32 logits are that many tokens x vocab.
    Returns:
      The weighted sum, a float32 scalar. Logits are float32 (bf16 products, float32 accumulation).
    """
    return _scan(hidden, embedding, labels, weights, tokens_per_slice, with_grad=False)


def _forward(hidden, embedding, labels, weights, tokens_per_slice):
    loss, d_h, d_table = _scan(hidden, embedding, labels, weights, tokens_per_slice, with_grad=True)
    return loss, (d_h, d_table, labels, weights)


def _backward(tokens_per_slice, residuals, g):
    del tokens_per_slice
    d_h, d_table, labels, weights = residuals
    return ((d_h * g).astype(d_h.dtype), (d_table * g).astype(d_table.dtype),
            np.zeros(labels.shape, jax.dtypes.float0), jnp.zeros_like(weights))


cross_entropy_sum.defvjp(_forward, _backward)
