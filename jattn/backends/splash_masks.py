"""jattn masks as splash attention masks: compiled once per (mask, shape), never [T, S].

JAX's splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) takes a
static mask object of shape ``[T, S]`` that it reads one block at a time (through
``mask[q_slice, kv_slice]``) to find the blocks to skip, the blocks to compute without
a mask and the distinct partial blocks.  This module turns a jattn mask whose
structure is known at trace time into such an object, lazily:

==========================  ======================================================
jattn mask                  splash mask
==========================  ======================================================
``Causal(offset)``          ``CausalMask(shape, offset)`` (evaluated in the kernel)
``SlidingWindow(l, r, o)``  ``LocalMask(shape, (l, r), o)`` (idem)
``PrefixLM(p, offset)``     ``CausalMask(shape, offset) | IndexBox(kv_stop=p)``
``Lengths(q_len, kv_len)``  ``IndexBox(q_stop=q_len, kv_stop=kv_len)``
``Dense(array [T, S])``     ``NumpyMask`` (the one kind that is an array already)
``a & b``, ``a | b``, ``~a``  ``LogicalAnd``, ``LogicalOr``, `Complement`
==========================  ======================================================

Only ``Dense`` holds a ``[T, S]`` array; every other kind computes the block asked
for.  Offsets, windows and lengths must be Python / NumPy ints (an array offset, a
per-example length, segment ids or a mask function depend on data: `static_key`
says why such a mask cannot be compiled).

A mask is described by a hashable `static_key`, so the conversion (`to_splash`) and
what is derived from it (`first_allowed_keys`) are cached per (mask, shape).

Example:
  >>> import numpy as np
  >>> from jattn import masks
  >>> key = static_key(masks.Causal() & masks.SlidingWindow(left=1, right=0))
  >>> key
  ('and', ('causal', 0), ('window', 1, 0, 0))
  >>> m = to_splash(key, (4, 4))
  >>> m[0:4, 0:4].astype(int)
  array([[1, 0, 0, 0],
         [1, 1, 0, 0],
         [0, 1, 1, 0],
         [0, 0, 1, 1]])
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from jattn import masks as masks_lib

try:  # present in every jax this project supports; guarded so that jattn imports without it
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
except ImportError:  # pragma: no cover
    sm = None

Key = tuple


class NotStatic(ValueError):
    """A mask whose structure depends on data, so splash cannot compile it."""


def _static_int(what: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, np.ndarray) and value.ndim == 0 and np.issubdtype(value.dtype, np.integer):
        return int(value)
    shape = getattr(value, "shape", None)
    raise NotStatic(
        f"{what} is {type(value).__name__}{'' if shape is None else f' of shape {tuple(shape)}'}; "
        f"splash compiles its mask before the data exist, so it needs a Python int"
    )


def _static_bool_array(what: str, value) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as e:
        raise NotStatic(f"{what} is traced; splash needs a NumPy (or concrete) boolean array") from e
    if array.dtype != np.bool_ or array.ndim != 2:
        raise NotStatic(f"{what} has dtype {array.dtype} and shape {array.shape}; splash needs a boolean [T, S] "
                        f"array shared by the batch (a per-example [B, T, S] array varies with the data)")
    return array


def static_key(mask: masks_lib.Mask | None) -> Key:
    """A hashable description of ``mask`` (None: every key allowed), or `NotStatic`
    naming the part that depends on data.

    >>> from jattn import masks
    >>> static_key(masks.PrefixLM(3) | ~masks.Lengths(kv_length=2))
    ('or', ('prefix', 3, 0), ('not', ('box', None, 2)))
    >>> static_key(masks.SegmentIds(np.zeros(4, np.int32)))
    Traceback (most recent call last):
      ...
    jattn.backends.splash_masks.NotStatic: SegmentIds depend on per-example ids; ...
    """
    if mask is None:
        return ("full",)
    if isinstance(mask, masks_lib.Causal):
        return ("causal", _static_int("Causal.offset", mask.offset))
    if isinstance(mask, masks_lib.SlidingWindow):
        return ("window", mask.left, mask.right, _static_int("SlidingWindow.offset", mask.offset))
    if isinstance(mask, masks_lib.PrefixLM):
        return ("prefix", _static_int("PrefixLM.prefix_length", mask.prefix_length),
                _static_int("PrefixLM.offset", mask.offset))
    if isinstance(mask, masks_lib.Lengths):
        return ("box", _static_int("Lengths.q_length", mask.q_length),
                _static_int("Lengths.kv_length", mask.kv_length))
    if isinstance(mask, masks_lib.Dense):
        array = _static_bool_array("Dense.array", mask.array)
        return ("dense", array.shape, np.packbits(array).tobytes())
    if isinstance(mask, masks_lib.And):
        return ("and", static_key(mask.left), static_key(mask.right))
    if isinstance(mask, masks_lib.Or):
        return ("or", static_key(mask.left), static_key(mask.right))
    if isinstance(mask, masks_lib.Not):
        return ("not", static_key(mask.inner))
    if isinstance(mask, masks_lib.SegmentIds):
        raise NotStatic("SegmentIds depend on per-example ids; pass query_segment_ids= and "
                        "key_value_segment_ids= instead (splash serves those)")
    if isinstance(mask, masks_lib.FromFunction):
        raise NotStatic("a mask function has no block structure known before it runs")
    raise NotStatic(f"{type(mask).__name__} has no splash form (only Causal, SlidingWindow, PrefixLM, "
                    f"Lengths with int lengths, Dense and their &, |, ~ do)")


def why_not_static(mask: masks_lib.Mask | None) -> str | None:
    """None if `static_key` accepts ``mask``, else its reason."""
    try:
        static_key(mask)
    except NotStatic as e:
        return str(e)
    return None


def _window(size: int, piece: slice) -> tuple[int, int]:
    start, stop, step = piece.indices(size)
    if step != 1:
        raise NotImplementedError(f"splash masks are read with unit-step slices; got {piece}")
    return start, stop


if sm is not None:

    @dataclasses.dataclass(frozen=True)
    class IndexBox(sm.Mask):
        """Lazy ``q < q_stop and kv < kv_stop`` over ``size = (T, S)`` (None: no bound).

        >>> IndexBox((3, 4), q_stop=2, kv_stop=3)[0:3, 1:4].astype(int)
        array([[1, 1, 0],
               [1, 1, 0],
               [0, 0, 0]])
        """

        size: tuple[int, int]
        q_stop: int | None = None
        kv_stop: int | None = None

        @property
        def shape(self) -> tuple[int, int]:
            return self.size

        def __getitem__(self, idx) -> np.ndarray:
            q_start, q_end = _window(self.size[0], idx[0])
            kv_start, kv_end = _window(self.size[1], idx[1])
            rows = np.arange(q_start, q_end)[:, None]
            cols = np.arange(kv_start, kv_end)[None, :]
            ok = np.ones((q_end - q_start, kv_end - kv_start), np.bool_)
            if self.q_stop is not None:
                ok &= rows < self.q_stop
            if self.kv_stop is not None:
                ok &= cols < self.kv_stop
            return ok

    @dataclasses.dataclass(frozen=True)
    class Complement(sm.Mask):
        """Lazy ``~inner`` (splash has ``&`` and ``|`` but no complement)."""

        inner: sm.Mask

        @property
        def shape(self) -> tuple[int, ...]:
            return self.inner.shape

        def __getitem__(self, idx) -> np.ndarray:
            return ~self.inner[idx]


@functools.lru_cache(maxsize=256)
def to_splash(key: Key, shape: tuple[int, int]):
    """The splash mask of `static_key` ``key`` over ``shape = (T, S)``; T and S may be
    padded beyond the mask's own sizes (a Dense array is padded with False there).

    Cached: the same (key, shape) returns the same object, so splash's per-mask caches
    (and its deduplication of partial blocks) see one mask.
    """
    kind = key[0]
    if kind == "full":
        return sm.FullMask(shape)
    if kind == "causal":
        return sm.CausalMask(shape, offset=key[1])
    if kind == "window":
        _, left, right, offset = key
        return sm.LocalMask(shape, (left, right), offset=offset)
    if kind == "prefix":
        _, prefix, offset = key
        return sm.LogicalOr(sm.CausalMask(shape, offset=offset), IndexBox(shape, None, prefix))
    if kind == "box":
        return IndexBox(shape, key[1], key[2])
    if kind == "dense":
        (T, S), bits = key[1], key[2]
        array = np.unpackbits(np.frombuffer(bits, np.uint8), count=T * S).astype(np.bool_).reshape(T, S)
        if T > shape[0] or S > shape[1]:
            raise ValueError(f"mask: a Dense array of shape {(T, S)} does not fit the attention shape {shape}")
        return sm.NumpyMask(np.pad(array, ((0, shape[0] - T), (0, shape[1] - S))))
    if kind == "and":
        return sm.LogicalAnd(to_splash(key[1], shape), to_splash(key[2], shape))
    if kind == "or":
        return sm.LogicalOr(to_splash(key[1], shape), to_splash(key[2], shape))
    if kind == "not":
        return Complement(to_splash(key[1], shape))
    raise ValueError(f"key: unknown mask kind {kind!r}; expected a key made by static_key")


def sees_keys_beyond(mask, num_q: int, num_kv: int) -> bool:
    """Whether a row below ``num_q`` allows a column at or past ``num_kv`` (a padded key)."""
    S = mask.shape[1]
    return num_kv < S and bool(mask[0:num_q, num_kv:S].any())


@functools.lru_cache(maxsize=256)
def first_allowed_keys(key: Key, shape: tuple[int, int], num_kv: int, block: int = 512) -> np.ndarray:
    """int32 ``[shape[0]]``: for each row the first column below ``num_kv`` the mask
    allows, ``num_kv`` if none.  A row attends something iff its first key is below
    the example's key length.  Read in ``block x block`` tiles, stopping per row
    block at the first tile that settles every row.

    >>> first_allowed_keys(("window", 1, 0, -2), (4, 4), 4)
    array([4, 4, 0, 0], dtype=int32)
    """
    mask = to_splash(key, shape)
    num_q = shape[0]
    first = np.full(num_q, num_kv, np.int32)
    for q0 in range(0, num_q, block):
        q1 = min(q0 + block, num_q)
        pending = np.ones(q1 - q0, np.bool_)
        for k0 in range(0, num_kv, block):
            k1 = min(k0 + block, num_kv)
            tile = mask[q0:q1, k0:k1]
            found = pending & tile.any(axis=1)
            first[q0:q1][found] = k0 + tile[found].argmax(axis=1)
            pending &= ~found
            if not pending.any():
                break
    return first
