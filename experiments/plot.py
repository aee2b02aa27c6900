"""Plots of a run folder: loss curves and attention heatmaps.

    python -m experiments.plot runs/<name>

writes into the run folder

- ``loss.png``: training loss (mean of each logging window) and held-out loss against
  the step, and what the task's `LossPlot` adds (a reference line such as the bigram
  model's bits per byte; a second panel of held-out accuracies with the config's
  target);
- ``attention.png``: the attention maps the task draws (`Task.attention_figure`) for
  the trained model (latest checkpoint) on one held-out example, one row of heads per
  attention layer.

`experiments.train` calls `plot_run` at the end of training.
"""

from __future__ import annotations

import argparse
import pathlib

from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
from matplotlib.patches import Rectangle

from experiments import config as config_lib
from experiments import run as run_lib
from experiments import tasks
from experiments.tasks.base import AttentionFigure


def read_metrics(run: pathlib.Path) -> tuple[list[dict], list[dict]]:
    """``(train rows, eval rows)`` of ``metrics.jsonl``."""
    rows = run_lib.read_metrics(run / "metrics.jsonl")
    return [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "eval"]


def plot_losses(run: pathlib.Path, cfg) -> pathlib.Path:
    """``loss.png`` of a run folder."""
    train, evals = read_metrics(run)
    spec = tasks.get(cfg.data.task).loss_plot
    ncols = 2 if spec.panel else 1
    fig = Figure(figsize=(5.2 * ncols, 3.6), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)
    ax = axes[0, 0]
    ax.plot([r["step"] for r in train], [r["loss"] * spec.scale for r in train], label="train", lw=1.2)
    ax.plot([r["step"] for r in evals], [r["loss"] * spec.scale for r in evals], "o-", label="held-out", lw=1.2, ms=3)
    if spec.reference and evals and spec.reference in evals[-1]:
        reference = evals[-1][spec.reference]
        ax.axhline(reference, ls="--", c="gray", label=spec.reference_label or spec.reference)
        if cfg.target.metric == spec.ratio_target:
            ax.axhline(reference * cfg.target.value, ls=":", c="green",
                       label=f"target ({cfg.target.value:g} x {spec.reference_label or spec.reference})")
    ax.set_xlabel("step")
    ax.set_ylabel(spec.ylabel)
    ax.set_title(f"{cfg.name} (task {cfg.data.task})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if spec.panel:
        ax = axes[0, 1]
        for (metric, label), style in zip(spec.panel, ("o-", "s-", "^-", "v-")):
            ax.plot([r["step"] for r in evals], [r[metric] for r in evals], style, label=label, ms=3)
        if cfg.target.metric in dict(spec.panel):
            ax.axhline(cfg.target.value, ls=":", c="green", label=f"target {cfg.target.value:g}")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("step")
        ax.set_title("held-out accuracy")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    path = run / "loss.png"
    fig.savefig(path, dpi=90)
    return path


def attention_figure(run: pathlib.Path) -> tuple[object, AttentionFigure]:
    """``(cfg, figure)``: the task's attention maps of the run's latest checkpoint on
    its first held-out example."""
    cfg, s, model, _ = run_lib.restore_model(run)
    return cfg, s.task.attention_figure(model, run_lib.held_out_example(s))


def draw_attention(figure: AttentionFigure, title: str, path: pathlib.Path) -> pathlib.Path:
    """Heatmaps, one row per `AttentionRow` and one column per head, into ``path``."""
    rows = figure.rows
    N = max(r.weights_NTS.shape[0] for r in rows)
    T = max(max(r.weights_NTS.shape[1:]) for r in rows)
    size = 2.2 if T <= 24 else 3.0
    fig = Figure(figsize=(size * N + 0.6, (size + 0.5) * len(rows) + 0.6), layout="constrained")
    axes = fig.subplots(len(rows), N, squeeze=False)
    for i, row in enumerate(rows):
        for head in range(N):
            ax = axes[i, head]
            if head >= row.weights_NTS.shape[0]:
                ax.set_axis_off()
                continue
            ax.imshow(row.weights_NTS[head], cmap="viridis", vmin=0.0, vmax=1.0)
            text = f"{row.name} head {head + 1}"
            if row.head_notes:
                text += f"\n{row.head_notes[head]}"
            if row.mark is not None:
                t, s = row.mark
                ax.add_patch(Rectangle((s - 0.5, t - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
            ax.set_title(text, fontsize=8)
            wide = max(map(len, row.key_labels), default=0) > 2
            ax.set_xticks(range(len(row.key_labels)), row.key_labels, fontsize=6, rotation=90 if wide else 0)
            ax.set_yticks(range(len(row.query_labels)), row.query_labels, fontsize=6)
    fig.suptitle(f"{title}: attention weights (rows: queries, columns: keys)\n{figure.caption}", fontsize=9)
    fig.savefig(path, dpi=90)
    return path


def plot_attention(run: pathlib.Path) -> pathlib.Path:
    """``attention.png`` of a run folder."""
    cfg, figure = attention_figure(run)
    return draw_attention(figure, cfg.name, run / "attention.png")


def plot_run(run: str | pathlib.Path) -> list[pathlib.Path]:
    """Write ``loss.png`` and ``attention.png`` into a run folder; return their paths."""
    run = pathlib.Path(run)
    if not (run / "metrics.jsonl").exists():
        raise FileNotFoundError(f"{run} is not a run folder (no metrics.jsonl)")
    cfg = config_lib.load(run / "config.yaml")
    return [plot_losses(run, cfg), plot_attention(run)]


def main(argv: list[str] | None = None) -> list[pathlib.Path]:
    parser = argparse.ArgumentParser(prog="python -m experiments.plot", description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a run folder, e.g. runs/default")
    args = parser.parse_args(argv)
    paths = plot_run(args.run)
    for p in paths:
        print(p)
    return paths


if __name__ == "__main__":
    main()

