"""The drop-in promise, argument by argument: `jattn.nnx.MultiHeadAttention` against
`flax.nnx.MultiHeadAttention` and `jattn.linen.MultiHeadAttention` against
`flax.linen.MultiHeadDotProductAttention`, with the same weights (copied, or drawn
from the same key where initialisers are the argument), give the same outputs and
parameter gradients; the arguments that cannot mean the same raise and say why;
stateful decoding equals the full causal forward; float masks, several batch axes,
sowed weights; and the ``attention_fn`` adapter takes every keyword Flax passes.

The arguments whose parity tests predate this file stay where they are:
``num_heads``, ``in_features``, ``qkv_features``, ``out_features``,
``in_kv_features`` and ``num_kv_heads`` with masks and ``is_causal`` in
``tests/test_nnx.py`` (``test_parity_with_flax_nnx_outputs_and_gradients``) and
``tests/test_linen.py`` (``test_parity_with_flax_linen_outputs_and_gradients``), the
adapter with GQA, no batch axis and dropout there too.

The checks run eagerly on one set of small shapes (B=2, T=4, D=8, two heads of 4):
the primitives then compile once for the whole file, far cheaper than compiling every
module configuration under jit.

Every query row keeps at least one allowed key: rows with none differ by design (the
numerics policy: jattn gives zeros, Flax the mean of the values)."""

from __future__ import annotations

import functools
import inspect

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx.nn import dtypes

import jattn
import jattn.linen
import jattn.nnx
from jattn import _flax_core as core
from jattn import flax_adapter, options
from tests.checks import assert_close

RTOL = 1e-5
B, T, D = 2, 4, 8


def normal(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)


def perturb(module, seed, scale=0.1):
    """Noise on every parameter (non-zero biases and norm scales)."""
    rng = np.random.default_rng(seed)
    state = nnx.state(module, nnx.Param)
    nnx.update(module, jax.tree.map(lambda p: p + scale * normal(rng, p.shape, p.dtype), state))
    return module


def copy_state(src, dst):
    """Parameters and dropout streams of ``src`` into ``dst``."""
    nnx.update(dst, nnx.state(src, nnx.Param))
    rng_state = nnx.state(src, nnx.RngState)
    if jax.tree.leaves(rng_state):
        nnx.update(dst, rng_state)
    return dst


def assert_trees_close(actual, expected, rtol=RTOL):
    """Leaf by leaf; leaves zero in exact arithmetic (the key bias: one vector added
    to every key shifts a softmax row by a constant) are judged against the tree's
    scale, and so is every leaf at a low-precision tolerance."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    leaves = jax.tree.leaves(expected)
    assert leaves
    scale = max(float(np.abs(np.asarray(y, np.float32)).max()) for y in leaves)
    for x, y in zip(jax.tree.leaves(actual), leaves):
        if rtol > 1e-3:   # low precision: round-off is judged against the tree's scale
            assert_close(x, y, rtol, atol=rtol * scale)
        elif float(np.abs(np.asarray(y, np.float32)).max()) < 1e-4 * scale:
            np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=0, atol=1e-4 * scale)
        else:
            assert_close(x, y, rtol)


def _cotangent(out):
    return jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)


def nnx_out_and_grads(module, *args, **kwargs):
    """The output and d(sum(out · c))/d(params) for a fixed cotangent c, as a plain
    dict.  Eager: with one set of small shapes the primitives compile once for the
    whole file, much cheaper than compiling each module under jit."""
    def loss(m):
        out = m(*args, **kwargs)
        return jnp.sum(out.astype(jnp.float32) * _cotangent(out)), out

    (_, out), grads = nnx.value_and_grad(loss, has_aux=True)(module)
    return out, nnx.to_pure_dict(grads)


def nnx_pair(ctor, seed=0, **ours_only):
    """Flax's module (parameters perturbed) and jattn's with its state copied."""
    theirs = perturb(nnx.MultiHeadAttention(**{"decode": False, **ctor}, rngs=nnx.Rngs(seed)), seed)
    ours = copy_state(theirs, jattn.nnx.MultiHeadAttention(**ctor, **ours_only, rngs=nnx.Rngs(seed + 100)))
    return theirs, ours


def check_nnx(theirs, ours, *args, rtol=RTOL, **kwargs):
    out, grads = nnx_out_and_grads(ours, *args, **kwargs)
    want, want_grads = nnx_out_and_grads(theirs, *args, **kwargs)
    assert out.shape == want.shape and out.dtype == want.dtype
    assert_close(out, want, rtol)
    assert_trees_close(grads, want_grads, rtol)
    return out


def rounding_promote(args, /, *, dtype=None, inexact=True):
    """A promotion function that rounds through bfloat16: used only if passed on."""
    return tuple(None if a is None else jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32) for a in args)


def doubled_dot_general(*args, **kwargs):
    kwargs.pop("out_sharding", None)
    return 2.0 * jax.lax.dot_general(*args, **kwargs)


class HalvedDotGeneral:
    """A ``*_dot_general_cls``: instantiated by the projection, then called."""

    def __call__(self, *args, **kwargs):
        kwargs.pop("out_sharding", None)
        return 0.5 * jax.lax.dot_general(*args, **kwargs)


def sharper_attention(query, key, value, **kwargs):
    """A user ``attention_fn``: Flax's, at twice the inverse temperature."""
    return nnx.dot_product_attention(query * 2.0, key, value, **kwargs)


# --- NNX: constructor arguments -----------------------------------------------------

NNX_CTOR_CASES = {
    # name: (constructor, call kind, rtol)
    "dtype": (dict(num_heads=2, in_features=D, dtype=jnp.bfloat16), "plain", 3e-2),
    "param_dtype": (dict(num_heads=2, in_features=D, param_dtype=jnp.bfloat16), "plain", 3e-2),
    "use_bias": (dict(num_heads=2, in_features=D, use_bias=False), "causal", RTOL),
    "precision": (dict(num_heads=2, in_features=D, precision=jax.lax.Precision.HIGHEST), "plain", RTOL),
    "normalize_qk": (dict(num_heads=2, in_features=D, normalize_qk=True), "causal", RTOL),
    "promote_dtype": (dict(num_heads=2, in_features=D, normalize_qk=True, qkv_promote_dtype=rounding_promote,
                           out_promote_dtype=rounding_promote, ln_promote_dtype=rounding_promote), "plain", RTOL),
    "dot_general": (dict(num_heads=2, in_features=D, qkv_dot_general=doubled_dot_general,
                         out_dot_general=doubled_dot_general), "plain", RTOL),
    "dot_general_cls": (dict(num_heads=2, in_features=D, qkv_dot_general_cls=HalvedDotGeneral,
                             out_dot_general_cls=HalvedDotGeneral), "plain", RTOL),
    "attention_fn": (dict(num_heads=2, in_features=D, attention_fn=sharper_attention), "plain", RTOL),
}


@pytest.mark.parametrize("case", sorted(NNX_CTOR_CASES))
def test_nnx_constructor_argument_means_the_same(case):
    ctor, kind, rtol = NNX_CTOR_CASES[case]
    seed = sorted(NNX_CTOR_CASES).index(case)
    theirs, ours = nnx_pair(ctor, seed)
    rng = np.random.default_rng(seed)
    args = (normal(rng, (B, T, ctor["in_features"])),)
    if kind == "cross":
        args += (normal(rng, (B, T, ctor["in_kv_features"])),)
    check_nnx(theirs, ours, *args, is_causal=kind == "causal", rtol=rtol)


def test_nnx_initialisers_draw_the_same_parameters():
    """kernel_init, out_kernel_init, bias_init, out_bias_init (and the LayerNorms of
    normalize_qk): the same key gives the same parameters, no copy needed."""
    ctor = dict(num_heads=2, in_features=D, normalize_qk=True,
                kernel_init=nnx.initializers.normal(0.3), out_kernel_init=nnx.initializers.uniform(0.2),
                bias_init=nnx.initializers.normal(0.1), out_bias_init=nnx.initializers.constant(0.25))
    theirs = nnx.MultiHeadAttention(**ctor, decode=False, rngs=nnx.Rngs(7))
    ours = jattn.nnx.MultiHeadAttention(**ctor, rngs=nnx.Rngs(7))
    want = nnx.to_pure_dict(nnx.state(theirs, nnx.Param))
    got = nnx.to_pure_dict(nnx.state(ours, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, got, want)
    np.testing.assert_array_equal(got["out"]["bias"], 0.25)
    x = normal(np.random.default_rng(7), (B, T, D))
    check_nnx(theirs, ours, x)


def test_nnx_metadata_arguments_reach_the_parameters():
    ctor = dict(num_heads=2, in_features=D, normalize_qk=True,
                kernel_metadata={"tag": "k"}, out_kernel_metadata={"tag": "ok"},
                bias_metadata={"tag": "b"}, out_bias_metadata={}, query_ln_scale_metadata={"tag": "q"},
                key_ln_scale_metadata={"tag": "kk"})
    theirs = nnx.MultiHeadAttention(**ctor, decode=False, rngs=nnx.Rngs(0))
    ours = jattn.nnx.MultiHeadAttention(**ctor, rngs=nnx.Rngs(0))

    def tags(module):
        return {path: v.get_metadata().get("tag") for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}

    assert tags(ours) == tags(theirs)
    assert tags(ours)[("out", "bias")] == "b"            # out_bias_metadata empty: bias_metadata, as Flax
    # jattn's logical axis names stay where the user gave none.
    assert nnx.state(ours, nnx.Param)["query"]["kernel"].get_metadata()["out_sharding"] == ("embed", "heads", "head_dim")


@pytest.mark.parametrize("keep_rngs", [True, False])
def test_nnx_broadcast_dropout_is_flaxs_exactly(keep_rngs):
    """broadcast_dropout=True (Flax's default): the same [T, S] keep-mask, drawn from
    the same stream (the module's, or rngs= at call time), outputs and gradients."""
    ctor = dict(num_heads=2, in_features=D, dropout_rate=0.3, keep_rngs=keep_rngs)
    theirs, ours = nnx_pair(ctor, seed=3)
    x = normal(np.random.default_rng(3), (B, T, D))
    call = {} if keep_rngs else dict(rngs=nnx.Rngs(dropout=5))
    want = theirs(x, deterministic=False, **call)
    got = ours(x, deterministic=False, **({} if keep_rngs else dict(rngs=nnx.Rngs(dropout=5))))
    assert_close(got, want, RTOL)
    assert np.abs(np.asarray(got - ours(x, deterministic=True))).max() > 1e-3
    # deterministic as a constructor default (here set by nnx.view, as Flax's set_view does).
    assert_close(nnx.view(ours, deterministic=True)(x), nnx.view(theirs, deterministic=True)(x), RTOL)
    if keep_rngs:   # gradients through the same pattern (the streams advance in step)
        check_nnx(theirs, ours, x, deterministic=False)


def test_nnx_broadcast_dropout_needs_the_dense_backend():
    layer = jattn.nnx.MultiHeadAttention(2, D, dropout_rate=0.3, implementation="chunked", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"broadcast_dropout: True .* only the dense backend materialises; "
                                         r"implementation='chunked' cannot serve it.  Pass broadcast_dropout=False"):
        layer(jnp.ones((B, T, D)), deterministic=False)


def test_nnx_per_head_dropout_is_jattns_pattern():
    """broadcast_dropout=False: an independent pattern per (example, head), as Flax's
    is; jattn draws it with `jattn.dot_product_attention` from the same key."""
    theirs, ours = nnx_pair(dict(num_heads=2, in_features=D, dropout_rate=0.5, broadcast_dropout=False), seed=4)
    x = normal(np.random.default_rng(4), (B, T, D))
    got, weights = ours(x, deterministic=False, rngs=nnx.Rngs(dropout=9), return_weights=True)
    q, k, v = ours.query(x), ours.key(x), ours.value(x)
    ctx = jattn.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=nnx.Rngs(dropout=9).dropout())
    assert_close(got, ours.out(ctx), RTOL)
    dropped = np.asarray(weights) == 0
    assert dropped.any() and (dropped[0] != dropped[1]).any() and (dropped[:, 0] != dropped[:, 1]).any()


# --- NNX: call arguments ------------------------------------------------------------


def test_nnx_masks_boolean_and_flax_float_masks():
    theirs, ours = nnx_pair(dict(num_heads=2, in_features=D), seed=5)
    rng = np.random.default_rng(5)
    x = normal(rng, (B, T, D))
    valid = np.ones((B, T), np.int32)
    valid[1, 2:] = 0
    float_mask = nnx.make_attention_mask(jnp.ones((B, T)), jnp.asarray(valid))        # float 0/1
    causal = nnx.make_causal_mask(jnp.ones((B, T)))
    assert float_mask.dtype == jnp.float32
    check_nnx(theirs, ours, x, mask=float_mask)
    check_nnx(theirs, ours, x, mask=nnx.combine_masks(float_mask, causal))
    check_nnx(theirs, ours, x, mask=float_mask.astype(bool), is_causal=True)


def test_nnx_batch_axes():
    """[batch..., T, D]: two batch axes (outputs and gradients), and none."""
    theirs, ours = nnx_pair(dict(num_heads=2, in_features=D), seed=6)
    rng = np.random.default_rng(6)
    for shape in ((1, B, T, D), (T, D)):
        x = normal(rng, shape)
        mask = rng.random(shape[:-2] + (1, T, T)) < 0.6
        mask[..., 0] = True
        mask = jnp.asarray(mask, jnp.float32)
        if len(shape) == 4:
            out = check_nnx(theirs, ours, x, mask=mask)
        else:
            out = ours(x, mask=mask)
            assert_close(out, theirs(x, mask=mask), RTOL)
        assert out.shape == shape
    _, weights = ours(x, return_weights=True, is_causal=True)
    assert weights.shape == (2, T, T)


def test_nnx_sow_weights_at_call_time():
    theirs, ours = nnx_pair(dict(num_heads=2, in_features=D, dropout_rate=0.3), seed=8)
    x = normal(np.random.default_rng(8), (1, B, T, D))

    def sowed(module):
        out, intermediates = nnx.capture(module, nnx.Intermediate)(
            x, deterministic=False, sow_weights=True, is_causal=True)
        return out, jax.tree.leaves(intermediates)

    want, w_theirs = sowed(theirs)
    got, w_ours = sowed(ours)
    assert len(w_ours) == len(w_theirs) == 1 and w_ours[0].shape == (1, B, 2, T, T)
    assert_close(w_ours[0], w_theirs[0], RTOL)          # before dropout, as Flax sows them
    assert_close(got, want, RTOL)                        # and the same dropout after


def test_nnx_sharding_arguments_reach_the_projections():
    """out_sharding / qkv_sharding go to the projections' dot_general, as in Flax."""
    seen = []

    def spy(*args, out_sharding=None, **kwargs):
        seen.append(out_sharding)
        return jax.lax.dot_general(*args, **kwargs)

    x = jnp.ones((B, T, D))
    for cls in (nnx.MultiHeadAttention, jattn.nnx.MultiHeadAttention):
        seen.clear()
        layer = cls(2, D, qkv_dot_general=spy, out_dot_general=spy, decode=False, rngs=nnx.Rngs(0))
        layer(x, out_sharding="OUT", qkv_sharding="QKV")
        assert seen == ["QKV", "QKV", "QKV", "OUT"], (cls, seen)


def _dot_precisions(jaxpr):
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _dot_precisions(sub)
    return found


def test_nnx_precision_reaches_every_matmul():
    """precision: the four projections and the two attention matmuls (whatever the
    backend).  Flax's module gives it to the projections, and to the attention matmuls
    only on its slow path (dropout or sowing): there jattn means the same."""
    high = jax.lax.Precision.HIGH
    x = jnp.ones((B, T, D))

    def precisions(layer, **call):
        graphdef, state = nnx.split(layer)

        def run(s):
            return nnx.capture(nnx.merge(graphdef, s), nnx.Intermediate)(x, **call)

        return _dot_precisions(jax.make_jaxpr(run)(state).jaxpr)

    theirs = precisions(nnx.MultiHeadAttention(2, D, precision=high, decode=False, rngs=nnx.Rngs(0)), sow_weights=True)
    assert theirs == [(high, high)] * 6
    for implementation in ("dense", "chunked"):
        layer = jattn.nnx.MultiHeadAttention(2, D, precision=high, implementation=implementation, rngs=nnx.Rngs(0))
        found = precisions(layer, is_causal=True)
        assert len(found) >= 6 and all(p == (high, high) for p in found), (implementation, found)


def test_nnx_stateful_decoding_equals_flax_and_the_full_causal_forward():
    """decode=True + init_cache(input_shape): token by token, as Flax; jattn's cache is
    a KVCache kept in the module."""
    rng = np.random.default_rng(9)
    L = T
    theirs, ours = nnx_pair(dict(num_heads=2, in_features=D, decode=True), seed=9)
    seq = normal(rng, (B, L, D))
    full = ours(seq, is_causal=True, decode=False)
    theirs.init_cache(seq.shape)
    ours.init_cache(seq.shape)
    assert isinstance(ours.kv_cache.get_value(), jattn.cache.KVCache)
    for t in range(L):
        token = seq[..., t:t + 1, :]
        want = theirs(token)
        got = ours(token)
        assert_close(got, want, RTOL)
        assert_close(got[..., 0, :], full[..., t, :], RTOL)
    np.testing.assert_array_equal(ours.kv_cache.get_value().lengths, L)
    # jattn extra: several tokens per call (a prefill), causal if asked (as without a cache).
    ours.init_cache(seq.shape)
    assert_close(ours(seq, is_causal=True), full, RTOL)
    ours.init_cache(seq.shape)
    assert_close(ours(seq), ours(seq, decode=False), RTOL)


def test_nnx_stateful_decoding_through_a_custom_attention_fn():
    """With attention_fn=, decoding hands the function the whole cache and a mask of
    the filled slots, as Flax does."""
    theirs, ours = nnx_pair(dict(num_heads=2, in_features=D, decode=True, attention_fn=sharper_attention), seed=10)
    seq = normal(np.random.default_rng(10), (B, 3, D))
    theirs.init_cache(seq.shape)
    ours.init_cache(seq.shape)
    for t in range(3):
        assert_close(ours(seq[:, t:t + 1]), theirs(seq[:, t:t + 1]), RTOL)


def test_nnx_set_view_creates_the_cache():
    layer = jattn.nnx.MultiHeadAttention(2, D, rngs=nnx.Rngs(0))
    view = nnx.view(layer, decode=True, batch_size=B, max_length=T)
    assert view.decode and view.kv_cache.get_value().keys.shape == (B, T, 2, 4)
    assert view(jnp.ones((B, 1, D))).shape == (B, 1, D)


# --- NNX: what cannot mean the same --------------------------------------------------


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: jattn.nnx.MultiHeadAttention(2, D, normalize_qk=True, qk_norm=True, rngs=nnx.Rngs(0)),
         ValueError, r"normalize_qk: Flax's QK-norm \(a LayerNorm.*qk_norm \(an RMSNorm.*pick one"),
        (lambda: jattn.nnx.MultiHeadAttention(2, D, attention_fn="dense", rngs=nnx.Rngs(0)),
         TypeError, r"attention_fn: expected None \(jattn's attention\) or a callable"),
        (lambda: jattn.nnx.MultiHeadAttention(2, D, logit_soft_cap=3.0, rngs=nnx.Rngs(0)),
         TypeError, r"unknown keyword argument 'logit_soft_cap' \(did you mean 'logits_soft_cap'\?\)"),
        (lambda: jattn.nnx.SelfAttention(D, 2, in_kv_features=4, rngs=nnx.Rngs(0)),
         TypeError, r"in_kv_features: SelfAttention attends one sequence to itself"),
    ],
)
def test_nnx_refusals_at_construction(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: m(jnp.ones((B, T, D)), logits_soft_cap=2.0),
         r"unknown keyword argument 'logits_soft_cap'"),
        (lambda m: m(jnp.ones((B, T, D)), query_seq_lengths=jnp.array([4, 2])),
         r"query_seq_lengths: a jattn option, which a custom attention_fn cannot take"),
        (lambda m: m(jnp.ones((B, T, D)), return_weights=True),
         r"return_weights: a custom attention_fn returns only the outputs; use sow_weights=True"),
        (lambda m: m(jnp.ones((B, 1, D)), decode=True),
         r"cache: decode mode \(decode=True\) needs a KV cache: .* call module.init_cache\(input_shape\) first"),
        (lambda m: m(jnp.ones((B, T, D)), jnp.ones((3, T, D))),
         r"inputs_k: got shape \(3, 4, 8\); expected the batch axes \(2,\) of inputs_q"),
    ],
)
def test_nnx_refusals_at_call_time(call, match):
    layer = jattn.nnx.MultiHeadAttention(2, D, attention_fn=sharper_attention, rngs=nnx.Rngs(0))
    with pytest.raises((ValueError, TypeError), match=match):
        call(layer)


def test_nnx_signatures_cover_flaxs():
    """Every Flax constructor and call argument exists under the same name (the
    positional ones in the same order); jattn's config options come from the schema."""
    flax_init = inspect.signature(nnx.MultiHeadAttention.__init__).parameters
    ours_init = inspect.signature(jattn.nnx.MultiHeadAttention.__init__).parameters
    assert set(flax_init) <= set(ours_init)
    positional = [n for n, p in flax_init.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [n for n, p in ours_init.items() if p.kind is p.POSITIONAL_OR_KEYWORD] == positional
    for name in options.names("config"):
        assert ours_init[name].default == options.DEFAULTS[name]
    flax_call = inspect.signature(nnx.MultiHeadAttention.__call__).parameters
    ours_call = inspect.signature(jattn.nnx.MultiHeadAttention.__call__).parameters
    assert set(flax_call) <= set(ours_call)
    for name in options.names("call"):
        assert ours_call[name].default == options.DEFAULTS[name]
    # SelfAttention's constructor is derived from MultiHeadAttention's, not restated.
    sa = inspect.signature(jattn.nnx.SelfAttention.__init__).parameters
    assert list(sa)[:3] == ["self", "in_features", "num_heads"]
    assert set(sa) == set(ours_init) - {"in_kv_features", "options"}
    assert sa["use_bias"].default is False and sa["broadcast_dropout"].default is False


# --- Linen ---------------------------------------------------------------------------


def linen_out_and_grads(module, variables, *args, rngs=None, **kwargs):
    def loss(params):
        out = module.apply({**variables, "params": params}, *args, **kwargs, rngs=rngs)
        return jnp.sum(out.astype(jnp.float32) * _cotangent(out)), out

    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    return out, grads


def linen_params(module, seed, *args, **kwargs):
    params = nn.meta.unbox(module.init(jax.random.key(seed), *args, **kwargs)["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p + 0.1 * normal(rng, p.shape, p.dtype), params)


def check_linen(fields, *args, seed=0, rtol=RTOL, init_kwargs=None, rngs=None, **kwargs):
    """Flax's module and jattn's with ``fields``, Flax's parameters, same outputs and
    gradients."""
    theirs = nn.MultiHeadDotProductAttention(**fields)
    ours = jattn.linen.MultiHeadAttention(**fields)
    params = linen_params(theirs, seed, *args, **(init_kwargs or {}))
    assert jax.tree.structure(nn.meta.unbox(jax.eval_shape(
        functools.partial(ours.init, **(init_kwargs or {})), jax.random.key(0), *args)["params"])) == jax.tree.structure(params)
    out, grads = linen_out_and_grads(ours, {"params": params}, *args, rngs=rngs, **kwargs)
    want, want_grads = linen_out_and_grads(theirs, {"params": params}, *args, rngs=rngs, **kwargs)
    assert out.shape == want.shape and out.dtype == want.dtype
    assert_close(out, want, rtol)
    assert_trees_close(grads, want_grads, rtol)
    return out


def sharper_linen_attention(query, key, value, mask=None, dropout_rng=None, deterministic=False, **kwargs):
    """Flax Linen hands over only the keywords a function names (``**kwargs`` gets none)."""
    assert not kwargs
    return nn.dot_product_attention(query * 2.0, key, value, mask=mask, dropout_rng=dropout_rng,
                                    deterministic=deterministic)


class Einsum:
    """A ``*_einsum_cls``: instantiated by the module, called like jnp.einsum."""

    def __call__(self, subscripts, *operands):
        return jnp.einsum(subscripts, *operands) * 1.0


LINEN_CASES = {
    # name: (fields, call kind, rtol)
    # dtype, with force_fp32_for_softmax (a no-op in jattn, whose softmax is float32).
    "dtype_force_fp32_for_softmax": (dict(num_heads=2, dtype=jnp.bfloat16, force_fp32_for_softmax=True), "plain", 3e-2),
    "param_dtype": (dict(num_heads=2, param_dtype=jnp.bfloat16), "plain", 3e-2),
    "precision": (dict(num_heads=2, precision="highest"), "mask", RTOL),
    "use_bias": (dict(num_heads=2, use_bias=False), "mask", RTOL),
    "normalize_qk": (dict(num_heads=2, normalize_qk=True), "mask", RTOL),
    "dot_general": (dict(num_heads=2, qkv_dot_general=doubled_dot_general, out_dot_general=doubled_dot_general), "plain", RTOL),
    "dot_general_cls": (dict(num_heads=2, qkv_dot_general_cls=HalvedDotGeneral, out_dot_general_cls=HalvedDotGeneral), "plain", RTOL),
    "attention_fn": (dict(num_heads=2, attention_fn=sharper_linen_attention), "mask", RTOL),
    "einsum_cls": (dict(num_heads=2, attention_fn=nn.dot_product_attention, qk_attn_weights_einsum_cls=Einsum,
                        attn_weights_value_einsum_cls=Einsum), "mask", RTOL),
    "deterministic": (dict(num_heads=2, dropout_rate=0.3, deterministic=True), "plain", RTOL),
}


@pytest.mark.parametrize("case", sorted(LINEN_CASES))
def test_linen_field_means_the_same(case):
    fields, kind, rtol = LINEN_CASES[case]
    seed = sorted(LINEN_CASES).index(case)
    rng = np.random.default_rng(seed)
    args = (normal(rng, (B, T, 6 if kind == "cross" else D)),)
    kwargs = {}
    if kind == "cross":
        args += (normal(rng, (B, T, 7)),)
    elif kind == "mask":
        mask = rng.random((B, 1, T, T)) < 0.6
        mask[..., 0] = True
        kwargs["mask"] = jnp.asarray(mask)
    check_linen(fields, *args, seed=seed, rtol=rtol, **kwargs)


def test_linen_initialisers_draw_the_same_parameters():
    fields = dict(num_heads=2, normalize_qk=True, kernel_init=nn.initializers.normal(0.3),
                  out_kernel_init=nn.initializers.uniform(0.2), bias_init=nn.initializers.normal(0.1),
                  out_bias_init=nn.initializers.constant(0.25))
    x = jnp.ones((B, T, D))
    want = nn.MultiHeadDotProductAttention(**fields).init(jax.random.key(3), x)["params"]
    got = nn.meta.unbox(jattn.linen.MultiHeadAttention(**fields).init(jax.random.key(3), x)["params"])
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_linen_dropout_both_patterns():
    rng = np.random.default_rng(20)
    x = normal(rng, (1, B, T, D))                       # two batch axes
    rngs = {"dropout": jax.random.key(21)}
    # broadcast_dropout=True (Flax's default): Flax's pattern exactly, gradients too.
    check_linen(dict(num_heads=2, dropout_rate=0.3), x, seed=20, rngs=rngs, init_kwargs=dict(deterministic=True),
                deterministic=False)
    # dropout_rng= at call time takes precedence, as in Flax.
    check_linen(dict(num_heads=2, dropout_rate=0.3, deterministic=False), x, seed=20, rngs=rngs,
                dropout_rng=jax.random.key(22))
    # broadcast_dropout=False: jattn's per-(example, head) pattern from the same key.
    layer = jattn.linen.MultiHeadAttention(num_heads=2, dropout_rate=0.5, broadcast_dropout=False)
    params = linen_params(layer, 20, x[0], deterministic=True)
    key = jax.random.key(23)
    out, weights = layer.apply({"params": params}, x[0], deterministic=False, dropout_rng=key, return_weights=True)
    q, k, v = (nn.DenseGeneral((2, 4)).apply({"params": params[n]}, x[0]) for n in ("query", "key", "value"))
    ctx = jattn.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=key)
    want = nn.DenseGeneral(D, axis=(-2, -1)).apply({"params": params["out"]}, ctx)
    assert_close(out, want, RTOL)
    dropped = np.asarray(weights) == 0
    assert dropped.any() and (dropped[:, 0] != dropped[:, 1]).any()


def test_linen_float_masks_batch_axes_inputs_kv_and_sow_weights():
    rng = np.random.default_rng(24)
    x = normal(rng, (1, B, T, D))
    valid = np.ones((1, B, T), np.float32)
    valid[0, 1, 3:] = 0
    mask = nn.make_attention_mask(jnp.ones((1, B, T)), jnp.asarray(valid))          # float 0/1
    check_linen(dict(num_heads=2), x, seed=24, mask=mask)
    theirs, ours = nn.MultiHeadDotProductAttention(num_heads=2), jattn.linen.MultiHeadAttention(num_heads=2)
    params = linen_params(theirs, 25, x[0, 0])                                        # no batch axis
    causal = nn.make_causal_mask(jnp.ones((T,)))
    assert_close(ours.apply({"params": params}, x[0, 0], mask=causal),
                 theirs.apply({"params": params}, x[0, 0], mask=causal), RTOL)

    xk = normal(rng, (1, B, T, D))
    params = linen_params(theirs, 26, x, xk)
    with pytest.warns(DeprecationWarning):
        want = theirs.apply({"params": params}, x, inputs_kv=xk)
    with pytest.warns(DeprecationWarning, match="inputs_kv is deprecated"):
        got = ours.apply({"params": params}, x, inputs_kv=xk)
    assert_close(got, want, RTOL)

    def sowed(module):
        return jax.tree.leaves(module.apply({"params": params}, x, mask=mask, sow_weights=True, mutable=["intermediates"])[1])

    (w_ours,), (w_theirs,) = sowed(ours), sowed(theirs)
    assert w_ours.shape == (1, B, 2, T, T)
    assert_close(w_ours, w_theirs, RTOL)


def test_linen_stateful_decoding_equals_flax_and_the_full_causal_forward():
    """decode=True: init over [batch..., max_length, D] creates the 'cache' collection,
    apply(..., mutable=['cache']) appends one token per call, as in Flax."""
    rng = np.random.default_rng(27)
    L = 4
    seq = normal(rng, (B, L, D))
    theirs = nn.MultiHeadDotProductAttention(num_heads=2, decode=True)
    ours = jattn.linen.MultiHeadAttention(num_heads=2, decode=True)
    v_theirs = theirs.init(jax.random.key(0), seq)
    v_ours = ours.init(jax.random.key(0), seq)
    params = linen_params(nn.MultiHeadDotProductAttention(num_heads=2), 27, seq)
    assert isinstance(v_ours["cache"]["kv_cache"], jattn.cache.KVCache)
    full = jattn.linen.MultiHeadAttention(num_heads=2).apply({"params": params}, seq, is_causal=True)
    def step_theirs(c, x):
        return theirs.apply({"params": params, "cache": c}, x, mutable=["cache"])

    def step_ours(c, x):
        return ours.apply({"params": params, "cache": c}, x, mutable=["cache"])

    c_theirs, c_ours = v_theirs["cache"], v_ours["cache"]
    for t in range(L):
        want, m_theirs = step_theirs(c_theirs, seq[:, t:t + 1])
        got, m_ours = step_ours(c_ours, seq[:, t:t + 1])
        c_theirs, c_ours = m_theirs["cache"], m_ours["cache"]
        assert_close(got, want, RTOL)
        assert_close(got[:, 0], full[:, t], RTOL)
    np.testing.assert_array_equal(c_ours["kv_cache"].lengths, L)
    with pytest.raises(ValueError, match=r"decode: stateful decoding writes the 'cache' collection; apply with mutable=\['cache'\]"):
        ours.apply({"params": params, "cache": c_ours}, seq[:, :1])


def test_linen_refusals():
    x = jnp.ones((B, T, D))
    with pytest.raises(ValueError, match=r"qk_attn_weights_einsum_cls: custom \(e.g. quantized\) attention einsums need a custom attention_fn"):
        jattn.linen.MultiHeadAttention(num_heads=2, qk_attn_weights_einsum_cls=Einsum,
                                       attn_weights_value_einsum_cls=Einsum).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"normalize_qk: Flax's QK-norm"):
        jattn.linen.MultiHeadAttention(num_heads=2, normalize_qk=True, qk_norm=True).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"is_causal: the attention_fn .* does not take it"):
        jattn.linen.MultiHeadAttention(num_heads=2, attention_fn=nn.dot_product_attention).init(
            jax.random.key(0), x, is_causal=True)
    maskless = jattn.linen.MultiHeadAttention(num_heads=2, attention_fn=lambda q, k, v, **kw: q)
    with pytest.raises(ValueError, match=r"mask: the attention_fn .* does not take it"):
        maskless.init(jax.random.key(0), x, mask=jnp.ones((B, 1, T, T), bool))
    with pytest.raises(TypeError, match=r"unknown keyword argument 'segment_id' \(did you mean"):
        jattn.linen.MultiHeadAttention(num_heads=2).init(jax.random.key(0), x, segment_id=1)


def test_linen_fields_cover_flaxs():
    """Flax's fields in Flax's order (positional construction means the same), then
    jattn's, the config options from the schema with the schema's defaults."""
    flax_fields = [f for f in nn.MultiHeadDotProductAttention.__dataclass_fields__ if f not in ("parent", "name")]
    ours = jattn.linen.MultiHeadAttention.__dataclass_fields__
    assert list(ours)[: len(flax_fields)] == flax_fields
    for name in options.names("config"):
        assert ours[name].default == options.DEFAULTS[name]
    flax_call = inspect.signature(nn.MultiHeadDotProductAttention.__call__).parameters
    assert set(flax_call) <= set(inspect.signature(jattn.linen.MultiHeadAttention.__call__).parameters)
    sa = jattn.linen.SelfAttention.__dataclass_fields__
    assert {n: sa[n].default for n in core.SELF_ATTENTION_DEFAULTS} == core.SELF_ATTENTION_DEFAULTS


# --- the attention_fn adapter ----------------------------------------------------------


def test_adapter_accepts_every_parameter_of_flaxs_attention_functions():
    ours = inspect.signature(flax_adapter.attention_fn).parameters
    for flax_fn in (nnx.dot_product_attention, nn.dot_product_attention):
        assert set(inspect.signature(flax_fn).parameters) <= set(ours), flax_fn.__module__
    # Linen hands over only the keywords the function declares: none of its set is lost.
    linen_passes = {"mask", "dropout_rng", "dropout_rate", "broadcast_dropout", "deterministic", "dtype",
                    "precision", "force_fp32_for_softmax", "qk_attn_weights_einsum", "attn_weights_value_einsum", "module"}
    assert linen_passes <= set(ours)
    assert jattn.nnx.attention_fn is jattn.linen.attention_fn is flax_adapter.attention_fn


def test_adapter_called_as_flaxs_functions_with_every_keyword():
    rng = np.random.default_rng(30)
    q, k, v = normal(rng, (B, T, 2, 4)), normal(rng, (B, T, 2, 4)), normal(rng, (B, T, 2, 4))
    mask = rng.random((B, 1, T, T)) < 0.6
    mask[..., 0] = True
    bias = normal(rng, (1, 2, T, T))
    common = dict(bias=bias, mask=jnp.asarray(mask, jnp.float32), broadcast_dropout=True,
                  dropout_rng=jax.random.key(1), dropout_rate=0.2, deterministic=False,
                  dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST, module=None)
    want = nnx.dot_product_attention(q, k, v, **common, promote_dtype=dtypes.promote_dtype, is_causal=False)
    got = flax_adapter.attention_fn(q, k, v, **common, promote_dtype=dtypes.promote_dtype, is_causal=False)
    assert_close(got, want, RTOL)
    want = nn.dot_product_attention(q, k, v, **common, force_fp32_for_softmax=True,
                                    einsum_dot_general=jax.lax.dot_general)
    got = flax_adapter.attention_fn(q, k, v, **common, force_fp32_for_softmax=True,
                                    einsum_dot_general=jax.lax.dot_general)
    assert_close(got, want, RTOL)


def test_adapter_in_flaxs_linen_module_with_precision_and_dtype():
    x = normal(np.random.default_rng(31), (B, T, D))
    fields = dict(num_heads=2, dtype=jnp.bfloat16, force_fp32_for_softmax=True, precision="highest")
    theirs = nn.MultiHeadDotProductAttention(**fields)
    ours = nn.MultiHeadDotProductAttention(**fields, attention_fn=jattn.linen.attention_fn)
    params = linen_params(theirs, 3, x)
    out, grads = linen_out_and_grads(ours, {"params": params}, x)
    want, want_grads = linen_out_and_grads(theirs, {"params": params}, x)
    assert_close(out, want, 3e-2)
    assert_trees_close(grads, want_grads, 3e-2)


def test_adapter_refuses_custom_matmuls():
    q = jnp.ones((2, T, 2, 4))
    with pytest.raises(ValueError, match=r"einsum_dot_general: a custom dot_general is not supported by jattn"):
        flax_adapter.attention_fn(q, q, q, einsum_dot_general=doubled_dot_general)
    with pytest.raises(ValueError, match=r"attn_weights_value_einsum: custom einsums are not supported by jattn"):
        flax_adapter.attention_fn(q, q, q, attn_weights_value_einsum=jnp.einsum)
    layer = nn.MultiHeadDotProductAttention(num_heads=2, attention_fn=jattn.linen.attention_fn,
                                            qk_attn_weights_einsum_cls=Einsum, attn_weights_value_einsum_cls=Einsum)
    with pytest.raises(ValueError, match=r"qk_attn_weights_einsum: custom einsums are not supported"):
        layer.init(jax.random.key(0), jnp.ones((B, T, D)))


def test_docs_table_names_every_flax_argument():
    """docs/modules.md's table says what jattn does with each of Flax's arguments."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "modules.md").read_text()
    table = text[text.index("#### Flax's arguments"):text.index("### Decoding with the KV cache")]
    named = set(re.findall(r"`([A-Za-z_0-9]+)", table))
    flax_names = set()
    for fn in (nnx.MultiHeadAttention.__init__, nnx.MultiHeadAttention.__call__, nnx.MultiHeadAttention.set_view,
               nnx.MultiHeadAttention.init_cache, nn.MultiHeadDotProductAttention.__call__,
               nnx.dot_product_attention, nn.dot_product_attention):
        flax_names |= set(inspect.signature(fn).parameters) - {"self", "input_shape", "batch_size", "max_length"}
    flax_names |= set(nn.MultiHeadDotProductAttention.__dataclass_fields__) - {"parent", "name"}
    assert flax_names - named == set()
