"""Fused flash-attention kernels in Pallas (Triton lowering on NVIDIA GPUs).

The chunked backend runs the online softmax as a loop of XLA ops, so every tile's
scores make a round trip through device memory; on a GPU that costs as much traffic as
materialising the whole ``[T, S]`` matrix.  These kernels keep a tile's scores in
registers: one program owns a block of queries (or, in the backward pass, a block of
keys) and loops over the other side's blocks, exactly the recurrences of
`jattn.backends.chunked`:

    forward   m' = max(m, rowmax(s));  l' = l·2^(m-m') + rowsum(2^(s-m'));
              acc' = acc·2^(m-m') + 2^(s-m')·V;        out = acc / l
    backward  p = 2^(s - lse₂);  dV += pᵀ·dO;  dS = p∘(dO·Vᵀ - δ);
              dQ += dS·K·scale;  dK += dSᵀ·Q·scale,   δ = rowsum(dO∘out)

Scores are kept in base 2 (``s₂ = s·log₂e``) so the exponentials are ``exp2``.

Masks are what can be decided from indices inside a kernel: a band
``-left <= kv - (q + offset) <= right`` (causal is ``right = 0``; None is unbounded),
segment ids and a per-key validity vector (key lengths).  Each program visits only the
blocks the band reaches and evaluates the band mask only on blocks it cuts.

Everything here works on arrays already padded to whole blocks and to a power-of-two
head dim (`jattn.backends.pallas` does that); ``spec.seq_kv`` is the unpadded key
length, so padded keys are masked.  ``interpret=True`` runs the same kernels through
Pallas's interpreter, which is how they are tested on a CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # Pallas's Triton primitives; a jaxlib built without Triton lacks them.
    from jax.experimental.pallas import triton as pl_triton
except ImportError:  # pragma: no cover - depends on the jaxlib build
    pl_triton = None

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes (powers of two, >= 16) of the three kernels and Triton's launch
    parameters: ``block_q × block_kv`` for the forward, ``*_dq`` for the dQ kernel,
    ``*_dkv`` for the dK/dV kernel."""

    block_q: int = 128
    block_kv: int = 64
    block_q_dq: int = 64
    block_kv_dq: int = 64
    block_q_dkv: int = 64
    block_kv_dkv: int = 64
    num_warps: int = 4
    num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class FlashSpec:
    """Static configuration of one kernel launch (hashable: it keys the jit cache).

    ``left`` / ``right``: the band ``-left <= kv - (q + offset) <= right`` of keys a
    query row may see (None: unbounded on that side).  ``seq_q`` / ``seq_kv``: unpadded
    lengths.
    """

    scale: float
    offset: int
    left: int | None
    right: int | None
    softcap: float | None
    seq_q: int
    seq_kv: int
    tiles: Tiles = Tiles()
    interpret: bool = False


def _compiler_params(spec: FlashSpec):
    if spec.interpret:
        return None
    return pl_triton.CompilerParams(num_warps=spec.tiles.num_warps, num_stages=spec.tiles.num_stages)


def _cdiv_nonneg(x, d: int):
    """ceil(max(x, 0) / d) for a traced int and a static positive d."""
    x = jnp.maximum(x, 0)
    return lax.div(x + (d - 1), jnp.asarray(d, x.dtype))  # d in x's int type (int64 under x64)


def _floor_nonneg(x, d: int):
    """floor(max(x, 0) / d)."""
    x = jnp.maximum(x, 0)
    return lax.div(x, jnp.asarray(d, x.dtype))


def _clamp(x, lo, hi):
    return jnp.minimum(jnp.maximum(x, lo), hi)


def kv_block_range(spec: FlashSpec, q_block, block_q: int, block_kv: int, num_kv_blocks: int):
    """For query block ``q_block``: ``(lo, full_lo, full_hi, hi)`` such that kv blocks
    in ``[lo, hi)`` are exactly those holding a key that some real (unpadded) row of the
    block may see, and those in ``[full_lo, full_hi)`` hold only such keys, for every
    real row (no band or padding mask needed there; padded rows are discarded)."""
    first_q = q_block * block_q
    first_row = first_q + spec.offset  # positions among the keys
    last_row = jnp.minimum(first_q + block_q - 1, spec.seq_q - 1) + spec.offset
    real_blocks = -(-spec.seq_kv // block_kv)  # blocks with at least one real key
    full_blocks = spec.seq_kv // block_kv  # blocks with no padded key
    lo = 0 if spec.left is None else _floor_nonneg(first_row - spec.left, block_kv)
    hi = num_kv_blocks if spec.right is None else _cdiv_nonneg(last_row + spec.right + 1, block_kv)
    hi = jnp.minimum(jnp.int32(hi), min(num_kv_blocks, real_blocks))
    empty = first_q >= spec.seq_q
    if spec.left is not None:
        empty |= first_row - spec.left >= spec.seq_kv
    hi = jnp.where(empty, 0, hi)
    lo = jnp.minimum(jnp.int32(lo), hi)
    full_lo = lo if spec.left is None else _cdiv_nonneg(last_row - spec.left, block_kv)
    full_hi = full_blocks if spec.right is None else _floor_nonneg(first_row + spec.right + 1, block_kv)
    full_lo = _clamp(full_lo, lo, hi)
    full_hi = _clamp(jnp.minimum(full_hi, full_blocks), full_lo, hi)
    return lo, full_lo, full_hi, hi


def q_block_range(spec: FlashSpec, kv_block, block_q: int, block_kv: int, num_q_blocks: int):
    """For kv block ``kv_block``: ``(lo, full_lo, full_hi, hi)`` over query blocks, as
    `kv_block_range` with the roles swapped (padded query rows add nothing to dK, dV:
    their dO is 0)."""
    first_col = kv_block * block_kv
    last_col = jnp.minimum(first_col + block_kv - 1, spec.seq_kv - 1)
    # Row r meets the block iff first_col - right <= r + offset <= last_col + left.
    lo = 0 if spec.right is None else _floor_nonneg(first_col - spec.right - spec.offset, block_q)
    hi = num_q_blocks if spec.left is None else _cdiv_nonneg(last_col + spec.left - spec.offset + 1, block_q)
    hi = jnp.minimum(jnp.int32(hi), min(num_q_blocks, -(-spec.seq_q // block_q)))
    empty = first_col >= spec.seq_kv
    if spec.right is not None:
        empty |= first_col - spec.right - spec.offset >= spec.seq_q
    hi = jnp.where(empty, 0, hi)
    lo = jnp.minimum(jnp.int32(lo), hi)
    # Every (r, c) of the tile is inside iff last_col - right <= r + offset <= first_col + left.
    full_lo = lo if spec.right is None else _cdiv_nonneg(last_col - spec.right - spec.offset, block_q)
    full_hi = hi if spec.left is None else _floor_nonneg(first_col + spec.left - spec.offset + 1, block_q)
    full_lo = _clamp(full_lo, lo, hi)
    full_hi = _clamp(full_hi, full_lo, hi)
    # A kv block holding padded keys is never "full".
    padded = first_col + block_kv > spec.seq_kv
    full_hi = jnp.where(padded, full_lo, full_hi)
    return lo, full_lo, full_hi, hi


def _load(ref, index=...):
    """``ref[index]`` for an optional input (None stays None)."""
    return None if ref is None else ref[index]


def _visit_blocks(bounds, step, carry):
    """Fold ``step(block, carry, band)`` over the blocks ``(lo, full_lo, full_hi, hi)``
    of `kv_block_range` / `q_block_range`: the band mask only where it can cut."""
    lo, full_lo, full_hi, hi = bounds
    carry = lax.fori_loop(lo, full_lo, functools.partial(step, band=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(step, band=False), carry)
    return lax.fori_loop(full_hi, hi, functools.partial(step, band=True), carry)


def _tile_mask(spec: FlashSpec, rows, cols, q_seg, kv_seg, kv_valid, band: bool):
    """Boolean ``[bq, bk]`` of allowed (row, col) pairs, or None when all are allowed.
    ``rows`` / ``cols``: global indices ``[bq]`` / ``[bk]``.  ``band``: the tile may be
    cut by the band or hold padded keys (blocks outside [full_lo, full_hi))."""
    mask = None

    def both(a, b):
        return b if a is None else a & b

    if band:
        d = cols[None, :] - rows[:, None] - spec.offset
        if spec.right is not None:
            mask = both(mask, d <= spec.right)
        if spec.left is not None:
            mask = both(mask, d >= -spec.left)
    if band and kv_valid is None:
        mask = both(mask, jnp.broadcast_to(cols[None, :] < spec.seq_kv, (rows.shape[0], cols.shape[0])))
    if kv_valid is not None:
        mask = both(mask, jnp.broadcast_to(kv_valid[None, :] != 0, (rows.shape[0], cols.shape[0])))
    if q_seg is not None:
        mask = both(mask, q_seg[:, None] == kv_seg[None, :])
    return mask


def _scores(spec: FlashSpec, q, k):
    """Base-2 scores ``[bq, bk]`` (float32) and, with soft-capping, tanh(s/c) for the
    backward pass."""
    s = pl_triton.dot(q, k, trans_b=True) * spec.scale
    if spec.softcap is None:
        return s * LOG2_E, None
    t = jnp.tanh(s / spec.softcap)
    return t * (spec.softcap * LOG2_E), t


def _masked_scores(spec: FlashSpec, q, k, rows, cols, q_seg, kv_seg, kv_valid, band: bool):
    """`_scores` with disallowed entries at -inf."""
    s, t = _scores(spec, q, k)
    mask = _tile_mask(spec, rows, cols, q_seg, kv_seg, kv_valid, band)
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    return s, t


# ---------------------------------------------------------------- forward


def _forward_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, kv_valid_ref, o_ref, lse_ref, *, spec: FlashSpec):
    bq, bk = spec.tiles.block_q, spec.tiles.block_kv
    i = pl.program_id(0)
    num_kv_blocks = k_ref.shape[0] // bk
    rows = i * bq + jnp.arange(bq)
    q = q_ref[...]
    q_seg = _load(q_seg_ref)
    hp = v_ref.shape[-1]

    def step(j, carry, band):
        acc, m, l = carry
        start = pl.multiple_of(j * bk, bk)
        kv_slice = pl.ds(start, bk)
        s, _ = _masked_scores(spec, q, k_ref[kv_slice, :], rows, start + jnp.arange(bk), q_seg,
                              _load(kv_seg_ref, kv_slice), _load(kv_valid_ref, kv_slice), band)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # A row with nothing visible yet keeps m = -inf; shift by 0 there to avoid inf - inf.
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp2(s - shift[:, None])
        correction = jnp.exp2(m - shift)
        l = l * correction + jnp.sum(p, axis=1)
        v = v_ref[kv_slice, :]
        acc = acc * correction[:, None] + pl_triton.dot(p.astype(v.dtype), v)
        return acc, m_new, l

    carry = (jnp.zeros((bq, hp), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, l = _visit_blocks(kv_block_range(spec, i, bq, bk, num_kv_blocks), step, carry)
    empty = l == 0.0
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


def _forward(q, k, v, q_seg, kv_seg, kv_valid, spec: FlashSpec):
    """Padded inputs ``q [B, Tp, N, Hp]``, ``k, v [B, Sp, K, Hp]`` → ``(out [B, Tp, N,
    Hp], lse₂ [B, N, Tp] float32)``."""
    B, Tp, N, Hp = q.shape
    Sp, K = k.shape[1], k.shape[2]
    G = N // K
    bq = spec.tiles.block_q
    grid = (Tp // bq, B, N)
    in_specs = [
        pl.BlockSpec((None, bq, None, Hp), lambda i, b, n: (b, i, n, 0)),
        pl.BlockSpec((None, Sp, None, Hp), lambda i, b, n: (b, 0, n // G, 0)),
        pl.BlockSpec((None, Sp, None, Hp), lambda i, b, n: (b, 0, n // G, 0)),
        None if q_seg is None else pl.BlockSpec((None, bq), lambda i, b, n: (b, i)),
        None if kv_seg is None else pl.BlockSpec((None, Sp), lambda i, b, n: (b, 0)),
        None if kv_valid is None else pl.BlockSpec((None, Sp), lambda i, b, n: (b, 0)),
    ]
    out_specs = [
        pl.BlockSpec((None, bq, None, Hp), lambda i, b, n: (b, i, n, 0)),
        pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i)),
    ]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)]
    return pl.pallas_call(
        functools.partial(_forward_kernel, spec=spec),
        grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=_compiler_params(spec), interpret=spec.interpret, name="jattn_flash_forward",
    )(q, k, v, q_seg, kv_seg, kv_valid)


# ---------------------------------------------------------------- backward


def _probabilities(spec, q, k, lse, rows, cols, q_seg, kv_seg, kv_valid, band):
    """``p [bq, bk]`` recomputed from the saved lse₂ (+inf on empty rows, so p = 0
    there), and the soft-cap's tanh (or None)."""
    s, t = _masked_scores(spec, q, k, rows, cols, q_seg, kv_seg, kv_valid, band)
    return jnp.exp2(s - lse[:, None]), t


def _score_grad(spec, p, dp, delta, t):
    """dL/d(raw scaled score) ``[bq, bk]`` float32: softmax backward, then the soft-cap's
    derivative ``1 - tanh²``.  The caller multiplies by ``scale`` via its operands."""
    ds = p * (dp - delta[:, None])
    if t is not None:
        ds = ds * (1.0 - t * t)
    return ds


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, kv_valid_ref, dq_ref, *, spec):
    bq, bk = spec.tiles.block_q_dq, spec.tiles.block_kv_dq
    i = pl.program_id(0)
    num_kv_blocks = k_ref.shape[0] // bk
    rows = i * bq + jnp.arange(bq)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_seg = _load(q_seg_ref)

    def step(j, dq, band):
        start = pl.multiple_of(j * bk, bk)
        kv_slice = pl.ds(start, bk)
        k, v = k_ref[kv_slice, :], v_ref[kv_slice, :]
        p, t = _probabilities(spec, q, k, lse, rows, start + jnp.arange(bk), q_seg,
                              _load(kv_seg_ref, kv_slice), _load(kv_valid_ref, kv_slice), band)
        dp = pl_triton.dot(do, v, trans_b=True)
        ds = _score_grad(spec, p, dp, delta, t)
        return dq + pl_triton.dot(ds.astype(k.dtype), k)

    dq = _visit_blocks(kv_block_range(spec, i, bq, bk, num_kv_blocks), step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * spec.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, kv_valid_ref,
                dk_ref, dv_ref, *, spec):
    bq, bk = spec.tiles.block_q_dkv, spec.tiles.block_kv_dkv
    j = pl.program_id(0)
    num_q_blocks = q_ref.shape[0] // bq
    start = j * bk
    cols = start + jnp.arange(bk)
    k, v = k_ref[...], v_ref[...]
    kv_seg, kv_valid = _load(kv_seg_ref), _load(kv_valid_ref)

    def step(i, carry, band):
        dk, dv = carry
        q_start = pl.multiple_of(i * bq, bq)
        q_slice = pl.ds(q_start, bq)
        q, do = q_ref[q_slice, :], do_ref[q_slice, :]
        p, t = _probabilities(
            spec, q, k, lse_ref[q_slice], q_start + jnp.arange(bq), cols,
            _load(q_seg_ref, q_slice), kv_seg, kv_valid, band,
        )
        dv = dv + pl_triton.dot(p.astype(do.dtype), do, trans_a=True)
        dp = pl_triton.dot(do, v, trans_b=True)
        ds = _score_grad(spec, p, dp, delta_ref[q_slice], t)
        dk = dk + pl_triton.dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = _visit_blocks(q_block_range(spec, j, bq, bk, num_q_blocks), step, carry)
    dk_ref[...] = dk * spec.scale
    dv_ref[...] = dv


def _backward(q, k, v, q_seg, kv_seg, kv_valid, out, lse2, d_out, spec: FlashSpec):
    B, Tp, N, Hp = q.shape
    Sp, K = k.shape[1], k.shape[2]
    G = N // K
    delta = jnp.einsum("btnh,btnh->bnt", out.astype(jnp.float32), d_out.astype(jnp.float32))
    # Empty rows: lse₂ = -inf; +inf makes their recomputed p exactly 0.
    lse2 = jnp.where(jnp.isneginf(lse2), jnp.inf, lse2)
    params = _compiler_params(spec)

    bq, bk = spec.tiles.block_q_dq, spec.tiles.block_kv_dq
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, spec=spec),
        grid=(Tp // bq, B, N),
        in_specs=[
            pl.BlockSpec((None, bq, None, Hp), lambda i, b, n: (b, i, n, 0)),
            pl.BlockSpec((None, Sp, None, Hp), lambda i, b, n: (b, 0, n // G, 0)),
            pl.BlockSpec((None, Sp, None, Hp), lambda i, b, n: (b, 0, n // G, 0)),
            pl.BlockSpec((None, bq, None, Hp), lambda i, b, n: (b, i, n, 0)),
            pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i)),
            pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i)),
            None if q_seg is None else pl.BlockSpec((None, bq), lambda i, b, n: (b, i)),
            None if kv_seg is None else pl.BlockSpec((None, Sp), lambda i, b, n: (b, 0)),
            None if kv_valid is None else pl.BlockSpec((None, Sp), lambda i, b, n: (b, 0)),
        ],
        out_specs=pl.BlockSpec((None, bq, None, Hp), lambda i, b, n: (b, i, n, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params, interpret=spec.interpret, name="jattn_flash_dq",
    )(q, k, v, d_out, lse2, delta, q_seg, kv_seg, kv_valid)

    bq, bk = spec.tiles.block_q_dkv, spec.tiles.block_kv_dkv
    # One program per (kv block, query head): a kv head's gradient is the sum over its
    # G query heads, taken afterwards so no two programs write the same block.
    dk_heads, dv_heads = pl.pallas_call(
        functools.partial(_dkv_kernel, spec=spec),
        grid=(Sp // bk, B, N),
        in_specs=[
            pl.BlockSpec((None, Tp, None, Hp), lambda j, b, n: (b, 0, n, 0)),
            pl.BlockSpec((None, bk, None, Hp), lambda j, b, n: (b, j, n // G, 0)),
            pl.BlockSpec((None, bk, None, Hp), lambda j, b, n: (b, j, n // G, 0)),
            pl.BlockSpec((None, Tp, None, Hp), lambda j, b, n: (b, 0, n, 0)),
            pl.BlockSpec((None, None, Tp), lambda j, b, n: (b, n, 0)),
            pl.BlockSpec((None, None, Tp), lambda j, b, n: (b, n, 0)),
            None if q_seg is None else pl.BlockSpec((None, Tp), lambda j, b, n: (b, 0)),
            None if kv_seg is None else pl.BlockSpec((None, bk), lambda j, b, n: (b, j)),
            None if kv_valid is None else pl.BlockSpec((None, bk), lambda j, b, n: (b, j)),
        ],
        out_specs=[
            pl.BlockSpec((None, bk, None, Hp), lambda j, b, n: (b, j, n, 0)),
            pl.BlockSpec((None, bk, None, Hp), lambda j, b, n: (b, j, n, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((B, Sp, N, Hp), jnp.float32)] * 2,
        compiler_params=params, interpret=spec.interpret, name="jattn_flash_dkv",
    )(q, k, v, d_out, lse2, delta, q_seg, kv_seg, kv_valid)
    dk = dk_heads.reshape(B, Sp, K, G, Hp).sum(axis=3).astype(k.dtype)
    dv = dv_heads.reshape(B, Sp, K, G, Hp).sum(axis=3).astype(v.dtype)
    return dq, dk, dv


# ---------------------------------------------------------------- the differentiable op


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def flash_attention(q, k, v, q_seg, kv_seg, kv_valid, spec: FlashSpec):
    """Fused attention on padded inputs.

    Args:
      q: ``[B, Tp, N, Hp]``; k, v: ``[B, Sp, K, Hp]`` with ``N % K == 0``, ``Tp`` a
        multiple of every query block size, ``Sp`` of every kv block size, ``Hp`` a
        power of two >= 16.
      q_seg, kv_seg: int32 ``[B, Tp]`` / ``[B, Sp]`` segment ids, or both None.
      kv_valid: int32 ``[B, Sp]``, nonzero where a key may be attended, or None.
      spec: a `FlashSpec`.

    Returns:
      ``(out [B, Tp, N, Hp], lse [B, N, Tp])``: lse is natural-log, -inf on rows
      with no visible key (whose output is 0).  Only ``out`` is differentiated.

    Example:
      >>> import jax.numpy as jnp
      >>> q = jnp.ones((1, 32, 2, 16)); kv = jnp.ones((1, 32, 1, 16))
      >>> spec = FlashSpec(scale=0.25, offset=0, left=None, right=0, softcap=None,
      ...                  seq_q=32, seq_kv=32, tiles=Tiles(16, 16, 16, 16, 16, 16),
      ...                  interpret=True)
      >>> out, lse = flash_attention(q, kv, kv, None, None, None, spec)
      >>> out.shape, lse.shape
      ((1, 32, 2, 16), (1, 2, 32))
    """
    out, lse2 = _forward(q, k, v, q_seg, kv_seg, kv_valid, spec)
    return out, lse2 * LN_2


def _flash_fwd(q, k, v, q_seg, kv_seg, kv_valid, spec):
    out, lse2 = _forward(q, k, v, q_seg, kv_seg, kv_valid, spec)
    return (out, lse2 * LN_2), (q, k, v, q_seg, kv_seg, kv_valid, out, lse2)


def _flash_bwd(spec, residuals, cotangents):
    q, k, v, q_seg, kv_seg, kv_valid, out, lse2 = residuals
    d_out, _ = cotangents  # the lse is returned without a gradient, as jax.nn does
    dq, dk, dv = _backward(q, k, v, q_seg, kv_seg, kv_valid, out, lse2, d_out.astype(q.dtype), spec)
    return dq, dk, dv, None, None, None


flash_attention.defvjp(_flash_fwd, _flash_bwd)
