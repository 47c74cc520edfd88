"""Generation from token ids or text, and its CLI: the entry point over `tnllm.decode`.

  generate     checks token lists, left-pads them to a length bucket (powers of two), casts the
               matmul weights to the compute dtype once (`serving_params`), runs
               `tnllm.decode.prefill` and `tnllm.decode.decode` and returns numpy arrays.
  on_mesh      the params replicated over a mesh: placed once for many `generate` calls with it.
  complete     text in, text out: tokenizes, then `complete_ids`.
  complete_ids token ids in, text out: generates in batches, decodes (also the lm-evaluation-harness
               model's generate_until); `filled_batches` gives its batches (and eval's) one size.
  main         `python -m tnllm.generate --checkpoint DIR --prompt "..."` (`--mesh_context=N` splits
               long prompts over N devices).

The decoding layer itself (prefill, the loop, its step and speed options) is `tnllm.decode`.
"""
from __future__ import annotations

import functools
import os
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tnllm import sharding
from tnllm.config import ModelConfig, check_positive
from tnllm.decode import (DecodeOptions, Generation, Sampling, decode, left_pad, prefill,
                          prompt_bucket)
from tnllm.decode.step import one_row_copies
from tnllm.model import check_sharding, state_specs
from tnllm.sampling import Greedy, Sampler, make_sampler

# The loop counts tokens and positions in int32.
MAX_POSITION = 2 ** 31 - 1


def _require_model_config(cfg) -> None:
    # load_model returns the full ConfigDict; passing it on is the easy mistake, and it would
    # otherwise surface as an AttributeError deep inside.
    if not isinstance(cfg, ModelConfig):
        raise TypeError(
            f"cfg is a {type(cfg).__name__}, not a ModelConfig; pass tnllm.config.model_config(config) "
            "for the full config that load_model returns.")


def _check_positions(max_new_tokens: int, longest: int) -> None:
    if longest + max_new_tokens > MAX_POSITION:
        raise ValueError(
            f"max_new_tokens {max_new_tokens} after a prompt of {longest} tokens passes the "
            f"{MAX_POSITION} positions that decoding counts in int32; lower max_new_tokens to at "
            f"most {MAX_POSITION - longest}.")


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
    check_positive("max_new_tokens", max_new_tokens)
    check_positive("prefill_chunk", prefill_chunk)
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if value is not None and not 0 <= value < cfg.vocab_size:
            raise ValueError(
                f"{name} {value} is outside the model's vocabulary 0..{cfg.vocab_size - 1}."
            )
    longest = max(len(p) for p in prompts)
    _check_positions(max_new_tokens, longest)
    if cfg.token_mixer == "softmax" and longest + max_new_tokens > cfg.max_cache_len:
        raise ValueError(
            f"The longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
            f"KV cache of config.model.max_cache_len = {cfg.max_cache_len} tokens; raise "
            "config.model.max_cache_len or shorten the request."
        )


@functools.lru_cache(maxsize=None)  # check_sharding traces the model: once, not once a batch
def _check_mesh(cfg: ModelConfig, mesh: Mesh) -> None:
    parts = mesh.shape["context"]
    if parts > 1 and cfg.token_mixer != "gla":
        raise ValueError(
            f"The mesh's context axis ({parts} devices) splits prompts for TNL's gla token mixer "
            f"only, not {cfg.token_mixer!r}; use a mesh with context 1 (--mesh_context=1).")
    check_sharding(cfg, mesh)


def _home_device(params) -> jax.Device:
    """Where decoding runs, as without a mesh: the one device that holds `params`; for params
    replicated over a mesh, the default device if it holds a copy, else the first that does; for
    host arrays, the default device."""
    leaf = jax.tree.leaves(params)[0]
    devices = leaf.sharding.device_set if isinstance(leaf, jax.Array) else {jax.devices()[0]}
    if len(devices) == 1:
        return next(iter(devices))
    return jax.devices()[0] if jax.devices()[0] in devices else min(devices, key=lambda d: d.id)


def _on_device(params, device: jax.Device):
    """`params` on `device` alone, for the decoding loop: a replicated array's copy there as it is
    (no copy made), an array split over devices gathered there, the rest as they are."""
    def one(x):
        if not isinstance(x, jax.Array) or len(x.sharding.device_set) == 1:
            return x
        if x.is_fully_replicated and device in x.sharding.device_set:
            return next(s.data for s in x.addressable_shards if s.device == device)
        return jax.device_put(x, device)

    return jax.tree.map(one, params)


def on_mesh(params, mesh: Mesh):
    """`params` replicated on every device of `mesh`, as a prefill on the mesh takes them: copied
    there, or returned as they are where they are already. Place them once before many calls of
    `generate` with that mesh (as `complete_ids` does), which otherwise copies them each call."""
    replicated = sharding.replicated(mesh)
    if all(isinstance(x, jax.Array) and x.sharding.is_equivalent_to(replicated, x.ndim)
           for x in jax.tree.leaves(params)):
        return params
    return jax.device_put(params, replicated)


def free_memory_bytes() -> Optional[int]:
    """Bytes the default device can still allocate: its allocator's limit less what it holds
    (GPU), else the host's available memory (CPU); None where neither is known."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def request_bytes(cfg: ModelConfig, batch: int, max_new_tokens: int,
                  return_logprobs: bool) -> int:
    """The memory a request holds beside the weights: every row's decoding state (a row run as
    two copies carries two states for cosFormer) and its outputs, int32 tokens and, with
    `return_logprobs`, float32 log-probabilities [batch, max_new_tokens]."""
    rows = batch * (one_row_copies(cfg, batch) if cfg.token_mixer == "cosformer" else 1)
    state = sum(int(np.prod(s.shape)) * s.dtype.itemsize
                for s in jax.tree.leaves(state_specs(cfg, rows)))
    return state + batch * max_new_tokens * (8 if return_logprobs else 4)


def _check_memory(cfg: ModelConfig, batch: int, max_new_tokens: int, return_logprobs: bool) -> None:
    free = free_memory_bytes()
    need = request_bytes(cfg, batch, max_new_tokens, return_logprobs)
    if free is None or need <= free:
        return
    state = request_bytes(cfg, batch, 0, return_logprobs)
    most = (free - state) // (batch * (8 if return_logprobs else 4))
    fix = (f"lower max_new_tokens to at most {most}" if most > 0
           else "generate fewer prompts together")
    raise ValueError(
        f"max_new_tokens {max_new_tokens} for {batch} prompt(s) needs {need / 1e9:.2f} GB of "
        f"decoding state and generated tokens, more than the {free / 1e9:.2f} GB free on "
        f"{jax.local_devices()[0].platform.upper()}; {fix}.")


def serving_params(params, cfg: ModelConfig):
    """The params with every matmul weight (each `kernel` and the `embedding`) in the compute dtype.

    The model casts those weights to `cfg.dtype` at every use, so the outputs are the same bit for
    bit; decoding a token reads every weight once, and reading them in bf16 instead of the float32
    training copy halves the time of a step at small batch. Other parameters (norm
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
             seed: int = 0, return_logprobs: bool = False, prefill_chunk: int = 2048,
             options: DecodeOptions = DecodeOptions(), mesh: Optional[Mesh] = None) -> Generation:
    """Continues each prompt of a batch by up to `max_new_tokens` tokens.

    Without `mesh` everything runs on the device that holds `params`. With a `mesh`, the prefill
    runs on the mesh's devices (a copy of the params on each, made by `on_mesh` unless `params`
    are already replicated there): its `context` axis splits every prompt segment into slices
    that exchange only their states, its `data` and `fsdp` axes split the rows when they divide
    the batch (`tnllm.decode.prefill`). The states that come out have a fixed size whatever the
    prompt length; they move to the device that holds `params` (for params replicated over the
    mesh, the default device's copy, else the first device's), and the decoding loop runs there,
    as without a mesh. The tokens are the same as without a mesh up to float rounding.

    Args:
      params: the model's `params` collection (plain arrays; matmul weights are cast to
        cfg.dtype for the call, see `serving_params`); cfg: its ModelConfig.
      prompts: batch of token-id lists, any lengths >= 1.
      max_new_tokens, sampler, eos_id, pad_id, return_logprobs: see `tnllm.decode.Sampling`;
        max_new_tokens is refused where the states and outputs would not fit the free memory.
      seed: seeds the sampler.
      prefill_chunk: see `tnllm.decode.prefill`.
      options: the decoding loop's speed options (`tnllm.decode.DecodeOptions`), e.g.
        `DecodeOptions(autotune=True)`: faster tokens on a GPU for a longer first compilation,
        worth it when one compiled program serves many requests at batch > 1.
      mesh: a device mesh (`tnllm.sharding.make_mesh`) for the prefill; None: one device. The
        context axis needs TNL's gla token mixer.
    Returns:
      a Generation of numpy arrays.
    """
    _check_request(cfg, prompts, max_new_tokens, eos_id, pad_id, prefill_chunk)
    if mesh is not None:
        _check_mesh(cfg, mesh)
    bucket = prompt_bucket(max(len(p) for p in prompts), prefill_chunk)
    tokens, mask = left_pad(prompts, bucket, pad_id)
    params = serving_params(params, cfg)  # no copy of weights already in cfg.dtype
    _check_memory(cfg, len(prompts), max_new_tokens, return_logprobs)
    home = _home_device(params)
    on_home = _on_device(params, home)
    if mesh is None:
        prefilled = prefill(on_home, tokens, mask, cfg=cfg, prefill_chunk=prefill_chunk)
    else:  # jit refuses params committed to one device beside a program placed on the mesh
        prefilled = prefill(on_mesh(params, mesh), tokens, mask, cfg=cfg,
                            prefill_chunk=prefill_chunk, mesh=mesh)
        prefilled = jax.device_put(prefilled, home)
    sampling = Sampling(int(max_new_tokens), sampler, eos_id, pad_id, return_logprobs)
    out = decode(on_home, prefilled, jax.random.key(seed), cfg=cfg, sampling=sampling,
                 options=options)
    return jax.device_get(out)


class Completion(NamedTuple):
    text: str  # the generated text, without the prompt and without EOS
    tokens: List[int]  # the generated token ids, EOS included when the row stopped there
    logprobs: List[float]  # the model's log-probability of each token in `tokens`


def complete(params, cfg: ModelConfig, tokenizer, texts: Sequence[str], *, max_new_tokens: int,
             sampler: Sampler = Greedy(), seed: int = 0, batch_size: int = 8, add_bos: bool = True,
             prefill_chunk: int = 2048, options: DecodeOptions = DecodeOptions(),
             mesh: Optional[Mesh] = None, progress: bool = False) -> List[Completion]:
    """Tokenizes `texts`, continues them in batches of at most `batch_size` and decodes the
    continuations (`complete_ids` says how; `generate` what sampler, seed, prefill_chunk,
    options and mesh do).

    `tokenizer` follows `tnllm.tokenizer` (encode, decode, vocab_size, bos_id, eos_id, pad_id);
    generation stops a row at its eos_id.
    """
    from tqdm import tqdm

    prompts = [([tokenizer.bos_id] if add_bos else []) + list(tokenizer.encode(t)) for t in texts]
    return list(tqdm(
        complete_ids(params, cfg, tokenizer, prompts, max_new_tokens=max_new_tokens,
                     eos_id=tokenizer.eos_id, sampler=sampler, seed=seed, batch_size=batch_size,
                     prefill_chunk=prefill_chunk, options=options, mesh=mesh),
        total=len(prompts), desc="generate", unit="text", disable=not progress))


def complete_ids(params, cfg: ModelConfig, tokenizer, prompts: Sequence[Sequence[int]], *,
                 max_new_tokens: int, eos_id: Optional[int], sampler: Sampler = Greedy(),
                 seed: int = 0, batch_size: int = 8, prefill_chunk: int = 2048,
                 options: DecodeOptions = DecodeOptions(),
                 mesh: Optional[Mesh] = None) -> Iterator[Completion]:
    """Continues token-id `prompts` in batches of at most `batch_size`, in the order given, and
    yields one Completion per prompt, a batch's as soon as it is generated.

    Rows stop at `eos_id` (None: none stops early), which the text leaves out; `tokenizer`
    decodes the text and gives the pad id. Batch b (of prompts b*batch_size onwards) is sampled
    with seed + b*batch_size. A batch never holds more rows than there are prompts; a last,
    shorter batch is filled up with copies of its last prompt, so every batch has the same size
    and reuses one compiled program. `mesh`: see `generate`.
    """
    _require_model_config(cfg)
    check_positive("batch_size", batch_size)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"The tokenizer has {tokenizer.vocab_size} ids but the model only {cfg.vocab_size}; load "
            "the tokenizer the model was trained with."
        )
    # Checked above, at the call; the batches run as the caller takes their completions.
    return _complete_batches(params, cfg, tokenizer, [list(p) for p in prompts],
                             min(batch_size, max(len(prompts), 1)), eos_id=eos_id,
                             max_new_tokens=max_new_tokens, sampler=sampler, seed=seed,
                             prefill_chunk=prefill_chunk, options=options, mesh=mesh)


def filled_batches(items: Sequence, batch_size: int) -> Iterator[Tuple[list, int]]:
    """`items` in slices of `batch_size`, the last filled up to `batch_size` with copies of its
    last item, so that every batch has one shape and reuses one compiled program; yields
    (filled slice, number of real items)."""
    for start in range(0, len(items), batch_size):
        part = list(items[start:start + batch_size])
        yield part + [part[-1]] * (batch_size - len(part)), len(part)


def _complete_batches(params, cfg, tokenizer, prompts, batch_size, *, eos_id, seed, mesh,
                      **kwargs) -> Iterator[Completion]:
    # Cast and placed once for all batches, not once a batch: generate then copies nothing.
    params = serving_params(params, cfg)
    if mesh is not None:
        params = on_mesh(params, mesh)
    for b, (filled, real) in enumerate(filled_batches(prompts, batch_size)):
        out = generate(params, cfg, filled, eos_id=eos_id, pad_id=tokenizer.pad_id,
                       seed=seed + b * batch_size, return_logprobs=True, mesh=mesh, **kwargs)
        for row in range(real):
            n = int(out.lengths[row])
            tokens = out.tokens[row, :n].tolist()
            text_ids = tokens[:-1] if tokens and tokens[-1] == eos_id else tokens
            yield Completion(tokenizer.decode(text_ids), tokens, out.logprobs[row, :n].tolist())


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
    flags.DEFINE_integer("batch_size", 8, "Prompts generated together at most.")
    flags.DEFINE_bool("add_bos", True, "Start every prompt with the tokenizer's BOS token.")
    flags.DEFINE_bool("logprobs", False, "Also print each completion's mean token log-probability.")
    flags.DEFINE_string("attention_impl", None,
                        "Parallel form of the prefill (auto, reference, blockwise, pallas); default: "
                        "the checkpoint's config.")
    flags.DEFINE_integer("prefill_chunk", 2048, "Prompt tokens per prefill segment (bounds memory).")
    flags.DEFINE_bool("autotune", False, "Compile the decoding loop with XLA's exhaustive GEMM tiling "
                      "search: faster tokens on a GPU, ~30-40 s more compilation.")
    flags.DEFINE_integer("mesh_context", 1, "Devices each prompt is split over in the prefill "
                         "(TNL's gla mixer); decoding then runs on one device.")
    flags.DEFINE_integer("mesh_data", 1, "Devices the prompts of a batch are split over in the "
                         "prefill, when they divide --batch_size.")
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


def cli_mesh(data: int, context: int) -> Optional[Mesh]:
    """The prefill's mesh of `--mesh_data` x `--mesh_context` devices (None for one device), or a
    one-sentence error where the sizes are not positive or need more devices than are present."""
    check_positive("--mesh_data", data)
    check_positive("--mesh_context", context)
    if data * context == 1:
        return None
    present = jax.device_count()
    if data * context > present:
        raise ValueError(
            f"--mesh_data={data} and --mesh_context={context} need {data * context} devices but "
            f"{present} are present; lower them so that their product is at most {present}.")
    return sharding.make_mesh(dict(data=data, fsdp=1, context=context, tensor=1))


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
    # Checked before the model is read: a bad number should not wait for a large checkpoint.
    check_positive("--batch_size", FLAGS.batch_size)
    check_positive("--max_new_tokens", FLAGS.max_new_tokens)
    _check_positions(FLAGS.max_new_tokens, 1)
    mesh = cli_mesh(FLAGS.mesh_data, FLAGS.mesh_context)
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
                           options=DecodeOptions(autotune=FLAGS.autotune), mesh=mesh,
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
