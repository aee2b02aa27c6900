"""Hypothesis helpers shared by the backend agreement tests."""

from __future__ import annotations

import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np

from jattn import masks


def draw_mask(draw, kind: str, B: int, T: int, S: int, *, offset: int, max_window: int):
    """``(jattn kwargs, tests.reference kwargs)`` for one mask ``kind``: causal, window,
    segments, lengths, prefix, dense, fn or none; positional kinds use ``offset``."""
    if kind == "causal":
        return {"is_causal": True, "query_offset": offset}, {"is_causal": True, "query_offset": offset}
    if kind == "window":
        w = (draw(st.integers(0, max_window)), draw(st.integers(0, max_window)))
        return {"local_window_size": w, "query_offset": offset}, {"window": w, "query_offset": offset}
    if kind == "segments":
        q_seg = np.sort(draw(st.lists(st.integers(0, 2), min_size=T, max_size=T)))
        kv_seg = np.sort(draw(st.lists(st.integers(0, 2), min_size=S, max_size=S)))
        q_seg, kv_seg = np.broadcast_to(q_seg, (B, T)), np.broadcast_to(kv_seg, (B, S))
        return ({"query_segment_ids": jnp.asarray(q_seg), "key_value_segment_ids": jnp.asarray(kv_seg)},
                {"q_segments": q_seg, "kv_segments": kv_seg})
    if kind == "lengths":
        q_len = draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
        kv_len = draw(st.lists(st.integers(0, S), min_size=B, max_size=B))
        return ({"query_seq_lengths": jnp.array(q_len), "key_value_seq_lengths": jnp.array(kv_len)},
                {"q_lengths": q_len, "kv_lengths": kv_len})
    if kind == "prefix":
        prefix = draw(st.integers(0, S))
        return {"mask": masks.PrefixLM(prefix)}, {"prefix_length": prefix}
    if kind == "dense":
        dense = np.random.default_rng(draw(st.integers(0, 99))).random((B, 1, T, S)) < 0.6
        return {"mask": jnp.asarray(dense)}, {"mask": dense}
    if kind == "fn":
        return {"mask": lambda i, j: (i + j) % 3 != 2}, {"mask_fn": lambda t, s: (t + s) % 3 != 2}
    assert kind == "none", kind
    return {}, {}
