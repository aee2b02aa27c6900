"""Helpers shared by the tests: random inputs and tolerance-aware comparisons."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Tolerances against the float64 reference, per input dtype.
RTOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-2, jnp.float64: 1e-12}


def assert_close(actual, expected, rtol, err_msg="", atol=0.0):
    """Elementwise ``|a - e| <= rtol · (|e| + max|e|) + atol``: relative to each element
    and to the array's scale (so entries near zero are judged against the array);
    ``atol`` covers arrays that are zero in exact arithmetic."""
    actual = np.asarray(jnp.asarray(actual).astype(jnp.float64 if jnp.asarray(actual).dtype == jnp.float64 else jnp.float32), np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape} {err_msg}"
    assert np.all(np.isfinite(actual)), f"non-finite values {err_msg}"
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale + atol, err_msg=err_msg)


def qkv(seed, B, T, S, N, K, H, Hv=None, dtype=jnp.float32, unbatched=False):
    """Random query [B, T, N, H], key [B, S, K, H], value [B, S, K, Hv]."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    Hv = H if Hv is None else Hv
    lead = () if unbatched else (B,)
    q = jax.random.normal(kq, lead + (T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, lead + (S, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, lead + (S, K, Hv), jnp.float32).astype(dtype)
    return q, k, v
