"""RoPE (`jattn.positional.apply_rope`) against a float64 NumPy reference written with
complex numbers, and its defining properties."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from jattn.positional import alibi_slopes, apply_rope, rope_frequencies


def numpy_rope(x, positions, base):
    """Pair (x_i, x_{i+H/2}) as the complex number x_i + i·x_{i+H/2}, times e^{i·p·θ_i}."""
    x = np.asarray(x, np.float64)
    half = x.shape[-1] // 2
    theta = base ** (-2.0 * np.arange(half) / x.shape[-1])
    z = x[..., :half] + 1j * x[..., half:]
    p = np.asarray(positions, np.float64)[..., None, None]            # [..., T, 1, 1]
    z = z * np.exp(1j * p * theta)
    return np.concatenate([z.real, z.imag], axis=-1)


_rope = jax.jit(apply_rope, static_argnames="base")


@settings(max_examples=6)
@given(
    B=st.integers(1, 3), T=st.integers(1, 6), N=st.integers(1, 3),
    half=st.integers(1, 4), base=st.sampled_from([100.0, 10000.0, 500000.0]),
    seed=st.integers(0, 2**16),
)
def test_matches_numpy_reference_float64(B, T, N, half, base, seed):
    rng = np.random.default_rng(seed)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((B, T, N, 2 * half)), jnp.float64)
        positions = jnp.asarray(rng.integers(0, 1000, (B, T)))
        got = _rope(x, positions, base=base)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, numpy_rope(x, positions, base), rtol=1e-12, atol=1e-12)


def test_float32_and_bfloat16_keep_dtype_and_match():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 5, 3, 8)), jnp.float32)
    positions = jnp.asarray(rng.integers(0, 50, (2, 5)))
    got = _rope(x, positions)
    assert got.dtype == jnp.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, numpy_rope(x, positions, 10000.0), rtol=1e-5, atol=1e-5)
    got16 = _rope(x.astype(jnp.bfloat16), positions)
    assert got16.dtype == jnp.bfloat16
    np.testing.assert_allclose(got16.astype(jnp.float32), got, rtol=2e-2, atol=2e-2)


def test_unbatched_and_broadcast_positions():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((5, 3, 4)), jnp.float32)  # [T, N, H]
    positions = jnp.arange(5) + 3
    np.testing.assert_allclose(apply_rope(x, positions), numpy_rope(x, positions, 1e4), rtol=1e-5, atol=1e-6)
    xb = jnp.stack([x, 2 * x])                                          # [B, T, N, H]
    got = apply_rope(xb, positions)                                     # [T] broadcasts over B
    np.testing.assert_allclose(got[1], 2 * apply_rope(x, positions), rtol=1e-5, atol=1e-6)


def test_position_zero_is_identity_and_norms_are_kept():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, 3, 6)), jnp.float32)
    np.testing.assert_allclose(apply_rope(x, jnp.zeros((2, 5), jnp.int32)), x, rtol=0, atol=0)
    y = apply_rope(x, jnp.full((2, 5), 37))
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    assert not np.allclose(y, x, atol=1e-3)


def test_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32)

    def score(p, s):
        return float(jnp.sum(_rope(q, jnp.array([[p]])) * _rope(k, jnp.array([[s]]))))

    np.testing.assert_allclose(score(7, 3), score(107, 103), rtol=1e-4)
    np.testing.assert_allclose(score(0, 5), score(20, 25), rtol=1e-4)
    assert abs(score(7, 3) - score(3, 7)) > 1e-3      # but not symmetric in p - s


def test_frequencies():
    np.testing.assert_allclose(rope_frequencies(6, base=64.0), [1.0, 0.25, 1 / 16], rtol=1e-15)
    assert alibi_slopes(2) == [0.0625, 0.00390625]     # unchanged neighbour


@pytest.mark.parametrize(
    "x_shape, positions, match",
    [
        ((2, 5, 3, 5), np.zeros((2, 5), np.int32), "H=5"),
        ((2, 5, 3, 4), np.zeros((2, 4), np.int32), r"positions has shape \(2, 4\)"),
        ((2, 5, 3, 4), np.zeros((2, 5), np.float32), "positions must be integers"),
        ((5, 4), np.zeros((5,), np.int32), "rank >= 3"),
    ],
)
def test_bad_input(x_shape, positions, match):
    with pytest.raises((ValueError, TypeError), match=match):
        apply_rope(jnp.zeros(x_shape), positions)


def test_bad_frequencies_arguments():
    with pytest.raises(ValueError, match="head_dim must be even"):
        rope_frequencies(7)
    with pytest.raises(ValueError, match="base must be a number > 1"):
        rope_frequencies(8, base=1.0)
