"""experiments.throughput: both modules timed on the same shapes, the report written."""

import json
import pathlib

from experiments import throughput

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_throughput_measures_both_modules_and_writes_the_report(tmp_path, capsys):
    result = throughput.main([
        "--config", str(ROOT / "configs/throughput_cpu.yaml"), f"runs_dir={tmp_path}",
        "model.d_model=32", "model.mlp_dim=64", "data.lm.seq_len=32", "train.batch_size=4",
        "throughput.warmup_steps=1", "throughput.steps=2", "throughput.repeats=2",
    ])
    for module in ("jattn", "flax"):
        rates = result["modules"][module]["rounds"]
        assert len(rates) == 2 and min(rates) > 0
    assert result["ratio"] == result["modules"]["jattn"]["tokens_per_s"] / result["modules"]["flax"]["tokens_per_s"]
    assert result["shapes"]["seq_len"] == 32 and result["jattn_backend"]
    saved = json.loads((tmp_path / "throughput_cpu_throughput" / "throughput.json").read_text())
    assert saved["ratio"] == result["ratio"]
    assert "| flax.nnx.MultiHeadAttention |" in capsys.readouterr().out
