"""Multi-process runs: joining JAX's distributed runtime and feeding each process its own rows.

Every host (or every GPU) runs the same `train.py`. `initialize` joins them into one JAX runtime,
after which `jax.devices()` lists the devices of all processes and the mesh spans them. Each process
then reads only the rows of the global batch that its own devices hold (`local_rows`) and assembles
the global array with `jax.make_array_from_process_local_data`; only process 0 writes logs.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Sharding

# Set by the launchers whose environments jax.distributed.initialize() detects by itself.
_CLUSTER_SIZE_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
    """Joins this process to a multi-process run; a single process does nothing.

    Explicit arguments (from flags) are passed to `jax.distributed.initialize`, which fills any that
    are missing from the cluster environment (SLURM, Open MPI, Kubernetes, Cloud TPU,
    `JAX_COORDINATOR_ADDRESS`). Without arguments it joins only when such an environment says there
    is more than one process. Call it before anything else touches JAX devices.
    """
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    clustered = "JAX_COORDINATOR_ADDRESS" in os.environ or any(
        int(os.environ.get(v, "1")) > 1 for v in _CLUSTER_SIZE_VARS)
    if explicit or clustered:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)


def is_main_process() -> bool:
    """Whether this process writes logs, metrics, plots and progress bars (process 0)."""
    return jax.process_index() == 0


def local_rows(sharding: Sharding, shape: Sequence[int], batch_dim: int = 0) -> slice:
    """The rows (along `batch_dim`) of a global array of `shape` that this process's devices hold.

    With the batch axes outermost on the mesh they are one contiguous block: rows that this
    process's devices split among themselves, or all rows when the batch is not split across
    processes (each then reads the same rows, which its devices replicate).
    """
    blocks = {(s[batch_dim].start or 0, shape[batch_dim] if s[batch_dim].stop is None
               else s[batch_dim].stop)
              for s in sharding.addressable_devices_indices_map(tuple(shape)).values()}
    start, stop = min(b[0] for b in blocks), max(b[1] for b in blocks)
    covered = np.zeros(stop - start, bool)
    for b in blocks:
        covered[b[0] - start:b[1] - start] = True
    if not covered.all():
        raise ValueError(f"This process's devices hold rows {sorted(blocks)} of the batch, which are "
                         "not one block; keep the batch axes (data, fsdp) outermost on the mesh.")
    return slice(start, stop)
