"""The pieces of a split sequence: (query chunk, key chunk) blocks as ordinary calls.

A device of a split sequence holds ``c`` query chunks and, at each step of a ring (or
after an all-gather), some key/value chunks: the zig-zag layout's two, or the
contiguous layout's block cut in two where its length is even (``Static.pieces``), so
that a piece's temporaries are half a device's block (else ``c`` = 1).
One *piece* is one query chunk against one key/value chunk.  It is computed by any
backend of the registry as an ordinary `AttentionCall` — the `piece_call` — whose
masks and score modifiers see **global** positions:

- the causal / window band is shifted: ``query_offset + q0 - k0`` (q0, k0: the global
  index of the piece's first query and key);
- lengths are clipped to the piece: ``clip(length - q0, 0, Tc)``;
- segment ids are the piece's slices (key segment ids travel with their keys);
- mask objects / functions and score modifiers are wrapped in ``Shifted``;
- dropout draws at global (example, head, row, key) indices (``dropout_origin``).

`band_kinds` classifies pieces before anything runs, from the causal / window band
when its offset is an int (`jattn.masks.Mask.block_kinds` at chunk granularity):
EMPTY pieces are never computed, FULL ones drop the band (so backends without offset
support serve them), PARTIAL ones keep it.  Pieces are merged by their log-sum-exp:

    lse = logaddexp(lse_a, lse_b),  out = e^(lse_a - lse)·out_a + e^(lse_b - lse)·out_b
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jattn import dispatch
from jattn import masks as masks_lib
from jattn import score_mods as score_mods_lib
from jattn.call import AttentionCall
from jattn.parallel.layout import chunks_per_device, device_chunks, unzigzag

Array = jax.Array
EMPTY, PARTIAL, FULL = masks_lib.EMPTY, masks_lib.PARTIAL, masks_lib.FULL


@dataclasses.dataclass(frozen=True)
class Static:
    """What is static about a split call (hashable: a custom VJP's nondiff argument).

    ``num_q`` / ``num_kv`` are the GLOBAL lengths; ``chunk_q`` / ``chunk_kv`` the
    chunk lengths; ``band`` the global chunk-level kinds of the causal / window band
    (a tuple of tuples), ``other_masks`` whether lengths, segment ids or a mask object
    also mask (then no piece is FULL)."""

    axis: str
    size: int
    layout: str
    num_q: int
    num_kv: int
    chunk_q: int
    chunk_kv: int
    platform: str
    scale: float
    is_causal: bool
    local_window_size: tuple[int, int] | None
    int_offset: int | None  # the query_offset when it is an int
    logits_soft_cap: float | None
    dropout_rate: float
    implementation: str | None
    block_sizes: tuple[int, int] | None
    precision: Any
    forward_mode: bool
    band: tuple
    other_masks: bool
    pieces: int = 1  # each of the layout's chunks cut into this many (the chunks below)

    @property
    def chunks(self) -> int:
        """Chunks per device: the layout's, each cut into ``pieces``."""
        return chunks_per_device(self.layout) * self.pieces

    def device_chunks(self) -> np.ndarray:
        """``[P, chunks]`` the global ids (in units of ``chunk_q`` / ``chunk_kv``) of the
        chunks device p holds, in order."""
        held = device_chunks(self.layout, self.size)[:, :, None] * self.pieces + np.arange(self.pieces)
        return held.reshape(self.size, -1)


class Operands(NamedTuple):
    """Every array of a split call, local to one device (what a custom VJP takes)."""

    q: Array  # [B, Tl, N, H]
    k: Array  # [B, Sl, K, H]
    v: Array  # [B, Sl, K, Hv]
    q_segments: Array | None  # [B, Tl]
    kv_segments: Array | None  # [B, Sl]
    q_lengths: Array | None  # [B] global lengths
    kv_lengths: Array | None  # [B]
    offset: Array | None  # the query_offset when it is an array
    mask: Any  # the user's mask object (global indices) or None
    score_mod: Any  # the user's score modifier (global indices) or None
    rng: Array | None  # the dropout key
    origin: Array  # [2] int32: the global (example, head) index of this shard's first


def static_of(call: AttentionCall, axis: str, size: int, platform: str, num_q: int, num_kv: int) -> Static:
    """The `Static` part of a call whose global lengths are ``num_q`` / ``num_kv``."""
    c = chunks_per_device(call.sequence_layout)
    # A contiguous block is cut in two where it divides: a ring step's work then runs
    # as pieces of half the block, whose temporaries are half the size (the zig-zag
    # layout's chunks already are), and a causal diagonal skips its empty quarter.
    pieces = 2 if c == 1 and num_q % (2 * size) == 0 and num_kv % (2 * size) == 0 else 1
    chunk_q, chunk_kv = num_q // (size * c * pieces), num_kv // (size * c * pieces)
    int_offset = call.query_offset if isinstance(call.query_offset, int) else None
    band = _band_kinds(call, int_offset, num_q, num_kv, chunk_q, chunk_kv)
    other = any(x is not None for x in (call.query_seq_lengths, call.key_value_seq_lengths,
                                        call.segment_ids, call.user_mask))
    return Static(
        axis=axis, size=size, layout=call.sequence_layout, num_q=num_q, num_kv=num_kv,
        chunk_q=chunk_q, chunk_kv=chunk_kv, platform=platform, scale=call.scale,
        is_causal=call.is_causal, local_window_size=call.local_window_size, int_offset=int_offset,
        logits_soft_cap=call.logits_soft_cap, dropout_rate=call.dropout_rate,
        implementation=call.implementation, block_sizes=call.block_sizes, precision=call.precision,
        forward_mode=call.forward_mode, band=tuple(map(tuple, band.tolist())), other_masks=other,
        pieces=pieces,
    )


def operands_of(call: AttentionCall, origin) -> Operands:
    return Operands(
        q=call.query, k=call.key, v=call.value,
        q_segments=None if call.segment_ids is None else call.segment_ids[0],
        kv_segments=None if call.segment_ids is None else call.segment_ids[1],
        q_lengths=call.query_seq_lengths, kv_lengths=call.key_value_seq_lengths,
        offset=None if isinstance(call.query_offset, int) else call.query_offset,
        mask=call.user_mask, score_mod=call.user_score_mod, rng=call.dropout_rng,
        origin=origin,
    )


def _band_kinds(call, int_offset, num_q, num_kv, chunk_q, chunk_kv) -> np.ndarray:
    """Global ``[num_q chunks, num_kv chunks]`` kinds of the causal / window band."""
    shape = (num_q // chunk_q, num_kv // chunk_kv)
    band = None
    if int_offset is not None:
        band = masks_lib.combine(
            masks_lib.Causal(int_offset) if call.is_causal else None,
            None if call.local_window_size is None else masks_lib.SlidingWindow(*call.local_window_size, offset=int_offset),
        )
    elif call.is_causal or call.local_window_size is not None:
        return np.full(shape, PARTIAL, np.int8)  # an array offset: known only at run time
    if band is None:
        return np.full(shape, FULL, np.int8)
    return np.asarray(band.block_kinds(num_q, num_kv, chunk_q, chunk_kv), np.int8)


@functools.cache
def ring_table(st: Static) -> np.ndarray:
    """``[P devices, P steps, c, c]`` kinds: at ring step s device p holds the keys of
    device ``(p - s) mod P``; entry ``[p, s, a, b]`` is the kind of its query chunk a
    against that device's key chunk b."""
    band, chunks, P = np.array(st.band, np.int8), st.device_chunks(), st.size
    table = np.empty((P, P, st.chunks, st.chunks), np.int8)
    for p in range(P):
        for s in range(P):
            r = (p - s) % P
            table[p, s] = band[np.ix_(chunks[p], chunks[r])]
    return table


def piece_call(st: Static, ops: Operands, q_chunk, kv_chunk, kind: int, delta, q, k, v,
               q_segments, kv_segments, score_mod, *, return_weights: bool = False) -> AttentionCall:
    """The `AttentionCall` of one piece: queries ``q [B, Tc, N, H]`` (global chunk id
    ``q_chunk``) against keys ``k``/``v`` ``[B, Sc, K, ·]`` (global chunk id
    ``kv_chunk``), with their segment ids (or None) and the user's score modifier
    (``score_mod``, possibly rebuilt from differentiated leaves).  ``delta`` is
    ``q0 - k0`` (an int when the same on every device, else traced); ``kind`` is
    PARTIAL or FULL (of the band).  Lengths, offsets, the mask object, the dropout key
    and the shard's (example, head) origin come from ``ops``.  The call returns its
    log-sum-exp with gradients (for the merge), or with ``return_weights`` its weights
    instead."""
    q0 = q_chunk * st.chunk_q
    k0 = kv_chunk * st.chunk_kv
    Tc, Sc = q.shape[1], k.shape[1]
    banded = kind == PARTIAL
    if st.int_offset is not None:
        offset = st.int_offset + delta if banded else 0
        if not isinstance(offset, int):
            offset = jnp.asarray(offset, jnp.int32)
    else:
        offset = ops.offset + delta  # an array offset: the band is always PARTIAL
    clip = lambda lengths, origin, size: None if lengths is None else jnp.clip(lengths - origin, 0, size)
    shift = dict(q_origin=q0, kv_origin=k0, num_q=st.num_q, num_kv=st.num_kv)
    return AttentionCall(
        query=q, key=k, value=v, bias=None, dense_mask=None,
        scale=st.scale, is_causal=st.is_causal and banded,
        local_window_size=st.local_window_size if banded else None, query_offset=offset,
        query_seq_lengths=clip(ops.q_lengths, q0, Tc), key_value_seq_lengths=clip(ops.kv_lengths, k0, Sc),
        segment_ids=None if q_segments is None else (q_segments, kv_segments),
        user_mask=None if ops.mask is None else masks_lib.Shifted(ops.mask, **shift),
        user_score_mod=None if score_mod is None else score_mods_lib.Shifted(
            score_mod, **shift, head_origin=ops.origin[1]),
        logits_soft_cap=st.logits_soft_cap, dropout_rate=st.dropout_rate, dropout_rng=ops.rng,
        implementation=st.implementation, block_sizes=st.block_sizes, return_weights=return_weights,
        return_residual=not return_weights, precision=st.precision, sequence_axis=None, sequence_strategy=None,
        sequence_layout="contiguous", forward_mode=st.forward_mode, unbatched=False,
        dropout_origin=(ops.origin[0], ops.origin[1], q0, k0) if st.dropout_rate > 0.0 else None,
        differentiable_residual=not return_weights,
    )


def run_call(call: AttentionCall, platform: str):
    """``(out, weights | None, lse | None)`` of a piece, by the backend
    `jattn.dispatch` chooses for it."""
    choice = dispatch.choose(call, platform)
    return dispatch.BACKENDS[choice.backend].run(call, platform)


def run_piece(call: AttentionCall, platform: str):
    """``(out [B, Tc, N, Hv] float32, lse [B, Tc, N] float32)`` of a piece."""
    out, _, lse = run_call(call, platform)
    return out.astype(jnp.float32), lse.astype(jnp.float32)


def gather_sequence(x, st: Static):
    """The whole sequence of ``x`` (axis 1) on every device, in natural order (the
    zig-zag layout undone); None stays None."""
    if x is None:
        return None
    full = jax.lax.all_gather(x, st.axis, axis=1, tiled=True)
    return unzigzag(full, st.size, axis=1) if st.layout == "zigzag" else full


def empty_piece(q_rows: Array, hv: int):
    """The (out, lse) of a piece with no visible key: zeros and -inf."""
    B, Tc, N = q_rows.shape[:3]
    return jnp.zeros((B, Tc, N, hv), jnp.float32), jnp.full((B, Tc, N), -jnp.inf, jnp.float32)


def merge(a, b):
    """Merge two (out, lse) partial results over disjoint key sets."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    lse = jnp.logaddexp(lse_a, lse_b)
    none = jnp.isneginf(lse)
    w_a = jnp.where(none, 0.0, jnp.exp(lse_a - jnp.where(none, 0.0, lse)))
    w_b = jnp.where(none, 0.0, jnp.exp(lse_b - jnp.where(none, 0.0, lse)))
    return out_a * w_a[..., None] + out_b * w_b[..., None], lse


def piece_cotangents(out_piece, lse_piece, out, lse, d_out):
    """The cotangents of one piece's (out, lse) when the merged result (out, lse) has
    cotangent ``d_out``: with w = e^(lse_piece - lse), d out_piece = w·dO and
    d lse_piece = w·(dO·(out_piece - out)) (the piece's weight in the merge moves
    with its lse)."""
    none = jnp.isneginf(lse_piece) | jnp.isneginf(lse)
    w = jnp.where(none, 0.0, jnp.exp(lse_piece - jnp.where(none, 0.0, lse)))
    d_lse = w * jnp.sum(d_out * (out_piece - out), axis=-1)
    return d_out * w[..., None], d_lse
