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

Flex attention (`Flex`): any jattn mask object or ``mask_mod`` and any score
modifier (``score_mod``; then the soft-cap is part of it), traced into the kernel body
by `jattn.backends.flex_tiles` and evaluated per tile; an additive bias, loaded tile by
tile; dropout with `jattn.ops`'s per-element hash (the dense backend's pattern).  With
a mask object the programs walk visit lists instead of the band's ranges: the tiles
`Mask.block_kinds` leaves non-empty for their example, the mask evaluated only on
those it does not fill.  The backward pass differentiates each tile's score function
with `jax.vjp`: the dQ kernel also writes the bias gradient tile by tile and, per
program, the gradient of every float array the score modifier uses (summed after).

Everything here works on arrays already padded to whole blocks and to a power-of-two
head dim (`jattn.backends.pallas` does that); ``spec.seq_kv`` is the unpadded key
length, so padded keys are masked.  ``interpret=True`` runs the same kernels through
Pallas's interpreter, which is how they are tested on a CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jattn import ops as ops_lib
from jattn.backends import flex_tiles

try:  # Pallas itself; a JAX without it must still import jattn (the backend refuses).
    from jax.experimental import pallas as pl
except ImportError:  # pragma: no cover - depends on the JAX version
    pl = None
try:  # Pallas's Triton primitives; a jaxlib built without Triton lacks them.
    from jax.experimental.pallas import triton as pl_triton
except ImportError:  # pragma: no cover - depends on the jaxlib build
    pl_triton = None

# What the kernels use from Pallas and its Triton module: a JAX that lacks any of it
# (the Triton lowering is deprecated in favour of Mosaic GPU) is refused by name.
NEEDED = {
    "jax.experimental.pallas": ("pallas_call", "BlockSpec", "program_id", "ds", "multiple_of"),
    "jax.experimental.pallas.triton": ("CompilerParams", "dot"),
}

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)


def missing_pieces() -> str | None:
    """What this JAX lacks of what the kernels need (None: nothing), for a refusal."""
    for module_name, module in (("jax.experimental.pallas", pl), ("jax.experimental.pallas.triton", pl_triton)):
        if module is None:
            return f"this JAX has no {module_name}"
        absent = [name for name in NEEDED[module_name] if not hasattr(module, name)]
        if absent:
            return f"this JAX's {module_name} lacks {', '.join(absent)}"
    return None


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
    lengths.  ``mask_fn`` / ``score_fn``: flex functions (`flex_tiles.KernelFunction`)
    or None; with ``score_fn`` the soft-cap is inside it.  ``rate``: dropout rate.
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
    mask_fn: flex_tiles.KernelFunction | None = None
    score_fn: flex_tiles.KernelFunction | None = None
    rate: float = 0.0


class Flex(NamedTuple):
    """The kernels' flex inputs (None or () where unused).

    ``bias``: ``[1|B, 1|N, Tp, Sp]``.  ``mask_args`` / ``score_args``: the arguments
    of ``spec.mask_fn`` / ``spec.score_fn``, each ``[1|B, ...]``.  ``seeds``: uint32
    ``[B, N]``, each head's `jattn.ops.dropout_seed`.  ``tables``: the visit lists
    (`flex_tiles.visit_lists`) of the forward, dQ and dK/dV kernels, or None (the
    band's block ranges)."""

    bias: Any = None
    mask_args: tuple = ()
    score_args: tuple = ()
    seeds: Any = None
    tables: Any = None


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


def _visit_listed(table_refs, step, carry):
    """Fold ``step(block, carry, band)`` over this program's visit list (see
    `flex_tiles.visit_lists`): only non-empty tiles, the mask only on those it does
    not fill (``band`` False on FULL tiles)."""
    visits_ref, count_ref = table_refs

    def body(t, carry):
        entry = visits_ref[t]
        block, full = entry // 2, entry % 2 == 1
        return lax.cond(full, functools.partial(step, block, band=False),
                        functools.partial(step, block, band=True), carry)

    return lax.fori_loop(0, count_ref[...], body, carry)


def _visit(flex, bounds, step, carry):
    """The program's tiles: its visit list when the call has one, else the band's."""
    if flex.tables is None:
        return _visit_blocks(bounds, step, carry)
    return _visit_listed(flex.tables, step, carry)


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


class _Program(NamedTuple):
    """What a program holds for every tile it visits: its query head, the flex
    functions' arguments for its example (Refs: an element lookup is a load), its
    dropout seed, and whether it walks a visit list."""

    head: Any
    mask_values: list
    score_values: list
    seed: Any
    listed: bool


def _program(flex) -> _Program:
    return _Program(
        head=pl.program_id(2), mask_values=list(flex.mask_args), score_values=list(flex.score_args),
        seed=_load(flex.seeds), listed=flex.tables is not None,
    )


def _allowed(spec: FlashSpec, prog: _Program, rows, cols, q_seg, kv_seg, kv_valid, band: bool):
    """`_tile_mask` and the flex mask: ``[bq, bk]`` bool or None.  A listed FULL tile
    (``band`` False) is allowed everywhere: its kind came from the whole mask."""
    if prog.listed and not band:
        return None
    mask = _tile_mask(spec, rows, cols, q_seg, kv_seg, kv_valid, band)
    if band and spec.mask_fn is not None:
        flex_mask = flex_tiles.evaluate(spec.mask_fn, prog.mask_values, None, 0, rows, cols)
        mask = flex_mask if mask is None else mask & flex_mask
    return mask


def _raw_scores(spec: FlashSpec, q, k, bias):
    """``scale·q·kᵀ (+ bias)`` ``[bq, bk]`` float32: the scores before any modifier."""
    s = pl_triton.dot(q, k, trans_b=True) * spec.scale
    return s if bias is None else s + bias.astype(jnp.float32)


def _modify(spec: FlashSpec, raw, head, rows, cols, score_values):
    """The score modifier on a tile (the flex function, else the soft-cap alone)."""
    if spec.score_fn is not None:
        return flex_tiles.evaluate(spec.score_fn, score_values, raw, head, rows, cols)
    if spec.softcap is not None:
        return spec.softcap * jnp.tanh(raw / spec.softcap)
    return raw


def _keep(spec: FlashSpec, prog: _Program, rows, cols):
    """Which weights of the tile survive dropout (None without dropout)."""
    if spec.rate == 0.0:
        return None
    return ops_lib.dropout_keep_from_seed(prog.seed, spec.rate, rows[:, None], cols[None, :])


def _masked(s, mask):
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


def _dropped(x, keep, rate):
    """``x / (1 - rate)`` where kept, 0 where dropped (x unchanged without dropout)."""
    return x if keep is None else jnp.where(keep, x * (1.0 / (1.0 - rate)), 0.0)


# ---------------------------------------------------------------- forward


def _forward_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, kv_valid_ref, flex, o_ref, lse_ref, *,
                    spec: FlashSpec):
    bq, bk = spec.tiles.block_q, spec.tiles.block_kv
    i = pl.program_id(0)
    num_kv_blocks = k_ref.shape[0] // bk
    rows = i * bq + jnp.arange(bq, dtype=jnp.int32)
    q = q_ref[...]
    q_seg = _load(q_seg_ref)
    hp = v_ref.shape[-1]
    prog = _program(flex)

    def step(j, carry, band):
        acc, m, l = carry
        start = pl.multiple_of(j * bk, bk)
        kv_slice = pl.ds(start, bk)
        cols = start + jnp.arange(bk, dtype=jnp.int32)
        raw = _raw_scores(spec, q, k_ref[kv_slice, :], _load(flex.bias, (slice(None), kv_slice)))
        s = _modify(spec, raw, prog.head, rows, cols, prog.score_values) * LOG2_E
        s = _masked(s, _allowed(spec, prog, rows, cols, q_seg, _load(kv_seg_ref, kv_slice),
                                _load(kv_valid_ref, kv_slice), band))
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # A row with nothing visible yet keeps m = -inf; shift by 0 there to avoid inf - inf.
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp2(s - shift[:, None])
        correction = jnp.exp2(m - shift)
        l = l * correction + jnp.sum(p, axis=1)
        p = _dropped(p, _keep(spec, prog, rows, cols), spec.rate)
        v = v_ref[kv_slice, :]
        acc = acc * correction[:, None] + pl_triton.dot(p.astype(v.dtype), v)
        return acc, m_new, l

    carry = (jnp.zeros((bq, hp), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, l = _visit(flex, kv_block_range(spec, i, bq, bk, num_kv_blocks), step, carry)
    empty = l == 0.0
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


def _pick(size: int, index):
    """The block index along an axis that is either full size or broadcast (size 1)."""
    return index if size > 1 else 0


def _arg_spec(arg):
    """A flex argument ``[1|B, ...]``: each program gets its example's slice."""
    rest = arg.shape[1:]
    return pl.BlockSpec((None, *rest), lambda o, b, n: (_pick(arg.shape[0], b),) + (0,) * len(rest))


def _flex_specs(flex: Flex, table, *, rows_outer: bool, block: int, Tp: int, Sp: int) -> Flex:
    """BlockSpecs of ``flex`` (with ``table``, this kernel's visit lists) for a grid
    ``(outer block o, b, n)``: ``rows_outer`` when o is a query block (forward, dQ),
    else a kv block (dK/dV) of ``block`` rows or columns."""
    bias_spec = None
    if flex.bias is not None:
        Bb, Nb = flex.bias.shape[:2]
        if rows_outer:
            bias_spec = pl.BlockSpec((None, None, block, Sp), lambda o, b, n: (_pick(Bb, b), _pick(Nb, n), o, 0))
        else:
            bias_spec = pl.BlockSpec((None, None, Tp, block), lambda o, b, n: (_pick(Bb, b), _pick(Nb, n), 0, o))
    table_specs = None
    if table is not None:
        width = table[0].shape[-1]
        table_specs = (pl.BlockSpec((None, None, width), lambda o, b, n: (b, o, 0)),
                       pl.BlockSpec((None, None), lambda o, b, n: (b, o)))
    return Flex(
        bias=bias_spec,
        mask_args=tuple(_arg_spec(a) for a in flex.mask_args),
        score_args=tuple(_arg_spec(a) for a in flex.score_args),
        seeds=None if flex.seeds is None else pl.BlockSpec((None, None), lambda o, b, n: (b, n)),
        tables=table_specs,
    )


def _for_kernel(flex: Flex, which: int) -> Flex:
    """``flex`` with only kernel ``which``'s visit lists (0 forward, 1 dQ, 2 dK/dV)."""
    return flex._replace(tables=None if flex.tables is None else flex.tables[which])


def _forward(q, k, v, q_seg, kv_seg, kv_valid, flex: Flex, spec: FlashSpec):
    """Padded inputs ``q [B, Tp, N, Hp]``, ``k, v [B, Sp, K, Hp]`` → ``(out [B, Tp, N,
    Hp], lse₂ [B, N, Tp] float32)``."""
    B, Tp, N, Hp = q.shape
    Sp, K = k.shape[1], k.shape[2]
    G = N // K
    bq = spec.tiles.block_q
    grid = (Tp // bq, B, N)
    flex = _for_kernel(flex, 0)
    in_specs = [
        pl.BlockSpec((None, bq, None, Hp), lambda i, b, n: (b, i, n, 0)),
        pl.BlockSpec((None, Sp, None, Hp), lambda i, b, n: (b, 0, n // G, 0)),
        pl.BlockSpec((None, Sp, None, Hp), lambda i, b, n: (b, 0, n // G, 0)),
        None if q_seg is None else pl.BlockSpec((None, bq), lambda i, b, n: (b, i)),
        None if kv_seg is None else pl.BlockSpec((None, Sp), lambda i, b, n: (b, 0)),
        None if kv_valid is None else pl.BlockSpec((None, Sp), lambda i, b, n: (b, 0)),
        _flex_specs(flex, flex.tables, rows_outer=True, block=bq, Tp=Tp, Sp=Sp),
    ]
    out_specs = [
        pl.BlockSpec((None, bq, None, Hp), lambda i, b, n: (b, i, n, 0)),
        pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i)),
    ]
    out_shape = [_out_shape(q.shape, q.dtype, q), _out_shape((B, N, Tp), jnp.float32, q)]
    return pl.pallas_call(
        functools.partial(_forward_kernel, spec=spec),
        grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=_compiler_params(spec), interpret=spec.interpret, name="jattn_flash_forward",
    )(q, k, v, q_seg, kv_seg, kv_valid, flex)


# ---------------------------------------------------------------- backward


def _tile_backward(spec: FlashSpec, prog: _Program, q, k, v, do, lse, delta, bias, rows, cols, mask,
                   diff_score_values=None):
    """One tile's backward from its inputs: ``(dS_raw [bq, bk], p_used [bq, bk],
    d score-modifier args)``.

    ``dS_raw`` is the gradient with respect to the raw scores ``scale·q·kᵀ + bias``
    (so also the bias gradient): the softmax backward ``p∘(dP - δ)``, pulled back
    through the score modifier by `jax.vjp`; ``p_used`` the weights after dropout
    (for dV).  ``diff_score_values``: the float arguments of the modifier to
    differentiate (None: none wanted)."""
    score_values = list(prog.score_values)
    diff_positions = [] if diff_score_values is None else [
        n for n, d in enumerate(spec.score_fn.diff_args) if d]

    def modified(raw, diff_values):
        values = list(score_values)
        for n, value in zip(diff_positions, diff_values):
            values[n] = value
        return _modify(spec, raw, prog.head, rows, cols, values)

    raw = _raw_scores(spec, q, k, bias)
    s, pullback = jax.vjp(modified, raw, list(diff_score_values or []))
    # Empty rows carry lse₂ = +inf, so their p is exactly 0.
    p = jnp.exp2(_masked(s * LOG2_E, mask) - lse[:, None])
    keep = _keep(spec, prog, rows, cols)
    dp = _dropped(pl_triton.dot(do, v, trans_b=True), keep, spec.rate)
    ds = p * (dp - delta[:, None])
    ds_raw, d_values = pullback(ds)
    return ds_raw, _dropped(p, keep, spec.rate), d_values


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, kv_valid_ref, flex,
               dq_ref, dbias_ref, d_score_refs, *, spec):
    bq, bk = spec.tiles.block_q_dq, spec.tiles.block_kv_dq
    i = pl.program_id(0)
    num_kv_blocks = k_ref.shape[0] // bk
    rows = i * bq + jnp.arange(bq, dtype=jnp.int32)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_seg = _load(q_seg_ref)
    prog = _program(flex)
    # The differentiated arguments enter the tile's vjp as loaded values.
    diff_values = [r[...] for r, d in zip(prog.score_values, spec.score_fn.diff_args) if d] if d_score_refs else None
    if dbias_ref is not None:  # tiles never visited stay 0 (zeroed a tile at a time: Triton's sizes)
        def zero(j, _):
            dbias_ref[:, pl.ds(pl.multiple_of(j * bk, bk), bk)] = jnp.zeros((bq, bk), dbias_ref.dtype)
        lax.fori_loop(0, num_kv_blocks, zero, None)

    def step(j, carry, band):
        dq, d_score = carry
        start = pl.multiple_of(j * bk, bk)
        kv_slice = pl.ds(start, bk)
        cols = start + jnp.arange(bk, dtype=jnp.int32)
        k, v = k_ref[kv_slice, :], v_ref[kv_slice, :]
        mask = _allowed(spec, prog, rows, cols, q_seg, _load(kv_seg_ref, kv_slice), _load(kv_valid_ref, kv_slice), band)
        ds, _, d_values = _tile_backward(spec, prog, q, k, v, do, lse, delta, _load(flex.bias, (slice(None), kv_slice)),
                                         rows, cols, mask, diff_values)
        if dbias_ref is not None:
            dbias_ref[:, kv_slice] = ds
        d_score = [a + b.astype(jnp.float32) for a, b in zip(d_score, d_values)]
        return dq + pl_triton.dot(ds.astype(k.dtype), k), d_score

    carry = (jnp.zeros(q.shape, jnp.float32), [jnp.zeros(r.shape, jnp.float32) for r in d_score_refs])
    dq, d_score = _visit(flex, kv_block_range(spec, i, bq, bk, num_kv_blocks), step, carry)
    dq_ref[...] = (dq * spec.scale).astype(dq_ref.dtype)
    for ref, value in zip(d_score_refs, d_score):
        ref[...] = value


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, kv_valid_ref, flex,
                dk_ref, dv_ref, *, spec):
    bq, bk = spec.tiles.block_q_dkv, spec.tiles.block_kv_dkv
    j = pl.program_id(0)
    num_q_blocks = q_ref.shape[0] // bq
    start = j * bk
    cols = start + jnp.arange(bk, dtype=jnp.int32)
    k, v = k_ref[...], v_ref[...]
    kv_seg, kv_valid = _load(kv_seg_ref), _load(kv_valid_ref)
    prog = _program(flex)

    def step(i, carry, band):
        dk, dv = carry
        q_start = pl.multiple_of(i * bq, bq)
        q_slice = pl.ds(q_start, bq)
        rows = q_start + jnp.arange(bq, dtype=jnp.int32)
        q, do = q_ref[q_slice, :], do_ref[q_slice, :]
        mask = _allowed(spec, prog, rows, cols, _load(q_seg_ref, q_slice), kv_seg, kv_valid, band)
        ds, p, _ = _tile_backward(spec, prog, q, k, v, do, lse_ref[q_slice], delta_ref[q_slice],
                                  _load(flex.bias, (q_slice, slice(None))), rows, cols, mask)
        dv = dv + pl_triton.dot(p.astype(do.dtype), do, trans_a=True)
        dk = dk + pl_triton.dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = _visit(flex, q_block_range(spec, j, bq, bk, num_q_blocks), step, carry)
    dk_ref[...] = dk * spec.scale
    dv_ref[...] = dv


def _out_shape(shape, dtype, like) -> jax.ShapeDtypeStruct:
    """A kernel output's shape, varying over the mesh axes ``like`` varies over inside
    `jax.shard_map` (which, with its default ``check_vma=True``, asks a pallas_call to
    say so; e.g. the blocks of `jattn.parallel`'s ring).  Outside shard_map: plain."""
    manual = getattr(jax.typeof(like), "manual_axis_type", None)
    if manual is not None:
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=manual)
    vma = getattr(jax.typeof(like), "vma", None)
    if vma:  # JAX versions that name it vma
        return jax.ShapeDtypeStruct(shape, dtype, vma=vma)
    return jax.ShapeDtypeStruct(shape, dtype)


def _backward(q, k, v, q_seg, kv_seg, kv_valid, flex: Flex, out, lse2, d_out, spec: FlashSpec, d_lse=None):
    """``(dq, dk, dv, dbias [1|B, 1|N, Tp, Sp] | None, d score args)``.  A cotangent
    ``d_lse [B, N, Tp]`` of the (natural-log) lse enters through delta: ∂lse_i/∂s_ij =
    p_ij, so dS_ij = p_ij (dP_ij - delta_i) with delta_i = dO_i·O_i - dlse_i."""
    B, Tp, N, Hp = q.shape
    Sp, K = k.shape[1], k.shape[2]
    G = N // K
    delta = jnp.einsum("btnh,btnh->bnt", out.astype(jnp.float32), d_out.astype(jnp.float32))
    if d_lse is not None:
        delta = delta - jnp.where(jnp.isneginf(lse2), 0.0, d_lse.astype(jnp.float32))
    # Empty rows: lse₂ = -inf; +inf makes their recomputed p exactly 0.
    lse2 = jnp.where(jnp.isneginf(lse2), jnp.inf, lse2)
    params = _compiler_params(spec)

    bq, bk = spec.tiles.block_q_dq, spec.tiles.block_kv_dq
    nq = Tp // bq
    dq_flex = _for_kernel(flex, 1)
    diff_args = [] if spec.score_fn is None else [
        a for a, d in zip(flex.score_args, spec.score_fn.diff_args) if d]
    # Per (q block, example, head) partial gradients of the modifier's float arguments.
    d_score_shapes = [_out_shape((nq, B, N) + a.shape[1:], jnp.float32, q) for a in diff_args]
    d_score_specs = [pl.BlockSpec((None, None, None) + a.shape[1:],
                                  lambda i, b, n, r=len(a.shape) - 1: (i, b, n) + (0,) * r) for a in diff_args]
    dbias_shape = dbias_spec = None
    if flex.bias is not None:
        dbias_shape = _out_shape((B, N, Tp, Sp), jnp.float32, q)
        dbias_spec = pl.BlockSpec((None, None, bq, Sp), lambda i, b, n: (b, n, i, 0))
    dq, dbias, d_score = pl.pallas_call(
        functools.partial(_dq_kernel, spec=spec),
        grid=(nq, B, N),
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
            _flex_specs(dq_flex, dq_flex.tables, rows_outer=True, block=bq, Tp=Tp, Sp=Sp),
        ],
        out_specs=(pl.BlockSpec((None, bq, None, Hp), lambda i, b, n: (b, i, n, 0)), dbias_spec, d_score_specs),
        out_shape=(_out_shape(q.shape, q.dtype, q), dbias_shape, d_score_shapes),
        compiler_params=params, interpret=spec.interpret, name="jattn_flash_dq",
    )(q, k, v, d_out, lse2, delta, q_seg, kv_seg, kv_valid, dq_flex)

    bq, bk = spec.tiles.block_q_dkv, spec.tiles.block_kv_dkv
    dkv_flex = _for_kernel(flex, 2)
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
            _flex_specs(dkv_flex, dkv_flex.tables, rows_outer=False, block=bk, Tp=Tp, Sp=Sp),
        ],
        out_specs=[
            pl.BlockSpec((None, bk, None, Hp), lambda j, b, n: (b, j, n, 0)),
            pl.BlockSpec((None, bk, None, Hp), lambda j, b, n: (b, j, n, 0)),
        ],
        out_shape=[_out_shape((B, Sp, N, Hp), jnp.float32, q)] * 2,
        compiler_params=params, interpret=spec.interpret, name="jattn_flash_dkv",
    )(q, k, v, d_out, lse2, delta, q_seg, kv_seg, kv_valid, dkv_flex)
    dk = dk_heads.reshape(B, Sp, K, G, Hp).sum(axis=3).astype(k.dtype)
    dv = dv_heads.reshape(B, Sp, K, G, Hp).sum(axis=3).astype(v.dtype)
    if dbias is not None:
        Bb, Nb = flex.bias.shape[:2]
        dbias = dbias.sum(axis=tuple(a for a, size in ((0, Bb), (1, Nb)) if size == 1), keepdims=True)
    # Sum the partial gradients over q blocks and heads (and examples for shared args).
    d_score = [d.sum(axis=(0, 1, 2))[None] if a.shape[0] == 1 else d.sum(axis=(0, 2))
               for d, a in zip(d_score, diff_args)]
    return dq, dk, dv, dbias, d_score


def _flex_cotangent(flex: Flex, spec: FlashSpec, dbias, d_score) -> Flex:
    """The cotangent of ``flex``: the bias and the score modifier's float arguments;
    None (zero) for masks, seeds and tables."""
    score_grads = None
    if spec.score_fn is not None:
        grads = iter(d_score)
        score_grads = tuple(next(grads).astype(a.dtype) if d else None
                            for a, d in zip(flex.score_args, spec.score_fn.diff_args))
    bias = None if dbias is None else dbias.astype(flex.bias.dtype)
    return Flex(bias=bias, mask_args=None, score_args=score_grads, seeds=None, tables=None)


# ---------------------------------------------------------------- the differentiable op


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def flash_attention(q, k, v, q_seg, kv_seg, kv_valid, flex: Flex, spec: FlashSpec):
    """Fused attention on padded inputs.

    Args:
      q: ``[B, Tp, N, Hp]``; k, v: ``[B, Sp, K, Hp]`` with ``N % K == 0``, ``Tp`` a
        multiple of every query block size, ``Sp`` of every kv block size, ``Hp`` a
        power of two >= 16.
      q_seg, kv_seg: int32 ``[B, Tp]`` / ``[B, Sp]`` segment ids, or both None.
      kv_valid: int32 ``[B, Sp]``, nonzero where a key may be attended, or None.
      flex: a `Flex` (``Flex()``: none of bias, flex functions, dropout, visit lists).
      spec: a `FlashSpec`.

    Returns:
      ``(out [B, Tp, N, Hp], lse [B, N, Tp])``: lse is natural-log, -inf on rows
      with no visible key (whose output is 0).  Both are differentiated with respect
      to q, k, v, the bias and the score modifier's float arguments.

    Example:
      >>> import jax.numpy as jnp
      >>> q = jnp.ones((1, 32, 2, 16)); kv = jnp.ones((1, 32, 1, 16))
      >>> spec = FlashSpec(scale=0.25, offset=0, left=None, right=0, softcap=None,
      ...                  seq_q=32, seq_kv=32, tiles=Tiles(16, 16, 16, 16, 16, 16),
      ...                  interpret=True)
      >>> out, lse = flash_attention(q, kv, kv, None, None, None, Flex(), spec)
      >>> out.shape, lse.shape
      ((1, 32, 2, 16), (1, 2, 32))
    """
    out, lse2 = _forward(q, k, v, q_seg, kv_seg, kv_valid, flex, spec)
    return out, lse2 * LN_2


def _flash_fwd(q, k, v, q_seg, kv_seg, kv_valid, flex, spec):
    out, lse2 = _forward(q, k, v, q_seg, kv_seg, kv_valid, flex, spec)
    return (out, lse2 * LN_2), (q, k, v, q_seg, kv_seg, kv_valid, flex, out, lse2)


def _flash_bwd(spec, residuals, cotangents):
    q, k, v, q_seg, kv_seg, kv_valid, flex, out, lse2 = residuals
    # The entry point stops the lse's gradient (as jax.nn does); jattn.parallel merges
    # blocks by their lse and differentiates through it.
    d_out, d_lse = cotangents
    dq, dk, dv, dbias, d_score = _backward(q, k, v, q_seg, kv_seg, kv_valid, flex, out, lse2,
                                           d_out.astype(q.dtype), spec, d_lse)
    return dq, dk, dv, None, None, None, _flex_cotangent(flex, spec, dbias, d_score)


flash_attention.defvjp(_flash_fwd, _flash_bwd)
