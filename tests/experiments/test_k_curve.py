"""experiments/k_curve.py: the num_rationales curve over the library's dev-set scoring, on the tiny model."""

from __future__ import annotations

import json
import re

import pytest
from helpers import load_experiment
from tiny_sts import PAIRS, write_dev_sets

from grace_st.evaluation.dev_comparison import Row, build_row_model, comparison_rows, score_model
from grace_st.readers import Pair

k_curve_script = load_experiment("k_curve")


def _pairs(rows) -> list[Pair]:
    return [Pair(a, b, float(s)) for a, b, s in rows]


def test_k_curve_k1_is_the_greedy_untrained_row(tiny_backbone_dir):
    spec = comparison_rows(tiny_backbone_dir, max_new_tokens=4)[3].spec
    sets = {"s": _pairs(PAIRS)}
    (point,) = k_curve_script.k_curve(spec, sets, ks=(1,), resamples=50)
    direct = score_model(build_row_model(Row("k1", spec)), sets, resamples=50)
    assert point["k"] == 1 and point["decoding"] == "greedy" and point["pairs_per_set"] == {"s": 6}
    assert point["mean"] == pytest.approx(direct["mean"], abs=1e-6) and point["seconds_per_text"] > 0
    assert re.search(r"\| 1 \| +greedy \|", k_curve_script.k_curve_markdown([point]))
    with pytest.raises(ValueError, match="k=0"):
        k_curve_script.k_curve(spec, sets, ks=(0,))


def test_k_curve_samples_k_rationales(tiny_backbone_dir, monkeypatch):
    from grace_st.evaluation import quickeval

    written: list[tuple[int, list]] = []  # (num_rationales, rationale ids per text) of every corpus encoded
    encode_corpus = quickeval.encode_corpus

    def recording(model, *args, **kwargs):
        corpus = encode_corpus(model, *args, **kwargs)
        written.append((model[0].num_rationales, corpus.rationale_ids))
        return corpus

    monkeypatch.setattr(quickeval, "encode_corpus", recording)
    spec = comparison_rows(tiny_backbone_dir, max_new_tokens=4)[3].spec
    points = k_curve_script.k_curve(spec, {"s": _pairs(PAIRS)}, ks=(1, 2), resamples=20)
    assert [p["decoding"] for p in points] == ["greedy", "sampled"]
    assert [k for k, _ in written] == [1, 2]
    greedy, sampled = written[0][1], written[1][1]
    assert len(sampled) == len(greedy) and all(len(per_text) == 2 for per_text in sampled)
    assert any(first != second for first, second in sampled)  # two draws per text, not one twice


def test_command_writes_the_curve(tiny_backbone_dir, tmp_path):
    data, out = write_dev_sets(tmp_path / "data"), tmp_path / "out"
    argv = ["--backbone", tiny_backbone_dir, "--k", "1", "--limit", "3", "--max-new-tokens", "4"]
    report = k_curve_script.main(argv + ["--data-dir", str(data), "--out", str(out), "--bootstrap", "20"])
    saved = json.loads((out / "k_curve.json").read_text())
    assert [p["k"] for p in saved["k_curve"]] == [1] and saved["k_curve"][0]["pairs_per_set"]["SICK trial"] == 3
    assert (out / "k_curve.md").read_text() == report["table"] and "num_rationales curve" in report["table"]


def test_command_runs_the_curve_on_trecqa_dev_only(tiny_backbone_dir, tmp_path):
    from tiny_sts import write_trecqa

    data, out = write_trecqa(tmp_path / "data"), tmp_path / "out"
    argv = ["--backbone", tiny_backbone_dir, "--k", "1", "--max-new-tokens", "4", "--sets", "trecqa"]
    report = k_curve_script.main(argv + ["--data-dir", str(data), "--out", str(out), "--bootstrap", "20"])
    (point,) = report["k_curve"]
    assert point["pairs_per_set"] == {"TrecQA nDCG@10": 3} and point["sts_mean"] is None
    assert point["mean"] == point["scores"]["TrecQA nDCG@10"] and 0 <= point["mean"] <= 1
    assert "TrecQA nDCG@10" in report["table"]
    with pytest.raises(FileNotFoundError, match="trecqa/dev.csv"):
        k_curve_script.main(argv + ["--data-dir", str(tmp_path / "empty"), "--out", str(out)])
