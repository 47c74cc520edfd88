"""Model parallelism: the device mesh and the rules that map logical axis names onto it.

This is the only module that names mesh axes. The mesh has four axes, outermost first:
  data     pure data parallelism: the batch is split, parameters are replicated.
  fsdp     data parallelism that also shards every parameter and optimizer state on its `embed` axis
           (ZeRO-3): weights are all-gathered before use and gradients reduce-scattered.
  context  context parallelism: one sequence is split into contiguous slices along its `length`,
           one per device; Lightning Attention exchanges only each slice's [heads, dk, dv] state
           (`tnllm.attention`), and parameters are replicated like under `data`.
  tensor   Megatron-style tensor parallelism (docs/spec.md §8): GLA split by heads, SGLU by the GLU
           axis, output projections by rows, the vocabulary of the tied embedding by rows. `tensor`
           is innermost so that its frequent collectives stay between neighbouring devices (one host).

The model names logical axes only (`batch`, `length`, `vocab`, `embed`, `qkvu`, `heads`, `head_dim`,
`mlp`); `LOGICAL_AXIS_RULES` maps them here. GSPMD derives the collectives from these annotations;
the SRMSNorm after attention reduces over the split heads axis, so its mean of squares becomes an
exact all-reduce across tensor shards. `docs/parallelism.md` counts the collectives per layer.

Typical use:

    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_params(jax.eval_shape(model.init, rng, tokens), mesh)  # tnllm.model.check_sharding
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
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "context", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both data-parallel axes

# Logical axis -> mesh axes, in priority order (flax gives each mesh axis to at most one dimension of
# an array, so `embed` of an activation [batch, length, embed] stays whole: `fsdp` went to `batch`).
LOGICAL_AXIS_RULES = (
    ("batch", BATCH_AXES),
    ("length", "context"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    # qkvu and head_dim are never split.
)

# Which config field sets the size of each sharded logical axis, for error messages.
_FIELDS = {"vocab": "vocab_size", "heads": "num_heads", "mlp": "glu_dim", "embed": "d_model"}


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> Dict[str, int]:
    """Resolves the mesh section (`data`, `fsdp`, `context`, `tensor`; at most one -1 = fill) for
    `num_devices`."""
    # Configs saved before the context axis existed have none: one device along it.
    sizes = {"context": 1, **sizes}
    missing = [a for a in MESH_AXES if a not in sizes]
    if missing:
        raise ValueError(f"config.mesh lacks {', '.join(missing)}; give each of {', '.join(MESH_AXES)} "
                         "a size (-1 = the devices left over).")
    shape = {a: int(sizes[a]) for a in MESH_AXES}
    fill = [a for a, n in shape.items() if n == -1]
    if len(fill) > 1 or any(n == 0 or n < -1 for n in shape.values()):
        raise ValueError(f"config.mesh sizes must be positive, with at most one -1 (fill); got {shape}.")
    fixed = math.prod(n for n in shape.values() if n != -1)
    if fill:
        if num_devices % fixed:
            raise ValueError(f"config.mesh {shape}: the fixed axes ({fixed} devices) do not divide the "
                             f"{num_devices} devices; change the sizes so their product divides it.")
        shape[fill[0]] = num_devices // fixed
    elif fixed > num_devices:
        raise ValueError(f"config.mesh {shape} needs {fixed} devices but {num_devices} are present; "
                         "lower config.mesh sizes or set one to -1 to use all devices.")
    return shape


def make_mesh(sizes: Mapping[str, int], devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """The (data, fsdp, context, tensor) mesh over `devices` (default: all devices of all processes).

    `sizes` is the config's `mesh` section (a ConfigDict or dict). A single process may use only the
    first devices (the default config asks for one); a multi-process mesh must span all of them,
    since every process feeds its own devices. Axes are `Auto`: GSPMD places the collectives,
    guided by the logical constraints inside the model.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(sizes, len(devices))
    used = math.prod(shape.values())
    if used < len(devices) and jax.process_count() > 1:
        raise ValueError(f"config.mesh {shape} uses {used} of the {len(devices)} devices of "
                         f"{jax.process_count()} processes; a multi-process mesh must use all of "
                         "them: set one size to -1.")
    return jax.make_mesh(tuple(shape[a] for a in MESH_AXES), MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices[:used])


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[Mesh]:
    """Makes `mesh` and `LOGICAL_AXIS_RULES` current, so the model's logical constraints take effect.

    Trace (first call of a jitted function) and `jax.eval_shape` inside this context.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield mesh


@contextlib.contextmanager
def trace_on(mesh: Mesh) -> Iterator[Mesh]:
    """`use_mesh` for use inside a jitted function while it is traced (where `jax.set_mesh` is
    refused): the model's constraints and per-shard operators then place its work on `mesh`. The
    jitted function must take `mesh` as a static argument, so that it compiles once per mesh."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield mesh


def spec(logical_axes: Sequence[Optional[str]]) -> PartitionSpec:
    """The mesh PartitionSpec of an array whose dimensions have these logical names."""
    return nn.logical_to_mesh_axes(tuple(logical_axes), LOGICAL_AXIS_RULES)


def logical_to_sharding(specs: Any, mesh: Mesh) -> Any:
    """Maps a tree of logical PartitionSpecs (`nn.get_partition_spec` of a boxed tree) to
    NamedShardings; leaves without names (step counters, scalars) are replicated."""
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)


def init_sharded(create: Callable[..., Any], mesh: Mesh, *args: Any,
                 shardings: Any = None) -> Tuple[Any, Any]:
    """Runs `create(*args)` so that every array is born on its own shards (never whole on one device).

    `create` returns a tree with boxed parameters (model.init, optimizer init, a TrainState...);
    optimizer states built from boxed parameters carry the same boxes. Returns the unboxed tree and
    its shardings (for `in_shardings`/`out_shardings` of the step). `shardings`: those of a caller
    that already traced `create` (`jax.eval_shape`), so that it is not traced again for them.
    """
    if shardings is None:
        shardings = logical_to_sharding(nn.get_partition_spec(jax.eval_shape(create, *args)), mesh)
    state = jax.jit(lambda *a: nn.meta.unbox(create(*a)), out_shardings=shardings)(*args)
    return state, shardings


def batch_sharding(mesh: Mesh, batch_dim: int = 0) -> NamedSharding:
    """Sharding of input arrays whose dimension `batch_dim` is the batch: split over BATCH_AXES."""
    return NamedSharding(mesh, PartitionSpec(*[None] * batch_dim, BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device (scalars, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_parallelism(mesh: Mesh) -> int:
    """How many ways the batch is split (the product of BATCH_AXES)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(batch_size: int, mesh: Mesh, field: str = "config.batch_size") -> None:
    """Raises a one-sentence error when the global batch cannot be split over the data axes."""
    n = batch_parallelism(mesh)
    if batch_size % n:
        raise ValueError(f"{field} ({batch_size}) must be divisible by the data-parallel size "
                         f"data*fsdp = {n} of config.mesh; change one of them.")


def check_params(boxed: Any, mesh: Mesh) -> None:
    """Raises a one-sentence error, before anything compiles, when the parameters cannot be sharded.

    boxed: the parameter tree with its logical axis names (`nn.LogicallyPartitioned` leaves), e.g.
    `jax.eval_shape(model.init, rng, tokens)`, which allocates nothing. Every parameter dimension
    split by the rules must divide by the size of its mesh axes; the error names the config field
    that sets it.
    """
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


def mesh_axes(name: str) -> Tuple[str, ...]:
    """The mesh axes that split logical axis `name` (none for an axis never split)."""
    axes = spec((name,))[0]
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def parts(name: str) -> int:
    """How many devices split logical axis `name` under the current mesh and rules (1 without)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not nn.get_logical_axis_rules():
        return 1
    return math.prod(mesh.shape[a] for a in mesh_axes(name))


def per_shard(fn: Callable, *, in_axes: Sequence[Optional[Sequence[Optional[str]]]],
              out_axes: Sequence[Sequence[Optional[str]]]) -> Callable:
    """`fn` run by every device on its own block (`jax.shard_map`) when a mesh is current, else `fn`.

    For operators that mix nothing across the split axes, such as the Pallas kernels over batch and
    heads: no collective is needed, and GSPMD could not split the custom kernel call itself. An
    operator that does mix along a split axis names its collectives with `mesh_axes` (the
    context-parallel Lightning Attention gathers the slices' states over those of `length`).
    `in_axes` gives the logical names of each positional argument (None for an argument that is
    None); `out_axes` those of each output.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not nn.get_logical_axis_rules():
        return fn

    def call(*args):
        # A logical axis that some argument's size does not split evenly stays whole on every device
        # (e.g. the batch of 1 that `init` traces): the operator mixes nothing along it either way.
        whole = {name for arg, names in zip(args, in_axes) if names is not None
                 for size, name in zip(arg.shape, names) if name and size % parts(name)}
        keep = lambda names: spec([None if n in whole else n for n in names])  # noqa: E731
        in_specs = tuple(None if names is None else keep(names) for names in in_axes)
        out_specs = tuple(keep(names) for names in out_axes)
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)(*args)

    return call
