"""Packed documents: every attention form with `segment_ids` equals the documents run one by one.

Outputs, final states and gradients (of q, k, v and the initial state) of each form on a packed
batch with random boundaries are checked against the float32 reference form run on each document
alone: the first document continues the initial state, later ones start from zero, and the final
state is the last document's.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import lightning
from tnllm import attention, config, cosformer
from tnllm.model import TransNormerLLM
from tnllm.testing import rel_err

F32_TOL = 1e-5  # docs/spec.md §4, float32 forms
BF16_TOL = 5e-3  # docs/spec.md §4, bf16 inputs against the float32 reference


def random_segments(seed, batch, seq, max_docs=5):
    """[batch, seq] int segment ids with random boundaries (one row may be a single document)."""
    rng = np.random.default_rng(seed)
    rows = []
    for row in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seq), size=rng.integers(0 if row else 1, max_docs),
                                  replace=False))
        ids = np.zeros(seq, np.int32)
        for n, cut in enumerate(cuts):
            ids[cut:] = rng.integers(0, 1000) if n % 2 else 7 * n + 3  # any values, distinct neighbours
        rows.append(ids)
    return jnp.asarray(np.stack(rows))


def inputs(seed, batch, seq, heads, dk, dv, dtype):
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.nn.silu(jax.random.normal(keys[0], (batch, seq, heads, dk))).astype(dtype)
    k = jax.nn.silu(jax.random.normal(keys[1], (batch, seq, heads, dk))).astype(dtype)
    v = jax.random.normal(keys[2], (batch, seq, heads, dv)).astype(dtype)
    s0 = jax.random.normal(keys[3], (batch, heads, dk, dv))
    do = jax.random.normal(keys[4], (batch, seq, heads, dv)).astype(dtype).astype(jnp.float32)
    d_final = jax.random.normal(keys[5], (batch, heads, dk, dv))
    # Fast decays too (x8), so that a state leaking across a boundary would show.
    return q, k, v, attention.alibi_slopes(heads) * 8.0, s0, do, d_final


def objective(attn, q, k, v, s0, do, d_final):
    """Outputs, final state and the gradients of <o, do> + <final, d_final> w.r.t. q, k, v, s0."""

    def loss(q, k, v, s0):
        o, final = attn(q, k, v, s0)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(final * d_final), (o, final)

    grads, outs = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, s0)
    return outs, grads


def one_by_one(q, k, v, slopes, s0, do, d_final, segment_ids):
    """The same objective with every document of every row run alone by the float32 reference.

    All documents go as rows of one call (one compilation), padded with zero tokens to the row
    length: a first document at its end (it starts from the row's initial state, and needs no
    padding when it is the row's last), every other one at its start, where zeros before a zero
    initial state change nothing.
    """
    batch, seq = q.shape[:2]
    ids = np.asarray(lightning.document_ids(segment_ids))
    docs = [(row, doc, np.flatnonzero(ids[row] == doc)) for row in range(batch)
            for doc in range(ids[row, -1] + 1)]

    def place(x, fill_from=None):  # [batch, seq, ...] -> [docs, seq, ...], each document padded
        out = []
        for row, doc, at in docs:
            part = x[row, at]
            widths = [(0, seq - len(at)) if doc == 0 else (seq - len(at), 0)] + [(0, 0)] * (x.ndim - 2)
            out.append(jnp.pad(part, widths))
        return jnp.stack(out)

    up = [place(x.astype(jnp.float32)) for x in (q, k, v)]
    first = np.array([doc == 0 for _, doc, _ in docs])
    last = np.array([doc == ids[row, -1] for row, doc, _ in docs])
    rows = np.array([row for row, _, _ in docs])
    states = jnp.where(first[:, None, None, None], s0[rows], 0.0)
    d_finals = jnp.where(last[:, None, None, None], d_final[rows], 0.0)
    reference = lambda q, k, v, s: lightning.lightning_reference(q, k, v, slopes, s)  # noqa: E731
    (o_d, final_d), g = objective(reference, *up, states, place(do), d_finals)

    def gather(x_d, like):  # back to [batch, seq, ...]
        out = np.zeros(like.shape, np.float32)
        for i, (row, doc, at) in enumerate(docs):
            out[row, at] = x_d[i, :len(at)] if doc == 0 else x_d[i, seq - len(at):]
        return out

    o = gather(o_d, v)
    final = np.asarray(final_d)[last]
    grads = [gather(g_d, x) for g_d, x in zip(g[:3], (q, k, v))] + [np.asarray(g[3])[first]]
    return (o, final), grads


def assert_close(outs, grads, expected_outs, expected_grads, tol):
    names = ("o", "final_state", "dq", "dk", "dv", "d_initial_state")
    for name, got, want in zip(names, (*outs, *grads), (*expected_outs, *expected_grads)):
        assert got.shape == want.shape, name
        assert rel_err(got, want) <= tol, (name, rel_err(got, want))


def test_document_ids_number_documents_from_zero():
    ids = lightning.document_ids(jnp.array([[4, 4, 9, 9, 9, 4, 2], [1, 1, 1, 1, 1, 1, 1]]))
    np.testing.assert_array_equal(ids, [[0, 0, 1, 1, 1, 2, 3], [0] * 7])


def test_xla_forms_equal_documents_one_by_one():
    q, k, v, slopes, s0, do, d_final = inputs(0, 3, 37, 2, 16, 8, jnp.float32)
    segment_ids = random_segments(0, 3, 37)
    expected = one_by_one(q, k, v, slopes, s0, do, d_final, segment_ids)
    for impl in ("reference", "blockwise", "recurrent"):
        attn = lambda q, k, v, s0: attention.lightning_attention(  # noqa: E731
            q, k, v, slopes, impl=impl, chunk_size=8, initial_state=s0, segment_ids=segment_ids)
        outs, grads = objective(attn, q, k, v, s0, do, d_final)
        assert_close(outs, grads, *expected, F32_TOL)


PALLAS_CASES = [
    # batch, seq, heads, dk, dv, dtype, chunk, sequence segments
    pytest.param(2, 45, 2, 16, 16, jnp.float32, 16, 1, id="f32-one-segment"),
    pytest.param(2, 45, 1, 16, 32, jnp.float32, 16, 3, id="f32-three-segments"),
    pytest.param(1, 70, 2, 32, 16, jnp.bfloat16, 16, 2, id="bf16-two-segments"),
]


def check_pallas(segment_ids, heads, dk, dv, dtype, chunk, segments):
    """The kernels (interpret mode on a CPU) on a packed batch against the documents one by one."""
    batch, seq = segment_ids.shape
    q, k, v, slopes, s0, do, d_final = inputs(1, batch, seq, heads, dk, dv, dtype)
    plan = dataclasses.replace(lightning.default_plan(dk, dv, chunk), segments=segments)

    def attn(q, k, v, s0):
        return lightning.lightning_attention(q, k, v, slopes, initial_state=s0, chunk_size=chunk,
                                             plan=plan, segment_ids=segment_ids)

    outs, grads = objective(attn, q, k, v, s0, do, d_final)
    tol = F32_TOL if dtype == jnp.float32 else BF16_TOL
    assert_close(outs, grads, *one_by_one(q, k, v, slopes, s0, do, d_final, segment_ids), tol)


@pytest.mark.parametrize("batch,seq,heads,dk,dv,dtype,chunk,segments", PALLAS_CASES)
def test_pallas_kernels_equal_documents_one_by_one(batch, seq, heads, dk, dv, dtype, chunk, segments):
    """Random boundaries, the sequence split into segments swept in parallel."""
    check_pallas(random_segments(seq, batch, seq), heads, dk, dv, dtype, chunk, segments)


def test_pallas_kernels_at_chunk_and_segment_edges():
    """Boundaries where the kernel's per-chunk cases meet, chunks of 16 rows, segments of 48 (a
    ragged last chunk: 90 tokens). Row 0: starts at a chunk's first row (16), three starts in one
    chunk (35, 38, 41), then a document longer than a segment (41-89). Row 1: starts at a chunk's
    last row (15), at a segment's first row (48), one-token documents at a chunk's last row (63)
    and at the last token (89). Row 2: documents that cross a chunk edge one row after a start
    (31) or before an end (48), where all rows but one of a chunk see the state. Gradients run the
    reverse sweeps over the same edges."""
    starts = [(16, 35, 38, 41), (15, 16, 48, 63, 64, 89), (31, 49)]
    check_pallas(edge_segments(90, starts), 1, 16, 16, jnp.float32, 16, 2)


def test_pallas_kernels_with_documents_lower_for_gpus():
    """The kernels with ids lower to Triton for a GPU, forward and backward, also on a machine
    without one (what interpret mode cannot check)."""
    q, k, v, slopes, s0, _, _ = inputs(5, 1, 200, 1, 16, 16, jnp.bfloat16)
    plan = dataclasses.replace(lightning.default_plan(16, 16, 64), segments=2)

    def loss(q, k, v, s0, segment_ids):
        o, final = lightning.lightning_attention(q, k, v, slopes, initial_state=s0, plan=plan,
                                                 interpret=False, segment_ids=segment_ids)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(
        q, k, v, s0, random_segments(5, 1, 200)).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("xla.gpu.triton") == 6  # forward: 2 calls, backward: 4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_pallas_kernels_equal_documents_one_by_one(dtype):
    """The compiled kernels at a training-like shape, default plan (segments chosen for the GPU)."""
    q, k, v, slopes, s0, do, d_final = inputs(2, 2, 1000, 4, 64, 64, dtype)
    segment_ids = random_segments(3, 2, 1000, max_docs=12)

    def attn(q, k, v, s0):
        return lightning.lightning_attention(q, k, v, slopes, initial_state=s0, chunk_size=64,
                                             segment_ids=segment_ids)

    outs, grads = objective(attn, q, k, v, s0, do, d_final)
    tol = F32_TOL if dtype == jnp.float32 else BF16_TOL
    assert_close(outs, grads, *one_by_one(q, k, v, slopes, s0, do, d_final, segment_ids), tol)


def edge_segments(seq, starts):
    """[len(starts), seq] int32 segment ids with documents starting at the given rows."""
    segment_ids = np.zeros((len(starts), seq), np.int32)
    for row, cuts in enumerate(starts):
        for cut in cuts:
            segment_ids[row, cut:] += 1
    return jnp.asarray(segment_ids)


# Chunks of 64 (the Mosaic kernels' only size): starts at a chunk's first and last rows, three in
# one chunk, at a segment's first row (192, with two segments of a 384-row padded sequence) and at
# the last token; a document longer than a segment.
MOSAIC_EDGES = [(64, 140, 150, 160), (63, 64, 192, 255, 256, 299), (127, 193)]


def mosaic_attention(slopes, segment_ids, dk, dv, segments, interpret=None):
    plan = dataclasses.replace(lightning.default_plan(dk, dv, 64, kernel="mosaic"),
                               segments=segments)

    def attn(q, k, v, s0):
        return lightning.lightning_attention(q, k, v, slopes, initial_state=s0, plan=plan,
                                             interpret=interpret, segment_ids=segment_ids)
    return attn


def test_mosaic_kernels_with_documents_lower_for_gpus():
    """The Mosaic GPU kernels with ids lower for a GPU, forward and backward, also on a machine
    without one (Pallas's CPU interpreter does not run them; the GPU test below does)."""
    segment_ids = edge_segments(300, MOSAIC_EDGES)
    q, k, v, slopes, s0, do, d_final = inputs(5, 3, 300, 2, 128, 64, jnp.bfloat16)
    attn = mosaic_attention(slopes, segment_ids, 128, 64, 2, interpret=False)

    def loss(q, k, v, s0):
        o, final = attn(q, k, v, s0)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(final * d_final)

    text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).trace(q, k, v, s0).lower(
        lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if "stablehlo.custom_call" in line]
    # forward: states pass and sweep; backward: states pass, dQ, dK, dV
    assert sum("mosaic_gpu" in line for line in calls) == 6
    assert not any("triton" in line for line in calls)


@pytest.mark.gpu
@pytest.mark.parametrize("segment_ids,heads,dk,dv,segments", [
    pytest.param(edge_segments(300, MOSAIC_EDGES), 2, 128, 128, 2, id="edges-2-segments"),
    pytest.param(random_segments(4, 2, 1000, max_docs=12), 3, 256, 128, None, id="dk256-dv128"),
    pytest.param(random_segments(5, 2, 777, max_docs=30), 2, 64, 64, 4, id="d64-4-segments"),
])
def test_compiled_mosaic_kernels_equal_documents_one_by_one(segment_ids, heads, dk, dv, segments):
    """The Mosaic GPU kernels, compiled on a Hopper GPU, on packed documents."""
    batch, seq = segment_ids.shape
    q, k, v, slopes, s0, do, d_final = inputs(6, batch, seq, heads, dk, dv, jnp.bfloat16)
    outs, grads = objective(mosaic_attention(slopes, segment_ids, dk, dv, segments),
                            q, k, v, s0, do, d_final)
    assert_close(outs, grads, *one_by_one(q, k, v, slopes, s0, do, d_final, segment_ids), BF16_TOL)


def test_one_document_equals_the_plain_call():
    q, k, v, slopes, s0, _, _ = inputs(3, 2, 21, 2, 16, 16, jnp.float32)
    same = jnp.full((2, 21), 5)
    for impl in ("blockwise", "recurrent"):
        plain = attention.lightning_attention(q, k, v, slopes, impl=impl, chunk_size=8, initial_state=s0)
        packed = attention.lightning_attention(q, k, v, slopes, impl=impl, chunk_size=8, initial_state=s0,
                                               segment_ids=same)
        for a, b in zip(plain, packed):
            assert rel_err(a, b) <= F32_TOL


def test_bad_segment_ids_are_one_sentence():
    q, k, v, slopes, _, _, _ = inputs(4, 1, 8, 1, 16, 16, jnp.float32)
    with pytest.raises(ValueError, match=r"segment_ids must be integers of shape \[batch, seq\]"):
        attention.lightning_attention(q, k, v, slopes, impl="blockwise", segment_ids=jnp.zeros((1, 7), int))
    with pytest.raises(ValueError, match="segment_ids separate documents of one causal sequence"):
        cosformer.cosformer_attention(q, k, v, m=8.0, causal=False, segment_ids=jnp.zeros((1, 8), int))


@pytest.mark.parametrize("path,mixer", [("configs/tiny.py", None), ("configs/tiny.py", "cosformer"),
                                        ("configs/softmax_tiny.py", None)])
def test_packed_model_equals_documents_one_by_one(path, mixer):
    """Logits and final states of a packed row against each document's own forward pass (LRPE and
    cosFormer positions restart per document; softmax gets a block-diagonal causal mask)."""
    cfg = config.model_config(config.load(path)).replace(chunk_size=8, num_layers=2)
    if mixer:
        cfg = cfg.replace(token_mixer=mixer, attention_impl="auto")
    model = TransNormerLLM(cfg)
    lengths = (5, 11, 1, 9)
    tokens = jax.random.randint(jax.random.PRNGKey(5), (1, sum(lengths)), 0, cfg.vocab_size)
    segment_ids = jnp.asarray(np.repeat(np.arange(len(lengths)), lengths)[None])
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens[:, :4])["params"])
    logits, states = jax.jit(lambda p, t, s: model.apply({"params": p}, t, segment_ids=s))(
        params, tokens, segment_ids)
    start = 0
    for n in lengths:
        alone, alone_states = model.apply({"params": params}, tokens[:, start:start + n])
        assert rel_err(logits[:, start:start + n], alone) <= 1e-5
        start += n
    for packed, single in zip(jax.tree.leaves(states), jax.tree.leaves(alone_states)):
        assert rel_err(packed, single) <= 1e-5
