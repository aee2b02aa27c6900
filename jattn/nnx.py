"""Flax NNX attention modules built on `jattn.dot_product_attention`, and an
``attention_fn`` adapter for Flax's own attention modules.

* `MultiHeadAttention`: (cross-)attention with Q/K/V/output projections in BTNH, GQA /
  MQA (``num_kv_heads``), optional QK-norm (RMSNorm over H), RoPE, logit soft-capping,
  dropout, every mask of `jattn.dot_product_attention`, a functional KV cache for
  decoding (`jattn.cache.KVCache`), and the weights on request.  Parameters are laid out
  as in `flax.nnx.MultiHeadAttention` (``query/key/value/out`` with ``kernel`` and
  ``bias``), so weights copy across.
* `SelfAttention`: the same for one input sequence, causal by default, with per-token
  ``positions``, ``segment_ids`` (packing) and ``lengths`` (padding / ragged prompts).
* `attention_fn`: pass as ``attention_fn=`` to `flax.nnx.MultiHeadAttention` or
  `flax.linen.MultiHeadDotProductAttention`.

Return values of the modules: ``out`` alone; with ``cache=`` the pair
``(out, new_cache)``; with ``return_weights=True`` the weights ``[B, N, T, S]`` come
last: ``(out, weights)`` or ``(out, new_cache, weights)``.

Sharding: every parameter carries logical axis names (``embed`` D, ``heads`` N,
``kv_heads`` K, ``head_dim`` H) as its ``out_sharding`` metadata.  With
``sharding_rules`` (e.g. `LOGICAL_AXIS_RULES`: heads over ``model``, batch over
``data``) or rules set by ``flax.linen.logical_axis_rules``, a module built inside
``jax.set_mesh(mesh)`` creates its parameters sharded; `nnx.get_partition_spec`
gives the specs in any case.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> import jattn.nnx
  >>> layer = jattn.nnx.SelfAttention(12, 3, num_kv_heads=1, use_rope=True,
  ...                                 rngs=nnx.Rngs(0))
  >>> x = jnp.ones((2, 5, 12))                  # B=2, T=5, D=12
  >>> layer(x).shape
  (2, 5, 12)
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import flax.core.spmd
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import initializers

from jattn import positional
from jattn.attention import dot_product_attention
from jattn.call import IMPLEMENTATIONS
from jattn.cache import KVCache, decode_attention

Array = jax.Array

__all__ = ["LOGICAL_AXIS_RULES", "MultiHeadAttention", "SelfAttention", "attention_fn"]

# Logical axis names -> mesh axes for a ("data", "model") mesh: batch over "data",
# query and key/value heads over "model", everything else replicated.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("length", None),
    ("embed", None),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("head_dim", None),
)

default_kernel_init = initializers.lecun_normal()


# ---------------------------------------------------------------------------------
# Shared by the NNX and Linen modules (jattn.linen imports these helpers).
# ---------------------------------------------------------------------------------


def _check_positive_int(name: str, value, *, allow_none: bool = False):
    if value is None and allow_none:
        return
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive int; got {value!r}")


def _resolve_heads(
    num_heads: int,
    features: int,
    num_kv_heads: int | None,
    head_dim: int | None,
    *,
    features_name: str,
) -> tuple[int, int, int]:
    """``(N, K, H)`` from the constructor arguments, with errors naming the argument.

    ``features`` is the width the heads split (``qkv_features`` or ``in_features``);
    it is only used when ``head_dim`` is None.
    """
    _check_positive_int("num_heads", num_heads)
    _check_positive_int("num_kv_heads", num_kv_heads, allow_none=True)
    _check_positive_int("head_dim", head_dim, allow_none=True)
    num_kv_heads = num_heads if num_kv_heads is None else int(num_kv_heads)
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_kv_heads: {num_kv_heads} does not divide num_heads={num_heads}; each key/value "
            f"head serves num_heads // num_kv_heads query heads (GQA), so num_heads must be a "
            f"multiple of num_kv_heads"
        )
    if head_dim is None:
        _check_positive_int(features_name, features)
        if features % num_heads:
            raise ValueError(
                f"num_heads: {num_heads} does not divide {features_name}={features}; the head dim "
                f"is {features_name} // num_heads, so {features_name} must be a multiple of "
                f"num_heads (or pass head_dim=)"
            )
        head_dim = features // num_heads
    return int(num_heads), int(num_kv_heads), int(head_dim)


def _check_features(name: str, x: Array, expected: int, expected_name: str) -> None:
    if jnp.ndim(x) < 2:
        raise ValueError(f"{name}: got shape {jnp.shape(x)}; expected [B, T, D] (rank >= 2)")
    if x.shape[-1] != expected:
        raise ValueError(
            f"{name}: got feature size {x.shape[-1]} (shape {x.shape}); expected "
            f"{expected_name}={expected}"
        )


def _check_self_attention_args(x, segment_ids, lengths, decoding: bool) -> None:
    """`SelfAttention`'s own arguments, named as the caller wrote them."""
    if jnp.ndim(x) != 3:
        raise ValueError(f"x: got shape {jnp.shape(x)}; expected [B, T, D] (rank 3)")
    B, T = x.shape[:2]
    if segment_ids is not None:
        if decoding:
            raise ValueError("segment_ids: not supported with a cache (decode mode); use lengths for ragged prompts")
        if jnp.shape(segment_ids) != (B, T):
            raise ValueError(f"segment_ids: got shape {jnp.shape(segment_ids)}; expected (B, T) = {(B, T)}")
    if lengths is not None and jnp.shape(lengths) != (B,):
        raise ValueError(f"lengths: got shape {jnp.shape(lengths)}; expected (B,) = ({B},), one length per sequence")


def _positions(name: str, positions, B: int, T: int, default) -> Array:
    if positions is None:
        return default
    positions = jnp.asarray(positions)
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise TypeError(f"{name}: expected integer positions; got dtype {positions.dtype}")
    if positions.shape == (T,):
        positions = jnp.broadcast_to(positions, (B, T))
    if positions.shape != (B, T):
        raise ValueError(f"{name}: got shape {positions.shape}; expected (B, T) = {(B, T)} or (T,) = ({T},)")
    return positions


def _check_cache(cache, B: int, K: int, H: int, Hv: int) -> None:
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache: expected a jattn.cache.KVCache; got {type(cache).__name__}")
    if (cache.batch_size, cache.num_kv_heads, cache.head_dim, cache.value_head_dim) != (B, K, H, Hv):
        raise ValueError(
            f"cache: holds keys {cache.keys.shape} and values {cache.values.shape}; this call "
            f"needs keys [B, M, K, H] = ({B}, M, {K}, {H}) and values ({B}, M, {K}, {Hv}) "
            f"(create it with KVCache.create(batch_size={B}, max_length=M, num_kv_heads={K}, "
            f"head_dim={H}))"
        )


_DECODE_FORBIDDEN = ("key_value_seq_lengths", "query_segment_ids", "key_value_segment_ids")


def _attend(
    query: Array,
    key: Array,
    value: Array,
    *,
    self_attention: bool,
    use_rope: bool,
    rope_base: float,
    positions,
    key_positions,
    cache: KVCache | None,
    decode: bool,
    attention_kwargs: dict,
    return_weights: bool,
):
    """The module core after the projections (and QK-norm): RoPE, then either plain
    attention or a cache step.

    query ``[B, T, N, H]``, key ``[B, S, K, H]``, value ``[B, S, K, Hv]``;
    ``attention_kwargs`` are `jattn.dot_product_attention` keyword arguments.

    Returns ``(out [B, T, N, Hv], new_cache or None, weights or None)``.
    """
    B, T = query.shape[:2]
    S = key.shape[1]
    kwargs = dict(attention_kwargs)
    if decode and cache is None:
        raise ValueError(
            "cache: decode mode (decode=True) needs a KV cache; pass cache=KVCache.create("
            "batch_size, max_length, num_kv_heads, head_dim) (or module.create_cache(...)) "
            "and use the returned new cache for the next step"
        )
    if cache is not None:
        if S != T:
            raise ValueError(
                f"inputs_k: in decode mode the keys and values are the new tokens themselves; "
                f"got {S} key tokens for {T} query tokens"
            )
        _check_cache(cache, B, key.shape[2], key.shape[3], value.shape[3])
        for name in _DECODE_FORBIDDEN:
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"{name}: not supported with a cache (decode mode): the cache's lengths "
                    f"define the keys; pass the real token counts as lengths / "
                    f"query_seq_lengths instead"
                )
        offset = kwargs.pop("query_offset", 0)
        if not (isinstance(offset, (int, np.integer)) and offset == 0):
            raise ValueError(
                "query_offset: not supported with a cache (decode mode): the offset of each "
                "sequence is its cache length"
            )
        default_positions = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    else:
        default_positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

    if use_rope:
        q_pos = _positions("positions", positions, B, T, default_positions)
        if key_positions is None and (self_attention or cache is not None):
            k_pos = q_pos
        else:
            k_pos = _positions(
                "key_positions", key_positions, B, S,
                jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)),
            )
        query = positional.apply_rope(query, q_pos, base=rope_base)
        key = positional.apply_rope(key, k_pos, base=rope_base)
    else:
        # Positions only feed RoPE; still check their shape so a mistake shows.
        _positions("positions", positions, B, T, None)
        _positions("key_positions", key_positions, B, S, None)

    if cache is not None:
        num_new = kwargs.pop("query_seq_lengths", None)
        for name in _DECODE_FORBIDDEN:
            kwargs.pop(name, None)
        result = decode_attention(
            query, key, value, cache, num_new=num_new, return_weights=return_weights, **kwargs
        )
        if return_weights:
            out, new_cache, weights = result
        else:
            (out, new_cache), weights = result, None
        return out, new_cache, weights
    result = dot_product_attention(query, key, value, return_weights=return_weights, **kwargs)
    out, weights = result if return_weights else (result, None)
    return out, None, weights


def _default_inputs(inputs_q, inputs_k, inputs_v):
    """``(inputs_k, inputs_v, self_attention)``: keys default to the queries and values
    to the keys; values without keys are an error."""
    self_attention = inputs_k is None
    if inputs_k is None:
        if inputs_v is not None:
            raise ValueError("inputs_k: None while inputs_v is given; pass inputs_k too (inputs_v defaults to inputs_k)")
        inputs_k = inputs_q
    if inputs_v is None:
        inputs_v = inputs_k
    return inputs_k, inputs_v, self_attention


def _check_kv_and_decode(inputs_k, inputs_v, decode, cache) -> None:
    if inputs_k.shape[:-1] != inputs_v.shape[:-1]:
        raise ValueError(f"inputs_v: got shape {inputs_v.shape}; expected {inputs_k.shape[:-1]} + (features,) like inputs_k")
    if decode is False and cache is not None:
        raise ValueError("decode: False was passed together with a cache; drop one of them")


def _attention_kwargs(*, logits_soft_cap, implementation, dropout_rate, dropout_rng, **call_args) -> dict:
    """The `dot_product_attention` arguments of a module call: the call's mask and
    position arguments, the module's options, and dropout only with a key."""
    return dict(
        call_args, logits_soft_cap=logits_soft_cap, implementation=implementation,
        dropout_rate=dropout_rate if dropout_rng is not None else 0.0, dropout_rng=dropout_rng,
    )


def _pack_outputs(out, new_cache, weights, *, with_cache: bool, return_weights: bool):
    """``out`` | ``(out, new_cache)`` | ``(out, weights)`` | ``(out, new_cache, weights)``."""
    result = (out,)
    if with_cache:
        result += (new_cache,)
    if return_weights:
        result += (weights,)
    return result[0] if len(result) == 1 else result


def _check_dropout_rate(dropout_rate) -> None:
    if not isinstance(dropout_rate, (int, float)) or isinstance(dropout_rate, bool) or not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate: expected a number in [0, 1); got {dropout_rate!r}")


def _check_attention_options(implementation, logits_soft_cap) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation: got {implementation!r}; expected one of "
            f"{', '.join(repr(i) for i in IMPLEMENTATIONS)}"
        )
    if logits_soft_cap is not None and (
        not isinstance(logits_soft_cap, (int, float)) or isinstance(logits_soft_cap, bool)
        or not logits_soft_cap > 0
    ):
        raise ValueError(f"logits_soft_cap: expected a positive number or None; got {logits_soft_cap!r}")


def _check_rope(use_rope: bool, head_dim: int, rope_base) -> None:
    if use_rope:
        if head_dim % 2:
            raise ValueError(
                f"head_dim: RoPE (use_rope=True) rotates pairs of features, so head_dim must be "
                f"even; got {head_dim}"
            )
        if not isinstance(rope_base, (int, float)) or isinstance(rope_base, bool) or not rope_base > 1:
            raise ValueError(f"rope_base: expected a number > 1; got {rope_base!r}")


# ---------------------------------------------------------------------------------
# The attention_fn adapter for Flax's modules.
# ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _matmul_precision(precision):
    if precision is None:
        yield
        return
    if isinstance(precision, (tuple, list)):
        if len(set(precision)) != 1:
            raise ValueError(
                f"precision: jattn uses one matmul precision for the whole call; got the pair "
                f"{precision!r}"
            )
        precision = precision[0]
    name = jax.lax.Precision(precision).name.lower()
    with jax.default_matmul_precision(name):
        yield


def _flatten_batch(name: str, x, batch: tuple[int, ...]):
    """An array broadcastable to ``[batch..., N, T, S]`` -> rank 4 with one batch axis."""
    if x is None:
        return None
    x = jnp.asarray(x)
    nd = len(batch) + 3
    if x.ndim > nd:
        raise ValueError(
            f"{name}: got shape {x.shape}; expected at most rank {nd}, broadcastable to "
            f"[batch..., N, T, S] with batch = {batch}"
        )
    x = x.reshape((1,) * (nd - x.ndim) + x.shape)
    lead, rest = x.shape[: len(batch)], x.shape[len(batch):]
    if all(d == 1 for d in lead):
        return x.reshape((1,) + rest)
    try:
        x = jnp.broadcast_to(x, batch + rest)
    except ValueError:
        raise ValueError(
            f"{name}: got shape {x.shape}; its batch axes do not broadcast to {batch}"
        ) from None
    return x.reshape((-1,) + rest)


def _weights_times_values(weights: Array, value: Array) -> Array:
    """weights ``[B, N, T, S]`` (after dropout) · value ``[B, S, K, Hv]`` -> ``[B, T, N, Hv]``."""
    B, N, T, S = weights.shape
    K, Hv = value.shape[2:]
    w = weights.reshape(B, K, N // K, T, S)
    out = jnp.einsum(
        "BKGTS,BSKH->BTKGH", w, value, preferred_element_type=jnp.result_type(np.float32, value.dtype)
    )
    return out.reshape(B, T, N, Hv).astype(value.dtype)


def _sow(module, weights) -> None:
    if isinstance(module, nnx.Module):
        module.sow(nnx.Intermediate, "attention_weights", weights)
    else:  # a flax.linen Module
        module.sow("intermediates", "attention_weights", weights)


def attention_fn(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Any = None,
    precision: Any = None,
    module: Any = None,
    is_causal: bool = False,
    force_fp32_for_softmax: bool = False,
    qk_attn_weights_einsum: Any = None,
    attn_weights_value_einsum: Any = None,
    *,
    implementation: str | None = None,
    logits_soft_cap: float | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    score_mod: Callable | None = None,
):
    """`jattn.dot_product_attention` with the signature of Flax's
    ``flax.nnx.dot_product_attention`` / ``flax.linen.dot_product_attention``, for
    ``attention_fn=`` of `flax.nnx.MultiHeadAttention` and
    `flax.linen.MultiHeadDotProductAttention` (``jattn.linen.attention_fn`` is this
    same function).

    Shapes: query ``[batch..., T, N, H]``, key ``[batch..., S, K, H]``, value
    ``[batch..., S, K, Hv]`` (any number of batch axes, K dividing N);
    ``bias`` / ``mask`` broadcastable to ``[batch..., N, T, S]``; returns
    ``[batch..., T, N, Hv]``.

    Args:
      query, key, value, bias, mask, is_causal: as in Flax; ``mask`` may be boolean or
        0/1 floats (nonzero = attend).
      broadcast_dropout, dropout_rng, dropout_rate, deterministic: dropout on the
        weights when ``not deterministic and dropout_rate > 0``.  With
        ``broadcast_dropout=True`` (Flax's default) the keep-mask is Flax's own: one
        ``[T, S]`` pattern drawn from ``dropout_rng`` exactly as Flax draws it, shared
        by the batch and the heads; this needs the weights, so it runs the dense
        backend.  With ``broadcast_dropout=False`` jattn's own dropout is used (an
        independent pattern per example and head, as `jattn.dot_product_attention`
        draws it from ``dropout_rng``; every backend supports it).
      dtype: the computation dtype (default: the inputs' promoted dtype).
      precision: a ``jax.lax.Precision`` (or name) for the matmuls.
      module: when given, the weights (before dropout) are sowed into it as Flax does
        (``nnx.Intermediate`` / linen ``intermediates``, name ``attention_weights``).
      force_fp32_for_softmax: accepted; jattn always computes the softmax in float32.
      qk_attn_weights_einsum, attn_weights_value_einsum: custom (e.g. quantized)
        einsums are not supported; passing one raises.
      implementation, logits_soft_cap, local_window_size, score_mod: jattn extras (set
        them with ``functools.partial``).

    Unlike Flax, a query row that no key may attend gives zeros (Flax gives the mean of
    the values).

    Example:
      >>> import jax.numpy as jnp, jattn.nnx
      >>> from flax import nnx
      >>> layer = nnx.MultiHeadAttention(3, 12, attention_fn=jattn.nnx.attention_fn,
      ...                                decode=False, rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((2, 5, 12))).shape
      (2, 5, 12)
    """
    for name, fn in (
        ("qk_attn_weights_einsum", qk_attn_weights_einsum),
        ("attn_weights_value_einsum", attn_weights_value_einsum),
    ):
        if fn is not None:
            raise ValueError(f"{name}: custom einsums are not supported by jattn; got {fn!r}")
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    if dtype is None:
        dtype = jnp.result_type(query.dtype, key.dtype, value.dtype)
    query, key, value = query.astype(dtype), key.astype(dtype), value.astype(dtype)
    if query.ndim < 3:
        raise ValueError(f"query: got shape {query.shape}; expected [batch..., T, N, H]")
    batch = query.shape[:-3]
    for name, x in (("key", key), ("value", value)):
        if x.ndim != query.ndim or x.shape[:-3] != batch:
            raise ValueError(
                f"{name}: got shape {x.shape}; expected the batch axes {batch} of query "
                f"{query.shape} followed by [S, K, H]"
            )
    q, k, v = (x.reshape((-1,) + x.shape[-3:]) for x in (query, key, value))
    bias = _flatten_batch("bias", bias, batch)
    mask = _flatten_batch("mask", mask, batch)
    if mask is not None and mask.dtype != jnp.bool_:
        mask = mask.astype(jnp.bool_)
    kwargs = dict(
        is_causal=bool(is_causal), implementation=implementation,
        logits_soft_cap=logits_soft_cap, local_window_size=local_window_size, score_mod=score_mod,
    )
    drop = (not deterministic) and dropout_rate > 0.0
    if drop and dropout_rng is None:
        raise ValueError(f"dropout_rng: dropout_rate={dropout_rate} with deterministic=False needs a key; got None")

    def unflatten(x):
        return x.reshape(batch + x.shape[1:])

    with _matmul_precision(precision):
        if module is not None:
            _, weights = dot_product_attention(q, k, v, bias, mask, return_weights=True, **kwargs)
            _sow(module, unflatten(weights))
        if drop and broadcast_dropout:
            T, S = q.shape[1], k.shape[1]
            keep_prob = 1.0 - dropout_rate
            # Flax's draw, shape and all, so that the pattern is Flax's.
            keep = jax.random.bernoulli(dropout_rng, keep_prob, (1,) * (len(batch) + 1) + (T, S))
            _, weights = dot_product_attention(q, k, v, bias, mask, return_weights=True, **kwargs)
            multiplier = keep.reshape(1, 1, T, S).astype(weights.dtype) / jnp.asarray(keep_prob, weights.dtype)
            out = _weights_times_values(weights * multiplier, v)
        else:
            out = dot_product_attention(
                q, k, v, bias, mask, dropout_rate=dropout_rate if drop else 0.0,
                dropout_rng=dropout_rng if drop else None, **kwargs,
            )
    return unflatten(out)


# ---------------------------------------------------------------------------------
# NNX modules.
# ---------------------------------------------------------------------------------


def _param_metadata(names: tuple[str, ...], rules) -> dict:
    """``out_sharding`` = logical names; sharded at creation only when a mesh is set and
    rules say what the names mean (otherwise Flax would fail on the unknown names)."""
    have_rules = bool(rules) or bool(flax.core.spmd.get_logical_axis_rules())
    mesh_set = not jax.sharding.get_abstract_mesh().empty
    metadata = {
        "out_sharding": names,
        "eager_sharding": bool(nnx.using_eager_sharding() and mesh_set and have_rules),
    }
    if rules:
        metadata["sharding_rules"] = tuple(tuple(r) for r in rules)
    return metadata


class MultiHeadAttention(nnx.Module):
    r"""Multi-head (cross-)attention: project, attend with
    `jattn.dot_product_attention`, project back.

    .. math:: \mathrm{out} = \mathrm{concat}_n\big(\mathrm{softmax}(
              q_n k_{n//G}^\top / \sqrt{H}) v_{n//G}\big) W^O,\quad
              q = x_q W^Q,\ k = x_k W^K,\ v = x_v W^V

    Shapes: inputs_q ``[B, T, D]``, inputs_k / inputs_v ``[B, S, Dkv]``, output
    ``[B, T, F]``; internally q ``[B, T, N, H]``, k / v ``[B, S, K, H]``.

    The constructor follows `flax.nnx.MultiHeadAttention` (same positional order and
    defaults, same parameter names and shapes: ``query.kernel [D, N, H]``,
    ``key.kernel`` / ``value.kernel [Dkv, K, H]``, ``out.kernel [N, H, F]``), so a
    state copied from a Flax module gives the same outputs.

    Args:
      num_heads: N.
      in_features: D, the feature size of ``inputs_q``.
      qkv_features: N·H (default D); split over the heads unless ``head_dim`` is given.
      out_features: F (default D).
      num_kv_heads: K (default N); N must be a multiple (GQA; 1 is MQA).
      in_kv_features: Dkv (default D).
      head_dim: H (default ``qkv_features // num_heads``).
      use_bias: biases in the four projections.
      dtype, param_dtype: computation and parameter dtypes (as in Flax).
      dropout_rate: dropout on the attention weights (jattn's pattern: independent per
        example and head).
      deterministic: default for the call's ``deterministic`` (needed when
        ``dropout_rate > 0``, as in Flax).
      qk_norm: RMSNorm over H of queries and keys (one scale per feature, shared by the
        heads), before RoPE.  (Flax's ``normalize_qk`` uses LayerNorm instead.)
      qk_norm_epsilon: its epsilon.
      use_rope, rope_base: rotary embeddings (`jattn.positional.apply_rope`) on q and k.
      logits_soft_cap, implementation: passed to `jattn.dot_product_attention`.
      decode: default for the call's ``decode`` (a cache is then required).
      kernel_init, bias_init: initialisers (kernels are initialised as Flax's,
        fan-in = the contracted features).
      sharding_rules: logical-name -> mesh-axis rules stored with the parameters (e.g.
        `LOGICAL_AXIS_RULES`).
      keep_rngs: keep a forked dropout stream of ``rngs`` for the calls.
      rngs: `nnx.Rngs`.

    Example:
      >>> import jax.numpy as jnp, jattn.nnx
      >>> from flax import nnx
      >>> layer = jattn.nnx.MultiHeadAttention(3, 12, num_kv_heads=1, rngs=nnx.Rngs(0))
      >>> xq = jnp.ones((2, 5, 12))                # B=2, T=5, D=12
      >>> xk = jnp.ones((2, 7, 12))                # S=7
      >>> out, weights = layer(xq, xk, return_weights=True)
      >>> out.shape, weights.shape
      ((2, 5, 12), (2, 3, 5, 7))
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        qkv_features: int | None = None,
        out_features: int | None = None,
        num_kv_heads: int | None = None,
        in_kv_features: int | None = None,
        *,
        head_dim: int | None = None,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        dropout_rate: float = 0.0,
        deterministic: bool | None = None,
        qk_norm: bool = False,
        qk_norm_epsilon: float = 1e-6,
        use_rope: bool = False,
        rope_base: float = 10000.0,
        logits_soft_cap: float | None = None,
        implementation: str | None = None,
        decode: bool = False,
        kernel_init: Callable = default_kernel_init,
        bias_init: Callable = initializers.zeros_init(),
        sharding_rules: Sequence[tuple[str, str | None]] | None = None,
        keep_rngs: bool = True,
        rngs: nnx.Rngs,
    ):
        _check_positive_int("in_features", in_features)
        _check_positive_int("qkv_features", qkv_features, allow_none=True)
        _check_positive_int("out_features", out_features, allow_none=True)
        _check_positive_int("in_kv_features", in_kv_features, allow_none=True)
        features_name = "in_features" if qkv_features is None else "qkv_features"
        qkv = in_features if qkv_features is None else qkv_features
        N, K, H = _resolve_heads(num_heads, qkv, num_kv_heads, head_dim, features_name=features_name)
        if head_dim is not None and qkv_features is not None and qkv_features != N * H:
            raise ValueError(
                f"qkv_features: got {qkv_features} with num_heads={N}, head_dim={H}; expected "
                f"num_heads * head_dim = {N * H} (or leave one of them out)"
            )
        _check_dropout_rate(dropout_rate)
        _check_rope(use_rope, H, rope_base)
        _check_attention_options(implementation, logits_soft_cap)
        self.num_heads, self.num_kv_heads, self.head_dim = N, K, H
        self.in_features = int(in_features)
        self.in_kv_features = int(in_features if in_kv_features is None else in_kv_features)
        self.out_features = int(in_features if out_features is None else out_features)
        self.use_bias = use_bias
        self.dtype, self.param_dtype = dtype, param_dtype
        self.dropout_rate = float(dropout_rate)
        self.deterministic = deterministic
        self.qk_norm = qk_norm
        self.use_rope, self.rope_base = bool(use_rope), float(rope_base)
        self.logits_soft_cap = logits_soft_cap
        self.implementation = implementation
        self.decode = decode
        self.sharding_rules = None if sharding_rules is None else tuple(tuple(r) for r in sharding_rules)

        def linear(in_f, out_f, kernel_names, bias_names, **kw):
            return nnx.LinearGeneral(
                in_f, out_f, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                kernel_init=kernel_init, bias_init=bias_init, rngs=rngs,
                kernel_metadata=_param_metadata(kernel_names, self.sharding_rules),
                bias_metadata=_param_metadata(bias_names, self.sharding_rules), **kw,
            )

        self.query = linear(self.in_features, (N, H), ("embed", "heads", "head_dim"), ("heads", "head_dim"))
        self.key = linear(self.in_kv_features, (K, H), ("embed", "kv_heads", "head_dim"), ("kv_heads", "head_dim"))
        self.value = linear(self.in_kv_features, (K, H), ("embed", "kv_heads", "head_dim"), ("kv_heads", "head_dim"))
        self.out = linear((N, H), self.out_features, ("heads", "head_dim", "embed"), ("embed",), axis=(-2, -1))
        if qk_norm:
            def norm():
                return nnx.RMSNorm(
                    H, epsilon=qk_norm_epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                    scale_metadata=_param_metadata(("head_dim",), self.sharding_rules),
                )
            self.query_norm, self.key_norm = norm(), norm()
        else:
            self.query_norm, self.key_norm = nnx.data(None), nnx.data(None)
        self.rngs = rngs.dropout.fork() if keep_rngs and dropout_rate > 0 else nnx.data(None)

    def set_view(self, deterministic: bool | None = None, decode: bool | None = None):
        """For `nnx.view`: set the ``deterministic`` / ``decode`` defaults."""
        if deterministic is not None:
            self.deterministic = deterministic
        if decode is not None:
            self.decode = decode

    def create_cache(self, batch_size: int, max_length: int, dtype: Any = None) -> KVCache:
        """An empty `KVCache` shaped for this module (dtype: ``dtype``, else the
        module's computation dtype, else its parameter dtype)."""
        return KVCache.create(
            batch_size, max_length, self.num_kv_heads, self.head_dim,
            dtype=dtype or self.dtype or self.param_dtype,
        )

    def _dropout_rng(self, deterministic, rngs):
        if self.dropout_rate == 0.0:
            return None
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic is None:
            raise ValueError(
                f"deterministic: dropout_rate={self.dropout_rate} needs deterministic=True "
                f"(no dropout) or False, given to the constructor, the call or nnx.view"
            )
        if deterministic:
            return None
        rngs = self.rngs if rngs is None else rngs
        if rngs is None:
            raise ValueError(
                "rngs: dropout with deterministic=False needs random keys; pass rngs= to the "
                "call (the module was built with keep_rngs=False)"
            )
        if isinstance(rngs, nnx.Rngs):
            return rngs.dropout()
        if isinstance(rngs, nnx.RngStream):
            return rngs()
        if isinstance(rngs, jax.Array):
            return rngs
        raise TypeError(f"rngs: expected nnx.Rngs, an nnx.RngStream or a jax.random.key; got {type(rngs).__name__}")

    def __call__(
        self,
        inputs_q: Array,
        inputs_k: Array | None = None,
        inputs_v: Array | None = None,
        *,
        mask: Any = None,
        bias: Array | None = None,
        is_causal: bool = False,
        query_seq_lengths: Array | None = None,
        key_value_seq_lengths: Array | None = None,
        query_segment_ids: Array | None = None,
        key_value_segment_ids: Array | None = None,
        local_window_size: int | tuple[int, int] | None = None,
        query_offset: int | Array = 0,
        score_mod: Callable | None = None,
        positions: Array | None = None,
        key_positions: Array | None = None,
        cache: KVCache | None = None,
        decode: bool | None = None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | Array | None = None,
        return_weights: bool = False,
    ):
        """Attend from ``inputs_q`` to ``inputs_k`` / ``inputs_v``.

        Args:
          inputs_q: ``[B, T, D]``.
          inputs_k: ``[B, S, Dkv]`` (default ``inputs_q``: self-attention).
          inputs_v: ``[B, S, Dkv]`` (default ``inputs_k``).
          mask, bias, is_causal, query_seq_lengths, key_value_seq_lengths,
            query_segment_ids, key_value_segment_ids, local_window_size, query_offset,
            score_mod: as in `jattn.dot_product_attention` (mask broadcastable to
            ``[B, N, T, S]``, a `jattn.masks.Mask` or a mask function).
          positions: int ``[B, T]`` (or ``[T]``) query positions for RoPE (default
            ``arange(T)``, after a cache: ``cache.lengths[:, None] + arange(T)``).
          key_positions: int ``[B, S]`` key positions for RoPE (default: ``positions``
            for self-attention and in decode mode, else ``arange(S)``).
          cache: a `jattn.cache.KVCache`: decode mode.  The new tokens' keys and values
            are written after each sequence's length and the queries attend to the
            whole cache (``is_causal`` aligned per sequence); ``query_seq_lengths``
            then says how many of the T tokens are real (ragged prompts).  Returns
            the new cache too.
          decode: require a cache (default: the constructor's ``decode``).
          deterministic: no dropout if True (default: the constructor's).
          rngs: random keys for dropout (default: the module's own stream).
          return_weights: also return the weights ``[B, N, T, S]`` (``S = M`` in
            decode mode).

        Returns:
          ``out [B, T, F]``; ``(out, new_cache)`` with a cache; with
          ``return_weights`` the weights are appended: ``(out, weights)`` or
          ``(out, new_cache, weights)``.
        """
        inputs_k, inputs_v, self_attention = _default_inputs(inputs_q, inputs_k, inputs_v)
        _check_features("inputs_q", inputs_q, self.in_features, "in_features")
        if self_attention and self.in_kv_features != self.in_features:
            raise ValueError(
                f"inputs_k: None (self-attention), but the key/value projections take "
                f"in_kv_features={self.in_kv_features} features and inputs_q has "
                f"{self.in_features}; pass inputs_k"
            )
        _check_features("inputs_k", inputs_k, self.in_kv_features, "in_kv_features")
        _check_features("inputs_v", inputs_v, self.in_kv_features, "in_kv_features")
        _check_kv_and_decode(inputs_k, inputs_v, decode, cache)
        decode = self.decode if decode is None else decode

        query = self.query(inputs_q)
        key = self.key(inputs_k)
        value = self.value(inputs_v)
        if self.query_norm is not None:
            query, key = self.query_norm(query), self.key_norm(key)
        dropout_rng = self._dropout_rng(deterministic, rngs)
        attention_kwargs = _attention_kwargs(
            bias=bias, mask=mask, is_causal=is_causal, query_seq_lengths=query_seq_lengths,
            key_value_seq_lengths=key_value_seq_lengths, query_segment_ids=query_segment_ids,
            key_value_segment_ids=key_value_segment_ids, local_window_size=local_window_size,
            query_offset=query_offset, score_mod=score_mod, logits_soft_cap=self.logits_soft_cap,
            implementation=self.implementation, dropout_rate=self.dropout_rate, dropout_rng=dropout_rng,
        )
        out, new_cache, weights = _attend(
            query, key, value, self_attention=self_attention, use_rope=self.use_rope,
            rope_base=self.rope_base, positions=positions, key_positions=key_positions,
            cache=cache, decode=bool(decode), attention_kwargs=attention_kwargs,
            return_weights=return_weights,
        )
        out = self.out(out)
        return _pack_outputs(out, new_cache, weights, with_cache=cache is not None, return_weights=return_weights)


class SelfAttention(MultiHeadAttention):
    """Self-attention over one sequence ``x [B, T, D]`` (causal by default), the
    building block of a decoder; see `MultiHeadAttention` for the options.

    Differences from `MultiHeadAttention`: ``in_features`` comes first and
    ``use_bias`` defaults to False; the call takes ``positions`` (RoPE),
    ``segment_ids`` (packing: attend within a segment) and ``lengths`` (padding: the
    first ``lengths[b]`` tokens of sequence b are real; with a cache, how many of the
    T new tokens to append).

    Args:
      in_features: D (also the output size unless ``out_features`` is given).
      num_heads: N; D must be a multiple unless ``head_dim`` is given.
      num_kv_heads, head_dim, use_bias, dtype, param_dtype, dropout_rate, deterministic,
        qk_norm, qk_norm_epsilon, use_rope, rope_base, logits_soft_cap, implementation,
        decode, kernel_init, bias_init, sharding_rules, keep_rngs, rngs: as in
        `MultiHeadAttention`.
      out_features: F (default D).

    Example (a ragged prefill, then one decoding step):
      >>> import jax, jax.numpy as jnp, jattn.nnx
      >>> from flax import nnx
      >>> layer = jattn.nnx.SelfAttention(12, 3, num_kv_heads=1, use_rope=True,
      ...                                 rngs=nnx.Rngs(0))
      >>> cache = layer.create_cache(batch_size=2, max_length=8)
      >>> prompt = jnp.ones((2, 4, 12))                  # padded prompts
      >>> out, cache = layer(prompt, cache=cache, lengths=jnp.array([4, 2]))
      >>> token = jnp.ones((2, 1, 12))
      >>> out, cache = layer(token, cache=cache)
      >>> out.shape, cache.lengths.tolist()
      ((2, 1, 12), [5, 3])
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        out_features: int | None = None,
        use_bias: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        dropout_rate: float = 0.0,
        deterministic: bool | None = None,
        qk_norm: bool = False,
        qk_norm_epsilon: float = 1e-6,
        use_rope: bool = False,
        rope_base: float = 10000.0,
        logits_soft_cap: float | None = None,
        implementation: str | None = None,
        decode: bool = False,
        kernel_init: Callable = default_kernel_init,
        bias_init: Callable = initializers.zeros_init(),
        sharding_rules: Sequence[tuple[str, str | None]] | None = None,
        keep_rngs: bool = True,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            num_heads, in_features, out_features=out_features, num_kv_heads=num_kv_heads,
            head_dim=head_dim, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
            dropout_rate=dropout_rate, deterministic=deterministic, qk_norm=qk_norm,
            qk_norm_epsilon=qk_norm_epsilon, use_rope=use_rope, rope_base=rope_base,
            logits_soft_cap=logits_soft_cap, implementation=implementation, decode=decode,
            kernel_init=kernel_init, bias_init=bias_init, sharding_rules=sharding_rules,
            keep_rngs=keep_rngs, rngs=rngs,
        )

    def __call__(  # type: ignore[override]
        self,
        x: Array,
        *,
        positions: Array | None = None,
        is_causal: bool = True,
        mask: Any = None,
        bias: Array | None = None,
        segment_ids: Array | None = None,
        lengths: Array | None = None,
        local_window_size: int | tuple[int, int] | None = None,
        score_mod: Callable | None = None,
        cache: KVCache | None = None,
        decode: bool | None = None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | Array | None = None,
        return_weights: bool = False,
    ):
        """Self-attention over ``x [B, T, D]``.

        Args:
          x: ``[B, T, D]``.
          positions: int ``[B, T]`` (or ``[T]``) positions for RoPE; default
            ``arange(T)``, or after a cache ``cache.lengths[:, None] + arange(T)``.
            For packed sequences pass positions that restart in each segment.
          is_causal: token t attends tokens ``<= t`` (in decode mode: cache slots
            ``<= cache.lengths[b] + t``).
          mask, bias, local_window_size, score_mod: as in `jattn.dot_product_attention`.
          segment_ids: int ``[B, T]``: attend only within the same segment (not with a
            cache).
          lengths: int ``[B]``: real tokens per sequence (the rest is padding: its
            outputs are zeros before the output projection and it is never attended);
            with a cache, how many of the T tokens to append.
          cache: a `jattn.cache.KVCache`: decode mode; returns ``(out, new_cache)``.
          decode, deterministic, rngs, return_weights: as in `MultiHeadAttention`.

        Returns:
          ``out [B, T, F]``; ``(out, new_cache)`` with a cache; with
          ``return_weights`` the weights ``[B, N, T, S]`` are appended.
        """
        decoding = cache is not None or bool(self.decode if decode is None else decode)
        _check_self_attention_args(x, segment_ids, lengths, decoding)
        return super().__call__(
            x, mask=mask, bias=bias, is_causal=is_causal, query_seq_lengths=lengths,
            key_value_seq_lengths=None if decoding else lengths,
            query_segment_ids=segment_ids, local_window_size=local_window_size,
            score_mod=score_mod, positions=positions, cache=cache, decode=decode,
            deterministic=deterministic, rngs=rngs, return_weights=return_weights,
        )
