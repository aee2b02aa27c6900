"""Mask algebra: which keys each query may attend to.

A mask is a pure function of indices for one example and one head,
``mask(q_idx, kv_idx) -> bool`` (True = attend), evaluated elementwise with
broadcasting.  Built-ins:

================  =======================================================  ==========
mask              query row i (at position p = i + offset) attends key j   data
================  =======================================================  ==========
`Causal`          j <= p                                                    offset
`SlidingWindow`   p - left <= j <= p + right                                offset
`SegmentIds`      q_segment_ids[i] == kv_segment_ids[j]  (packing)          ids
`Lengths`         i < q_length and j < kv_length  (padding)                 lengths
`PrefixLM`        j <= p or j < prefix_length                               lengths
`Dense`           array[i, j]                                               array
`FromFunction`    fn(i, j)                                                  --
================  =======================================================  ==========

Masks combine with ``&`` and ``|`` (and ``~``).  They are pytrees: the data they hold
(offsets, ids, lengths) may carry a leading batch axis, which ``jax.vmap`` over the
batch slices (see `jattn.index_fn`).

For blockwise backends each mask reports, for a block size, which (q-block,
kv-block) tiles are EMPTY (skip), FULL (no mask needed) or PARTIAL (evaluate the
mask): `Mask.block_kinds`.  It is a NumPy array when everything the mask depends on
is known at trace time (``Causal()``, windows with int offsets) and a jnp array
otherwise; the classification is always conservative (a tile reported EMPTY or FULL
truly is; PARTIAL may be either).

Example:
  >>> import numpy as np
  >>> from jattn import masks
  >>> m = masks.Causal() & masks.SlidingWindow(left=1, right=0)
  >>> np.asarray(m.materialize(4, 4)).astype(int)
  array([[1, 0, 0, 0],
         [1, 1, 0, 0],
         [0, 1, 1, 0],
         [0, 0, 1, 1]])
  >>> m.block_kinds(4, 4, 2, 2)   # 0 EMPTY, 1 PARTIAL, 2 FULL
  array([[1, 0],
         [1, 1]], dtype=int8)
"""

from __future__ import annotations

import dataclasses

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jattn.index_fn import IndexFunction, child, index_function, leaf

Array = jax.Array

EMPTY, PARTIAL, FULL = 0, 1, 2


def _xp(*values):
    """NumPy when every value is concrete (trace-time constant), else jax.numpy."""
    return jnp if any(isinstance(v, jax.Array) for v in values) else np


def _block_ranges(length: int, block: int, xp):
    """First and last (inclusive) valid index of each block along one axis."""
    starts = np.arange(0, length, block)
    ends = np.minimum(starts + block, length) - 1
    return xp.asarray(starts), xp.asarray(ends)


def tile_kinds(empty, full):
    """Combine boolean 'tile empty' / 'tile full' grids into EMPTY/PARTIAL/FULL int8
    codes (NumPy for NumPy inputs, jnp otherwise).

    >>> import numpy as np
    >>> tile_kinds(np.array([True, False, False]), np.array([False, True, False]))
    array([0, 2, 1], dtype=int8)
    """
    xp = _xp(empty, full)
    return xp.where(empty, EMPTY, xp.where(full, FULL, PARTIAL)).astype(xp.int8)


class Mask(IndexFunction):
    """Base class of masks.  Subclasses implement ``__call__`` and, where they can,
    ``block_kinds``."""

    def __call__(self, q_idx: Array, kv_idx: Array) -> Array:
        raise NotImplementedError

    def block_kinds(self, num_q: int, num_kv: int, block_q: int, block_kv: int):
        """``[ceil(num_q / block_q), ceil(num_kv / block_kv)]`` int8 codes: EMPTY (0),
        PARTIAL (1) or FULL (2) for each tile.  The default knows nothing: PARTIAL."""
        shape = (-(-num_q // block_q), -(-num_kv // block_kv))
        return np.full(shape, PARTIAL, np.int8)

    def materialize(self, num_q: int, num_kv: int) -> Array:
        """The mask on the full ``[num_q, num_kv]`` grid (for inspection and tests)."""
        q_idx = jnp.arange(num_q, dtype=jnp.int32)[:, None]
        kv_idx = jnp.arange(num_kv, dtype=jnp.int32)[None, :]
        return jnp.broadcast_to(self(q_idx, kv_idx), (num_q, num_kv))

    def __and__(self, other: "Mask") -> "Mask":
        return And(self, as_mask(other))

    def __or__(self, other: "Mask") -> "Mask":
        return Or(self, as_mask(other))

    def __invert__(self) -> "Mask":
        return Not(self)


def per_example_block_kinds(mask: Mask, mask_axes, num_q: int, num_kv: int, block_q: int, block_kv: int):
    """``[B or 1, n_q blocks, n_kv blocks]`` kinds of each example of a mask sliced by
    `batch_in_axes` (``mask_axes``: 0 on leaves with a batch axis).  A mask no leaf of
    which varies per example is classified once (leading axis 1; NumPy when its
    structure is static), else `jax.vmap` over the examples."""
    if not any(axis == 0 for axis in jax.tree_util.tree_leaves(mask_axes)):
        return mask.block_kinds(num_q, num_kv, block_q, block_kv)[None]
    return jax.vmap(lambda m: m.block_kinds(num_q, num_kv, block_q, block_kv), in_axes=(mask_axes,))(mask)


def as_mask(value: Any) -> Mask:
    """A Mask from a Mask, a ``mask_mod(q_idx, kv_idx)`` callable or a bool array."""
    if isinstance(value, Mask):
        return value
    if callable(value):
        return FromFunction(value)
    return Dense(value)


@index_function
class Causal(Mask):
    """Query row i at position ``i + offset`` attends keys ``j <= i + offset``.

    ``offset=0`` is `jax.nn.dot_product_attention`'s ``is_causal`` (top-left aligned,
    also when T != S); decoding after a cache of length L uses ``offset=L``.  The
    offset may be an int or a per-example int array.

    Example:
      >>> import numpy as np
      >>> np.asarray(Causal(offset=1).materialize(2, 4)).astype(int)
      array([[1, 1, 0, 0],
             [1, 1, 1, 0]])
    """

    offset: Any = leaf((), default=0)

    def __call__(self, q_idx, kv_idx):
        return kv_idx <= q_idx + self.offset

    def block_kinds(self, num_q, num_kv, block_q, block_kv):
        xp = _xp(self.offset)
        q_first, q_last = _block_ranges(num_q, block_q, xp)
        kv_first, kv_last = _block_ranges(num_kv, block_kv, xp)
        empty = kv_first[None, :] > q_last[:, None] + self.offset
        full = kv_last[None, :] <= q_first[:, None] + self.offset
        return tile_kinds(empty, full)


@index_function
class SlidingWindow(Mask):
    """Query at position ``p = i + offset`` attends keys ``p - left <= j <= p + right``.

    ``left`` / ``right`` are static ints (None = unbounded on that side).  This is
    `jax.nn.dot_product_attention`'s ``local_window_size=(left, right)``.

    Example:
      >>> import numpy as np
      >>> np.asarray(SlidingWindow(1, 1).materialize(3, 4)).astype(int)
      array([[1, 1, 0, 0],
             [1, 1, 1, 0],
             [0, 1, 1, 1]])
    """

    left: int | None = None
    right: int | None = None
    offset: Any = leaf((), default=0)

    def __post_init__(self):
        for name in ("left", "right"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 0):
                raise ValueError(
                    f"SlidingWindow.{name}: expected a non-negative int or None; got {value!r}"
                )

    def __call__(self, q_idx, kv_idx):
        pos = q_idx + self.offset
        ok = True
        if self.left is not None:
            ok = kv_idx >= pos - self.left
        if self.right is not None:
            ok = ok & (kv_idx <= pos + self.right)
        return jnp.broadcast_to(jnp.asarray(ok), jnp.broadcast_shapes(q_idx.shape, kv_idx.shape))

    def block_kinds(self, num_q, num_kv, block_q, block_kv):
        xp = _xp(self.offset)
        q_first, q_last = _block_ranges(num_q, block_q, xp)
        kv_first, kv_last = _block_ranges(num_kv, block_kv, xp)
        p_first = q_first[:, None] + self.offset
        p_last = q_last[:, None] + self.offset
        empty = xp.zeros((len(q_first), len(kv_first)), bool)
        full = xp.ones((len(q_first), len(kv_first)), bool)
        if self.left is not None:
            empty = empty | (kv_last[None, :] < p_first - self.left)
            full = full & (kv_first[None, :] >= p_last - self.left)
        if self.right is not None:
            empty = empty | (kv_first[None, :] > p_last + self.right)
            full = full & (kv_last[None, :] <= p_first + self.right)
        return tile_kinds(empty, full)


@index_function
class SegmentIds(Mask):
    """Packing: row i attends key j only within the same segment,
    ``q_segment_ids[i] == kv_segment_ids[j]``.

    Args:
      q_segment_ids: int ``[T]`` (or ``[B, T]``).
      kv_segment_ids: int ``[S]`` (or ``[B, S]``); defaults to ``q_segment_ids``.

    Example:
      >>> import numpy as np
      >>> ids = np.array([0, 0, 1])
      >>> np.asarray(SegmentIds(ids).materialize(3, 3)).astype(int)
      array([[1, 1, 0],
             [1, 1, 0],
             [0, 0, 1]])
    """

    q_segment_ids: Any = leaf(("T",))
    kv_segment_ids: Any = leaf(("S",), default=None)

    def __post_init__(self):
        if self.kv_segment_ids is None:
            object.__setattr__(self, "kv_segment_ids", self.q_segment_ids)

    def __call__(self, q_idx, kv_idx):
        q_ids = jnp.asarray(self.q_segment_ids)
        kv_ids = jnp.asarray(self.kv_segment_ids)
        return q_ids[q_idx] == kv_ids[kv_idx]

    def block_kinds(self, num_q, num_kv, block_q, block_kv):
        xp = _xp(self.q_segment_ids, self.kv_segment_ids)

        def block_min_max(ids, length, block):
            ids = xp.asarray(ids)
            pad = -length % block
            # Padding repeats the last id so it never widens a block's range.
            ids = xp.concatenate([ids, xp.broadcast_to(ids[-1:], (pad,))])
            tiles = ids.reshape(-1, block)
            return tiles.min(axis=1), tiles.max(axis=1)

        q_lo, q_hi = block_min_max(self.q_segment_ids, num_q, block_q)
        kv_lo, kv_hi = block_min_max(self.kv_segment_ids, num_kv, block_kv)
        empty = (q_hi[:, None] < kv_lo[None, :]) | (kv_hi[None, :] < q_lo[:, None])
        full = (q_lo == q_hi)[:, None] & (kv_lo == kv_hi)[None, :] & (q_lo[:, None] == kv_lo[None, :])
        return tile_kinds(empty, full)


@index_function
class Lengths(Mask):
    """Padding: row i is a real query if ``i < q_length``; key j is real if
    ``j < kv_length``.  A padded query row is fully masked, so its output is zeros
    (as `jax.nn.dot_product_attention` returns for ``query_seq_lengths``).

    Either length may be None (no padding on that side), an int, or an int array
    ``[B]``.

    Example:
      >>> import numpy as np
      >>> np.asarray(Lengths(q_length=2, kv_length=3).materialize(3, 4)).astype(int)
      array([[1, 1, 1, 0],
             [1, 1, 1, 0],
             [0, 0, 0, 0]])
    """

    q_length: Any = leaf((), default=None)
    kv_length: Any = leaf((), default=None)

    def __call__(self, q_idx, kv_idx):
        ok = jnp.ones(jnp.broadcast_shapes(q_idx.shape, kv_idx.shape), bool)
        if self.q_length is not None:
            ok = ok & (q_idx < self.q_length)
        if self.kv_length is not None:
            ok = ok & (kv_idx < self.kv_length)
        return ok

    def block_kinds(self, num_q, num_kv, block_q, block_kv):
        xp = _xp(self.q_length, self.kv_length)
        q_first, q_last = _block_ranges(num_q, block_q, xp)
        kv_first, kv_last = _block_ranges(num_kv, block_kv, xp)
        q_len = num_q if self.q_length is None else self.q_length
        kv_len = num_kv if self.kv_length is None else self.kv_length
        empty = (q_first[:, None] >= q_len) | (kv_first[None, :] >= kv_len)
        full = (q_last[:, None] < q_len) & (kv_last[None, :] < kv_len)
        return tile_kinds(empty, full)


@index_function
class PrefixLM(Mask):
    """Prefix language model: the first ``prefix_length`` keys are visible to every
    query (a bidirectional prefix); after it, attention is causal.  Equivalent to
    ``Causal(offset) | (key index < prefix_length)``.

    Example:
      >>> import numpy as np
      >>> np.asarray(PrefixLM(prefix_length=2).materialize(4, 4)).astype(int)
      array([[1, 1, 0, 0],
             [1, 1, 0, 0],
             [1, 1, 1, 0],
             [1, 1, 1, 1]])
    """

    prefix_length: Any = leaf(())
    offset: Any = leaf((), default=0)

    def _as_composition(self) -> Mask:
        return Causal(self.offset) | Lengths(kv_length=self.prefix_length)

    def __call__(self, q_idx, kv_idx):
        return self._as_composition()(q_idx, kv_idx)

    def block_kinds(self, num_q, num_kv, block_q, block_kv):
        return self._as_composition().block_kinds(num_q, num_kv, block_q, block_kv)


@index_function
class Dense(Mask):
    """An explicit boolean array ``[T, S]`` (or ``[B, T, S]``).  For a broadcast or
    per-head array, pass it as ``mask=`` to `jattn.dot_product_attention` instead.

    Example:
      >>> import numpy as np
      >>> m = Dense(np.array([[True, False], [True, True]]))
      >>> np.asarray(m.materialize(2, 2)).astype(int)
      array([[1, 0],
             [1, 1]])
    """

    array: Any = leaf(("T", "S"))

    def __call__(self, q_idx, kv_idx):
        array = jnp.asarray(self.array)
        if array.dtype != jnp.bool_:
            raise TypeError(f"Dense.array must be boolean; got dtype {array.dtype}")
        return array[q_idx, kv_idx]

    def block_kinds(self, num_q, num_kv, block_q, block_kv):
        xp = _xp(self.array)
        array = xp.asarray(self.array)
        pad_q, pad_kv = -num_q % block_q, -num_kv % block_kv
        # Padded entries must not make a tile look non-empty or non-full: pad with
        # False for 'any' and True for 'all'.
        any_ = xp.pad(array, ((0, pad_q), (0, pad_kv)), constant_values=False)
        all_ = xp.pad(array, ((0, pad_q), (0, pad_kv)), constant_values=True)
        tiles = (num_q + pad_q) // block_q, block_q, (num_kv + pad_kv) // block_kv, block_kv
        empty = ~any_.reshape(tiles).any(axis=(1, 3))
        full = all_.reshape(tiles).all(axis=(1, 3))
        return tile_kinds(empty, full)


@index_function
class FromFunction(Mask):
    """A user ``mask_mod(q_idx, kv_idx) -> bool``.  Nothing is known about its
    structure, so every tile is PARTIAL (blockwise backends evaluate it everywhere).

    Example:
      >>> import numpy as np
      >>> even = FromFunction(lambda i, j: (i + j) % 2 == 0)
      >>> np.asarray(even.materialize(2, 3)).astype(int)
      array([[1, 0, 1],
             [0, 1, 0]])
    """

    fn: Callable[[Array, Array], Array]

    def __call__(self, q_idx, kv_idx):
        return jnp.asarray(self.fn(q_idx, kv_idx))


@index_function
class Shifted(Mask):
    """``mask`` seen from a block of a larger grid: local ``(i, j)`` is the inner
    mask's ``(i + q_origin, j + kv_origin)``.  `jattn.parallel` gives each device's
    block of a split sequence the user's mask this way, so a mask's indices are
    always global positions.  ``num_q`` / ``num_kv`` are the full grid's lengths (the
    inner mask's data leaves are checked against them); the origins may be traced.

    Example:
      >>> import numpy as np
      >>> np.asarray(Shifted(Causal(), q_origin=2, kv_origin=1, num_q=4, num_kv=4).materialize(2, 3)).astype(int)
      array([[1, 1, 0],
             [1, 1, 1]])
    """

    mask: Mask = child()
    q_origin: Any = leaf((), default=0)
    kv_origin: Any = leaf((), default=0)
    num_q: int = 0
    num_kv: int = 0

    def __call__(self, q_idx, kv_idx):
        return self.mask(q_idx + self.q_origin, kv_idx + self.kv_origin)

    def batch_in_axes(self, batch_size, num_q, num_kv):
        # The inner mask's leaves are shaped for the full grid; the origins are
        # scalars shared by the batch.
        inner, inner_axes = self.mask.batch_in_axes(batch_size, self.num_q, self.num_kv)
        axes = dataclasses.replace(self, mask=inner_axes, q_origin=None, kv_origin=None)
        return dataclasses.replace(self, mask=inner), axes


@index_function
class And(Mask):
    """Both masks allow the pair (``a & b``)."""

    left: Mask = child()
    right: Mask = child()

    def __call__(self, q_idx, kv_idx):
        return self.left(q_idx, kv_idx) & self.right(q_idx, kv_idx)

    def block_kinds(self, num_q, num_kv, block_q, block_kv):
        a = self.left.block_kinds(num_q, num_kv, block_q, block_kv)
        b = self.right.block_kinds(num_q, num_kv, block_q, block_kv)
        xp = _xp(a, b)
        # EMPTY if either is empty, FULL if both are full: the minimum of the codes.
        return xp.minimum(a, b)


@index_function
class Or(Mask):
    """Either mask allows the pair (``a | b``)."""

    left: Mask = child()
    right: Mask = child()

    def __call__(self, q_idx, kv_idx):
        return self.left(q_idx, kv_idx) | self.right(q_idx, kv_idx)

    def block_kinds(self, num_q, num_kv, block_q, block_kv):
        a = self.left.block_kinds(num_q, num_kv, block_q, block_kv)
        b = self.right.block_kinds(num_q, num_kv, block_q, block_kv)
        xp = _xp(a, b)
        # FULL if either is full, EMPTY if both are empty: the maximum of the codes.
        return xp.maximum(a, b)


@index_function
class Not(Mask):
    """The complement (``~a``): EMPTY and FULL tiles swap."""

    inner: Mask = child()

    def __call__(self, q_idx, kv_idx):
        return ~self.inner(q_idx, kv_idx)

    def block_kinds(self, num_q, num_kv, block_q, block_kv):
        return (FULL - self.inner.block_kinds(num_q, num_kv, block_q, block_kv)).astype(np.int8)


def combine(*masks: Mask | None) -> Mask | None:
    """The intersection (``&``) of the given masks, skipping None; None if none left."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    result = present[0]
    for m in present[1:]:
        result = result & m
    return result
