"""Samplers: pick the next token from the model's logits.

Each sampler is a small frozen (hence hashable, hence usable as a static `jax.jit` argument)
dataclass with two methods:
  filter(logits) -> logits   reshapes the distribution: scales it, or sets dropped tokens to -inf;
  __call__(logits, rng)      draws one token per row from softmax(filter(logits)).
`Chain` composes filters in order, e.g. `Chain((Temperature(0.7), TopK(40), TopP(0.9)))` (the usual
order: top-k and top-p then act on the tempered distribution).

All samplers take logits [batch, vocab] float32 and return token ids [batch] int32.
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp

Array = jax.Array


class Sampler:
    """Base: sample from softmax(filter(logits)); subclasses override `filter`."""

    def filter(self, logits: Array) -> Array:
        return logits

    def __call__(self, logits: Array, rng: Array) -> Array:
        return jax.random.categorical(rng, self.filter(logits), axis=-1).astype(jnp.int32)


def _keep(logits: Array, keep: Array) -> Array:
    return jnp.where(keep, logits, -jnp.inf)


def _scatter_rows(like: Array, ids: Array, values: Array) -> Array:
    """A bool array shaped like `like` [batch, vocab]: values[b, i] at [b, ids[b, i]], False elsewhere."""
    rows = jnp.arange(ids.shape[0])[:, None]
    return jnp.zeros(like.shape, bool).at[rows, ids].set(values)


@dataclasses.dataclass(frozen=True)
class Greedy(Sampler):
    """The most likely token (ties go to the lowest id); ignores `rng`."""

    def filter(self, logits: Array) -> Array:
        best = jnp.argmax(logits, axis=-1)
        return _keep(logits, jnp.arange(logits.shape[-1]) == best[:, None])

    def __call__(self, logits: Array, rng: Array) -> Array:
        del rng
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Temperature(Sampler):
    """Samples from softmax(logits / temperature): below 1 sharper, above 1 flatter."""

    temperature: float = 1.0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(
                f"Temperature.temperature must be positive, got {self.temperature!r}; use Greedy() "
                "for temperature 0."
            )

    def filter(self, logits: Array) -> Array:
        return logits / jnp.asarray(self.temperature, logits.dtype)


@dataclasses.dataclass(frozen=True)
class TopK(Sampler):
    """Keeps exactly the k most likely tokens (ties broken towards lower ids), then samples.

    A k at least the vocabulary size keeps every token.
    """

    k: int

    def __post_init__(self):
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"TopK.k must be a positive integer, got {self.k!r}.")

    def filter(self, logits: Array) -> Array:
        k = min(self.k, logits.shape[-1])
        _, top = jax.lax.top_k(logits, k)
        return _keep(logits, _scatter_rows(logits, top, True))


@dataclasses.dataclass(frozen=True)
class TopP(Sampler):
    """Nucleus sampling: keeps the smallest set of most likely tokens whose probability sums to at
    least p (always at least the most likely one), then samples."""

    p: float

    def __post_init__(self):
        if not 0 < self.p <= 1:
            raise ValueError(f"TopP.p must lie in (0, 1], got {self.p!r}.")

    def filter(self, logits: Array) -> Array:
        if self.p == 1:
            return logits
        order = jnp.argsort(-logits, axis=-1, stable=True)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
        # A token is kept while the mass of the tokens before it is still short of p.
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        return _keep(logits, _scatter_rows(logits, order, mass_before < self.p))


@dataclasses.dataclass(frozen=True)
class Chain(Sampler):
    """Applies the filters of `samplers` in order, then samples once."""

    samplers: Tuple[Sampler, ...]

    def __post_init__(self):
        object.__setattr__(self, "samplers", tuple(self.samplers))
        if not self.samplers or not all(isinstance(s, Sampler) for s in self.samplers):
            raise ValueError(
                f"Chain needs a non-empty tuple of samplers, got {self.samplers!r}."
            )

    def filter(self, logits: Array) -> Array:
        for sampler in self.samplers:
            logits = sampler.filter(logits)
        return logits


def make_sampler(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Sampler:
    """The sampler of the usual knobs: temperature 0 is greedy; top_k 0 and top_p 1 are off."""
    if temperature == 0:
        return Greedy()
    filters = [Temperature(temperature)] if temperature != 1 else []
    filters += [TopK(top_k)] if top_k else []
    filters += [TopP(top_p)] if top_p != 1 else []
    if not filters:
        return Temperature(1.0)
    return filters[0] if len(filters) == 1 else Chain(tuple(filters))
