"""Context parallelism (the `context` mesh axis): one sequence split over devices, exact against one
device, one exchange of [heads, dk, dv] states per layer and pass, and `train.py` on it.

The multi-device cases run together in one subprocess, `python tests/test_context_parallel.py
RESULTS.json CASE...`, with XLA_FLAGS=--xla_force_host_platform_device_count=8 (set before JAX
starts its CPU backend; the rest of the suite keeps one device), as in tests/test_sharding.py.
"""
import functools
import json
import os
import shutil
import subprocess
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest
from conftest import REPO, subprocess_env
from test_distributed import _env, _losses, _train_flags, corpus  # noqa: F401 -- corpus: a fixture

from tnllm import config, sharding
from tnllm.config import ModelConfig

# Two heads (tensor 2 splits them), an LRPE layer and a plain one, chunks of 16: the sequences of 24
# split into slices of 12, 6 and 3 positions, none a multiple of the chunk.
CFG = ModelConfig(vocab_size=256, d_model=32, num_layers=2, num_heads=2, glu_dim=64,
                  lrpe_layers=(0,), chunk_size=16)
BATCH, SEQ = 4, 24
# (data, fsdp, context, tensor) of the operator's blockwise form: the context axis alone at 2 and 8,
# and with fsdp, tensor and data; the Pallas kernels run on a context axis of 4 alone.
MESHES = ((1, 1, 2, 1), (1, 1, 8, 1), (1, 2, 2, 2), (2, 1, 4, 1))


def _mesh(shape):
    return sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))


CASES = ("operator", "model", "prefill", "generate", "complete", "collectives")


@pytest.fixture(scope="module")
def on_8_devices(tmp_path_factory):
    """Runs every `_case_<name>` of CASES in one subprocess (one JAX start-up, with XLA's CPU
    all-reduce combiner off so that every collective keeps its own op and name, as in
    tests/test_sharding.py); returns {case: "" if it passed, else its traceback}."""
    results = tmp_path_factory.mktemp("context") / "results.json"
    env = subprocess_env(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8 "
                         "--xla_disable_hlo_passes=cpu-all-reduce-combiner")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(results), *CASES], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and results.exists(), proc.stderr[-6000:]
    return json.loads(results.read_text())


# ------------------------------------------------------------------------------------------------
# In-process tests (one device): the config's checks.
# ------------------------------------------------------------------------------------------------
def _cfg(**changes):
    cfg = config.base_config()
    cfg.model.update(CFG.to_dict())
    for path, value in changes.items():
        section, field = path.split("__")
        cfg[section][field] = value
    return cfg


@pytest.mark.parametrize("changes, message", [
    (dict(mesh__context=-1), r"config.mesh.context must be a positive number of devices \(not -1"),
    (dict(mesh__context=5), r"config.data.seq_len \(2048\) must be divisible by config.mesh.context "
                            r"\(5\)"),
    (dict(mesh__context=4, model__train_segment=6), r"config.model.train_segment \(6\) must be "
                                                    r"divisible by config.mesh.context \(4\)"),
    (dict(mesh__context=2, model__token_mixer="cosformer"), r"config.mesh.context \(2\) splits "
     r"sequences for TNL's gla token mixer only, not 'cosformer'; set config.mesh.context to 1."),
])
def test_config_refuses_what_the_context_axis_cannot_split(changes, message):
    with pytest.raises(ValueError, match=message):
        config.check(_cfg(**changes))


def test_config_accepts_a_context_axis_and_configs_saved_without_one():
    config.check(_cfg(mesh__context=4, model__train_segment=512))
    old = _cfg()
    old.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
    config.check(old)
    assert sharding.mesh_shape(old.mesh, 8) == dict(data=1, fsdp=1, context=1, tensor=1)


# ------------------------------------------------------------------------------------------------
# On 8 fake devices.
# ------------------------------------------------------------------------------------------------
def test_operator_on_context_meshes_matches_reference(on_8_devices):
    assert not on_8_devices["operator"], on_8_devices["operator"]


def test_model_on_context_meshes_matches_one_device(on_8_devices):
    assert not on_8_devices["model"], on_8_devices["model"]


def test_prefill_on_a_context_axis_matches_one_device(on_8_devices):
    assert not on_8_devices["prefill"], on_8_devices["prefill"]


def test_generate_on_a_mesh_returns_the_tokens_of_one_device(on_8_devices):
    assert not on_8_devices["generate"], on_8_devices["generate"]


def test_batches_on_a_mesh_copy_the_params_once_and_return_one_devices_tokens(on_8_devices):
    assert not on_8_devices["complete"], on_8_devices["complete"]


def test_one_state_exchange_per_layer_and_none_without_the_axis(on_8_devices):
    assert not on_8_devices["collectives"], on_8_devices["collectives"]


def _case_operator():
    """lightning_attention under context meshes, with an initial state and a cotangent on the final
    state: o, the final state and the gradients of q, k, v and the initial state equal the float32
    reference form's on one device, for the blockwise form and the Pallas kernels (interpret mode)."""
    from conftest import random_qkv, rel_err

    from tnllm.attention import layer_slopes, lightning_attention

    q, k, v = random_qkv(jax.random.PRNGKey(0), 2, SEQ, 2, 32, 16)
    slopes = layer_slopes(2, 0, 2)  # the fastest decay: lambda^L matters
    s0 = jax.random.normal(jax.random.PRNGKey(1), (2, 2, 32, 16))
    do = jax.random.normal(jax.random.PRNGKey(2), v.shape)
    ds = jax.random.normal(jax.random.PRNGKey(3), s0.shape)

    def loss(impl, q, k, v, s0):
        o, final = lightning_attention(q, k, v, slopes, impl=impl, chunk_size=16, initial_state=s0)
        return jnp.sum(o * do) + jnp.sum(final * ds), (o, final)

    grad = lambda impl: jax.jit(jax.grad(functools.partial(loss, impl), argnums=(0, 1, 2, 3),  # noqa: E731
                                         has_aux=True))
    want = jax.tree.leaves(grad("reference")(q, k, v, s0))
    cases = [(shape, "blockwise") for shape in MESHES] + [((1, 1, 4, 1), "pallas")]
    for shape, impl in cases:
        with sharding.use_mesh(_mesh(shape)), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no GPU: interpret mode"
            f = grad(impl)
            assert "all_gather" in str(jax.make_jaxpr(f)(q, k, v, s0))  # the split path ran
            got = jax.tree.leaves(f(q, k, v, s0))
        for name, a, b in zip(("dq", "dk", "dv", "ds0", "o", "final"), got, want):
            assert rel_err(a, b) <= 1e-5, (shape, impl, name, rel_err(a, b))
    # bf16 inputs (float32 states) against the float32 reference on the same values: docs/spec.md §4.
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    want = lightning_attention(*(x.astype(jnp.float32) for x in low), slopes, impl="reference",
                               initial_state=s0)
    with sharding.use_mesh(_mesh((1, 1, 4, 1))):
        got = jax.jit(functools.partial(lightning_attention, impl="blockwise", chunk_size=16))(
            *low, slopes, initial_state=s0)
    assert got[0].dtype == jnp.bfloat16
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 5e-3, rel_err(a, b)


def _model_loss(model, params, tokens):
    from tnllm import train_lib

    weights = jnp.full(tokens[:, 1:].shape, 1.0 / tokens[:, 1:].size)
    return train_lib.weighted_loss(model, params, tokens, weights)


def _case_model():
    """The tiny model's loss and gradients equal one device's within 1e-5: whole sequences on a
    context axis of 2 with fsdp and tensor, and in segments of
    8 positions carrying the states (train_segment) on a context axis of 4 with fsdp: each segment
    split again, its initial state the previous segment's final one."""
    from conftest import rel_err

    from tnllm.model import TransNormerLLM, check_sharding

    tokens = jax.random.randint(jax.random.PRNGKey(4), (BATCH, SEQ + 1), 0, CFG.vocab_size)
    whole = ((1, 2, 2, 2),)  # a context axis of 8 alone: _case_collectives
    for cfg, meshes in ((CFG, whole), (CFG.replace(train_segment=8), ((1, 2, 4, 1),))):
        model = TransNormerLLM(cfg)
        params = nn.meta.unbox(model.init(jax.random.PRNGKey(5), tokens[:, :-1])["params"])
        step = jax.value_and_grad(functools.partial(_model_loss, model))
        want_loss, want_grads = jax.jit(step)(params, tokens)
        for shape in meshes:
            mesh = _mesh(shape)
            check_sharding(cfg, mesh)
            with sharding.use_mesh(mesh):
                shardings = sharding.logical_to_sharding(nn.get_partition_spec(jax.eval_shape(
                    model.init, jax.random.PRNGKey(5), tokens[:, :-1]))["params"], mesh)
                params_on_mesh = jax.device_put(params, shardings)
                lowered = jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh))).lower(
                    params_on_mesh, tokens)
                assert "all_gather" in lowered.as_text()  # the split path ran (GSPMD adds fsdp's later)
                loss, grads = lowered.compile()(params_on_mesh, tokens)
            assert rel_err(loss, want_loss) <= 1e-5, (cfg.train_segment, shape, loss, want_loss)
            for (path, g), g_want in zip(jax.tree_util.tree_leaves_with_path(grads),
                                         jax.tree.leaves(want_grads)):
                assert rel_err(g, g_want) <= 1e-5, (cfg.train_segment, shape,
                                                   jax.tree_util.keystr(path), rel_err(g, g_want))


def _case_prefill():
    """Left-padded prompts prefilled on a (data 2, context 4) mesh, segments of 16 split into slices
    of 4: the next token's logits and every layer's state equal one device's prefill, for four
    prompts and for one. The softmax
    and cosFormer mixers refuse the axis with one sentence."""
    from conftest import rel_err

    from tnllm.decode import left_pad, prefill, prompt_bucket
    from tnllm.model import TransNormerLLM

    rng = jax.random.PRNGKey(7)
    prompts = [list(range(3, 30)), list(range(40, 52)), [7] * 20, list(range(100, 131))]
    tokens, mask = left_pad(prompts, prompt_bucket(31, 16))
    params = nn.meta.unbox(TransNormerLLM(CFG).init(rng, tokens)["params"])
    want = prefill(params, tokens, mask, cfg=CFG, prefill_chunk=16)
    on_mesh = dict(cfg=CFG, prefill_chunk=16, mesh=_mesh((2, 1, 4, 1)))
    got = prefill(params, tokens, mask, **on_mesh)
    assert "all_gather" in prefill.lower(params, tokens, mask, **on_mesh).as_text()  # split
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert rel_err(a, b) <= 1e-5, rel_err(a, b)
    # One prompt, which the data axis of 2 cannot split: it stays whole, its length still split.
    one = prefill(params, tokens[:1], mask[:1], **on_mesh)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(want)):
        assert rel_err(a, b[:1]) <= 1e-5, rel_err(a, b[:1])
    for mixer in ("softmax", "cosformer"):
        cfg = CFG.replace(token_mixer=mixer, lrpe_layers=())
        with sharding.use_mesh(_mesh((1, 1, 2, 1))), pytest.raises(
                ValueError, match=rf"config.mesh.context \(2\) splits sequences for TNL's gla token "
                                  rf"mixer only, not '{mixer}'; set config.mesh.context to 1."):
            jax.eval_shape(TransNormerLLM(cfg).init, rng, tokens)


def _generation_model():
    """(cfg, params committed to the default device as load_model returns them, two prompts of
    37 and 21 tokens) for the cases of `tnllm.generate`."""
    from tnllm.model import TransNormerLLM

    cfg = CFG.replace(chunk_size=8)
    prompts = [list(range(3, 40)), [5, 9, 200] * 7]
    params = nn.meta.unbox(TransNormerLLM(cfg).init(jax.random.PRNGKey(8), jnp.asarray(prompts[:1]))
                           ["params"])
    return cfg, jax.device_put(params, jax.devices()[0]), prompts


def _case_generate():
    """Greedy `generate` with a (data 2, context 2) mesh: two prompts of 37 and 21 tokens, segments
    of 16 split into slices of 8, rows split over the data axis; the tokens equal one device's, the
    log-probabilities within 1e-5, the prefill ran split, and decoding ran on one device. A softmax
    model refuses the context axis in one sentence."""
    from tnllm import generate as generate_module

    cfg, params, prompts = _generation_model()
    mesh = _mesh((2, 1, 2, 1))
    run = functools.partial(generate_module.generate, params, cfg, prompts, max_new_tokens=6,
                            prefill_chunk=16, return_logprobs=True)
    want = run()
    decoded_on, lowered = [], []
    decode, prefill = generate_module.decode, generate_module.prefill

    def spy_decode(params, prefilled, *args, **kwargs):
        decoded_on.append({d for x in jax.tree.leaves(prefilled) for d in x.devices()})
        return decode(params, prefilled, *args, **kwargs)

    def spy_prefill(*args, **kwargs):
        lowered.append(prefill.lower(*args, **kwargs).as_text())
        return prefill(*args, **kwargs)

    generate_module.decode, generate_module.prefill = spy_decode, spy_prefill
    try:
        got = run(mesh=mesh)
    finally:
        generate_module.decode, generate_module.prefill = decode, prefill
    assert (got.tokens == want.tokens).all(), (got.tokens, want.tokens)
    assert (got.lengths == want.lengths).all()
    assert abs(got.logprobs - want.logprobs).max() <= 1e-5, abs(got.logprobs - want.logprobs).max()
    assert "all_gather" in lowered[0]  # the context axis split the segments
    assert decoded_on == [{jax.devices()[0]}]
    softmax = CFG.replace(token_mixer="softmax", lrpe_layers=())
    with pytest.raises(ValueError, match=r"^The mesh's context axis \(2 devices\) splits prompts for "
                                         r"TNL's gla token mixer only, not 'softmax'; use a mesh "
                                         r"with context 1 \(--mesh_context=1\).$"):
        generate_module.generate(params, softmax, prompts, max_new_tokens=6, mesh=mesh)


def _case_complete():
    """`complete_ids` of five prompts in batches of 2 (the last filled up) with a (data 2,
    context 2) mesh copies the params onto the mesh once, not once a batch, decodes every batch on
    the default device, and gives the tokens of one device."""
    from tnllm import generate as generate_module

    cfg, params, prompts = _generation_model()
    prompts = prompts + [p[::-1] for p in prompts] + [prompts[0][1:]]

    class Tokenizer:  # ids as text
        vocab_size, pad_id = cfg.vocab_size, 0

        def decode(self, ids):
            return " ".join(map(str, ids))

    run = functools.partial(generate_module.complete_ids, params, cfg, Tokenizer(), prompts,
                            max_new_tokens=6, eos_id=None, batch_size=2, prefill_chunk=16)
    want = list(run())
    copies, decoded_on = [], []
    device_put, decode = jax.device_put, generate_module.decode

    def spy_device_put(x, device=None, *args, **kwargs):
        if (isinstance(device, jax.sharding.NamedSharding)
                and jax.tree.structure(x) == jax.tree.structure(params)):
            copies.append(device)
        return device_put(x, device, *args, **kwargs)

    def spy_decode(params, prefilled, *args, **kwargs):
        decoded_on.append({d for x in jax.tree.leaves((params, prefilled)) for d in x.devices()})
        return decode(params, prefilled, *args, **kwargs)

    jax.device_put, generate_module.decode = spy_device_put, spy_decode
    try:
        got = list(run(mesh=_mesh((2, 1, 2, 1))))
    finally:
        jax.device_put, generate_module.decode = device_put, decode
    assert len(copies) == 1, copies
    assert decoded_on == [{jax.devices()[0]}] * 3, decoded_on
    assert [c.tokens for c in got] == [c.tokens for c in want]
    assert max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g.logprobs, w.logprobs)) <= 1e-5


def _case_collectives():
    """Per layer, the training step on a context axis of 8 exchanges states only: one all-gather of
    the n slices' [b, h, dk, dv] states forward and its reduce-scatter backward, the same at 24 and
    at 48 positions; the rest are the gradient all-reduces that data parallelism has too. A context
    axis of 1 traces none of it (no all-gather, no shard_map: the program of a mesh without the axis).
    Each step's gradients equal one device's within 1e-5."""
    from test_sharding import _collectives

    from tnllm.model import TransNormerLLM

    from conftest import rel_err

    model = TransNormerLLM(CFG)
    step = jax.grad(functools.partial(_model_loss, model))

    def compiled(shape, seq):
        """The gradient step's jaxpr, its compiled HLO, and its gradients against one device's."""
        mesh = _mesh(shape)
        tokens = jax.random.randint(jax.random.PRNGKey(6), (4, seq + 1), 0, CFG.vocab_size)
        with sharding.use_mesh(mesh):
            params, shardings = sharding.init_sharded(
                lambda key: model.init(key, tokens[:, :-1])["params"], mesh, jax.random.PRNGKey(0))
            f = jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)))
            exe = f.lower(params, tokens).compile()
            jaxpr = str(jax.make_jaxpr(f)(params, tokens))
        want = jax.jit(step)(jax.device_get(params), tokens)
        errors = [rel_err(a, b) for a, b in zip(jax.tree.leaves(exe(params, tokens)), jax.tree.leaves(want))]
        return jaxpr, exe.as_text(), max(errors)

    b, h, hd, n = 4, CFG.num_heads, CFG.head_dim, 8
    state = {i: b * h * hd * (2 if i in CFG.lrpe_layers else 1) * hd for i in range(CFG.num_layers)}
    found = {}
    for seq in (SEQ, 2 * SEQ):  # slices of 3 and 6 positions
        _, hlo, error = compiled((1, 1, n, 1), seq)
        assert error <= 1e-5, (seq, error)  # the gradients on a context axis of 8 alone
        found[seq] = _collectives(hlo, {})
        for i, size in state.items():
            assert found[seq][(f"layers_{i}", "forward")] == {("all-gather", n * size): 1}, found[seq]
            backward = found[seq][(f"layers_{i}", "backward")]
            exchanges = {key: count for key, count in backward.items() if key[0] != "all-reduce"}
            assert exchanges == {("reduce-scatter", size): 1}, backward
    layers = lambda f: {k: v for k, v in f.items() if k[0] != "outside"}  # noqa: E731
    assert layers(found[SEQ]) == layers(found[2 * SEQ])  # nothing in a layer grows with the length
    jaxpr, hlo, error = compiled((4, 1, 1, 2), SEQ)
    assert error <= 1e-5, error
    assert "all_gather" not in jaxpr and "shard_map" not in jaxpr and "axis_index" not in jaxpr
    assert "all-gather" not in hlo and "reduce-scatter" not in hlo


# ------------------------------------------------------------------------------------------------
# train.py on a context axis: runs, evaluates, and resumes exactly.
# ------------------------------------------------------------------------------------------------
def test_train_cli_on_a_context_axis_resumes_exactly(corpus, tmp_path):
    """Batches of 4 sequences of 24 tokens on a (data 2, context 4) mesh, slices of 6 positions
    (chunks of 8); a run whose last checkpoint (step 4) is lost resumes from the one at step 2 and
    logs the uninterrupted run's losses."""
    def train(workdir):
        flags = _train_flags(corpus, workdir, 4, "--config.checkpoint.every=2", "--config.mesh.data=2",
                             "--config.mesh.context=4", "--config.train.batch_size=4",
                             "--config.model.d_model=32", "--config.model.glu_dim=64")
        out = subprocess.run([sys.executable, *flags], cwd=REPO, env=_env(8), capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-4000:]
        return _losses(workdir)

    want = train(tmp_path / "run")
    assert len(want) == 4
    shutil.copytree(tmp_path / "run", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")  # as if killed before step 4's save
    assert train(tmp_path / "resumed") == want


if __name__ == "__main__":  # conftest, imported above, sets float32 matmuls to full precision here too
    import traceback

    outcome = {}
    for name in sys.argv[2:]:
        try:
            globals()[f"_case_{name}"]()
            outcome[name] = ""
        except Exception:  # noqa: BLE001 -- reported by the test of this case
            outcome[name] = traceback.format_exc()[-6000:]
    with open(sys.argv[1], "w") as f:
        json.dump(outcome, f)
