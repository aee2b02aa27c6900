"""Command line: ``python -m experiments.benchmark --config configs/bench_cpu.yaml
[key=value ...] [--out DIR] [--quiet]`` runs a benchmark; ``--report DIR`` only
rewrites ``DIR/results.md`` and the plots from ``DIR/results.json``."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from experiments.benchmark import report, runner
from experiments.benchmark.config import load_config
from experiments.schema import ConfigError


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
    parser.add_argument("overrides", nargs="*", help="key=value overrides of top-level config keys")
    args = parser.parse_args(argv)
    if args.report:
        report.write_report(args.report)
        print(f"wrote {os.path.join(args.report, 'results.md')} and the plots", file=sys.stderr)
        return 0
    if not args.config:
        parser.error("--config: required (e.g. --config configs/bench_smoke.yaml)")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with open(args.config) as f:
        config_text = f.read()
    command = "python -m experiments.benchmark " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    out_dir = os.path.abspath(args.out or cfg.output_dir())
    payload = runner.run_benchmark(cfg, out_dir, command=command, config_path=args.config,
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
