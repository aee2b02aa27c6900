"""Benchmark results -> PNG: time and peak memory against T, log-log, one line per
implementation (and per mask / batch size where a run has several), one panel per
mode (forward, forward+backward).  ``python -m experiments.benchmark --report DIR``
redraws them from ``DIR/results.json``.

Example:
  >>> series_key({"impl": "auto", "causal": True, "B": 1, "N": 8, "K": 8, "H": 64,
  ...             "dtype": "float32"}, vary=("causal",))
  ('auto', ('causal', True))
"""

from __future__ import annotations

import os

from experiments.benchmark.impls import IMPLS

_COLORS = {
    "jax_xla": "tab:blue", "jax_cudnn": "tab:purple", "flax": "tab:olive", "dense": "tab:orange",
    "chunked": "tab:green", "cudnn": "tab:cyan", "pallas": "tab:brown", "splash": "tab:pink", "auto": "tab:red",
}
_OTHER_COLORS = ("tab:gray", "black", "gold")
_VARIANT_KEYS = ("causal", "B", "N", "K", "H", "dtype")
_MARKERS = "osD^v<>p"


def series_key(rec: dict, vary: tuple[str, ...]) -> tuple:
    """The line a record belongs to: its implementation and the shape keys that vary."""
    return (rec["impl"],) + tuple((k, rec[k]) for k in vary)


def _series_label(key: tuple) -> str:
    parts = [IMPLS[key[0]]]
    for k, v in key[1:]:
        parts.append(("causal" if v else "no mask") if k == "causal" else f"{k}={v}")
    return ", ".join(parts)


def _panels(payload: dict, value, ylabel: str, title: str, path: str, failed_value=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cases = payload["cases"]
    vary = tuple(k for k in _VARIANT_KEYS if len({c[k] for c in cases}) > 1)
    modes = [m for m in ("fwd", "fwd+bwd") if any(c["mode"] == m for c in cases)] or ["fwd"]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.8), squeeze=False)
    other_values = {k: sorted({c[k] for c in cases}, key=str) for k in vary if k != "causal"}
    for ax, mode in zip(axes[0], modes):
        groups: dict[tuple, list[dict]] = {}
        for c in cases:
            if c["mode"] == mode:
                groups.setdefault(series_key(c, vary), []).append(c)
        plotted = False
        for key, recs in sorted(groups.items(), key=lambda kv: (list(IMPLS).index(kv[0][0]), str(kv[0]))):
            recs = sorted(recs, key=lambda r: r["T"])
            attrs = dict(key[1:])
            style = "--" if attrs.get("causal") is False else "-"
            marker_index = sum(other_values[k].index(attrs[k]) for k in other_values)
            marker = _MARKERS[marker_index % len(_MARKERS)]
            pts = [(r["T"], value(r)) for r in recs if r["status"] == "ok" and value(r)]
            color = _COLORS.get(key[0]) or _OTHER_COLORS[list(IMPLS).index(key[0]) % len(_OTHER_COLORS)]
            if pts:
                ax.plot(*zip(*pts), style, marker=marker, color=color, label=_series_label(key))
                plotted = True
            if failed_value is not None:
                bad = [(r["T"], failed_value(r)) for r in recs
                       if r["status"] in ("oom", "killed", "timeout") and failed_value(r)]
                if bad:
                    ax.plot(*zip(*bad), "x", color=color, markersize=9,
                            label=None if pts else _series_label(key) + " (failed)")
                    plotted = True
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ts = sorted({c["T"] for c in cases if c["mode"] == mode})
        ax.set_xticks(ts, [str(t) for t in ts])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("T (sequence length)")
        ax.set_ylabel(ylabel)
        ax.set_title({"fwd": "forward", "fwd+bwd": "forward+backward"}[mode])
        ax.grid(True, which="both", alpha=0.3)
        if plotted:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no successful case", ha="center", va="center", transform=ax.transAxes)
    env = payload.get("environment", {})
    fig.suptitle(f"{payload.get('name')}: {title} on {env.get('device_kind') or '?'}"
                 f" ({env.get('platform') or '?'})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_results(payload: dict, out_dir: str) -> list[str]:
    """Write ``time_vs_T.png`` and ``memory_vs_T.png`` into ``out_dir``; return their paths.

    Failed cases are left out of the time plot; on the memory plot a case stopped for
    memory or time is an ``x`` at the memory it had reached (a lower bound).
    """
    paths = [os.path.join(out_dir, "time_vs_T.png"), os.path.join(out_dir, "memory_vs_T.png")]
    _panels(payload, lambda r: r.get("median_ms"), "time per call (ms, median)", "time", paths[0])

    def mem(r):
        b = r.get("peak_mem_bytes")
        return b / 2**30 if b else None

    on_device = any(r.get("mem_kind") == "device peak_bytes_in_use" for r in payload["cases"])
    _panels(payload, mem, "peak device memory (GiB)" if on_device else "peak RSS (GiB)",
            "peak memory", paths[1], failed_value=mem)
    return paths

