"""`dot_product_attention`: the one batched entry point, a drop-in for
`jax.nn.dot_product_attention`, and `explain`, which says which backend it would use.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from jattn import dispatch
from jattn.call import AttentionCall, validate

Array = jax.Array


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Any = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: str | None = None,
    return_residual: bool = False,
    query_segment_ids: Array | None = None,
    key_value_segment_ids: Array | None = None,
    query_offset: int | Array = 0,
    logits_soft_cap: float | None = None,
    score_mod: Callable | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    return_weights: bool = False,
    block_sizes: tuple[int, int] | None = None,
):
    r"""Scaled dot-product attention, per head:
    ``softmax(scale · Q·Kᵀ + bias, masked) · V``.

    Accepts the positional and keyword arguments of `jax.nn.dot_product_attention`
    with the same meaning and layout, and adds what jax.nn lacks.

    Shapes (B batch, T query length, S key length, N query heads, K key/value heads,
    H head dim, Hv value head dim): query ``[B, T, N, H]``, key ``[B, S, K, H]``,
    value ``[B, S, K, Hv]``; or the same without B (unbatched).  N must be a multiple
    of K (GQA; K = 1 is MQA).

    Args:
      query, key, value: floating arrays of one dtype.
      bias: additive bias broadcastable to ``[B, N, T, S]``.
      mask: a boolean array broadcastable to ``[B, N, T, S]`` (True = attend), a
        `jattn.masks.Mask`, or a ``mask_mod(q_idx, kv_idx) -> bool`` function.
      scale: multiplies Q·Kᵀ; default ``1/sqrt(H)``.
      is_causal: row i attends keys ``j <= i + query_offset`` (jax.nn's alignment
        when ``query_offset == 0``).
      query_seq_lengths, key_value_seq_lengths: int ``[B]``; rows past a query length
        come out as zeros, keys past a key length are ignored.
      local_window_size: ``w`` or ``(left, right)``: row i attends keys
        ``i + query_offset - left <= j <= i + query_offset + right``.
      implementation: None (automatic), ``"dense"`` (alias ``"xla"``), ``"chunked"``
        ``"cudnn"`` or ``"pallas"``; see `explain`.
      return_residual: also return the log-sum-exp of each row ``[B, T, N]``
        (-inf for a fully masked row), as jax.nn does.
      query_segment_ids, key_value_segment_ids: int ``[B, T]`` / ``[B, S]`` for packed
        sequences: attend only within the same segment id.
      query_offset: int or int ``[B]``: the position of query row 0 among the keys
        (decoding after a cache of length L uses L).
      logits_soft_cap: ``c``: scores become ``c · tanh(score / c)`` (after
        ``score_mod``).
      score_mod: a `jattn.score_mods.ScoreMod` or
        ``score_mod(score, head, q_idx, kv_idx) -> score``.
      dropout_rate, dropout_rng: dropout on the attention weights; the pattern is a
        function of (key, example, head, row, column) only, the same in every backend.
      return_weights: also return the attention weights ``[B, N, T, S]`` (after
        dropout; forces the dense backend).
      block_sizes: ``(block_q, block_kv)`` for the chunked backend.

    Returns:
      ``[B, T, N, Hv]`` in the value dtype; with ``return_weights`` a pair
      ``(out, weights)``; with ``return_residual`` a pair ``(out, lse)``.

    A query row that no key may attend gives zeros (jax.nn gives the mean of the
    values there, except for rows past ``query_seq_lengths``, which it zeroes too).

    Example:
      >>> import jax, jax.numpy as jnp, jattn
      >>> kq, kk, kv = jax.random.split(jax.random.key(0), 3)
      >>> q = jax.random.normal(kq, (2, 5, 4, 8))   # B=2, T=5, N=4, H=8
      >>> k = jax.random.normal(kk, (2, 7, 2, 8))   # S=7, K=2 (GQA, G=2)
      >>> v = jax.random.normal(kv, (2, 7, 2, 8))
      >>> out = jattn.dot_product_attention(q, k, v, is_causal=True, query_offset=2)
      >>> out.shape
      (2, 5, 4, 8)
    """
    call = validate(
        query, key, value, bias, mask, scale=scale, is_causal=is_causal,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size, implementation=implementation,
        return_residual=return_residual, query_segment_ids=query_segment_ids,
        key_value_segment_ids=key_value_segment_ids, query_offset=query_offset,
        logits_soft_cap=logits_soft_cap, score_mod=score_mod, dropout_rate=dropout_rate,
        dropout_rng=dropout_rng, return_weights=return_weights, block_sizes=block_sizes,
    )
    platform = dispatch.current_platform()
    choice = dispatch.choose(call, platform)
    out, weights, lse = dispatch.BACKENDS[choice.backend].run(call, platform)
    if call.unbatched:
        out = out[0]
        weights = None if weights is None else weights[0]
        lse = None if lse is None else lse[0]
    if call.return_weights:
        return out, weights
    if call.return_residual:
        return out, lse
    return out


def explain(query, key, value, bias=None, mask=None, *, platform: str | None = None, **kwargs):
    """Which backend `dot_product_attention` would use for these arguments, and why
    each other backend was refused.  Takes the same arguments (plus ``platform``,
    default: JAX's default backend); computes nothing.

    Example:
      >>> import jax.numpy as jnp, jattn
      >>> q = jnp.zeros((1, 16, 2, 8))
      >>> print(jattn.explain(q, q, q, implementation="dense").backend)
      dense
    """
    call = make_call(query, key, value, bias, mask, **kwargs)
    return dispatch.choose(call, platform or dispatch.current_platform())


def make_call(query, key, value, bias=None, mask=None, **kwargs) -> AttentionCall:
    """The validated `AttentionCall` for `dot_product_attention`'s arguments (keyword
    arguments not given take its defaults); what each backend's ``run`` takes.

    Example:
      >>> import jax.numpy as jnp
      >>> make_call(jnp.zeros((2, 16, 4, 8)), jnp.zeros((2, 9, 2, 8)), jnp.zeros((2, 9, 2, 8))).shape
      {'B': 2, 'T': 16, 'S': 9, 'N': 4, 'K': 2, 'H': 8, 'Hv': 8}
    """
    defaults = dict(
        scale=None, is_causal=False, query_seq_lengths=None, key_value_seq_lengths=None,
        local_window_size=None, implementation=None, return_residual=False,
        query_segment_ids=None, key_value_segment_ids=None, query_offset=0,
        logits_soft_cap=None, score_mod=None, dropout_rate=0.0, dropout_rng=None,
        return_weights=False, block_sizes=None,
    )
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"unknown arguments {sorted(unknown)}; expected some of {sorted(defaults)}")
    return validate(query, key, value, bias, mask, **{**defaults, **kwargs})
