"""Per-device memory of context-parallel attention, from the compiled programs.

For each sequence length T and ring size P, compiles (never runs) a causal
forward+backward of `jattn.dot_product_attention` — on one device with the chunked
backend (P = 1), else with the sequence split over P CPU devices (zig-zag layout) —
and reads XLA's memory analysis of the per-device program: arguments + outputs +
temporaries.  Prints a markdown table (the one in docs/scaling.md) and checks the
target at T = 32k, P = 8: at most 1.5/8 of the one-device figure.

Run (8 virtual CPU devices; the device count must be set before JAX starts):

    JAX_NUM_CPU_DEVICES=8 python -m experiments.scaling --lengths 8192 16384 32768 65536

Example (tiny):
    >>> row = per_device_bytes(64, 1, heads=1, head_dim=8)
    >>> row > 0
    True
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jattn


# Interconnects and peak bf16 matmul throughput (per chip/GPU, dense), as published:
# NVIDIA H200 SXM: 989 TFLOP/s bf16, NVLink 900 GB/s total (450 GB/s each way);
# Google Cloud TPU v5p: 459 TFLOP/s bf16, ICI 4,800 Gbps per chip (600 GB/s) over 6
# links of its 3D torus (100 GB/s per link, the bandwidth one ring neighbour gets).
HARDWARE = {
    "H200 NVLink": dict(flops=989e12, link_bytes_per_s=450e9),
    "TPU v5p ICI": dict(flops=459e12, link_bytes_per_s=100e9),
}


def ring_step_bytes(batch: int, block: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes one device sends per forward ring step: its K and V blocks,
    ``2 · B · (T/P) · K · H · itemsize``.

    >>> ring_step_bytes(1, 4096, 8, 128, 2)
    16777216
    """
    return 2 * batch * block * kv_heads * head_dim * itemsize


def block_flops(batch: int, block: int, heads: int, head_dim: int, causal_share: float = 1.0) -> float:
    """Forward FLOPs of one ring step's block pair, ``4 · B · N · (T/P)² · H`` (Q·Kᵀ
    and P·V, 2 FLOPs per multiply-add), times the share the mask leaves (1/2 for a
    causal zig-zag step)."""
    return 4.0 * batch * heads * block * block * head_dim * causal_share


def hiding_block(heads: int, kv_heads: int, itemsize: int, flops: float, link_bytes_per_s: float,
                 causal_share: float = 1.0, efficiency: float = 1.0) -> float:
    """The shortest per-device block T/P at which a ring step's compute time covers
    sending its K/V: ``4·N·c²·H·share / (F·eff) >= 2·c·K·H·b / BW``, i.e.
    ``c >= (K/N) · (b/2) · (F·eff/BW) / share``.

    >>> round(hiding_block(16, 16, 2, 989e12, 450e9))
    2198
    """
    return (kv_heads / heads) * (itemsize / 2) * (flops * efficiency / link_bytes_per_s) / causal_share


def per_device_bytes(length: int, devices: int, *, heads: int = 8, head_dim: int = 64, batch: int = 1,
                     strategy: str = "ring", layout: str = "zigzag") -> int:
    """Arguments + outputs + temporaries (minus aliases) of one device's compiled
    causal forward+backward at sequence ``length`` over ``devices`` devices."""
    shape = jax.ShapeDtypeStruct((batch, length, heads, head_dim), jnp.float32)
    split = {} if devices == 1 else dict(sequence_axis="seq", sequence_strategy=strategy, sequence_layout=layout)

    def loss(q, k, v):
        out = jattn.dot_product_attention(q, k, v, is_causal=True,
                                          implementation="chunked" if devices == 1 else None, **split)
        return (out.astype(jnp.float32) ** 2).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    if devices == 1:
        compiled = grad.lower(shape, shape, shape).compile()
    else:
        mesh = jax.make_mesh((devices,), ("seq",), devices=jax.devices()[:devices],
                             axis_types=(AxisType.Explicit,))
        sharded = jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=NamedSharding(mesh, P(None, "seq")))
        with jax.set_mesh(mesh):
            compiled = grad.lower(sharded, sharded, sharded).compile()
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--strategy", default="ring", choices=["ring", "all_gather"])
    args = parser.parse_args(argv)
    if max(args.devices) > len(jax.devices()):
        parser.error(f"--devices up to {max(args.devices)} but JAX sees {len(jax.devices())}; "
                     f"set JAX_NUM_CPU_DEVICES")
    print(f"causal fwd+bwd, B=1, N=8, H=64, float32; {args.strategy}, zig-zag; per-device MiB "
          f"(ratio to P=1)\n")
    print("| T | " + " | ".join(f"P={p}" for p in args.devices) + " |")
    print("|---|" + "---|" * len(args.devices))
    verdict = None
    for length in args.lengths:
        cells, base = [], None
        for p in args.devices:
            start = time.perf_counter()
            size = per_device_bytes(length, p, strategy=args.strategy)
            base = size if p == 1 else base
            ratio = "" if base is None or p == 1 else f" ({size / base:.3f})"
            cells.append(f"{size / 2**20:.0f}{ratio}")
            if length == 32768 and p == 8 and base is not None:
                verdict = (size / base, 1.5 / 8)
            print(f"  T={length} P={p}: compiled in {time.perf_counter() - start:.0f} s", flush=True)
        print(f"| {length} | " + " | ".join(cells) + " |", flush=True)
    if verdict is not None:
        ok = verdict[0] <= verdict[1]
        print(f"\nT=32768, P=8: {verdict[0]:.4f} of one device; target <= {verdict[1]:.4f}: "
              f"{'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
