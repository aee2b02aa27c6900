"""Train a tiny transformer on one of the tasks, as a config says.

    python -m experiments.train --config configs/default.yaml [key=value ...] [--resume]

The run folder ``<runs_dir>/<name>/`` receives the resolved ``config.yaml``,
``metrics.jsonl`` (one JSON object a line: ``split`` "train" or "eval", ``step``, the
metrics), orbax ``checkpoints/``, ``summary.json`` (final metrics, target reached or
not, timings) and, unless ``plot=false``, the plots of `experiments.plot`.

The training step is pure: ``state, batch -> state, metrics`` under ``jax.jit`` with
the state donated; its batch is ``task.train_batch(fold_in(data_key, step))`` and its
dropout key ``fold_in(dropout_key, step)``, so a run resumed from a checkpoint at
step s repeats steps s+1... exactly as an uninterrupted run would.  Data parallelism:
the batch is split over the ``data`` axis of a mesh of local devices, the state is
replicated, and XLA inserts the gradient all-reduce.

Example (from Python):
  >>> from experiments import config, train
  >>> cfg = config.load("configs/default.yaml", ["train.steps=5", "runs_dir=/tmp/runs"])
  >>> summary = train.train(cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from experiments import config as config_lib
from experiments import data as data_lib
from experiments.config import Config, ConfigError
from experiments.model import Transformer


class TrainState(NamedTuple):
    """Everything a step updates: step count, parameters and optimizer state (plain
    pytrees of arrays, so orbax saves and restores them as they are)."""

    step: jax.Array  # int32 scalar: steps taken
    params: Any
    opt_state: Any


# ---------------------------------------------------------------------------- pieces


def run_dir(cfg: Config) -> pathlib.Path:
    return pathlib.Path(cfg.runs_dir) / cfg.name


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


def compute_dtype(cfg: Config):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.train.dtype]


def build_model(cfg: Config, task, key: jax.Array) -> Transformer:
    return Transformer(cfg.model, vocab_size=task.vocab_size, max_len=task.seq_len,
                       dtype=compute_dtype(cfg), rngs=nnx.Rngs(params=key))


def make_optimizer(cfg: Config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (decay on matrices only) after global-norm clipping, with linear warmup
    over ``warmup_fraction`` of the steps, then cosine decay to
    ``learning_rate * min_lr_ratio`` at the last step."""
    t = cfg.train
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.learning_rate, warmup_steps=round(t.warmup_fraction * t.steps),
        decay_steps=t.steps, end_value=t.learning_rate * t.min_lr_ratio,
    )
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    tx = optax.chain(
        optax.clip_by_global_norm(t.grad_clip),
        optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask),
    )
    return tx, schedule


def weighted_loss(logits_BTV: jax.Array, batch: data_lib.Batch) -> jax.Array:
    """Mean cross-entropy over the scored targets (float32 whatever the compute dtype)."""
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    nll_BT = -jnp.take_along_axis(logp_BTV, batch.targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll_BT * batch.weights) / jnp.maximum(jnp.sum(batch.weights), 1.0)


def make_train_step(graphdef, tx, schedule, dropout_key: jax.Array, dropout: float):
    """The pure step ``(state, batch) -> (state, metrics)``; jit it with the state
    donated."""

    def train_step(state: TrainState, batch: data_lib.Batch):
        rngs = nnx.Rngs(dropout=jax.random.fold_in(dropout_key, state.step))

        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            logits_BTV = model(batch.inputs, deterministic=dropout == 0.0, rngs=rngs)
            return weighted_loss(logits_BTV, batch)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def make_eval_step(graphdef):
    """``(params, batch) -> sums`` of `experiments.data.score` on one held-out batch."""

    def eval_step(params, batch: data_lib.Batch):
        return data_lib.score(nnx.merge(graphdef, params)(batch.inputs), batch)

    return eval_step


def keys(cfg: Config) -> dict[str, jax.Array]:
    """The run's PRNG keys, each from its own fold of the seed, never reused:
    ``params`` (init), ``train_data`` (folded with the step), ``eval_data``,
    ``dropout`` (folded with the step)."""
    root = jax.random.key(cfg.train.seed)
    return {name: jax.random.fold_in(root, i)
            for i, name in enumerate(("params", "train_data", "eval_data", "dropout"))}


def checkpoint_manager(directory: pathlib.Path, keep: int) -> ocp.CheckpointManager:
    # Synchronous saves: the next step donates the state's buffers, so a background
    # writer must not still be reading them.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=False, cleanup_tmp_directories=True
    )
    return ocp.CheckpointManager(directory.absolute(), options=options)


def abstract_state(state: TrainState) -> TrainState:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


class Setup(NamedTuple):
    """A run ready to train: built once, shared by `train`, plot and sample."""

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
    task, task_info = data_lib.make_task(cfg.data)
    if cfg.target.metric not in task.metrics:
        raise config_lib.invalid_choice(
            "target.metric", cfg.target.metric, list(task.metrics), f"what task {task.name!r} reports"
        )
    mesh = make_mesh(cfg)
    model = build_model(cfg, task, keys(cfg)["params"])
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    tx, schedule = make_optimizer(cfg)
    replicated = NamedSharding(mesh, P())
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    state = jax.device_put(state, replicated)
    task = jax.device_put(task, replicated)
    return Setup(cfg, task, task_info, mesh, graphdef, state, tx, schedule)


def restore_params(run: pathlib.Path, step: int | None = None):
    """``(cfg, setup, params, step)`` of a run folder's latest (or given) checkpoint."""
    cfg = config_lib.load(run / "config.yaml", [f"runs_dir={run.parent}", f"name={run.name}", "mesh.data=1"])
    s = setup(cfg)
    with checkpoint_manager(run / "checkpoints", cfg.checkpoint.keep) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {run / 'checkpoints'}")
        state = mngr.restore(step, args=ocp.args.StandardRestore(abstract_state(s.state)))
    return cfg, s, state.params, step


# ---------------------------------------------------------------------------- output


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
        if not self.path.exists():
            return []
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if i != len(lines) - 1:  # only a kill mid-write may leave a partial line
                    raise
        return rows

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


def _console():
    return Console(highlight=False, soft_wrap=True)  # long lines stay whole in logs


def _progress(console):
    """A live bar on a terminal; nothing otherwise (logs and tests)."""
    return Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console,
        disable=not console.is_terminal, transient=False,
    )


def describe_devices(mesh: Mesh) -> str:
    d = mesh.devices.reshape(-1)
    return f"{len(d)} x {d[0].device_kind} ({d[0].platform})"


# ----------------------------------------------------------------------------- train


def train(cfg: Config, *, resume: bool = False, console=None) -> dict:
    """Run (or, with ``resume``, continue) the experiment; return the summary that is
    also written to ``summary.json``."""
    console = console or _console()
    t_start = time.perf_counter()
    out = run_dir(cfg)
    ckpt_dir = out / "checkpoints"
    if resume and (out / "config.yaml").exists():
        saved = config_lib.load(out / "config.yaml")
        free = ("runs_dir", "plot", "mesh.data")  # where and how, not what, is computed
        diff = [k for k, _, _ in _diff(config_lib.to_dict(saved), config_lib.to_dict(cfg)) if k not in free]
        if diff:
            raise ConfigError(
                f"--resume: the config differs from {out / 'config.yaml'} in {', '.join(diff)}; "
                "resume with the same config (or start a new run with name=...)"
            )
    elif out.exists() and not resume:
        clear_run_folder(out)
        console.print(f"{out} exists: starting over (pass --resume to continue it)")
    out.mkdir(parents=True, exist_ok=True)
    config_lib.dump(cfg, out / "config.yaml", header=_command_line(cfg))

    s = setup(cfg)
    task, mesh, state = s.task, s.mesh, s.state
    replicated, batched = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    k = keys(cfg)

    mngr = checkpoint_manager(ckpt_dir, cfg.checkpoint.keep)
    start = 0
    if resume and mngr.latest_step() is not None:
        start = mngr.latest_step()
        state = mngr.restore(start, args=ocp.args.StandardRestore(abstract_state(state)))
        console.print(f"resumed {out} from the checkpoint at step {start}")
    elif resume:
        console.print(f"--resume: no checkpoint in {ckpt_dir}; starting from step 0")
    log = MetricsLog(out / "metrics.jsonl", start if resume else None)

    # Held-out set: fixed, generated once, split into eval batches on the data axis.
    eval_set = jax.jit(lambda t: t.eval_set(k["eval_data"], cfg.eval.examples))(task)
    reference = data_lib.reference_metrics(task, eval_set)
    nb = cfg.eval.examples // cfg.eval.batch_size
    eval_batches = [
        jax.device_put(jax.tree.map(lambda x: x[i * cfg.eval.batch_size:(i + 1) * cfg.eval.batch_size], eval_set), batched)
        for i in range(nb)
    ]

    B, T = cfg.train.batch_size, task.seq_len
    make_batch = jax.jit(
        lambda task, step: task.train_batch(jax.random.fold_in(k["train_data"], step), B),
        out_shardings=batched,
    )
    train_step = jax.jit(
        make_train_step(s.graphdef, s.tx, s.schedule, k["dropout"], cfg.model.dropout),
        donate_argnums=0, out_shardings=(replicated, replicated),
    )
    eval_step = jax.jit(make_eval_step(s.graphdef), out_shardings=replicated)

    t0 = time.perf_counter()
    example_batch = make_batch(task, 0)
    train_step = train_step.lower(state, example_batch).compile()
    eval_step = eval_step.lower(state.params, eval_batches[0]).compile()
    compile_s = time.perf_counter() - t0

    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    console.print(
        f"[bold]{cfg.name}[/]: task {task.name} ({_task_words(task, s.task_info)}), "
        f"{n_params:,} params, attention {cfg.model.attention.module}"
        f"{'/' + cfg.model.attention.implementation if cfg.model.attention.implementation else ''}, "
        f"{cfg.train.dtype}, {describe_devices(mesh)}; compiled in {compile_s:.1f}s"
    )

    def evaluate(step: int) -> dict:
        sums = [eval_step(state.params, b) for b in eval_batches]
        total = jax.tree.map(lambda *xs: sum(float(x) for x in xs), *sums)
        row = data_lib.summarize(task, total, reference)
        log.write({"split": "eval", "step": step, **row})
        console.print(f"step {step:>6} | eval " + " ".join(f"{k} {v:.4f}" for k, v in row.items()))
        return row

    window_losses, paused, t_window = [], 0.0, time.perf_counter()
    tokens_per_s: list[float] = []
    progress = _progress(console)
    with progress:
        bar = progress.add_task("train", total=cfg.train.steps, completed=start, info="")
        for step in range(start + 1, cfg.train.steps + 1):
            # state.step == step - 1 here: batch and dropout key are those of step - 1
            batch = make_batch(task, step - 1)
            state, m = train_step(state, batch)
            window_losses.append(m["loss"])
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                losses = [float(x) for x in window_losses]
                now = time.perf_counter()
                tps = len(losses) * B * T / max(now - t_window - paused, 1e-9)
                tokens_per_s.append(tps)
                row = dict(split="train", step=step, loss=float(np.mean(losses)),
                           grad_norm=float(m["grad_norm"]), lr=float(m["lr"]), tokens_per_s=tps)
                if not all(math.isfinite(x) for x in losses):
                    log.write(row)
                    raise FloatingPointError(f"training loss became {losses[-1]} at step {step}")
                log.write(row)
                progress.update(bar, info=f"loss {row['loss']:.4f} | {tps:,.0f} tok/s")
                window_losses, paused, t_window = [], 0.0, now
            progress.update(bar, completed=step)
            t_pause = time.perf_counter()
            if step % cfg.eval.every == 0 or step == cfg.train.steps:
                evaluate(step)
            if step % cfg.checkpoint.every == 0 or step == cfg.train.steps:
                mngr.save(step, args=ocp.args.StandardSave(state), force=True)
                mngr.wait_until_finished()
            paused += time.perf_counter() - t_pause
    mngr.close()

    rows = log.rows()
    final = next((r for r in reversed(rows) if r["split"] == "eval"), None)
    if final is None or final["step"] != cfg.train.steps:
        final = {"split": "eval", "step": cfg.train.steps, **evaluate(cfg.train.steps)}
    t = cfg.target
    value = final[t.metric]
    reached = value >= t.value if t.op == ">=" else value <= t.value
    summary = dict(
        name=cfg.name, task=task.name, steps=cfg.train.steps, params=n_params,
        final={k: v for k, v in final.items() if k not in ("split", "step")},
        target=dict(metric=t.metric, op=t.op, value=t.value, reached=bool(reached)),
        train_loss=next((r["loss"] for r in reversed(rows) if r["split"] == "train"), None),
        tokens_per_s=float(np.median(tokens_per_s)) if tokens_per_s else None,
        compile_s=compile_s, devices=describe_devices(mesh), jax=jax.__version__,
        data=s.task_info, resumed_from=start if resume else None,
    )
    if cfg.plot:
        from experiments import plot  # here: plot imports this module

        summary["plots"] = [str(p) for p in plot.plot_run(out)]
    summary["wall_s"] = time.perf_counter() - t_start
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    verdict = "[green]reached[/]" if reached else "[red]NOT reached[/]"
    console.print(
        f"target {t.metric} {t.op} {t.value}: {verdict} ({value:.4f}) after {cfg.train.steps} steps "
        f"in {summary['wall_s']:.1f}s; run folder {out}"
    )
    return summary


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


def _task_words(task, info: dict) -> str:
    if task.name == "lm":
        return f"{info.get('train_bytes', 0):,} train / {info.get('val_bytes', 0):,} val bytes, T={task.seq_len}"
    return f"vocab {task.vocab_size}, T={task.seq_len}"


def _diff(a: dict, b: dict, prefix: str = ""):
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            yield from _diff(x, y, f"{prefix}{key}.")
        elif x != y:
            yield prefix + key, x, y


def _command_line(cfg: Config) -> str:
    return (
        f"Resolved config of run {cfg.name!r}, written by experiments.train.\n"
        f"Re-run: python -m experiments.train --config {pathlib.Path(cfg.runs_dir) / cfg.name / 'config.yaml'}"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.train",
        description="Train a tiny transformer as a config says.",
        epilog="Overrides are dotted keys, e.g. train.steps=200 model.attention.implementation=dense",
    )
    parser.add_argument("--config", required=True, help="a YAML file under configs/")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        cfg = config_lib.load(args.config, args.overrides)
        return train(cfg, resume=args.resume)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
