"""Validation: from the arguments of `jattn.dot_product_attention` to an `AttentionCall`.

Every check names the argument, what was given and what was expected.  The result is
batched (BTNH), with all masks gathered into one `jattn.masks.Mask` and all score
modifiers into one `jattn.score_mods.ScoreMod`, ready for any backend.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.interpreters import ad  # JVPTracer, to see forward mode

from jattn import masks as masks_lib
from jattn import score_mods as score_mods_lib

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """A validated, batched attention request.

    Shapes: query ``[B, T, N, H]``, key ``[B, S, K, H]``, value ``[B, S, K, Hv]``;
    ``bias`` and ``dense_mask`` are 4-D and broadcastable to ``[B, N, T, S]``.
    """

    query: Array
    key: Array
    value: Array
    bias: Array | None
    dense_mask: Array | None
    scale: float
    # The features as asked for (the cuDNN backend maps them back to jax.nn).
    is_causal: bool
    local_window_size: tuple[int, int] | None
    query_offset: Any
    query_seq_lengths: Array | None
    key_value_seq_lengths: Array | None
    segment_ids: tuple[Array, Array] | None
    user_mask: masks_lib.Mask | None
    user_score_mod: score_mods_lib.ScoreMod | None
    logits_soft_cap: float | None
    dropout_rate: float
    dropout_rng: Array | None
    implementation: str | None
    block_sizes: tuple[int, int] | None
    return_weights: bool
    return_residual: bool
    precision: Any
    # Context parallelism (`jattn.parallel` serves these around a backend).
    sequence_axis: str | None
    sequence_strategy: str | None
    sequence_layout: str
    # True when traced by jax.jvp (forward mode), which a custom VJP cannot serve.
    forward_mode: bool
    unbatched: bool
    # Set only by jattn itself when a call is one block of a larger problem
    # (`jattn.parallel`): the global (example, query head, row, key) index of this
    # call's first ones, so dropout draws the entries the whole problem would.
    dropout_origin: tuple | None = None
    # Set only by jattn itself: the returned log-sum-exp must carry gradients (a
    # block's lse weighs it in a log-sum-exp merge).
    differentiable_residual: bool = False

    @property
    def shape(self) -> dict[str, int]:
        B, T, N, H = self.query.shape
        _, S, K, Hv = self.value.shape
        return dict(B=B, T=T, S=S, N=N, K=K, H=H, Hv=Hv)

    def features(self) -> frozenset[str]:
        """The features this call uses, named as backends declare them (`FEATURES`).

        Fails closed: a field missing from `FIELD_FEATURES` counts as the feature of
        its own name whatever its value, so a field added to the call is refused by
        every backend until it is declared here and by the backends that implement it.
        """
        used = set()
        for field in dataclasses.fields(self):
            in_use = FIELD_FEATURES.get(field.name)
            if in_use is None:
                used.add(field.name)
            else:
                used |= in_use(self)
        return frozenset(used)

    def index_mask(self) -> masks_lib.Mask | None:
        """All index-function masks of the call combined with ``&``."""
        causal = window = lengths = segments = None
        if self.is_causal:
            causal = masks_lib.Causal(self.query_offset)
        if self.local_window_size is not None:
            window = masks_lib.SlidingWindow(*self.local_window_size, offset=self.query_offset)
        if self.query_seq_lengths is not None or self.key_value_seq_lengths is not None:
            lengths = masks_lib.Lengths(self.query_seq_lengths, self.key_value_seq_lengths)
        if self.segment_ids is not None:
            segments = masks_lib.SegmentIds(*self.segment_ids)
        return masks_lib.combine(causal, window, lengths, segments, self.user_mask)

    def index_score_mod(self) -> score_mods_lib.ScoreMod | None:
        """The user's score modifier, then soft-capping (so the cap bounds the result)."""
        cap = None if self.logits_soft_cap is None else score_mods_lib.SoftCap(self.logits_soft_cap)
        return score_mods_lib.chain(self.user_score_mod, cap)


def _offset_features(call: AttentionCall) -> set[str]:
    # An offset only moves the causal / window band; without one it means nothing.
    if not (call.is_causal or call.local_window_size is not None):
        return set()
    if isinstance(call.query_offset, int):
        return {"query_offset"} if call.query_offset != 0 else set()
    return {"query_offset_array"}


def _if(feature: str, test) -> Any:
    return lambda call: {feature} if test(call) else set()


# What each feature means, for refusal messages.
FEATURES: dict[str, str] = {
    "bias": "an additive bias",
    "dense_mask": "a boolean mask array",
    "causal": "a causal mask",
    "local_window": "a sliding window",
    "query_offset": "a causal / window band shifted by an int query_offset",
    "query_offset_array": "a per-example (array) query_offset",
    "query_seq_lengths": "query lengths",
    "key_value_seq_lengths": "key/value lengths",
    "segment_ids": "segment ids",
    "mask_mod": "a mask object or mask function",
    "score_mod": "a score_mod",
    "logits_soft_cap": "logits soft-capping",
    "dropout": "dropout",
    "return_weights": "returning the weights",
    "return_residual": "returning the log-sum-exp",
    "precision": "an explicit matmul precision",
    "forward_mode": "forward-mode differentiation (jax.jvp)",
    "sequence_sharding": "a sequence split over a mesh axis (jattn.parallel serves it around a backend)",
    "dropout_origin": "dropout at global indices (a block of a larger problem)",
    "differentiable_residual": "a log-sum-exp that carries gradients",
}

# For each field of AttentionCall: the features it uses in a given call.  Fields that
# every backend must honour (the inputs, scale) or that are hints (tile sizes) use
# none.  See `AttentionCall.features` for what happens to a field missing here.
FIELD_FEATURES: dict[str, Any] = {
    "query": lambda call: set(),
    "key": lambda call: set(),
    "value": lambda call: set(),
    "scale": lambda call: set(),
    "implementation": lambda call: set(),
    "block_sizes": lambda call: set(),  # a tuning hint: backends without tiles ignore it
    "unbatched": lambda call: set(),
    "bias": _if("bias", lambda c: c.bias is not None),
    "dense_mask": _if("dense_mask", lambda c: c.dense_mask is not None),
    "is_causal": _if("causal", lambda c: c.is_causal),
    "local_window_size": _if("local_window", lambda c: c.local_window_size is not None),
    "query_offset": _offset_features,
    "query_seq_lengths": _if("query_seq_lengths", lambda c: c.query_seq_lengths is not None),
    "key_value_seq_lengths": _if("key_value_seq_lengths", lambda c: c.key_value_seq_lengths is not None),
    "segment_ids": _if("segment_ids", lambda c: c.segment_ids is not None),
    "user_mask": _if("mask_mod", lambda c: c.user_mask is not None),
    "user_score_mod": _if("score_mod", lambda c: c.user_score_mod is not None),
    "logits_soft_cap": _if("logits_soft_cap", lambda c: c.logits_soft_cap is not None),
    "dropout_rate": _if("dropout", lambda c: c.dropout_rate > 0.0),
    "dropout_rng": lambda call: set(),  # used only with dropout_rate
    "return_weights": _if("return_weights", lambda c: c.return_weights),
    "return_residual": _if("return_residual", lambda c: c.return_residual),
    "precision": _if("precision", lambda c: c.precision is not None),
    "forward_mode": _if("forward_mode", lambda c: c.forward_mode),
    "sequence_axis": _if("sequence_sharding", lambda c: c.sequence_axis is not None),
    "sequence_strategy": lambda call: set(),  # used only with sequence_axis
    "sequence_layout": lambda call: set(),  # likewise
    "dropout_origin": _if("dropout_origin", lambda c: c.dropout_origin is not None and c.dropout_rate > 0.0),
    "differentiable_residual": _if("differentiable_residual", lambda c: c.differentiable_residual),
}


def _describe(x) -> str:
    return f"shape {tuple(np.shape(x))} dtype {jnp.asarray(x).dtype}" if x is not None else "None"


def _as_float_array(name: str, x) -> Array:
    if x is None:
        raise TypeError(f"{name}: expected an array; got None")
    try:
        x = jnp.asarray(x)
    except TypeError as e:
        raise TypeError(f"{name}: expected an array; got {type(x).__name__}") from e
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name}: expected a floating dtype (float32, bfloat16, float16, float64); "
            f"got {x.dtype}"
        )
    return x


def _broadcastable_4d(name: str, x, batched_shape: tuple[int, int, int, int], unbatched: bool):
    """Bring a jax.nn-style bias / mask to rank 4 and check it broadcasts to BNTS."""
    letters = "NTS" if unbatched else "BNTS"
    if x.ndim > 4 or (unbatched and x.ndim > 3):
        raise ValueError(
            f"{name}: got {_describe(x)}; expected at most rank {len(letters)}, "
            f"broadcastable to {letters} = {batched_shape[4 - len(letters):]}"
        )
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    for got, want in zip(x.shape, batched_shape):
        if got not in (1, want):
            raise ValueError(
                f"{name}: got shape {x.shape[4 - len(letters):] if unbatched else x.shape}; "
                f"expected a shape broadcastable to {letters} = "
                f"{batched_shape[4 - len(letters):]}"
            )
    return x


def _int_per_example(name: str, x, B: int, unbatched: bool, extra: tuple[int, ...] = ()):
    """Lengths / offsets / segment ids: ints of shape [B, *extra] (or [*extra])."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name}: expected an integer array; got dtype {x.dtype}")
    if unbatched and x.shape == extra:
        x = x[None]
    if x.shape == (1, *extra):  # one row shared by the whole batch
        x = jnp.broadcast_to(x, (B, *extra))
    if x.shape != (B, *extra):
        want = f"{extra} (or {(1, *extra)})" if unbatched else f"{(B, *extra)} (or {(1, *extra)})"
        raise ValueError(f"{name}: got shape {x.shape}; expected {want}")
    return x.astype(jnp.int32)


def _window(local_window_size) -> tuple[int, int] | None:
    if local_window_size is None:
        return None
    if isinstance(local_window_size, (int, np.integer)):
        local_window_size = (int(local_window_size), int(local_window_size))
    ok = (
        isinstance(local_window_size, (tuple, list))
        and len(local_window_size) == 2
        and all(isinstance(w, (int, np.integer)) and w >= 0 for w in local_window_size)
    )
    if not ok:
        raise ValueError(
            f"local_window_size: got {local_window_size!r}; expected a non-negative int "
            f"or a (left, right) pair of non-negative ints"
        )
    return tuple(int(w) for w in local_window_size)


def _query_offset(query_offset, B: int, unbatched: bool):
    if isinstance(query_offset, (int, np.integer)) and not isinstance(query_offset, bool):
        return int(query_offset)
    x = jnp.asarray(query_offset)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"query_offset: expected an int or int array; got dtype {x.dtype}")
    if x.ndim == 0:
        return x.astype(jnp.int32)
    return _int_per_example("query_offset", x, B, unbatched)


def _under_jvp(*trees) -> bool:
    """Whether any input is traced by `jax.jvp` (seen when jvp is applied outside
    jit; a jit traced first and differentiated later cannot be seen here)."""
    return any(isinstance(x, ad.JVPTracer) for x in jax.tree_util.tree_leaves(trees))


def _precision(precision):
    """None, a `jax.lax.Precision` (or its name), or a pair of them (one per operand)."""
    def one(p):
        if isinstance(p, jax.lax.Precision):
            return p
        if isinstance(p, str):
            try:
                return jax.lax.Precision(p)
            except (ValueError, KeyError):
                pass
        raise ValueError(
            f"precision: got {precision!r}; expected None, a jax.lax.Precision (or one of "
            f"'default', 'high', 'highest'), or a pair of them"
        )

    if precision is None:
        return None
    if isinstance(precision, (tuple, list)) and len(precision) == 2:
        return tuple(one(p) for p in precision)
    return one(precision)


SEQUENCE_STRATEGIES = ("ring", "all_gather", "ulysses")
SEQUENCE_LAYOUTS = ("contiguous", "zigzag")


def _check_sequence_options(sequence_axis, sequence_strategy, sequence_layout) -> None:
    if sequence_axis is not None and not isinstance(sequence_axis, str):
        raise TypeError(f"sequence_axis: expected a mesh axis name (str) or None; got {sequence_axis!r}")
    if sequence_strategy not in (None, *SEQUENCE_STRATEGIES):
        raise ValueError(
            f"sequence_strategy: got {sequence_strategy!r}; expected None (automatic) or one of "
            f"{', '.join(map(repr, SEQUENCE_STRATEGIES))}"
        )
    if sequence_layout not in SEQUENCE_LAYOUTS:
        raise ValueError(
            f"sequence_layout: got {sequence_layout!r}; expected one of {', '.join(map(repr, SEQUENCE_LAYOUTS))}"
        )


def validate(
    query, key, value, bias, mask, *, scale, is_causal, query_seq_lengths,
    key_value_seq_lengths, local_window_size, implementation, return_residual,
    query_segment_ids, key_value_segment_ids, query_offset, logits_soft_cap, score_mod,
    dropout_rate, dropout_rng, return_weights, block_sizes, precision,
    sequence_axis, sequence_strategy, sequence_layout,
) -> AttentionCall:
    """Check every argument of `jattn.dot_product_attention`; return the batched call."""
    query = _as_float_array("query", query)
    key = _as_float_array("key", key)
    value = _as_float_array("value", value)
    if query.ndim not in (3, 4):
        raise ValueError(
            f"query: got {_describe(query)}; expected rank 4 (B, T, N, H) or rank 3 (T, N, H)"
        )
    layout = "BSKH" if query.ndim == 4 else "SKH"
    for name, x in (("key", key), ("value", value)):
        if x.ndim != query.ndim:
            raise ValueError(
                f"{name}: got {_describe(x)}; expected rank {query.ndim} ({layout}) like query"
            )
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"query, key, value: expected one dtype; got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    unbatched = query.ndim == 3
    if unbatched:
        query, key, value = query[None], key[None], value[None]
    B, T, N, H = query.shape
    Bk, S, K, Hk = key.shape
    if Bk != B:
        raise ValueError(f"key: batch size {Bk} differs from query's {B} (shapes {key.shape} vs {query.shape})")
    if Hk != H:
        raise ValueError(f"key: head dim {Hk} differs from query's {H}; expected key [B, S, K, {H}]")
    if value.shape[:3] != (B, S, K):
        raise ValueError(
            f"value: got shape {value.shape[1:] if unbatched else value.shape}; expected "
            f"{(S, K) if unbatched else (B, S, K)} + (Hv,) to match key "
            f"{key.shape[1:] if unbatched else key.shape}"
        )
    if N % K != 0:
        raise ValueError(
            f"query: {N} query heads is not a multiple of key's {K} key/value heads "
            f"(N must be a multiple of K for GQA/MQA)"
        )

    if scale is not None and not (isinstance(scale, (int, float, np.floating)) and np.isfinite(scale)):
        raise ValueError(f"scale: expected a finite number or None; got {scale!r}")
    scale = float(1.0 / np.sqrt(H) if scale is None else scale)

    bnts = (B, N, T, S)
    if bias is not None:
        bias = _broadcastable_4d("bias", _as_float_array("bias", bias), bnts, unbatched)

    user_mask = dense_mask = None
    if mask is not None:
        if isinstance(mask, masks_lib.Mask) or callable(mask):
            user_mask = masks_lib.as_mask(mask)
        else:
            dense_mask = jnp.asarray(mask)
            if dense_mask.dtype != jnp.bool_:
                raise TypeError(
                    f"mask: expected a boolean array (True = attend), a jattn.masks.Mask or "
                    f"a mask_mod(q_idx, kv_idx) function; got dtype {dense_mask.dtype}. "
                    f"For an additive mask use bias="
                )
            dense_mask = _broadcastable_4d("mask", dense_mask, bnts, unbatched)

    if query_seq_lengths is not None:
        query_seq_lengths = _int_per_example("query_seq_lengths", query_seq_lengths, B, unbatched)
    if key_value_seq_lengths is not None:
        key_value_seq_lengths = _int_per_example("key_value_seq_lengths", key_value_seq_lengths, B, unbatched)

    segment_ids = None
    if key_value_segment_ids is not None and query_segment_ids is None:
        raise ValueError("key_value_segment_ids: given without query_segment_ids; give both or only query_segment_ids")
    if query_segment_ids is not None:
        q_seg = _int_per_example("query_segment_ids", query_segment_ids, B, unbatched, (T,))
        if key_value_segment_ids is None:
            if S != T:
                raise ValueError(
                    f"key_value_segment_ids: required when T != S (T={T}, S={S}); "
                    f"query_segment_ids alone only serves self-attention"
                )
            kv_seg = q_seg
        else:
            kv_seg = _int_per_example("key_value_segment_ids", key_value_segment_ids, B, unbatched, (S,))
        segment_ids = (q_seg, kv_seg)

    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"is_causal: expected a bool; got {type(is_causal).__name__}")
    window = _window(local_window_size)
    query_offset = _query_offset(query_offset, B, unbatched)

    if logits_soft_cap is not None and not (
        isinstance(logits_soft_cap, (int, float)) and logits_soft_cap > 0
    ):
        raise ValueError(f"logits_soft_cap: expected a positive number or None; got {logits_soft_cap!r}")
    user_score_mod = None if score_mod is None else score_mods_lib.as_score_mod(score_mod)

    if not isinstance(dropout_rate, (int, float)) or not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate: expected a number in [0, 1); got {dropout_rate!r}")
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError(
            f"dropout_rng: dropout_rate={dropout_rate} needs a PRNG key "
            f"(jax.random.key); got None"
        )
    if dropout_rng is not None:
        dropout_rng = jnp.asarray(dropout_rng)
        if not (jnp.issubdtype(dropout_rng.dtype, jax.dtypes.prng_key) or dropout_rng.dtype == jnp.uint32):
            raise TypeError(
                f"dropout_rng: expected a jax.random.key; got {_describe(dropout_rng)}"
            )
        if dropout_rng.dtype == jnp.uint32:
            dropout_rng = jax.random.wrap_key_data(dropout_rng)
        if dropout_rng.shape != ():
            raise ValueError(f"dropout_rng: expected one key (shape ()); got key shape {dropout_rng.shape}")

    if implementation is not None and not isinstance(implementation, str):
        raise TypeError(f"implementation: expected a backend name (str) or None; got {implementation!r}")
    precision = _precision(precision)
    if return_weights and return_residual:
        raise ValueError("return_weights and return_residual: ask for one of them, not both")

    if block_sizes is not None:
        ok = (
            isinstance(block_sizes, (tuple, list)) and len(block_sizes) == 2
            and all(isinstance(b, (int, np.integer)) and b > 0 for b in block_sizes)
        )
        if not ok:
            raise ValueError(f"block_sizes: expected a (block_q, block_kv) pair of positive ints; got {block_sizes!r}")
        block_sizes = (int(block_sizes[0]), int(block_sizes[1]))
    _check_sequence_options(sequence_axis, sequence_strategy, sequence_layout)

    call = AttentionCall(
        query=query, key=key, value=value, bias=bias, dense_mask=dense_mask, scale=scale,
        is_causal=bool(is_causal), local_window_size=window, query_offset=query_offset,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        segment_ids=segment_ids, user_mask=user_mask, user_score_mod=user_score_mod,
        logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
        dropout_rate=float(dropout_rate), dropout_rng=dropout_rng,
        implementation="dense" if implementation == "xla" else implementation,
        block_sizes=block_sizes, return_weights=bool(return_weights),
        return_residual=bool(return_residual), precision=precision,
        sequence_axis=sequence_axis, sequence_strategy=sequence_strategy,
        sequence_layout=sequence_layout,
        forward_mode=_under_jvp(query, key, value, bias, user_score_mod), unbatched=unbatched,
    )
    # Shape-check the data inside mask / score-mod objects now, with a clear message.
    for obj in (call.index_mask(), call.index_score_mod()):
        if obj is not None:
            obj.batch_in_axes(B, T, S)
    return call
