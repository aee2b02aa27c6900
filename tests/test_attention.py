"""`jattn.dot_product_attention`: every feature against the float64 reference, parity
with `jax.nn.dot_product_attention`, property tests, and bad input."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from jax.test_util import check_grads

import jattn
from jattn import masks, ops, score_mods
from jattn.positional import alibi_slopes
from tests.checks import RTOL, assert_close, qkv
from tests.reference import reference_attention

B, T, S, N, K, H, Hv = 2, 5, 7, 6, 3, 3, 4  # GQA with G = 2; odd, distinct sizes


def _dropout_keep(key, rate, B, N, T, S):
    """The keep pattern jattn promises: ops.dropout_keep_mask with the key folded by
    batch index, then query-head index."""
    keep = np.zeros((B, N, T, S), bool)
    for b in range(B):
        for n in range(N):
            kbn = jax.random.fold_in(jax.random.fold_in(key, b), n)
            keep[b, n] = np.asarray(ops.dropout_keep_mask(kbn, rate, jnp.arange(T)[:, None], jnp.arange(S)[None, :]))
    return keep


def _features(seed):
    """(jattn kwargs, reference kwargs) per feature, with per-example data."""
    rng = np.random.default_rng(seed)
    bias = rng.normal(size=(B, 1, T, S)).astype(np.float32)
    dense = rng.random((B, N, T, S)) < 0.7
    dense[..., 0] = True
    q_seg = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]])
    kv_seg = np.array([[0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 2, 2, 2]])
    offsets = np.array([0, 2])
    key = jax.random.key(seed)
    return {
        "plain": ({}, {}),
        "scale": ({"scale": 0.3}, {"scale": 0.3}),
        "bias": ({"bias": bias}, {"bias": bias}),
        "dense_mask": ({"mask": dense}, {"mask": dense}),
        "causal": ({"is_causal": True}, {"is_causal": True}),
        "causal_offset": ({"is_causal": True, "query_offset": jnp.asarray(offsets)},
                          {"is_causal": True, "query_offset": offsets}),
        "window": ({"local_window_size": (2, 1)}, {"window": (2, 1)}),
        "window_offset": ({"local_window_size": (1, 0), "query_offset": 2}, {"window": (1, 0), "query_offset": 2}),
        "lengths": ({"query_seq_lengths": jnp.array([3, 5]), "key_value_seq_lengths": jnp.array([7, 0])},
                    {"q_lengths": [3, 5], "kv_lengths": [7, 0]}),
        "segments": ({"query_segment_ids": jnp.asarray(q_seg), "key_value_segment_ids": jnp.asarray(kv_seg)},
                     {"q_segments": q_seg, "kv_segments": kv_seg}),
        "prefix_lm": ({"mask": masks.PrefixLM(jnp.array([2, 4]))}, {"prefix_length": [2, 4]}),
        "mask_fn": ({"mask": lambda i, j: (i + 2 * j) % 3 != 1}, {"mask_fn": lambda t, s: (t + 2 * s) % 3 != 1}),
        "softcap": ({"logits_soft_cap": 1.5}, {"softcap": 1.5}),
        "alibi": ({"score_mod": score_mods.ALiBi(N)},
                  {"score_fn": lambda sc, n, t, s: sc - alibi_slopes(N)[n] * abs(t - s)}),
        "score_fn_and_cap": ({"score_mod": lambda sc, h, i, j: sc + 0.1 * h - 0.05 * (i - j), "logits_soft_cap": 2.0},
                             {"score_fn": lambda sc, n, t, s: sc + 0.1 * n - 0.05 * (t - s), "softcap": 2.0}),
        "dropout": ({"dropout_rate": 0.4, "dropout_rng": key},
                    {"dropout_keep": _dropout_keep(key, 0.4, B, N, T, S), "dropout_rate": 0.4}),
        "combined": ({"is_causal": True, "query_offset": 2, "local_window_size": (3, 0), "bias": bias,
                      "query_segment_ids": jnp.asarray(q_seg), "key_value_segment_ids": jnp.asarray(kv_seg),
                      "logits_soft_cap": 3.0},
                     {"is_causal": True, "query_offset": 2, "window": (3, 0), "bias": bias,
                      "q_segments": q_seg, "kv_segments": kv_seg, "softcap": 3.0}),
    }


FEATURES = list(_features(0))


@pytest.mark.parametrize("feature", FEATURES)
def test_every_feature_matches_float64_reference(feature):
    ours, theirs = _features(1)[feature]
    q, k, v = qkv(1, B, T, S, N, K, H, Hv)
    out, weights = jattn.dot_product_attention(q, k, v, return_weights=True, **ours)
    ref_out, ref_w, _ = reference_attention(q, k, v, **theirs)
    assert out.shape == (B, T, N, Hv) and weights.shape == (B, N, T, S)
    assert_close(out, ref_out, RTOL[jnp.float32], feature)
    assert_close(weights, ref_w, RTOL[jnp.float32], feature)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("feature", ["causal_offset", "combined", "dropout"])
def test_low_precision_within_2e_2(feature, dtype):
    ours, theirs = _features(2)[feature]
    q, k, v = qkv(2, B, T, S, N, K, H, Hv, dtype=dtype)
    out = jattn.dot_product_attention(q, k, v, **ours)
    assert out.dtype == dtype
    ref_out, _, _ = reference_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), **theirs)
    assert_close(out.astype(jnp.float32), ref_out, RTOL[dtype], feature)


def test_residual_is_log_sum_exp():
    ours, theirs = _features(3)["lengths"]
    q, k, v = qkv(3, B, T, S, N, K, H)
    out, lse = jattn.dot_product_attention(q, k, v, return_residual=True, **ours)
    _, _, ref_lse = reference_attention(q, k, v, **theirs)
    finite = np.isfinite(ref_lse)
    assert np.array_equal(np.isfinite(np.asarray(lse)), finite)  # -inf exactly on empty rows
    assert_close(np.asarray(lse)[finite], ref_lse[finite], 1e-5)


def test_check_grads_float64_with_every_mask_and_modifier():
    ours, theirs = _features(4)["combined"]
    with jax.enable_x64(True):
        q, k, v = (x.astype(jnp.float64) for x in qkv(4, B, T, S, N, K, H, Hv))
        bias = jnp.asarray(ours["bias"], jnp.float64)
        ours = {**ours, "bias": bias}
        check_grads(
            lambda q, k, v, b: jattn.dot_product_attention(q, k, v, **{**ours, "bias": b}),
            (q, k, v, bias), order=1, modes=("rev",), atol=1e-7, rtol=1e-7,
        )


# ------------------------------------------------------------------- jax.nn parity
JAX_NN_CASES = {
    "plain": {},
    "causal": {"is_causal": True},
    "bias": {"bias": "bias"},
    "mask": {"mask": "mask"},
    "lengths": {"query_seq_lengths": jnp.array([3, 5], jnp.int32), "key_value_seq_lengths": jnp.array([4, 7], jnp.int32)},
    "window": {"local_window_size": (2, 3)},
    "window_int": {"local_window_size": 3},
    "causal_window_bias": {"is_causal": True, "local_window_size": (2, 0), "bias": "bias"},
    "scale": {"scale": 0.7},
}


def _jax_nn_args(name, N_, T_, S_):
    rng = np.random.default_rng(5)
    args = dict(JAX_NN_CASES[name])
    if args.get("bias") == "bias":
        args["bias"] = jnp.asarray(rng.normal(size=(1, N_, T_, S_)), jnp.float32)
    if args.get("mask") == "mask":
        mask = rng.random((B, 1, T_, S_)) < 0.7
        mask[..., 0] = True  # jax.nn averages fully masked rows; jattn zeroes them
        args["mask"] = jnp.asarray(mask)
    return args


@pytest.mark.parametrize("name", list(JAX_NN_CASES))
@pytest.mark.parametrize("heads", [(6, 3), (6, 1), (4, 4)], ids=["gqa", "mqa", "mha"])
def test_parity_with_jax_nn_outputs_and_gradients(name, heads):
    N_, K_ = heads
    T_ = S_ = 6  # jax.nn requires T == S for its window mask to leave no row empty here
    args = _jax_nn_args(name, N_, T_, S_)
    q, k, v = qkv(6, B, T_, S_, N_, K_, 4)

    def loss(fn):
        cot = jax.random.normal(jax.random.key(60), (B, T_, N_, 4))
        return lambda q, k, v: jnp.sum(fn(q, k, v, **args) * cot)

    ours = jax.jit(lambda q, k, v: jattn.dot_product_attention(q, k, v, **args))(q, k, v)
    theirs = jax.nn.dot_product_attention(q, k, v, **args)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-6)
    g_ours = jax.jit(jax.grad(loss(jattn.dot_product_attention), argnums=(0, 1, 2)))(q, k, v)
    g_theirs = jax.jit(jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_ours, g_theirs):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_parity_with_jax_nn_under_vmap_of_unbatched_inputs():
    q, k, v = qkv(7, B, T, S, N, K, H)
    bias = jax.random.normal(jax.random.key(70), (B, N, T, S))
    ours = jax.vmap(lambda q, k, v, b: jattn.dot_product_attention(q, k, v, b, is_causal=True))(q, k, v, bias)
    theirs = jax.vmap(lambda q, k, v, b: jax.nn.dot_product_attention(q, k, v, b, is_causal=True))(q, k, v, bias)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-6)
    batched = jattn.dot_product_attention(q, k, v, bias, is_causal=True)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(batched), rtol=1e-6, atol=1e-7)


def test_unbatched_inputs_like_jax_nn():
    q, k, v = qkv(8, B, T, S, N, K, H, unbatched=True)
    out, weights = jattn.dot_product_attention(q, k, v, is_causal=True, return_weights=True)
    assert out.shape == (T, N, H) and weights.shape == (N, T, S)
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(jax.nn.dot_product_attention(q, k, v, is_causal=True)), rtol=1e-5, atol=1e-6
    )


def test_fully_masked_rows_are_zero_with_finite_zero_gradients():
    q, k, v = qkv(9, B, T, S, N, K, H)
    lengths = jnp.array([0, 7])  # example 0 has no keys at all

    def loss(q, k, v):
        return jnp.sum(jattn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths) ** 2)

    out = jattn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths)
    np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_array_equal(np.asarray(g[0]), 0.0)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_logits_of_1e4_give_no_nan_or_inf(dtype):
    q = jnp.full((1, 4, 2, 8), 40.0, dtype)
    k = jnp.full((1, 4, 2, 8), 40.0, dtype)  # scaled logits 40*40*8/sqrt(8) ~ 4.5e3 .. 1e4
    v = jax.random.normal(jax.random.key(10), (1, 4, 2, 8)).astype(dtype)
    fn = lambda q: jattn.dot_product_attention(q * 1.5, k, v, is_causal=True)
    out = fn(q)
    grad = jax.grad(lambda q: fn(q).astype(jnp.float32).sum())(q)
    assert np.all(np.isfinite(np.asarray(out, np.float32))) and np.all(np.isfinite(np.asarray(grad, np.float32)))


def test_jit_equals_no_jit():
    ours, _ = _features(11)["combined"]
    q, k, v = qkv(11, B, T, S, N, K, H)
    fn = lambda q, k, v: jattn.dot_product_attention(q, k, v, **ours)
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(q, k, v)), np.asarray(fn(q, k, v)), rtol=1e-6, atol=1e-7)


def test_vmap_over_heads_equals_loop_over_heads():
    q, k, v = qkv(12, B, T, S, N, N, H)  # MHA: heads are independent
    full = jattn.dot_product_attention(q, k, v, is_causal=True, score_mod=score_mods.ALiBi(N))
    for n in range(N):
        alibi_n = score_mods.ALiBi(slopes=(score_mods.ALiBi(N).slopes[n],))
        one = jattn.dot_product_attention(q[:, :, n:n + 1], k[:, :, n:n + 1], v[:, :, n:n + 1], is_causal=True,
                                          score_mod=alibi_n)
        np.testing.assert_allclose(np.asarray(full[:, :, n]), np.asarray(one[:, :, 0]), rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------- property tests
@st.composite
def _problems(draw):
    B_ = draw(st.integers(1, 2))
    K_ = draw(st.integers(1, 3))
    N_ = K_ * draw(st.integers(1, 3))
    T_ = draw(st.integers(1, 9))
    S_ = draw(st.integers(1, 9))
    H_ = draw(st.sampled_from([1, 3, 5, 8]))
    offset = draw(st.integers(0, 4))
    kwargs, ref = {}, {}
    if draw(st.booleans()):
        kwargs.update(is_causal=True, query_offset=offset)
        ref.update(is_causal=True, query_offset=offset)
    if draw(st.booleans()):
        window = (draw(st.integers(0, 4)), draw(st.integers(0, 4)))
        kwargs.update(local_window_size=window, query_offset=offset)
        ref.update(window=window, query_offset=offset)
    if draw(st.booleans()):
        kv_len = draw(st.lists(st.integers(0, S_), min_size=B_, max_size=B_))
        kwargs["key_value_seq_lengths"] = jnp.array(kv_len)
        ref["kv_lengths"] = kv_len
    if draw(st.booleans()):
        cap = draw(st.sampled_from([0.5, 4.0]))
        kwargs["logits_soft_cap"], ref["softcap"] = cap, cap
    dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
    return (B_, T_, S_, N_, K_, H_), kwargs, ref, dtype, draw(st.integers(0, 1000))


@given(problem=_problems())
def test_property_matches_reference(problem):
    dims, kwargs, ref, dtype, seed = problem
    q, k, v = qkv(seed, *dims, dtype=dtype)
    out = jax.jit(lambda q, k, v: jattn.dot_product_attention(q, k, v, **kwargs))(q, k, v)
    f32 = lambda x: x.astype(jnp.float32)
    ref_out, _, _ = reference_attention(f32(q), f32(k), f32(v), **ref)
    assert_close(f32(out), ref_out, RTOL[dtype])


# ------------------------------------------------------------------- bad input
q0, k0, v0 = qkv(13, B, T, S, N, K, H)
BAD_CALLS = {
    "query rank": (dict(query=q0[0, 0]), r"query: got shape \(6, 3\).*expected rank 4 \(B, T, N, H\)"),
    "key rank": (dict(key=k0[0]), r"key: got shape \(7, 3, 3\).*expected rank 4"),
    "value rank": (dict(value=v0[..., None]), r"value: got shape .*expected rank 4"),
    "batch mismatch": (dict(key=k0[:1], value=v0[:1]), r"key: batch size 1 differs from query's 2"),
    "head dim mismatch": (dict(key=k0[..., :2]), r"key: head dim 2 differs from query's 3"),
    "S mismatch": (dict(value=v0[:, :4]), r"value: got shape \(2, 4, 3, 3\); expected \(2, 7, 3\)"),
    "K mismatch": (dict(value=v0[:, :, :1]), r"value: got shape .*expected \(2, 7, 3\)"),
    "N not multiple of K": (dict(query=q0[:, :, :4]), r"4 query heads is not a multiple of key's 3"),
    "dtype mismatch": (dict(key=k0.astype(jnp.bfloat16)), r"expected one dtype; got float32, bfloat16, float32"),
    "integer inputs": (dict(query=jnp.ones((B, T, N, H), jnp.int32)), r"query: expected a floating dtype.*got int32"),
    "bias not broadcastable": (dict(bias=jnp.zeros((B, N, T, S + 1))), r"bias: got shape \(2, 6, 5, 8\); expected a shape broadcastable to BNTS = \(2, 6, 5, 7\)"),
    "bias rank": (dict(bias=jnp.zeros((1, B, N, T, S))), r"bias: got shape .* expected at most rank 4"),
    "mask not broadcastable": (dict(mask=jnp.ones((B, 3, T, S), bool)), r"mask: got shape \(2, 3, 5, 7\); expected .*\(2, 6, 5, 7\)"),
    "mask not boolean": (dict(mask=jnp.ones((B, N, T, S))), r"mask: expected a boolean array.*got dtype float32"),
    "query lengths shape": (dict(query_seq_lengths=jnp.array([1, 2, 3])), r"query_seq_lengths: got shape \(3,\); expected \(2,\) \(or \(1,\)\)"),
    "kv lengths dtype": (dict(key_value_seq_lengths=jnp.array([1.0, 2.0])), r"key_value_seq_lengths: expected an integer array; got dtype float32"),
    "window negative": (dict(local_window_size=(-1, 2)), r"local_window_size: got \(-1, 2\); expected a non-negative int"),
    "window triple": (dict(local_window_size=(1, 2, 3)), r"local_window_size: got \(1, 2, 3\)"),
    "dropout without key": (dict(dropout_rate=0.1), r"dropout_rng: dropout_rate=0.1 needs a PRNG key"),
    "dropout rate range": (dict(dropout_rate=1.0, dropout_rng=jax.random.key(0)), r"dropout_rate: expected a number in \[0, 1\); got 1.0"),
    "unknown implementation": (dict(implementation="flash"), r"implementation: got 'flash'; expected one of None, 'xla', 'dense', 'chunked', 'cudnn'"),
    "cudnn on cpu": (dict(implementation="cudnn"), r"implementation='cudnn' cannot serve this call: needs an NVIDIA GPU"),
    "weights from chunked": (dict(implementation="chunked", return_weights=True), r"implementation='chunked' cannot serve this call: cannot give returning the weights: it never materialises the weights"),
    "segment ids shape": (dict(query_segment_ids=jnp.zeros((B, T + 1), jnp.int32), key_value_segment_ids=jnp.zeros((B, S), jnp.int32)), r"query_segment_ids: got shape \(2, 6\); expected \(2, 5\)"),
    "kv segments without q": (dict(key_value_segment_ids=jnp.zeros((B, S), jnp.int32)), r"key_value_segment_ids: given without query_segment_ids"),
    "segments T != S": (dict(query_segment_ids=jnp.zeros((B, T), jnp.int32)), r"key_value_segment_ids: required when T != S \(T=5, S=7\)"),
    "offset shape": (dict(query_offset=jnp.array([1, 2, 3])), r"query_offset: got shape \(3,\); expected \(2,\)"),
    "soft cap": (dict(logits_soft_cap=-1.0), r"logits_soft_cap: expected a positive number or None; got -1.0"),
    "scale": (dict(scale=float("nan")), r"scale: expected a finite number or None; got nan"),
    "score_mod type": (dict(score_mod=3), r"score_mod: expected a callable .*got int"),
    "block sizes": (dict(block_sizes=(0, 4)), r"block_sizes: expected a \(block_q, block_kv\) pair of positive ints; got \(0, 4\)"),
    "weights and residual": (dict(return_weights=True, return_residual=True), r"return_weights and return_residual: ask for one"),
    "mask object field": (dict(mask=masks.SegmentIds(jnp.zeros((B, T + 2), jnp.int32), jnp.zeros((B, S), jnp.int32))), r"SegmentIds.q_segment_ids: got shape \(2, 7\)"),
    "is_causal type": (dict(is_causal="yes"), r"is_causal: expected a bool; got str"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_raises_a_clear_error(case):
    overrides, message = BAD_CALLS[case]
    args = dict(query=q0, key=k0, value=v0)
    kwargs = {name: overrides.pop(name) for name in list(overrides) if name not in args}
    args.update(overrides)
    with pytest.raises((ValueError, TypeError), match=message):
        jattn.dot_product_attention(args["query"], args["key"], args["value"], **kwargs)
