"""Encoder classification (``data.task=classify``): does any symbol occur twice?

A sequence of ``min_length`` to ``max_length`` symbols, padded to ``max_length``, is
labelled ``repeat`` when some symbol occurs twice and ``distinct`` otherwise (half of
the examples each).  A bidirectional encoder (`experiments.model.Transformer` with
``causal=False``) reads it with a padding mask (``lengths``: padded tokens are never
attended and their outputs are left out), and the label comes from its outputs
pooled over the real tokens.

Attention is what solves it: the label depends on whether two positions hold the same
symbol, a comparison between tokens.  Without attention each token's output would
depend on that token alone, so the pooled score would be a sum of per-symbol terms,
and replacing a distinct symbol by a copy of another changes such a sum by the same
amount as replacing it by any unused symbol -- it cannot tell the two apart.

Example:
  >>> import jax
  >>> task = ClassifyTask(min_length=3, max_length=6, num_symbols=8)
  >>> b = task.train_batch(jax.random.key(0), 4)
  >>> b.tokens.shape, b.lengths.shape, b.labels.shape, task.vocab_size
  ((4, 6), (4,), (4,), 9)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from pydantic import model_validator

from experiments.model import Transformer
from experiments.schema import PositiveInt, Section
from experiments.tasks.base import AttentionFigure, AttentionRow, LossPlot, SampleOptions, register

PAD = 0
LABELS = ("distinct", "repeat")


class ClassifyConfig(Section):
    """Encoder classification (task ``classify``): is there a repeated symbol among
    ``min_length`` to ``max_length`` symbols of ``num_symbols``?"""

    min_length: PositiveInt = 4
    max_length: PositiveInt = 16
    num_symbols: PositiveInt = 32

    @model_validator(mode="after")
    def _consistent(self) -> ClassifyConfig:
        if not 2 <= self.min_length <= self.max_length:
            raise ValueError(f"data.classify.min_length ({self.min_length}) must be at least 2 and at most "
                             f"data.classify.max_length ({self.max_length})")
        if self.max_length > self.num_symbols:
            raise ValueError(f"data.classify.max_length ({self.max_length}) must be at most "
                             f"data.classify.num_symbols ({self.num_symbols}): negatives are distinct symbols")
        return self


class ClassifyBatch(NamedTuple):
    """``tokens int32[B, L]`` (padded with 0), ``lengths int32[B]``, ``labels int32[B]``."""

    tokens: jax.Array
    lengths: jax.Array
    labels: jax.Array


def pooled_logits(logits_BLC: jax.Array, lengths_B: jax.Array) -> jax.Array:
    """The mean of per-token class logits over each sequence's real tokens ``[B, C]``:
    the same as the head applied to the mean of the encoder's outputs (the head is
    linear without bias), so it is mean pooling, then a linear classifier.

    >>> pooled_logits(jnp.array([[[1.0], [3.0], [100.0]]]), jnp.array([2])).tolist()
    [[2.0]]
    """
    valid_BL = jnp.arange(logits_BLC.shape[1])[None, :] < lengths_B[:, None]
    total_BC = jnp.sum(jnp.where(valid_BL[..., None], logits_BLC.astype(jnp.float32), 0.0), axis=1)
    return total_BC / lengths_B[:, None].astype(jnp.float32)


@register
@struct.dataclass
class ClassifyTask:
    """Does any symbol occur twice?  A bidirectional encoder over padded,
    variable-length sequences, pooled to one of two labels (see the module)."""

    min_length: int = struct.field(pytree_node=False)
    max_length: int = struct.field(pytree_node=False)
    num_symbols: int = struct.field(pytree_node=False)
    name = "classify"
    Config = ClassifyConfig
    metrics = ("loss", "accuracy")
    loss_plot = LossPlot(panel=(("accuracy", "accuracy"),))

    @classmethod
    def from_config(cls, data_cfg) -> tuple[ClassifyTask, dict]:
        c = data_cfg.classify
        return cls(min_length=c.min_length, max_length=c.max_length, num_symbols=c.num_symbols), {}

    @property
    def vocab_size(self) -> int:
        return self.num_symbols + 1  # symbols 1..num_symbols, 0 is padding

    @property
    def tokens_per_example(self) -> int:
        return self.max_length

    def describe(self, info: dict) -> str:
        return f"{self.num_symbols} symbols, lengths {self.min_length}-{self.max_length}"

    def examples(self, key: jax.Array, n: int) -> ClassifyBatch:
        """``n`` examples, half of each label: distinct symbols, or distinct symbols
        with one position overwritten by a copy of another."""

        def one(k):
            k_len, k_sym, k_label, k_pos = jax.random.split(k, 4)
            length = jax.random.randint(k_len, (), self.min_length, self.max_length + 1)
            symbols_L = jax.random.permutation(k_sym, self.num_symbols)[: self.max_length] + 1
            label = jax.random.bernoulli(k_label).astype(jnp.int32)
            # a repeat: position j takes the symbol of position i (i != j, both real)
            i, j = _two_positions(k_pos, length)
            symbols_L = jnp.where((jnp.arange(self.max_length) == j) & (label == 1), symbols_L[i], symbols_L)
            tokens_L = jnp.where(jnp.arange(self.max_length) < length, symbols_L, PAD)
            return tokens_L.astype(jnp.int32), length.astype(jnp.int32), label

        tokens, lengths, labels = jax.vmap(one)(jax.random.split(key, n))
        return ClassifyBatch(tokens, lengths, labels)

    def train_batch(self, key: jax.Array, batch_size: int) -> ClassifyBatch:
        return self.examples(key, batch_size)

    def eval_set(self, key: jax.Array, n: int) -> ClassifyBatch:
        return self.examples(key, n)

    def build_model(self, cfg, *, dtype, rngs) -> Transformer:
        return Transformer(cfg, vocab_size=self.vocab_size, max_len=self.max_length, num_outputs=len(LABELS),
                           causal=False, dtype=dtype, rngs=rngs)

    def logits(self, model, batch: ClassifyBatch, **kw) -> jax.Array:
        """Class logits ``[B, 2]``."""
        return pooled_logits(model(batch.tokens, lengths_B=batch.lengths, **kw), batch.lengths)

    def loss(self, model, batch: ClassifyBatch, *, deterministic: bool, rngs) -> jax.Array:
        logp_BC = jax.nn.log_softmax(self.logits(model, batch, deterministic=deterministic, rngs=rngs))
        return -jnp.mean(jnp.take_along_axis(logp_BC, batch.labels[:, None], axis=1))

    def eval_sums(self, model, batch: ClassifyBatch) -> dict[str, jax.Array]:
        logits_BC = self.logits(model, batch)
        logp_BC = jax.nn.log_softmax(logits_BC)
        return dict(
            nll=-jnp.sum(jnp.take_along_axis(logp_BC, batch.labels[:, None], axis=1)),
            correct=jnp.sum(jnp.argmax(logits_BC, axis=-1) == batch.labels),
            examples=jnp.asarray(batch.labels.shape[0], jnp.float32),
        )

    def summarize(self, sums: dict, reference: dict) -> dict[str, float]:
        n = float(sums["examples"])
        return dict(loss=float(sums["nll"]) / n, accuracy=float(sums["correct"]) / n)

    def reference_metrics(self, eval_set) -> dict[str, float]:
        return {}

    def token_label(self, t: int) -> str:
        return "·" if int(t) == PAD else str(int(t))

    def attention_figure(self, model, example: ClassifyBatch) -> AttentionFigure:
        """Each layer's heads on one padded example; when it holds a repeat, each
        title gives the weight between the two copies (both directions, summed)."""
        _, weights = nnx.jit(lambda m, x, n: m(x, lengths_B=n, return_weights=True))(
            model, example.tokens[:1], example.lengths[:1])
        tokens_L = np.asarray(example.tokens[0])
        labels = [self.token_label(t) for t in tokens_L]
        pair = _repeat(tokens_L, int(example.lengths[0]))
        rows = []
        for i, w in enumerate(weights):
            w_NLL = np.asarray(w[0], np.float32)
            notes = None if pair is None else [f"copy <-> copy: {w_NLL[h, pair[0], pair[1]] + w_NLL[h, pair[1], pair[0]]:.2f}"
                                               for h in range(w_NLL.shape[0])]
            rows.append(AttentionRow(f"layer {i + 1}", w_NLL, labels, labels, notes,
                                     None if pair is None else (pair[1], pair[0])))
        return AttentionFigure(rows, f"label {LABELS[int(example.labels[0])]}; '·' = padding (never attended)")

    def samples(self, model, options: SampleOptions, key: jax.Array) -> list[str]:
        """Held-out sequences with the predicted and the true label."""
        batch = jax.jit(self.examples, static_argnums=1)(jax.random.fold_in(key, 1), options.num)
        predicted = np.asarray(nnx.jit(lambda m, b: jnp.argmax(self.logits(m, b), axis=-1))(model, batch))
        lines = []
        for tokens, length, label, guess in zip(*(np.asarray(x) for x in batch), predicted):
            ok = guess == label
            lines.append(f"{' '.join(map(str, tokens[:length]))}  ->  {LABELS[guess]}   "
                         f"(true: {LABELS[label]}: {'right' if ok else 'WRONG'})")
        right = sum(line.endswith("right)") for line in lines)
        return lines + [f"{right}/{len(lines)} right"]


def _two_positions(key: jax.Array, length: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two different positions below ``length`` (a traced int), uniformly."""
    k_i, k_j = jax.random.split(key)
    i = jax.random.randint(k_i, (), 0, length)
    j = (i + jax.random.randint(k_j, (), 1, length)) % length
    return i, j


def _repeat(tokens_L: np.ndarray, length: int) -> tuple[int, int] | None:
    """The positions of the repeated symbol of an example, or None."""
    seen: dict[int, int] = {}
    for pos, t in enumerate(tokens_L[:length].tolist()):
        if t in seen:
            return seen[t], pos
        seen[t] = pos
    return None
