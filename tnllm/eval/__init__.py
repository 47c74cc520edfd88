"""Evaluation: perplexity on text, and the standard benchmarks through lm-evaluation-harness.

  score       log-probabilities of given tokens (whole texts; context-continuation pairs)
  perplexity  `python -m tnllm.eval perplexity`: loss per token and per byte of a checkpoint
  harness     the `tnllm` model of lm-evaluation-harness (`pip install .[eval]`);
              `python -m tnllm.eval harness ...` runs the harness's command line with it

See docs/eval.md.
"""
