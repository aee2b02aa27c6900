"""The benchmark experiment: config parsing, FLOP counting, derived columns, the peers'
functions, and one smoke run of ``configs/bench_smoke.yaml`` end to end (no timing is
asserted: only that every case becomes a well-formed row and the files are written).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re

import jax
import numpy as np
import pytest
import yaml

from experiments import benchmark
from experiments.benchmark import __main__ as benchmark_cli
from experiments.benchmark import messages, worker
from experiments.benchmark import Case, load_config, parse_config
from experiments.schema import ConfigError
from tests.reference import reference_attention

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "configs", "bench_smoke.yaml")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _minimal(**extra):
    return dict({"grids": [{"impls": ["jax_xla"], "T": [8]}]}, **extra)


# ----------------------------------------------------------------------------------
# Config.


def test_shipped_configs_parse_with_the_issue_cases():
    cpu = {(c.impl, c.mode, c.T, c.B): c for c in load_config(os.path.join(REPO, "configs/bench_cpu.yaml")).cases()}
    for impl in ("jax_xla", "flax", "dense", "chunked", "auto"):
        for T in (1024, 2048, 4096, 8192):
            for mode in ("fwd", "fwd+bwd"):
                c = cpu[(impl, mode, T, 1)]
                assert (c.N, c.K, c.H, c.dtype, c.causal, c.skip) == (8, 8, 64, "float32", True, None)
        assert cpu[(impl, "fwd+bwd", 512, 16)].skip is None
    assert cpu[("auto", "fwd+bwd", 32768, 1)].skip is None
    assert cpu[("chunked", "fwd+bwd", 32768, 1)].skip is None
    assert "180 GB" in cpu[("jax_xla", "fwd+bwd", 32768, 1)].skip

    gpu = load_config(os.path.join(REPO, "configs/bench_gpu.yaml")).cases()
    main = {(c.impl, c.T, c.causal, c.mode) for c in gpu if c.skip is None}
    for impl in ("jax_cudnn", "jax_xla", "auto", "chunked"):
        for T in (1024, 4096, 16384):
            for causal in (True, False):
                assert {(impl, T, causal, "fwd"), (impl, T, causal, "fwd+bwd")} <= main
    assert {(c.dtype, c.B, c.N, c.H) for c in gpu} == {("bfloat16", 1, 16, 128)}

    tpu = load_config(os.path.join(REPO, "configs/bench_tpu.yaml"))  # the GPU shapes, splash's impls
    assert tpu.platform == "tpu"
    assert {(c.impl, c.T, c.causal, c.mode) for c in tpu.cases() if c.skip is None} == {
        (impl, T, causal, mode) for impl in ("jax_xla", "splash", "chunked", "auto")
        for T in (1024, 4096, 16384) for causal in (True, False) for mode in ("fwd", "fwd+bwd")}
    assert {(c.dtype, c.B, c.N, c.H) for c in tpu.cases()} == {("bfloat16", 1, 16, 128)}

    smoke = load_config(SMOKE)
    assert smoke.name == "bench_smoke" and smoke.platform == "cpu"
    assert any(c.force and c.impl == "jax_cudnn" for c in smoke.cases())


def test_grid_expansion_and_overrides():
    cfg = parse_config({
        "name": "t", "N": 4, "H": 8, "repeats": 2,
        "grids": [
            {"impls": ["jax_xla", "auto"], "T": [16, 32], "causal": [True, False], "modes": ["fwd"]},
            {"impls": ["chunked"], "T": 64, "B": 3, "K": 2, "repeats": 1, "block_sizes": [16, 32]},
        ],
    })
    cases = cfg.cases()
    assert len(cases) == 2 * 2 * 2 + 2
    first = cases[0]
    assert (first.impl, first.T, first.causal, first.mode, first.K, first.repeats) == ("jax_xla", 16, True, "fwd", 4, 2)
    last = cases[-1]
    assert (last.impl, last.T, last.B, last.K, last.repeats, last.block_sizes) == ("chunked", 64, 3, 2, 1, (16, 32))
    assert [c.mode for c in cases[-2:]] == ["fwd", "fwd+bwd"]  # the default modes
    assert cfg.output_dir() == os.path.join("runs", "bench", "t")
    assert Case.from_json_dict(json.loads(json.dumps(last.to_json_dict()))) == last


@pytest.mark.parametrize(
    "raw, match",
    [
        (_minimal(bogus=1), r"unknown config key 'bogus'"),
        (_minimal(N=6, K=4), r"N=6 must be a multiple of K=4"),
        (_minimal(dtype="float64"), r"config key 'dtype' expects one of \['float32', 'bfloat16', 'float16'\]"),
        (_minimal(repeats=0), r"config key 'repeats' must be positive; got 0"),
        (_minimal(timeout_s=-1), r"config key 'timeout_s' must be positive"),
        (_minimal(platform="mps"), r"config key 'platform' expects one of"),
        (_minimal(repeats=True), r"config key 'repeats' expects an int; got True \(bool\)"),
        ({"grids": [{"impls": ["jax_xla"], "T": [8, "x"]}]}, r"config key 'grids\[0\]\.T\[1\]' expects an int"),
        ({"grids": [{"impls": ["jax_xla"], "T": [8], "modes": ["bwd"]}]}, r"'grids\[0\]\.modes\[0\]' expects one of"),
        ({"grids": [{"impls": ["jax_xla"], "T": [8], "causal": ["yes"]}]},
         r"'grids\[0\]\.causal\[0\]' expects a bool \(true or false\)"),
        ({"grids": [{"impls": ["jax_xla"]}]}, r"config key 'grids\[0\]\.T' is missing"),
        ({"grids": [{"impls": ["jax_xla"], "T": [8], "block_sizes": [8]}]}, r"'grids\[0\]\.block_sizes"),
        ({"grids": [{"impls": ["jax_xla"], "T": [8], "colour": 1}]}, r"unknown config key 'grids\[0\]\.colour'"),
        ({"grids": [{"impls": ["jax_xla"], "T": [8], "repets": 1}]},
         r"unknown config key 'grids\[0\]\.repets'; did you mean 'grids\[0\]\.repeats'\?"),
        ({"grids": [{"impls": ["jax_xla"], "T": [8]}, {"impls": ["jax_xla"], "T": [8]}]}, r"grids\[1\]: case .* already in grids\[0\]"),
        ({"grids": []}, r"config key 'grids' expects a non-empty list"),
        ({}, r"config key 'grids' is missing"),
    ],
)
def test_config_errors_name_the_key(raw, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(raw)


def test_overrides():
    cfg = load_config(SMOKE, ["repeats=2", "name=other", "time_budget_s=120", "platform=null"])
    assert {c.repeats for c in cfg.cases()} == {2} and cfg.name == "other"
    assert cfg.time_budget_s == 120.0 and cfg.platform is None
    with pytest.raises(ConfigError, match="config key 'grids' is a list of sections"):
        load_config(SMOKE, ["grids=[]"])
    with pytest.raises(ConfigError, match="unknown config key 'repets'; did you mean 'repeats'"):
        load_config(SMOKE, ["repets=1"])
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config(SMOKE, ["repeats"])


# ----------------------------------------------------------------------------------
# FLOPs, derived columns, planning, markdown.


def test_attention_flops():
    # 4·B·N·T·S·H written out for B=2, N=4, T=8, S=8, H=16.
    assert benchmark.attention_flops(B=2, N=4, T=8, S=8, H=16, causal=False, mode="fwd") == 32768
    assert benchmark.attention_flops(B=2, N=4, T=8, S=8, H=16, causal=True, mode="fwd") == 16384
    assert benchmark.attention_flops(B=2, N=4, T=8, S=8, H=16, causal=False, mode="fwd+bwd") == 114688
    assert benchmark.attention_flops(B=1, N=1, T=4, S=6, H=2, causal=False, mode="fwd") == 192
    with pytest.raises(ValueError, match="mode: expected"):
        benchmark.attention_flops(B=1, N=1, T=4, S=4, H=2, causal=False, mode="bwd")


def _record(impl, ms, status="ok", **kw):
    rec = dict(impl=impl, mode="fwd", T=8, causal=False, B=1, N=1, K=1, H=4, dtype="float32",
               status=status, median_ms=ms)
    rec.update(kw)
    return rec


def test_derive_ratio_rate_and_ceiling():
    rows = benchmark.derive(
        [_record("jax_xla", 4.0), _record("auto", 1.0), _record("flax", None, status="oom"),
         _record("dense", 2.0, T=16)],
        ceiling_flops_per_s=2.048e6,
    )
    xla, auto, flax, dense = rows
    assert auto["flops"] == 4 * 8 * 8 * 4  # 4·B·N·T·S·H = 1024 in 1 ms
    assert auto["flops_per_s"] == pytest.approx(1.024e6)
    assert auto["frac_of_ceiling"] == pytest.approx(0.5)
    assert (xla["ratio_vs_jax_xla"], auto["ratio_vs_jax_xla"]) == (1.0, 4.0)
    assert "flops" not in flax
    assert dense["ratio_vs_jax_xla"] is None  # no jax.nn xla row at T=16
    assert benchmark.derive([_record("auto", 1.0)], None)[0]["frac_of_ceiling"] is None


def test_plan_skip():
    c = Case(impl="jax_cudnn", mode="fwd", T=64, causal=True, B=1, N=2, K=2, H=16, dtype="bfloat16")
    assert "GPU" in benchmark.plan_skip(c, "cpu")
    assert benchmark.plan_skip(c, "gpu") is None
    assert benchmark.plan_skip(Case(**{**c.to_json_dict(), "force": True}), "cpu") is None
    skipped = Case(**{**c.to_json_dict(), "impl": "auto", "skip": "too big"})
    assert benchmark.plan_skip(skipped, "gpu") == "too big"
    # jattn's backends are asked in the worker, which records jattn's own reason
    assert benchmark.plan_skip(Case(**{**c.to_json_dict(), "impl": "pallas"}), "cpu") is None


def _table_rows(md: str, title: str) -> list[list[str]]:
    """The rows (header, separator, body) of the table under ``### title``."""
    section = md.split(f"### {title}\n", 1)[1]
    lines = []
    for line in section.strip().splitlines():
        if not line.startswith("|"):
            break
        lines.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return lines


def test_markdown_escapes_errors_into_one_row():
    payload = dict(
        name="t", environment=dict(command="python -m experiments.benchmark --config x.yaml"),
        ceiling=None,
        cases=benchmark.derive(
            [_record("jax_xla", 2.0, compile_s=0.5, min_ms=1.5, peak_mem_bytes=2**30),
             _record("dense", None, status="error", error="ValueError: a | b\nsecond line")],
            None,
        ),
    )
    md = benchmark.render_markdown(payload)
    rows = _table_rows(md, "forward")
    assert len(rows) == 4 and len({len(r) for r in rows}) == 1
    header = rows[0]
    ok, bad = (dict(zip(header, r)) for r in rows[2:])
    assert (ok["implementation"], ok["ms (median)"], ok["vs jax.nn xla"], ok["peak RSS (GiB)"]) == ("jax.nn xla", "2", "1", "1")
    assert (bad["status"], bad["ms (median)"]) == ("error", "—")
    assert bad["notes"] == r"ValueError: a \| b second line"
    assert "### forward+backward" not in md


# ----------------------------------------------------------------------------------
# The peers compute the same attention (so that their times compare like with like).


@pytest.mark.parametrize("impl", ["jax_xla", "flax", "dense", "auto"])
@pytest.mark.parametrize("causal", [True, False])
def test_peer_functions_agree_with_the_reference(impl, causal):
    B, T, N, K, H = 2, 7, 4, 2, 3  # GQA: flax needs its k, v heads repeated
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(kq, (B, T, N, H))
    k = jax.random.normal(kk, (B, T, K, H))
    v = jax.random.normal(kv, (B, T, K, H))
    f = benchmark.attention_function(Case(impl=impl, mode="fwd", T=T, causal=causal, B=B, N=N, K=K, H=H))
    want, _, _ = reference_attention(np.asarray(q, np.float64), np.asarray(k, np.float64),
                                     np.asarray(v, np.float64), is_causal=causal)
    np.testing.assert_allclose(np.asarray(jax.jit(f)(q, k, v)), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------
# The smoke run, end to end.


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """bench_smoke.yaml run through the command line's ``main`` in this process, plus
    three cases: one that jattn refuses (its Triton kernels on a CPU), one stopped by
    its memory limit (JAX alone needs more than 50 MiB) and one by its timeout (a case
    takes three timed samples of at least 10 ms, `timing.MIN_SAMPLE_S`; a fresh
    worker cannot even import JAX in 0.01 s).

    Suite time: the cases run in one shared worker process (``worker: shared``) instead
    of a fresh one each (the config's default, ``per_case``): the ~3 s of JAX start-up
    per case was most of this test's minute.  Both watch a case alike (the runner's
    ``_stop_reason`` and ``_collect``); the shared worker is started again after the
    memory-limit kill, so the timeout case also stops a worker that is starting.
    `test_a_worker_process_per_case` checks the per-case worker's command line, and
    ``run_subprocess``'s doctest its timeout."""
    tmp = tmp_path_factory.mktemp("bench")
    with open(SMOKE) as f:
        raw = yaml.safe_load(f)
    raw["worker"] = "shared"
    raw["grids"] += [
        {"impls": ["pallas"], "T": [32], "causal": [False], "modes": ["fwd"]},  # refused on a CPU
        {"impls": ["dense"], "T": [32], "causal": [False], "modes": ["fwd"], "memory_limit_gb": 0.05},
        {"impls": ["jax_xla"], "T": [32], "causal": [False], "modes": ["fwd"], "timeout_s": 0.01},
    ]
    config = tmp / "bench_smoke_plus.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp / "out"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        rc = benchmark_cli.main(["--config", str(config), "--out", str(out)])
    assert rc == 0, stderr.getvalue()[-3000:]
    with open(out / "results.json") as f:
        results = json.load(f)
    return dict(stderr=stderr.getvalue(), out=out, results=results, cases=load_config(str(config)).cases())


def test_smoke_json_has_one_well_formed_row_per_case(smoke):
    res, cases = smoke["results"], smoke["cases"]
    assert res["complete"] is True
    env = res["environment"]
    assert env["jax_version"] == jax.__version__
    assert env["cpu_count"] == os.cpu_count() and env["platform"] == "cpu"
    assert "--config" in env["command"] and env["date"]
    assert res["ceiling"]["status"] == "ok" and res["ceiling"]["flops_per_s"] > 0
    assert res["ceiling"]["flops"] == 2 * 256**3
    rows = res["cases"]
    assert [r["label"] for r in rows] == [c.label for c in cases]
    for r in rows:
        assert r["status"] in benchmark.STATUSES, r
        if r["status"] != "ok":
            assert r["error"], r
    by = {(r["impl"], r["mode"], r["T"], r["causal"]): r for r in rows}
    for impl in ("jax_xla", "flax", "dense", "auto"):
        for mode in ("fwd", "fwd+bwd"):
            r = by[(impl, mode, 64, True)]
            assert r["status"] == "ok", r
            assert len(r["times_ms"]) == 3 and r["min_ms"] <= r["median_ms"]
            assert r["median_ms"] == sorted(r["times_ms"])[1]
            assert r["flops"] == benchmark.attention_flops(B=1, N=4, T=64, S=64, H=16, causal=True, mode=mode)
            assert r["flops_per_s"] == pytest.approx(r["flops"] / (r["median_ms"] / 1e3))
            assert r["peak_mem_bytes"] > 0 and r["mem_kind"] == "peak RSS" and r["compile_s"] >= 0
            base = by[("jax_xla", mode, 64, True)]["median_ms"]
            assert r["ratio_vs_jax_xla"] == pytest.approx(base / r["median_ms"])
    assert by[("auto", "fwd", 64, True)]["backend"]  # which backend auto picked
    # jattn chunked either runs or says why not (it is a row either way).
    assert by[("chunked", "fwd+bwd", 64, True)]["status"] in ("ok", "error")
    for mode in ("fwd", "fwd+bwd"):
        skipped = by[("jax_cudnn", mode, 64, True)]
        assert skipped["status"] == "skipped" and "GPU" in skipped["error"]
    forced = by[("jax_cudnn", "fwd", 64, False)]
    assert forced["status"] == "error" and forced["error"]
    assert res["config"]["worker"] == "shared"
    timed_out = by[("jax_xla", "fwd", 32, False)]
    assert timed_out["status"] == "timeout" and "timeout_s" in timed_out["error"]
    refused = by[("pallas", "fwd", 32, False)]
    assert refused["status"] == "skipped" and refused["error"].startswith("jattn refuses: ")
    killed = by[("dense", "fwd", 32, False)]
    assert killed["status"] == "killed" and "memory_limit_gb=0.05" in killed["error"]
    assert killed["peak_mem_bytes"] > 0.05 * 2**30


def test_smoke_markdown_table(smoke):
    md = (smoke["out"] / "results.md").read_text()
    assert smoke["results"]["environment"]["command"] in md
    for mode, title in (("fwd", "forward"), ("fwd+bwd", "forward+backward")):
        rows = _table_rows(md, title)
        header, sep, body = rows[0], rows[1], rows[2:]
        assert all(set(s) <= set("-:") and s for s in sep)
        assert {len(r) for r in rows} == {len(header)}
        assert len(body) == sum(c.mode == mode for c in smoke["cases"])
        statuses = [dict(zip(header, r))["status"] for r in body]
        assert statuses.count("ok") == sum(r["status"] == "ok" and r["mode"] == mode for r in smoke["results"]["cases"])
    assert "cuDNN attention needs an NVIDIA GPU" in md
    assert "timed out after 0.01 s" in md


def test_smoke_plots_and_progress(smoke):
    import matplotlib.image

    for name in ("time_vs_T.png", "memory_vs_T.png"):
        path = smoke["out"] / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        img = matplotlib.image.imread(path)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    progress = smoke["stderr"]
    total = len(smoke["cases"]) + 1
    for i in range(1, total + 1):
        assert f"[{i}/{total}]" in progress


def test_a_worker_process_per_case(capsys):
    """The per-case worker's command line (``worker <kind> <JSON>``, the default
    ``worker: per_case``), in this process: the environment probe and a case's row."""
    assert worker.main(["matmul", json.dumps(dict(n=0, dtype="float32", repeats=1))]) == 0
    probe = messages.parse(capsys.readouterr().out.encode())
    assert probe["status"] == "ok" and probe["platform"] == jax.default_backend() and probe["jax_version"]
    case = Case(impl="dense", mode="fwd+bwd", T=16, causal=True, B=1, N=2, K=1, H=8, repeats=2)
    assert worker.main(["case", json.dumps(case.to_json_dict())]) == 0
    row = messages.parse(capsys.readouterr().out.encode())
    assert row["status"] == "ok" and len(row["times_ms"]) == 2 and row["backend"] == "dense", row
    assert row["peak_mem_bytes"] > 0 and row["compile_s"] >= 0
    assert worker.main(["case"]) == 2 and "usage" in capsys.readouterr().err


BENCHMARK_MODULES = ["experiments.benchmark", *(f"experiments.benchmark.{m}" for m in (
    "config", "impls", "flops", "timing", "messages", "worker", "runner", "report", "plots"))]


@pytest.mark.parametrize("module", BENCHMARK_MODULES)
def test_docstring_examples_run(module):
    # Run here as well as by --doctest-modules, so that this file checks its package alone.
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_the_implementations_come_from_jattns_registry():
    from jattn.backends.registry import BACKENDS

    assert list(BACKENDS) + ["auto"] == [name for name in benchmark.IMPLS if name not in ("jax_xla", "jax_cudnn", "flax")]
