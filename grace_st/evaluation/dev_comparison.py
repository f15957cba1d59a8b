"""The dev-set comparison: does a GRACE embedding beat what the same backbone gives for free?

Five STS dev sets of the data folder (:data:`DEV_SETS`: SICK trial, STS12 MSRpar, STS12 OnWN, STS13 headlines,
STS13 OnWN; first 100 pairs each by default) and TrecQA dev as retrieval (:data:`TRECQA_DEV`, :func:`load_trecqa_dev`:
every answered question retrieves among all answering sentences, nDCG@10, never limited), one row per model. For each
row the distinct texts of all sets (STS sentences, questions, answering sentences) are encoded once
(:func:`grace_st.evaluation.quickeval.encode`, which goes through :func:`grace_st.encoding.encode_corpus` and measures
the rationales with :mod:`grace_st.diagnostics`), then per STS set the Spearman correlation of cosine similarity with
the gold score, per retrieval set the mean nDCG@10 over its questions, the mean over all sets (and the STS mean), and
a bootstrap 95% interval of that mean (:mod:`grace_st.evaluation.metrics`: pairs resampled within each STS set,
questions within TrecQA, every set's score recomputed and averaged). The resampled indices depend only on the seed and
the set sizes, so every row sees the same resamples and the difference of two rows gets a paired interval too
(``delta_vs_promptEOL``).

Rows (:func:`comparison_rows`): no rationale, echo, PromptEOL (Jiang et al., 2023: the raw prompt
``This sentence : "<text>" means in one word:"``, no chat template, last-token state), untrained GRACE with the mean
and the summary readout, the +CL baselines, and each trained GRACE folder with its readout and with the rationale
removed. Rows that need a module option this installation lacks are listed as skipped with the reason, never silently
left out. With ``rows_dir``, :func:`compare` saves each scored row as its own file keyed by everything that changes its
value and reuses a file whose key matches (:func:`row_key`), so a run resumes and several processes can share rows.

Also :func:`general_check` (perplexity on held-out text and multiple-choice score of each trained LM next to the
backbone's, :mod:`grace_st.evaluation.general`). The command line of ``eval/compare_dev.py`` is
:mod:`grace_st.scripts.compare_dev`; the ``num_rationales`` curve is a study in ``experiments/k_curve.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from grace_st.artifacts import GRACE_CONFIG_FILE
from grace_st.evaluation.metrics import (
    bootstrap_indices,
    bootstrap_query_means,
    bootstrap_spearmans,
    percentile_interval,
    retrieval_ndcg,
    spearman,
)
from grace_st.factory import PROMPTEOL_OPTIONS, SUMMARY_SUFFIX
from grace_st.readers import Pair, QARow, read_json, read_pairs, read_trecqa, resolve_data_path
from grace_st.tables import format_cell, markdown_table

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from grace_st.evaluation.mteb_evaluation import ModelSpec

logger = logging.getLogger(__name__)

# (name, path relative to the data folder); grace_st.readers.read_pairs detects SICK vs STS from the first line.
DEV_SETS: tuple[tuple[str, str], ...] = (
    ("SICK trial", "sick2014/SICK_trial.txt"),
    ("STS12 MSRpar", "sts2012/MSRpar.test.tsv"),
    ("STS12 OnWN", "sts2012/OnWN.test.tsv"),
    ("STS13 headlines", "sts2013/headlines.test.tsv"),
    ("STS13 OnWN", "sts2013/OnWN.test.tsv"),
)
# (column name, path relative to the data folder) of the retrieval set; its questions are never limited.
TRECQA_DEV: tuple[str, str] = ("TrecQA nDCG@10", "trecqa/dev.csv")
NDCG_K = 10
DEFAULT_LIMIT = 100
DEFAULT_SUMMARY_SUFFIX = SUMMARY_SUFFIX  # the module's measured default; a flag of eval/compare_dev.py
DEFAULT_MAX_NEW_TOKENS = 40  # training/configs/sick.yaml's rationale limit
ROW_NAMES: tuple[str, ...] = (
    "no rationale",
    "echo",
    "PromptEOL",
    "untrained GRACE (mean)",
    "untrained GRACE (summary)",
    "+CL (equal budget)",
    "trained GRACE (mean)",
    "trained GRACE (best readout)",
    "trained GRACE (best readout), rationale removed",
)
PROMPTEOL_ROW = "PromptEOL"
# The ablation: the trained model's best readout with no rationale written (the summary suffix follows the prompt
# directly), so the table shows what the rationale adds.
ABLATION_ROW = "trained GRACE (best readout), rationale removed"
ABLATION_SUFFIX = ", rationale removed"
CONTRASTIVE_ROW = "+CL (equal budget)"


# ---------------------------------------------------------------------------------------------------------- data
def load_dev_sets(
    data_dir: str | os.PathLike | None = None,
    limit: int | None = DEFAULT_LIMIT,
    sets: Sequence[tuple[str, str]] = DEV_SETS,
) -> dict[str, list[Pair]]:
    """The dev sets as ``{name: pairs}``, first ``limit`` pairs of each file, in file order.

    Args:
        data_dir: the data folder (:func:`grace_st.readers.data_dir`: else ``$GRACE_ST_DATA``, else
            ``../shared/data``).
        limit: pairs per set (None: all). Defaults to 100.
        sets: ``(name, relative path)`` pairs. Defaults to :data:`DEV_SETS`.

    Raises:
        FileNotFoundError: a file is missing (the message names the folder looked in).
        ValueError: ``limit`` is not an integer >= 2 (a Spearman correlation needs two pairs).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 2):
        raise ValueError(f"limit={limit!r} is not allowed; use an integer >= 2 (pairs per set) or None (all pairs).")
    return {name: read_pairs(resolve_data_path(path, data_dir), limit=limit) for name, path in sets}


@dataclasses.dataclass(frozen=True)
class RetrievalSet:
    """A retrieval dev set: questions, the corpus they search and, per question, the corpus indices that answer it.

    Attributes:
        queries: the questions with at least one answer, in file order.
        corpus: the distinct answering sentences of all questions, in file order.
        relevant: per query, the indices of its answering sentences in ``corpus``.
        unanswered: questions of the file without an answering sentence (nDCG is undefined for them; reported).
    """

    queries: tuple[str, ...]
    corpus: tuple[str, ...]
    relevant: tuple[tuple[int, ...], ...]
    unanswered: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.queries)

    @classmethod
    def from_qa_rows(cls, rows: Sequence[QARow]) -> RetrievalSet:
        """Questions as queries, every answering sentence (label 1) as one corpus document relevant to each question
        it answers; questions without an answer go to ``unanswered``.

        Example:
            >>> rows = [QARow("Q1", "A", 1), QARow("Q1", "B", 0), QARow("Q2", "A", 1), QARow("Q3", "C", 0)]
            >>> RetrievalSet.from_qa_rows(rows)
            RetrievalSet(queries=('Q1', 'Q2'), corpus=('A',), relevant=((0,), (0,)), unanswered=('Q3',))
        """
        corpus = list(dict.fromkeys(row.sentence for row in rows if row.label == 1))
        index = {sentence: i for i, sentence in enumerate(corpus)}
        answers: dict[str, dict[int, None]] = {row.question: {} for row in rows}
        for row in rows:
            if row.label == 1:
                answers[row.question][index[row.sentence]] = None
        return cls(
            queries=tuple(q for q, docs in answers.items() if docs),
            corpus=tuple(corpus),
            relevant=tuple(tuple(docs) for docs in answers.values() if docs),
            unanswered=tuple(q for q, docs in answers.items() if not docs),
        )


def load_trecqa_dev(
    data_dir: str | os.PathLike | None = None, path: str = TRECQA_DEV[1], name: str = TRECQA_DEV[0]
) -> dict[str, RetrievalSet]:
    """TrecQA dev as ``{name: RetrievalSet}`` (all questions, :func:`grace_st.readers.read_trecqa`).

    Questions without an answering sentence cannot be scored; they are logged and kept in ``unanswered``.

    Raises:
        FileNotFoundError: the file is missing (the message names the folder looked in).
    """
    dataset = RetrievalSet.from_qa_rows(read_trecqa(resolve_data_path(path, data_dir)))
    if dataset.unanswered:
        logger.info(
            "%s: %d of %d questions have no answering sentence and are not scored: %s",
            path, len(dataset.unanswered), len(dataset) + len(dataset.unanswered), list(dataset.unanswered),
        )  # fmt: skip
    return {name: dataset}


def optional_trecqa_dev(data_dir: str | os.PathLike | None = None) -> dict[str, RetrievalSet]:
    """:func:`load_trecqa_dev`, or ``{}`` with a logged warning when the data folder has no TrecQA dev file."""
    try:
        return load_trecqa_dev(data_dir)
    except FileNotFoundError as error:
        logger.warning("TrecQA dev is left out of the comparison: %s", error)
        return {}


# -------------------------------------------------------------------------------------------------------- rows
@dataclasses.dataclass
class Row:
    """One row of the comparison: a model (or a :class:`grace_st.evaluation.mteb_evaluation.ModelSpec` to load one)
    and its readout.

    Attributes:
        label: the row name.
        spec: what to load (a GRACE folder, a backbone with GRACE options...); ignored when ``model`` is given.
        model: an in-memory ``SentenceTransformer``.
        pooling_mode: the readout to set on the model's ``RationalePooling`` (None keeps the model's).
        needs: module options this row needs (``Transformer`` options, or ``pooling_mode:<mode>``); a row whose needs
            the installed grace_st lacks is skipped with that reason.
        skip: a reason to list the row as skipped without scoring it (e.g. no model folder was given).
        contrastive: a +CL row (the best scored one is the second reference of the table's paired differences).
    """

    label: str
    spec: ModelSpec | None = None
    model: SentenceTransformer | None = None
    pooling_mode: str | None = None
    needs: tuple[str, ...] = ()
    skip: str | None = None
    contrastive: bool = False


def missing_features(needs: Sequence[str]) -> list[str]:
    """The entries of ``needs`` the installed :mod:`grace_st.model` does not support."""
    from grace_st.model import Transformer
    from grace_st.model.options import POOLING_MODES

    missing = []
    for need in needs:
        if need.startswith("pooling_mode:"):
            if need.split(":", 1)[1] not in POOLING_MODES:
                missing.append(need)
        elif need not in Transformer.config_keys:
            missing.append(need)
    return missing


def set_readout(model: SentenceTransformer, pooling_mode: str) -> None:
    """Replace the model's ``RationalePooling`` by one with ``pooling_mode`` (its own class validates the mode, so a
    folder whose module lacks the mode raises naming the modes it has)."""
    pooling = model[1]
    config = {**pooling.get_config_dict(), "pooling_mode": pooling_mode}
    new = type(pooling)(**config)
    model[1] = new
    new.on_model_ready(model)


def build_row_model(row: Row, device: str | None = "cpu") -> SentenceTransformer:
    """The model of a row, its readout set."""
    if row.model is not None:
        model = row.model
    else:
        if row.spec is None:
            raise ValueError(f"Row {row.label!r} has neither a model nor a spec.")
        from grace_st.evaluation.mteb_evaluation import load_model

        model = load_model(row.spec, device=device)
    if row.pooling_mode is not None and model[1].pooling_mode != row.pooling_mode:
        set_readout(model, row.pooling_mode)
    return model


def labelled_folder(text: str) -> tuple[str | None, str]:
    """Split ``LABEL=FOLDER`` into ``(label, folder)``; an existing path, or text without ``=``, is a bare folder.

    Example:
        >>> labelled_folder("GRACE paper, seed 1=outputs/paper-s1/grace-model"), labelled_folder("outputs/m")
        (('GRACE paper, seed 1', 'outputs/paper-s1/grace-model'), (None, 'outputs/m'))
    """
    if os.path.exists(text) or "=" not in text:
        return None, text
    label, _, folder = text.partition("=")
    if not label.strip() or not folder.strip():
        raise ValueError(f"{text!r} is neither a folder nor LABEL=FOLDER with a label and a folder.")
    return label.strip(), folder.strip()


def _labelled(values: str | Sequence[str] | None, flag: str) -> list[tuple[str | None, str]]:
    entries = [labelled_folder(v) for v in ([values] if isinstance(values, str) else list(values or ()))]
    if len(entries) > 1 and any(label is None for label, _ in entries):
        bare = [folder for label, folder in entries if label is None]
        raise ValueError(f"Several {flag} folders need a label each (LABEL=FOLDER); unlabelled: {bare}.")
    return entries


def comparison_rows(
    backbone: str = "default",
    *,
    trained: str | Sequence[str] | None = None,
    trained_readout: str = "summary",
    contrastive: str | Sequence[str] | None = None,
    max_new_tokens: int | None = None,
    system_prompt: str | None = None,
    summary_suffix: str = DEFAULT_SUMMARY_SUFFIX,
    only: Sequence[str] | None = None,
) -> list[Row]:
    """The rows of the dev-set table, as :class:`Row` s.

    The training-free rows are the standard rows of every GRACE table
    (:func:`grace_st.evaluation.mteb_evaluation.standard_rows`), each with its readout; the untrained model is read
    out twice (mean and summary). Then one row per +CL folder and two per trained GRACE folder.

    Trained folders come bare (one folder: today's rows "trained GRACE (mean)", "trained GRACE (best readout)" and
    "trained GRACE (best readout), rationale removed") or labelled, ``LABEL=FOLDER`` (:func:`labelled_folder`; rows
    "LABEL" with ``trained_readout`` and "LABEL, rationale removed": the same model and readout with
    ``rationale_mode="none"``; no mean row). +CL folders: a bare one is the row "+CL (equal budget)", labelled ones the
    row "LABEL". Several folders of one kind need labels.

    Args:
        backbone: backbone of the training-free rows (folder, Hub id or ``"default"``).
        trained: trained GRACE folder(s), ``FOLDER`` or ``LABEL=FOLDER`` each; None lists the trained rows as skipped.
        trained_readout: the readout of the trained rows, or ``"saved"``: each folder's own (the one it was trained
            with; a saved readout other than mean and summary adds the row "untrained GRACE (<readout>)"). Defaults
            to ``"summary"``.
        contrastive: +CL folder(s) (:func:`grace_st.training.contrastive.train_contrastive`), ``FOLDER`` or
            ``LABEL=FOLDER`` each; None lists the +CL row as skipped.
        max_new_tokens: rationale limit of the untrained rows; None takes the first trained folder's, else 40.
        system_prompt: system prompt of the chat-template rows; None takes the first trained folder's, else the
            default.
        summary_suffix: suffix of the summary readout (used where the model does not have one saved).
        only: keep only these row labels (e.g. the cheap rows for a dry run); None keeps all.

    Returns:
        The rows: training-free, +CL, trained, in the order given.

    Raises:
        ValueError: two rows with one label, several folders of one kind without labels, or an ``only`` label that
            these arguments do not produce (the message lists those they do).
    """
    from grace_st.evaluation.mteb_evaluation import ModelSpec, standard_rows

    trained_entries = _labelled(trained, "--trained")
    contrastive_entries = _labelled(contrastive, "--contrastive")
    first_trained = trained_entries[0][1] if trained_entries else None
    generate = grace_options(first_trained, max_new_tokens, system_prompt)
    chat = {key: value for key, value in generate.items() if key == "system_prompt"}
    summary = {"summary_suffix": summary_suffix}
    no_rationale, echo, prompteol, untrained, *_ = standard_rows(backbone, generate["max_new_tokens"], **chat)

    def spec(base: ModelSpec, label: str, drop: str | None = None, **options: Any) -> ModelSpec:
        kept = {key: value for key, value in base.options if key != drop}
        return dataclasses.replace(base, label=label, options=tuple(sorted({**kept, **options}.items())))

    rows = [
        Row("no rationale", no_rationale),
        Row("echo", echo),
        Row(
            PROMPTEOL_ROW,
            spec(prompteol, PROMPTEOL_ROW, drop="pooling_mode"),
            pooling_mode=PROMPTEOL_OPTIONS["pooling_mode"],
            needs=("prompt_template", "chat_template"),
        ),
        # The summary suffix changes neither the rationale nor the mean readout: with it, the two untrained rows are
        # one model and one generation (see :func:`compare`).
        Row("untrained GRACE (mean)", spec(untrained, "untrained GRACE (mean)", **summary), pooling_mode="mean"),
        Row(
            "untrained GRACE (summary)",
            spec(untrained, "untrained GRACE (summary)", **summary),
            pooling_mode="summary",
            needs=("summary_suffix", "pooling_mode:summary"),
        ),
    ]
    # With saved readouts, the untrained model is also read out with each trained readout beyond mean and summary
    # (e.g. a recipe's mean+summary), so every trained readout has its untrained reference.
    readouts = [_saved_pooling(folder) for _, folder in trained_entries] if trained_readout == SAVED_READOUT else []
    for readout in dict.fromkeys(r for r in readouts if r not in ("mean", "summary")):
        label = f"untrained GRACE ({readout})"
        needs = ("summary_suffix", f"pooling_mode:{readout}") if "summary" in readout else (f"pooling_mode:{readout}",)
        # A readout that needs the text's own summary state: the module computes it (its own generation then).
        text_summary = {"text_summary": True} if "text_summary" in readout else {}
        needs += tuple(text_summary)
        rows.append(Row(label, spec(untrained, label, **summary, **text_summary), pooling_mode=readout, needs=needs))
    if not contrastive_entries:
        rows.append(Row(CONTRASTIVE_ROW, skip="no +CL folder given (--contrastive)"))
    for label, folder in contrastive_entries:
        rows.append(Row(label or CONTRASTIVE_ROW, ModelSpec(folder, label or CONTRASTIVE_ROW), contrastive=True))
    if not trained_entries:
        rows += [Row(label, skip="no trained GRACE folder given (--trained)") for label in ROW_NAMES[6:]]
    for label, folder in trained_entries:
        trained_spec = ModelSpec(folder)
        readout = _saved_pooling(folder) if trained_readout == SAVED_READOUT else trained_readout
        readout_needs = (f"pooling_mode:{readout}",)
        options: dict[str, Any] = {}
        if "summary" in readout and not _saved_suffix(folder):
            options = dict(summary)
            readout_needs += ("summary_suffix",)
        if label is None:
            rows.append(Row("trained GRACE (mean)", spec(trained_spec, "trained GRACE (mean)"), pooling_mode="mean"))
            label, ablation = "trained GRACE (best readout)", ABLATION_ROW
        else:
            ablation = label + ABLATION_SUFFIX
        rows.append(Row(label, spec(trained_spec, label, **options), pooling_mode=readout, needs=readout_needs))
        rows.append(
            Row(
                ablation,
                spec(trained_spec, ablation, **options, rationale_mode="none"),
                pooling_mode=readout,
                needs=readout_needs,
            )
        )
    labels = [row.label for row in rows]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(
            f"Row labels must be unique; {repeated} appear more than once. Give each folder its own label."
        )
    unknown = [label for label in only or () if label not in labels]
    if unknown:
        raise ValueError(f"Unknown row name(s) {unknown}; these flags give the rows {labels}.")
    return [row for row in rows if only is None or row.label in only]


def grace_options(
    trained: str | None = None, max_new_tokens: int | None = None, system_prompt: str | None = None
) -> dict[str, Any]:
    """Options of the untrained GRACE rows: the trained folder's system prompt and limit unless given (else the
    module's default prompt and 40 tokens), so untrained and trained GRACE write from the same prompt and limit."""
    from grace_st.evaluation.mteb_evaluation import ModelSpec, baseline_options

    saved = baseline_options(ModelSpec(trained)) if trained else {}
    options: dict[str, Any] = {"rationale_mode": "generate"}
    if system_prompt is not None or "system_prompt" in saved:
        options["system_prompt"] = system_prompt if system_prompt is not None else saved["system_prompt"]
    options["max_new_tokens"] = max_new_tokens or saved.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS
    return options


def _saved_suffix(folder: str) -> str:
    return read_json(Path(folder) / GRACE_CONFIG_FILE).get("summary_suffix") or ""


# ``trained_readout`` value: each trained folder is read out as it was saved.
SAVED_READOUT = "saved"


def _saved_pooling(folder: str) -> str:
    """The pooling mode a saved GRACE folder reads out with (its ``RationalePooling`` module's config)."""
    for module in read_json(Path(folder) / "modules.json") or []:
        if str(module.get("type", "")).endswith("RationalePooling"):
            mode = (read_json(Path(folder) / module["path"] / "config.json") or {}).get("pooling_mode")
            if mode:
                return mode
    raise ValueError(f"{folder} has no RationalePooling module with a pooling_mode; give --trained-readout.")


# ------------------------------------------------------------------------------------------------------ scoring
def _with_readouts(model: SentenceTransformer, readouts: Sequence[str]) -> SentenceTransformer:
    """A model sharing ``model``'s ``Transformer`` whose ``sentence_embedding`` concatenates the normalised embedding
    of each readout in ``readouts`` (several readouts from one generation; :func:`score_model` splits them)."""
    import torch
    from sentence_transformers import SentenceTransformer

    pooling = model[1]
    poolings = [type(pooling)(**{**pooling.get_config_dict(), "pooling_mode": mode}) for mode in readouts]
    for each in poolings:
        each.on_model_ready(model)

    class _Readouts(type(pooling)):
        def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
            parts = [each(dict(features))["sentence_embedding"].float() for each in poolings]
            features["sentence_embedding"] = torch.cat([torch.nn.functional.normalize(p, dim=-1) for p in parts], 1)
            return features

        def get_embedding_dimension(self) -> int:
            return pooling.get_embedding_dimension() * len(readouts)

    return SentenceTransformer(modules=[model[0], _Readouts(**pooling.get_config_dict())], device=str(model.device))


DevSets = dict[str, "Sequence[Pair] | RetrievalSet"]


def set_texts(dev_sets: DevSets) -> list[str]:
    """The distinct texts of all sets in order: STS sentences, retrieval questions and corpus sentences."""
    texts: list[str] = []
    for dataset in dev_sets.values():
        if isinstance(dataset, RetrievalSet):
            texts += [*dataset.queries, *dataset.corpus]
        else:
            texts += [text for pair in dataset for text in pair[:2]]
    return list(dict.fromkeys(texts))


def score_model(
    model: SentenceTransformer,
    dev_sets: DevSets,
    *,
    batch_size: int = 16,
    resamples: int = 1000,
    seed: int = 0,
    readouts: Sequence[str] | None = None,
) -> dict[str, Any] | list[dict[str, Any]]:
    """Encode the distinct texts of all sets once and score each set; the bootstrap interval of the mean.

    Args:
        model: any ``SentenceTransformer`` (GRACE models are measured: copy rate, finish rate, mean length).
        dev_sets: ``{name: pairs}`` (:func:`load_dev_sets`, Spearman of cosine) and ``{name: RetrievalSet}``
            (:func:`load_trecqa_dev`, mean nDCG@10 of cosine retrieval), in the order of the table.
        batch_size: encoding batch size. Defaults to 16.
        resamples: bootstrap resamples. Defaults to 1000.
        seed: bootstrap seed. Defaults to 0.
        readouts: score these pooling modes of a GRACE model from one generation (one result each, in order; the
            time and diagnostics are the generation's, shared by all); None scores the model as it is.

    Returns:
        ``{"scores": {set: value}, "spearman": {STS set: value}, "ndcg": {retrieval set: [per question]}, "mean"
        (over all sets), "sts_mean" (over the STS sets; None without one), "ci95": {"low", "high", ...},
        "cosines": {STS set: [...]}, "texts", "seconds", "seconds_per_text", "copy_rate", "finish_rate",
        "mean_length", "examples"}`` (rationale numbers None for models without rationales); a list of them with
        ``readouts``.
    """
    from grace_st.evaluation.quickeval import encode

    if not dev_sets:
        raise ValueError("dev_sets is empty; pass at least one set of pairs.")
    texts = set_texts(dev_sets)
    encoded = encode(model if readouts is None else _with_readouts(model, readouts), texts, batch_size=batch_size)
    if readouts is None:
        return _score(encoded, encoded.embeddings, texts, dev_sets, resamples, seed)
    parts = np.split(encoded.embeddings, len(readouts), axis=1)
    parts = [part / np.linalg.norm(part, axis=1, keepdims=True) for part in parts]
    return [{**_score(encoded, part, texts, dev_sets, resamples, seed), "readout": mode} for part, mode in zip(
        parts, readouts, strict=True)]  # fmt: skip


def _golds(pairs: Sequence[Pair]) -> np.ndarray:
    return np.asarray([float(pair[2]) for pair in pairs])


def bootstrap_set_scores(result: dict[str, Any], dev_sets: DevSets, resamples: int, seed: int) -> np.ndarray:
    """Each set's score on each bootstrap resample, ``(sets, resamples)``: STS pairs and retrieval questions
    resampled within their set, from a result's ``cosines`` and ``ndcg`` (the same resamples for every row)."""
    indices = bootstrap_indices([len(dataset) for dataset in dev_sets.values()], resamples, seed)
    samples = []
    for (name, dataset), idx in zip(dev_sets.items(), indices, strict=True):
        if isinstance(dataset, RetrievalSet):
            samples.append(bootstrap_query_means(np.asarray(result["ndcg"][name]), idx))
        else:
            cosines = np.asarray(result["cosines"][name])
            samples.append(bootstrap_spearmans([cosines], [_golds(dataset)], [idx])[0])
    return np.asarray(samples)


def _score(encoded, vectors, texts, dev_sets, resamples, seed) -> dict[str, Any]:
    row_of = {text: i for i, text in enumerate(texts)}
    scores, per_set, cosines, ndcg = {}, {}, {}, {}
    for name, dataset in dev_sets.items():
        if isinstance(dataset, RetrievalSet):
            queries = vectors[[row_of[text] for text in dataset.queries]]
            corpus = vectors[[row_of[text] for text in dataset.corpus]]
            ndcg[name] = retrieval_ndcg(queries, corpus, dataset.relevant, NDCG_K)
            scores[name] = float(ndcg[name].mean())
        else:
            a = vectors[[row_of[pair[0]] for pair in dataset]]
            b = vectors[[row_of[pair[1]] for pair in dataset]]
            cosines[name] = (a * b).sum(axis=1).astype(np.float64)
            scores[name] = per_set[name] = spearman(cosines[name], _golds(dataset))
    result = {"cosines": {name: values.tolist() for name, values in cosines.items()}}
    result["ndcg"] = {name: values.tolist() for name, values in ndcg.items()}
    samples = bootstrap_set_scores(result, dev_sets, resamples, seed)
    stats = encoded.stats
    return {
        "scores": scores,
        "spearman": per_set,
        "mean": float(np.mean(list(scores.values()))),
        "sts_mean": float(np.mean(list(per_set.values()))) if per_set else None,
        "ci95": percentile_interval(samples.mean(axis=0)),
        **result,
        "texts": len(texts),
        "seconds": stats.seconds,
        "seconds_per_text": stats.seconds_per_text,
        "copy_rate": stats.copy_rate,
        "finish_rate": stats.finish_rate,
        "mean_length": stats.mean_length,
        "examples": stats.examples,
    }


def paired_difference(
    result: dict[str, Any], reference: dict[str, Any], dev_sets: DevSets, resamples: int, seed: int
) -> dict[str, Any]:
    """``result["mean"] - reference["mean"]`` with a paired bootstrap 95% interval (the same resamples for both)."""
    ours = bootstrap_set_scores(result, dev_sets, resamples, seed).mean(axis=0)
    theirs = bootstrap_set_scores(reference, dev_sets, resamples, seed).mean(axis=0)
    return {"delta": result["mean"] - reference["mean"], **percentile_interval(ours - theirs)}


# ---------------------------------------------------------------------------------------------------- row files
_CONTENT_HASH_BYTES = 1 << 20  # files up to 1 MiB (configs, tokenizer, module code) by content; weights by size+mtime


def folder_fingerprint(path: str | os.PathLike) -> dict[str, str] | None:
    """What identifies a model folder's contents: ``{relative file: sha256 of small files, or size and mtime of large
    ones (weights)}``; None when ``path`` is not a folder (a Hub id is identified by its name)."""
    path = Path(path)
    if not path.is_dir():
        return None
    prints = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        if stat.st_size <= _CONTENT_HASH_BYTES:
            prints[file.relative_to(path).as_posix()] = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
        else:
            prints[file.relative_to(path).as_posix()] = f"size={stat.st_size},mtime_ns={stat.st_mtime_ns}"
    return prints


# The grace_st source that writes a row's numbers (relative to the package): the model code, the decode engine, corpus
# encoding, the scoring, model building, the backbone and the file readers.
SCORING_CODE = ("model", "engine", "encoding", "evaluation", "factory.py", "backbone.py", "readers.py")


def code_fingerprint(root: str | os.PathLike | None = None) -> str:
    """sha256 (16 hex digits) of the grace_st source files that encode and score (:data:`SCORING_CODE` under ``root``,
    by default the imported package): an edit in an editable install changes it, the version does not."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for entry in SCORING_CODE:
        path = root / entry
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def dev_sets_fingerprint(dev_sets: DevSets) -> dict[str, Any]:
    """``{set: {"kind", "size", "sha256"}}``: a hash of each set's texts, gold scores and relevance judgments."""
    prints = {}
    for name, dataset in dev_sets.items():
        if isinstance(dataset, RetrievalSet):
            content: Any = [dataset.queries, dataset.corpus, dataset.relevant]
            kind = f"retrieval nDCG@{NDCG_K}"
        else:
            content, kind = [list(pair[:3]) for pair in dataset], "sts spearman"
        digest = hashlib.sha256(json.dumps(content, ensure_ascii=False).encode()).hexdigest()
        prints[name] = {"kind": kind, "size": len(dataset), "sha256": digest}
    return prints


def row_key(row: Row, dev_sets: DevSets, resamples: int, seed: int) -> dict[str, Any] | None:
    """Everything that changes a row's numbers: label, model (path and :func:`folder_fingerprint`; ``"default"`` is
    resolved to the default backbone's folder), options, readout, the sets (:func:`dev_sets_fingerprint`), the
    bootstrap, the grace_st version and the source that encodes and scores (:func:`code_fingerprint`); None for a row
    with an in-memory model (not saved)."""
    import grace_st
    from grace_st.backbone import resolve_backbone

    if row.model is not None or row.spec is None:
        return None
    model = resolve_backbone(row.spec.name_or_path)
    key = {
        "label": row.label,
        "model": os.path.abspath(model) if os.path.isdir(model) else model,
        "model_files": folder_fingerprint(model),
        "grace_st_version": grace_st.__version__,
        "code": code_fingerprint(),
        "revision": row.spec.revision,
        "options": dict(row.spec.options),
        "pooling_mode": row.pooling_mode,
        "sets": dev_sets_fingerprint(dev_sets),
        "bootstrap": {"resamples": resamples, "seed": seed},
    }
    return json.loads(json.dumps(key, sort_keys=True, default=str))  # as it reads back from a file


def row_file(rows_dir: str | os.PathLike, label: str) -> Path:
    """The file of a row: its label made file-safe, plus a short hash of the label so distinct labels never collide."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")[:80] or "row"
    return Path(rows_dir) / f"{slug}-{hashlib.sha256(label.encode()).hexdigest()[:8]}.json"


def _read_row_file(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    stored = read_json(path)
    if not stored:
        return None
    if stored.get("key") != key:
        changed = sorted(k for k in {**key, **stored.get("key", {})} if key.get(k) != stored.get("key", {}).get(k))
        logger.info("%s was scored with other %s; rescoring.", path, changed)
        return None
    return stored["result"]


def _write_row_file(path: Path, key: dict[str, Any], result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps({"key": key, "result": result}, default=str) + "\n", encoding="utf-8")
    os.replace(partial, path)  # complete or absent, also with two processes writing rows


def compare(
    rows: Sequence[Row],
    dev_sets: DevSets,
    *,
    batch_size: int = 16,
    resamples: int = 1000,
    seed: int = 0,
    device: str | None = "cpu",
    on_row=None,
    rows_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Score every row; rows whose module options are missing are listed under ``"skipped"`` with the reason.

    Every model to score is built once before any is scored, so a bad folder or option fails in seconds, not after an
    hour.

    Args:
        rows: the rows (:func:`comparison_rows`).
        dev_sets: ``{name: pairs or RetrievalSet}`` (see :func:`score_model`).
        batch_size, resamples, seed: see :func:`score_model`.
        device: where models are loaded. Defaults to ``"cpu"``.
        on_row: called with the results so far after each scored row (e.g. to save them), or None.
        rows_dir: a folder of row files (:func:`row_file`): a row whose file holds the same :func:`row_key` is read
            from it, not scored; every scored row is written there. None scores every row and writes nothing.

    Returns:
        ``{"sets": {name: number of pairs or questions}, "rows": {label: score_model(...) + delta_vs_promptEOL (+
        delta_vs_contrastive)}, "skipped": {label: reason}, "reused": [labels read from row files]}`` (+
        ``"contrastive_reference"``: the best +CL row, when there is one), rows in the given order.
    """
    labels = [row.label for row in rows]
    if len(set(labels)) != len(labels):
        raise ValueError(f"Row labels must be distinct; got {labels}.")
    results: dict[str, Any] = {"sets": {k: len(v) for k, v in dev_sets.items()}, "rows": {}, "skipped": {}}
    results["reused"] = []
    scored: dict[str, Any] = {}
    keys: dict[str, Any] = {}
    runnable = []
    for row in rows:
        missing = missing_features(row.needs)
        if row.skip or missing:
            reason = row.skip or f"this grace_st lacks the module option(s) {missing}"
            logger.warning("Skipping row %r: %s.", row.label, reason)
            results["skipped"][row.label] = reason
            continue
        key = keys[row.label] = row_key(row, dev_sets, resamples, seed) if rows_dir is not None else None
        stored = _read_row_file(row_file(rows_dir, row.label), key) if key is not None else None
        if stored is not None:
            logger.info("%s: reused from %s", row.label, row_file(rows_dir, row.label))
            scored[row.label] = stored
            results["reused"].append(row.label)
            continue
        runnable.append(row)
    for row in runnable:  # pre-flight: load every model once
        if row.model is None:
            build_row_model(row, device)
    # Rows of one model that differ only in their readout share one generation.
    groups: dict[Any, list[Row]] = {}
    for row in runnable:
        key = (row.spec.name_or_path, row.spec.options) if row.model is None and row.pooling_mode else id(row)
        groups.setdefault(key, []).append(row)

    def ordered() -> dict[str, Any]:
        return {label: scored[label] for label in labels if label in scored}

    for group in groups.values():
        logger.info("Scoring %s on %d sets.", [row.label for row in group], len(dev_sets))
        model = build_row_model(group[0], device)
        kwargs = {"batch_size": batch_size, "resamples": resamples, "seed": seed}
        if len(group) == 1:
            results_of_group = [score_model(model, dev_sets, **kwargs)]
        else:
            results_of_group = score_model(model, dev_sets, readouts=[row.pooling_mode for row in group], **kwargs)
        del model
        for row, result in zip(group, results_of_group, strict=True):
            if len(group) > 1:
                result["shared_generation_with"] = [other.label for other in group if other is not row]
            scored[row.label] = result
            if keys.get(row.label) is not None:
                _write_row_file(row_file(rows_dir, row.label), keys[row.label], result)
            logger.info("%s: mean %.4f", row.label, result["mean"])
        if on_row is not None:
            results["rows"] = ordered()
            on_row(results)
    results["rows"] = {label: dict(result) for label, result in ordered().items()}
    reference = results["rows"].get(PROMPTEOL_ROW)
    if reference is not None:
        for label, result in results["rows"].items():
            if label != PROMPTEOL_ROW:
                result["delta_vs_promptEOL"] = paired_difference(result, reference, dev_sets, resamples, seed)
    # The best +CL row (highest mean) is the second reference: a row beats +CL where its difference to that one does.
    contrastive = [row.label for row in rows if row.contrastive and row.label in results["rows"]]
    if contrastive:
        best = max(contrastive, key=lambda label: results["rows"][label]["mean"])
        results["contrastive_reference"] = best
        for label, result in results["rows"].items():
            if label not in contrastive:
                result["delta_vs_contrastive"] = paired_difference(
                    result, results["rows"][best], dev_sets, resamples, seed
                )
    return results


def comparison_markdown(results: dict[str, Any]) -> str:
    """The comparison table: per-set score (Spearman, nDCG@10), the STS mean beside a retrieval set, the mean over
    all sets, its 95% interval, Δ vs PromptEOL and vs the best +CL row (paired bootstrap), rationale numbers, time."""
    sets = list(results["sets"])
    some = next(iter(results["rows"].values()), {})
    sts_column = bool(some.get("sts_mean") is not None and len(some.get("spearman", {})) < len(sets))
    best_contrastive = results.get("contrastive_reference")
    header = ["row", *sets, *(["STS mean"] if sts_column else []), "mean", "95% CI", "Δ PromptEOL [95% CI]"]
    header += [f"Δ {best_contrastive} [95% CI]"] if best_contrastive else []
    header += ["copy", "finish", "length", "s/text"]
    table_rows = []

    def delta_cell(delta: dict[str, float] | None) -> str | None:
        return f"{delta['delta']:+.3f} [{format_cell(delta['low'])}, {format_cell(delta['high'])}]" if delta else None

    for label, r in results["rows"].items():
        ci = r["ci95"]
        interval = f"[{format_cell(ci['low'])}, {format_cell(ci['high'])}]"
        scores = r.get("scores", r["spearman"])
        table_rows.append(
            [
                label,
                *(scores[name] for name in sets),
                *([r["sts_mean"]] if sts_column else []),
                r["mean"],
                interval,
                delta_cell(r.get("delta_vs_promptEOL")),
                *([delta_cell(r.get("delta_vs_contrastive"))] if best_contrastive else []),
                r["copy_rate"],
                r["finish_rate"],
                None if r["mean_length"] is None else f"{r['mean_length']:.1f}",
                None if r["seconds_per_text"] is None else f"{r['seconds_per_text']:.3f}",
            ]
        )
    for label in results["skipped"]:
        table_rows.append([f"{label} (skipped)", *([None] * (len(header) - 1))])
    notes = "".join(f"\n- {label} skipped: {reason}." for label, reason in results["skipped"].items())
    return markdown_table(header, table_rows) + notes + ("\n" if notes else "")


# ------------------------------------------------------------------------------------------------ general check
def general_check(
    models: dict[str, str],
    base: str = "default",
    *,
    data_dir: str | os.PathLike | None = None,
    max_texts: int = 200,
    device: str = "cpu",
) -> dict[str, Any]:
    """Perplexity on held-out text and multiple-choice accuracy of each model's LM next to the backbone's.

    Args:
        models: ``{label: folder}`` of trained models (GRACE or +CL folders: both save the LM at their root).
        base: the untrained backbone. Defaults to ``"default"``.
        data_dir: data folder of the held-out text (:data:`grace_st.evaluation.general.DEFAULT_HELD_OUT`).
        max_texts: held-out passages. Defaults to 200.
        device: torch device. Defaults to ``"cpu"``.

    Returns:
        The report of :func:`grace_st.evaluation.general.general_report` with its ``table``, each model row with
        ``perplexity_ratio`` (to the base) and ``mc_right_delta`` (questions right, minus the base's).
    """
    from grace_st.evaluation import general

    texts = general.held_out_sentences(resolve_data_path(general.DEFAULT_HELD_OUT, data_dir), max_texts)
    questions = general.load_questions()
    report = general.general_report({"untrained": base, **models}, texts, questions, device=device)
    base_row = report["models"]["untrained"]
    for row in report["models"].values():
        row["perplexity_ratio"] = row["perplexity"] / base_row["perplexity"]
        row["mc_right_delta"] = round((row["acc"] - base_row["acc"]) * len(questions))
    report["table"] = general.general_table(report)
    return report
