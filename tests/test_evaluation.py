"""Evaluation: local task specs, the mteb encoder wrapper, result reuse and the comparison table."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mteb", reason='evaluation needs the eval extra: pip install "grace-st[eval]"')

import mteb  # noqa: E402
from mteb.mocks.mock_tasks import MockClassificationTask, MockRetrievalTask, MockSTSTask  # noqa: E402

from grace_st import evaluation  # noqa: E402
from grace_st.evaluation import (  # noqa: E402
    GraceEncoder,
    ModelSpec,
    RationaleStats,
    build_model_meta,
    comparison_table,
    evaluate_model,
    load_task_spec,
    resolve_tasks,
    standard_rows,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED_SPECS = REPO / "eval" / "tasks"
PAIRS = [
    ("A man is playing a guitar.", "A man plays the guitar.", 4.8),
    ("A man is playing a guitar.", "A woman is slicing onions.", 0.2),
    ("Kids are running in a park.", "Children run outside.", 4.0),
    ("Kids are running in a park.", "The stock market fell today.", 0.0),
    ("A dog barks at the mailman.", "A dog is barking.", 3.6),
    ("The stock market fell today.", "Shares dropped sharply.", 4.2),
]


@pytest.fixture(scope="module")
def tiny_grace_dir(tiny_backbone_dir, tmp_path_factory) -> str:
    """A saved GRACE model on the tiny backbone with 4-token rationales."""
    from grace_st import from_backbone

    path = tmp_path_factory.mktemp("tiny-grace")
    from_backbone(tiny_backbone_dir, max_new_tokens=4, device="cpu").save(str(path))
    return str(path)


def write_sts_spec(folder: Path, name: str = "TinySTS", **extra) -> Path:
    data = folder / "pairs.tsv"
    data.write_text("".join(f"{score}\t{a}\t{b}\n" for a, b, score in PAIRS), encoding="utf-8")
    spec = {
        "name": name,
        "type": "STS",
        "description": "six pairs",
        "min_score": 0,
        "max_score": 5,
        "splits": {
            "test": {"path": "pairs.tsv", "header": False, "columns": {"score": 0, "sentence1": 1, "sentence2": 2}}
        },
        **extra,
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


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


# ------------------------------------------------------------------------------------------- diagnostics
def test_rationale_stats_aggregate():
    stats = RationaleStats()
    stats.add("a b c d", "a b c d", [1, 2, 3, 4], [1, 2, 3, 4], finished=True)
    stats.add("x", "something new", [7, 8, 9, 10], [1, 2, 3, 4], finished=False)
    assert stats.copy_rate == pytest.approx(0.5)
    assert stats.mean_length == 4 and stats.finish_rate == 0.5
    again = RationaleStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert again.to_dict() == stats.to_dict()
    assert RationaleStats().copy_rate is None


# ------------------------------------------------------------------------------------------- task specs
def test_sts_spec_becomes_mteb_task(sts_spec):
    task = load_task_spec(sts_spec, data_dir=sts_spec.parent)
    assert isinstance(task, mteb.AbsTask) and task.metadata.type == "STS"
    assert task.metadata.main_score == "cosine_spearman" and task.max_score == 5
    task.load_data()
    assert task.dataset["test"]["sentence1"][0] == PAIRS[0][0]
    assert task.dataset["test"]["score"] == [p[2] for p in PAIRS]


def test_spec_revision_changes_with_spec(tmp_path):
    first = load_task_spec(write_sts_spec(tmp_path), data_dir=tmp_path).metadata.revision
    spec = json.loads((tmp_path / "TinySTS.json").read_text())
    spec["splits"]["test"]["limit"] = 3
    (tmp_path / "TinySTS.json").write_text(json.dumps(spec))
    second = load_task_spec(tmp_path / "TinySTS.json", data_dir=tmp_path)
    assert second.metadata.revision != first
    second.load_data()
    assert len(second.dataset["test"]) == 3


def test_pair_classification_retrieval_and_classification_specs(tmp_path):
    rows = "label\ta\tb\n" + "".join(f"{int(s > 2)}\t{a}\t{b}\n" for a, b, s in PAIRS)
    (tmp_path / "rows.tsv").write_text(rows)
    specs = {
        "pairs.yaml": """
            name: TinyPairs
            type: PairClassification
            splits:
              test: {path: rows.tsv, columns: {label: label, sentence1: a, sentence2: b}}
        """,
        "retrieval.yaml": """
            name: TinyRetrieval
            type: Retrieval
            splits:
              test: {path: rows.tsv, filter: {label: "1"}, columns: {query: a, document: b}}
        """,
        "classification.yaml": """
            name: TinyClassification
            type: Classification
            splits:
              train: {path: rows.tsv, columns: {text: b, label: label}}
              test: {path: rows.tsv, columns: {text: a, label: label}}
        """,
    }
    for file, text in specs.items():
        (tmp_path / file).write_text(textwrap.dedent(text))
    pairs = load_task_spec(tmp_path / "pairs.yaml", data_dir=tmp_path)
    pairs.load_data()
    assert pairs.dataset["test"][0]["labels"] == [1, 0, 1, 0, 1, 1]
    retrieval = load_task_spec(tmp_path / "retrieval.yaml", data_dir=tmp_path)
    retrieval.load_data()
    split = retrieval.dataset["default"]["test"]
    assert len(split["queries"]) == 4 and len(split["corpus"]) == 4
    assert all(len(docs) == 1 for docs in split["relevant_docs"].values())
    classification = load_task_spec(tmp_path / "classification.yaml", data_dir=tmp_path)
    assert classification.metadata.eval_splits == ["test"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "red"}, "Unknown key(s) ['colour']"),
        ({"type": "STSS"}, "close: ['STS']"),
        (
            {"splits": {"test": {"path": "pairs.tsv", "columns": {"score": 0, "sentence1": 1}}}},
            "missing: ['sentence2']",
        ),
        ({"splits": {"test": {"path": "pairs.tsv", "columns": {}, "sep": ","}}}, "Unknown key(s) ['sep']"),
        ({"type": "Classification", "splits": {"test": {"path": "p", "columns": {"text": 0, "label": 1}}}}, "'train'"),
    ],
)
def test_spec_errors_name_the_problem(tmp_path, change, message):
    path = write_sts_spec(tmp_path)
    spec = {**json.loads(path.read_text()), **change}
    path.write_text(json.dumps(spec))
    with pytest.raises(ValueError) as error:
        load_task_spec(path, data_dir=tmp_path)
    assert message in str(error.value)


def test_spec_with_missing_data_file_names_the_data_dir(tmp_path):
    path = write_sts_spec(tmp_path)
    task = load_task_spec(path, data_dir=tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="GRACE_ST_DATA"):
        task.load_data()


def test_bad_column_name_lists_columns(tmp_path):
    (tmp_path / "h.tsv").write_text("score\tleft\tright\n1\ta\tb\n")
    (tmp_path / "s.json").write_text(
        json.dumps(
            {
                "name": "T",
                "type": "STS",
                "splits": {
                    "test": {"path": "h.tsv", "columns": {"score": "score", "sentence1": "lft", "sentence2": 2}}
                },
            }
        )
    )
    with pytest.raises(ValueError, match=r"'lft' is not in h.tsv .*close: \['left'\]"):
        load_task_spec(tmp_path / "s.json", data_dir=tmp_path).load_data()


def test_unknown_task_names_suggest_close_matches(tmp_path):
    with pytest.raises(ValueError, match=r"'STS13x'.*'STS13'"):
        resolve_tasks(["STS13x"])
    (tmp_path / "sts13_headlines.yaml").write_text("name: X\n")
    with pytest.raises(ValueError, match=r"did you mean \['sts13_headlines'\]"):
        resolve_tasks(local_tasks=["sts13_headline"], spec_folder=tmp_path)
    with pytest.raises(ValueError, match="Unknown benchmark"):
        resolve_tasks(benchmark="MTEB(eng, v9)")


def test_resolve_mixes_mteb_names_and_local_specs(sts_spec):
    tasks = resolve_tasks(["STS13", "STS13"], local_tasks=[str(sts_spec)], data_dir=sts_spec.parent)
    assert [t.metadata.name for t in tasks] == ["STS13", "TinySTS"]


def test_shipped_specs_load_real_data(shared_data):
    tasks = resolve_tasks(local_tasks=sorted(evaluation.local_task_specs(SHIPPED_SPECS)), spec_folder=SHIPPED_SPECS)
    assert len(tasks) >= 5
    for task in tasks:
        task.load_data()
    by_name = {t.metadata.name: t for t in tasks}
    headlines = by_name["LocalSTS13Headlines"].dataset["test"]
    assert len(headlines) == 100 and headlines["score"][0] == 2.6
    assert len(by_name["LocalSICKTrialRelatedness"].dataset["test"]) == 100


# ------------------------------------------------------------------------------------------- models and metadata
def test_model_spec_parse_and_labels():
    spec = ModelSpec.parse("echo=runs/x@rationale_mode=echo,max_new_tokens=32,do_sample=false")
    assert spec.label == "echo" and spec.name_or_path == "runs/x"
    assert dict(spec.options) == {"rationale_mode": "echo", "max_new_tokens": 32, "do_sample": False}
    assert ModelSpec.parse("org/model").display_name() == "org/model"
    with pytest.raises(ValueError, match="KEY=VALUE"):
        ModelSpec.parse("x@echo")
    assert [row.label for row in standard_rows("b", trained="t")] == [
        "no rationale",
        "echo",
        "untrained GRACE",
        "trained GRACE",
    ]


def test_model_meta_from_files(tiny_grace_dir, tiny_backbone_dir):
    meta = build_model_meta(ModelSpec(tiny_grace_dir), Path(tiny_grace_dir))
    assert meta.name == f"local/{Path(tiny_grace_dir).name}" and len(meta.revision) == 12
    assert meta.embed_dim == 32 and meta.n_parameters > 0 and meta.similarity_fn_name.value == "cosine"
    assert meta.max_tokens == 1024 and meta.experiment_kwargs is None and "GRACE" in meta.citation
    echo = build_model_meta(ModelSpec(tiny_grace_dir, options=(("rationale_mode", "echo"),)), Path(tiny_grace_dir))
    assert echo.revision == meta.revision and echo.experiment_name == "rationale_mode_echo"
    backbone = build_model_meta(ModelSpec(tiny_backbone_dir), Path(tiny_backbone_dir))
    assert backbone.experiment_kwargs == {"grace": True, "rationale_mode": "generate", "max_new_tokens": 128}
    assert backbone.training_datasets == set()
    with pytest.raises(ValueError, match="Unknown GRACE option"):
        build_model_meta(ModelSpec(tiny_grace_dir, options=(("max_tokens", 3),)), Path(tiny_grace_dir))


def test_encoder_generates_each_text_once_on_mteb_mock_tasks(tiny_grace_dir):
    model = evaluation.load_model(ModelSpec(tiny_grace_dir), device="cpu")
    encoder = GraceEncoder(model, build_model_meta(ModelSpec(tiny_grace_dir), Path(tiny_grace_dir)))
    calls = []
    original = model.encode
    model.encode = lambda texts, **kw: calls.append(list(texts)) or original(texts, **kw)
    result = mteb.evaluate(
        encoder, [MockSTSTask(), MockRetrievalTask(), MockClassificationTask()], cache=None, show_progress_bar=False
    )
    assert {r.task_name for r in result.task_results} == {"MockSTSTask", "MockRetrievalTask", "MockClassificationTask"}
    encoded = [text for call in calls for text in call]
    # MockClassificationTask repeats "This is a test sentence" in train and test; it is generated once.
    assert encoded.count("This is a test sentence") <= 3  # once per task at most
    stats = encoder.stats["MockClassificationTask"]
    assert stats.texts == 3 and 0 <= stats.finish_rate <= 1 and stats.mean_length <= 4


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
    echo_dir = result_dir / "experiments" / "rationale_mode_echo"
    assert (echo_dir / "TinySTS.json").is_file()
    assert echo.stats["TinySTS"].copy_rate == 1.0 and echo.stats["TinySTS"].finish_rate == 1.0
    assert grace.reused == [] and echo.reused == []


def test_finished_results_are_reused_without_loading(evaluated, tiny_grace_dir, monkeypatch):
    out, tasks, grace, _ = evaluated

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded although its results exist")

    monkeypatch.setattr(evaluation, "load_model", fail)
    again = evaluate_model(ModelSpec(tiny_grace_dir, "grace"), tasks, out)
    assert again.reused == ["TinySTS"] and again.score("TinySTS") == pytest.approx(grace.score("TinySTS"), abs=1e-6)
    assert again.stats["TinySTS"].to_dict() == grace.stats["TinySTS"].to_dict()


def test_comparison_table_rows_and_diagnostics(evaluated):
    _, _, grace, echo = evaluated
    table = comparison_table([grace, echo])
    lines = table.strip().splitlines()
    assert lines[0] == "| model | TinySTS | avg | copy rate | mean length | finish rate | s/text |"
    assert lines[2].startswith(f"| grace | {100 * grace.score('TinySTS'):.2f} |")
    assert lines[3].startswith("| echo |") and "| 1.00 |" in lines[3]
    missing = comparison_table([grace], tasks=["TinySTS", "Other"]).splitlines()[2]
    assert "| – | – |" in missing  # a task the row lacks, hence no average


def test_mteb_run_script(tiny_grace_dir, sts_spec, tmp_path, capsys):
    import importlib.util

    script = importlib.util.spec_from_file_location("mteb_run", REPO / "eval" / "mteb_run.py")
    module = importlib.util.module_from_spec(script)
    script.loader.exec_module(module)
    argv = ["--model", tiny_grace_dir, "--local-task", str(sts_spec), "--data-dir", str(sts_spec.parent)]
    argv += [
        "--output-dir",
        str(tmp_path),
        "--compare",
        f"none={tiny_grace_dir}@rationale_mode=none",
        "--device",
        "cpu",
    ]
    table = module.main(argv)
    assert (tmp_path / "comparison.md").read_text() == table
    assert table.splitlines()[2].startswith("| none |")  # compared models first, the model under test last
    module.main(argv)
    assert "reused 1/1 task results" in capsys.readouterr().out


@pytest.mark.slow
def test_default_backbone_on_real_sts_pairs(shared_data, tmp_path):
    spec = tmp_path / "sick.yaml"
    spec.write_text((SHIPPED_SPECS / "sick_trial_relatedness.yaml").read_text().replace("limit: 100", "limit: 12"))
    tasks = resolve_tasks(local_tasks=[str(spec)])
    row = evaluate_model("default@max_new_tokens=16", tasks, tmp_path / "out", batch_size=8, device="cpu")
    score = row.score("LocalSICKTrialRelatedness")
    assert -1 <= score <= 1 and not np.isnan(score)
    stats = row.stats["LocalSICKTrialRelatedness"]
    assert stats.texts > 0 and stats.mean_length <= 16
