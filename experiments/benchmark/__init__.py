"""Benchmark: jattn's backends against the attention a user would pick instead.

    python -m experiments.benchmark --config configs/bench_cpu.yaml [key=value ...] [--out DIR]

Times forward and forward+backward of ``jax.nn.dot_product_attention`` (xla, and
cudnn on a GPU), ``flax.linen.dot_product_attention`` and each of jattn's registered
backends plus its automatic choice on the shapes of a config, and a square matmul
that gives the machine's ceiling in the same run.  Writes ``results.json`` (after
every case, so a stopped run keeps what it measured), ``results.md``,
``time_vs_T.png`` and ``memory_vs_T.png`` into ``runs/bench/<name>/``.

One job per file:

- `config`: the YAML schema (`BenchConfig`, its grids) and the `Case`s it expands to;
- `impls`: the implementations (jattn's backend registry and the peers) as functions;
- `flops`: the FLOP convention and the derived columns (rate, ceiling, ratio);
- `timing`: how a call is timed (`time_calls`);
- `worker`: one case in its own process, ``python -m experiments.benchmark.worker``;
- `messages`: what the runner and a worker say to each other;
- `runner`: the cases in worker processes, watched for time and memory;
- `report` and `plots`: ``results.md`` and the PNGs;
- ``__main__``: the command line.

The names below are the package's public functions (what ``scripts/`` use).

Example:
  >>> attention_flops(B=1, N=8, T=1024, S=1024, H=64, causal=True, mode="fwd")
  1073741824
"""

from experiments.benchmark.config import BenchConfig, Case, load_config, parse_config  # noqa: F401
from experiments.benchmark.flops import FLOP_CONVENTION, attention_flops, derive  # noqa: F401
from experiments.benchmark.impls import IMPLS, attention_function  # noqa: F401
from experiments.benchmark.messages import STATUSES  # noqa: F401
from experiments.benchmark.report import render_markdown, write_report  # noqa: F401
from experiments.benchmark.runner import plan_skip, run_benchmark, run_subprocess  # noqa: F401
from experiments.benchmark.timing import time_calls  # noqa: F401
