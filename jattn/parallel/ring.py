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
skipped there with `jax.lax.switch` on the device's kind.  The pieces of a step run
one after another in a `lax.fori_loop` (`_each_piece`).

The custom VJP's backward walks the same ring in one loop (`_walk_in_one_loop`): it
recomputes each piece with `jax.vjp` (any backend whose log-sum-exp carries
gradients), turns the merged cotangent into the piece's (`blocks.piece_cotangents`),
and sends the dK/dV accumulators around with the K/V blocks, which come home after
P sends (a ring cut short by a window sends them home with one more ppermute).  Its
memory is a few blocks, not the whole sequence: docs/scaling.md has the measured
figures and why the loops are shaped as they are (XLA's CPU scheduler places any work
that needs only the inputs at the start of the program).
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


def _each_piece(st: Static, step_values: list[int], s, device, like, carry, compute, fold):
    """Apply every piece of one ring step: for each (query chunk a, key chunk b) that
    some device computes at some step in ``step_values`` (the static values ``s`` may
    take: one Python int, or the steps a `lax.scan` walks with ``s`` traced),
    ``carry = fold(carry, a, b, compute(kind, delta, q_chunk, kv_chunk, a, b))``.

    ``compute`` gets this device's values: Python ints where they are the same for
    every device, step and piece its kind covers (static offsets serve more backends),
    else traced; a `lax.switch` picks the kind when they differ.  Several pieces run
    one after another in a `lax.fori_loop` (``a``, ``b`` traced): a piece's slices,
    tile copies and zero accumulators exist only inside the loop body, so XLA holds
    one piece's at a time instead of laying out every piece of the step at once."""
    table = blocks.ring_table(st)  # [P devices, P steps, c, c]
    chunks, P = st.device_chunks(), st.size
    source = (np.arange(P)[:, None] - np.arange(P)[None, :]) % P  # [device, step] -> device
    pairs = [(a, b) for a in range(st.chunks) for b in range(st.chunks)
             if not (table[:, step_values, a, b] == EMPTY).all()]
    if not pairs:
        return carry
    # [device, step, piece] tables
    kinds = np.stack([table[:, :, a, b] for a, b in pairs], axis=-1)
    q_ids = np.stack([np.broadcast_to(chunks[:, a][:, None], (P, P)) for a, _ in pairs], axis=-1)
    kv_ids = np.stack([chunks[source, b] for _, b in pairs], axis=-1)
    deltas = q_ids * st.chunk_q - kv_ids * st.chunk_kv
    covered = kinds[:, step_values]
    present = sorted(set(covered.ravel().tolist()))
    ab = np.array(pairs, np.int32)

    def one(i, carry):
        def pick(values, on):
            chosen = values[:, step_values][on]
            if (chosen == chosen[0]).all():
                return int(chosen[0])
            return jnp.asarray(values, jnp.int32)[device, s, i]

        def branch(kind):
            on = covered == kind  # the (device, step, piece) triples that take this branch
            return lambda: varying_like(
                compute(kind, pick(deltas, on), pick(q_ids, on), pick(kv_ids, on), a, b), like)

        if isinstance(i, int):
            a, b = int(ab[i, 0]), int(ab[i, 1])
        else:
            a, b = jnp.asarray(ab)[i, 0], jnp.asarray(ab)[i, 1]
        if len(present) == 1:
            result = branch(present[0])()
        else:
            index = jnp.asarray(np.searchsorted(present, kinds), jnp.int32)[device, s, i]
            result = lax.switch(index, [branch(kind) for kind in present])
        return fold(carry, a, b, result)

    if len(pairs) == 1:
        return one(0, carry)
    return lax.fori_loop(0, len(pairs), one, carry)


def _chunk(x, index, size: int):
    """``x[:, index·size : (index+1)·size]`` (``index`` a Python int or traced)."""
    if x is None:
        return None
    if isinstance(index, int):
        return x[:, index * size:(index + 1) * size]
    return lax.dynamic_slice_in_dim(x, index * size, size, axis=1)


def _add_chunk(total, index, size: int, value):
    """``total[:, index·size : (index+1)·size] += value``, in place on a loop carry."""
    start = index * size
    current = lax.dynamic_slice_in_dim(total, start, size, axis=1)
    return lax.dynamic_update_slice_in_dim(total, current + value.astype(total.dtype), start, axis=1)


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


def _walk_in_one_loop(st: Static, carry, step):
    """Run ``step(carry, s, step_values)`` for every step 0 .. last inside one
    `lax.scan`, each followed by a ppermute of the travelling part ``carry[0]`` (which
    has then moved ``last + 1`` times).  Nothing is peeled out of the loop, so nothing
    of it can be scheduled before the loop's operands exist: the backward pass uses it
    because XLA's CPU scheduler places a peeled step's zero accumulators and tile
    copies (which need only the inputs) at the start of the program, where they stay
    alive through the whole forward pass."""
    last = max(steps(st))

    def body(carry, s):
        travelling, rest = step(carry, s, list(range(last + 1)))
        return (_ppermute(travelling, st, 1), rest), None

    carry, _ = lax.scan(body, carry, jnp.arange(last + 1, dtype=jnp.int32))
    return carry


def _forward(st: Static, ops: Operands):
    """``(out [B, Tl, N, Hv] float32, lse [B, Tl, N] float32)`` of this device's queries."""
    device = lax.axis_index(st.axis)
    Tc, Sc = ops.q.shape[1] // st.chunks, ops.k.shape[1] // st.chunks
    Hv = ops.v.shape[-1]
    acc = varying_like(blocks.empty_piece(ops.q, Hv), ops.q)

    def step(carry, s, step_values):
        (k, v, kv_segments), acc = carry

        def compute(kind, delta, q_chunk, kv_chunk, a, b):
            q_a = _chunk(ops.q, a, Tc)
            if kind == EMPTY:
                return blocks.empty_piece(q_a, Hv)
            call = blocks.piece_call(
                st, ops, q_chunk, kv_chunk, kind, delta, q_a, _chunk(k, b, Sc), _chunk(v, b, Sc),
                _chunk(ops.q_segments, a, Tc), _chunk(kv_segments, b, Sc), ops.score_mod,
            )
            return blocks.run_piece(call, st.platform)

        def fold(acc, a, b, piece):
            o, l = acc
            o_a, l_a = blocks.merge((_chunk(o, a, Tc), _chunk(l, a, Tc)), piece)
            return (lax.dynamic_update_slice_in_dim(o, o_a, a * Tc, axis=1),
                    lax.dynamic_update_slice_in_dim(l, l_a, a * Tc, axis=1))

        return (k, v, kv_segments), _each_piece(st, step_values, s, device, ops.q, acc, compute, fold)

    _, (out, lse) = _walk(st, ((ops.k, ops.v, ops.kv_segments), acc), step)
    return out, lse


def _backward(st: Static, ops: Operands, out, lse, d_out):
    """The cotangent of `Operands`: dQ, dK, dV and the score modifier's float leaves."""
    device = lax.axis_index(st.axis)
    Tc, Sc = ops.q.shape[1] // st.chunks, ops.k.shape[1] // st.chunks
    d_out = d_out.astype(jnp.float32)
    shared_leaves, rebuild = split_differentiable(ops.score_mod)
    # Leaves the devices share are made varying before jax.vjp, so their cotangents
    # stay per device (the transpose of an implicit broadcast would be a psum inside
    # a branch some devices skip: a deadlock); they are summed once at the end.
    sm_leaves = [varying_like(x, ops.q) for x in shared_leaves]
    f32_zeros = lambda x: varying_like(jnp.zeros(x.shape, jnp.float32), ops.q)

    def step(carry, s, step_values):
        (k, v, kv_segments, d_k, d_v), (d_q, d_sm) = carry

        def compute(kind, delta, q_chunk, kv_chunk, a, b):
            q_a, k_b, v_b = _chunk(ops.q, a, Tc), _chunk(k, b, Sc), _chunk(v, b, Sc)
            if kind == EMPTY:
                return f32_zeros(q_a), f32_zeros(k_b), f32_zeros(v_b), [f32_zeros(x) for x in sm_leaves]
            q_seg, kv_seg = _chunk(ops.q_segments, a, Tc), _chunk(kv_segments, b, Sc)

            def attend(q_, k_, v_, leaves):
                call = blocks.piece_call(st, ops, q_chunk, kv_chunk, kind, delta, q_, k_, v_,
                                         q_seg, kv_seg, rebuild(leaves))
                return blocks.run_piece(call, st.platform)

            (out_p, lse_p), vjp = jax.vjp(attend, q_a, k_b, v_b, sm_leaves)
            cotangents = blocks.piece_cotangents(out_p, lse_p, _chunk(out, a, Tc), _chunk(lse, a, Tc),
                                                 _chunk(d_out, a, Tc))
            dq, dk, dv, dsm = vjp(cotangents)
            f32 = lambda x: x.astype(jnp.float32)
            return f32(dq), f32(dk), f32(dv), [f32(x) for x in dsm]

        def fold(grads, a, b, piece):
            (d_q, d_k, d_v, d_sm), (dq, dk, dv, dsm) = grads, piece
            return (_add_chunk(d_q, a, Tc, dq), _add_chunk(d_k, b, Sc, dk), _add_chunk(d_v, b, Sc, dv),
                    [x + y for x, y in zip(d_sm, dsm)])

        d_q, d_k, d_v, d_sm = _each_piece(st, step_values, s, device, ops.q, (d_q, d_k, d_v, d_sm), compute, fold)
        return (k, v, kv_segments, d_k, d_v), (d_q, d_sm)

    travelling = (ops.k, ops.v, ops.kv_segments, f32_zeros(ops.k), f32_zeros(ops.v))
    (_, _, _, d_k, d_v), (d_q, d_sm) = _walk_in_one_loop(
        st, (travelling, (f32_zeros(ops.q), [f32_zeros(x) for x in sm_leaves])), step)
    moved = (max(steps(st)) + 1) % st.size
    if moved:  # each block's gradient is `moved` devices downstream: send it home
        d_k, d_v = _ppermute((d_k, d_v), st, -moved)
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
