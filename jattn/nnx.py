"""Flax NNX attention modules built on `jattn.dot_product_attention`.

* `MultiHeadAttention`: a drop-in for `flax.nnx.MultiHeadAttention` — the same
  constructor and call arguments with the same meaning, the same parameter tree — plus
  GQA / MQA (``num_kv_heads``), RoPE, an RMS QK-norm, every mask of
  `jattn.dot_product_attention`, jattn's options (backend, soft-capping, tiles), a
  functional KV cache for decoding (`jattn.cache.KVCache`) beside Flax's stateful one,
  and the weights on request.
* `SelfAttention`: the same for one input sequence, causal by default, with per-token
  ``positions``, ``segment_ids`` (packing) and ``lengths`` (padding / ragged prompts).
* `attention_fn` (from `jattn.flax_adapter`): pass as ``attention_fn=`` to Flax's own
  `flax.nnx.MultiHeadAttention`.

Return rule of the modules: a call returns ``out``; then the new cache if a cache was
passed (``cache=``); then the weights ``[batch..., N, T, S]`` if
``return_weights=True``; a tuple when more than one, else ``out`` alone.

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

from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import flax.core.spmd
import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers

from jattn import _flax_core as core
from jattn.cache import KVCache
from jattn.flax_adapter import attention_fn

Array = jax.Array

__all__ = ["LOGICAL_AXIS_RULES", "MultiHeadAttention", "SelfAttention", "attention_fn"]

LOGICAL_AXIS_RULES = core.LOGICAL_AXIS_RULES
_EMPTY: Mapping[str, Any] = MappingProxyType({})
_STATEFUL_HINT = (
    "call module.init_cache(input_shape) first for Flax-style stateful decoding (the cache "
    "then lives in the module, as in flax.nnx.MultiHeadAttention)"
)


def _param_metadata(names: tuple[str, ...], rules, user: Mapping[str, Any]) -> dict:
    """``out_sharding`` = logical names (sharded at creation only when a mesh is set and
    rules say what the names mean, otherwise Flax would fail on the unknown names),
    overridden by the user's own metadata."""
    have_rules = bool(rules) or bool(flax.core.spmd.get_logical_axis_rules())
    mesh_set = not jax.sharding.get_abstract_mesh().empty
    metadata = {
        "out_sharding": names,
        "eager_sharding": bool(nnx.using_eager_sharding() and mesh_set and have_rules),
    }
    if rules:
        metadata["sharding_rules"] = tuple(tuple(r) for r in rules)
    return {**metadata, **user}


class MultiHeadAttention(nnx.Module):
    r"""Multi-head (cross-)attention: project, attend with
    `jattn.dot_product_attention`, project back.

    .. math:: \mathrm{out} = \mathrm{concat}_n\big(\mathrm{softmax}(
              q_n k_{n//G}^\top / \sqrt{H}) v_{n//G}\big) W^O,\quad
              q = x_q W^Q,\ k = x_k W^K,\ v = x_v W^V

    Shapes: inputs_q ``[batch..., T, D]``, inputs_k / inputs_v ``[batch..., S, Dkv]``,
    output ``[batch..., T, F]``; internally q ``[B, T, N, H]``, k / v ``[B, S, K, H]``
    with the batch axes flattened into B.

    A drop-in for `flax.nnx.MultiHeadAttention`: its constructor and call arguments
    (same positional order and defaults) mean the same here, and the parameter tree is
    the same (``query.kernel [D, N, H]``, ``key.kernel`` / ``value.kernel [Dkv, K, H]``,
    ``out.kernel [N, H, F]``, biases, ``query_ln`` / ``key_ln`` with ``normalize_qk``),
    so a state copied from a Flax module gives the same outputs.  The table in
    ``docs/modules.md`` lists each Flax argument and what jattn does with it.

    Args:
      num_heads: N.
      in_features: D, the feature size of ``inputs_q``.
      qkv_features: N·H (default D); split over the heads unless ``head_dim`` is given.
      out_features: F (default D).
      num_kv_heads: K (default N); N must be a multiple (GQA; 1 is MQA).
      in_kv_features: Dkv (default D).
      dtype, param_dtype: computation and parameter dtypes (as in Flax).
      broadcast_dropout: True (Flax's default): one dropout pattern ``[T, S]`` shared by
        every example and head, drawn exactly as Flax draws it (this needs the weights,
        so the dense backend runs); False: independent per example and head
        (jattn's own dropout, on every backend).
      dropout_rate: dropout on the attention weights.
      deterministic: default for the call's ``deterministic`` (needed when
        ``dropout_rate > 0``, as in Flax).
      precision: `jax.lax.Precision` of the four projections and of the two attention
        matmuls.
      kernel_init, bias_init: initialisers of the projections (kernels as Flax's,
        fan-in = the contracted features).
      out_kernel_init, out_bias_init: of the output projection (default: the above).
      use_bias: biases in the four projections.
      attention_fn: None (jattn's attention, with every jattn option), or a function
        with the interface of ``flax.nnx.dot_product_attention``, called as Flax's
        module calls it (jattn-only call options then raise).
      decode: default for the call's ``decode``: decoding with a KV cache, given as
        ``cache=`` (functional) or kept in the module after `init_cache` (as in Flax).
      normalize_qk: Flax's QK-norm: a LayerNorm over H (no bias) of queries and keys
        (parameters ``query_ln`` / ``key_ln``), before RoPE.
      qkv_promote_dtype, out_promote_dtype, ln_promote_dtype: dtype promotion of the
        projections and the LayerNorms (as in Flax).
      qkv_dot_general, out_dot_general, qkv_dot_general_cls, out_dot_general_cls: the
        projections' dot_general (as in Flax; the attention matmuls are jattn's).
      rngs: `nnx.Rngs`.
      keep_rngs: keep a forked dropout stream of ``rngs`` for the calls.
      kernel_metadata, out_kernel_metadata, bias_metadata, out_bias_metadata,
        query_ln_scale_metadata, key_ln_scale_metadata: extra parameter metadata (as in
        Flax), added to jattn's logical axis names (and overriding them).
      head_dim: H (default ``qkv_features // num_heads``).
      qk_norm: jattn's QK-norm: an RMSNorm over H (one scale per feature, shared by the
        heads) of queries and keys (parameters ``query_norm`` / ``key_norm``), before
        RoPE; exclusive with ``normalize_qk``.
      qk_norm_epsilon: its epsilon.
      use_rope, rope_base: rotary embeddings (`jattn.positional.apply_rope`) on q and k.
      sharding_rules: logical-name -> mesh-axis rules stored with the parameters (e.g.
        `LOGICAL_AXIS_RULES`).
      {config_options}

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
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        broadcast_dropout: bool = True,
        dropout_rate: float = 0.0,
        deterministic: bool | None = None,
        precision: Any = None,
        kernel_init: Callable = core.default_kernel_init,
        out_kernel_init: Callable | None = None,
        bias_init: Callable = initializers.zeros_init(),
        out_bias_init: Callable | None = None,
        use_bias: bool = True,
        attention_fn: Callable | None = None,
        decode: bool = False,
        normalize_qk: bool = False,
        qkv_promote_dtype: Callable = dtypes.promote_dtype,
        out_promote_dtype: Callable = dtypes.promote_dtype,
        ln_promote_dtype: Callable = dtypes.promote_dtype,
        qkv_dot_general: Callable | None = None,
        out_dot_general: Callable | None = None,
        qkv_dot_general_cls: Any = None,
        out_dot_general_cls: Any = None,
        rngs: nnx.Rngs,
        keep_rngs: bool = True,
        kernel_metadata: Mapping[str, Any] = _EMPTY,
        out_kernel_metadata: Mapping[str, Any] = _EMPTY,
        bias_metadata: Mapping[str, Any] = _EMPTY,
        out_bias_metadata: Mapping[str, Any] = _EMPTY,
        query_ln_scale_metadata: Mapping[str, Any] = _EMPTY,
        key_ln_scale_metadata: Mapping[str, Any] = _EMPTY,
        head_dim: int | None = None,
        qk_norm: bool = False,
        qk_norm_epsilon: float = 1e-6,
        use_rope: bool = False,
        rope_base: float = 10000.0,
        sharding_rules: Sequence[tuple[str, str | None]] | None = None,
        **options,
    ):
        core.check_positive_int("in_features", in_features)
        core.check_positive_int("qkv_features", qkv_features, allow_none=True)
        core.check_positive_int("out_features", out_features, allow_none=True)
        core.check_positive_int("in_kv_features", in_kv_features, allow_none=True)
        N, K, H = core.resolve_heads(
            num_heads, in_features if qkv_features is None else qkv_features, num_kv_heads, head_dim,
            features_name="in_features" if qkv_features is None else "qkv_features", qkv_features=qkv_features,
        )
        config = core.config_options(
            {"dropout_rate": dropout_rate, "precision": precision, **options}, where=type(self).__name__
        )
        core.check_rope(use_rope, H, rope_base)
        core.check_norms(qk_norm, normalize_qk)
        core.check_attention_fn(attention_fn)
        self.num_heads, self.num_kv_heads, self.head_dim = N, K, H
        self.qkv_features = N * H
        self.in_features = int(in_features)
        self.in_kv_features = int(in_features if in_kv_features is None else in_kv_features)
        self.out_features = int(in_features if out_features is None else out_features)
        self.use_bias = use_bias
        self.dtype, self.param_dtype = dtype, param_dtype
        self.broadcast_dropout = bool(broadcast_dropout)
        self.deterministic = deterministic
        self.attention_fn = attention_fn
        self.decode = decode
        self.normalize_qk, self.qk_norm = bool(normalize_qk), bool(qk_norm)
        self.use_rope, self.rope_base = bool(use_rope), float(rope_base)
        self.sharding_rules = None if sharding_rules is None else tuple(tuple(r) for r in sharding_rules)
        for name, value in config.items():        # implementation, precision, dropout_rate, ...
            setattr(self, name, value)
        self.dropout_rate = float(config["dropout_rate"])

        def metadata(names, user):
            return _param_metadata(names, self.sharding_rules, user)

        def linear(in_f, out_f, names, bias_names, *, user_kernel_metadata, user_bias_metadata, **kw):
            return nnx.LinearGeneral(
                in_f, out_f, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                precision=precision, rngs=rngs, kernel_metadata=metadata(names, user_kernel_metadata),
                bias_metadata=metadata(bias_names, user_bias_metadata), **kw,
            )

        qkv = dict(
            kernel_init=kernel_init, bias_init=bias_init, promote_dtype=qkv_promote_dtype,
            dot_general=qkv_dot_general, dot_general_cls=qkv_dot_general_cls,
            user_kernel_metadata=kernel_metadata, user_bias_metadata=bias_metadata,
        )
        self.query = linear(self.in_features, (N, H), ("embed", "heads", "head_dim"), ("heads", "head_dim"), **qkv)
        self.key = linear(self.in_kv_features, (K, H), ("embed", "kv_heads", "head_dim"), ("kv_heads", "head_dim"), **qkv)
        self.value = linear(self.in_kv_features, (K, H), ("embed", "kv_heads", "head_dim"), ("kv_heads", "head_dim"), **qkv)
        if normalize_qk:   # Flax's LayerNorms, created where Flax creates them (same init streams)
            def layer_norm(user):
                return nnx.LayerNorm(
                    H, use_bias=False, dtype=dtype, param_dtype=param_dtype, promote_dtype=ln_promote_dtype,
                    rngs=rngs, scale_metadata=metadata(("head_dim",), user),
                )
            self.query_ln, self.key_ln = layer_norm(query_ln_scale_metadata), layer_norm(key_ln_scale_metadata)
        else:
            self.query_ln, self.key_ln = nnx.data(None), nnx.data(None)
        self.out = linear(
            (N, H), self.out_features, ("heads", "head_dim", "embed"), ("embed",), axis=(-2, -1),
            kernel_init=out_kernel_init or kernel_init, bias_init=out_bias_init or bias_init,
            promote_dtype=out_promote_dtype, dot_general=out_dot_general, dot_general_cls=out_dot_general_cls,
            user_kernel_metadata=out_kernel_metadata or kernel_metadata,
            user_bias_metadata=out_bias_metadata or bias_metadata,
        )
        if qk_norm:
            def rms_norm():
                return nnx.RMSNorm(
                    H, epsilon=qk_norm_epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                    scale_metadata=metadata(("head_dim",), _EMPTY),
                )
            self.query_norm, self.key_norm = rms_norm(), rms_norm()
        else:
            self.query_norm, self.key_norm = nnx.data(None), nnx.data(None)
        self.rngs = rngs.dropout.fork() if keep_rngs and self.dropout_rate > 0 else nnx.data(None)
        self.kv_cache: nnx.Cache | None = nnx.data(None)

    def set_view(
        self,
        deterministic: bool | None = None,
        decode: bool | None = None,
        batch_size: int | Sequence[int] | None = None,
        max_length: int | None = None,
    ):
        """For `nnx.view`: set the ``deterministic`` / ``decode`` defaults; with
        ``batch_size`` and ``max_length`` also create the stateful cache (as Flax)."""
        if deterministic is not None:
            self.deterministic = deterministic
        if decode is not None:
            self.decode = decode
        if batch_size is not None or max_length is not None:
            if batch_size is None or max_length is None:
                raise TypeError("set_view: batch_size and max_length are needed together to create the cache")
            batch = (batch_size,) if isinstance(batch_size, int) else tuple(batch_size)
            self.init_cache((*batch, max_length, self.in_features), self.dtype or jnp.float32)

    def init_cache(self, input_shape: Sequence[int], dtype: Any = jnp.float32) -> None:
        """Create the module's own KV cache for Flax-style stateful decoding: for inputs
        ``[batch..., max_length, D]``; calls with ``decode=True`` and no ``cache=`` then
        append their tokens to it and attend to everything it holds.

        The cache is a `jattn.cache.KVCache` (batch axes flattened) in the ``nnx.Cache``
        variable ``kv_cache``; unlike Flax's (one position for the whole batch, one token
        per call), each sequence has its own length and a call may add several tokens.
        """
        self.kv_cache = nnx.Cache(core.cache_for_inputs(input_shape, self.num_kv_heads, self.head_dim, dtype))

    def create_cache(self, batch_size: int, max_length: int, dtype: Any = None) -> KVCache:
        """An empty `KVCache` shaped for this module, for functional decoding with
        ``cache=`` (dtype: ``dtype``, else the module's computation dtype, else its
        parameter dtype)."""
        return KVCache.create(
            batch_size, max_length, self.num_kv_heads, self.head_dim,
            dtype=dtype or self.dtype or self.param_dtype,
        )

    def _dropout_key(self, deterministic, rngs) -> tuple[bool, Array | None]:
        """``(deterministic, dropout key or None)``, resolved as Flax does."""
        if self.dropout_rate == 0.0:
            return True, None
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic is None:
            raise ValueError(
                f"deterministic: dropout_rate={self.dropout_rate} needs deterministic=True "
                f"(no dropout) or False, given to the constructor, the call or nnx.view"
            )
        if deterministic:
            return True, None
        rngs = self.rngs if rngs is None else rngs
        if rngs is None:
            raise ValueError(
                "rngs: dropout with deterministic=False needs random keys; pass rngs= to the "
                "call (the module was built with keep_rngs=False)"
            )
        if isinstance(rngs, nnx.Rngs):
            return False, rngs.dropout()
        if isinstance(rngs, nnx.RngStream):
            return False, rngs()
        if isinstance(rngs, jax.Array):
            return False, rngs
        raise TypeError(f"rngs: expected nnx.Rngs, an nnx.RngStream or a jax.random.key; got {type(rngs).__name__}")

    def __call__(
        self,
        inputs_q: Array,
        inputs_k: Array | None = None,
        inputs_v: Array | None = None,
        *,
        mask: Any = None,
        bias: Array | None = None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | Array | None = None,
        sow_weights: bool = False,
        decode: bool | None = None,
        out_sharding: Any = None,
        qkv_sharding: Any = None,
        positions: Array | None = None,
        key_positions: Array | None = None,
        cache: KVCache | None = None,
        return_weights: bool = False,
        **call_options,
    ):
        """Attend from ``inputs_q`` to ``inputs_k`` / ``inputs_v``.

        Args:
          inputs_q: ``[batch..., T, D]``.
          inputs_k: ``[batch..., S, Dkv]`` (default ``inputs_q``: self-attention).
          inputs_v: ``[batch..., S, Dkv]`` (default ``inputs_k``).
          mask: broadcastable to ``[batch..., N, T, S]``: boolean or Flax's 0/1 floats
            (nonzero = attend, e.g. from ``nnx.make_causal_mask``), or a
            `jattn.masks.Mask` or mask function (batch axes flattened).
          bias: additive, broadcastable to ``[batch..., N, T, S]``.
          deterministic: no dropout if True (default: the constructor's).
          rngs: random keys for dropout (default: the module's own stream).
          sow_weights: sow the weights (before dropout) as ``nnx.Intermediate``
            ``attention_weights`` (as Flax does).
          decode: decode with a KV cache (default: the constructor's): ``cache=`` if
            given, else the module's own cache (see `init_cache`).
          out_sharding, qkv_sharding: output shardings of the output and the Q/K/V
            projections (as in Flax).
          positions: int ``[batch..., T]`` (or ``[T]``) query positions for RoPE
            (default ``arange(T)``, after a cache: ``cache.lengths[:, None] + arange(T)``).
          key_positions: int ``[batch..., S]`` key positions for RoPE (default:
            ``positions`` for self-attention and in decode mode, else ``arange(S)``).
          cache: a `jattn.cache.KVCache`: decode mode.  The new tokens' keys and values
            are written after each sequence's length and the queries attend to the
            whole cache (``is_causal`` aligned per sequence); ``query_seq_lengths``
            then says how many of the T tokens are real (ragged prompts).  Returns
            the new cache too.
          return_weights: also return the weights ``[batch..., N, T, S]`` (after
            dropout; ``S = M`` in decode mode).
          {call_options}

        Returns:
          ``out [batch..., T, F]``; then ``new_cache`` if ``cache`` was passed; then
          the weights if ``return_weights``; a tuple when more than one.
        """
        call_options = core.call_options(call_options, where=f"{type(self).__name__}.__call__")
        inputs_k, inputs_v, self_attention = core.default_inputs(inputs_q, inputs_k, inputs_v)
        core.check_features("inputs_q", inputs_q, self.in_features, "in_features")
        if self_attention and self.in_kv_features != self.in_features:
            raise ValueError(
                f"inputs_k: None (self-attention), but the key/value projections take "
                f"in_kv_features={self.in_kv_features} features and inputs_q has "
                f"{self.in_features}; pass inputs_k"
            )
        core.check_features("inputs_k", inputs_k, self.in_kv_features, "in_kv_features")
        core.check_features("inputs_v", inputs_v, self.in_kv_features, "in_kv_features")
        batch = core.check_inputs(inputs_q, inputs_k, inputs_v, decode, cache)
        decode = bool(self.decode if decode is None else decode)

        query = self.query(inputs_q, out_sharding=qkv_sharding)
        key = self.key(inputs_k, out_sharding=qkv_sharding)
        value = self.value(inputs_v, out_sharding=qkv_sharding)
        if self.query_ln is not None:
            query, key = self.query_ln(query), self.key_ln(key)
        if self.query_norm is not None:
            query, key = self.query_norm(query), self.key_norm(key)

        stateful = cache is None and decode
        if stateful:
            if self.kv_cache is None:
                raise core.missing_cache_error(_STATEFUL_HINT)
            step_cache = self.kv_cache.get_value()
        else:
            step_cache = cache
        deterministic, dropout_rng = self._dropout_key(deterministic, rngs)
        dropout = None
        if dropout_rng is not None:
            dropout = core.Dropout(self.dropout_rate, dropout_rng, self.broadcast_dropout, batch.ndim)

        custom = None
        if self.attention_fn is not None:
            def custom(q, k, v, mask, bias, is_causal):   # as flax.nnx.MultiHeadAttention calls it
                kwargs = dict(
                    mask=mask, dropout_rng=dropout_rng, dropout_rate=self.dropout_rate,
                    broadcast_dropout=self.broadcast_dropout, deterministic=deterministic,
                    dtype=self.dtype, precision=self.precision, module=self if sow_weights else None,
                    is_causal=is_causal,
                )
                if bias is not None:
                    kwargs["bias"] = bias
                return self.attention_fn(q, k, v, **kwargs)

        attended = core.run(
            batch.flat(query), batch.flat(key), batch.flat(value), batch=batch, mask=mask, bias=bias,
            options={**call_options, **{n: getattr(self, n) for n in core.CONFIG_OPTIONS}},
            cache=step_cache, self_attention=self_attention, use_rope=self.use_rope,
            rope_base=self.rope_base, positions_q=positions, positions_k=key_positions,
            dropout=dropout, return_weights=return_weights, sow=sow_weights and custom is None,
            attention_fn=custom,
        )
        if stateful:
            self.kv_cache.set_value(attended.cache)
        if attended.sowed is not None:
            self.sow(nnx.Intermediate, "attention_weights", batch.unflat(attended.sowed))
        out = self.out(batch.unflat(attended.out), out_sharding=out_sharding)
        return core.pack_outputs(
            out, attended.cache, batch.unflat(attended.weights), with_cache=cache is not None,
            return_weights=return_weights,
        )


MultiHeadAttention.__init__.__signature__ = core.signature_with_options(
    MultiHeadAttention.__init__, core.JATTN_CONFIG_OPTIONS
)
MultiHeadAttention.__call__.__signature__ = core.signature_with_options(MultiHeadAttention.__call__, core.CALL_OPTIONS)
MultiHeadAttention.__doc__ = MultiHeadAttention.__doc__.replace(
    "{config_options}", core.options_doc(core.JATTN_CONFIG_OPTIONS, indent=6)
)
MultiHeadAttention.__call__.__doc__ = MultiHeadAttention.__call__.__doc__.replace(
    "{call_options}", core.options_doc(core.CALL_OPTIONS, indent=10)
)

class SelfAttention(MultiHeadAttention):
    """Self-attention over one sequence ``x [batch..., T, D]`` (causal by default), the
    building block of a decoder.

    The constructor takes ``in_features`` and ``num_heads`` (in that order), then every
    keyword of `MultiHeadAttention` but ``in_kv_features``, with two defaults of its
    own: ``use_bias=False`` and ``broadcast_dropout=False`` (jattn's per-(example,
    head) dropout, on every backend).  The call takes ``positions`` (RoPE),
    ``segment_ids`` (packing: attend within a segment) and ``lengths`` (padding: the
    first ``lengths[b]`` tokens of sequence b are real; with a cache, how many of the
    T new tokens to append).

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

    def __init__(self, in_features: int, num_heads: int, **kwargs):
        if "in_kv_features" in kwargs:
            raise TypeError(
                "in_kv_features: SelfAttention attends one sequence to itself, so the keys and "
                "values have in_features too; use MultiHeadAttention for cross-attention"
            )
        super().__init__(num_heads, in_features, **{**core.SELF_ATTENTION_DEFAULTS, **kwargs})

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
        rngs: nnx.Rngs | nnx.RngStream | Array | None = None,
        sow_weights: bool = False,
        return_weights: bool = False,
        out_sharding: Any = None,
        qkv_sharding: Any = None,
        **call_options,
    ):
        """Self-attention over ``x [batch..., T, D]``.

        Args:
          x: ``[batch..., T, D]``.
          positions: int ``[batch..., T]`` (or ``[T]``) positions for RoPE; default
            ``arange(T)``, or after a cache ``cache.lengths[:, None] + arange(T)``.
            For packed sequences pass positions that restart in each segment.
          mask, bias: as in `MultiHeadAttention`.
          segment_ids: int ``[batch..., T]``: attend only within the same segment (not
            with a cache).
          lengths: int ``[batch...]``: real tokens per sequence (the rest is padding:
            its outputs are zeros before the output projection and it is never
            attended); with a cache, how many of the T tokens to append.
          cache, decode, deterministic, rngs, sow_weights, return_weights,
            out_sharding, qkv_sharding: as in `MultiHeadAttention`.
          {call_options}

        Returns:
          as `MultiHeadAttention`: ``out [batch..., T, F]``; then ``new_cache`` if
          ``cache`` was passed; then the weights if ``return_weights``.
        """
        call_options = core.call_options(
            {"is_causal": True, **call_options}, where="SelfAttention.__call__", allowed=core.SELF_ATTENTION_CALL_OPTIONS
        )
        decoding = cache is not None or bool(self.decode if decode is None else decode)
        core.check_self_attention_args(x, segment_ids, lengths, decoding)
        return super().__call__(
            x, mask=mask, bias=bias, query_seq_lengths=lengths,
            key_value_seq_lengths=None if decoding else lengths, query_segment_ids=segment_ids,
            positions=positions, cache=cache, decode=decode, deterministic=deterministic, rngs=rngs,
            sow_weights=sow_weights, return_weights=return_weights, out_sharding=out_sharding,
            qkv_sharding=qkv_sharding, **call_options,
        )


SelfAttention.__init__.__signature__ = core.derived_signature(
    MultiHeadAttention.__init__, first=("in_features", "num_heads"), drop=("in_kv_features",),
    defaults=core.SELF_ATTENTION_DEFAULTS,
)
SelfAttention.__call__.__signature__ = core.signature_with_options(
    SelfAttention.__call__, core.SELF_ATTENTION_CALL_OPTIONS, defaults={"is_causal": True}
)
SelfAttention.__call__.__doc__ = SelfAttention.__call__.__doc__.replace(
    "{call_options}", core.options_doc(core.SELF_ATTENTION_CALL_OPTIONS, indent=10).replace(
        "is_causal: ", "is_causal: (default True here) ", 1)
)
