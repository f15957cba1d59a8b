"""The dev-set comparison: does a GRACE embedding beat what the same backbone gives for free?

Five STS dev sets of the data folder (:data:`DEV_SETS`: SICK trial, STS12 MSRpar, STS12 OnWN, STS13 headlines,
STS13 OnWN; first 100 pairs each by default), one row per model. For each row the distinct texts of all five sets are
encoded once (:func:`grace_st.evaluation.quickeval.encode`, which goes through :func:`grace_st.encoding.encode_corpus`
and measures the rationales with :mod:`grace_st.diagnostics`), then per set the Spearman correlation of cosine
similarity with the gold score, the five-set mean, and a bootstrap 95% interval of that mean
(:mod:`grace_st.evaluation.metrics`: pairs resampled within each set, all five Spearmans recomputed and averaged). The
resampled indices depend only on the seed and the set sizes, so every row sees the same resamples and the difference
of two rows gets a paired interval too (``delta_vs_promptEOL``).

Rows (:func:`comparison_rows`): no rationale, echo, PromptEOL (Jiang et al., 2023: the raw prompt
``This sentence : "<text>" means in one word:"``, no chat template, last-token state), untrained GRACE with the mean
and the summary readout, the +CL baseline, trained GRACE with the mean and with its best readout. Rows that need a
module option this installation lacks are listed as skipped with the reason, never silently left out.

Also :func:`general_check` (perplexity on held-out text and multiple-choice score of each trained LM next to the
backbone's, :mod:`grace_st.evaluation.general`). The command line of ``eval/compare_dev.py`` is
:mod:`grace_st.scripts.compare_dev`; the ``num_rationales`` curve is a study in ``experiments/k_curve.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from grace_st.artifacts import GRACE_CONFIG_FILE
from grace_st.evaluation.metrics import bootstrap_indices, bootstrap_means, percentile_interval, spearman
from grace_st.factory import PROMPTEOL_OPTIONS
from grace_st.model import SUMMARY_SUFFIX
from grace_st.readers import Pair, read_json, read_pairs, resolve_data_path
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
# The ablation of issue 14: the trained model's best readout with no rationale written (the summary suffix follows the
# prompt directly), so the table shows what the rationale adds.
ABLATION_ROW = "trained GRACE (best readout), rationale removed"


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
    """

    label: str
    spec: ModelSpec | None = None
    model: SentenceTransformer | None = None
    pooling_mode: str | None = None
    needs: tuple[str, ...] = ()
    skip: str | None = None


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


def comparison_rows(
    backbone: str = "default",
    *,
    trained: str | None = None,
    trained_readout: str = "summary",
    contrastive: str | None = None,
    max_new_tokens: int | None = None,
    system_prompt: str | None = None,
    summary_suffix: str = DEFAULT_SUMMARY_SUFFIX,
    only: Sequence[str] | None = None,
) -> list[Row]:
    """The rows of the dev-set table (:data:`ROW_NAMES`), as :class:`Row` s.

    The training-free rows are the standard rows of every GRACE table
    (:func:`grace_st.evaluation.mteb_evaluation.standard_rows`), each with its readout; the untrained model is read
    out twice (mean and summary), and a trained folder gives its mean, best-readout and rationale-removed rows.

    Args:
        backbone: backbone of the training-free rows (folder, Hub id or ``"default"``).
        trained: a trained GRACE folder (rows "trained GRACE (mean)" and "(best readout)"); None lists them as
            skipped.
        trained_readout: the readout of "trained GRACE (best readout)". Defaults to ``"summary"``.
        contrastive: the +CL folder (:func:`grace_st.training.contrastive.train_contrastive`); None lists its row
            as skipped.
        max_new_tokens: rationale limit of the untrained rows; None takes the trained folder's, else 40.
        system_prompt: system prompt of the chat-template rows; None takes the trained folder's, else the default.
        summary_suffix: suffix of the summary readout (used where the model does not have one saved).
        only: keep only these row names (e.g. the cheap rows for a dry run); None keeps all.

    Returns:
        The rows, in :data:`ROW_NAMES` order.
    """
    unknown = sorted(set(only or ()) - set(ROW_NAMES))
    if unknown:
        raise ValueError(f"Unknown row name(s) {unknown}; choose from {list(ROW_NAMES)}.")
    from grace_st.evaluation.mteb_evaluation import ModelSpec, standard_rows

    generate = grace_options(trained, max_new_tokens, system_prompt)
    chat = {key: value for key, value in generate.items() if key == "system_prompt"}
    summary = {"summary_suffix": summary_suffix}
    no_rationale, echo, prompteol, untrained, *others = standard_rows(
        backbone, generate["max_new_tokens"], contrastive=contrastive, **chat
    )

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
    if contrastive:
        rows.append(Row("+CL (equal budget)", spec(others[0], "+CL (equal budget)")))
    else:
        rows.append(Row("+CL (equal budget)", skip="no +CL folder given (--contrastive)"))
    if not trained:
        rows += [Row(label, skip="no trained GRACE folder given (--trained)") for label in ROW_NAMES[6:]]
    else:
        trained_spec = ModelSpec(trained)
        rows.append(Row("trained GRACE (mean)", spec(trained_spec, "trained GRACE (mean)"), pooling_mode="mean"))
        readout_needs = (f"pooling_mode:{trained_readout}",)
        options: dict[str, Any] = {}
        if "summary" in trained_readout and not _saved_suffix(trained):
            options = dict(summary)
            readout_needs += ("summary_suffix",)
        rows.append(
            Row(
                "trained GRACE (best readout)",
                spec(trained_spec, f"trained GRACE ({trained_readout})", **options),
                pooling_mode=trained_readout,
                needs=readout_needs,
            )
        )
        rows.append(
            Row(
                ABLATION_ROW,
                spec(trained_spec, ABLATION_ROW, **options, rationale_mode="none"),
                pooling_mode=trained_readout,
                needs=readout_needs,
            )
        )
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


def score_model(
    model: SentenceTransformer,
    dev_sets: dict[str, Sequence[Pair]],
    *,
    batch_size: int = 16,
    resamples: int = 1000,
    seed: int = 0,
    readouts: Sequence[str] | None = None,
) -> dict[str, Any] | list[dict[str, Any]]:
    """Encode the distinct texts of all sets once and score each set; the bootstrap interval of the mean.

    Args:
        model: any ``SentenceTransformer`` (GRACE models are measured: copy rate, finish rate, mean length).
        dev_sets: ``{name: pairs}`` (:func:`load_dev_sets`).
        batch_size: encoding batch size. Defaults to 16.
        resamples: bootstrap resamples. Defaults to 1000.
        seed: bootstrap seed. Defaults to 0.
        readouts: score these pooling modes of a GRACE model from one generation (one result each, in order; the
            time and diagnostics are the generation's, shared by all); None scores the model as it is.

    Returns:
        ``{"spearman": {set: value}, "mean", "ci95": {"low", "high", ...}, "cosines": {set: [...]}, "texts",
        "seconds", "seconds_per_text", "copy_rate", "finish_rate", "mean_length", "examples"}`` (rationale numbers
        None for models without rationales); a list of them with ``readouts``.
    """
    from grace_st.evaluation.quickeval import encode

    if not dev_sets:
        raise ValueError("dev_sets is empty; pass at least one set of pairs.")
    texts = list(dict.fromkeys(text for pairs in dev_sets.values() for pair in pairs for text in pair[:2]))
    encoded = encode(model if readouts is None else _with_readouts(model, readouts), texts, batch_size=batch_size)
    if readouts is None:
        return _score(encoded, encoded.embeddings, texts, dev_sets, resamples, seed)
    parts = np.split(encoded.embeddings, len(readouts), axis=1)
    parts = [part / np.linalg.norm(part, axis=1, keepdims=True) for part in parts]
    return [{**_score(encoded, part, texts, dev_sets, resamples, seed), "readout": mode} for part, mode in zip(
        parts, readouts, strict=True)]  # fmt: skip


def _score(encoded, vectors, texts, dev_sets, resamples, seed) -> dict[str, Any]:
    row_of = {text: i for i, text in enumerate(texts)}
    cosines, golds = {}, {}
    for name, pairs in dev_sets.items():
        a = vectors[[row_of[pair[0]] for pair in pairs]]
        b = vectors[[row_of[pair[1]] for pair in pairs]]
        cosines[name] = (a * b).sum(axis=1).astype(np.float64)
        golds[name] = np.asarray([float(pair[2]) for pair in pairs])
    per_set = {name: spearman(cosines[name], golds[name]) for name in dev_sets}
    indices = bootstrap_indices([len(pairs) for pairs in dev_sets.values()], resamples, seed)
    means = bootstrap_means(list(cosines.values()), list(golds.values()), indices)
    stats = encoded.stats
    return {
        "spearman": per_set,
        "mean": float(np.mean(list(per_set.values()))),
        "ci95": percentile_interval(means),
        "cosines": {name: values.tolist() for name, values in cosines.items()},
        "texts": len(texts),
        "seconds": stats.seconds,
        "seconds_per_text": stats.seconds_per_text,
        "copy_rate": stats.copy_rate,
        "finish_rate": stats.finish_rate,
        "mean_length": stats.mean_length,
        "examples": stats.examples,
    }


def paired_difference(
    result: dict[str, Any], reference: dict[str, Any], dev_sets: dict[str, Sequence[Pair]], resamples: int, seed: int
) -> dict[str, Any]:
    """``result["mean"] - reference["mean"]`` with a paired bootstrap 95% interval (the same resamples for both)."""
    golds = [np.asarray([float(pair[2]) for pair in pairs]) for pairs in dev_sets.values()]
    indices = bootstrap_indices([len(pairs) for pairs in dev_sets.values()], resamples, seed)
    ours = bootstrap_means([np.asarray(result["cosines"][name]) for name in dev_sets], golds, indices)
    theirs = bootstrap_means([np.asarray(reference["cosines"][name]) for name in dev_sets], golds, indices)
    return {"delta": result["mean"] - reference["mean"], **percentile_interval(ours - theirs)}


def compare(
    rows: Sequence[Row],
    dev_sets: dict[str, Sequence[Pair]],
    *,
    batch_size: int = 16,
    resamples: int = 1000,
    seed: int = 0,
    device: str | None = "cpu",
    on_row=None,
) -> dict[str, Any]:
    """Score every row; rows whose module options are missing are listed under ``"skipped"`` with the reason.

    Every model is built once before any is scored, so a bad folder or option fails in seconds, not after an hour.

    Args:
        rows: the rows (:func:`comparison_rows`).
        dev_sets: ``{name: pairs}``.
        batch_size, resamples, seed: see :func:`score_model`.
        device: where models are loaded. Defaults to ``"cpu"``.
        on_row: called with the results so far after each row (e.g. to save them), or None.

    Returns:
        ``{"sets": {name: number of pairs}, "rows": {label: score_model(...) + delta_vs_promptEOL},
        "skipped": {label: reason}}``.
    """
    labels = [row.label for row in rows]
    if len(set(labels)) != len(labels):
        raise ValueError(f"Row labels must be distinct; got {labels}.")
    results: dict[str, Any] = {"sets": {k: len(v) for k, v in dev_sets.items()}, "rows": {}, "skipped": {}}
    runnable = []
    for row in rows:
        missing = missing_features(row.needs)
        if row.skip or missing:
            reason = row.skip or f"this grace_st lacks the module option(s) {missing}"
            logger.warning("Skipping row %r: %s.", row.label, reason)
            results["skipped"][row.label] = reason
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
    for group in groups.values():
        logger.info("Scoring %s on %d sets.", [row.label for row in group], len(dev_sets))
        model = build_row_model(group[0], device)
        kwargs = {"batch_size": batch_size, "resamples": resamples, "seed": seed}
        if len(group) == 1:
            scored = [score_model(model, dev_sets, **kwargs)]
        else:
            scored = score_model(model, dev_sets, readouts=[row.pooling_mode for row in group], **kwargs)
        del model
        for row, result in zip(group, scored, strict=True):
            if len(group) > 1:
                result["shared_generation_with"] = [other.label for other in group if other is not row]
            results["rows"][row.label] = result
            logger.info("%s: mean %.4f", row.label, result["mean"])
        if on_row is not None:
            on_row(results)
    reference = results["rows"].get(PROMPTEOL_ROW)
    if reference is not None:
        for label, result in results["rows"].items():
            if label != PROMPTEOL_ROW:
                result["delta_vs_promptEOL"] = paired_difference(result, reference, dev_sets, resamples, seed)
    return results


def comparison_markdown(results: dict[str, Any]) -> str:
    """The comparison table: per-set Spearman, mean, its 95% interval, Δ vs PromptEOL, rationale numbers, time."""
    sets = list(results["sets"])
    header = ["row", *sets, "mean", "95% CI", "Δ PromptEOL [95% CI]", "copy", "finish", "length", "s/text"]
    table_rows = []
    for label, r in results["rows"].items():
        ci = r["ci95"]
        interval = f"[{format_cell(ci['low'])}, {format_cell(ci['high'])}]"
        delta = r.get("delta_vs_promptEOL")
        delta_cell = (
            f"{delta['delta']:+.3f} [{format_cell(delta['low'])}, {format_cell(delta['high'])}]" if delta else None
        )
        table_rows.append(
            [
                label,
                *(r["spearman"][name] for name in sets),
                r["mean"],
                interval,
                delta_cell,
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
