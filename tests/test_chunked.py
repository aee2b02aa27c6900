"""The chunked backend: agreement with dense and the float64 reference (outputs and
gradients), identical dropout, tile skipping observed, and memory linear in T."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import jattn
from jattn import masks, score_mods
from jattn.attention import make_call
from jattn.backends import chunked
from tests.checks import assert_close, qkv
from tests.reference import reference_attention
from tests.strategies import draw_mask

BLOCKS = (4, 3)  # small tiles so that short sequences span several, unevenly


def _attend(impl, kwargs):
    def fn(q, k, v, bias=None):
        extra = {} if bias is None else {"bias": bias}
        return jattn.dot_product_attention(q, k, v, implementation=impl, block_sizes=BLOCKS, **kwargs, **extra)
    return fn


def _grads(fn, *args):
    def loss(*a):
        out = fn(*a)
        cot = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
        return jnp.sum(out * cot)
    return jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)


@st.composite
def _cases(draw):
    B = draw(st.integers(1, 2))
    K = draw(st.integers(1, 2))
    N = K * draw(st.integers(1, 3))
    T = draw(st.integers(1, 11))
    S = draw(st.integers(1, 11))
    H = draw(st.sampled_from([2, 3, 8]))
    kind = draw(st.sampled_from(["causal", "window", "segments", "lengths", "prefix", "dense", "fn", "none"]))
    offset = draw(st.integers(0, 3))
    ours, ref = draw_mask(draw, kind, B, T, S, offset=offset, max_window=4)
    with_bias = draw(st.booleans())
    return (B, T, S, N, K, H), ours, ref, with_bias, draw(st.integers(0, 999))


@settings(max_examples=8)
@given(case=_cases())
def test_chunked_agrees_with_dense_and_reference(case):
    dims, ours, ref, with_bias, seed = case
    B, T, S, N, K, H = dims
    q, k, v = qkv(seed, *dims)
    bias = jax.random.normal(jax.random.key(seed + 1), (1, N, T, S)) if with_bias else None
    out_c = jax.jit(_attend("chunked", ours))(q, k, v, bias)
    out_d = jax.jit(_attend("dense", ours))(q, k, v, bias)
    ref_out, _, _ = reference_attention(q, k, v, bias=bias, **ref)
    assert_close(out_c, ref_out, 1e-5)
    assert_close(out_c, out_d, 1e-5)
    args = (q, k, v) if bias is None else (q, k, v, bias)
    for g_c, g_d in zip(_grads(_attend("chunked", ours), *args), _grads(_attend("dense", ours), *args)):
        assert_close(g_c, g_d, 2e-5, atol=1e-6)


def test_gradients_match_float64_reference_numerically():
    """Chunked gradients against finite differences of the float64 reference."""
    from jax.test_util import check_grads

    with jax.enable_x64(True):
        q, k, v = (x.astype(jnp.float64) for x in qkv(3, 2, 7, 9, 4, 2, 3))
        bias = jax.random.normal(jax.random.key(30), (2, 1, 7, 9), jnp.float64)
        fn = _attend("chunked", {"is_causal": True, "query_offset": 2, "logits_soft_cap": 2.0})
        check_grads(fn, (q, k, v, bias), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_score_mod_leaf_gets_its_gradient():
    """A learnable array inside a ScoreMod receives the same gradient as in dense."""
    q, k, v = qkv(4, 1, 9, 10, 2, 1, 4)
    table = jax.random.normal(jax.random.key(40), (9, 10))

    def loss(impl, table):
        out = jattn.dot_product_attention(q, k, v, implementation=impl, block_sizes=BLOCKS,
                                          score_mod=score_mods.Bias(table), is_causal=True)
        return jnp.sum(out ** 2)

    g_c = jax.grad(lambda t: loss("chunked", t))(table)
    g_d = jax.grad(lambda t: loss("dense", t))(table)
    assert float(jnp.abs(g_d).sum()) > 0
    assert_close(g_c, g_d, 1e-5)


def test_dropout_pattern_identical_to_dense():
    q, k, v = qkv(5, 2, 13, 11, 4, 2, 8)
    kwargs = dict(dropout_rate=0.35, dropout_rng=jax.random.key(50), is_causal=True, query_offset=1)
    out_c = _attend("chunked", kwargs)(q, k, v)
    out_d = _attend("dense", kwargs)(q, k, v)
    assert_close(out_c, out_d, 1e-5)
    no_drop = _attend("dense", {"is_causal": True, "query_offset": 1})(q, k, v)
    assert float(jnp.abs(out_d - no_drop).max()) > 0.1  # dropout really happened
    for g_c, g_d in zip(_grads(_attend("chunked", kwargs), q, k, v), _grads(_attend("dense", kwargs), q, k, v)):
        assert_close(g_c, g_d, 2e-5, atol=1e-6)


def _visited_tiles(mask_kwargs, T, S, blocks):
    """Run chunked with a score_mod that records which tiles it is evaluated on."""
    seen = set()

    def record(i0, j0):
        seen.add((int(i0) // blocks[0], int(j0) // blocks[1]))

    def spy(score, head, q_idx, kv_idx):
        jax.debug.callback(record, q_idx.min(), kv_idx.min())
        return score

    q, k, v = qkv(6, 1, T, S, 1, 1, 4)
    out = jattn.dot_product_attention(q, k, v, implementation="chunked", block_sizes=blocks, score_mod=spy, **mask_kwargs)
    jax.block_until_ready(out)
    return seen


def test_causal_visits_only_non_empty_tiles():
    seen = _visited_tiles({"is_causal": True}, 16, 16, (4, 4))
    assert seen == {(i, j) for i in range(4) for j in range(4) if j <= i}


def test_window_and_segments_skip_their_empty_tiles():
    seen = _visited_tiles({"local_window_size": (4, 0)}, 16, 16, (4, 4))
    assert seen == {(i, j) for i in range(4) for j in range(4) if i - 1 <= j <= i}
    ids = jnp.array([[0] * 8 + [1] * 8])
    seen = _visited_tiles({"query_segment_ids": ids}, 16, 16, (4, 4))  # traced ids: dynamic skipping
    assert seen == {(i, j) for i in range(4) for j in range(4) if (i < 2) == (j < 2)}


def test_tile_table_for_causal():
    q, k, v = qkv(7, 1, 64, 64, 1, 1, 4)
    call = make_call(q, k, v, is_causal=True, implementation="chunked", block_sizes=(16, 16))
    kinds = chunked._block_table(call, call.index_mask(), None, None, 4, 4, 16, 16)
    assert isinstance(kinds, np.ndarray)  # static: no runtime bookkeeping
    np.testing.assert_array_equal(kinds, np.tril(np.full((4, 4), masks.FULL)) - np.eye(4, dtype=int))
    (full, full_kind), (partial, partial_kind) = chunked._schedule(kinds)
    assert (full_kind, partial_kind) == (masks.FULL, masks.PARTIAL)
    np.testing.assert_array_equal(full, [[1, 0], [2, 0], [2, 1], [3, 0], [3, 1], [3, 2]])
    np.testing.assert_array_equal(partial, [[0, 0], [1, 1], [2, 2], [3, 3]])


def _largest_intermediate(fn, *args):
    """The largest array (in elements) produced by any equation, sub-jaxprs included."""
    closed = jax.make_jaxpr(fn)(*args)
    largest = 0

    def walk(jaxpr):
        nonlocal largest
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
            for param in eqn.params.values():
                for sub in (param if isinstance(param, (list, tuple)) else [param]):
                    if hasattr(sub, "jaxpr"):
                        walk(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
                    elif hasattr(sub, "eqns"):
                        walk(sub)

    walk(closed.jaxpr)
    return largest


def test_no_score_sized_buffer_forward_or_backward():
    T = 512
    q, k, v = qkv(8, 1, T, T, 2, 2, 8)
    fn = lambda q, k, v: jattn.dot_product_attention(q, k, v, implementation="chunked", block_sizes=(64, 64), is_causal=True)
    grad = jax.grad(lambda q, k, v: fn(q, k, v).sum(), argnums=(0, 1, 2))
    largest = _largest_intermediate(grad, q, k, v)
    # A [T, S] score matrix per head would be 2 * 512 * 512 = 524288 elements; the largest
    # buffers are the inputs' size (2 * 512 * 8) or one tile per head (2 * 64 * 64).
    assert largest <= 2 * T * 8, largest
    dense = lambda q, k, v: jattn.dot_product_attention(q, k, v, implementation="dense", is_causal=True)
    assert _largest_intermediate(jax.grad(lambda q, k, v: dense(q, k, v).sum(), argnums=(0, 1, 2)), q, k, v) >= 2 * T * T


@pytest.mark.xla_optimized
def test_compiled_temporary_memory_grows_linearly():
    def temp_bytes(T):
        q, k, v = qkv(9, 1, T, T, 2, 2, 16)
        fn = jax.grad(lambda q, k, v: jattn.dot_product_attention(
            q, k, v, implementation="chunked", block_sizes=(128, 128), is_causal=True).sum(), argnums=(0, 1, 2))
        return jax.jit(fn).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(1024), temp_bytes(4096)
    # 4x the length: linear growth is ~4x; quadratic would be ~16x.
    assert large <= 6 * small, (small, large)


def test_return_weights_falls_back_to_dense_and_says_so():
    q, k, v = qkv(10, 1, 2048, 2048, 1, 1, 4)
    explanation = jattn.explain(q, k, v, return_weights=True, platform="cpu")
    assert explanation.backend == "dense"
    assert "weights" in explanation.reason
    assert "cannot return" in explanation.refused["chunked"]
    assert jattn.explain(q, k, v, platform="cpu").backend == "chunked"


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_chunked(dtype):
    q, k, v = qkv(11, 2, 13, 9, 4, 2, 8, dtype=dtype)
    out = _attend("chunked", {"is_causal": True})(q, k, v)
    assert out.dtype == dtype
    f32 = lambda x: x.astype(jnp.float32)
    ref_out, _, _ = reference_attention(f32(q), f32(k), f32(v), is_causal=True)
    assert_close(f32(out), ref_out, 2e-2)
    grads = _grads(_attend("chunked", {"is_causal": True}), q, k, v)
    assert all(g.dtype == dtype and bool(jnp.isfinite(f32(g)).all()) for g in grads)


# ----------------------------------------------------------- composition regressions
# Each of these failed before the custom VJP took every traced array as an argument
# (head ids, batch indices, mask / score-mod leaves and the dropout key were captured).
_Q, _K, _V = qkv(11, 2, 20, 20, 4, 2, 8)
_ALIBI = score_mods.ALiBi(num_heads=4, offset=jnp.array([1, 3]))
_KEY = jax.random.key(5)


def _loss(impl, **kw):
    def loss(q, k, v):
        out = jattn.dot_product_attention(q, k, v, implementation=impl, block_sizes=(8, 8), **kw)
        return (out * jnp.cos(out)).sum()
    return loss


def _scan_twice(f):
    """A loss that runs ``f`` in both steps of a `lax.scan` (so its gradient doubles)."""
    return lambda q, k, v: jax.lax.scan(lambda c, _: (c + f(q, k, v), None), 0.0, None, length=2)[0] / 2


@pytest.mark.parametrize(
    "transform",
    [
        lambda f: jax.grad(jax.checkpoint(f), argnums=(0, 1, 2)),
        lambda f: jax.grad(jax.jit(f), argnums=(0, 1, 2)),
        lambda f: jax.jit(jax.grad(f, argnums=(0, 1, 2))),
        lambda f: jax.grad(_scan_twice(f), argnums=(0, 1, 2)),
    ],
    ids=["grad(checkpoint)", "grad(jit)", "jit(grad)", "grad(scan)"],
)
def test_gradients_compose_with_transformations(transform):
    # Every kind of traced input the VJP once captured, in one call: dropout's key,
    # ALiBi's array offset, an array query offset and lengths (mask leaves).
    kw = dict(dropout_rate=0.3, dropout_rng=_KEY, score_mod=_ALIBI, is_causal=True,
              query_offset=jnp.array([0, 4]), key_value_seq_lengths=jnp.array([3, 20]))
    expected = jax.grad(_loss("dense", **kw), argnums=(0, 1, 2))(_Q, _K, _V)
    got = transform(_loss("chunked", **kw))(_Q, _K, _V)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=2e-4, atol=2e-5)


def test_no_implicit_rank_promotion_or_dtype_promotion():
    with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict"):
        out = jattn.dot_product_attention(_Q, _K, _V, implementation="chunked", block_sizes=(8, 8),
                                          is_causal=True, score_mod=_ALIBI)
        grads = jax.grad(_loss("chunked", is_causal=True, dropout_rate=0.2, dropout_rng=_KEY), argnums=(0, 1, 2))(_Q, _K, _V)
    expected = jattn.dot_product_attention(_Q, _K, _V, implementation="dense", is_causal=True, score_mod=_ALIBI)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)


def test_forward_mode_differentiates_the_plain_forward():
    tangents = tuple(jax.random.normal(jax.random.key(n), x.shape) for n, x in enumerate((_Q, _K, _V)))
    f = lambda impl: lambda q, k, v: jattn.dot_product_attention(  # noqa: E731
        q, k, v, implementation=impl, block_sizes=(8, 8), is_causal=True, score_mod=_ALIBI)
    _, t_chunked = jax.jvp(f("chunked"), (_Q, _K, _V), tangents)
    _, t_dense = jax.jvp(f("dense"), (_Q, _K, _V), tangents)
    np.testing.assert_allclose(t_chunked, t_dense, rtol=1e-4, atol=1e-5)
