"""The textbook steps of attention, for ONE head.

    Attention(Q, K, V) = softmax(Q·Kᵀ / √d_k) · V

is computed in five steps (the README's table numbers them the same way); the first
four are pure functions here that can be called, jitted, differentiated and
`jax.vmap`-ped on their own:

1. `attention_scores`  scores[t, s] = scale · Σ_h q[t, h] k[s, h]   (+ bias, score_mod)
2. `attention_weights` normalised scores: softmax(scores[t, :]) over the allowed keys
3. `dropout_weights`   the attention weights (the normalised rows, optionally dropped out)
4. `context_vectors`   context[t, :] = Σ_s weights[t, s] v[s, :]
5. updating the sequence, x + context·W^O, belongs to a module (`jattn.nnx.SelfAttention`).

`head_attention` composes them (with optional dropout on the weights).  Heads and
batch are added by `jax.vmap`; `jattn.dot_product_attention` does exactly that.

Axis letters: T query length, S key/value length, H head dim (Hv for values).

Numerics (the same for every jattn backend): scores and the softmax are float32 (or
wider) whatever the input dtype; matmuls accumulate in float32; masked scores use a
finite large negative value, never -inf arithmetic; a query row with no allowed key
gets all-zero weights (and so a zero context vector) and a zero gradient.

This module imports nothing from the rest of jattn.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
# score_mod(score, head, q_idx, kv_idx) -> score, elementwise with broadcasting.
ScoreModFn = Callable[[Array, Any, Array, Array], Array]
# mask_mod(q_idx, kv_idx) -> bool (True = attend), elementwise with broadcasting.
MaskModFn = Callable[[Array, Array], Array]

# A finite stand-in for -inf: exp(MASKED - max) underflows to exactly 0 in float32,
# and MASKED - MASKED = 0 stays finite, so a fully masked row never produces NaN.
MASKED_SCORE = -0.7 * float(np.finfo(np.float32).max)


def _compute_dtype(*arrays) -> np.dtype:
    """float32, or float64 when an input is float64 (the reference runs in x64)."""
    return jnp.result_type(np.float32, *[a.dtype for a in arrays if a is not None])


def default_indices(length: int, idx: Array | None) -> Array:
    """`idx` if given, else `arange(length)`: the global row / column indices."""
    if idx is None:
        return jnp.arange(length, dtype=jnp.int32)
    return jnp.asarray(idx)


def attention_scores(
    q: Array,
    k: Array,
    *,
    scale: float | None = None,
    bias: Array | None = None,
    score_mod: ScoreModFn | None = None,
    head: Any = 0,
    q_idx: Array | None = None,
    kv_idx: Array | None = None,
    precision: Any = None,
) -> Array:
    r"""Step 1: how strongly each query relates to each key.

    .. math:: \mathrm{scores}[t, s] = \mathrm{scale}\cdot\sum_h q[t,h]\,k[s,h]
              \;(+\ \mathrm{bias}[t,s]) \;\rightarrow\; \mathrm{score\_mod}

    Args:
      q: queries ``[T, H]``.
      k: keys ``[S, H]``.
      scale: multiplies ``q·kᵀ``; default ``1/sqrt(H)``.
      bias: optional additive bias broadcastable to ``[T, S]``.
      score_mod: optional ``score_mod(score, head, q_idx, kv_idx) -> score``, applied
        elementwise after the bias (soft-capping, ALiBi, relative biases, ...).
        ``q_idx`` is ``[T, 1]`` and ``kv_idx`` ``[1, S]``: write it with broadcasting
        jnp operations.
      head: the head index passed to ``score_mod`` (an int, or a traced int under vmap).
      q_idx, kv_idx: global indices of these rows / columns (default ``arange``);
        blockwise backends pass the indices of a block.
      precision: the matmul's `jax.lax.Precision` (None: the platform default).

    Returns:
      ``[T, S]`` scores in float32 (float64 for float64 inputs).

    Example:
      >>> import jax.numpy as jnp
      >>> q = jnp.array([[1.0, 0.0], [0.0, 2.0]])            # T=2, H=2
      >>> k = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # S=3
      >>> attention_scores(q, k, scale=1.0)
      Array([[1., 0., 1.],
             [0., 2., 2.]], dtype=float32)
    """
    if q.ndim != 2 or k.ndim != 2:
        raise ValueError(
            f"attention_scores: q and k must be [T, H] and [S, H] for one head; "
            f"got q {q.shape} and k {k.shape}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"attention_scores: q and k must share the head dim H; "
            f"got q {q.shape} and k {k.shape}"
        )
    dtype = _compute_dtype(q, k)
    if scale is None:
        scale = 1.0 / np.sqrt(q.shape[-1])
    scores = jnp.einsum("TH,SH->TS", q, k, preferred_element_type=dtype, precision=precision)
    scores = scores * jnp.asarray(scale, dtype)
    if bias is not None:
        scores = scores + jnp.asarray(bias).astype(dtype)
    if score_mod is not None:
        t_idx = default_indices(q.shape[0], q_idx)[:, None]
        s_idx = default_indices(k.shape[0], kv_idx)[None, :]
        scores = jnp.broadcast_to(score_mod(scores, head, t_idx, s_idx), scores.shape)
        scores = scores.astype(dtype)
    return scores


def evaluate_mask(
    mask: Array | MaskModFn | None,
    shape: tuple[int, int],
    q_idx: Array | None = None,
    kv_idx: Array | None = None,
) -> Array | None:
    """A boolean ``[T, S]`` array from a mask given as an array or as a function.

    ``mask`` is None (everything allowed), a boolean array broadcastable to ``shape``,
    or a ``mask_mod(q_idx, kv_idx) -> bool`` evaluated on the index grid.

    Example:
      >>> evaluate_mask(lambda i, j: j <= i, (2, 3))
      Array([[ True, False, False],
             [ True,  True, False]], dtype=bool)
    """
    if mask is None:
        return None
    if callable(mask):
        t_idx = default_indices(shape[0], q_idx)[:, None]
        s_idx = default_indices(shape[1], kv_idx)[None, :]
        mask = mask(t_idx, s_idx)
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"mask must be boolean (True = attend); got dtype {mask.dtype}")
    return jnp.broadcast_to(mask, shape)


def attention_weights(
    scores: Array,
    mask: Array | MaskModFn | None = None,
    *,
    q_idx: Array | None = None,
    kv_idx: Array | None = None,
) -> Array:
    r"""Steps 2-3: the masked softmax of each row of scores.

    .. math:: w[t, s] = \frac{m[t,s]\,e^{x[t,s] - \max_{s'} x[t,s']}}
                             {\sum_{s'} m[t,s']\,e^{x[t,s'] - \max_{s'} x[t,s']}}

    where ``m`` is the mask (1 = attend) and ``x`` the scores with masked entries
    replaced by a finite large negative number.  A row with no allowed key gets
    all-zero weights and a zero gradient (never NaN).

    Args:
      scores: ``[T, S]`` (computed in at least float32).
      mask: None, a boolean array broadcastable to ``[T, S]``, or a
        ``mask_mod(q_idx, kv_idx) -> bool``.
      q_idx, kv_idx: global indices used to evaluate a ``mask_mod``.

    Returns:
      ``[T, S]`` weights; each row sums to 1, or to 0 if fully masked.

    Example:
      >>> import jax.numpy as jnp
      >>> scores = jnp.array([[0.0, 0.0, 5.0], [1.0, 1.0, 1.0]])
      >>> attention_weights(scores, jnp.array([[True, True, False], [False] * 3]))
      Array([[0.5, 0.5, 0. ],
             [0. , 0. , 0. ]], dtype=float32)
    """
    if scores.ndim != 2:
        raise ValueError(f"attention_weights: scores must be [T, S]; got {scores.shape}")
    scores = scores.astype(_compute_dtype(scores))
    mask = evaluate_mask(mask, scores.shape, q_idx, kv_idx)
    if mask is None:
        return jax.nn.softmax(scores, axis=-1)
    return _masked_softmax(scores, mask)


@jax.custom_jvp
def _masked_softmax(scores: Array, mask: Array) -> Array:
    """Row softmax over the allowed entries; all-zero rows where nothing is allowed."""
    scores = jnp.where(mask, scores, MASKED_SCORE)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    # Exactly zero for masked keys, also in a fully masked row where exp(0) = 1.
    unnormalized = jnp.where(mask, jnp.exp(scores - row_max), 0.0)
    total = jnp.sum(unnormalized, axis=-1, keepdims=True)
    return unnormalized / jnp.where(total == 0.0, 1.0, total)


@_masked_softmax.defjvp
def _masked_softmax_jvp(primals, tangents):
    # d softmax = w ∘ (ds - Σ w·ds): one fused pass in the backward instead of
    # differentiating through the max, exp, sum and division.  Masked entries have
    # w = 0; their tangent is zeroed too so an inf or NaN there cannot leak in.
    scores, mask = primals
    d_scores = jnp.where(mask, tangents[0], 0.0)
    weights = _masked_softmax(scores, mask)
    return weights, weights * (d_scores - jnp.sum(weights * d_scores, axis=-1, keepdims=True))


def log_normalizer(scores: Array, mask: Array | MaskModFn | None = None) -> Array:
    """The log-sum-exp of each row over its allowed keys, ``[T]``; -inf for a fully
    masked row.  ``weights = exp(scores - lse)`` on the allowed keys.

    Example:
      >>> import jax.numpy as jnp
      >>> log_normalizer(jnp.zeros((1, 4)))
      Array([1.3862944], dtype=float32)
    """
    scores = scores.astype(_compute_dtype(scores))
    mask = evaluate_mask(mask, scores.shape)
    if mask is None:
        return jax.nn.logsumexp(scores, axis=-1)
    mask = jnp.broadcast_to(mask, scores.shape)
    has_key = mask.any(axis=-1)
    # A fully masked row sums zeros instead of -infs, so its (discarded) gradient is
    # 0, not NaN: the log-sum-exp of a block is differentiated when blocks are merged.
    scores = jnp.where(mask, scores, -jnp.inf)
    scores = jnp.where(has_key[:, None], scores, 0.0)
    return jnp.where(has_key, jax.nn.logsumexp(scores, axis=-1), -jnp.inf)


def context_vectors(weights: Array, v: Array, *, precision: Any = None) -> Array:
    r"""Step 4: each query's weighted sum of the value vectors.

    .. math:: \mathrm{context}[t, :] = \sum_s w[t, s]\, v[s, :]

    The weights are cast to the value dtype for the matmul, which accumulates in
    float32; the result has the value dtype.

    Args:
      weights: ``[T, S]``.
      v: values ``[S, Hv]``.
      precision: the matmul's `jax.lax.Precision` (None: the platform default).

    Returns:
      ``[T, Hv]`` in ``v.dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> context_vectors(jnp.array([[0.5, 0.5], [1.0, 0.0]]),
      ...                 jnp.array([[2.0, 0.0], [0.0, 4.0]]))
      Array([[1., 2.],
             [2., 0.]], dtype=float32)
    """
    if weights.ndim != 2 or v.ndim != 2 or weights.shape[1] != v.shape[0]:
        raise ValueError(
            f"context_vectors: weights must be [T, S] and v [S, Hv]; "
            f"got weights {weights.shape} and v {v.shape}"
        )
    accumulate = _compute_dtype(v)
    out = jnp.einsum(
        "TS,SH->TH", weights.astype(v.dtype), v, preferred_element_type=accumulate,
        precision=precision,
    )
    return out.astype(v.dtype)


# ----------------------------------------------------------------------------- dropout
def _mix32(x: Array) -> Array:
    """A 32-bit integer finaliser (xor-shift-multiply): every input bit affects every
    output bit, so consecutive indices give unrelated outputs."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def dropout_keep_mask(key: Array, rate: float, q_idx: Array, kv_idx: Array) -> Array:
    """Which weights survive dropout: a boolean array, True with probability 1 - rate.

    The draw for entry ``(t, s)`` is a hash of ``(key, q_idx[t], kv_idx[s])``, so any
    block of the ``[T, S]`` grid can be regenerated on its own and gives exactly the
    entries the full grid would: the chunked backend relies on this to match the dense
    backend's dropout pattern without storing it.

    Args:
      key: a ``jax.random.key`` (one per batch element and head).
      rate: the probability of dropping a weight, in [0, 1).
      q_idx, kv_idx: broadcastable integer index arrays.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> keep = dropout_keep_mask(jax.random.key(0), 0.25,
      ...                          jnp.arange(256)[:, None], jnp.arange(256)[None, :])
      >>> bool(abs(keep.mean() - 0.75) < 0.01)
      True
    """
    return dropout_keep_from_seed(dropout_seed(key), rate, q_idx, kv_idx)


def dropout_seed(key: Array) -> Array:
    """The uint32 scalar that `dropout_keep_mask` derives from ``key`` (a kernel
    receives it instead of the key, whose typed array it cannot load)."""
    words = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
    seed = _mix32(words[0] ^ jnp.uint32(0x9E3779B9))
    for word in words[1:]:
        seed = _mix32(seed ^ word)
    return seed


def dropout_keep_from_seed(seed: Array, rate: float, q_idx: Array, kv_idx: Array) -> Array:
    """`dropout_keep_mask` from the key's `dropout_seed`: the same hash, entry by entry."""
    rows = _mix32(jnp.asarray(q_idx).astype(jnp.uint32) ^ seed)
    bits = _mix32(rows ^ (jnp.asarray(kv_idx).astype(jnp.uint32) * jnp.uint32(0x85EBCA6B)))
    threshold = min(int(round(rate * 2.0**32)), 2**32 - 1)
    return bits >= jnp.uint32(threshold)


def dropout_weights(
    weights: Array,
    key: Array,
    rate: float,
    *,
    q_idx: Array | None = None,
    kv_idx: Array | None = None,
) -> Array:
    """Dropout on attention weights: drop each with probability ``rate`` and scale the
    rest by ``1 / (1 - rate)`` so the expectation is unchanged.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> w = dropout_weights(jnp.full((2, 4), 0.25), jax.random.key(1), 0.5)
      >>> sorted(set(w.ravel().tolist())) in ([0.0, 0.5], [0.5], [0.0])
      True
    """
    if rate == 0.0:
        return weights
    t_idx = default_indices(weights.shape[0], q_idx)[:, None]
    s_idx = default_indices(weights.shape[1], kv_idx)[None, :]
    keep = dropout_keep_mask(key, rate, t_idx, s_idx)
    return jnp.where(keep, weights / (1.0 - rate), 0.0).astype(weights.dtype)


def head_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    scale: float | None = None,
    bias: Array | None = None,
    score_mod: ScoreModFn | None = None,
    mask: Array | MaskModFn | None = None,
    head: Any = 0,
    dropout_rate: float = 0.0,
    dropout_key: Array | None = None,
) -> tuple[Array, Array]:
    """Steps 1-4 composed, for one head: ``(context [T, Hv], weights [T, S])``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> kq, kk, kv = jax.random.split(jax.random.key(0), 3)
      >>> q = jax.random.normal(kq, (4, 8))           # T=4, H=8
      >>> k = jax.random.normal(kk, (6, 8))           # S=6
      >>> v = jax.random.normal(kv, (6, 3))           # Hv=3
      >>> context, weights = head_attention(q, k, v, mask=lambda i, j: j <= i + 2)
      >>> context.shape, weights.shape
      ((4, 3), (4, 6))
      >>> bool(jnp.allclose(weights.sum(-1), 1.0))
      True
    """
    scores = attention_scores(q, k, scale=scale, bias=bias, score_mod=score_mod, head=head)
    weights = attention_weights(scores, mask)
    if dropout_rate > 0.0:
        if dropout_key is None:
            raise ValueError("head_attention: dropout_rate > 0 needs a dropout_key")
        weights = dropout_weights(weights, dropout_key, dropout_rate)
    return context_vectors(weights, v), weights
