"""Passkey retrieval (``data.task=passkey``): one value hidden thousands of tokens back.

``f f f ... v ... f f f ?  -> v``: ``seq_len`` input tokens of random filler with one
value token ``v`` at least ``min_distance`` positions before the last input, the
query ``?``; the model must answer ``v`` there.  Only that answer is scored.

Example:
  >>> import jax
  >>> task = PasskeyTask(seq_len=12, num_filler=4, num_values=3, min_distance=6)
  >>> b = task.train_batch(jax.random.key(0), 2)
  >>> b.inputs.shape, task.vocab_size   # f .. v .. f ?  ->  v
  ((2, 12), 8)
  >>> b.weights[0].tolist()             # only the answer is scored
  [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
  >>> x = b.inputs[0]
  >>> p = int(needle_position(x, task.num_filler, task.num_values))
  >>> 11 - p >= 6, int(x[p]) == int(b.targets[0, -1]), task.token_label(x[-1])
  (True, True, '?')
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import struct
from pydantic import model_validator

from experiments import data
from experiments.schema import PositiveInt, Section
from experiments.tasks.base import AttentionFigure, AttentionRow, PromptAnswerTask, register


class PasskeyConfig(Section):
    """Passkey retrieval (task ``passkey``): ``seq_len`` input tokens of filler (``num_filler``
    symbols) holding one value token (``num_values`` symbols) at least ``min_distance``
    positions before the final query token, whose target is that value."""

    seq_len: PositiveInt = 4096
    num_filler: PositiveInt = 1  # 1: one repeated filler token (see PasskeyTask)
    num_values: PositiveInt = 8
    min_distance: PositiveInt = 2048

    @model_validator(mode="after")
    def _consistent(self) -> PasskeyConfig:
        if self.seq_len < 2:
            raise ValueError(f"data.passkey.seq_len ({self.seq_len}) must be at least 2: "
                             "the value and the query")
        if self.min_distance > self.seq_len - 1:
            raise ValueError(f"data.passkey.min_distance ({self.min_distance}) must be at most "
                             f"data.passkey.seq_len - 1 ({self.seq_len - 1}): the value lies at least "
                             "that far before the query, inside the sequence")
        if self.num_values < 2:
            raise ValueError(f"data.passkey.num_values ({self.num_values}) must be at least 2: "
                             "with one value the answer needs no retrieval")
        return self


@register
@struct.dataclass
class PasskeyTask(PromptAnswerTask):
    """Passkey retrieval: ``seq_len`` input tokens, the last the query ``?`` and the one
    at a random position ``p <= seq_len - 1 - min_distance`` a value ``v``; every other
    token is filler.  The target after ``?`` is ``v``, the only scored one.

    Filler tokens are ``[0, num_filler)``, drawn uniformly and independently of ``v``;
    values ``[num_filler, num_filler + num_values)``, drawn uniformly; ``?`` is the last
    id.  Nothing within ``min_distance`` positions of the query says anything about
    ``v``, and no fixed weights do better than chance (``1 / num_values``): the query
    must attend to the one value token, at least ``min_distance`` back.  With
    ``min_distance >= seq_len / 2`` the value lies in the first half of the sequence,
    so when the sequence is split over a mesh axis (context parallelism, 2 or more
    blocks) it is always on another device than the query.  Held-out examples are
    drawn from a different key than training examples.

    The haystack: with ``num_filler=1`` (the default) the filler is one repeated
    token, as the passkey test's filler is a repeated sentence.  Random filler
    (``num_filler > 1``) is harder to learn at long range: the query's attention starts
    uniform, so the value makes ``1/seq_len`` of what it reads while the filler's
    random counts add noise of order ``1/sqrt(seq_len)``; at T=4096 a one-layer model
    with 16 filler symbols stayed at chance for 300 steps (batch 8, learning rate
    1e-2), where one filler token trains in about 100 (configs/passkey.yaml).
    """

    seq_len: int = struct.field(pytree_node=False)
    num_filler: int = struct.field(pytree_node=False)
    num_values: int = struct.field(pytree_node=False)
    min_distance: int = struct.field(pytree_node=False)
    name = "passkey"
    Config = PasskeyConfig
    caption = "vI: the value, ?: the query; keys near the value, then the last 8"

    @classmethod
    def from_config(cls, data_cfg) -> tuple[PasskeyTask, dict]:
        p = data_cfg.passkey
        return cls(seq_len=p.seq_len, num_filler=p.num_filler, num_values=p.num_values,
                   min_distance=p.min_distance), {}

    @property
    def query(self) -> int:
        return self.num_filler + self.num_values

    @property
    def vocab_size(self) -> int:
        return self.num_filler + self.num_values + 1

    @property
    def answer_length(self) -> int:
        return 1

    def describe(self, info: dict) -> str:
        return f"vocab {self.vocab_size}, T={self.seq_len}, the value >= {self.min_distance} tokens back"

    def sequences(self, key: jax.Array, n: int) -> jax.Array:
        """``n`` whole examples, int32 ``[n, seq_len + 1]``: filler, the value, filler, ``?``, the value."""
        T = self.seq_len

        def one(k):
            k_fill, k_pos, k_value = jax.random.split(k, 3)
            tokens = jax.random.randint(k_fill, (T + 1,), 0, self.num_filler)
            p = jax.random.randint(k_pos, (), 0, T - self.min_distance)  # T - 1 - p >= min_distance
            v = jax.random.randint(k_value, (), self.num_filler, self.query)
            tokens = tokens.at[p].set(v).at[T - 1].set(self.query).at[T].set(v)
            return tokens.astype(jnp.int32)

        return jax.vmap(one)(jax.random.split(key, n))

    def train_batch(self, key: jax.Array, batch_size: int) -> data.Batch:
        return data.shift(self.sequences(key, batch_size), self.seq_len - 1)

    def eval_set(self, key: jax.Array, n: int) -> data.Batch:
        return self.train_batch(key, n)

    def token_label(self, t: int) -> str:
        t = int(t)
        if t < self.num_filler:
            return f"f{t}"
        return f"v{t - self.num_filler}" if t < self.query else "?"

    def attention_figure(self, model, example: data.Batch) -> AttentionFigure:
        """The last 4 queries' weights on 8 keys around the value and on the last 8
        keys (the whole sequence is run, its T x T weights cut down); each title gives
        the weight the query ``?`` puts on the value, framed."""
        inputs_1T = example.inputs[:1]
        _, weights = nnx.jit(lambda m, x: m(x, return_weights=True))(model, inputs_1T)
        inputs_T = np.asarray(inputs_1T[0])
        T = inputs_T.shape[0]
        p = needle_position(inputs_T, self.num_filler, self.num_values)
        keys = [s for s in range(p - 3, p + 5) if 0 <= s < T - 8] + list(range(T - 8, T))
        rows_ = list(range(T - 4, T))
        q_labels = [f"{self.token_label(inputs_T[t])}@{t}" for t in rows_]
        k_labels = [f"{self.token_label(inputs_T[s])}@{s}" for s in keys]
        rows = []
        for i, w in enumerate(weights):
            w_NTS = np.asarray(w[0], np.float32)[:, rows_][:, :, keys]
            notes = [f"? -> value ({T - 1 - p} back): {x:.2f}" for x in np.asarray(w[0], np.float32)[:, -1, p]]
            rows.append(AttentionRow(f"layer {i + 1}", w_NTS, q_labels, k_labels, notes,
                                     (len(rows_) - 1, keys.index(p))))
        return AttentionFigure(rows, self.caption)

    def samples(self, model, options, key: jax.Array) -> list[str]:
        """Per held-out example: where the value is, and what the model answers at ``?``."""
        batch = jax.jit(self.train_batch, static_argnums=1)(jax.random.fold_in(key, 1), options.num)
        got = np.asarray(jnp.argmax(nnx.jit(lambda m, x: m(x))(model, batch.inputs)[:, -1], axis=-1))
        lines = []
        for x, want, g in zip(np.asarray(batch.inputs), np.asarray(batch.targets[:, -1]), got):
            p = needle_position(x, self.num_filler, self.num_values)
            ok = int(g) == int(want)
            lines.append(f"{self.token_label(want)} at position {p} of {self.seq_len} ({self.seq_len - 1 - p} back)"
                         f"  ->  {self.token_label(g)}   ({'right' if ok else 'WRONG'})")
        right = sum(line.endswith("right)") for line in lines)
        return lines + [f"{right}/{len(lines)} right (argmax at the query)"]


def needle_position(inputs_T, num_filler: int, num_values: int) -> int:
    """The position of the value token in a passkey example's inputs.

    >>> needle_position(np.array([0, 1, 5, 2, 7]), num_filler=4, num_values=3)
    2
    """
    inputs_T = np.asarray(inputs_T)
    (p,) = np.flatnonzero((inputs_T >= num_filler) & (inputs_T < num_filler + num_values))
    return int(p)
