"""Trains TransNormerLLM; with no flags, the tiny config on the Python standard library's sources.

    python train.py
    python train.py --config=configs/385m.py --workdir=runs/385m
        --config.data.path='corpus/*.jsonl' --config.data.tokenizer=tokenizer.model  (one line)

Any config field can be overridden with --config.<section>.<field>=<value>. Rerunning with the same
--workdir resumes from its latest checkpoint; SIGTERM or Ctrl-C, at any moment, finishes the step in
flight, saves it and stops. --from_scratch starts again from step 0 in a work directory whose
checkpoints are all damaged.
"""
import signal

# Recorded from the first moment, before the imports below (seconds), so that a signal during them
# still stops the run cleanly once training starts instead of killing it mid-way.
_EARLY_SIGNALS = []
for _s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(_s, lambda signum, frame: _EARLY_SIGNALS.append(signum))

import logging as py_logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tnllm import config as config_lib  # noqa: E402
from tnllm import distributed, metrics, train_lib  # noqa: E402

_unraisablehook = sys.unraisablehook


def _quiet_closed_loop(unraisable):
    """After a failed save (a full disk) Orbax closes its event loop while tensorstore's threads still
    finish writes; each then reports "Event loop is closed" as a traceback. The loop reports the
    failed save itself, in one sentence, so those are dropped."""
    if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"):
        _unraisablehook(unraisable)


sys.unraisablehook = _quiet_closed_loop
_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny.py")


def _define_flags():
    config = config_flags.DEFINE_config_file(
        "config", _DEFAULT_CONFIG,
        "Config file (configs/*.py); override fields with --config.<section>.<field>=<value>.")
    workdir = flags.DEFINE_string(
        "workdir", None, "Directory for checkpoints, metrics and plots (default: runs/<config name>).")
    flags.DEFINE_string("coordinator_address", None,
                        "host:port of process 0 in a multi-process run (default: from the cluster "
                        "environment, e.g. SLURM or JAX_COORDINATOR_ADDRESS).")
    flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
    flags.DEFINE_bool("from_scratch", False,
                      "Train from step 0 in a work directory that shows earlier training but holds no "
                      "readable checkpoint (all damaged); its old metrics.jsonl is kept under "
                      "another name. Never overrides a readable checkpoint.")
    return config, workdir


def _unknown_override(argv) -> str:
    """Names the first --config.<path>=... flag whose path the config file lacks."""
    path = _DEFAULT_CONFIG
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
    cfg = config_lib.load(path)
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        node, keys = cfg, arg[len("--config."):].split("=", 1)[0].split(".")
        for depth, key in enumerate(keys):
            where = ".".join(["config", *keys[:depth]])
            if not hasattr(node, "keys"):
                return f"{arg.split('=')[0]} names no config field: {where} is a value, not a section."
            if key not in node:
                return (f"{arg.split('=')[0]} names no config field: {where} has "
                        f"{', '.join(sorted(node.keys()))}.")
            node = node[key]
    return ""


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments {argv[1:]}; pass settings as --config.x=y flags.")
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
        # A failed save also reaches the loop, which says it in one sentence: Orbax's own
        # tracebacks of it (hundreds of lines on a full disk) would bury that sentence. Orbax's
        # writes run on asyncio (nothing else here does), whose leftover failed tasks are logged
        # again at exit.
        logging.get_absl_logger().addFilter(
            lambda record: record.levelno < py_logging.ERROR or f"{os.sep}orbax{os.sep}" not in record.pathname)
        py_logging.getLogger("asyncio").setLevel(py_logging.CRITICAL)
    config_name = os.path.splitext(os.path.basename(config_flags.get_config_filename(
        flags.FLAGS["config"])))[0]
    workdir = _WORKDIR.value or os.path.join("runs", config_name)
    f = flags.FLAGS
    distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
    try:
        result = train_lib.train(_CONFIG.value, workdir, f.from_scratch, _EARLY_SIGNALS)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    if result.interrupted_by is not None:
        if result.saved_step is None:
            print(f"Stopped by signal {result.interrupted_by} before the first step; nothing was "
                  "trained, so nothing was saved.")
        else:  # saved_step is read back from the directory listing after the save committed
            print(f"Stopped by signal {result.interrupted_by}; the checkpoint of step "
                  f"{result.saved_step} is saved in {workdir}, so the same command resumes from it.")
        sys.exit(128 + result.interrupted_by)
    if not distributed.is_main_process():
        return
    gap = 1 - result.val_nats_per_byte / result.unigram_nats_per_byte  # early runs can be above it
    print(f"Validation loss after {result.step} steps: {result.val_nats_per_byte:.4f} nats/byte "
          f"(perplexity {math.exp(result.val_loss):.3f} per token).")
    print(f"Unigram entropy of the corpus: {result.unigram_nats_per_byte:.4f} nats/byte; the "
          f"validation loss is {100 * abs(gap):.1f}% {'below' if gap >= 0 else 'above'} it.")
    if not math.isnan(result.tokens_per_s):
        mfu = ("unknown (no peak FLOP/s for this device; set --config.train.peak_tflops)"
               if result.mfu is None else f"{result.mfu:.1%}")
        print(f"Throughput: {result.tokens_per_s:,.0f} tokens/s (median over logging intervals), "
              f"MFU {mfu}.")
    if result.peak_memory_bytes is not None:
        print(f"Peak device memory: {result.peak_memory_bytes / 2**30:.1f} GiB (the most any one device "
              "held).")
    if result.sample:
        print(f"Sample (prompt\u2502continuation):\n{result.sample}")
    print(f"Checkpoints, metrics.jsonl, TensorBoard events and {metrics.LOSS_PNG} are in {workdir}.")


if __name__ == "__main__":
    # config_flags applies overrides while the flag is defined and fails on a missing field with a
    # bare KeyError, so overrides are checked first.
    try:
        problem = _unknown_override(sys.argv[1:])
    except (FileNotFoundError, ValueError) as e:
        problem = str(e)
    if problem:
        sys.exit(f"error: {problem}")
    _CONFIG, _WORKDIR = _define_flags()
    app.run(main)
