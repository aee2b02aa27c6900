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


MESH_AXES = ("data", "fsdp", "tensor", "context")


class MeshConfig(Section):
    """The device mesh, one named axis per kind of parallelism (their product is the
    number of devices used; -1 on one axis: all the devices the others leave):

    - ``data``: the batch is split over it, the train state replicated (data parallel);
    - ``fsdp``: the batch is split over it too, and the parameters' large axis
      (``embed``: embedding, MLP and projection weights) and their optimizer state
      are sharded over it (fully sharded data parallel);
    - ``tensor``: attention heads (``heads``, ``kv_heads``) and the MLP's hidden axis
      are sharded over it (tensor parallel);
    - ``context``: the sequence axis of the batch and of the activations is sharded
      over it (sequence / context parallel).

    The default, ``data: -1``, is data parallelism over every device."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    context: int = 1

    @model_validator(mode="after")
    def _consistent(self) -> MeshConfig:
        for axis in MESH_AXES:
            size = getattr(self, axis)
            if size != -1 and size <= 0:
                raise ValueError(f"config key 'mesh.{axis}' must be -1 (the devices the other axes "
                                 f"leave) or a positive int; got {size}")
        rest = [f"mesh.{a}" for a in MESH_AXES if getattr(self, a) == -1]
        if len(rest) > 1:
            raise ValueError(f"only one mesh axis can be -1 (the rest of the devices); got -1 for "
                             f"{' and '.join(rest)}")
        return self

    def sizes(self, num_devices: int, what: str = "local devices") -> dict[str, int]:
        """Each axis's size on ``num_devices`` devices (-1 resolved; ``what`` says
        which devices, for the message); raises
        ConfigError naming the keys when the mesh does not fit."""
        fixed = {a: getattr(self, a) for a in MESH_AXES if getattr(self, a) != -1}
        used = 1
        for size in fixed.values():
            used *= size
        described = " x ".join(f"mesh.{a}={getattr(self, a)}" for a in MESH_AXES
                               if getattr(self, a) != 1) or "mesh.data=1"
        rest = next((a for a in MESH_AXES if getattr(self, a) == -1), None)
        if rest is None:
            if used > num_devices:
                total = f" = {used} devices" if described.count(" x ") else ""
                raise ConfigError(f"{described}{total} but only {num_devices} {what} are visible")
            return fixed
        if num_devices % used:
            raise ConfigError(f"{described}: mesh.{rest}=-1 takes the devices the other axes leave, "
                              f"but {num_devices} {what} are not a multiple of {used}")
        return {**fixed, rest: num_devices // used}


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
        m = self.mesh
        for key, value, axis in (("model.num_heads", self.model.num_heads, "tensor"),
                                 ("model.mlp_dim", self.model.mlp_dim, "tensor"),
                                 ("model.d_model", self.model.d_model, "fsdp")):
            if getattr(m, axis) > 1 and value % getattr(m, axis):
                raise ValueError(f"{key} ({value}) must be a multiple of mesh.{axis} ({getattr(m, axis)}), "
                                 f"which shards it")
        if self.model.attention.sequence_axis is not None:
            raise ValueError("model.attention.sequence_axis is set by the run (to 'context' when "
                             f"mesh.context > 1); leave it null (got {self.model.attention.sequence_axis!r})")
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
    "MESH_AXES", "MeshConfig", "ModelConfig", "TargetConfig", "ThroughputConfig", "TrainConfig", "all_keys",
    "dump", "from_dict", "load", "to_dict",
]
