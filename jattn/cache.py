"""A functional key/value cache for autoregressive decoding.

`KVCache` is a pytree holding, for a batch of B sequences, the keys ``[B, M, K, H]``
and values ``[B, M, K, Hv]`` computed so far and how many of the M slots each sequence
uses (``lengths``, int32 ``[B]``).  Nothing is mutated: `KVCache.update` and
`decode_attention` return a new cache, so a cache passes through `jax.jit`,
`jax.lax.scan` and `nnx.jit` like any other array argument.

Decoding is one function, `decode_attention`: write the new keys and values after
each sequence's current length, then attend with the causal mask aligned per
sequence, so that the new token at position ``p = lengths[b] + t`` sees keys
``0 .. p`` and nothing past the new length:

    jattn.dot_product_attention(q, cache.keys, cache.values, is_causal=True,
                                query_offset=lengths_before,
                                key_value_seq_lengths=lengths_after)

A multi-token prefill is the same call with T > 1.  Prompts of different lengths are
passed padded to a common T with ``num_new`` (int ``[B]``) saying how many of the T
tokens of each sequence are real; padding is not written, and the next step writes
right after the real tokens.

Capacity: a sequence may hold at most ``capacity`` (M) tokens.  Writing past it

* raises a ValueError when the lengths are concrete (eager calls), naming the
  sequences, their lengths and the capacity;
* under `jax.jit` (where it cannot raise) stores nothing past the capacity (earlier
  entries are never overwritten), lets ``lengths`` count on past M so that
  `KVCache.overflowed` reports it, and makes the outputs of the tokens that did not
  fit NaN in `decode_attention` (and so in the modules), so the failure cannot pass
  silently.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jattn.cache import KVCache, decode_attention
  >>> B, M, N, K, H = 2, 8, 4, 2, 3
  >>> cache = KVCache.create(B, M, K, H)
  >>> q = jnp.ones((B, 5, N, H))                          # a padded prompt, T=5
  >>> k = v = jnp.ones((B, 5, K, H))
  >>> out, cache = decode_attention(q, k, v, cache, num_new=jnp.array([5, 3]))
  >>> out.shape, cache.lengths.tolist(), cache.capacity
  ((2, 5, 4, 3), [5, 3], 8)
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jattn import options as options_lib
from jattn.attention import dot_product_attention

Array = jax.Array


def _concrete(x) -> np.ndarray | None:
    """``x`` as a NumPy array when its value is known now, else None (a tracer)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of B sequences for decoding, and how much of each is filled.

    Attributes:
      keys: ``[B, M, K, H]``; slots ``>= lengths[b]`` hold nothing meaningful.
      values: ``[B, M, K, Hv]``.
      lengths: int32 ``[B]``: tokens written so far per sequence (may exceed M only
        after an overflow under jit; see the module docstring).

    M is the `capacity`.  Keys are stored as given, i.e. after RoPE when the modules
    use it.  Create one with `KVCache.create`; shard it with `logical_axes` (the
    same logical names as the modules' parameters).

    Example:
      >>> import jax.numpy as jnp
      >>> cache = KVCache.create(batch_size=2, max_length=6, num_kv_heads=1, head_dim=4)
      >>> cache.keys.shape, cache.capacity, cache.lengths.tolist()
      ((2, 6, 1, 4), 6, [0, 0])
      >>> cache = cache.update(jnp.ones((2, 3, 1, 4)), jnp.ones((2, 3, 1, 4)),
      ...                      num_new=jnp.array([3, 1]))
      >>> cache.lengths.tolist()
      [3, 1]
    """

    keys: Array
    values: Array
    lengths: Array

    # Logical axis names of the fields, for sharding a cache like the parameters
    # (batch over "data", kv heads over "model" with `jattn.nnx.LOGICAL_AXIS_RULES`).
    logical_axes: ClassVar[dict[str, tuple[str, ...]]] = {
        "keys": ("batch", "length", "kv_heads", "head_dim"),
        "values": ("batch", "length", "kv_heads", "head_dim"),
        "lengths": ("batch",),
    }

    @classmethod
    def create(
        cls,
        batch_size: int,
        max_length: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: Any = jnp.float32,
        value_head_dim: int | None = None,
    ) -> "KVCache":
        """An empty cache: zeros ``[B, M, K, H]`` / ``[B, M, K, Hv]`` and lengths 0.

        Args:
          batch_size: B.
          max_length: M, the capacity (prompt plus generated tokens).
          num_kv_heads: K.
          head_dim: H.
          dtype: the dtype keys and values are stored in.
          value_head_dim: Hv (default H).
        """
        for name, value in (
            ("batch_size", batch_size), ("max_length", max_length),
            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
            ("value_head_dim", head_dim if value_head_dim is None else value_head_dim),
        ):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"KVCache.create: {name} must be a positive int; got {value!r}")
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"KVCache.create: dtype must be floating; got {dtype!r}")
        hv = head_dim if value_head_dim is None else value_head_dim
        return cls(
            keys=jnp.zeros((batch_size, max_length, num_kv_heads, head_dim), dtype),
            values=jnp.zeros((batch_size, max_length, num_kv_heads, hv), dtype),
            lengths=jnp.zeros((batch_size,), jnp.int32),
        )

    @property
    def capacity(self) -> int:
        """M: the most tokens a sequence can hold."""
        return self.keys.shape[1]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[2]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[3]

    @property
    def value_head_dim(self) -> int:
        return self.values.shape[3]

    @property
    def dtype(self):
        return self.keys.dtype

    @property
    def overflowed(self) -> Array:
        """bool ``[B]``: sequences that were given more tokens than `capacity` (only
        possible under jit; eager writes raise instead)."""
        return self.lengths > self.capacity

    def reset(self) -> "KVCache":
        """The same buffers with every length set to 0 (reuse without reallocating)."""
        return dataclasses.replace(self, lengths=jnp.zeros_like(self.lengths))

    def _num_new(self, num_new, T: int) -> Array:
        B = self.batch_size
        if num_new is None:
            return jnp.full((B,), T, jnp.int32)
        num_new = jnp.asarray(num_new)
        if not jnp.issubdtype(num_new.dtype, jnp.integer):
            raise TypeError(f"num_new: expected integers; got dtype {num_new.dtype}")
        if num_new.ndim == 0:
            num_new = jnp.broadcast_to(num_new, (B,))
        if num_new.shape != (B,):
            raise ValueError(f"num_new: got shape {num_new.shape}; expected ({B},) (one count per sequence) or a scalar")
        concrete = _concrete(num_new)
        if concrete is not None and (concrete.min() < 0 or concrete.max() > T):
            raise ValueError(
                f"num_new: got {concrete.tolist()}; expected counts in [0, {T}] (T={T} new tokens were given)"
            )
        return jnp.clip(num_new, 0, T).astype(jnp.int32)   # traced counts: clipped

    def check_capacity(self, num_new: Array) -> None:
        """Raise a ValueError if writing ``num_new`` (int ``[B]``) more tokens would
        exceed the capacity; a no-op when the lengths are traced (under jit)."""
        lengths, num_new = _concrete(self.lengths), _concrete(num_new)
        if lengths is None or num_new is None:
            return
        total = lengths + num_new
        over = np.flatnonzero(total > self.capacity)
        if over.size:
            raise ValueError(
                f"KVCache overflow: sequence(s) {over.tolist()} would hold "
                f"{total[over].tolist()} tokens (lengths {lengths[over].tolist()} + new "
                f"{num_new[over].tolist()}), but the cache capacity (max_length) is "
                f"{self.capacity}; create the cache with a larger max_length"
            )

    def update(self, new_keys: Array, new_values: Array, num_new: Array | int | None = None) -> "KVCache":
        """Write ``T`` new tokens after each sequence's current length.

        Args:
          new_keys: ``[B, T, K, H]``.
          new_values: ``[B, T, K, Hv]``.
          num_new: int ``[B]`` (or a scalar): how many of the T tokens of each
            sequence are real (the rest is padding, not written); default T.  Counts
            outside ``[0, T]`` raise eagerly and are clipped under jit.

        Returns:
          the new cache: token t of sequence b in slot ``lengths[b] + t``; lengths
          increased by ``num_new``.  Stored in the cache's dtype.

        Raises:
          ValueError: on a shape mismatch, or (eagerly) when the tokens do not fit.
        """
        B, M, K, H = self.keys.shape
        Hv = self.values.shape[-1]
        new_keys, new_values = jnp.asarray(new_keys), jnp.asarray(new_values)
        if new_keys.ndim != 4 or new_keys.shape[0] != B or new_keys.shape[2:] != (K, H):
            raise ValueError(
                f"new_keys: got shape {new_keys.shape}; expected [B, T, K, H] = "
                f"({B}, T, {K}, {H}) to match the cache keys {self.keys.shape}"
            )
        T = new_keys.shape[1]
        if new_values.shape != (B, T, K, Hv):
            raise ValueError(
                f"new_values: got shape {new_values.shape}; expected [B, T, K, Hv] = "
                f"{(B, T, K, Hv)} to match new_keys {new_keys.shape} and the cache values "
                f"{self.values.shape}"
            )
        num_new = self._num_new(num_new, T)
        self.check_capacity(num_new)
        t = jnp.arange(T, dtype=jnp.int32)[None, :]
        slot = self.lengths[:, None] + t                                   # [B, T]
        # Padding and tokens past the capacity go to slot M, which mode="drop" skips.
        slot = jnp.where((t < num_new[:, None]) & (slot < M), slot, M)
        b = jnp.arange(B, dtype=jnp.int32)[:, None]
        keys = self.keys.at[b, slot].set(new_keys.astype(self.dtype), mode="drop")
        values = self.values.at[b, slot].set(new_values.astype(self.values.dtype), mode="drop")
        return KVCache(keys=keys, values=values, lengths=self.lengths + num_new)


def decode_attention(
    query: Array,
    new_keys: Array,
    new_values: Array,
    cache: KVCache,
    *,
    num_new: Array | int | None = None,
    bias: Array | None = None,
    mask: Any = None,
    **options,
):
    """One decoding (or prefill) step: append the new keys / values to ``cache`` and
    attend from the new queries to everything the cache holds.

    Query row t of sequence b sits at position ``p = cache.lengths[b] + t``; with
    ``is_causal`` it attends slots ``0 .. p`` (without, every filled slot, e.g. for a
    bidirectional prefix).  Rows past ``num_new[b]`` (padding) come out as zeros.

    Args:
      query: ``[B, T, N, H]``; cast to the cache dtype.
      new_keys, new_values: ``[B, T, K, H]`` / ``[B, T, K, Hv]`` for the same T tokens.
      cache: the `KVCache` before this step.
      num_new: int ``[B]``: real tokens among the T (default all T).
      bias, mask: as in `jattn.dot_product_attention`, with S = M (the cache capacity).
      {options}

      The options are `jattn.dot_product_attention`'s (``is_causal`` defaults to
      True here; windows are aligned like the causal mask) except those the cache
      sets: ``query_offset`` (the lengths before this step), ``query_seq_lengths``
      (``num_new``), ``key_value_seq_lengths`` (the lengths after it); the weights
      are ``[B, N, T, M]``.

    Returns:
      ``(out [B, T, N, Hv], new_cache)``, or ``(out, new_cache, weights)`` with
      ``return_weights``.  Under jit, the rows of tokens that did not fit in the cache
      are NaN (eagerly the call raises instead).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cache = KVCache.create(batch_size=1, max_length=4, num_kv_heads=1, head_dim=2)
      >>> x = jnp.ones((1, 1, 1, 2))
      >>> out, cache = decode_attention(x, x, 2 * x, cache)
      >>> out.tolist(), cache.lengths.tolist()
      ([[[[2.0, 2.0]]]], [1])
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache: expected a jattn.cache.KVCache; got {type(cache).__name__}")
    query = jnp.asarray(query)
    B, M = cache.batch_size, cache.capacity
    if query.ndim != 4 or query.shape[0] != B:
        raise ValueError(f"query: got shape {query.shape}; expected [B, T, N, H] with B={B} like the cache")
    T = query.shape[1]
    if jnp.shape(new_keys)[:2] != (B, T):
        raise ValueError(
            f"new_keys: got shape {jnp.shape(new_keys)}; expected [B, T, K, H] with "
            f"(B, T) = {(B, T)} like query {query.shape}"
        )
    before = cache.lengths
    explicit_num_new = num_new is not None
    num_new = cache._num_new(num_new, T)
    new_cache = cache.update(new_keys, new_values, num_new)
    options = options_lib.complete(options, where="decode_attention", allowed=DECODE_OPTIONS,
                                   defaults=DECODE_DEFAULTS)
    return_weights = options["return_weights"]
    result = dot_product_attention(
        query.astype(cache.dtype), new_cache.keys, new_cache.values, bias, mask, **options,
        query_offset=before, query_seq_lengths=num_new if explicit_num_new else None,
        key_value_seq_lengths=jnp.minimum(new_cache.lengths, M),
    )
    out, weights = result if return_weights else (result, None)
    # Tokens that did not fit (only possible under jit): NaN, never a silent answer.
    t = jnp.arange(T, dtype=jnp.int32)[None, :]
    lost = (before[:, None] + t >= M) & (t < num_new[:, None])              # [B, T]
    out = jnp.where(lost[:, :, None, None], jnp.asarray(jnp.nan, out.dtype), out)
    if return_weights:
        weights = jnp.where(lost[:, None, :, None], jnp.asarray(jnp.nan, weights.dtype), weights)
        return out, new_cache, weights
    return out, new_cache


# The options decode_attention takes: dot_product_attention's, less those the cache
# sets itself (positions and lengths) and those a cache cannot serve yet (segment ids
# across the cache, the residual).
DECODE_OPTIONS = tuple(
    n for n in options_lib.names()
    if n not in ("query_offset", "query_seq_lengths", "key_value_seq_lengths",
                 "query_segment_ids", "key_value_segment_ids", "return_residual")
)
DECODE_DEFAULTS = {"is_causal": True}
options_lib.with_options_signature(decode_attention, DECODE_OPTIONS, defaults=DECODE_DEFAULTS)
