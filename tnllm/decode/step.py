"""One decoding step through XLA: a token per row through every layer, and the two speed-ups
that only decoding uses, the folded norms and the one-row copies.

TNL's layers (config.model.token_mixer "gla") are written here over the `params` collection,
the paper's layer (`tnllm.model.DecoderLayer`) for one token, so that the step can reorder it:

  folded norms  every SRMSNorm's row scale r is applied after the product that follows the norm,
                (x r) W = (x W) r: the same function, which XLA compiles with the scales fused into
                the kernels that consume the products instead of the norms as kernels of their own
                (12 kernels a layer instead of 14 at batch 64). Rounding differs from the paper's
                order by bf16 rounding only (tests/test_generate.py).
  copies        the products run on `copies` copies of the batch's rows while the recurrence runs
                once. At one row every product is a vector x matrix, which XLA's GPU simplifier
                turns into an elementwise product and a reduction through an HBM temporary for
                weights under 10M elements (gpu_algebraic_simplifier.cc), where a matrix product
                streams the weight once; two rows keep them matrix products.

The other token mixers step through the model itself (`tnllm.model.TransNormerLLM` with the
recurrent form); at one row cosFormer runs on two rows, its state included (`carried_states`),
and the softmax baseline on one, since a second KV cache would double what a step reads.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence, Tuple

import jax
import jax.numpy as jnp

from tnllm.attention import layer_slopes, lightning_attention
from tnllm.config import ModelConfig
from tnllm.model import TransNormerLLM, lrpe, srms_norm, srms_scale

Array = jax.Array


def one_row_copies(cfg: ModelConfig, batch: int) -> int:
    """The copies of its rows that a step through XLA runs for `batch` rows: 2 for one row of a
    recurrent mixer (the module docstring says why), else 1."""
    return 2 if batch == 1 and cfg.token_mixer != "softmax" else 1


def carried_states(cfg: ModelConfig, states: Sequence[Any], copies: int) -> Tuple[Any, ...]:
    """The states a decoding loop carries for `decode_step(..., copies=copies)`: TNL's as they
    are (its recurrence runs once), the other mixers' repeated `copies` times along the batch."""
    if cfg.token_mixer == "gla" or copies == 1:
        return tuple(states)
    return tuple(jax.tree.map(lambda x: jnp.concatenate([x] * copies), states))


def _scaled(x: Array, scale: Array) -> Array:
    """x * scale computed in float32, returned in x's dtype: a folded norm's scale applied after
    the product that follows the norm."""
    return (x.astype(jnp.float32) * scale).astype(x.dtype)


def _product(spec: str, x: Array, kernel: Array, dtype) -> Array:
    """A Linen Einsum/DenseGeneral without bias: both operands in the compute dtype."""
    return jnp.einsum(spec, x.astype(dtype), kernel.astype(dtype))


def layer_step(p, x: Array, positions: Array, state: Array, *, cfg: ModelConfig, layer: int,
               fold_norms: bool) -> Tuple[Array, Array]:
    """Decoder layer `layer` (params p) for one token: x [rows, 1, d_model] in cfg.dtype, whose rows
    repeat the state's rows (rows = copies x batch); positions [batch, 1] int; state [batch, heads,
    dk, head_dim] f32. Returns the new x and state."""
    tm, cm = p["token_mixer"], p["channel_mixer"]
    eps, dtype, batch = cfg.norm_eps, cfg.dtype, state.shape[0]
    scale = srms_scale(x, eps) if fold_norms else None  # [rows, 1, 1]
    qkvu = _product("btd,dqhk->btqhk", x if fold_norms else srms_norm(x, eps),
                    tm["qkvu_proj"]["kernel"], dtype)
    q, k, v, u = (qkvu[:, :, i] for i in range(4))
    if fold_norms:
        # Scaled one by one, each where it is used: the scaled [.., 4, heads, head_dim] output as a
        # whole was written to HBM by a kernel of its own at batch 1.
        q, k, v, u = (_scaled(t, scale[..., None]) for t in (q, k, v, u))
    q, k, v = jax.nn.silu(q[:batch]), jax.nn.silu(k[:batch]), v[:batch]
    if layer in cfg.lrpe_layers:
        q, k = lrpe(q, tm["theta"], positions), lrpe(k, tm["theta"], positions)
    o, state = lightning_attention(q, k, v, layer_slopes(cfg.num_heads, layer, cfg.num_layers),
                                   impl="recurrent", initial_state=state)
    o = jnp.tile(o, (x.shape[0] // batch, 1, 1, 1))
    w = tm["out_proj"]["kernel"]
    if fold_norms:
        y = _scaled(_product("bthk,hkd->btd", o * u, w, dtype),
                    srms_scale(o, eps, axes=(-2, -1))[..., 0])
    else:  # the norm spans all heads together
        y = _product("bthk,hkd->btd", srms_norm(o, eps, axes=(-2, -1)) * u, w, dtype)
    x = x + y
    scale = srms_scale(x, eps) if fold_norms else None
    h = x if fold_norms else srms_norm(x, eps)
    x1 = _product("btd,df->btf", h, cm["l1"]["kernel"], dtype)
    x2 = _product("btd,df->btf", h, cm["l2"]["kernel"], dtype)
    # (x r W1) * (x r W2) = (x W1) * (x W2) r^2
    hidden = _scaled(x1 * x2, jnp.square(scale)) if fold_norms else x1 * x2
    return x + _product("btf,fd->btd", hidden, cm["l3"]["kernel"], dtype), state


def _tnl_step(params, tokens: Array, positions: Array, states: Sequence[Array], *,
              cfg: ModelConfig, fold_norms: bool, copies: int) -> Tuple[Array, Tuple[Array, ...]]:
    table = params["embed_tokens"]["embedding"]
    x = jnp.take(table, jnp.concatenate([tokens] * copies)[:, None], axis=0).astype(cfg.dtype)
    if cfg.scale_embedding:
        x = x * jnp.asarray(cfg.d_model ** 0.5, x.dtype)
    new = []
    for i, state in enumerate(states):
        x, state = layer_step(params[f"layers_{i}"], x, positions[:, None], state, cfg=cfg,
                              layer=i, fold_norms=fold_norms)
        new.append(state)
    head = lambda h: jnp.dot(h.astype(cfg.dtype), table.astype(cfg.dtype).T)  # noqa: E731
    if fold_norms:
        logits = head(x).astype(jnp.float32) * srms_scale(x, cfg.norm_eps)
    else:
        logits = head(srms_norm(x, cfg.norm_eps)).astype(jnp.float32)
    return logits[:tokens.shape[0], 0], tuple(new)


@functools.partial(jax.jit, static_argnames=("cfg", "fold_norms", "copies"))
def decode_step(params, tokens: Array, positions: Array, states: Sequence[Any], *,
                cfg: ModelConfig, fold_norms: bool = False,
                copies: int = 1) -> Tuple[Array, Tuple[Any, ...]]:
    """One token per row through the recurrence S <- lambda S + k^T v, o = q S (softmax: one cache
    slot written, attention over the cache up to the token's position).

    Args:
      params: the model's `params` collection (plain arrays).
      tokens: [batch] int token ids; positions: [batch] int their positions (real tokens before them).
      states: per layer, as `tnllm.model.state_specs(cfg, batch)`, or for mixers other than TNL's
        with `copies` x batch rows (`carried_states`).
      fold_norms: apply TNL's SRMSNorm scales after the products that follow the norms (the
        module docstring); False keeps the paper's order. The other mixers have norms with a
        learned weight or none to fold, and ignore it.
      copies: run the products on this many copies of the rows (`one_row_copies`).
    Returns:
      logits [batch, vocab] f32 for the token after `tokens`, and the new states (as given).
    """
    if cfg.token_mixer == "gla":
        return _tnl_step(params, tokens, positions, states, cfg=cfg, fold_norms=fold_norms,
                         copies=copies)
    model = TransNormerLLM(cfg.replace(attention_impl="recurrent"))
    widen = lambda x: jnp.concatenate([x] * copies)[:, None]  # noqa: E731
    logits, states = model.apply({"params": params}, widen(tokens), positions=widen(positions),
                                 initial_states=tuple(states))
    return logits[:tokens.shape[0], 0], states
