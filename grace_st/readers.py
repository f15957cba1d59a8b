"""Read the text files grace_st consumes: sentence-pair files (STS, SICK, MSRP) and other delimited or line files.

The one place that opens such files (quick evaluation, the local mteb task specs, the general-ability check, SICK
triplets, training data and the benchmarks all call it). Nothing here needs mteb.

Three pair formats, as published in ``../shared/data`` (see :func:`read_pairs`):

- ``"sts"``: SemEval STS, TSV without a header, ``score<TAB>sentence1<TAB>sentence2`` (score 0-5);
- ``"sick"``: SICK, TSV with the header ``pair_ID sentence_A sentence_B relatedness_score entailment_judgment``;
- ``"msrp"``: MSR Paraphrase, TSV with the header ``Quality #1 ID #2 ID #1 String #2 String`` (a UTF-8 BOM first).

Question answering (TrecQA, see :func:`read_trecqa`): CSV with the header ``qtext,label,atext`` (label 1 = the
sentence answers the question).

Every reader is strict: bytes that are not UTF-8, a row with another number of fields than the header, a missing
column or a score that is not a number raise ``ValueError`` naming the file and the line. Cells are stripped of
surrounding whitespace; blank lines are skipped.

Where the data lives (:func:`data_dir`): an explicit folder, else ``$GRACE_ST_DATA``, else ``../shared/data`` relative
to the current working directory (the folder beside a project checkout when run from its root).
"""

from __future__ import annotations

import codecs
import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple

DATA_ENV = "GRACE_ST_DATA"
PairFormat = Literal["auto", "sts", "sick", "msrp"]
PAIR_FORMATS: tuple[str, ...] = ("auto", "sts", "sick", "msrp")
# Header columns of the formats with a header: (sentence1, sentence2, score, label or None).
_HEADER_COLUMNS = {
    "sick": ("sentence_A", "sentence_B", "relatedness_score", "entailment_judgment"),
    "msrp": ("#1 String", "#2 String", "Quality", None),
}


def data_dir(folder: str | os.PathLike | None = None) -> Path:
    """The data folder: ``folder`` if given, else ``$GRACE_ST_DATA``, else ``../shared/data`` from the working folder.

    Args:
        folder: an explicit folder; wins over everything else.

    Returns:
        The folder (not checked for existence; :func:`resolve_data_path` does that with a helpful message).

    Example:
        >>> str(data_dir("/data/sts"))
        '/data/sts'
    """
    if folder is not None:
        return Path(folder).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return Path.cwd() / ".." / "shared" / "data"


def resolve_data_path(path: str | os.PathLike, folder: str | os.PathLike | None = None) -> Path:
    """An existing data file: absolute paths as given, relative ones under :func:`data_dir` (``folder``).

    Raises:
        FileNotFoundError: the file does not exist; the message names the folder it was looked up in and how to point
            elsewhere.
    """
    path = Path(path).expanduser()
    if not path.is_absolute():
        path = data_dir(folder) / path
    if not path.is_file():
        raise FileNotFoundError(
            f"Data file {path} does not exist. Relative data paths are resolved against an explicit data folder, "
            f"else ${DATA_ENV}, else ../shared/data beside the working directory (now {data_dir(folder)})."
        )
    return path


def read_lines(path: str | os.PathLike, keepends: bool = False) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, text)`` for every line of a UTF-8 file (a leading byte-order mark is dropped).

    Lines end at ``\\n``, ``\\r\\n`` or ``\\r`` only (not at the other characters ``str.splitlines`` treats as
    breaks), so line numbers match what an editor shows.

    Args:
        path: the file.
        keepends: keep the line endings (needed to feed ``csv.reader`` with quoted multi-line fields).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line is not valid UTF-8; the message names the file, the line and the byte.
    """
    path = Path(path)
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    for number, raw in enumerate(data.splitlines(keepends=keepends), start=1):
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{path}: line {number} is not valid UTF-8 (byte {raw[error.start : error.start + 1]!r} at column "
                f"{error.start + 1}); save the file as UTF-8."
            ) from None


class Table(NamedTuple):
    """Rows of a delimited file: ``header`` (None without one) and ``rows`` as ``(line number, cells)``."""

    header: list[str] | None
    rows: list[tuple[int, list[str]]]


def read_rows(path: str | os.PathLike, delimiter: str = "\t", header: bool = True) -> Table:
    """Read a delimited file: one record per line, cells stripped, blank lines skipped.

    Tab-separated files are split on every tab (quotes are ordinary characters, as in the STS/SICK/MSRP files, whose
    sentences contain unbalanced quotes); comma-separated lines follow the usual CSV quoting within a line.

    Args:
        path: the file.
        delimiter: ``"\\t"`` or ``","``. Defaults to a tab.
        header: the first non-blank line names the columns. Defaults to True.

    Returns:
        A :class:`Table`.

    Raises:
        ValueError: not UTF-8, an unknown delimiter, or (with a header) a row with more or fewer fields than the
            header; the message names the file and line.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile("w", suffix=".tsv", delete=False) as handle:
        ...     _ = handle.write("a\\tb\\n1\\t x \\n\\n2\\ty\\n")
        >>> read_rows(handle.name)
        Table(header=['a', 'b'], rows=[(2, ['1', 'x']), (4, ['2', 'y'])])
    """
    if delimiter not in ("\t", ","):
        raise ValueError(f"delimiter={delimiter!r} is not supported; use '\\t' or ','.")
    names: list[str] | None = None
    rows: list[tuple[int, list[str]]] = []
    for number, line in read_lines(path):
        if not line.strip():
            continue
        cells = line.split("\t") if delimiter == "\t" else next(csv.reader([line]))
        cells = [cell.strip() for cell in cells]
        if header and names is None:
            names = cells
            continue
        if names is not None and len(cells) != len(names):
            raise ValueError(
                f"{path}: line {number} has {len(cells)} fields, the header has {len(names)} ({names}). "
                "Fix the row (a stray delimiter inside a cell?)."
            )
        rows.append((number, cells))
    return Table(names, rows)


class Pair(NamedTuple):
    """One sentence pair: ``(sentence1, sentence2, score)`` first, so it unpacks like a 3-tuple's first items.

    Attributes:
        sentence1: first sentence.
        sentence2: second sentence.
        score: the gold score: STS similarity 0-5, SICK relatedness 1-5, MSRP paraphrase label 0/1.
        label: SICK's entailment judgment (``ENTAILMENT``, ``NEUTRAL``, ``CONTRADICTION``); None in other formats.
        line: line number in the file.
    """

    sentence1: str
    sentence2: str
    score: float
    label: str | None = None
    line: int = 0


def pair_format(path: str | os.PathLike) -> str:
    """The format of a pair file from its first non-blank line: ``"sick"``, ``"msrp"`` or ``"sts"``."""
    for _, line in read_lines(path):
        if line.strip():
            first = line.split("\t")[0].strip()
            return {"pair_ID": "sick", "Quality": "msrp"}.get(first, "sts")
    return "sts"


def read_pairs(path: str | os.PathLike, format: PairFormat = "auto", limit: int | None = None) -> list[Pair]:
    """Read a sentence-pair file (STS, SICK or MSRP, see the module docstring) in file order.

    Args:
        path: the file.
        format: ``"auto"`` (from the first line: ``pair_ID`` → SICK, ``Quality`` → MSRP, else STS), ``"sts"``,
            ``"sick"`` or ``"msrp"``. Defaults to ``"auto"``.
        limit: keep the first ``limit`` pairs.

    Returns:
        The :class:`Pair` s.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: an unknown format, a missing header column, a row with the wrong number of fields or a score
            that is not a number (naming the file and line).

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile("w", suffix=".tsv", delete=False) as handle:
        ...     _ = handle.write("4.0\\tA cat sits.\\tA cat is sitting.\\n")
        >>> read_pairs(handle.name)
        [Pair(sentence1='A cat sits.', sentence2='A cat is sitting.', score=4.0, label=None, line=1)]
    """
    if format not in PAIR_FORMATS:
        raise ValueError(f"format={format!r} is not supported; choose one of {PAIR_FORMATS}.")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit={limit!r} is not allowed; it must be an integer >= 0 or None.")
    fmt = pair_format(path) if format == "auto" else format
    table = read_rows(path, header=fmt != "sts")
    if fmt == "sts":
        picks, label_index = (1, 2, 0), None
        for number, cells in table.rows:
            if len(cells) != 3:
                raise ValueError(
                    f"{path}: line {number} has {len(cells)} fields; "
                    "an STS file has score<TAB>sentence1<TAB>sentence2."
                )
    else:
        wanted = _HEADER_COLUMNS[fmt]
        header = table.header or []
        missing = [name for name in wanted if name is not None and name not in header]
        if missing:
            raise ValueError(f"{path} is not a {fmt.upper()} file: columns {missing} are missing (header: {header}).")
        picks = tuple(header.index(name) for name in wanted[:3])
        label_index = header.index(wanted[3]) if wanted[3] is not None else None
    pairs = []
    for number, cells in table.rows[:limit] if limit is not None else table.rows:
        first, second, score_index = picks
        try:
            score = float(cells[score_index])
        except ValueError:
            raise ValueError(f"{path}: line {number}: score {cells[score_index]!r} is not a number.") from None
        label = cells[label_index] if label_index is not None else None
        pairs.append(Pair(cells[first], cells[second], score, label, number))
    return pairs


class QARow(NamedTuple):
    """One TrecQA row: a question, a candidate sentence and whether the sentence answers it.

    Attributes:
        question: the question.
        sentence: the candidate answer sentence.
        label: 1 when the sentence answers the question, else 0.
    """

    question: str
    sentence: str
    label: int


TRECQA_COLUMNS = ("qtext", "label", "atext")


def read_trecqa(path: str | os.PathLike) -> list[QARow]:
    """Read a TrecQA file (CSV with the header ``qtext,label,atext``, usual CSV quoting) in file order.

    Args:
        path: the file (for example ``trecqa/dev.csv`` under :func:`data_dir`, via :func:`resolve_data_path`).

    Returns:
        The :class:`QARow` s, one per data row.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not UTF-8, a missing column, a row with the wrong number of fields, an empty question or sentence,
            or a label other than ``0``/``1`` (naming the file, the line and the value).

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as handle:
        ...     _ = handle.write('qtext,label,atext\\nWho wrote it ?,1,"Smith , who wrote it , said so ."\\n')
        >>> read_trecqa(handle.name)
        [QARow(question='Who wrote it ?', sentence='Smith , who wrote it , said so .', label=1)]
    """
    table = read_rows(path, delimiter=",")
    header = table.header or []
    missing = [name for name in TRECQA_COLUMNS if name not in header]
    if missing:
        raise ValueError(f"{path} is not a TrecQA file: columns {missing} are missing (header: {header}).")
    question_index, label_index, sentence_index = (header.index(name) for name in TRECQA_COLUMNS)
    rows = []
    for number, cells in table.rows:
        label = cells[label_index]
        if label not in ("0", "1"):
            raise ValueError(f"{path}: line {number}: label {label!r} is not allowed; a TrecQA label is 0 or 1.")
        question, sentence = cells[question_index], cells[sentence_index]
        if not question or not sentence:
            raise ValueError(f"{path}: line {number}: the question or the sentence is empty.")
        rows.append(QARow(question, sentence, int(label)))
    return rows


RECORD_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt")


def read_records(path: str | os.PathLike, name: str = "File") -> Iterator[tuple[str, Any, str | None]]:
    """Yield ``(row label, record, problem)`` from a record file: JSONL, JSON (a list, or ``{"data": [...]}``), CSV or
    TSV with a header, or text (one ``{"text": line}`` per line).

    ``problem`` names what makes a row unusable before its fields are looked at (a JSON value that is not an object,
    a CSV row with another number of fields than the header), for the caller to raise or skip. Bytes that are not
    UTF-8 raise at once, naming the file and line.

    Args:
        path: the file (:data:`RECORD_FILE_SUFFIXES`; another suffix is read as text).
        name: how a missing file is named in the error. Defaults to ``"File"``.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: a JSONL line that is not JSON, or a JSON file that is not a list of records.
    """
    source = os.fspath(path)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name} {source!r} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for line_number, line in read_lines(path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{source}: line {line_number} is not valid JSON ({error}).") from error
            yield f"{source}: line {line_number}", record, _not_an_object(record)
    elif suffix == ".json":
        records = json.loads("".join(line for _, line in read_lines(path, keepends=True)))
        if isinstance(records, dict) and "data" in records:
            records = records["data"]
        if not isinstance(records, list):
            raise ValueError(f"{source}: expected a JSON list of objects (or {{'data': [...]}}).")
        for index, record in enumerate(records):
            yield f"{source}: item {index}", record, _not_an_object(record)
    elif suffix in (".csv", ".tsv"):
        lines = (line for _, line in read_lines(path, keepends=True))
        reader = csv.reader(lines, delimiter="\t" if suffix == ".tsv" else ",")
        header = None
        for cells in reader:
            if not cells:
                continue  # a blank line
            if header is None:
                header = cells
                continue
            label = f"{source}: line {reader.line_num}"
            if len(cells) != len(header):
                problem = f"the row has {len(cells)} fields, the header has {len(header)} ({header})"
                yield label, {}, problem
                continue
            yield label, dict(zip(header, cells, strict=True)), None
    else:  # .txt: one text per line
        for line_number, line in read_lines(path):
            yield f"{source}: line {line_number}", {"text": line}, None


def _not_an_object(record: Any) -> str | None:
    if isinstance(record, dict):
        return None
    return f"the row is {type(record).__name__} {str(json.dumps(record))[:60]}, not a JSON object"


def read_texts(path: str | os.PathLike, limit: int | None = None) -> list[str]:
    """Non-blank lines of a UTF-8 text file (one passage per line), stripped, in order."""
    texts = [line.strip() for _, line in read_lines(path) if line.strip()]
    return texts[:limit] if limit is not None else texts


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in a UTF-8 file; ``{}`` when there is no such file (optional configs and records)."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
