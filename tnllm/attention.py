"""Lightning Attention: causal linear attention with a constant per-head decay (docs/spec.md §4).

For every (batch, head):  o_t = sum_{j <= t} lambda^(t-j) (q_t . k_j) v_j,  lambda = exp(-s),
with an optional initial state S_0 that enters as if it had been built by earlier tokens:
o_t += lambda^(t+1) q_t S_0, and the final state is S_T = lambda^T S_0 + sum_j lambda^(T-1-j) k_j^T v_j.

Forms (all exact, all agree; `impl` selects one):
  reference  the quadratic masked form O = ((Q K^T) * D) V (`pallas_kernels.lightning.
             lightning_reference`, beside the kernels it checks); for tests and short sequences.
  blockwise  Lightning Attention-2 chunks of `chunk_size`: intra-chunk masked products in parallel,
             a float32 state carried across chunks by `lax.scan` (`lightning_attention_blockwise`).
             The XLA path for training.
  recurrent  `lax.scan` over tokens with `lightning_attention_step`: only multiplications by
             lambda <= 1, so it stays finite at any length (the paper's robust inference form).
  pallas     the GPU kernels of `pallas_kernels/` (interpret mode on machines without a GPU).
  auto       (the default) pallas on an NVIDIA GPU where the kernels take the inputs' dtypes,
             head dims and chunk size, blockwise everywhere else; chosen when traced.

`choose_impl` is that choice, and the one every token mixer's "auto" goes through (cosFormer's and
softmax attention's too).

Context parallelism: under a mesh whose `context` axis splits the `length` of q, k and v
(`tnllm.sharding`), each of the n devices holds one contiguous slice of L = seq / n positions and
runs the chosen form on it alone. With a constant decay the transition across a slice is the scalar
lambda^L per head, so the state entering slice r is exact from the slices' own states
S_s = sum_{j in slice s} lambda^(L-1-j) k_j^T v_j (local j) and one all-gather of them:
    S_in(r) = lambda^(rL) S_0 + sum_{s<r} lambda^((r-1-s)L) S_s,
and the slice runs from S_in(r) as its initial state (o_t += lambda^(t+1) q_t S_in(r), local t).
Nothing that grows with the length is exchanged: one all-gather of [heads, dk, dv] states per call
forward, and its transpose (a reduce-scatter) backward (docs/parallelism.md).

With `segment_ids` every form runs packed documents: the state resets at each document start (no
decay crosses it), the initial state continues the first document and the final state is the last
one's, exactly as if each document were run alone.

All decay arithmetic and every state is float32; causal masks come from token indices.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

import pallas_kernels
from pallas_kernels import lightning
from tnllm import sharding
from tnllm.config import check_impl

Array = jax.Array


def alibi_slopes(num_heads: int) -> Array:
    """Base decay rates s_h of docs/spec.md §2 (the ALiBi slopes): [num_heads] float32."""
    if num_heads < 1:
        raise ValueError(f"num_heads must be positive, got {num_heads}.")

    def power_of_two(n: int) -> list:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    p = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = power_of_two(p)
    if p < num_heads:
        slopes += power_of_two(2 * p)[0::2][: num_heads - p]
    return jnp.asarray(slopes, dtype=jnp.float32)


def layer_slopes(num_heads: int, layer: int, num_layers: int) -> Array:
    """Decay rates of layer `layer` (0-based) of `num_layers`: s_h * (1 - l/(L-1) + 1e-5), [H] f32."""
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} is out of range for a model of {num_layers} layers.")
    factor = 1.0 + 1e-5 if num_layers == 1 else 1.0 - layer / (num_layers - 1) + 1e-5
    return alibi_slopes(num_heads) * jnp.float32(factor)


def document_positions(segment_ids: Array) -> Array:
    """Each token's position in its own document, 0 at every document start: [batch, seq] int32.

    segment_ids: [batch, seq] int, equal for neighbouring tokens of one packed document (LRPE and
    cosFormer phases restart per document with these positions, as if each ran alone).
    """
    t = segment_ids.shape[1]
    index = jnp.arange(t, dtype=jnp.int32)
    starts = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=True)
    return index - lax.cummax(jnp.where(starts, index, 0), axis=1)


def _check_inputs(q: Array, k: Array, v: Array, slopes: Array, initial_state: Optional[Array]) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "lightning_attention expects q, k, v of shape [batch, seq, heads, dim], got "
            f"{q.shape}, {k.shape}, {v.shape}."
        )
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {q.shape} and {k.shape}.")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must share batch, seq and heads with q: q is {q.shape}, v is {v.shape}."
        )
    heads = q.shape[2]
    if slopes.shape != (heads,):
        raise ValueError(f"slopes must have shape [heads] = ({heads},), got {slopes.shape}.")
    if initial_state is not None:
        want = (q.shape[0], heads, q.shape[3], v.shape[3])
        if initial_state.shape != want:
            raise ValueError(
                f"initial_state must have shape [batch, heads, dk, dv] = {want}, "
                f"got {initial_state.shape}."
            )


def _zero_state(q: Array, v: Array) -> Array:
    b, _, h, dk = q.shape
    return jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32)


def _dot_precision(*xs: Array):
    # float32 inputs must stay float32 on GPUs too (XLA would otherwise use TF32 there).
    return lax.Precision.HIGHEST if any(x.dtype == jnp.float32 for x in xs) else None


def _reference(q, k, v, slopes, initial_state, chunk_size, segment_ids=None):
    del chunk_size
    return lightning.lightning_reference(q, k, v, slopes, initial_state, segment_ids)


# ----------------------------------------------------------------------------------------------
# blockwise: Lightning Attention-2
# ----------------------------------------------------------------------------------------------
class _ChunkDocuments(NamedTuple):
    """Where packed documents cut the chunks of `lightning_attention_blockwise` (b batch, n chunks
    of c tokens; padding repeats the last document)."""

    same: Array  # [b, 1, n, c, c] bool: tokens i, j of a chunk belong to one document
    sees_state: Array  # [b, 1, n, c, 1] bool: the token is in the entering state's document
    builds_state: Array  # [b, 1, n, c, 1] bool: the token is in the chunk's last document
    passes: Array  # [b, n] bool: no document starts in the chunk, so the entering state goes on


def _chunk_masks(segment_ids: Array, num_chunks: int, chunk_size: int) -> _ChunkDocuments:
    """The chunks' document masks of segment_ids [b, t] (t <= num_chunks * chunk_size)."""
    b, t = segment_ids.shape
    pad = num_chunks * chunk_size - t
    ids = lightning.document_ids(segment_ids)
    entering = jnp.pad(ids, ((0, 0), (1, 0)))[:, :-1]  # document of the token before each token
    if pad:
        ids, entering = (jnp.pad(x, ((0, 0), (0, pad)), mode="edge") for x in (ids, entering))
    idc = ids.reshape(b, num_chunks, chunk_size)
    state_id = entering.reshape(b, num_chunks, chunk_size)[:, :, 0]  # [b, n]
    last_id = idc[:, :, -1]  # [b, n]
    return _ChunkDocuments(same=(idc[:, :, :, None] == idc[:, :, None, :])[:, None],
                           sees_state=(idc == state_id[..., None])[:, None, :, :, None],
                           builds_state=(idc == last_id[..., None])[:, None, :, :, None],
                           passes=last_id == state_id)


def lightning_attention_blockwise(q: Array, k: Array, v: Array, slopes: Array,
                                  initial_state: Optional[Array], chunk_size: int,
                                  segment_ids: Optional[Array] = None) -> Tuple[Array, Array]:
    """The blockwise form of `lightning_attention` (Lightning Attention-2), on checked inputs.

    Per chunk of c tokens, with the state S entering it and len its valid tokens (only the last
    chunk can be short):
        O = ((Q K^T) * D) V + (lambda^(r+1) Q) S,   S <- lambda^len S + (lambda^(len-1-r) K)^T V,
    D the chunk's causal decay mask (lambda^(i-j) for j <= i, else 0) and r a token's row in it. The intra-chunk
    products and every chunk's own K^T V run in parallel; only the state is carried by `lax.scan`.

    With segment_ids the decays are cut at document starts, and nothing else changes: a token sees
    only earlier tokens of its document and the entering state only if it is in that state's
    document, only the chunk's last document builds the leaving state, and a chunk in which a
    document starts passes no state on. Without them none of this is traced.

    Args:
      q, k: [batch, seq, heads, dk]; v: [batch, seq, heads, dv]; slopes: [heads] f32;
      initial_state: [batch, heads, dk, dv] or None; chunk_size: c, any seq is allowed;
      segment_ids: [batch, seq] int or None (`lightning_attention`).
    Returns:
      o: [batch, seq, heads, dv] in v's dtype; final_state: [batch, heads, dk, dv] float32.
    """
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    c = chunk_size
    n = -(-t // c)
    pad = n * c - t
    documents = None if segment_ids is None else _chunk_masks(segment_ids, n, c)
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, widths) for x in (q, k, v))

    def chunks(x):  # [b, n*c, h, d] -> [b, h, n, c, d]
        return x.reshape(b, n, c, h, x.shape[-1]).transpose(0, 3, 1, 2, 4)

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    r = jnp.arange(c)
    # Valid length of each chunk: only the last one can be short. Exponents use it so that padding
    # never decays the state.
    length = jnp.minimum(c, t - jnp.arange(n) * c)  # [n]

    causal = r[None, :] <= r[:, None]
    dist = jnp.where(causal, r[:, None] - r[None, :], 0).astype(jnp.float32)
    intra_decay = jnp.where(causal[None], jnp.exp(-slopes[:, None, None] * dist[None]), 0.0)  # [h,c,c]
    intra_decay = intra_decay[None, :, None]  # [1, h, 1, c, c]
    q_decay = jnp.exp(-slopes[:, None] * (r + 1).astype(jnp.float32)[None, :])  # [h, c]: lambda^(r+1)
    k_exp = (length[:, None] - 1 - r[None, :]).astype(jnp.float32)  # [n, c]
    # [h, n, c]: lambda^(len-1-r), zero at padding
    k_decay = jnp.where(r[None, :] < length[:, None], jnp.exp(-slopes[:, None, None] * k_exp[None]), 0.0)
    # lambda^len - 1, added as a decrement for the reason given in lightning_attention_step.
    chunk_decrement = jnp.expm1(-slopes[:, None] * length[None, :].astype(jnp.float32))  # [h, n]
    q_decayed = qc.astype(jnp.float32) * q_decay[None, :, None, :, None]  # [b, h, n, c, dk]
    k_decayed = kc.astype(jnp.float32) * k_decay[None, ..., None]  # [b, h, n, c, dk]
    passes = None
    if documents is not None:  # the decays above, cut to one document per row of the batch
        intra_decay = jnp.where(documents.same, intra_decay, 0.0)  # [b, h, n, c, c]
        q_decayed = jnp.where(documents.sees_state, q_decayed, 0.0)
        k_decayed = jnp.where(documents.builds_state, k_decayed, 0.0)
        passes = documents.passes.T  # [n, b]

    prec = _dot_precision(q, k, v)
    scores = jnp.einsum("bhncd,bhnjd->bhncj", qc, kc, precision=prec,
                        preferred_element_type=jnp.float32)
    o_intra = jnp.einsum("bhncj,bhnje->bhnce", scores * intra_decay, vc.astype(jnp.float32),
                         precision=prec)
    # Each chunk's own contribution to the state, all chunks at once: (lambda^(len-1-r) K_c)^T V_c.
    kv = jnp.einsum("bhncd,bhnce->bhnde", k_decayed, vc.astype(jnp.float32), precision=lax.Precision.HIGHEST)

    def step(state, inputs):
        kv_n, decrement_n, passes_n = inputs  # [b, h, dk, dv], [h], [b] or None
        entering = state
        if passes_n is not None:  # a chunk in which a document starts passes no state on
            state = jnp.where(passes_n[:, None, None, None], state, 0.0)
        return state + (decrement_n[None, :, None, None] * state + kv_n), entering

    s0 = _zero_state(q, v) if initial_state is None else initial_state.astype(jnp.float32)
    final, before = lax.scan(step, s0, (kv.transpose(2, 0, 1, 3, 4), chunk_decrement.T, passes))
    before = before.transpose(1, 2, 0, 3, 4)  # [b, h, n, dk, dv]: the state entering each chunk
    o_inter = jnp.einsum("bhncd,bhnde->bhnce", q_decayed, before, precision=lax.Precision.HIGHEST)
    o = (o_intra + o_inter).transpose(0, 2, 3, 1, 4).reshape(b, n * c, h, dv)[:, :t]
    return o.astype(v.dtype), final


# ----------------------------------------------------------------------------------------------
# recurrent: one token at a time
# ----------------------------------------------------------------------------------------------
def lightning_attention_step(q: Array, k: Array, v: Array, slopes: Array,
                             state: Array) -> Tuple[Array, Array]:
    """One decoding step: S <- lambda S + k^T v, o = q S.

    Args:
      q, k: [batch, heads, dk]; v: [batch, heads, dv]; slopes: [heads] f32;
      state: [batch, heads, dk, dv] f32.
    Returns:
      o: [batch, heads, dv] in v's dtype, and the new state [batch, heads, dk, dv] f32.
    """
    # lambda = exp(-s) rounds badly in float32 when s is tiny (the last layers' s ~ 4e-8 is below
    # half an ulp of 1), which alters the effective decay by tens of percent. Adding the decrement
    # expm1(-s) S together with k^T v keeps s exact and the rounding unbiased.
    decrement = jnp.expm1(-slopes)[None, :, None, None]
    kv = k.astype(jnp.float32)[..., :, None] * v.astype(jnp.float32)[..., None, :]
    state = state + (decrement * state + kv)
    o = jnp.einsum("bhd,bhde->bhe", q.astype(jnp.float32), state, precision=lax.Precision.HIGHEST)
    return o.astype(v.dtype), state


def _recurrent(q, k, v, slopes, initial_state, chunk_size, segment_ids=None):
    del chunk_size
    s0 = _zero_state(q, v) if initial_state is None else initial_state.astype(jnp.float32)
    time_major = lambda x: jnp.swapaxes(x, 0, 1)  # noqa: E731
    if segment_ids is not None:  # the state resets before each document's first token
        starts = time_major(jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0))))

        def step(state, inputs):
            *qkv_t, start_t = inputs
            state = jnp.where(start_t[:, None, None, None], 0.0, state)
            o_t, state = lightning_attention_step(*qkv_t, slopes, state)
            return state, o_t

        final, o = lax.scan(step, s0, (time_major(q), time_major(k), time_major(v), starts))
        return time_major(o), final

    def step(state, qkv_t):
        o_t, state = lightning_attention_step(*qkv_t, slopes, state)
        return state, o_t

    final, o = lax.scan(step, s0, (time_major(q), time_major(k), time_major(v)))
    return time_major(o), final


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------
def _pallas_kernel(q, k, v, slopes, initial_state, chunk_size, segment_ids=None):
    return lightning.lightning_attention(q, k, v, slopes, initial_state=initial_state,
                                         chunk_size=chunk_size, segment_ids=segment_ids)


_SEQ = ("batch", "length", "heads", "head_dim")
_STATE = ("batch", "heads", None, None)


def _pallas(q, k, v, slopes, initial_state, chunk_size, segment_ids=None):
    # GSPMD cannot split a custom kernel, so under a mesh each device runs it on its own block of
    # batch and heads (the operator mixes neither; the length stays whole here, a split one goes
    # through _context_parallel); without a mesh this is the plain call.
    seq = ("batch", None, "heads", "head_dim")
    kernel = sharding.per_shard(
        lambda q, k, v, slopes, s0, ids: _pallas_kernel(q, k, v, slopes, s0, chunk_size, ids),
        in_axes=(seq, seq, seq, ("heads",), None if initial_state is None else _STATE,
                 None if segment_ids is None else ("batch", None)),
        out_axes=(seq, _STATE))
    return kernel(q, k, v, slopes, initial_state, segment_ids)


_FORMS: Dict[str, Callable] = {
    "reference": _reference,
    "blockwise": lightning_attention_blockwise,
    "recurrent": _recurrent,
    "pallas": _pallas,
}
# What each device runs on its own block inside _context_parallel (already per device).
_LOCAL_FORMS: Dict[str, Callable] = {**_FORMS, "pallas": _pallas_kernel}


# ----------------------------------------------------------------------------------------------
# context parallelism: the sequence split over devices, one exchange of states
# ----------------------------------------------------------------------------------------------
def _context_parallel(form, q, k, v, slopes, initial_state, chunk_size):
    """`form` on each device's slice of the sequence, exact; see the module docstring.

    Runs per device (`sharding.per_shard`) on q, k [b, L, h, dk], v [b, L, h, dv] (L = seq / n, n
    devices along `length`), slopes [h] and the initial state [b, h, dk, dv] (replicated along
    `length`). Returns each slice's o and the final state of the whole sequence, the same on every
    device of the slice's group.
    """
    axes = sharding.mesh_axes("length")
    n = sharding.parts("length")

    def local(q, k, v, slopes, s0):
        length = q.shape[1]
        r = lax.axis_index(axes)
        # This slice's own state from zero: (lambda^(L-1-j) K)^T V, j the position in the slice;
        # operands in the inputs' dtype, float32 accumulation, as the chunked forms do.
        k_exp = jnp.arange(length - 1, -1, -1, dtype=jnp.float32)
        k_decay = jnp.exp(-slopes[None, :] * k_exp[:, None])  # [L, h]
        decayed = (k.astype(jnp.float32) * k_decay[None, :, :, None]).astype(k.dtype)
        own = jnp.einsum("bthd,bthe->bhde", decayed, v.astype(k.dtype), precision=_dot_precision(k, v),
                         preferred_element_type=jnp.float32)
        gathered = lax.all_gather(own, axes, axis=2)  # [b, h, n, dk, dv]: the one exchange
        # Slices are segments of the whole sequence: the kernels' segment combination applies.
        states = lightning.entering_states(gathered, s0, slopes, seq_len=n * length, seg_len=length,
                                           reverse=False)  # [b, h, n + 1, dk, dv]
        o, _ = form(q, k, v, slopes, lax.dynamic_index_in_dim(states, r, axis=2, keepdims=False),
                    chunk_size)
        # Every device combines the final state alike, so it needs no further exchange.
        return o, states[:, :, -1]

    run = sharding.per_shard(local, in_axes=(_SEQ, _SEQ, _SEQ, ("heads",),
                                             None if initial_state is None else _STATE),
                             out_axes=(_SEQ, _STATE))
    return run(q, k, v, slopes, initial_state)


def pallas_compiles() -> bool:
    """Whether Pallas's Triton kernels run compiled on the default backend: an NVIDIA GPU, which
    reports a compute capability (elsewhere they run in interpret mode, far slower than XLA)."""
    return jax.default_backend() == "gpu" and bool(getattr(jax.devices()[0], "compute_capability", None))


def choose_impl(token_mixer: str, impl: str, q: Array, k: Array, v: Array, *, chunk_size: int = 64,
                masked: bool = False) -> str:
    """The form a token mixer runs for these inputs on the default backend: `impl` itself unless it
    is "auto", the one policy behind every mixer's "auto" (forms: `tnllm.config.IMPLS`).

      gla        "pallas" where the kernels run compiled (`pallas_compiles`) and take the inputs'
                 dtypes, head dims and chunk_size; else "blockwise", the fastest XLA form.
      cosformer  "linear" (the quadratic "reference" is for tests).
      softmax    "cudnn" (flash attention) on a GPU for bf16/f16 inputs of a head size it takes (a
                 multiple of 8, at most 128 on every GPU generation) without a `masked` boolean
                 mask; else "xla". cuDNN would take such a mask (left padding, the KV cache) as a
                 dense [batch, heads, q, k] bias, which gives up what flash attention saves; key
                 lengths (padding at the end) are no such mask.

    q, k, v: the mixer's [batch, seq, heads, dim] inputs. Raises a one-sentence error when `impl`
    is no form of `token_mixer`.
    """
    check_impl(impl, token_mixer)
    if impl != "auto":
        return impl
    if token_mixer == "cosformer":
        return "linear"
    if token_mixer == "softmax":
        flash = (jax.default_backend() == "gpu" and jnp.dtype(q.dtype) in (jnp.bfloat16, jnp.float16)
                 and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128 and not masked)
        return "cudnn" if flash else "xla"
    if not pallas_compiles():
        return "blockwise"
    if lightning.supports(q, k, v, chunk_size):  # Hopper's Mosaic kernels need no Triton
        return "pallas"
    if not pallas_kernels.TRITON:
        _warn_no_triton()
    return "blockwise"


@functools.lru_cache(maxsize=None)
def _warn_no_triton() -> None:
    warnings.warn(f"impl='auto' runs the blockwise XLA form of Lightning Attention, not the Pallas "
                  f"kernels: {pallas_kernels.triton_missing()}.", stacklevel=3)


@functools.partial(jax.named_call, name="lightning_attention")
def lightning_attention(q: Array, k: Array, v: Array, slopes: Array, *, impl: str = "auto",
                        chunk_size: int = 64,
                        initial_state: Optional[Array] = None,
                        segment_ids: Optional[Array] = None) -> Tuple[Array, Array]:
    """Causal linear attention with per-head decay lambda = exp(-slopes).

    Args:
      q, k: [batch, seq, heads, dk]; v: [batch, seq, heads, dv] (any float dtype; bf16 on GPU).
      slopes: [heads] float32 decay rates s (not lambda).
      impl: "auto" (`choose_impl`), "reference", "blockwise", "recurrent" or "pallas".
      chunk_size: chunk length of the blockwise and Pallas forms (any seq length is allowed).
      initial_state: optional [batch, heads, dk, dv] float32 state of earlier tokens.
      segment_ids: optional [batch, seq] int, equal for neighbouring tokens of one packed document
        (`pallas_kernels.lightning.document_ids`): no document sees another; initial_state
        continues the first one and the final state is the last one's.
    Returns:
      o: [batch, seq, heads, dv] in v's dtype; final_state: [batch, heads, dk, dv] float32.
    """
    slopes = jnp.asarray(slopes, jnp.float32)
    _check_inputs(q, k, v, slopes, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    impl = choose_impl("gla", impl, q, k, v, chunk_size=chunk_size)
    n = sharding.parts("length")
    split = n > 1 and q.shape[1] % n == 0
    if segment_ids is not None:
        lightning.check_segment_ids(q, segment_ids)
        if split:  # the slices' states would need each document's start to combine
            raise ValueError("Packed documents (segment_ids) do not run split over the context mesh "
                             "axis; set config.mesh.context to 1.")
    elif split:
        return _context_parallel(_LOCAL_FORMS[impl], q, k, v, slopes, initial_state, chunk_size)
    # Without a split length (no mesh, a `context` axis of 1, or a length it does not divide, e.g.
    # the one token `init` traces) the whole sequence runs on each device's batch and heads.
    return _FORMS[impl](q, k, v, slopes, initial_state, chunk_size, segment_ids)
