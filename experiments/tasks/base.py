"""What a task is (`Task`), the registry of tasks, and the parts tasks share.

A task owns everything that depends on what is learnt: its config section
(``data.<name>``), its batches, its model, its loss and held-out metrics, reference
metrics, how its tokens print, what its plots show and how its samples read.  The
training loop (`experiments.train`), the plots (`experiments.plot`), the samples
(`experiments.sample`) and the config schema (`experiments.config`) go through this
protocol only; none of them names a task.

To add a task: write ``experiments/tasks/<name>.py`` with a class decorated by
`register`, import it in ``experiments/tasks/__init__.py``, add ``configs/<name>.yaml``
and a test.  `NextTokenTask` and `PromptAnswerTask` give the decoder-only tasks
(a prompt, then tokens to predict) most of the protocol.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import data
from experiments.model import Transformer, generate
from experiments.schema import Section, invalid_choice


@dataclasses.dataclass(frozen=True)
class LossPlot:
    """What ``loss.png`` shows for a task.

    The first panel: training and held-out loss times ``scale`` under ``ylabel``, with
    the held-out metric ``reference`` (if any) as a dashed line and, when the config's
    target is ``ratio_target``, the target drawn at ``reference x target``.  The second
    panel (if ``panel`` names metrics): those held-out metrics in [0, 1] with the
    target when it is one of them.
    """

    ylabel: str = "cross-entropy (nats)"
    scale: float = 1.0
    reference: str | None = None
    reference_label: str = ""
    ratio_target: str | None = None
    panel: tuple[tuple[str, str], ...] = (("accuracy", "token accuracy"), ("exact_match", "exact match"))


@dataclasses.dataclass
class AttentionRow:
    """One row of ``attention.png``: the heads of one attention layer on one example.

    ``weights_NTS`` float ``[N, T, S]`` (rows: queries, columns: keys), labels for the
    T queries and S keys, a note per head added to its title (optional), and a cell
    ``(t, s)`` to frame (optional).
    """

    name: str
    weights_NTS: np.ndarray
    query_labels: list[str]
    key_labels: list[str]
    head_notes: list[str] | None = None
    mark: tuple[int, int] | None = None


@dataclasses.dataclass
class AttentionFigure:
    """``attention.png``: rows of heatmaps and a caption saying what they show."""

    rows: list[AttentionRow]
    caption: str


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """`experiments.sample`'s command-line options; a task uses those that apply."""

    num: int = 4
    prompt: str = "def "
    length: int | None = None
    temperature: float = 0.8
    seed: int = 0


class Task(Protocol):
    """The protocol every task follows (classes registered with `register`).

    Tasks are pytrees (`flax.struct.dataclass`) whose arrays (e.g. a corpus) are
    leaves, so ``jax.jit(lambda task, key: task.train_batch(key, B))`` passes them as
    arguments; a batch is a pure function of its key, which makes runs reproducible
    and resumable: step ``s`` trains on ``train_batch(fold_in(key, s), B)``.
    """

    name: ClassVar[str]  # the registry key: data.task=<name>, section data.<name>
    Config: ClassVar[type[Section]]  # its config section
    metrics: ClassVar[tuple[str, ...]]  # what `summarize` reports (target.metric is one)
    loss_plot: ClassVar[LossPlot]  # what loss.png shows

    @classmethod
    def from_config(cls, data_cfg: Any) -> tuple[Task, dict]:
        """The task of a data config (its own section ``data_cfg.<name>``, and
        ``data_cfg.path`` if it reads files), and a description of its data."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def tokens_per_example(self) -> int:
        """Tokens one example feeds the model (for tokens/s)."""

    def describe(self, info: dict) -> str:
        """A few words on the data for the run's first line."""

    def train_batch(self, key: jax.Array, batch_size: int) -> Any:
        """A batch (a pytree of ``[batch_size, ...]`` arrays) drawn from ``key``."""

    def eval_set(self, key: jax.Array, n: int) -> Any:
        """``n`` held-out examples, a batch like `train_batch`'s."""

    def build_model(self, cfg: Any, *, dtype: Any, rngs: nnx.Rngs) -> nnx.Module:
        """The model for this task from ``cfg`` (`experiments.model.ModelConfig`)."""

    def loss(self, model: nnx.Module, batch: Any, *, deterministic: bool, rngs: Any) -> jax.Array:
        """The training loss on a batch (a float32 scalar)."""

    def eval_sums(self, model: nnx.Module, batch: Any) -> dict[str, jax.Array]:
        """Sums over a held-out batch, added up over batches and given to `summarize`."""

    def summarize(self, sums: dict, reference: dict) -> dict[str, float]:
        """The metrics (`metrics`) from the summed `eval_sums`."""

    def reference_metrics(self, eval_set: Any) -> dict[str, float]:
        """Fixed references on the held-out set (e.g. a bigram model's score)."""

    def token_label(self, token: int) -> str:
        """How a token id prints (plots and samples)."""

    def attention_figure(self, model: nnx.Module, example: Any) -> AttentionFigure:
        """The attention maps of ``model`` on a one-example batch, for attention.png."""

    def samples(self, model: nnx.Module, options: SampleOptions, key: jax.Array) -> list[str]:
        """Lines showing what the model does (generation, answers, predictions)."""


REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a `Task` available as ``data.task=<cls.name>``."""
    if cls.name in REGISTRY:
        raise ValueError(f"task {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> type:
    """The task class registered as ``name``."""
    if name not in REGISTRY:
        raise invalid_choice("data.task", name, sorted(REGISTRY))
    return REGISTRY[name]


def build(data_cfg: Any) -> tuple[Task, dict]:
    """The task a data config names, and a description of its data."""
    return get(data_cfg.task).from_config(data_cfg)


# ------------------------------------------------------------------ decoder-only tasks


def words(task: Task, tokens) -> str:
    """Tokens as the task prints them, space-separated."""
    return " ".join(task.token_label(t) for t in np.asarray(tokens).tolist())


class NextTokenTask:
    """Most of `Task` for next-token tasks on a causal `Transformer`: batches are
    `experiments.data.Batch`, the loss is cross-entropy over the scored targets, the
    metrics are token accuracy and exact match, the attention maps are each layer's
    self-attention.  A subclass gives ``name``, ``Config``, ``from_config``,
    ``vocab_size``, ``seq_len``, ``train_batch``, ``eval_set``, ``token_label`` and
    ``samples``."""

    metrics: ClassVar[tuple[str, ...]] = ("loss", "accuracy", "exact_match")
    loss_plot: ClassVar[LossPlot] = LossPlot()
    caption: ClassVar[str] = "a held-out example"
    max_plot_tokens: ClassVar[int] = 32

    @property
    def tokens_per_example(self) -> int:
        return self.seq_len

    def describe(self, info: dict) -> str:
        return f"vocab {self.vocab_size}, T={self.seq_len}"

    def build_model(self, cfg, *, dtype, rngs: nnx.Rngs) -> Transformer:
        return Transformer(cfg, vocab_size=self.vocab_size, max_len=self.seq_len, dtype=dtype, rngs=rngs)

    def loss(self, model, batch: data.Batch, *, deterministic: bool, rngs) -> jax.Array:
        return data.weighted_loss(model(batch.inputs, deterministic=deterministic, rngs=rngs), batch)

    def eval_sums(self, model, batch: data.Batch) -> dict[str, jax.Array]:
        return data.score(model(batch.inputs), batch)

    def summarize(self, sums: dict, reference: dict) -> dict[str, float]:
        return data.token_metrics(sums)

    def reference_metrics(self, eval_set) -> dict[str, float]:
        return {}

    def attention_figure(self, model, example: data.Batch) -> AttentionFigure:
        inputs_1T = example.inputs[:1, : self.max_plot_tokens]
        _, weights = nnx.jit(lambda m, x: m(x, return_weights=True))(model, inputs_1T)
        labels = [self.token_label(t) for t in np.asarray(inputs_1T[0]).tolist()]
        rows = [AttentionRow(f"layer {i + 1}", np.asarray(w[0], np.float32), labels, labels)
                for i, w in enumerate(weights)]
        return AttentionFigure(rows, self.caption)


class PromptAnswerTask(NextTokenTask):
    """A `NextTokenTask` whose examples are a prompt and an answer of
    ``answer_length`` tokens (``sequences(key, n)`` gives them whole): samples are
    held-out prompts completed greedily with the KV cache."""

    def samples(self, model, options: SampleOptions, key: jax.Array) -> list[str]:
        examples = np.asarray(jax.jit(self.sequences, static_argnums=1)(jax.random.fold_in(key, 1), options.num))
        P = examples.shape[1] - self.answer_length
        graphdef, params = nnx.split(model, nnx.Param)
        out = np.asarray(generate(graphdef, params, jnp.asarray(examples[:, :P]), self.answer_length, key))
        lines = []
        for ex, got in zip(examples, out):
            ok = bool(np.all(got == ex[P:]))
            lines.append(f"{words(self, ex[:P])}  ->  {words(self, got)}   "
                         f"(answer {words(self, ex[P:])}: {'right' if ok else 'WRONG'})")
        right = sum(line.endswith("right)") for line in lines)
        return lines + [f"{right}/{len(lines)} right (greedy decoding with the KV cache)"]

