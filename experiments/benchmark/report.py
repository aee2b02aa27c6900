"""The report: the results as a markdown table (``results.md``) and the plots, from a
finished run or from what a stopped run left in ``results.json``.

Example:
  >>> from experiments.benchmark.flops import derive
  >>> row = dict(impl="jax_xla", mode="fwd", T=8, causal=True, B=1, N=1, K=1, H=4,
  ...            dtype="float32", status="ok", median_ms=2.0, min_ms=1.9)
  >>> md = render_markdown(dict(name="demo", environment={}, ceiling=None, cases=derive([row], None)))
  >>> print(md.splitlines()[-1])   # 512 FLOPs in 2 ms
  | 8 | 1 | causal | jax.nn xla | ok | 2 | 1.9 | 0.000256 | — | 1 | — | — |  |
"""

from __future__ import annotations

import json
import math
import os

from experiments.benchmark import plots
from experiments.benchmark.flops import FLOP_CONVENTION, derive
from experiments.benchmark.impls import IMPLS
from experiments.benchmark.timing import MIN_SAMPLE_S


def write_outputs(payload: dict, out_dir: str) -> None:
    """``results.md`` and the plots of a results payload into ``out_dir``."""
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(render_markdown(payload))
    plots.plot_results(payload, out_dir)


def write_report(out_dir: str) -> dict:
    """Rewrite ``results.md`` and the plots from ``out_dir/results.json``, also from a
    run that was stopped part way (its table then says so)."""
    with open(os.path.join(out_dir, "results.json")) as f:
        payload = json.load(f)
    ceiling = payload.get("ceiling") or {}
    rate_ = ceiling.get("flops_per_s") if ceiling.get("status") == "ok" else None
    payload["cases"] = derive(payload["cases"], rate_)
    write_outputs(payload, out_dir)
    return payload


def fmt(x: float | None, digits: int = 3) -> str:
    """``digits`` significant digits, without an exponent for large numbers.

    Example:
      >>> [fmt(x, 4) for x in (0.012341, 12.345, 19070.4, None)]
      ['0.01234', '12.35', '19070', '—']
    """
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if abs(x) >= 10**digits:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def rate(flops_per_s: float) -> str:
    if flops_per_s >= 1e12:
        return f"{fmt(flops_per_s / 1e12, 4)} TFLOP/s"
    return f"{fmt(flops_per_s / 1e9, 4)} GFLOP/s"


def cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def render_markdown(payload: dict) -> str:
    """The results as markdown: a header with the environment, then one table per mode.

    Rows are sorted by mask, batch, T and implementation; a failed or skipped case is a
    row whose status and notes say why.

    (The module docstring has an example.)
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
            + " / ".join(fmt(x[0], 3) for x in (env.get("load_average_start"), env.get("load_average_end")) if x)
        )
    if rate_ok:
        lines.append(
            f"- matmul ceiling ({ceiling['n']}² {ceiling['dtype']}, median of "
            f"{len(ceiling['times_ms'])}): {fmt(ceiling['flops_per_s'] / scale)} {unit}"
        )
    elif ceiling.get("status") == "ok":
        lines.append("- matmul ceiling: not measured (ceiling_n: 0)")
    elif ceiling:
        lines.append(f"- matmul ceiling: not measured ({ceiling.get('status')}: {cell(ceiling.get('error', ''))[:200]})")
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
                mem_txt = fmt(mem / 2**30)
            elif mem and r["status"] in ("oom", "killed", "timeout"):
                mem_txt = "≥ " + fmt(mem / 2**30)  # where it was stopped: a lower bound
            else:
                mem_txt = "—"
            cells = [str(r["T"]), str(r["B"])] + [str(r[k]) for k in vary] + [
                "causal" if r["causal"] else "none",
                IMPLS[r["impl"]],
                r["status"],
                fmt(r.get("median_ms"), 4) if ok else "—",
                fmt(r.get("min_ms"), 4) if ok else "—",
                fmt(r["flops_per_s"] / scale) if ok else "—",
                fmt(100 * frac) if ok and frac else "—",
                fmt(r.get("ratio_vs_jax_xla")) if ok else "—",
                mem_txt,
                fmt(r.get("compile_s"), 2) if ok else "—",
                "; ".join(notes),
            ]
            lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)
