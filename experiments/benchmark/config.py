"""Benchmark configuration: a YAML file -> a frozen `BenchConfig` -> a list of `Case`s.

Built on the experiments' config mechanism (`experiments.schema`: pydantic sections,
strict types, unknown keys refused with the closest valid one, dotted overrides).  A
benchmark config holds defaults for every case (shape, dtype, repeats, limits) and a
list of ``grids``; each grid is the cross product ``impls x T x causal x modes`` and
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
- ``worker`` [``per_case``]: ``per_case`` runs every case in a fresh process (its peak
  memory its own); ``shared`` runs them one after another in one worker process
  (restarted after a case that had to be stopped), which saves the seconds of JAX
  start-up per case but measures each case's memory in a process that ran the ones
  before it (peak RSS reset per case where Linux allows; the memory limit applies to
  the whole worker): for pipeline checks (the test suite's smoke run), not for
  memory figures.
- ``grids``: a list of mappings with ``impls`` (list of `IMPLS` names: the peers and
  jattn's registered backends), ``T`` (int or list), ``modes`` [``[fwd, fwd+bwd]``],
  ``causal`` [``[true]``], optionally any of the per-case keys above (B, N, K, H,
  dtype, repeats, warmups, timeout_s, memory_limit_gb, block_sizes), ``skip:
  <reason>`` and ``force: true`` (run even where the case would be skipped, e.g.
  cuDNN without a GPU, so that its failure is recorded).

Example:
  >>> cfg = parse_config({"name": "demo", "N": 4, "H": 16,
  ...                     "grids": [{"impls": ["jax_xla", "auto"], "T": [64, 128]}]})
  >>> [c.label for c in cfg.cases()][:2]
  ['jax.nn xla fwd T=64 B=1 causal', 'jattn auto fwd T=64 B=1 causal']
  >>> len(cfg.cases())
  8
  >>> parse_config({"grids": [{"impls": ["nope"], "T": 8}]})
  Traceback (most recent call last):
    ...
  experiments.schema.ConfigError: config key 'grids[0].impls[0]' expects one of [...]; got 'nope'...
"""

from __future__ import annotations

import os
import pathlib
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from experiments import schema
from experiments.benchmark.impls import IMPLS
from experiments.schema import (
    AsList, AsTuple, ConfigError, NonNegativeInt, PositiveFloat, PositiveInt, Section,
)

MODES = ("fwd", "fwd+bwd")
DTYPES = ("float32", "bfloat16", "float16")
PLATFORMS = ("cpu", "gpu", "tpu")

Impl = Literal[tuple(IMPLS)]
Mode = Literal[MODES]
BlockSizes = Annotated[tuple[PositiveInt, PositiveInt], AsTuple]


class CaseKeys(Section):
    """The per-case keys, set at the top level for every case or in a grid for its own."""

    B: PositiveInt = 1
    N: PositiveInt = 8
    K: PositiveInt | None = None  # None: K = N (no GQA)
    H: PositiveInt = 64
    dtype: Literal[DTYPES] = "float32"
    repeats: PositiveInt = 5
    warmups: NonNegativeInt = 1
    timeout_s: PositiveFloat = 600.0
    memory_limit_gb: PositiveFloat | None = None
    block_sizes: BlockSizes | None = None


CASE_KEYS = tuple(CaseKeys.model_fields)


class Grid(CaseKeys):
    """``impls x T x causal x modes``; the per-case keys it sets override the top level's."""

    impls: Annotated[list[Impl], AsList, Field(min_length=1)]
    T: Annotated[list[PositiveInt], AsList, Field(min_length=1)]
    modes: Annotated[list[Mode], AsList, Field(min_length=1)] = list(MODES)
    causal: Annotated[list[bool], AsList, Field(min_length=1)] = [True]
    skip: str | None = None
    force: bool = False

    @model_validator(mode="after")
    def _skip_has_a_reason(self) -> Grid:
        if self.skip is not None and not self.skip.strip():
            raise ValueError("a grid's skip must be a non-empty reason; got an empty string")
        return self

    def overrides(self) -> dict[str, Any]:
        """The per-case keys this grid sets."""
        return {k: getattr(self, k) for k in CASE_KEYS if k in self.model_fields_set}


class Case(Section):
    """One measurement: an implementation, a mode and a shape, run in its own process.

    q is ``[B, T, N, H]``, k and v ``[B, T, K, H]`` (self-attention: S = T).
    """

    impl: Impl
    mode: Mode
    T: PositiveInt
    causal: bool
    B: PositiveInt
    N: PositiveInt
    K: PositiveInt
    H: PositiveInt
    dtype: Literal[DTYPES] = "float32"
    repeats: PositiveInt = 1
    warmups: NonNegativeInt = 0
    timeout_s: PositiveFloat = 60.0
    memory_limit_gb: PositiveFloat | None = None
    block_sizes: BlockSizes | None = None
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
        return schema.to_dict(self)

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> Case:
        return schema.build(cls, d)


class BenchConfig(CaseKeys):
    """A parsed benchmark config; `cases` expands its grids."""

    name: str = "bench"
    seed: int = 0
    time_budget_s: PositiveFloat | None = None
    ceiling_n: NonNegativeInt = 2048
    ceiling_repeats: PositiveInt = 5
    platform: Literal[PLATFORMS] | None = None
    out_dir: str | None = None
    worker: Literal["per_case", "shared"] = "per_case"
    grids: Annotated[list[Grid], Field(min_length=1)]

    @model_validator(mode="after")
    def _consistent(self) -> BenchConfig:
        if not (self.name and all(c.isalnum() or c in "-_." for c in self.name)):
            raise ValueError(f"config key 'name' expects a non-empty name of letters, digits, '-', '_' "
                             f"or '.'; got {self.name!r}")
        if self.out_dir == "":
            raise ValueError("config key 'out_dir' expects null or a path; got ''")
        self.cases()  # expand once so that duplicates and head counts fail at load time
        return self

    def output_dir(self) -> str:
        return self.out_dir or os.path.join("runs", "bench", self.name)

    def cases(self) -> list[Case]:
        """All cases in grid order (within a grid: T, causal, mode, impl, as listed)."""
        out: list[Case] = []
        seen: dict[tuple, int] = {}
        for gi, grid in enumerate(self.grids):
            base = {k: getattr(self, k) for k in CASE_KEYS} | grid.overrides()
            base["K"] = base["N"] if base["K"] is None else base["K"]
            where = f"grids[{gi}]" if "N" in grid.model_fields_set or "K" in grid.model_fields_set else "config"
            if base["N"] % base["K"]:
                raise ConfigError(f"{where}: N={base['N']} must be a multiple of K={base['K']} "
                                  "(query heads per key/value head)")
            for T in grid.T:
                for causal in grid.causal:
                    for mode in grid.modes:
                        for impl in grid.impls:
                            case = Case(impl=impl, mode=mode, T=T, causal=causal, seed=self.seed,
                                        skip=grid.skip, force=grid.force, **base)
                            ident = (impl,) + case.shape_key
                            if ident in seen:
                                raise ConfigError(
                                    f"grids[{gi}]: case '{case.label}' (N={case.N} K={case.K} H={case.H} "
                                    f"{case.dtype}) is already in grids[{seen[ident]}]; list each case once"
                                )
                            seen[ident] = gi
                            out.append(case)
        return out

    def record(self) -> dict[str, Any]:
        """The config as results.json records it: every top-level key, and for each
        grid the keys it sets."""
        top = schema.to_dict(self)
        top["grids"] = [g.model_dump(mode="json", exclude_unset=True) for g in self.grids]
        return top


def parse_config(raw: Any, default_name: str = "bench") -> BenchConfig:
    """Validate a config mapping (as loaded from YAML); every error names its key."""
    if isinstance(raw, dict) and "name" not in raw:
        raw = {**raw, "name": default_name}
    return schema.build(BenchConfig, raw)


def load_config(path: str, overrides: list[str] = ()) -> BenchConfig:
    """Read a YAML benchmark config and apply ``key=value`` overrides (dotted keys of
    the top level; ``grids`` is edited in the file).

    Example:
      >>> cfg = load_config("configs/bench_smoke.yaml", ["repeats=1"])   # doctest: +SKIP
    """
    raw = schema.apply_overrides(BenchConfig, schema.read_yaml(path), list(overrides))
    return parse_config(raw, default_name=pathlib.Path(path).stem)
