"""The decoding loop: samples tokens after a prefill in one compiled `lax.while_loop`.

What to generate is a `Sampling`; how fast, a `DecodeOptions`, whose `resolve` is the one place
that picks the step: the fused one-row step on Hopper or Triton kernels (`tnllm.decode.fused`),
or XLA's step (`tnllm.decode.step`) with or without the folded norms and the one-row copies.
Both are frozen, hashable dataclasses, static arguments of the compiled loop, whose running state
is a `DecodeState`.

The loop's state has the same shapes at any context length, so it compiles once per (batch,
Sampling, resolved DecodeOptions) and costs the same per token at 1K or 128K tokens of context.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from tnllm.attention import pallas_compiles
from tnllm.config import ModelConfig
from tnllm.decode import fused as fused_step
from tnllm.decode.prefill import Prefilled
from tnllm.decode.step import carried_states, decode_step, one_row_copies
from tnllm.sampling import Greedy, Sampler

Array = jax.Array

# XLA's exhaustive search over GEMM tilings (GPU; other backends ignore it): faster decoding through
# XLA's step at batch 1 on H100 and H200 (docs/benchmarks.md), for ~30-40 s more compilation once
# per compiled loop; nothing for the fused one-row step, whose products are Pallas kernels.
AUTOTUNE_OPTIONS = {"xla_gpu_exhaustive_tiling_search": True}


@dataclasses.dataclass(frozen=True)
class Sampling:
    """What the loop generates.

    max_new_tokens: tokens per row at most.
    sampler: picks each token from the logits (`tnllm.sampling`); step i samples with
      `fold_in(rng, i)`.
    eos_id: a row stops after generating it; None never stops early.
    pad_id: written after a row's end.
    return_logprobs: also return log softmax(logits) of each chosen token (the model's
      distribution, before the sampler's filters).
    """

    max_new_tokens: int
    sampler: Sampler = Greedy()
    eos_id: Optional[int] = None
    pad_id: int = 0
    return_logprobs: bool = False


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """How fast the loop runs; no choice changes the tokens beyond float rounding.

    steps_per_iteration: decoding steps per iteration of the loop. A GPU while loop copies its
      predicate to the host and waits for it after every iteration; four steps per wait were 1.4 %
      faster for the 1B at batch 1 on an H100, for a larger program to compile (1: a plain loop).
    fused: step one row of a TNL model in bf16 through `tnllm.decode.fused` (Pallas GEMVs with the
      norms, gate, GLU product and residual adds fused in: 5 kernels a layer instead of 13);
      None: where it can and its kernels run compiled (a GPU; interpret mode elsewhere is far
      slower than XLA). True asks for it anywhere it can run.
    kernels: the fused step's products, "hopper" or "triton"; None: Hopper's on a Hopper GPU.
    fold_norms: XLA's step with TNL's SRMSNorm scales applied after the products
      (`tnllm.decode.step`); None: with more than one row, where it was 1.6-3.6 % faster at batch
      64 on an H200 (at batch 1 it compiled into more kernels, 0-3 % slower).
    autotune: compile the loop with XLA's exhaustive GEMM tiling search (`AUTOTUNE_OPTIONS`).
    """

    steps_per_iteration: int = 4
    fused: Optional[bool] = None
    kernels: Optional[str] = None
    fold_norms: Optional[bool] = None
    autotune: bool = False

    def __post_init__(self):
        if not isinstance(self.steps_per_iteration, int) or self.steps_per_iteration < 1:
            raise ValueError(f"DecodeOptions.steps_per_iteration must be a positive integer, got "
                             f"{self.steps_per_iteration!r}.")
        fused_step.check_kernels(self.kernels, "DecodeOptions.kernels")

    def resolve(self, cfg: ModelConfig, batch: int) -> "DecodeOptions":
        """These options with every None decided for `batch` rows of `cfg` on this machine: the
        one place that picks the step. Raises where `fused=True` cannot run."""
        reason = fused_step.unsupported(cfg, batch)
        if self.fused and reason:
            raise ValueError(f"DecodeOptions(fused=True) cannot decode this: {reason}; leave "
                             f"fused=None.")
        fused = (not reason and pallas_compiles()) if self.fused is None else self.fused
        kernels = (self.kernels or fused_step.default_kernels()) if fused else None
        fold_norms = self.fold_norms
        if fused or cfg.token_mixer != "gla":
            fold_norms = False  # only XLA's step over TNL's layers folds them
        elif fold_norms is None:
            fold_norms = batch > 1
        return dataclasses.replace(self, fused=fused, kernels=kernels, fold_norms=fold_norms)


@flax.struct.dataclass
class DecodeState:
    """The loop's running state: fixed shapes at any context length."""

    step: Array  # int32 scalar: the index of the next token to sample
    token: Array  # [batch] int32: the last sampled token, the next step's input
    positions: Array  # [batch] int32: its positions
    states: Tuple[Any, ...]  # per layer, as the step carries them (`carried_states`)
    tokens: Array  # [batch, max_new_tokens] int32: sampled so far, pad_id after a row's end
    lengths: Array  # [batch] int32: tokens generated, the EOS included
    logprobs: Optional[Array]  # [batch, max_new_tokens] f32, or None when not asked for
    done: Array  # [batch] bool: the row has generated its EOS


class Generation(NamedTuple):
    """Generated tokens; everything after a row's EOS is padding."""

    tokens: Array  # [batch, max_new_tokens] int32, pad_id after the row's end
    lengths: Array  # [batch] int32: tokens generated, the EOS included
    logprobs: Optional[Array]  # [batch, max_new_tokens] f32 model log-probabilities, 0 after the end


def _emit(state: DecodeState, logits: Array, rng: Array, sampling: Sampling) -> DecodeState:
    """Samples token `state.step` of each row still going from logits [batch, vocab] f32."""
    i, done = state.step, state.done
    token = jnp.where(done, sampling.pad_id, sampling.sampler(logits, jax.random.fold_in(rng, i)))
    logprobs = state.logprobs
    if sampling.return_logprobs:
        logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
        logprobs = logprobs.at[:, i].set(jnp.where(done, 0.0, logprob))
    if sampling.eos_id is not None:
        done = done | (token == sampling.eos_id)
    return state.replace(step=i + 1, token=token, tokens=state.tokens.at[:, i].set(token),
                         lengths=state.lengths + (~state.done).astype(jnp.int32),
                         logprobs=logprobs, done=done)


def _decode(params, prefilled: Prefilled, rng: Array, *, cfg: ModelConfig, sampling: Sampling,
            options: DecodeOptions) -> Generation:
    """`decode` with resolved options."""
    batch = prefilled.logits.shape[0]
    n = sampling.max_new_tokens
    copies = 1 if options.fused else one_row_copies(cfg, batch)

    def model_step(state: DecodeState) -> Tuple[Array, Tuple[Any, ...]]:
        if options.fused:
            return fused_step.step(params, state.token, state.positions, state.states, cfg=cfg,
                                   kernels=options.kernels)
        return decode_step(params, state.token, state.positions, state.states, cfg=cfg,
                           fold_norms=options.fold_norms, copies=copies)

    def steps(count):
        def body(state: DecodeState) -> DecodeState:
            for _ in range(count):
                logits, states = model_step(state)
                state = _emit(state.replace(states=states, positions=state.positions + 1),
                              logits, rng, sampling)
            return state
        return body

    def room_for(count):  # `count` more steps fit, and some row is still going
        return lambda state: (state.step + count <= n) & ~jnp.all(state.done)

    state = DecodeState(
        step=jnp.int32(0), token=jnp.zeros((batch,), jnp.int32),
        positions=prefilled.positions, states=carried_states(cfg, prefilled.states, copies),
        tokens=jnp.full((batch, n), sampling.pad_id, jnp.int32),
        lengths=jnp.zeros((batch,), jnp.int32),
        logprobs=jnp.zeros((batch, n), jnp.float32) if sampling.return_logprobs else None,
        done=jnp.zeros((batch,), bool))
    state = _emit(state, prefilled.logits, rng, sampling)
    # The loop body runs `steps_per_iteration` steps, then single steps up to max_new_tokens.
    if options.steps_per_iteration > 1:
        state = lax.while_loop(room_for(options.steps_per_iteration),
                               steps(options.steps_per_iteration), state)
    state = lax.while_loop(room_for(1), steps(1), state)
    return Generation(state.tokens, state.lengths, state.logprobs)


_STATIC = ("cfg", "sampling", "options")
PROGRAMS = {False: jax.jit(_decode, static_argnames=_STATIC),
            True: jax.jit(_decode, static_argnames=_STATIC, compiler_options=AUTOTUNE_OPTIONS)}


def decode(params, prefilled: Prefilled, rng: Array, *, cfg: ModelConfig, sampling: Sampling,
           options: DecodeOptions = DecodeOptions()) -> Generation:
    """Samples up to `sampling.max_new_tokens` tokens per row after `prefilled`.

    Args:
      params: the model's `params` collection; prefilled: from `tnllm.decode.prefill`.
      rng: a PRNG key.
      sampling: what to generate; options: how fast (resolved here for the batch and machine).
    Returns:
      a Generation of device arrays.
    """
    options = options.resolve(cfg, prefilled.logits.shape[0])
    return PROGRAMS[options.autotune](params, prefilled, rng, cfg=cfg, sampling=sampling,
                                      options=options)
