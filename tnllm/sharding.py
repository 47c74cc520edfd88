"""The device mesh and the rules that map logical axis names to its axes.

This is the one module that names mesh axes (`data`, `fsdp`, `tensor`); the model speaks logical
names only. The rules below shard the batch over `data` x `fsdp` and replicate every parameter:
data parallelism. Parameter sharding rules (FSDP, tensor parallelism) belong here when they come.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
LOGICAL_AXIS_RULES = (("batch", BATCH_AXES),)


def make_mesh(mesh_cfg: ml_collections.ConfigDict) -> Mesh:
    """A mesh of config.mesh's axis sizes over the first devices; one size may be -1 (the rest)."""
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    devices = jax.devices()
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh sizes {dict(zip(MESH_AXES, sizes))} must be positive, with at "
                         "most one -1 (all remaining devices).")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        sizes[sizes.index(-1)] = max(len(devices) // known, 1)
    if math.prod(sizes) > len(devices):
        raise ValueError(f"config.mesh asks for {math.prod(sizes)} devices ({dict(zip(MESH_AXES, sizes))}) "
                         f"but {len(devices)} are present; lower config.mesh.data/fsdp/tensor.")
    return Mesh(np.asarray(devices[:math.prod(sizes)]).reshape(sizes), MESH_AXES)


def batch_parallelism(mesh: Mesh) -> int:
    """How many ways the batch axis is split."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def logical_to_sharding(specs: Any, mesh: Mesh) -> Any:
    """Maps a tree of logical PartitionSpecs (from nn.get_partition_spec) to NamedShardings."""
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a training batch [micro_batches, batch, seq_len + 1]: rows over the batch axes."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
