"""Local mteb tasks: a small YAML/JSON spec over a local data file becomes a real mteb task.

Local runs then go through mteb's own evaluators, results layout and result cache. The specs that ship with grace_st
(``grace_st/task_specs/*.yaml``, package data) are found by name (:func:`bundled_task_specs`); their data files are
read from the data folder (:func:`grace_st.readers.data_dir`: an explicit folder, else ``$GRACE_ST_DATA``, else
``../shared/data`` from the working directory). Files are read with :func:`grace_st.readers.read_rows`.

This module needs mteb (``pip install "grace-st[eval]"``); ``grace_st`` itself does not import it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from grace_st.readers import DATA_ENV, read_rows, resolve_data_path

EVAL_EXTRA = 'pip install "grace-st[eval]"'
try:
    import mteb
    from mteb.abstasks import AbsTask
except ImportError as error:  # pragma: no cover - the eval extra is installed in development
    raise ImportError(f"grace_st.evaluation.local_tasks needs mteb; install the eval extra: {EVAL_EXTRA}") from error

TASK_TYPES: tuple[str, ...] = ("STS", "PairClassification", "Classification", "Retrieval")
SPEC_SUFFIXES = (".yaml", ".yml", ".json")
_SPEC_KEYS = {"name", "type", "description", "reference", "data_dir", "splits", "main_score", "min_score", "max_score"}
_SPLIT_KEYS = {"path", "format", "header", "columns", "limit", "filter", "label_map"}
_REQUIRED_COLUMNS = {
    "STS": ("sentence1", "sentence2", "score"),
    "PairClassification": ("sentence1", "sentence2", "label"),
    "Classification": ("text", "label"),
    "Retrieval": ("query", "document"),
}
_DEFAULT_MAIN_SCORE = {
    "STS": "cosine_spearman",
    "PairClassification": "max_ap",
    "Classification": "accuracy",
    "Retrieval": "ndcg_at_10",
}


def bundled_task_specs() -> dict[str, Path]:
    """The task specs shipped with grace_st (package data ``grace_st/task_specs/*.yaml``), by file stem.

    Example:
        >>> sorted(bundled_task_specs())[:2]
        ['msrp_pairs', 'msrp_retrieval']
    """
    return local_task_specs(str(resources.files("grace_st") / "task_specs"))


def local_task_specs(folder: str | os.PathLike) -> dict[str, Path]:
    """Map each spec file in ``folder`` (``*.yaml``, ``*.yml``, ``*.json``) by its stem (empty if no such folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix in SPEC_SUFFIXES}


def _read_spec_file(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        spec = json.loads(text)
    else:
        try:
            import yaml
        except ImportError as error:  # pragma: no cover
            raise ImportError(f"Reading YAML task specs needs PyYAML; install the eval extra: {EVAL_EXTRA}") from error
        spec = yaml.safe_load(text)
    if not isinstance(spec, dict):
        raise ValueError(f"Task spec {path} must be a mapping, got {type(spec).__name__}.")
    return spec


def _check_spec(spec: dict[str, Any], path: Path) -> None:
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} in task spec {path}; known keys: {sorted(_SPEC_KEYS)}.")
    for key in ("name", "type", "splits"):
        if key not in spec:
            raise ValueError(f"Task spec {path} misses the required key {key!r}.")
    task_type = spec["type"]
    if task_type not in TASK_TYPES:
        close = difflib.get_close_matches(str(task_type), TASK_TYPES)
        raise ValueError(
            f"type={task_type!r} in {path} is not supported; choose one of {TASK_TYPES} (close: {close})."
        )
    splits = spec["splits"]
    if not isinstance(splits, dict) or not splits:
        raise ValueError(f"'splits' in {path} must map split names to file descriptions.")
    for split_name, split in splits.items():
        if not isinstance(split, dict):
            raise ValueError(f"Split {split_name!r} of {path} must be a mapping, got {split!r}.")
        unknown = sorted(set(split) - _SPLIT_KEYS)
        if unknown:
            raise ValueError(
                f"Unknown key(s) {unknown} in split {split_name!r} of {path}; known: {sorted(_SPLIT_KEYS)}."
            )
        missing = [c for c in _REQUIRED_COLUMNS[task_type] if c not in split.get("columns", {})]
        if missing or "path" not in split:
            raise ValueError(
                f"Split {split_name!r} of {path} needs 'path' and columns {list(_REQUIRED_COLUMNS[task_type])} for a "
                f"{task_type} task; missing: {missing or ['path']}."
            )
        if split.get("format", "tsv") not in ("tsv", "csv"):
            raise ValueError(f"format={split['format']!r} in {path} is not supported; choose 'tsv' or 'csv'.")
        limit = split.get("limit")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit={limit!r} in split {split_name!r} of {path} must be an integer >= 1.")
    if task_type == "Classification" and "train" not in splits:
        raise ValueError(f"Classification task spec {path} needs a 'train' split to fit the classifier on.")


def load_task_spec(path: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> AbsTask:
    """Build an mteb task from a local task spec (YAML or JSON).

    A spec names the task, its mteb type and, per split, a delimited file and which columns hold what::

        name: LocalSTS13Headlines
        type: STS                      # STS | PairClassification | Classification | Retrieval
        description: STS 2013 headlines, first 100 pairs.
        min_score: 0
        max_score: 5
        splits:
          test:
            path: sts2013/headlines.test.tsv     # relative to the data folder
            format: tsv                          # tsv (default) | csv
            header: false                        # default true
            columns: {score: 0, sentence1: 1, sentence2: 2}
            limit: 100

    Required columns: STS ``sentence1, sentence2, score``; PairClassification ``sentence1, sentence2, label`` (0/1);
    Classification ``text, label`` with a ``train`` split beside the evaluation split; Retrieval ``query, document``
    (each row a query and its relevant document; all documents of the split form the corpus). A split may
    ``filter`` rows on column values and map labels with ``label_map``. Columns are header names, or 0-based indices.

    Args:
        path: the spec file.
        data_dir: folder of relative data paths; wins over the spec's own ``data_dir`` (relative to the spec file),
            which wins over :func:`grace_st.readers.data_dir`.

    Returns:
        An mteb task whose data loads from the local files; its dataset revision is a hash of the spec and the data,
        so results of an edited spec or changed data are not reused.

    Raises:
        ValueError: unknown keys, an unknown task type, missing columns (each with the valid options).
    """
    path = Path(path)
    spec = _read_spec_file(path)
    _check_spec(spec, path)
    if data_dir is None and spec.get("data_dir"):
        data_dir = path.parent / spec["data_dir"]
    return _make_task(spec, path.name, data_dir)


def _split_file(split: dict[str, Any], data_dir: str | os.PathLike | None) -> Path:
    return resolve_data_path(split["path"], data_dir)


def _make_task(spec: dict[str, Any], spec_name: str, data_dir: str | os.PathLike | None) -> AbsTask:
    from mteb.abstasks import AbsTaskClassification, AbsTaskPairClassification, AbsTaskRetrieval, AbsTaskSTS

    task_type = spec["type"]
    eval_splits = [name for name in spec["splits"] if not (task_type == "Classification" and name == "train")]
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode())
    for split in spec["splits"].values():
        try:
            digest.update(_split_file(split, data_dir).read_bytes())
        except FileNotFoundError:
            pass  # reported with the folder it was looked up in when the data is loaded
    metadata = mteb.TaskMetadata(
        name=spec["name"],
        description=spec.get("description", f"Local {task_type} task from {spec_name}."),
        reference=spec.get("reference"),
        dataset={"path": f"local/{spec_name}", "revision": digest.hexdigest()[:12]},
        type=task_type,
        category="t2t",
        modalities=["text"],
        eval_splits=eval_splits,
        eval_langs=["eng-Latn"],
        main_score=spec.get("main_score", _DEFAULT_MAIN_SCORE[task_type]),
        domains=[],
        task_subtypes=[],
        annotations_creators="human-annotated",
        dialect=[],
        sample_creation="found",
        bibtex_citation="",
    )
    base = {
        "STS": AbsTaskSTS,
        "PairClassification": AbsTaskPairClassification,
        "Classification": AbsTaskClassification,
        "Retrieval": AbsTaskRetrieval,
    }[task_type]

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        self.dataset = _load_split_data(spec, spec_name, data_dir)
        self.data_loaded = True

    attributes: dict[str, Any] = {"metadata": metadata, "load_data": load_data, "__module__": __name__}
    if task_type == "STS":
        attributes.update(min_score=float(spec.get("min_score", 0)), max_score=float(spec.get("max_score", 5)))
    if task_type == "Classification":
        # Few local training rows: fewer repeats than mteb's default 10 keeps runs short, the estimate stays unbiased.
        attributes.update(n_experiments=3, samples_per_label=16)
    return type(spec["name"], (base,), attributes)()


def read_split_rows(split: dict[str, Any], data_dir: str | os.PathLike | None = None) -> list[dict[str, str]]:
    """The rows of one spec split as dicts keyed by the spec's column names (``filter`` and ``limit`` applied).

    Raises:
        FileNotFoundError: the data file is missing (the message names the folder and ``$GRACE_ST_DATA``).
        ValueError: a column that is not in the file (with close names), or a row too short for a column index.
    """
    path = _split_file(split, data_dir)
    table = read_rows(path, delimiter="," if split.get("format") == "csv" else "\t", header=split.get("header", True))
    names = table.header

    def index(column: Any) -> int:
        if isinstance(column, int) and not isinstance(column, bool):
            return column
        if names is None:
            raise ValueError(f"Column {column!r} of {path.name}: the file has no header, use a column index.")
        if column not in names:
            close = difflib.get_close_matches(str(column), names)
            raise ValueError(f"Column {column!r} is not in {path.name} (columns: {names}); close: {close}.")
        return names.index(column)

    picks = {key: index(column) for key, column in split["columns"].items()}
    wanted = {index(column): str(value) for column, value in (split.get("filter") or {}).items()}
    widest = max([*picks.values(), *wanted], default=0)
    limit = split.get("limit")
    rows: list[dict[str, str]] = []
    for number, cells in table.rows:
        if len(cells) <= widest:
            raise ValueError(f"{path}: line {number} has {len(cells)} fields; column index {widest} is used.")
        if any(cells[i] != value for i, value in wanted.items()):
            continue
        rows.append({key: cells[i] for key, i in picks.items()} | {"_line": str(number)})
        if limit is not None and len(rows) >= limit:
            break
    return rows


def _labels(rows: list[dict[str, str]], label_map: dict[str, Any] | None, path: Any) -> list[int]:
    labels = []
    for row in rows:
        label: Any = row["label"]
        if label_map:
            if label not in label_map:
                raise ValueError(
                    f"{path}: line {row['_line']}: label {label!r} is not in label_map (keys: {sorted(label_map)})."
                )
            label = label_map[label]
        try:
            labels.append(int(label))
        except (TypeError, ValueError):
            raise ValueError(f"{path}: line {row['_line']}: label {label!r} is not an integer.") from None
    return labels


def _load_split_data(spec: dict[str, Any], spec_name: str, data_dir: str | os.PathLike | None) -> Any:
    from datasets import Dataset, DatasetDict

    task_type = spec["type"]
    out: dict[str, Any] = {}
    for split_name, split in spec["splits"].items():
        rows = read_split_rows(split, data_dir)
        path = split["path"]
        pairs = {"sentence1": [r.get("sentence1") for r in rows], "sentence2": [r.get("sentence2") for r in rows]}
        if not rows:
            raise ValueError(f"Split {split_name!r} of {spec_name} has no rows after filtering.")
        if task_type == "STS":
            scores = []
            for row in rows:
                try:
                    scores.append(float(row["score"]))
                except ValueError:
                    raise ValueError(f"{path}: line {row['_line']}: score {row['score']!r} is not a number.") from None
            out[split_name] = Dataset.from_dict({**pairs, "score": scores})
        elif task_type == "PairClassification":
            # mteb's pair classification data: one row holding the lists of a subset.
            labels = _labels(rows, split.get("label_map"), path)
            out[split_name] = Dataset.from_list([{**pairs, "labels": labels}])
        elif task_type == "Classification":
            labels = _labels(rows, split.get("label_map"), path)
            out[split_name] = Dataset.from_dict({"text": [r["text"] for r in rows], "label": labels})
        else:
            out[split_name] = _retrieval_split(rows)
    if task_type == "Retrieval":
        return {"default": out}
    return DatasetDict(out)


def _retrieval_split(rows: list[dict[str, str]]) -> Any:
    from datasets import Dataset
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

    doc_ids: dict[str, str] = {}
    query_ids: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for row in rows:
        doc = doc_ids.setdefault(row["document"], f"d{len(doc_ids)}")
        query = query_ids.setdefault(row["query"], f"q{len(query_ids)}")
        qrels.setdefault(query, {})[doc] = 1
    return RetrievalSplitData(
        queries=Dataset.from_list([{"id": i, "text": t} for t, i in query_ids.items()]),
        corpus=Dataset.from_list([{"id": i, "text": t, "title": ""} for t, i in doc_ids.items()]),
        relevant_docs=qrels,
        top_ranked=None,
    )


def resolve_tasks(
    tasks: Sequence[str] = (),
    benchmark: str | None = None,
    local_tasks: Sequence[str] = (),
    spec_folder: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
) -> list[AbsTask]:
    """Turn mteb task names, a benchmark name and local task specs into task objects.

    Args:
        tasks: mteb task names (``"STS13"``...), looked up with ``mteb.get_task``.
        benchmark: an mteb benchmark name such as ``"MTEB(eng, v1)"``.
        local_tasks: spec files, or names of specs in ``spec_folder`` or of the bundled specs
            (:func:`bundled_task_specs`, e.g. ``"sts13_headlines"``).
        spec_folder: a further folder of specs to find by name (it wins over bundled specs of the same name).
        data_dir: data folder for the local specs (see :func:`load_task_spec`).

    Returns:
        The tasks, in the order given, without duplicates.

    Raises:
        ValueError: an unknown task, benchmark or spec name; the message has mteb's close matches or the known specs.
    """
    resolved: list[AbsTask] = []
    if benchmark:
        try:
            resolved.extend(mteb.get_benchmark(benchmark).tasks)
        except KeyError as error:
            raise ValueError(f"Unknown benchmark {benchmark!r}: {error.args[0]}") from None
    named = {**bundled_task_specs(), **(local_task_specs(spec_folder) if spec_folder else {})}
    for name in dict.fromkeys(tasks):
        try:
            resolved.append(mteb.get_task(name))
        except KeyError as error:
            raise ValueError(
                f"Unknown mteb task name {name!r} ({error.args[0]}). Local task specs go to --local-task "
                f"(known by name: {sorted(named)})."
            ) from None
    for entry in local_tasks:
        path = Path(entry)
        if not path.is_file():
            if entry not in named:
                close = difflib.get_close_matches(entry, list(named), n=3)
                raise ValueError(
                    f"Local task {entry!r} is neither a spec file nor a known spec; did you mean {close}? "
                    f"Known specs: {sorted(named)}."
                )
            path = named[entry]
        resolved.append(load_task_spec(path, data_dir=data_dir))
    seen: set[str] = set()
    unique = []
    for task in resolved:
        if task.metadata.name not in seen:
            seen.add(task.metadata.name)
            unique.append(task)
    return unique


__all__ = [
    "DATA_ENV",
    "TASK_TYPES",
    "bundled_task_specs",
    "load_task_spec",
    "local_task_specs",
    "read_split_rows",
    "resolve_tasks",
]
