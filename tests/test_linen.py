"""`jattn.linen`: parity with `flax.linen.MultiHeadDotProductAttention` (outputs and
parameter gradients; GQA against Flax with the K/V weights repeated per group, since
Linen's module has no num_kv_heads), the adapter swapped into Flax's module, decoding
with the cache, agreement with the NNX twin, and bad input."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
import jattn.linen
import jattn.nnx
from jattn.cache import KVCache
from tests.checks import assert_close

RTOL = 1e-5


def normal(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def random_mask(rng, shape):
    """Every query row keeps a key (fully masked rows differ by design: zeros vs mean)."""
    mask = rng.random(shape) < 0.6
    mask[..., 0] = True
    return jnp.asarray(mask)


def _traced(v):
    return isinstance(v, (jax.Array, np.ndarray, KVCache, jattn.masks.Mask))


@functools.partial(jax.jit, static_argnames=("module", "static", "seed"))
def _out_and_grads(module, params, args, arrays, static, seed):
    def loss(params):
        out = module.apply({"params": params}, *args, **arrays, **dict(static))
        c = normal(np.random.default_rng(seed), out.shape)
        return jnp.sum(out * c), out

    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return out, grads


def out_and_grads(module, params, args, kwargs, seed=0):
    arrays = {k: v for k, v in kwargs.items() if _traced(v)}
    static = tuple(sorted((k, v) for k, v in kwargs.items() if not _traced(v)))
    return _out_and_grads(module, params, args, arrays, static, seed)


@functools.partial(jax.jit, static_argnames=("module", "static"))
def _apply(module, variables, args, arrays, static, rngs):
    return module.apply(variables, *args, **arrays, **dict(static), rngs=rngs)


def japply(module, variables, *args, rngs=None, **kwargs):
    """``module.apply`` under jit (one compilation instead of many op-by-op ones)."""
    arrays = {k: v for k, v in kwargs.items() if _traced(v)}
    static = tuple(sorted((k, v) for k, v in kwargs.items() if not _traced(v)))
    return _apply(module, variables, args, arrays, static, rngs)


def init_params(module, seed, *args, **kwargs):
    """Unboxed parameters with noise added (non-zero biases and norm scales)."""
    init = jax.jit(functools.partial(module.init, **kwargs))   # one compilation, not op by op
    params = nn.meta.unbox(init(jax.random.key(seed), *args)["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p + 0.1 * normal(rng, p.shape), params)


def assert_trees_close(actual, expected, rtol=RTOL):
    """Leaf by leaf; leaves that are zero in exact arithmetic (the key bias) hold only
    round-off and are judged against the scale of the whole tree."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    leaves = jax.tree.leaves(expected)
    scale = max(float(np.abs(np.asarray(y)).max()) for y in leaves)
    for x, y in zip(jax.tree.leaves(actual), leaves):
        if float(np.abs(np.asarray(y)).max()) < 1e-4 * scale:
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-4 * scale)
        else:
            assert_close(x, y, rtol)


# --- parity with flax.linen.MultiHeadDotProductAttention ---------------------------


@pytest.mark.parametrize(
    "ctor, S, kind",
    [
        (dict(num_heads=3), None, "plain"),
        (dict(num_heads=3), None, "causal_mask"),
        (dict(num_heads=3, qkv_features=9, out_features=10), 7, "mask"),
    ],
)
def test_parity_with_flax_linen_outputs_and_gradients(ctor, S, kind):
    rng = np.random.default_rng(600 + len(ctor) + (S or 0))
    B, T, D = 2, 5, 12
    args = (normal(rng, (B, T, D)),)
    if S is not None:
        args += (normal(rng, (B, S, 8)),)
    kwargs = {}
    if kind == "causal_mask":
        kwargs = dict(mask=nn.make_causal_mask(jnp.ones((B, T))).astype(bool))
    elif kind == "mask":
        kwargs = dict(mask=random_mask(rng, (B, 1, T, S)))
    ours = jattn.linen.MultiHeadAttention(**ctor)
    theirs = nn.MultiHeadDotProductAttention(**ctor)
    params = init_params(ours, 1, *args)
    assert jax.tree.structure(params) == jax.tree.structure(jax.eval_shape(theirs.init, jax.random.key(2), *args)["params"])
    out, grads = out_and_grads(ours, params, args, kwargs)
    want, want_grads = out_and_grads(theirs, params, args, kwargs)
    assert out.shape == (B, T, ctor.get("out_features", D))
    assert_close(out, want, RTOL)
    assert_trees_close(grads, want_grads)


def test_gqa_matches_flax_with_kv_weights_repeated_per_group():
    """Linen's MultiHeadDotProductAttention has no num_kv_heads; the nearest real thing
    is full multi-head attention whose K/V heads repeat each GQA head G times."""
    rng = np.random.default_rng(610)
    B, T, S, D, N, K = 2, 5, 7, 18, 6, 2
    G = N // K
    xq, xk = normal(rng, (B, T, D)), normal(rng, (B, S, D))
    mask = random_mask(rng, (B, 1, T, S))
    ours = jattn.linen.MultiHeadAttention(num_heads=N, num_kv_heads=K)
    params = init_params(ours, 3, xq, xk)
    assert params["key"]["kernel"].shape == (D, K, 3)

    def repeat(p):
        return {"kernel": jnp.repeat(p["kernel"], G, axis=1), "bias": jnp.repeat(p["bias"], G, axis=0)}

    full = {**params, "key": repeat(params["key"]), "value": repeat(params["value"])}
    theirs = nn.MultiHeadDotProductAttention(num_heads=N)
    out, grads = out_and_grads(ours, params, (xq, xk), dict(mask=mask))
    want, want_grads = out_and_grads(theirs, full, (xq, xk), dict(mask=mask))
    assert_close(out, want, RTOL)

    def fold(g):   # a shared kv weight's gradient is the sum over its G copies
        return {"kernel": g["kernel"].reshape(D, K, G, 3).sum(2), "bias": g["bias"].reshape(K, G, 3).sum(1)}

    want_grads = {**want_grads, "key": fold(want_grads["key"]), "value": fold(want_grads["value"])}
    assert_trees_close(grads, want_grads)


# --- the attention_fn adapter in flax.linen.MultiHeadDotProductAttention -----------


def test_adapter_matches_flax_default_with_mask_and_gradients():
    rng = np.random.default_rng(620)
    x = normal(rng, (2, 3, 5, 12))                      # two batch axes
    mask = random_mask(rng, (2, 3, 1, 5, 5))
    theirs = nn.MultiHeadDotProductAttention(num_heads=3)
    ours = nn.MultiHeadDotProductAttention(num_heads=3, attention_fn=jattn.linen.attention_fn)
    params = init_params(theirs, 4, x)
    out, grads = out_and_grads(ours, params, (x,), dict(mask=mask))
    want, want_grads = out_and_grads(theirs, params, (x,), dict(mask=mask))
    assert_close(out, want, RTOL)
    assert_trees_close(grads, want_grads)


def test_adapter_dropout_and_sowed_weights_are_flaxs():
    rng = np.random.default_rng(621)
    x = normal(rng, (2, 5, 12))
    theirs = nn.MultiHeadDotProductAttention(num_heads=3, dropout_rate=0.3)
    ours = nn.MultiHeadDotProductAttention(num_heads=3, dropout_rate=0.3, attention_fn=jattn.linen.attention_fn)
    variables = {"params": init_params(theirs, 5, x, deterministic=True)}
    rngs = {"dropout": jax.random.key(6)}
    got = japply(ours, variables, x, deterministic=False, rngs=rngs)
    want = japply(theirs, variables, x, deterministic=False, rngs=rngs)
    assert_close(got, want, RTOL)
    assert np.abs(np.asarray(got - japply(ours, variables, x, deterministic=True))).max() > 1e-3

    def sowed(module):
        apply = jax.jit(lambda v: module.apply(v, x, deterministic=True, sow_weights=True, mutable=["intermediates"]))
        return jax.tree.leaves(apply(variables)[1])

    w_ours, w_theirs = sowed(ours), sowed(theirs)
    assert len(w_ours) == len(w_theirs) == 1 and w_ours[0].shape == (2, 3, 5, 5)
    assert_close(w_ours[0], w_theirs[0], RTOL)


# --- jattn.linen against its NNX twin, and decoding --------------------------------


def test_linen_equals_nnx_twin_with_every_option():
    rng = np.random.default_rng(630)
    x = normal(rng, (2, 5, 15))
    positions = jnp.array([[3, 4, 5, 6, 7], [0, 1, 2, 0, 1]])
    segments = jnp.array([[0, 0, 0, 0, 0], [0, 0, 0, 1, 1]])
    opts = dict(num_kv_heads=3, head_dim=4, out_features=11, use_bias=True, qk_norm=True,
                use_rope=True, rope_base=30.0, logits_soft_cap=2.5, dropout_rate=0.2)
    ours = jattn.linen.SelfAttention(num_heads=6, **opts)
    params = init_params(ours, 7, x, deterministic=True)
    twin = jattn.nnx.SelfAttention(15, 6, **opts, rngs=nnx.Rngs(8))
    state = nnx.state(twin, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(twin, state)
    key = jax.random.key(9)
    call = dict(positions=positions, segment_ids=segments, deterministic=False, return_weights=True)
    out, weights = japply(ours, {"params": params}, x, rngs={"dropout": jax.random.key(10)}, dropout_rng=key, **call)
    want, want_w = nnx.jit(lambda m, x, k: m(x, rngs=k, **call))(twin, x, key)
    assert_close(out, want, RTOL)
    assert_close(weights, want_w, RTOL)
    specs = nn.get_partition_spec(jax.eval_shape(functools.partial(ours.init, deterministic=True), jax.random.key(11), x))["params"]
    assert tuple(specs["query"]["kernel"]) == ("embed", "heads", "head_dim")
    assert tuple(specs["key"]["kernel"]) == ("embed", "kv_heads", "head_dim")
    assert tuple(specs["out"]["kernel"]) == ("heads", "head_dim", "embed")
    assert tuple(specs["key_norm"]["scale"]) == ("head_dim",)


def test_ragged_decode_equals_full_forward_under_jit():
    rng = np.random.default_rng(640)
    prompts, steps, M = np.array([4, 1, 3]), 2, 7
    layer = jattn.linen.SelfAttention(num_heads=3, num_kv_heads=1, use_rope=True, qk_norm=True)
    B, total = len(prompts), prompts.max() + steps
    seqs = normal(rng, (B, total, 12))
    variables = {"params": init_params(layer, 12, seqs)}
    full = japply(layer, variables, seqs)

    step = jax.jit(lambda v, x, c, n: layer.apply(v, x, cache=c, lengths=n))
    cache = layer.create_cache(B, M, in_features=12)
    out_p, cache = step(variables, seqs[:, :4], cache, jnp.asarray(prompts))
    outs = [[out_p[b, t] for t in range(prompts[b])] for b in range(B)]
    for s in range(steps):
        token = jnp.stack([seqs[b, prompts[b] + s] for b in range(B)])[:, None]
        out_s, cache = step(variables, token, cache, None)
        for b in range(B):
            outs[b].append(out_s[b, 0])
    np.testing.assert_array_equal(cache.lengths, prompts + steps)
    for b in range(B):
        assert_close(jnp.stack(outs[b]), full[b, : prompts[b] + steps], RTOL)


# --- bad input ---------------------------------------------------------------------


def test_bad_input():
    x = jnp.zeros((2, 5, 12))
    layer = jattn.linen.SelfAttention(num_heads=3)
    variables = layer.init(jax.random.key(13), x)
    with pytest.raises(ValueError, match=r"inputs_q: got feature size 10 \(shape \(2, 5, 10\)\); expected the 12 features the module was initialised with"):
        layer.apply(variables, jnp.zeros((2, 5, 10)))
    with pytest.raises(ValueError, match="num_heads: 5 does not divide in_features=12"):
        jattn.linen.SelfAttention(num_heads=5).init(jax.random.key(14), x)
    with pytest.raises(ValueError, match="num_kv_heads: 2 does not divide num_heads=3"):
        jattn.linen.SelfAttention(num_heads=3, num_kv_heads=2).init(jax.random.key(15), x)
    with pytest.raises(ValueError, match=r"mask: got shape \(2, 1, 5, 4\)"):
        layer.apply(variables, x, mask=jnp.ones((2, 1, 5, 4), bool))
    with pytest.raises(ValueError, match="cache: decode mode .* needs a KV cache"):
        layer.apply(variables, x[:, :1], decode=True)
    with pytest.raises(ValueError, match=r"KVCache overflow: sequence\(s\) \[0, 1\] would hold \[5, 5\] tokens"):
        layer.apply(variables, x, cache=layer.create_cache(2, 4, in_features=12), lengths=jnp.array([5, 5]))
    with pytest.raises(ValueError, match="in_features: needed to size the cache"):
        layer.create_cache(2, 4)
    with pytest.raises(ValueError, match='Parameter "deterministic" must be passed'):
        jattn.linen.SelfAttention(num_heads=3, dropout_rate=0.1).init(jax.random.key(16), x)
