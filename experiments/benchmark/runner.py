"""The runner: every case of a config in its own worker process, watched for time and
memory, its results written as they come.  With the config's ``worker: shared`` one
long-lived worker (`SharedWorker`) serves the cases one after another instead,
watched the same way and started afresh after a case that had to be stopped: no
JAX start-up per case, but a case's memory is then measured in a process that has
run the cases before it.

A case that raises, runs out of memory, passes its ``memory_limit_gb``, dies or
outlasts its ``timeout_s`` becomes a row that says so.  ``results.json`` is rewritten
after every case, so a stopped run keeps what it measured (`report.write_report`
turns it into the table and plots).
"""

from __future__ import annotations

import datetime
import json
import os
import queue
import platform as platform_lib
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from experiments.benchmark import messages, report
from experiments.benchmark.config import BenchConfig, Case
from experiments.benchmark.flops import FLOP_CONVENTION, derive, shape_key
from experiments.benchmark.impls import PEERS

# A case is stopped when the machine has less than this much memory available.
MIN_AVAILABLE_BYTES = 512 * 2**20
_POLL_S = 0.05
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def plan_skip(case: Case, platform: str | None) -> str | None:
    """Why a case is not run (recorded as a skipped row), or None to run it: the grid
    says skip, or a peer needs another platform (unless the grid says ``force``).
    jattn's backends are asked in the worker (`jattn.explain`), which records their
    own reason.

    Example:
      >>> c = Case(impl="jax_cudnn", mode="fwd", T=64, causal=True, B=1, N=2, K=2, H=16)
      >>> plan_skip(c, "cpu")
      'cuDNN attention needs an NVIDIA GPU; the cases run on cpu'
      >>> plan_skip(c, "gpu") is None
      True
    """
    if case.skip:
        return case.skip
    peer = PEERS.get(case.impl)
    if peer is not None and peer.needs is not None and platform != peer.needs and not case.force:
        return f"{peer.why}; the cases run on {platform or 'an unknown platform'}"
    return None


def worker_env(cfg: BenchConfig) -> dict:
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
    return data.decode("utf-8", "replace").strip()[-limit:]


def run_subprocess(kind: str, spec: dict, *, timeout_s: float, memory_limit_gb: float | None,
                   env: dict) -> dict:
    """Run a worker (``kind`` ``case`` or ``matmul``, see `messages.worker_command`) and
    return its result, or a failure record: ``timeout``, ``killed`` (memory limit or
    machine nearly out of memory), ``oom`` (killed by the system), ``error`` (exited
    without a result).

    Example:
      >>> run_subprocess("matmul", dict(n=0, dtype="float32", repeats=1), timeout_s=0.01,
      ...                memory_limit_gb=None, env=dict(os.environ))["status"]
      'timeout'
    """
    import psutil

    limit = None if memory_limit_gb is None else memory_limit_gb * 2**30
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(messages.worker_command(kind, spec), stdout=out, stderr=err, env=env,
                                cwd=_REPO_ROOT)
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
    stop: tuple[str, str] | None = None
    watched_peak = 0
    while proc.poll() is None:
        stop, rss = _stop_reason(ps, time.monotonic() - t0, timeout_s, limit, memory_limit_gb)
        watched_peak = max(watched_peak, rss)
        if stop:
            proc.kill()
            proc.wait()
            break
        time.sleep(_POLL_S)
    return stop, watched_peak


def _stop_reason(ps, elapsed: float, timeout_s: float, limit: float | None,
                 memory_limit_gb: float | None) -> tuple[tuple[str, str] | None, int]:
    """``((status, why) or None, the process's RSS now)``: whether to stop a case now."""
    import psutil

    rss = 0
    if ps is not None:
        try:
            rss = ps.memory_info().rss
        except psutil.Error:
            rss = 0
    stop = None
    if elapsed > timeout_s:
        stop = ("timeout", f"timed out after {timeout_s:g} s (timeout_s)")
    elif limit is not None and rss > limit:
        stop = ("killed", f"resident memory {rss / 2**30:.2f} GiB passed memory_limit_gb={memory_limit_gb:g}")
    elif psutil.virtual_memory().available < MIN_AVAILABLE_BYTES:
        stop = ("killed", f"stopped at {rss / 2**30:.2f} GiB: the machine had under "
                f"{MIN_AVAILABLE_BYTES // 2**20} MiB available")
    return stop, rss


class SharedWorker:
    """One worker process (``python -m experiments.benchmark.worker serve``) that runs
    request after request, each watched like a case's own process (`run_subprocess`):
    its time counts from the request, or from the start of the process when this
    request started it; its memory is the worker's RSS.  A request that must be
    stopped kills the worker, and the next request starts a new one.  Use as a
    context manager (or call `close`).

    Example:
      >>> with SharedWorker(dict(os.environ)) as w:
      ...     w.run("matmul", dict(n=0, dtype="float32", repeats=1), timeout_s=0.01,
      ...           memory_limit_gb=None)["status"]
      'timeout'
    """

    def __init__(self, env: dict):
        self.env = env
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> SharedWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        import psutil

        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(messages.serve_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, env=self.env, cwd=_REPO_ROOT)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=_read_lines, args=(self.proc.stdout, self.lines), daemon=True).start()
        try:
            self.ps = psutil.Process(self.proc.pid)
        except psutil.Error:
            self.ps = None

    def run(self, kind: str, spec: dict, *, timeout_s: float, memory_limit_gb: float | None) -> dict:
        """The request's result, or a failure record as `run_subprocess` gives."""
        t0 = time.monotonic()
        if self.proc is None:
            self._start()
        proc, err_from = self.proc, os.fstat(self.err.fileno()).st_size
        limit = None if memory_limit_gb is None else memory_limit_gb * 2**30
        stop, watched_peak, printed, result = None, 0, [], None
        try:
            proc.stdin.write(messages.request(kind, spec).encode())
            proc.stdin.flush()
        except OSError:  # it died before reading the request; its end is read below
            pass
        while result is None:
            stop, rss = _stop_reason(self.ps, time.monotonic() - t0, timeout_s, limit, memory_limit_gb)
            watched_peak = max(watched_peak, rss)
            if stop:
                break
            try:  # wake at the timeout, not a poll later
                line = self.lines.get(timeout=min(_POLL_S, max(timeout_s - (time.monotonic() - t0), 0) + 1e-3))
            except queue.Empty:
                continue
            if line is None:  # stdout closed: the worker died
                break
            printed.append(line)
            result = messages.parse(line)
        if result is None:  # stopped or died: this worker serves no more requests
            self.close(kill=True)
        self.err.seek(err_from)
        stderr = self.err.read()
        return _collect(proc.returncode, b"".join(printed), stderr, stop, time.monotonic() - t0, watched_peak)

    def close(self, kill: bool = False) -> None:
        """Stop the worker (at once with ``kill``; else once it has read its input)."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if kill:
            proc.kill()
        else:
            try:
                proc.stdin.close()
                proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
        proc.wait()


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in iter(stream.readline, b""):
        lines.put(line)
    lines.put(None)


def _collect(rc: int, stdout: bytes, stderr: bytes, stop, wall_s: float, watched_peak: int) -> dict:
    """The case's record from what its process printed and how it ended."""
    result = messages.parse(stdout)
    base = dict(wall_s=wall_s, watched_peak_rss_bytes=watched_peak or None)
    if stop is not None:
        return dict(base, status=stop[0], error=stop[1])
    if result is None:
        if rc == -9:
            return dict(base, status="oom", error="killed by SIGKILL (most likely the system's out-of-memory killer)")
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
    parts = [f"{report.fmt(rec['median_ms'], 4)} ms"]
    base = xla_ms.get(shape_key(rec))
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
      >>> from experiments.benchmark.config import load_config
      >>> cfg = load_config("configs/bench_smoke.yaml")
      >>> res = run_benchmark(cfg, "runs/bench/demo", command="demo")  # doctest: +SKIP
      >>> {r["status"] for r in res["cases"]}                          # doctest: +SKIP
      {'ok', 'skipped', 'error'}
    """
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "results.json")
    env = worker_env(cfg)
    t_start = time.monotonic()
    cases = cfg.cases()
    payload: dict[str, Any] = dict(
        name=cfg.name, complete=False, flop_convention=FLOP_CONVENTION,
        environment=_environment(cfg, command, config_path), config=cfg.record(),
        config_text=config_text, ceiling=None, cases=[],
    )
    progress = _Progress(len(cases) + 1, quiet)
    shared = SharedWorker(env) if cfg.worker == "shared" else None

    def run_in_worker(kind: str, spec: dict, **limits) -> dict:
        return shared.run(kind, spec, **limits) if shared else run_subprocess(kind, spec, env=env, **limits)

    try:
        # The ceiling first: it also reports the platform, device and versions.
        label = f"matmul ceiling {cfg.ceiling_n}² {cfg.dtype}" if cfg.ceiling_n else "environment probe"
        progress.start(1, len(cases) + 1, label)
        probe = run_in_worker(
            "matmul", dict(n=cfg.ceiling_n, dtype=cfg.dtype, repeats=cfg.ceiling_repeats),
            timeout_s=max(cfg.timeout_s, 120.0), memory_limit_gb=cfg.memory_limit_gb,
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
            summary = f"{report.rate(ceiling_rate)} on {probe.get('device_kind')}"
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
                rec.update(run_in_worker("case", case.to_json_dict(), timeout_s=case.timeout_s,
                                         memory_limit_gb=case.memory_limit_gb))
                if rec.get("peak_mem_bytes") is None and platform != "gpu" and rec.get("watched_peak_rss_bytes"):
                    # Stopped from outside: the RSS it had reached (a lower bound).
                    rec.update(peak_mem_bytes=rec["watched_peak_rss_bytes"], mem_kind="RSS when stopped")
            if rec["impl"] == "jax_xla" and rec["status"] == "ok":
                xla_ms[shape_key(rec)] = rec["median_ms"]
            payload["cases"].append(rec)
            _write_json(json_path, payload)
            progress.done(i, len(cases) + 1, case.label, _summary(rec, xla_ms))
    finally:
        if shared:
            shared.close(kill=True)
        progress.close()
    payload["cases"] = derive(payload["cases"], ceiling_rate)
    payload["complete"] = True
    payload["environment"]["wall_s"] = time.monotonic() - t_start
    payload["environment"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    _write_json(json_path, payload)
    report.write_outputs(payload, out_dir)
    return payload
