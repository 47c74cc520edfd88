"""Decoding speed: ms per generated token after a prompt, as a multiple of the time XLA takes to read
the parameters once (row sums over as many bf16 bytes, timed back to back), and prefill speed.
Random bf16 parameters; greedy, EOS off; the median of --repeats runs over new_tokens - 1 steps.

    python -m bench.generate --configs=1b,385m --batches=1 --contexts=1024 --fused=true,false --profile
    python -m bench.generate --smoke                 # tiny configs on a CPU

Writes $OUT/generate.json (OUT defaults to ./bench_out) after every case; a failed case is recorded.
"""
import itertools
import json
import statistics
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags

from bench import profiling, report, timing
from tnllm import config as config_lib
from tnllm.decode import fused as fused_step
from tnllm.decode.loop import PROGRAMS, DecodeOptions, Sampling
from tnllm.decode.prefill import prefill
from tnllm.generate import request_bytes
from tnllm.model import TransNormerLLM
from tnllm.sampling import Greedy

REPO = Path(__file__).resolve().parents[1]

flags.DEFINE_list("configs", ["385m", "1b"], "Config files (configs/NAME.py) to measure.")
flags.DEFINE_list("contexts", ["1024", "8192", "32768", "131072"], "Prompt lengths in tokens.")
flags.DEFINE_list("batches", ["1", "64"], "Batch sizes.")
flags.DEFINE_integer("new_tokens", 128, "Tokens per timed run (the first from the prefill).", lower_bound=2)
flags.DEFINE_integer("repeats", 5, "Timed decode runs per case (the median is reported).")
flags.DEFINE_integer("prefill_chunk", 2048, "Prompt tokens per prefill segment.")
flags.DEFINE_bool("profile", False, "Trace one more decode run per case: GPU busy time, span and "
                  "kernels per token, by kernel kind (bench/profiling.py).")
flags.DEFINE_list("fused", ["auto"], "At batch 1, the fused step (tnllm.decode.fused: true), XLA's "
                  "(false), as tnllm.generate chooses (auto: fused on a GPU), or both: true,false.")
flags.register_validator("fused", lambda v: set(v) <= {"auto", "true", "false"},
                         "--fused takes auto, true and/or false, comma-separated.")
flags.DEFINE_list("fused_kernels", ["auto"], "The fused step's products: hopper, triton, auto (hopper "
                  "on a Hopper GPU), or both.")
flags.DEFINE_bool("autotune", False, "XLA's exhaustive GEMM tiling search: DecodeOptions(autotune=True).")
flags.DEFINE_bool("smoke", False, "Tiny config and contexts, few tokens: a quick check of this script.")
FLAGS = flags.FLAGS


def measure_prefill(cfg, params, batch, context):
    """Prefills `context` random tokens per row: (the Prefilled state, its timings)."""
    tokens = jax.random.randint(jax.random.key(context), (batch, context), 0, cfg.vocab_size, jnp.int32)
    mask = jnp.ones((batch, context), bool)
    prefill_exe, prefill_compile_s = timing.wall_s(
        prefill.lower(params, tokens, mask, cfg=cfg, prefill_chunk=FLAGS.prefill_chunk).compile)
    prefilled, prefill_s = timing.wall_s(prefill_exe, params, tokens, mask)
    return prefilled, dict(prefill_compile_s=prefill_compile_s, prefill_s=prefill_s,
                           prefill_tokens_per_s=batch * context / prefill_s)


def measure_decode(cfg, params, prefilled, fused, fused_kernels):
    """Times decoding --new_tokens tokens after `prefilled`, --repeats times."""
    new_tokens, repeats = FLAGS.new_tokens, FLAGS.repeats
    batch = prefilled.logits.shape[0]
    options = DecodeOptions(fused=fused, kernels=fused_kernels, autotune=FLAGS.autotune).resolve(cfg, batch)
    lowered = PROGRAMS[options.autotune].lower(params, prefilled, jax.random.key(0), cfg=cfg,
                                               sampling=Sampling(new_tokens, Greedy()), options=options)
    decode_exe, decode_compile_s = timing.wall_s(lowered.compile)
    run_decode = lambda: decode_exe(params, prefilled, jax.random.key(0))  # noqa: E731
    out, first_s = timing.wall_s(run_decode)
    if int(out.lengths.min()) != new_tokens:
        raise RuntimeError(f"decode stopped early: lengths {out.lengths}")
    times = [timing.wall_s(run_decode)[1] for _ in range(repeats)]
    steps = max(new_tokens - 1, 1)  # model steps per run: the first token comes from the prefill
    step_ms = 1e3 * statistics.median(times) / steps
    profile = profiling.gpu_time(run_decode) if FLAGS.profile else {}
    if "gpu_ms" in profile:  # per model step: is the GPU busy, or waiting between kernels?
        profile.update({f"{key}_per_token": profile[key] / steps for key in ("gpu_ms", "span_ms", "kernels")})
    return dict(profile=profile, decode_compile_s=decode_compile_s, decode_first_call_s=first_s,
                decode_ms_per_token=step_ms, decode_ms_per_token_min=1e3 * min(times) / steps,
                decode_tokens_per_s=batch * 1e3 / step_ms)


def weight_read_ms(params, repeats):
    """(GB, ms) XLA takes to read the parameters' bytes once: row sums over one [rows, 4096] bf16
    array of as many elements (one pass; on the H100 no other sum tried was faster), timed back to
    back (`timing.time_ms`): single calls carry launch and clock ramp-up, understating the rate."""
    width = 4096
    elements = sum(x.size for x in jax.tree.leaves(params))
    flat = jnp.ones((-(-elements // width), width), jnp.bfloat16)
    read = jax.jit(lambda x: jnp.sum(x, axis=1, dtype=jnp.float32))
    return flat.nbytes / 1e9, timing.time_ms(read, [(flat,)], group_ms=50.0, groups=max(repeats, 7))


def measure_case(rows, path, meta, cfg, params, case, limit):
    """Every variant of the decoding step for one config, impl, batch and context, after one shared
    prefill; each variant resolved as decode resolves it (auto: by the batch and the device)."""
    batch, context = case["batch"], case["context"]
    fuseds = [{"true": True, "false": False, "auto": None}[f] for f in FLAGS.fused]
    kernel_choices = sorted({fused_step.default_kernels() if k == "auto" else k for k in FLAGS.fused_kernels})
    fused_ok = not fused_step.unsupported(cfg, batch)
    resolved = {DecodeOptions(fused=f if f is None else f and fused_ok).resolve(cfg, batch).fused
                for f in fuseds}
    variants = {(fused, k) for fused in resolved for k in (kernel_choices if fused else [""])}
    prefill_done = {}

    def run(row, fused, kernels):
        if limit is not None and batch * case["state_mb_per_sequence"] * 1e6 > limit:
            raise MemoryError(f"the decoding state needs {batch * case['state_mb_per_sequence'] / 1e3:.0f} "
                              f"GB, more than the device's {limit / 1e9:.0f} GB")
        if not prefill_done:
            prefill_done["state"], prefill_done["stats"] = measure_prefill(cfg, params, batch, context)
        row.update(prefill_done["stats"])
        row.update(measure_decode(cfg, params, prefill_done["state"], fused, kernels or None))
        row["decode_per_weight_read"] = row["decode_ms_per_token"] / row["weight_read_ms"]

    for fused, kernels in sorted(variants):
        report.measure(rows, dict(case, fused=fused, fused_kernels=kernels or None),
                       lambda row, fused=fused, kernels=kernels: run(row, fused, kernels), path, meta)


def main(argv):
    del argv
    if FLAGS.smoke:
        FLAGS.configs, FLAGS.contexts, FLAGS.batches = ["tiny"], ["16"], ["1"]
        FLAGS.new_tokens, FLAGS.repeats, FLAGS.prefill_chunk = 4, 1, 32
    path = report.out_dir() / "generate.json"
    meta = dict(report.run_info(), backend=jax.default_backend(), new_tokens=FLAGS.new_tokens,
                repeats=FLAGS.repeats, prefill_chunk=FLAGS.prefill_chunk, dtype="bfloat16")
    print(json.dumps(meta))
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    rows = []
    for name in FLAGS.configs:
        cfg = config_lib.model_config(config_lib.load(str(REPO / "configs" / f"{name}.py")))
        cfg = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
        variables = jax.jit(TransNormerLLM(cfg).init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
        params = nn.unbox(variables)["params"]
        weights_gb, read_ms = weight_read_ms(params, FLAGS.repeats)
        print(f"{name}: {weights_gb:.3f} GB of bf16 parameters, read once in {read_ms:.3f} ms "
              f"({weights_gb / read_ms:.2f} TB/s)", flush=True)
        impl = "blockwise" if cfg.token_mixer == "gla" else cfg.attention_impl  # TNL's prefill form
        for batch, context in itertools.product(map(int, FLAGS.batches), map(int, FLAGS.contexts)):
            # The softmax baseline's state is a KV cache as long as the whole context; the linear
            # mixers' states do not depend on it.
            case_cfg = cfg.replace(max_cache_len=context + FLAGS.new_tokens, attention_impl=impl)
            case = dict(config=name, impl=impl, batch=batch, context=context, weights_gb=weights_gb,
                        weight_read_ms=read_ms,
                        state_mb_per_sequence=request_bytes(case_cfg, 1, 0, False) / 1e6)
            measure_case(rows, path, meta, case_cfg, params, case, limit)
        del params
    for r in rows:  # the fused step's kernels, or False
        r["step"] = r.get("fused_kernels") or str(r["fused"])
    print("\n" + report.markdown(rows, [
        ("config", "config", ""), ("impl", "impl", ""), ("fused", "step", ""),
        ("batch", "batch", ""), ("context", "context", ""), ("prefill s", "prefill_s", ".3f"),
        ("prefill tok/s", "prefill_tokens_per_s", ",.0f"), ("ms/token", "decode_ms_per_token", ".3f"),
        ("decode tok/s", "decode_tokens_per_s", ",.0f"), ("÷ read", "decode_per_weight_read", ".2f")]))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    app.run(main)
