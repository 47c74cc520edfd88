"""Shared test helpers."""
import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")


def rel_err(a, b) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def random_qkv(key, batch, seq, heads, dk, dv, dtype=jnp.float32):
    """Fresh random q, k, v of the operator's layout; q and k positive like silu features."""
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (batch, seq, heads, dk), jnp.float32) / np.sqrt(dk)
    k = jax.random.normal(kk, (batch, seq, heads, dk), jnp.float32) / np.sqrt(dk)
    v = jax.random.normal(kv, (batch, seq, heads, dv), jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)
