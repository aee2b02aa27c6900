"""Sorting (``data.task=sort``): ``x1 ... xL SEP sorted(x)``.

Example:
  >>> import jax
  >>> b = SortTask(length=3, num_symbols=5).train_batch(jax.random.key(0), 2)
  >>> b.inputs.shape, b.weights[0].tolist()   # x1 x2 x3 SEP s1 s2 -> s1 s2 s3 scored
  ((2, 6), [0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from experiments import data
from experiments.schema import PositiveInt, Section
from experiments.tasks.base import PromptAnswerTask, register


class SortConfig(Section):
    """Sorting (task ``sort``): ``x1 ... xL SEP -> sorted(x)``."""

    length: PositiveInt = 8
    num_symbols: PositiveInt = 16


@register
@struct.dataclass
class SortTask(PromptAnswerTask):
    """Sorting as a prompt and its answer: ``x1 ... xL SEP sorted(x1 ... xL)``.

    Symbols are drawn with replacement from ``[0, num_symbols)``; the ``L`` answer
    targets are scored, and an example counts as solved only if all of them are
    right (exact match).
    """

    length: int = struct.field(pytree_node=False)
    num_symbols: int = struct.field(pytree_node=False)
    name = "sort"
    Config = SortConfig
    caption = "prompt, '>' = SEP, then the sorted answer"

    @classmethod
    def from_config(cls, data_cfg) -> tuple[SortTask, dict]:
        return cls(length=data_cfg.sort.length, num_symbols=data_cfg.sort.num_symbols), {}

    @property
    def sep(self) -> int:
        return self.num_symbols

    @property
    def vocab_size(self) -> int:
        return self.num_symbols + 1

    @property
    def seq_len(self) -> int:
        return 2 * self.length

    @property
    def answer_length(self) -> int:
        return self.length

    def sequences(self, key: jax.Array, n: int) -> jax.Array:
        """``n`` whole examples, int32 ``[n, seq_len + 1]``."""
        x_NL = jax.random.randint(key, (n, self.length), 0, self.num_symbols)
        sep_N1 = jnp.full((n, 1), self.sep)
        return jnp.concatenate([x_NL, sep_N1, jnp.sort(x_NL, axis=1)], axis=1).astype(jnp.int32)

    def train_batch(self, key: jax.Array, batch_size: int) -> data.Batch:
        return data.shift(self.sequences(key, batch_size), self.length)

    def eval_set(self, key: jax.Array, n: int) -> data.Batch:
        return self.train_batch(key, n)

    def token_label(self, t: int) -> str:
        t = int(t)
        return ">" if t == self.sep else str(t)
