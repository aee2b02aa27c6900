"""The implementations the benchmark times: jattn's backends, read from jattn's backend
registry (plus ``auto``, jattn's own choice), and the peers a user would pick
instead -- ``jax.nn.dot_product_attention`` with xla or cudnn, and
``flax.linen.dot_product_attention``.

Importing this module imports jattn (and so JAX) but initialises no JAX backend: the
runner process never touches a device; each case does, in its own process.

Example:
  >>> IMPLS["jax_xla"], IMPLS["auto"]
  ('jax.nn xla', 'jattn auto')
  >>> [name for name in IMPLS if name in JATTN]
  ['dense', 'chunked', 'cudnn', 'pallas', 'splash', 'auto']
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from jattn.backends.registry import BACKENDS  # jattn's one list of backends


@dataclasses.dataclass(frozen=True)
class Peer:
    """An implementation outside jattn: its label, the platform it needs (None: any)
    and the reason given when the cases run elsewhere."""

    label: str
    needs: str | None = None
    why: str = ""


PEERS = {
    "jax_xla": Peer("jax.nn xla"),
    "jax_cudnn": Peer("jax.nn cudnn", needs="gpu", why="cuDNN attention needs an NVIDIA GPU"),
    "flax": Peer("flax.linen"),
}
# The benchmark's jattn implementations -> `implementation=` of jattn.dot_product_attention.
JATTN = {name: name for name in BACKENDS} | {"auto": None}
# Implementation name -> label used in tables and plots (the order is the table's).
IMPLS = {name: peer.label for name, peer in PEERS.items()} | {name: f"jattn {name}" for name in JATTN}


def attention_function(case) -> Callable:
    """``f(q, k, v) -> out`` for the case's implementation, called as its users would.

    Example:
      >>> import jax.numpy as jnp
      >>> from experiments.benchmark.config import Case
      >>> f = attention_function(Case(impl="flax", mode="fwd", T=16, causal=True, B=1, N=4, K=2, H=8))
      >>> f(jnp.ones((1, 16, 4, 8)), jnp.ones((1, 16, 2, 8)), jnp.ones((1, 16, 2, 8))).shape
      (1, 16, 4, 8)
    """
    import jax
    import jax.numpy as jnp

    if case.impl in ("jax_xla", "jax_cudnn"):
        impl = "xla" if case.impl == "jax_xla" else "cudnn"

        def f(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=case.causal, implementation=impl)

        return f
    if case.impl == "flax":
        import flax.linen as nn

        groups = case.N // case.K

        def f(q, k, v):
            # What a Flax user writes: heads repeated for GQA, a materialised causal mask.
            if groups > 1:
                k = jnp.repeat(k, groups, axis=2)
                v = jnp.repeat(v, groups, axis=2)
            mask = nn.make_causal_mask(jnp.ones(q.shape[:2], jnp.int32)) if case.causal else None
            return nn.dot_product_attention(q, k, v, mask=mask)

        return f
    import jattn

    impl = JATTN[case.impl]

    def f(q, k, v):
        return jattn.dot_product_attention(
            q, k, v, is_causal=case.causal, implementation=impl, block_sizes=case.block_sizes
        )

    return f


def jattn_choice(case, q, k, v) -> dict:
    """Which jattn backend serves the case and why (`jattn.explain`); raises
    ValueError, with jattn's reason, when the requested backend refuses the case."""
    import jattn

    choice = jattn.explain(q, k, v, is_causal=case.causal, implementation=JATTN[case.impl],
                           block_sizes=case.block_sizes)
    return dict(backend=choice.backend, backend_reason=choice.reason)
