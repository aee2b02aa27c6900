"""What jattn's Flax NNX and Linen modules share (private; `jattn.nnx` and `jattn.linen`
are the public faces).

Both module families run the same steps after their projections, and those steps live
here, free of either framework's module classes:

* **checks** of constructor and call arguments, with messages that name the argument;
* **head resolution**: ``(N, K, H)`` from ``num_heads``, ``num_kv_heads``,
  ``head_dim`` and the feature sizes;
* **option plumbing** from the one schema, `jattn.options`: the modules take the
  ``"config"`` options (`CONFIG_OPTIONS`) in their constructors and the ``"call"``
  options (`CALL_OPTIONS`) at call time; `config_options` / `call_options` complete
  and check them;
* **batch axes**: Flax accepts ``[batch..., T, D]``; `Batch` flattens the batch axes
  into one for `jattn.dot_product_attention` and back;
* **the attend step** (`run`): masks as booleans, RoPE, plain attention or a KV-cache
  step (`jattn.cache.decode_attention`), dropout with jattn's per-(example, head)
  pattern or Flax's broadcast pattern, the weights to return or sow, and the same with
  a user's Flax-style ``attention_fn``;
* **the return rule** (`pack_outputs`).

The return rule of the modules, stated once: a call returns ``out``; then the new
cache if a cache was passed (``cache=``); then the weights ``[batch..., N, T, S]`` if
``return_weights=True``; a tuple when more than one of these, else ``out`` alone.
Flax-style stateful decoding (``decode=True`` with the cache stored in the module)
passes no cache, so it returns ``out`` alone, as Flax does.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax.nnx.nn import initializers

from jattn import options as options_lib
from jattn import positional
from jattn.attention import dot_product_attention
from jattn.cache import KVCache, decode_attention

Array = jax.Array

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

# The schema's options, by who sets them in a module.
CONFIG_OPTIONS: tuple[str, ...] = options_lib.names("config")
CALL_OPTIONS: tuple[str, ...] = options_lib.names("call")
# Config options that are also arguments of Flax's modules (declared where Flax
# declares them); the rest are jattn's own.
FLAX_CONFIG_OPTIONS: tuple[str, ...] = ("dropout_rate", "precision")
JATTN_CONFIG_OPTIONS: tuple[str, ...] = tuple(n for n in CONFIG_OPTIONS if n not in FLAX_CONFIG_OPTIONS)
# SelfAttention: the constructor defaults that differ from MultiHeadAttention's, and
# the call options it takes (lengths and segment_ids stand for the sequence-length and
# segment-id options; a query offset has no meaning for one sequence).
SELF_ATTENTION_DEFAULTS: dict[str, Any] = {"use_bias": False, "broadcast_dropout": False}
SELF_ATTENTION_CALL_OPTIONS: tuple[str, ...] = tuple(
    n for n in CALL_OPTIONS
    if n not in ("query_seq_lengths", "key_value_seq_lengths", "query_segment_ids", "key_value_segment_ids", "query_offset")
)
# Per-example call options and how many axes follow their batch axes.
_PER_EXAMPLE = {
    "query_seq_lengths": 0, "key_value_seq_lengths": 0, "query_offset": 0,
    "query_segment_ids": 1, "key_value_segment_ids": 1,
}
# Options the cache defines itself in decode mode.
_DECODE_FORBIDDEN = ("key_value_seq_lengths", "query_segment_ids", "key_value_segment_ids")


# ---------------------------------------------------------------------------------
# Checks and head resolution.
# ---------------------------------------------------------------------------------


def check_positive_int(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive int; got {value!r}")


def resolve_heads(
    num_heads: int,
    features: int,
    num_kv_heads: int | None,
    head_dim: int | None,
    *,
    features_name: str,
    qkv_features: int | None = None,
) -> tuple[int, int, int]:
    """``(N, K, H)`` from the constructor arguments, with errors naming the argument.

    ``features`` is the width the heads split (``qkv_features`` or ``in_features``,
    named ``features_name``); it is used only when ``head_dim`` is None.  An explicit
    ``qkv_features`` must then equal ``N * H``.
    """
    check_positive_int("num_heads", num_heads)
    check_positive_int("num_kv_heads", num_kv_heads, allow_none=True)
    check_positive_int("head_dim", head_dim, allow_none=True)
    num_kv_heads = num_heads if num_kv_heads is None else int(num_kv_heads)
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_kv_heads: {num_kv_heads} does not divide num_heads={num_heads}; each key/value "
            f"head serves num_heads // num_kv_heads query heads (GQA), so num_heads must be a "
            f"multiple of num_kv_heads"
        )
    if head_dim is None:
        check_positive_int(features_name, features)
        if features % num_heads:
            raise ValueError(
                f"num_heads: {num_heads} does not divide {features_name}={features}; the head dim "
                f"is {features_name} // num_heads, so {features_name} must be a multiple of "
                f"num_heads (or pass head_dim=)"
            )
        head_dim = features // num_heads
    elif qkv_features is not None and qkv_features != num_heads * head_dim:
        raise ValueError(
            f"qkv_features: got {qkv_features} with num_heads={num_heads}, head_dim={head_dim}; "
            f"expected num_heads * head_dim = {num_heads * head_dim} (or leave one of them out)"
        )
    return int(num_heads), int(num_kv_heads), int(head_dim)


def check_features(name: str, x: Array, expected: int, expected_name: str) -> None:
    if jnp.ndim(x) < 2:
        raise ValueError(f"{name}: got shape {jnp.shape(x)}; expected [batch..., T, D] (rank >= 2)")
    if x.shape[-1] != expected:
        raise ValueError(
            f"{name}: got feature size {x.shape[-1]} (shape {x.shape}); expected "
            f"{expected_name}={expected}"
        )


def default_inputs(inputs_q, inputs_k, inputs_v):
    """``(inputs_k, inputs_v, self_attention)``: keys default to the queries and values
    to the keys; values without keys are an error (as in Flax)."""
    self_attention = inputs_k is None
    if inputs_k is None:
        if inputs_v is not None:
            raise ValueError("inputs_k: None while inputs_v is given; pass inputs_k too (inputs_v defaults to inputs_k)")
        inputs_k = inputs_q
    if inputs_v is None:
        inputs_v = inputs_k
    return inputs_k, inputs_v, self_attention


def check_inputs(inputs_q, inputs_k, inputs_v, decode, cache) -> "Batch":
    """The batch axes of the inputs (the same for all three) and the decode flags."""
    batch = Batch.of("inputs_q", inputs_q)
    for name, x in (("inputs_k", inputs_k), ("inputs_v", inputs_v)):
        if jnp.ndim(x) != jnp.ndim(inputs_q) or x.shape[: batch.ndim] != batch.shape:
            raise ValueError(
                f"{name}: got shape {jnp.shape(x)}; expected the batch axes {batch.shape} of "
                f"inputs_q {inputs_q.shape} followed by [S, features]"
            )
    if inputs_k.shape[:-1] != inputs_v.shape[:-1]:
        raise ValueError(f"inputs_v: got shape {inputs_v.shape}; expected {inputs_k.shape[:-1]} + (features,) like inputs_k")
    if decode is False and cache is not None:
        raise ValueError("decode: False was passed together with a cache; drop one of them")
    return batch


def check_self_attention_args(x, segment_ids, lengths, decoding: bool) -> None:
    """`SelfAttention`'s own arguments, named as the caller wrote them."""
    batch = Batch.of("x", x)
    T = x.shape[-2]
    letters = "(B, T)" if batch.ndim == 1 else "[batch..., T]"
    if segment_ids is not None:
        if decoding:
            raise ValueError("segment_ids: not supported with a cache (decode mode); use lengths for ragged prompts")
        if jnp.shape(segment_ids) != batch.shape + (T,):
            raise ValueError(f"segment_ids: got shape {jnp.shape(segment_ids)}; expected {letters} = {batch.shape + (T,)}")
    if lengths is not None and jnp.shape(lengths) != batch.shape:
        letters = "(B,)" if batch.ndim == 1 else "[batch...]"
        raise ValueError(
            f"lengths: got shape {jnp.shape(lengths)}; expected {letters} = {batch.shape}, one length per sequence"
        )


def check_dropout_rate(dropout_rate) -> None:
    if not isinstance(dropout_rate, (int, float)) or isinstance(dropout_rate, bool) or not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate: expected a number in [0, 1); got {dropout_rate!r}")


def check_rope(use_rope: bool, head_dim: int, rope_base) -> None:
    if use_rope:
        if head_dim % 2:
            raise ValueError(
                f"head_dim: RoPE (use_rope=True) rotates pairs of features, so head_dim must be "
                f"even; got {head_dim}"
            )
        if not isinstance(rope_base, (int, float)) or isinstance(rope_base, bool) or not rope_base > 1:
            raise ValueError(f"rope_base: expected a number > 1; got {rope_base!r}")


def check_norms(qk_norm: bool, normalize_qk: bool) -> None:
    if qk_norm and normalize_qk:
        raise ValueError(
            "normalize_qk: Flax's QK-norm (a LayerNorm, parameters query_ln/key_ln) and jattn's "
            "qk_norm (an RMSNorm, parameters query_norm/key_norm) were both asked for; pick one"
        )


def check_attention_fn(attention_fn) -> None:
    if attention_fn is not None and not callable(attention_fn):
        raise TypeError(f"attention_fn: expected None (jattn's attention) or a callable; got {type(attention_fn).__name__}")


def check_cache(cache, B: int, K: int, H: int, Hv: int) -> None:
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache: expected a jattn.cache.KVCache; got {type(cache).__name__}")
    if (cache.batch_size, cache.num_kv_heads, cache.head_dim, cache.value_head_dim) != (B, K, H, Hv):
        raise ValueError(
            f"cache: holds keys {cache.keys.shape} and values {cache.values.shape}; this call "
            f"needs keys [B, M, K, H] = ({B}, M, {K}, {H}) and values ({B}, M, {K}, {Hv}) "
            f"(create it with KVCache.create(batch_size={B}, max_length=M, num_kv_heads={K}, "
            f"head_dim={H}); B is the product of the batch axes)"
        )


def missing_cache_error(stateful_hint: str) -> ValueError:
    """The error of ``decode=True`` without a cache; ``stateful_hint`` says how the
    framework's stateful cache is set up."""
    return ValueError(
        "cache: decode mode (decode=True) needs a KV cache: pass cache=KVCache.create("
        "batch_size, max_length, num_kv_heads, head_dim) (or module.create_cache(...)) and use "
        f"the returned new cache for the next step, or {stateful_hint}"
    )


def cache_for_inputs(input_shape, num_kv_heads: int, head_dim: int, dtype) -> KVCache:
    """An empty `KVCache` for inputs ``[batch..., max_length, features]`` (Flax's
    ``init_cache(input_shape)``); its batch is the product of the batch axes."""
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) < 2:
        raise ValueError(f"input_shape: got {input_shape}; expected [batch..., max_length, features]")
    return KVCache.create(math.prod(input_shape[:-2]), input_shape[-2], num_kv_heads, head_dim, dtype=dtype)


# ---------------------------------------------------------------------------------
# Options from the schema.
# ---------------------------------------------------------------------------------


def config_options(given: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """Every ``"config"`` option (`CONFIG_OPTIONS`): ``given`` completed with the
    schema's defaults and checked; an unknown name raises a TypeError naming it."""
    config = options_lib.complete(dict(given), where=where, allowed=CONFIG_OPTIONS)
    check_dropout_rate(config["dropout_rate"])
    from jattn.backends import registry   # here: the registry imports every backend

    implementations = (None, "xla", *registry.BACKENDS)
    if config["implementation"] not in implementations:
        raise ValueError(
            f"implementation: got {config['implementation']!r}; expected one of "
            f"{', '.join(repr(i) for i in implementations)}"
        )
    cap = config["logits_soft_cap"]
    if cap is not None and (not isinstance(cap, (int, float)) or isinstance(cap, bool) or not cap > 0):
        raise ValueError(f"logits_soft_cap: expected a positive number or None; got {cap!r}")
    return config


def call_options(given: Mapping[str, Any], *, where: str, allowed: Iterable[str] = CALL_OPTIONS) -> dict[str, Any]:
    """The ``"call"`` options of a module call, completed with the schema's defaults."""
    return options_lib.complete(dict(given), where=where, allowed=allowed)


def _is_default(name: str, value) -> bool:
    default = options_lib.DEFAULTS[name]
    if value is default:
        return True
    if isinstance(value, (jax.Array, np.ndarray)) or default is None:
        return False
    return isinstance(value, (bool, int, float, str)) and type(value) is type(default) and value == default


def given_options(opts: Mapping[str, Any]) -> dict[str, Any]:
    """The options that differ from the schema's defaults (what a call must pass on)."""
    return {n: v for n, v in opts.items() if not _is_default(n, v)}


def signature_with_options(fn: Callable, selected: Iterable[str], defaults: Mapping[str, Any] = {}) -> inspect.Signature:
    """``fn``'s signature without its ``**kwargs``, followed by the schema options
    ``selected`` as keyword-only parameters (defaults overridden by ``defaults``)."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = [
        p.replace(default=defaults[p.name]) if p.name in defaults else p
        for p in options_lib.parameters(tuple(selected))
    ]
    return sig.replace(parameters=params + extra)


def derived_signature(
    fn: Callable, *, first: tuple[str, ...], drop: Iterable[str] = (), defaults: Mapping[str, Any] = {}
) -> inspect.Signature:
    """A subclass constructor's signature built from its parent's (``fn``): ``self`` and
    the parameters ``first`` (positional, in that order), then every other parameter
    of ``fn`` but ``drop`` as keyword-only, defaults overridden by ``defaults``."""
    params = inspect.signature(fn).parameters
    head = [params["self"]] + [params[n].replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in first]
    rest = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY, default=defaults.get(p.name, p.default))
        for n, p in params.items()
        if n != "self" and n not in first and n not in set(drop) and p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    return inspect.Signature(head + rest)


def declare_option_fields(namespace: dict, names: Iterable[str]) -> None:
    """Declare each schema option in ``names`` as a dataclass field (annotation and
    default) of the class whose body namespace is ``namespace`` (a Linen module)."""
    annotations = namespace.setdefault("__annotations__", {})
    for name in names:
        annotations[name] = options_lib.OPTIONS_BY_NAME[name].annotation
        namespace[name] = options_lib.DEFAULTS[name]


def options_doc(names: Iterable[str], indent: int) -> str:
    """The Args lines of the options ``names``, the first line unindented (for a
    docstring marker that sits at the indentation already)."""
    return options_lib.args_doc(tuple(names), indent=indent).lstrip()


# ---------------------------------------------------------------------------------
# Batch axes.
# ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Batch:
    """The batch axes of a call (``[batch..., T, D]`` inputs; none, one or several);
    `flat` / `unflat` move between them and the one batch axis B of
    `jattn.dot_product_attention`."""

    shape: tuple[int, ...]

    @classmethod
    def of(cls, name: str, x) -> "Batch":
        if jnp.ndim(x) < 2:
            raise ValueError(f"{name}: got shape {jnp.shape(x)}; expected [batch..., T, D] (rank >= 2)")
        return cls(tuple(int(d) for d in jnp.shape(x)[:-2]))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def flat(self, x):
        """``[batch..., *rest]`` -> ``[B, *rest]``."""
        if x is None or self.ndim == 1:
            return x
        return x.reshape((self.size,) + x.shape[self.ndim:])

    def unflat(self, x):
        """``[B, *rest]`` -> ``[batch..., *rest]``."""
        if x is None or self.ndim == 1:
            return x
        return x.reshape(self.shape + x.shape[1:])

    def per_example(self, name: str, x, trailing: int):
        """A per-example array ``[batch..., *trailing axes]`` (or without the batch
        axes: shared by every example) as ``[B, ...]``; other values pass through."""
        if self.ndim == 1 or not isinstance(x, (jax.Array, np.ndarray)):
            return x
        if x.ndim == self.ndim + trailing and x.shape[: self.ndim] == self.shape:
            return self.flat(x)
        if x.ndim == trailing:
            return jnp.broadcast_to(x, (self.size,) + x.shape)
        if x.ndim == 1 + trailing and x.shape[0] == self.size:
            return x
        raise ValueError(
            f"{name}: got shape {x.shape}; expected the batch axes {self.shape} followed by "
            f"{trailing} more ax{'is' if trailing == 1 else 'es'}"
        )

    def broadcastable(self, name: str, x):
        """An array broadcastable to ``[batch..., N, T, S]`` (a mask or bias) -> rank 4
        broadcastable to ``[B, N, T, S]``."""
        if x is None or self.ndim == 1 or not isinstance(x, (jax.Array, np.ndarray)):
            return x
        nd = self.ndim + 3
        if x.ndim > nd:
            raise ValueError(
                f"{name}: got shape {x.shape}; expected at most rank {nd}, broadcastable to "
                f"[batch..., N, T, S] with batch = {self.shape}"
            )
        x = jnp.reshape(x, (1,) * (nd - x.ndim) + x.shape)
        lead, rest = x.shape[: self.ndim], x.shape[self.ndim:]
        if all(d == 1 for d in lead):
            return x.reshape((1,) + rest)
        try:
            x = jnp.broadcast_to(x, self.shape + rest)
        except ValueError:
            raise ValueError(f"{name}: got shape {x.shape}; its batch axes do not broadcast to {self.shape}") from None
        return x.reshape((-1,) + rest)


def as_bool_mask(mask):
    """Flax's float or int masks (``nnx.make_causal_mask`` and friends return 0/1
    floats) as booleans: nonzero = attend, as Flax reads them.  Boolean arrays, jattn
    masks and mask functions pass through."""
    if isinstance(mask, (jax.Array, np.ndarray)) and mask.dtype != np.bool_:
        return jnp.asarray(mask).astype(jnp.bool_)
    return mask


def positions(name: str, value, B: int, T: int, default) -> Array:
    if value is None:
        return default
    value = jnp.asarray(value)
    if not jnp.issubdtype(value.dtype, jnp.integer):
        raise TypeError(f"{name}: expected integer positions; got dtype {value.dtype}")
    if value.shape == (T,):
        value = jnp.broadcast_to(value, (B, T))
    if value.shape != (B, T):
        raise ValueError(f"{name}: got shape {value.shape}; expected (B, T) = {(B, T)} or (T,) = ({T},)")
    return value


# ---------------------------------------------------------------------------------
# The attend step.
# ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Dropout:
    """Dropout on the attention weights of one call.

    ``broadcast``: Flax's broadcast pattern (one ``[T, S]`` keep-mask drawn from
    ``rng`` exactly as Flax draws it, shared by the batch and the heads; it needs the
    weights, so the dense backend runs); otherwise jattn's own (independent per
    example, head, row and column, every backend).  ``batch_ndim`` is the number of
    batch axes of the caller's inputs (the rank of Flax's draw).
    """

    rate: float
    rng: Array
    broadcast: bool
    batch_ndim: int = 1

    def keep_multiplier(self, T: int, S: int, dtype) -> Array:
        keep_prob = 1.0 - self.rate
        keep = jax.random.bernoulli(self.rng, keep_prob, (1,) * (self.batch_ndim + 1) + (T, S))
        return keep.reshape(1, 1, T, S).astype(dtype) / jnp.asarray(keep_prob, dtype)


@dataclasses.dataclass(frozen=True)
class Attended:
    """What `run` returns, with the batch flattened: ``out [B, T, N, Hv]``, the new
    cache (or None), the weights to return (after dropout) and to sow (before)."""

    out: Array
    cache: KVCache | None
    weights: Array | None
    sowed: Array | None


def weights_times_values(weights: Array, value: Array, precision=None) -> Array:
    """weights ``[B, N, T, S]`` · value ``[B, S, K, Hv]`` -> ``[B, T, N, Hv]`` (GQA:
    query head n reads kv head n // G); ``precision`` as in `jax.numpy.einsum`."""
    B, N, T, S = weights.shape
    K, Hv = value.shape[2:]
    w = weights.reshape(B, K, N // K, T, S)
    out = jnp.einsum(
        "BKGTS,BSKH->BTKGH", w, value, precision=precision,
        preferred_element_type=jnp.result_type(np.float32, value.dtype),
    )
    return out.reshape(B, T, N, Hv).astype(value.dtype)


def run(
    query: Array,
    key: Array,
    value: Array,
    *,
    batch: Batch,
    mask: Any = None,
    bias: Array | None = None,
    options: Mapping[str, Any],
    cache: KVCache | None = None,
    self_attention: bool = True,
    use_rope: bool = False,
    rope_base: float = 10000.0,
    positions_q=None,
    positions_k=None,
    dropout: Dropout | None = None,
    return_weights: bool = False,
    sow: bool = False,
    attention_fn: Callable | None = None,
) -> Attended:
    """The module core after the projections (and QK-norm): RoPE, then attention —
    plain, or a step of ``cache`` — by jattn or by a user's ``attention_fn``.

    query ``[B, T, N, H]``, key ``[B, S, K, H]``, value ``[B, S, K, Hv]`` (batch
    flattened); ``mask`` / ``bias`` broadcastable to ``[batch..., N, T, S]`` (the
    caller's batch axes); ``options``: `jattn.dot_product_attention` keyword options
    (call and config; dropout comes as ``dropout``).

    ``attention_fn(q, k, v, mask, bias, is_causal)``, when given, is the module's
    adapter around a user's Flax-style function (it sees the caller's batch axes);
    jattn-only options then raise.
    """
    B, T = query.shape[:2]
    S = key.shape[1]
    user_mask, user_bias = mask, bias
    mask = batch.broadcastable("mask", as_bool_mask(mask))
    bias = batch.broadcastable("bias", bias)
    kwargs = given_options(options)
    kwargs.pop("dropout_rate", None)
    # Always explicit: `jattn.cache.decode_attention` defaults to causal, the modules do not.
    kwargs["is_causal"] = bool(options.get("is_causal", False))
    for name, trailing in _PER_EXAMPLE.items():
        if name in kwargs:
            kwargs[name] = batch.per_example(name, kwargs[name], trailing)
    positions_q = batch.per_example("positions", positions_q, 1)
    positions_k = batch.per_example("key_positions", positions_k, 1)

    num_new = None
    if cache is not None:
        if S != T:
            raise ValueError(
                f"inputs_k: in decode mode the keys and values are the new tokens themselves; "
                f"got {S} key tokens for {T} query tokens"
            )
        check_cache(cache, B, key.shape[2], key.shape[3], value.shape[3])
        for name in _DECODE_FORBIDDEN:
            if name in kwargs:
                raise ValueError(
                    f"{name}: not supported with a cache (decode mode): the cache's lengths "
                    f"define the keys; pass the real token counts as lengths / "
                    f"query_seq_lengths instead"
                )
        if "query_offset" in kwargs:
            raise ValueError(
                "query_offset: not supported with a cache (decode mode): the offset of each "
                "sequence is its cache length"
            )
        num_new = kwargs.pop("query_seq_lengths", None)
        default_positions = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    else:
        default_positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

    if use_rope:
        q_pos = positions("positions", positions_q, B, T, default_positions)
        if positions_k is None and (self_attention or cache is not None):
            k_pos = q_pos
        else:
            k_pos = positions(
                "key_positions", positions_k, B, S, jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
            )
        query = positional.apply_rope(query, q_pos, base=rope_base)
        key = positional.apply_rope(key, k_pos, base=rope_base)
    else:
        # Positions only feed RoPE; still check their shape so a mistake shows.
        positions("positions", positions_q, B, T, None)
        positions("key_positions", positions_k, B, S, None)

    if attention_fn is not None:
        return _run_custom(
            attention_fn, query, key, value, batch=batch, mask=user_mask, bias=user_bias,
            kwargs=kwargs, cache=cache, num_new=num_new, return_weights=return_weights,
        )
    if mask is not None:
        kwargs["mask"] = mask
    if bias is not None:
        kwargs["bias"] = bias

    def attend(drop: bool, weights: bool):
        kw = dict(kwargs)
        if drop:
            kw.update(dropout_rate=dropout.rate, dropout_rng=dropout.rng)
        if weights:
            kw["return_weights"] = True
        if cache is not None:
            result = decode_attention(query, key, value, cache, num_new=num_new, **kw)
            out, new_cache, w = result if weights else (*result, None)
            return out, new_cache, w
        result = dot_product_attention(query, key, value, **kw)
        out, w = result if weights else (result, None)
        return out, None, w

    if dropout is None:
        out, new_cache, w = attend(False, return_weights or sow)
        return Attended(out, new_cache, w if return_weights else None, w if sow else None)
    if dropout.broadcast:
        if kwargs.get("implementation") not in (None, "dense", "xla"):
            raise ValueError(
                f"broadcast_dropout: True (Flax's pattern, one [T, S] mask shared by the batch and "
                f"the heads) multiplies the attention weights, which only the dense backend "
                f"materialises; implementation={kwargs['implementation']!r} cannot serve it.  Pass "
                f"broadcast_dropout=False for jattn's own dropout (independent per example and "
                f"head), which every backend runs"
            )
        _, new_cache, w = attend(False, True)
        dropped = w * dropout.keep_multiplier(T, w.shape[-1], w.dtype)
        values = value if new_cache is None else new_cache.values
        out = weights_times_values(dropped, values, kwargs.get("precision"))
        return Attended(out, new_cache, dropped if return_weights else None, w if sow else None)
    out, new_cache, w = attend(True, return_weights)
    sowed = attend(False, True)[2] if sow else None
    return Attended(out, new_cache, w, sowed)


def _run_custom(attention_fn, query, key, value, *, batch, mask, bias, kwargs, cache, num_new,
                return_weights) -> Attended:
    """Attention by a user's Flax-style ``attention_fn`` (through the module's adapter),
    which sees the caller's batch axes, mask and bias as given."""
    is_causal = bool(kwargs.pop("is_causal", False))
    kwargs.pop("precision", None)   # the module passes its precision itself
    if kwargs:
        name = sorted(kwargs)[0]
        raise ValueError(
            f"{name}: a jattn option, which a custom attention_fn cannot take (Flax's attention_fn "
            f"interface passes only query, key, value, mask, bias, dropout, dtype, precision and "
            f"is_causal); express it as a mask, or leave attention_fn=None for jattn's attention"
        )
    if return_weights:
        raise ValueError(
            "return_weights: a custom attention_fn returns only the outputs; use sow_weights=True "
            "(the function then sows the weights, as Flax's does) or leave attention_fn=None"
        )
    if mask is not None and not isinstance(mask, (jax.Array, np.ndarray)):
        raise ValueError(
            f"mask: a custom attention_fn takes array masks only (Flax's interface); got "
            f"{type(mask).__name__} — use jattn's attention (attention_fn=None) for jattn masks"
        )
    if cache is None:
        out = attention_fn(batch.unflat(query), batch.unflat(key), batch.unflat(value), mask, bias, is_causal)
        return Attended(batch.flat(out), None, None, None)
    # A cache step: write the new tokens, then let the function attend to the whole
    # cache under a mask that says which slots each new token sees.
    B, T = query.shape[:2]
    new_cache = cache.update(key, value, num_new)
    M = new_cache.capacity
    before = cache.lengths
    written = new_cache.lengths - before                                          # [B]
    t = jnp.arange(T, dtype=jnp.int32)[None, :]                                   # [1, T]
    slot = jnp.arange(M, dtype=jnp.int32)
    visible = slot[None, None, :] < jnp.minimum(new_cache.lengths, M)[:, None, None]   # [B, 1, M]
    if is_causal:
        visible = visible & (slot[None, None, :] <= (before[:, None] + t)[:, :, None])  # [B, T, M]
    step_mask = batch.unflat(jnp.broadcast_to(visible, (B, T, M))[:, None])       # [batch..., 1, T, M]
    if mask is not None:
        step_mask = step_mask & as_bool_mask(mask)
    out = attention_fn(
        batch.unflat(query.astype(new_cache.dtype)), batch.unflat(new_cache.keys),
        batch.unflat(new_cache.values), step_mask, bias, False,
    )
    out = batch.flat(out)
    real = t < written[:, None]                                                   # [B, T]
    lost = (before[:, None] + t >= M) & real
    out = jnp.where(real[:, :, None, None], out, jnp.zeros((), out.dtype))
    out = jnp.where(lost[:, :, None, None], jnp.asarray(jnp.nan, out.dtype), out)
    return Attended(out, new_cache, None, None)


def pack_outputs(out, new_cache, weights, *, with_cache: bool, return_weights: bool):
    """The modules' return rule: ``out``, then ``new_cache`` (if a cache was passed),
    then ``weights`` (if asked for); a tuple when more than one."""
    result = (out,)
    if with_cache:
        result += (new_cache,)
    if return_weights:
        result += (weights,)
    return result[0] if len(result) == 1 else result
