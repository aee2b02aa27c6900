"""Flax Linen twins of `jattn.nnx`: `MultiHeadAttention`, `SelfAttention` and the
``attention_fn`` adapter (`jattn.flax_adapter.attention_fn`, the same function as
`jattn.nnx.attention_fn`).

`MultiHeadAttention` is a drop-in for `flax.linen.MultiHeadDotProductAttention`: its
fields (same order and defaults) and call arguments mean the same here, and the
parameter tree is the same (``query/key/value/out`` with ``kernel [D, N, H]`` /
``[D, K, H]`` / ``[N, H, F]`` and ``bias``; ``query_ln`` / ``key_ln`` with
``normalize_qk``), so parameters copy across.  jattn's own fields follow Flax's:
``num_kv_heads``, ``head_dim``, ``qk_norm``, RoPE, and the attention options of
`jattn.options` (``implementation``, ``logits_soft_cap``, ...).

Linen conventions: the input feature size is inferred at ``init``; ``deterministic``
is given either to the constructor or to the call (exactly one, as
`flax.linen.merge_param` requires); dropout keys come from the ``'dropout'`` RNG stream
(or ``dropout_rng=``).

Decoding, two ways:

* functional, as in NNX: pass ``cache=`` (a `jattn.cache.KVCache`) and get
  ``(out, new_cache)`` back; no mutable collection is involved;
* stateful, as in Flax: with ``decode=True`` and no ``cache=``, ``init`` over inputs
  ``[batch..., max_length, D]`` creates the ``'cache'`` collection (a `KVCache` named
  ``kv_cache``), and ``apply(..., mutable=['cache'])`` appends each call's tokens to it.

Return rule: ``out``; then the new cache if ``cache=`` was passed; then the weights
``[batch..., N, T, S]`` if ``return_weights=True``; a tuple when more than one.

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

import inspect
import warnings
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jattn import _flax_core as core
from jattn.cache import KVCache
from jattn.flax_adapter import attention_fn

Array = jax.Array

__all__ = ["LOGICAL_AXIS_RULES", "MultiHeadAttention", "SelfAttention", "attention_fn"]

LOGICAL_AXIS_RULES = core.LOGICAL_AXIS_RULES
_STATEFUL_HINT = (
    "initialise the 'cache' collection as in flax.linen (module.init(...) with decode=True "
    "over inputs [batch..., max_length, D]) and apply with mutable=['cache']"
)


class MultiHeadAttention(nn.Module):
    """Multi-head (cross-)attention on `jattn.dot_product_attention`; a drop-in for
    `flax.linen.MultiHeadDotProductAttention` and the Linen twin of
    `jattn.nnx.MultiHeadAttention` (see there for the maths and the options).

    Shapes: inputs_q ``[batch..., T, D]``, inputs_k / inputs_v ``[batch..., S, Dkv]``,
    output ``[batch..., T, F]``; q ``[B, T, N, H]``, k / v ``[B, S, K, H]`` with the
    batch axes flattened into B.

    Attributes (Flax's first, in Flax's order):
      num_heads: N.
      dtype, param_dtype: computation and parameter dtypes.
      qkv_features: N·H (default D, inferred from ``inputs_q``).
      out_features: F (default D).
      broadcast_dropout: True (Flax's default): one dropout pattern ``[T, S]`` shared by
        every example and head, drawn exactly as Flax draws it (dense backend); False:
        independent per example and head (jattn's own dropout, every backend).
      dropout_rate, deterministic: dropout on the attention weights (as in Flax).
      precision: of the four projections and the two attention matmuls.
      kernel_init, out_kernel_init, bias_init, out_bias_init, use_bias: as in Flax.
      attention_fn: None (jattn's attention) or a function with the interface of
        ``flax.linen.dot_product_attention``, called as Flax's module calls it.
      decode: decode with a KV cache (``cache=``, or the stateful ``'cache'``
        collection as in Flax).
      normalize_qk: Flax's QK-norm (LayerNorm over H, parameters ``query_ln`` /
        ``key_ln``).
      force_fp32_for_softmax: accepted for Flax's sake: jattn's softmax is always
        float32 (the attention output is then cast to the computation dtype, where
        Flax's stays float32 until the output projection casts it).
      qkv_dot_general, out_dot_general, qkv_dot_general_cls, out_dot_general_cls: the
        projections' dot_general (as in Flax).
      qk_attn_weights_einsum_cls, attn_weights_value_einsum_cls: custom (quantized)
        attention einsums: passed to a custom ``attention_fn``; jattn's own attention
        cannot use them and raises.
      num_kv_heads: K (default N; GQA / MQA).
      head_dim: H (default ``qkv_features // num_heads``).
      qk_norm, qk_norm_epsilon: jattn's RMS QK-norm (parameters ``query_norm`` /
        ``key_norm``); exclusive with ``normalize_qk``.
      use_rope, rope_base: rotary embeddings on q and k.
      {config_options}

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

    # flax.linen.MultiHeadDotProductAttention's fields, in its order.
    num_heads: int
    dtype: Any = None
    param_dtype: Any = jnp.float32
    qkv_features: int | None = None
    out_features: int | None = None
    broadcast_dropout: bool = True
    dropout_rate: float = 0.0
    deterministic: bool | None = None
    precision: Any = None
    kernel_init: Callable = core.default_kernel_init
    out_kernel_init: Callable | None = None
    bias_init: Callable = nn.initializers.zeros_init()
    out_bias_init: Callable | None = None
    use_bias: bool = True
    attention_fn: Callable | None = None
    decode: bool = False
    normalize_qk: bool = False
    force_fp32_for_softmax: bool = False
    qkv_dot_general: Any = None
    out_dot_general: Any = None
    qkv_dot_general_cls: Any = None
    out_dot_general_cls: Any = None
    qk_attn_weights_einsum_cls: Callable | None = None
    attn_weights_value_einsum_cls: Callable | None = None
    # jattn's own.
    num_kv_heads: int | None = None
    head_dim: int | None = None
    qk_norm: bool = False
    qk_norm_epsilon: float = 1e-6
    use_rope: bool = False
    rope_base: float = 10000.0
    # implementation, logits_soft_cap, block_sizes, ...: from the schema.
    core.declare_option_fields(vars(), core.JATTN_CONFIG_OPTIONS)

    def _heads(self, in_features: int | None) -> tuple[int, int, int]:
        features_name = "qkv_features" if self.qkv_features is not None else "in_features"
        features = self.qkv_features if self.qkv_features is not None else in_features
        return core.resolve_heads(
            self.num_heads, features, self.num_kv_heads, self.head_dim, features_name=features_name,
            qkv_features=self.qkv_features,
        )

    def create_cache(
        self, batch_size: int, max_length: int, in_features: int | None = None, dtype: Any = None
    ) -> KVCache:
        """An empty `KVCache` for functional decoding with this module (``in_features``
        is needed only when neither ``head_dim`` nor ``qkv_features`` fixes the head
        dim)."""
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

    def _config(self) -> dict:
        return core.config_options(
            {n: getattr(self, n) for n in core.CONFIG_OPTIONS}, where=type(self).__name__
        )

    def _custom(self, *, dropout_rng, deterministic, sow_weights):
        """The user's ``attention_fn`` called as Flax's module calls it: with those of
        Flax's keyword arguments that the function names (as Flax filters them); a
        ``mask`` (or jattn's ``bias`` / ``is_causal``) it does not name is an error
        (Flax's module would drop the mask silently)."""
        fn = self.attention_fn
        accepted = set(inspect.signature(fn).parameters)
        flax_kwargs = dict(
            dropout_rng=dropout_rng, dropout_rate=self.dropout_rate,
            broadcast_dropout=self.broadcast_dropout, deterministic=deterministic, dtype=self.dtype,
            precision=self.precision, force_fp32_for_softmax=self.force_fp32_for_softmax,
            qk_attn_weights_einsum=self.qk_attn_weights_einsum_cls() if self.qk_attn_weights_einsum_cls else None,
            attn_weights_value_einsum=(
                self.attn_weights_value_einsum_cls() if self.attn_weights_value_einsum_cls else None
            ),
        )
        flax_kwargs = {k: v for k, v in flax_kwargs.items() if k in accepted}

        def call(q, k, v, mask, bias, is_causal):
            kwargs = dict(flax_kwargs)
            # Flax's module drops a mask the function does not name; jattn refuses instead.
            for name, value, given in (("mask", mask, mask is not None), ("bias", bias, bias is not None),
                                       ("is_causal", True, bool(is_causal))):
                if given:
                    if name not in accepted:
                        raise ValueError(f"{name}: the attention_fn {fn!r} does not take it")
                    kwargs[name] = value
            if sow_weights:
                kwargs["module"] = self
            return fn(q, k, v, **kwargs)

        return call

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_k: Array | None = None,
        inputs_v: Array | None = None,
        *,
        inputs_kv: Array | None = None,
        mask: Any = None,
        bias: Array | None = None,
        deterministic: bool | None = None,
        dropout_rng: Array | None = None,
        sow_weights: bool = False,
        positions: Array | None = None,
        key_positions: Array | None = None,
        cache: KVCache | None = None,
        decode: bool | None = None,
        return_weights: bool = False,
        **call_options,
    ):
        """Attend from ``inputs_q`` to ``inputs_k`` / ``inputs_v``.

        The arguments are those of `jattn.nnx.MultiHeadAttention.__call__`, with
        Linen's ``dropout_rng`` (a key; default ``self.make_rng('dropout')``) in place
        of ``rngs``, ``sow_weights`` sowing into ``'intermediates'``, and Flax Linen's
        deprecated ``inputs_kv`` (keys and values from one array).

        Args:
          {call_options}

        Returns:
          ``out [batch..., T, F]``; then ``new_cache`` if ``cache`` was passed; then
          the weights ``[batch..., N, T, S]`` if ``return_weights``.
        """
        call_options = core.call_options(call_options, where=f"{type(self).__name__}.__call__")
        if inputs_kv is not None:
            if inputs_k is not None or inputs_v is not None:
                raise ValueError("inputs_kv: give either inputs_kv or inputs_k / inputs_v, not both")
            warnings.warn(
                "inputs_kv is deprecated in flax.linen; pass inputs_k (inputs_v defaults to it)",
                DeprecationWarning, stacklevel=2,
            )
            inputs_k = inputs_v = inputs_kv
        inputs_k, inputs_v, self_attention = core.default_inputs(inputs_q, inputs_k, inputs_v)
        core.Batch.of("inputs_q", inputs_q)
        for name, x, proj in (("inputs_q", inputs_q, "query"), ("inputs_k", inputs_k, "key"), ("inputs_v", inputs_v, "value")):
            trained = self._trained_features(proj)
            if trained is not None:
                core.check_features(name, x, trained, f"the {trained} features the module was initialised with")
        batch = core.check_inputs(inputs_q, inputs_k, inputs_v, decode, cache)
        decode = bool(self.decode if decode is None else decode)
        config = self._config()
        N, K, H = self._heads(inputs_q.shape[-1])
        core.check_rope(self.use_rope, H, self.rope_base)
        core.check_norms(self.qk_norm, self.normalize_qk)
        core.check_attention_fn(self.attention_fn)
        if self.attention_fn is None:
            for name in ("qk_attn_weights_einsum_cls", "attn_weights_value_einsum_cls"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name}: custom (e.g. quantized) attention einsums need a custom attention_fn "
                        f"that takes them; jattn's backends compute both matmuls themselves (fused "
                        f"or tiled), so they cannot use a replacement einsum"
                    )
        features = self.out_features or inputs_q.shape[-1]

        def dense(features, kernel_names, bias_names, name, *, axis=-1, kernel_init, bias_init, **kw):
            return nn.DenseGeneral(
                features, axis=axis, use_bias=self.use_bias, dtype=self.dtype,
                param_dtype=self.param_dtype, precision=self.precision,
                kernel_init=nn.with_logical_partitioning(kernel_init, kernel_names),
                bias_init=nn.with_logical_partitioning(bias_init, bias_names), name=name, **kw,
            )

        qkv = dict(kernel_init=self.kernel_init, bias_init=self.bias_init,
                   dot_general=self.qkv_dot_general, dot_general_cls=self.qkv_dot_general_cls)
        query = dense((N, H), ("embed", "heads", "head_dim"), ("heads", "head_dim"), "query", **qkv)(inputs_q)
        key = dense((K, H), ("embed", "kv_heads", "head_dim"), ("kv_heads", "head_dim"), "key", **qkv)(inputs_k)
        value = dense((K, H), ("embed", "kv_heads", "head_dim"), ("kv_heads", "head_dim"), "value", **qkv)(inputs_v)
        if self.normalize_qk:
            def layer_norm(name):
                return nn.LayerNorm(
                    use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                    scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("head_dim",)),
                    name=name,
                )
            query, key = layer_norm("query_ln")(query), layer_norm("key_ln")(key)
        if self.qk_norm:
            def rms_norm(name):
                return nn.RMSNorm(
                    epsilon=self.qk_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                    scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("head_dim",)),
                    name=name,
                )
            query, key = rms_norm("query_norm")(query), rms_norm("key_norm")(key)

        # The cache: cache= (functional), else with decode the 'cache' collection.
        step_cache, stored = cache, None
        if cache is None and decode:
            if self.has_variable("cache", "kv_cache"):
                if not self.is_mutable_collection("cache"):
                    raise ValueError(
                        "decode: stateful decoding writes the 'cache' collection; apply with "
                        "mutable=['cache'] (or pass cache= for functional decoding)"
                    )
                stored = self.variable("cache", "kv_cache")
                step_cache = stored.value
            elif self.is_mutable_collection("cache"):
                # As Flax: the first (init) call sizes the cache by its inputs and attends
                # without it.
                self.variable("cache", "kv_cache", KVCache.create, batch.size, key.shape[-3], K, H, key.dtype)
            else:
                raise core.missing_cache_error(_STATEFUL_HINT)

        if self.dropout_rate > 0.0:
            deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
            if not deterministic and dropout_rng is None:
                dropout_rng = self.make_rng("dropout")
        else:
            deterministic = True
        if deterministic:
            dropout_rng = None
        dropout = None
        if dropout_rng is not None:
            dropout = core.Dropout(self.dropout_rate, dropout_rng, self.broadcast_dropout, batch.ndim)
        custom = None
        if self.attention_fn is not None:
            custom = self._custom(dropout_rng=dropout_rng, deterministic=deterministic, sow_weights=sow_weights)

        attended = core.run(
            batch.flat(query), batch.flat(key), batch.flat(value), batch=batch, mask=mask, bias=bias,
            options={**call_options, **config}, cache=step_cache, self_attention=self_attention,
            use_rope=self.use_rope, rope_base=self.rope_base, positions_q=positions,
            positions_k=key_positions, dropout=dropout, return_weights=return_weights,
            sow=sow_weights and custom is None, attention_fn=custom,
        )
        if stored is not None:
            stored.value = attended.cache
        if attended.sowed is not None:
            self.sow("intermediates", "attention_weights", batch.unflat(attended.sowed))
        out = dense(
            features, ("heads", "head_dim", "embed"), ("embed",), "out", axis=(-2, -1),
            kernel_init=self.out_kernel_init or self.kernel_init, bias_init=self.out_bias_init or self.bias_init,
            dot_general=self.out_dot_general, dot_general_cls=self.out_dot_general_cls,
        )(batch.unflat(attended.out))
        return core.pack_outputs(
            out, attended.cache, batch.unflat(attended.weights), with_cache=cache is not None,
            return_weights=return_weights,
        )


MultiHeadAttention.__call__.__signature__ = core.signature_with_options(MultiHeadAttention.__call__, core.CALL_OPTIONS)
MultiHeadAttention.__doc__ = MultiHeadAttention.__doc__.replace(
    "{config_options}", core.options_doc(core.JATTN_CONFIG_OPTIONS, indent=6)
)
MultiHeadAttention.__call__.__doc__ = MultiHeadAttention.__call__.__doc__.replace(
    "{call_options}", core.options_doc(core.CALL_OPTIONS, indent=10)
)

class SelfAttention(MultiHeadAttention):
    """Self-attention over one sequence ``x [batch..., T, D]``, causal by default: the
    Linen twin of `jattn.nnx.SelfAttention` (``positions``, ``segment_ids``,
    ``lengths``, ``cache``).  Its fields are `MultiHeadAttention`'s, with
    ``use_bias=False`` and ``broadcast_dropout=False`` (jattn's per-(example, head)
    dropout) as defaults.

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
    broadcast_dropout: bool = False

    @nn.compact
    def __call__(  # type: ignore[override]
        self,
        x: Array,
        *,
        positions: Array | None = None,
        mask: Any = None,
        bias: Array | None = None,
        segment_ids: Array | None = None,
        lengths: Array | None = None,
        cache: KVCache | None = None,
        decode: bool | None = None,
        deterministic: bool | None = None,
        dropout_rng: Array | None = None,
        sow_weights: bool = False,
        return_weights: bool = False,
        **call_options,
    ):
        """Self-attention over ``x [batch..., T, D]``; the arguments are those of
        `jattn.nnx.SelfAttention.__call__` (``dropout_rng`` in place of ``rngs``)."""
        call_options = core.call_options(
            {"is_causal": True, **call_options}, where="SelfAttention.__call__", allowed=core.SELF_ATTENTION_CALL_OPTIONS
        )
        decoding = cache is not None or bool(self.decode if decode is None else decode)
        core.check_self_attention_args(x, segment_ids, lengths, decoding)
        return super().__call__(
            x, mask=mask, bias=bias, query_seq_lengths=lengths,
            key_value_seq_lengths=None if decoding else lengths, query_segment_ids=segment_ids,
            positions=positions, cache=cache, decode=decode, deterministic=deterministic,
            dropout_rng=dropout_rng, sow_weights=sow_weights, return_weights=return_weights,
            **call_options,
        )


SelfAttention.__call__.__signature__ = core.signature_with_options(
    SelfAttention.__call__, core.SELF_ATTENTION_CALL_OPTIONS, defaults={"is_causal": True}
)
