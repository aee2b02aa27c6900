"""The worker: one case (or the matmul ceiling) measured in this process, its result
written as one line on stdout (`experiments.benchmark.messages`).

    python -m experiments.benchmark.worker case '<Case as JSON>'
    python -m experiments.benchmark.worker matmul '{"n": 2048, "dtype": "float32", "repeats": 5}'
    python -m experiments.benchmark.worker serve      # requests on stdin, one a line

The runner starts one per case so that each case's peak memory is its own: peak RSS
(``ru_maxrss``) on CPU, the device's ``peak_bytes_in_use`` on a GPU.  With the
config's ``worker: shared`` it starts one ``serve`` worker instead, which runs
request after request (`messages.request`: ``{"kind": ..., "spec": ...}``) and
answers each with its result line; before each it resets the process's peak RSS
where Linux allows it (``/proc/self/clear_refs``), else the peak is the worker's
so far and ``mem_kind`` says so.  Timing: the
function is jitted and compiled ahead (compile time reported apart), then timed by
`experiments.benchmark.timing.time_calls`.  Forward+backward is the gradient of
``sum(out * cotangent)`` with respect to q, k and v.  A jattn backend that refuses
the case (`jattn.explain` says why) makes a skipped row, or an error row when the
grid says ``force: true``.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np

from experiments.benchmark import impls, messages
from experiments.benchmark.config import Case
from experiments.benchmark.timing import time_calls, timing_fields


def _device_info() -> dict:
    import jax

    dev = jax.devices()[0]
    backend = jax.default_backend()
    return dict(
        platform="gpu" if backend in ("cuda", "rocm", "gpu") else backend,
        device_kind=dev.device_kind,
        device_count=jax.device_count(),
    )


def _memory_now() -> dict:
    """Current RSS and, on an accelerator, the device's bytes in use."""
    import jax
    import psutil

    out = dict(rss_bytes=psutil.Process().memory_info().rss)
    stats = jax.devices()[0].memory_stats()
    if stats:
        out["device_bytes_in_use"] = stats.get("bytes_in_use")
    return out


def _memory_peak() -> dict:
    """Peak RSS of this process (``ru_maxrss``; KiB on Linux, bytes on macOS) and, on an
    accelerator, the device's ``peak_bytes_in_use``; ``peak_mem_bytes`` is the device
    figure where there is one, else the RSS."""
    import resource

    import jax

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss = maxrss if sys.platform == "darwin" else maxrss * 1024
    out = dict(peak_rss_bytes=rss, peak_mem_bytes=rss, mem_kind="peak RSS")
    stats = jax.devices()[0].memory_stats()
    if stats and stats.get("peak_bytes_in_use") is not None:
        out["peak_device_bytes"] = stats["peak_bytes_in_use"]
        out["peak_mem_bytes"] = stats["peak_bytes_in_use"]
        out["mem_kind"] = "device peak_bytes_in_use"
    return out


def _normal(rng, shape: tuple[int, ...], dtype: str):
    """Standard-normal device array drawn on the host (no compilation in the worker)."""
    import jax
    import jax.numpy as jnp

    return jax.device_put(rng.standard_normal(shape, dtype=np.float32).astype(jnp.dtype(dtype)))


def _error_fields(exc: BaseException) -> dict:
    text = f"{type(exc).__name__}: {exc}"
    oom = isinstance(exc, MemoryError) or "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
    return dict(status="oom" if oom else "error", error=text[:4000])


def run_case(case: Case) -> dict:
    """Measure one case in this process; never raises (errors become the result)."""
    res: dict[str, Any] = {}
    try:
        import jax
        import jax.numpy as jnp

        res.update(_device_info())
        rng = np.random.default_rng(case.seed)
        q = _normal(rng, (case.B, case.T, case.N, case.H), case.dtype)
        k = _normal(rng, (case.B, case.T, case.K, case.H), case.dtype)
        v = _normal(rng, (case.B, case.T, case.K, case.H), case.dtype)
        if case.impl in impls.JATTN:
            try:
                res.update(impls.jattn_choice(case, q, k, v))
            except ValueError as e:  # jattn refuses: say why, as a skipped row unless forced
                if case.force:
                    raise
                res.update(status="skipped", error=f"jattn refuses: {e}")
                return res | _memory_peak()
        attn = impls.attention_function(case)
        if case.mode == "fwd":
            fn, args = attn, (q, k, v)
        else:
            ct = _normal(rng, (case.B, case.T, case.N, case.H), "float32")

            def loss(q, k, v, ct):
                return jnp.sum(attn(q, k, v).astype(jnp.float32) * ct)

            fn, args = jax.grad(loss, argnums=(0, 1, 2)), (q, k, v, ct)
        jax.block_until_ready(args)
        res.update({f"before_{n}": b for n, b in _memory_now().items()})
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        res["compile_s"] = time.perf_counter() - t0
        try:
            res["xla_temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
        except Exception:  # noqa: BLE001 - an optional figure; some backends lack it
            res["xla_temp_bytes"] = None
        res.update(timing_fields(time_calls(compiled, args, case.warmups, case.repeats)))
        res["status"] = "ok"
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a row
        res.update(_error_fields(exc))
    try:
        res.update(_memory_peak())
    except Exception:  # noqa: BLE001
        pass
    return res


def run_matmul(n: int, dtype: str, repeats: int, warmups: int = 1) -> dict:
    """The ceiling: an ``n x n`` by ``n x n`` matmul in ``dtype``, timed like a case
    (2·n³ FLOPs); ``n == 0`` only reports the environment."""
    res: dict[str, Any] = {}
    try:
        import jax
        import jax.numpy as jnp

        res.update(_device_info())
        res["jax_version"] = jax.__version__
        for name in ("jaxlib", "flax"):
            try:
                res[f"{name}_version"] = __import__(name).__version__
            except Exception:  # noqa: BLE001
                res[f"{name}_version"] = None
        res["default_matmul_precision"] = str(jax.config.jax_default_matmul_precision)
        if n:
            rng = np.random.default_rng(0)
            a, b = _normal(rng, (n, n), dtype), _normal(rng, (n, n), dtype)
            compiled = jax.jit(jnp.matmul).lower(a, b).compile()
            res.update(timing_fields(time_calls(compiled, (a, b), warmups, repeats)))
            res.update(n=n, dtype=dtype, flops=2 * n**3)
            res["flops_per_s"] = res["flops"] / (res["median_ms"] / 1e3)
        res["status"] = "ok"
    except BaseException as exc:  # noqa: BLE001
        res.update(_error_fields(exc))
    return res


def run_request(kind: str, spec: dict) -> dict:
    """A ``case`` (a `Case` as JSON) or a ``matmul`` (``n``, ``dtype``, ``repeats``)."""
    if kind == "case":
        return run_case(Case.from_json_dict(spec))
    return run_matmul(int(spec["n"]), spec["dtype"], int(spec["repeats"]))


def _reset_peak_rss() -> bool:
    """Start this process's peak RSS (``ru_maxrss``, VmHWM) afresh: Linux only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def serve(requests=None) -> int:
    """Answer request lines (default: stdin) until they end: each with its result line."""
    for line in sys.stdin if requests is None else requests:
        if not line.strip():
            continue
        request = json.loads(line)
        reset = _reset_peak_rss()
        res = run_request(request["kind"], request["spec"])
        if not reset and res.get("mem_kind") == "peak RSS":
            res["mem_kind"] = "peak RSS of the shared worker so far"
        messages.emit(res)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["serve"]:
        return serve()
    if len(args) != 2 or args[0] not in ("case", "matmul"):
        print("usage: python -m experiments.benchmark.worker {case|matmul} JSON | serve", file=sys.stderr)
        return 2
    res = run_request(args[0], json.loads(args[1]))
    messages.emit(res)
    return 0 if res.get("status") in ("ok", "skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
