"""The "+CL" baseline trainer on a tiny random Llama."""

from __future__ import annotations

import numpy as np
from sentence_transformers import SentenceTransformer

from grace_st.contrastive import train_contrastive
from grace_st.data import demo_data_path, load_triplets
from grace_st.factory import from_backbone


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
