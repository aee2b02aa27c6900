"""The splash backend (JAX's TPU splash attention kernels), run on the CPU through the
Pallas interpreter: jattn masks compiled to splash masks (against `materialize` and
`block_kinds`), outputs, log-sum-exp and gradients against the float64 reference and
the dense backend, jattn's zero-row policy, and the dispatch rules for platform="tpu".
Nothing here has run on a TPU."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as smi

import jattn
from jattn import masks
from jattn.attention import make_call
from jattn.backends import dense, splash, splash_masks
from tests.checks import RTOL, assert_close, qkv
from tests.reference import reference_attention
from tests.strategies import draw_mask

RNG = np.random.default_rng(0)


def _masks(dense_array):
    """One of each kind and compositions; ``dense_array`` fixes the Dense masks' shape."""
    dense_mask = masks.Dense(dense_array)
    return {
        "causal": masks.Causal(),
        "causal_offset": masks.Causal(offset=-5),
        "window": masks.SlidingWindow(left=3, right=1, offset=4),
        "window_left_only": masks.SlidingWindow(left=2),
        "prefix": masks.PrefixLM(prefix_length=6, offset=2),
        "lengths": masks.Lengths(q_length=15, kv_length=9),
        "dense": dense_mask,
        "and": masks.Causal(offset=3) & masks.SlidingWindow(left=4, right=0, offset=3),
        "or": masks.PrefixLM(4) | masks.SlidingWindow(left=1, right=1),
        "not": ~masks.Causal(offset=2),
        "nested": (dense_mask | masks.Causal()) & ~masks.Lengths(kv_length=3),
    }


DENSE_20x27 = RNG.random((20, 27)) < 0.5
MASKS = _masks(DENSE_20x27)
# Whole 8x16 blocks on or off, then a few entries flipped: every tile kind occurs.
_BLOCKY = np.kron(RNG.random((4, 3)) < 0.5, np.ones((8, 16), bool))
_BLOCKY[[1, 12, 30], [2, 20, 47]] ^= True
MASKS_32x48 = _masks(_BLOCKY)


@pytest.mark.parametrize("name", sorted(MASKS))
def test_splash_mask_equals_materialize_on_a_padded_grid(name):
    """Conversion of every kind: the splash mask over the padded (24, 32) grid read back
    block by block equals jattn's mask on the real (20, 27) grid."""
    mask = MASKS[name]
    splash_mask = splash_masks.to_splash(splash_masks.static_key(mask), (24, 32))
    read = np.concatenate([np.concatenate([splash_mask[i:i + 8, j:j + 16] for j in (0, 16)], axis=1)
                           for i in (0, 8, 16)], axis=0)
    np.testing.assert_array_equal(read[:20, :27], np.asarray(mask.materialize(20, 27)))


@pytest.mark.parametrize("name", sorted(MASKS_32x48))
def test_splash_block_table_agrees_with_block_kinds(name):
    """Splash's own block table (0 empty, 1 partial, 2 full, as jattn's codes) is exact:
    it equals the kinds read off ``materialize``, and jattn's conservative
    ``block_kinds`` is never contradicted where it claims EMPTY or FULL."""
    mask = MASKS_32x48[name]
    T, S, bq, bk = 32, 48, 8, 16
    splash_mask = splash_masks.to_splash(splash_masks.static_key(mask), (T, S))
    info, mask_fn = smi.process_mask(sm.MultiHeadMask([splash_mask]), (bq, bk), shrink_grid=False)
    table = np.asarray(info.block_mask)[0]
    tiles = np.asarray(mask.materialize(T, S)).reshape(T // bq, bq, S // bk, bk)
    exact = np.where(~tiles.any(axis=(1, 3)), masks.EMPTY, np.where(tiles.all(axis=(1, 3)), masks.FULL, masks.PARTIAL))
    np.testing.assert_array_equal(table, exact)
    ours = np.asarray(mask.block_kinds(T, S, bq, bk))
    sure = ours != masks.PARTIAL
    np.testing.assert_array_equal(table[sure], ours[sure])
    # Bands are evaluated inside the kernel, not stored as blocks.
    assert (mask_fn is not None) == (name in ("causal", "causal_offset", "window", "window_left_only"))


def test_conversion_is_cached_and_lazy():
    mask = MASKS["dense"]
    key = splash_masks.static_key(mask)
    assert splash_masks.static_key(masks.Dense(DENSE_20x27.copy())) == key  # equal data, equal key
    assert splash_masks.to_splash(key, (24, 32)) is splash_masks.to_splash(key, (24, 32))
    # A structured mask over a million-square grid is built without materialising it.
    huge = splash_masks.to_splash(splash_masks.static_key(MASKS["and"]), (2**20, 2**20))
    np.testing.assert_array_equal(huge[0:2, 0:5], [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    first = splash_masks.first_allowed_keys(splash_masks.static_key(MASKS["causal_offset"]), (24, 32), 27)
    np.testing.assert_array_equal(first[:7], [27, 27, 27, 27, 27, 0, 0])
    # The kernels (and their block tables) are built once per (mask, shape, tiles).
    q, k, v = qkv(0, 1, 40, 300, 2, 1, 8)
    plan = splash.plan_for(make_call(q, k, v, is_causal=True, block_sizes=(100, 128)), interpret=True)
    assert (plan.shape, plan.blocks, plan.mask_key) == ((128, 384), (128, 128), ("causal", 0))
    assert splash._kernels(plan) is splash._kernels(plan)


@pytest.mark.parametrize(
    "mask, words",
    [
        (masks.SegmentIds(np.zeros(8, np.int32)), "query_segment_ids="),
        (masks.FromFunction(lambda i, j: i >= j), "mask function"),
        (masks.Causal(offset=jnp.array([1, 2])), "Causal.offset is"),
        (masks.Lengths(kv_length=jnp.array([3, 4])), "Lengths.kv_length"),
        (masks.Dense(np.ones((2, 8, 8), bool)), "per-example"),
    ],
)
def test_masks_with_data_are_not_static(mask, words):
    with pytest.raises(splash_masks.NotStatic, match=words):
        splash_masks.static_key(mask)


def _run(kwargs):
    def fn(q, k, v):
        return splash.run(make_call(q, k, v, **kwargs), "cpu")
    return fn


def _weighted_sum(out):
    out = out.astype(jnp.float32)
    return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape)))


def _grads(run, kwargs):
    """jit(value_and_grad) of a fixed weighting of the output; (out, lse) as aux."""
    def loss(q, k, v):
        out, _, lse = run(make_call(q, k, v, **kwargs), "cpu")
        return _weighted_sum(out), (out, lse)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _check_lse(lse, ref_lse):
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(np.asarray(lse)[finite], ref_lse[finite], rtol=1e-5, atol=1e-5)


@st.composite
def _cases(draw):
    B = draw(st.integers(1, 2))
    K = draw(st.integers(1, 2))
    N = K * draw(st.sampled_from([1, 2, 3]))  # MHA, GQA and (K=1) MQA
    T = draw(st.integers(1, 256))
    S = draw(st.integers(1, 256))
    H = draw(st.sampled_from([4, 8, 12]))
    band = draw(st.sampled_from(["causal", "window", "prefix", "none"]))
    ours, ref = draw_mask(draw, band, B, T, S, offset=draw(st.integers(-20, 40)), max_window=30)
    for data in ("segments", "lengths"):  # data masks on top of the static band
        if draw(st.booleans()):
            more, more_ref = draw_mask(draw, data, B, T, S, offset=0, max_window=0)
            ours, ref = {**ours, **more}, {**ref, **more_ref}
    if draw(st.booleans()):
        ours, ref = {**ours, "logits_soft_cap": 2.0}, {**ref, "softcap": 2.0}
    if draw(st.booleans()):
        ours = {**ours, "block_sizes": (128, 128)}  # several blocks, unevenly filled
    ours = {**ours, "return_residual": draw(st.booleans())}
    return (B, T, S, N, K, H), ours, ref, draw(st.integers(0, 999))


# The derandomised draws miss the window band, so one window case is always run: a
# (7, 3) window shifted by 5, with key lengths, GQA, soft-cap, two 128-blocks and lse.
_WINDOW_CASE = (
    (2, 150, 170, 4, 2, 8),
    {"local_window_size": (7, 3), "query_offset": 5, "key_value_seq_lengths": jnp.array([170, 61]),
     "logits_soft_cap": 2.0, "block_sizes": (128, 128), "return_residual": True},
    {"window": (7, 3), "query_offset": 5, "kv_lengths": np.array([170, 61]), "softcap": 2.0},
    3,
)


@settings(max_examples=5, deadline=None)
@given(case=_cases())
@example(case=_WINDOW_CASE)
def test_splash_agrees_with_reference_and_dense(case):
    dims, ours, ref, seed = case
    q, k, v = qkv(seed, *dims)
    (_, (out, lse)), grads = _grads(splash.run, ours)(q, k, v)
    ref_out, _, ref_lse = reference_attention(q, k, v, **ref)
    assert_close(out, ref_out, 1e-5)
    if ours["return_residual"]:
        _check_lse(lse, ref_lse)
    else:
        assert lse is None
    _, want = _grads(dense.run, ours)(q, k, v)
    for name, g, w in zip("qkv", grads, want):
        assert_close(g, w, 2e-5, atol=1e-6, err_msg=f"d{name}")


def test_mask_objects_end_to_end():
    """A composed mask object (PrefixLM | Dense) & a window, T, S not block multiples.
    (Gradients through stored partial blocks: the prefix cases of the property test.)"""
    q, k, v = qkv(3, 2, 50, 70, 2, 1, 8)
    array = np.random.default_rng(1).random((50, 70)) < 0.3
    mask = (masks.PrefixLM(5, offset=10) | masks.Dense(array)) & masks.SlidingWindow(left=20, offset=10)
    out, _, lse = jax.jit(_run(dict(mask=mask, return_residual=True)))(q, k, v)
    allowed = np.asarray(mask.materialize(50, 70))
    ref_out, _, ref_lse = reference_attention(q, k, v, mask=allowed[None, None])
    assert_close(out, ref_out, 1e-5)
    _check_lse(lse, ref_lse)


@pytest.mark.parametrize("return_residual", [False, True])
def test_rows_without_keys_are_zero_with_zero_gradients(return_residual):
    """Row t sees keys t-190 .. t-150, so rows 0-149 see none; rows 190-199 of example 0
    are past its query length; example 1 has no keys at all.  With 128-row blocks,
    block 0 is skipped by splash entirely (its raw output is NaN) and rows 128-149 sit
    in a computed block (raw output: the mean of masked values)."""
    q, k, v = qkv(8, 2, 200, 200, 2, 1, 8)
    kwargs = dict(local_window_size=(40, 0), query_offset=-150, key_value_seq_lengths=jnp.array([200, 0]),
                  query_seq_lengths=jnp.array([190, 200]), block_sizes=(128, 128), return_residual=return_residual)
    (_, (out, lse)), grads = _grads(splash.run, kwargs)(q, k, v)
    ref_out, _, ref_lse = reference_attention(q, k, v, window=(40, 0), query_offset=-150, kv_lengths=[200, 0],
                                              q_lengths=[190, 200])
    assert_close(out, ref_out, 1e-5)
    empty = (slice(None), slice(0, 150)), (0, slice(190, None)), (1, slice(None))
    for rows in empty:
        assert float(jnp.abs(out[rows]).max()) == 0.0 and float(jnp.abs(grads[0][rows]).max()) == 0.0
    assert float(jnp.abs(out[0, 150:190]).min()) > 0.0
    if return_residual:
        _check_lse(lse, ref_lse)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    assert float(jnp.abs(grads[1][1]).max()) == 0.0 and float(jnp.abs(grads[2][1]).max()) == 0.0


def test_bfloat16_against_float64_reference():
    q, k, v = qkv(7, 1, 60, 90, 4, 2, 16, dtype=jnp.bfloat16)
    kwargs = dict(is_causal=True, query_offset=11, logits_soft_cap=5.0)
    (_, (out, _)), grads = _grads(splash.run, kwargs)(q, k, v)
    assert out.dtype == jnp.bfloat16
    ref_out, _, _ = reference_attention(q, k, v, is_causal=True, query_offset=11, softcap=5.0)
    assert_close(out, ref_out, RTOL[jnp.bfloat16])
    with jax.enable_x64(True):
        _, want = _grads(dense.run, kwargs)(*(x.astype(jnp.float64) for x in (q, k, v)))
    for name, g, w in zip("qkv", grads, want):
        assert g.dtype == jnp.bfloat16
        assert_close(g, w, 3 * RTOL[jnp.bfloat16], err_msg=f"d{name}")


def _tpu_inputs(T=4096, dtype=jnp.bfloat16, N=8, K=8):
    return jnp.zeros((1, T, N, 128), dtype), jnp.zeros((1, T, K, 128), dtype), jnp.zeros((1, T, K, 128), dtype)


def test_tpu_auto_prefers_splash_and_says_why():
    segments = jnp.zeros((1, 4096), jnp.int32)
    for kwargs in (dict(is_causal=True), dict(local_window_size=(256, 0), query_offset=7, logits_soft_cap=30.0),
                   dict(query_segment_ids=segments, key_value_segment_ids=segments),
                   dict(mask=masks.PrefixLM(100)), dict(key_value_seq_lengths=jnp.array([1000]))):
        why = jattn.explain(*_tpu_inputs(N=8, K=2), platform="tpu", **kwargs)
        assert why.backend == "splash", str(why)
        assert "splash" in why.reason and "TPU" in why.reason
        assert "splash is preferred" in why.refused["chunked"]
    long = str(jattn.explain(*_tpu_inputs(T=2048, dtype=jnp.float32), platform="tpu"))
    assert "backend: splash (long: T·S = 4194304 > 1048576" in long and "materialising" in long
    short = jattn.explain(*_tpu_inputs(T=1024), is_causal=True, platform="tpu")
    assert short.backend == "dense" and "short" in short.reason, str(short)  # as on CPU and GPU


@pytest.mark.parametrize(
    "kwargs, words, fallback",
    [
        (dict(dropout_rate=0.1, dropout_rng=jax.random.key(0)), "does not support dropout", "chunked"),
        (dict(bias=True), "does not support an additive bias", "chunked"),
        (dict(score_mod=lambda s, h, i, j: s), "does not support a score_mod", "chunked"),
        (dict(is_causal=True, query_offset=jnp.array([3])), "per-example (array) query_offset", "chunked"),
        (dict(mask=jnp.ones((1, 1, 1, 4096), bool)), "boolean mask array", "chunked"),
        (dict(mask=lambda i, j: i >= j), "mask function", "chunked"),
        (dict(dtype=jnp.float16), "float32 or bfloat16", "chunked"),
        (dict(return_weights=True), "returning the weights", "dense"),
    ],
)
def test_tpu_refusals_name_the_reason(kwargs, words, fallback):
    kwargs = dict(kwargs)
    inputs = _tpu_inputs(dtype=kwargs.pop("dtype", jnp.bfloat16))
    if kwargs.pop("bias", False):
        kwargs["bias"] = jnp.zeros((1, 1, 1, 4096), jnp.bfloat16)
    why = jattn.explain(*inputs, platform="tpu", **kwargs)
    assert why.backend == fallback, str(why)
    assert words in why.refused["splash"], why.refused["splash"]
    with pytest.raises(ValueError, match="implementation='splash' cannot serve"):
        jattn.explain(*inputs, platform="tpu", implementation="splash", **kwargs)


def test_splash_needs_a_tpu_but_runs_interpreted_anywhere():
    q, k, v = _tpu_inputs(T=256)
    assert "TPUs only" in jattn.explain(q, k, v, is_causal=True, platform="cpu").refused["splash"]
    assert "TPUs only" in jattn.explain(q, k, v, is_causal=True, platform="gpu").refused["splash"]
    with pytest.raises(ValueError, match="splash' cannot serve this call: .*float32 or bfloat16"):
        splash.run(make_call(*_tpu_inputs(T=8, dtype=jnp.float16)), "cpu")
