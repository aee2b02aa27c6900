"""The one-head step functions against the float64 reference and their numerics promises."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jattn import ops
from tests.checks import RTOL, assert_close
from tests.reference import reference_attention

T, S, H, Hv = 5, 7, 3, 4  # distinct odd sizes: a swapped axis fails


def _one_head_inputs(seed, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(kq, (T, H)).astype(dtype),
        jax.random.normal(kk, (S, H)).astype(dtype),
        jax.random.normal(kv, (S, Hv)).astype(dtype),
    )


def _reference_one_head(q, k, v, **kwargs):
    out, weights, lse = reference_attention(
        np.asarray(q, np.float64)[None, :, None], np.asarray(k, np.float64)[None, :, None],
        np.asarray(v, np.float64)[None, :, None], **kwargs,
    )
    return out[0, :, 0], weights[0, 0], lse[0, :, 0]


def test_scores_are_scaled_dot_products():
    q, k, _ = _one_head_inputs(0)
    scores = ops.attention_scores(q, k)
    assert scores.shape == (T, S) and scores.dtype == jnp.float32
    expected = np.asarray(q, np.float64) @ np.asarray(k, np.float64).T / np.sqrt(H)
    assert_close(scores, expected, 1e-6)


def test_score_mod_sees_head_and_global_indices():
    q, k, _ = _one_head_inputs(1)
    seen = ops.attention_scores(
        q, k, score_mod=lambda s, h, i, j: 0 * s + 100 * h + 10 * i + j,
        head=3, q_idx=jnp.arange(T) + 20, kv_idx=jnp.arange(S) + 2,
    )
    expected = 300 + 10 * (np.arange(T)[:, None] + 20) + (np.arange(S)[None, :] + 2)
    np.testing.assert_array_equal(np.asarray(seen), expected)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_head_attention_matches_reference(dtype):
    q, k, v = _one_head_inputs(2, dtype)
    mask = np.random.default_rng(0).random((T, S)) < 0.7
    mask[:, 0] = True
    out, weights = ops.head_attention(q, k, v, mask=jnp.asarray(mask), scale=0.4)
    ref_out, ref_w, _ = _reference_one_head(q, k, v, mask=mask[None, None], scale=0.4)
    assert out.dtype == dtype and weights.dtype == jnp.float32
    assert_close(out, ref_out, RTOL[dtype])
    assert_close(weights, ref_w, RTOL[dtype])


def test_fully_masked_row_gives_zeros_and_zero_gradient():
    q, k, v = _one_head_inputs(3)
    mask = jnp.ones((T, S), bool).at[2].set(False)

    def loss(q, k, v):
        out, _ = ops.head_attention(q, k, v, mask=mask)
        return jnp.sum(out * jnp.arange(1.0, Hv + 1))

    out, weights = ops.head_attention(q, k, v, mask=mask)
    np.testing.assert_array_equal(np.asarray(out[2]), 0.0)
    np.testing.assert_array_equal(np.asarray(weights[2]), 0.0)
    dq, dk, dv = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for g in (dq, dk, dv):
        assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_array_equal(np.asarray(dq[2]), 0.0)
    # Other rows still get gradient.
    assert np.abs(np.asarray(dq[0])).sum() > 0


def test_all_rows_masked_no_nan():
    q, k, v = _one_head_inputs(4)
    mask = jnp.zeros((T, S), bool)
    grads = jax.grad(lambda q: ops.head_attention(q, k, v, mask=mask)[0].sum())(q)
    np.testing.assert_array_equal(np.asarray(grads), 0.0)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_huge_logits_stay_finite(dtype):
    q = jnp.full((T, H), 100.0, dtype)
    k = jnp.full((S, H), 100.0, dtype)  # q·k = 3e4 per entry -> logits ~1.7e4
    v = jnp.ones((S, Hv), dtype)
    out, weights = ops.head_attention(q, k, v, mask=lambda i, j: j <= i)
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    np.testing.assert_allclose(np.asarray(weights.sum(-1)), 1.0, rtol=1e-6)
    grads = jax.grad(lambda q: ops.head_attention(q, k, v)[0].astype(jnp.float32).sum())(q)
    assert np.all(np.isfinite(np.asarray(grads, np.float32)))


def test_check_grads_float64():
    with jax.enable_x64(True):
        q, k, v = (x.astype(jnp.float64) for x in _one_head_inputs(5))
        mask = jnp.asarray(np.random.default_rng(1).random((T, S)) < 0.6).at[:, 1].set(True)

        def f(q, k, v):
            return ops.head_attention(q, k, v, mask=mask, score_mod=lambda s, h, i, j: 3 * jnp.tanh(s / 3))[0]

        check_grads(f, (q, k, v), order=2, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)


def test_step_functions_compose_to_reference_in_float64():
    with jax.enable_x64(True):
        q, k, v = (x.astype(jnp.float64) for x in _one_head_inputs(6))
        scores = ops.attention_scores(q, k, bias=jnp.linspace(-1, 1, S, dtype=jnp.float64))
        assert scores.dtype == jnp.float64
        weights = ops.attention_weights(scores, lambda i, j: j <= i + 1)
        out = ops.context_vectors(weights, v)
        bias = np.broadcast_to(np.linspace(-1, 1, S), (T, S))
        ref_out, ref_w, ref_lse = _reference_one_head(q, k, v, bias=bias[None, None], is_causal=True, query_offset=1)
        np.testing.assert_allclose(np.asarray(out), ref_out, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(weights), ref_w, rtol=1e-12, atol=1e-12)
        lse = ops.log_normalizer(scores, ops.evaluate_mask(lambda i, j: j <= i + 1, (T, S)))
        np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=1e-12)


def test_vmap_over_heads_equals_python_loop():
    keys = jax.random.split(jax.random.key(7), 3)
    N = 3
    q = jax.random.normal(keys[0], (N, T, H))
    k = jax.random.normal(keys[1], (N, S, H))
    v = jax.random.normal(keys[2], (N, S, Hv))
    alibi = lambda s, h, i, j: s - (h + 1) * 0.1 * jnp.abs(i - j)
    fn = lambda q, k, v, h: ops.head_attention(q, k, v, score_mod=alibi, head=h)[0]
    batched = jax.vmap(fn)(q, k, v, jnp.arange(N))
    looped = jnp.stack([fn(q[n], k[n], v[n], n) for n in range(N)])
    np.testing.assert_allclose(np.asarray(batched), np.asarray(looped), rtol=1e-6, atol=1e-7)


def test_jit_equals_no_jit():
    q, k, v = _one_head_inputs(8)
    fn = lambda q, k, v: ops.head_attention(q, k, v, mask=lambda i, j: (i + j) % 3 != 0)[0]
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(q, k, v)), np.asarray(fn(q, k, v)), rtol=1e-6, atol=1e-7)


def test_dropout_keep_rate_and_independence():
    rate = 0.3
    keep = ops.dropout_keep_mask(jax.random.key(9), rate, jnp.arange(512)[:, None], jnp.arange(512)[None, :])
    keep = np.asarray(keep)
    # 262144 Bernoulli(0.7) draws: the mean is within 5 standard deviations of 0.7.
    assert abs(keep.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / keep.size)
    # Neighbouring rows / columns are not copies of each other.
    assert (keep[1:] != keep[:-1]).mean() > 0.35 and (keep[:, 1:] != keep[:, :-1]).mean() > 0.35
    other = np.asarray(ops.dropout_keep_mask(jax.random.key(10), rate, jnp.arange(512)[:, None], jnp.arange(512)[None, :]))
    assert (keep != other).mean() > 0.35


def test_dropout_tiles_reproduce_the_full_grid():
    key = jax.random.key(11)
    full = ops.dropout_keep_mask(key, 0.5, jnp.arange(8)[:, None], jnp.arange(6)[None, :])
    tile = ops.dropout_keep_mask(key, 0.5, jnp.arange(4, 8)[:, None], jnp.arange(3, 6)[None, :])
    np.testing.assert_array_equal(np.asarray(tile), np.asarray(full[4:, 3:]))


def test_dropout_preserves_expectation():
    weights = jnp.full((256, 256), 1.0 / 256)
    dropped = ops.dropout_weights(weights, jax.random.key(12), 0.25)
    np.testing.assert_allclose(float(dropped.sum(-1).mean()), 1.0, rtol=0.01)
    kept = np.asarray(dropped)[np.asarray(dropped) > 0]
    np.testing.assert_allclose(kept, (1.0 / 256) / 0.75, rtol=1e-6)


def test_step_function_shape_errors_name_the_problem():
    q, k, v = _one_head_inputs(13)
    with pytest.raises(ValueError, match="head dim"):
        ops.attention_scores(q, k[:, :2])
    with pytest.raises(ValueError, match=r"\[T, H\]"):
        ops.attention_scores(q[None], k)
    with pytest.raises(ValueError, match="weights must be"):
        ops.context_vectors(jnp.ones((T, S + 1)), v)
    with pytest.raises(TypeError, match="boolean"):
        ops.attention_weights(jnp.zeros((T, S)), jnp.ones((T, S)))
    with pytest.raises(ValueError, match="dropout_key"):
        ops.head_attention(q, k, v, dropout_rate=0.5)
