"""Score modifiers: change the scores before the softmax.

A score modifier is ``score_mod(score, head, q_idx, kv_idx) -> score`` for one example,
applied elementwise (with broadcasting) to the ``[T, S]`` scores of head ``head``
(the query-head index, 0..N-1).  Built-ins:

=============  ========================================================
`SoftCap`      ``cap · tanh(score / cap)`` (logit soft-capping, Gemma 2)
`ALiBi`        ``score - slope[head] · |i + offset - j|`` (Press et al., 2022)
`Bias`         ``score + bias[i, j]`` (an explicit additive bias)
`FromFunction` any user function with the signature above
=============  ========================================================

Chain them with ``a.then(b)`` (apply ``a`` first).  Like masks they are pytrees whose
data may carry a leading batch axis (see `jattn.index_fn`).

Example:
  >>> import jax.numpy as jnp
  >>> cap = SoftCap(2.0)
  >>> cap(jnp.array([0.0, 100.0]), 0, 0, 0)
  Array([0., 2.], dtype=float32)
"""

from __future__ import annotations

import dataclasses

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jattn.index_fn import IndexFunction, child, index_function, leaf
from jattn.positional import alibi_slopes

Array = jax.Array


class ScoreMod(IndexFunction):
    """Base class of score modifiers."""

    def __call__(self, score: Array, head: Any, q_idx: Array, kv_idx: Array) -> Array:
        raise NotImplementedError

    def then(self, other) -> "ScoreMod":
        """``other`` applied after ``self``."""
        return Chain(self, as_score_mod(other))


def as_score_mod(value) -> ScoreMod:
    """A ScoreMod from a ScoreMod or a ``score_mod(score, head, q_idx, kv_idx)``."""
    if isinstance(value, ScoreMod):
        return value
    if callable(value):
        return FromFunction(value)
    raise TypeError(
        f"score_mod: expected a callable score_mod(score, head, q_idx, kv_idx) or a "
        f"jattn.score_mods.ScoreMod; got {type(value).__name__}"
    )


@index_function
class SoftCap(ScoreMod):
    """Logit soft-capping: ``cap · tanh(score / cap)`` keeps scores in (-cap, cap).

    Example:
      >>> import jax.numpy as jnp
      >>> SoftCap(50.0)(jnp.array(1e4), 0, 0, 0)
      Array(50., dtype=float32, weak_type=True)
    """

    cap: float

    def __post_init__(self):
        if not (isinstance(self.cap, (int, float)) and self.cap > 0):
            raise ValueError(f"SoftCap.cap: expected a positive number; got {self.cap!r}")

    def __call__(self, score, head, q_idx, kv_idx):
        return self.cap * jnp.tanh(score / self.cap)


@index_function
class ALiBi(ScoreMod):
    """Attention with linear biases: ``score - slope[head] · |p - j|`` where
    ``p = i + offset`` is the query position.

    Slopes default to the paper's geometric sequence for ``num_heads`` heads
    (`jattn.positional.alibi_slopes`); pass ``slopes`` to choose your own.  For causal
    attention (``j <= p``) this is the paper's ``slope · (j - p)``.

    Example:
      >>> import jax.numpy as jnp
      >>> alibi = ALiBi(num_heads=2)
      >>> alibi.slopes
      (0.0625, 0.00390625)
      >>> alibi(jnp.zeros((1, 3)), 0, jnp.array([[2]]), jnp.arange(3)[None, :])
      Array([[-0.125 , -0.0625,  0.    ]], dtype=float32)
    """

    num_heads: int | None = None
    slopes: tuple[float, ...] | None = None
    offset: Any = leaf((), default=0)

    def __post_init__(self):
        if self.slopes is None:
            if self.num_heads is None:
                raise ValueError("ALiBi: give num_heads (standard slopes) or slopes")
            object.__setattr__(self, "slopes", tuple(float(s) for s in alibi_slopes(self.num_heads)))
        elif self.num_heads is not None and len(self.slopes) != self.num_heads:
            raise ValueError(
                f"ALiBi.slopes: got {len(self.slopes)} slopes; expected num_heads={self.num_heads}"
            )

    def __call__(self, score, head, q_idx, kv_idx):
        slope = jnp.asarray(self.slopes, jnp.float32)[head]
        distance = jnp.abs(q_idx + self.offset - kv_idx).astype(jnp.float32)
        return score - slope * distance


@index_function
class Bias(ScoreMod):
    """An explicit additive bias ``[T, S]`` (or ``[B, T, S]``).  The
    `jattn.dot_product_attention` argument ``bias=`` (jax.nn layout, broadcastable
    to ``[B, N, T, S]``) is usually what you want; this form composes with others.

    Example:
      >>> import jax.numpy as jnp
      >>> Bias(jnp.eye(2))(jnp.zeros((2, 2)), 0, jnp.arange(2)[:, None], jnp.arange(2)[None])
      Array([[1., 0.],
             [0., 1.]], dtype=float32)
    """

    bias: Any = leaf(("T", "S"))

    def __call__(self, score, head, q_idx, kv_idx):
        return score + jnp.asarray(self.bias)[q_idx, kv_idx].astype(score.dtype)


@index_function
class Shifted(ScoreMod):
    """``score_mod`` seen from a block of a larger grid: local ``(head, i, j)`` is the
    inner modifier's ``(head + head_origin, i + q_origin, j + kv_origin)`` (see
    `jattn.masks.Shifted`; `jattn.parallel` uses it so score modifiers see global
    positions and heads).

    Example:
      >>> import jax.numpy as jnp
      >>> inner = FromFunction(lambda s, h, i, j: s + (i - j))
      >>> Shifted(inner, q_origin=4, kv_origin=1, num_q=8, num_kv=8)(jnp.zeros(()), 0, 0, 0)
      Array(3., dtype=float32)
    """

    score_mod: ScoreMod = child()
    q_origin: Any = leaf((), default=0)
    kv_origin: Any = leaf((), default=0)
    num_q: int = 0
    num_kv: int = 0
    head_origin: Any = leaf((), default=0)  # the global index of the block's first head

    def __call__(self, score, head, q_idx, kv_idx):
        return self.score_mod(score, head + self.head_origin, q_idx + self.q_origin, kv_idx + self.kv_origin)

    def batch_in_axes(self, batch_size, num_q, num_kv):
        # The inner modifier's leaves are shaped for the full grid; the origins are
        # scalars shared by the batch.
        inner, inner_axes = self.score_mod.batch_in_axes(batch_size, self.num_q, self.num_kv)
        axes = dataclasses.replace(self, score_mod=inner_axes, q_origin=None, kv_origin=None, head_origin=None)
        return dataclasses.replace(self, score_mod=inner), axes


@index_function
class FromFunction(ScoreMod):
    """A user ``score_mod(score, head, q_idx, kv_idx) -> score``."""

    fn: Callable[..., Array]

    def __call__(self, score, head, q_idx, kv_idx):
        return self.fn(score, head, q_idx, kv_idx)


@index_function
class Chain(ScoreMod):
    """``second(first(score))``."""

    first: ScoreMod = child()
    second: ScoreMod = child()

    def __call__(self, score, head, q_idx, kv_idx):
        score = self.first(score, head, q_idx, kv_idx)
        return self.second(score, head, q_idx, kv_idx)


def chain(*mods: ScoreMod | None) -> ScoreMod | None:
    """Apply the given modifiers in order, skipping None; None if none left."""
    present = [as_score_mod(m) for m in mods if m is not None]
    if not present:
        return None
    result = present[0]
    for m in present[1:]:
        result = result.then(m)
    return result
