"""Position encodings: ALiBi slopes (and rotary embeddings, RoPE).

Example:
  >>> alibi_slopes(4)
  [0.25, 0.0625, 0.015625, 0.00390625]
"""

from __future__ import annotations

import math


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
