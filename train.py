"""Trains TransNormerLLM; with no flags, the tiny config on the Python standard library's sources.

    python train.py
    python train.py --config=configs/385m.py --workdir=runs/385m \
        --config.data.path='corpus/*.jsonl' --config.data.tokenizer=tokenizer.model

Any config field can be overridden with --config.<section>.<field>=<value>. Rerunning with the same
--workdir resumes from its latest checkpoint; SIGTERM or Ctrl-C saves one and stops.
"""
import math
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from tnllm import train_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny.py"),
    "Config file (configs/*.py); override fields with --config.<section>.<field>=<value>.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and plots (default: runs/<config name>).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments {argv[1:]}; pass settings as --config.x=y flags.")
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    config_name = os.path.splitext(os.path.basename(config_flags.get_config_filename(
        flags.FLAGS["config"])))[0]
    workdir = _WORKDIR.value or os.path.join("runs", config_name)
    try:
        result = train_lib.train(_CONFIG.value, workdir)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    if result.interrupted_by is not None:
        print(f"Stopped by signal {result.interrupted_by} after step {result.step}; the checkpoint is "
              f"saved, so the same command resumes from it.")
        sys.exit(128 + result.interrupted_by)
    below = 1 - result.val_nats_per_byte / result.unigram_nats_per_byte
    print(f"Validation loss after {result.step} steps: {result.val_nats_per_byte:.4f} nats/byte "
          f"(perplexity {math.exp(result.val_loss):.3f} per token).")
    print(f"Unigram entropy of the corpus: {result.unigram_nats_per_byte:.4f} nats/byte; the "
          f"validation loss is {100 * below:.1f}% below it.")
    if result.sample:
        print(f"Sample (prompt\u2502continuation):\n{result.sample}")
    print(f"Checkpoints, metrics.jsonl, TensorBoard events and {train_lib.LOSS_PNG} are in {workdir}.")


if __name__ == "__main__":
    app.run(main)
