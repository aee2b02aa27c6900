"""`dot_product_attention`: the one batched entry point, a drop-in for
`jax.nn.dot_product_attention`, and `explain`, which says which backend it would use.
"""

from __future__ import annotations

from typing import Any

import jax

from jattn import dispatch
from jattn import options as options_lib
from jattn.backends import per_device
from jattn.backends.registry import BACKENDS
from jattn.call import AttentionCall, validate
from jattn.parallel import split as parallel_split

# The accepted ``implementation=`` values: automatic, jax.nn's name for dense, the registry.
IMPLEMENTATIONS = (None, "xla", *BACKENDS)

Array = jax.Array


def dot_product_attention(query: Array, key: Array, value: Array, bias: Array | None = None,
                          mask: Any = None, **options):
    r"""Scaled dot-product attention, per head:
    ``softmax(scale · Q·Kᵀ + bias, masked) · V``.

    Accepts the positional and keyword arguments of `jax.nn.dot_product_attention`
    with the same meaning and layout, and adds what jax.nn lacks.

    Shapes (B batch, T query length, S key length, N query heads, K key/value heads,
    H head dim, Hv value head dim): query ``[B, T, N, H]``, key ``[B, S, K, H]``,
    value ``[B, S, K, Hv]``; or the same without B (unbatched).  N must be a multiple
    of K (GQA; K = 1 is MQA).

    Args:
      query, key, value: floating arrays of one dtype.
      bias: additive bias broadcastable to ``[B, N, T, S]``.
      mask: a boolean array broadcastable to ``[B, N, T, S]`` (True = attend), a
        `jattn.masks.Mask`, or a ``mask_mod(q_idx, kv_idx) -> bool`` function.
      {options}

    Returns:
      ``[B, T, N, Hv]`` in the value dtype; with ``return_weights`` a pair
      ``(out, weights)``; with ``return_residual`` a pair ``(out, lse)``.

    A query row that no key may attend gives zeros (jax.nn gives the mean of the
    values there, except for rows past ``query_seq_lengths``, which it zeroes too).

    Example:
      >>> import jax, jax.numpy as jnp, jattn
      >>> kq, kk, kv = jax.random.split(jax.random.key(0), 3)
      >>> q = jax.random.normal(kq, (2, 5, 4, 8))   # B=2, T=5, N=4, H=8
      >>> k = jax.random.normal(kk, (2, 7, 2, 8))   # S=7, K=2 (GQA, G=2)
      >>> v = jax.random.normal(kv, (2, 7, 2, 8))
      >>> out = jattn.dot_product_attention(q, k, v, is_causal=True, query_offset=2)
      >>> out.shape
      (2, 5, 4, 8)
    """
    call = _validated("dot_product_attention", query, key, value, bias, mask, options)
    platform = dispatch.current_platform()
    if (split := parallel_split.find_split(call)) is not None:  # a sequence split over a mesh axis
        out, weights, lse = parallel_split.run(call, split, platform)
    else:
        choice = dispatch.choose(call, platform)
        # A per-device backend (a fused kernel) on sharded inputs runs in jax.shard_map.
        out, weights, lse = per_device.run(dispatch.BACKENDS[choice.backend], call, platform)
    if lse is not None:  # as jax.nn: the input dtype, no gradient
        lse = jax.lax.stop_gradient(lse.astype(call.query.dtype))
    if call.unbatched:
        out = out[0]
        weights = None if weights is None else weights[0]
        lse = None if lse is None else lse[0]
    if call.return_weights:
        return out, weights
    if call.return_residual:
        return out, lse
    return out


def explain(query, key, value, bias=None, mask=None, *, platform: str | None = None, **options):
    """Which backend `dot_product_attention` would use for these arguments, and why
    each other backend was refused.  Takes the same arguments (plus ``platform``,
    default: JAX's default backend); computes nothing.  Arrays may be abstract:
    `jax.ShapeDtypeStruct`s, or tracers inside `jax.eval_shape` / `jax.jit`.

    Example:
      >>> import jax, jax.numpy as jnp, jattn
      >>> q = jax.ShapeDtypeStruct((1, 4096, 2, 64), jnp.float32)
      >>> print(jattn.explain(q, q, q, is_causal=True, platform="cpu").backend)
      chunked
    """
    platform = platform or dispatch.current_platform()
    leaves, treedef = jax.tree_util.tree_flatten((query, key, value, bias, mask, options))
    is_abstract = [isinstance(x, jax.ShapeDtypeStruct) for x in leaves]
    if not any(is_abstract):
        return _choose(_validated("explain", query, key, value, bias, mask, options), platform)

    # Validation needs arrays: trace it with the abstract leaves as eval_shape inputs.
    chosen = []

    def choose(abstract_leaves):
        it = iter(abstract_leaves)
        args = jax.tree_util.tree_unflatten(treedef, [next(it) if a else x for x, a in zip(leaves, is_abstract)])
        *arrays, opts = args
        chosen.append(_choose(_validated("explain", *arrays, opts), platform))
        return ()

    jax.eval_shape(choose, [x for x, a in zip(leaves, is_abstract) if a])
    return chosen[0]


def _choose(call: AttentionCall, platform: str) -> dispatch.Explanation:
    if (split := parallel_split.find_split(call)) is not None:
        return parallel_split.explain(call, split, platform)
    return dispatch.choose(call, platform)


def make_call(query, key, value, bias=None, mask=None, **options) -> AttentionCall:
    """The validated `AttentionCall` for `dot_product_attention`'s arguments (options
    not given take their defaults from `jattn.options`); what each backend's ``run``
    takes.

    Example:
      >>> import jax.numpy as jnp
      >>> make_call(jnp.zeros((2, 16, 4, 8)), jnp.zeros((2, 9, 2, 8)), jnp.zeros((2, 9, 2, 8))).shape
      {'B': 2, 'T': 16, 'S': 9, 'N': 4, 'K': 2, 'H': 8, 'Hv': 8}
    """
    return _validated("make_call", query, key, value, bias, mask, options)


def _validated(where: str, query, key, value, bias, mask, options: dict) -> AttentionCall:
    implementation = options.get("implementation")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation: got {implementation!r}; expected one of "
            f"{', '.join(repr(i) for i in IMPLEMENTATIONS)}"
        )
    return validate(query, key, value, bias, mask, **options_lib.complete(options, where=where))


options_lib.with_options_signature(dot_product_attention)
options_lib.with_options_signature(make_call)
options_lib.with_options_signature(explain)
