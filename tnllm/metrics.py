"""Training metrics: FLOPs per token and MFU, the metrics log (metrics.jsonl and TensorBoard), the loss
plot and the devices' peak memory.

`flops_per_token` counts matrix-product FLOPs of the model (docs/training.md explains the count);
`peak_flops` gives the devices' dense bf16 peak for MFU. `MetricsLog` appends one JSON line per record
to WORKDIR/metrics.jsonl; on resume it drops the lines of steps after the checkpoint (they are about
to be redone) and says so.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence

import jax
import matplotlib

from tnllm import config as config_lib
from tnllm.checkpoint import StorageError, abstract_params

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 -- after choosing the file-only backend

METRICS = "metrics.jsonl"
LOSS_PNG = "loss.png"
# Dense bf16 tensor-core peaks (vendor data sheets, SXM parts) by device-kind substring, for MFU.
_PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("B200", 2250.0))


def flops_per_token(model_cfg: config_lib.ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), matrix products only.

    Forward: 2 per weight of every projection kernel (2(4dh + hd + 3dg) per GLA layer) plus 2dV for
    the tied head, and per layer and head the chunked linear attention with C = min(chunk_size,
    seq_len): 2C(dk + dv) inside the chunk, 2 dk dv for the inter-chunk product and 2 dk dv for the
    state update, so linear in sequence length. dk = 2 hd where LRPE or cosFormer's cos/sin features
    double it; cosFormer's state carries one more column (its normaliser). The softmax baseline
    instead has per layer and head the causal half of q kᵀ and of the weights times v: on average
    seq_len/2 keys per token, 2 · 2 · (seq_len/2) · head_dim, quadratic in length.
    """
    m = model_cfg
    kernels = sum(math.prod(x.shape) for path, x in
                  jax.tree_util.tree_leaves_with_path(abstract_params(m))
                  if getattr(path[-1], "key", None) == "kernel")
    forward = 2 * kernels + 2 * m.d_model * m.vocab_size
    c, hd = min(m.chunk_size, seq_len), m.head_dim
    if m.token_mixer == "softmax":
        return 3.0 * (forward + m.num_layers * m.num_heads * 2 * seq_len * hd)
    cosformer = m.token_mixer == "cosformer"
    for layer in range(m.num_layers):
        dk = 2 * hd if cosformer or layer in m.lrpe_layers else hd
        dv = hd + 1 if cosformer else hd
        forward += m.num_heads * (2 * c * (dk + dv) + 4 * dk * dv)
    return 3.0 * forward


def peak_flops(devices: Sequence[jax.Device], override_tflops: float) -> Optional[float]:
    """Peak FLOP/s of `devices` together, or None when unknown (CPUs, unlisted accelerators)."""
    if override_tflops > 0:
        return override_tflops * 1e12 * len(devices)
    kind = devices[0].device_kind
    tflops = next((t for name, t in _PEAK_TFLOPS if name in kind), None)
    return None if tflops is None else tflops * 1e12 * len(devices)


def peak_memory_bytes(devices: Sequence[jax.Device]) -> Optional[int]:
    """The largest `peak_bytes_in_use` of this process's `devices` since it started, or None where
    the backend keeps no such count (the CPU)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices
             if d.process_index == jax.process_index()]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


class MetricsLog:
    """Appends metrics to WORKDIR/metrics.jsonl and TensorBoard event files (WORKDIR/tensorboard).

    Only the main process of a multi-process run writes; the others' logs do nothing."""

    def __init__(self, workdir: str, resume_step: int, enabled: bool = True):
        self.path = os.path.join(workdir, METRICS)
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if os.path.isfile(self.path):
            self._drop_after(resume_step)
        try:
            import tensorboardX
        except ImportError:  # e.g. an offline GPU machine without it: metrics.jsonl still has it all
            print("Warning: tensorboardX is not installed, so no TensorBoard event files are "
                  "written; `pip install tensorboardX` to get them.")
            self.writer = None
        else:
            self.writer = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

    def _drop_after(self, resume_step: int) -> None:
        """Lines a killed run wrote after its last checkpoint describe steps about to be redone, and
        a line cut short by a kill is no record: both go, and the user is told how many."""
        with open(self.path) as f:
            lines = f.readlines()
        kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= resume_step]
        if len(kept) == len(lines):
            return
        with open(self.path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)
        print(f"Removed {len(lines) - len(kept)} lines after step {resume_step} from {self.path}: "
              "they describe steps that this run does again.", file=sys.stderr)

    def write(self, step: int, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(dict(step=step, **values)) + "\n")
        except OSError as e:
            raise StorageError(f"Writing {self.path} failed ({e.strerror}); the checkpoints already "
                               "saved are kept; free space on that disk or pass a --workdir on "
                               "another one, then rerun.") from None
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(workdir: str) -> List[dict]:
    path = os.path.join(workdir, METRICS)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def plot_losses(workdir: str) -> str:
    """Writes WORKDIR/loss.png: training and validation loss against step. Returns its path."""
    records = read_metrics(workdir)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if key == "val_loss" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(workdir, LOSS_PNG)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
