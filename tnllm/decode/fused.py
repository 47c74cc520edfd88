"""TNL's decoding step for one row on fused GEMV kernels: the decoding loop's GPU path at batch 1
(`tnllm.decode.loop.DecodeOptions` chooses it).

At batch 1 a step reads every weight once, and XLA runs TNL's layer as ~13 kernels: four GEMMs
and the norms, gate, GLU product and residual adds between them, each paying a launch and a ramp
(docs/benchmarks.md). Here each product is one `pallas_kernels.decode.gemv` with those operations
fused in, and a layer is five kernels (the LRPE layer runs its recurrence through XLA):

    qkvu  = gemv(x, W_qkvu, norm)                       SRMSNorm(x) W
    o, S  = state_step(qkvu, S)                          SiLUs, S <- lambda S + k^T v in place, o = q S
    x     = gemv(o, W_out, norm, gate u, residual x)    x + (SRMSNorm(o) * u) W_out, u read in qkvu
    g     = gemv(x, W1, W2, norm)                       (SRMSNorm(x) W1) * (SRMSNorm(x) W2)
    x     = gemv(g, W3, residual x)                     x + g W3

On Hopper GPUs the four products run as `pallas_kernels.decode_hopper` kernels instead (the same
fusions; weights streamed by TMA, multiply-adds on wgmma), and so does the output head (SRMSNorm
and the product with the embedding table, read transposed); elsewhere the products run as the
Triton kernels and the head through XLA (`kernels`).

It is the model's function (`tnllm.model`, TNL's "gla" mixer) for one token, written over the
`params` collection instead of through the Linen modules, because the fusions cross the modules'
boundaries. The residual stream and every product's output stay float32 (a few KB a step), where the
model's bf16 code rounds each to bf16; only the normalised rows enter the products in bf16. So it is
closer to the float32 model than the bf16 model is (tests/test_fused_decode.py).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels import decode_hopper
from pallas_kernels.decode import gemv, state_step
from tnllm.attention import layer_slopes, lightning_attention_step
from tnllm.config import ModelConfig
from tnllm.model import lrpe, srms_norm

Array = jax.Array


def unsupported(cfg: ModelConfig, batch: int = 1) -> str:
    """Why `step` cannot decode `batch` rows of `cfg`, or "" when it can."""
    if not pallas_kernels.TRITON:  # the state update and some products are Triton kernels
        return pallas_kernels.triton_missing()
    if batch != 1:
        return f"the batch has {batch} rows; the fused step decodes one"
    if cfg.token_mixer != "gla":
        return (f"config.model.token_mixer is {cfg.token_mixer!r}; the fused step runs TNL's "
                f"'gla' layers only")
    if jnp.dtype(cfg.dtype) != jnp.bfloat16:
        return (f"config.model.dtype is {cfg.dtype!r}; the fused step streams bfloat16 weights, "
                f"set it to 'bfloat16'")
    return ""


KERNELS = ("hopper", "triton")


def check_kernels(kernels: Optional[str], arg: str = "kernels") -> None:
    """Raises for a `kernels` choice (named `arg` in the message) other than KERNELS or None."""
    if kernels not in (None, *KERNELS):
        raise ValueError(f"{arg} is {kernels!r}; choose one of {KERNELS} or None.")


def default_kernels() -> str:
    """The products' kernels where `kernels` is None: "hopper" on a Hopper or later GPU, else
    "triton"."""
    return "hopper" if decode_hopper.available() else "triton"


def layer_step(p, x: Array, positions: Array, state: Array, *, cfg: ModelConfig, layer: int,
               tilings: Optional[Mapping[str, Any]] = None,
               kernels: Optional[str] = None) -> Tuple[Array, Array]:
    """Decoder layer `layer` (params p) for one token: x [1, d_model] f32 -> the same; positions [1]
    int; state [1, heads, dk, head_dim] f32 -> the new state.

    kernels: the products' kernels, "hopper" (`pallas_kernels.decode_hopper`, for each product whose
      shapes it takes; the Triton kernel for the others) or "triton" (`pallas_kernels.decode`);
      None: `default_kernels()`.
    tilings: by the products' fusions ("n", "ngr", "n2", "r": `pallas_kernels.decode.fusions`), a
      `Tiling` (triton) or `HopperTiling` (hopper) each; an absent one is the measured tiling for
      its shape (docs/kernels.md)."""
    check_kernels(kernels)
    kernels = kernels or default_kernels()
    if kernels == "hopper" and not decode_hopper.available():
        raise ValueError("kernels 'hopper' runs on a GPU of compute capability 9.0 or later; use "
                         "'triton' or None here.")
    tm, cm = p["token_mixer"], p["channel_mixer"]
    h, hd, eps, dtype = cfg.num_heads, cfg.head_dim, cfg.norm_eps, cfg.dtype

    def product(fusion, row, w, **kwargs):
        tiling = (tilings or {}).get(fusion)
        if kernels == "hopper" and decode_hopper.supports(row.shape, w.shape, fusion):
            return decode_hopper.gemv(row, w, tiling=tiling, **kwargs)
        return gemv(row, w, tiling=tiling, **kwargs)

    w = tm["qkvu_proj"]["kernel"].astype(dtype)
    qkvu = product("n", x, w.reshape(w.shape[0], -1), norm=True, eps=eps)
    slopes = layer_slopes(h, layer, cfg.num_layers)
    if layer in cfg.lrpe_layers:  # LRPE doubles q and k between the projection and the recurrence
        q, k, v = (qkvu.reshape(1, 1, 4, h, hd)[:, :, i] for i in range(3))  # [1, 1, heads, head_dim]
        q, k = (lrpe(jax.nn.silu(t), tm["theta"], positions[:, None]) for t in (q, k))
        o, state = lightning_attention_step(q[:, 0], k[:, 0], v[:, 0], slopes, state)
    else:
        o, state = state_step(qkvu.reshape(1, 4, h, hd), state, slopes)
    w = tm["out_proj"]["kernel"].astype(dtype)
    x = product("ngr", o.reshape(1, -1), w.reshape(-1, w.shape[-1]), u=qkvu, u_block=3, residual=x,
                norm=True, eps=eps)
    g = product("n2", x, cm["l1"]["kernel"].astype(dtype), w2=cm["l2"]["kernel"].astype(dtype), norm=True,
                eps=eps)
    return product("r", g, cm["l3"]["kernel"].astype(dtype), residual=x), state


def step(params, tokens: Array, positions: Array, states: Sequence[Any], *, cfg: ModelConfig,
         kernels: Optional[str] = None) -> Tuple[Array, Tuple[Any, ...]]:
    """`tnllm.decode.step.decode_step` for one row: tokens [1] int, positions [1] int, states as
    `tnllm.model.state_specs(cfg, 1)`. Returns logits [1, vocab] f32 and the new states.
    kernels: the products' kernels (`layer_step`).

    params: the model's `params` collection with its matmul weights in cfg.dtype
    (`tnllm.generate.serving_params`, as `tnllm.generate.generate` passes them); weights in
    another dtype are converted at every step, which costs a pass over them."""
    if tokens.shape != (1,):
        raise ValueError(f"The fused decoding step takes one row, got tokens of shape {tokens.shape}.")
    reason = unsupported(cfg)
    if reason:
        raise ValueError(f"The fused decoding step cannot run this model: {reason}.")
    table = params["embed_tokens"]["embedding"].astype(cfg.dtype)
    x = jnp.take(table, tokens, axis=0)  # [1, d_model], rounded as the model rounds it
    if cfg.scale_embedding:
        x = x * jnp.asarray(cfg.d_model ** 0.5, x.dtype)
    x = x.astype(jnp.float32)
    check_kernels(kernels)
    kernels = kernels or default_kernels()
    new = []
    for i, state in enumerate(states):
        x, state = layer_step(params[f"layers_{i}"], x, positions, state, cfg=cfg, layer=i,
                              kernels=kernels)
        new.append(state)
    if kernels == "hopper" and decode_hopper.supports(x.shape, table.shape, "n", transposed=True):
        # The head reads the embedding [vocab, d_model] as it is stored: x @ table.T.
        logits = decode_hopper.gemv(x, table, norm=True, eps=cfg.norm_eps, transposed=True)
    else:
        logits = jnp.dot(srms_norm(x, cfg.norm_eps).astype(cfg.dtype), table.T,
                         preferred_element_type=jnp.float32)
    return logits, tuple(new)
