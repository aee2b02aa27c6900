"""The mask algebra: each mask against its definition, combinators, tile kinds, pytrees."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from jattn import masks

T, S = 9, 13
I, J = np.arange(T)[:, None], np.arange(S)[None, :]


def _grid(mask, num_q=T, num_kv=S):
    return np.asarray(mask.materialize(num_q, num_kv))


@pytest.mark.parametrize(
    "mask, definition",
    [
        (masks.Causal(), J <= I),
        (masks.Causal(offset=4), J <= I + 4),
        (masks.SlidingWindow(2, 1), (J >= I - 2) & (J <= I + 1)),
        (masks.SlidingWindow(3, 0, offset=2), (J >= I + 2 - 3) & (J <= I + 2)),
        (masks.SlidingWindow(None, 1), J <= I + 1),
        (masks.Lengths(q_length=6, kv_length=10), (I < 6) & (J < 10)),
        (masks.PrefixLM(prefix_length=5), (J <= I) | (J < 5)),
        (masks.SegmentIds(np.array([0, 0, 0, 1, 1, 2, 2, 2, 2]), np.array([0] * 4 + [1] * 4 + [2] * 5)),
         np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])[:, None] == np.array([0] * 4 + [1] * 4 + [2] * 5)[None, :]),
        (masks.Dense(((I * 7 + J * 3) % 5) < 2), ((I * 7 + J * 3) % 5) < 2),
        (masks.FromFunction(lambda i, j: (i - j) % 3 == 0), (I - J) % 3 == 0),
        (masks.Causal() & masks.SlidingWindow(2, None), (J <= I) & (J >= I - 2)),
        (masks.Causal() | masks.Lengths(kv_length=3), (J <= I) | (J < 3)),
        (~masks.Causal(), J > I),
    ],
)
def test_mask_matches_its_definition(mask, definition):
    np.testing.assert_array_equal(_grid(mask), np.broadcast_to(definition, (T, S)))


def test_causal_offset_zero_is_jax_nn_alignment_when_T_differs_from_S():
    # jax.nn's is_causal is tril(ones(T, S)): row i sees keys 0..i, whatever S is.
    np.testing.assert_array_equal(_grid(masks.Causal(), 4, 7), np.tril(np.ones((4, 7), bool)))
    np.testing.assert_array_equal(_grid(masks.Causal(), 7, 4), np.tril(np.ones((7, 4), bool)))


def _check_kinds(mask, num_q, num_kv, bq, bk):
    """Every tile reported EMPTY is empty and every FULL tile is full."""
    grid = _grid(mask, num_q, num_kv)
    kinds = np.asarray(mask.block_kinds(num_q, num_kv, bq, bk))
    assert kinds.shape == (-(-num_q // bq), -(-num_kv // bk))
    for i in range(kinds.shape[0]):
        for j in range(kinds.shape[1]):
            tile = grid[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            if kinds[i, j] == masks.EMPTY:
                assert not tile.any(), (i, j)
            elif kinds[i, j] == masks.FULL:
                assert tile.all(), (i, j)
    return kinds, grid


def test_causal_tile_kinds_are_exact():
    kinds, _ = _check_kinds(masks.Causal(), 8, 8, 2, 2)
    expected = np.array([[1, 0, 0, 0], [2, 1, 0, 0], [2, 2, 1, 0], [2, 2, 2, 1]])
    np.testing.assert_array_equal(kinds, expected)
    assert isinstance(kinds, np.ndarray)  # static: known at trace time


def _mask_strategy():
    leaf = st.one_of(
        st.builds(masks.Causal, offset=st.integers(-4, 6)),
        st.builds(masks.SlidingWindow, left=st.none() | st.integers(0, 5), right=st.none() | st.integers(0, 5),
                  offset=st.integers(-3, 3)),
        st.builds(masks.Lengths, q_length=st.none() | st.integers(0, 12), kv_length=st.none() | st.integers(0, 12)),
        st.builds(masks.PrefixLM, prefix_length=st.integers(0, 6), offset=st.integers(0, 3)),
        st.builds(lambda a, b: masks.SegmentIds(np.sort(a), np.sort(b)),
                  st.lists(st.integers(0, 3), min_size=11, max_size=11),
                  st.lists(st.integers(0, 3), min_size=10, max_size=10)),
    )
    return st.recursive(leaf, lambda inner: st.one_of(
        st.builds(lambda a, b: a & b, inner, inner),
        st.builds(lambda a, b: a | b, inner, inner),
        st.builds(lambda a: ~a, inner),
    ), max_leaves=3)


@given(mask=_mask_strategy(), bq=st.integers(1, 5), bk=st.integers(1, 5))
def test_tile_kinds_never_lie(mask, bq, bk):
    _check_kinds(mask, 11, 10, bq, bk)


def test_traced_tile_kinds_match_static_ones():
    mask = masks.Causal(offset=2) & masks.Lengths(kv_length=7)
    static = mask.block_kinds(9, 11, 3, 4)
    traced = jax.jit(lambda off, n: (masks.Causal(off) & masks.Lengths(kv_length=n)).block_kinds(9, 11, 3, 4))(2, 7)
    assert isinstance(static, np.ndarray) and isinstance(traced, jax.Array)
    np.testing.assert_array_equal(np.asarray(traced), static)


def test_segment_tile_kinds_use_id_ranges():
    ids = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    kinds, _ = _check_kinds(masks.SegmentIds(ids), 8, 8, 4, 4)
    np.testing.assert_array_equal(kinds, [[2, 0], [0, 2]])


def test_dense_tile_kinds():
    array = np.zeros((6, 6), bool)
    array[:3, :3] = True
    array[4, 5] = True
    kinds, _ = _check_kinds(masks.Dense(array), 6, 6, 3, 3)
    np.testing.assert_array_equal(kinds, [[2, 0], [0, 1]])


def test_masks_are_pytrees_sliced_by_vmap():
    B = 3
    offsets = jnp.array([0, 2, 5])
    ids = jnp.array([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    mask = masks.Causal(offsets) & masks.SegmentIds(ids)
    batched, axes = mask.batch_in_axes(B, 5, 5)
    grids = jax.vmap(lambda m: m.materialize(5, 5), in_axes=(axes,))(batched)
    for b in range(B):
        single = masks.Causal(int(offsets[b])) & masks.SegmentIds(np.asarray(ids[b]))
        np.testing.assert_array_equal(np.asarray(grids[b]), _grid(single, 5, 5))
    leaves = jax.tree_util.tree_leaves(mask)
    assert len(leaves) == 3  # offset, q ids, kv ids (the window sizes would be static)


def test_shared_leaves_are_not_sliced():
    mask = masks.Lengths(q_length=jnp.array([2, 4]), kv_length=3)
    _, axes = mask.batch_in_axes(2, 5, 5)
    assert axes.q_length == 0 and axes.kv_length is None


def test_batch_shape_errors_name_the_field():
    with pytest.raises(ValueError, match=r"SegmentIds.q_segment_ids: got shape \(2, 4\).*\(5,\)"):
        masks.SegmentIds(np.zeros((2, 4), int)).batch_in_axes(2, 5, 5)
    with pytest.raises(ValueError, match=r"Causal.offset: got shape \(3,\)"):
        masks.Causal(jnp.zeros(3, int)).batch_in_axes(2, 5, 5)


def test_window_rejects_negative_sizes():
    with pytest.raises(ValueError, match="SlidingWindow.left"):
        masks.SlidingWindow(-1, 0)
