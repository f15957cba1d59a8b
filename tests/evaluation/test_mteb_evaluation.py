"""Evaluation: mteb's wrapper with GRACE diagnostics, model metadata, cache keys, result reuse, table and CLI."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mteb", reason='evaluation needs the eval extra: pip install "grace-st[eval]"')

import mteb  # noqa: E402
from mteb.mocks.mock_tasks import MockClassificationTask, MockRetrievalTask, MockSTSTask  # noqa: E402
from tiny_sts import PAIRS, write_sts_spec  # noqa: E402

from grace_st.evaluation import mteb_evaluation as evaluation  # noqa: E402
from grace_st.evaluation import quickeval
from grace_st.evaluation.local_tasks import load_task_spec  # noqa: E402
from grace_st.evaluation.mteb_evaluation import (  # noqa: E402
    GraceEncoder,
    ModelSpec,
    baseline_options,
    build_model_meta,
    comparison_table,
    evaluate_model,
    standard_rows,
)
from grace_st.factory import PROMPTEOL_OPTIONS  # noqa: E402
from grace_st.scripts.evaluate import main  # noqa: E402

SYSTEM_PROMPT = "Say what the text is about."


@pytest.fixture(scope="module")
def tiny_grace_dir(tiny_backbone_dir, tmp_path_factory) -> str:
    """A saved GRACE model on the tiny backbone with 4-token rationales and its own system prompt."""
    from grace_st import from_backbone

    path = tmp_path_factory.mktemp("tiny-grace")
    from_backbone(tiny_backbone_dir, max_new_tokens=4, system_prompt=SYSTEM_PROMPT, device="cpu").save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def sts_spec(tmp_path_factory) -> Path:
    return write_sts_spec(tmp_path_factory.mktemp("spec"))


@pytest.fixture(scope="module")
def evaluated(tiny_grace_dir, sts_spec, tmp_path_factory):
    """The tiny GRACE model and its echo variant evaluated once on the tiny STS spec."""
    out = tmp_path_factory.mktemp("mteb-out")
    tasks = [load_task_spec(sts_spec, data_dir=sts_spec.parent)]
    grace = evaluate_model(ModelSpec(tiny_grace_dir, "grace"), tasks, out, batch_size=4, device="cpu")
    echo = evaluate_model(
        ModelSpec(tiny_grace_dir, "echo", (("rationale_mode", "echo"),)), tasks, out, batch_size=4, device="cpu"
    )
    return out, tasks, grace, echo


def test_doctests():
    result = doctest.testmod(evaluation)
    assert result.attempted > 0 and result.failed == 0


def test_no_private_mteb_imports():
    source = Path(evaluation.__file__).read_text() + Path(evaluation.__file__).with_name("local_tasks.py").read_text()
    assert "mteb._" not in source and ".mteb._" not in source
    assert not [line for line in source.splitlines() if line.strip().startswith("from mteb") and "import _" in line]


# ------------------------------------------------------------------------------------------- models and metadata
def test_model_spec_parse_and_labels():
    spec = ModelSpec.parse("echo=runs/x@rationale_mode=echo,max_new_tokens=32,do_sample=false")
    assert spec.label == "echo" and spec.name_or_path == "runs/x"
    assert dict(spec.options) == {"rationale_mode": "echo", "max_new_tokens": 32, "do_sample": False}
    assert ModelSpec.parse("org/model").display_name() == "org/model"
    with pytest.raises(ValueError, match="KEY=VALUE"):
        ModelSpec.parse("x@echo")
    with pytest.raises(ValueError, match="names no model"):
        ModelSpec.parse("label=")
    rows = standard_rows("b", max_new_tokens=8, trained="t", contrastive="c", system_prompt="p")
    assert [row.label for row in rows] == [
        "no rationale",
        "echo",
        "PromptEOL",
        "untrained GRACE",
        "contrastive (+CL)",
        "trained GRACE",
    ]
    assert dict(rows[3].options) == {"max_new_tokens": 8, "rationale_mode": "generate", "system_prompt": "p"}
    assert dict(rows[1].options) == {"rationale_mode": "echo", "system_prompt": "p"} and rows[4].options == ()
    assert dict(rows[2].options) == PROMPTEOL_OPTIONS  # its own prompt, not the GRACE system prompt


def test_model_meta_and_cache_key(tiny_grace_dir, tiny_backbone_dir):
    meta = build_model_meta(ModelSpec(tiny_grace_dir), Path(tiny_grace_dir))
    assert meta.name == f"local/{Path(tiny_grace_dir).name}" and len(meta.revision) == 12
    assert meta.embed_dim == 32 and meta.n_parameters > 0 and meta.similarity_fn_name.value == "cosine"
    assert meta.max_tokens == 1024 and meta.experiment_kwargs is None and "GRACE" in meta.citation
    echo = build_model_meta(ModelSpec(tiny_grace_dir, options=(("rationale_mode", "echo"),)), Path(tiny_grace_dir))
    assert echo.revision == meta.revision and echo.experiment_name == "rationale_mode_echo"
    backbone = build_model_meta(ModelSpec(tiny_backbone_dir), Path(tiny_backbone_dir))
    kwargs = dict(backbone.experiment_kwargs)
    assert kwargs.pop("settings") and kwargs == {"grace": True, "rationale_mode": "generate", "max_new_tokens": 128}
    assert backbone.training_datasets == set()
    # Any GRACE setting, default or not, changes a backbone's cache key (not only the readable ones).
    keys = {
        build_model_meta(ModelSpec(tiny_backbone_dir, options=options), Path(tiny_backbone_dir)).experiment_name
        for options in [(), (("max_input_tokens", 64),), (("do_sample", True),), (("system_prompt", "x"),)]
    }
    assert len(keys) == 4
    with pytest.raises(ValueError, match="Unknown GRACE option"):
        build_model_meta(ModelSpec(tiny_grace_dir, options=(("max_tokens", 3),)), Path(tiny_grace_dir))


def test_load_model_applies_and_validates_options(tiny_grace_dir):
    model = evaluation.load_model(ModelSpec(tiny_grace_dir, options=(("max_new_tokens", 2),)), device="cpu")
    assert model[0].max_new_tokens == 2 and model[0].system_prompt == SYSTEM_PROMPT
    assert len(model.encode(["a b c"], output_value=None)[0]["rationale_ids"]) <= 2
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        evaluation.load_model(ModelSpec(tiny_grace_dir, options=(("max_new_tokens", 0),)), device="cpu")


def test_baseline_options_follow_the_model_under_test(tiny_grace_dir):
    assert baseline_options(ModelSpec(tiny_grace_dir)) == {"system_prompt": SYSTEM_PROMPT, "max_new_tokens": 4}
    assert baseline_options(ModelSpec(tiny_grace_dir, options=(("max_new_tokens", 9),)))["max_new_tokens"] == 9
    assert baseline_options(ModelSpec("org/not-a-folder")) == {}


# ------------------------------------------------------------------------------------------- the encoder
def test_encoder_generates_each_text_once_per_task(tiny_grace_dir, monkeypatch):
    model = evaluation.load_model(ModelSpec(tiny_grace_dir), device="cpu")
    encoder = evaluation.make_encoder(model, build_model_meta(ModelSpec(tiny_grace_dir), Path(tiny_grace_dir)))
    assert isinstance(encoder, GraceEncoder) and isinstance(encoder, mteb.models.SentenceTransformerEncoderWrapper)
    calls = []
    original = evaluation.encode_with_stats
    monkeypatch.setattr(
        evaluation,
        "encode_with_stats",
        lambda model, texts, **kw: calls.append(list(texts)) or original(model, texts, **kw),
    )
    tasks = [MockSTSTask(), MockRetrievalTask(), MockClassificationTask()]
    result = mteb.evaluate(encoder, tasks, cache=None, show_progress_bar=False)
    assert {r.task_name for r in result.task_results} == {"MockSTSTask", "MockRetrievalTask", "MockClassificationTask"}
    encoded = [text for call in calls for text in call]
    # MockClassificationTask repeats "This is a test sentence" in train and test (and both splits): one rationale.
    assert encoded.count("This is a test sentence") == 3  # once per task
    stats = encoder.stats["MockClassificationTask"]
    assert stats.texts == stats.rationales == 3 and stats.mean_length <= 4


def test_plain_sentence_transformer_uses_mteb_wrapper(tiny_grace_dir, tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize

    model = SentenceTransformer(modules=[Normalize()], device="cpu")
    encoder = evaluation.make_encoder(model, build_model_meta(ModelSpec(tiny_grace_dir), Path(tiny_grace_dir)))
    assert type(encoder) is mteb.models.SentenceTransformerEncoderWrapper
    assert encoder.mteb_model_meta.name == f"local/{Path(tiny_grace_dir).name}"
    with pytest.raises(ValueError, match="needs a GRACE model"):
        GraceEncoder(model, encoder.mteb_model_meta)


# ------------------------------------------------------------------------------------------- running and reuse
def test_evaluate_writes_mteb_results_layout(evaluated):
    out, tasks, grace, echo = evaluated
    result_dir = Path(out) / "results" / grace.meta.model_name_as_path() / grace.meta.revision
    saved = json.loads((result_dir / "TinySTS.json").read_text())
    assert saved["task_name"] == "TinySTS" and saved["dataset_revision"] == tasks[0].metadata.revision
    assert saved["scores"]["test"][0]["main_score"] == pytest.approx(grace.score("TinySTS"), abs=1e-6)
    assert (result_dir / "model_meta.json").is_file()
    sidecar = json.loads((result_dir / "grace_diagnostics" / "TinySTS.json").read_text())
    assert sidecar["task"]["type"] == "STS" and sidecar["stats"]["texts"] == 9  # 9 distinct texts in 12 slots
    assert (result_dir / "experiments" / "rationale_mode_echo" / "TinySTS.json").is_file()
    # Echo is measured like any rationale: the text repeated, so everything is copied and finished.
    assert echo.stats["TinySTS"].copy_rate == 1.0 and echo.stats["TinySTS"].finish_rate == 1.0
    assert grace.reused == [] and echo.reused == []


def test_scores_and_diagnostics_match_a_direct_computation(evaluated, tiny_grace_dir):
    from scipy.stats import spearmanr

    _, _, grace, _ = evaluated
    model = evaluation.load_model(ModelSpec(tiny_grace_dir), device="cpu")
    embeddings = model.encode([p[0] for p in PAIRS] + [p[1] for p in PAIRS])
    cosine = (embeddings[: len(PAIRS)] * embeddings[len(PAIRS) :]).sum(axis=1)
    assert grace.score("TinySTS") == pytest.approx(spearmanr(cosine, [p[2] for p in PAIRS]).statistic, abs=1e-6)
    texts = list(dict.fromkeys([p[0] for p in PAIRS] + [p[1] for p in PAIRS]))
    direct = quickeval.encode(model, texts, batch_size=4).stats
    stats = grace.stats["TinySTS"]
    assert (stats.texts, stats.tokens, stats.finished) == (direct.texts, direct.tokens, direct.finished)
    assert stats.copy_rate == pytest.approx(direct.copy_rate)


def test_finished_results_are_reused_without_loading(evaluated, tiny_grace_dir, monkeypatch):
    out, tasks, grace, _ = evaluated

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded although its results exist")

    monkeypatch.setattr(evaluation, "load_model", fail)
    again = evaluate_model(ModelSpec(tiny_grace_dir, "grace"), tasks, out)
    assert again.reused == ["TinySTS"] and again.score("TinySTS") == pytest.approx(grace.score("TinySTS"), abs=1e-6)
    assert again.stats["TinySTS"].to_dict() == grace.stats["TinySTS"].to_dict()


def test_results_of_another_dataset_revision_are_recomputed(tiny_grace_dir, tmp_path):
    spec = write_sts_spec(tmp_path)
    out = tmp_path / "out"
    first = evaluate_model(ModelSpec(tiny_grace_dir), [load_task_spec(spec, data_dir=tmp_path)], out, device="cpu")
    (tmp_path / "pairs.tsv").write_text("".join(f"{s}\t{b}\t{a}\n" for a, b, s in PAIRS[:4]), encoding="utf-8")
    edited = [load_task_spec(spec, data_dir=tmp_path)]
    second = evaluate_model(ModelSpec(tiny_grace_dir), edited, out, device="cpu")
    assert first.reused == [] and second.reused == []  # mteb's "only-missing" would have kept the old scores
    assert second.stats["TinySTS"].texts == 6  # 4 distinct first and 2 distinct second sentences
    assert second.results["TinySTS"].dataset_revision != first.results["TinySTS"].dataset_revision


def test_comparison_table_rows_and_diagnostics(evaluated):
    _, _, grace, echo = evaluated
    lines = comparison_table([grace, echo]).strip().splitlines()
    assert [cell.strip() for cell in lines[0].strip("|").split("|")] == [
        "model",
        "TinySTS",
        "avg",
        "copy rate",
        "mean length",
        "finish rate",
        "s/text",
    ]
    cells = [cell.strip() for cell in lines[2].strip("|").split("|")]
    stats = grace.stats["TinySTS"]
    assert cells[:3] == ["grace", f"{100 * grace.score('TinySTS'):.2f}", f"{100 * grace.score('TinySTS'):.2f}"]
    assert cells[3:6] == [f"{stats.copy_rate:.2f}", f"{stats.mean_length:.1f}", f"{stats.finish_rate:.2f}"]
    echo_cells = [cell.strip() for cell in lines[3].strip("|").split("|")]
    assert echo_cells[0] == "echo" and echo_cells[3] == "1.00" and echo_cells[5] == "1.00"
    missing = [c.strip() for c in comparison_table([grace], tasks=["TinySTS", "Other"]).splitlines()[2].split("|")]
    assert missing[3:5] == ["–", "–"]  # a task the row lacks, hence no average


def test_command_line(tiny_grace_dir, sts_spec, tmp_path, capsys):
    argv = ["--model", tiny_grace_dir, "--local-task", str(sts_spec), "--data-dir", str(sts_spec.parent)]
    argv += ["--output-dir", str(tmp_path), "--compare", f"none={tiny_grace_dir}@rationale_mode=none"]
    argv += ["--device", "cpu"]
    table = main(argv)
    assert (tmp_path / "comparison.md").read_text() == table
    lines = table.splitlines()
    assert lines[2].startswith("| none ") and lines[3].startswith(f"| local/{Path(tiny_grace_dir).name} ")
    none_cells = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert none_cells[3:6] == ["–", "–", "–"] and none_cells[6] != "–"  # no rationales: no rates, but a time
    main(argv)
    assert "reused 1/1 task results" in capsys.readouterr().out


def test_command_line_baselines_use_the_model_prompt(tiny_grace_dir, tiny_backbone_dir, sts_spec, tmp_path):
    argv = ["--model", tiny_grace_dir, "--baselines", tiny_backbone_dir, "--local-task", str(sts_spec)]
    argv += ["--data-dir", str(sts_spec.parent), "--output-dir", str(tmp_path), "--device", "cpu"]
    table = main(argv)
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == [
        "no rationale",
        "echo",
        "PromptEOL",
        "untrained GRACE",
        f"local/{Path(tiny_grace_dir).name}",
    ]
    untrained = json.loads(
        next((tmp_path / "results").rglob("experiments/*rationale_mode_generate*/model_meta.json")).read_text()
    )
    assert untrained["experiment_kwargs"]["max_new_tokens"] == 4
    assert untrained["experiment_kwargs"]["system_prompt"] == evaluation._short_hash(SYSTEM_PROMPT)


@pytest.mark.slow
def test_default_backbone_on_real_sts_pairs(shared_data, tmp_path):

    from grace_st.evaluation.local_tasks import bundled_task_specs
    from grace_st.readers import read_pairs

    spec = tmp_path / "sick.yaml"
    spec.write_text(bundled_task_specs()["sick_trial_relatedness"].read_text().replace("limit: 100", "limit: 12"))
    tasks = [load_task_spec(spec, data_dir=shared_data)]
    row = evaluate_model("default@max_new_tokens=16", tasks, tmp_path / "out", batch_size=8, device="cpu")
    pairs = read_pairs(shared_data / "sick2014" / "SICK_trial.txt", limit=12)
    model = evaluation.load_model(ModelSpec.parse("default@max_new_tokens=16"), device="cpu")
    direct = quickeval.sts_spearman(model, pairs, batch_size=8)
    assert row.score("LocalSICKTrialRelatedness") == pytest.approx(direct["spearman"], abs=1e-6)
    stats = row.stats["LocalSICKTrialRelatedness"]
    assert stats.mean_length == pytest.approx(direct["mean_length"]) and stats.mean_length <= 16
    assert not np.isnan(row.score("LocalSICKTrialRelatedness"))
