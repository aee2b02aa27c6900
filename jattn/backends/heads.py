"""GQA head grouping shared by the backends.

Query heads are laid out as K groups of G = N // K heads; query head ``n = kv * G + g``
uses key/value head ``kv``.  Backends vmap a one-head function over G (keys and
values shared), then over K, then over the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn.call import AttentionCall

Array = jax.Array


def squeeze_broadcast_axes(x: Array | None, sizes: tuple[int, ...]):
    """Prepare an array with leading axes of ``sizes`` (each given as that size or as 1)
    for nested vmaps: size-1 axes are squeezed and reported as None, the others as 0.

    >>> import jax.numpy as jnp
    >>> x, axes = squeeze_broadcast_axes(jnp.zeros((1, 3, 5)), (2, 3))
    >>> x.shape, axes
    ((3, 5), [None, 0])
    """
    if x is None:
        return None, [None] * len(sizes)
    axes = [0 if x.shape[i] == size != 1 else None for i, size in enumerate(sizes)]
    squeeze = tuple(i for i, a in enumerate(axes) if a is None)
    return jnp.squeeze(x, axis=squeeze) if squeeze else x, axes


def sharded_like(x: Array, ref: Array, ref_axes: tuple[int, ...]) -> Array:
    """``x`` laid out like axes ``ref_axes`` of ``ref`` under an explicit-axis mesh.

    vmap requires every input mapped along one axis to be sharded alike, so index
    arrays mapped next to q (head ids, batch indices) must follow q's sharding.
    Without explicit sharding this returns ``x`` unchanged.
    """
    spec = getattr(getattr(jax.typeof(ref), "sharding", None), "spec", None)
    if spec is None or x is None:
        return x
    wanted = tuple(spec[a] if a is not None and a < len(spec) else None for a in ref_axes)
    if all(w is None for w in wanted):
        return x
    wanted += (None,) * (x.ndim - len(wanted))
    return jax.sharding.reshard(x, jax.sharding.PartitionSpec(*wanted))


def pad_axis(x: Array, axis: int, to: int, value=0) -> Array:
    """``x`` padded with ``value`` at the end of ``axis`` to length ``to`` (the kernel
    backends pad sequences and head dims to whole tiles).

    Example:
      >>> pad_axis(jnp.ones((2, 3)), 1, 5).shape
      (2, 5)
    """
    if x.shape[axis] == to:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, to - x.shape[axis])
    return jnp.pad(x, pads, constant_values=value)


def mesh_spec(x):
    """``(spec, mesh)`` of ``x`` under an explicit-axis mesh — ``spec`` a full-rank
    tuple of mesh-axis entries (a name, a tuple of names, or None) — else None.  What
    `jattn.backends.per_device` and `jattn.parallel` read to see how inputs are split."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
    if spec is None or mesh is None or not mesh.shape:
        return None
    return tuple(spec) + (None,) * (x.ndim - len(spec)), mesh


def batch_leaves_sharded_like(tree, in_axes, ref: Array):
    """The leaves of a mask / score-mod pytree that vmap slices along the batch
    (in_axes 0), laid out like the batch axis of ``ref`` (see `sharded_like`)."""
    if tree is None:
        return None
    return jax.tree_util.tree_map(
        lambda leaf, axis: sharded_like(leaf, ref, (0,)) if axis == 0 else leaf,
        tree, in_axes, is_leaf=lambda x: x is None,
    )


def group_heads(call: AttentionCall):
    """Inputs arranged for vmaps over (batch, kv head, group).

    Returns a dict with ``q [B, K, G, T, H]``, ``k [B, K, S, H]``, ``v [B, K, S, Hv]``,
    ``head [K, G]`` (query-head ids), ``batch_index [B]``, and ``bias`` / ``dense_mask`` squeezed to
    their non-broadcast axes of (B, K, G) with the matching in_axes per level.
    """
    s = call.shape
    B, K, G = s["B"], s["K"], s["N"] // s["K"]
    q = call.query.reshape(B, s["T"], K, G, s["H"]).transpose(0, 2, 3, 1, 4)
    grouped = dict(
        q=q,
        k=call.key.transpose(0, 2, 1, 3),
        v=call.value.transpose(0, 2, 1, 3),
        head=sharded_like(jnp.arange(s["N"], dtype=jnp.int32).reshape(K, G), q, (1, 2)),
        batch_index=sharded_like(jnp.arange(B, dtype=jnp.int32), q, (0,)),
    )
    for name in ("bias", "dense_mask"):
        x = getattr(call, name)
        if x is not None:
            Bx, Nx, Tx, Sx = x.shape
            x = x.reshape(Bx, K, G, Tx, Sx) if Nx != 1 else x.reshape(Bx, 1, 1, Tx, Sx)
        x, axes = squeeze_broadcast_axes(x, (B, K, G))
        grouped[name] = sharded_like(x, q, tuple(level for level, a in enumerate(axes) if a == 0))
        grouped[name + "_axes"] = axes
    return grouped


def ungroup_output(out: Array) -> Array:
    """``[B, K, G, T, Hv]`` -> ``[B, T, N, Hv]``."""
    B, K, G, T, Hv = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, Hv)


def ungroup_rows(x: Array) -> Array:
    """``[B, K, G, T, ...]`` -> ``[B, N, T, ...]`` (weights and log-sum-exp)."""
    B, K, G = x.shape[:3]
    return x.reshape(B, K * G, *x.shape[3:])


# in_axes triples (batch, kv head, group) for the common kinds of argument.
PER_QUERY_HEAD = (0, 0, 0)  # q-like: one slice per (example, query head)
PER_KV_HEAD = (0, 0, None)  # k / v: shared by the G query heads of a group
HEAD_ID = (None, 0, 0)  # the [K, G] table of query-head ids
PER_EXAMPLE = (0, None, None)  # the batch index
SHARED = (None, None, None)  # the same for everyone (indices, keys, static config)


def vmap_heads(fn, *axes, sizes: tuple[int, int, int]):
    """vmap a one-head function over groups, kv heads and the batch.

    ``axes`` gives, per positional argument of ``fn``, a (batch, kv head, group)
    triple of in_axes (see the constants above; mask objects use
    ``(their_batch_axes, None, None)``); ``sizes`` is ``(B, K, G)``.  Outputs gain
    leading ``[B, K, G]`` axes, also when no argument varies along one of them.
    """
    batch_axes, kv_axes, group_axes = zip(*axes)
    B, K, G = sizes
    over_groups = _map_level(fn, group_axes, G)
    over_kv = _map_level(over_groups, kv_axes, K)
    return _map_level(over_kv, batch_axes, B)


def _map_level(fn, in_axes: tuple, size: int):
    """``jax.vmap(fn, in_axes, axis_size=size)``; a level of size 1 is a plain call on
    the arguments indexed at 0 instead, outputs given a leading axis of 1.  Same
    values, but XLA's CPU dots run a [1, K, 1, ...] batch through copies to a canonical
    layout, so nested size-1 vmaps cost ~30% of a chunked backward tile (measured:
    4.7 against 3.6 ms for B=1, K=8, G=1)."""
    if size != 1:
        return jax.vmap(fn, in_axes=in_axes, axis_size=size)

    def take_first(axis, arg):
        if axis is None:
            return arg
        return jax.tree_util.tree_map(lambda x: jax.lax.index_in_dim(x, 0, axis, keepdims=False), arg)

    def call(*args):
        args = [
            jax.tree_util.tree_map(take_first, axis, arg, is_leaf=lambda x: x is None)
            for axis, arg in zip(in_axes, args)
        ]
        return jax.tree_util.tree_map(lambda x: jnp.expand_dims(x, 0), fn(*args))

    return call


def head_dropout_key(rng, batch_index, head):
    """The dropout key of one (example, query head); every backend derives it so."""
    return jax.random.fold_in(jax.random.fold_in(rng, batch_index), head)


def head_sizes(call: AttentionCall) -> tuple[int, int, int]:
    """``(B, K, G)`` of a call."""
    s = call.shape
    return s["B"], s["K"], s["N"] // s["K"]


def varying_axes(x) -> set:
    """The mesh axes ``x`` varies over inside `jax.shard_map` (empty outside;
    ``manual_axis_type.varying`` in jax 0.10, ``vma`` in other versions)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    if manual is not None:
        return set(manual.varying)
    return set(getattr(aval, "vma", ()))


def varying_like(tree, like):
    """``tree`` with every array varying over (at least) the mesh axes ``like`` varies
    over.  Inside `jax.shard_map` the branches of a `lax.switch` must agree on this,
    and zeros made in one branch vary over nothing.  A no-op outside shard_map."""
    want = varying_axes(like)

    def cast(x):
        missing = tuple(sorted(want - varying_axes(x)))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree_util.tree_map(cast, tree)
