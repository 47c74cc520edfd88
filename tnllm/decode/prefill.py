"""Prefill: left-padded prompts through the parallel form, giving what decoding starts from.

Left padding is exact (docs/spec.md §7): padded keys are zeroed by the model's `mask` (the softmax
mixer does not write them into its cache), and LRPE and RoPE positions count real tokens only, so
every row computes what it would compute alone.

A long prompt can be split over devices as training splits a sequence: under a `mesh` whose
`context` axis has n devices, each segment of the parallel form is cut into n slices that exchange
only their states (docs/parallelism.md). Decoding then continues from the states, whose size does
not depend on the prompt, on one device.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from tnllm import sharding
from tnllm.config import ModelConfig
from tnllm.decode.step import decode_step
from tnllm.model import TransNormerLLM, zero_states

Array = jax.Array

MIN_BUCKET = 16


class Prefilled(NamedTuple):
    """What decoding needs after a prompt: constant size whatever the prompt length."""

    logits: Array  # [batch, vocab] f32: the next token's logits
    positions: Array  # [batch] int32: the next token's LRPE position (= real tokens so far)
    states: Tuple[Any, ...]  # per layer, as `tnllm.model.state_specs`: fixed shapes


def prompt_bucket(length: int, prefill_chunk: int = 2048) -> int:
    """The padded prompt length: a power of two (at least MIN_BUCKET), rounded up to a multiple of
    `prefill_chunk` when longer, so that similar lengths share one compiled `prefill`."""
    bucket = max(MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length())
    if bucket > prefill_chunk:
        bucket = -(-bucket // prefill_chunk) * prefill_chunk
    return bucket


def left_pad(prompts: Sequence[Sequence[int]], length: int,
             pad_id: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Right-aligns token lists in [batch, length] int32 tokens and a bool mask (False = padding)."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        tokens[row, length - len(prompt):] = prompt
        mask[row, length - len(prompt):] = True
    return tokens, mask


@functools.partial(jax.jit, static_argnames=("cfg", "prefill_chunk", "mesh"))
def prefill(params, tokens: Array, mask: Array, *, cfg: ModelConfig, prefill_chunk: int = 2048,
            mesh: Optional[Mesh] = None) -> Prefilled:
    """Runs left-padded prompts through the parallel form and returns the decoding state.

    Compiled once per (batch, bucket); activation memory is bounded by `prefill_chunk` at any
    prompt length.

    Args:
      params: the model's `params` collection (plain arrays).
      tokens: [batch, bucket] int, each prompt right-aligned (left padding); bucket must be at most
        `prefill_chunk` or a multiple of it (`prompt_bucket`).
      mask: [batch, bucket] bool, False at padding; every row's last position must be real.
      cfg: the model; `cfg.attention_impl` picks the parallel form.
      prefill_chunk: tokens per segment of the parallel form.
      mesh: a device mesh (`tnllm.sharding.make_mesh`) to run on; its `context` axis splits each
        segment (when it divides the segment; else the segment runs whole), its other axes the
        batch and heads as in training. None: one device.
    """
    batch, bucket = tokens.shape
    if mesh is not None:  # places the program on the mesh's devices, rows split over its batch axes
        rows = (sharding.batch_sharding(mesh) if batch % sharding.batch_parallelism(mesh) == 0
                else sharding.replicated(mesh))
        tokens, mask = (lax.with_sharding_constraint(x, rows) for x in (tokens, mask))
    segment = min(prefill_chunk, bucket)
    if bucket % segment:
        raise ValueError(
            f"The prompt bucket ({bucket}) must be a multiple of prefill_chunk ({prefill_chunk}); "
            "pad prompts with `prompt_bucket`."
        )
    # The LM head is evaluated at the last position only: the parallel form gets the prompt without
    # its last token (shifted right by one more padded position, so segments stay aligned), and one
    # decode step takes the last token. Full-prompt logits would be [batch, bucket, vocab] f32.
    context = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)))
    context_mask = jnp.pad(mask[:, :-1], ((0, 0), (1, 0)))
    context_positions = jnp.maximum(jnp.cumsum(context_mask, axis=1) - 1, 0)

    def segments(x):  # [batch, bucket] -> [bucket // segment, batch, segment]
        return x.reshape(batch, bucket // segment, segment).swapaxes(0, 1)

    model = TransNormerLLM(cfg)

    def run_segment(states, xs):
        seg_tokens, seg_positions, seg_mask = xs
        _, states = model.apply({"params": params}, seg_tokens, positions=seg_positions,
                                mask=seg_mask, initial_states=states)
        return states, None

    with contextlib.nullcontext() if mesh is None else sharding.trace_on(mesh):
        states, _ = lax.scan(run_segment, zero_states(cfg, batch),
                             (segments(context), segments(context_positions), segments(context_mask)))
    last_positions = jnp.sum(mask, axis=1, dtype=jnp.int32) - 1
    logits, states = decode_step(params, tokens[:, -1], last_positions, states, cfg=cfg)
    return Prefilled(logits, last_positions + 1, states)
