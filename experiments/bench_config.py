"""Benchmark configuration: a YAML file → a frozen `BenchConfig` → a list of `Case`s.

Self-contained on purpose (it does not share code with the training configs).  A
benchmark config holds defaults for every case (shape, dtype, repeats, limits) and a
list of ``grids``; each grid is the cross product ``impls × T × causal × modes`` and
may override any default for its own cases, or mark them all ``skip: <reason>`` so
that they appear in the results as skipped rows instead of running.

Top-level keys (defaults in brackets):

- ``name`` [the file's stem]: names the output folder ``runs/bench/<name>/``.
- ``B`` [1], ``N`` [8], ``K`` [N], ``H`` [64], ``dtype`` [float32]: batch, query heads,
  key/value heads (GQA when K < N), head dim, and one of float32, bfloat16, float16.
- ``repeats`` [5], ``warmups`` [1]: timed calls (median and min reported) and untimed
  calls after compilation.
- ``timeout_s`` [600]: a case's subprocess is killed after this many seconds.
- ``memory_limit_gb`` [null: no limit]: a case whose resident memory grows past this
  is killed and recorded as such (a guard for shared machines).
- ``time_budget_s`` [null]: no case starts once the run has lasted this long; the rest
  become skipped rows.
- ``ceiling_n`` [2048], ``ceiling_repeats`` [5]: the square matmul timed for the
  machine's ceiling (``0`` turns it off).
- ``block_sizes`` [null]: ``[block_q, block_kv]`` passed to jattn.
- ``platform`` [null: JAX's default]: ``cpu``, ``gpu`` or ``tpu`` for the cases.
- ``seed`` [0], ``out_dir`` [null: ``runs/bench/<name>``].
- ``grids``: a list of mappings with ``impls`` (list of `IMPLS` names), ``T`` (int or
  list), ``modes`` [``[fwd, fwd+bwd]``], ``causal`` [``[true]``], optionally any of the
  per-case keys above (B, N, K, H, dtype, repeats, warmups, timeout_s, memory_limit_gb,
  block_sizes), ``skip: <reason>`` and ``force: true`` (run even where the planner
  would skip the case, e.g. cuDNN without a GPU, so that its failure is recorded).

Example:
  >>> cfg = parse_config({"name": "demo", "N": 4, "H": 16,
  ...                     "grids": [{"impls": ["jax_xla", "auto"], "T": [64, 128]}]})
  >>> [c.label for c in cfg.cases()][:2]
  ['jax.nn xla fwd T=64 B=1 causal', 'jattn auto fwd T=64 B=1 causal']
  >>> len(cfg.cases())
  8
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import yaml

# Implementation name → label used in tables and plots (the order is the table's).
IMPLS = {
    "jax_xla": "jax.nn xla",
    "jax_cudnn": "jax.nn cudnn",
    "flax": "flax.linen",
    "dense": "jattn dense",
    "chunked": "jattn chunked",
    "pallas": "jattn pallas",
    "auto": "jattn auto",
}
MODES = ("fwd", "fwd+bwd")
DTYPES = ("float32", "bfloat16", "float16")
PLATFORMS = ("cpu", "gpu", "tpu")

# Keys a grid may override for its own cases.
CASE_KEYS = (
    "B", "N", "K", "H", "dtype", "repeats", "warmups", "timeout_s", "memory_limit_gb",
    "block_sizes",
)
GRID_KEYS = ("impls", "T", "modes", "causal", "skip", "force") + CASE_KEYS
TOP_KEYS = (
    "name", "seed", "time_budget_s", "ceiling_n", "ceiling_repeats", "platform", "out_dir",
    "grids",
) + CASE_KEYS

_DEFAULTS = dict(
    B=1, N=8, K=None, H=64, dtype="float32", repeats=5, warmups=1, timeout_s=600.0,
    memory_limit_gb=None, block_sizes=None, seed=0, time_budget_s=None, ceiling_n=2048,
    ceiling_repeats=5, platform=None, out_dir=None,
)


class ConfigError(ValueError):
    """A benchmark config key is missing, unknown or has a wrong value."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One measurement: an implementation, a mode and a shape, run in its own process.

    q is ``[B, T, N, H]``, k and v ``[B, T, K, H]`` (self-attention: S = T).
    """

    impl: str
    mode: str
    T: int
    causal: bool
    B: int
    N: int
    K: int
    H: int
    dtype: str
    repeats: int
    warmups: int
    timeout_s: float
    memory_limit_gb: float | None = None
    block_sizes: tuple[int, int] | None = None
    seed: int = 0
    skip: str | None = None
    force: bool = False

    @property
    def shape_key(self) -> tuple:
        """What two cases must share for their times to be compared (all but impl)."""
        return (self.mode, self.T, self.causal, self.B, self.N, self.K, self.H, self.dtype)

    @property
    def label(self) -> str:
        mask = "causal" if self.causal else "full"
        return f"{IMPLS[self.impl]} {self.mode} T={self.T} B={self.B} {mask}"

    def to_json_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block_sizes"] = None if self.block_sizes is None else list(self.block_sizes)
        return d

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> "Case":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"case: unknown keys {sorted(unknown)}; expected some of {sorted(names)}")
        d = dict(d)
        if d.get("block_sizes") is not None:
            d["block_sizes"] = tuple(d["block_sizes"])
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class Grid:
    """``impls × T × causal × modes`` with per-grid overrides (None: the default)."""

    impls: tuple[str, ...]
    T: tuple[int, ...]
    modes: tuple[str, ...]
    causal: tuple[bool, ...]
    overrides: tuple[tuple[str, Any], ...] = ()
    skip: str | None = None
    force: bool = False


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """A parsed benchmark config; `cases` expands its grids."""

    name: str
    B: int
    N: int
    K: int | None  # None: K = N for every case (no GQA)
    H: int
    dtype: str
    repeats: int
    warmups: int
    timeout_s: float
    memory_limit_gb: float | None
    block_sizes: tuple[int, int] | None
    seed: int
    time_budget_s: float | None
    ceiling_n: int
    ceiling_repeats: int
    platform: str | None
    out_dir: str | None
    grids: tuple[Grid, ...]

    def output_dir(self) -> str:
        return self.out_dir or os.path.join("runs", "bench", self.name)

    def cases(self) -> list[Case]:
        """All cases in grid order (within a grid: T, causal, mode, impl, as listed)."""
        out: list[Case] = []
        seen: dict[tuple, int] = {}
        for gi, grid in enumerate(self.grids):
            base = {k: getattr(self, k) for k in CASE_KEYS}
            base.update(dict(grid.overrides))
            if base["K"] is None:
                base["K"] = base["N"]
            where = f"grids[{gi}]"
            _check_heads(base["N"], base["K"], where)
            for T in grid.T:
                for causal in grid.causal:
                    for mode in grid.modes:
                        for impl in grid.impls:
                            case = Case(
                                impl=impl, mode=mode, T=T, causal=causal, seed=self.seed,
                                skip=grid.skip, force=grid.force, **base,
                            )
                            ident = (impl,) + case.shape_key
                            if ident in seen:
                                raise ConfigError(
                                    f"{where}: case '{case.label}' (N={case.N} K={case.K} H={case.H} "
                                    f"{case.dtype}) is already in grids[{seen[ident]}]; list each case once"
                                )
                            seen[ident] = gi
                            out.append(case)
        return out


def _fail(where: str, what: str, got: Any) -> ConfigError:
    return ConfigError(f"{where}: expected {what}; got {got!r}")


def _pos_int(v: Any, where: str, allow_zero: bool = False) -> int:
    ok = isinstance(v, int) and not isinstance(v, bool) and (v >= 0 if allow_zero else v > 0)
    if not ok:
        raise _fail(where, "a non-negative int" if allow_zero else "a positive int", v)
    return v


def _pos_number(v: Any, where: str, optional: bool) -> float | None:
    if v is None and optional:
        return None
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    if not ok:
        raise _fail(where, "a positive number" + (" or null" if optional else ""), v)
    return float(v)


def _list(v: Any, where: str, item, what: str) -> tuple:
    items = v if isinstance(v, list) else [v]
    if not items:
        raise _fail(where, f"a non-empty list of {what}", v)
    return tuple(item(x, f"{where}[{i}]") for i, x in enumerate(items))


def _choice(options):
    def check(v, where):
        if v not in options:
            raise _fail(where, f"one of {list(options)}", v)
        return v

    return check


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise _fail(where, "true or false", v)
    return v


def _block_sizes(v: Any, where: str) -> tuple[int, int] | None:
    if v is None:
        return None
    if not (isinstance(v, list) and len(v) == 2):
        raise _fail(where, "null or a [block_q, block_kv] pair of positive ints", v)
    return (_pos_int(v[0], f"{where}[0]"), _pos_int(v[1], f"{where}[1]"))


def _check_heads(N: int, K: int, where: str) -> None:
    if N % K:
        raise ConfigError(f"{where}: N={N} must be a multiple of K={K} (query heads per key/value head)")


def _case_value(key: str, v: Any, where: str) -> Any:
    """Validate one per-case key (shared by the top level and the grids)."""
    if key in ("B", "N", "H", "repeats"):
        return _pos_int(v, where)
    if key == "K":
        return None if v is None else _pos_int(v, where)
    if key == "warmups":
        return _pos_int(v, where, allow_zero=True)
    if key == "dtype":
        return _choice(DTYPES)(v, where)
    if key == "timeout_s":
        return _pos_number(v, where, optional=False)
    if key == "memory_limit_gb":
        return _pos_number(v, where, optional=True)
    if key == "block_sizes":
        return _block_sizes(v, where)
    raise AssertionError(key)


def _parse_grid(g: Any, where: str) -> Grid:
    if not isinstance(g, dict):
        raise _fail(where, "a mapping with impls, T, modes, causal", g)
    unknown = set(g) - set(GRID_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; expected some of {list(GRID_KEYS)}")
    for required in ("impls", "T"):
        if required not in g:
            raise ConfigError(f"{where}.{required}: missing; expected a list")
    skip = g.get("skip")
    if skip is not None and not (isinstance(skip, str) and skip.strip()):
        raise _fail(f"{where}.skip", "a non-empty reason string", skip)
    overrides = tuple(
        (k, _case_value(k, g[k], f"{where}.{k}")) for k in CASE_KEYS if k in g
    )
    return Grid(
        impls=_list(g["impls"], f"{where}.impls", _choice(tuple(IMPLS)), "implementation names"),
        T=_list(g["T"], f"{where}.T", _pos_int, "positive ints"),
        modes=_list(g.get("modes", list(MODES)), f"{where}.modes", _choice(MODES), "modes"),
        causal=_list(g.get("causal", [True]), f"{where}.causal", _bool, "booleans"),
        overrides=overrides,
        skip=skip,
        force=_bool(g.get("force", False), f"{where}.force"),
    )


def parse_config(raw: Any, default_name: str = "bench") -> BenchConfig:
    """Validate a config mapping (as loaded from YAML); every error names its key.

    Example:
      >>> parse_config({"grids": [{"impls": ["nope"], "T": 8}]})
      Traceback (most recent call last):
        ...
      experiments.bench_config.ConfigError: grids[0].impls[0]: expected one of [...]; got 'nope'
    """
    if not isinstance(raw, dict):
        raise _fail("config", "a mapping at the top level", type(raw).__name__)
    unknown = set(raw) - set(TOP_KEYS)
    if unknown:
        raise ConfigError(f"config: unknown keys {sorted(unknown)}; expected some of {list(TOP_KEYS)}")
    if "grids" not in raw:
        raise ConfigError("grids: missing; expected a list of mappings with impls and T")
    vals = {**_DEFAULTS, **{k: v for k, v in raw.items() if k != "grids"}}
    for k in CASE_KEYS:
        vals[k] = _case_value(k, vals[k], k)
    if vals["K"] is not None:
        _check_heads(vals["N"], vals["K"], "config")
    name = raw.get("name", default_name)
    if not (isinstance(name, str) and name and all(c.isalnum() or c in "-_." for c in name)):
        raise _fail("name", "a non-empty name of letters, digits, '-', '_' or '.'", name)
    platform = vals["platform"]
    if platform is not None:
        _choice(PLATFORMS)(platform, "platform")
    out_dir = vals["out_dir"]
    if out_dir is not None and not (isinstance(out_dir, str) and out_dir):
        raise _fail("out_dir", "null or a path", out_dir)
    seed = vals["seed"]
    if not (isinstance(seed, int) and not isinstance(seed, bool)):
        raise _fail("seed", "an int", seed)
    if not isinstance(raw["grids"], list) or not raw["grids"]:
        raise _fail("grids", "a non-empty list of mappings", raw["grids"])
    cfg = BenchConfig(
        name=name,
        seed=seed,
        time_budget_s=_pos_number(vals["time_budget_s"], "time_budget_s", optional=True),
        ceiling_n=_pos_int(vals["ceiling_n"], "ceiling_n", allow_zero=True),
        ceiling_repeats=_pos_int(vals["ceiling_repeats"], "ceiling_repeats"),
        platform=platform,
        out_dir=out_dir,
        grids=tuple(_parse_grid(g, f"grids[{i}]") for i, g in enumerate(raw["grids"])),
        **{k: vals[k] for k in CASE_KEYS},
    )
    cfg.cases()  # expand once so that duplicates and head counts fail at load time
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` (value parsed as YAML) for a top-level key other than grids.

    Example:
      >>> parse_override("repeats=2")
      ('repeats', 2)
    """
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override: expected key=value; got {text!r}")
    if key not in TOP_KEYS or key == "grids":
        allowed = [k for k in TOP_KEYS if k != "grids"]
        raise ConfigError(f"override {key!r}: unknown key; expected one of {allowed}")
    return key, yaml.safe_load(value)


def load_config(path: str, overrides: list[str] = ()) -> BenchConfig:
    """Read a YAML benchmark config and apply ``key=value`` overrides.

    Example:
      >>> cfg = load_config("configs/bench_smoke.yaml", ["repeats=1"])   # doctest: +SKIP
    """
    with open(path) as f:
        raw = yaml.safe_load(f)
    if not isinstance(raw, dict):
        raise _fail(path, "a YAML mapping at the top level", type(raw).__name__)
    for text in overrides:
        key, value = parse_override(text)
        raw[key] = value
    stem = os.path.splitext(os.path.basename(path))[0]
    return parse_config(raw, default_name=stem)
