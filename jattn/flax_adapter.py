"""`attention_fn`: jattn inside Flax's own attention modules.

Pass it as ``attention_fn=`` to `flax.nnx.MultiHeadAttention` or
`flax.linen.MultiHeadDotProductAttention`; it accepts every argument those modules
hand their attention function, and every parameter of Flax's
``flax.nnx.dot_product_attention`` and ``flax.linen.dot_product_attention``.
`jattn.nnx.attention_fn` and `jattn.linen.attention_fn` are this same function.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jattn import _flax_core as core
from jattn import options as options_lib

Array = jax.Array

__all__ = ["attention_fn"]

# jattn's options that Flax's interface lacks (set them with functools.partial); the
# Flax-named ones (is_causal, dropout_rate, precision) are Flax's own parameters.
ADAPTER_OPTIONS: tuple[str, ...] = tuple(
    n for n in core.CALL_OPTIONS + core.CONFIG_OPTIONS if n not in ("is_causal", "dropout_rate", "precision")
)


def _sow(module, weights) -> None:
    """Sow into an NNX module (``nnx.Intermediate``) or a Linen one
    (``'intermediates'``), under Flax's name ``attention_weights``."""
    if isinstance(module, nnx.Module):
        module.sow(nnx.Intermediate, "attention_weights", weights)
    else:
        module.sow("intermediates", "attention_weights", weights)


def _refuse_custom_matmuls(qk_attn_weights_einsum, attn_weights_value_einsum, einsum_dot_general) -> None:
    for name, fn in (
        ("qk_attn_weights_einsum", qk_attn_weights_einsum),
        ("attn_weights_value_einsum", attn_weights_value_einsum),
    ):
        if fn is not None:
            raise ValueError(
                f"{name}: custom einsums are not supported by jattn; got {fn!r}.  jattn's backends "
                f"compute both matmuls themselves (fused or tiled), so a replacement einsum (e.g. a "
                f"quantized one) has nowhere to go; use Flax's dot_product_attention for it"
            )
    if einsum_dot_general is not None and einsum_dot_general is not jax.lax.dot_general:
        raise ValueError(
            f"einsum_dot_general: a custom dot_general is not supported by jattn; got "
            f"{einsum_dot_general!r}.  jattn's backends compute both matmuls themselves (fused or "
            f"tiled); only jax.lax.dot_general (the default) means the same"
        )


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
    qk_attn_weights_einsum: Callable | None = None,
    attn_weights_value_einsum: Callable | None = None,
    *,
    promote_dtype: Callable | None = None,
    einsum_dot_general: Callable | None = None,
    **options,
):
    """`jattn.dot_product_attention` with the signature of Flax's
    ``flax.nnx.dot_product_attention`` / ``flax.linen.dot_product_attention``, for
    ``attention_fn=`` of `flax.nnx.MultiHeadAttention` and
    `flax.linen.MultiHeadDotProductAttention`.

    Shapes: query ``[batch..., T, N, H]``, key ``[batch..., S, K, H]``, value
    ``[batch..., S, K, Hv]`` (any number of batch axes, K dividing N);
    ``bias`` / ``mask`` broadcastable to ``[batch..., N, T, S]``; returns
    ``[batch..., T, N, Hv]``.

    Args:
      query, key, value, bias, mask, is_causal: as in Flax; ``mask`` may be boolean or
        0/1 floats (nonzero = attend, as Flax reads it).
      broadcast_dropout, dropout_rng, dropout_rate, deterministic: dropout on the
        weights when ``not deterministic and dropout_rate > 0``.  With
        ``broadcast_dropout=True`` (Flax's default) the keep-mask is Flax's own: one
        ``[T, S]`` pattern drawn from ``dropout_rng`` exactly as Flax draws it, shared
        by the batch and the heads; this needs the weights, so it runs the dense
        backend.  With ``broadcast_dropout=False`` jattn's own dropout is used (an
        independent pattern per example and head, as Flax's is, drawn by
        `jattn.dot_product_attention` from ``dropout_rng``; every backend supports it).
      dtype: the computation dtype (default: the inputs' promoted dtype).
      precision: the matmuls' precision (`jattn.dot_product_attention`'s ``precision``).
      module: when given, the weights (before dropout) are sowed into it as Flax does
        (``nnx.Intermediate`` / linen ``intermediates``, name ``attention_weights``).
      force_fp32_for_softmax: accepted; jattn always computes the softmax in float32.
      qk_attn_weights_einsum, attn_weights_value_einsum, einsum_dot_general: custom
        (e.g. quantized) matmuls cannot be used by jattn's backends; passing one raises.
      promote_dtype: Flax NNX's promotion function, called as
        ``promote_dtype((query, key, value), dtype=dtype)`` (default: promote to
        ``dtype`` or to the inputs' common dtype).
      {options}

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
    _refuse_custom_matmuls(qk_attn_weights_einsum, attn_weights_value_einsum, einsum_dot_general)
    del force_fp32_for_softmax   # jattn's softmax is float32 whatever the dtype
    opts = options_lib.complete(options, where="jattn attention_fn", allowed=ADAPTER_OPTIONS)
    if promote_dtype is not None:
        query, key, value = promote_dtype((query, key, value), dtype=dtype)
    else:
        query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
        dtype = jnp.result_type(query.dtype, key.dtype, value.dtype) if dtype is None else dtype
        query, key, value = query.astype(dtype), key.astype(dtype), value.astype(dtype)
    if query.ndim < 3:
        raise ValueError(f"query: got shape {query.shape}; expected [batch..., T, N, H]")
    batch = core.Batch(tuple(query.shape[:-3]))
    for name, x in (("key", key), ("value", value)):
        if x.ndim != query.ndim or x.shape[:-3] != batch.shape:
            raise ValueError(
                f"{name}: got shape {x.shape}; expected the batch axes {batch.shape} of query "
                f"{query.shape} followed by [S, K, H]"
            )
    drop = (not deterministic) and dropout_rate > 0.0
    if drop and dropout_rng is None:
        raise ValueError(f"dropout_rng: dropout_rate={dropout_rate} with deterministic=False needs a key; got None")
    dropout = core.Dropout(dropout_rate, dropout_rng, bool(broadcast_dropout), batch.ndim) if drop else None
    attended = core.run(
        batch.flat(query), batch.flat(key), batch.flat(value), batch=batch, mask=mask, bias=bias,
        options={**opts, "is_causal": bool(is_causal), "precision": precision},
        dropout=dropout, sow=module is not None,
    )
    if module is not None:
        _sow(module, batch.unflat(attended.sowed))
    return batch.unflat(attended.out)


attention_fn.__signature__ = core.signature_with_options(attention_fn, ADAPTER_OPTIONS)
attention_fn.__doc__ = attention_fn.__doc__.replace("{options}", core.options_doc(ADAPTER_OPTIONS, indent=6))
