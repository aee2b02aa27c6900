"""The translate task: examples, masks (padded source positions get zero weight), and
greedy decoding with the KV cache and once-computed cross-attention keys/values against
teacher forcing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import config, tasks
from experiments.model import ModelConfig
from experiments.tasks.translate import BOS, EOS, FIRST, PAD, TranslateTask, greedy_decode

TASK = TranslateTask(min_length=2, max_length=7, num_symbols=6, mapping=(3, 0, 5, 1, 4, 2))
EVAL = jax.jit(TASK.eval_set, static_argnums=1)
SMALL = ModelConfig(num_layers=2, d_model=16, num_heads=2, mlp_dim=32, positions="rope")


def test_examples_are_the_mapped_source_reversed_then_eos():
    b = jax.jit(TASK.train_batch, static_argnums=1)(jax.random.key(0), 64)
    source, lengths, inputs, targets, weights = (np.asarray(x) for x in b)
    assert source.shape == (64, 7) and inputs.shape == targets.shape == weights.shape == (64, 8)
    for s, n, x, y, w in zip(source, lengths, inputs, targets, weights):
        assert 2 <= n <= 7 and (s[n:] == PAD).all() and (s[:n] >= FIRST).all()
        want = [TASK.mapping[t - FIRST] + FIRST + 6 for t in s[:n][::-1]]
        assert y[:n].tolist() == want and y[n] == EOS and (y[n + 1:] == PAD).all()
        assert x[0] == BOS and (x[1:] == y[:-1]).all()
        np.testing.assert_array_equal(w, np.arange(8) <= n)


def test_the_config_builds_the_task():
    cfg = config.load("configs/translate.yaml")
    task, info = tasks.build(cfg.data)
    assert isinstance(task, TranslateTask) and sorted(task.mapping) == list(range(task.num_symbols))
    assert "aγ" in info["mapping"] or info["mapping"].startswith("a")


@pytest.fixture(scope="module")
def model():
    return TASK.build_model(SMALL, dtype=jnp.float32, rngs=nnx.Rngs(0))


def test_padded_source_tokens_get_zero_weight(model):
    b = EVAL(jax.random.key(1), 8)
    _, weights = nnx.jit(lambda m, b: m(b, return_weights=True))(model, b)
    pad = np.arange(7)[None, :] >= np.asarray(b.source_lengths)[:, None]  # [B, S] source padding
    for kind in ("encoder", "cross"):
        for w in weights[kind]:
            w = np.asarray(w)  # [B, N, T, S]
            assert (w[np.broadcast_to(pad[:, None, None, :], w.shape)] == 0.0).all(), kind
    for w in weights["decoder"]:  # causal self-attention
        w = np.asarray(w)
        assert (w[..., np.triu_indices(8, 1)[0], np.triu_indices(8, 1)[1]] == 0.0).all()
    # the padding's content changes nothing the decoder computes
    other = b._replace(source=jnp.where(jnp.asarray(pad), FIRST + 1, b.source))
    np.testing.assert_allclose(nnx.jit(lambda m, b: m(b))(model, other), nnx.jit(lambda m, b: m(b))(model, b),
                               rtol=1e-5, atol=1e-5)


def test_cached_greedy_decoding_equals_teacher_forced_logits(model):
    b = EVAL(jax.random.key(2), 4)
    tokens, step_logits = greedy_decode(model, b.source, b.source_lengths, 8)
    assert tokens.shape == (4, 8) and step_logits.shape == (4, 8, TASK.vocab_size)
    # Teacher forcing on what greedy decoding produced: the same logits at every step.
    inputs = jnp.concatenate([jnp.full((4, 1), BOS, jnp.int32), tokens[:, :-1]], axis=1)
    forced = nnx.jit(lambda m, b: m(b))(model, b._replace(inputs=inputs))
    np.testing.assert_allclose(step_logits, forced, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(tokens, np.argmax(np.asarray(forced), axis=-1))


def test_the_cross_attention_keys_and_values_are_computed_once(model, monkeypatch):
    calls = []
    block = type(model.blocks[0].cross)
    original = block.memory_kv
    monkeypatch.setattr(block, "memory_kv", lambda self, states: calls.append(1) or original(self, states))
    b = EVAL(jax.random.key(3), 2)
    jax.make_jaxpr(lambda s, n: model.greedy(s, n, 8))(b.source, b.source_lengths)  # traced, not run
    assert len(calls) == SMALL.num_layers  # one per layer, not one per decoding step


def test_metrics_plots_and_samples(model):
    b = EVAL(jax.random.key(4), 8)
    m = TASK.summarize(jax.tree.map(float, nnx.jit(TASK.eval_sums)(model, b)), {})
    assert set(m) == set(TASK.metrics)
    fig = TASK.attention_figure(model, b)
    n = int(b.source_lengths[0])
    assert [r.weights_NTS.shape for r in fig.rows] == [(2, n + 1, n)] * 2 and "anti-diagonal" in fig.caption
    lines = TASK.samples(model, tasks.base.SampleOptions(num=4), jax.random.key(0))  # greedy as compiled above
    assert len(lines) == 5 and all("->" in line and "(answer " in line for line in lines[:4])
