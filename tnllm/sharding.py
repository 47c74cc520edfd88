"""Model parallelism: the device mesh and the rules that map logical axis names onto it.

This is the only module that names mesh axes. The mesh has three axes, outermost first:
  data    pure data parallelism: the batch is split, parameters are replicated.
  fsdp    data parallelism that also shards every parameter and optimizer state on its `embed` axis
          (ZeRO-3): weights are all-gathered before use and gradients reduce-scattered.
  tensor  Megatron-style tensor parallelism (SPEC.md §8): GLA split by heads, SGLU by the GLU axis,
          output projections by rows, the vocabulary of the tied embedding by rows. `tensor` is
          innermost so that its frequent collectives stay between neighbouring devices (one host).

The model names logical axes only (`batch`, `length`, `vocab`, `embed`, `qkvu`, `heads`, `head_dim`,
`mlp`); `RULES` maps them here. GSPMD derives the collectives from these annotations; the SRMSNorm
after attention reduces over the sharded heads axis, so its mean of squares becomes an exact
all-reduce across tensor shards. `docs/parallelism.md` counts the collectives per layer.

Typical use:

    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_model(model_cfg, mesh)
    sharding.check_batch(batch_size, mesh)
    with sharding.use_mesh(mesh):
        state, state_sharding = sharding.init_sharded(create_state, mesh, rng)  # boxed params inside
        step = jax.jit(train_step, in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                       out_shardings=(state_sharding, None), donate_argnums=0)
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from tnllm.config import ModelConfig

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes, in priority order (flax gives each mesh axis to at most one dimension of
# an array, so `embed` of an activation [batch, length, embed] stays whole: `fsdp` went to `batch`).
RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    # length, qkvu and head_dim are never split.
)

# Which config field sets the size of each sharded logical axis, for error messages.
_FIELDS = {"vocab": "vocab_size", "heads": "num_heads", "mlp": "glu_dim", "embed": "d_model"}


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> Dict[str, int]:
    """Resolves the mesh section (`data`, `fsdp`, `tensor`; at most one -1 = fill) for `num_devices`."""
    missing = [a for a in MESH_AXES if a not in sizes]
    if missing:
        raise ValueError(f"config.mesh lacks {', '.join(missing)}; give each of {', '.join(MESH_AXES)} "
                         "a size (-1 = the devices left over).")
    shape = {a: int(sizes[a]) for a in MESH_AXES}
    fill = [a for a, n in shape.items() if n == -1]
    bad = [a for a, n in shape.items() if n == 0 or n < -1]
    if bad or len(fill) > 1:
        raise ValueError(f"config.mesh sizes must be positive, with at most one -1 (fill); got {shape}.")
    fixed = math.prod(n for n in shape.values() if n != -1)
    if fill:
        if num_devices % fixed:
            raise ValueError(f"config.mesh {shape}: the fixed axes ({fixed} devices) do not divide the "
                             f"{num_devices} devices; change the sizes so their product divides it.")
        shape[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(f"config.mesh {shape} needs {fixed} devices but {num_devices} are present; "
                         "set one size to -1 to fill the rest, or match the device count.")
    return shape


def make_mesh(sizes: Mapping[str, int], devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes).

    `sizes` is the config's `mesh` section (a ConfigDict or dict). Axes are `Auto`: GSPMD places the
    collectives, guided by the logical constraints inside the model.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(sizes, len(devices))
    return jax.make_mesh(tuple(shape[a] for a in MESH_AXES), MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[Mesh]:
    """Makes `mesh` and `RULES` current, so the model's logical constraints take effect.

    Trace (first call of a jitted function) and `jax.eval_shape` inside this context.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        yield mesh


def spec(logical_axes: Sequence[Optional[str]]) -> PartitionSpec:
    """The mesh PartitionSpec of an array whose dimensions have these logical names."""
    return nn.logical_to_mesh_axes(tuple(logical_axes), RULES)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """A NamedSharding for every leaf of `tree`, from the logical names its boxes carry.

    `tree` is typically the `jax.eval_shape` of state creation with boxed parameters
    (`nn.LogicallyPartitioned`); optimizer states built from boxed parameters carry the same boxes.
    Leaves without names (step counters, scalars) are replicated. The result has the structure of
    the unboxed tree (`nn.meta.unbox(tree)`).
    """
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(tree), mesh, RULES)


def init_sharded(create: Callable[..., Any], mesh: Mesh, *args: Any) -> Tuple[Any, Any]:
    """Runs `create(*args)` so that every array is born on its own shards (never whole on one device).

    `create` returns a tree with boxed parameters (model.init, optimizer init, a TrainState...).
    Returns the unboxed tree and its shardings (for `in_shardings`/`out_shardings` of the step).
    """
    shardings = tree_shardings(jax.eval_shape(create, *args), mesh)
    state = jax.jit(lambda *a: nn.meta.unbox(create(*a)), out_shardings=shardings)(*args)
    return state, shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of input arrays [batch, ...]: batch split over the data axes, the rest whole."""
    return NamedSharding(mesh, spec(("batch",)))


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split (the product of the axes `batch` maps to)."""
    axes = spec(("batch",))[0]
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def check_batch(batch_size: int, mesh: Mesh, field: str = "config.batch_size") -> None:
    """Raises a one-sentence error when the global batch cannot be split over the data axes."""
    n = data_parallel_size(mesh)
    if batch_size % n:
        raise ValueError(f"{field} ({batch_size}) must be divisible by the data-parallel size "
                         f"data*fsdp = {n} of config.mesh; change one of them.")


def check_model(cfg: ModelConfig, mesh: Mesh) -> None:
    """Raises a one-sentence error, before anything compiles, when the model cannot be sharded.

    Every parameter dimension split by the rules must divide by the size of its mesh axes.
    """
    from tnllm.model import TransNormerLLM  # the model imports nothing from here; keep it that way

    boxed = jax.eval_shape(lambda: TransNormerLLM(cfg).init(
        jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 1), np.int32)))
    checked = set()
    for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)):
        if not isinstance(leaf, nn.LogicallyPartitioned):
            continue
        for name, size, axes in zip(leaf.names, leaf.value.shape, spec(leaf.names)):
            if axes is None or name in checked:
                continue
            axes = (axes,) if isinstance(axes, str) else axes
            parts = math.prod(mesh.shape[a] for a in axes)
            if size % parts:
                field = _FIELDS.get(name, name)
                raise ValueError(
                    f"config.model.{field} ({size}) is not divisible by the mesh axis "
                    f"{'*'.join(axes)} = {parts} that shards `{name}`; change config.model.{field} or "
                    f"config.mesh.{axes[0]}.")
            checked.add(name)


def shard_over_batch_and_heads(fn: Callable, *, in_axes: Sequence[Sequence[Optional[str]]],
                               out_axes: Any) -> Callable:
    """Runs `fn` per shard with `jax.shard_map` when a mesh is current, else calls it directly.

    For operators that are independent across batch and heads (the Pallas kernels): inside, each
    device sees its own [batch/b, ..., heads/t, ...] block and nothing is communicated. `in_axes`
    gives the logical names of each positional argument (None for an argument that is None);
    `out_axes` the names of each output, in the same tree structure.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not nn.get_logical_axis_rules():
        return fn
    to_spec = lambda names: None if names is None else spec(names)  # noqa: E731
    in_specs = tuple(to_spec(a) for a in in_axes)
    out_specs = jax.tree.map(spec, out_axes, is_leaf=lambda x: isinstance(x, tuple))
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
