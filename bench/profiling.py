"""GPU time of one call by kernel kind, from a JAX profiler (Perfetto) trace: busy time, span and
kernel count (busy well below span: the GPU waits between kernels) and the longest kernels. JAX
turns XLA's command buffers off while it traces unless XLA_FLAGS has
--xla_enable_command_buffers_during_profiling=true.
"""
import gzip
import json
import tempfile
from pathlib import Path

import jax

# Kernel kinds by name fragment, first match wins: cuBLAS/cuDNN matrix products (nvjet, cutlass,
# xmma, gemm), cuDNN attention, the Pallas Triton kernels (named after their functions, or
# decode_*), then XLA's fusions by their kind prefix.
_KINDS = (("matmul", ("nvjet", "cutlass", "xmma", "gemm", "cublas")),
          ("cudnn attention", ("cudnn", "fmha", "flash")),
          ("pallas", ("lightning", "pallas", "_kernel", "decode_gemv", "decode_state_step")))


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, fragments in _KINDS:
        if any(f in low for f in fragments):
            return kind
    return low.split("_fusion")[0] + " fusion" if "_fusion" in low else "other"


def gpu_time(fn) -> dict:
    """Runs fn() once, traced. Returns gpu_ms (busy), span_ms, kernels (count), by_kind_ms and the
    15 longest kernels (ms summed over their launches), or {"error": ...} without a GPU trace."""
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            jax.block_until_ready(fn())
        traces = list(Path(log_dir).rglob("perfetto_trace.json.gz"))
        if not traces:
            return {"error": "no perfetto_trace.json.gz written"}
        events = json.loads(gzip.decompress(traces[0].read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    gpu = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
           and "gpu" in str(e.get("args", {}).get("name", "")).lower()}
    kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu]
    if not kernels:
        return {"error": "no GPU kernels in the trace", "processes": sorted(
            {str(e.get("args", {}).get("name")) for e in events if e.get("name") == "process_name"})}
    by_kind, by_name = {}, {}
    for e in kernels:
        ms = float(e.get("dur", 0)) / 1e3
        kind = kernel_kind(e["name"])
        by_kind[kind] = by_kind.get(kind, 0.0) + ms
        by_name[e["name"]] = by_name.get(e["name"], 0.0) + ms
    start = min(float(e["ts"]) for e in kernels)
    end = max(float(e["ts"]) + float(e.get("dur", 0)) for e in kernels)
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:15]
    return {"gpu_ms": sum(by_kind.values()), "span_ms": (end - start) / 1e3, "kernels": len(kernels),
            "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "top_kernels_ms": [[name[:120], ms] for name, ms in top]}
