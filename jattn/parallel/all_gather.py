"""All-gather attention: every device gathers the whole key/value sequence over the
mesh axis (`jax.lax.all_gather`) and attends its own queries to it.  Runs inside
`jax.shard_map` (the axis is bound).

One collective instead of P - 1 ring steps, at the cost of holding all of K/V on
each device: the right trade when there are few key/value heads (GQA/MQA), where the
gathered K/V are small next to the queries.  With the zig-zag layout the gathered
blocks are put back in natural order (a static gather), so each local query chunk
is one call against the whole sequence with its band shifted to its global origin.
The backward pass is JAX's: the transpose of the all-gather is a reduce-scatter of
dK/dV.  It can also return the weights (each device holds whole rows).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax import lax

from jattn.parallel import blocks
from jattn.parallel.blocks import FULL, PARTIAL, Operands, Static


def run(st: Static, ops: Operands, return_weights: bool = False):
    """``(out [B, Tl, N, Hv], weights [B, N, Tl, S] | None, lse [B, Tl, N])`` of this
    device's queries, inside `jax.shard_map` over ``st.axis``."""
    device = lax.axis_index(st.axis)
    k, v, kv_segments = (blocks.gather_sequence(x, st) for x in (ops.k, ops.v, ops.kv_segments))
    whole = dataclasses.replace(st, chunk_kv=st.num_kv)  # one key "chunk": all of them
    band = np.array(st.band)
    Cq = ops.q.shape[1] // st.chunks
    outs, weights, lses = [], [], []
    for a in range(st.chunks):
        rows = slice(a * Cq, (a + 1) * Cq)
        q_chunks = st.device_chunks()[:, a]
        kind = FULL if (band[q_chunks] == FULL).all() else PARTIAL
        q_chunk = jnp.asarray(q_chunks, jnp.int32)[device]
        call = blocks.piece_call(
            whole, ops, q_chunk, 0, kind, q_chunk * st.chunk_q, ops.q[:, rows], k, v,
            None if ops.q_segments is None else ops.q_segments[:, rows], kv_segments, ops.score_mod,
            return_weights=return_weights,
        )
        out, w, lse = blocks.run_call(call, st.platform)
        outs.append(out)
        weights.append(w)
        lses.append(lse)
    out = jnp.concatenate(outs, axis=1).astype(ops.v.dtype)
    lse = None if lses[0] is None else jnp.concatenate(lses, axis=1)
    return out, (jnp.concatenate(weights, axis=2) if return_weights else None), lse

