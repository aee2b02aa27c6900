"""The run library: what training, plotting, sampling and the throughput measurement
share -- a run's PRNG keys, mesh, model, optimizer, pure step functions, its folder,
metrics log and checkpoints.  `experiments.train` is the command line over it.

The training step is pure: ``state, batch -> state, metrics`` under ``jax.jit`` with
the state donated; its batch is ``task.train_batch(fold_in(keys["train_data"], step))``
and its dropout key ``fold_in(keys["dropout"], step)``, so a run resumed from a
checkpoint at step s repeats steps s+1... exactly as an uninterrupted run would.
Data parallelism: the batch is split over the ``data`` axis of a mesh of local
devices, the state is replicated, and XLA inserts the gradient all-reduce.

Example:
  >>> from experiments import config
  >>> cfg = config.load("configs/sort.yaml", ["model.d_model=16", "model.num_heads=2"])
  >>> s = setup(cfg)
  >>> s.task.name, int(s.state.step)
  ('sort', 0)
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from experiments import config as config_lib
from experiments import tasks
from experiments.config import Config
from experiments.schema import ConfigError


class TrainState(NamedTuple):
    """Everything a step updates: step count, parameters and optimizer state (plain
    pytrees of arrays, so orbax saves and restores them as they are)."""

    step: jax.Array  # int32 scalar: steps taken
    params: Any
    opt_state: Any


def run_dir(cfg: Config) -> pathlib.Path:
    return pathlib.Path(cfg.runs_dir) / cfg.name


def keys(cfg: Config) -> dict[str, jax.Array]:
    """The run's PRNG keys, each from its own fold of the seed, never reused:
    ``params`` (init), ``train_data`` (folded with the step), ``eval_data``,
    ``dropout`` (folded with the step)."""
    root = jax.random.key(cfg.train.seed)
    return {name: jax.random.fold_in(root, i)
            for i, name in enumerate(("params", "train_data", "eval_data", "dropout"))}


def make_mesh(cfg: Config) -> Mesh:
    """A one-axis ``('data',)`` mesh over ``mesh.data`` local devices (-1: all)."""
    devices = jax.local_devices()
    n = len(devices) if cfg.mesh.data == -1 else cfg.mesh.data
    if n > len(devices):
        raise ConfigError(f"mesh.data={n} but only {len(devices)} local devices are visible")
    for key, value in (("train.batch_size", cfg.train.batch_size), ("eval.batch_size", cfg.eval.batch_size)):
        if value % n:
            raise ConfigError(f"{key}={value} must be a multiple of the {n} devices of mesh.data")
    return Mesh(np.array(devices[:n]), ("data",))


def describe_devices(mesh: Mesh) -> str:
    d = mesh.devices.reshape(-1)
    return f"{len(d)} x {d[0].device_kind} ({d[0].platform})"


def compute_dtype(cfg: Config):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.train.dtype]


def make_optimizer(cfg: Config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (decay on matrices only) after global-norm clipping, with linear warmup
    over ``warmup_fraction`` of the steps, then cosine decay to
    ``learning_rate * min_lr_ratio`` at the last step."""
    t = cfg.train
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.learning_rate, warmup_steps=round(t.warmup_fraction * t.steps),
        decay_steps=t.steps, end_value=t.learning_rate * t.min_lr_ratio,
    )
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    tx = optax.chain(
        optax.clip_by_global_norm(t.grad_clip),
        optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask),
    )
    return tx, schedule


def make_train_step(task, graphdef, tx, schedule, dropout_key: jax.Array, dropout: float):
    """The pure step ``(state, batch) -> (state, metrics)`` on ``task.loss``; jit it
    with the state donated."""

    def train_step(state: TrainState, batch):
        rngs = nnx.Rngs(dropout=jax.random.fold_in(dropout_key, state.step))

        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            return task.loss(model, batch, deterministic=dropout == 0.0, rngs=rngs)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def make_eval_step(task, graphdef):
    """``(params, batch) -> task.eval_sums`` on one held-out batch."""

    def eval_step(params, batch):
        return task.eval_sums(nnx.merge(graphdef, params), batch)

    return eval_step


class Setup(NamedTuple):
    """A run ready to train: built once, shared by training, plots, samples and the
    throughput measurement."""

    cfg: Config
    task: Any
    task_info: dict
    mesh: Mesh
    graphdef: Any
    state: TrainState
    tx: Any
    schedule: Any


def setup(cfg: Config) -> Setup:
    """Task, mesh, model and a fresh (replicated) train state for ``cfg``."""
    task, task_info = tasks.build(cfg.data)
    mesh = make_mesh(cfg)
    model = task.build_model(cfg.model, dtype=compute_dtype(cfg), rngs=nnx.Rngs(params=keys(cfg)["params"]))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    tx, schedule = make_optimizer(cfg)
    replicated = NamedSharding(mesh, P())
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    state = jax.device_put(state, replicated)
    task = jax.device_put(task, replicated)
    return Setup(cfg, task, task_info, mesh, graphdef, state, tx, schedule)


def eval_batches(s: Setup) -> tuple[list, dict]:
    """The held-out set (generated once from ``keys["eval_data"]``) split into eval
    batches sharded on the data axis, and the task's reference metrics on it."""
    cfg, batched = s.cfg, NamedSharding(s.mesh, P("data"))
    eval_set = jax.jit(lambda t: t.eval_set(keys(cfg)["eval_data"], cfg.eval.examples))(s.task)
    reference = s.task.reference_metrics(eval_set)
    size = cfg.eval.batch_size
    batches = [jax.device_put(jax.tree.map(lambda x: x[i * size:(i + 1) * size], eval_set), batched)
               for i in range(cfg.eval.examples // size)]
    return batches, reference


def held_out_example(s: Setup):
    """The first held-out example as a batch of one (for plots)."""
    return jax.jit(lambda t: t.eval_set(keys(s.cfg)["eval_data"], 1))(s.task)


# ------------------------------------------------------------------- folders, restore


def checkpoint_manager(directory: pathlib.Path, keep: int) -> ocp.CheckpointManager:
    # Synchronous saves: the next step donates the state's buffers, so a background
    # writer must not still be reading them.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=False, cleanup_tmp_directories=True
    )
    return ocp.CheckpointManager(directory.absolute(), options=options)


def abstract_state(state: TrainState) -> TrainState:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def restore_params(run: pathlib.Path, step: int | None = None):
    """``(cfg, setup, params, step)`` of a run folder's latest (or given) checkpoint."""
    run = pathlib.Path(run)
    cfg = config_lib.load(run / "config.yaml", [f"runs_dir={run.parent}", f"name={run.name}", "mesh.data=1"])
    s = setup(cfg)
    with checkpoint_manager(run / "checkpoints", cfg.checkpoint.keep) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {run / 'checkpoints'}")
        state = mngr.restore(step, args=ocp.args.StandardRestore(abstract_state(s.state)))
    return cfg, s, state.params, step


def restore_model(run: pathlib.Path, step: int | None = None):
    """``(cfg, setup, model, step)``: the run's model with its checkpointed weights."""
    cfg, s, params, step = restore_params(run, step)
    return cfg, s, nnx.merge(s.graphdef, params), step


class MetricsLog:
    """``metrics.jsonl``: appends one JSON object a line; on resume, drops the lines
    written after the checkpoint being resumed from."""

    def __init__(self, path: pathlib.Path, resume_step: int | None):
        self.path = path
        if resume_step is None:
            path.write_text("")
        else:
            kept = [line for line in self.rows() if line["step"] <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def rows(self) -> list[dict]:
        return read_metrics(self.path)

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


def read_metrics(path: pathlib.Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (a half-written last line, left by a kill
    mid-write, is dropped)."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return rows


RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "loss.png", "attention.png", "checkpoints")


def clear_run_folder(out: pathlib.Path) -> None:
    """Delete what an earlier run wrote into ``out``; refuse a folder that is not a
    run folder (so ``runs_dir=. name=jattn`` cannot delete the sources)."""
    entries = {p.name for p in out.iterdir()}
    if entries and not {"config.yaml", "metrics.jsonl"} & entries:
        raise ConfigError(
            f"{out} exists and is not a run folder (no config.yaml or metrics.jsonl); "
            "choose another name= or runs_dir="
        )
    for name in RUN_FILES:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
