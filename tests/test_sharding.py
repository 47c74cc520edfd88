"""Model parallelism (tnllm/sharding.py): mesh sizes, rules, errors, and on 8 fake CPU devices the
state shardings, equality with one device and the collectives of a tensor-parallel step.

The multi-device cases run in a subprocess, `python tests/test_sharding.py CASE [ARGS]`, with
XLA_FLAGS=--xla_force_host_platform_device_count=8: the flag must be set before JAX starts its CPU
backend, and the rest of the suite keeps its single device.
"""
import functools
import os
import re
import subprocess
import sys
import warnings
from collections import Counter

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P
from conftest import REPO, subprocess_env

from tnllm import sharding, train_lib
from tnllm.config import ModelConfig
from tnllm.model import TransNormerLLM, check_sharding

MESHES = ((8, 1, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8))  # (data, fsdp, tensor); context: see
# tests/test_context_parallel.py
# Eight heads so that every mesh above can split them; 20 tokens: not a multiple of the chunk.
CFG = ModelConfig(vocab_size=256, d_model=64, num_layers=2, num_heads=8, glu_dim=128,
                  lrpe_layers=(0,), chunk_size=8)
BATCH, SEQ = 8, 20

# What the rules must give each parameter (and its Adam moments), by the parameter's path suffix,
# for each token mixer.
_SHARED_SPECS = {
    "embed_tokens/embedding": P("tensor", "fsdp"),  # vocab rows split: vocab-parallel tied head
    "token_mixer/out_proj/kernel": P("tensor", None, "fsdp"),  # by rows (heads)
    "channel_mixer/l1/kernel": P("fsdp", "tensor"),  # by the GLU axis
    "channel_mixer/l2/kernel": P("fsdp", "tensor"),
    "channel_mixer/l3/kernel": P("tensor", "fsdp"),  # by rows
}
EXPECTED_SPECS = {
    "gla": {**_SHARED_SPECS,
            "token_mixer/qkvu_proj/kernel": P("fsdp", None, "tensor", None),  # by heads
            "token_mixer/theta": P("tensor", None)},
    "softmax": {**_SHARED_SPECS,
                "token_mixer/qkv_proj/kernel": P("fsdp", None, "tensor", None),  # by heads
                "norm/scale": P("fsdp")},  # RMSNorm weights, like the embed axis of every weight
}
# "gla_segments_sliced_loss": training in segments of 8 positions carrying the states (8, 8 and a
# padded 4; train_lib.weighted_loss), each segment's loss over the vocabulary in slices of 48 tokens
# (6 positions of the 8 rows; tnllm.loss) through the vocab-parallel head.
MIXER_CFGS = {"gla": CFG, "softmax": CFG.replace(token_mixer="softmax", lrpe_layers=()),
              "gla_segments_sliced_loss": CFG.replace(train_segment=8, loss_chunk=48)}
EXPECTED_SPECS["gla_segments_sliced_loss"] = EXPECTED_SPECS["gla"]


def _mesh_sizes(shape):
    return dict(zip(("data", "fsdp", "tensor"), shape), context=1)


def _abstract_mesh(shape):
    return AbstractMesh(tuple(_mesh_sizes(shape)[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)


# ------------------------------------------------------------------------------------------------
# In-process tests (one device): mesh sizes, rules and the errors.
# ------------------------------------------------------------------------------------------------
def test_mesh_shape_fills_one_axis():
    shape = lambda **sizes: sharding.mesh_shape(dict(context=1, **sizes), 8)  # noqa: E731
    assert shape(data=-1, fsdp=2, tensor=2) == dict(data=2, fsdp=2, context=1, tensor=2)
    assert shape(data=1, fsdp=1, tensor=-1) == dict(data=1, fsdp=1, context=1, tensor=8)
    assert shape(data=1, fsdp=2, tensor=4) == dict(data=1, fsdp=2, context=1, tensor=4)
    assert sharding.mesh_shape(dict(data=1, fsdp=1, context=-1, tensor=2), 8)["context"] == 4
    # One process may use only its first devices (the default config asks for one).
    assert shape(data=1, fsdp=1, tensor=1) == dict(data=1, fsdp=1, context=1, tensor=1)


@pytest.mark.parametrize("sizes, message", [
    (dict(data=-1, fsdp=-1, tensor=1), "at most one -1"),
    (dict(data=0, fsdp=1, tensor=1), "must be positive"),
    (dict(data=-1, fsdp=3, tensor=1), "do not divide the 8 devices"),
    (dict(data=4, fsdp=2, tensor=2), "needs 16 devices but 8 are present"),
    (dict(data=2, tensor=4), "config.mesh lacks fsdp"),
])
def test_mesh_shape_errors(sizes, message):
    with pytest.raises(ValueError, match=message):
        sharding.mesh_shape(sizes, 8)


def test_make_mesh_on_one_device():
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, context=1, tensor=1))
    assert mesh.axis_names == sharding.MESH_AXES and mesh.devices.shape == (1, 1, 1, 1)


def test_activation_specs():
    assert sharding.spec(("batch", "length", "embed")) == P(("data", "fsdp"), "context", None)
    assert sharding.spec(("batch", "length", "qkvu", "heads", "head_dim")) == P(
        ("data", "fsdp"), "context", None, "tensor", None)
    assert sharding.spec(("batch", "length", "mlp")) == P(("data", "fsdp"), "context", "tensor")


@pytest.mark.parametrize("mixer", EXPECTED_SPECS)
def test_param_specs_follow_rules(mixer):
    expected = EXPECTED_SPECS[mixer]
    boxed = jax.eval_shape(lambda: TransNormerLLM(MIXER_CFGS[mixer]).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
    specs = sharding.logical_to_sharding(nn.get_partition_spec(boxed),
                                         sharding.make_mesh(_mesh_sizes((1, 1, 1))))
    found = {}
    for path, s in jax.tree_util.tree_leaves_with_path(specs):
        name = "/".join(k.key for k in path[-3:])
        matches = [suffix for suffix in expected if name.endswith(suffix)]
        assert len(matches) == 1, f"no expected spec for parameter {name}"
        assert s.spec == expected[matches[0]], name
        found[matches[0]] = True
    assert set(found) == set(expected)


def test_unshardable_heads_fail_with_clear_error():
    mesh = _abstract_mesh((1, 1, 8))
    cfg = CFG.replace(num_heads=4, hidden_dim=64)
    with pytest.raises(ValueError, match=r"config.model.num_heads \(4\) is not divisible by the mesh "
                                         r"axis tensor = 8"):
        check_sharding(cfg, mesh)


def test_unshardable_width_fails_with_clear_error():
    mesh = _abstract_mesh((1, 4, 2))
    with pytest.raises(ValueError, match=r"config.model.d_model \(66\) .* fsdp = 4"):
        check_sharding(CFG.replace(d_model=66, hidden_dim=64), mesh)


@pytest.mark.parametrize("mixer", MIXER_CFGS)
def test_shardable_model_passes(mixer):
    for shape in MESHES:
        check_sharding(MIXER_CFGS[mixer], _abstract_mesh(shape))


def test_batch_not_divisible_fails_with_clear_error():
    mesh = _abstract_mesh((2, 2, 2))
    sharding.check_batch(8, mesh)
    with pytest.raises(ValueError, match=r"config.batch_size \(6\) must be divisible by the "
                                         r"data-parallel size data\*fsdp = 4"):
        sharding.check_batch(6, mesh)


# ------------------------------------------------------------------------------------------------
# Cases on 8 fake devices, run in a subprocess by the tests below.
# ------------------------------------------------------------------------------------------------
def _run_on_8_devices(case, *args):
    flags = "--xla_force_host_platform_device_count=8"
    if case == "collectives":
        flags += " --xla_disable_hlo_passes=cpu-all-reduce-combiner"
    env = subprocess_env(XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), case, *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"case {case}{args} failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"


@pytest.mark.parametrize("mixer", MIXER_CFGS)
def test_meshes_shard_by_rules_and_match_one_device(mixer):
    _run_on_8_devices("meshes", mixer)


def test_tensor_parallel_collectives():
    _run_on_8_devices("collectives")


def test_per_shard_runs_each_block_alone():
    _run_on_8_devices("per_shard")


def test_pallas_kernels_run_per_shard():
    _run_on_8_devices("pallas_per_shard")


def _loss(model, params, tokens):
    if model.cfg.loss_chunk or model.cfg.train_segment:  # as train_lib's step computes it
        weights = jnp.full(tokens[:, 1:].shape, 1.0 / tokens[:, 1:].size)
        return train_lib.weighted_loss(model, params, tokens, weights)
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


def _assert_follows_rules(state, mesh, expected):
    """Every parameter and both Adam moments carry `expected` specs; the step count is replicated."""
    params, (adam, *_) = state
    for tree in (params, adam.mu, adam.nu):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            name = jax.tree_util.keystr(path, simple=True, separator="/")
            spec = next(s for suffix, s in expected.items() if name.endswith(suffix))
            want = NamedSharding(mesh, spec)
            assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (mesh.shape, name, leaf.sharding)
            # Each device holds exactly its block, e.g. [64/fsdp, 4, 8/tensor, 8] of W_qkvu.
            assert leaf.addressable_shards[0].data.shape == want.shard_shape(leaf.shape), name
    assert adam.count.sharding.is_fully_replicated


def _case_meshes(mixer):
    """On each mesh the state is sharded by the rules and one training step
    gives the single-device loss, gradients and updated parameters (model of token mixer `mixer`)."""
    from conftest import rel_err

    cfg, expected = MIXER_CFGS[mixer], EXPECTED_SPECS[mixer]
    tx = optax.adamw(1e-3)
    _, create, step = _setup(cfg, tx)
    key, tokens = jax.random.PRNGKey(0), _tokens()
    ref_state = jax.jit(lambda k: nn.meta.unbox(create(k)))(key)
    (ref_params, _), ref_loss, ref_grads = jax.jit(step)(ref_state, tokens)

    for shape in MESHES:
        mesh = sharding.make_mesh(_mesh_sizes(shape))
        check_sharding(cfg, mesh)
        sharding.check_batch(BATCH, mesh)
        with sharding.use_mesh(mesh):
            if shape == (2, 2, 2):  # the real creation path, once: born sharded, same values
                state, shardings = sharding.init_sharded(create, mesh, key)
                for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
                    np.testing.assert_array_equal(a, b)
            else:
                shardings = sharding.logical_to_sharding(
                    nn.get_partition_spec(jax.eval_shape(create, key)), mesh)
                state = jax.device_put(ref_state, shardings)
            _assert_follows_rules(state, mesh, expected)
            batch = jax.device_put(tokens, sharding.batch_sharding(mesh))
            state, loss, grads = jax.jit(step, out_shardings=(shardings, None, shardings[0]))(
                state, batch)
        _assert_follows_rules(state, mesh, expected)
        assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss)), (shape, loss, ref_loss)
        for (path, g), g_ref in zip(jax.tree_util.tree_leaves_with_path(grads),
                                    jax.tree.leaves(ref_grads)):
            assert rel_err(g, g_ref) <= 1e-5, (shape, jax.tree_util.keystr(path), rel_err(g, g_ref))
        for p, p_ref in zip(jax.tree.leaves(state[0]), jax.tree.leaves(ref_params)):
            assert rel_err(p, p_ref) <= 1e-5, shape


_COLLECTIVE = re.compile(
    r"= \(?([^=]*?)\)? (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    r"(?:-start)?\(.*op_name=\"([^\"]*)\"")
_OPERAND = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def _collectives(hlo_text, sizes):
    """Counts the tensors that collectives move in compiled HLO, by where they come from.

    Returns {(place, pass): Counter{(kind, size name): n}}: place is `layers_<i>` or `outside`
    (from the op's name scope), pass is `forward` or `backward` (the transpose of the forward).
    `sizes` names element counts ({2048: "[b,t,d]"}); other sizes are kept as numbers.
    """
    found = {}
    for operands, kind, op_name in _COLLECTIVE.findall(hlo_text):
        layer = re.search(r"/(layers_\d+)/", op_name)
        where = (layer.group(1) if layer else "outside",
                 "backward" if "transpose(" in op_name else "forward")
        for dims in _OPERAND.findall(operands):
            size = int(np.prod([int(d) for d in dims.split(",") if d]))
            found.setdefault(where, Counter())[(kind, sizes.get(size, size))] += 1
    return found


def _case_collectives():
    """Pure tensor parallelism (1, 1, 8); the collectives are those of docs/parallelism.md.

    Runs with XLA's CPU all-reduce combiner off, so that every collective keeps its own op and name
    (the combiner only packs independent all-reduces into one tuple op; it moves the same tensors).
    """
    batch, seq = 2, 16
    mesh = sharding.make_mesh(_mesh_sizes((1, 1, 8)))
    _, create, step = _setup(CFG, optax.sgd(0.1))
    with sharding.use_mesh(mesh):
        state, shardings = sharding.init_sharded(create, mesh, jax.random.PRNGKey(0))
        tokens = jax.device_put(_tokens()[:batch, :seq + 1], sharding.batch_sharding(mesh))
        hlo = jax.jit(step, out_shardings=(shardings, None, None)).lower(state, tokens).compile()
    found = _collectives(hlo.as_text(), {batch * seq * CFG.d_model: "[b,t,d]", batch * seq: "[b,t]"})

    large, small = ("all-reduce", "[b,t,d]"), ("all-reduce", "[b,t]")
    expected = {}
    for i in range(CFG.num_layers):
        # out_proj and l3 outputs; the SRMSNorm's sum of squares over the split heads.
        expected[(f"layers_{i}", "forward")] = Counter({large: 2, small: 1})
        # dx of qkvu_proj, l1 and l2; the norm's sum(o * do) over the heads.
        expected[(f"layers_{i}", "backward")] = Counter({large: 3, small: 1})
    # Vocab-parallel embedding lookup; the loss's max, sum of exponentials and label logit.
    expected[("outside", "forward")] = Counter({large: 1, small: 3})
    expected[("outside", "backward")] = Counter({large: 1})  # dx of the tied head
    assert found == expected, found


def _case_per_shard():
    """An operator independent across batch and heads runs on each device's block: the result of
    the whole, and no collective in the compiled program."""
    from conftest import random_qkv, rel_err

    from tnllm.attention import layer_slopes, lightning_attention

    q, k, v = random_qkv(jax.random.PRNGKey(2), 4, 20, 8, 16, 8)
    slopes = layer_slopes(8, 0, 2)
    s0 = jax.random.normal(jax.random.PRNGKey(3), (4, 8, 16, 8))
    op = lambda q, k, v, s, s0: lightning_attention(q, k, v, s, impl="blockwise", chunk_size=8,  # noqa: E731
                                                    initial_state=s0)
    want = op(q, k, v, slopes, s0)
    seq, state = ("batch", "length", "heads", "head_dim"), ("batch", "heads", None, None)
    mesh = sharding.make_mesh(_mesh_sizes((2, 2, 2)))
    split = lambda x, names: jax.device_put(x, NamedSharding(mesh, sharding.spec(names)))  # noqa: E731
    args = (split(q, seq), split(k, seq), split(v, seq), split(slopes, ("heads",)), split(s0, state))
    with sharding.use_mesh(mesh):
        f = jax.jit(sharding.per_shard(op, in_axes=(seq, seq, seq, ("heads",), state),
                                       out_axes=(seq, state)))
        compiled = f.lower(*args).compile()
        got = compiled(*args)
        assert "shard_map[" in str(jax.make_jaxpr(f)(*args))
    assert got[0].sharding.is_equivalent_to(args[2].sharding, 4)
    assert got[0].addressable_shards[0].data.shape == (1, 20, 4, 8)  # batch / (2*2), heads / 2
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-6
    assert not _COLLECTIVE.findall(compiled.as_text())


def _case_pallas_per_shard():
    """impl="pallas" under a mesh: each device runs the kernels (interpret mode here) on its block;
    outputs and gradients equal the float32 reference form's."""
    from conftest import random_qkv, rel_err

    from tnllm.attention import layer_slopes, lightning_attention

    q, k, v = random_qkv(jax.random.PRNGKey(4), 4, 20, 2, 16, 16)
    slopes = layer_slopes(2, 0, 2)
    s0 = jax.random.normal(jax.random.PRNGKey(5), (4, 2, 16, 16))
    do = jax.random.normal(jax.random.PRNGKey(6), v.shape)

    def loss(impl, q, k, v, s0):
        o, final = lightning_attention(q, k, v, slopes, impl=impl, chunk_size=16, initial_state=s0)
        return jnp.sum(o * do) + jnp.sum(final), (o, final)

    grad = lambda impl: jax.jit(jax.grad(functools.partial(loss, impl), argnums=(0, 1, 2, 3),  # noqa: E731
                                         has_aux=True))
    want = grad("reference")(q, k, v, s0)
    mesh = sharding.make_mesh(_mesh_sizes((2, 2, 2)))
    seq, state = ("batch", "length", "heads", "head_dim"), ("batch", "heads", None, None)
    split = lambda x, names: jax.device_put(x, NamedSharding(mesh, sharding.spec(names)))  # noqa: E731
    with sharding.use_mesh(mesh), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no GPU: interpret mode"
        args = (split(q, seq), split(k, seq), split(v, seq), split(s0, state))
        got = grad("pallas")(*args)
        # The kernels sit inside shard_map (forward and backward), not split by GSPMD.
        jaxpr = str(jax.make_jaxpr(grad("pallas"))(*args))
        assert jaxpr.count("shard_map[") >= 2 and "pallas_call" in jaxpr
    assert got[1][0].sharding.is_equivalent_to(NamedSharding(mesh, sharding.spec(seq)), 4)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert rel_err(a, b) <= 1e-5
    # A batch the mesh does not divide (model.init traces a batch of 1) runs whole on every device.
    one = lambda impl: lightning_attention(q[:1], k[:1], v[:1], slopes, impl=impl, chunk_size=16)  # noqa: E731
    with sharding.use_mesh(mesh), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = jax.jit(functools.partial(one, "pallas"))()
    for a, b in zip(got, one("reference")):
        assert rel_err(a, b) <= 1e-5


if __name__ == "__main__":  # conftest, imported above, sets float32 matmuls to full precision here too
    globals()[f"_case_{sys.argv[1]}"](*sys.argv[2:])
