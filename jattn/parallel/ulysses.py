"""Ulysses attention: two all-to-alls trade the sequence split for a head split.
Runs inside `jax.shard_map` (the axis is bound).

    q, k, v [B, T/P, N, H]  --all-to-all-->  [B, T, N/P, H]   (whole sequence, N/P heads)
    out, lse = one ordinary call on this device's heads        (any backend)
    out, lse [B, T, N/P, ·] --all-to-all-->  [B, T/P, N, ·]

Each device attends its N/P query heads (and K/P key/value heads: both must be
multiples of P, so GQA groups stay whole) over the whole sequence, so every mask,
score modifier and backend works as on one device: masks see natural positions
(the zig-zag layout is undone after the first all-to-all and redone before the
last), score modifiers see global heads, dropout draws at the global head index.
Communication per device is four all-to-alls of ``(P-1)/P`` of its shard (q, k, v,
out) whatever the mask, against the ring's P - 1 K/V blocks; memory holds the whole
sequence for N/P heads.  The backward pass is JAX's: the transpose of an all-to-all
is the reverse all-to-all.  `jattn.parallel.split` only runs it when asked
(``sequence_strategy="ulysses"``).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax import lax

from jattn.parallel import blocks
from jattn.parallel.blocks import FULL, PARTIAL, Operands, Static
from jattn.parallel.layout import unzigzag, zigzag


def refusal(st: Static, num_heads: int, kv_heads: int, return_weights: bool) -> str | None:
    """Why Ulysses cannot serve a call, or None."""
    if num_heads % st.size or kv_heads % st.size:
        return (f"its N={num_heads} query heads and K={kv_heads} key/value heads (per head shard) must "
                f"both be multiples of the {st.size} devices of {st.axis!r} (each device takes whole GQA groups)")
    if return_weights:
        return "it does not return the weights (all_gather does)"
    return None


def _to_heads(x, st: Static):
    """``[B, T/P, N, ·]`` -> ``[B, T, N/P, ·]``: the whole sequence (natural order)
    of this device's heads."""
    full = lax.all_to_all(x, st.axis, split_axis=2, concat_axis=1, tiled=True)
    return unzigzag(full, st.size, axis=1) if st.layout == "zigzag" else full


def _to_sequence(x, st: Static):
    """The inverse of `_to_heads` (heads on axis 2)."""
    if st.layout == "zigzag":
        x = zigzag(x, st.size, axis=1)
    return lax.all_to_all(x, st.axis, split_axis=1, concat_axis=2, tiled=True)


def run(st: Static, ops: Operands, return_weights: bool = False):
    """``(out [B, Tl, N, Hv], None, lse [B, Tl, N])`` of this device's queries, inside
    `jax.shard_map` over ``st.axis`` (`refusal` says when it cannot serve)."""
    heads_here = ops.q.shape[2] // st.size
    device = lax.axis_index(st.axis)
    # This device's heads start at device · N/P within the shard's (which may itself
    # be one of several head shards: ops.origin[1]).
    origin = ops.origin + jnp.stack([jnp.int32(0), (device * heads_here).astype(jnp.int32)])
    whole = dataclasses.replace(st, chunk_q=st.num_q, chunk_kv=st.num_kv)  # one piece: everything
    kind = FULL if (np.array(st.band) == FULL).all() else PARTIAL
    call = blocks.piece_call(
        whole, ops._replace(origin=origin), 0, 0, kind, 0,
        _to_heads(ops.q, st), _to_heads(ops.k, st), _to_heads(ops.v, st),
        blocks.gather_sequence(ops.q_segments, st), blocks.gather_sequence(ops.kv_segments, st), ops.score_mod,
    )
    out, _, lse = blocks.run_call(call, st.platform)
    out = _to_sequence(out.astype(ops.v.dtype), st)
    lse = _to_sequence(lse.astype(jnp.float32)[..., None], st)[..., 0]
    return out, None, lse
