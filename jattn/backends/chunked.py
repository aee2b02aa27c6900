"""The chunked backend: flash-style attention in pure JAX, O(T) memory.

Forward: for each block of ``block_q`` queries, walk the key/value blocks keeping a
running row max ``m``, normaliser ``l`` and un-normalised output ``acc`` (the online
softmax), so no ``[T, S]`` array ever exists:

    m' = max(m, rowmax(s));  l' = l·e^(m - m') + rowsum(e^(s - m'));
    acc' = acc·e^(m - m') + e^(s - m')·V_blk;     out = acc / l,  lse = m + log l

Backward (`jax.custom_vjp`): only ``out`` and ``lse`` are saved; each block's
probabilities are recomputed as ``p = e^(s - lse)``, then
``dV += pᵀ·dO``, ``dP = dO·Vᵀ``, ``dS = p ∘ (dP - rowsum(dO ∘ out))`` and
``(dQ, dK, dbias, dscore_mod) = vjp(scores)(dS)``.  Plain scores (no bias, no
score_mod) take a hand-written path on the transposed tile instead, which XLA runs
faster on a CPU (`_head_backward_tile_transposed`).

Tiles are classified once from the mask (`jattn.masks.Mask.block_kinds`): EMPTY tiles
are never visited, FULL tiles skip mask evaluation, PARTIAL tiles evaluate it.  When
the classification is known at trace time (causal, windows, int lengths) the schedule
is two fixed lists of (q tile, kv tile) pairs, scanned with no conditional and no
data-dependent trip count; otherwise every pair is visited and a switch skips the
empty ones.  The math per tile is written for ONE head (the functions prefixed
``_head_``) and vmapped over GQA groups, kv heads and the batch; the scans over
tiles run outside the vmap so that skipping is real control flow.

Dropout draws each weight's fate from ``jattn.ops.dropout_keep_mask`` at the weight's
global (row, column): the same pattern as the dense backend, tile by tile.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jattn import masks as masks_lib
from jattn import ops as ops_lib
from jattn.backends import heads as H
from jattn.backends.contract import Backend
from jattn.call import FEATURES, AttentionCall
from jattn.differentiable import cotangent_tree, split_differentiable

NAME = "chunked"

# (block_q, block_kv) per platform, from experiments/benchmark.py sweeps (docs/benchmarks.md).
DEFAULT_BLOCK_SIZES = {"cpu": (512, 256), "gpu": (2048, 2048), "tpu": (512, 512)}


# Every feature but returning the weights, which it never materialises (dense can).
SUPPORTS = frozenset(FEATURES) - {"return_weights", "sequence_sharding"}


def block_sizes_for(call: AttentionCall, platform: str) -> tuple[int, int]:
    """The (block_q, block_kv) used: the call's, else the platform default, clipped to
    the sequence lengths (a short sequence is a single block, unpadded)."""
    bq, bk = call.block_sizes or DEFAULT_BLOCK_SIZES.get(platform, DEFAULT_BLOCK_SIZES["cpu"])
    s = call.shape
    return min(bq, s["T"]), min(bk, s["S"])


# ------------------------------------------------------------------ one-head tile math
def _head_scores(q, k, bias, head, q_idx, kv_idx, score_mod, *, scale, precision):
    """Scores of one tile for one head: q [bq, H], k [bk, H] -> [bq, bk] float32."""
    return ops_lib.attention_scores(
        q, k, scale=scale, bias=bias, score_mod=score_mod, head=head, q_idx=q_idx, kv_idx=kv_idx,
        precision=precision,
    )


def _head_tile_masks(dense_mask, head, batch_index, mask, rng, origin, q_idx, kv_idx, *, masked, rate, num_kv):
    """For one head and tile: which entries may be attended (None on a FULL tile; keys
    past S are padding) and which survive dropout (None without dropout: the dense
    backend's pattern, regenerated from the key and the global indices; ``origin``
    [4], when the call is a block of a larger problem, shifts the example, head, row
    and key indices of the draw)."""
    allowed = keep = None
    if masked:
        allowed = kv_idx[None, :] < num_kv
        if mask is not None:
            allowed = allowed & mask(q_idx[:, None], kv_idx[None, :])
        if dense_mask is not None:
            allowed = allowed & dense_mask
        allowed = jnp.broadcast_to(allowed, (q_idx.shape[0], kv_idx.shape[0]))
    if rate > 0.0:
        if origin is not None:
            batch_index, head = batch_index + origin[0], head + origin[1]
            q_idx, kv_idx = q_idx + origin[2], kv_idx + origin[3]
        key = H.head_dropout_key(rng, batch_index, head)
        keep = ops_lib.dropout_keep_mask(key, rate, q_idx[:, None], kv_idx[None, :])
    return allowed, keep


def _head_forward_tile(q, k, v, bias, dense_mask, head, batch_index, mask, score_mod, rng, origin,
                       q_idx, kv_idx, m, l, acc, *, masked, rate, scale, num_kv, precision):
    """One online-softmax step for one head: fold the tile of q [bq, H] against
    k [bk, H], v [bk, Hv] into the running (m [bq], l [bq], acc [bq, Hv])."""
    s = _head_scores(q, k, bias, head, q_idx, kv_idx, score_mod, scale=scale, precision=precision)
    allowed, keep = _head_tile_masks(dense_mask, head, batch_index, mask, rng, origin, q_idx, kv_idx,
                                     masked=masked, rate=rate, num_kv=num_kv)
    if allowed is not None:
        s = jnp.where(allowed, s, ops_lib.MASKED_SCORE)
    # The running max only stabilises: out and lse do not depend on its value, so no
    # tangent flows through it.  (reduce_max's JVP finds the max by bitwise equality,
    # which breaks when XLA computes the scores twice with different rounding: NaN
    # tangents were seen with XLA's optimisations off.)
    m_new = lax.stop_gradient(jnp.maximum(m, s.max(axis=-1)))
    p = jnp.exp(s - m_new[:, None])
    if allowed is not None:
        p = jnp.where(allowed, p, 0.0)
    correction = jnp.exp(m - m_new)
    l_new = l * correction + p.sum(axis=-1)
    if keep is not None:
        p = jnp.where(keep, p / (1.0 - rate), 0.0)
    pv = jnp.einsum("qs,sh->qh", p.astype(v.dtype), v, preferred_element_type=acc.dtype, precision=precision)
    return m_new, l_new, acc * correction[:, None] + pv


def _head_backward_tile(s, v, do, lse, delta, dense_mask, head, batch_index, mask, rng, origin,
                        q_idx, kv_idx, *, masked, rate, num_kv, precision):
    """Gradient pieces of one tile for one head, from its scores s [bq, bk]:
    returns (dS [bq, bk], dV [bk, Hv]).

    lse is +inf for fully masked rows, so their p = e^(s - lse) is exactly 0."""
    allowed, keep = _head_tile_masks(dense_mask, head, batch_index, mask, rng, origin, q_idx, kv_idx,
                                     masked=masked, rate=rate, num_kv=num_kv)
    p = jnp.exp(s - lse[:, None])
    if allowed is not None:
        p = jnp.where(allowed, p, 0.0)
    dp = jnp.einsum("qh,sh->qs", do, v, preferred_element_type=s.dtype, precision=precision)
    p_used = p
    if keep is not None:
        p_used = jnp.where(keep, p / (1.0 - rate), 0.0)
        dp = jnp.where(keep, dp / (1.0 - rate), 0.0)
    dv = jnp.einsum("qs,qh->sh", p_used.astype(do.dtype), do, preferred_element_type=s.dtype, precision=precision)
    ds = p * (dp - delta[:, None])
    return ds, dv


def _head_backward_tile_transposed(q, k, v, do, lse, delta, dense_mask, head, batch_index, mask, rng,
                                   origin, q_idx, kv_idx, *, masked, rate, scale, num_kv, precision):
    """The whole backward of one tile for one head when scores are plain
    ``scale·q·kᵀ`` (no bias, no score_mod): returns (dQ [bq, H], dK [bk, H],
    dV [bk, Hv]), all float32.

    It works on the transposed tile ``sᵀ [bk, bq]``: then ``dV = pᵀ·dO`` and
    ``dK = dSᵀ·Q`` contract the last axis of a row-major operand, which XLA's CPU
    matmuls run about 2x faster than contracting its first axis (measured:
    a [8, 512, 256] tile's backward in 3.6 ms against 4.8 ms via `jax.vjp`)."""
    dtype = jnp.promote_types(jnp.promote_types(q.dtype, k.dtype), jnp.float32)
    s_t = jnp.einsum("sh,th->st", k, q, preferred_element_type=dtype, precision=precision) * jnp.asarray(scale, dtype)
    allowed, keep = _head_tile_masks(dense_mask, head, batch_index, mask, rng, origin, q_idx, kv_idx,
                                     masked=masked, rate=rate, num_kv=num_kv)
    p_t = jnp.exp(s_t - lse[None, :])
    if allowed is not None:
        p_t = jnp.where(allowed.T, p_t, 0.0)
    dp_t = jnp.einsum("sh,th->st", v, do, preferred_element_type=dtype, precision=precision)
    p_used = p_t
    if keep is not None:
        p_used = jnp.where(keep.T, p_t / (1.0 - rate), 0.0)
        dp_t = jnp.where(keep.T, dp_t / (1.0 - rate), 0.0)
    dv = jnp.einsum("st,th->sh", p_used.astype(do.dtype), do, preferred_element_type=dtype, precision=precision)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = jnp.einsum("st,th->sh", ds_t.astype(q.dtype), q, preferred_element_type=dtype, precision=precision)
    dq = jnp.einsum("st,sh->th", ds_t.astype(k.dtype), k, preferred_element_type=dtype, precision=precision)
    # Scaling the [bq, H] / [bk, H] results, not the [bk, bq] tile.
    return dq * jnp.asarray(scale, dtype), dk * jnp.asarray(scale, dtype), dv


# ------------------------------------------------------------------------ tile tables
def _block_table(call, mask, mask_axes, dense_mask, num_q_blocks, num_kv_blocks, bq, bk):
    """EMPTY / PARTIAL / FULL code per (q block, kv block), for the whole batch.

    NumPy (static: the schedule is fixed when the program is traced) when the mask
    structure is known at trace time; jnp otherwise, reduced over the batch (a tile
    is skipped only if it is empty for every example)."""
    s = call.shape
    kinds = np.full((num_q_blocks, num_kv_blocks), masks_lib.FULL, np.int8)
    if mask is not None:
        if mask.is_static():
            kinds = mask.block_kinds(s["T"], s["S"], bq, bk)
        else:
            per_example = masks_lib.per_example_block_kinds(mask, mask_axes, s["T"], s["S"], bq, bk)
            per_example = jnp.broadcast_to(per_example, (s["B"], num_q_blocks, num_kv_blocks))
            empty = jnp.all(per_example == masks_lib.EMPTY, axis=0)
            full = jnp.all(per_example == masks_lib.FULL, axis=0)
            kinds = masks_lib.tile_kinds(empty, full)
    if dense_mask is not None:
        # dense_mask is padded to the tile grid; reduce every axis but the tile axes.
        t, k = dense_mask.shape[-2:]
        tiles = dense_mask.reshape(dense_mask.shape[:-2] + (t // bq if t > 1 else 1, bq if t > 1 else 1,
                                                             k // bk if k > 1 else 1, bk if k > 1 else 1))
        lead = tuple(range(tiles.ndim - 4))
        empty = ~tiles.any(axis=lead + (tiles.ndim - 3, tiles.ndim - 1))
        full = tiles.all(axis=lead + (tiles.ndim - 3, tiles.ndim - 1))
        dense_kinds = masks_lib.tile_kinds(empty, full)
        kinds = jnp.minimum(kinds, jnp.broadcast_to(dense_kinds, kinds.shape))
    if num_kv_blocks * bk > s["S"]:
        # The last kv tile holds padding keys, which only the mask path excludes.
        xp = np if isinstance(kinds, np.ndarray) else jnp
        last = xp.minimum(kinds[:, -1:], masks_lib.PARTIAL)
        kinds = xp.concatenate([kinds[:, :-1], last], axis=1)
    return kinds.astype(np.int8) if isinstance(kinds, np.ndarray) else kinds.astype(jnp.int8)


def _tile_of(x, i, j, bq, bk):
    """The (i, j) tile of an array whose last two axes are (T or 1, S or 1)."""
    if x is None:
        return None
    if x.shape[-2] > 1:
        x = lax.dynamic_slice_in_dim(x, i * bq, bq, axis=x.ndim - 2)
    if x.shape[-1] > 1:
        x = lax.dynamic_slice_in_dim(x, j * bk, bk, axis=x.ndim - 1)
    return x


def _pad_last2(x, t_to, s_to, value):
    """Pad the (T, S) axes of a bias / mask to the tile grid (broadcast axes stay 1)."""
    if x is None:
        return None
    t, s = x.shape[-2:]
    pads = [(0, 0)] * (x.ndim - 2) + [(0, t_to - t if t > 1 else 0), (0, s_to - s if s > 1 else 0)]
    return jnp.pad(x, pads, constant_values=value)


# ------------------------------------------------------------------------------ plan
@dataclasses.dataclass(frozen=True)
class Plan:
    """What is static about one chunked call: sizes, tiles, options and the vmap axes
    of the per-tile inputs.  Hashable, so it is the custom VJP's non-differentiable
    argument; every array the algorithm uses travels in `Operands` instead."""

    sizes: tuple[int, int, int]  # (B, K, G)
    num_kv: int  # S: keys at or past it are tile padding
    bq: int
    bk: int
    scale: float
    rate: float
    precision: Any
    plain_scores: bool  # scores are scale·q·kᵀ and nothing else (no bias, no score_mod)
    bias_axes: tuple
    dense_mask_axes: tuple
    mask_axes: Any
    score_mod_axes: Any
    static_kinds: tuple | None  # the tile table when known at trace time

    def context_axes(self):
        """in_axes of the per-tile context: dense_mask, head, batch_index, mask."""
        return (self.dense_mask_axes, H.HEAD_ID, H.PER_EXAMPLE, (self.mask_axes, None, None))


class Operands(NamedTuple):
    """Every array of a chunked call, tile-major, as arguments of the custom VJP
    (nothing traced is captured from outside it)."""

    q: Array  # [nq, B, K, G, bq, H]
    k: Array  # [nk, B, K, bk, H]
    v: Array  # [nk, B, K, bk, Hv]
    bias: Array | None  # padded to the tile grid, broadcast axes kept at 1
    dense_mask: Array | None  # likewise
    mask: Any  # a jattn.masks.Mask pytree (or None)
    score_mod: Any  # a jattn.score_mods.ScoreMod pytree (or None)
    head: Array  # [K, G] query-head ids
    batch_index: Array  # [B]
    rng: Array | None  # the dropout key
    origin: Array | None  # [4] int32: the dropout draw's global (example, head, row, key) origin
    kinds: Array | None  # the tile table when it is only known at run time


INDEX_AXES = (H.SHARED, H.SHARED, H.SHARED, H.SHARED)  # rng, dropout origin, q_idx, kv_idx


def _tile_context(plan: Plan, ops: Operands, i, j):
    """The per-tile inputs every one-head tile function receives (see
    `Plan.context_axes` and `INDEX_AXES`)."""
    q_idx = i * plan.bq + jnp.arange(plan.bq, dtype=jnp.int32)
    kv_idx = j * plan.bk + jnp.arange(plan.bk, dtype=jnp.int32)
    dm_t = _tile_of(ops.dense_mask, i, j, plan.bq, plan.bk)
    return (dm_t, ops.head, ops.batch_index, ops.mask), (ops.rng, ops.origin, q_idx, kv_idx)


def _run_tiles(plan: Plan, ops: Operands, carry, tile_fn, fold, empty_fn):
    """Apply every tile the schedule lists: for each pair (i, j),
    ``carry = fold(i, j, carry, tile_fn(i, j, carry, masked))``.

    ``tile_fn`` returns a small per-tile result (a q tile's softmax state, or a
    tile's gradient contributions) and ``fold`` writes it into the large carry, so
    the carry never passes through a conditional (which would copy it).  With a
    static schedule the pairs come in fixed-length groups of one kind, so there is no
    conditional and no data-dependent trip count at all (on GPU both cost a
    device-to-host round trip per tile).  With a dynamic one every pair is visited
    and a switch on its run-time kind skips EMPTY tiles.
    """
    kinds = ops.kinds if plan.static_kinds is None else np.array(plan.static_kinds, np.int8)
    for pairs, kind in _schedule(kinds):
        def step(carry, pair, kind=kind):
            i, j = pair[0], pair[1]
            if kind is None:
                branches = [  # EMPTY, PARTIAL, FULL (agreeing on how they vary inside shard_map)
                    lambda: H.varying_like(empty_fn(i, j, carry), ops.q),
                    lambda: H.varying_like(tile_fn(i, j, carry, True), ops.q),
                    lambda: H.varying_like(tile_fn(i, j, carry, False), ops.q),
                ]
                result = lax.switch(kinds[i, j].astype(jnp.int32), branches)
            else:
                result = tile_fn(i, j, carry, kind == masks_lib.PARTIAL)
            return fold(i, j, carry, result), None

        carry, _ = lax.scan(step, carry, pairs)
    return carry


# --------------------------------------------------------------------------- forward
def _forward(plan: Plan, ops: Operands):
    """``(out [nq, B, K, G, bq, Hv], lse [nq, B, K, G, bq])``: the online softmax over
    every listed tile; lse is -inf on rows with no allowed key (their out is 0)."""
    Q, KV = H.PER_QUERY_HEAD, H.PER_KV_HEAD
    acc_dtype = jnp.promote_types(ops.v.dtype, jnp.float32)
    # Online-softmax state of every q tile; built from q so it shares q's sharding.
    rows = jnp.zeros_like(ops.q[..., 0], acc_dtype)
    acc = rows[..., None] + jnp.zeros((1,) * rows.ndim + (ops.v.shape[-1],), acc_dtype)
    state = (rows + ops_lib.MASKED_SCORE, rows, acc)

    def tile(i, j, state, masked):
        context, (rng, origin, q_idx, kv_idx) = _tile_context(plan, ops, i, j)
        fn = functools.partial(_head_forward_tile, masked=masked, rate=plan.rate, scale=plan.scale,
                               num_kv=plan.num_kv, precision=plan.precision)
        return H.vmap_heads(
            fn, Q, KV, KV, plan.bias_axes, *plan.context_axes(), (plan.score_mod_axes, None, None),
            *INDEX_AXES, Q, Q, Q, sizes=plan.sizes,
        )(ops.q[i], ops.k[j], ops.v[j], _tile_of(ops.bias, i, j, plan.bq, plan.bk), *context,
          ops.score_mod, rng, origin, q_idx, kv_idx, *(x[i] for x in state))

    def fold(i, j, state, new):
        return tuple(_set_at(x, i, n) for x, n in zip(state, new))

    def unchanged(i, j, state):
        return tuple(x[i] for x in state)

    m, l, acc = _run_tiles(plan, ops, state, tile, fold, unchanged)
    empty = l == 0.0
    out = acc / jnp.where(empty, 1.0, l)[..., None]
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
    return out.astype(ops.v.dtype), lse


# -------------------------------------------------------------------------- backward
def _backward_tile(plan: Plan, ops: Operands, d_out, lse_safe, delta, i, j, masked):
    """This tile's contributions to (dQ_i, dK_j, dV_j, dbias_ij, dscore_mod leaves)."""
    Q, KV = H.PER_QUERY_HEAD, H.PER_KV_HEAD
    context, (rng, origin, q_idx, kv_idx) = _tile_context(plan, ops, i, j)
    common = dict(masked=masked, rate=plan.rate, num_kv=plan.num_kv, precision=plan.precision)
    if plan.plain_scores:
        grad = functools.partial(_head_backward_tile_transposed, scale=plan.scale, **common)
        dq_t, dk_t, dv_t = H.vmap_heads(
            grad, Q, KV, KV, Q, Q, Q, *plan.context_axes(), *INDEX_AXES, sizes=plan.sizes,
        )(ops.q[i], ops.k[j], ops.v[j], d_out[i], lse_safe[i], delta[i], *context, rng, origin, q_idx, kv_idx)
        return dq_t, dk_t.sum(axis=2), dv_t.sum(axis=2), None, []

    sm_leaves, rebuild_score_mod = split_differentiable(ops.score_mod)

    def scores(q_t, k_t, bias_t, sm_leaves):
        fn = functools.partial(_head_scores, scale=plan.scale, precision=plan.precision)
        return H.vmap_heads(
            fn, Q, KV, plan.bias_axes, H.HEAD_ID, H.SHARED, H.SHARED, (plan.score_mod_axes, None, None),
            sizes=plan.sizes,
        )(q_t, k_t, bias_t, ops.head, q_idx, kv_idx, rebuild_score_mod(sm_leaves))

    bias_t = _tile_of(ops.bias, i, j, plan.bq, plan.bk)
    s, scores_vjp = jax.vjp(scores, ops.q[i], ops.k[j], bias_t, sm_leaves)
    grad = functools.partial(_head_backward_tile, **common)
    ds, dv_heads = H.vmap_heads(
        grad, Q, KV, Q, Q, Q, *plan.context_axes(), *INDEX_AXES, sizes=plan.sizes,
    )(s, ops.v[j], d_out[i], lse_safe[i], delta[i], *context, rng, origin, q_idx, kv_idx)
    dq_t, dk_t, dbias_t, dsm_t = scores_vjp(ds)
    return dq_t, dk_t, dv_heads.sum(axis=2), dbias_t, dsm_t


def _backward(plan: Plan, ops: Operands, out, lse, d_out, d_lse):
    """The cotangent of `Operands` from ``d_out`` and ``d_lse``: dQ, dK, dV, dbias and
    the score modifier's float leaves; None (zero) for the integer and key inputs.

    A cotangent on the log-sum-exp enters through ``delta``: ∂lse_i/∂s_ij = p_ij, so
    dS_ij = p_ij (dP_ij - delta_i) with delta_i = dO_i·O_i - dlse_i."""
    acc_dtype = jnp.promote_types(ops.q.dtype, jnp.float32)
    delta = jnp.sum(d_out.astype(acc_dtype) * out.astype(acc_dtype), axis=-1)
    if d_lse is not None:
        delta = delta - jnp.where(jnp.isneginf(lse), 0.0, d_lse.astype(acc_dtype))
    # +inf on empty rows makes their recomputed p = e^(s - lse) exactly 0.
    lse_safe = jnp.where(jnp.isneginf(lse), jnp.inf, lse)
    sm_leaves, rebuild_score_mod = split_differentiable(ops.score_mod)
    grads = (
        jnp.zeros_like(ops.q, acc_dtype), jnp.zeros_like(ops.k, acc_dtype), jnp.zeros_like(ops.v, acc_dtype),
        None if ops.bias is None else jnp.zeros_like(ops.bias, acc_dtype),
        [jnp.zeros_like(x, acc_dtype) for x in sm_leaves],
    )

    def tile(i, j, _, masked):
        return _backward_tile(plan, ops, d_out, lse_safe, delta, i, j, masked)

    def fold(i, j, grads, contributions):
        d_q, d_k, d_v, d_bias, d_sm = grads
        dq_t, dk_t, dv_t, dbias_t, dsm_t = contributions
        d_q = _add_at(d_q, i, dq_t)
        d_k = _add_at(d_k, j, dk_t)
        d_v = _add_at(d_v, j, dv_t)
        if d_bias is not None:
            d_bias = _add_tile(d_bias, dbias_t, i, j, plan.bq, plan.bk)
        d_sm = [a + b.astype(acc_dtype) for a, b in zip(d_sm, dsm_t)]
        return d_q, d_k, d_v, d_bias, d_sm

    def nothing(i, j, grads):
        shapes = jax.eval_shape(lambda: tile(i, j, grads, False))
        return jax.tree_util.tree_map(
            lambda x: jnp.zeros(x.shape, x.dtype, out_sharding=getattr(x, "sharding", None)), shapes
        )

    d_q, d_k, d_v, d_bias, d_sm = _run_tiles(plan, ops, grads, tile, fold, nothing)
    d_score_mod = None
    if ops.score_mod is not None:
        d_score_mod = cotangent_tree(ops.score_mod, [d.astype(x.dtype) for d, x in zip(d_sm, sm_leaves)])
    return ops._replace(
        q=d_q.astype(ops.q.dtype), k=d_k.astype(ops.k.dtype), v=d_v.astype(ops.v.dtype),
        bias=None if ops.bias is None else d_bias.astype(ops.bias.dtype),
        dense_mask=None, mask=None, score_mod=d_score_mod, head=None, batch_index=None, rng=None,
        origin=None, kinds=None,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(plan: Plan, ops: Operands):
    """`_forward` with a backward that recomputes each tile from (out, lse)."""
    return _forward(plan, ops)


def _flash_fwd(plan: Plan, ops: Operands):
    out, lse = _forward(plan, ops)
    return (out, lse), (ops, out, lse)


def _flash_bwd(plan: Plan, residuals, cotangents):
    ops, out, lse = residuals
    # The public entry point stops the lse's gradient (as jax.nn does); jattn.parallel
    # merges blocks by their lse and differentiates through it.
    d_out, d_lse = cotangents
    return (_backward(plan, ops, out, lse, d_out, d_lse),)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- driver
def run(call: AttentionCall, platform: str):
    """``(out [B, T, N, Hv], None, lse [B, T, N] | None)`` via the tiled algorithm."""
    s = call.shape
    B, T, S, K, G = s["B"], s["T"], s["S"], s["K"], s["N"] // s["K"]
    bq, bk = block_sizes_for(call, platform)
    nq, nk = -(-T // bq), -(-S // bk)
    Tp, Sp = nq * bq, nk * bk

    g = H.group_heads(call)
    mask, mask_axes = None, None
    if (m := call.index_mask()) is not None:
        mask, mask_axes = m.batch_in_axes(B, T, S)
    score_mod, score_mod_axes = None, None
    if (sm := call.index_score_mod()) is not None:
        score_mod, score_mod_axes = sm.batch_in_axes(B, T, S)
    mask = H.batch_leaves_sharded_like(mask, mask_axes, g["q"])
    score_mod = H.batch_leaves_sharded_like(score_mod, score_mod_axes, g["q"])

    q = jnp.pad(g["q"], [(0, 0)] * 3 + [(0, Tp - T), (0, 0)])
    k = jnp.pad(g["k"], [(0, 0)] * 2 + [(0, Sp - S), (0, 0)])
    v = jnp.pad(g["v"], [(0, 0)] * 2 + [(0, Sp - S), (0, 0)])
    bias = _pad_last2(g["bias"], Tp, Sp, 0.0)
    dense_mask = _pad_last2(g["dense_mask"], Tp, Sp, False)
    kinds = _block_table(call, mask, mask_axes, dense_mask, nq, nk, bq, bk)
    static = isinstance(kinds, np.ndarray)

    plan = Plan(
        sizes=(B, K, G), num_kv=S, bq=bq, bk=bk, scale=call.scale, rate=call.dropout_rate,
        precision=call.precision, plain_scores=score_mod is None and g["bias"] is None,
        bias_axes=tuple(g["bias_axes"]), dense_mask_axes=tuple(g["dense_mask_axes"]),
        mask_axes=mask_axes, score_mod_axes=score_mod_axes,
        static_kinds=tuple(map(tuple, kinds.tolist())) if static else None,
    )
    ops = Operands(
        # Tile-major layouts so the loops index the leading axis.
        q=q.reshape(B, K, G, nq, bq, -1).transpose(3, 0, 1, 2, 4, 5),
        k=k.reshape(B, K, nk, bk, -1).transpose(2, 0, 1, 3, 4),
        v=v.reshape(B, K, nk, bk, -1).transpose(2, 0, 1, 3, 4),
        bias=bias, dense_mask=dense_mask, mask=mask, score_mod=score_mod,
        head=g["head"], batch_index=g["batch_index"], rng=call.dropout_rng,
        origin=None if call.dropout_origin is None else jnp.stack([jnp.asarray(o, jnp.int32) for o in call.dropout_origin]),
        kinds=None if static else kinds,
    )
    # Under jax.jvp a custom VJP cannot run: JAX differentiates the plain forward.
    out, lse = (_forward if call.forward_mode else _flash)(plan, ops)

    out = out.transpose(1, 2, 3, 0, 4, 5).reshape(B, K, G, Tp, -1)[:, :, :, :T]
    out = H.ungroup_output(out)
    lse_out = None
    if call.return_residual:
        lse = lse.transpose(1, 2, 3, 0, 4).reshape(B, K, G, Tp)[:, :, :, :T]
        lse_out = H.ungroup_rows(lse).transpose(0, 2, 1)
        if not call.differentiable_residual:
            lse_out = lax.stop_gradient(lse_out)
    return out, None, lse_out


def _schedule(kinds):
    """The tiles to visit, as ``[(pairs [P, 2] int32, kind)]``.

    Static kinds (NumPy): the FULL pairs, then the PARTIAL ones, row-major; EMPTY
    tiles are never listed.  Dynamic kinds (traced): every pair once, with kind None
    (decided at run time).
    """
    if isinstance(kinds, np.ndarray):
        groups = []
        for kind in (masks_lib.FULL, masks_lib.PARTIAL):
            pairs = np.argwhere(kinds == kind).astype(np.int32)
            if len(pairs):
                groups.append((pairs, kind))
        return groups
    return [(np.argwhere(np.ones(kinds.shape, bool)).astype(np.int32), None)]


def _set_at(total, i, value):
    """``total[i] = value`` as a dynamic-slice update (in place on a loop carry)."""
    return lax.dynamic_update_index_in_dim(total, value.astype(total.dtype), i, 0)


def _add_at(total, j, value):
    """``total[j] += value`` as a dynamic-slice update, which XLA performs in place on
    a loop-carried buffer."""
    current = lax.dynamic_index_in_dim(total, j, keepdims=False)
    return lax.dynamic_update_index_in_dim(total, current + value.astype(total.dtype), j, 0)


def _add_tile(total, tile, i, j, bq, bk):
    """``total[..., tile (i, j)] += tile`` for an array laid out like `_tile_of` reads
    it (a broadcast T or S axis of size 1 is not tiled)."""
    zero = jnp.zeros((), jnp.int32)  # one index dtype for every axis, also under x64
    start = [zero] * (total.ndim - 2) + [
        i * bq if total.shape[-2] > 1 else zero,
        j * bk if total.shape[-1] > 1 else zero,
    ]
    current = lax.dynamic_slice(total, start, tile.shape)
    return lax.dynamic_update_slice(total, current + tile.astype(total.dtype), start)


BACKEND = Backend(
    name=NAME, supports=SUPPORTS, limits=lambda call, platform: None, run=run,
    description="flash-style online softmax over tiles in pure JAX; O(T) memory",
    lacks="cannot give {features}: it never materialises the weights, so it cannot return them (dense can)",
)
