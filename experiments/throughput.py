"""Training tokens/s of the jattn model against the same model with
``flax.nnx.MultiHeadAttention``: same run, same shapes, same batch.

    python -m experiments.throughput --config configs/throughput_cpu.yaml [key=value ...]

For each module (``model.attention.module`` = "jattn", then "flax") the full training
step of `experiments.train` (forward, backward, AdamW update; state donated) is
compiled, run ``throughput.warmup_steps`` times untimed, then timed over
``throughput.steps`` steps; the modules alternate for ``throughput.repeats`` rounds so
that a change in machine load hits both.  Reported: the median tokens/s of each and
their ratio jattn/flax, printed as a Markdown table and written to
``<runs_dir>/<name>_throughput/throughput.json`` with the device and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import jattn
from experiments import config as config_lib
from experiments import run as run_lib
from experiments import schema
from experiments.config import Config
from experiments.schema import ConfigError

MODULES = ("jattn", "flax")


def with_module(cfg: Config, module: str) -> Config:
    """``cfg`` with the attention module swapped (the flax baseline has no backend
    choice, so ``implementation`` is cleared for it)."""
    implementation = cfg.model.attention.implementation if module == "jattn" else None
    return schema.updated(cfg, {"model.attention.module": module,
                                "model.attention.implementation": implementation})


def compiled_step(cfg: Config):
    """``(step_fn, state, batch)``: the compiled train step of ``cfg`` and its inputs."""
    s = run_lib.setup(cfg)
    batched = NamedSharding(s.mesh, P("data"))
    replicated = NamedSharding(s.mesh, P())
    keys = run_lib.keys(cfg)
    batch = jax.device_put(
        jax.jit(lambda t: t.train_batch(keys["train_data"], cfg.train.batch_size))(s.task), batched
    )
    step = jax.jit(
        run_lib.make_train_step(s.task, s.graphdef, s.tx, s.schedule, keys["dropout"], cfg.model.dropout),
        donate_argnums=0, out_shardings=(replicated, replicated),
    )
    return step.lower(s.state, batch).compile(), s.state, batch, s.task.tokens_per_example


def measure(cfg: Config) -> dict:
    """Tokens/s of each module on ``cfg``'s shapes; see the module docstring."""
    t = cfg.throughput
    runs = {}
    for module in MODULES:
        t0 = time.perf_counter()
        step, state, batch, seq_len = compiled_step(with_module(cfg, module))
        for _ in range(t.warmup_steps):
            state, m = step(state, batch)
        jax.block_until_ready(state)
        runs[module] = dict(step=step, state=state, batch=batch, compile_s=time.perf_counter() - t0, rates=[])
    tokens = cfg.train.batch_size * seq_len * t.steps
    for _ in range(t.repeats):
        for module in MODULES:
            r = runs[module]
            state = r["state"]
            t0 = time.perf_counter()
            for _ in range(t.steps):
                state, m = r["step"](state, r["batch"])
            jax.block_until_ready(state)
            r["rates"].append(tokens / (time.perf_counter() - t0))
            r["state"] = state
            if not np.isfinite(float(m["loss"])):
                raise FloatingPointError(f"{module}: the training loss is {float(m['loss'])}")
    result = {m: dict(tokens_per_s=float(np.median(r["rates"])), rounds=[float(x) for x in r["rates"]],
                      setup_and_compile_s=r["compile_s"]) for m, r in runs.items()}
    H = cfg.model.d_model // cfg.model.num_heads
    q = np.zeros((cfg.train.batch_size, seq_len, cfg.model.num_heads, H), np.float32)
    backend = jattn.explain(q, q, q, is_causal=True, implementation=cfg.model.attention.implementation).backend
    ratio = result["jattn"]["tokens_per_s"] / result["flax"]["tokens_per_s"]
    return dict(
        name=cfg.name, ratio=ratio, min_ratio=t.min_ratio, reached=bool(ratio >= t.min_ratio),
        jattn_backend=backend, modules=result,
        shapes=dict(batch=cfg.train.batch_size, seq_len=seq_len, d_model=cfg.model.d_model,
                    num_heads=cfg.model.num_heads, num_layers=cfg.model.num_layers,
                    dtype=cfg.train.dtype, task=cfg.data.task),
        steps=t.steps, repeats=t.repeats, device=run_lib.describe_devices(run_lib.make_mesh(cfg)),
        jax=jax.__version__, python=platform.python_version(), cpu_count=os.cpu_count(),
        load_avg=os.getloadavg() if hasattr(os, "getloadavg") else None,
    )


def markdown(r: dict) -> str:
    s = r["shapes"]
    lines = [
        f"Training tokens/s, {s['task']} B={s['batch']} T={s['seq_len']} D={s['d_model']} "
        f"N={s['num_heads']} L={s['num_layers']} {s['dtype']} on {r['device']} (jax {r['jax']}); "
        f"median of {r['repeats']} rounds of {r['steps']} steps:",
        "",
        "| attention | tokens/s | rounds |",
        "|---|---:|---|",
    ]
    for module, label in (("jattn", f"jattn.nnx.SelfAttention ({r['jattn_backend']})"),
                          ("flax", "flax.nnx.MultiHeadAttention")):
        m = r["modules"][module]
        lines.append(f"| {label} | {m['tokens_per_s']:,.0f} | {', '.join(f'{x:,.0f}' for x in m['rounds'])} |")
    verdict = "reached" if r["reached"] else "NOT reached"
    lines += ["", f"Ratio jattn / flax: **{r['ratio']:.2f}** (target >= {r['min_ratio']:g}: {verdict})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments.throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        cfg = config_lib.load(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    result = measure(cfg)
    out = run_lib.run_dir(cfg).with_name(cfg.name + "_throughput")  # not wiped by a training run
    out.mkdir(parents=True, exist_ok=True)
    config_lib.dump(cfg, out / "throughput_config.yaml", header="Config of experiments.throughput")
    (out / "throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\nwritten: {out / 'throughput.json'}")
    return result


if __name__ == "__main__":
    main()
