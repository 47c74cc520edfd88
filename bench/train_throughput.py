"""Training step time, tokens/s, MFU and compiled memory against sequence length at a constant number
of tokens per step: TransNormerLLM against the softmax baseline. All cases are compiled at once on a
thread pool, then timed one by one (median of --steps steps after a warm-up). --probe_* compiles
only, at batch 1, to find the longest sequence that fits.

    python -m bench.train_throughput --configs=385m,softmax_385m --impls=pallas --remat=save_dots
    python -m bench.train_throughput --configs=385m --impls=pallas:triton,pallas:mosaic --lengths=2048
    python -m bench.train_throughput --smoke          # tiny configs on a CPU

Writes $OUT/train_throughput.json and .png (OUT defaults to ./bench_out); prints the tables.
"""
import concurrent.futures
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bench import profiling, report, timing
from pallas_kernels import lightning
from tnllm import config as config_lib
from tnllm import metrics, train_lib
from tnllm.model import TransNormerLLM

REPO = Path(__file__).resolve().parents[1]

flags.DEFINE_list("configs", ["385m", "softmax_385m", "1b", "softmax_1b"], "Config files to measure.")
flags.DEFINE_list("impls", ["pallas", "blockwise"], "Attention impls of the configs with token_mixer "
                  "gla; pallas:triton or pallas:mosaic runs the Pallas impl with that kernel.")
flags.DEFINE_list("lengths", ["1024", "2048", "4096", "8192", "16384", "32768"], "Sequence lengths.")
flags.DEFINE_integer("tokens", 32768, "Tokens per training step at every length.")
flags.DEFINE_integer("steps", 3, "Timed steps per case, after one warm-up step.")
# Full rematerialisation by default: the 1B step at 32K tokens does not fit 80 GB without it,
# and the same policy for all keeps the comparison fair (both pay the recomputed forward).
flags.DEFINE_list("remat", ["full"], "config.model.remat_policy values: every case runs with each.")
flags.DEFINE_list("loss_chunk", [], "config.model.loss_chunk values (0: all logits at once).")
flags.DEFINE_integer("train_segment", None, "config.model.train_segment of TNL's cases.")
flags.DEFINE_bool("profile", False, "Profile one more step of every case: GPU time by kernel kind.")
flags.DEFINE_list("probe_configs", ["385m", "softmax_385m"], "Configs of the batch-1 length probe.")
flags.DEFINE_list("probe_lengths", ["65536", "131072", "262144"], "Lengths the probe compiles at batch 1.")
flags.DEFINE_integer("probe_loss_chunk", None, "config.model.loss_chunk of the probe.")
flags.DEFINE_list("replot", [], "Only redraw the plot and table of these train_throughput.json files.")
flags.DEFINE_integer("threads", 8, "Concurrent compilations.")
flags.DEFINE_integer("budget_s", 480, "Start no new timed case after this many seconds.")
flags.DEFINE_bool("smoke", False, "Tiny configs and lengths, one step: checks this script on a CPU.")
FLAGS = flags.FLAGS


def case_config(case: dict):
    cfg = config_lib.load(str(REPO / "configs" / f"{case['config']}.py"))
    cfg.model.remat_policy = case["remat"]
    if case["loss_chunk"] is not None:
        cfg.model.loss_chunk = case["loss_chunk"]
    if FLAGS.train_segment is not None and cfg.model.token_mixer != "softmax":
        cfg.model.train_segment = FLAGS.train_segment
    if cfg.model.token_mixer == "gla":
        cfg.model.attention_impl = case["impl"].split(":")[0]
    if FLAGS.smoke:
        cfg.model.num_layers = 1
    cfg.data.seq_len = case["seq_len"]
    cfg.train.update(batch_size=case["batch"], grad_accum_steps=1, steps=1000)
    cfg.optim.warmup_steps = 10
    case.update(loss_chunk=cfg.model.loss_chunk, train_segment=cfg.model.train_segment)
    return cfg


_INITS = {}  # model config -> (jitted state initialiser, the future of its compilation)


@contextlib.contextmanager
def kernel_of(impl: str):
    """While a step is traced, Lightning Attention's default plans run the kernel an impl names
    after its colon (pallas:triton, pallas:mosaic), to compare the two in the same model."""
    if ":" not in impl:
        yield
        return
    kernel = impl.split(":")[1]
    if kernel not in lightning.KERNELS:
        raise ValueError(f"--impls names kernel {kernel!r}; use one of {lightning.KERNELS}.")
    with mock.patch.object(lightning, "default_kernel", lambda *args: kernel):
        yield


def compile_case(case: dict, pool):
    """(config, the future of the compiled training step, the future of the compiled state
    initialiser), compiled on the pool. The initialiser is compiled once per model: every length
    shares it (the state's static fields come from it, so the steps take its output), and no case
    compiles while it is timed. A case that fails to lower gets its error as the step's future."""
    cfg = case_config(case)
    try:
        model_cfg = config_lib.check(cfg)
        model = TransNormerLLM(model_cfg)
        tx, schedule = train_lib.make_optimizer(cfg)
        if model_cfg not in _INITS:
            init = jax.jit(lambda rng: train_lib.init_state(model, tx, rng))
            _INITS[model_cfg] = init, pool.submit(init.lower(jax.random.key(0)).compile)
        state = jax.eval_shape(_INITS[model_cfg][0], jax.random.key(0))
        batch = jax.ShapeDtypeStruct((1, cfg.train.batch_size, cfg.data.seq_len + 1), jnp.int32)
        step = jax.jit(train_lib.make_train_step(model, schedule), donate_argnums=0)
        with kernel_of(case["impl"]):
            lowered = step.lower(state, batch)
        return cfg, pool.submit(lowered.compile), _INITS[model_cfg][1]
    except Exception as e:  # noqa: BLE001 -- recorded, and the other cases go on
        failed = concurrent.futures.Future()
        failed.set_exception(e)
        return cfg, failed, None


def memory_bytes(compiled):
    m = compiled.memory_analysis()  # None where the backend does not tell
    return m and (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                  - m.alias_size_in_bytes)


def run_case(compiled, init, cfg, case):
    """Fills `case` with the compiled memory, the median step time, tokens/s, MFU, the last loss,
    the untimed setup's seconds, and with --profile the GPU time of one more step by kernel kind."""
    case["memory_gib"] = (memory_bytes(compiled) or 0) / 2**30 or None
    shape = (1, cfg.train.batch_size, cfg.data.seq_len + 1)
    tokens = np.random.default_rng(1).integers(0, cfg.model.vocab_size, shape, np.int32)
    (state, batch), case["init_s"] = timing.wall_s(lambda: (init(jax.random.key(0)), jnp.asarray(tokens)))
    times = []
    for _ in range(FLAGS.steps + 1):  # the first is the warm-up
        start = time.perf_counter()
        state, step_metrics = compiled(state, batch)
        jax.block_until_ready(step_metrics)
        times.append(time.perf_counter() - start)
    case["warmup_s"] = times.pop(0)
    step_s = statistics.median(times)
    tokens_per_s = cfg.train.batch_size * cfg.data.seq_len / step_s
    peak = metrics.peak_flops(jax.devices()[:1], 0.0)
    flops = metrics.flops_per_token(config_lib.check(cfg), cfg.data.seq_len)
    case.update(step_ms=step_s * 1e3, tokens_per_s=tokens_per_s, loss=float(step_metrics["loss"]),
                mfu=None if peak is None else tokens_per_s * flops / peak)
    if FLAGS.profile:
        try:
            case["profile"] = profiling.gpu_time(lambda: compiled(state, batch))
        except Exception as e:  # noqa: BLE001 -- the timing stands without its profile
            case["profile"] = {"error": str(e).splitlines()[0][:300]}


def plot(results, path):
    """Tokens/s against length, one line per config and impl (and remat and loss chunk where the
    cases differ in them)."""
    timed = [r for r in results["cases"] if "tokens_per_s" in r]
    varies = [key for key in ("remat", "loss_chunk") if len({r[key] for r in timed}) > 1]
    series = {}
    for r in timed:
        label = ", ".join([f"{r['config']} ({r['impl']}"] + [f"{k} {r[k]}" for k in varies]) + ")"
        series.setdefault(label, []).append((r["seq_len"], r["tokens_per_s"]))
    report.line_plot(series, path, xlabel="sequence length (tokens)", ylabel="training tokens/s",
                     title=f"Training throughput, {results['tokens_per_step']:,} tokens per step, "
                           f"{results['device']}")


def print_tables(results):
    print(f"\n{results['device']}, jax {results['jax']}, {results['tokens_per_step']:,} tokens per step\n")
    head = [("config", "config", ""), ("impl", "impl", ""), ("remat", "remat", ""),
            ("loss chunk", "loss_chunk", ""), ("train segment", "train_segment", ""), ("seq", "seq_len", "")]
    print(report.markdown(results["cases"], head + [
        ("batch", "batch", ""), ("step ms", "step_ms", ".1f"), ("tokens/s", "tokens_per_s", ",.0f"),
        ("MFU", "mfu", ".1%"), ("memory GiB", "memory_gib", ".1f")]))
    if results["longest"]:
        print("\nLongest sequence at batch 1 (compiled memory against the device limit):\n")
        print(report.markdown(results["longest"], head + [("memory GiB", "memory_gib", ".1f"),
                                                          ("fits", "fits", "")]))
    sys.stdout.flush()


def main(argv):
    del argv
    if FLAGS.smoke:
        FLAGS.configs, FLAGS.impls, FLAGS.lengths = ["tiny", "softmax_tiny"], ["blockwise"], ["64"]
        FLAGS.tokens, FLAGS.steps, FLAGS.probe_configs, FLAGS.probe_lengths = 128, 1, ["tiny"], ["128"]
    out = report.out_dir()
    if FLAGS.replot:  # several runs' cases in one plot and table (the first run's header)
        runs = [json.loads(Path(p).read_text()) for p in FLAGS.replot]
        results = dict(runs[0], cases=[c for r in runs for c in r["cases"]],
                       longest=[p for r in runs for p in r["longest"]])
        plot(results, out / "train_throughput.png")
        print_tables(results)
        return
    device = jax.devices()[0]
    limit = (device.memory_stats() or {}).get("bytes_limit")
    results = dict(report.run_info(), tokens_per_step=FLAGS.tokens, device_bytes_limit=limit, cases=[],
                   longest=[])
    print(f"jax {jax.__version__} on {device.device_kind}; memory limit "
          f"{'unknown' if limit is None else f'{limit / 2**30:.1f} GiB'}", flush=True)

    def variants(name):
        mixer = config_lib.load(str(REPO / "configs" / f"{name}.py")).model.token_mixer
        return FLAGS.impls if mixer == "gla" else [mixer]

    # Timed cases in order of importance: each config's first impl, then the others (blockwise);
    # every remat policy and loss chunk of a config and impl before the next.
    options = [(remat, chunk) for remat in FLAGS.remat
               for chunk in [int(c) for c in FLAGS.loss_chunk] or [None]]
    timed = [dict(config=name, impl=impl, remat=remat, loss_chunk=chunk, seq_len=int(length),
                  batch=max(1, FLAGS.tokens // int(length)))
             for rank in range(len(FLAGS.impls)) for name in FLAGS.configs
             for impl in variants(name)[rank:rank + 1] for remat, chunk in options
             for length in FLAGS.lengths]
    probes = [dict(config=name, impl=variants(name)[0], remat=FLAGS.remat[0],
                   loss_chunk=FLAGS.probe_loss_chunk, seq_len=int(length), batch=1)
              for name in FLAGS.probe_configs for length in FLAGS.probe_lengths]
    start = time.perf_counter()
    pool = concurrent.futures.ThreadPoolExecutor(FLAGS.threads)
    jobs = [(case, *compile_case(case, pool)) for case in timed]
    probe_jobs = [(case, *compile_case(case, pool)) for case in probes]
    print(f"lowered {len(jobs) + len(probe_jobs)} cases in {time.perf_counter() - start:.0f} s", flush=True)
    # Compiling autotunes kernels on the GPU: no timing until every compilation has finished.
    concurrent.futures.wait([job for _, _, job, _ in jobs + probe_jobs] +
                            [future for _, future in _INITS.values()])
    print(f"compiled in {time.perf_counter() - start:.0f} s", flush=True)

    for case, cfg, job, init in jobs:
        results["cases"].append(case)
        if time.perf_counter() - start > FLAGS.budget_s:
            case["skipped"] = f"over --budget_s={FLAGS.budget_s}"
            continue
        try:
            run_case(job.result(), init.result(), cfg, case)
        except Exception as e:  # noqa: BLE001
            case["error"] = str(e).splitlines()[0][:300]
        print(json.dumps(case), flush=True)
        report.write_json(out / "train_throughput.json", results)

    for probe, cfg, job, _ in probe_jobs:
        try:
            used = memory_bytes(job.result())
            probe.update(memory_gib=used / 2**30, fits=limit is None or used <= limit)
        except Exception as e:  # noqa: BLE001 -- e.g. an allocation XLA refuses at compile time
            probe.update(fits=False, error=str(e).splitlines()[0][:300])
        results["longest"].append(probe)
        print(json.dumps(probe), flush=True)
    report.write_json(out / "train_throughput.json", results)
    pool.shutdown(wait=False, cancel_futures=True)

    plot(results, out / "train_throughput.png")
    print_tables(results)
    os._exit(0)  # compilations still queued are not waited for


if __name__ == "__main__":
    app.run(main)
