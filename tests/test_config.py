"""experiments.config: YAML + strict typed overrides, errors that name the key."""

import pathlib
import re

import pytest

from experiments import config, tasks
from experiments.config import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Training configs (configs/bench_*.yaml belong to experiments.benchmark).
TRAINING_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("bench_"))


def test_the_training_configs_exist():
    names = {p.stem for p in TRAINING_CONFIGS}
    assert {"default", "recall", "lm", "sort", "throughput_cpu"} <= names, names


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_states_command_time_and_result(path):
    cfg = config.load(path)
    assert cfg.name == path.stem or path.stem == "default"
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    header = "\n".join(header).lower()
    rel = f"configs/{path.name}"
    assert f"--config {rel}" in header, f"{rel}: the header must give the command that runs it"
    assert "wall time" in header and "2-core cpu" in header, f"{rel}: expected wall time on a 2-core CPU"
    assert "result" in header, f"{rel}: the result it should reach"
    # the stated target is the one the config checks
    assert cfg.target.metric.replace("_", " ") in header.replace("_", " ") or cfg.target.metric in header


def test_overrides_are_parsed_with_their_types():
    cfg = config.load(ROOT / "configs/default.yaml", [
        "train.steps=7", "train.learning_rate=1e-3", "plot=false", "model.attention.implementation=dense",
        "data.path=null", "name=2024", "model.dropout=0", "train.dtype=bfloat16",
    ])
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.train.learning_rate == 1e-3 and isinstance(cfg.train.learning_rate, float)
    assert cfg.plot is False
    assert cfg.model.attention.implementation == "dense"
    assert cfg.data.path is None
    assert cfg.name == "2024"  # strings stay strings
    assert cfg.model.dropout == 0.0 and isinstance(cfg.model.dropout, float)
    assert cfg.train.dtype == "bfloat16"


def test_configs_are_frozen():
    cfg = config.load(None)
    with pytest.raises(AttributeError):
        cfg.train.steps = 3


@pytest.mark.parametrize("override, message", [
    ("train.stpes=10", "unknown config key 'train.stpes'; did you mean 'train.steps'?"),
    ("modle.d_model=10", "unknown config key 'modle.d_model'; did you mean 'model.d_model'?"),
    ("model.attention.implementaton=dense", "did you mean 'model.attention.implementation'?"),
    ("train.steps=ten", "config key 'train.steps' expects an int; got 'ten' (str)"),
    ("train.steps=1.5", "config key 'train.steps' expects an int; got 1.5 (float)"),
    ("train.learning_rate=fast", "config key 'train.learning_rate' expects a float; got 'fast'"),
    ("plot=yes please", "config key 'plot' expects a bool (true or false)"),
    ("data.task=recal", f"config key 'data.task' expects one of {sorted(tasks.REGISTRY)}; "  # the registered tasks
                        "got 'recal'; did you mean 'recall'?"),
    ("train.dtype=float16", "expects one of ['float32', 'bfloat16']"),
    ("model=big", "config key 'model' is a section; set one of its keys, e.g. model."),
    ("train.steps", "override 'train.steps' must look like key=value"),
])
def test_override_errors_name_the_key_and_the_fix(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.load(ROOT / "configs/default.yaml", [override])


def test_yaml_errors_name_the_dotted_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  attention:\n    modul: flax\n")
    with pytest.raises(ConfigError, match=re.escape(
            "unknown config key 'model.attention.modul'; did you mean 'model.attention.module'?")):
        config.load(bad)
    bad.write_text("train:\n  batch_size: [64]\n")
    with pytest.raises(ConfigError, match=re.escape("'train.batch_size' expects an int; got [64] (list)")):
        config.load(bad)
    bad.write_text("train: 5\n")
    with pytest.raises(ConfigError, match="config section 'train' must be a mapping"):
        config.load(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "missing.yaml")


def test_yaml_floats_without_a_dot_are_floats(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  learning_rate: 3e-4\n  weight_decay: 0\n")
    cfg = config.load(f)
    assert cfg.train.learning_rate == 3e-4 and cfg.train.weight_decay == 0.0


@pytest.mark.parametrize("overrides, message", [
    (["model.d_model=30", "model.num_heads=4"], "model.d_model (30) must be a multiple of model.num_heads (4)"),
    (["model.attention.num_kv_heads=3"], "model.num_heads (4) must be a multiple of model.attention.num_kv_heads (3)"),
    (["model.attention.module=flax", "model.attention.implementation=dense"],
     "model.attention.implementation='dense' applies to module='jattn' only"),
    (["train.steps=0"], "config key 'train.steps' must be positive; got 0"),
    (["train.warmup_fraction=1.5"], "train.warmup_fraction must be in [0, 1); got 1.5"),
    (["eval.examples=100", "eval.batch_size=64"], "eval.examples (100) must be a multiple of eval.batch_size (64)"),
    (["data.recall.num_pairs=40", "data.recall.num_keys=32"], "data.recall.num_pairs (40) must be at most"),
    (["checkpoint.every=30", "train.log_every=20"], "checkpoint.every (30) must be a multiple of train.log_every (20)"),
    (["name=a/b"], "config key 'name' must be a plain folder name"),
])
def test_inconsistent_values_name_every_key_involved(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.load(ROOT / "configs/default.yaml", overrides)


def test_dump_then_load_gives_the_same_config(tmp_path):
    cfg = config.load(ROOT / "configs/lm.yaml", ["train.steps=11", "data.path=/some/where"])
    config.dump(cfg, tmp_path / "config.yaml", header="a header\nsecond line")
    text = (tmp_path / "config.yaml").read_text()
    assert text.startswith("# a header\n# second line\n")
    assert config.load(tmp_path / "config.yaml") == cfg


def test_every_schema_key_can_be_overridden():
    keys = config.all_keys()
    assert "model.attention.implementation" in keys and "data.recall.num_pairs" in keys
    assert len(keys) == len(set(keys))


def test_cli_reports_config_errors_and_exits_2(capsys):
    from experiments import train

    with pytest.raises(SystemExit) as e:
        train.main(["--config", str(ROOT / "configs/default.yaml"), "train.stesp=3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.stesp'; did you mean 'train.steps'?" in err


def test_the_data_section_comes_from_the_task_registry():
    keys = config.all_keys()
    for name in tasks.REGISTRY:
        assert any(k.startswith(f"data.{name}.") for k in keys), name
    assert config.load(None, ["data.task=sort", "data.sort.length=5"]).data.sort.length == 5


def test_one_config_error_for_the_experiments_and_the_benchmark():
    from experiments import schema
    from experiments.benchmark import config as bench_config

    assert config.ConfigError is schema.ConfigError
    with pytest.raises(schema.ConfigError, match=re.escape(
            "unknown config key 'grids[0].repets'; did you mean 'grids[0].repeats'?")):
        bench_config.parse_config({"grids": [{"impls": ["auto"], "T": 8, "repets": 1}]})
