"""Flex attention for the fused kernels: jattn's index functions made kernel-ready.

A Pallas kernel cannot close over arrays and cannot take a Python object apart, so a
mask or score modifier reaches it as

- a `KernelFunction`: the object traced ONCE, for scalar indices, into a jaxpr whose
  inputs are every array it uses — its pytree leaves (segment ids, a bias table,
  per-example offsets) and whatever its code closes over (hoisted like
  `jax.closure_convert` does, here every captured array, which a kernel needs) —
  then ``score, head, q_idx, kv_idx``; `evaluate` runs it on a ``[bq, bk]`` tile with
  `jax.vmap`, inside the kernel body;
- its arguments: one array per input, with a leading axis of size B (varies per
  example) or 1 (shared), so that a BlockSpec hands each program its example's slice.

The gradients of the float arguments come from `jax.vjp` of `evaluate` in the kernel
(`jattn.backends.flash_kernels`), like the chunked backend differentiates its tiles;
`looks_up_differentiable` says when that gradient is a scatter (no Triton lowering).

Tiles are classified by `jattn.masks.Mask.block_kinds` for every example, and each
program receives a visit list (`visit_lists`): the non-empty tiles of its row (or
column) of the tile grid, each marked FULL or not.  The table is NumPy when the mask
is known at trace time and a traced array otherwise; the kernels read it the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.extend.core import Literal
import jax.numpy as jnp
import numpy as np

from jattn import masks as masks_lib


@dataclasses.dataclass(frozen=True, eq=False)
class KernelFunction:
    """A mask (``fn(q_idx, kv_idx) -> bool``) or score modifier (``fn(score, head,
    q_idx, kv_idx) -> score``) of one example as a closed-over-nothing jaxpr.

    ``jaxpr``: ``num_consts`` constants (the arrays the code captured), inputs
    ``(*leaves, score, head, q_idx, kv_idx)`` (scalars after the leaves), one
    output; its arguments are the leaves, then the constants.  ``bool_args``:
    arguments passed as int32 (a kernel loads no booleans), turned back into
    booleans before the call.  ``diff_args``: the arguments that take a gradient
    (traced float arrays; a concrete one carries none).  Compared by identity: it
    is part of a kernel's static configuration."""

    jaxpr: Any
    num_consts: int
    is_mask: bool
    bool_args: tuple[bool, ...]
    diff_args: tuple[bool, ...]


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


def kernel_function(obj, axes, *, is_mask: bool) -> tuple[KernelFunction, tuple]:
    """``(KernelFunction, args)`` for an index function ``obj`` already sliced by its
    ``batch_in_axes`` (``axes``: 0 on leaves with a leading batch axis, else None).

    Each returned arg is ``[1 | B, *per-example shape]``."""
    none_leaf = lambda x: x is None
    leaves, treedef = jax.tree_util.tree_flatten(obj, is_leaf=none_leaf)
    leaf_axes = jax.tree_util.tree_flatten(axes, is_leaf=none_leaf)[0]
    positions = [n for n, x in enumerate(leaves) if _is_array(x)]
    arrays = [jnp.asarray(leaves[n]) for n in positions]
    batched = [leaf_axes[n] == 0 for n in positions]
    examples = [jax.ShapeDtypeStruct(a.shape[1:] if b else a.shape, a.dtype) for a, b in zip(arrays, batched)]

    def per_example(values, score, head, q_idx, kv_idx):
        full = list(leaves)
        for n, value in zip(positions, values):
            full[n] = value
        fn = jax.tree_util.tree_unflatten(treedef, full)
        return fn(q_idx, kv_idx) if is_mask else fn(score, head, q_idx, kv_idx)

    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)
    closed = jax.make_jaxpr(per_example)(examples, scalar(jnp.float32), scalar(jnp.int32),
                                         scalar(jnp.int32), scalar(jnp.int32))
    # Everything the function captured becomes a shared argument, after the leaves.
    traced = [isinstance(c, jax.core.Tracer) for c in closed.consts]
    consts = [jnp.asarray(c) for c in closed.consts]
    args = [a if b else a[None] for a, b in zip(arrays, batched)] + [c[None] for c in consts]
    bool_args = tuple(a.dtype == jnp.bool_ for a in args)
    args = tuple(a.astype(jnp.int32) if is_bool else a for a, is_bool in zip(args, bool_args))
    # Gradients for traced float arrays only, leaves or captured (a concrete array,
    # e.g. ALiBi's slopes, carries no gradient).
    may_vary = [isinstance(leaves[n], jax.core.Tracer) for n in positions] + traced
    diff_args = tuple(bool(v and jnp.issubdtype(a.dtype, jnp.inexact)) for a, v in zip(args, may_vary))
    return KernelFunction(closed.jaxpr, len(consts), is_mask, bool_args, diff_args), args


def evaluate(fn: KernelFunction, args, score, head, rows, cols):
    """``fn`` on a tile: ``rows [bq]`` and ``cols [bk]`` global indices, ``score
    [bq, bk]`` float32 (ignored by a mask), ``head`` a scalar.  ``args``: per
    argument, a kernel Ref of this example's block (element lookups become loads) or a
    loaded value (what `jax.vjp` differentiates).  Returns ``[bq, bk]``."""
    # Both indices as [bq, bk] grids, mapped by both vmaps: every index a lookup derives
    # from them then has the tile's shape (a load's indexers must agree in shape).
    shape = (rows.shape[0], cols.shape[0])
    rows = jnp.broadcast_to(rows.astype(jnp.int32)[:, None], shape)
    cols = jnp.broadcast_to(cols.astype(jnp.int32)[None, :], shape)

    def one(s, q_idx, kv_idx):
        return _eval_looking_up(fn, args, (s, head, q_idx, kv_idx))

    if fn.is_mask:
        mask_one = lambda q_idx, kv_idx: one(jnp.float32(0), q_idx, kv_idx)
        return jax.vmap(jax.vmap(mask_one))(rows, cols)
    return jax.vmap(jax.vmap(one))(score, rows, cols)


def _is_ref(x) -> bool:
    """A kernel's Ref (what a Pallas kernel receives for an input), not a value."""
    return isinstance(jax.typeof(x), jax.ref.AbstractRef)


def _eval_looking_up(fn: KernelFunction, args, scalars):
    """Evaluate ``fn.jaxpr`` on scalar indices.  An element lookup in an argument
    held as a Ref (``dynamic_slice`` of size 1, what ``x[i, j]`` with traced ints
    becomes) is a load of that element — a gather the Triton lowering has, where
    loading the whole argument into registers (any size, not only powers of two)
    and slicing it has none; a Ref used any other way is loaded whole."""
    jaxpr = fn.jaxpr
    split = len(args) - fn.num_consts
    sources = dict(zip(list(jaxpr.invars[:split]) + list(jaxpr.constvars), list(args[:split]) + list(args[split:])))
    is_bool = dict(zip(list(jaxpr.invars[:split]) + list(jaxpr.constvars),
                       list(fn.bool_args[:split]) + list(fn.bool_args[split:])))
    env = dict(zip(jaxpr.invars[split:], scalars))

    def value(x, var):
        return x.astype(jnp.bool_) if is_bool[var] else x

    def read(atom):
        if isinstance(atom, Literal):
            return atom.val
        if atom not in env:
            source = sources[atom]
            env[atom] = value(source[...] if _is_ref(source) else source, atom)
        return env[atom]

    for eqn in jaxpr.eqns:
        operand = eqn.invars[0] if eqn.invars else None
        if (eqn.primitive is jax.lax.dynamic_slice_p and not isinstance(operand, Literal)
                and operand in sources and _is_ref(sources[operand])
                and all(size == 1 for size in eqn.params["slice_sizes"])):
            ref = sources[operand]
            # dynamic_slice clamps its start indices into the array; so does this.
            index = tuple(jnp.clip(read(a), 0, dim - 1) for a, dim in zip(eqn.invars[1:], ref.shape))
            outs = [value(ref[index], operand).reshape((1,) * len(index))]
        else:
            outs = eqn.primitive.bind(*map(read, eqn.invars), **eqn.primitive.get_bind_params(eqn.params))
            outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs))
    return read(jaxpr.outvars[0])


def looks_up_differentiable(fn: KernelFunction) -> bool:
    """Whether ``fn`` reads elements of an argument that takes a gradient (a learned
    table indexed by position or head): that gradient is a scatter-add, which the
    kernels compute on the interpreter but which has no Triton lowering."""
    split = len(fn.diff_args) - fn.num_consts
    args = list(fn.jaxpr.invars[:split]) + list(fn.jaxpr.constvars)
    diff_vars = {v for v, d in zip(args, fn.diff_args) if d}
    indexing = (jax.lax.dynamic_slice_p, jax.lax.gather_p)
    return any(eqn.primitive in indexing and eqn.invars[0] in diff_vars for eqn in fn.jaxpr.eqns)


def tile_table(mask, mask_axes, batch: int, num_q: int, num_kv: int, block_q: int, block_kv: int,
               grid: tuple[int, int]):
    """EMPTY / PARTIAL / FULL per example and tile: ``[B, grid[0], grid[1]]`` int8
    (NumPy when the mask is known at trace time).  Tiles past the sequences are
    EMPTY; a tile holding padded keys is at most PARTIAL (the kernel masks them)."""
    if mask is None:
        kinds = np.full((1, -(-num_q // block_q), -(-num_kv // block_kv)), masks_lib.FULL, np.int8)
    else:  # NumPy when the mask is static and shared by the batch
        kinds = masks_lib.per_example_block_kinds(mask, mask_axes, num_q, num_kv, block_q, block_kv)
    xp = np if isinstance(kinds, np.ndarray) else jnp
    kinds = xp.broadcast_to(kinds, (batch,) + kinds.shape[1:])
    if num_kv % block_kv:
        last = kinds.shape[2] - 1
        kinds = xp.concatenate([kinds[:, :, :last], xp.minimum(kinds[:, :, last:], masks_lib.PARTIAL)], axis=2)
    pad = [(0, 0), (0, grid[0] - kinds.shape[1]), (0, grid[1] - kinds.shape[2])]
    return xp.pad(kinds, pad, constant_values=masks_lib.EMPTY).astype(xp.int8)


def visit_lists(kinds):
    """Per example and outer tile (a row of ``kinds [B, n_outer, n_inner]``): the
    inner tiles to visit, ``visits [B, n_outer, n_pow2]`` int32, each ``2·tile +
    (1 if FULL)``, non-empty tiles first in order; and how many, ``counts [B,
    n_outer]`` int32.  The last axis is padded to a power of two (a Triton load's
    size)."""
    xp = np if isinstance(kinds, np.ndarray) else jnp
    n_inner = kinds.shape[-1]
    empty = kinds == masks_lib.EMPTY
    order = xp.argsort(empty, axis=-1, stable=True)
    entries = 2 * order + (xp.take_along_axis(kinds, order, axis=-1) == masks_lib.FULL)
    width = 1 << max(n_inner - 1, 0).bit_length()
    entries = xp.pad(entries, [(0, 0), (0, 0), (0, width - n_inner)])
    return entries.astype(xp.int32), (~empty).sum(axis=-1).astype(xp.int32)
