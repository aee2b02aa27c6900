"""experiments.train (and the run library experiments.run): every config trains, a
SIGKILLed run resumes to the same end, and the run folder holds what it should
(8-device data parallelism matching one device is in tests/test_scale_out.py, with
the other meshes).

Suite time (these runs were most of ``make test``): runs of 20-30 steps spend their
time compiling, so they compile with most XLA passes off like the rest of the suite
(tests/conftest.py); only the 120-step reference run that the killed-and-resumed
command-line run must reproduce to rtol 1e-6 is compiled as the command line
compiles it.  In the every-config test the two byte-level LM configs
(lm, throughput_cpu) train on sequences of 64 at batch 16 (their loss still falls by
about 2, ten times the 0.2 asserted), so does passkey (T=4096 over 8 devices in its
file; here T=64 on one), and only lm writes its plots through
``train`` (a recall run's plots are checked by `test_plots_and_samples_of_a_run`).
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import config, plot, run, sample, train
from experiments.config import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAINING_CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("bench_"))

# A small recall run shared by the resume, plot and sample tests (batch 16: still
# splits over 8 devices).
SMALL = [
    "train.batch_size=16", "train.warmup_fraction=0.1", "train.log_every=10", "eval.examples=128", "eval.batch_size=64",
    "checkpoint.every=20", "plot=false",
]


def rows(run: pathlib.Path, split: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def final_params(run_folder: pathlib.Path):
    cfg, s, params, step = run.restore_params(run_folder)
    return step, params


def _cli(args: list[str], env_extra: dict | None = None, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "experiments.train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


# Per config: overrides that make its 30 steps cheaper (see the module docstring).
SMALLER = {"lm": ["data.lm.seq_len=64", "train.batch_size=16"],
           "throughput_cpu": ["data.lm.seq_len=64", "train.batch_size=16"],
           # T=4096 split over 8 devices: here T=64 on this process's one device
           "passkey": ["data.passkey.seq_len=64", "data.passkey.min_distance=32", "mesh.context=1",
                       "train.batch_size=16"]}


@pytest.mark.parametrize("name", TRAINING_CONFIGS)
def test_every_config_trains_a_few_steps_with_a_falling_loss(name, tmp_path):
    cfg = config.load(ROOT / f"configs/{name}.yaml", [
        f"runs_dir={tmp_path}", "train.steps=30", "train.warmup_fraction=0.1", "train.log_every=5",
        "train.learning_rate=3e-3", "eval.every=30", "eval.batch_size=32", "eval.examples=32",
        "checkpoint.every=30", f"plot={str(name == 'lm').lower()}", *SMALLER.get(name, []),
    ])
    summary = train.train(cfg)
    run = tmp_path / cfg.name
    losses = [r["loss"] for r in rows(run, "train")]
    assert len(losses) == 6 and all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0] - 0.2, f"{name}: the loss did not fall: {losses}"
    final = rows(run, "eval")[-1]
    assert final["step"] == 30 and np.isfinite(final["loss"])
    assert summary["final"] == {k: v for k, v in final.items() if k not in ("split", "step")}
    assert config.load(run / "config.yaml") == cfg
    assert (run / "summary.json").exists() and ocp.CheckpointManager(run / "checkpoints").latest_step() == 30
    if cfg.plot:
        for png in ("loss.png", "attention.png"):
            assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if cfg.data.task == "lm":
        assert 0 < final["bpb_ratio"] < 2 and final["bigram_bpb"] > 2


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 120-step recall run (in this process), compiled with XLA's
    passes on as the command-line runs it is compared with are."""
    runs = tmp_path_factory.mktemp("uninterrupted")
    cfg = config.load(ROOT / "configs/default.yaml", SMALL + ["train.steps=120", "eval.every=40", f"runs_dir={runs}"])
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        train.train(cfg)
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)
    return runs / "default"


def test_a_killed_run_resumes_to_the_same_final_metrics(reference_run, tmp_path):
    args = ["--config", "configs/default.yaml", *SMALL, "train.steps=120", "eval.every=40",
            f"runs_dir={tmp_path}"]
    ckpts = tmp_path / "default" / "checkpoints"
    proc = _cli(args)
    polls = 0  # a bounded wait (12000 polls of 20 ms) instead of reading a clock
    while not (ckpts / "40").is_dir():  # two committed checkpoints, then kill mid-way
        assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read()}"
        assert polls < 12000, "no checkpoint appeared"
        polls += 1
        time.sleep(0.02)
    time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = ocp.CheckpointManager(ckpts).latest_step()
    assert killed_at is not None and 40 <= killed_at < 120
    last_logged = rows(tmp_path / "default", "train")[-1]["step"]

    resumed = _cli([*args, "--resume"])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"from the checkpoint at step {killed_at}" in out

    got, want = rows(tmp_path / "default", "train"), rows(reference_run, "train")
    assert [r["step"] for r in got] == [r["step"] for r in want] and last_logged >= killed_at
    for key in ("loss", "grad_norm", "lr"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], rtol=1e-6, err_msg=key)
    got, want = rows(tmp_path / "default", "eval"), rows(reference_run, "eval")
    assert [r["step"] for r in got] == [40, 80, 120] == [r["step"] for r in want]
    for key in ("loss", "accuracy", "exact_match"):
        np.testing.assert_allclose(got[-1][key], want[-1][key], rtol=1e-6, err_msg=key)
    (step_a, a), (step_b, b) = final_params(tmp_path / "default"), final_params(reference_run)
    assert step_a == step_b == 120
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)


def test_resuming_with_a_different_config_names_the_differences(reference_run):
    cfg = config.load(reference_run / "config.yaml", ["train.learning_rate=0.5", "train.seed=3"])
    with pytest.raises(ConfigError, match=r"differs from .* in train\.learning_rate, train\.seed"):
        train.train(cfg, resume=True)


def test_plots_and_samples_of_a_run(reference_run, capsys):
    paths = plot.main([str(reference_run)])
    assert [p.name for p in paths] == ["loss.png", "attention.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    lines = sample.main([str(reference_run), "--num", "3"])
    assert len(lines) == 4 and all("->" in line and "(answer v" in line for line in lines[:3])
    assert "right (greedy decoding with the KV cache" in lines[-1]
    assert lines[-1] in capsys.readouterr().out


def test_a_batch_that_does_not_split_over_the_devices_is_a_config_error(tmp_path):
    cfg = config.load(ROOT / "configs/default.yaml", SMALL + [f"runs_dir={tmp_path}", "mesh.data=3"])
    with pytest.raises(ConfigError, match="mesh.data=3 but only 1 local devices"):
        run.make_mesh(cfg)


def test_jattn_trains_like_the_flax_baseline_from_the_same_weights(tmp_path):
    """Both models draw identical initial weights from the seed (RoPE applied alike),
    so their training curves agree up to float rounding."""
    losses = {}
    for module in ("jattn", "flax"):
        cfg = config.load(ROOT / "configs/default.yaml", SMALL + [
            f"runs_dir={tmp_path}", f"name={module}", "train.steps=20", "eval.every=20",
            f"model.attention.module={module}", "model.attention.implementation=null",
        ])
        train.train(cfg)
        losses[module] = [r["loss"] for r in rows(tmp_path / module, "train")]
    np.testing.assert_allclose(losses["jattn"], losses["flax"], rtol=1e-4)


def test_a_fresh_run_clears_only_a_run_folder(tmp_path):
    (tmp_path / "default").mkdir()
    (tmp_path / "default" / "precious.txt").write_text("not a run")
    cfg = config.load(ROOT / "configs/default.yaml", SMALL + [f"runs_dir={tmp_path}", "train.steps=10"])
    with pytest.raises(ConfigError, match="exists and is not a run folder"):
        train.train(cfg)
    assert (tmp_path / "default" / "precious.txt").exists()


def test_metrics_log_on_resume_drops_later_rows_and_a_half_written_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"split": "train", "step": 10}\n{"split": "eval", "step": 20}\n'
                    '{"split": "train", "step": 30}\n{"split": "tra')
    log = run.MetricsLog(path, resume_step=20)
    assert log.rows() == [{"split": "train", "step": 10}, {"split": "eval", "step": 20}]
    log.write({"split": "train", "step": 21})
    assert [r["step"] for r in log.rows()] == [10, 20, 21]
    assert run.MetricsLog(path, resume_step=None).rows() == []
