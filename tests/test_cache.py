"""The KV cache: `jattn.cache.KVCache`, `decode_attention`, and decoding with the
modules (ragged prefill + token-by-token steps == one full forward pass, under jit)."""

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from tests.reference import reference_attention

import jattn.nnx
from jattn.cache import KVCache, decode_attention


def normal(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def filled_cache(rng, lengths, M=8, K=2, H=3, Hv=5):
    """A cache whose every slot holds random numbers (so stale slots are visible)."""
    B = len(lengths)
    return KVCache(
        keys=normal(rng, (B, M, K, H)), values=normal(rng, (B, M, K, Hv)),
        lengths=jnp.asarray(lengths, jnp.int32),
    )


# --- the pytree --------------------------------------------------------------------


def test_create_shapes_and_pytree():
    cache = KVCache.create(batch_size=3, max_length=7, num_kv_heads=2, head_dim=5,
                           dtype=jnp.bfloat16, value_head_dim=3)
    assert cache.keys.shape == (3, 7, 2, 5) and cache.values.shape == (3, 7, 2, 3)
    assert cache.keys.dtype == jnp.bfloat16 and cache.lengths.dtype == jnp.int32
    assert (cache.capacity, cache.batch_size, cache.num_kv_heads, cache.head_dim,
            cache.value_head_dim) == (7, 3, 2, 5, 3)
    np.testing.assert_array_equal(cache.lengths, [0, 0, 0])
    assert len(jax.tree.leaves(cache)) == 3
    moved = jax.jit(lambda c: jax.tree.map(lambda x: x + 1, c))(cache)
    assert isinstance(moved, KVCache)
    np.testing.assert_array_equal(moved.lengths, [1, 1, 1])
    np.testing.assert_array_equal(moved.reset().lengths, [0, 0, 0])


def test_update_writes_after_each_length_and_skips_padding():
    rng = np.random.default_rng(10)
    cache = filled_cache(rng, [2, 0, 3])
    new_k, new_v = normal(rng, (3, 3, 2, 3)), normal(rng, (3, 3, 2, 5))
    num_new = np.array([3, 1, 0])
    got = cache.update(new_k, new_v, num_new=jnp.asarray(num_new))

    want_k, want_v = np.array(cache.keys), np.array(cache.values)
    for b, length in enumerate([2, 0, 3]):
        for t in range(num_new[b]):
            want_k[b, length + t] = new_k[b, t]
            want_v[b, length + t] = new_v[b, t]
    np.testing.assert_array_equal(got.keys, want_k)
    np.testing.assert_array_equal(got.values, want_v)
    np.testing.assert_array_equal(got.lengths, [5, 1, 3])
    # Default num_new: all T tokens.
    np.testing.assert_array_equal(cache.update(new_k, new_v).lengths, [5, 3, 6])


@pytest.mark.parametrize("window", [None, (2, 0)])
def test_decode_attention_matches_reference(window):
    rng = np.random.default_rng(11 if window is None else 12)
    before = np.array([3, 1, 4])
    cache = filled_cache(rng, before)
    B, T, N = 3, 2, 4
    q = normal(rng, (B, T, N, 3))
    new_k, new_v = normal(rng, (B, T, 2, 3)), normal(rng, (B, T, 2, 5))
    num_new = np.array([2, 1, 2])
    out, new_cache, weights = decode_attention(
        q, new_k, new_v, cache, num_new=jnp.asarray(num_new), local_window_size=window,
        return_weights=True,
    )
    assert out.shape == (B, T, N, 5) and weights.shape == (B, N, T, 8)
    want, want_w, _ = reference_attention(
        q, new_cache.keys, new_cache.values, is_causal=True, query_offset=before,
        kv_lengths=before + num_new, q_lengths=num_new, window=window,
    )
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weights, want_w, rtol=1e-5, atol=1e-6)
    # Query t of sequence b sits at position before[b] + t: no weight past it.
    for b in range(B):
        for t in range(num_new[b]):
            np.testing.assert_array_equal(weights[b, :, t, before[b] + t + 1:], 0.0)
    np.testing.assert_array_equal(out[1, 1], 0.0)        # a padding row


def test_overflow_raises_eagerly():
    rng = np.random.default_rng(13)
    cache = filled_cache(rng, [6, 2], M=8)
    k, v = normal(rng, (2, 3, 2, 3)), normal(rng, (2, 3, 2, 5))
    with pytest.raises(ValueError, match=r"sequence\(s\) \[0\] would hold \[9\] tokens.*capacity \(max_length\) is 8"):
        cache.update(k, v)
    with pytest.raises(ValueError, match="capacity"):
        decode_attention(normal(rng, (2, 3, 4, 3)), k, v, cache)
    # Fits when only the real tokens count.
    assert cache.update(k, v, num_new=jnp.array([2, 3])).lengths.tolist() == [8, 5]


def test_overflow_under_jit_is_nan_and_reported():
    rng = np.random.default_rng(14)
    cache = filled_cache(rng, [6, 2], M=8)
    q, k, v = normal(rng, (2, 3, 4, 3)), normal(rng, (2, 3, 2, 3)), normal(rng, (2, 3, 2, 5))
    out, new_cache = jax.jit(decode_attention)(q, k, v, cache)
    np.testing.assert_array_equal(new_cache.lengths, [9, 5])
    np.testing.assert_array_equal(new_cache.overflowed, [True, False])
    assert np.isnan(out[0, 2]).all()                           # position 8: did not fit
    assert np.isfinite(out[0, :2]).all() and np.isfinite(out[1]).all()
    np.testing.assert_array_equal(new_cache.keys[0, :6], cache.keys[0, :6])   # never clobbered
    np.testing.assert_array_equal(new_cache.keys[0, 6:], k[0, :2])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda c, r: c.update(normal(r, (2, 1, 3, 3)), normal(r, (2, 1, 2, 5))), r"new_keys: got shape \(2, 1, 3, 3\); expected \[B, T, K, H\] = \(2, T, 2, 3\)"),
        (lambda c, r: c.update(normal(r, (2, 1, 2, 3)), normal(r, (2, 1, 2, 4))), r"new_values: got shape \(2, 1, 2, 4\); expected"),
        (lambda c, r: c.update(normal(r, (2, 2, 2, 3)), normal(r, (2, 2, 2, 5)), num_new=jnp.array([1, 1, 1])), r"num_new: got shape \(3,\)"),
        (lambda c, r: c.update(normal(r, (2, 2, 2, 3)), normal(r, (2, 2, 2, 5)), num_new=jnp.array([3, 1])), r"num_new: got \[3, 1\]; expected counts in \[0, 2\]"),
        (lambda c, r: decode_attention(normal(r, (2, 1, 4, 3)), normal(r, (2, 1, 2, 3)), normal(r, (2, 1, 2, 5)), c.keys), "cache: expected a jattn.cache.KVCache"),
        (lambda c, r: KVCache.create(2, 0, 1, 4), "max_length must be a positive int"),
    ],
)
def test_bad_input(call, match):
    rng = np.random.default_rng(15)
    with pytest.raises((ValueError, TypeError), match=match):
        call(filled_cache(rng, [1, 1]), rng)


# --- decoding with the modules -----------------------------------------------------

D, N, K, H = 15, 6, 3, 4          # GQA: G = 2; head_dim given (15 is not a multiple of 6)
PROMPTS = np.array([5, 2, 3])     # ragged prompts, padded to T = 5
STEPS = 3
M = 10                            # fixed cache capacity (>= 5 + 3)


@functools.lru_cache(maxsize=None)
def decoder(window):
    layer = jattn.nnx.SelfAttention(
        D, N, num_kv_heads=K, head_dim=H, use_rope=True, rope_base=50.0, qk_norm=True,
        use_bias=True, rngs=nnx.Rngs(20),
    )
    # Non-zero biases and norm scales, so that every parameter matters.
    state = nnx.state(layer, nnx.Param)
    rng = np.random.default_rng(21)
    state = jax.tree.map(lambda p: p + 0.1 * normal(rng, p.shape), state)
    graphdef = nnx.graphdef(layer)

    @jax.jit
    def full(state, x):
        return nnx.merge(graphdef, state)(x, local_window_size=window)

    @jax.jit
    def step(state, x, cache, lengths):
        out, cache, weights = nnx.merge(graphdef, state)(
            x, cache=cache, lengths=lengths, local_window_size=window, return_weights=True)
        return out, cache, weights

    return graphdef, state, full, step


@pytest.mark.parametrize("window", [None, (2, 0)])
def test_ragged_prefill_then_decode_equals_full_forward_under_jit(window):
    _, state, full, step = decoder(window)
    rng = np.random.default_rng(22)
    B, total = len(PROMPTS), PROMPTS.max() + STEPS
    seqs = normal(rng, (B, total, D))            # sequence b: seqs[b, :PROMPTS[b] + STEPS]
    prompt = jnp.where(np.arange(5)[None, :, None] < PROMPTS[:, None, None], seqs[:, :5], 99.0)

    cache = KVCache.create(B, M, K, H)
    out_p, cache, _ = step(state, prompt, cache, jnp.asarray(PROMPTS))
    np.testing.assert_array_equal(cache.lengths, PROMPTS)
    outs = [[out_p[b, t] for t in range(PROMPTS[b])] for b in range(B)]
    for s in range(STEPS):
        token = jnp.stack([seqs[b, PROMPTS[b] + s] for b in range(B)])[:, None]
        positions_before = np.asarray(cache.lengths)
        out_s, cache, weights = step(state, token, cache, None)
        for b in range(B):
            outs[b].append(out_s[b, 0])
            # The new token at position p attends cache slots <= p only.
            np.testing.assert_array_equal(weights[b, :, 0, positions_before[b] + 1:], 0.0)
            np.testing.assert_allclose(weights[b, :, 0].sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(cache.lengths, PROMPTS + STEPS)

    # The full pass sees each sequence padded at its end, which causal attention ignores.
    want = full(state, seqs)
    for b in range(B):
        np.testing.assert_allclose(jnp.stack(outs[b]), want[b, : PROMPTS[b] + STEPS], rtol=1e-5, atol=1e-5)
    assert step._cache_size() == 2               # one prefill and one decode compilation


@settings(max_examples=8)
@given(
    first=st.lists(st.integers(0, 5), min_size=3, max_size=3),
    second=st.lists(st.integers(0, 3), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_two_ragged_chunks_equal_full_forward(first, second, seed):
    """Any split of each sequence into two padded chunks (a prefill of up to 5 tokens,
    then up to 3 more in one call) gives the full pass's outputs.  Shapes are fixed, so
    the compiled functions are reused across examples."""
    _, state, full, step = decoder(None)
    first, second = np.array(first), np.array(second)
    rng = np.random.default_rng(seed)
    seqs = normal(rng, (3, 8, D))
    chunk1 = seqs[:, :5]
    chunk2 = jnp.stack([jnp.roll(seqs[b], -int(first[b]), axis=0)[:3] for b in range(3)])
    cache = KVCache.create(3, M, K, H)
    out1, cache, _ = step(state, chunk1, cache, jnp.asarray(first))
    out2, cache, _ = step(state, chunk2, cache, jnp.asarray(second))
    np.testing.assert_array_equal(cache.lengths, first + second)
    want = full(state, seqs)
    for b in range(3):
        got = jnp.concatenate([out1[b, : first[b]], out2[b, : second[b]]])
        np.testing.assert_allclose(got, want[b, : first[b] + second[b]], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out2[b, second[b]:], np.broadcast_to(state["out"]["bias"][...], (3 - second[b], D)))


def test_module_overflow_eager_error_and_nan_under_jit():
    graphdef, state, _, step = decoder(None)
    rng = np.random.default_rng(23)
    layer = nnx.merge(graphdef, state)
    full_cache = KVCache(
        keys=normal(rng, (2, M, K, H)), values=normal(rng, (2, M, K, H)),
        lengths=jnp.array([M, 4], jnp.int32),
    )
    token = normal(rng, (2, 1, D))
    with pytest.raises(ValueError, match=r"KVCache overflow: sequence\(s\) \[0\] would hold \[11\] tokens"):
        layer(token, cache=full_cache)
    out, new_cache, _ = step(state, token, full_cache, None)
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()
    np.testing.assert_array_equal(new_cache.overflowed, [True, False])


def test_decode_mode_without_cache_is_an_error():
    layer = jattn.nnx.SelfAttention(12, 3, decode=True, rngs=nnx.Rngs(24))
    x = jnp.zeros((1, 1, 12))
    with pytest.raises(ValueError, match="cache: decode mode .* needs a KV cache"):
        layer(x)
    with pytest.raises(ValueError, match="cache: decode mode"):
        jattn.nnx.SelfAttention(12, 3, rngs=nnx.Rngs(25))(x, decode=True)
    with pytest.raises(ValueError, match="decode: False was passed together with a cache"):
        layer(x, cache=KVCache.create(1, 4, 3, 4), decode=False)
