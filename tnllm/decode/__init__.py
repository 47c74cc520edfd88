"""Decoding with a constant-size state (docs/spec.md §7): one module per job.

  prefill  `prefill`: left-padded prompts [batch, bucket] through the parallel form, in segments,
           to the next token's logits, positions and every layer's state (`Prefilled`);
           `prompt_bucket` and `left_pad` shape the prompts.
  step     `decode_step`: one token per row through XLA, with TNL's norms folded into the products
           and a single row run as two copies where that is faster.
  fused    `step`: TNL's one-row step on fused Pallas GEMV kernels (Hopper or Triton).
  loop     `decode`: the `lax.while_loop` that samples; `Sampling` says what to generate,
           `DecodeOptions` how fast (and resolves which step runs), `DecodeState` is its state.

`tnllm.generate` sits on top: request checks, the serving cast, text completion and the CLI.
The state is each layer's recurrent state for TNL's linear mixers and a KV cache of
`config.model.max_cache_len` tokens for the softmax baseline; both keep one shape whatever the
context length, so everything here serves every mixer.
"""
from tnllm.decode.loop import DecodeOptions, DecodeState, Generation, Sampling, decode
from tnllm.decode.prefill import Prefilled, left_pad, prefill, prompt_bucket
from tnllm.decode.step import decode_step

__all__ = ["DecodeOptions", "DecodeState", "Generation", "Prefilled", "Sampling", "decode",
           "decode_step", "left_pad", "prefill", "prompt_bucket"]
