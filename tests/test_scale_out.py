"""Scaling the trainer out: a (data, fsdp, tensor, context) mesh on 8 CPU devices and
two processes of 4 devices each (``jax.distributed``, gloo) train as one device does;
a process killed mid-run stops the others within a bound, and ``--resume`` ends where
an uninterrupted run ends.

Suite time: a 1-layer model, 20 steps; the runs overlap (the `jobs` fixture) so that
both cores of a small machine work; subprocesses compile with most XLA passes off
(``JAX_DISABLE_MOST_OPTIMIZATIONS``), as this process does (tests/conftest.py).
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from experiments import config, launch, run, train
from experiments.config import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = [
    "train.steps=20", "model.num_layers=1", "model.d_model=32", "model.num_heads=4", "model.mlp_dim=64",
    "train.batch_size=16", "train.learning_rate=3e-3", "train.warmup_fraction=0.1", "train.log_every=5",
    "eval.every=20", "eval.examples=32", "eval.batch_size=16", "plot=false",
]
KILLED = ["checkpoint.every=5"]  # the two-process job: killed after its first checkpoint
MESHES = {  # name -> mesh overrides (8 devices)
    "one": ["mesh.data=1"],
    "d8": ["mesh.data=8"],  # data parallelism alone (the default on 8 devices)
    "dtc": ["mesh.data=2", "mesh.tensor=2", "mesh.context=2"],
    "ftc": ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "mesh.context=2"],
}
GRACE_S = 3  # the launcher's grace after a failure, in the kill test
ENV = {"JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "PYTHONPATH": str(ROOT)}

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    from flax import nnx
    from experiments import config, run, tasks, train
    runs_dir, tiny, meshes = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    for name, mesh in meshes.items():
        cfg = config.load("configs/sort.yaml", tiny + mesh + ["checkpoint.every=20", f"runs_dir={runs_dir}", f"name={name}"])
        summary = train.train(cfg)
        if name == "ftc":  # the parameters and their Adam moments are sharded as the rules say
            mesh = run.make_mesh(cfg)
            task, _ = tasks.build(cfg.data)
            model = nnx.eval_shape(lambda: task.build_model(run.model_config(cfg, mesh), dtype=run.compute_dtype(cfg), rngs=nnx.Rngs(0)))
            shardings = run.state_shardings(nnx.split(model, nnx.Param)[1], run.make_optimizer(cfg)[0], mesh)
            kernel = shardings.params["blocks"][0]["attn"]["query"]["kernel"]
            mu = shardings.opt_state[1][0].mu["blocks"][0]["mlp"]["up"]["kernel"]
            print("SPECS", json.dumps([str(kernel.spec), str(mu.spec), kernel.shard_shape((32, 4, 8))]))
        print("DEVICES", name, summary["devices"])
        mesh = run.make_mesh(cfg)  # jattn splits the sequence: an Explicit context axis in the model's types
        print("SPLIT", name, run.splits_sequence(mesh), run.model_config(cfg, mesh).attention.sequence_axis)
    """
)


def rows(folder: pathlib.Path, split: str) -> list[dict]:
    return [r for r in run.read_metrics(folder / "metrics.jsonl") if r["split"] == split]


def max_rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.abs(b)))


def _env(**extra) -> dict:
    env = {**os.environ, **ENV, **extra}
    env.pop("XLA_FLAGS", None)
    return env


def _wait(proc: subprocess.Popen, log: pathlib.Path, timeout: float = 600) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return log.read_text()


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Every run of the module, overlapped to use both cores of a small machine:

    - a subprocess with 8 CPU devices trains the ``d8``, ``dtc`` and ``ftc`` meshes;
    - a two-process job (4 devices each, ``ftc`` mesh) has process 1 SIGKILLed after
      its first checkpoint, then is resumed (the two launches share a compilation
      cache, so the resumed one compiles nothing);
    - meanwhile this process trains the 1-device reference.
    """
    runs_dir = tmp_path_factory.mktemp("scale_out")
    ref_log = runs_dir / "reference.log"
    with open(ref_log, "w") as f:
        ref = subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(runs_dir), json.dumps(TINY),
             json.dumps({k: MESHES[k] for k in ("d8", "dtc", "ftc")})],
            cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT,
        )

    cache = {"JAX_COMPILATION_CACHE_DIR": str(runs_dir / "xla_cache"),
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    args = ["--config", "configs/sort.yaml", *TINY, *MESHES["ftc"], *KILLED, f"runs_dir={runs_dir}", "name=mp"]
    cmd = [sys.executable, "-m", "experiments.launch", "--processes", "2", "--devices-per-process", "4",
           "--grace", str(GRACE_S), "--", *args]
    killed_log = runs_dir / "killed.log"
    with open(killed_log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(**cache), stdout=f, stderr=subprocess.STDOUT)
    ckpt = runs_dir / "mp" / "checkpoints" / "5"
    polls = 0  # a bounded wait: 30000 polls of 10 ms
    while not ckpt.is_dir():
        assert proc.poll() is None, "the job ended before it could be killed:\n" + killed_log.read_text()[-3000:]
        assert polls < 30000, "no checkpoint appeared:\n" + killed_log.read_text()[-3000:]
        polls += 1
        time.sleep(0.01)
    pid = int(re.search(r"pids 0:\d+ 1:(\d+)", killed_log.read_text()).group(1))
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    proc.wait(timeout=GRACE_S + 60)
    killed = dict(code=proc.returncode, out=killed_log.read_text(), stopped_s=time.monotonic() - killed_at,
                  pid=pid, last_step=run.read_metrics(runs_dir / "mp" / "metrics.jsonl")[-1]["step"])

    resumed_log = runs_dir / "resumed.log"
    with open(resumed_log, "w") as f:
        resumed = subprocess.Popen([*cmd, "--resume"], cwd=ROOT, env=_env(**cache), stdout=f, stderr=subprocess.STDOUT)

    one = config.load(ROOT / "configs/sort.yaml", TINY + MESHES["one"] + [
        "checkpoint.every=20", f"runs_dir={runs_dir}", "name=one"])
    train.train(one)

    resumed_out = _wait(resumed, resumed_log)
    ref_out = _wait(ref, ref_log)
    assert ref.returncode == 0, ref_out[-6000:]
    return dict(runs=runs_dir, ref_out=ref_out, killed=killed, resumed_code=resumed.returncode,
                resumed_out=resumed_out)


@pytest.mark.parametrize("mesh", ["d8", "dtc", "ftc"])
def test_a_sharded_run_on_8_devices_trains_like_one_device(jobs, mesh):
    want, got = jobs["runs"] / "one", jobs["runs"] / mesh
    assert f"DEVICES {mesh} 8 x cpu (cpu)" in jobs["ref_out"]
    # the context axis served by jattn.parallel (none with data parallelism alone)
    split = "False None" if mesh == "d8" else "True context"
    assert f"SPLIT {mesh} {split}" in jobs["ref_out"]
    losses, want_losses = [r["loss"] for r in rows(got, "train")], [r["loss"] for r in rows(want, "train")]
    assert len(losses) == 4
    np.testing.assert_allclose(losses, want_losses, rtol=1e-4)
    np.testing.assert_allclose(rows(got, "eval")[-1]["loss"], rows(want, "eval")[-1]["loss"], rtol=1e-4)
    print(f"{mesh}: max relative loss difference {max_rel_diff(losses, want_losses):.1e}")


def test_parameters_and_optimizer_state_are_sharded_by_their_logical_names(jobs):
    specs = json.loads(jobs["ref_out"].split("SPECS ", 1)[1].splitlines()[0])
    # query kernel [embed D=32, heads N=4, head_dim 8]: D over fsdp, N over tensor
    assert specs[0] == "P('fsdp', 'tensor', None)", specs
    # Adam's first moment of the MLP's up kernel [embed, mlp]: as the parameter
    assert specs[1] == "P('fsdp', 'tensor')", specs
    assert specs[2] == [16, 2, 8]


def test_a_killed_process_stops_the_others_within_the_grace(jobs):
    killed = jobs["killed"]
    assert killed["code"] == 1, killed["out"][-3000:]
    assert re.search(rf"launch: FAILED: process 1 \(pid {killed['pid']}\) killed by SIGKILL first; process 0 ",
                     killed["out"]), killed["out"][-3000:]
    # the launcher's bound: the grace + its 0.1 s poll (+ slack for a loaded machine)
    assert killed["stopped_s"] < GRACE_S + 3, killed["stopped_s"]
    assert killed["last_step"] < 20, "the job had finished before the kill"
    print(f"the job stopped {killed['stopped_s']:.2f} s after the kill")


def test_two_processes_resume_to_the_losses_of_one_process_of_8_devices(jobs):
    folder, out = jobs["runs"] / "mp", jobs["resumed_out"]
    assert jobs["resumed_code"] == 0, out[-4000:]
    assert re.search(r"resumed .* from the checkpoint at step (5|10|15)", out), out[-3000:]
    assert "2 processes, 8 x cpu (cpu), mesh fsdp 2 x tensor 2 x context 2" in out
    want = jobs["runs"] / "ftc"
    got_rows, want_rows = rows(folder, "train"), rows(want, "train")
    assert [r["step"] for r in got_rows] == [r["step"] for r in want_rows] == [5, 10, 15, 20]
    # the same programs on the same 8 devices: equal up to the order of the reductions
    for key in ("loss", "grad_norm", "lr"):
        np.testing.assert_allclose([r[key] for r in got_rows], [r[key] for r in want_rows], rtol=1e-6, err_msg=key)
    got, want_eval = rows(folder, "eval")[-1], rows(want, "eval")[-1]
    assert got["step"] == want_eval["step"] == 20
    for key in ("loss", "accuracy", "exact_match"):
        np.testing.assert_allclose(got[key], want_eval[key], rtol=1e-6, err_msg=key)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["resumed_from"] in (5, 10, 15)
    print(f"2 x 4 against 1 x 8: max relative loss difference "
          f"{max_rel_diff([r['loss'] for r in got_rows], [r['loss'] for r in want_rows]):.1e}")


# --------------------------------------------------------------- config, cheap checks


def test_mesh_config_errors_name_the_key():
    load = lambda *o: config.load(ROOT / "configs/sort.yaml", list(o))  # noqa: E731
    with pytest.raises(ConfigError, match=r"unknown config key 'mesh.sequence'; did you mean"):
        load("mesh.sequence=2")
    with pytest.raises(ConfigError, match=r"'mesh.tensor' must be -1 .* or a positive int; got 0"):
        load("mesh.tensor=0")
    with pytest.raises(ConfigError, match=r"only one mesh axis can be -1 .* mesh.data and mesh.context"):
        load("mesh.context=-1")
    with pytest.raises(ConfigError, match=r"model.num_heads \(4\) must be a multiple of mesh.tensor \(3\)"):
        load("mesh.tensor=3")
    with pytest.raises(ConfigError, match=r"model.d_model \(64\) must be a multiple of mesh.fsdp \(3\)"):
        load("mesh.fsdp=3", "model.num_heads=2")
    with pytest.raises(ConfigError, match=r"'mesh.fsdp' expects an int; got '2x'"):
        load("mesh.fsdp=2x")
    with pytest.raises(ConfigError, match=r"model.attention.sequence_axis is set by the run"):
        load("model.attention.sequence_axis=context")
    m = load("mesh.data=2", "mesh.tensor=-1").mesh
    assert m.sizes(8) == {"data": 2, "fsdp": 1, "tensor": 4, "context": 1}
    with pytest.raises(ConfigError, match=r"mesh.data=2 x mesh.tensor=-1: mesh.tensor=-1 takes .* 7 local devices"):
        m.sizes(7)
    with pytest.raises(ConfigError, match=r"mesh.data=2 x mesh.tensor=2 x mesh.context=2 = 8 devices but only 1 local"):
        load("mesh.data=2", "mesh.tensor=2", "mesh.context=2").mesh.sizes(1)
    assert load().mesh.sizes(3) == {"data": 3, "fsdp": 1, "tensor": 1, "context": 1}  # the default


def test_logical_names_map_to_mesh_axes_that_divide_them():
    import jax
    from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

    mesh = AbstractMesh((2, 2, 2, 1), ("data", "fsdp", "tensor", "context"), axis_types=(AxisType.Auto,) * 4)
    assert run.logical_spec(("embed", "heads", "head_dim"), (32, 4, 8), mesh) == P("fsdp", "tensor", None)
    assert run.logical_spec(("embed", "kv_heads", "head_dim"), (32, 1, 8), mesh) == P("fsdp", None, None)  # MQA
    assert run.logical_spec(("vocab", "embed"), (17, 33), mesh) == P(None, None)  # 33 does not split in 2
    assert run.logical_spec(None, (3,), mesh) == P()
    del jax


def test_launcher_describes_exits_and_needs_train_arguments(capsys):
    assert launch.describe_exit(-9) == "killed by SIGKILL" and launch.describe_exit(2) == "exited with status 2"
    with pytest.raises(SystemExit):
        launch.main(["--processes", "2"])
    assert "give the train arguments after --" in capsys.readouterr().err
