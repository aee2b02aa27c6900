"""`jattn.nnx`: parity with `flax.nnx.MultiHeadAttention` (outputs and parameter
gradients), the jattn-only options against Flax with the equivalent dense mask and
against a float64 NumPy model, dropout, dtypes, bad input, and the ``attention_fn``
adapter swapped into Flax's own module."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
import jattn.nnx
from jattn.cache import KVCache
from tests.checks import assert_close
from tests.reference import reference_attention

RTOL = 1e-5


def normal(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def perturb(module, seed, scale=0.1):
    """Add noise to every parameter (non-zero biases and norm scales)."""
    rng = np.random.default_rng(seed)
    state = nnx.state(module, nnx.Param)
    nnx.update(module, jax.tree.map(lambda p: p + scale * normal(rng, p.shape), state))
    return module


def copy_params(src, dst):
    nnx.update(dst, nnx.state(src, nnx.Param))
    return dst


def random_mask(rng, shape):
    """A boolean mask where every query row keeps at least one key (Flax and jattn
    differ on fully masked rows: the mean of the values versus zeros)."""
    mask = rng.random(shape) < 0.6
    mask[..., 0] = True
    return jnp.asarray(mask)


def _split_kwargs(kwargs):
    """Array-like keyword arguments are traced; the rest (bools, windows, functions)
    is static."""
    def traced(v):
        return isinstance(v, (jax.Array, np.ndarray, KVCache, jattn.masks.Mask))
    arrays = {k: v for k, v in kwargs.items() if traced(v)}
    static = tuple(sorted((k, v) for k, v in kwargs.items() if not traced(v)))
    return arrays, static


@functools.partial(nnx.jit, static_argnames=("static",))
def _call(module, args, arrays, static):
    return module(*args, **arrays, **dict(static))


def jcall(module, *args, **kwargs):
    """``module(*args, **kwargs)`` under nnx.jit (one compilation instead of many
    op-by-op ones: the tests run several times faster)."""
    arrays, static = _split_kwargs(kwargs)
    return _call(module, args, arrays, static)


@functools.partial(nnx.jit, static_argnames=("static", "seed"))
def _out_and_grads(module, args, arrays, static, seed):
    def loss(m):
        out = m(*args, **arrays, **dict(static))
        c = normal(np.random.default_rng(seed), out.shape)
        return jnp.sum(out * c), out

    (_, out), grads = nnx.value_and_grad(loss, has_aux=True)(module)
    return out, grads


def out_and_grads(module, args, kwargs, seed):
    """The output and d(sum(out * c))/d(params) for a fixed random cotangent c."""
    arrays, static = _split_kwargs(kwargs)
    return _out_and_grads(module, args, arrays, static, seed)


def assert_trees_close(actual, expected, rtol=RTOL):
    """Leaf by leaf within rtol of the leaf's scale.  A leaf that is zero in exact
    arithmetic (the key bias: adding one vector to every key shifts a softmax row by a
    constant) holds only round-off; it is checked against the scale of the whole tree."""
    a = jax.tree.leaves(actual)
    e = jax.tree.leaves(expected)
    assert len(a) == len(e) and len(a) > 0
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    scale = max(float(np.abs(np.asarray(y)).max()) for y in e)
    for x, y in zip(a, e):
        if float(np.abs(np.asarray(y)).max()) < 1e-4 * scale:
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-4 * scale)
        else:
            assert_close(x, y, rtol)


# --- parity with flax.nnx.MultiHeadAttention ---------------------------------------

PARITY_CASES = {
    # name: (constructor args, T, S or None for self-attention, call kind)
    "self": (dict(num_heads=3, in_features=12), 5, None, "plain"),
    "self_causal": (dict(num_heads=3, in_features=12), 5, None, "causal"),
    "cross_mask": (dict(num_heads=3, in_features=12, in_kv_features=7, qkv_features=9, out_features=10), 5, 7, "mask"),
    "gqa_cross_mask": (dict(num_heads=6, num_kv_heads=2, in_features=18), 5, 7, "mask"),
    "mqa_causal": (dict(num_heads=3, num_kv_heads=1, in_features=12), 5, None, "causal"),
}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_parity_with_flax_nnx_outputs_and_gradients(case):
    ctor, T, S, kind = PARITY_CASES[case]
    seed = sorted(PARITY_CASES).index(case)
    rng = np.random.default_rng(100 + seed)
    theirs = perturb(nnx.MultiHeadAttention(**ctor, decode=False, rngs=nnx.Rngs(seed)), seed)
    ours = copy_params(theirs, jattn.nnx.MultiHeadAttention(**ctor, rngs=nnx.Rngs(seed + 50)))
    B, D = 2, ctor["in_features"]
    args = (normal(rng, (B, T, D)),)
    if S is not None:
        args += (normal(rng, (B, S, ctor.get("in_kv_features", D))),)
    kwargs = {}
    if kind == "causal":
        kwargs = dict(is_causal=True)
    elif kind == "mask":
        kwargs = dict(mask=random_mask(rng, (B, 1, T, S or T)))
    out, grads = out_and_grads(ours, args, kwargs, seed)
    want, want_grads = out_and_grads(theirs, args, kwargs, seed)
    assert out.shape == (B, T, ctor.get("out_features", D))
    assert_close(out, want, RTOL)
    assert_trees_close(grads, want_grads)


def flax_mask(q_ok, kv_ok, allowed):
    """[B, 1, T, S] from per-token validity and a [B?, T, S] pair predicate."""
    return jnp.asarray(q_ok[:, None, :, None] & kv_ok[:, None, None, :] & allowed[:, None])


def test_self_attention_options_match_flax_with_equivalent_dense_masks():
    """segment_ids, lengths, windows: jattn's index masks versus the same masks spelled
    out densely for Flax's module (use_bias=False, SelfAttention's default)."""
    rng = np.random.default_rng(200)
    theirs = perturb(nnx.MultiHeadAttention(3, 12, use_bias=False, decode=False, rngs=nnx.Rngs(1)), 1)
    ours = copy_params(theirs, jattn.nnx.SelfAttention(12, 3, rngs=nnx.Rngs(2)))
    B, T = 2, 7
    x = normal(rng, (B, T, 12))
    t = np.arange(T)
    causal = np.broadcast_to(t[None, :, None] >= t[None, None, :], (B, T, T))
    ones = np.ones((B, T), bool)

    seg = np.array([[0, 0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 1]])
    got = jcall(ours, x, segment_ids=jnp.asarray(seg))
    want = jcall(theirs, x, mask=flax_mask(ones, ones, causal & (seg[:, :, None] == seg[:, None, :])))
    assert_close(got, want, RTOL)

    lengths = np.array([4, 7])
    got = jcall(ours, x, lengths=jnp.asarray(lengths))
    valid = t[None, :] < lengths[:, None]
    want = jcall(theirs, x, mask=flax_mask(valid, valid, causal))
    for b in range(B):
        assert_close(got[b, : lengths[b]], want[b, : lengths[b]], RTOL)
    np.testing.assert_array_equal(got[0, 4:], 0.0)         # padded rows: zeros (no out bias)

    got = jcall(ours, x, local_window_size=(2, 0))
    want = jcall(theirs, x, mask=flax_mask(ones, ones, causal & (t[None, :, None] - t[None, None, :] <= 2)))
    assert_close(got, want, RTOL)

    got = jcall(ours, x, is_causal=False, mask=jattn.masks.PrefixLM(prefix_length=3))
    want = jcall(theirs, x, mask=flax_mask(ones, ones, causal | (t[None, None, :] < 3)))
    assert_close(got, want, RTOL)


def test_cross_attention_lengths_and_offset_match_flax():
    rng = np.random.default_rng(201)
    theirs = perturb(nnx.MultiHeadAttention(3, 12, num_kv_heads=1, decode=False, rngs=nnx.Rngs(3)), 3)
    ours = copy_params(theirs, jattn.nnx.MultiHeadAttention(3, 12, num_kv_heads=1, rngs=nnx.Rngs(4)))
    B, T, S = 2, 3, 7
    xq, xk = normal(rng, (B, T, 12)), normal(rng, (B, S, 12))
    kv_len, offset = np.array([5, 7]), np.array([4, 2])
    got = jcall(ours, xq, xk, is_causal=True, query_offset=jnp.asarray(offset),
               key_value_seq_lengths=jnp.asarray(kv_len))
    s = np.arange(S)
    allowed = (s[None, None, :] <= np.arange(T)[None, :, None] + offset[:, None, None]) & (
        s[None, None, :] < kv_len[:, None, None])
    want = jcall(theirs, xq, xk, mask=jnp.asarray(allowed[:, None]))
    assert_close(got, want, RTOL)


# --- every option against a float64 NumPy model ------------------------------------


def numpy_rope(x, positions, base):
    half = x.shape[-1] // 2
    theta = base ** (-2.0 * np.arange(half) / x.shape[-1])
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * positions[..., None, None] * theta)
    return np.concatenate([z.real, z.imag], axis=-1)


def numpy_module(params, xq, xk, *, qk_norm_eps=None, rope_base=None, positions=None,
                 key_positions=None, **reference_kwargs):
    """Projections, RMS QK-norm, RoPE and attention (tests/reference.py) in float64."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    xq, xk = np.asarray(xq, np.float64), np.asarray(xk, np.float64)

    def project(x, name):
        return np.einsum("BTD,DNH->BTNH", x, p[name]["kernel"]) + p[name].get("bias", 0.0)

    q, k, v = project(xq, "query"), project(xk, "key"), project(xk, "value")
    if qk_norm_eps is not None:
        q = q / np.sqrt(np.mean(q**2, -1, keepdims=True) + qk_norm_eps) * p["query_norm"]["scale"]
        k = k / np.sqrt(np.mean(k**2, -1, keepdims=True) + qk_norm_eps) * p["key_norm"]["scale"]
    if rope_base is not None:
        q = numpy_rope(q, np.asarray(positions, np.float64), rope_base)
        k = numpy_rope(k, np.asarray(key_positions, np.float64), rope_base)
    out, weights, _ = reference_attention(q, k, v, **reference_kwargs)
    return np.einsum("BTNH,NHF->BTF", out, p["out"]["kernel"]) + p["out"].get("bias", 0.0), weights


def test_qk_norm_rope_soft_cap_gqa_against_numpy():
    rng = np.random.default_rng(300)
    layer = perturb(jattn.nnx.SelfAttention(
        15, 6, num_kv_heads=3, head_dim=4, out_features=11, use_bias=True, qk_norm=True,
        use_rope=True, rope_base=30.0, logits_soft_cap=2.5, implementation="dense",
        rngs=nnx.Rngs(5)), 5)
    B, T = 2, 5
    x = normal(rng, (B, T, 15))
    positions = np.array([[3, 4, 5, 6, 7], [0, 1, 2, 0, 1]])
    out, weights = jcall(layer, x, positions=jnp.asarray(positions), return_weights=True)
    params = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
    want, want_w = numpy_module(
        params, x, x, qk_norm_eps=1e-6, rope_base=30.0, positions=positions,
        key_positions=positions, is_causal=True, softcap=2.5,
    )
    assert out.shape == (B, T, 11) and weights.shape == (B, 6, T, T)
    assert_close(out, want, RTOL)
    assert_close(weights, want_w, RTOL)


def test_cross_attention_rope_bias_and_score_mod_against_numpy():
    rng = np.random.default_rng(301)
    layer = perturb(jattn.nnx.MultiHeadAttention(
        3, 12, in_kv_features=8, use_rope=True, rope_base=100.0, rngs=nnx.Rngs(6)), 6)
    B, T, S = 2, 5, 7
    xq, xk = normal(rng, (B, T, 12)), normal(rng, (B, S, 8))
    qpos, kpos = np.array([[7, 8, 9, 10, 11]] * 2), np.tile(np.arange(S), (2, 1)) + 2
    bias = normal(rng, (1, 3, T, S))

    def score_fn(score, head, q_idx, kv_idx):
        return score - 0.1 * (head + 1) * abs(q_idx - kv_idx)

    out = jcall(layer, xq, xk, positions=jnp.asarray(qpos), key_positions=jnp.asarray(kpos),
                bias=bias, score_mod=score_fn)
    want, _ = numpy_module(
        nnx.to_pure_dict(nnx.state(layer, nnx.Param)), xq, xk, rope_base=100.0, positions=qpos,
        key_positions=kpos, bias=bias, score_fn=score_fn,
    )
    assert_close(out, want, RTOL)


def test_packed_sequences_with_rope_equal_separate_passes():
    rng = np.random.default_rng(302)
    layer = perturb(jattn.nnx.SelfAttention(12, 3, num_kv_heads=1, use_rope=True, qk_norm=True,
                                            rngs=nnx.Rngs(7)), 7)
    a, b = normal(rng, (1, 4, 12)), normal(rng, (1, 3, 12))
    packed = jnp.concatenate([a, b], axis=1)
    out = jcall(layer, packed, segment_ids=jnp.array([[0, 0, 0, 0, 1, 1, 1]]),
                positions=jnp.array([[0, 1, 2, 3, 0, 1, 2]]))
    assert_close(out[:, :4], jcall(layer, a), RTOL)
    assert_close(out[:, 4:], jcall(layer, b), RTOL)
    # Inside a segment RoPE scores depend on p - s only, so default positions (not
    # restarted) give the same result; but packing without segment ids does not.
    shifted = jcall(layer, packed, segment_ids=jnp.array([[0, 0, 0, 0, 1, 1, 1]]))
    assert_close(shifted[:, 4:], out[:, 4:], RTOL)
    unsegmented = jcall(layer, packed, positions=jnp.array([[0, 1, 2, 3, 0, 1, 2]]))
    assert np.abs(np.asarray(unsegmented[:, 4:] - out[:, 4:])).max() > 1e-3


# --- dropout, jit, dtypes, views ---------------------------------------------------


def test_dropout_switch_and_keys():
    rng = np.random.default_rng(400)
    x = normal(rng, (2, 5, 12))
    layer = perturb(jattn.nnx.SelfAttention(12, 3, dropout_rate=0.4, rngs=nnx.Rngs(8)), 8)
    plain = copy_params(layer, jattn.nnx.SelfAttention(12, 3, rngs=nnx.Rngs(9)))
    assert_close(layer(x, deterministic=True), plain(x), RTOL)

    # With rngs given, the key is rngs.dropout(); check against the functional call.
    got = layer(x, deterministic=False, rngs=nnx.Rngs(dropout=11))
    q, k, v = layer.query(x), layer.key(x), layer.value(x)
    ctx = jattn.dot_product_attention(q, k, v, is_causal=True, dropout_rate=0.4,
                                      dropout_rng=nnx.Rngs(dropout=11).dropout())
    assert_close(got, layer.out(ctx), RTOL)
    assert np.abs(np.asarray(got - plain(x))).max() > 1e-3

    # The module's own stream advances: two calls differ; nnx.view switches it off.
    first, second = layer(x, deterministic=False), layer(x, deterministic=False)
    assert np.abs(np.asarray(first - second)).max() > 1e-3
    assert_close(nnx.view(layer, deterministic=True)(x), plain(x), RTOL)

    with pytest.raises(ValueError, match="deterministic: dropout_rate=0.4 needs deterministic=True"):
        layer(x)
    no_rngs = jattn.nnx.SelfAttention(12, 3, dropout_rate=0.4, keep_rngs=False, rngs=nnx.Rngs(10))
    with pytest.raises(ValueError, match="rngs: dropout with deterministic=False needs random keys"):
        no_rngs(x, deterministic=False)


def test_jit_and_dtypes():
    rng = np.random.default_rng(401)
    x = normal(rng, (2, 5, 12))
    layer = perturb(jattn.nnx.SelfAttention(12, 3, num_kv_heads=1, use_rope=True, rngs=nnx.Rngs(12)), 12)
    want = jcall(layer, x)
    assert_close(nnx.jit(lambda m, x: m(x))(layer, x), want, RTOL)

    half = copy_params(layer, jattn.nnx.SelfAttention(12, 3, num_kv_heads=1, use_rope=True,
                                                      dtype=jnp.bfloat16, rngs=nnx.Rngs(13)))
    assert half.query.kernel[...].dtype == jnp.float32
    got = jcall(half, x)
    assert got.dtype == jnp.bfloat16
    assert_close(got.astype(jnp.float32), want, 5e-2)

    stored = jattn.nnx.SelfAttention(12, 3, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(14))
    assert stored.out.kernel[...].dtype == jnp.bfloat16
    assert jcall(stored, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    assert stored.create_cache(2, 8).dtype == jnp.bfloat16


def test_parameters_carry_logical_axis_names():
    layer = jattn.nnx.SelfAttention(12, 3, num_kv_heads=1, qk_norm=True, use_bias=True,
                                    sharding_rules=jattn.nnx.LOGICAL_AXIS_RULES, rngs=nnx.Rngs(15))
    names = {
        path: v.get_metadata()["out_sharding"]
        for path, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))
    }
    assert names[("query", "kernel")] == ("embed", "heads", "head_dim")
    assert names[("key", "kernel")] == ("embed", "kv_heads", "head_dim")
    assert names[("value", "bias")] == ("kv_heads", "head_dim")
    assert names[("out", "kernel")] == ("heads", "head_dim", "embed")
    assert names[("query_norm", "scale")] == ("head_dim",)
    specs = nnx.get_partition_spec(nnx.state(layer, nnx.Param))
    assert tuple(specs["query"]["kernel"].get_value()) == (None, "model", None)
    assert tuple(specs["out"]["bias"].get_value()) == (None,)


# --- bad input ---------------------------------------------------------------------


def _sa(**kw):
    return jattn.nnx.SelfAttention(**{"in_features": 12, "num_heads": 3, "rngs": nnx.Rngs(16), **kw})


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: _sa(num_heads=5), r"num_heads: 5 does not divide in_features=12"),
        (lambda: jattn.nnx.MultiHeadAttention(5, 12, qkv_features=16, rngs=nnx.Rngs(0)), r"num_heads: 5 does not divide qkv_features=16"),
        (lambda: _sa(num_kv_heads=2), r"num_kv_heads: 2 does not divide num_heads=3"),
        (lambda: _sa(num_heads=0), r"num_heads: expected a positive int; got 0"),
        (lambda: _sa(num_heads=4, head_dim=3, use_rope=True), r"head_dim: RoPE .* must be\s+even; got 3"),
        (lambda: jattn.nnx.MultiHeadAttention(3, 12, qkv_features=12, head_dim=5, rngs=nnx.Rngs(0)), r"qkv_features: got 12 .* expected num_heads \* head_dim = 15"),
        (lambda: _sa(dropout_rate=1.0), r"dropout_rate: expected a number in \[0, 1\); got 1.0"),
        (lambda: _sa(implementation="fast"), r"implementation: got 'fast'; expected one of None, 'xla'"),
        (lambda: _sa(logits_soft_cap=-1.0), r"logits_soft_cap: expected a positive number or None; got -1.0"),
    ],
)
def test_bad_construction(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@functools.lru_cache(maxsize=None)
def _layers():
    return _sa(num_kv_heads=1), jattn.nnx.MultiHeadAttention(3, 12, in_kv_features=8, rngs=nnx.Rngs(17))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda sa, mha: sa(jnp.zeros((2, 5, 10))), r"inputs_q: got feature size 10 \(shape \(2, 5, 10\)\); expected in_features=12"),
        (lambda sa, mha: mha(jnp.zeros((2, 5, 12)), jnp.zeros((2, 7, 12))), r"inputs_k: got feature size 12 .* expected in_kv_features=8"),
        (lambda sa, mha: mha(jnp.zeros((2, 5, 12)), None, jnp.zeros((2, 7, 8))), r"inputs_k: None while inputs_v is given"),
        (lambda sa, mha: sa(jnp.zeros((2, 5, 12)), mask=jnp.ones((2, 1, 5, 4), bool)), r"mask: got shape \(2, 1, 5, 4\); expected a shape broadcastable to BNTS = \(2, 3, 5, 5\)"),
        (lambda sa, mha: mha(jnp.zeros((2, 5, 12)), jnp.zeros((2, 7, 8)), mask=jnp.ones((2, 2, 5, 7), bool)), r"mask: got shape \(2, 2, 5, 7\); expected a shape broadcastable to BNTS = \(2, 3, 5, 7\)"),
        (lambda sa, mha: mha(jnp.zeros((2, 5, 12))), r"inputs_k: None \(self-attention\), but the key/value projections take in_kv_features=8"),
        (lambda sa, mha: sa(jnp.zeros((2, 5, 12)), segment_ids=jnp.zeros((2, 4), jnp.int32)), r"segment_ids: got shape \(2, 4\); expected \(B, T\) = \(2, 5\)"),
        (lambda sa, mha: sa(jnp.zeros((2, 5, 12)), lengths=jnp.array([5])), r"lengths: got shape \(1,\); expected \(B,\) = \(2,\)"),
        (lambda sa, mha: sa(jnp.zeros((2, 5, 12)), positions=jnp.zeros((2, 4), jnp.int32)), r"positions: got shape \(2, 4\); expected \(B, T\) = \(2, 5\)"),
        (lambda sa, mha: sa(jnp.zeros((2, 1, 12)), cache=KVCache.create(2, 8, 3, 4)), r"cache: holds keys \(2, 8, 3, 4\) .* needs keys \[B, M, K, H\] = \(2, M, 1, 4\)"),
        (lambda sa, mha: sa(jnp.zeros((2, 1, 12)), cache=KVCache.create(2, 8, 1, 4), segment_ids=jnp.zeros((2, 1), jnp.int32)), r"segment_ids: not supported with a cache"),
        (lambda sa, mha: mha(jnp.zeros((2, 1, 12)), jnp.zeros((2, 1, 8)), cache=KVCache.create(2, 8, 3, 4), query_offset=1), r"query_offset: not supported with a cache"),
    ],
)
def test_bad_call(call, match):
    sa, mha = _layers()
    with pytest.raises((ValueError, TypeError), match=match):
        call(sa, mha)


# --- the attention_fn adapter in flax.nnx.MultiHeadAttention ------------------------


def flax_pair(seed, **ctor):
    """Flax's module with its default attention and with jattn's, identical weights
    and RNG streams."""
    ctor = {"num_heads": 3, "in_features": 12, "decode": False, **ctor}
    theirs = nnx.MultiHeadAttention(**ctor, rngs=nnx.Rngs(seed))
    ours = nnx.MultiHeadAttention(**ctor, attention_fn=jattn.nnx.attention_fn, rngs=nnx.Rngs(seed))
    return perturb(theirs, seed), perturb(ours, seed)


@pytest.mark.parametrize(
    "ctor, shape, kind",
    [
        (dict(), (2, 5, 12), "plain"),
        (dict(num_kv_heads=1), (2, 5, 12), "causal"),
        (dict(), (2, 3, 5, 12), "float_mask"),    # two batch axes, a 0/1 float mask
        (dict(), (5, 12), "causal"),              # no batch axis
    ],
)
def test_adapter_matches_flax_default(ctor, shape, kind):
    rng = np.random.default_rng(500 + len(shape))
    theirs, ours = flax_pair(20 + len(shape), **ctor)
    x = normal(rng, shape)
    kwargs = {}
    if kind == "causal":
        kwargs = dict(is_causal=True)
    elif kind in ("mask", "float_mask"):
        mask = random_mask(rng, shape[:-2] + (1, shape[-2], shape[-2]))
        kwargs = dict(mask=mask.astype(jnp.float32) if kind == "float_mask" else mask)
    out, grads = out_and_grads(ours, (x,), kwargs, 1)
    want, want_grads = out_and_grads(theirs, (x,), kwargs, 1)
    assert_close(out, want, RTOL)
    assert_trees_close(grads, want_grads)


def test_adapter_broadcast_dropout_is_flaxs_exactly():
    rng = np.random.default_rng(510)
    theirs, ours = flax_pair(30, num_kv_heads=1, dropout_rate=0.3)
    x = normal(rng, (2, 5, 12))
    want = theirs(x, deterministic=False)
    got = ours(x, deterministic=False)
    assert_close(got, want, RTOL)
    assert_close(ours(x, deterministic=True), theirs(x, deterministic=True), RTOL)
    assert np.abs(np.asarray(got - ours(x, deterministic=True))).max() > 1e-3


def test_adapter_per_head_dropout_and_sowed_weights():
    rng = np.random.default_rng(511)
    theirs, ours = flax_pair(31, dropout_rate=0.3, broadcast_dropout=False)
    _, fresh = flax_pair(31, dropout_rate=0.3, broadcast_dropout=False)
    x = normal(rng, (2, 5, 12))
    got = ours(x, deterministic=False)
    # jattn's own dropout with the key Flax draws (the module's forked stream).
    q, k, v = ours.query(x), ours.key(x), ours.value(x)
    want = ours.out(jattn.dot_product_attention(q, k, v, dropout_rate=0.3, dropout_rng=fresh.rngs()))
    assert_close(got, want, RTOL)

    # Sowed weights (before dropout) are Flax's.
    @nnx.jit
    def sowed(module):
        _, intermediates = nnx.capture(module, nnx.Intermediate)(
            x, deterministic=True, sow_weights=True, is_causal=True)
        return jax.tree.leaves(intermediates)

    w_theirs, w_ours = sowed(theirs), sowed(ours)
    assert len(w_ours) == len(w_theirs) == 1 and w_ours[0].shape == (2, 3, 5, 5)
    assert_close(w_ours[0], w_theirs[0], RTOL)


def test_adapter_extras_and_refusals():
    rng = np.random.default_rng(512)
    q, k, v = normal(rng, (2, 5, 3, 4)), normal(rng, (2, 7, 1, 4)), normal(rng, (2, 7, 1, 4))
    fn = functools.partial(jattn.nnx.attention_fn, logits_soft_cap=1.5, implementation="dense")
    assert_close(fn(q, k, v, precision=jax.lax.Precision.HIGHEST),
                 jattn.dot_product_attention(q, k, v, logits_soft_cap=1.5), RTOL)
    with pytest.raises(ValueError, match="qk_attn_weights_einsum: custom einsums are not supported"):
        jattn.nnx.attention_fn(q, k, v, qk_attn_weights_einsum=jnp.einsum)
    with pytest.raises(ValueError, match="dropout_rng: dropout_rate=0.5"):
        jattn.nnx.attention_fn(q, k, v, dropout_rate=0.5, deterministic=False)
    with pytest.raises(ValueError, match=r"key: got shape \(7, 1, 4\); expected the batch axes \(2,\)"):
        jattn.nnx.attention_fn(q, k[0], v)
