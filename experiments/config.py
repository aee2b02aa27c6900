"""The training experiments' config: a tree of frozen pydantic sections, YAML files,
strict ``key=value`` overrides (the mechanism is `experiments.schema`, shared with
the benchmark).

A config file is YAML whose nested mappings mirror the sections below; any key it
leaves out keeps its default.  Overrides are dotted keys (``train.steps=200``); their
values are parsed as YAML (``null``, ``1e-3``, ``true``) and checked against the
field's type.  An unknown key or a value of the wrong type raises `ConfigError`,
which names the key, what was given, what was expected and, for a typo, the closest
valid key.  The ``data`` section has one subsection per registered task
(`experiments.tasks`): ``data.task`` picks the task and ``data.<task>`` holds its
settings; ``model`` is `experiments.model.ModelConfig`.

Example:
  >>> cfg = load("configs/default.yaml", ["train.steps=10", "model.d_model=32"])
  >>> cfg.train.steps, cfg.model.d_model
  (10, 32)
  >>> load("configs/default.yaml", ["train.stpes=10"])
  Traceback (most recent call last):
  ...
  experiments.schema.ConfigError: unknown config key 'train.stpes'; did you mean 'train.steps'?
"""

from __future__ import annotations

import pathlib
from typing import Literal

import pydantic
from pydantic import model_validator

from experiments import schema, tasks
from experiments.model import AttentionConfig, ModelConfig  # noqa: F401 (sections of Config)
from experiments.schema import ConfigError, Float, NonNegativeInt, PositiveFloat, PositiveInt, Section


class DataSection(Section):
    """Which task (``data.task``), a data source for tasks that read files
    (``data.path``, e.g. ``lm``), and one section per task with its settings."""

    path: str | None = None  # lm: a text file or folder; None: Python's stdlib sources


# ``data.task`` and the ``data.<name>`` sections come from the task registry.
DataConfig = pydantic.create_model(
    "DataConfig",
    __base__=DataSection,
    __doc__=DataSection.__doc__,
    task=(Literal[tuple(sorted(tasks.REGISTRY))], tasks.DEFAULT),
    **{name: (cls.Config, cls.Config()) for name, cls in tasks.REGISTRY.items()},
)


class TrainConfig(Section):
    """Optimisation: AdamW with warmup + cosine decay and gradient clipping."""

    steps: PositiveInt = 1000
    batch_size: PositiveInt = 64  # global, split over the data axis of the mesh
    learning_rate: PositiveFloat = 1e-3
    warmup_fraction: Float = 0.05  # of train.steps: linear warmup, then the cosine
    min_lr_ratio: Float = 0.1  # the cosine ends at learning_rate * min_lr_ratio
    weight_decay: Float = 0.1
    b1: Float = 0.9
    b2: Float = 0.98
    grad_clip: PositiveFloat = 1.0
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; params are float32
    seed: int = 0
    log_every: PositiveInt = 20

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"train.warmup_fraction must be in [0, 1); got {self.warmup_fraction}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1]; got {self.min_lr_ratio}")
        return self


class EvalConfig(Section):
    """Held-out evaluation every ``every`` steps (and after the last step)."""

    every: PositiveInt = 200
    examples: PositiveInt = 512
    batch_size: PositiveInt = 256

    @model_validator(mode="after")
    def _consistent(self) -> EvalConfig:
        if self.examples % self.batch_size:
            raise ValueError(f"eval.examples ({self.examples}) must be a multiple of "
                             f"eval.batch_size ({self.batch_size})")
        return self


class CheckpointConfig(Section):
    """Orbax checkpoints every ``every`` steps (and after the last step)."""

    every: PositiveInt = 200
    keep: PositiveInt = 2


class MeshConfig(Section):
    """Data parallelism: ``data`` devices on the mesh's one axis (-1: all local)."""

    data: int = -1

    @model_validator(mode="after")
    def _consistent(self) -> MeshConfig:
        if self.data != -1 and self.data <= 0:
            raise ValueError(f"mesh.data must be -1 (all local devices) or positive; got {self.data}")
        return self


class TargetConfig(Section):
    """The result a config promises: ``final eval metric  op  value``."""

    metric: str = "exact_match"
    op: Literal[">=", "<="] = ">="
    value: Float = 0.99


class ThroughputConfig(Section):
    """`experiments.throughput`: training steps timed per attention module, after
    ``warmup_steps`` untimed ones, ``repeats`` rounds alternating the modules."""

    warmup_steps: NonNegativeInt = 3
    steps: PositiveInt = 20
    repeats: PositiveInt = 3
    min_ratio: Float = 1.0  # the promise: jattn tokens/s >= min_ratio x flax tokens/s


class Config(Section):
    """A whole experiment.  ``name`` defaults to the config file's stem; the run
    writes to ``<runs_dir>/<name>/``."""

    name: str | None = None
    runs_dir: str = "runs"
    plot: bool = True  # write the plots at the end of training
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mesh: MeshConfig = MeshConfig()
    target: TargetConfig = TargetConfig()
    throughput: ThroughputConfig = ThroughputConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.checkpoint.every % self.train.log_every:
            raise ValueError(f"checkpoint.every ({self.checkpoint.every}) must be a multiple of "
                             f"train.log_every ({self.train.log_every}), so that a resumed run logs "
                             "the same loss windows")
        if self.name is not None and (not self.name or "/" in self.name or self.name in (".", "..")):
            raise ValueError(f"config key 'name' must be a plain folder name; got {self.name!r}")
        task = tasks.get(self.data.task)
        if self.target.metric not in task.metrics:
            raise schema.invalid_choice("target.metric", self.target.metric, list(task.metrics),
                                        f"what task {task.name!r} reports")
        return self


def all_keys() -> list[str]:
    """Every dotted leaf key of the schema, e.g. ``'model.attention.module'``."""
    return schema.all_keys(Config)


def from_dict(raw: dict | None) -> Config:
    """A `Config` from a nested dict (e.g. parsed YAML), checking every key and type.

    >>> from_dict({"train": {"steps": 5}}).train.steps
    5
    """
    return schema.build(Config, raw)


def to_dict(cfg: Config) -> dict:
    """The nested plain-dict form of a config (YAML-dumpable)."""
    return schema.to_dict(cfg)


def load(path: str | pathlib.Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply overrides, check it; ``name`` defaults to the file's
    stem.  ``path=None`` starts from the defaults."""
    raw = {} if path is None else schema.read_yaml(path)
    raw = schema.apply_overrides(Config, raw, list(overrides))
    if raw.get("name") is None:
        raw["name"] = pathlib.Path(path).stem if path is not None else "default"
    return schema.build(Config, raw)


def dump(cfg: Config, path: str | pathlib.Path, header: str = "") -> None:
    """Write ``cfg`` as YAML (loadable by `load`), after ``header`` comment lines."""
    schema.dump(cfg, path, header)


__all__ = [
    "AttentionConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "EvalConfig",
    "MeshConfig", "ModelConfig", "TargetConfig", "ThroughputConfig", "TrainConfig", "all_keys",
    "dump", "from_dict", "load", "to_dict",
]
