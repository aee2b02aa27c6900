"""Associative recall (``data.task=recall``): ``k1 v1 ... kn vn SEP q1 v(q1) ... qm v(qm)``.

Example:
  >>> import jax
  >>> task = RecallTask(num_pairs=2, num_keys=4, num_values=4)
  >>> b = task.train_batch(jax.random.key(0), 3)
  >>> b.inputs.shape, task.vocab_size   # k v k v SEP q -> v(q)
  ((3, 6), 9)
  >>> b.weights[0].tolist()             # only the answer is scored
  [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from pydantic import model_validator

from experiments import data
from experiments.schema import PositiveInt, Section
from experiments.tasks.base import AttentionFigure, PromptAnswerTask, register


class RecallConfig(Section):
    """Associative recall (task ``recall``): ``k1 v1 ... kn vn SEP q1 v(q1) ... qm v(qm)``
    with ``m = num_queries`` distinct query keys, every ``v(q)`` scored."""

    num_pairs: PositiveInt = 8
    num_keys: PositiveInt = 32
    num_values: PositiveInt = 32
    num_queries: PositiveInt = 1

    @model_validator(mode="after")
    def _consistent(self) -> RecallConfig:
        if self.num_pairs > self.num_keys:
            raise ValueError(f"data.recall.num_pairs ({self.num_pairs}) must be at most "
                             f"data.recall.num_keys ({self.num_keys}): keys are distinct")
        if self.num_queries > self.num_pairs:
            raise ValueError(f"data.recall.num_queries ({self.num_queries}) must be at most "
                             f"data.recall.num_pairs ({self.num_pairs}): queries are distinct keys")
        return self


@register
@struct.dataclass
class RecallTask(PromptAnswerTask):
    """Associative recall: ``k1 v1 k2 v2 ... kn vn SEP q1 v(q1) ... qm v(qm)``.

    Keys are ``n`` distinct tokens of ``[0, num_keys)``, values tokens of
    ``[num_keys, num_keys + num_values)`` drawn with replacement, the ``m`` queries
    distinct keys; only the answers ``v(q)`` are scored, and an example counts as
    solved (exact match) when all its answers are right.  No fixed weights can solve
    it: the model must find each query among the keys and copy the token after it,
    which is what attention does.  Held-out examples are drawn from a different key
    than training examples.
    """

    num_pairs: int = struct.field(pytree_node=False)
    num_keys: int = struct.field(pytree_node=False)
    num_values: int = struct.field(pytree_node=False)
    num_queries: int = struct.field(pytree_node=False, default=1)
    name = "recall"
    Config = RecallConfig
    caption = "keys kI, values vI, '?' = SEP, then queries and answers; red: the last query's value"

    @classmethod
    def from_config(cls, data_cfg) -> tuple[RecallTask, dict]:
        r = data_cfg.recall
        return cls(num_pairs=r.num_pairs, num_keys=r.num_keys, num_values=r.num_values,
                   num_queries=r.num_queries), {}

    @property
    def sep(self) -> int:
        return self.num_keys + self.num_values

    @property
    def vocab_size(self) -> int:
        return self.num_keys + self.num_values + 1

    @property
    def seq_len(self) -> int:
        return 2 * self.num_pairs + 2 * self.num_queries

    @property
    def answer_length(self) -> int:
        return 1

    def sequences(self, key: jax.Array, n: int) -> jax.Array:
        """``n`` whole examples, int32 ``[n, seq_len + 1]``."""

        def one(k):
            k_keys, k_values, k_query = jax.random.split(k, 3)
            keys_P = jax.random.permutation(k_keys, self.num_keys)[: self.num_pairs]
            values_P = jax.random.randint(
                k_values, (self.num_pairs,), self.num_keys, self.num_keys + self.num_values
            )
            q_Q = jax.random.permutation(k_query, self.num_pairs)[: self.num_queries]
            pairs = jnp.stack([keys_P, values_P], axis=1).reshape(-1)
            queries = jnp.stack([keys_P[q_Q], values_P[q_Q]], axis=1).reshape(-1)
            return jnp.concatenate([pairs, jnp.array([self.sep]), queries]).astype(jnp.int32)

        return jax.vmap(one)(jax.random.split(key, n))

    def train_batch(self, key: jax.Array, batch_size: int) -> data.Batch:
        batch = data.shift(self.sequences(key, batch_size), 0)
        # scored: the targets after each query, at input positions 2n + 1 + 2j
        t = jnp.arange(self.seq_len)
        answer_T = (t > 2 * self.num_pairs) & ((t - 2 * self.num_pairs) % 2 == 1)
        return batch._replace(weights=jnp.broadcast_to(answer_T.astype(jnp.float32), batch.weights.shape))

    def eval_set(self, key: jax.Array, n: int) -> data.Batch:
        return self.train_batch(key, n)

    def token_label(self, t: int) -> str:
        t = int(t)
        if t < self.num_keys:
            return f"k{t}"
        return f"v{t - self.num_keys}" if t < self.sep else "?"

    def attention_figure(self, model, example: data.Batch) -> AttentionFigure:
        """Each layer's heads; each title gives the weight the last query puts on the
        value it must retrieve, and that cell is framed: the retrieving head stands out."""
        fig = super().attention_figure(model, example)
        inputs_T = np.asarray(example.inputs[0])
        j = value_position(inputs_T, self.num_pairs)
        for row in fig.rows:
            row.head_notes = [f"query -> value: {w:.2f}" for w in row.weights_NTS[:, -1, j]]
            row.mark = (inputs_T.shape[0] - 1, j)
        return fig


def value_position(inputs_T: np.ndarray, num_pairs: int) -> int:
    """In a recall example ``k1 v1 ... kn vn SEP ... q``, the position of the value
    paired with the last query ``q``.

    >>> value_position(np.array([4, 10, 7, 11, 99, 7]), num_pairs=2)
    3
    """
    (i,) = np.flatnonzero(inputs_T[: 2 * num_pairs : 2] == inputs_T[-1])
    return 2 * int(i) + 1
