"""Start several processes of a run on this machine: multi-process training
(``jax.distributed``) tried without a cluster.

    python -m experiments.launch --processes 2 --devices-per-process 4 -- \\
        --config configs/default.yaml mesh.data=2 mesh.tensor=2 mesh.context=2

starts ``python -m experiments.train <the arguments after -->`` N times, each with
``--coordinator localhost:<free port> --num-processes N --process-id i`` and, with
``--devices-per-process D``, ``--cpu-devices D`` on the CPU platform (``JAX_PLATFORMS=cpu``;
the processes' collectives then go through gloo).  Process 0's output is passed
through as it comes; the others' lines are prefixed ``[i]``.

Failure: when a process ends with an error or is killed, the others cannot go on
(their collectives and barriers wait for it).  JAX's coordination service declares a
process dead when its connection drops or after the train command's
``--heartbeat-timeout`` (30 s) without a heartbeat, and then terminates the others
(SIGABRT, "Terminating process because the JAX distributed service detected fatal
errors").  As a bound independent of that, the launcher gives them ``--grace`` seconds
(default 10) after the first failure, then kills them, and exits with status 1 after
saying which process failed first and how: a launch with a failed process ends at
most ``grace`` + 0.1 s after the failure.  Ctrl-C (or SIGTERM) to the launcher is
passed on to every process.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    """A TCP port nobody listens on now (the coordinator binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def describe_exit(code: int) -> str:
    """``-9`` -> ``'killed by SIGKILL'``, ``2`` -> ``'exited with status 2'``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(prefix + line)
        out.flush()
    stream.close()


def launch(args: list[str], *, processes: int, devices_per_process: int | None = None, port: int | None = None,
           grace_s: float = 10.0, module: str = "experiments.train", out=None) -> int:
    """Run ``python -m module *args`` as ``processes`` processes of one
    ``jax.distributed`` job; the exit status: 0 when every process succeeded, else 1."""
    out = out or sys.stdout
    port = port or free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("JAX_COORDINATOR_ADDRESS", None)  # the flags below say it
    if devices_per_process is not None:
        env["JAX_PLATFORMS"] = "cpu"
    procs, pumps = [], []
    for i in range(processes):
        cmd = [sys.executable, "-m", module, *args, "--coordinator", f"localhost:{port}",
               "--num-processes", str(processes), "--process-id", str(i)]
        if devices_per_process is not None:
            cmd += ["--cpu-devices", str(devices_per_process)]
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
        procs.append(p)
        pump = threading.Thread(target=_pump, args=(p.stdout, "" if i == 0 else f"[{i}] ", out), daemon=True)
        pump.start()
        pumps.append(pump)
    devices = f" x {devices_per_process} CPU devices" if devices_per_process is not None else ""
    print(f"launch: {processes} processes{devices}, coordinator localhost:{port}; pids "
          + " ".join(f"{i}:{p.pid}" for i, p in enumerate(procs)), file=out, flush=True)

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    first = None  # (process, time) of the first failure
    stopped: list[int] = []
    try:
        while any(p.poll() is None for p in procs):
            if first is None:
                failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
                if failed:
                    first = (failed[0], time.monotonic())
            elif time.monotonic() - first[1] > grace_s:
                for i, p in enumerate(procs):
                    if p.poll() is None:
                        p.kill()
                        stopped.append(i)
                for p in procs:
                    p.wait()
                break
            time.sleep(0.1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for pump in pumps:
        pump.join(timeout=5)
    codes = [p.wait() for p in procs]
    if all(code == 0 for code in codes):
        return 0
    if first is None:  # every failure seen only after the loop
        first = (next(i for i, c in enumerate(codes) if c != 0), time.monotonic())
    i = first[0]
    others = "; ".join(
        f"process {j} {'was killed by the launcher after the ' + format(grace_s, 'g') + ' s grace' if j in stopped else describe_exit(codes[j])}"
        for j in range(processes) if j != i
    )
    print(f"launch: FAILED: process {i} (pid {procs[i].pid}) {describe_exit(codes[i])} first; {others}",
          file=out, flush=True)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(
        prog="python -m experiments.launch",
        description="Start N processes of experiments.train as one jax.distributed job on this machine.",
        epilog="Everything after -- goes to every process, e.g. -- --config configs/default.yaml mesh.tensor=2",
    )
    parser.add_argument("--processes", type=int, default=2, help="how many processes (default 2)")
    parser.add_argument("--devices-per-process", type=int, help="CPU devices per process (sets JAX_PLATFORMS=cpu)")
    parser.add_argument("--port", type=int, help="the coordinator's port on localhost (default: a free one)")
    parser.add_argument("--grace", type=float, default=10.0, metavar="S",
                        help="after a process fails, the others are killed if still running S seconds later")
    parser.add_argument("--module", default="experiments.train", help=argparse.SUPPRESS)
    args = parser.parse_args(ours)
    if args.processes < 1:
        parser.error(f"--processes must be at least 1; got {args.processes}")
    if not rest:
        parser.error("give the train arguments after --, e.g. -- --config configs/default.yaml")
    return launch(rest, processes=args.processes, devices_per_process=args.devices_per_process,
                  port=args.port, grace_s=args.grace, module=args.module)


if __name__ == "__main__":
    sys.exit(main())
