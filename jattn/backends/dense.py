"""The dense backend: the step functions of `jattn.ops`, vmapped over heads and batch.

It materialises the ``[T, S]`` scores of every head, so its memory grows with T·S; it
is the reference every other backend is tested against and the fastest choice for
short sequences.  It supports every feature, including returning the weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn import ops
from jattn.backends import heads as H
from jattn.backends.contract import Backend
from jattn.call import FEATURES, AttentionCall

NAME = "dense"


def _one_head(q, k, v, bias, dense_mask, head, batch_index, mask, score_mod, *, call):
    """One example, one query head: q [T, H], k [S, H], v [S, Hv] -> context, weights, lse."""
    T, S = q.shape[0], k.shape[0]
    scores = ops.attention_scores(q, k, scale=call.scale, bias=bias, score_mod=score_mod, head=head,
                                  precision=call.precision)
    allowed = ops.evaluate_mask(mask, (T, S))
    if dense_mask is not None:
        dense_mask = jnp.broadcast_to(dense_mask, (T, S))
        allowed = dense_mask if allowed is None else allowed & dense_mask
    weights = ops.attention_weights(scores, allowed)
    lse = ops.log_normalizer(scores, allowed) if call.return_residual else None
    if call.dropout_rate > 0.0:
        q_idx = kv_idx = None
        if call.dropout_origin is not None:  # a block of a larger problem: global indices
            b0, n0, q0, kv0 = call.dropout_origin
            batch_index, head = batch_index + b0, head + n0
            q_idx, kv_idx = q0 + jnp.arange(T, dtype=jnp.int32), kv0 + jnp.arange(S, dtype=jnp.int32)
        key = H.head_dropout_key(call.dropout_rng, batch_index, head)
        weights = ops.dropout_weights(weights, key, call.dropout_rate, q_idx=q_idx, kv_idx=kv_idx)
    return ops.context_vectors(weights, v, precision=call.precision), weights, lse


def run(call: AttentionCall, platform: str):
    """``(out [B, T, N, Hv], weights [B, N, T, S] | None, lse [B, T, N] | None)``."""
    s = call.shape
    g = H.group_heads(call)
    mask, mask_axes = (None, None)
    if (m := call.index_mask()) is not None:
        mask, mask_axes = m.batch_in_axes(s["B"], s["T"], s["S"])
    score_mod, score_mod_axes = (None, None)
    if (sm := call.index_score_mod()) is not None:
        score_mod, score_mod_axes = sm.batch_in_axes(s["B"], s["T"], s["S"])
    mask = H.batch_leaves_sharded_like(mask, mask_axes, g["q"])
    score_mod = H.batch_leaves_sharded_like(score_mod, score_mod_axes, g["q"])

    def one_head(*args):
        return _one_head(*args, call=call)

    over_heads = H.vmap_heads(
        one_head,
        H.PER_QUERY_HEAD, H.PER_KV_HEAD, H.PER_KV_HEAD, g["bias_axes"], g["dense_mask_axes"],
        H.HEAD_ID, H.PER_EXAMPLE, (mask_axes, None, None), (score_mod_axes, None, None),
        sizes=H.head_sizes(call),
    )
    out, weights, lse = over_heads(
        g["q"], g["k"], g["v"], g["bias"], g["dense_mask"], g["head"], g["batch_index"], mask, score_mod
    )
    out = H.ungroup_output(out)
    weights = H.ungroup_rows(weights) if call.return_weights else None
    if lse is not None:
        lse = H.ungroup_rows(lse).transpose(0, 2, 1)
    return out, weights, lse


BACKEND = Backend(
    name=NAME,
    # Every feature but a split sequence (jattn.parallel splits it into block calls).
    supports=frozenset(FEATURES) - {"sequence_sharding"},
    limits=lambda call, platform: None,
    run=run,
    description="the step functions vmapped over heads and batch; materialises [T, S] per head",
)
