"""The "+CL" baseline trainer on a tiny random Llama."""

from __future__ import annotations

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from grace_st.factory import from_backbone
from grace_st.training.contrastive import train_contrastive
from grace_st.training.data import demo_data_path, load_triplets


def test_contrastive_baseline_trains_and_saves(tiny_backbone_dir, tmp_path):
    dataset = load_triplets(demo_data_path("train"), max_rows=8)
    before = from_backbone(tiny_backbone_dir, rationale_mode="none", device="cpu").encode(["a cat"])
    model = train_contrastive(
        tiny_backbone_dir, dataset, str(tmp_path / "cl"), batch_size=4, max_steps=2, learning_rate=1e-2, use_cpu=True
    )
    loaded = SentenceTransformer(str(tmp_path / "cl"), trust_remote_code=True, device="cpu")
    assert loaded[0].rationale_mode == "none"
    after = loaded.encode(["a cat"])
    np.testing.assert_allclose(after, model.encode(["a cat"]), atol=1e-5)
    assert not np.allclose(before, after), "training did not change the embedding"


def test_contrastive_baseline_with_lora_saves_merged_weights(tiny_backbone_dir, tmp_path):
    from peft import LoraConfig

    dataset = load_triplets(demo_data_path("train"), max_rows=4)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = train_contrastive(
        tiny_backbone_dir, dataset, str(tmp_path / "cl"), batch_size=4, max_steps=1, learning_rate=1e-2,
        use_cpu=True, peft_config=lora,
    )  # fmt: skip
    loaded = SentenceTransformer(str(tmp_path / "cl"), trust_remote_code=True, device="cpu")
    assert not any("lora" in name for name, _ in loaded[0].model.named_parameters())
    np.testing.assert_allclose(loaded.encode(["a cat"]), model.encode(["a cat"]), atol=1e-5)


def test_default_backbone_name_is_resolved(monkeypatch, tiny_backbone_dir, tmp_path):
    import grace_st.backbone

    monkeypatch.setattr(grace_st.backbone, "default_backbone", lambda: tiny_backbone_dir)
    dataset = load_triplets(demo_data_path("train"), max_rows=4)
    model = train_contrastive("default", dataset, str(tmp_path / "cl"), batch_size=4, max_steps=1, use_cpu=True)
    assert model[0].model.config.hidden_size == 32  # the tiny backbone stood in for "default"


def test_time_budget_stops_at_the_first_step_past_it_and_is_recorded(tiny_backbone_dir, tmp_path):
    import json

    from grace_st.artifacts import CL_TRAINING_RECORD

    dataset = load_triplets(demo_data_path("train"), max_rows=16)
    train_contrastive(
        tiny_backbone_dir, dataset, str(tmp_path / "cl"), batch_size=4, max_steps=4, use_cpu=True,
        max_minutes=1e-6, record={"note": "budget test"},
    )  # fmt: skip
    record = json.loads((tmp_path / "cl" / CL_TRAINING_RECORD).read_text())
    assert record["steps"] == 1 and record["max_steps"] == 4  # the first step is already past 1e-6 minutes
    assert record["max_minutes"] == 1e-6 and record["minutes"] > 0 and record["note"] == "budget test"
    with pytest.raises(ValueError, match="no rationale"):
        train_contrastive(tiny_backbone_dir, dataset, str(tmp_path / "x"), options={"rationale_mode": "echo"})
    with pytest.raises(ValueError, match="max_minutes=0"):
        train_contrastive(tiny_backbone_dir, dataset, str(tmp_path / "x"), max_minutes=0, use_cpu=True)


def test_summary_readout_trains_through_the_suffix(tiny_backbone_dir, tmp_path):
    from grace_st import SUMMARY_SUFFIX

    dataset = load_triplets(demo_data_path("train"), max_rows=8)
    options = {"summary_suffix": SUMMARY_SUFFIX}
    before = from_backbone(
        tiny_backbone_dir, rationale_mode="none", pooling_mode="summary", device="cpu", **options
    ).encode(["a cat"])
    model = train_contrastive(
        tiny_backbone_dir, dataset, str(tmp_path / "cl"), batch_size=4, max_steps=2, learning_rate=1e-2,
        use_cpu=True, pooling_mode="summary", options=options,
    )  # fmt: skip
    assert model[1].pooling_mode == "summary" and model[0].summary_suffix == SUMMARY_SUFFIX
    assert not np.allclose(before, model.encode(["a cat"])), "the summary readout got no gradient"


def _run_script(monkeypatch, argv):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "training" / "train_contrastive.py"
    spec = importlib.util.spec_from_file_location("train_contrastive_script", path)
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(script)
    monkeypatch.setattr("sys.argv", ["train_contrastive.py", *argv])
    script.main()


def test_script_takes_backbone_data_lora_and_budget_from_the_grace_config(
    tiny_backbone_dir, tmp_path, monkeypatch, capsys
):
    import json

    import yaml

    config = {
        "model_name_or_path": tiny_backbone_dir,
        "use_peft": True,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_modules": ["q_proj", "v_proj"],
        "train_data": "demo",
        "max_train_samples": 8,
        "mode": "supervised",
        "system_prompt": "Say what the text means.",
        "pooling_mode": "summary",
        "summary_suffix": '\nThis sentence : "{text}" means in one word:"',
        "max_train_minutes": 1e-6,
        "seed": 7,
        "use_cpu": True,
        "report_to": "none",
        "output_dir": str(tmp_path / "grace-run"),
    }
    path = tmp_path / "grace.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "cl"
    _run_script(monkeypatch, ["--grace_config", str(path), "--output_dir", str(out), "--batch_size", "4"])
    assert "contrastive baseline saved" in capsys.readouterr().out
    record = json.loads((out / "cl_training.json").read_text())
    assert record["grace_config"] == str(path) and record["rows"] == 8 and record["seed"] == 7
    assert record["steps"] == 1 and record["max_minutes"] == 1e-6 and record["torch_threads"] == 1
    assert record["peft_config"]["r"] == 4 and sorted(record["peft_config"]["target_modules"]) == ["q_proj", "v_proj"]
    loaded = SentenceTransformer(str(out), trust_remote_code=True, device="cpu")
    assert loaded[0].system_prompt == "Say what the text means." and loaded[1].pooling_mode == "summary"
    assert loaded[0].summary_suffix == config["summary_suffix"] and loaded[0].rationale_mode == "none"
    with pytest.raises(SystemExit, match="lora_r"):
        _run_script(monkeypatch, ["--grace_config", str(path), "--output_dir", str(out), "--lora_r", "8"])
    with pytest.raises(ValueError, match="--train_data"):  # the data comes from the GRACE config: not a flag then
        _run_script(monkeypatch, ["--grace_config", str(path), "--train_data", "demo"])


def test_cpu_budget_and_constant_rate_under_a_budget(tiny_backbone_dir, tmp_path, caplog):
    import json

    from grace_st.artifacts import CL_TRAINING_RECORD

    dataset = load_triplets(demo_data_path("train"), max_rows=16)
    caplog.set_level("INFO", logger="grace_st.training.contrastive")
    train_contrastive(
        tiny_backbone_dir, dataset, str(tmp_path / "cl"), batch_size=4, max_steps=40, use_cpu=True,
        max_minutes=1e-6, budget_clock="cpu", learning_rate=3e-5,
    )  # fmt: skip
    record = json.loads((tmp_path / "cl" / CL_TRAINING_RECORD).read_text())
    assert record["steps"] == 1 and record["budget_clock"] == "cpu" and record["cpu_minutes"] > 0
    logs = [json.loads(r.getMessage().split(": ", 1)[1]) for r in caplog.records if r.msg.startswith("step")]
    rates = [log["learning_rate"] for log in logs if "learning_rate" in log]
    assert rates and rates[0] == pytest.approx(3e-5)  # no warmup under a budget: full rate from the first step
    with pytest.raises(ValueError, match="clock='gpu'"):
        train_contrastive(tiny_backbone_dir, dataset, str(tmp_path / "y"), max_minutes=1, budget_clock="gpu")
