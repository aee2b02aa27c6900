"""Benchmark: jattn's backends against the attention a user would pick instead.

    python -m experiments.benchmark --config configs/bench_cpu.yaml [key=value ...] [--out DIR]

Times forward and forward+backward of ``jax.nn.dot_product_attention`` (xla, and
cudnn on a GPU), ``flax.linen.dot_product_attention`` and jattn's dense, chunked,
pallas (GPU) and automatic backends on the shapes of a config (see `experiments.bench_config`), and a
square matmul that gives the machine's ceiling in the same run.

Each case runs in a fresh subprocess (``python -m experiments.benchmark --case JSON``)
so that its peak memory is its own: peak RSS (``ru_maxrss``) on CPU, the device's
``peak_bytes_in_use`` on a GPU.  A case that raises, runs out of memory, passes its
``memory_limit_gb``, dies or outlasts its ``timeout_s`` becomes a row that says so.

Timing: the function is jitted and compiled ahead (compile time reported apart), called
``warmups`` times, then ``repeats`` timed calls each ended by ``block_until_ready``;
the median and the minimum are reported.  Forward+backward is the gradient of
``sum(out * cotangent)`` with respect to q, k and v.

FLOPs (one convention for every implementation, so that rates compare): forward
``4·B·N·T·S·H`` (two matmuls; half of it when causal), forward+backward 3.5 × forward
(the backward counted as 2.5 × forward, as FlashAttention's benchmarks count it).  The
ratio column is time-based and does not depend on the convention.

Writes ``results.json`` (after every case, so a stopped run keeps what it measured),
``results.md``, ``time_vs_T.png`` and ``memory_vs_T.png`` into ``runs/bench/<name>/``.

Example (the pure parts; a run needs a config):
  >>> attention_flops(B=1, N=8, T=1024, S=1024, H=64, causal=True, mode="fwd")
  1073741824
  >>> attention_flops(B=1, N=8, T=1024, S=1024, H=64, causal=True, mode="fwd+bwd")
  3758096384
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform as platform_lib
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

from experiments.bench_config import IMPLS, BenchConfig, Case, ConfigError, load_config

# The benchmark's jattn implementations → `implementation=` of jattn.dot_product_attention.
JATTN_IMPLEMENTATION = {"dense": "dense", "chunked": "chunked", "pallas": "pallas", "auto": None}

# Forward+backward counts (1 + BACKWARD_FLOP_FACTOR) × the forward FLOPs.
BACKWARD_FLOP_FACTOR = 2.5
FLOP_CONVENTION = (
    "forward = 4·B·N·T·S·H (Q·Kᵀ and P·V, 2 FLOPs per multiply-add), halved when causal; "
    "forward+backward = 3.5 × forward (backward counted as 2.5 × forward, the "
    "FlashAttention benchmark convention), the same for every implementation"
)
RESULT_MARK = "@@jattn-bench-result@@ "
STATUSES = ("ok", "skipped", "error", "oom", "killed", "timeout")
# A case is stopped when the machine has less than this much memory available.
MIN_AVAILABLE_BYTES = 512 * 2**20
_POLL_S = 0.05
# Shortest timed sample: faster calls are looped within one sample (see time_calls).
MIN_SAMPLE_S = 0.01
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------
# Pure helpers.


def attention_flops(*, B: int, N: int, T: int, S: int, H: int, causal: bool, mode: str) -> int:
    """FLOPs of one call under this benchmark's convention (see module docstring).

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
    xla_ms = {
        _shape_key(r): r["median_ms"] for r in records
        if r["impl"] == "jax_xla" and r["status"] == "ok"
    }
    out = []
    for r in records:
        r = dict(r)
        if r["status"] == "ok":
            flops = attention_flops(
                B=r["B"], N=r["N"], T=r["T"], S=r.get("S", r["T"]), H=r["H"],
                causal=r["causal"], mode=r["mode"],
            )
            rate = flops / (r["median_ms"] / 1e3)
            r["flops"] = flops
            r["flops_per_s"] = rate
            r["frac_of_ceiling"] = rate / ceiling_flops_per_s if ceiling_flops_per_s else None
            base = xla_ms.get(_shape_key(r))
            r["ratio_vs_jax_xla"] = base / r["median_ms"] if base else None
        out.append(r)
    return out


def _shape_key(r: dict) -> tuple:
    return (r["mode"], r["T"], r["causal"], r["B"], r["N"], r["K"], r["H"], r["dtype"])


def plan_skip(case: Case, platform: str | None) -> str | None:
    """Why a case is not run (recorded as a skipped row), or None to run it.

    Example:
      >>> from experiments.bench_config import Case
      >>> c = Case("jax_cudnn", "fwd", 64, True, 1, 2, 2, 16, "bfloat16", 1, 0, 60.0)
      >>> plan_skip(c, "cpu")
      'cuDNN attention needs an NVIDIA GPU; the cases run on cpu'
      >>> plan_skip(c, "gpu") is None
      True
    """
    if case.skip:
        return case.skip
    if case.impl == "jax_cudnn" and platform != "gpu" and not case.force:
        return f"cuDNN attention needs an NVIDIA GPU; the cases run on {platform or 'an unknown platform'}"
    if case.impl == "pallas" and platform != "gpu" and not case.force:
        return f"jattn's Triton kernels need an NVIDIA GPU; the cases run on {platform or 'an unknown platform'}"
    return None


# ----------------------------------------------------------------------------------
# The worker: one case (or the matmul ceiling) in this process.


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


def time_calls(fn: Callable, args: tuple, warmups: int, repeats: int) -> list[float]:
    """Per-call seconds of ``repeats`` samples, after ``warmups`` untimed calls (at
    least one).  A sample loops enough calls to last `MIN_SAMPLE_S` (judged from the
    last warm-up) and waits for the last one, so sub-millisecond GPU calls are timed
    back to back, not through one host round trip each; a call longer than that is
    timed alone."""
    import jax

    for _ in range(max(warmups - 1, 0)):
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    calls = max(1, int(MIN_SAMPLE_S / max(time.perf_counter() - t0, 1e-9)))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls)
    return times


def _timing_fields(times: list[float]) -> dict:
    return dict(
        times_ms=[t * 1e3 for t in times],
        median_ms=statistics.median(times) * 1e3,
        min_ms=min(times) * 1e3,
    )


def attention_function(case: Case) -> Callable:
    """``f(q, k, v) -> out`` for the case's implementation, called as its users would.

    Example:
      >>> import jax.numpy as jnp
      >>> from experiments.bench_config import Case
      >>> f = attention_function(Case("flax", "fwd", 16, True, 1, 4, 2, 8, "float32", 1, 0, 60.0))
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

    impl = JATTN_IMPLEMENTATION[case.impl]

    def f(q, k, v):
        return jattn.dot_product_attention(
            q, k, v, is_causal=case.causal, implementation=impl, block_sizes=case.block_sizes
        )

    return f


def _jattn_choice(case: Case, q, k, v) -> dict:
    """Which jattn backend serves the case and why (`jattn.explain`); raises like the
    call would when the requested backend cannot serve it."""
    import jattn

    impl = JATTN_IMPLEMENTATION[case.impl]
    choice = jattn.explain(q, k, v, is_causal=case.causal, implementation=impl, block_sizes=case.block_sizes)
    return dict(backend=choice.backend, backend_reason=choice.reason)


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
        if case.impl in JATTN_IMPLEMENTATION:
            res.update(_jattn_choice(case, q, k, v))
        attn = attention_function(case)
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
        res.update(_timing_fields(time_calls(compiled, args, case.warmups, case.repeats)))
        res["status"] = "ok"
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a row
        res.update(_error_fields(exc))
    try:
        res.update(_memory_peak())
    except Exception:  # noqa: BLE001
        pass
    return res


def run_matmul(n: int, dtype: str, repeats: int, warmups: int = 1) -> dict:
    """The ceiling: an ``n × n`` by ``n × n`` matmul in ``dtype``, timed like a case
    (2·n³ FLOPs); ``n == 0`` only reports the environment."""
    res: dict[str, Any] = {}
    try:
        import jax
        import jax.numpy as jnp

        res.update(_device_info())
        res["jax_version"] = jax.__version__
        try:
            import jaxlib

            res["jaxlib_version"] = jaxlib.__version__
        except Exception:  # noqa: BLE001
            res["jaxlib_version"] = None
        try:
            import flax

            res["flax_version"] = flax.__version__
        except Exception:  # noqa: BLE001
            res["flax_version"] = None
        res["default_matmul_precision"] = str(jax.config.jax_default_matmul_precision)
        if n:
            rng = np.random.default_rng(0)
            a, b = _normal(rng, (n, n), dtype), _normal(rng, (n, n), dtype)
            compiled = jax.jit(jnp.matmul).lower(a, b).compile()
            res.update(_timing_fields(time_calls(compiled, (a, b), warmups, repeats)))
            res.update(n=n, dtype=dtype, flops=2 * n**3)
            res["flops_per_s"] = res["flops"] / (res["median_ms"] / 1e3)
        res["status"] = "ok"
    except BaseException as exc:  # noqa: BLE001
        res.update(_error_fields(exc))
    return res


def _emit(result: dict) -> None:
    sys.stdout.write("\n" + RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------------
# The runner: cases in subprocesses, watched for time and memory.


def _worker_env(cfg: BenchConfig) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH")) if p)
    if cfg.platform:
        env["JAX_PLATFORMS"] = {"cpu": "cpu", "gpu": "cuda", "tpu": "tpu"}[cfg.platform]
    # JAX's allocator settings are left as the user has them: with its default
    # preallocation (75% of the GPU) the big jax.nn xla cases fit where, growing on
    # demand (XLA_PYTHON_CLIENT_PREALLOCATE=false), they ran out of memory on an H200.
    # peak_bytes_in_use counts what the case used either way.
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _tail(data: bytes, limit: int = 2000) -> str:
    text = data.decode("utf-8", "replace").strip()
    return text[-limit:]


def run_subprocess(
    worker_args: list[str], *, timeout_s: float, memory_limit_gb: float | None, env: dict
) -> dict:
    """Run ``python -m experiments.benchmark <worker_args>`` and return its result,
    or a failure record: ``timeout``, ``killed`` (memory limit or machine nearly out of
    memory), ``oom`` (killed by the system), ``error`` (exited without a result).

    Example:
      >>> spec = json.dumps(dict(n=0, dtype="float32", repeats=1))
      >>> run_subprocess(["--matmul", spec], timeout_s=0.01, memory_limit_gb=None,
      ...                env=dict(os.environ))["status"]
      'timeout'
    """
    import psutil

    limit = None if memory_limit_gb is None else memory_limit_gb * 2**30
    cmd = [sys.executable, "-m", "experiments.benchmark", *worker_args]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=_REPO_ROOT)
        try:
            ps = psutil.Process(proc.pid)
        except psutil.Error:
            ps = None
        try:
            stop, watched_peak = _watch(proc, ps, t0, timeout_s, limit, memory_limit_gb)
        finally:
            if proc.poll() is None:  # interrupted: leave no case running behind us
                proc.kill()
                proc.wait()
        wall_s = time.monotonic() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    return _collect(proc.returncode, stdout, stderr, stop, wall_s, watched_peak)


def _watch(proc, ps, t0: float, timeout_s: float, limit: float | None, memory_limit_gb: float | None):
    """Poll the case's process until it exits or must be stopped; ``(stop, peak RSS)``."""
    import psutil

    stop: tuple[str, str] | None = None
    watched_peak = 0
    while proc.poll() is None:
        elapsed = time.monotonic() - t0
        rss = 0
        if ps is not None:
            try:
                rss = ps.memory_info().rss
            except psutil.Error:
                rss = 0
        watched_peak = max(watched_peak, rss)
        if elapsed > timeout_s:
            stop = ("timeout", f"timed out after {timeout_s:g} s (timeout_s)")
        elif limit is not None and rss > limit:
            stop = ("killed", f"resident memory {rss / 2**30:.2f} GiB passed memory_limit_gb={memory_limit_gb:g}")
        elif psutil.virtual_memory().available < MIN_AVAILABLE_BYTES:
            stop = ("killed", f"stopped at {rss / 2**30:.2f} GiB: the machine had under "
                    f"{MIN_AVAILABLE_BYTES // 2**20} MiB available")
        if stop:
            proc.kill()
            proc.wait()
            break
        time.sleep(_POLL_S)
    return stop, watched_peak


def _collect(rc: int, stdout: bytes, stderr: bytes, stop, wall_s: float, watched_peak: int) -> dict:
    """The case's record from what its process printed and how it ended."""
    result = None
    for line in stdout.decode("utf-8", "replace").splitlines():
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK):])
    base = dict(wall_s=wall_s, watched_peak_rss_bytes=watched_peak or None)
    if stop is not None:
        return dict(base, status=stop[0], error=stop[1])
    if result is None:
        if rc == -9:
            why = "killed by SIGKILL (most likely the system's out-of-memory killer)"
            return dict(base, status="oom", error=why)
        return dict(base, status="error", error=f"exit status {rc} without a result: {_tail(stderr)}")
    result.update(base)
    if result.get("status") != "ok" and stderr:
        result.setdefault("stderr_tail", _tail(stderr))
    return result


def _environment(cfg: BenchConfig, command: str, config_path: str | None) -> dict:
    import psutil

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=_REPO_ROOT, capture_output=True,
            text=True, timeout=10,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return dict(
        command=command,
        config_path=config_path,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        python=platform_lib.python_version(),
        machine=platform_lib.machine(),
        cpu_count=os.cpu_count(),
        memory_total_bytes=psutil.virtual_memory().total,
        load_average_start=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        git_commit=commit,
        platform_requested=cfg.platform,
    )


def _config_dict(cfg: BenchConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["grids"] = [dict(dataclasses.asdict(g), overrides=dict(g.overrides)) for g in cfg.grids]
    return d


class _Progress:
    """A rich progress bar on a terminal, else one plain line per case."""

    def __init__(self, total: int, quiet: bool):
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.quiet = quiet
        self.bar = None
        if not quiet and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), console=self.console,
            )
            self.task = self.bar.add_task("benchmark", total=total)
            self.bar.start()

    def start(self, i: int, total: int, label: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=f"[{i}/{total}] {label}")

    def done(self, i: int, total: int, label: str, summary: str) -> None:
        if self.quiet:
            return
        line = f"[{i}/{total}] {label}: {summary}"
        if self.bar is not None:
            self.bar.console.print(line, markup=False)
            self.bar.advance(self.task)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _summary(rec: dict, xla_ms: dict) -> str:
    if rec["status"] != "ok":
        return f"{rec['status']}: {str(rec.get('error', ''))[:200]}"
    parts = [f"{_fmt(rec['median_ms'], 4)} ms"]
    base = xla_ms.get(_shape_key(rec))
    if base and rec["impl"] != "jax_xla":
        parts.append(f"{base / rec['median_ms']:.2f}x jax.nn xla")
    if rec.get("peak_mem_bytes"):
        parts.append(f"peak {rec['peak_mem_bytes'] / 2**30:.3g} GiB")
    if rec.get("backend") and rec["impl"] == "auto":
        parts.append(f"auto -> {rec['backend']}")
    return ", ".join(parts)


def _write_json(path: str, payload: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(tmp, path)


def run_benchmark(
    cfg: BenchConfig, out_dir: str, *, command: str, config_path: str | None = None,
    config_text: str | None = None, quiet: bool = False,
) -> dict:
    """Run every case of ``cfg`` and write results.json, results.md and the plots into
    ``out_dir``; returns the results (what results.json holds).

    Example (what ``python -m experiments.benchmark --config ...`` does):
      >>> from experiments.bench_config import load_config
      >>> cfg = load_config("configs/bench_smoke.yaml")
      >>> res = run_benchmark(cfg, "runs/bench/demo", command="demo")  # doctest: +SKIP
      >>> {r["status"] for r in res["cases"]}                          # doctest: +SKIP
      {'ok', 'skipped', 'error'}
    """
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "results.json")
    env = _worker_env(cfg)
    t_start = time.monotonic()
    cases = cfg.cases()
    payload: dict[str, Any] = dict(
        name=cfg.name, complete=False, flop_convention=FLOP_CONVENTION,
        environment=_environment(cfg, command, config_path), config=_config_dict(cfg),
        config_text=config_text, ceiling=None, cases=[],
    )
    progress = _Progress(len(cases) + 1, quiet)
    try:
        # The ceiling first: it also reports the platform, device and versions.
        label = f"matmul ceiling {cfg.ceiling_n}² {cfg.dtype}" if cfg.ceiling_n else "environment probe"
        progress.start(1, len(cases) + 1, label)
        probe = run_subprocess(
            ["--matmul", json.dumps(dict(n=cfg.ceiling_n, dtype=cfg.dtype, repeats=cfg.ceiling_repeats))],
            timeout_s=max(cfg.timeout_s, 120.0), memory_limit_gb=cfg.memory_limit_gb, env=env,
        )
        payload["ceiling"] = probe
        for key in ("platform", "device_kind", "device_count", "jax_version", "jaxlib_version",
                    "flax_version", "default_matmul_precision"):
            payload["environment"][key] = probe.get(key)
        platform = probe.get("platform")
        ceiling_rate = probe.get("flops_per_s") if probe.get("status") == "ok" else None
        if probe.get("status") != "ok":
            summary = f"{probe['status']}: {probe.get('error', '')[:200]}"
        elif ceiling_rate:
            summary = f"{_rate(ceiling_rate)} on {probe.get('device_kind')}"
        else:
            summary = f"{probe.get('platform')} {probe.get('device_kind')}"
        progress.done(1, len(cases) + 1, label, summary)

        xla_ms: dict[tuple, float] = {}
        for i, case in enumerate(cases, start=2):
            progress.start(i, len(cases) + 1, case.label)
            rec: dict[str, Any] = dict(case.to_json_dict(), label=case.label)
            skip = plan_skip(case, platform)
            elapsed = time.monotonic() - t_start
            if skip is None and cfg.time_budget_s is not None and elapsed > cfg.time_budget_s:
                skip = f"time budget spent ({elapsed:.0f} s > time_budget_s={cfg.time_budget_s:g})"
            if skip is not None:
                rec.update(status="skipped", error=skip)
            else:
                rec.update(run_subprocess(
                    ["--case", json.dumps(case.to_json_dict())], timeout_s=case.timeout_s,
                    memory_limit_gb=case.memory_limit_gb, env=env,
                ))
                if rec.get("peak_mem_bytes") is None and platform != "gpu" and rec.get("watched_peak_rss_bytes"):
                    # Stopped from outside: the RSS it had reached (a lower bound).
                    rec.update(peak_mem_bytes=rec["watched_peak_rss_bytes"], mem_kind="RSS when stopped")
            if rec["impl"] == "jax_xla" and rec["status"] == "ok":
                xla_ms[_shape_key(rec)] = rec["median_ms"]
            payload["cases"].append(rec)
            _write_json(json_path, payload)
            progress.done(i, len(cases) + 1, case.label, _summary(rec, xla_ms))
    finally:
        progress.close()
    payload["cases"] = derive(payload["cases"], ceiling_rate)
    payload["complete"] = True
    payload["environment"]["wall_s"] = time.monotonic() - t_start
    payload["environment"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    _write_json(json_path, payload)
    _write_outputs(payload, out_dir)
    return payload


def _write_outputs(payload: dict, out_dir: str) -> None:
    from experiments import bench_plot

    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(render_markdown(payload))
    bench_plot.plot_results(payload, out_dir)


def write_report(out_dir: str) -> dict:
    """Rewrite ``results.md`` and the plots from ``out_dir/results.json``, also from a
    run that was stopped part way (its table then says so)."""
    with open(os.path.join(out_dir, "results.json")) as f:
        payload = json.load(f)
    ceiling = payload.get("ceiling") or {}
    rate = ceiling.get("flops_per_s") if ceiling.get("status") == "ok" else None
    payload["cases"] = derive(payload["cases"], rate)
    _write_outputs(payload, out_dir)
    return payload


# ----------------------------------------------------------------------------------
# The markdown table.


def _fmt(x: float | None, digits: int = 3) -> str:
    """``digits`` significant digits, without an exponent for large numbers.

    Example:
      >>> [_fmt(x, 4) for x in (0.012341, 12.345, 19070.4, None)]
      ['0.01234', '12.35', '19070', '—']
    """
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if abs(x) >= 10**digits:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def _rate(flops_per_s: float) -> str:
    if flops_per_s >= 1e12:
        return f"{_fmt(flops_per_s / 1e12, 4)} TFLOP/s"
    return f"{_fmt(flops_per_s / 1e9, 4)} GFLOP/s"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def render_markdown(payload: dict) -> str:
    """The results as markdown: a header with the environment, then one table per mode.

    Rows are sorted by mask, batch, T and implementation; a failed or skipped case is a
    row whose status and notes say why.

    Example:
      >>> row = dict(impl="jax_xla", mode="fwd", T=8, causal=True, B=1, N=1, K=1, H=4,
      ...            dtype="float32", status="ok", median_ms=2.0, min_ms=1.9)
      >>> md = render_markdown(dict(name="demo", environment={}, ceiling=None,
      ...                           cases=derive([row], None)))
      >>> print(md.splitlines()[-1])   # 512 FLOPs in 2 ms
      | 8 | 1 | causal | jax.nn xla | ok | 2 | 1.9 | 0.000256 | — | 1 | — | — |  |
    """
    env = payload["environment"]
    cases = payload["cases"]
    ceiling = payload.get("ceiling") or {}
    rate_ok = ceiling.get("status") == "ok" and ceiling.get("flops_per_s")
    rates = [r["flops_per_s"] for r in cases if r.get("flops_per_s")]
    top = max(rates + ([ceiling["flops_per_s"]] if rate_ok else []), default=0.0)
    unit, scale = ("TFLOP/s", 1e12) if top >= 1e12 else ("GFLOP/s", 1e9)
    on_device = any(r.get("mem_kind") == "device peak_bytes_in_use" for r in cases)
    mem_header = "peak device mem (GiB)" if on_device else "peak RSS (GiB)"
    lines = [f"## {payload['name']}: {env.get('device_kind') or '?'} ({env.get('platform') or '?'})", ""]
    lines.append(f"- command: `{env.get('command')}`")
    lines.append(
        f"- {env.get('date')}; jax {env.get('jax_version')}, jaxlib {env.get('jaxlib_version')}, "
        f"flax {env.get('flax_version')}; {env.get('cpu_count')} CPUs; git {env.get('git_commit')}"
    )
    if env.get("load_average_start"):
        lines.append(
            "- load average at start / end: "
            + " / ".join(_fmt(x[0], 3) for x in (env.get("load_average_start"), env.get("load_average_end")) if x)
        )
    if rate_ok:
        lines.append(
            f"- matmul ceiling ({ceiling['n']}² {ceiling['dtype']}, median of "
            f"{len(ceiling['times_ms'])}): {_fmt(ceiling['flops_per_s'] / scale)} {unit}"
        )
    elif ceiling.get("status") == "ok":
        lines.append("- matmul ceiling: not measured (ceiling_n: 0)")
    elif ceiling:
        lines.append(f"- matmul ceiling: not measured ({ceiling.get('status')}: {_cell(ceiling.get('error', ''))[:200]})")
    if not payload.get("complete", True):
        lines.append("- **incomplete run**: it was stopped before every case had run")
    lines.append(f"- FLOPs: {payload.get('flop_convention', FLOP_CONVENTION)}")
    lines.append(
        "- time: median (and min) per call over the timed samples after warm-up (calls under "
        f"{MIN_SAMPLE_S * 1e3:g} ms are looped within a sample), compile excluded; "
        "'vs jax.nn xla' = its time / this time on the same shape (> 1: faster)"
    )
    lines.append("")
    vary = [k for k in ("N", "K", "H", "dtype") if len({r[k] for r in cases}) > 1]
    fixed = {k: cases[0][k] for k in ("N", "K", "H", "dtype") if k not in vary} if cases else {}
    if fixed:
        lines.append("Shapes: " + ", ".join(f"{k}={v}" for k, v in fixed.items()) + " (S = T).")
        lines.append("")
    impl_order = list(IMPLS)
    header = (["T", "B"] + vary + ["mask", "implementation", "status", "ms (median)", "ms (min)", unit,
              "% of ceiling", "vs jax.nn xla", mem_header, "compile (s)", "notes"])
    for mode, title in (("fwd", "forward"), ("fwd+bwd", "forward+backward")):
        rows = [r for r in cases if r["mode"] == mode]
        if not rows:
            continue
        rows.sort(key=lambda r: (not r["causal"], r["B"], r["T"], *(str(r[k]) for k in vary),
                                 impl_order.index(r["impl"])))
        lines += [f"### {title}", "", "| " + " | ".join(header) + " |",
                  "|" + "|".join("---" for _ in header) + "|"]
        for r in rows:
            ok = r["status"] == "ok"
            notes = []
            if r.get("backend") and r["impl"] == "auto":
                notes.append(f"auto picked {r['backend']}")
            if not ok and r.get("error"):
                notes.append(str(r["error"])[:160])
            frac = r.get("frac_of_ceiling")
            mem = r.get("peak_mem_bytes")
            if mem and ok:
                mem_txt = _fmt(mem / 2**30)
            elif mem and r["status"] in ("oom", "killed", "timeout"):
                mem_txt = "≥ " + _fmt(mem / 2**30)  # where it was stopped: a lower bound
            else:
                mem_txt = "—"
            cells = [str(r["T"]), str(r["B"])] + [str(r[k]) for k in vary] + [
                "causal" if r["causal"] else "none",
                IMPLS[r["impl"]],
                r["status"],
                _fmt(r.get("median_ms"), 4) if ok else "—",
                _fmt(r.get("min_ms"), 4) if ok else "—",
                _fmt(r["flops_per_s"] / scale) if ok else "—",
                _fmt(100 * frac) if ok and frac else "—",
                _fmt(r.get("ratio_vs_jax_xla")) if ok else "—",
                mem_txt,
                _fmt(r.get("compile_s"), 2) if ok else "—",
                "; ".join(notes),
            ]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------
# Command line.


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmark",
        description="Benchmark jattn's backends against jax.nn and flax (see configs/bench_*.yaml).",
    )
    parser.add_argument("--config", help="a YAML benchmark config, e.g. configs/bench_cpu.yaml")
    parser.add_argument("--out", help="output folder (default: runs/bench/<config name>)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--report", metavar="DIR",
                        help="only rewrite DIR/results.md and the plots from DIR/results.json "
                             "(e.g. after a run was stopped)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # worker: one case as JSON
    parser.add_argument("--matmul", help=argparse.SUPPRESS)  # worker: the ceiling as JSON
    parser.add_argument("overrides", nargs="*", help="key=value overrides of top-level config keys")
    args = parser.parse_args(argv)
    if args.case:
        res = run_case(Case.from_json_dict(json.loads(args.case)))
        _emit(res)
        return 0 if res.get("status") == "ok" else 1
    if args.matmul:
        spec = json.loads(args.matmul)
        res = run_matmul(int(spec["n"]), spec["dtype"], int(spec["repeats"]))
        _emit(res)
        return 0 if res.get("status") == "ok" else 1
    if args.report:
        write_report(args.report)
        print(f"wrote {os.path.join(args.report, 'results.md')} and the plots", file=sys.stderr)
        return 0
    if not args.config:
        parser.error("--config: required (e.g. --config configs/bench_smoke.yaml)")
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with open(args.config) as f:
        config_text = f.read()
    command = "python -m experiments.benchmark " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    out_dir = os.path.abspath(args.out or cfg.output_dir())
    payload = run_benchmark(cfg, out_dir, command=command, config_path=args.config,
                            config_text=config_text, quiet=args.quiet)
    if not args.quiet:
        counts: dict[str, int] = {}
        for r in payload["cases"]:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        print(f"wrote {out_dir}/results.json, results.md, time_vs_T.png, memory_vs_T.png "
              f"({', '.join(f'{n} {s}' for s, n in counts.items())})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
