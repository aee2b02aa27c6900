"""Backend choice: which backend serves a call, and why the others did not.

`choose` is a pure function of the validated call and the platform name, so the
decision logic is tested on any machine by passing ``platform="gpu"`` or ``"tpu"``.
"""

from __future__ import annotations

import dataclasses

import jax

from jattn.backends import dense
from jattn.call import AttentionCall

BACKENDS = {dense.NAME: dense}


@dataclasses.dataclass(frozen=True)
class Explanation:
    """The backend a call takes, why, and for each other backend why not."""

    backend: str
    reason: str
    refused: dict[str, str]

    def __str__(self) -> str:
        lines = [f"backend: {self.backend} ({self.reason})"]
        lines += [f"  not {name}: {why}" for name, why in self.refused.items()]
        return "\n".join(lines)


def current_platform() -> str:
    """'cpu', 'gpu' or 'tpu': the platform of JAX's default backend."""
    platform = jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def choose(call: AttentionCall, platform: str) -> Explanation:
    """Pick the backend for ``call`` on ``platform``; raise if an explicit choice cannot
    serve it (naming why)."""
    refused = {
        name: why
        for name, backend in BACKENDS.items()
        if (why := backend.refusal(call, platform)) is not None
    }
    if call.implementation is not None:
        if call.implementation not in BACKENDS:
            raise ValueError(f"implementation={call.implementation!r} is not available in this build")
        if call.implementation in refused:
            raise ValueError(
                f"implementation={call.implementation!r} cannot serve this call: "
                f"{refused[call.implementation]}"
            )
        others = {n: "not requested (implementation was given)" for n in BACKENDS if n != call.implementation}
        return Explanation(call.implementation, "requested by implementation=", others)
    return Explanation("dense", "the only backend available", refused)
