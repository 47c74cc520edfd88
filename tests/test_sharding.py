"""Model parallelism (tnllm/sharding.py): mesh sizes, rules, errors, and on 8 fake CPU devices the
state shardings, equality with one device and the collectives of a tensor-parallel step.

The multi-device cases run in a subprocess, `python tests/test_sharding.py CASE [ARGS]`, with
XLA_FLAGS=--xla_force_host_platform_device_count=8: the flag must be set before JAX starts its CPU
backend, and the rest of the suite keeps its single device.
"""
import os
import re
import subprocess
import sys
from collections import Counter

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tnllm import sharding
from tnllm.config import ModelConfig
from tnllm.model import TransNormerLLM

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ((8, 1, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8))  # (data, fsdp, tensor)
# Eight heads so that every mesh above can split them; 20 tokens: not a multiple of the chunk.
CFG = ModelConfig(vocab_size=256, d_model=64, num_layers=2, num_heads=8, glu_dim=128,
                  lrpe_layers=(0,), chunk_size=8)
BATCH, SEQ = 8, 20

# What the rules must give each parameter (and its Adam moments), by the parameter's path suffix.
EXPECTED_SPECS = {
    "embed_tokens/embedding": P("tensor", "fsdp"),  # vocab rows split: vocab-parallel tied head
    "token_mixer/qkvu_proj/kernel": P("fsdp", None, "tensor", None),  # by heads
    "token_mixer/theta": P("tensor", None),
    "token_mixer/out_proj/kernel": P("tensor", None, "fsdp"),  # by rows (heads)
    "channel_mixer/l1/kernel": P("fsdp", "tensor"),  # by the GLU axis
    "channel_mixer/l2/kernel": P("fsdp", "tensor"),
    "channel_mixer/l3/kernel": P("tensor", "fsdp"),  # by rows
}


def _mesh_sizes(shape):
    return dict(zip(sharding.MESH_AXES, shape))


# ------------------------------------------------------------------------------------------------
# In-process tests (one device): mesh sizes, rules and the errors.
# ------------------------------------------------------------------------------------------------
def test_mesh_shape_fills_one_axis():
    assert sharding.mesh_shape(dict(data=-1, fsdp=2, tensor=2), 8) == dict(data=2, fsdp=2, tensor=2)
    assert sharding.mesh_shape(dict(data=1, fsdp=1, tensor=-1), 8) == dict(data=1, fsdp=1, tensor=8)
    assert sharding.mesh_shape(dict(data=1, fsdp=2, tensor=4), 8) == dict(data=1, fsdp=2, tensor=4)


@pytest.mark.parametrize("sizes, message", [
    (dict(data=-1, fsdp=-1, tensor=1), "at most one -1"),
    (dict(data=0, fsdp=1, tensor=1), "must be positive"),
    (dict(data=-1, fsdp=3, tensor=1), "do not divide the 8 devices"),
    (dict(data=2, fsdp=2, tensor=1), "needs 4 devices but 8 are present"),
    (dict(data=2, tensor=4), "config.mesh lacks fsdp"),
])
def test_mesh_shape_errors(sizes, message):
    with pytest.raises(ValueError, match=message):
        sharding.mesh_shape(sizes, 8)


def test_make_mesh_on_one_device():
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
    assert mesh.axis_names == sharding.MESH_AXES and mesh.devices.shape == (1, 1, 1)


def test_activation_specs():
    assert sharding.spec(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)
    assert sharding.spec(("batch", "length", "qkvu", "heads", "head_dim")) == P(
        ("data", "fsdp"), None, None, "tensor", None)
    assert sharding.spec(("batch", "length", "mlp")) == P(("data", "fsdp"), None, "tensor")


def test_param_specs_follow_rules():
    boxed = jax.eval_shape(lambda: TransNormerLLM(CFG).init(jax.random.PRNGKey(0),
                                                            jnp.zeros((1, 4), jnp.int32)))
    specs = sharding.tree_shardings(boxed, jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(
        1, 1, 1), sharding.MESH_AXES))
    found = {}
    for path, s in jax.tree_util.tree_leaves_with_path(specs):
        name = "/".join(k.key for k in path[-3:])
        matches = [suffix for suffix in EXPECTED_SPECS if name.endswith(suffix)]
        assert len(matches) == 1, f"no expected spec for parameter {name}"
        assert s.spec == EXPECTED_SPECS[matches[0]], name
        found[matches[0]] = True
    assert set(found) == set(EXPECTED_SPECS)


def test_unshardable_heads_fail_with_clear_error():
    mesh = AbstractMesh((1, 1, 8), sharding.MESH_AXES)
    cfg = CFG.replace(num_heads=4, hidden_dim=64)
    with pytest.raises(ValueError, match=r"config.model.num_heads \(4\) is not divisible by the mesh "
                                         r"axis tensor = 8"):
        sharding.check_model(cfg, mesh)


def test_unshardable_width_fails_with_clear_error():
    mesh = AbstractMesh((1, 4, 2), sharding.MESH_AXES)
    with pytest.raises(ValueError, match=r"config.model.d_model \(66\) .* fsdp = 4"):
        sharding.check_model(CFG.replace(d_model=66, hidden_dim=64), mesh)


def test_shardable_model_passes():
    for shape in MESHES:
        sharding.check_model(CFG, AbstractMesh(shape, sharding.MESH_AXES))


def test_batch_not_divisible_fails_with_clear_error():
    mesh = AbstractMesh((2, 2, 2), sharding.MESH_AXES)
    sharding.check_batch(8, mesh)
    with pytest.raises(ValueError, match=r"config.batch_size \(6\) must be divisible by the "
                                         r"data-parallel size data\*fsdp = 4"):
        sharding.check_batch(6, mesh)


# ------------------------------------------------------------------------------------------------
# Cases on 8 fake devices, run in a subprocess by the tests below.
# ------------------------------------------------------------------------------------------------
def _run_on_8_devices(case, *args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), case, *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"case {case}{args} failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"


def test_state_shardings_follow_rules():
    _run_on_8_devices("state_shardings")


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_train_step_matches_one_device(shape):
    _run_on_8_devices("step_matches_one_device", *shape)


def test_tensor_parallel_collectives():
    _run_on_8_devices("collectives")


def _loss(model, params, tokens):
    logits, _ = model.apply({"params": params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def _setup(cfg, tx):
    """The model, a state creator (boxed parameters and Adam state) and a train step."""
    model = TransNormerLLM(cfg)

    def create(key):
        params = model.init(key, jnp.zeros((1, SEQ), jnp.int32))["params"]
        return params, tx.init(params)

    def step(state, tokens):
        params, opt_state = state
        loss, grads = jax.value_and_grad(_loss, argnums=1)(model, params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss, grads

    return model, create, step


def _tokens(seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (BATCH, SEQ + 1), 0, CFG.vocab_size)


def _case_state_shardings():
    tx = optax.adamw(1e-3)
    _, create, _ = _setup(CFG, tx)
    for shape in MESHES:
        mesh = sharding.make_mesh(_mesh_sizes(shape))
        with sharding.use_mesh(mesh):
            (params, opt_state), _ = sharding.init_sharded(create, mesh, jax.random.PRNGKey(0))
        adam = opt_state[0]
        checked = 0
        for tree in (params, adam.mu, adam.nu):
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
                name = "/".join(k.key for k in path)
                spec = next(s for suffix, s in EXPECTED_SPECS.items() if name.endswith(suffix))
                want = NamedSharding(mesh, spec)
                assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (shape, name, leaf.sharding)
                # Each device holds exactly its block, e.g. [64/fsdp, 4, 8/tensor, 8] of W_qkvu.
                assert leaf.addressable_shards[0].data.shape == want.shard_shape(leaf.shape), name
                checked += 1
        assert checked == 3 * len(jax.tree.leaves(params))
        assert adam.count.sharding.is_fully_replicated, shape


def _case_step_matches_one_device(*shape):
    from conftest import rel_err

    shape = tuple(int(n) for n in shape)
    tx = optax.adamw(1e-3)
    _, create, step = _setup(CFG, tx)
    key, tokens = jax.random.PRNGKey(0), _tokens()

    state = jax.jit(lambda k: nn.meta.unbox(create(k)))(key)
    (ref_params, _), ref_loss, ref_grads = jax.jit(step)(state, tokens)

    mesh = sharding.make_mesh(_mesh_sizes(shape))
    sharding.check_model(CFG, mesh)
    sharding.check_batch(BATCH, mesh)
    with sharding.use_mesh(mesh):
        sharded, shardings = sharding.init_sharded(create, mesh, key)
        for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(state)):
            np.testing.assert_array_equal(a, b)  # the same initial state, only distributed
        grad_shardings = shardings[0]
        sharded_step = jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                               out_shardings=(shardings, None, grad_shardings))
        (params, _), loss, grads = sharded_step(sharded, jax.device_put(
            tokens, sharding.batch_sharding(mesh)))

    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss)), (loss, ref_loss)
    for (path, g), g_ref in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        assert rel_err(g, g_ref) <= 1e-5, (shape, jax.tree_util.keystr(path), rel_err(g, g_ref))
    for p, p_ref in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        assert rel_err(p, p_ref) <= 1e-5


_COLLECTIVE = re.compile(
    r"= \(?([^=]*?)\)? (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    r"(?:-start)?\(")
_OPERAND = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def _collectives(compiled_text, large, small):
    """Counts the tensors moved by collectives in compiled HLO as (kind, 'large'|'small'|size).

    Tensors, not ops: XLA's combiner may merge independent all-reduces into one tuple op.
    """
    counts = Counter()
    for kind_operands, kind in ((m.group(1), m.group(2)) for m in _COLLECTIVE.finditer(compiled_text)):
        for dims in _OPERAND.findall(kind_operands):
            size = int(np.prod([int(d) for d in dims.split(",") if d]))
            counts[(kind, {large: "large", small: "small"}.get(size, size))] += 1
    return counts


def _case_collectives():
    """Tensor parallelism alone (1, 1, 8): the collectives per layer are the design's (parallelism.md)."""
    batch, seq = 2, 16
    mesh = sharding.make_mesh(_mesh_sizes((1, 1, 8)))
    tokens = jax.device_put(_tokens()[:batch, :seq + 1], sharding.batch_sharding(mesh))
    large, small = batch * seq * CFG.d_model, batch * seq  # [b, t, d] activations, [b, t] statistics

    def count(num_layers):
        cfg = CFG.replace(num_layers=num_layers)
        tx = optax.sgd(0.1)
        model, create, step = _setup(cfg, tx)
        with sharding.use_mesh(mesh):
            state, shardings = sharding.init_sharded(create, mesh, jax.random.PRNGKey(0))
            forward = jax.jit(lambda s, t: _loss(model, s[0], t), in_shardings=(shardings, None))
            train = jax.jit(step, in_shardings=(shardings, None), out_shardings=(shardings, None, None))
            return (_collectives(forward.lower(state, tokens).compile().as_text(), large, small),
                    _collectives(train.lower(state, tokens).compile().as_text(), large, small))

    # Per layer, forward: all-reduce after out_proj and after l3 ([b,t,d]) and of the SRMSNorm's sum
    # of squares over the heads ([b,t]). Backward adds dx of qkvu_proj, l1 and l2 ([b,t,d]) and the
    # norm's sum(o * do) ([b,t]). Outside the layers: the vocab-parallel embedding lookup ([b,t,d])
    # forward, the tied head's dx backward, the loss's max, sum of exponentials and label logit
    # over the vocabulary ([b,t]). Nothing else: no all-gather, no reduce-scatter.
    layer_fwd = Counter({("all-reduce", "large"): 2, ("all-reduce", "small"): 1})
    layer_step = Counter({("all-reduce", "large"): 5, ("all-reduce", "small"): 2})
    outside_fwd = Counter({("all-reduce", "large"): 1, ("all-reduce", "small"): 3})
    outside_step = Counter({("all-reduce", "large"): 2, ("all-reduce", "small"): 3})
    for num_layers in (1, 2):
        fwd, train = count(num_layers)
        times = lambda c: Counter({k: num_layers * n for k, n in c.items()})  # noqa: E731
        assert fwd == times(layer_fwd) + outside_fwd, (num_layers, fwd)
        assert train == times(layer_step) + outside_step, (num_layers, train)

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import conftest  # noqa: F401  (float32 matmuls at full precision, as in the suite)

    globals()[f"_case_{sys.argv[1]}"](*sys.argv[2:])
