"""Training data for GRACE: (query, positive, negative) triplets or plain texts, from files, the Hub or SICK.

Every loader returns a ``datasets.Dataset``. A row with a missing or empty field raises ``ValueError`` naming the row
(and the file line where there is one), unless ``skip_invalid=True``: then such rows are dropped and their count is
logged. :func:`to_grpo_dataset` turns either kind into the columns the GRACE trainer reads (``prompt`` = the positive
document that gets G rollouts, ``query``, ``negative``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from grace_st.readers import RECORD_FILE_SUFFIXES, read_pairs, read_records, read_trecqa

logger = logging.getLogger(__name__)

# Alternative column names used by public triplet sets (E5/BGE/sentence-transformers styles).
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "query": ("query", "anchor", "question", "sentence1"),
    "positive": ("positive", "pos", "document", "positive_document", "sentence2"),
    "negative": ("negative", "neg", "hard_negative", "negative_document"),
    "text": ("text", "sentence", "content"),
}
# A GRPO prompt of the GRACE trainer is a record of these keys, packed from these dataset columns.
_RECORD_KEYS = ("text", "query", "negative")
_RECORD_COLUMNS = ("prompt", "query", "negative")


def _require_datasets():
    try:
        import datasets
    except ImportError as error:  # pragma: no cover - depends on the installed extras
        raise ImportError('GRACE training data needs `datasets`: pip install "grace-st[train]"') from error
    return datasets


def demo_data_path(split: Literal["train", "dev"] = "train") -> str:
    """Path of the bundled demo triplets (``grace_st/data/demo_{split}.jsonl``), written for this project."""
    if split not in ("train", "dev"):
        raise ValueError(f"split={split!r} is not available; choose 'train' or 'dev'.")
    return str(resources.files("grace_st") / "data" / f"demo_{split}.jsonl")


def _read_records(source: str, split: str) -> Iterator[tuple[str, Any, str | None]]:
    """Yield ``(row label, record, problem)`` from a file (:func:`grace_st.readers.read_records`) or a Hub dataset id.

    ``problem`` names what makes a row unusable before its fields are looked at; :func:`_collect` raises or skips it
    like a row with a missing field.
    """
    path = Path(source)
    if path.suffix.lower() in RECORD_FILE_SUFFIXES or path.exists():
        yield from read_records(source, name="Training data file")
        return
    datasets = _require_datasets()
    dataset = datasets.load_dataset(source, split=split)
    for index, record in enumerate(dataset):
        yield f"{source} [{split}]: row {index}", record, None


def _field(record: dict[str, Any], name: str, default_name: str) -> Any:
    if name in record:
        value = record[name]
    elif name == default_name:
        value = next((record[alias] for alias in FIELD_ALIASES[default_name] if alias in record), None)
    else:
        value = None
    if isinstance(value, (list, tuple)):  # E5/BGE style: lists of positives/negatives, the first one is used
        value = value[0] if value else None
    return value


def _collect(
    rows: Iterable[tuple[str, Any, str | None]],
    fields: dict[str, str],
    optional: frozenset[str],
    skip_invalid: bool,
    max_rows: int | None,
    source: str,
) -> dict[str, list[str]]:
    columns: dict[str, list[str]] = {key: [] for key in fields}
    skipped = 0
    for label, record, problem in rows:
        if max_rows is not None and len(next(iter(columns.values()))) >= max_rows:
            break
        values = {}
        for key, name in [] if problem else fields.items():
            value = _field(record, name, key)
            if value is None and key in optional:
                value = ""
            elif value is None:
                problem = f"field {name!r} is missing"
            elif not isinstance(value, str):
                problem = f"field {name!r} is {value!r}, not a string"
            elif not value.strip():
                problem = f"field {name!r} is empty"
            if problem:
                break
            values[key] = value
        if problem:
            if not skip_invalid:
                raise ValueError(f"{label}: {problem}. Fix the row or pass skip_invalid=True to drop such rows.")
            skipped += 1
            continue
        for key, value in values.items():
            columns[key].append(value)
    if skipped:
        logger.warning("Skipped %d invalid row(s) of %s (missing or empty fields, or not a record).", skipped, source)
    if not next(iter(columns.values())):
        raise ValueError(f"{source} yielded no usable rows.")
    return columns


def load_triplets(
    source: str,
    *,
    split: str = "train",
    query_field: str = "query",
    positive_field: str = "positive",
    negative_field: str = "negative",
    require_negative: bool = True,
    skip_invalid: bool = False,
    max_rows: int | None = None,
):
    """Load (query, positive, negative) rows from a JSONL/JSON/CSV/TSV file or a Hub dataset id.

    Args:
        source: file path or Hub dataset id (E5 public-portion style rows).
        split: split of a Hub dataset. Defaults to ``"train"``.
        query_field, positive_field, negative_field: column names; with the default names, common aliases
            (``anchor``, ``pos``, ``neg``...) are accepted, and list values use their first element.
        require_negative: a missing negative is an error (else it becomes ``""``: no hard negative). Defaults to True.
        skip_invalid: drop rows with a missing or empty field (count logged) instead of raising. Defaults to False.
        max_rows: keep at most this many rows.

    Returns:
        A ``datasets.Dataset`` with string columns ``query``, ``positive``, ``negative``.

    Raises:
        ValueError: naming the first invalid row, when ``skip_invalid`` is False.
    """
    datasets = _require_datasets()
    fields = {"query": query_field, "positive": positive_field, "negative": negative_field}
    optional = frozenset() if require_negative else frozenset({"negative"})
    columns = _collect(_read_records(source, split), fields, optional, skip_invalid, max_rows, source)
    return datasets.Dataset.from_dict(columns)


def load_texts(
    source: str,
    *,
    split: str = "train",
    text_field: str = "text",
    skip_invalid: bool = False,
    max_rows: int | None = None,
):
    """Load plain texts for unsupervised GRACE (a ``.txt`` file with one text per line, JSONL/CSV or a Hub id).

    Args:
        source: file path or Hub dataset id.
        split: split of a Hub dataset. Defaults to ``"train"``.
        text_field: column of the text. Defaults to ``"text"``.
        skip_invalid: drop empty/missing texts (count logged) instead of raising. Defaults to False.
        max_rows: keep at most this many rows.

    Returns:
        A ``datasets.Dataset`` with the string column ``text``.
    """
    datasets = _require_datasets()
    columns = _collect(_read_records(source, split), {"text": text_field}, frozenset(), skip_invalid, max_rows, source)
    return datasets.Dataset.from_dict(columns)


def sick_triplets(path: str, *, seed: int = 0, random_negatives: bool = True):
    """Triplets from SICK (``SICK_train.txt``): anchor = sentence A, ENTAILMENT sentence = positive, CONTRADICTION
    sentence of the same anchor = hard negative.

    Both directions of an ENTAILMENT pair give a row. Anchors without a contradicting sentence get a random sentence
    of the file as negative (``random_negatives=True``) or are dropped. The file is read with
    :func:`grace_st.readers.read_pairs` (strict: a short row or bytes that are not UTF-8 raise, naming the line).

    Args:
        path: the SICK TSV file (header ``pair_ID sentence_A sentence_B relatedness_score entailment_judgment``).
        seed: seed of the random negatives. Defaults to 0.
        random_negatives: fall back to a random sentence when an anchor has no contradiction. Defaults to True.

    Returns:
        A ``datasets.Dataset`` with columns ``query``, ``positive``, ``negative``.

    Raises:
        ValueError: the file is not a SICK file (naming the missing columns or the bad line), a random negative is
            needed but the file has no sentence other than the anchor and the positive, or no triplet results.
    """
    datasets = _require_datasets()
    entails: dict[str, list[str]] = {}
    contradicts: dict[str, list[str]] = {}
    sentences: list[str] = []
    for pair in read_pairs(path, format="sick"):
        a, b, label = pair.sentence1, pair.sentence2, pair.label
        sentences.extend((a, b))
        if label == "ENTAILMENT":
            entails.setdefault(a, []).append(b)
            entails.setdefault(b, []).append(a)
        elif label == "CONTRADICTION":
            contradicts.setdefault(a, []).append(b)
            contradicts.setdefault(b, []).append(a)
    distinct = set(sentences)
    rng = random.Random(seed)
    columns: dict[str, list[str]] = {"query": [], "positive": [], "negative": []}
    for anchor, positives in entails.items():
        for positive in positives:
            if contradicts.get(anchor):
                negative = rng.choice(contradicts[anchor])
            elif random_negatives:
                if not distinct - {anchor, positive}:
                    raise ValueError(
                        f"{path}: anchor {anchor!r} needs a random negative, but the file has no sentence other than "
                        "the anchor and the positive. Use a larger file or random_negatives=False."
                    )
                negative = rng.choice(sentences)
                while negative in (anchor, positive):
                    negative = rng.choice(sentences)
            else:
                continue
            columns["query"].append(anchor)
            columns["positive"].append(positive)
            columns["negative"].append(negative)
    if not columns["query"]:
        raise ValueError(f"{path} yielded no usable rows (no ENTAILMENT pair with a negative).")
    return datasets.Dataset.from_dict(columns)


def trecqa_triplets(path: str, *, seed: int = 0):
    """Triplets from TrecQA (``train.csv``): anchor = the question, positive = a sentence that answers it, hard
    negative = a candidate sentence of the same question that does not answer it (a real hard negative: retrieved for
    the question, on topic, not an answer).

    One row per answering sentence; its negative is drawn (seeded) from the question's non-answering candidates. A
    question without such a candidate gets a non-answering sentence of another question, and the count is logged. The
    file is read with :func:`grace_st.readers.read_trecqa` (strict: a bad label or a short row raises, naming it).

    Args:
        path: the TrecQA CSV file (header ``qtext,label,atext``).
        seed: seed of the negative draws. Defaults to 0.

    Returns:
        A ``datasets.Dataset`` with columns ``query``, ``positive``, ``negative``.

    Raises:
        ValueError: the file is not a TrecQA file, or it has no answering sentence, or no non-answering sentence.
    """
    datasets = _require_datasets()
    answers: dict[str, list[str]] = {}
    others: dict[str, list[str]] = {}
    for row in read_trecqa(path):
        (answers if row.label == 1 else others).setdefault(row.question, []).append(row.sentence)
    pool = [sentence for sentences in others.values() for sentence in sentences]
    if not answers or not pool:
        raise ValueError(f"{path} yielded no triplets: it needs answering (label 1) and non-answering (label 0) rows.")
    rng = random.Random(seed)
    columns: dict[str, list[str]] = {"query": [], "positive": [], "negative": []}
    borrowed = 0
    for question, positives in answers.items():
        candidates = [s for s in others.get(question, []) if s not in positives]
        for positive in positives:
            if candidates:
                negative = rng.choice(candidates)
            else:
                borrowed += 1
                negative = rng.choice(pool)
            columns["query"].append(question)
            columns["positive"].append(positive)
            columns["negative"].append(negative)
    if borrowed:
        logger.info(
            "%s: %d of %d triplets take their negative from another question (their question has no non-answering "
            "candidate).",
            path,
            borrowed,
            len(columns["query"]),
        )
    return datasets.Dataset.from_dict(columns)


def to_grpo_dataset(dataset, mode: Literal["supervised", "unsupervised"] = "supervised"):
    """Columns the GRACE trainer reads: ``prompt`` (the text that gets G rollouts), ``query``, ``negative``.

    Supervised rows need ``query``/``positive``/``negative``; unsupervised rows need ``text`` (or use the
    ``positive`` of triplets), which becomes both the prompt and the query.

    Args:
        dataset: output of :func:`load_triplets`, :func:`sick_triplets` or :func:`load_texts`.
        mode: ``"supervised"`` or ``"unsupervised"``.

    Returns:
        A new ``datasets.Dataset``.
    """
    if mode == "supervised":
        missing = {"query", "positive", "negative"} - set(dataset.column_names)
        if missing:
            raise ValueError(f"Supervised GRACE needs columns query/positive/negative; {sorted(missing)} missing.")
        return dataset.map(
            lambda row: {"prompt": row["positive"], "query": row["query"], "negative": row["negative"]},
            remove_columns=dataset.column_names,
        )
    if mode == "unsupervised":
        column = "text" if "text" in dataset.column_names else "positive"
        if column not in dataset.column_names:
            raise ValueError(f"Unsupervised GRACE needs a 'text' column; got {dataset.column_names}.")
        return dataset.map(
            lambda row: {"prompt": row[column], "query": row[column], "negative": ""},
            remove_columns=dataset.column_names,
        )
    raise ValueError(f"mode={mode!r} is not supported; choose 'supervised' or 'unsupervised'.")


def load_training_data(data_args, mode: str = "supervised"):
    """Load the data named by a :class:`grace_st.training.config.GraceDataArguments` and return a GRPO-ready dataset.

    ``train_data`` may be ``"demo"``, ``"sick:<path>"``, ``"trecqa:<path>"``, a file or a Hub dataset id.
    """
    source = data_args.train_data
    common = {"skip_invalid": data_args.skip_invalid, "max_rows": data_args.max_train_samples}
    if source == "demo":
        source = demo_data_path("train")
    if source.startswith(("sick:", "trecqa:")):
        kind, path = source.split(":", 1)
        dataset = sick_triplets(path) if kind == "sick" else trecqa_triplets(path)
        if data_args.max_train_samples is not None:
            dataset = dataset.select(range(min(len(dataset), data_args.max_train_samples)))
    elif mode == "unsupervised":
        dataset = load_texts(source, split=data_args.train_split, text_field=data_args.text_field, **common)
    else:
        dataset = load_triplets(
            source,
            split=data_args.train_split,
            query_field=data_args.query_field,
            positive_field=data_args.positive_field,
            negative_field=data_args.negative_field,
            require_negative=mode == "supervised",
            **common,
        )
    return to_grpo_dataset(dataset, mode)  # type: ignore[arg-type]


def prompt_record(prompt: Any) -> dict[str, str]:
    """Check one GRPO prompt record ``{"text", "query", "negative"}`` (see :func:`as_prompt_records`)."""
    if not isinstance(prompt, dict) or set(prompt) != set(_RECORD_KEYS):
        raise ValueError(
            f"GRACE prompts are records {{'text', 'query', 'negative'}} built by GraceGRPOTrainer; got {prompt!r}."
        )
    for key in _RECORD_KEYS:
        if not isinstance(prompt[key], str):
            raise ValueError(f"The {key!r} of a GRACE row must be a string, got {prompt[key]!r}.")
    return prompt


def as_prompt_records(dataset, name: str):
    """The dataset with its ``prompt``/``query``/``negative`` columns packed into one ``prompt`` record per row.

    A ``datasets.Dataset`` is wrapped lazily (``with_transform``), an ``IterableDataset`` mapped lazily; the other
    columns (``query`` and ``negative`` included) pass through unchanged.
    """
    if dataset is None:
        return None
    from datasets import Dataset, IterableDataset

    columns = getattr(dataset, "column_names", None)
    if not isinstance(dataset, (Dataset, IterableDataset)) or (
        columns is not None and not set(_RECORD_COLUMNS) <= set(columns)
    ):
        raise ValueError(
            f"{name} has columns {columns}; GRACE needs a datasets.Dataset or IterableDataset with 'prompt', 'query' "
            "and 'negative' (use grace_st.training.data.to_grpo_dataset)."
        )

    def pack(batch: dict[str, list]) -> dict[str, list]:
        missing = [column for column in _RECORD_COLUMNS if column not in batch]
        if missing and isinstance(dataset, Dataset):
            return batch  # some columns were read on their own (e.g. dataset["query"]): nothing to pack
        if missing:
            raise ValueError(f"{name} rows lack the column(s) {missing}; GRACE needs 'prompt', 'query', 'negative'.")
        packed = dict(batch)  # every column stays readable; only "prompt" becomes the record
        packed["prompt"] = [
            {"text": text, "query": query, "negative": negative}
            for text, query, negative in zip(batch["prompt"], batch["query"], batch["negative"], strict=True)
        ]
        return packed

    if isinstance(dataset, Dataset):
        return dataset.with_transform(pack)
    return dataset.map(pack, batched=True)


def with_query_rollouts(dataset):
    """Every GRPO row ``(prompt=positive, query, negative)`` followed by its mirror ``(prompt=query, query=positive,
    negative)``: the mirror's rollouts are rationales of the query, scored against the positive (and the same hard
    negative), so the policy learns to write both sides (``GraceGRPOConfig.query_rollouts``).

    Args:
        dataset: a ``datasets.Dataset`` or ``IterableDataset`` with ``prompt``, ``query`` and ``negative`` columns
            (:func:`to_grpo_dataset`); other columns are copied to both rows.

    Returns:
        A dataset of the same kind with twice the rows, each original row followed by its mirror.

    Raises:
        ValueError: a column is missing, or a row's query is empty (nothing to roll out).
    """
    from datasets import Dataset, IterableDataset

    columns = getattr(dataset, "column_names", None)
    if not isinstance(dataset, (Dataset, IterableDataset)) or (
        columns is not None and not set(_RECORD_COLUMNS) <= set(columns)
    ):
        raise ValueError(
            f"query_rollouts needs a datasets.Dataset or IterableDataset with 'prompt', 'query' and 'negative'; got "
            f"{type(dataset).__name__} with columns {columns}."
        )

    def mirror(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {name: [] for name in batch}
        for i in range(len(batch["prompt"])):
            if not batch["query"][i]:
                raise ValueError(f"Row {batch['prompt'][i]!r} has an empty query; query_rollouts needs one per row.")
            for swap in (False, True):
                for name in batch:
                    value = batch[name][i]
                    if swap and name in ("prompt", "query"):
                        value = batch["query" if name == "prompt" else "prompt"][i]
                    out[name].append(value)
        return out

    return dataset.map(mirror, batched=True)
