"""The "+CL" baseline trainer and the quick dev evaluations on a tiny random Llama."""

from __future__ import annotations

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from grace_st.contrastive import train_contrastive
from grace_st.data import demo_data_path, load_triplets
from grace_st.factory import from_backbone
from grace_st.quickeval import format_table, read_sts_pairs, sts_spearman, triplet_scores


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


def test_triplet_and_sts_scores(tiny_backbone_dir, tmp_path):
    rows = list(load_triplets(demo_data_path("dev"), max_rows=4))
    model = from_backbone(tiny_backbone_dir, device="cpu", max_new_tokens=4)
    scores = triplet_scores(model, rows, batch_size=4)
    assert 0.0 <= scores["accuracy"] <= 1.0 and 0.0 <= scores["mrr@10"] <= 1.0
    assert 0.0 <= scores["finish_rate"] <= 1.0 and scores["mean_length"] <= 4
    none = triplet_scores(from_backbone(tiny_backbone_dir, device="cpu", rationale_mode="none"), rows)
    assert none["finish_rate"] is None
    sts = tmp_path / "sts.tsv"
    sts.write_text("4.0\ta cat sits\ta cat is sitting\n1.0\ta dog runs\tstocks fell\n2.5\tit rains\tit is wet\n")
    pairs = read_sts_pairs(str(sts))
    assert pairs[0] == ("a cat sits", "a cat is sitting", 4.0)
    assert -1.0 <= sts_spearman(model, pairs)["spearman"] <= 1.0
    table = format_table([("m", {"accuracy": 0.5, "copy_rate": None})], ["accuracy", "copy_rate"])
    assert "0.500" in table and table.splitlines()[-1].rstrip().endswith("-")


def test_read_sick_pairs(shared_data):
    pairs = read_sts_pairs(str(shared_data / "sick2014" / "SICK_trial.txt"), limit=5)
    assert len(pairs) == 5 and all(1.0 <= score <= 5.0 for _, _, score in pairs)
    with pytest.raises(FileNotFoundError):
        read_sts_pairs(str(shared_data / "missing.tsv"))
