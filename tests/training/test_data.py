"""Training data loaders: files, aliases, invalid rows, SICK triplets, the bundled demo set."""

from __future__ import annotations

import json
import logging

import pytest

from grace_st.training.config import GraceDataArguments
from grace_st.training.data import (
    demo_data_path,
    load_texts,
    load_training_data,
    load_triplets,
    sick_triplets,
    to_grpo_dataset,
    trecqa_triplets,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def test_jsonl_and_csv_triplets(tmp_path):
    rows = [{"query": "q1", "positive": "p1", "negative": "n1"}, {"query": "q2", "positive": "p2", "negative": "n2"}]
    dataset = load_triplets(write_jsonl(tmp_path / "t.jsonl", rows))
    assert dataset.column_names == ["query", "positive", "negative"]
    assert dataset[1] == rows[1]
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("query,positive,negative\nq1,p1,n1\n", encoding="utf-8")
    assert load_triplets(str(csv_path))[0] == rows[0]


def test_aliases_and_list_values(tmp_path):
    path = write_jsonl(tmp_path / "e5.jsonl", [{"anchor": "q", "pos": ["p", "p2"], "neg": ["n"]}])
    assert load_triplets(path)[0] == {"query": "q", "positive": "p", "negative": "n"}
    path = write_jsonl(tmp_path / "custom.jsonl", [{"question": "q", "doc": "p", "bad": "n"}])
    dataset = load_triplets(path, positive_field="doc", negative_field="bad")
    assert dataset[0] == {"query": "q", "positive": "p", "negative": "n"}


@pytest.mark.parametrize(
    "row, message",
    [
        ({"query": "q", "positive": "p"}, "line 2: field 'negative' is missing"),
        ({"query": "q", "positive": "  ", "negative": "n"}, "line 2: field 'positive' is empty"),
        ({"query": 3, "positive": "p", "negative": "n"}, "line 2: field 'query' is 3"),
    ],
)
def test_invalid_row_names_the_row(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"query": "a", "positive": "b", "negative": "c"}, row])
    with pytest.raises(ValueError, match=message):
        load_triplets(path)


def test_skip_invalid_logs_the_count(tmp_path, caplog):
    rows = [{"query": "a", "positive": "b", "negative": "c"}, {"query": "", "positive": "b", "negative": "c"}, {}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="grace_st.training.data"):
        dataset = load_triplets(path, skip_invalid=True)
    assert len(dataset) == 1
    assert "Skipped 2 invalid row(s)" in caplog.text


def test_missing_negative_allowed_when_not_required(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"query": "q", "positive": "p"}])
    assert load_triplets(path, require_negative=False)[0]["negative"] == ""


def test_missing_file_and_no_rows(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_triplets(str(tmp_path / "nope.jsonl"))
    path = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="no usable rows"):
        load_triplets(path)


def test_texts_and_grpo_columns(tmp_path):
    txt = tmp_path / "wiki.txt"
    txt.write_text("first sentence\nsecond sentence\n", encoding="utf-8")
    texts = load_texts(str(txt))
    assert texts["text"] == ["first sentence", "second sentence"]
    unsupervised = to_grpo_dataset(texts, "unsupervised")
    assert unsupervised[0] == {"prompt": "first sentence", "query": "first sentence", "negative": ""}
    (tmp_path / "blank.txt").write_text("a\n\nb\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: field 'text' is empty"):
        load_texts(str(tmp_path / "blank.txt"))
    triplets = load_triplets(write_jsonl(tmp_path / "t.jsonl", [{"query": "q", "positive": "p", "negative": "n"}]))
    assert to_grpo_dataset(triplets)[0] == {"prompt": "p", "query": "q", "negative": "n"}
    with pytest.raises(ValueError, match="mode"):
        to_grpo_dataset(triplets, "other")


def test_bundled_demo_sets():
    train = load_triplets(demo_data_path("train"))
    dev = load_triplets(demo_data_path("dev"))
    assert len(train) >= 60 and len(dev) >= 30
    assert not set(train["query"]) & set(dev["query"]), "dev queries must be held out"
    assert len(set(dev["positive"])) == len(dev)
    dataset = load_training_data(GraceDataArguments(train_data="demo"))
    assert set(dataset.column_names) == {"prompt", "query", "negative"} and len(dataset) == len(train)
    with pytest.raises(ValueError, match="split"):
        demo_data_path("test")  # type: ignore[arg-type]


def test_sick_builder_on_a_small_file(tmp_path):
    path = tmp_path / "SICK_small.txt"
    path.write_text(
        "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
        "1\tA man plays a guitar\tA person plays an instrument\t4.5\tENTAILMENT\n"
        "2\tA man plays a guitar\tNobody is playing a guitar\t3.0\tCONTRADICTION\n"
        "3\tA dog runs\tA cat sleeps\t1.5\tNEUTRAL\n",
        encoding="utf-8",
    )
    dataset = sick_triplets(str(path))
    rows = {(r["query"], r["positive"]): r["negative"] for r in dataset}
    assert rows[("A man plays a guitar", "A person plays an instrument")] == "Nobody is playing a guitar"
    # The reverse direction has no contradiction of its own: a random sentence that is neither anchor nor positive.
    assert rows[("A person plays an instrument", "A man plays a guitar")] not in (
        "A person plays an instrument",
        "A man plays a guitar",
    )
    assert len(sick_triplets(str(path), random_negatives=False)) == 1


def test_sick_train_triplets(shared_data):
    path = shared_data / "sick2014" / "SICK_train.txt"
    dataset = sick_triplets(str(path))
    assert len(dataset) > 1000
    assert all(row["query"] and row["positive"] and row["negative"] for row in dataset.select(range(50)))
    data_args = GraceDataArguments(train_data=f"sick:{path}", max_train_samples=10)
    assert len(load_training_data(data_args)) == 10


def test_trecqa_triplets_pair_each_answer_with_a_non_answer_of_its_question(shared_data, caplog):
    import csv

    path = shared_data / "trecqa" / "train.csv"
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    answers = {(r["qtext"].strip(), r["atext"].strip()) for r in rows if r["label"] == "1"}
    non_answers: dict[str, set[str]] = {}
    for r in rows:
        if r["label"] == "0":
            non_answers.setdefault(r["qtext"].strip(), set()).add(r["atext"].strip())
    with caplog.at_level("INFO", logger="grace_st.training.data"):
        dataset = trecqa_triplets(str(path), seed=3)
    assert len(dataset) == len(answers)
    assert {(row["query"], row["positive"]) for row in dataset} == answers
    own = sum(row["negative"] in non_answers.get(row["query"], ()) for row in dataset)
    borrowed = len(dataset) - own
    assert own > 0.9 * len(dataset)
    assert not borrowed or f"{borrowed} of {len(dataset)} triplets take their negative from another question" in (
        caplog.text
    )
    assert all((row["query"], row["negative"]) not in answers for row in dataset)
    assert list(trecqa_triplets(str(path), seed=3)["negative"]) == list(dataset["negative"])  # seeded
    data_args = GraceDataArguments(train_data=f"trecqa:{path}", max_train_samples=5)
    assert len(load_training_data(data_args)) == 5


def test_query_rollouts_mirror_every_row():
    from datasets import Dataset

    from grace_st.training.data import with_query_rollouts

    data = Dataset.from_dict({"prompt": ["d1", "d2"], "query": ["q1", "q2"], "negative": ["n1", ""], "id": [1, 2]})
    mirrored = with_query_rollouts(data)
    assert mirrored.to_list() == [
        {"prompt": "d1", "query": "q1", "negative": "n1", "id": 1},
        {"prompt": "q1", "query": "d1", "negative": "n1", "id": 1},
        {"prompt": "d2", "query": "q2", "negative": "", "id": 2},
        {"prompt": "q2", "query": "d2", "negative": "", "id": 2},
    ]
    streamed = with_query_rollouts(data.to_iterable_dataset())
    assert list(streamed) == mirrored.to_list()
    with pytest.raises(ValueError, match="empty query"):
        with_query_rollouts(Dataset.from_dict({"prompt": ["d"], "query": [""], "negative": ["n"]}))
    with pytest.raises(ValueError, match="'prompt', 'query' and 'negative'"):
        with_query_rollouts(Dataset.from_dict({"prompt": ["d"]}))


# ------------------------------------------------------------------------------------------- issue 12, item 11
SICK_HEADER = "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    good = '{"query": "q", "positive": "p", "negative": "n"}\n'
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good.encode() + '{"query": "caf\xe9", "positive": "p", "negative": "n"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.jsonl: line 2 is not valid UTF-8"):
        load_triplets(str(path))
    csv_path = tmp_path / "latin1.csv"
    csv_path.write_bytes("query,positive,negative\nq,p,n\nq,caf\xe9,n\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.csv: line 3 is not valid UTF-8"):
        load_triplets(str(csv_path))
    sick = tmp_path / "SICK_latin1.txt"
    sick.write_bytes((SICK_HEADER + "1\tcaf\xe9\tA cafe\t4.5\tENTAILMENT\n").encode("latin-1"))
    with pytest.raises(ValueError, match=r"SICK_latin1.txt: line 2 is not valid UTF-8"):
        sick_triplets(str(sick))


@pytest.mark.parametrize("line", ["5", '"query positive"', "[1, 2]", "null"])
def test_jsonl_value_that_is_not_an_object(tmp_path, caplog, line):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"query": "q", "positive": "p", "negative": "n"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"mixed.jsonl: line 2: the row is .*, not a JSON object"):
        load_triplets(str(path))
    with caplog.at_level(logging.WARNING, logger="grace_st.training.data"):
        assert len(load_triplets(str(path), skip_invalid=True)) == 1
    assert "Skipped 1 invalid row(s)" in caplog.text


def test_csv_row_with_more_fields_than_the_header(tmp_path):
    path = tmp_path / "wide.csv"
    path.write_text("query,positive,negative\nq1,p1,n1\nq2,p2,n2,extra\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"wide.csv: line 3: the row has 4 fields, the header has 3"):
        load_triplets(str(path))
    assert load_triplets(str(path), skip_invalid=True)["query"] == ["q1"]
    tsv = tmp_path / "short.tsv"
    tsv.write_text('query\tpositive\tnegative\nq1\t"p1\nwith a newline"\tn1\nq2\tp2\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"short.tsv: line 4: the row has 2 fields, the header has 3"):
        load_triplets(str(tsv))  # a quoted field over two lines keeps the line numbers right


def test_sick_single_entailment_pair_does_not_hang(tmp_path):
    import signal

    def stop(signum, frame):
        raise TimeoutError("sick_triplets did not return within 20 s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(20)
    try:
        check_single_pair(tmp_path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check_single_pair(tmp_path):
    path = tmp_path / "SICK_one.txt"
    path.write_text(SICK_HEADER + "1\tA man plays a guitar\tA person plays an instrument\t4.5\tENTAILMENT\n")
    # Only the two sentences of the pair exist: no random negative can differ from both (this looped forever).
    with pytest.raises(ValueError, match=r"no sentence other than the anchor and the positive"):
        sick_triplets(str(path))
    with pytest.raises(ValueError, match="no usable rows"):
        sick_triplets(str(path), random_negatives=False)


def test_short_sick_row_names_the_line(tmp_path):
    path = tmp_path / "SICK_short.txt"
    path.write_text(SICK_HEADER + "1\tA man plays\tA person plays\t4.5\tENTAILMENT\n2\tA man plays\n")
    with pytest.raises(ValueError, match=r"SICK_short.txt: line 3 has 2 fields, the header has 5"):
        sick_triplets(str(path))
