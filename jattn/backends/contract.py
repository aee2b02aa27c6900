"""The backend contract: what a backend of `jattn.dot_product_attention` is.

A backend is a `Backend` value: its ``name``, the call features it ``supports``
(names from `jattn.call.FEATURES`), ``limits(call, platform)`` for what a feature
list cannot say (platform, dtypes, head dims, sharding), and ``run(call, platform)``.
`refusal` fails closed: a call using any feature the backend does not declare is
refused with that feature named, before ``limits`` is asked, so a feature added to
`jattn.call.AttentionCall` is refused by every backend that has not declared it.

``run`` returns ``(out [B, T, N, Hv], weights [B, N, T, S] | None, lse [B, T, N] |
None)``: weights only when the call asks for them, lse only when it asks for the
residual (float32 is fine; `dot_product_attention` casts it and stops its gradient).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jattn.attention import make_call
  >>> toy = Backend("toy", frozenset({"causal"}), lambda call, platform: None, None, "an example")
  >>> q = jnp.zeros((1, 4, 1, 8))
  >>> refusal(toy, make_call(q, q, q, is_causal=True), "cpu") is None
  True
  >>> refusal(toy, make_call(q, q, q, dropout_rate=0.5, dropout_rng=jax.random.key(0)), "cpu")
  'does not support dropout'
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from jattn.call import FEATURES, AttentionCall

Limits = Callable[[AttentionCall, str], "str | None"]
Run = Callable[[AttentionCall, str], tuple]


@dataclasses.dataclass(frozen=True)
class Backend:
    """One backend: ``name``, the features it ``supports``, its other ``limits``,
    its ``run`` function, a one-line ``description``, and how a refusal for missing
    features reads (``lacks``, with ``{features}`` filled in)."""

    name: str
    supports: frozenset[str]
    limits: Limits
    run: Run
    description: str
    lacks: str = "does not support {features}"


def refusal(backend: Backend, call: AttentionCall, platform: str) -> str | None:
    """Why ``backend`` cannot serve ``call`` on ``platform``, or None if it can."""
    missing = sorted(call.features() - backend.supports)
    if missing:
        features = ", ".join(FEATURES.get(f, f"{f!r} (a call field no backend declares)") for f in missing)
        return backend.lacks.format(features=features)
    return backend.limits(call, platform)
