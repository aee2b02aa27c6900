"""FLOP counting and the columns derived from a run's timings.

One convention for every implementation, so that rates compare: forward
``4·B·N·T·S·H`` (two matmuls; half of it when causal), forward+backward 3.5 x forward
(the backward counted as 2.5 x forward, as FlashAttention's benchmarks count it).  The
ratio column is time-based and does not depend on the convention.

Example:
  >>> attention_flops(B=1, N=8, T=1024, S=1024, H=64, causal=True, mode="fwd")
  1073741824
  >>> attention_flops(B=1, N=8, T=1024, S=1024, H=64, causal=True, mode="fwd+bwd")
  3758096384
"""

from __future__ import annotations

# Forward+backward counts (1 + BACKWARD_FLOP_FACTOR) x the forward FLOPs.
BACKWARD_FLOP_FACTOR = 2.5
FLOP_CONVENTION = (
    "forward = 4·B·N·T·S·H (Q·Kᵀ and P·V, 2 FLOPs per multiply-add), halved when causal; "
    "forward+backward = 3.5 × forward (backward counted as 2.5 × forward, the "
    "FlashAttention benchmark convention), the same for every implementation"
)


def attention_flops(*, B: int, N: int, T: int, S: int, H: int, causal: bool, mode: str) -> int:
    """FLOPs of one call under this benchmark's convention (see the module docstring).

    Example:
      >>> attention_flops(B=2, N=4, T=8, S=8, H=16, causal=False, mode="fwd")
      32768
    """
    fwd = 4 * B * N * T * S * H
    if causal:
        fwd //= 2
    if mode == "fwd":
        return fwd
    if mode == "fwd+bwd":
        return int(fwd * (1 + BACKWARD_FLOP_FACTOR))
    raise ValueError(f"mode: expected 'fwd' or 'fwd+bwd'; got {mode!r}")


def shape_key(r: dict) -> tuple:
    """What two records must share for their times to be compared (all but impl)."""
    return (r["mode"], r["T"], r["causal"], r["B"], r["N"], r["K"], r["H"], r["dtype"])


def derive(records: list[dict], ceiling_flops_per_s: float | None) -> list[dict]:
    """Add ``flops``, ``flops_per_s``, ``frac_of_ceiling`` and ``ratio_vs_jax_xla`` to
    each ok record (from ``median_ms``); returns new dicts, the input is unchanged.

    The ratio is jax.nn xla's median time over this case's on the same shape and mode
    (> 1: faster than jax.nn xla); None where jax.nn xla has no ok row for the shape.

    Example:
      >>> base = dict(mode="fwd", T=8, S=8, causal=False, B=1, N=1, K=1, H=4, dtype="float32")
      >>> rows = derive([dict(base, impl="jax_xla", status="ok", median_ms=2.0),
      ...                dict(base, impl="auto", status="ok", median_ms=1.0)], None)
      >>> [r["ratio_vs_jax_xla"] for r in rows]
      [1.0, 2.0]
    """
    xla_ms = {shape_key(r): r["median_ms"] for r in records if r["impl"] == "jax_xla" and r["status"] == "ok"}
    out = []
    for r in records:
        r = dict(r)
        if r["status"] == "ok":
            flops = attention_flops(B=r["B"], N=r["N"], T=r["T"], S=r.get("S", r["T"]), H=r["H"],
                                    causal=r["causal"], mode=r["mode"])
            rate = flops / (r["median_ms"] / 1e3)
            r["flops"] = flops
            r["flops_per_s"] = rate
            r["frac_of_ceiling"] = rate / ceiling_flops_per_s if ceiling_flops_per_s else None
            base = xla_ms.get(shape_key(r))
            r["ratio_vs_jax_xla"] = base / r["median_ms"] if base else None
        out.append(r)
    return out
