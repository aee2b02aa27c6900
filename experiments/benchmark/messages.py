"""What the runner and a worker process say to each other: the worker's command line,
the request lines a shared worker reads (`request`) and the one stdout line that
carries each result (JSON after `RESULT_MARK`).

Example:
  >>> import io
  >>> out = io.StringIO()
  >>> emit({"status": "ok"}, out)
  >>> parse(out.getvalue().encode())
  {'status': 'ok'}
"""

from __future__ import annotations

import json
import sys

WORKER_MODULE = "experiments.benchmark.worker"
RESULT_MARK = "@@jattn-bench-result@@ "
STATUSES = ("ok", "skipped", "error", "oom", "killed", "timeout")


def worker_command(kind: str, spec: dict) -> list[str]:
    """``python -m experiments.benchmark.worker <kind> <spec as JSON>``; ``kind`` is
    ``case`` (a `Case`) or ``matmul`` (the ceiling)."""
    return [sys.executable, "-m", WORKER_MODULE, kind, json.dumps(spec)]


def serve_command() -> list[str]:
    """``python -m experiments.benchmark.worker serve``: one worker for many requests."""
    return [sys.executable, "-m", WORKER_MODULE, "serve"]


def request(kind: str, spec: dict) -> str:
    """The line that asks a shared worker for one ``case`` or ``matmul``.

    Example:
      >>> request("matmul", {"n": 0})
      '{"kind": "matmul", "spec": {"n": 0}}\\n'
    """
    return json.dumps({"kind": kind, "spec": spec}) + "\n"


def emit(result: dict, stream=None) -> None:
    """Write the result line (on its own line, whatever was printed before)."""
    stream = sys.stdout if stream is None else stream
    stream.write("\n" + RESULT_MARK + json.dumps(result) + "\n")
    stream.flush()


def parse(stdout: bytes) -> dict | None:
    """The last result line of a worker's stdout, or None if it printed none."""
    result = None
    for line in stdout.decode("utf-8", "replace").splitlines():
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK):])
    return result
