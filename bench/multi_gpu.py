"""Training on one host's GPUs through `train.py`, one process per case: 1gpu, fsdpN, tensor2 and two
one-GPU noise references (1gpu_accum2: sums reordered; 1gpu_f32: float32). A mesh case is within
bf16 noise when its largest loss difference from 1gpu is at most the references'. The FSDP
checkpoint is then restored and generated from on one GPU.

    NCCL_NVLS_ENABLE=0 python -m bench.multi_gpu --cases=1gpu,1gpu_accum2,1gpu_f32,fsdp2,tensor2
    python -m bench.multi_gpu --smoke                 # two fake CPU devices, the tiny model

Appends a JSON line per case to $OUT/multi_gpu.jsonl (OUT defaults to ./bench_out). NVLink
multicast stays off (NCCL_NVLS_ENABLE=0): on shared hosts it can take the GPUs down.
"""
import concurrent.futures
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from typing import NamedTuple

from absl import app, flags

from bench import report
from tnllm import config as config_lib
from tnllm import data, metrics
from tnllm.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

flags.DEFINE_string("config", "configs/1b.py", "Model config file.")
flags.DEFINE_list("lengths", ["2048", "8192"], "Sequence lengths.")
flags.DEFINE_integer("tokens", 16384, "Tokens per optimizer step at every length (global batch).")
flags.DEFINE_list("steps", ["20", "10"], "Steps per length (the first length's runs compare losses).")
flags.DEFINE_list("cases", [], "Cases to run (1gpu, 1gpu_accum2, 1gpu_f32, fsdpN, tensorN); default all.")
flags.DEFINE_integer("gpus", 0, "GPUs on this host; 0 = count them with nvidia-smi.")
flags.DEFINE_string("attention_impl", "pallas", "config.model.attention_impl of every case.")
flags.DEFINE_integer("warmup_steps", 5, "config.optim.warmup_steps (short, so that 20 steps move).")
flags.DEFINE_multi_string("set", [], "More config overrides for every case, e.g. model.dtype=bfloat16.")
flags.DEFINE_integer("timeout", 300, "Seconds allowed to each train.py run.")
flags.DEFINE_bool("smoke", False, "Two fake CPU devices, the tiny model on a small corpus, 2 steps.")
FLAGS = flags.FLAGS


def gpu_count() -> int:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
    return sum(line.startswith("GPU ") for line in out.splitlines())


class Case(NamedTuple):
    gpus: int  # GPUs used
    settings: dict = {}  # config overrides, e.g. {"mesh.fsdp": 2}
    env: dict = {}  # more environment variables


NOISE_REFERENCES = ("1gpu_accum2", "1gpu_f32")


def all_cases(gpus: int) -> dict:
    """name -> Case. 1gpu_f32 computes in float32 at the highest matmul precision (JAX's default
    would let GPUs round float32 operands to TF32)."""
    cases = {"1gpu": Case(1), "1gpu_accum2": Case(1, {"train.grad_accum_steps": 2}),
             "1gpu_f32": Case(1, {"model.dtype": "float32"}, {"JAX_DEFAULT_MATMUL_PRECISION": "highest"}),
             f"fsdp{gpus}": Case(gpus, {"mesh.fsdp": gpus}), "tensor2": Case(2, {"mesh.tensor": 2})}
    if gpus > 2:
        cases[f"tensor{gpus}"] = Case(gpus, {"mesh.tensor": gpus})
    return cases


def device_env(devices: list) -> dict:
    """The environment that gives a run these GPUs (or, with --smoke, as many CPU devices)."""
    if FLAGS.smoke:
        return {"JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={len(devices)}"}
    return {**NO_MULTICAST, "CUDA_VISIBLE_DEVICES": ",".join(map(str, devices))}


def train(name: str, case: Case, devices: list, length: int, steps: int) -> dict:
    workdir = str(report.out_dir() / "multi_gpu" / f"{name}-{length}")
    shutil.rmtree(workdir, ignore_errors=True)
    settings = {"data.seq_len": length, "train.batch_size": FLAGS.tokens // length, "train.steps": steps,
                "train.grad_accum_steps": 1, "optim.warmup_steps": min(FLAGS.warmup_steps, steps - 1),
                "train.log_every": 1, "train.eval_every": steps, "train.eval_batches": 1,
                "checkpoint.every": steps, "train.sample_tokens": 0,
                "model.attention_impl": FLAGS.attention_impl,  # then --set, then the case's own settings
                **dict(override.split("=", 1) for override in FLAGS.set), **case.settings}
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--config={os.path.join(ROOT, FLAGS.config)}",
           f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in settings.items())]
    env = dict(os.environ, **device_env(devices), **case.env)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=FLAGS.timeout)
        log, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        log, rc = (e.stdout or b"").decode() + (e.stderr or b"").decode(), "timeout"
    record = {"case": name, "gpus": len(devices), "settings": case.settings, "seq_len": length,
              "batch": FLAGS.tokens // length, "steps": steps, "rc": rc,
              "wall_s": time.perf_counter() - start, "workdir": workdir,
              "log_tail": [line for line in log.replace("\r", "\n").splitlines()
                           if line.strip() and "step/s" not in line][-12:]}
    train_rows = [r for r in metrics.read_metrics(workdir) if "loss" in r]
    if train_rows:
        record.update(losses=[r["loss"] for r in train_rows], grad_norms=[r["grad_norm"] for r in train_rows])
        # The first step's interval holds no compile (train.py compiles before the loop), but skip
        # it anyway: it also pays for first-touch allocations.
        record["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in train_rows[1:] or train_rows)
        mfus = [r["mfu"] for r in train_rows[1:] if "mfu" in r]
        record["mfu"] = statistics.median(mfus) if mfus else None
    peak = re.search(r"Peak device memory: ([\d.]+) GiB", log)
    record["peak_gib"] = float(peak.group(1)) if peak else None
    return record


def restore_and_generate(workdir: str) -> dict:
    """The multi-GPU checkpoint, restored on one GPU, generates (greedy, 32 tokens)."""
    cmd = [sys.executable, "-m", "tnllm.generate", f"--checkpoint={workdir}", "--prompt=def main(",
           "--max_new_tokens=32", "--temperature=0"]
    env = dict(os.environ, **device_env([0]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=FLAGS.timeout)
    return {"case": "restore_1gpu_generate", "from": workdir, "rc": proc.returncode,
            "output": proc.stdout.strip()[-400:], "stderr_tail": proc.stderr.strip()[-400:]}


def loss_diffs(run: dict, ref: dict) -> tuple:
    """(largest, mean) absolute difference of two runs' losses over the steps both logged."""
    diffs = [abs(a - b) for a, b in zip(run["losses"], ref["losses"])]
    return max(diffs), statistics.mean(diffs)


def summarize(records: list) -> None:
    runs = [r for r in records if "seq_len" in r]
    one = {r["seq_len"]: r for r in runs if r["case"] == "1gpu" and "tokens_per_s" in r}
    for r in runs:
        ref = one.get(r["seq_len"])
        if "tokens_per_s" not in r:
            r["error"] = f"failed (rc {r['rc']}): {(r['log_tail'] or [''])[-1][:100]}"
        elif ref is not None and r is not ref:
            r["diff"] = f"{loss_diffs(r, ref)[0]:.2e} ({min(len(r['losses']), len(ref['losses']))} steps)"
            if r["gpus"] > 1:
                r["eff"] = r["tokens_per_s"] / (r["gpus"] * ref["tokens_per_s"])
        r["per_gpu"] = r.get("tokens_per_s", 0) / r["gpus"]
    print("\n" + report.markdown(runs, [
        ("case", "case", ""), ("GPUs", "gpus", ""), ("seq", "seq_len", ""), ("batch", "batch", ""),
        ("tokens/s", "tokens_per_s", ",.0f"), ("tokens/s per GPU", "per_gpu", ",.0f"), ("MFU", "mfu", ".1%"),
        ("peak GiB per GPU", "peak_gib", ".1f"), ("scaling eff.", "eff", ".1%"),
        ("max loss diff vs 1 GPU", "diff", "")]))
    for length, ref in one.items():
        done = [r for r in runs if r["seq_len"] == length and "losses" in r]
        noise = {r["case"]: loss_diffs(r, ref) for r in done if r["case"] in NOISE_REFERENCES}
        if noise:  # a mesh case is within the noise if its largest difference is no larger
            bound = max(largest for largest, _ in noise.values())
            print(f"\nbf16 noise at {length} (largest / mean difference from 1gpu): " +
                  ", ".join(f"{k} {v[0]:.2e} / {v[1]:.2e}" for k, v in noise.items()))
            for r in (r for r in done if r["gpus"] > 1):
                largest, mean = loss_diffs(r, ref)
                verdict = "within" if largest <= bound else "OUTSIDE"
                print(f"  {r['case']}: {largest:.2e} / {mean:.2e}, {verdict} the noise ({bound:.2e})")
    for r in records:
        if r["case"] == "restore_1gpu_generate":
            print(f"\nRestored {r['from']} on one GPU: rc {r['rc']}; output: {r['output']!r}")


def main(argv):
    del argv
    out = report.out_dir()
    if FLAGS.smoke:  # two CPU devices, the tiny model on the library's own sources
        FLAGS.gpus, FLAGS.config, FLAGS.attention_impl = 2, "configs/tiny.py", "blockwise"
        FLAGS.cases, FLAGS.lengths, FLAGS.steps, FLAGS.tokens = FLAGS.cases or ["fsdp2"], ["32"], ["2"], 128
        FLAGS.set = [f"data.path={ROOT}/tnllm/*.py", f"data.cache_dir={out}/cache",
                     "data.val_fraction=0.25", "model.num_layers=1"]
    path = out / "multi_gpu.jsonl"
    gpus = FLAGS.gpus or gpu_count()
    cases = all_cases(gpus)
    chosen = FLAGS.cases or list(cases)
    unknown = sorted(set(chosen) - set(cases))
    if unknown:
        raise SystemExit(f"Unknown --cases {', '.join(unknown)} for {gpus} GPUs; choose from "
                         f"{', '.join(cases)}.")
    print(f"{gpus} {'CPU' if FLAGS.smoke else 'GPU'}s; cases {', '.join(chosen)}; config {FLAGS.config}",
          flush=True)
    records = []

    def done(record: dict) -> None:  # appended as it comes: a run cut short keeps what it measured
        records.append(record)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"{record['case']}: rc {record['rc']}, {record.get('tokens_per_s', 0):,.0f} tok/s", flush=True)

    lengths = list(zip(map(int, FLAGS.lengths), map(int, FLAGS.steps)))
    # The corpus is tokenized here once, not by runs racing to build the same token store.
    cfg = config_lib.load(os.path.join(ROOT, FLAGS.config))
    for override in (o[len("data."):] for o in FLAGS.set if o.startswith("data.")):
        field, value = override.split("=", 1)
        cfg.data[field] = type(cfg.data[field])(value)
    data.TokenStore(cfg.data, load_tokenizer(cfg.data.tokenizer))
    # The one-GPU runs of all lengths at once, each thread on a GPU of its own (CPU: one by one).
    workers, thread = (1 if FLAGS.smoke else gpus), threading.local()
    gpu_ids = iter(range(workers))
    with concurrent.futures.ThreadPoolExecutor(
            workers, initializer=lambda: setattr(thread, "gpu", next(gpu_ids))) as pool:
        runs = [pool.submit(lambda n, *run: train(n, cases[n], [thread.gpu], *run), name, length, steps)
                for length, steps in lengths for name in chosen if cases[name].gpus == 1]
        for run in runs:
            done(run.result())
    for length, steps in lengths:
        for name in (n for n in chosen if cases[n].gpus > 1):
            record = train(name, cases[name], list(range(cases[name].gpus)), length, steps)
            done(record)
            if name == f"fsdp{gpus}" and length == lengths[0][0] and record["rc"] == 0:
                done(restore_and_generate(record["workdir"]))
    summarize(records)
    failed = [f"{r['case']} (rc {r['rc']})" for r in records if r["rc"] != 0]
    if failed:
        raise SystemExit(f"error: {', '.join(failed)} failed; their logs' tails are in {path}.")


if __name__ == "__main__":
    app.run(main)
