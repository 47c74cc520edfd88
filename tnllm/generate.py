"""Generation with a constant-size state (SPEC.md §7), and its CLI.

The state is each layer's recurrent state for TNL's linear mixers and a KV cache of
`config.model.max_cache_len` tokens for the softmax baseline (`tnllm.softmax`); both keep one shape
whatever the context length, so everything below serves every mixer.

  prefill      left-padded prompts [batch, bucket] -> the next token's logits, each row's next LRPE
               position and every layer's recurrent state. Runs the parallel form of
               `cfg.attention_impl` (blockwise or Pallas) in segments of `prefill_chunk` tokens, so
               activation memory is bounded at any prompt length. Compiled per (batch, bucket).
  decode       samples `max_new_tokens` tokens in a `lax.while_loop` of one-token recurrent steps,
               stopping each row at EOS and the loop when every row has stopped; at batch 1 on a
               GPU the step is `tnllm.fused_decode`'s (fused Pallas GEMVs). Its carry has the
               same shapes at any context length, so it compiles once per (batch, max_new_tokens)
               and costs the same per token at 1K or 128K tokens of context. `decode_autotuned`
               is the same compiled with XLA's exhaustive GEMM tiling search (GPU).
  generate     the Python entry point: checks token lists, left-pads them to a length bucket (powers
               of two), casts the matmul weights to the compute dtype once (`serving_params`),
               runs both and returns numpy arrays.
  main         `python -m tnllm.generate --checkpoint DIR --prompt "..."`.

Left padding is exact (SPEC.md §7): padded keys are zeroed by the model's `mask` (the softmax mixer does
not write them into its cache), and LRPE and RoPE positions count real tokens only, so every row
computes what it would compute alone.
"""
from __future__ import annotations

import functools
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tnllm import fused_decode
from tnllm.config import ModelConfig
from tnllm.model import TransNormerLLM, zero_states
from tnllm.sampling import Greedy, Sampler, make_sampler

Array = jax.Array

MIN_BUCKET = 16


class Prefilled(NamedTuple):
    """What decoding needs after a prompt: constant size whatever the prompt length."""

    logits: Array  # [batch, vocab] f32: the next token's logits
    positions: Array  # [batch] int32: the next token's LRPE position (= real tokens so far)
    states: Tuple[Any, ...]  # per layer, as `tnllm.model.state_specs`: fixed shapes


class Generation(NamedTuple):
    """Generated tokens; everything after a row's EOS is padding."""

    tokens: Array  # [batch, max_new_tokens] int32, pad_id after the row's end
    lengths: Array  # [batch] int32: tokens generated, the EOS included
    logprobs: Optional[Array]  # [batch, max_new_tokens] f32 model log-probabilities, 0 after the end


@functools.partial(jax.jit, static_argnames=("cfg", "fold_norms"))
def decode_step(params, tokens: Array, positions: Array, states: Sequence[Any], *,
                cfg: ModelConfig, fold_norms: bool = False) -> Tuple[Array, Tuple[Any, ...]]:
    """One token per row through the recurrence S <- lambda S + k^T v, o = q S (softmax: one cache
    slot written, attention over the cache up to the token's position).

    Args:
      params: the model's `params` collection (plain arrays).
      tokens: [batch] int token ids; positions: [batch] int their positions (real tokens before them).
      states: per layer, as `tnllm.model.state_specs`.
      fold_norms: TNL's SRMSNorm scales applied after the products that follow the norms
        (`TransNormerLLM.fold_norms`): the same step, which XLA may compile into fewer kernels;
        False keeps the released order. Other token mixers ignore it (TransNormerLLM folds the
        norms of TNL's layers only).
    Returns:
      logits [batch, vocab] f32 for the token after `tokens`, and the new states.
    """
    model = TransNormerLLM(cfg.replace(attention_impl="recurrent"),
                           fold_norms=fold_norms and cfg.token_mixer == "gla")
    logits, states = model.apply({"params": params}, tokens[:, None], positions=positions[:, None],
                                 initial_states=tuple(states))
    return logits[:, 0], states


@functools.partial(jax.jit, static_argnames=("cfg", "prefill_chunk"))
def prefill(params, tokens: Array, mask: Array, *, cfg: ModelConfig,
            prefill_chunk: int = 2048) -> Prefilled:
    """Runs left-padded prompts through the parallel form and returns the decoding state.

    Args:
      params: the model's `params` collection (plain arrays).
      tokens: [batch, bucket] int, each prompt right-aligned (left padding); bucket must be at most
        `prefill_chunk` or a multiple of it.
      mask: [batch, bucket] bool, False at padding; every row's last position must be real.
      cfg: the model; `cfg.attention_impl` picks the parallel form.
      prefill_chunk: tokens per segment of the parallel form (bounds activation memory).
    """
    batch, bucket = tokens.shape
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

    states, _ = lax.scan(run_segment, zero_states(cfg, batch),
                         (segments(context), segments(context_positions), segments(context_mask)))
    last_positions = jnp.sum(mask, axis=1, dtype=jnp.int32) - 1
    logits, states = decode_step(params, tokens[:, -1], last_positions, states, cfg=cfg)
    return Prefilled(logits, last_positions + 1, states)


def _decode(params, prefilled: Prefilled, rng: Array, *, cfg: ModelConfig, sampler: Sampler,
           max_new_tokens: int, eos_id: Optional[int] = None, pad_id: int = 0,
           return_logprobs: bool = False, steps_per_iteration: int = 4,
           fold_norms: Optional[bool] = None, fused: Optional[bool] = None,
           fused_kernels: Optional[str] = None) -> Generation:
    """Samples up to `max_new_tokens` tokens per row after `prefilled`.

    Args:
      params: the model's `params` collection; prefilled: from `prefill`.
      rng: a PRNG key; step i samples with `fold_in(rng, i)`.
      sampler: picks each token from the logits (`tnllm.sampling`).
      eos_id: a row stops after generating it; None never stops early.
      pad_id: written after a row's end.
      return_logprobs: also return log softmax(logits) of each chosen token (the model's
        distribution, before the sampler's filters).
      steps_per_iteration: decoding steps per iteration of the loop: fewer of the host round
        trips a GPU loop makes per iteration, a larger program to compile (1: a plain loop).
      fold_norms: see `decode_step`; None folds when the batch has more than one row. Measured on
        an H200 (docs/benchmarks.md): folded steps are 1.6-3.6 % faster at batch 64, where XLA
        fuses the scales away (12 kernels a layer instead of 14), and 0-3 % slower at batch 1
        (run as two rows, below), where it compiles them into more kernels.
      fused: at batch 1, step with `tnllm.fused_decode` (Pallas GEMVs with the norms, gate, GLU
        product and residual adds fused in; interpret mode without a GPU) instead of the model's
        layers compiled by XLA; None: where it runs compiled (a GPU) and takes the model (TNL,
        bf16). Measured on an H200 (docs/benchmarks.md): 5 kernels a layer instead of 13.
      fused_kernels: the fused step's products, "hopper" or "triton" (`tnllm.fused_decode.step`);
        None: Hopper's where the GPU is one.
    """
    batch = prefilled.logits.shape[0]
    if fold_norms is None:
        fold_norms = batch > 1
    if fused is None:
        fused = fused_decode.by_default(cfg, batch)
    elif fused and (reason := fused_decode.unsupported(cfg, batch)):
        raise ValueError(f"fused=True cannot decode this: {reason}; leave fused=None.")
    fused_decode.check_kernels(fused_kernels, "fused_kernels")

    def emit(i, logits, out):
        tokens, lengths, logprobs, done = out
        token = jnp.where(done, pad_id, sampler(logits, jax.random.fold_in(rng, i)))
        tokens = tokens.at[:, i].set(token)
        lengths = lengths + (~done).astype(jnp.int32)
        if return_logprobs:
            logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
            logprobs = logprobs.at[:, i].set(jnp.where(done, 0.0, logprob))
        if eos_id is not None:
            done = done | (token == eos_id)
        return token, (tokens, lengths, logprobs, done)

    out = (jnp.full((batch, max_new_tokens), pad_id, jnp.int32), jnp.zeros((batch,), jnp.int32),
           jnp.zeros((batch, max_new_tokens), jnp.float32) if return_logprobs else None,
           jnp.zeros((batch,), bool))
    token, out = emit(0, prefilled.logits, out)

    # A single row makes every product of a step vector x matrix, and XLA's GPU simplifier turns
    # those with weights under 10M elements into an elementwise product and a reduction through an
    # HBM temporary (gpu_algebraic_simplifier.cc), where matrix products stream the weight once
    # (bench/NOTES.md, 2026-11-27). So one row runs as two, the copy's outputs discarded. Recurrent
    # states only: a second KV cache would double what a softmax step reads. TNL's token mixer keeps
    # one state row and runs the recurrence once (GatedLinearAttention); cosFormer's gets two.
    copies = 2 if batch == 1 and cfg.token_mixer != "softmax" and not fused else 1
    widen = lambda x: jnp.concatenate([x] * copies)  # noqa: E731

    def model_step(token, positions, states):
        if fused:
            return fused_decode.step(params, token, positions, states, cfg=cfg, kernels=fused_kernels)
        return decode_step(params, widen(token), widen(positions), states, cfg=cfg, fold_norms=fold_norms)

    def steps(n):
        def body(carry):
            for _ in range(n):
                i, token, positions, states, out = carry
                logits, states = model_step(token, positions, states)
                token, out = emit(i, logits[:batch], out)
                carry = i + 1, token, positions + 1, states, out
            return carry
        return body

    def room_for(n):  # n more steps fit, and some row is still going
        return lambda carry: (carry[0] + n <= max_new_tokens) & ~jnp.all(carry[-1][-1])

    # A GPU while loop copies its predicate to the host and waits for it after every iteration, so
    # the loop body runs `steps_per_iteration` steps, then single steps up to max_new_tokens.
    states = tuple(prefilled.states if cfg.token_mixer == "gla" else jax.tree.map(widen, prefilled.states))
    carry = (jnp.int32(1), token, prefilled.positions, states, out)
    if steps_per_iteration > 1:
        carry = lax.while_loop(room_for(steps_per_iteration), steps(steps_per_iteration), carry)
    *_, (tokens, lengths, logprobs, _) = lax.while_loop(room_for(1), steps(1), carry)
    return Generation(tokens, lengths, logprobs)


_DECODE_STATIC = ("cfg", "sampler", "max_new_tokens", "eos_id", "pad_id", "return_logprobs",
                  "steps_per_iteration", "fold_norms", "fused", "fused_kernels")
decode = jax.jit(_decode, static_argnames=_DECODE_STATIC)
# XLA's exhaustive search over GEMM tilings (GPU; other backends ignore it): measured 3.4 % (H100)
# and ~6 % (H200) faster decoding of the 1B at batch 1 through the model's layers, for ~30-40 s
# more compilation (docs/benchmarks.md), once per compiled (batch, max_new_tokens); nothing for the
# fused one-row step, whose products are Pallas kernels.
AUTOTUNE_OPTIONS = {"xla_gpu_exhaustive_tiling_search": True}
decode_autotuned = jax.jit(_decode, static_argnames=_DECODE_STATIC, compiler_options=AUTOTUNE_OPTIONS)


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


def _require_model_config(cfg) -> None:
    # load_model returns the full ConfigDict; passing it on is the easy mistake, and it would
    # otherwise surface as an AttributeError deep inside.
    if not isinstance(cfg, ModelConfig):
        raise TypeError(
            f"cfg is a {type(cfg).__name__}, not a ModelConfig; pass tnllm.config.model_config(config) "
            "for the full config that load_model returns.")


def _check_request(cfg: ModelConfig, prompts, max_new_tokens, eos_id, pad_id, prefill_chunk) -> None:
    _require_model_config(cfg)
    if isinstance(prompts, (str, bytes)) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of token-id lists; tokenize text first.")
    for row, prompt in enumerate(prompts):
        ids = np.asarray(prompt)
        if ids.ndim != 1 or not ids.size or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"Prompt {row} must be a non-empty list of integer token ids; prepend a BOS token "
                "to start from nothing."
            )
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            raise ValueError(
                f"Prompt {row} holds token id {int(ids.min() if ids.min() < 0 else ids.max())}, "
                f"outside the model's vocabulary 0..{cfg.vocab_size - 1}; check the tokenizer."
            )
    for name, value in (("max_new_tokens", max_new_tokens), ("prefill_chunk", prefill_chunk)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if value is not None and not 0 <= value < cfg.vocab_size:
            raise ValueError(
                f"{name} {value} is outside the model's vocabulary 0..{cfg.vocab_size - 1}."
            )
    longest = max(len(p) for p in prompts)
    if cfg.token_mixer == "softmax" and longest + max_new_tokens > cfg.max_cache_len:
        raise ValueError(
            f"The longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
            f"KV cache of config.model.max_cache_len = {cfg.max_cache_len} tokens; raise "
            "config.model.max_cache_len or shorten the request."
        )


def serving_params(params, cfg: ModelConfig):
    """The params with every matmul weight (each `kernel` and the `embedding`) in the compute dtype.

    The model casts those weights to `cfg.dtype` at every use, so the outputs are the same bit for
    bit; decoding a token reads every weight once, and reading them in bf16 instead of the float32
    training copy halves the time of a step at small batch (issue 10). Other parameters (norm
    scales, LRPE angles) stay as they are: the model computes with them in float32.
    """
    dtype = jnp.dtype(cfg.dtype)

    def cast(path, x):
        name = getattr(path[-1], "key", None)
        if name in ("kernel", "embedding") and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x

    return jax.tree_util.tree_map_with_path(cast, params)


def generate(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampler: Sampler = Greedy(), eos_id: Optional[int] = None, pad_id: int = 0,
             seed: int = 0, return_logprobs: bool = False,
             prefill_chunk: int = 2048, autotune: bool = False) -> Generation:
    """Continues each prompt of a batch by up to `max_new_tokens` tokens.

    Args:
      params: the model's `params` collection (plain arrays; matmul weights are cast to
        cfg.dtype for the call, see `serving_params`); cfg: its ModelConfig.
      prompts: batch of token-id lists, any lengths >= 1.
      sampler, eos_id, pad_id, return_logprobs: see `decode`; seed: seeds the sampler.
      prefill_chunk: see `prefill`.
      autotune: compile the decoding loop with XLA's exhaustive GEMM tiling search
        (`decode_autotuned`): faster tokens on a GPU for a longer first compilation; worth it
        when one compiled program serves many requests at batch > 1 (at batch 1 the fused step's
        products are Pallas kernels that it does not tune).
    Returns:
      a Generation of numpy arrays.
    """
    _check_request(cfg, prompts, max_new_tokens, eos_id, pad_id, prefill_chunk)
    bucket = prompt_bucket(max(len(p) for p in prompts), prefill_chunk)
    tokens, mask = left_pad(prompts, bucket, pad_id)
    params = serving_params(params, cfg)
    prefilled = prefill(params, tokens, mask, cfg=cfg, prefill_chunk=prefill_chunk)
    out = (decode_autotuned if autotune else decode)(
        params, prefilled, jax.random.key(seed), cfg=cfg, sampler=sampler,
        max_new_tokens=int(max_new_tokens), eos_id=eos_id, pad_id=pad_id,
        return_logprobs=return_logprobs)
    return jax.device_get(out)


class Completion(NamedTuple):
    text: str  # the generated text, without the prompt and without EOS
    tokens: List[int]  # the generated token ids, EOS included when the row stopped there
    logprobs: List[float]  # the model's log-probability of each token in `tokens`


def complete(params, cfg: ModelConfig, tokenizer, texts: Sequence[str], *, max_new_tokens: int,
             sampler: Sampler = Greedy(), seed: int = 0, batch_size: int = 8, add_bos: bool = True,
             prefill_chunk: int = 2048, autotune: bool = False,
             progress: bool = False) -> List[Completion]:
    """Tokenizes `texts`, continues them in batches of `batch_size` and decodes the continuations
    (`generate` says what sampler, seed, prefill_chunk and autotune do).

    `tokenizer` follows `tnllm.tokenizer` (encode, decode, vocab_size, bos_id, eos_id, pad_id). The
    last batch is filled up with copies of its last prompt, so every batch has the same size and
    reuses one compiled program.
    """
    from tqdm import tqdm

    _require_model_config(cfg)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"The tokenizer has {tokenizer.vocab_size} ids but the model only {cfg.vocab_size}; load "
            "the tokenizer the model was trained with."
        )
    prompts = [([tokenizer.bos_id] if add_bos else []) + list(tokenizer.encode(t)) for t in texts]
    completions = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", unit="batch",
                      disable=not progress):
        batch = prompts[start:start + batch_size]
        filled = batch + [batch[-1]] * (batch_size - len(batch))
        out = generate(params, cfg, filled, max_new_tokens=max_new_tokens, sampler=sampler,
                       eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, seed=seed + start,
                       return_logprobs=True, prefill_chunk=prefill_chunk, autotune=autotune)
        for row in range(len(batch)):
            n = int(out.lengths[row])
            tokens = out.tokens[row, :n].tolist()
            text_ids = tokens[:-1] if tokens and tokens[-1] == tokenizer.eos_id else tokens
            completions.append(Completion(tokenizer.decode(text_ids), tokens,
                                          out.logprobs[row, :n].tolist()))
    return completions


def _define_flags():
    # Defined only when run as a program, so importing this module adds no global absl flags.
    from absl import flags

    flags.DEFINE_string("checkpoint", None, "A training work directory or an export.", required=True)
    flags.DEFINE_multi_string("prompt", [], "A prompt; repeat the flag for several.")
    flags.DEFINE_string("prompt_file", None, "A text file with one prompt per line.")
    flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per prompt at most.")
    flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0 = greedy.")
    flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0 = all.")
    flags.DEFINE_float("top_p", 1.0, "Keep the most likely tokens up to this probability mass; 1 = all.")
    flags.DEFINE_integer("seed", 0, "Seed of the sampler.")
    flags.DEFINE_integer("batch_size", 8, "Prompts generated together.")
    flags.DEFINE_bool("add_bos", True, "Start every prompt with the tokenizer's BOS token.")
    flags.DEFINE_bool("logprobs", False, "Also print each completion's mean token log-probability.")
    flags.DEFINE_string("attention_impl", None,
                        "Parallel form of the prefill (auto, reference, blockwise, pallas); default: "
                        "the checkpoint's config.")
    flags.DEFINE_integer("prefill_chunk", 2048, "Prompt tokens per prefill segment (bounds memory).")
    flags.DEFINE_bool("autotune", False, "Compile the decoding loop with XLA's exhaustive GEMM tiling "
                      "search: faster tokens on a GPU, ~30-40 s more compilation.")
    flags.DEFINE_integer("max_cache_len", None,
                         "KV cache length of a softmax model (prompt + new tokens); default: the "
                         "checkpoint's config.")


def _read_prompts(prompts: Sequence[str], prompt_file: Optional[str]) -> List[str]:
    texts = list(prompts)
    if prompt_file is not None:
        try:
            with open(prompt_file, encoding="utf-8") as f:
                texts += [line.rstrip("\n") for line in f if line.strip()]
        except FileNotFoundError:
            raise FileNotFoundError(
                f"--prompt_file {prompt_file!r} does not exist; pass a text file with one prompt per "
                "line.") from None
    if not texts:
        raise ValueError("No prompt given; pass --prompt TEXT or --prompt_file FILE.")
    return texts


def main(argv):
    del argv
    try:
        _run()
    except (ValueError, FileNotFoundError) as e:  # bad input: one line naming the fix, no traceback
        raise SystemExit(f"error: {e}") from None


def _run():
    from absl import flags, logging

    from tnllm import config as config_lib
    from tnllm.checkpoint import load_model
    from tnllm.tokenizer import load_tokenizer

    FLAGS = flags.FLAGS
    if not FLAGS["verbosity"].present:  # Orbax logs every checkpoint it opens at INFO
        logging.set_verbosity(logging.WARNING)
    texts = _read_prompts(FLAGS.prompt, FLAGS.prompt_file)
    config, params = load_model(FLAGS.checkpoint)
    cfg = config_lib.model_config(config)
    if FLAGS.attention_impl:
        cfg = cfg.replace(attention_impl=FLAGS.attention_impl)
    if FLAGS.max_cache_len:
        cfg = cfg.replace(max_cache_len=FLAGS.max_cache_len)
    tokenizer = load_tokenizer(config.data.tokenizer)
    sampler = make_sampler(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
    completions = complete(params, cfg, tokenizer, texts, max_new_tokens=FLAGS.max_new_tokens,
                           sampler=sampler, seed=FLAGS.seed, batch_size=FLAGS.batch_size,
                           add_bos=FLAGS.add_bos, prefill_chunk=FLAGS.prefill_chunk,
                           autotune=FLAGS.autotune,
                           progress=len(texts) > FLAGS.batch_size)
    for text, completion in zip(texts, completions):
        print(f"{text}{completion.text}")
        if FLAGS.logprobs:
            mean = sum(completion.logprobs) / max(len(completion.logprobs), 1)
            print(f"[{len(completion.tokens)} tokens, mean log-probability {mean:.4f}]")
        print()


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
