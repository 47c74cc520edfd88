"""Log-likelihood throughput of multiple-choice requests as lm-evaluation-harness sends them: each
context prefilled once for its choices (`reuse_context`), against recomputing every context with
every choice (`tnllm.eval.score.continuation_logprobs`). Random requests and parameters (speed does
not depend on their values); the median of --repeats calls after one that compiles every shape;
`max_diff` is the largest difference between both ways' log-likelihoods.

  python -m bench.eval                      # 1b, context 512, 4 choices, batches 16 and 64
  python -m bench.eval --smoke              # tiny config on CPU: checks the logic in seconds

Writes $OUT/eval.json (OUT defaults to ./bench_out) after every case; prints a table.
"""
import functools
import statistics
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bench import report, timing
from tnllm import config as config_lib
from tnllm.eval.score import continuation_logprobs
from tnllm.generate import serving_params
from tnllm.model import TransNormerLLM

REPO = Path(__file__).resolve().parents[1]

flags.DEFINE_list("configs", ["1b"], "Config files (configs/NAME.py) to measure.")
flags.DEFINE_integer("context", 512, "Context tokens per question.")
flags.DEFINE_integer("choices", 4, "Continuations per context.")
flags.DEFINE_integer("min_choice", 4, "Shortest continuation, tokens.")
flags.DEFINE_integer("max_choice", 24, "Longest continuation, tokens.")
flags.DEFINE_integer("questions", 256, "Contexts per timed call.")
flags.DEFINE_list("batch_sizes", ["16", "64"], "Rows per batch.")
flags.DEFINE_integer("repeats", 3, "Timed calls per case (the median is reported).")
flags.DEFINE_bool("smoke", False, "Tiny config, short contexts, few requests: checks this script.")
FLAGS = flags.FLAGS


def _requests(cfg, rng):
    out = []
    for _ in range(FLAGS.questions):
        context = rng.integers(0, cfg.vocab_size, FLAGS.context).tolist()
        for _ in range(FLAGS.choices):
            n = int(rng.integers(FLAGS.min_choice, FLAGS.max_choice + 1))
            out.append((context, rng.integers(0, cfg.vocab_size, n).tolist()))
    return out


def main(argv):
    del argv
    if FLAGS.smoke:
        FLAGS.configs, FLAGS.context, FLAGS.questions = ["tiny"], 40, 8
        FLAGS.batch_sizes, FLAGS.repeats = ["4"], 1
    path = report.out_dir() / "eval.json"
    meta = dict(report.run_info(), context=FLAGS.context, choices=FLAGS.choices,
                choice_tokens=[FLAGS.min_choice, FLAGS.max_choice], questions=FLAGS.questions)
    rows = []
    for name in FLAGS.configs:
        cfg = config_lib.model_config(config_lib.load(str(REPO / "configs" / f"{name}.py")))
        params = jax.jit(lambda key, cfg=cfg: nn.unbox(TransNormerLLM(cfg).init(
            key, jnp.zeros((1, 1), jnp.int32))["params"]))(jax.random.key(0))
        params = serving_params(params, cfg)
        requests = _requests(cfg, np.random.default_rng(0))
        for batch in map(int, FLAGS.batch_sizes):
            logprobs = {}

            def run(row, batch=batch):
                reuse = row["reuse_context"]
                call = functools.partial(continuation_logprobs, params, cfg, requests, batch_size=batch,
                                         reuse_context=reuse)
                logprobs[reuse] = np.array([lp for lp, _ in call()])  # compiles every shape
                row["seconds"] = statistics.median(timing.wall_s(call)[1] for _ in range(FLAGS.repeats))
                row["requests_per_s"] = len(requests) / row["seconds"]
                if len(logprobs) == 2:
                    row["max_diff"] = float(np.abs(logprobs[True] - logprobs[False]).max())

            for reuse in (True, False):
                report.measure(rows, dict(config=name, batch=batch, reuse_context=reuse), run, path, meta)
    print(report.markdown(rows, [("config", "config", ""), ("batch", "batch", ""),
                                 ("reuse", "reuse_context", ""), ("requests/s", "requests_per_s", ".1f"),
                                 ("s", "seconds", ".2f"), ("max_diff", "max_diff", ".2e")]))


if __name__ == "__main__":
    app.run(main)
