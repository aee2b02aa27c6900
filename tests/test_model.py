"""experiments.model: the transformer's shapes, causality, jattn against the Flax
baseline, the KV cache, and generation."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.config import AttentionConfig, ConfigError, ModelConfig
from experiments.model import Transformer, generate, num_params

V, T = 13, 11


def small(**kw) -> ModelConfig:
    attention = kw.pop("attention", AttentionConfig())
    return ModelConfig(num_layers=2, d_model=24, num_heads=3, mlp_dim=40, attention=attention, **kw)


def tokens(key=0, B=2, length=T):
    return jax.random.randint(jax.random.key(key), (B, length), 0, V)


# Eager NNX calls dispatch (and compile) op by op; one jitted call is much faster.
forward = nnx.jit(lambda model, x, **kw: model(x, **kw), static_argnames=("return_weights", "deterministic"))


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_shapes_and_causality(positions):
    model = Transformer(small(positions=positions), vocab_size=V, max_len=T, rngs=nnx.Rngs(0))
    x = tokens()
    logits = forward(model, x)
    assert logits.shape == (2, T, V) and logits.dtype == jnp.float32
    # changing token 6 leaves the logits of positions 0..5 alone, and changes position 6
    y = x.at[:, 6].set((x[:, 6] + 1) % V)
    other = forward(model, y)
    np.testing.assert_allclose(other[:, :6], logits[:, :6], rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(other[:, 6] - logits[:, 6])).max() > 1e-4


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_jattn_model_equals_the_flax_baseline_with_the_same_weights(positions):
    jattn_model = Transformer(small(positions=positions), vocab_size=V, max_len=T, rngs=nnx.Rngs(0))
    flax_model = Transformer(small(positions=positions, attention=AttentionConfig(module="flax")),
                             vocab_size=V, max_len=T, rngs=nnx.Rngs(1))
    ours, theirs = nnx.state(jattn_model, nnx.Param), nnx.state(flax_model, nnx.Param)
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, theirs)
    x = tokens(1)
    assert np.abs(np.asarray(forward(jattn_model, x) - forward(flax_model, x))).max() > 1e-3  # different init
    nnx.update(flax_model, ours)
    np.testing.assert_allclose(forward(flax_model, x), forward(jattn_model, x), rtol=1e-5, atol=1e-5)
    _, w_ours = forward(jattn_model, x, return_weights=True)
    _, w_theirs = forward(flax_model, x, return_weights=True)
    for a, b in zip(w_ours, w_theirs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_attention_weights_are_causal_rows_summing_to_one():
    model = Transformer(small(), vocab_size=V, max_len=T, rngs=nnx.Rngs(0))
    logits, weights = forward(model, tokens(), return_weights=True)
    assert len(weights) == 2
    for w in weights:
        w = np.asarray(w)
        assert w.shape == (2, 3, T, T)
        np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(w[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]], 0.0)


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_kv_cache_decoding_matches_the_full_forward_pass(positions):
    cfg = small(positions=positions, attention=AttentionConfig(num_kv_heads=1))
    model = Transformer(cfg, vocab_size=V, max_len=T, rngs=nnx.Rngs(2))
    x = tokens(3)
    full = forward(model, x)
    caches = model.init_caches(2)
    prefill, caches = forward(model, x[:, :5], caches=caches)
    np.testing.assert_allclose(prefill, full[:, :5], rtol=1e-5, atol=1e-5)
    for t in range(5, T):
        step, caches = forward(model, x[:, t:t + 1], caches=caches)
        np.testing.assert_allclose(step[:, 0], full[:, t], rtol=1e-4, atol=1e-5)
    assert caches[0].lengths.tolist() == [T, T]


def test_generate_with_the_cache_equals_greedy_decoding_without_it():
    model = Transformer(small(positions="rope"), vocab_size=V, max_len=16, rngs=nnx.Rngs(4))
    graphdef, params = nnx.split(model, nnx.Param)
    prompt = tokens(5, length=4)
    out = np.asarray(generate(graphdef, params, prompt, 6, jax.random.key(0), temperature=0.0))
    seq = np.zeros((2, 10), np.int32)
    seq[:, :4] = prompt
    for t in range(4, 10):  # the slow way: rerun the whole (zero-padded, causal) sequence
        seq[:, t] = np.argmax(np.asarray(forward(model, jnp.asarray(seq)))[:, t - 1], axis=-1)
    np.testing.assert_array_equal(out, seq[:, 4:])
    sampled = generate(graphdef, params, prompt, 6, jax.random.key(0), temperature=1.0)
    assert sampled.shape == (2, 6) and int(sampled.max()) < V


def test_bfloat16_compute_keeps_float32_params_and_stays_close():
    f32 = Transformer(small(), vocab_size=V, max_len=T, rngs=nnx.Rngs(0))
    bf16 = Transformer(small(), vocab_size=V, max_len=T, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype(jnp.float32)}
    x = tokens()
    out = forward(bf16, x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), forward(f32, x), atol=0.1, rtol=0.05)


def test_dropout_needs_keys_and_is_off_when_deterministic():
    model = Transformer(small(dropout=0.5), vocab_size=V, max_len=T, rngs=nnx.Rngs(0))
    x = tokens()
    train = nnx.jit(lambda model, x, key: model(x, deterministic=False, rngs=nnx.Rngs(dropout=key)))
    a = train(model, x, jax.random.key(1))
    b = train(model, x, jax.random.key(2))
    again = train(model, x, jax.random.key(1))
    assert np.abs(np.asarray(a - b)).max() > 1e-3
    np.testing.assert_array_equal(a, again)
    np.testing.assert_array_equal(forward(model, x), forward(model, x, deterministic=True))


def test_param_count_follows_the_sizes():
    cfg = small()
    model = Transformer(cfg, vocab_size=V, max_len=T, rngs=nnx.Rngs(0))
    D, F, L = cfg.d_model, cfg.mlp_dim, cfg.num_layers
    per_block = 4 * D * D + 2 * D * F + 2 * D
    assert num_params(model) == V * D + T * D + L * per_block + D + D * V


def test_the_backend_is_selectable():
    model = Transformer(small(attention=AttentionConfig(implementation="dense")), vocab_size=V, max_len=T, rngs=nnx.Rngs(0))
    auto = Transformer(small(), vocab_size=V, max_len=T, rngs=nnx.Rngs(0))
    assert model.blocks[0].attn.implementation == "dense"
    np.testing.assert_allclose(forward(model, tokens()), forward(auto, tokens()), rtol=1e-5, atol=1e-6)


def test_an_unavailable_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="model.attention.implementation='nonesuch'"):
        Transformer(small(attention=AttentionConfig(implementation="nonesuch")), vocab_size=V, max_len=T, rngs=nnx.Rngs(0))


def test_the_flax_baseline_has_no_kv_cache():
    model = Transformer(small(attention=AttentionConfig(module="flax")), vocab_size=V, max_len=T, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs model.attention.module='jattn'"):
        model.init_caches(2)
