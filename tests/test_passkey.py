"""The passkey task (experiments/tasks/passkey.py) and its long-context config
(configs/passkey.yaml): one value token at least ``min_distance`` back decides the
only scored answer; the config trains it at T >= 4096 with the sequence split over 8
devices.  Training itself is not run here (minutes at T=4096; the every-config test
of tests/test_train.py trains it a few steps at T=64)."""

import pathlib
import re

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import config, tasks
from experiments.config import ConfigError
from experiments.model import ModelConfig
from experiments.tasks.base import SampleOptions
from experiments.tasks.passkey import PasskeyTask, needle_position

ROOT = pathlib.Path(__file__).resolve().parents[1]


def small(**kw) -> PasskeyTask:
    return PasskeyTask(**{"seq_len": 64, "num_filler": 8, "num_values": 5, "min_distance": 40, **kw})


def test_one_value_far_back_and_only_the_answer_is_scored():
    task = small()
    b = jax.device_get(task.train_batch(jax.random.key(1), 512))
    F, V, T = task.num_filler, task.num_values, task.seq_len
    assert b.inputs.shape == b.targets.shape == b.weights.shape == (512, T)
    assert task.vocab_size == F + V + 1 and b.inputs.dtype == np.int32
    np.testing.assert_array_equal(b.weights, np.eye(T, dtype=np.float32)[-1][None].repeat(512, 0))
    np.testing.assert_array_equal(b.inputs[:, -1], task.query)  # the query ends every prompt
    is_value = (b.inputs >= F) & (b.inputs < F + V)
    np.testing.assert_array_equal(is_value.sum(1), 1)  # exactly one value token
    p = is_value.argmax(1)
    np.testing.assert_array_equal(b.targets[:, -1], b.inputs[np.arange(512), p])  # the answer is that value
    assert np.all(T - 1 - p >= task.min_distance)
    assert p.min() == 0 and p.max() == T - 1 - task.min_distance  # the whole allowed range is used
    # the rest is filler, and the targets are the inputs shifted by one
    assert np.all(b.inputs[:, :-1][~is_value[:, :-1]] < F)
    np.testing.assert_array_equal(b.targets[:, :-1], b.inputs[:, 1:])
    assert set(np.unique(b.targets[:, -1])) == set(range(F, F + V))  # every value is asked for
    assert [needle_position(x, F, V) for x in b.inputs[:4]] == p[:4].tolist()


def test_nothing_near_the_query_tells_the_value():
    """The last min_distance tokens before the query are filler drawn independently of
    the value: a predictor of the answer from them is at chance."""
    task = small(num_values=2, min_distance=40)
    b = jax.device_get(task.train_batch(jax.random.key(2), 4096))
    near = b.inputs[:, -task.min_distance:-1]
    assert np.all(near < task.num_filler)
    ans = b.targets[:, -1] - task.num_filler
    # the mean of any filler statistic is the same for both answers (within noise)
    for stat in (near.mean(1), (near == 0).mean(1), near[:, -1]):
        gap = abs(stat[ans == 0].mean() - stat[ans == 1].mean())
        assert gap < 4 * stat.std() / np.sqrt(len(stat) / 2), gap


def test_held_out_examples_are_another_draw():
    task = small()
    a = task.eval_set(jax.random.key(0), 8)
    b = task.eval_set(jax.random.key(0), 8)
    c = task.train_batch(jax.random.key(1), 8)
    np.testing.assert_array_equal(a.inputs, b.inputs)
    assert not np.array_equal(a.inputs, c.inputs)


@pytest.mark.parametrize("override, message", [
    ("data.passkey.min_distance=64", "data.passkey.min_distance (64) must be at most data.passkey.seq_len - 1 (63)"),
    ("data.passkey.num_values=1", "data.passkey.num_values (1) must be at least 2"),
    ("data.passkey.seq_len=1", "data.passkey.seq_len (1) must be at least 2"),
    ("data.passkey.seq_len=0", "data.passkey.seq_len"),
])
def test_config_errors_name_the_key(override, message):
    base = ["data.task=passkey", "data.passkey.seq_len=64", "data.passkey.min_distance=32"]
    if override.startswith("data.passkey.seq_len="):
        base = base[:1] + ["data.passkey.min_distance=1"]
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.load(None, [*base, override])


def test_the_long_context_config_splits_a_sequence_of_at_least_4096():
    cfg = config.load(ROOT / "configs/passkey.yaml")
    p = cfg.data.passkey
    assert cfg.data.task == "passkey" and p.seq_len >= 4096
    assert p.min_distance >= p.seq_len // 2 >= 2048  # the value is thousands back, on another device
    assert cfg.mesh.context == 8 and cfg.mesh.data == 1 and p.seq_len % 8 == 0
    assert cfg.mesh.tensor == cfg.mesh.fsdp == 1
    assert cfg.model.attention.module == "jattn"  # the split is served by jattn.parallel
    assert (cfg.target.metric, cfg.target.op) == ("exact_match", ">=") and cfg.target.value >= 0.99
    header = "\n".join(line for line in (ROOT / "configs/passkey.yaml").read_text().splitlines()
                       if line.startswith("#"))
    assert "--cpu-devices 8" in header and "measured" in header
    task, _ = tasks.build(cfg.data)
    assert task.tokens_per_example == p.seq_len


def test_attention_figure_and_samples_show_the_query_and_the_value():
    task = small(seq_len=32, min_distance=16)
    model = task.build_model(ModelConfig(num_layers=1, d_model=16, num_heads=2, mlp_dim=32, positions="rope"),
                             dtype=np.float32, rngs=nnx.Rngs(0))
    example = task.eval_set(jax.random.key(3), 1)
    fig = task.attention_figure(model, example)
    (row,) = fig.rows
    p = needle_position(np.asarray(example.inputs[0]), task.num_filler, task.num_values)
    assert row.weights_NTS.shape[:2] == (2, 4) and row.query_labels[-1] == "?@31"
    assert row.key_labels[row.mark[1]] == f"{task.token_label(example.inputs[0, p])}@{p}"
    assert row.mark[0] == 3 and f"({31 - p} back)" in row.head_notes[0]
    lines = task.samples(model, SampleOptions(num=3), jax.random.key(0))
    assert len(lines) == 4 and lines[-1].endswith("right (argmax at the query)")
    assert re.match(r"v\d at position \d+ of 32 \(\d+ back\)  ->  \w+   \((right|WRONG)\)", lines[0]), lines[0]
