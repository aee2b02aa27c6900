"""Experiment configs: a frozen-dataclass schema, YAML files, strict ``key=value``
overrides.

A config file is YAML whose nested mappings mirror the dataclasses below; any key it
leaves out keeps its default.  Overrides are dotted keys (``train.steps=200``); their
values are parsed as YAML (``null``, ``1e-3``, ``true``) and checked against the
field's type.  An unknown key or a value of the wrong type raises `ConfigError`, which
names the key, what was given, what was expected and, for a typo, the closest valid
key.

Example:
  >>> cfg = load("configs/default.yaml", ["train.steps=10", "model.d_model=32"])
  >>> cfg.train.steps, cfg.model.d_model
  (10, 32)
  >>> load("configs/default.yaml", ["train.stpes=10"])
  Traceback (most recent call last):
  ...
  experiments.config.ConfigError: unknown config key 'train.stpes'; did you mean 'train.steps'?
"""

from __future__ import annotations

import dataclasses
import difflib
import pathlib
import types
import typing
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """The attention layer of every block.

    ``module="jattn"`` uses `jattn.nnx.SelfAttention` with backend ``implementation``
    (None: automatic, see `jattn.explain`); ``module="flax"`` swaps in
    ``flax.nnx.MultiHeadAttention``, the baseline for comparisons.
    """

    module: Literal["jattn", "flax"] = "jattn"
    implementation: str | None = None
    num_kv_heads: int | None = None  # None: as many as query heads (no GQA)
    qk_norm: bool = False  # jattn: RMSNorm of q and k over H; flax: its LayerNorm (normalize_qk)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes of the decoder-only transformer (see `experiments.model`)."""

    num_layers: int = 2
    d_model: int = 64
    num_heads: int = 4
    mlp_dim: int = 256
    positions: Literal["learned", "rope"] = "learned"
    dropout: float = 0.0
    attention: AttentionConfig = AttentionConfig()


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Byte-level language modelling (task ``lm``)."""

    seq_len: int = 128
    val_fraction: float = 0.05  # of the files (or bytes, for one file) held out


@dataclasses.dataclass(frozen=True)
class RecallConfig:
    """Associative recall (task ``recall``): ``k1 v1 ... kn vn SEP q1 v(q1) ... qm v(qm)``
    with ``m = num_queries`` distinct query keys, every ``v(q)`` scored."""

    num_pairs: int = 8
    num_keys: int = 32
    num_values: int = 32
    num_queries: int = 1


@dataclasses.dataclass(frozen=True)
class SortConfig:
    """Sorting (task ``sort``): ``x1 ... xL SEP -> sorted(x)``."""

    length: int = 8
    num_symbols: int = 16


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which task, and its settings (see `experiments.data`)."""

    task: Literal["lm", "recall", "sort"] = "recall"
    path: str | None = None  # lm: a text file or folder; None: Python's stdlib sources
    lm: LMConfig = LMConfig()
    recall: RecallConfig = RecallConfig()
    sort: SortConfig = SortConfig()


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation: AdamW with warmup + cosine decay and gradient clipping."""

    steps: int = 1000
    batch_size: int = 64  # global, split over the data axis of the mesh
    learning_rate: float = 1e-3
    warmup_fraction: float = 0.05  # of train.steps: linear warmup, then the cosine
    min_lr_ratio: float = 0.1  # the cosine ends at learning_rate * min_lr_ratio
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.98
    grad_clip: float = 1.0
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; params are float32
    seed: int = 0
    log_every: int = 20


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation every ``every`` steps (and after the last step)."""

    every: int = 200
    examples: int = 512
    batch_size: int = 256


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints every ``every`` steps (and after the last step)."""

    every: int = 200
    keep: int = 2


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Data parallelism: ``data`` devices on the mesh's one axis (-1: all local)."""

    data: int = -1


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    """The result a config promises: ``final eval metric  op  value``."""

    metric: str = "exact_match"
    op: Literal[">=", "<="] = ">="
    value: float = 0.99


@dataclasses.dataclass(frozen=True)
class ThroughputConfig:
    """`experiments.throughput`: training steps timed per attention module, after
    ``warmup_steps`` untimed ones, ``repeats`` rounds alternating the modules."""

    warmup_steps: int = 3
    steps: int = 20
    repeats: int = 3
    min_ratio: float = 1.0  # the promise: jattn tokens/s >= min_ratio x flax tokens/s


@dataclasses.dataclass(frozen=True)
class Config:
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


# ----------------------------------------------------------------------------- schema


def _fields(cls) -> dict[str, Any]:
    """Field name -> resolved type of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema, e.g. ``'model.attention.module'``."""
    keys = []
    for name, tp in _fields(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _sections() -> list[str]:
    """Every dotted section of the schema, e.g. ``'model.attention'``."""
    keys = all_keys(Config)
    return sorted({k.rsplit(".", i)[0] for k in keys for i in range(1, k.count(".") + 1)})


def _unknown_key(key: str, candidates: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not close:  # a typo in the last part only: compare the last parts
        last = key.rsplit(".", 1)[-1]
        by_last = {c.rsplit(".", 1)[-1]: c for c in candidates}
        close = [by_last[m] for m in difflib.get_close_matches(last, list(by_last), n=1, cutoff=0.6)]
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(candidates)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def invalid_choice(key: str, value: Any, choices: list, context: str = "") -> ConfigError:
    """The error for a value outside its allowed set, with the closest choice.

    >>> print(invalid_choice("data.task", "recal", ["lm", "recall", "sort"]))
    config key 'data.task' expects one of ['lm', 'recall', 'sort']; got 'recal'; did you mean 'recall'?
    """
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    where = f" ({context})" if context else ""
    return ConfigError(f"config key {key!r} expects one of {choices}{where}; got {value!r}{hint}")


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if _is_optional(tp):
        return _type_name(_non_none(tp)) + " or null"
    return getattr(tp, "__name__", str(tp))


def _is_optional(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _non_none(tp):
    (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
    return inner


def _coerce(key: str, value: Any, tp) -> Any:
    """``value`` checked (and, int -> float or '1e-3' -> float only, converted) against
    ``tp``; raises ConfigError naming ``key`` otherwise."""
    if _is_optional(tp):
        return None if value is None else _coerce(key, value, _non_none(tp))

    def wrong(expected=None):
        return ConfigError(
            f"config key {key!r} expects {expected or _type_name(tp)}; "
            f"got {value!r} ({type(value).__name__})"
        )

    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise invalid_choice(key, value, list(choices))
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong("a bool (true or false)")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an int")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise wrong("a float") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a float")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    raise TypeError(f"config schema: unsupported type {tp!r} for {key!r}")


def from_dict(raw: dict | None, cls=Config, prefix: str = ""):
    """Build ``cls`` from a nested dict (e.g. parsed YAML), checking every key and type.

    >>> from_dict({"train": {"steps": 5}}).train.steps
    5
    """
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config section {prefix.rstrip('.') or '<top level>'!r} must be a mapping; "
            f"got {raw!r} ({type(raw).__name__})"
        )
    fields = _fields(cls)
    kwargs = {}
    for name, value in raw.items():
        key = prefix + str(name)
        if name not in fields:
            raise _unknown_key(key, all_keys(Config) + _sections())
        tp = fields[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(value, tp, key + ".")
        else:
            kwargs[name] = _coerce(key, value, tp)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """The nested plain-dict form of a config (YAML-dumpable)."""
    return dataclasses.asdict(cfg)


def _parse_value(raw: str, tp) -> Any:
    """An override's text as a value of type ``tp``: strings stay verbatim (so
    ``name=2024`` is the string '2024'), everything else is read as YAML."""
    is_str = tp is str or (_is_optional(tp) and _non_none(tp) is str)
    if is_str:
        return None if raw in ("null", "None", "~") and _is_optional(tp) else raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``raw`` (nested dict) with each ``'dotted.key=value'`` applied; the key must
    exist in the schema (a typo raises ConfigError with the closest key)."""
    raw = _deep_copy(raw)
    keys = all_keys(Config)
    sections = _sections()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.steps=100)")
        key, text = item.split("=", 1)
        key = key.strip()
        if key in sections:
            example = next(k for k in keys if k.startswith(key + "."))
            raise ConfigError(
                f"config key {key!r} is a section; set one of its keys, e.g. {example}=..."
            )
        if key not in keys:
            raise _unknown_key(key, keys)
        cls, *path = [Config] + key.split(".")
        for part in path[:-1]:
            cls = _fields(cls)[part]
        tp = _fields(cls)[path[-1]]
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config section {part!r} must be a mapping; got {node!r}")
        node[path[-1]] = _parse_value(text, tp)
    return raw


def _deep_copy(d):
    return {k: _deep_copy(v) for k, v in d.items()} if isinstance(d, dict) else d


def load(path: str | pathlib.Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply overrides, check it; ``name`` defaults to the file's
    stem.  ``path=None`` starts from the defaults."""
    raw = {}
    if path is not None:
        path = pathlib.Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping; got {type(raw).__name__}")
    raw = apply_overrides(raw, list(overrides))
    cfg = from_dict(raw)
    if cfg.name is None:
        cfg = dataclasses.replace(cfg, name=path.stem if path is not None else "default")
    validate(cfg)
    return cfg


def dump(cfg: Config, path: str | pathlib.Path, header: str = "") -> None:
    """Write ``cfg`` as YAML (loadable by `load`), after ``header`` comment lines."""
    text = "".join(f"# {line}\n" for line in header.splitlines())
    text += yaml.safe_dump(to_dict(cfg), sort_keys=False)
    pathlib.Path(path).write_text(text)


def validate(cfg: Config) -> None:
    """Constraints between fields, each error naming the keys involved."""

    def need(cond: bool, msg: str):
        if not cond:
            raise ConfigError(msg)

    positive = {
        "model.num_layers": cfg.model.num_layers, "model.d_model": cfg.model.d_model,
        "model.num_heads": cfg.model.num_heads, "model.mlp_dim": cfg.model.mlp_dim,
        "data.lm.seq_len": cfg.data.lm.seq_len, "data.recall.num_pairs": cfg.data.recall.num_pairs,
        "data.recall.num_keys": cfg.data.recall.num_keys,
        "data.recall.num_values": cfg.data.recall.num_values,
        "data.recall.num_queries": cfg.data.recall.num_queries,
        "data.sort.length": cfg.data.sort.length, "data.sort.num_symbols": cfg.data.sort.num_symbols,
        "train.steps": cfg.train.steps, "train.batch_size": cfg.train.batch_size,
        "train.log_every": cfg.train.log_every, "eval.every": cfg.eval.every,
        "eval.examples": cfg.eval.examples, "eval.batch_size": cfg.eval.batch_size,
        "checkpoint.every": cfg.checkpoint.every, "checkpoint.keep": cfg.checkpoint.keep,
        "throughput.steps": cfg.throughput.steps, "throughput.repeats": cfg.throughput.repeats,
    }
    for key, value in positive.items():
        need(value > 0, f"config key {key!r} must be positive; got {value}")
    m, a = cfg.model, cfg.model.attention
    need(m.d_model % m.num_heads == 0,
         f"model.d_model ({m.d_model}) must be a multiple of model.num_heads ({m.num_heads})")
    if a.num_kv_heads is not None:
        need(a.num_kv_heads > 0 and m.num_heads % a.num_kv_heads == 0,
             f"model.num_heads ({m.num_heads}) must be a multiple of "
             f"model.attention.num_kv_heads ({a.num_kv_heads})")
    if m.positions == "rope":
        need((m.d_model // m.num_heads) % 2 == 0,
             f"model.positions='rope' needs an even head dim; model.d_model / model.num_heads "
             f"= {m.d_model // m.num_heads}")
    if a.module == "flax":
        need(a.implementation is None,
             f"model.attention.implementation={a.implementation!r} applies to module='jattn' "
             "only; flax.nnx.MultiHeadAttention has no backend choice (set it to null)")
    need(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1); got {m.dropout}")
    need(0.0 < cfg.data.lm.val_fraction < 1.0,
         f"data.lm.val_fraction must be in (0, 1); got {cfg.data.lm.val_fraction}")
    need(cfg.data.recall.num_pairs <= cfg.data.recall.num_keys,
         f"data.recall.num_pairs ({cfg.data.recall.num_pairs}) must be at most "
         f"data.recall.num_keys ({cfg.data.recall.num_keys}): keys are distinct")
    need(0.0 <= cfg.train.warmup_fraction < 1.0,
         f"train.warmup_fraction must be in [0, 1); got {cfg.train.warmup_fraction}")
    need(cfg.data.recall.num_queries <= cfg.data.recall.num_pairs,
         f"data.recall.num_queries ({cfg.data.recall.num_queries}) must be at most "
         f"data.recall.num_pairs ({cfg.data.recall.num_pairs}): queries are distinct keys")
    need(cfg.train.learning_rate > 0, f"train.learning_rate must be positive; got {cfg.train.learning_rate}")
    need(0.0 <= cfg.train.min_lr_ratio <= 1.0,
         f"train.min_lr_ratio must be in [0, 1]; got {cfg.train.min_lr_ratio}")
    need(cfg.train.grad_clip > 0, f"train.grad_clip must be positive; got {cfg.train.grad_clip}")
    need(cfg.eval.examples % cfg.eval.batch_size == 0,
         f"eval.examples ({cfg.eval.examples}) must be a multiple of "
         f"eval.batch_size ({cfg.eval.batch_size})")
    need(cfg.checkpoint.every % cfg.train.log_every == 0,
         f"checkpoint.every ({cfg.checkpoint.every}) must be a multiple of train.log_every "
         f"({cfg.train.log_every}), so that a resumed run logs the same loss windows")
    need(cfg.mesh.data == -1 or cfg.mesh.data > 0,
         f"mesh.data must be -1 (all local devices) or positive; got {cfg.mesh.data}")
    need(bool(cfg.name) and "/" not in cfg.name and cfg.name not in (".", ".."),
         f"config key 'name' must be a plain folder name; got {cfg.name!r}")
