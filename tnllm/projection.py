"""The attention output projection shared by every token mixer: heads back to the model width."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


class MergeHeads(nn.Module):
    """o [batch, seq, heads, head_dim] -> [batch, seq, features], with kernel [heads, head_dim,
    features] (and bias [features]): the parameters and result of nn.Einsum("bthk,hkd->btd").

    It runs as one [heads * head_dim, features] matrix product: for a single token (a decoding
    step) XLA lowers the two-axis contraction to an elementwise product and a reduction that write
    and read back a [heads, head_dim, features] temporary, 15 µs a layer for the 1B on an H100
    (bench/NOTES.md, 2026-11-27), where a one-axis product is a GEMM.
    """

    features: int
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, o: Array) -> Array:
        heads, head_dim = o.shape[-2:]
        kernel = self.param("kernel", self.kernel_init, (heads, head_dim, self.features),
                            self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        o, kernel, bias = nn.dtypes.promote_dtype(o, kernel, bias, dtype=self.dtype)
        matrix = kernel.reshape(heads * head_dim, self.features)
        if o.shape[-3] == 1:
            # One token per sequence (a decoding step): XLA's simplifier would fold the reshape back
            # into a two-axis contraction and strength-reduce that; the barrier keeps one GEMM.
            matrix = lax.optimization_barrier(matrix)
        y = jnp.dot(o.reshape(*o.shape[:-2], heads * head_dim), matrix)
        return y if bias is None else y + bias
