"""The cuDNN backend against dense on a GPU (skipped elsewhere, with the reason)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from tests.checks import assert_close, qkv

pytestmark = pytest.mark.gpu

CASES = {
    "plain": {},
    "causal": {"is_causal": True},
    "lengths_with_empty_row": {"query_seq_lengths": jnp.array([256, 200], jnp.int32),
                               "key_value_seq_lengths": jnp.array([0, 130], jnp.int32)},
    "window_causal": {"is_causal": True, "local_window_size": (64, 0)},
    "bias": {"bias": "bias"},
}


@pytest.mark.parametrize("name", list(CASES))
def test_cudnn_matches_dense_outputs_and_gradients(name):
    kwargs = dict(CASES[name])
    q, k, v = qkv(0, 2, 256, 256, 8, 2, 64, dtype=jnp.bfloat16)
    if kwargs.get("bias") == "bias":
        kwargs["bias"] = jax.random.normal(jax.random.key(1), (1, 8, 256, 256)).astype(jnp.bfloat16)
    assert jattn.explain(q, k, v, **kwargs).backend == "cudnn"

    def loss(impl):
        return lambda q, k, v: jnp.sum(
            jattn.dot_product_attention(q, k, v, implementation=impl, **kwargs).astype(jnp.float32) ** 2
        )

    out_c = jax.jit(lambda q, k, v: jattn.dot_product_attention(q, k, v, implementation="cudnn", **kwargs))(q, k, v)
    out_d = jax.jit(lambda q, k, v: jattn.dot_product_attention(q, k, v, implementation="dense", **kwargs))(q, k, v)
    assert_close(out_c.astype(jnp.float32), out_d.astype(jnp.float32), 2e-2, name)
    if name == "lengths_with_empty_row":
        np.testing.assert_array_equal(np.asarray(out_c[0], np.float32), 0.0)  # no key at all
        np.testing.assert_array_equal(np.asarray(out_c[1, 200:], np.float32), 0.0)  # padded rows
    g_c = jax.jit(jax.grad(loss("cudnn"), argnums=(0, 1, 2)))(q, k, v)
    g_d = jax.jit(jax.grad(loss("dense"), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_c, g_d):
        assert np.all(np.isfinite(np.asarray(a, np.float32)))
        assert_close(a.astype(jnp.float32), b.astype(jnp.float32), 3e-2, name)
