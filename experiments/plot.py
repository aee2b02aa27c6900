"""Plots of a run folder: loss curves and attention heatmaps.

    python -m experiments.plot runs/<name>

writes into the run folder

- ``loss.png``: training loss (mean of each logging window) and held-out loss against
  the step; for ``lm`` in bits per byte with the bigram reference as a dashed line;
  for ``recall`` / ``sort`` a second panel with held-out accuracy and exact match and
  the config's target;
- ``attention.png``: the attention weights of every layer and head of the trained
  model (latest checkpoint) on one held-out example; for ``recall`` each panel's
  title gives the weight the query puts on the value it must retrieve, and that cell
  is framed: the retrieving head stands out.

`experiments.train` calls `plot_run` at the end of training.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib

import jax
import numpy as np
from flax import nnx
from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
from matplotlib.patches import Rectangle

from experiments import config as config_lib
from experiments import train as train_lib


def read_metrics(run: pathlib.Path) -> tuple[list[dict], list[dict]]:
    """``(train rows, eval rows)`` of ``metrics.jsonl``."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "eval"]


def plot_losses(run: pathlib.Path, cfg) -> pathlib.Path:
    """``loss.png`` of a run folder."""
    train, evals = read_metrics(run)
    lm = cfg.data.task == "lm"
    ncols = 1 if lm else 2
    fig = Figure(figsize=(5.2 * ncols, 3.6), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)
    ax = axes[0, 0]
    scale = 1 / math.log(2) if lm else 1.0
    ax.plot([r["step"] for r in train], [r["loss"] * scale for r in train], label="train", lw=1.2)
    ax.plot([r["step"] for r in evals], [r["loss"] * scale for r in evals], "o-", label="held-out", lw=1.2, ms=3)
    if lm and evals and "bigram_bpb" in evals[-1]:
        ax.axhline(evals[-1]["bigram_bpb"], ls="--", c="gray", label="bigram (held-out)")
        if cfg.target.metric == "bpb_ratio":
            ax.axhline(evals[-1]["bigram_bpb"] * cfg.target.value, ls=":", c="green",
                       label=f"target ({cfg.target.value:g} x bigram)")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte" if lm else "cross-entropy (nats)")
    ax.set_title(f"{cfg.name} (task {cfg.data.task})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if not lm:
        ax = axes[0, 1]
        ax.plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "o-", label="token accuracy", ms=3)
        ax.plot([r["step"] for r in evals], [r["exact_match"] for r in evals], "s-", label="exact match", ms=3)
        if cfg.target.metric in ("accuracy", "exact_match"):
            ax.axhline(cfg.target.value, ls=":", c="green", label=f"target {cfg.target.value:g}")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("step")
        ax.set_title("held-out accuracy")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    path = run / "loss.png"
    fig.savefig(path, dpi=90)
    return path


def recall_value_position(inputs_T: np.ndarray, num_pairs: int) -> int:
    """In a recall example ``k1 v1 ... kn vn SEP ... q``, the position of the value
    paired with the last query ``q``.

    >>> recall_value_position(np.array([4, 10, 7, 11, 99, 7]), num_pairs=2)
    3
    """
    (i,) = np.flatnonzero(inputs_T[: 2 * num_pairs : 2] == inputs_T[-1])
    return 2 * int(i) + 1


def recall_retrieval(weights: list[np.ndarray], inputs_T: np.ndarray, num_pairs: int) -> np.ndarray:
    """The weight each (layer, head) puts, from the last query's row, on the value it
    must retrieve -> ``[L, N]`` (weights: per layer ``[1, N, T, T]``).

    >>> w = np.zeros((1, 2, 6, 6)); w[0, 1, 5, 3] = 0.9
    >>> recall_retrieval([w], np.array([4, 10, 7, 11, 99, 7]), num_pairs=2)
    array([[0. , 0.9]])
    """
    j = recall_value_position(inputs_T, num_pairs)
    return np.stack([w[0, :, -1, j] for w in weights])


def attention_example(run: pathlib.Path, max_tokens: int = 32):
    """``(cfg, task, inputs [T], weights: list over layers of [1, N, T, T])`` of the
    run's latest checkpoint on its first held-out example (an LM window is cut to
    ``max_tokens`` bytes so the labels stay legible)."""
    cfg, s, params, _ = train_lib.restore_params(run)
    eval_set = jax.jit(lambda t: t.eval_set(train_lib.keys(cfg)["eval_data"], 1))(s.task)
    inputs_1T = eval_set.inputs[:, :max_tokens] if cfg.data.task == "lm" else eval_set.inputs
    model = nnx.merge(s.graphdef, params)
    _, weights = model(inputs_1T, return_weights=True)
    return cfg, s.task, np.asarray(inputs_1T[0]), [np.asarray(w, np.float32) for w in weights]


def plot_attention(run: pathlib.Path) -> pathlib.Path:
    """``attention.png`` of a run folder."""
    cfg, task, inputs_T, weights = attention_example(run)
    L, N, T = len(weights), weights[0].shape[1], inputs_T.shape[0]
    labels = [task.token_label(t) for t in inputs_T]
    recall = task.name == "recall"
    retrieval = recall_retrieval(weights, inputs_T, task.num_pairs) if recall else None
    size = 2.2 if T <= 24 else 3.0
    fig = Figure(figsize=(size * N + 0.6, (size + 0.5) * L + 0.6), layout="constrained")
    axes = fig.subplots(L, N, squeeze=False)
    for layer in range(L):
        for head in range(N):
            ax = axes[layer, head]
            ax.imshow(weights[layer][0, head], cmap="viridis", vmin=0.0, vmax=1.0)
            title = f"layer {layer + 1} head {head + 1}"
            if retrieval is not None:
                title += f"\nquery -> value: {retrieval[layer, head]:.2f}"
                j = recall_value_position(inputs_T, task.num_pairs)
                ax.add_patch(Rectangle((j - 0.5, T - 1.5), 1, 1, fill=False, ec="red", lw=1.5))
            ax.set_title(title, fontsize=8)
            ax.set_xticks(range(T), labels, fontsize=6, rotation=90)
            ax.set_yticks(range(T), labels, fontsize=6)
    what = {"recall": "keys kI, values vI, '?' = SEP, then queries and answers; red: the last query's value",
            "sort": "prompt, '>' = SEP, then the sorted answer",
            "lm": "a held-out window of bytes"}[task.name]
    fig.suptitle(f"{cfg.name}: attention weights (rows: queries, columns: keys); {what}", fontsize=9)
    path = run / "attention.png"
    fig.savefig(path, dpi=90)
    return path


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
