"""Backend choice: which backend serves a call, and why the others did not.

`choose` is a pure function of the validated call and the platform name, so the
decision logic is tested on any machine by passing ``platform="gpu"`` or ``"tpu"``.

The automatic policy (``implementation=None``), in order:

1. ``return_weights`` needs the weights materialised: **dense**.
2. On a GPU, when cuDNN's fused kernel supports the request: **cudnn**.
3. On a GPU, when jattn's own fused Triton kernels support it (soft-capping, segment
   ids, offset causal/window bands, any head dim up to 256): **pallas**.
4. Short sequences, ``T·S <= DENSE_MAX_SCORES[platform]`` and at most
   ``DENSE_MAX_BYTES[platform]`` of scores in all: **dense** (one fused pass beats a
   loop over tiles there; measured in docs/benchmarks.md).
5. On a TPU, when JAX's splash kernels support it (causal / window bands with an int
   offset, segment ids, lengths, soft-capping, static mask objects; float32 or
   bfloat16): **splash** (O(T) memory, skips blocks the mask empties; unmeasured on a
   TPU so far: docs/benchmarks.md).
6. Otherwise: **chunked** (O(T) memory, skips tiles the mask empties).

At each step a backend that refuses the call (`jattn.backends.contract.refusal`: a
feature it does not declare, or one of its limits) is passed over; auto never picks
a backend that refused, and a call every backend refuses raises with every reason.
"""

from __future__ import annotations

import dataclasses

import jax

from jattn.backends import contract, per_device
from jattn.backends.registry import BACKENDS
from jattn.call import AttentionCall

# Largest T·S (scores per head) for which auto prefers dense over chunked, per
# platform, from measured crossovers (docs/benchmarks.md): on the 2-core CPU dense
# wins at T=512 and chunked is ~2x faster from T=1024 on; on an H200 jax.nn's and
# jattn's dense XLA path beat chunked up to T=4096 (causal or not).  TPU: unmeasured.
DENSE_MAX_SCORES = {"cpu": 512 * 512, "gpu": 4096 * 4096, "tpu": 1024 * 1024}
# Largest float32 score buffer B·N·T·S·4 bytes auto lets dense materialise.
DENSE_MAX_BYTES = {"cpu": 2**31, "gpu": 2**33, "tpu": 2**32}


@dataclasses.dataclass(frozen=True)
class Explanation:
    """The backend a call takes, why, and for each other backend why not."""

    backend: str
    reason: str
    refused: dict[str, str]
    # For a sequence split over a mesh axis (jattn.parallel): the strategy, why, and
    # that `backend` serves each block.
    sequence: str | None = None

    def __str__(self) -> str:
        lines = [] if self.sequence is None else [f"sequence: {self.sequence}"]
        lines += [f"backend: {self.backend} ({self.reason})"]
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
        if (why := contract.refusal(backend, call, platform)) is not None
    }
    if call.implementation is not None:
        if call.implementation in refused:
            raise ValueError(
                f"implementation={call.implementation!r} cannot serve this call: "
                f"{refused[call.implementation]}"
            )
        others = {n: "not requested (implementation was given)" for n in BACKENDS if n != call.implementation}
        return Explanation(call.implementation, _with_layout(call.implementation, "requested by implementation=", call), others)

    s = call.shape
    scores = s["T"] * s["S"]
    score_bytes = s["B"] * s["N"] * scores * 4
    limit = DENSE_MAX_SCORES.get(platform, DENSE_MAX_SCORES["cpu"])
    max_bytes = DENSE_MAX_BYTES.get(platform, DENSE_MAX_BYTES["cpu"])
    short = scores <= limit and score_bytes <= max_bytes
    # The automatic policy as (backend, why it is preferred) in order of preference;
    # the first that does not refuse the call serves it.
    if short:
        size = f"short: T·S = {scores} <= {limit}, where one dense pass is fastest"
        tiled = ("chunked", "dense cannot serve this call; O(T) memory")
    elif scores <= limit:
        size = None
        tiled = ("chunked", f"{score_bytes / 2**30:.1f} GiB of scores > {max_bytes / 2**30:.0f} GiB; O(T) memory")
    else:
        size = None
        tiled = ("chunked", f"long: T·S = {scores} > {limit}; O(T) memory, skips empty tiles")
    preferences = [
        ("dense", "return_weights=True needs the weights materialised") if call.return_weights else None,
        ("cudnn", "cuDNN's fused flash kernel supports this request"),
        ("pallas", "jattn's fused Triton kernels support this request (cuDNN does not)"),
        ("dense", size) if short else None,
        ("splash", f"{tiled[1]}; JAX's block-sparse splash kernels for TPUs serve this request"),
        tiled,
        ("dense", "the only backend left that serves this call"),
    ]
    for name, why in filter(None, preferences):
        if name in BACKENDS and name not in refused:
            chosen, reason = name, why
            break
    else:
        reasons = "; ".join(f"{n}: {why}" for n, why in refused.items())
        raise ValueError(f"no backend can serve this call on {platform} ({reasons})")
    if chosen in ("chunked", "splash") and "dense" not in refused:
        if scores <= limit:
            refused["dense"] = f"its scores would take {score_bytes / 2**30:.1f} GiB (limit {max_bytes / 2**30:.0f} GiB)"
        else:
            refused["dense"] = f"T·S = {scores} > {limit}: materialising the scores costs memory and time"
    if chosen == "dense" and short:
        for name in ("chunked", "splash"):
            if name not in refused:
                refused[name] = f"T·S = {scores} <= {limit}: dense is faster at this size"
    for name in BACKENDS:
        if name != chosen:
            refused.setdefault(name, f"{chosen} is preferred when it applies")
    return Explanation(chosen, _with_layout(chosen, reason, call), refused)


def _with_layout(chosen: str, reason: str, call: AttentionCall) -> str:
    """``reason``, and for a per-device backend on sharded inputs, how it is split."""
    backend = BACKENDS[chosen]
    if not getattr(backend, "per_device", False) or (layout := per_device.plan(call, backend.supports)) is None:
        return reason
    return f"{reason}; runs per device in jax.shard_map ({layout.describe()})"
