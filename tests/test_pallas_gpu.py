"""The Pallas backend compiled by Triton on a GPU, against the float64 reference
(outputs) and float32 dense (gradients); the flex kernels (score_mod, mask_mod, bias,
dropout) against float32 dense.  Skipped, with the reason, without a GPU;
tests/test_pallas.py runs the same kernels through the interpreter everywhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn.attention import make_call
from jattn.backends import dense
from tests.checks import assert_close, qkv
from tests.reference import reference_attention

pytestmark = pytest.mark.gpu


def _segments(B, L, seed):
    return np.sort(np.random.default_rng(seed).integers(0, 4, (B, L)), axis=1).astype(np.int32)


CASES = {
    # name: (B, T, S, N, K, H), jattn kwargs, reference kwargs
    "causal_gqa_ragged": ((2, 1500, 1500, 8, 2, 128), {"is_causal": True}, {"is_causal": True}),
    "softcap_window_offset": (
        (1, 700, 1200, 4, 4, 64),
        {"is_causal": True, "local_window_size": (256, 0), "query_offset": 500, "logits_soft_cap": 30.0},
        {"is_causal": True, "window": (256, 0), "query_offset": 500, "softcap": 30.0},
    ),
    "segments_and_lengths": (
        (2, 1024, 1024, 4, 1, 128),
        {"query_segment_ids": _segments(2, 1024, 0), "key_value_segment_ids": _segments(2, 1024, 0),
         "query_seq_lengths": np.array([1024, 900]), "key_value_seq_lengths": np.array([1024, 300])},
        {"q_segments": _segments(2, 1024, 0), "kv_segments": _segments(2, 1024, 0),
         "q_lengths": [1024, 900], "kv_lengths": [1024, 300]},
    ),
    "head_dim_80_unmasked": ((1, 512, 640, 2, 2, 80), {}, {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_pallas_on_gpu_matches_reference_and_dense(name):
    dims, ours, ref = CASES[name]
    ours = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in ours.items()}
    q, k, v = qkv(1, *dims, dtype=jnp.bfloat16)
    assert jattn.explain(q, k, v, implementation="pallas", **ours).backend == "pallas"
    attend = jax.jit(lambda q, k, v: jattn.dot_product_attention(q, k, v, implementation="pallas", **ours))
    out = attend(q, k, v)
    ref_out, _, _ = reference_attention(q, k, v, **ref)
    assert_close(out, ref_out, 2e-2, name)

    def loss(run, dtype):
        def f(q, k, v):
            o = run(make_call(*(x.astype(dtype) for x in (q, k, v)), **ours))[0]
            return jnp.sum(o.astype(jnp.float32) * jnp.cos(jnp.arange(o.shape[-1], dtype=jnp.float32)))
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))

    from jattn.backends import pallas
    grads = loss(lambda c: pallas.run(c, "gpu"), jnp.bfloat16)(q, k, v)
    want = loss(lambda c: dense.run(c, "gpu"), jnp.float32)(q, k, v)
    for g_name, g, w in zip("qkv", grads, want):
        assert bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))
        assert_close(g.astype(jnp.float32), w, 5e-2, f"{name} d{g_name}")


def _documents(L, seed):
    """Document ids of a packed sequence (sorted), closed over by a mask_mod."""
    return jnp.asarray(np.sort(np.random.default_rng(seed).integers(0, 5, L)).astype(np.int32))


_DOCS = _documents(1024, 3)
_TABLE = jnp.linspace(-1.0, 1.0, 8 * 33).reshape(8, 33)

FLEX_CASES = {
    # name: (B, T, S, N, K, H), jattn kwargs (compared with float32 dense on the same GPU)
    "alibi_causal": ((2, 1024, 1024, 8, 2, 128), {"score_mod": jattn.score_mods.ALiBi(num_heads=8), "is_causal": True}),
    "relative_table_softcap": ((1, 1024, 1024, 8, 8, 64), {
        "score_mod": lambda s, h, i, j: s + _TABLE[h, jnp.clip(j - i, -16, 16) + 16], "logits_soft_cap": 30.0}),
    "document_mask_mod": ((1, 1024, 1024, 8, 4, 128), {"mask": lambda i, j: _DOCS[i] == _DOCS[j], "is_causal": True}),
    "bias_prefix_traced": ((2, 700, 900, 4, 4, 64), {
        "bias": jax.random.normal(jax.random.key(4), (1, 4, 700, 900), jnp.bfloat16),
        "mask": jattn.masks.PrefixLM(jnp.array([100, 600]))}),
    "dropout_causal": ((1, 1024, 1024, 8, 8, 128), {
        "is_causal": True, "dropout_rate": 0.1, "dropout_rng": jax.random.key(5)}),
}


@pytest.mark.parametrize("name", list(FLEX_CASES))
def test_pallas_flex_on_gpu_matches_dense(name):
    """Flex attention compiled by Triton: output and gradients against float32 dense
    (the same dropout pattern: both draw it from the per-element hash)."""
    dims, ours = FLEX_CASES[name]
    q, k, v = qkv(2, *dims, dtype=jnp.bfloat16)
    assert jattn.explain(q, k, v, **ours).backend == "pallas", str(jattn.explain(q, k, v, **ours))
    from jattn.backends import pallas

    def loss(run, dtype):
        def f(q, k, v):
            o = run(make_call(*(x.astype(dtype) for x in (q, k, v)), **ours))[0]
            return jnp.sum(o.astype(jnp.float32) * jnp.cos(jnp.arange(o.shape[-1], dtype=jnp.float32))), o
        return jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))

    grads, out = loss(lambda c: pallas.run(c, "gpu"), jnp.bfloat16)(q, k, v)
    want, want_out = loss(lambda c: dense.run(c, "gpu"), jnp.float32)(q, k, v)
    assert_close(out.astype(jnp.float32), want_out, 2e-2, name)
    for g_name, g, w in zip("qkv", grads, want):
        assert bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))
        assert_close(g.astype(jnp.float32), w, 5e-2, f"{name} d{g_name}")
