"""Ring attention: each device keeps its queries; key/value blocks travel around the
mesh axis with `jax.lax.ppermute`, and each device merges its partial results by
log-sum-exp.  Runs inside `jax.shard_map` (the axis is bound).

    step s = 0 .. last:   device p holds the keys/values of device (p - s) mod P
      if s > 0: (k, v, kv segment ids) <- ppermute from device p - 1
      for each piece (query chunk a, key chunk b) not EMPTY on every device:
        (out_ab, lse_ab) = a backend's call on the piece      (blocks.piece_call)
        (out_a, lse_a)   = merge((out_a, lse_a), (out_ab, lse_ab))

Steps that every device's band empties are skipped, and the ring stops after the last
step some device needs (a sliding window needs few): the forward pass sends ``last``
K/V blocks (P - 1 without a window).  A step a band empties on *some* devices only is
skipped there with `jax.lax.switch` on the device's kind.

The custom VJP's backward walks the same ring: it recomputes each piece with
`jax.vjp` (any backend whose log-sum-exp carries gradients), turns the merged
cotangent into the piece's (`blocks.piece_cotangents`), and sends the dK/dV
accumulators around with the K/V blocks; after the last step one more ppermute
brings each block's dK/dV home.  Its memory is a few blocks, not the whole sequence.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jattn.backends.heads import varying_axes, varying_like
from jattn.differentiable import cotangent_tree, split_differentiable
from jattn.parallel import blocks
from jattn.parallel.blocks import EMPTY, Operands, Static


def steps(st: Static) -> list[int]:
    """The ring steps some device computes (a step every device's band empties is not
    listed); the forward pass sends ``max(steps)`` K/V blocks."""
    table = blocks.ring_table(st)
    return [s for s in range(st.size) if (table[:, s] != EMPTY).any()]


def _ppermute(tree, st: Static, shift: int):
    """Send every array of ``tree`` from device i to device i + shift (mod P)."""
    perm = [(i, (i + shift) % st.size) for i in range(st.size)]
    return jax.tree_util.tree_map(lambda x: lax.ppermute(x, st.axis, perm), tree)


def _pieces(st: Static, step_values: list[int], s, device, like):
    """The pieces of one ring step: ``(a, b, run)`` for each (query chunk a, key chunk
    b) that some device computes at some step in ``step_values`` (the static values
    ``s`` may take: one Python int, or the steps a `lax.scan` walks with ``s`` traced).
    ``run(fn)`` calls ``fn(kind, delta, q_chunk, kv_chunk)`` with this device's
    values: Python ints where they are the same for every device and step it covers
    (static offsets serve more backends), else traced; a `lax.switch` picks the kind
    when devices or steps differ."""
    table = blocks.ring_table(st)  # [P devices, P steps, c, c]
    chunks, P = st.device_chunks(), st.size
    source = (np.arange(P)[:, None] - np.arange(P)[None, :]) % P  # [device, step] -> device
    for a in range(st.chunks):
        for b in range(st.chunks):
            kinds = table[:, :, a, b]
            covered = kinds[:, step_values]
            if (covered == EMPTY).all():
                continue
            q_ids = np.broadcast_to(chunks[:, a][:, None], (P, P))
            kv_ids = chunks[source, b]
            deltas = q_ids * st.chunk_q - kv_ids * st.chunk_kv
            present = sorted(set(covered.ravel().tolist()))

            def run(fn, kinds=kinds, covered=covered, q_ids=q_ids, kv_ids=kv_ids, deltas=deltas, present=present):
                def pick(values, on):
                    chosen = values[:, step_values][on]
                    if (chosen == chosen[0]).all():
                        return int(chosen[0])
                    return jnp.asarray(values, jnp.int32)[device, s]

                def branch(kind):
                    on = covered == kind  # the (device, step) pairs that take this branch
                    return lambda: varying_like(fn(kind, pick(deltas, on), pick(q_ids, on), pick(kv_ids, on)), like)

                if len(present) == 1:
                    return branch(present[0])()
                index = jnp.asarray(np.searchsorted(present, kinds), jnp.int32)[device, s]
                return lax.switch(index, [branch(kind) for kind in present])

            yield a, b, run


def _slices(length: int, chunks: int) -> list[slice]:
    size = length // chunks
    return [slice(i * size, (i + 1) * size) for i in range(chunks)]


def _walk(st: Static, carry, step):
    """Run ``step(carry, s, step_values)`` for step 0, then (after a ppermute of the
    travelling part ``carry[0]``) for steps 1 .. last in one `lax.scan`: compiled
    once whatever the ring size."""
    last = max(steps(st))
    carry = step(carry, 0, [0])
    if last == 0:
        return carry

    def body(carry, s):
        travelling, rest = carry
        return step((_ppermute(travelling, st, 1), rest), s, list(range(1, last + 1))), None

    carry, _ = lax.scan(body, carry, jnp.arange(1, last + 1, dtype=jnp.int32))
    return carry


def _forward(st: Static, ops: Operands):
    """``(out [B, Tl, N, Hv] float32, lse [B, Tl, N] float32)`` of this device's queries."""
    device = lax.axis_index(st.axis)
    rows, cols = _slices(ops.q.shape[1], st.chunks), _slices(ops.k.shape[1], st.chunks)
    Hv = ops.v.shape[-1]
    acc = [varying_like(blocks.empty_piece(ops.q[:, r], Hv), ops.q) for r in rows]

    def step(carry, s, step_values):
        (k, v, kv_segments), acc = carry
        acc = list(acc)
        for a, b, run in _pieces(st, step_values, s, device, ops.q):
            def piece(kind, delta, q_chunk, kv_chunk, a=a, b=b):
                if kind == EMPTY:
                    return blocks.empty_piece(ops.q[:, rows[a]], Hv)
                call = blocks.piece_call(
                    st, ops, q_chunk, kv_chunk, kind, delta, ops.q[:, rows[a]], k[:, cols[b]], v[:, cols[b]],
                    None if ops.q_segments is None else ops.q_segments[:, rows[a]],
                    None if kv_segments is None else kv_segments[:, cols[b]], ops.score_mod,
                )
                return blocks.run_piece(call, st.platform)
            acc[a] = blocks.merge(acc[a], run(piece))
        return (k, v, kv_segments), acc

    _, acc = _walk(st, ((ops.k, ops.v, ops.kv_segments), acc), step)
    return jnp.concatenate([o for o, _ in acc], axis=1), jnp.concatenate([l for _, l in acc], axis=1)


def _backward(st: Static, ops: Operands, out, lse, d_out):
    """The cotangent of `Operands`: dQ, dK, dV and the score modifier's float leaves."""
    device = lax.axis_index(st.axis)
    rows, cols = _slices(ops.q.shape[1], st.chunks), _slices(ops.k.shape[1], st.chunks)
    d_out = d_out.astype(jnp.float32)
    shared_leaves, rebuild = split_differentiable(ops.score_mod)
    # Leaves the devices share are made varying before jax.vjp, so their cotangents
    # stay per device (the transpose of an implicit broadcast would be a psum inside
    # a branch some devices skip: a deadlock); they are summed once at the end.
    sm_leaves = [varying_like(x, ops.q) for x in shared_leaves]
    f32_zeros = lambda x: varying_like(jnp.zeros(x.shape, jnp.float32), ops.q)

    def step(carry, s, step_values):
        (k, v, kv_segments, d_k, d_v), (d_q, d_sm) = carry
        for a, b, run in _pieces(st, step_values, s, device, ops.q):
            q_a, k_b, v_b = ops.q[:, rows[a]], k[:, cols[b]], v[:, cols[b]]
            q_seg = None if ops.q_segments is None else ops.q_segments[:, rows[a]]
            kv_seg = None if kv_segments is None else kv_segments[:, cols[b]]

            def piece(kind, delta, q_chunk, kv_chunk, q_a=q_a, k_b=k_b, v_b=v_b, q_seg=q_seg, kv_seg=kv_seg, a=a):
                if kind == EMPTY:
                    return f32_zeros(q_a), f32_zeros(k_b), f32_zeros(v_b), [f32_zeros(x) for x in sm_leaves]

                def attend(q_, k_, v_, leaves):
                    call = blocks.piece_call(st, ops, q_chunk, kv_chunk, kind, delta, q_, k_, v_,
                                             q_seg, kv_seg, rebuild(leaves))
                    return blocks.run_piece(call, st.platform)

                (out_p, lse_p), vjp = jax.vjp(attend, q_a, k_b, v_b, sm_leaves)
                cotangents = blocks.piece_cotangents(out_p, lse_p, out[:, rows[a]], lse[:, rows[a]], d_out[:, rows[a]])
                dq, dk, dv, dsm = vjp(cotangents)
                f32 = lambda x: x.astype(jnp.float32)
                return f32(dq), f32(dk), f32(dv), [f32(x) for x in dsm]

            dq, dk, dv, dsm = run(piece)
            d_q = d_q.at[:, rows[a]].add(dq)
            d_k = d_k.at[:, cols[b]].add(dk)
            d_v = d_v.at[:, cols[b]].add(dv)
            d_sm = [x + y for x, y in zip(d_sm, dsm)]
        return (k, v, kv_segments, d_k, d_v), (d_q, d_sm)

    travelling = (ops.k, ops.v, ops.kv_segments, f32_zeros(ops.k), f32_zeros(ops.v))
    (_, _, _, d_k, d_v), (d_q, d_sm) = _walk(
        st, (travelling, (f32_zeros(ops.q), [f32_zeros(x) for x in sm_leaves])), step)
    last = max(steps(st))
    if last:  # each block's gradient is `last` devices downstream: send it home
        d_k, d_v = _ppermute((d_k, d_v), st, -last)
    d_sm = [_sum_over_devices(g, x) for g, x in zip(d_sm, shared_leaves)]
    return Operands(
        q=d_q.astype(ops.q.dtype), k=d_k.astype(ops.k.dtype), v=d_v.astype(ops.v.dtype),
        q_segments=None, kv_segments=None, q_lengths=None, kv_lengths=None, offset=None, mask=None,
        score_mod=None if ops.score_mod is None else cotangent_tree(
            ops.score_mod, [g.astype(x.dtype) for g, x in zip(d_sm, shared_leaves)]),
        rng=None, origin=None,
    )


def _sum_over_devices(grad, primal):
    """A leaf the devices share (not varying over an axis) gets the sum of their
    gradients; one that varies keeps its own."""
    axes = tuple(sorted(varying_axes(grad) - varying_axes(primal)))
    return lax.psum(grad, axes) if axes else grad


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(st: Static, ops: Operands):
    out, lse = _forward(st, ops)
    return out.astype(ops.v.dtype), lse


def _ring_fwd(st: Static, ops: Operands):
    out, lse = _forward(st, ops)
    return (out.astype(ops.v.dtype), lse), (ops, out, lse)


def _ring_bwd(st: Static, residuals, cotangents):
    ops, out, lse = residuals
    d_out, _ = cotangents  # the entry point stops the lse's gradient (as jax.nn does)
    return (_backward(st, ops, out, lse, d_out),)


_ring.defvjp(_ring_fwd, _ring_bwd)


def run(st: Static, ops: Operands, return_weights: bool = False):
    """``(out [B, Tl, N, Hv], None, lse [B, Tl, N] float32)`` of this device's queries,
    inside `jax.shard_map` over ``st.axis`` (a ring cannot return the weights:
    `jattn.parallel.split.choose_strategy` refuses it)."""
    if st.forward_mode:  # jax.jvp cannot run a custom VJP: differentiate the plain ring
        out, lse = _forward(st, ops)
        return out.astype(ops.v.dtype), None, lse
    out, lse = _ring(st, ops)
    return out, None, lse
