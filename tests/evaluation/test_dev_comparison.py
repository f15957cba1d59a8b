"""The dev-set comparison (grace_st.evaluation.dev_comparison): rows, scoring and the command, on tiny models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr
from tiny_sts import PAIRS, QA_ROWS, write_dev_sets, write_trecqa

from grace_st.evaluation import dev_comparison as comparison
from grace_st.evaluation.dev_comparison import (
    DEV_SETS,
    PROMPTEOL_ROW,
    RetrievalSet,
    Row,
    compare,
    comparison_markdown,
    comparison_rows,
    load_dev_sets,
    load_trecqa_dev,
    missing_features,
    row_file,
    score_model,
    set_readout,
)
from grace_st.evaluation.mteb_evaluation import ModelSpec
from grace_st.factory import from_backbone
from grace_st.readers import Pair, QARow
from grace_st.scripts.compare_dev import main


def _pairs(rows) -> list[Pair]:
    return [Pair(a, b, float(s)) for a, b, s in rows]


@pytest.fixture
def fake_data(tmp_path):
    return write_dev_sets(tmp_path / "data")


# ------------------------------------------------------------------------------------------------------ scoring
def test_score_model_matches_an_independent_computation(tiny_backbone_dir):
    model = from_backbone(tiny_backbone_dir, rationale_mode="echo", device="cpu")
    sets = {"one": _pairs(PAIRS), "two": _pairs(PAIRS[::-1][:5])}
    result = score_model(model, sets, batch_size=4, resamples=200, seed=0)
    for name, pairs in sets.items():  # each set scored on its own, from model.encode
        a = model.encode([p.sentence1 for p in pairs], normalize_embeddings=True)
        b = model.encode([p.sentence2 for p in pairs], normalize_embeddings=True)
        expected = spearmanr((a * b).sum(axis=1), [p.score for p in pairs]).statistic
        assert result["spearman"][name] == pytest.approx(expected, abs=1e-5)
    assert result["mean"] == pytest.approx(np.mean(list(result["spearman"].values())))
    assert result["texts"] == len({t for pairs in sets.values() for p in pairs for t in p[:2]})
    assert result["copy_rate"] == pytest.approx(1.0) and result["finish_rate"] == 1.0  # echo copies the text
    assert result["mean_length"] > 0 and result["seconds_per_text"] > 0
    ci = result["ci95"]
    assert ci["low"] <= result["mean"] <= ci["high"]


def test_score_model_without_rationale_reports_none(tiny_backbone_dir):
    model = from_backbone(tiny_backbone_dir, rationale_mode="none", device="cpu")
    result = score_model(model, {"s": _pairs(PAIRS)}, resamples=20)
    assert result["copy_rate"] is None and result["finish_rate"] is None and result["mean_length"] is None
    assert "–" in comparison_markdown({"sets": {"s": 6}, "rows": {"none": result}, "skipped": {}})


def _echo_and_none(backbone: str):
    """Two cheap models of one backbone that score differently: echo rationales and no rationale."""
    return tuple(from_backbone(backbone, rationale_mode=mode, device="cpu") for mode in ("echo", "none"))


def test_compare_rows_skips_missing_options_and_gives_paired_deltas(tiny_backbone_dir):
    sets = {"s": _pairs(PAIRS)}
    echo, none = _echo_and_none(tiny_backbone_dir)
    rows = [
        Row(PROMPTEOL_ROW, model=none),
        Row("echo", model=echo),
        Row("same as reference", model=none),
        Row("future", model=none, needs=("no_such_option", "pooling_mode:no_such_mode")),
        Row("not given", skip="no folder given"),
    ]
    saved = []
    results = compare(rows, sets, resamples=100, on_row=lambda r: saved.append(len(r["rows"])))
    assert saved == [1, 2, 3]
    assert "no_such_option" in results["skipped"]["future"] and "future" not in results["rows"]
    assert results["skipped"]["not given"] == "no folder given"
    delta = results["rows"]["echo"]["delta_vs_promptEOL"]
    assert delta["delta"] == pytest.approx(results["rows"]["echo"]["mean"] - results["rows"][PROMPTEOL_ROW]["mean"])
    same = results["rows"]["same as reference"]["delta_vs_promptEOL"]
    assert same["delta"] == 0 and same["low"] == 0 and same["high"] == 0  # paired resamples cancel exactly
    assert "delta_vs_promptEOL" not in results["rows"][PROMPTEOL_ROW]
    table = comparison_markdown(results)
    assert "| future (skipped)" in table and "- future skipped: this grace_st lacks" in table and "| echo" in table
    with pytest.raises(ValueError, match="distinct"):
        compare([Row("a", model=none), Row("a", model=echo)], sets)


def test_every_row_gets_its_paired_difference_to_the_best_contrastive_row(tiny_backbone_dir):
    sets = {"s": _pairs(PAIRS)}
    echo, none = _echo_and_none(tiny_backbone_dir)
    rows = [
        Row(PROMPTEOL_ROW, model=none),
        Row("+CL a", model=echo, contrastive=True),
        Row("+CL b", model=none, contrastive=True),
        Row("GRACE", model=echo),
    ]
    results = compare(rows, sets, resamples=100)
    means = {label: r["mean"] for label, r in results["rows"].items()}
    best = max(("+CL a", "+CL b"), key=means.get)
    assert means["+CL a"] != means["+CL b"] and results["contrastive_reference"] == best
    for label in (PROMPTEOL_ROW, "GRACE"):
        delta = results["rows"][label]["delta_vs_contrastive"]
        assert delta["delta"] == pytest.approx(means[label] - means[best]) and delta["low"] <= delta["high"]
    assert all("delta_vs_contrastive" not in results["rows"][label] for label in ("+CL a", "+CL b"))
    header = comparison_markdown(results).splitlines()[0]
    assert f"Δ {best} [95% CI]" in header
    assert "delta_vs_contrastive" not in compare(rows[:1] + rows[3:], sets, resamples=10)["rows"]["GRACE"]


def test_missing_features_reads_the_installed_module():
    assert missing_features(["rationale_mode", "pooling_mode:mean", "pooling_mode:lasttoken"]) == []
    assert missing_features(["nope", "pooling_mode:nope"]) == ["nope", "pooling_mode:nope"]


def test_set_readout_switches_the_pooling_of_a_loaded_model(tiny_backbone_dir):
    model = from_backbone(tiny_backbone_dir, rationale_mode="echo", device="cpu")
    mean = model.encode(["A cat sleeps."])
    set_readout(model, "lasttoken")
    assert model[1].pooling_mode == "lasttoken"
    assert not np.allclose(model.encode(["A cat sleeps."]), mean)
    with pytest.raises(ValueError, match="pooling_mode='bogus'"):
        set_readout(model, "bogus")


# --------------------------------------------------------------------------------------------------------- rows
def test_standard_rows_order_filter_and_trained_settings(tiny_backbone_dir, tmp_path):
    rows = comparison_rows(tiny_backbone_dir)
    assert [r.label for r in rows] == list(comparison.ROW_NAMES)
    assert [r.skip is not None for r in rows] == [False] * 5 + [True] * 4
    assert "--contrastive" in rows[5].skip and "--trained" in rows[6].skip
    prompteol = rows[2]
    options = dict(prompteol.spec.options)
    assert options["prompt_template"] == 'This sentence : "{text}" means in one word:"'
    assert options["chat_template"] is False and options["system_prompt"] == ""
    assert prompteol.pooling_mode == "lasttoken"
    assert dict(rows[3].spec.options)["max_new_tokens"] == 40
    trained = tmp_path / "trained"
    from_backbone(tiny_backbone_dir, system_prompt="Say what it means.", max_new_tokens=12, device="cpu").save(
        str(trained)
    )
    folder = str(trained)
    rows = comparison_rows(tiny_backbone_dir, trained=folder, contrastive=folder, trained_readout="lasttoken")
    assert [r.label for r in rows] == list(comparison.ROW_NAMES) and not any(r.skip for r in rows)
    untrained = dict(rows[3].spec.options)
    assert untrained["system_prompt"] == "Say what it means." and untrained["max_new_tokens"] == 12
    assert rows[-2].pooling_mode == "lasttoken" and rows[-3].pooling_mode == "mean"
    ablation = rows[-1]  # the best readout with the rationale removed
    assert ablation.pooling_mode == "lasttoken" and dict(ablation.spec.options) == {"rationale_mode": "none"}
    assert [r.label for r in comparison_rows(tiny_backbone_dir, only=["echo"])] == ["echo"]
    with pytest.raises(ValueError, match="Unknown row name"):
        comparison_rows(tiny_backbone_dir, only=["PromptEOL2"])


def test_prompteol_row_is_the_whole_prompt_last_token_state(tiny_backbone_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    row = comparison_rows(tiny_backbone_dir, only=[PROMPTEOL_ROW])[0]
    model = comparison.build_row_model(row)
    assert model[0].chat_template is False and model[1].pooling_mode == "lasttoken"
    # Texts whose last character does not merge with the template's closing quote: the module tokenizes template and
    # text apart (plain-text user tokens), the whole string would merge '."' into one token (prompteol_check measures
    # what that costs on real data).
    texts = ["A man is playing a guitar", 'He said "no" twice']
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone_dir)
    lm = AutoModelForCausalLM.from_pretrained(tiny_backbone_dir, dtype=torch.float32).eval()
    for text, embedding in zip(texts, model.encode(texts, normalize_embeddings=True), strict=True):
        inputs = tokenizer(f'This sentence : "{text}" means in one word:"', return_tensors="pt")
        with torch.no_grad():
            state = lm(**inputs, output_hidden_states=True).hidden_states[-1][0, -1]
        np.testing.assert_allclose(embedding, (state / state.norm()).numpy(), atol=1e-5)


def test_summary_row_reads_out_after_the_suffix(tiny_backbone_dir):
    labels = ["untrained GRACE (mean)", "untrained GRACE (summary)"]
    mean, summary = (
        comparison.build_row_model(row) for row in comparison_rows(tiny_backbone_dir, max_new_tokens=4, only=labels)
    )
    assert summary[1].pooling_mode == "summary" and summary[0].summary_suffix == comparison.DEFAULT_SUMMARY_SUFFIX
    assert not np.allclose(mean.encode(["A dog runs."]), summary.encode(["A dog runs."]))


def test_trained_rows_switch_the_readout_of_a_folder(tiny_backbone_dir, tmp_path):
    trained = tmp_path / "trained"
    from_backbone(tiny_backbone_dir, rationale_mode="echo", device="cpu").save(str(trained))
    rows = comparison_rows(tiny_backbone_dir, trained=str(trained), trained_readout="lasttoken")[-3:-1]
    mean_model, readout_model = (comparison.build_row_model(row) for row in rows)
    assert mean_model[1].pooling_mode == "mean" and readout_model[1].pooling_mode == "lasttoken"
    assert not np.allclose(mean_model.encode(["A dog runs."]), readout_model.encode(["A dog runs."]))


# --------------------------------------------------------------------------------------------------------- data
def test_load_dev_sets_reads_the_five_real_sets(shared_data):
    sets = load_dev_sets(shared_data, limit=100)
    assert list(sets) == [name for name, _ in DEV_SETS]
    assert all(len(pairs) == 100 for pairs in sets.values())
    first = sets["SICK trial"][0]
    assert first.sentence1.startswith("The young boys are playing outdoors") and first.score == 3.6
    assert sets["STS13 headlines"][0].sentence1 == "Drug lord captured by marines in Mexico"
    with pytest.raises(ValueError, match="limit=1"):
        load_dev_sets(shared_data, limit=1)


def test_load_dev_sets_names_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dev_sets(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------------ command
def test_main_writes_table_and_json_and_refuses_to_overwrite(tiny_backbone_dir, fake_data, tmp_path):
    out = tmp_path / "out"
    argv = ["--backbone", tiny_backbone_dir, "--rows", "no rationale", "echo", "--limit", "5"]
    argv += ["--data-dir", str(fake_data), "--out", str(out), "--bootstrap", "50"]
    report = main(argv)
    saved = json.loads((out / "comparison.json").read_text())
    assert list(saved["rows"]) == ["no rationale", "echo"]
    assert saved["sets"] == {name: 5 for name, _ in DEV_SETS}
    assert saved["rows"]["echo"]["mean"] == pytest.approx(report["rows"]["echo"]["mean"])
    assert len(saved["rows"]["echo"]["cosines"]["STS13 OnWN"]) == 5
    table = (out / "comparison.md").read_text()
    assert "| echo" in table and "STS12 MSRpar" in table and "95% CI" in table
    with pytest.raises(SystemExit, match="--overwrite"):
        main(argv)
    main([*argv, "--overwrite"])


def test_general_check_compares_each_lm_with_the_base(tiny_backbone_dir, tiny_backbone_copy, fake_data):
    report = comparison.general_check({"same LM": tiny_backbone_copy}, tiny_backbone_dir, data_dir=fake_data)
    base, same = report["models"]["untrained"], report["models"]["same LM"]
    assert report["held_out_texts"] == len({a for a, _, _ in PAIRS}) and report["questions"] > 0
    assert same["perplexity"] == pytest.approx(base["perplexity"], rel=1e-5) and same["perplexity_ratio"] == 1.0
    assert same["mc_right_delta"] == 0 and "same LM" in report["table"]


def test_main_with_general_check(tiny_backbone_dir, tiny_backbone_copy, fake_data, tmp_path):
    out = tmp_path / "out"
    argv = ["--backbone", tiny_backbone_dir, "--contrastive", tiny_backbone_copy, "--rows", "+CL (equal budget)"]
    argv += ["--limit", "4", "--data-dir", str(fake_data), "--out", str(out), "--bootstrap", "20", "--general"]
    report = main(argv)
    saved = json.loads((out / "comparison.json").read_text())
    assert list(saved["rows"]) == ["+CL (equal budget)"]
    assert set(saved["general"]["models"]) == {"untrained", "+CL"}
    table = (out / "comparison.md").read_text()
    assert table == report["table"] and "General abilities" in table


def test_readouts_of_one_model_share_one_generation_and_equal_separate_scoring(tiny_backbone_dir):
    labels = ["untrained GRACE (mean)", "untrained GRACE (summary)"]
    rows = comparison_rows(tiny_backbone_dir, max_new_tokens=4, only=labels)
    sets = {"a": _pairs(PAIRS), "b": _pairs(PAIRS[::-1])}
    shared = comparison.compare(rows, sets, resamples=20)["rows"]
    assert shared[labels[0]]["shared_generation_with"] == [labels[1]]
    for row in rows:  # each row alone: its own model and generation
        alone = comparison.score_model(comparison.build_row_model(row), sets, resamples=20)
        assert np.allclose(shared[row.label]["cosines"]["a"], alone["cosines"]["a"], atol=1e-5)
        assert shared[row.label]["mean"] == pytest.approx(alone["mean"], abs=1e-6)
    assert shared[labels[0]]["mean"] != pytest.approx(shared[labels[1]]["mean"], abs=1e-3)


# ----------------------------------------------------------------------------------------------------- TrecQA
def _qa_set() -> RetrievalSet:
    return RetrievalSet.from_qa_rows([QARow(q, a, label) for q, a, label in QA_ROWS])


def test_retrieval_set_keeps_shared_answers_once_and_reports_unanswered_questions(tmp_path):
    dataset = load_trecqa_dev(write_trecqa(tmp_path))["TrecQA nDCG@10"]
    assert dataset == _qa_set()
    assert dataset.queries == ("Who plays the guitar ?", "What does the man play ?", "What fell today ?")
    assert dataset.corpus == ("A man plays the guitar.", "A man is playing a guitar.", "The stock market fell today.")
    assert dataset.relevant == ((0, 1), (0,), (2,)) and dataset.unanswered == ("Why ?",)


def test_load_trecqa_dev_reads_the_real_file(shared_data):
    if not (shared_data / "trecqa" / "dev.csv").is_file():
        pytest.skip("TrecQA dev not found in the data folder")
    dataset = load_trecqa_dev(shared_data)["TrecQA nDCG@10"]
    assert len(dataset) == 78 and len(dataset.unanswered) == 3 and len(dataset.corpus) == 198
    assert sum(map(len, dataset.relevant)) == 222


def _brute_ndcg(query, corpus, relevant, k=10):
    scores = corpus @ query
    ranked = sorted(range(len(corpus)), key=lambda doc: (-scores[doc], doc))[:k]
    dcg = sum(1 / np.log2(rank + 2) for rank, doc in enumerate(ranked) if doc in relevant)
    return dcg / sum(1 / np.log2(rank + 2) for rank in range(min(k, len(relevant))))


def test_score_model_scores_retrieval_beside_sts_and_means_all_sets(tiny_backbone_dir):
    model = from_backbone(tiny_backbone_dir, rationale_mode="none", device="cpu")
    qa = _qa_set()
    sets = {"sts": _pairs(PAIRS), "qa": qa}
    result = score_model(model, sets, resamples=200, seed=0)
    queries = model.encode(list(qa.queries), normalize_embeddings=True)
    corpus = model.encode(list(qa.corpus), normalize_embeddings=True)
    expected = [_brute_ndcg(q, corpus, docs) for q, docs in zip(queries, qa.relevant, strict=True)]
    np.testing.assert_allclose(result["ndcg"]["qa"], expected, atol=1e-5)
    assert result["scores"]["qa"] == pytest.approx(np.mean(expected), abs=1e-5)
    assert result["scores"]["sts"] == result["spearman"]["sts"] == result["sts_mean"]
    assert result["mean"] == pytest.approx((result["scores"]["sts"] + result["scores"]["qa"]) / 2)
    texts = {t for p in PAIRS for t in p[:2]} | set(qa.queries) | set(qa.corpus)
    assert result["texts"] == len(texts)  # every text encoded once
    assert result["ci95"]["low"] <= result["mean"] <= result["ci95"]["high"]
    table = comparison_markdown({"sets": {"sts": 6, "qa": 3}, "rows": {"m": result}, "skipped": {}})
    header = [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")]
    assert header[:5] == ["row", "sts", "qa", "STS mean", "mean"]


def test_bootstrap_of_the_mean_resamples_questions_and_pairs_alike_for_every_row(tiny_backbone_dir):
    none = from_backbone(tiny_backbone_dir, rationale_mode="none", device="cpu")
    echo = from_backbone(tiny_backbone_dir, rationale_mode="echo", max_new_tokens=4, device="cpu")
    sets = {"sts": _pairs(PAIRS), "qa": _qa_set()}
    rows = [Row(PROMPTEOL_ROW, model=none), Row("same", model=none), Row("echo", model=echo)]
    results = compare(rows, sets, resamples=100)
    same = results["rows"]["same"]["delta_vs_promptEOL"]
    assert same["delta"] == 0 and same["low"] == 0 and same["high"] == 0
    samples = comparison.bootstrap_set_scores(results["rows"]["echo"], sets, 100, 0)
    assert samples.shape == (2, 100)
    indices = comparison.bootstrap_indices([6, 3], 100, 0)[1]
    np.testing.assert_allclose(samples[1], np.asarray(results["rows"]["echo"]["ndcg"]["qa"])[indices].mean(axis=1))


# ------------------------------------------------------------------------------------------- labelled rows
def test_saved_readout_reads_each_trained_folder_as_it_was_saved(tiny_backbone_dir, tmp_path):
    trained = []
    for mode in ("lasttoken", "mean+summary"):
        folder = tmp_path / mode
        suffix = {"summary_suffix": comparison.DEFAULT_SUMMARY_SUFFIX} if "summary" in mode else {}
        from_backbone(tiny_backbone_dir, pooling_mode=mode, max_new_tokens=4, device="cpu", **suffix).save(str(folder))
        trained.append(f"{mode}={folder}")
    rows = comparison_rows(tiny_backbone_dir, trained=trained, trained_readout="saved")
    assert [(row.label, row.pooling_mode) for row in rows[-4:]] == [
        ("lasttoken", "lasttoken"),
        ("lasttoken, rationale removed", "lasttoken"),
        ("mean+summary", "mean+summary"),
        ("mean+summary, rationale removed", "mean+summary"),
    ]
    assert comparison.build_row_model(rows[-2])[1].pooling_mode == "mean+summary"
    # The untrained model is read out with every saved readout beyond mean and summary too, from one generation.
    assert [(row.label, row.pooling_mode) for row in rows[3:7]] == [
        ("untrained GRACE (mean)", "mean"),
        ("untrained GRACE (summary)", "summary"),
        ("untrained GRACE (lasttoken)", "lasttoken"),
        ("untrained GRACE (mean+summary)", "mean+summary"),
    ]
    assert all(row.spec.options == rows[4].spec.options for row in rows[5:7])
    assert "untrained GRACE (mean+summary)" not in [
        r.label for r in comparison_rows(tiny_backbone_dir, trained=trained)
    ]
    (tmp_path / "lasttoken" / "1_RationalePooling" / "config.json").unlink()
    with pytest.raises(ValueError, match="no RationalePooling module with a pooling_mode"):
        comparison_rows(tiny_backbone_dir, trained=trained, trained_readout="saved")


def test_labelled_trained_and_contrastive_folders_give_their_own_rows(tiny_backbone_dir, tmp_path):
    folders = []
    for seed, prompt in ((1, "Say what it means."), (2, "Other.")):
        folder = tmp_path / f"s{seed}"
        from_backbone(tiny_backbone_dir, system_prompt=prompt, max_new_tokens=12, device="cpu").save(str(folder))
        folders.append(str(folder))
    trained = [f"GRACE, seed {i}={folder}" for i, folder in enumerate(folders, start=1)]
    contrastive = [f"+CL, seed {i}={folder}" for i, folder in enumerate(folders, start=1)]
    rows = comparison_rows(tiny_backbone_dir, trained=trained, contrastive=contrastive, trained_readout="lasttoken")
    labels = [r.label for r in rows]
    assert labels[:5] == list(comparison.ROW_NAMES[:5])
    assert labels[5:] == [
        "+CL, seed 1",
        "+CL, seed 2",
        "GRACE, seed 1",
        "GRACE, seed 1, rationale removed",
        "GRACE, seed 2",
        "GRACE, seed 2, rationale removed",
    ]
    assert rows[5].spec.name_or_path == folders[0] and rows[6].spec.name_or_path == folders[1]
    assert [row.contrastive for row in rows[5:]] == [True, True, False, False, False, False]
    seed2, ablation2 = rows[-2], rows[-1]
    assert seed2.spec.name_or_path == ablation2.spec.name_or_path == folders[1]
    assert seed2.pooling_mode == ablation2.pooling_mode == "lasttoken"
    assert dict(ablation2.spec.options) == {"rationale_mode": "none"} and dict(seed2.spec.options) == {}
    assert dict(rows[3].spec.options)["system_prompt"] == "Say what it means."  # the first trained folder's
    with pytest.raises(ValueError, match=r"Row labels must be unique; \['GRACE', 'GRACE, rationale removed'\]"):
        comparison_rows(tiny_backbone_dir, trained=[f"GRACE={folders[0]}", f"GRACE={folders[1]}"])
    with pytest.raises(ValueError, match="need a label each"):
        comparison_rows(tiny_backbone_dir, trained=[folders[0], f"GRACE={folders[1]}"])
    with pytest.raises(ValueError, match=r"Unknown row name\(s\) \['GRACE, seed 3'\].*'GRACE, seed 2'"):
        comparison_rows(tiny_backbone_dir, trained=trained, only=["GRACE, seed 3"])
    bare = comparison_rows(tiny_backbone_dir, trained=folders[0], contrastive=[folders[1]])
    assert [r.label for r in bare] == list(comparison.ROW_NAMES)


# ------------------------------------------------------------------------------------------------ row files
def test_compare_reuses_a_row_file_only_while_its_key_matches(tiny_backbone_copy, tmp_path, monkeypatch):
    options = (("rationale_mode", "none"),)
    rows = [Row("plain", ModelSpec(tiny_backbone_copy, "plain", options), pooling_mode="mean")]
    sets, rows_dir = {"sts": _pairs(PAIRS), "qa": _qa_set()}, tmp_path / "rows"
    first = compare(rows, sets, resamples=30, rows_dir=rows_dir)
    path = row_file(rows_dir, "plain")
    assert path.is_file() and json.loads(path.read_text())["key"]["options"] == {"rationale_mode": "none"}
    calls = []
    real_score = comparison.score_model
    monkeypatch.setattr(comparison, "score_model", lambda *a, **k: calls.append(1) or real_score(*a, **k))
    again = compare(rows, sets, resamples=30, rows_dir=rows_dir)
    assert calls == [] and again["reused"] == ["plain"]
    assert again["rows"]["plain"]["mean"] == pytest.approx(first["rows"]["plain"]["mean"])
    compare(rows, sets, resamples=31, rows_dir=rows_dir)  # another bootstrap
    compare(rows, {"sts": _pairs(PAIRS[:5]), "qa": _qa_set()}, resamples=31, rows_dir=rows_dir)  # other texts
    (Path(tiny_backbone_copy) / "config.json").write_text(
        (Path(tiny_backbone_copy) / "config.json").read_text() + "\n"
    )  # the model folder changed
    compare(rows, {"sts": _pairs(PAIRS[:5]), "qa": _qa_set()}, resamples=31, rows_dir=rows_dir)
    readout = [Row("plain", ModelSpec(tiny_backbone_copy, "plain", options), pooling_mode="lasttoken")]
    compare(readout, {"sts": _pairs(PAIRS[:5]), "qa": _qa_set()}, resamples=31, rows_dir=rows_dir)
    assert calls == [1, 1, 1, 1]
    compare(readout, {"sts": _pairs(PAIRS[:5]), "qa": _qa_set()}, resamples=31, rows_dir=rows_dir, batch_size=2)
    assert calls == [1, 1, 1, 1]  # the batch size does not change the numbers
    monkeypatch.setattr(comparison, "code_fingerprint", lambda: "edited")  # the code that encodes and scores changed
    compare(readout, {"sts": _pairs(PAIRS[:5]), "qa": _qa_set()}, resamples=31, rows_dir=rows_dir)
    assert calls == [1, 1, 1, 1, 1]


def test_the_code_fingerprint_follows_the_source_that_encodes_and_scores(tmp_path):
    package = Path(comparison.__file__).resolve().parents[1]
    copy = tmp_path / "grace_st"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    first = comparison.code_fingerprint(copy)
    assert first == comparison.code_fingerprint(package) and len(first) == 16
    (copy / "hub" / "publish.py").write_text((copy / "hub" / "publish.py").read_text() + "\n# publishing only\n")
    assert comparison.code_fingerprint(copy) == first, "code that does not encode or score leaves it"
    for edited in ("engine/stream.py", "model/modules.py", "evaluation/metrics.py", "readers.py"):
        (copy / edited).write_text((copy / edited).read_text() + "\n# edited\n")
        assert comparison.code_fingerprint(copy) != first, edited
        first = comparison.code_fingerprint(copy)


def test_two_processes_split_the_rows_and_a_last_run_assembles_the_table(tiny_backbone_dir, tmp_path, monkeypatch):
    data = write_trecqa(write_dev_sets(tmp_path / "data"))
    trained = tmp_path / "trained"
    from_backbone(tiny_backbone_dir, rationale_mode="none", device="cpu").save(str(trained))
    out = tmp_path / "out"
    argv = ["--backbone", tiny_backbone_dir, "--trained", f"GRACE, seed 1={trained}", "--trained-readout", "mean"]
    argv += ["--limit", "4", "--data-dir", str(data), "--out", str(out), "--bootstrap", "20"]
    first = ["PromptEOL", "no rationale"]
    second = ["GRACE, seed 1", "GRACE, seed 1, rationale removed"]
    main([*argv, "--rows", *first, "--only-row-files"])
    main([*argv, "--rows", *second, "--only-row-files"])
    assert not (out / "comparison.json").exists() and len(list((out / "rows").glob("*.json"))) == 4
    monkeypatch.setattr(comparison, "score_model", lambda *a, **k: pytest.fail("a saved row was scored again"))
    report = main([*argv, "--rows", *first, *second])
    assert sorted(report["reused"]) == sorted(first + second) and list(report["rows"]) == [first[1], first[0], *second]
    assert report["sets"]["TrecQA nDCG@10"] == 3 and report["sets"]["SICK trial"] == 4
    table = (out / "comparison.md").read_text()
    assert "TrecQA nDCG@10" in table and "STS mean" in table and "| GRACE, seed 1, rationale removed" in table
    assert report["rows"]["GRACE, seed 1"]["delta_vs_promptEOL"]["resamples"] == 20
    with pytest.raises(ValueError, match=r"Unknown row name\(s\) \['GRACE, seed 2'\]"):
        main([*argv, "--rows", "GRACE, seed 2", "--overwrite"])


def test_no_trecqa_and_a_missing_trecqa_file_give_the_sts_table(tiny_backbone_dir, fake_data, tmp_path, caplog):
    argv = ["--backbone", tiny_backbone_dir, "--rows", "no rationale", "--limit", "4", "--data-dir", str(fake_data)]
    report = main([*argv, "--out", str(tmp_path / "a"), "--bootstrap", "10"])
    assert "TrecQA nDCG@10" not in report["sets"] and "TrecQA dev is left out" in caplog.text
    write_trecqa(fake_data)
    report = main([*argv, "--out", str(tmp_path / "b"), "--bootstrap", "10", "--no-trecqa"])
    assert list(report["sets"]) == [name for name, _ in DEV_SETS] and "STS mean" not in report["table"]
