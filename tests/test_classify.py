"""The classify task: examples, padding that no token attends, pooling over real tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import config, tasks
from experiments.model import ModelConfig
from experiments.tasks.classify import PAD, ClassifyTask, pooled_logits

TASK = ClassifyTask(min_length=3, max_length=9, num_symbols=12)
SMALL = ModelConfig(num_layers=2, d_model=16, num_heads=2, mlp_dim=32, positions="rope")

forward = nnx.jit(lambda model, tokens, lengths, **kw: model(tokens, lengths_B=lengths, **kw),
                  static_argnames=("return_weights",))


def test_examples_are_labelled_by_whether_a_symbol_repeats():
    b = jax.jit(TASK.train_batch, static_argnums=1)(jax.random.key(0), 256)
    tokens, lengths, labels = (np.asarray(x) for x in b)
    assert tokens.shape == (256, 9) and lengths.min() >= 3 and lengths.max() <= 9
    assert 0.35 < labels.mean() < 0.65  # about half of each
    for t, n, y in zip(tokens, lengths, labels):
        assert (t[n:] == PAD).all() and (t[:n] != PAD).all() and t.max() <= 12
        assert y == (len(set(t[:n].tolist())) < n)


def test_the_config_builds_the_task_and_checks_its_keys():
    cfg = config.load("configs/classify.yaml", ["data.classify.max_length=9"])
    task, _ = tasks.build(cfg.data)
    assert isinstance(task, ClassifyTask) and task.max_length == 9
    with pytest.raises(config.ConfigError, match=r"data.classify.max_length \(40\) must be at most"):
        config.load("configs/classify.yaml", ["data.classify.max_length=40"])


def test_padded_tokens_get_zero_attention_weight_and_change_nothing():
    model = TASK.build_model(SMALL, dtype=jnp.float32, rngs=nnx.Rngs(0))
    b = jax.jit(TASK.eval_set, static_argnums=1)(jax.random.key(1), 8)
    logits, weights = forward(model, b.tokens, b.lengths, return_weights=True)
    key_is_pad = np.arange(9)[None, :] >= np.asarray(b.lengths)[:, None]  # [B, S]
    for w in weights:
        w = np.asarray(w)  # [B, N, T, S]
        assert (w[:, :, :, :][np.broadcast_to(key_is_pad[:, None, None, :], w.shape)] == 0.0).all()
        real_rows = ~key_is_pad[:, None, :, None]
        np.testing.assert_allclose(np.where(real_rows, w.sum(-1, keepdims=True), 1.0), 1.0, rtol=1e-5)
    # whatever the padding holds, the pooled class logits stay the same
    other = jnp.where(jnp.asarray(key_is_pad), 5, b.tokens)
    np.testing.assert_allclose(pooled_logits(forward(model, other, b.lengths), b.lengths),
                               pooled_logits(logits, b.lengths), rtol=1e-5, atol=1e-6)


def test_metrics_and_samples():
    model = TASK.build_model(SMALL, dtype=jnp.float32, rngs=nnx.Rngs(0))
    b = jax.jit(TASK.eval_set, static_argnums=1)(jax.random.key(2), 16)
    sums, loss = nnx.jit(lambda m, b: (TASK.eval_sums(m, b), TASK.loss(m, b, deterministic=True, rngs=None)))(model, b)
    m = TASK.summarize(jax.tree.map(float, sums), {})
    assert set(m) == set(TASK.metrics) and 0.0 <= m["accuracy"] <= 1.0
    assert m["loss"] == pytest.approx(float(loss), rel=1e-5)
    fig = TASK.attention_figure(model, b)
    assert [r.weights_NTS.shape for r in fig.rows] == [(2, 9, 9)] * 2
    lines = TASK.samples(model, tasks.base.SampleOptions(num=3), jax.random.key(0))
    assert len(lines) == 4 and all("->" in line for line in lines[:3])
