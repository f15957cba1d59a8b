"""Evaluate GRACE models (and any SentenceTransformer baseline) with mteb, offline or on the real benchmark.

Pieces, smallest first:

- :func:`load_task_spec`: a small YAML/JSON file over local data (STS pairs, pair classification, classification,
  retrieval) becomes a real mteb task, so local runs go through mteb's own evaluators and results layout.
- :func:`resolve_tasks`: mteb task names, a benchmark name and local specs → task objects; unknown names fail with
  close matches.
- :class:`GraceEncoder`: mteb's encoder protocol around a SentenceTransformer. Texts repeated within a task are
  encoded (and their rationales generated) once; GRACE rationales are measured on the way.
- :class:`ModelSpec` / :func:`evaluate_model`: one row of a comparison (a GRACE folder, a Hub id, a raw backbone turned
  into GRACE with options such as ``rationale_mode="echo"``, or any SentenceTransformer); finished task results in the
  output folder are reused without loading the model.
- :func:`comparison_table`: markdown table over any number of evaluated rows (issue 7: no-rationale, echo, untrained
  GRACE, contrastive, trained GRACE), with rationale diagnostics (:class:`RationaleStats`).

This module needs mteb (``pip install "grace-st[eval]"``); ``grace_st`` itself does not import it.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import inspect
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from grace_st.hub import DIAGNOSTICS_FOLDER, GRACE_CITATION, folder_revision
from grace_st.diagnostics import copy_rate

EVAL_EXTRA = 'pip install "grace-st[eval]"'
try:
    import mteb
    from mteb.abstasks import AbsTask
    from mteb.models import ModelMeta
    from mteb.models.abs_encoder import AbsEncoder, get_prompt_name
except ImportError as error:  # pragma: no cover - the eval extra is installed in development
    raise ImportError(f"grace_st.evaluation needs mteb; install the eval extra: {EVAL_EXTRA}") from error

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

DATA_ENV = "GRACE_ST_DATA"
DEFAULT_BACKBONE_NAME = "default"
TASK_TYPES: tuple[str, ...] = ("STS", "PairClassification", "Classification", "Retrieval")


# ---------------------------------------- diagnostics
@dataclasses.dataclass
class RationaleStats:
    """Running totals of rationale diagnostics over the texts of one task.

    Attributes:
        texts: texts whose rationale was generated (each unique text once).
        tokens: rationale tokens in total (closing end-of-sequence tokens not counted).
        copied_tokens: rationale tokens inside spans copied from the input (:func:`grace_st.rewards.copy_rate`, the
            definition that training logs too).
        finished: rationales that ended with an end-of-sequence token before the length limit.
        seconds: wall time spent encoding these texts.
        examples: a few ``{"text", "rationale"}`` pairs for model cards and eyeballing.
    """

    texts: int = 0
    tokens: int = 0
    copied_tokens: float = 0.0
    finished: int = 0
    seconds: float = 0.0
    examples: list[dict[str, str]] = dataclasses.field(default_factory=list)

    max_examples = 3

    def add(self, text: str, rationale: str, rationale_ids: Sequence[int], text_ids: Sequence[int], finished: bool):
        self.texts += 1
        self.tokens += len(rationale_ids)
        self.copied_tokens += copy_rate(rationale_ids, text_ids) * len(rationale_ids)
        self.finished += int(finished)
        if len(self.examples) < self.max_examples:
            self.examples.append({"text": text, "rationale": rationale})

    def merge(self, other: RationaleStats) -> RationaleStats:
        return RationaleStats(
            texts=self.texts + other.texts,
            tokens=self.tokens + other.tokens,
            copied_tokens=self.copied_tokens + other.copied_tokens,
            finished=self.finished + other.finished,
            seconds=self.seconds + other.seconds,
            examples=(self.examples + other.examples)[: self.max_examples],
        )

    @property
    def copy_rate(self) -> float | None:
        return self.copied_tokens / self.tokens if self.tokens else None

    @property
    def mean_length(self) -> float | None:
        return self.tokens / self.texts if self.texts else None

    @property
    def finish_rate(self) -> float | None:
        return self.finished / self.texts if self.texts else None

    @property
    def seconds_per_text(self) -> float | None:
        return self.seconds / self.texts if self.texts else None

    def to_dict(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        fields.update(
            copy_rate=self.copy_rate,
            mean_length=self.mean_length,
            finish_rate=self.finish_rate,
            seconds_per_text=self.seconds_per_text,
        )
        return fields

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RationaleStats:
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


# ---------------------------------------- task specs
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


def default_data_dir(near: str | os.PathLike | None = None) -> Path:
    """Folder that relative data paths of local task specs are resolved against.

    ``$GRACE_ST_DATA`` if set; otherwise ``shared/data`` beside the project checkout that contains ``near`` (the
    nearest parent folder holding a ``pyproject.toml``), else beside the current working directory.
    """
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    start = Path(near).resolve() if near is not None else Path.cwd().resolve()
    for folder in [start, *start.parents]:
        if (folder / "pyproject.toml").is_file():
            return folder.parent / "shared" / "data"
    return Path.cwd().resolve().parent / "shared" / "data"


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


def _read_rows(split: dict[str, Any], data_dir: Path, spec_path: Path) -> list[dict[str, str]]:
    """Read one split's delimited file into dicts keyed by the spec's column names (limit and filter applied)."""
    import csv

    path = Path(split["path"])
    if not path.is_absolute():
        path = data_dir / path
    if not path.is_file():
        raise FileNotFoundError(
            f"Data file {path} of task spec {spec_path} does not exist. Relative paths are resolved against "
            f"{data_dir} (set ${DATA_ENV} or the spec's data_dir to point elsewhere)."
        )
    fmt = split.get("format", "tsv")
    if fmt not in ("tsv", "csv"):
        raise ValueError(f"format={fmt!r} in {spec_path} is not supported; choose 'tsv' or 'csv'.")
    header = bool(split.get("header", True))
    columns: dict[str, Any] = split["columns"]
    filters: dict[str, Any] = split.get("filter") or {}
    limit = split.get("limit")
    rows: list[dict[str, str]] = []
    # utf-8-sig drops a byte-order mark (MSRP starts with one); QUOTE_NONE keeps quotes inside sentences as text.
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t" if fmt == "tsv" else ",", quoting=csv.QUOTE_NONE)
        names = next(reader) if header else None

        def index(column: Any) -> int:
            if isinstance(column, int):
                return column
            if names is None:
                raise ValueError(f"Column {column!r} in {spec_path}: the file has no header, use a column index.")
            if column not in names:
                close = difflib.get_close_matches(str(column), names)
                raise ValueError(f"Column {column!r} is not in {path.name} (columns: {names}); close: {close}.")
            return names.index(column)

        picks = {key: index(column) for key, column in columns.items()}
        wanted = {index(column): str(value) for column, value in filters.items()}
        for line in reader:
            if not line or all(not cell.strip() for cell in line):
                continue
            if any(line[i].strip() != value for i, value in wanted.items()):
                continue
            rows.append({key: line[i].strip() for key, i in picks.items()})
            if limit is not None and len(rows) >= int(limit):
                break
    return rows


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
            path: sts2013/headlines.test.tsv     # relative to data_dir (default: ../shared/data)
            format: tsv
            header: false
            columns: {score: 0, sentence1: 1, sentence2: 2}
            limit: 100

    Required columns: STS ``sentence1, sentence2, score``; PairClassification ``sentence1, sentence2, label`` (0/1);
    Classification ``text, label`` with a ``train`` split beside the evaluation split; Retrieval ``query, document``
    (each row a query and its relevant document; all documents of the split form the corpus). A split may
    ``filter`` rows on column values and map labels with ``label_map``.

    Args:
        path: the spec file.
        data_dir: folder for relative data paths; overrides the spec's ``data_dir`` and :func:`default_data_dir`.

    Returns:
        An mteb task object whose data loads from the local files; the dataset revision is a hash of the spec and the
        data, so results of an edited spec are not reused.

    Raises:
        ValueError: unknown keys, an unknown task type, missing columns (each with the valid options).
        FileNotFoundError: a data file is missing (the message names the folder it was looked up in).
    """
    path = Path(path)
    spec = _read_spec_file(path)
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
    splits: dict[str, dict[str, Any]] = spec["splits"]
    if not isinstance(splits, dict) or not splits:
        raise ValueError(f"'splits' in {path} must map split names to file descriptions.")
    for split_name, split in splits.items():
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
    if task_type == "Classification" and "train" not in splits:
        raise ValueError(f"Classification task spec {path} needs a 'train' split to fit the classifier on.")
    if data_dir is None:
        data_dir = (path.parent / spec["data_dir"]) if spec.get("data_dir") else default_data_dir(path.parent)
    return _make_task(spec, path, Path(data_dir))


def _make_task(spec: dict[str, Any], spec_path: Path, data_dir: Path) -> AbsTask:
    from mteb.abstasks import AbsTaskClassification, AbsTaskPairClassification, AbsTaskRetrieval, AbsTaskSTS
    from mteb.abstasks.task_metadata import TaskMetadata

    task_type = spec["type"]
    eval_splits = [name for name in spec["splits"] if not (task_type == "Classification" and name == "train")]
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode())
    for split in spec["splits"].values():
        file = Path(split["path"]) if Path(split["path"]).is_absolute() else data_dir / split["path"]
        if file.is_file():
            digest.update(file.read_bytes())
    metadata = TaskMetadata(
        name=spec["name"],
        description=spec.get("description", f"Local {task_type} task from {spec_path.name}."),
        reference=spec.get("reference"),
        dataset={"path": f"local/{spec_path.name}", "revision": digest.hexdigest()[:12]},
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
        self.dataset = _load_split_data(spec, spec_path, data_dir)
        self.data_loaded = True

    attributes: dict[str, Any] = {"metadata": metadata, "load_data": load_data, "__module__": __name__}
    if task_type == "STS":
        attributes.update(min_score=float(spec.get("min_score", 0)), max_score=float(spec.get("max_score", 5)))
    if task_type == "Classification":
        # Few local training rows: fewer repeats than mteb's default 10 keeps runs short, the estimate stays unbiased.
        attributes.update(n_experiments=3, samples_per_label=16)
    cls = type(spec["name"], (base,), attributes)
    return cls()


def _load_split_data(spec: dict[str, Any], spec_path: Path, data_dir: Path) -> Any:
    from datasets import Dataset, DatasetDict

    task_type = spec["type"]
    out: dict[str, Any] = {}
    for split_name, split in spec["splits"].items():
        rows = _read_rows(split, data_dir, spec_path)
        if not rows:
            raise ValueError(f"Split {split_name!r} of {spec_path} has no rows after filtering.")
        label_map = split.get("label_map")
        if task_type == "STS":
            out[split_name] = Dataset.from_dict(
                {
                    "sentence1": [r["sentence1"] for r in rows],
                    "sentence2": [r["sentence2"] for r in rows],
                    "score": [float(r["score"]) for r in rows],
                }
            )
        elif task_type in ("PairClassification", "Classification"):
            labels = [r["label"] for r in rows]
            if label_map:
                labels = [label_map[label] for label in labels]
            labels = [int(label) for label in labels]
            if task_type == "PairClassification":
                # mteb's pair classification data: one row holding the lists of a subset.
                out[split_name] = Dataset.from_list(
                    [
                        {
                            "sentence1": [r["sentence1"] for r in rows],
                            "sentence2": [r["sentence2"] for r in rows],
                            "labels": labels,
                        }
                    ]
                )
            else:
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


def local_task_specs(folder: str | os.PathLike) -> dict[str, Path]:
    """Map each spec file in ``folder`` (``*.yaml``, ``*.yml``, ``*.json``) by its stem."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix in (".yaml", ".yml", ".json")}


def resolve_tasks(
    tasks: Sequence[str] = (),
    benchmark: str | None = None,
    local_tasks: Sequence[str] = (),
    spec_folder: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
) -> list[AbsTask]:
    """Turn mteb task names, a benchmark name and local task specs into task objects.

    Args:
        tasks: mteb task names (``"STS13"``...).
        benchmark: an mteb benchmark name such as ``"MTEB(eng, v1)"``.
        local_tasks: spec files, or stems of spec files in ``spec_folder``.
        spec_folder: folder with the shipped specs (``eval/tasks``).
        data_dir: data folder for the local specs (see :func:`load_task_spec`).

    Returns:
        The tasks, in the order given, without duplicates.

    Raises:
        ValueError: an unknown task, benchmark or spec name; the message lists the closest known names.
    """
    from mteb.get_tasks import _TASKS_REGISTRY

    resolved: list[AbsTask] = []
    if benchmark:
        try:
            resolved.extend(mteb.get_benchmark(benchmark).tasks)
        except KeyError as error:
            raise ValueError(f"Unknown benchmark {benchmark!r}: {error.args[0]}") from None
    unknown = [name for name in tasks if name not in _TASKS_REGISTRY]
    if unknown:
        hints = {name: difflib.get_close_matches(name, _TASKS_REGISTRY, n=3) for name in unknown}
        shipped = list(local_task_specs(spec_folder)) if spec_folder else []
        hint_text = "; ".join(f"{name!r}: did you mean {close or 'nothing close'}" for name, close in hints.items())
        raise ValueError(
            f"Unknown mteb task name(s) {unknown} ({hint_text}). Local task specs go to --local-task"
            + (f" (shipped: {shipped})." if shipped else ".")
        )
    if tasks:
        resolved.extend(mteb.get_tasks(tasks=list(tasks)))
    shipped_specs = local_task_specs(spec_folder) if spec_folder else {}
    for entry in local_tasks:
        path = Path(entry)
        if not path.is_file():
            if entry not in shipped_specs:
                close = difflib.get_close_matches(entry, list(shipped_specs), n=3)
                raise ValueError(
                    f"Local task {entry!r} is neither a spec file nor a shipped spec; did you mean {close}? "
                    f"Shipped specs: {sorted(shipped_specs)}."
                )
            path = shipped_specs[entry]
        resolved.append(load_task_spec(path, data_dir=data_dir))
    seen: set[str] = set()
    unique = []
    for task in resolved:
        if task.metadata.name not in seen:
            seen.add(task.metadata.name)
            unique.append(task)
    return unique


# ---------------------------------------- models
@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model of a comparison: what to load and which GRACE options to override.

    Attributes:
        name_or_path: a GRACE folder, a SentenceTransformer folder or Hub id, a causal LM folder or Hub id (made into
            GRACE with :func:`grace_st.from_backbone`), or ``"default"`` for :func:`grace_st.default_backbone`.
        label: row label in tables; defaults to the model name plus its overrides.
        options: GRACE :class:`grace_st.Transformer` options to override (``rationale_mode``, ``max_new_tokens``...).
        revision: Hub revision for Hub ids.
    """

    name_or_path: str
    label: str | None = None
    options: tuple[tuple[str, Any], ...] = ()
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """Parse ``[LABEL=]NAME_OR_PATH[@KEY=VALUE[,KEY=VALUE...]]``.

        Example:
            >>> spec = ModelSpec.parse("echo=default@rationale_mode=echo,max_new_tokens=32")
            >>> spec.label, spec.name_or_path, spec.options
            ('echo', 'default', (('max_new_tokens', 32), ('rationale_mode', 'echo')))
        """
        head, _, tail = text.partition("@")
        label, _, target = head.rpartition("=")
        options = {}
        for item in filter(None, tail.split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"Option {item!r} in model spec {text!r} is not KEY=VALUE.")
            options[key.strip()] = _parse_value(value.strip())
        return cls(target, label or None, tuple(sorted(options.items())))

    def display_name(self, meta: ModelMeta | None = None) -> str:
        if self.label:
            return self.label
        base = meta.name if meta is not None and meta.name else self.name_or_path
        if self.options:
            return f"{base} ({', '.join(f'{k}={v}' for k, v in self.options)})"
        return base


def _parse_value(value: str) -> Any:
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _transformer_option_names() -> list[str]:
    from grace_st.modeling import Transformer

    return list(Transformer.config_keys)


def _resolve_folder(spec: ModelSpec) -> tuple[Path, str | None]:
    """Local folder of the model and its Hub commit (None for local folders)."""
    if spec.name_or_path == DEFAULT_BACKBONE_NAME:
        from grace_st.backbone import default_backbone

        return Path(default_backbone()), None
    path = Path(spec.name_or_path).expanduser()
    if path.is_dir():
        return path.resolve(), None
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(spec.name_or_path, revision=spec.revision))
    return folder, folder.name


def _folder_kind(folder: Path) -> str:
    """``"grace"``, ``"sentence-transformers"`` or ``"backbone"`` (a plain causal LM)."""
    modules = folder / "modules.json"
    if modules.is_file():
        types = [entry.get("type", "") for entry in json.loads(modules.read_text())]
        is_grace = any(t.startswith("grace_st.") or t.endswith(".RationalePooling") for t in types)
        return "grace" if is_grace else "sentence-transformers"
    if (folder / "config.json").is_file():
        return "backbone"
    raise ValueError(
        f"{folder} holds neither a SentenceTransformer (modules.json) nor a transformers model (config.json)."
    )


def _count_parameters(folder: Path) -> tuple[int | None, int | None]:
    """(parameters, bytes) from the safetensors headers, without loading the weights."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*/*.safetensors"))
    if not files:
        return None, None
    total, size = 0, 0
    for file in files:
        with safe_open(str(file), framework="numpy") as handle:
            for key in handle.keys():
                total += int(np.prod(handle.get_slice(key).get_shape()))
        size += file.stat().st_size
    return total, size


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def build_model_meta(spec: ModelSpec, folder: Path, hub_commit: str | None = None, **overrides: Any) -> ModelMeta:
    """mteb ``ModelMeta`` of a model folder, from its files only (the model is not loaded).

    Name: the Hub id, ``grace_model_name`` in ``grace_training.json`` if the folder has one, else ``local/<folder>``;
    backbones turned into GRACE keep the backbone's name and record the GRACE options as experiment settings.
    Revision: the Hub commit, else :func:`folder_revision`. Overridden GRACE options become mteb
    ``experiment_kwargs``, so each variant (echo, none, another length) gets its own results folder.

    Args:
        spec: the model spec.
        folder: its local folder (see :func:`_resolve_folder`).
        hub_commit: the commit when loaded from the Hub.
        **overrides: ``ModelMeta`` fields to set (``name``, ``license``, ``training_datasets``...).
    """
    kind = _folder_kind(folder)
    config = _read_json(folder / "config.json")
    st_config = _read_json(folder / "config_sentence_transformers.json")
    grace_config = _read_json(folder / "grace_config.json")
    training = _read_json(folder / "grace_training.json")
    n_parameters, n_bytes = _count_parameters(folder)
    options = dict(spec.options)
    if options and kind == "sentence-transformers":
        raise ValueError(
            f"GRACE options {sorted(options)} given for {spec.name_or_path!r}, which is not a GRACE model."
        )
    unknown = sorted(set(options) - set(_transformer_option_names()))
    if unknown:
        raise ValueError(f"Unknown GRACE option(s) {unknown}; valid: {_transformer_option_names()}.")

    backbone_name = config.get("_name_or_path") or None
    if hub_commit is not None:
        name = spec.name_or_path
    elif kind == "backbone":
        name = backbone_name if backbone_name and "/" in backbone_name else f"local/{folder.name}"
    else:
        name = training.get("grace_model_name") or f"local/{folder.name}"
    experiment: dict[str, Any] = dict(options)
    if kind == "backbone":
        # A backbone is not a GRACE model until options are chosen: every GRACE option that shapes its embeddings
        # is part of the experiment name (defaults included), so a run with other defaults never reuses these results.
        from grace_st.modeling import Transformer

        defaults = {
            key: value.default
            for key, value in inspect.signature(Transformer.__init__).parameters.items()
            if key in Transformer.config_keys
        }
        experiment = {"grace": True, **{k: defaults[k] for k in ("rationale_mode", "max_new_tokens")}, **options}
        if "system_prompt" in experiment:
            experiment["system_prompt"] = hashlib.sha256(experiment["system_prompt"].encode()).hexdigest()[:8]
    elif "system_prompt" in experiment:
        experiment["system_prompt"] = hashlib.sha256(experiment["system_prompt"].encode()).hexdigest()[:8]

    is_grace = kind != "sentence-transformers"
    embed_dim = config.get("hidden_size") if is_grace else None
    if not is_grace:
        pooling = _read_json(folder / "1_Pooling" / "config.json")
        embed_dim = pooling.get("word_embedding_dimension") or config.get("hidden_size")
    prompts = {k: v for k, v in (st_config.get("prompts") or {}).items() if v}
    fields: dict[str, Any] = dict(
        loader=load_grace_encoder if is_grace else None,
        loader_kwargs={"model_spec": spec} if is_grace else {},
        name=name,
        revision=hub_commit or folder_revision(folder),
        release_date=None,
        languages=["eng-Latn"],
        n_parameters=n_parameters,
        memory_usage_mb=round(n_bytes / 2**20, 1) if n_bytes else None,
        max_tokens=grace_config.get("max_input_tokens", 1024) if is_grace else None,
        embed_dim=embed_dim,
        license=training.get("license"),
        open_weights=True,
        public_training_code=training.get("public_training_code"),
        public_training_data=training.get("public_training_data"),
        framework=["Sentence Transformers", "PyTorch"],
        reference=f"https://huggingface.co/{name}" if hub_commit else None,
        similarity_fn_name=st_config.get("similarity_fn_name") or "cosine",
        use_instructions=bool(prompts),
        training_datasets=set(training["training_datasets"]) if "training_datasets" in training else None,
        adapted_from=training.get("base_model") or (backbone_name if kind == "backbone" else None),
        citation=GRACE_CITATION if is_grace else None,
        experiment_kwargs=experiment or None,
    )
    if kind == "backbone":
        fields["training_datasets"] = set()  # an untrained GRACE model: nothing beyond the backbone's own training
    fields.update(overrides)
    return ModelMeta(**fields)


def load_model(spec: ModelSpec, device: str | None = None) -> SentenceTransformer:
    """Load the SentenceTransformer of a :class:`ModelSpec`, with its GRACE options applied.

    Args:
        spec: what to load.
        device: ``"cpu"``, ``"cuda"``...; None lets sentence-transformers choose.

    Returns:
        The model (GRACE folders load with ``trust_remote_code=True``: their module classes live outside
        sentence-transformers).
    """
    from sentence_transformers import SentenceTransformer

    from grace_st.factory import from_backbone

    folder, _ = _resolve_folder(spec)
    kind = _folder_kind(folder)
    options = dict(spec.options)
    if kind == "backbone":
        return from_backbone(str(folder), device=device, **options)
    model = SentenceTransformer(str(folder), device=device, trust_remote_code=kind == "grace")
    if options:
        first = model[0]
        valid = list(getattr(first, "config_keys", []))
        unknown = sorted(set(options) - set(valid))
        if kind != "grace" or unknown:
            raise ValueError(f"Options {sorted(options)} cannot be applied to {spec.name_or_path!r}; valid: {valid}.")
        # Rebuild the module so its own validation runs on the new settings.
        config = {**first.get_config_dict(), **options}
        model._modules["0"] = type(first)(first.model, first.tokenizer, **config)
        model._modules["0"].on_model_ready(model)
    return model


def load_grace_encoder(model_name: str, revision: str | None = None, model_spec: ModelSpec | None = None, **kwargs):
    """mteb loader (``ModelMeta.loader``): build a :class:`GraceEncoder` for a model name or spec."""
    spec = model_spec or ModelSpec(model_name, revision=revision)
    folder, commit = _resolve_folder(spec)
    return GraceEncoder(load_model(spec, device=kwargs.get("device")), build_model_meta(spec, folder, commit))


def _is_grace_model(model: SentenceTransformer) -> bool:
    first = model[0]
    return all(hasattr(first, attr) for attr in ("generate_rationales", "rationale_mode", "embed"))


class GraceEncoder(AbsEncoder):
    """mteb encoder around a SentenceTransformer (GRACE or any other), with per-task text deduplication.

    Within one task every distinct ``(prompt, text)`` is encoded once, so a sentence that occurs in many pairs
    gets one rationale. For GRACE models the rationales are measured (copy rate, length, finish rate, seconds per
    text) into :attr:`stats`, keyed by task name.

    Args:
        model: the SentenceTransformer.
        meta: its mteb ``ModelMeta`` (see :func:`build_model_meta`).
        chunk_size: texts passed to one ``encode`` call; bounds the memory of per-token outputs. Defaults to 256.
    """

    def __init__(self, model: SentenceTransformer, meta: ModelMeta, chunk_size: int = 256) -> None:
        self.model = model
        self.mteb_model_meta = meta
        self.model_prompts = {k: v for k, v in (model.prompts or {}).items() if v} or None
        self.chunk_size = chunk_size
        self.is_grace = _is_grace_model(model)
        self.stats: dict[str, RationaleStats] = {}
        self._task: str | None = None
        self._cache: dict[tuple[str, str], np.ndarray] = {}

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs) -> np.ndarray:
        if task_metadata.name != self._task:
            self._task, self._cache = task_metadata.name, {}
        prompt_name = get_prompt_name(self.model_prompts, task_metadata, prompt_type)
        prompt = (self.model_prompts or {}).get(prompt_name, "") if prompt_name else ""
        texts = [text for batch in inputs for text in batch["text"]]
        missing = list(dict.fromkeys(t for t in texts if (prompt, t) not in self._cache))
        batch_size = int(kwargs.get("batch_size", 32))
        stats = self.stats.setdefault(task_metadata.name, RationaleStats())
        for start in range(0, len(missing), self.chunk_size):
            chunk = missing[start : start + self.chunk_size]
            tick = time.perf_counter()
            embeddings = self._encode_chunk(chunk, prompt, batch_size, stats)
            stats.seconds += time.perf_counter() - tick
            for text, embedding in zip(chunk, embeddings, strict=True):
                self._cache[(prompt, text)] = embedding
        if not texts:
            return np.empty((0, self.model.get_embedding_dimension() or 0), dtype=np.float32)
        return np.stack([self._cache[(prompt, t)] for t in texts])

    def _encode_chunk(self, texts: list[str], prompt: str, batch_size: int, stats: RationaleStats) -> np.ndarray:
        if not self.is_grace:
            return self.model.encode(
                texts, prompt=prompt or None, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
            ).astype(np.float32)
        outputs = self.model.encode(
            texts, prompt=prompt or None, batch_size=batch_size, output_value=None, show_progress_bar=False
        )
        module = self.model[0]
        text_ids = module.tokenizer(texts, add_special_tokens=False)["input_ids"]
        eos = set(module.eos_token_ids)
        rows = []
        for text, ids, output in zip(texts, text_ids, outputs, strict=True):
            rows.append(output["sentence_embedding"].float().cpu().numpy())
            if module.rationale_mode == "none":
                stats.add(text, "", [], ids, False)
                continue
            mask = output["rationale_mask"].bool()
            rationale = [int(t) for t in output["rationale_ids"][mask].tolist() if int(t) not in eos]
            stats.add(text, module.decode_rationale(output), rationale, ids, bool(output["rationale_finished"]))
        return np.stack(rows)


# ---------------------------------------- running
@dataclasses.dataclass
class ModelEvaluation:
    """Results of one model on some tasks: one row of a comparison table.

    Attributes:
        label: row label.
        meta: the model's mteb ``ModelMeta``.
        results: mteb ``TaskResult`` per task name.
        stats: rationale diagnostics per task name (GRACE models only).
        reused: task names whose results came from the output folder instead of being computed.
        seconds: wall time of this evaluation.
    """

    label: str
    meta: Any
    results: dict[str, Any]
    stats: dict[str, RationaleStats]
    reused: list[str]
    seconds: float = 0.0

    def score(self, task: str) -> float | None:
        """Main score of ``task`` (mean over evaluated splits and subsets), or None if not evaluated."""
        result = self.results.get(task)
        return float(result.get_score()) if result is not None else None

    def total_stats(self) -> RationaleStats | None:
        if not self.stats:
            return None
        total = RationaleStats()
        for stats in self.stats.values():
            total = total.merge(stats)
        return total


def _diagnostics_path(cache: Any, task_name: str, meta: ModelMeta) -> Path:
    result_path = cache.get_task_result_path(task_name=task_name, model_name=meta)
    return result_path.parent / DIAGNOSTICS_FOLDER / f"{task_name}.json"


def evaluate_model(
    spec: ModelSpec | str,
    tasks: Sequence[AbsTask],
    output_dir: str | os.PathLike,
    batch_size: int = 16,
    device: str | None = None,
    overwrite: bool = False,
    meta_overrides: dict[str, Any] | None = None,
) -> ModelEvaluation:
    """Evaluate one model on tasks and write mteb's standard results layout under ``output_dir``.

    Results go to ``output_dir/results/<model name>/<revision>/[experiments/<settings>/]<task>.json`` (with
    ``model_meta.json``), rationale diagnostics beside them in ``grace_diagnostics/<task>.json``. A task whose
    finished results are already there (same dataset revision) is reused; when every task is reused the model is not
    even loaded.

    Args:
        spec: the model (a :class:`ModelSpec` or its string form, see :meth:`ModelSpec.parse`).
        tasks: mteb tasks (see :func:`resolve_tasks`).
        output_dir: results root (an mteb ``ResultCache`` folder).
        batch_size: encode batch size. Defaults to 16.
        device: torch device; None lets sentence-transformers choose.
        overwrite: recompute even when results exist. Defaults to False.
        meta_overrides: ``ModelMeta`` fields to set (e.g. ``{"name": "org/model"}``).

    Returns:
        A :class:`ModelEvaluation`.
    """
    from mteb.results import TaskResult

    tick = time.perf_counter()
    spec = ModelSpec.parse(spec) if isinstance(spec, str) else spec
    folder, commit = _resolve_folder(spec)
    meta = build_model_meta(spec, folder, commit, **(meta_overrides or {}))
    cache = mteb.ResultCache(cache_path=output_dir)
    results: dict[str, TaskResult] = {}
    stats: dict[str, RationaleStats] = {}
    pending = []
    for task in tasks:
        name = task.metadata.name
        existing = None if overwrite else cache.load_task_result(name, meta)
        if existing is not None and existing.dataset_revision == task.metadata.revision:
            missing = existing.get_missing_evaluations(task)
            if not missing:
                results[name] = existing
                sidecar = _diagnostics_path(cache, name, meta)
                saved = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
                if saved.get("stats"):
                    stats[name] = RationaleStats.from_dict(saved["stats"])
                continue
        pending.append(task)
    reused = [name for name in results]
    if pending:
        logger.info("Evaluating %s on %s", meta.name, [t.metadata.name for t in pending])
        encoder = GraceEncoder(load_model(spec, device=device), meta)
        run = mteb.evaluate(
            encoder,
            pending,
            cache=cache,
            overwrite_strategy="always",
            encode_kwargs={"batch_size": batch_size, "show_progress_bar": False},
            show_progress_bar=False,
            co2_tracker=False,
        )
        for result in run.task_results:
            results[result.task_name] = result
        for task in pending:
            name = task.metadata.name
            task_stats = encoder.stats.get(name) if encoder.is_grace else None
            if task_stats is not None:
                stats[name] = task_stats
            # Beside mteb's result: the task facts a model card needs (local tasks are not in mteb's registry) and
            # the rationale diagnostics.
            sidecar = {
                "task": {
                    "type": task.metadata.type,
                    "dataset": task.metadata.dataset["path"],
                    "main_score": task.metadata.main_score,
                    "description": task.metadata.description,
                },
                "stats": task_stats.to_dict() if task_stats is not None else None,
            }
            path = _diagnostics_path(cache, name, meta)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    ordered = {t.metadata.name: results[t.metadata.name] for t in tasks if t.metadata.name in results}
    return ModelEvaluation(
        label=spec.display_name(meta),
        meta=meta,
        results=ordered,
        stats=stats,
        reused=reused,
        seconds=time.perf_counter() - tick,
    )


def standard_rows(
    backbone: str = DEFAULT_BACKBONE_NAME,
    max_new_tokens: int = 32,
    trained: str | None = None,
    contrastive: str | None = None,
    **options: Any,
) -> list[ModelSpec]:
    """The comparison rows every GRACE table shows (issue 7), as model specs.

    Args:
        backbone: the backbone (folder, Hub id or ``"default"``).
        max_new_tokens: rationale length limit of the untrained GRACE row (and of ``trained`` if given).
        trained: folder of the trained GRACE model, if any.
        contrastive: folder of the contrastively fine-tuned (+CL) model, if any.
        **options: further GRACE options for the generating rows (``system_prompt``...).

    Returns:
        no-rationale, echo, untrained GRACE, then +CL and trained GRACE when given.
    """
    shared = tuple(sorted(options.items()))
    generate = tuple(sorted({**options, "max_new_tokens": max_new_tokens}.items()))
    rows = [
        ModelSpec(backbone, "no rationale", tuple(sorted({**options, "rationale_mode": "none"}.items()))),
        ModelSpec(backbone, "echo", tuple(sorted({**options, "rationale_mode": "echo"}.items()))),
        ModelSpec(
            backbone, "untrained GRACE", tuple(sorted({**dict(generate), "rationale_mode": "generate"}.items()))
        ),
    ]
    if contrastive:
        rows.append(ModelSpec(contrastive, "contrastive (+CL)", shared if _is_grace_path(contrastive) else ()))
    if trained:
        rows.append(ModelSpec(trained, "trained GRACE", generate))
    return rows


def _is_grace_path(path: str) -> bool:
    folder = Path(path)
    return folder.is_dir() and _folder_kind(folder) != "sentence-transformers"


# ---------------------------------------- tables
def _fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "–" if value is None else f"{value * scale:.{digits}f}"


def comparison_table(rows: Sequence[ModelEvaluation], tasks: Iterable[str] | None = None) -> str:
    """Markdown table: one row per model, main scores (×100) per task, their average and rationale diagnostics.

    Args:
        rows: evaluated models, in display order; add rows by evaluating more :class:`ModelSpec` s.
        tasks: task columns; defaults to every task of any row, in first-seen order.

    Returns:
        The table; "–" marks a task a row was not evaluated on and diagnostics of models without rationales.
    """
    if tasks is None:
        tasks = list(dict.fromkeys(name for row in rows for name in row.results))
    tasks = list(tasks)
    header = ["model", *tasks, "avg", "copy rate", "mean length", "finish rate", "s/text"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        scores = [row.score(task) for task in tasks]
        known = [s for s in scores if s is not None]
        average = sum(known) / len(known) if known and len(known) == len(scores) else None
        total = row.total_stats()
        generated = total is not None and total.tokens > 0
        cells = [
            row.label,
            *(_fmt(s, 100) for s in scores),
            _fmt(average, 100),
            _fmt(total.copy_rate if generated else None),
            _fmt(total.mean_length if generated else None, digits=1),
            _fmt(total.finish_rate if generated else None),
            _fmt(total.seconds_per_text if total else None, digits=3),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
