"""Context parallelism: `dot_product_attention` on a sequence split over a mesh axis.

A call's sequence is split when ``sequence_axis`` names a mesh axis, or (with
``sequence_axis=None``) when the query's sequence axis is sharded over an
explicit-axis mesh.  Two modes:

- **local**: inside `jax.shard_map` over that axis (the axis is Manual); the arrays
  are this device's shards and the strategy runs directly.
- **global**: under `jax.jit` with a mesh (`jax.set_mesh`, or inputs sharded over an
  explicit-axis mesh); the arrays are global.  jattn splits q/k/v (and segment ids)
  over the axis — keeping their batch and head sharding — and runs the strategy in
  `jax.shard_map` for the caller.  The result is sharded like the query, with its
  sequence over the axis.

Strategies (`sequence_strategy`): ``"ring"`` (`jattn.parallel.ring`),
``"all_gather"`` (`jattn.parallel.all_gather`) and ``"ulysses"``
(`jattn.parallel.ulysses`, only when asked); None picks ring or all-gather
(`choose_strategy`).
Per device, each block is an ordinary call served by a backend of the registry
(`jattn.parallel.blocks`).

Masks and score modifiers always see global positions; with the zig-zag layout the
tokens are laid out by `jattn.parallel.zigzag` and the masks still see where each
token came from.  A ``bias=`` or ``mask=`` array (``[B, N, T, S]``) cannot follow a
split sequence: express it as a `jattn.score_mods.Bias` or a mask object.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jattn import dispatch
from jattn.backends.heads import mesh_spec
from jattn.call import AttentionCall
from jattn.parallel import all_gather, blocks, ring, ulysses
from jattn.parallel.blocks import PARTIAL, Static
from jattn.parallel.layout import chunks_per_device

STRATEGIES = {"ring": ring, "all_gather": all_gather, "ulysses": ulysses}


@dataclasses.dataclass(frozen=True)
class Split:
    """How a call's sequence is split: over ``axis`` of ``size`` devices, ``mode``
    "local" (inside shard_map) or "global" (jattn wraps shard_map)."""

    axis: str
    size: int
    mode: str


def find_split(call: AttentionCall) -> Split | None:
    """The split of a call's sequence, or None when it is not split.  Raises a
    ValueError naming ``sequence_axis`` when it is not an axis of the current mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    axis = call.sequence_axis
    if axis is None:
        found = mesh_spec(call.query)
        entry = None if found is None else found[0][1]
        if entry is None:
            return None
        names = entry if isinstance(entry, tuple) else (entry,)
        if len(names) != 1:
            raise ValueError(
                f"query: its sequence axis is sharded over several mesh axes {names}; jattn "
                f"splits a sequence over one (give sequence_axis=)"
            )
        axis, mesh = names[0], found[1]
    if mesh.empty or axis not in mesh.axis_names:
        where = "no mesh is set" if mesh.empty else f"the mesh has axes {tuple(mesh.axis_names)}"
        raise ValueError(
            f"sequence_axis: got {axis!r}, but {where}; call inside jax.shard_map over that "
            f"axis, or under jax.jit with jax.set_mesh(mesh)"
        )
    manual = mesh.axis_types[mesh.axis_names.index(axis)] == jax.sharding.AxisType.Manual
    return Split(axis=axis, size=int(dict(mesh.shape)[axis]), mode="local" if manual else "global")


def _check(call: AttentionCall, split: Split) -> tuple[int, int]:
    """Refuse what cannot follow a split sequence; return the global (T, S)."""
    for name, value in (("bias", call.bias), ("mask", call.dense_mask)):
        if value is not None:
            raise ValueError(
                f"{name}: a [B, N, T, S] array cannot follow a sequence split over "
                f"{split.axis!r}; express it as a jattn.score_mods.Bias / a jattn.masks "
                f"object (their indices are global positions), or call without sequence_axis"
            )
    s = call.shape
    c = chunks_per_device(call.sequence_layout)
    per = split.size * c
    if split.mode == "local":
        if s["T"] % c or s["S"] % c:
            raise ValueError(
                f"query: the zigzag layout needs an even local sequence; got T={s['T']}, S={s['S']} "
                f"on each device of {split.axis!r}"
            )
        return s["T"] * split.size, s["S"] * split.size
    for name, length in (("query", s["T"]), ("key", s["S"])):
        if length % per:
            what = f"{split.size} devices" + (" × 2 zigzag chunks" if c == 2 else "")
            raise ValueError(
                f"{name}: sequence length {length} is not a multiple of {per} "
                f"(sequence_axis {split.axis!r} has {what}); pad the sequence"
            )
    return s["T"], s["S"]


def choose_strategy(call: AttentionCall, st: Static) -> tuple[str, str]:
    """``(strategy, why)``; raises if an explicit ``sequence_strategy`` cannot serve."""
    refused = {}
    if call.return_weights:
        refused["ring"] = "it cannot return the weights (no device holds a row's keys); all_gather can"
    s = call.shape
    shards = _head_shards(call)  # Ulysses splits each device's heads again
    if (why := ulysses.refusal(st, s["N"] // shards, s["K"] // shards, call.return_weights)) is not None:
        refused["ulysses"] = why
    if call.sequence_strategy is not None:
        if call.sequence_strategy in refused:
            raise ValueError(
                f"sequence_strategy={call.sequence_strategy!r} cannot serve this call: "
                f"{refused[call.sequence_strategy]}"
            )
        return call.sequence_strategy, "requested by sequence_strategy="
    if "ring" in refused:
        return "all_gather", refused["ring"]
    used = len(ring.steps(st))
    if used < st.size:
        return "ring", f"the mask needs {used} of {st.size} ring steps; all-gather would move every block"
    if s["K"] * st.size <= s["N"]:
        return "all_gather", (
            f"{s['K']} kv heads × {st.size} devices <= {s['N']} query heads: the gathered K/V "
            f"are no larger than the local queries, and one collective replaces {st.size - 1} ring steps"
        )
    return "ring", (
        f"{s['K']} kv heads × {st.size} devices > {s['N']} query heads: gathering K/V would hold "
        f"{st.size}× the local K/V; a ring holds one block and overlaps sends with compute"
    )


def _head_shards(call: AttentionCall) -> int:
    """How many ways the query's heads are already split over other mesh axes (a
    global call on inputs sharded over heads; a local call sees its shard's heads)."""
    found = mesh_spec(call.query)
    entry = None if found is None else found[0][2]
    if entry is None:
        return 1
    sizes = dict(found[1].shape)
    return int(np.prod([sizes[a] for a in (entry if isinstance(entry, tuple) else (entry,))]))


def explain(call: AttentionCall, split: Split, platform: str) -> dispatch.Explanation:
    """Which strategy and which per-block backend serve a split call (``split`` from
    `find_split`), and why."""
    num_q, num_kv = _check(call, split)
    st = blocks.static_of(call, split.axis, split.size, platform, num_q, num_kv)
    strategy, why = choose_strategy(call, st)
    inner = _representative_choice(call, st, platform, strategy)
    steps = f"; {len(ring.steps(st))} of {st.size} ring steps run" if strategy == "ring" else ""
    line = (f"{strategy} over {split.axis!r} ({split.size} devices, {st.layout} layout, "
            f"{split.mode}): {why}{steps}; each block: {inner.backend}")
    return dataclasses.replace(inner, sequence=line)


def _representative_choice(call: AttentionCall, st: Static, platform: str, strategy: str) -> dispatch.Explanation:
    """The backend choice for a block like those the strategy makes (abstract
    arrays of one device's block shapes, so nothing is sliced or allocated)."""
    kind = PARTIAL if (np.array(st.band) == PARTIAL).any() else blocks.FULL
    s = dict(call.shape)
    if strategy == "ulysses":  # the whole sequence, N/P and K/P heads
        st = dataclasses.replace(st, chunk_q=st.num_q, chunk_kv=st.num_kv)
        s.update(N=s["N"] // st.size, K=s["K"] // st.size)
    chosen = []

    def choose():
        zeros = lambda *shape, dtype=call.query.dtype: jnp.zeros(shape, dtype)
        q, k, v = zeros(s["B"], st.chunk_q, s["N"], s["H"]), zeros(s["B"], st.chunk_kv, s["K"], s["H"]), \
            zeros(s["B"], st.chunk_kv, s["K"], s["Hv"])
        seg = call.segment_ids
        ops = blocks.operands_of(call, jnp.zeros((2,), jnp.int32))
        piece = blocks.piece_call(
            st, ops, 0, 0, kind, 0, q, k, v,
            None if seg is None else zeros(s["B"], st.chunk_q, dtype=jnp.int32),
            None if seg is None else zeros(s["B"], st.chunk_kv, dtype=jnp.int32), call.user_score_mod,
            return_weights=call.return_weights)
        chosen.append(dispatch.choose(piece, platform))
        return ()

    jax.eval_shape(choose)
    return chosen[0]


def run(call: AttentionCall, split: Split, platform: str):
    """``(out [B, T, N, Hv], weights | None, lse [B, T, N] | None)`` of a split call
    (``split`` from `find_split`)."""
    num_q, num_kv = _check(call, split)
    st = blocks.static_of(call, split.axis, split.size, platform, num_q, num_kv)
    strategy, _ = choose_strategy(call, st)
    module = STRATEGIES[strategy]
    if split.mode == "local":
        return module.run(st, blocks.operands_of(call, jnp.zeros((2,), jnp.int32)), call.return_weights)
    return _run_global(call, st, module)


def _run_global(call: AttentionCall, st: Static, module):
    """Split global arrays over ``st.axis`` and run ``module`` in `jax.shard_map`."""
    found = mesh_spec(call.query)
    batch, _, heads, _ = found[0] if found else (None,) * 4
    q_spec = P(batch, st.axis, heads, None)
    ops = blocks.operands_of(call, None)
    mask, mask_specs = _leaf_specs(call.user_mask, call, batch)
    score_mod, score_mod_specs = _leaf_specs(call.user_score_mod, call, batch)
    ops = ops._replace(mask=mask, score_mod=score_mod)
    per_example = lambda x, *rest: None if x is None else P(batch, *rest)
    specs = blocks.Operands(
        q=q_spec, k=q_spec, v=q_spec,
        q_segments=per_example(ops.q_segments, st.axis), kv_segments=per_example(ops.kv_segments, st.axis),
        q_lengths=per_example(ops.q_lengths), kv_lengths=per_example(ops.kv_lengths),
        offset=None if ops.offset is None else (P(batch) if jnp.ndim(ops.offset) else P()),
        mask=mask_specs, score_mod=score_mod_specs,
        rng=None if ops.rng is None else P(), origin=None,
    )
    # Every operand laid out as its spec says (the sequence split over the axis;
    # replicated operands sliced locally).
    ops = jax.tree_util.tree_map(lambda x, spec: x if x is None else jax.sharding.reshard(x, spec),
                                 ops, specs, is_leaf=lambda x: x is None)
    out_specs = (q_spec, P(batch, heads, st.axis, None) if call.return_weights else None,
                 P(batch, st.axis, heads))

    def local(ops):
        # The global (example, head) index of this shard's first, for dropout.
        origin = [0 if entry is None else lax.axis_index(entry) * size
                  for entry, size in ((batch, ops.q.shape[0]), (heads, ops.q.shape[2]))]
        ops = ops._replace(origin=jnp.asarray(origin, jnp.int32))
        return module.run(st, ops, call.return_weights)

    out, weights, lse = jax.shard_map(local, in_specs=(specs,), out_specs=out_specs)(ops)
    # Returned laid out like the query came in (a no-op when its sequence was already
    # split over the axis), so that e.g. a scan carry keeps its type.
    qb, qt, qn, _ = found[0] if found else (None,) * 4
    back = lambda x, spec: None if x is None else jax.sharding.reshard(x, spec)
    return back(out, P(qb, qt, qn, None)), back(weights, P(qb, qn, qt, None)), back(lse, P(qb, qt, qn))


def _leaf_specs(obj, call: AttentionCall, batch):
    """A mask / score-mod object (its leaves as `batch_in_axes` leaves them) and the
    specs of its leaves: per-example leaves (a leading batch axis) split like the
    batch, the others replicated."""
    if obj is None:
        return None, None
    s = call.shape
    obj, axes = obj.batch_in_axes(s["B"], s["T"], s["S"])
    specs = jax.tree_util.tree_map(lambda a, x: None if x is None else (P(batch) if a == 0 else P()),
                                   axes, obj, is_leaf=lambda a: a is None)
    return obj, specs
