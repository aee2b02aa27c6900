"""Flax Linen twins of `jattn.nnx`: `MultiHeadAttention`, `SelfAttention` and the
``attention_fn`` adapter (the same function as `jattn.nnx.attention_fn`).

The modules take the same options as their NNX twins, with Linen conventions: the
input feature size is inferred at ``init``; ``deterministic`` is given either to the
constructor or to the call (exactly one, as `flax.linen.merge_param` requires); dropout
keys come from the ``'dropout'`` RNG stream (or ``dropout_rng=``).  The parameter tree
is `flax.linen.MultiHeadDotProductAttention`'s (``query/key/value/out`` with
``kernel [D, N, H]`` / ``[D, K, H]`` / ``[N, H, F]`` and ``bias``), so parameters
copy across.

Decoding is functional, as in NNX: pass ``cache=`` (a `jattn.cache.KVCache`) and get
``(out, new_cache)`` back; no mutable ``'cache'`` collection is involved, so
``module.apply(variables, x, cache=cache)`` needs no ``mutable=``.  With
``return_weights=True`` the weights ``[B, N, T, S]`` come last.

Parameters are boxed with logical axis names (`flax.linen.with_logical_partitioning`:
``embed``, ``heads``, ``kv_heads``, ``head_dim``); map them to a mesh with
``nn.logical_to_mesh_sharding(nn.get_partition_spec(variables), mesh,
jattn.linen.LOGICAL_AXIS_RULES)``.

Example:
  >>> import jax, jax.numpy as jnp, jattn.linen
  >>> layer = jattn.linen.SelfAttention(num_heads=3, num_kv_heads=1, use_rope=True)
  >>> x = jnp.ones((2, 5, 12))                  # B=2, T=5, D=12
  >>> variables = layer.init(jax.random.key(1), x)
  >>> layer.apply(variables, x).shape
  (2, 5, 12)
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jattn.cache import KVCache
from jattn.nnx import (  # the helpers shared with the NNX modules
    LOGICAL_AXIS_RULES,
    _attend,
    _attention_kwargs,
    _check_attention_options,
    _check_dropout_rate,
    _check_features,
    _check_kv_and_decode,
    _check_rope,
    _check_self_attention_args,
    _default_inputs,
    _pack_outputs,
    _resolve_heads,
    attention_fn,
    default_kernel_init,
)

Array = jax.Array

__all__ = ["LOGICAL_AXIS_RULES", "MultiHeadAttention", "SelfAttention", "attention_fn"]


class MultiHeadAttention(nn.Module):
    """Multi-head (cross-)attention on `jattn.dot_product_attention`; the Linen twin of
    `jattn.nnx.MultiHeadAttention` (see there for the maths and the options).

    Shapes: inputs_q ``[B, T, D]``, inputs_k / inputs_v ``[B, S, Dkv]``, output
    ``[B, T, F]``; q ``[B, T, N, H]``, k / v ``[B, S, K, H]``.

    Attributes:
      num_heads: N.
      qkv_features: N·H (default D, inferred from ``inputs_q``).
      out_features: F (default D).
      num_kv_heads: K (default N; GQA / MQA).
      head_dim: H (default ``qkv_features // num_heads``).
      use_bias, dtype, param_dtype, dropout_rate, deterministic, qk_norm,
        qk_norm_epsilon, use_rope, rope_base, logits_soft_cap, implementation, decode,
        kernel_init, bias_init: as in `jattn.nnx.MultiHeadAttention`.

    Example:
      >>> import jax, jax.numpy as jnp, jattn.linen
      >>> layer = jattn.linen.MultiHeadAttention(num_heads=3, num_kv_heads=1)
      >>> xq = jnp.ones((2, 5, 12))                # B=2, T=5, D=12
      >>> xk = jnp.ones((2, 7, 12))                # S=7
      >>> variables = layer.init(jax.random.key(0), xq, xk)
      >>> out, weights = layer.apply(variables, xq, xk, return_weights=True)
      >>> out.shape, weights.shape
      ((2, 5, 12), (2, 3, 5, 7))
    """

    num_heads: int
    qkv_features: int | None = None
    out_features: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    dropout_rate: float = 0.0
    deterministic: bool | None = None
    qk_norm: bool = False
    qk_norm_epsilon: float = 1e-6
    use_rope: bool = False
    rope_base: float = 10000.0
    logits_soft_cap: float | None = None
    implementation: str | None = None
    decode: bool = False
    kernel_init: Callable = default_kernel_init
    bias_init: Callable = nn.initializers.zeros_init()

    def _heads(self, in_features: int | None) -> tuple[int, int, int]:
        features_name = "qkv_features" if self.qkv_features is not None else "in_features"
        features = self.qkv_features if self.qkv_features is not None else in_features
        N, K, H = _resolve_heads(
            self.num_heads, features, self.num_kv_heads, self.head_dim, features_name=features_name
        )
        if self.head_dim is not None and self.qkv_features is not None and self.qkv_features != N * H:
            raise ValueError(
                f"qkv_features: got {self.qkv_features} with num_heads={N}, head_dim={H}; "
                f"expected num_heads * head_dim = {N * H} (or leave one of them out)"
            )
        return N, K, H

    def create_cache(
        self, batch_size: int, max_length: int, in_features: int | None = None, dtype: Any = None
    ) -> KVCache:
        """An empty `KVCache` for this module (``in_features`` is needed only when
        neither ``head_dim`` nor ``qkv_features`` fixes the head dim)."""
        if self.head_dim is None and self.qkv_features is None and in_features is None:
            raise ValueError(
                "in_features: needed to size the cache (head_dim = in_features // num_heads) "
                "when the module has neither head_dim nor qkv_features"
            )
        _, K, H = self._heads(in_features)
        return KVCache.create(batch_size, max_length, K, H, dtype=dtype or self.dtype or self.param_dtype)

    def _trained_features(self, name: str) -> int | None:
        """The input size the ``name`` projection was initialised with, if it exists."""
        params = self.variables.get("params", {})
        if name not in params:
            return None
        return nn.meta.unbox(params[name]["kernel"]).shape[0]

    @nn.compact
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
        dropout_rng: Array | None = None,
        return_weights: bool = False,
    ):
        """Attend from ``inputs_q`` to ``inputs_k`` / ``inputs_v``.

        The arguments are those of `jattn.nnx.MultiHeadAttention.__call__`, except
        ``dropout_rng`` (a key; default ``self.make_rng('dropout')``) in place of
        ``rngs``.

        Returns:
          ``out [B, T, F]``; ``(out, new_cache)`` with a cache; with
          ``return_weights`` the weights ``[B, N, T, S]`` are appended.
        """
        inputs_k, inputs_v, self_attention = _default_inputs(inputs_q, inputs_k, inputs_v)
        if jnp.ndim(inputs_q) < 2:
            raise ValueError(f"inputs_q: got shape {jnp.shape(inputs_q)}; expected [B, T, D]")
        for name, x, proj in (("inputs_q", inputs_q, "query"), ("inputs_k", inputs_k, "key"), ("inputs_v", inputs_v, "value")):
            trained = self._trained_features(proj)
            if trained is not None:
                _check_features(name, x, trained, f"the {trained} features the module was initialised with")
        _check_kv_and_decode(inputs_k, inputs_v, decode, cache)
        decode = self.decode if decode is None else decode
        _check_dropout_rate(self.dropout_rate)
        N, K, H = self._heads(inputs_q.shape[-1])
        _check_rope(self.use_rope, H, self.rope_base)
        _check_attention_options(self.implementation, self.logits_soft_cap)
        features = self.out_features or inputs_q.shape[-1]

        def dense(features, kernel_names, bias_names, name, axis=-1):
            return nn.DenseGeneral(
                features, axis=axis, use_bias=self.use_bias, dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(self.kernel_init, kernel_names),
                bias_init=nn.with_logical_partitioning(self.bias_init, bias_names), name=name,
            )

        query = dense((N, H), ("embed", "heads", "head_dim"), ("heads", "head_dim"), "query")(inputs_q)
        key = dense((K, H), ("embed", "kv_heads", "head_dim"), ("kv_heads", "head_dim"), "key")(inputs_k)
        value = dense((K, H), ("embed", "kv_heads", "head_dim"), ("kv_heads", "head_dim"), "value")(inputs_v)
        if self.qk_norm:
            def norm(name):
                return nn.RMSNorm(
                    epsilon=self.qk_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                    scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("head_dim",)),
                    name=name,
                )
            query, key = norm("query_norm")(query), norm("key_norm")(key)

        if self.dropout_rate > 0.0:
            deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
            if not deterministic and dropout_rng is None:
                dropout_rng = self.make_rng("dropout")
        if self.dropout_rate == 0.0 or deterministic:
            dropout_rng = None
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
        out = dense(features, ("heads", "head_dim", "embed"), ("embed",), "out", axis=(-2, -1))(out)
        return _pack_outputs(out, new_cache, weights, with_cache=cache is not None, return_weights=return_weights)


class SelfAttention(MultiHeadAttention):
    """Self-attention over one sequence ``x [B, T, D]``, causal by default: the Linen
    twin of `jattn.nnx.SelfAttention` (``positions``, ``segment_ids``, ``lengths``,
    ``cache``).  ``use_bias`` defaults to False here too.

    Example (a ragged prefill, then one decoding step):
      >>> import jax, jax.numpy as jnp, jattn.linen
      >>> layer = jattn.linen.SelfAttention(num_heads=3, num_kv_heads=1, use_rope=True)
      >>> prompt = jnp.ones((2, 4, 12))                  # padded prompts
      >>> variables = layer.init(jax.random.key(1), prompt)
      >>> cache = layer.create_cache(batch_size=2, max_length=8, in_features=12)
      >>> out, cache = layer.apply(variables, prompt, cache=cache, lengths=jnp.array([4, 2]))
      >>> token = jnp.ones((2, 1, 12))
      >>> out, cache = layer.apply(variables, token, cache=cache)
      >>> out.shape, cache.lengths.tolist()
      ((2, 1, 12), [5, 3])
    """

    use_bias: bool = False

    @nn.compact
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
        dropout_rng: Array | None = None,
        return_weights: bool = False,
    ):
        """Self-attention over ``x [B, T, D]``; the arguments are those of
        `jattn.nnx.SelfAttention.__call__` (``dropout_rng`` in place of ``rngs``)."""
        decoding = cache is not None or bool(self.decode if decode is None else decode)
        _check_self_attention_args(x, segment_ids, lengths, decoding)
        return super().__call__(
            x, mask=mask, bias=bias, is_causal=is_causal, query_seq_lengths=lengths,
            key_value_seq_lengths=None if decoding else lengths,
            query_segment_ids=segment_ids, local_window_size=local_window_size,
            score_mod=score_mod, positions=positions, cache=cache, decode=decode,
            deterministic=deterministic, dropout_rng=dropout_rng, return_weights=return_weights,
        )
