"""Train a tiny transformer on one of the tasks, as a config says.

    python -m experiments.train --config configs/default.yaml [key=value ...] [--resume]
    python -m experiments.launch --processes 2 --devices-per-process 4 -- --config ... # several processes

Several processes (``jax.distributed``): ``--coordinator host:port --num-processes N
--process-id i`` (or ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``) in each; `experiments.launch` starts N of them on one machine.
Every process computes; process 0 alone writes the run folder's files and prints.

The run folder ``<runs_dir>/<name>/`` receives the resolved ``config.yaml``,
``metrics.jsonl`` (one JSON object a line: ``split`` "train" or "eval", ``step``, the
metrics), orbax ``checkpoints/``, ``summary.json`` (final metrics, target reached or
not, timings) and, unless ``plot=false``, the plots of `experiments.plot`.

This module is the training loop and its command line; the pieces it is built from
(keys, mesh, model, optimizer, the pure step functions, checkpoints) are the run
library `experiments.run`, which the plots, samples and throughput share.

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
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from experiments import config as config_lib
from experiments import run as run_lib
from experiments.config import Config
from experiments.schema import ConfigError


def _console():
    # long lines stay whole in logs; processes other than 0 stay quiet
    return Console(highlight=False, soft_wrap=True, quiet=not run_lib.is_main_process())


def _progress(console):
    """A live bar on a terminal; nothing otherwise (logs and tests)."""
    return Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console,
        disable=not console.is_terminal, transient=False,
    )


def train(cfg: Config, *, resume: bool = False, console=None) -> dict:
    """Run (or, with ``resume``, continue) the experiment; return the summary that is
    also written to ``summary.json``."""
    console = console or _console()
    t_start = time.perf_counter()
    main = run_lib.is_main_process()  # writes the files; every process computes
    out = run_lib.run_dir(cfg)
    ckpt_dir = out / "checkpoints"
    if resume and (out / "config.yaml").exists():
        saved = config_lib.load(out / "config.yaml")
        # where and how, not what, is computed
        free = ("runs_dir", "plot", *(f"mesh.{a}" for a in config_lib.MESH_AXES))
        diff = [k for k, _, _ in _diff(config_lib.to_dict(saved), config_lib.to_dict(cfg)) if k not in free]
        if diff:
            raise ConfigError(
                f"--resume: the config differs from {out / 'config.yaml'} in {', '.join(diff)}; "
                "resume with the same config (or start a new run with name=...)"
            )
    s = run_lib.setup(cfg)  # before touching the folder: a config error leaves it as it was
    run_lib.sync("read the run folder")
    if main:
        if out.exists() and not resume:
            run_lib.clear_run_folder(out)
            console.print(f"{out} exists: starting over (pass --resume to continue it)")
        out.mkdir(parents=True, exist_ok=True)
        config_lib.dump(cfg, out / "config.yaml", header=_command_line(cfg))
    run_lib.sync("run folder ready")

    task, mesh, state = s.task, s.mesh, s.state
    replicated = NamedSharding(mesh, P())
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    k = run_lib.keys(cfg)

    mngr = run_lib.checkpoint_manager(ckpt_dir, cfg.checkpoint.keep)
    start = 0
    if resume and mngr.latest_step() is not None:
        start = mngr.latest_step()
        state = mngr.restore(start, args=ocp.args.StandardRestore(run_lib.abstract_state(state)))
        console.print(f"resumed {out} from the checkpoint at step {start}")
    elif resume:
        console.print(f"--resume: no checkpoint in {ckpt_dir}; starting from step 0")
    log = run_lib.MetricsLog(out / "metrics.jsonl" if main else None, start if resume else None)

    # Held-out set: fixed, generated once, split into eval batches on the data axis.
    eval_batches, reference = run_lib.eval_batches(s)
    B = cfg.train.batch_size
    tokens_per_step = B * task.tokens_per_example
    make_batch = run_lib.BatchFeeder(s.local_task if jax.process_count() > 1 else task, mesh, k["train_data"], B)
    train_step = jax.jit(
        run_lib.make_train_step(task, s.graphdef, s.tx, s.schedule, k["dropout"], cfg.model.dropout),
        donate_argnums=0, out_shardings=(state_shardings, replicated),
    )
    eval_step = jax.jit(run_lib.make_eval_step(task, s.graphdef), out_shardings=replicated)

    # Under the mesh: jattn sees the context axis (context parallelism) in the types.
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        example_batch = make_batch(0)
        train_step = train_step.lower(state, example_batch).compile()
        eval_step = eval_step.lower(state.params, eval_batches[0]).compile()
        compile_s = time.perf_counter() - t0

        n_params = sum(x.size for x in jax.tree.leaves(state.params))
        a = cfg.model.attention
        console.print(
            f"[bold]{cfg.name}[/]: task {task.name} ({task.describe(s.task_info)}), "
            f"{n_params:,} params, attention {a.module}{'/' + a.implementation if a.implementation else ''}, "
            f"{cfg.train.dtype}, {run_lib.describe_devices(mesh)}; compiled in {compile_s:.1f}s"
        )

        def evaluate(step: int) -> dict:
            sums = [eval_step(state.params, b) for b in eval_batches]
            total = jax.tree.map(lambda *xs: sum(float(x) for x in xs), *sums)
            row = task.summarize(total, reference)
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
                batch = make_batch(step - 1)
                state, m = train_step(state, batch)
                window_losses.append(m["loss"])
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    losses = [float(x) for x in window_losses]
                    now = time.perf_counter()
                    tps = len(losses) * tokens_per_step / max(now - t_window - paused, 1e-9)
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
        compile_s=compile_s, devices=run_lib.describe_devices(mesh), processes=jax.process_count(),
        mesh=dict(mesh.shape), jax=jax.__version__,
        data=s.task_info, resumed_from=start if resume else None,
    )
    summary["train_s"] = time.perf_counter() - t_start
    if cfg.plot and jax.process_count() > 1:
        console.print(f"plots: not drawn in a multi-process run; python -m experiments.plot {out}")
    elif cfg.plot:
        from experiments import plot  # matplotlib: imported only when plotting

        summary["plots"] = [str(p) for p in plot.plot_run(out)]
    summary["wall_s"] = time.perf_counter() - t_start
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    verdict = "[green]reached[/]" if reached else "[red]NOT reached[/]"
    console.print(
        f"target {t.metric} {t.op} {t.value}: {verdict} ({value:.4f}) after {cfg.train.steps} steps "
        f"in {summary['wall_s']:.1f}s; run folder {out}"
    )
    return summary


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
    group = parser.add_argument_group("several processes (jax.distributed; or experiments.launch)")
    group.add_argument("--coordinator", help="host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS; none: one process)")
    group.add_argument("--num-processes", type=int, help="the number of processes (default: $JAX_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int, help="this process's id, 0..N-1 (default: $JAX_PROCESS_ID)")
    group.add_argument("--cpu-devices", type=int, help="force this many CPU devices in this process")
    group.add_argument("--heartbeat-timeout", type=int, default=30, metavar="S",
                       help="a process silent for S seconds is declared dead and the others stop (default 30)")
    args = parser.parse_intermixed_args(argv)  # flags before, between or after the overrides
    try:
        run_lib.start_processes(args.coordinator, args.num_processes, args.process_id,
                                cpu_devices=args.cpu_devices, heartbeat_timeout_s=args.heartbeat_timeout)
        cfg = config_lib.load(args.config, args.overrides)
        return train(cfg, resume=args.resume)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
