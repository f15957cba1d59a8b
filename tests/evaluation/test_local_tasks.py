"""Local task specs: a spec over a local file becomes a real mteb task; bundled specs are found by name."""

from __future__ import annotations

import doctest
import json
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("mteb", reason='local tasks need the eval extra: pip install "grace-st[eval]"')

import mteb  # noqa: E402
import tiny_sts  # noqa: E402
from tiny_sts import PAIRS  # noqa: E402

from grace_st.evaluation import local_tasks  # noqa: E402
from grace_st.evaluation.local_tasks import bundled_task_specs, load_task_spec, resolve_tasks  # noqa: E402


def write_sts_spec(folder: Path, name: str = "TinySTS", **extra) -> Path:
    """The six-pair STS spec of tests/tiny_sts.py, with a description and score range."""
    return tiny_sts.write_sts_spec(folder, name, description="six pairs", min_score=0, max_score=5, **extra)


def test_doctests():
    result = doctest.testmod(local_tasks)
    assert result.attempted > 0 and result.failed == 0


def test_sts_spec_becomes_mteb_task(tmp_path):
    spec = write_sts_spec(tmp_path)
    task = load_task_spec(spec, data_dir=tmp_path)
    assert isinstance(task, mteb.AbsTask) and task.metadata.type == "STS"
    assert task.metadata.main_score == "cosine_spearman" and task.max_score == 5
    task.load_data()
    assert task.dataset["test"]["sentence1"] == [p[0] for p in PAIRS]
    assert task.dataset["test"]["sentence2"] == [p[1] for p in PAIRS]
    assert task.dataset["test"]["score"] == [p[2] for p in PAIRS]


def test_spec_revision_changes_with_spec_and_data(tmp_path):
    first = load_task_spec(write_sts_spec(tmp_path), data_dir=tmp_path).metadata.revision
    spec = json.loads((tmp_path / "TinySTS.json").read_text())
    spec["splits"]["test"]["limit"] = 3
    (tmp_path / "TinySTS.json").write_text(json.dumps(spec))
    second = load_task_spec(tmp_path / "TinySTS.json", data_dir=tmp_path)
    assert second.metadata.revision != first
    second.load_data()
    assert len(second.dataset["test"]) == 3
    with (tmp_path / "pairs.tsv").open("a") as handle:
        handle.write("1.0\tOne more.\tAnother.\n")
    assert load_task_spec(tmp_path / "TinySTS.json", data_dir=tmp_path).metadata.revision != second.metadata.revision


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
              test: {path: rows.tsv, columns: {text: a, label: label}, limit: 4}
        """,
    }
    for file, text in specs.items():
        (tmp_path / file).write_text(textwrap.dedent(text))
    pairs = load_task_spec(tmp_path / "pairs.yaml", data_dir=tmp_path)
    pairs.load_data()
    assert pairs.dataset["test"][0]["labels"] == [1, 0, 1, 0, 1, 1]
    assert pairs.dataset["test"][0]["sentence2"][1] == PAIRS[1][1]
    retrieval = load_task_spec(tmp_path / "retrieval.yaml", data_dir=tmp_path)
    retrieval.load_data()
    split = retrieval.dataset["default"]["test"]
    assert len(split["queries"]) == 4 and len(split["corpus"]) == 4  # the rows with label 1
    assert split["queries"][1]["text"] == PAIRS[2][0] and split["corpus"][1]["text"] == PAIRS[2][1]
    assert split["relevant_docs"] == {f"q{i}": {f"d{i}": 1} for i in range(4)}
    classification = load_task_spec(tmp_path / "classification.yaml", data_dir=tmp_path)
    assert classification.metadata.eval_splits == ["test"]
    classification.load_data()
    assert classification.dataset["test"]["label"] == [1, 0, 1, 0]


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
        (
            {"splits": {"test": {"path": "p", "columns": {"score": 0, "sentence1": 1, "sentence2": 2}, "limit": 0}}},
            "limit=0",
        ),
    ],
)
def test_spec_errors_name_the_problem(tmp_path, change, message):
    path = write_sts_spec(tmp_path)
    spec = {**json.loads(path.read_text()), **change}
    path.write_text(json.dumps(spec))
    with pytest.raises(ValueError) as error:
        load_task_spec(path, data_dir=tmp_path)
    assert message in str(error.value)


def test_data_errors_name_file_and_line(tmp_path, monkeypatch):
    path = write_sts_spec(tmp_path)
    monkeypatch.delenv(local_tasks.DATA_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="GRACE_ST_DATA"):
        load_task_spec(path, data_dir=tmp_path / "elsewhere").load_data()
    (tmp_path / "pairs.tsv").write_text("4.0\ta\tb\nhigh\tc\td\n")
    with pytest.raises(ValueError, match=r"pairs.tsv: line 2: score 'high' is not a number"):
        load_task_spec(path, data_dir=tmp_path).load_data()
    (tmp_path / "pairs.tsv").write_text("4.0\ta\tb\n2.0\tonly one\n")
    with pytest.raises(ValueError, match=r"pairs.tsv: line 2 has 2 fields; column index 2 is used"):
        load_task_spec(path, data_dir=tmp_path).load_data()


def test_bad_column_name_and_label_list_the_options(tmp_path):
    (tmp_path / "h.tsv").write_text("score\tleft\tright\n1\ta\tb\n")
    spec = {
        "name": "T",
        "type": "STS",
        "splits": {"test": {"path": "h.tsv", "columns": {"score": "score", "sentence1": "lft", "sentence2": 2}}},
    }
    (tmp_path / "s.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"'lft' is not in h.tsv .*close: \['left'\]"):
        load_task_spec(tmp_path / "s.json", data_dir=tmp_path).load_data()
    spec = {
        "name": "P",
        "type": "PairClassification",
        "splits": {
            "test": {
                "path": "h.tsv",
                "columns": {"label": "score", "sentence1": "left", "sentence2": "right"},
                "label_map": {"0": 0},
            }
        },
    }
    (tmp_path / "p.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"h.tsv: line 2: label '1' is not in label_map \(keys: \['0'\]\)"):
        load_task_spec(tmp_path / "p.json", data_dir=tmp_path).load_data()


def test_unknown_task_names_suggest_close_matches(tmp_path):
    with pytest.raises(ValueError, match=r"'STS13x'.*Did you mean: 'STS13'"):
        resolve_tasks(["STS13x"])
    with pytest.raises(ValueError, match=r"did you mean \['sts13_headlines'\]"):
        resolve_tasks(local_tasks=["sts13_headline"])
    with pytest.raises(ValueError, match="Unknown benchmark"):
        resolve_tasks(benchmark="MTEB(eng, v9)")


def test_resolve_mixes_mteb_names_spec_files_and_folders(tmp_path):
    spec = write_sts_spec(tmp_path)
    tasks = resolve_tasks(["STS13", "STS13"], local_tasks=[str(spec)], data_dir=tmp_path)
    assert [t.metadata.name for t in tasks] == ["STS13", "TinySTS"]
    by_folder = resolve_tasks(local_tasks=["TinySTS"], spec_folder=tmp_path, data_dir=tmp_path)
    assert [t.metadata.name for t in by_folder] == ["TinySTS"]


def test_bundled_specs_are_package_data_and_load_real_data(shared_data):
    specs = bundled_task_specs()
    assert set(specs) == {
        "msrp_pairs",
        "msrp_retrieval",
        "sick_contradiction",
        "sick_trial_relatedness",
        "sts12_msrpar",
        "sts13_headlines",
        "trecqa_dev",
    }
    assert all(Path(local_tasks.__file__).parents[1] / "task_specs" == path.parent for path in specs.values())
    tasks = resolve_tasks(local_tasks=sorted(specs), data_dir=shared_data)
    for task in tasks:
        task.load_data()
    by_name = {t.metadata.name: t for t in tasks}
    headlines = by_name["LocalSTS13Headlines"].dataset["test"]
    assert len(headlines) == 100 and headlines["score"][0] == 2.6
    assert len(by_name["LocalSICKTrialRelatedness"].dataset["test"]) == 100
    assert by_name["LocalMSRPPairClassification"].dataset["test"][0]["labels"][:3] == [1, 0, 1]


def test_trecqa_dev_spec_gives_one_query_per_answered_question_and_shared_documents(shared_data):
    import csv

    path = shared_data / "trecqa" / "dev.csv"
    if not path.is_file():
        pytest.skip(f"TrecQA dev not found at {path}")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = [(q.strip(), label, a.strip()) for q, label, a in list(csv.reader(handle))[1:]]
    answers: dict[str, set[str]] = {}
    for question, label, sentence in rows:
        if label == "1":
            answers.setdefault(question, set()).add(sentence)
    assert len({question for question, _, _ in rows}) == 81  # 3 of them have no answering sentence
    task = resolve_tasks(local_tasks=["trecqa_dev"], data_dir=shared_data)[0]
    assert task.metadata.name == "LocalTrecQARetrieval" and task.metadata.main_score == "ndcg_at_10"
    task.load_data()
    split = task.dataset["default"]["dev"]
    queries = {row["id"]: row["text"] for row in split["queries"]}
    corpus = {row["id"]: row["text"] for row in split["corpus"]}
    assert len(queries) == len(answers) == 78
    assert len(corpus) == len(set().union(*answers.values())) == 198
    assert sum(len(docs) for docs in split["relevant_docs"].values()) == sum(map(len, answers.values())) == 222
    for query_id, docs in split["relevant_docs"].items():
        assert {corpus[doc] for doc in docs} == answers[queries[query_id]]
    shared = [s for s in corpus.values() if sum(s in docs for docs in answers.values()) > 1]
    assert shared  # some sentences answer two questions: one document, relevant to both
