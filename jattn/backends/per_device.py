"""Per-device backends on inputs sharded over batch and heads: one `jax.shard_map`.

A fused kernel (a Pallas call, cuDNN's custom call) runs on one device's arrays: it
has no partitioning rule under an explicit-axis mesh, so XLA would gather every shard
to every device.  Batch and heads are embarrassingly parallel, so a backend whose
contract says ``per_device=True`` is run here, inside `jax.shard_map` over the
inputs' mesh, on each device's slice of the call:

- the **layout** is read from the query's sharding: its batch axis entry (``'data'``)
  and head axis entry (``'model'``); key and value must be split the same way or
  replicated (then each device takes its slice locally, no communication);
- every operand is sliced alike (`_operand_specs`): q/k/v, bias and mask arrays on
  their non-broadcast batch / head axes, lengths, segment ids, array query offsets,
  and the data leaves of mask and score-mod objects that have a batch axis
  (`jattn.index_fn.IndexFunction.batch_in_axes`); everything else is replicated;
- the output is ``[B, T, N, Hv]`` sharded like the query (the lse ``[B, T, N]`` too);
- dropout draws the unsharded call's pattern: each slice's call carries its global
  origin (``AttentionCall.dropout_origin``: first example and head, from
  `jax.lax.axis_index`), so a backend must declare the ``dropout_origin`` feature to
  serve dropout on inputs split over batch or heads.

Refused, with the reason (`refusal`), because the per-device result would differ
from the unsharded call or need data another device holds:

- a sharded sequence axis (T or S): whole sequences are needed per device; sequence
  parallelism (ring / all-gather) is a strategy of its own, not this path;
- a sharded head dim H;
- key / value split unlike the query on batch or heads;
- heads that do not split consistently with the GQA groups (N and K must both be
  multiples of the head-axis size, so that each device holds whole groups);
- dropout (batch or heads split) with a backend that cannot draw at global indices
  (it does not declare ``dropout_origin``): its pattern would differ;
- a score_mod with heads split: it would receive the shard's local head index (the
  Pallas kernels pass their program id), not the global one;
- an `AttentionCall` field holding arrays that `_operand_specs` does not know.

Example (one CPU device: nothing is sharded, so ``plan`` says so):
  >>> import jax.numpy as jnp
  >>> from jattn.attention import make_call
  >>> q = jnp.zeros((2, 8, 4, 16))
  >>> plan(make_call(q, q, q)) is None
  True
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import PartitionSpec as P

from jattn.backends import heads as H
from jattn.call import AttentionCall

# The fields whose arrays `_operand_specs` knows how to slice; any other field that
# holds an array makes the call refused (fail closed, like `jattn.call.FIELD_FEATURES`).
KNOWN_ARRAY_FIELDS = (
    "query", "key", "value", "bias", "dense_mask", "query_offset", "query_seq_lengths",
    "key_value_seq_lengths", "segment_ids", "user_mask", "user_score_mod", "dropout_rng",
    "dropout_origin",
)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a call is split: the mesh, and the mesh axis entries (a name, a tuple of
    names, or None) of the batch axis and the head axis."""

    mesh: object
    batch: object
    heads: object

    def size(self, entry) -> int:
        names = () if entry is None else entry if isinstance(entry, tuple) else (entry,)
        return math.prod(dict(self.mesh.shape)[n] for n in names)

    def describe(self) -> str:
        parts = [f"batch over {self.batch!r}" if self.size(self.batch) > 1 else None,
                 f"heads over {self.heads!r}" if self.size(self.heads) > 1 else None]
        return ", ".join(filter(None, parts))


def _splits(mesh, entry) -> bool:
    names = () if entry is None else entry if isinstance(entry, tuple) else (entry,)
    return any(dict(mesh.shape).get(n, 1) > 1 for n in names)


def _plan(call: AttentionCall, supports: frozenset) -> tuple[Layout | None, str | None]:
    found = {name: H.mesh_spec(getattr(call, name)) for name in ("query", "key", "value")}
    if not any(f is not None and any(_splits(f[1], e) for e in f[0]) for f in found.values()):
        return None, None  # nothing split: the backend runs as it is
    mesh = next(f[1] for f in found.values() if f is not None)
    replicated = (None,) * 4
    (qb, qt, qn, qh) = found["query"][0] if found["query"] else replicated
    if _splits(mesh, qt):
        return None, (f"the query's sequence axis T is sharded over {qt!r}; a per-device kernel needs "
                      "whole sequences (sequence parallelism is a strategy of its own, not the per-device path)")
    if _splits(mesh, qh):
        return None, f"the query's head dim H is sharded over {qh!r}; reshard it whole"
    for name in ("key", "value"):
        (b, s, n, h) = found[name][0] if found[name] else replicated
        if _splits(mesh, s):
            return None, (f"the {name}'s sequence axis S is sharded over {s!r}; a per-device kernel needs "
                          "whole sequences (sequence parallelism is a strategy of its own, not the per-device path)")
        if _splits(mesh, h):
            return None, f"the {name}'s head dim is sharded over {h!r}; reshard it whole"
        for what, got, want in (("batch", b, qb), ("head", n, qn)):
            if _splits(mesh, got) and got != want:
                return None, (f"the {name}'s {what} axis is sharded over {got!r} but the query's over "
                              f"{want!r}; shard query, key and value alike")
    layout = Layout(mesh, qb if _splits(mesh, qb) else None, qn if _splits(mesh, qn) else None)
    s = call.shape
    nb, nh = layout.size(layout.batch), layout.size(layout.heads)
    if s["B"] % nb:
        return None, f"batch B={s['B']} does not split evenly over {layout.batch!r} ({nb} devices)"
    if s["N"] % nh or s["K"] % nh:
        return None, (f"N={s['N']} query heads and K={s['K']} key/value heads must both be multiples of "
                      f"the {nh} devices of {layout.heads!r}, so that each device holds whole GQA groups")
    features = call.features()
    if "dropout" in features and "dropout_origin" not in supports:
        return None, (f"dropout on inputs sharded over {layout.describe()}: this backend cannot draw "
                      "at the global example / head indices (no dropout_origin), so the pattern would differ")
    if "score_mod" in features and layout.heads is not None:
        return None, (f"a score_mod on inputs sharded over {layout.heads!r}: it would receive the "
                      "shard's local head index, not the global one")
    for field in dataclasses.fields(call):
        if field.name not in KNOWN_ARRAY_FIELDS and _arrays_in(getattr(call, field.name)):
            return None, f"the call field {field.name!r} holds arrays the per-device path cannot slice"
    return layout, None


def _arrays_in(tree) -> bool:
    return any(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(tree))


def plan(call: AttentionCall, supports: frozenset = frozenset()) -> Layout | None:
    """The `Layout` a per-device backend (declaring the features ``supports``) runs
    ``call`` with, or None when no input is split over an explicit-axis mesh (the
    backend then runs as it is).  Raises ValueError with the reason when the split
    cannot be served per device."""
    layout, why = _plan(call, supports)
    if why is not None:
        raise ValueError(why)
    return layout


def refusal(call: AttentionCall, supports: frozenset) -> str | None:
    """Why a per-device backend declaring the features ``supports`` cannot serve
    ``call`` on its sharded inputs, or None."""
    why = _plan(call, supports)[1]
    return None if why is None else f"runs per device in jax.shard_map, but {why}"


def _is_none(x) -> bool:
    return x is None


def _operand_specs(call: AttentionCall, layout: Layout) -> dict[str, list]:
    """For each field of ``call`` holding arrays, its leaves (``None`` counts as a
    leaf) paired with a PartitionSpec (arrays) or None (static values, kept as they are)."""
    s = call.shape
    b, h = layout.batch, layout.heads
    per_field = {}

    def leaves(name, spec_of):
        value = getattr(call, name)
        flat = jax.tree_util.tree_leaves(value, is_leaf=_is_none)
        per_field[name] = [(x, spec_of(x) if isinstance(x, jax.Array) else None) for x in flat]

    for name in ("query", "key", "value"):
        leaves(name, lambda x: P(b, None, h, None))
    for name in ("bias", "dense_mask"):  # [B|1, N|1, T|1, S|1]
        leaves(name, lambda x: P(b if x.shape[0] == s["B"] else None, h if x.shape[1] == s["N"] else None))
    for name in ("query_seq_lengths", "key_value_seq_lengths", "segment_ids"):
        leaves(name, lambda x: P(b))
    leaves("query_offset", lambda x: P(b) if x.ndim else P())
    leaves("dropout_rng", lambda x: P())
    leaves("dropout_origin", lambda x: P())
    for name in ("user_mask", "user_score_mod"):
        obj = getattr(call, name)
        if obj is None:
            per_field[name] = [(None, None)]
            continue
        _, axes = obj.batch_in_axes(s["B"], s["T"], s["S"])
        pairs = []
        jax.tree_util.tree_map(lambda x, axis: pairs.append(
            (x, (P(b) if axis == 0 else P()) if isinstance(x, jax.Array) else None)), obj, axes, is_leaf=_is_none)
        per_field[name] = pairs
    return per_field


def run(backend, call: AttentionCall, platform: str):
    """``backend.run(call, platform)``; for a per-device backend on inputs split over
    batch / heads, inside `jax.shard_map` with every operand sliced alike."""
    layout = plan(call, backend.supports) if getattr(backend, "per_device", False) else None
    if layout is None:
        return backend.run(call, platform)
    per_field = _operand_specs(call, layout)
    arrays, specs = [], []
    for pairs in per_field.values():
        for x, spec in pairs:
            if spec is not None:
                # Replicated operands (or ones split as wanted) are sliced locally.
                current = H.mesh_spec(x)
                if current is None or P(*current[0]) != P(*spec, *(None,) * (x.ndim - len(spec))):
                    x = jax.sharding.reshard(x, spec)
                arrays.append(x)
                specs.append(spec)

    def per_device(*local):
        it = iter(local)
        fields = {}
        for name, pairs in per_field.items():
            value = getattr(call, name)
            rebuilt = [next(it) if spec is not None else x for x, spec in pairs]
            fields[name] = jax.tree_util.tree_unflatten(
                jax.tree_util.tree_structure(value, is_leaf=_is_none), rebuilt)
        local = dataclasses.replace(call, **fields)
        if call.dropout_rate > 0.0:  # dropout at the global example / head indices
            s = local.shape
            b0, n0 = (0 if axis is None else jax.lax.axis_index(axis) * size
                      for axis, size in ((layout.batch, s["B"]), (layout.heads, s["N"])))
            b, n, q0, k0 = local.dropout_origin or (0, 0, 0, 0)
            local = dataclasses.replace(local, dropout_origin=(b + b0, n + n0, q0, k0))
        out, weights, lse = backend.run(local, platform)
        if weights is not None:
            raise ValueError(f"{backend.name} returned weights, which the per-device path does not shard")
        return out, lse

    b, h = layout.batch, layout.heads
    out_specs = (P(b, None, h, None), P(b, None, h) if call.return_residual else None)
    # check_vma=False: a pallas_call's outputs do not declare how they vary over the
    # mesh; without the check shard_map's transpose still sums the cotangents of
    # operands replicated over an axis (a bias shared by the batch) over that axis.
    out, lse = jax.shard_map(per_device, mesh=layout.mesh, in_specs=tuple(specs), out_specs=out_specs,
                             check_vma=False)(*arrays)
    return out, None, lse
