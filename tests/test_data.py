"""experiments.data and experiments.tasks: the tasks' examples, the LM corpus and split,
the metrics."""

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import data, tasks
from experiments.config import ConfigError, DataConfig
from experiments.tasks.lm import LMConfig, LMTask, bigram_bits_per_byte, is_validation_file, load_corpus, stdlib_files
from experiments.tasks.recall import RecallTask
from experiments.tasks.sort import SortTask


def test_recall_examples_are_well_formed():
    task = RecallTask(num_pairs=5, num_keys=9, num_values=7, num_queries=3)
    b = task.train_batch(jax.random.key(3), 64)
    inputs, targets, weights = (np.asarray(x) for x in b)
    assert inputs.shape == targets.shape == weights.shape == (64, task.seq_len) == (64, 16)
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
    for x, y, w in zip(inputs, targets, weights):
        keys, values = x[0:10:2], x[1:10:2]
        assert len(set(keys.tolist())) == 5 and keys.max() < 9
        assert values.min() >= 9 and values.max() < 16
        assert x[10] == task.sep == 16
        pairs = dict(zip(keys.tolist(), values.tolist()))
        queries = x[11::2]
        assert len(set(queries.tolist())) == 3 and set(queries.tolist()) <= set(keys.tolist())
        scored = np.flatnonzero(w)
        np.testing.assert_array_equal(scored, [11, 13, 15])
        assert [pairs[q] for q in queries.tolist()] == y[scored].tolist()


def test_recall_batches_are_a_function_of_the_key():
    task = RecallTask(num_pairs=4, num_keys=8, num_values=8)
    a, b, c = (task.train_batch(jax.random.key(k), 16) for k in (1, 1, 2))
    np.testing.assert_array_equal(a.inputs, b.inputs)
    assert np.mean(np.asarray(a.inputs) != np.asarray(c.inputs)) > 0.3


def test_sort_examples_are_prompt_then_sorted_answer():
    task = SortTask(length=6, num_symbols=5)
    b = task.train_batch(jax.random.key(0), 32)
    inputs, targets, weights = (np.asarray(x) for x in b)
    assert inputs.shape == (32, 12) and task.vocab_size == 6
    full = np.concatenate([inputs, targets[:, -1:]], axis=1)
    np.testing.assert_array_equal(full[:, 6], 5)
    np.testing.assert_array_equal(full[:, 7:], np.sort(full[:, :6], axis=1))
    np.testing.assert_array_equal(weights, np.broadcast_to(np.arange(12) >= 6, (32, 12)))


def _write(folder, files):
    for name, text in files.items():
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text.encode() if isinstance(text, str) else text)


def test_folder_corpus_is_split_by_file_deterministically(tmp_path):
    files = {f"pkg/m{i:02d}.py": f"print({i})\n" * 20 for i in range(60)}
    files["data.bin"] = b"\x00\x01binary"
    files[".hidden/x.py"] = "secret"
    _write(tmp_path, files)
    train, val, info = load_corpus(str(tmp_path), 0.2)
    val_names = [n for n in sorted(files) if n.endswith(".py") and not n.startswith(".")
                 and is_validation_file(n, 0.2)]
    assert info["split"] == "by file" and info["val_files"] == len(val_names) and info["train_files"] == 60 - len(val_names)
    expected_val = b"\n".join(files[n].encode() for n in val_names)
    assert bytes(val) == expected_val
    assert b"binary" not in bytes(train) + bytes(val) and b"secret" not in bytes(train) + bytes(val)
    train2, val2, _ = load_corpus(str(tmp_path), 0.2)
    np.testing.assert_array_equal(train, train2)


def test_single_file_corpus_is_split_by_bytes(tmp_path):
    text = "".join(chr(97 + i % 26) for i in range(1000))
    (tmp_path / "t.txt").write_text(text)
    train, val, info = load_corpus(str(tmp_path / "t.txt"), 0.1)
    assert info["split"] == "by bytes"
    assert bytes(train) == text[:900].encode() and bytes(val) == text[900:].encode()
    with pytest.raises(ConfigError, match="data.path='/no/such/path' is neither a file nor a folder"):
        load_corpus("/no/such/path", 0.1)


def test_too_small_a_corpus_names_seq_len_and_path(tmp_path):
    (tmp_path / "t.txt").write_text("x" * 100)
    with pytest.raises(ConfigError, match="data.lm.seq_len=64 needs at least 66 bytes in the validation split"):
        tasks.build(DataConfig(task="lm", path=str(tmp_path / "t.txt"), lm=LMConfig(seq_len=64, val_fraction=0.1)))


def test_stdlib_corpus_is_deterministic_and_has_no_tests():
    root, files = stdlib_files()
    rel = [p.relative_to(root).as_posix() for p in files]
    assert len(rel) > 100 and rel == sorted(rel)
    assert "json/decoder.py" in rel
    assert not any("/test/" in "/" + r or "site-packages" in r for r in rel)


def test_lm_windows_come_from_their_split(tmp_path):
    text = bytes(range(256)) * 8
    (tmp_path / "t.bin.txt").write_bytes(text)
    task, info = tasks.build(DataConfig(task="lm", path=str(tmp_path / "t.bin.txt"), lm=LMConfig(seq_len=16, val_fraction=0.25)))
    train = bytes(np.asarray(task.train_N))
    b = task.train_batch(jax.random.key(0), 8)
    for x, y in zip(np.asarray(b.inputs), np.asarray(b.targets)):
        window = bytes(x.astype(np.uint8).tolist()) + bytes([int(y[-1])])
        assert window in train
        np.testing.assert_array_equal(x[1:], y[:-1])
    ev = task.eval_set(None, 5)
    val = np.asarray(task.val_M)
    np.testing.assert_array_equal(ev.inputs[0], val[:16])  # the first window starts the split
    np.testing.assert_array_equal(ev.targets[-1], val[-16:])  # the last one ends it
    assert float(np.min(ev.weights)) == 1.0


def test_bigram_bits_per_byte_matches_a_counting_reference():
    rng = np.random.default_rng(0)
    train = rng.choice(np.frombuffer(b"abcde", np.uint8), size=500, p=[0.4, 0.3, 0.15, 0.1, 0.05])
    inputs, targets = rng.choice(train, 40), rng.choice(train, 40)
    counts = collections.Counter(zip(train[:-1].tolist(), train[1:].tolist()))
    firsts = collections.Counter(train[:-1].tolist())
    alpha = 0.5
    bits = [-math.log2((counts[(a, b)] + alpha) / (firsts[a] + 256 * alpha)) for a, b in zip(inputs.tolist(), targets.tolist())]
    np.testing.assert_allclose(bigram_bits_per_byte(train, inputs, targets, alpha), np.mean(bits), rtol=1e-12)


def test_score_and_summarize_count_exact_matches():
    # 3 examples, T=3, V=4; scored positions 1 and 2
    targets = jnp.array([[0, 1, 2], [3, 3, 3], [1, 2, 0]])
    weights = jnp.array([[0.0, 1, 1]] * 3)
    batch = data.Batch(jnp.zeros_like(targets), targets, weights)
    pred = np.array([[9, 1, 2], [3, 0, 3], [1, 2, 0]])  # example 1 has one wrong scored token
    logits = jax.nn.one_hot(np.clip(pred, 0, 3), 4) * 5.0
    sums = data.score(logits, batch)
    task = SortTask(length=1, num_symbols=3)
    m = task.summarize(sums, {})
    assert m["exact_match"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(5 / 6)
    logp = jax.nn.log_softmax(logits)
    nll = -np.take_along_axis(np.asarray(logp), np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(m["loss"], (nll * np.asarray(weights)).sum() / 6, rtol=1e-6)


def test_lm_metrics_are_in_bits_and_relative_to_the_bigram():
    sums = dict(nll=jnp.float32(10 * math.log(2) * 3), weight=jnp.float32(10), correct=0, exact=0, examples=1)
    task = LMTask(train_N=jnp.zeros(4, jnp.uint8), val_M=jnp.zeros(4, jnp.uint8), seq_len=2)
    m = task.summarize(sums, {"bigram_bpb": 4.0})
    assert m["bpb"] == pytest.approx(3.0, rel=1e-6) and m["bpb_ratio"] == pytest.approx(0.75, rel=1e-6)
