"""The one reader of pair and delimited files: formats, strict rows, errors naming file and line, the data folder."""

from __future__ import annotations

import doctest

import pytest

from grace_st import readers
from grace_st.readers import Pair, data_dir, read_lines, read_pairs, read_rows, resolve_data_path

SICK = (
    "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
    "1\tA man plays a guitar \tA person plays an instrument\t4.5\tENTAILMENT\n"
    "2\tA man plays a guitar\tNobody is playing a guitar\t3.0\tCONTRADICTION\n"
)
MSRP = (
    '\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\r\n1\t7\t8\tHe said "yes.\tHe agreed.\r\n0\t9\t10\tA.\tB.\r\n'
)
STS = "4.0\tA cat sits.\tA cat is sitting.\n\n1.5\tA dog runs.\tStocks fell.\n"


def test_doctests():
    result = doctest.testmod(readers)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(
    ("content", "fmt", "expected"),
    [
        (
            STS,
            "sts",
            [
                Pair("A cat sits.", "A cat is sitting.", 4.0, None, 1),
                Pair("A dog runs.", "Stocks fell.", 1.5, None, 3),
            ],
        ),
        (
            SICK,
            "sick",
            [
                Pair("A man plays a guitar", "A person plays an instrument", 4.5, "ENTAILMENT", 2),
                Pair("A man plays a guitar", "Nobody is playing a guitar", 3.0, "CONTRADICTION", 3),
            ],
        ),
        (MSRP, "msrp", [Pair('He said "yes.', "He agreed.", 1.0, None, 2), Pair("A.", "B.", 0.0, None, 3)]),
    ],
)
def test_three_formats_auto_detected(tmp_path, content, fmt, expected):
    path = tmp_path / "pairs.tsv"
    path.write_bytes(content.encode("utf-8"))
    assert readers.pair_format(path) == fmt
    assert read_pairs(path) == expected
    assert read_pairs(path, format=fmt, limit=1) == expected[:1]
    a, b, score = read_pairs(path)[0][:3]
    assert (a, b, score) == expected[0][:3]


def test_real_files(shared_data):
    headlines = read_pairs(shared_data / "sts2013" / "headlines.test.tsv")
    assert len(headlines) == 750 and headlines[0].score == 2.6
    trial = read_pairs(shared_data / "sick2014" / "SICK_trial.txt")
    assert len(trial) == 500 and {p.label for p in trial} == {"ENTAILMENT", "NEUTRAL", "CONTRADICTION"}
    assert all(1.0 <= p.score <= 5.0 for p in trial)
    msrp = read_pairs(shared_data / "msr-paraphrase" / "msr-para-train.tsv")
    assert len(msrp) == 3576 and {p.score for p in msrp} == {0.0, 1.0}
    assert not msrp[0].sentence1.startswith("\ufeff") and not msrp[0].sentence2.endswith("\r")


def test_non_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.tsv"
    path.write_bytes("4.0\tok\tfine\n3.0\tcaf\xe9\tbar\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.tsv: line 2 is not valid UTF-8 \(byte b'\\xe9' at column 8\)"):
        read_pairs(path)


def test_row_with_other_field_count_names_the_line(tmp_path):
    path = tmp_path / "sick.txt"
    path.write_text(SICK + "3\tA dog runs\tA cat sleeps\t1.5\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 4 has 4 fields, the header has 5"):
        read_pairs(path)
    path.write_text(SICK + "3\tA dog\tA cat\t1.5\tNEUTRAL\textra\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 4 has 6 fields"):
        read_pairs(path)
    sts = tmp_path / "sts.tsv"
    sts.write_text("4.0\ta\tb\n2.0\tonly one\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2 has 2 fields; an STS file"):
        read_pairs(sts)


def test_bad_score_missing_columns_and_options(tmp_path):
    path = tmp_path / "sts.tsv"
    path.write_text("4.0\ta\tb\nhigh\tc\td\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2: score 'high' is not a number"):
        read_pairs(path)
    (tmp_path / "half.txt").write_text("pair_ID\tsentence_A\tsentence_B\n1\ta\tb\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"not a SICK file: columns \['relatedness_score', 'entailment_judgment'\]"):
        read_pairs(tmp_path / "half.txt")
    with pytest.raises(ValueError, match="format='csv' is not supported"):
        read_pairs(path, format="csv")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit=-1"):
        read_pairs(path, limit=-1)
    with pytest.raises(FileNotFoundError):
        read_pairs(tmp_path / "missing.tsv")


def test_read_rows_csv_quoting_and_line_endings(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes(b'a,b\r\n"x, y",2\r1,"q ""z"""\n')
    assert read_rows(path, delimiter=",") == readers.Table(["a", "b"], [(2, ["x, y", "2"]), (3, ["1", 'q "z"'])])
    assert [n for n, _ in read_lines(path)] == [1, 2, 3]
    with pytest.raises(ValueError, match="delimiter=';'"):
        read_rows(path, delimiter=";")


def test_data_dir_order(tmp_path, monkeypatch):
    monkeypatch.delenv(readers.DATA_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert data_dir() == tmp_path / ".." / "shared" / "data"
    monkeypatch.setenv(readers.DATA_ENV, str(tmp_path / "env"))
    assert data_dir() == tmp_path / "env"
    assert data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / "f.tsv").write_text("x")
    assert resolve_data_path("f.tsv") == tmp_path / "env" / "f.tsv"
    with pytest.raises(FileNotFoundError, match=r"GRACE_ST_DATA.*now .*explicit"):
        resolve_data_path("f.tsv", tmp_path / "explicit")


def test_read_trecqa_keeps_quoted_commas_and_file_order(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text(
        'qtext,label,atext\nWho wrote it ?,1,"Smith , who wrote it , said ""so"" ."\n\nWho wrote it ?,0,No .\n',
        encoding="utf-8",
    )
    rows = readers.read_trecqa(path)
    assert rows == [
        readers.QARow("Who wrote it ?", 'Smith , who wrote it , said "so" .', 1),
        readers.QARow("Who wrote it ?", "No .", 0),
    ]
    assert all(type(row.label) is int for row in rows)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("qtext,label,atext\nQ ?,1,A .\nQ ?,2,B .\n", r"line 3: label '2' is not allowed"),
        ("qtext,label,atext\nQ ?,yes,A .\n", r"line 2: label 'yes' is not allowed"),
        ("qtext,atext\nQ ?,A .\n", r"columns \['label'\] are missing"),
        ("qtext,label,atext\nQ ?,1\n", r"line 2 has 2 fields"),
        ("qtext,label,atext\n,1,A .\n", r"line 2: the question or the sentence is empty"),
    ],
)
def test_read_trecqa_rejects_bad_rows_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "qa.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as error:
        readers.read_trecqa(path)
    assert str(path) in str(error.value)


def test_read_trecqa_real_dev_file(shared_data):
    import csv

    path = shared_data / "trecqa" / "dev.csv"
    if not path.is_file():
        pytest.skip(f"TrecQA dev not found at {path}")
    with open(path, newline="", encoding="utf-8") as handle:
        expected = [(q.strip(), a.strip(), int(label)) for q, label, a in list(csv.reader(handle))[1:]]
    rows = readers.read_trecqa(path)
    assert [tuple(row) for row in rows] == expected
    assert len({row.question for row in rows}) == 81 and sum(row.label for row in rows) == 222
