"""The one config mechanism of the experiments and the benchmark: frozen pydantic
models, YAML files, strict dotted ``key=value`` overrides, and errors that name the key.

A schema is a tree of `Section` subclasses (pydantic models, frozen, unknown keys
forbidden, strict types: an int is not a bool, a string is not a number).  `build`
turns a nested dict (parsed YAML) into the root section and translates pydantic's
errors into one `ConfigError` that names the dotted key (``model.attention.module``,
``grids[0].T[1]``), what was given, what was expected and, for a typo, the closest
valid key.  Overrides are dotted keys whose values are read as YAML (``null``,
``1e-3``, ``true``), except for string fields, which take the text verbatim.

Example:
  >>> class Train(Section):
  ...     steps: PositiveInt = 10
  ...     learning_rate: Float = 1e-3
  >>> class Root(Section):
  ...     train: Train = Train()
  >>> build(Root, apply_overrides(Root, {}, ["train.steps=5"])).train.steps
  5
  >>> build(Root, {"train": {"learning_rate": "3e-4"}}).train.learning_rate  # YAML 1.1
  0.0003
  >>> apply_overrides(Root, {}, ["train.stesp=5"])
  Traceback (most recent call last):
  ...
  experiments.schema.ConfigError: unknown config key 'train.stesp'; did you mean 'train.steps'?
  >>> build(Root, {"train": {"steps": 0}})
  Traceback (most recent call last):
  ...
  experiments.schema.ConfigError: config key 'train.steps' must be positive; got 0
"""

import difflib
import pathlib
import types
import typing
from typing import Annotated, Any, Literal

import pydantic
import yaml
from pydantic import BeforeValidator, ConfigDict, Field


class ConfigError(ValueError):
    """A config file or override that does not fit its schema."""


class Section(pydantic.BaseModel):
    """A config section: frozen, no unknown keys, strict types (see the module)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(
            f"config sections are frozen: cannot set {name!r}; build a new one with "
            "experiments.schema.updated(cfg, {...})"
        )


def _yaml_float(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string: take such strings as floats."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _as_tuple(value: Any) -> Any:
    """YAML has lists, not tuples: a list for a tuple field."""
    return tuple(value) if isinstance(value, list) else value


def _as_list(value: Any) -> Any:
    """A single value for a list field: a list of one (``T: 64`` means ``T: [64]``)."""
    return value if isinstance(value, (list, tuple)) else [value]


Float = Annotated[float, BeforeValidator(_yaml_float)]
PositiveFloat = Annotated[float, BeforeValidator(_yaml_float), Field(gt=0, allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
AsTuple = BeforeValidator(_as_tuple)
AsList = BeforeValidator(_as_list)


# ------------------------------------------------------------------------- the schema


def _unwrap(tp):
    """``tp`` without Annotated metadata and without ``| None``."""
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    return tp


def _is_section(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, Section)


def _fields(cls) -> dict[str, Any]:
    return {name: f.annotation for name, f in cls.model_fields.items()}


def all_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a schema, e.g. ``'model.attention.module'`` (a list of
    sections is one key: it is set as a whole)."""
    keys = []
    for name, tp in _fields(cls).items():
        if _is_section(_unwrap(tp)):
            keys += all_keys(_unwrap(tp), f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def all_sections(cls) -> list[str]:
    """Every dotted section of a schema, e.g. ``'model.attention'``."""
    keys = all_keys(cls)
    return sorted({k.rsplit(".", i)[0] for k in keys for i in range(1, k.count(".") + 1)})


def _key(loc: tuple) -> str:
    """``('grids', 0, 'T', 1)`` -> ``'grids[0].T[1]'``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _type_at(cls, loc: tuple):
    """The annotation a location of a schema has (None where it cannot be followed)."""
    tp: Any = cls
    for part in loc:
        inner = _unwrap(tp)
        if isinstance(part, int):
            args = typing.get_args(inner)
            if typing.get_origin(inner) not in (list, tuple) or not args:
                return None
            tp = args[0]
        elif _is_section(inner) and part in inner.model_fields:
            tp = inner.model_fields[part].annotation
        else:
            return None
    return tp


def unknown_key(key: str, candidates: list[str]) -> ConfigError:
    """The error for a key the schema lacks, with the closest valid key (difflib)."""
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


def _got(value: Any) -> str:
    return f"got {value!r} ({type(value).__name__})"


_EXPECTS = {
    "int_type": "an int", "int_from_float": "an int", "int_parsing": "an int",
    "float_type": "a float", "float_parsing": "a float",
    "bool_type": "a bool (true or false)", "bool_parsing": "a bool (true or false)",
    "string_type": "a string", "list_type": "a list", "tuple_type": "a list",
}


def _error(cls, err: dict) -> ConfigError:
    """One pydantic error of ``cls.model_validate`` as a ConfigError naming its key."""
    kind, loc, value = err["type"], tuple(err["loc"]), err.get("input")
    key, ctx = _key(loc), err.get("ctx") or {}
    if kind == "extra_forbidden":
        parent = _unwrap(_type_at(cls, loc[:-1]))
        prefix = _key(loc[:-1]) + "." if loc[:-1] else ""
        candidates = all_keys(parent, prefix) + [prefix + s for s in all_sections(parent)]
        return unknown_key(key, candidates)
    if kind == "value_error":  # a validator's own message: it names its keys
        return ConfigError(str(ctx.get("error", err["msg"])))
    if kind == "missing":
        return ConfigError(f"config key {key!r} is missing")
    if kind == "literal_error":
        choices = list(typing.get_args(_unwrap(_type_at(cls, loc))))
        return invalid_choice(key, value, choices)
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return ConfigError(f"config section {key or '<top level>'!r} must be a mapping; {_got(value)}")
    if kind == "greater_than" and ctx.get("gt") == 0:
        return ConfigError(f"config key {key!r} must be positive; got {value!r}")
    if kind == "greater_than_equal":
        return ConfigError(f"config key {key!r} must be at least {ctx.get('ge')}; got {value!r}")
    if kind == "too_short":
        return ConfigError(f"config key {key!r} expects a non-empty list; {_got(value)}")
    if kind in _EXPECTS:
        return ConfigError(f"config key {key!r} expects {_EXPECTS[kind]}; {_got(value)}")
    return ConfigError(f"config key {key!r}: {err['msg']}; {_got(value)}")


def build(cls, raw: dict | None):
    """The section ``cls`` from a nested dict (e.g. parsed YAML), every key and type
    checked; the first problem raises `ConfigError`."""
    try:
        return cls.model_validate({} if raw is None else raw)
    except pydantic.ValidationError as e:
        raise _error(cls, e.errors()[0]) from None


def to_dict(cfg: Section) -> dict:
    """The nested plain-dict form of a config (YAML-dumpable; tuples as lists)."""
    return cfg.model_dump(mode="json")


def updated(cfg: Section, changes: dict[str, Any]) -> Section:
    """A copy of ``cfg`` with dotted keys set (``{"model.attention.module": "flax"}``),
    checked like a file."""
    raw = to_dict(cfg)
    for key, value in changes.items():
        *path, last = key.split(".")
        node = raw
        for part in path:
            node = node[part]
        node[last] = value
    return build(type(cfg), raw)


# -------------------------------------------------------------------------- overrides


def _parse_value(raw: str, tp) -> Any:
    """An override's text as a value of type ``tp``: strings stay verbatim (so
    ``name=2024`` is the string '2024'), everything else is read as YAML."""
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)
    if _unwrap(tp) is str:
        return None if optional and raw in ("null", "None", "~") else raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(cls, raw: dict, overrides: list[str]) -> dict:
    """``raw`` (nested dict) with each ``'dotted.key=value'`` applied; the key must
    exist in the schema ``cls`` (a typo raises ConfigError with the closest key)."""
    raw = _deep_copy(raw)
    keys, sections = all_keys(cls), all_sections(cls)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. {keys[0]}=...)")
        key, text = item.split("=", 1)
        key = key.strip()
        if key in sections:
            example = next(k for k in keys if k.startswith(key + "."))
            raise ConfigError(f"config key {key!r} is a section; set one of its keys, e.g. {example}=...")
        if key not in keys:
            raise unknown_key(key, keys)
        tp = _type_at(cls, tuple(key.split(".")))
        inner = _unwrap(tp)
        if typing.get_origin(inner) in (list, tuple) and _is_section(_unwrap(typing.get_args(inner)[0])):
            raise ConfigError(f"config key {key!r} is a list of sections; edit it in the YAML file")
        node = raw
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config section {part!r} must be a mapping; got {node!r}")
        node[last] = _parse_value(text, tp)
    return raw


def _deep_copy(d):
    return {k: _deep_copy(v) for k, v in d.items()} if isinstance(d, dict) else d


# ------------------------------------------------------------------------------ files


def read_yaml(path: str | pathlib.Path) -> dict:
    """A YAML file's top-level mapping (empty file: ``{}``); errors name the file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping; got {type(raw).__name__}")
    return raw


def dump(cfg: Section, path: str | pathlib.Path, header: str = "") -> None:
    """Write ``cfg`` as YAML (loadable again), after ``header`` as comment lines."""
    text = "".join(f"# {line}\n" for line in header.splitlines())
    text += yaml.safe_dump(to_dict(cfg), sort_keys=False)
    pathlib.Path(path).write_text(text)

