"""Log-probabilities of given tokens: the one computation behind perplexity and the harness.

Two ways to score, both exact up to float rounding:

  stream_logprobs        whole texts, `context` tokens at a time; with `carry` each window starts
                         from the recurrent state the previous one ended with, so every token is
                         conditioned on everything before it (exact for TNL and cosFormer, whose
                         state is the whole past: docs/spec.md §7); without, every window starts fresh.
  continuation_logprobs  (context, continuation) pairs: the continuation's summed log-probability
                         and whether greedy decoding would produce it. With `reuse_context` a
                         context is prefilled once (`tnllm.decode.prefill`) and each of its
                         continuations runs from the prefill's state; otherwise every pair runs
                         through the model whole, left-padded.

Batches hold `batch_size` rows (a last, shorter one is filled with copies of its last row) and
lengths are padded to power-of-two buckets (`prompt_bucket`), so few programs are compiled.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from tnllm.config import ModelConfig
from tnllm.decode import Prefilled, left_pad, prefill, prompt_bucket
from tnllm.generate import filled_batches
from tnllm.model import TransNormerLLM, zero_states

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("cfg", "head_positions"))
def token_logprobs(params, inputs: Array, targets: Array, positions: Array, mask: Optional[Array],
                   states, *, cfg: ModelConfig, head_positions: int = 0
                   ) -> Tuple[Array, Array, Any]:
    """One model run: the log-probabilities of `targets` and whether each is the argmax.

    Args:
      inputs, targets, positions: [batch, seq] int; targets[:, i] is the token after inputs[:, i].
      mask: [batch, seq] bool (False at left padding) or None.
      states: each layer's state to start from (`tnllm.model.state_specs`), or None for zeros.
      head_positions: apply the vocabulary head to the last this many positions only (0: all):
        the [batch, positions, vocab] float32 logits are the largest array of a run.
    Returns:
      logprobs [batch, head_positions] f32, greedy [batch, head_positions] bool, final states.
    """
    hidden, states = TransNormerLLM(cfg).apply({"params": params}, inputs, positions, mask, states,
                                               return_hidden=True)
    hidden, targets = hidden[:, -head_positions:], targets[:, -head_positions:]
    # The tied head with float32 accumulation, as the training loss applies it (tnllm.loss).
    table = params["embed_tokens"]["embedding"].astype(hidden.dtype)
    logits = jnp.einsum("bpd,vd->bpv", hidden, table, preferred_element_type=jnp.float32)
    target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logprobs = target - jax.nn.logsumexp(logits, axis=-1)
    return logprobs, jnp.argmax(logits, axis=-1) == targets, states


def carries_state(cfg: ModelConfig) -> bool:
    """Whether the model's state after a window is all a later token needs (not the softmax
    baseline, which attends over a cache of every past key)."""
    return cfg.token_mixer != "softmax"


def stream_logprobs(params, cfg: ModelConfig, streams: Sequence[np.ndarray], *, context: int,
                    carry: bool = True, batch_size: int = 8, progress: bool = False,
                    desc: str = "scoring") -> List[np.ndarray]:
    """The log-probability of every token of each stream after its first: a list of [len - 1] f32.

    Streams run `batch_size` at a time, in windows of at most `context` predicted tokens. With
    `carry`, window j of a stream starts from the state window j - 1 ended with and LRPE counts
    positions from the stream's start: the same as one run over the whole stream. Without, each
    window is a fresh run; the softmax baseline has no state to carry, so a stream longer than
    `context` + 1 tokens needs `carry=False` there.
    """
    lengths = np.array([len(s) for s in streams])
    if lengths.size == 0 or lengths.min() < 2:
        raise ValueError("Every text must hold at least 2 tokens to score one; drop empty texts.")
    if carry and not carries_state(cfg) and lengths.max() - 1 > context:
        raise ValueError(
            f"A text of {lengths.max()} tokens is longer than the context ({context}) + 1, and the "
            "softmax baseline carries no state across windows; raise the context or score "
            "independent windows (carry=False, the CLI's --nocarry_state).")
    window = min(context, prompt_bucket(int(lengths.max()) - 1, context))
    order = np.argsort(-lengths, kind="stable")  # similar lengths share a batch
    out: List[Optional[np.ndarray]] = [None] * len(streams)
    total_windows = int(sum(-(-(lengths[order] - 1) // window)))
    bar = tqdm(total=total_windows, desc=desc, unit="window", disable=not progress)
    for rows, real in filled_batches(order, batch_size):
        longest = int(lengths[rows].max())
        padded = np.zeros((len(rows), -(-(longest - 1) // window) * window + 1), np.int32)
        for r, i in enumerate(rows):
            padded[r, :lengths[i]] = streams[i]
        states = zero_states(cfg, len(rows)) if carry and carries_state(cfg) else None
        pieces = []
        for start in range(0, padded.shape[1] - 1, window):
            inputs = padded[:, start:start + window]
            targets = padded[:, start + 1:start + window + 1]
            first = start if carry else 0  # a fresh window counts positions from 0, as training
            positions = np.broadcast_to(np.arange(first, first + window, dtype=np.int32),
                                        inputs.shape)
            if not carry:
                states = None  # every window from zero states
            logprobs, _, states = token_logprobs(params, inputs, targets, positions, None, states,
                                                 cfg=cfg)
            pieces.append(logprobs)  # fetched once per batch: the device runs ahead of the host
            bar.update(int(np.sum(lengths[rows[:real]] - 1 > start)))  # rows not yet ended
        logprobs = np.concatenate(jax.device_get(pieces), axis=1)
        for r, i in enumerate(rows[:real]):
            out[i] = logprobs[r, :lengths[i] - 1]
    bar.close()
    return out


@functools.partial(jax.jit, static_argnames=("cfg",))
def _continue(params, prefilled: Prefilled, rows: Array, first: Array, inputs: Array,
              targets: Array, *, cfg: ModelConfig) -> Tuple[Array, Array, Array, Array]:
    """Continuations after prefilled contexts. rows [n]: each continuation's context row; first
    [n]: its first token; inputs, targets [n, k]: its following tokens, right-padded.

    Returns the first token's log-probability and greediness [n], and the others' [n, k]."""
    logits = prefilled.logits[rows]
    first_logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), first[:, None], axis=-1)[:, 0]
    positions = prefilled.positions[rows][:, None] + jnp.arange(inputs.shape[1], dtype=jnp.int32)
    states = jax.tree.map(lambda s: s[rows], prefilled.states)
    # Right padding: causal, so the padded positions after a continuation change nothing before.
    logprobs, greedy, _ = token_logprobs(params, inputs, targets, positions, None, states, cfg=cfg)
    return first_logprob, jnp.argmax(logits, axis=-1) == first, logprobs, greedy


def continuation_logprobs(params, cfg: ModelConfig,
                          requests: Sequence[Tuple[Sequence[int], Sequence[int]]], *,
                          batch_size: int = 8, reuse_context: Optional[bool] = None,
                          progress: bool = False) -> List[Tuple[float, bool]]:
    """For each (context, continuation) pair of token lists (both non-empty): the continuation's
    log-probability given the context, and whether greedy decoding would produce it.

    reuse_context: prefill each distinct context once and run its continuations from the state
      (None: where the state carries the whole context, i.e. not for the softmax baseline).
    """
    for i, (ctx, cont) in enumerate(requests):
        if not len(ctx) or not len(cont):
            raise ValueError(f"Request {i} has an empty context or continuation; start the context "
                             "with a BOS or EOS token.")
    if reuse_context is None:
        reuse_context = carries_state(cfg)
    if reuse_context and not carries_state(cfg):
        raise ValueError("reuse_context needs a model whose state carries the context; the softmax "
                         "baseline's does not, so leave reuse_context unset.")
    run = _with_prefill if reuse_context else _recompute
    return run(params, cfg, [(list(c), list(x)) for c, x in requests], batch_size, progress)


def _recompute(params, cfg, requests, batch_size, progress):
    """Every pair through the model whole: context + continuation, left-padded."""
    lengths = np.array([len(c) + len(x) for c, x in requests])
    order = np.argsort(-lengths, kind="stable")
    out = [None] * len(requests)
    for rows, real in tqdm(list(filled_batches(order, batch_size)), desc="loglikelihood",
                           unit="batch", disable=not progress):
        seqs = [requests[i][0] + requests[i][1] for i in rows]
        bucket = prompt_bucket(max(len(s) for s in seqs) - 1)
        inputs, mask = left_pad([s[:-1] for s in seqs], bucket)
        targets, _ = left_pad([s[1:] for s in seqs], bucket)
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
        cont = [len(requests[i][1]) for i in rows]
        head = min(bucket, prompt_bucket(max(cont)))
        logprobs, greedy, _ = jax.device_get(token_logprobs(
            params, inputs, targets, positions, mask, None, cfg=cfg, head_positions=head))
        for r, i in enumerate(rows[:real]):
            out[i] = (float(logprobs[r, head - cont[r]:].sum()), bool(greedy[r, head - cont[r]:].all()))
    return out


def _with_prefill(params, cfg, requests, batch_size, progress):
    """Each distinct context prefilled once; its continuations run from the prefill's state."""
    contexts: Dict[Tuple[int, ...], List[int]] = {}  # context -> indices of its requests
    for i, (ctx, _) in enumerate(requests):
        contexts.setdefault(tuple(ctx), []).append(i)
    keys = sorted(contexts, key=len, reverse=True)  # similar lengths share a batch
    out = [None] * len(requests)
    for rows, real in tqdm(list(filled_batches(range(len(keys)), batch_size)),
                           desc="loglikelihood", unit="batch", disable=not progress):
        ctxs = [keys[k] for k in rows]
        tokens, mask = left_pad(ctxs, prompt_bucket(max(map(len, ctxs))))
        prefilled = prefill(params, tokens, mask, cfg=cfg)
        pairs = [(r, i) for r in range(real) for i in contexts[ctxs[r]]]
        for part, n in filled_batches(pairs, batch_size):
            conts = [requests[i][1] for _, i in part]
            k = prompt_bucket(max(len(c) for c in conts) - 1)
            inputs = np.zeros((len(part), k), np.int32)
            for j, c in enumerate(conts):
                inputs[j, :len(c) - 1] = c[:-1]
            targets = np.zeros_like(inputs)
            for j, c in enumerate(conts):
                targets[j, :len(c) - 1] = c[1:]
            first_lp, first_greedy, logprobs, greedy = jax.device_get(_continue(
                params, prefilled, np.array([r for r, _ in part], np.int32),
                np.array([c[0] for c in conts], np.int32), inputs, targets, cfg=cfg))
            for j, (_, i) in enumerate(part[:n]):
                m = len(conts[j]) - 1
                out[i] = (float(first_lp[j] + logprobs[j, :m].sum()),
                          bool(first_greedy[j] and greedy[j, :m].all()))
    return out
