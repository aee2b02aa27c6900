"""Position encodings: ALiBi slopes and rotary embeddings (RoPE: `apply_rope`).

Example:
  >>> alibi_slopes(4)
  [0.25, 0.0625, 0.015625, 0.00390625]
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def alibi_slopes(num_heads: int) -> list[float]:
    """The ALiBi paper's per-head slopes: for ``n`` a power of two, the geometric
    sequence ``2^(-8/n), 2^(-16/n), ..., 2^(-8)``; otherwise the slopes of the largest
    power of two below ``n``, followed by every other slope of twice that many.

    Example:
      >>> [round(s, 4) for s in alibi_slopes(3)]
      [0.0625, 0.0039, 0.25]
    """
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"alibi_slopes: num_heads must be a positive int; got {num_heads!r}")

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if num_heads & (num_heads - 1) == 0:
        return power_of_two_slopes(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    extra = power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return power_of_two_slopes(closest) + extra


# Rotary position embeddings (RoPE) ----------------------------------------------------


def rope_frequencies(head_dim: int, base: float = 10000.0):
    r"""The RoPE angular frequencies ``θ_i = base^(-2i / H)`` for ``i = 0 .. H/2 - 1``,
    as a float64 NumPy array ``[H/2]``.

    Args:
      head_dim: H, even.
      base: the wavelength base (10000 in the RoFormer paper; larger bases such as
        500000 stretch the longest wavelength for long contexts).

    Example:
      >>> rope_frequencies(4, base=100.0)
      array([1. , 0.1])
    """
    if not isinstance(head_dim, (int, np.integer)) or isinstance(head_dim, bool) or head_dim < 2:
        raise ValueError(f"rope_frequencies: head_dim must be an even int >= 2; got {head_dim!r}")
    if head_dim % 2:
        raise ValueError(
            f"rope_frequencies: head_dim must be even (RoPE rotates pairs of features); got {head_dim}"
        )
    if not isinstance(base, (int, float, np.integer, np.floating)) or isinstance(base, bool) or not base > 1:
        raise ValueError(f"rope_frequencies: base must be a number > 1; got {base!r}")
    return float(base) ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def apply_rope(x, positions, *, base: float = 10000.0):
    r"""Rotary position embedding (RoFormer, Su et al. 2021), "rotate-half" layout.

    Feature pairs ``(x[..., i], x[..., i + H/2])`` are rotated by the angle
    ``p · θ_i`` where ``p`` is the token's position and ``θ_i = base^(-2i/H)``:

    .. math:: \begin{aligned}
              y_i       &= x_i \cos(pθ_i) - x_{i+H/2} \sin(pθ_i) \\
              y_{i+H/2} &= x_{i+H/2} \cos(pθ_i) + x_i \sin(pθ_i)
              \end{aligned}

    so that ``<rope(q, p), rope(k, s)>`` depends on the positions only through
    ``p - s``.  Positions are passed in by the caller (so packed sequences can restart
    at 0 and decoded tokens continue after their prompt).  The rotation is computed in
    float32 (float64 for float64 inputs) and cast back to ``x.dtype``.

    Args:
      x: ``[B, T, N, H]`` (or ``[T, N, H]``; any ``[..., T, N, H]``), H even.
      positions: integer ``[B, T]`` (or anything broadcastable to ``x.shape[:-2]``,
        e.g. ``[T]``).
      base: the wavelength base (see `rope_frequencies`).

    Returns:
      an array shaped and typed like ``x``.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[[1.0, 0.0]]])           # T=1, N=1, H=2
      >>> apply_rope(x, jnp.array([0]))           # position 0: unchanged
      Array([[[1., 0.]]], dtype=float32)
      >>> y = apply_rope(x, jnp.array([1]), base=10000.0)   # rotated by 1 radian
      >>> [round(float(v), 4) for v in y[0, 0]]
      [0.5403, 0.8415]
    """
    x = jnp.asarray(x)
    if x.ndim < 3:
        raise ValueError(
            f"apply_rope: x must be [..., T, N, H] (rank >= 3); got shape {x.shape}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"apply_rope: x must be floating; got dtype {x.dtype}")
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(
            f"apply_rope: x has head dim H={head_dim}; RoPE needs an even H "
            f"(it rotates pairs of features)"
        )
    positions = jnp.asarray(positions)
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise TypeError(f"apply_rope: positions must be integers; got dtype {positions.dtype}")
    lead = x.shape[:-2]
    try:
        np.broadcast_shapes(positions.shape, lead)
    except ValueError:
        raise ValueError(
            f"apply_rope: positions has shape {positions.shape}; expected a shape "
            f"broadcastable to x's leading axes {lead} (B, T)"
        ) from None
    dtype = jnp.result_type(np.float32, x.dtype)
    inv_freq = jnp.asarray(rope_frequencies(head_dim, base), dtype)      # [H/2]
    angle = positions.astype(dtype)[..., None] * inv_freq                # [..., T, H/2]
    cos = jnp.cos(angle)[..., None, :]                                    # [..., T, 1, H/2]
    sin = jnp.sin(angle)[..., None, :]
    x1, x2 = jnp.split(x.astype(dtype), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
