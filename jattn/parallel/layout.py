"""Where each token of a split sequence lives: the contiguous and zig-zag layouts.

A sequence of length T split over an axis of P devices is cut into chunks.

- ``"contiguous"``: P chunks of T/P; device p holds chunk p.
- ``"zigzag"``: 2P chunks of T/(2P); device p holds chunks p and 2P-1-p (in that
  order).  Under a causal mask every device then does the same work: the early chunk
  sees few keys and the late one many.

`zigzag` reorders a batch (tokens, positions, segment ids, labels: any array with a
sequence axis) from the natural order into that layout, so that splitting the result
evenly over the axis gives each device its two chunks; `unzigzag` undoes it.
`zigzag_positions` gives each laid-out token its original position (what RoPE needs).

Example:
  >>> import numpy as np
  >>> zigzag(np.arange(8), 2, axis=0)           # device 0: chunks 0, 3; device 1: 1, 2
  array([0, 1, 6, 7, 2, 3, 4, 5])
  >>> unzigzag(zigzag(np.arange(8), 2, axis=0), 2, axis=0)
  array([0, 1, 2, 3, 4, 5, 6, 7])
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("contiguous", "zigzag")


def chunks_per_device(layout: str) -> int:
    """1 for contiguous, 2 for zigzag."""
    return 2 if layout == "zigzag" else 1


def device_chunks(layout: str, num_devices: int) -> np.ndarray:
    """``[P, chunks_per_device]`` int: the global chunk ids device p holds, in order."""
    p = np.arange(num_devices)
    if layout == "zigzag":
        return np.stack([p, 2 * num_devices - 1 - p], axis=1)
    return p[:, None]


def zigzag_order(length: int, num_devices: int) -> np.ndarray:
    """The original positions in laid-out order: ``zigzag(x)[i] == x[order[i]]``."""
    chunks = 2 * num_devices
    if length % chunks:
        raise ValueError(
            f"zigzag: sequence length {length} must be a multiple of 2 × the axis size "
            f"({chunks}); pad the sequence"
        )
    size = length // chunks
    ids = device_chunks("zigzag", num_devices).reshape(-1)
    return (ids[:, None] * size + np.arange(size)[None, :]).reshape(-1)


def zigzag(x, num_devices: int, axis: int = 1):
    """``x`` with its sequence ``axis`` reordered into the zig-zag layout for an axis
    of ``num_devices`` devices.  Works on NumPy and JAX arrays (a static gather)."""
    order = zigzag_order(x.shape[axis], num_devices)
    return _reorder(x, order, axis)


def unzigzag(x, num_devices: int, axis: int = 1):
    """Undo `zigzag`: the natural order again."""
    inverse = np.argsort(zigzag_order(x.shape[axis], num_devices))
    return _reorder(x, inverse, axis)


def zigzag_positions(length: int, num_devices: int) -> np.ndarray:
    """``[length]`` int32: the original position of each token in zig-zag order (the
    positions to give RoPE, or a model's position embedding, after `zigzag`)."""
    return zigzag_order(length, num_devices).astype(np.int32)



def _reorder(x, order: np.ndarray, axis: int):
    """``x`` gathered along ``axis`` in ``order``; a sharded JAX array keeps its
    sharding (an explicit-axis mesh needs the output sharding spelled out)."""
    if isinstance(x, np.ndarray):
        return x.take(order, axis=axis)
    index = (slice(None),) * axis + (jnp.asarray(order),)
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    if spec is not None and any(entry is not None for entry in spec):
        return x.at[index].get(out_sharding=jax.typeof(x).sharding)
    return x[index]
