"""The backend contract: what a backend of `jattn.dot_product_attention` is.

A backend is a `Backend` value: its ``name``, the call features it ``supports``
(names from `jattn.call.FEATURES`), ``limits(call, platform)`` for what a feature
list cannot say (platform, dtypes, head dims), ``run(call, platform)``, and whether
it runs on one device's data only (``per_device``: a fused kernel without a
partitioning rule).  A per-device backend never sees sharded inputs: on inputs split
over batch / heads of an explicit-axis mesh `jattn.backends.per_device` runs it
inside `jax.shard_map` on each device's slice, and `refusal` adds that module's
reasons (a sharded sequence axis, heads that do not split by whole GQA groups, ...).
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

from jattn.backends import per_device as per_device_lib
from jattn.call import FEATURES, AttentionCall

Limits = Callable[[AttentionCall, str], "str | None"]
Run = Callable[[AttentionCall, str], tuple]


@dataclasses.dataclass(frozen=True)
class Backend:
    """One backend: ``name``, the features it ``supports``, its other ``limits``,
    its ``run`` function, a one-line ``description``, how a refusal for missing
    features reads (``lacks``, with ``{features}`` filled in), and ``per_device``:
    True when ``run`` computes on one device's arrays only (see the module doc)."""

    name: str
    supports: frozenset[str]
    limits: Limits
    run: Run
    description: str
    lacks: str = "does not support {features}"
    per_device: bool = False


def refusal(backend: Backend, call: AttentionCall, platform: str) -> str | None:
    """Why ``backend`` cannot serve ``call`` on ``platform``, or None if it can."""
    missing = sorted(call.features() - backend.supports)
    if missing:
        features = ", ".join(FEATURES.get(f, f"{f!r} (a call field no backend declares)") for f in missing)
        return backend.lacks.format(features=features)
    if (why := backend.limits(call, platform)) is not None:
        return why
    return per_device_lib.refusal(call, backend.supports) if backend.per_device else None
