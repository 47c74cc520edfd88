"""Pallas GPU kernels of tnllm: Lightning Attention forward and backward (`lightning`, and
`lightning_hopper` for Hopper), and the decoding step's fused products (`decode`, `decode_hopper`).

`pl_triton` is Pallas's Triton backend, or None in a JAX without it: JAX 0.11 deprecates it and
will remove it. The Triton-lowering kernels then refuse to run (`TRITON` is False) and the
library's "auto" choices fall back to XLA (`tnllm.attention.choose_impl`, `tnllm.decode`).
"""
try:
    from jax.experimental.pallas import triton as pl_triton
except ImportError:
    pl_triton = None

TRITON = pl_triton is not None


def triton_missing() -> str:
    """Why the Triton-lowering kernels cannot run here (a clause, for one-sentence messages)."""
    return ("this JAX has no Pallas Triton backend (JAX 0.11 deprecates it), which "
            "these kernels are written for")
