"""The model card of a GRACE model: rendered from the template shipped as package data, with a Hub-readable
``model-index``.

The template is ``grace_st/templates/grace_model_card.md``, a copy of ``model_cards/grace_model_card.md`` that a test
keeps identical. The card says what made the model (from its training record, :data:`grace_st.artifacts.
TRAINING_INFO_FILE`), shows its mteb results and comparison table, and pins its usage snippet to a revision.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from grace_st.artifacts import GRACE_CITATION, GRACE_CONFIG_FILE, HUB_ID, TRAINING_INFO_FILE, TRAINING_RECORD_TYPES
from grace_st.backbone import DEFAULT_BACKBONE_HUB_ID, DEFAULT_BACKBONE_LICENSE
from grace_st.model_kind import folder_parameters
from grace_st.readers import read_json
from grace_st.tables import format_cell, markdown_table

# Package data; ``model_cards/grace_model_card.md`` in the checkout is the copy people edit (tests/test_packaging.py).
TEMPLATE_RESOURCE = ("templates", "grace_model_card.md")


# Written into the card's usage snippet until the upload knows the commit; upload_folder replaces it with the hash.
REVISION_PLACEHOLDER = "<commit hash of this upload>"


# Licences of backbones whose licence is known, used when neither the caller nor the training record names one.
KNOWN_BACKBONE_LICENSES = {DEFAULT_BACKBONE_HUB_ID: DEFAULT_BACKBONE_LICENSE}


# What each RationalePooling mode reads, for the card's "pooling" row (POOLING_MODES of grace_st.model.options).
READOUTS: dict[str, str] = {
    "mean": "the mean of the last hidden states over user text + rationale",
    "lasttoken": "the last hidden state of the rationale's closing token (of the prompt without a rationale)",
    "summary": "the last hidden state of the summary suffix fed after user text + rationale",
    "mean+summary": "the sum of the unit mean over user text + rationale and the unit summary-suffix state after it",
    "mean+summary+text_summary": (
        "the sum of the unit mean over user text + rationale, the unit summary-suffix state after it and the unit "
        "summary-suffix state after the user text alone (no rationale)"
    ),
}
_LOCAL_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet", ".arrow")


def default_template() -> str:
    """Text of the model card template shipped with grace_st (package data)."""
    return resources.files("grace_st").joinpath(*TEMPLATE_RESOURCE).read_text(encoding="utf-8")


def results_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`read_results` rows (scores ×100) with rationale diagnostics."""
    header = ["task", "type", "split", "metric", "score", "copy rate", "mean length", "finish rate"]
    cells = []
    for row in rows:
        stats = row.get("diagnostics") or {}
        cells.append(
            [
                row["task"],
                row["type"],
                row["split"],
                row["metric"],
                format_cell(row["score"], 2, scale=100),
                format_cell(stats.get("copy_rate"), 2),
                format_cell(stats.get("mean_length"), 1),
                format_cell(stats.get("finish_rate"), 2),
            ]
        )
    return markdown_table(header, cells)


def eval_results(rows: Sequence[dict[str, Any]]) -> list[Any]:
    """``huggingface_hub.EvalResult`` s for the card's ``model-index`` (scores ×100, as on the MTEB leaderboard)."""
    from huggingface_hub import EvalResult

    return [
        EvalResult(
            task_type=row["type"],
            dataset_type=row["dataset"],
            dataset_name=f"MTEB {row['task']}",
            dataset_config="default",
            dataset_split=row["split"],
            dataset_revision=row["revision"],
            metric_type=row["metric"],
            metric_value=round(100 * row["score"], 4),
        )
        for row in rows
    ]


def render_card(
    model_path: str | os.PathLike,
    repo_id: str | None = None,
    results: Sequence[dict[str, Any]] = (),
    comparison: str | None = None,
    template: str | os.PathLike | None = None,
    examples: dict[str, Any] | None = None,
    license: str | None = None,
    revision: str | None = None,
) -> str:
    """Render the GRACE model card (README.md text) for a saved model.

    Args:
        model_path: the saved GRACE model.
        repo_id: the Hub id it will have (``org/name``); the card's usage snippet and model-index use it.
        results: rows from :func:`read_results`; they become the MTEB table and the ``model-index`` metadata.
        comparison: a markdown comparison table (e.g. ``comparison.md`` written by ``eval/mteb_run.py``).
        template: Jinja template file; defaults to the shipped template (:func:`default_template`).
        examples: output of the example/latency measurement (rationales and seconds per text), if measured.
        license: SPDX id for the card metadata; defaults to the training record's ``license``, else the licence of
            a known backbone (:data:`KNOWN_BACKBONE_LICENSES`).
        revision: the Hub commit the usage snippet pins; defaults to :data:`REVISION_PLACEHOLDER`, which
            :func:`upload_folder` replaces with the commit it makes.

    Returns:
        The card text: YAML metadata (parseable by ``huggingface_hub.ModelCard``) and the rendered body.

    Raises:
        FileNotFoundError: ``template`` does not exist.
        ValueError: the training record (``grace_training.json``) has a field of the wrong type.
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(model_path)
    if template is not None and not Path(template).is_file():
        raise FileNotFoundError(f"Model card template {template} not found; pass an existing file or None.")
    template_text = Path(template).read_text(encoding="utf-8") if template is not None else default_template()
    grace_config = read_json(folder / GRACE_CONFIG_FILE)
    pooling = next((read_json(p) for p in folder.glob("*_RationalePooling/config.json")), {})
    config = read_json(folder / "config.json")
    st_config = read_json(folder / "config_sentence_transformers.json")
    training = training_summary(read_json(folder / TRAINING_INFO_FILE), config)
    base_model = training["base_model"] if training else _hub_id(config.get("_name_or_path"))
    name = repo_id or (training or {}).get("model_name") or folder.name
    license = license or (training or {}).get("license") or KNOWN_BACKBONE_LICENSES.get(base_model or "")
    card_data = ModelCardData(
        model_name=name,
        language=["en"],
        license=license,
        library_name="sentence-transformers",
        pipeline_tag="sentence-similarity",
        tags=["sentence-transformers", "sentence-similarity", "feature-extraction", "grace", "mteb"],
        base_model=base_model,
        datasets=(training or {}).get("hub_datasets") or None,
        eval_results=eval_results(results) or None,
    )
    return str(
        ModelCard.from_template(
            card_data,
            template_str=template_text,
            model_name=name,
            repo_id=repo_id or f"<org>/{folder.name}",
            revision=revision or REVISION_PLACEHOLDER,
            base_model=base_model or (training or {}).get("base_model_text") or "unknown",
            grace_config=grace_config,
            pooling_mode=pooling.get("pooling_mode", "mean"),
            readout=READOUTS.get(pooling.get("pooling_mode", "mean"), "see the folder's RationalePooling config"),
            embed_dim=config.get("hidden_size"),
            n_parameters=folder_parameters(folder)[0],
            prompts={k: v for k, v in (st_config.get("prompts") or {}).items() if v},
            training=training,
            results=list(results),
            results_table=results_table(results) if results else None,
            comparison=comparison,
            examples=examples,
            citation=GRACE_CITATION,
        )
    )


def _hub_id(value: Any) -> str | None:
    """``value`` if it reads as a Hub repo id (``org/name``, not an existing local path), else None."""
    if not isinstance(value, str) or not HUB_ID.match(value) or Path(value).expanduser().exists():
        return None
    if value.lower().endswith(_LOCAL_DATA_SUFFIXES):
        return None
    return value


def _describe_data_source(source: str) -> tuple[str, str | None]:
    """Card text for one training data source as the trainer recorded it, and its Hub dataset id (None if local)."""
    if source == "demo":
        return "the demo triplets bundled with grace_st (`grace_st/data/demo_train.jsonl`)", None
    if source.startswith("sick:"):
        return f"SICK triplets built from a local copy of `{Path(source[len('sick:') :]).name}`", None
    hub_id = _hub_id(source)
    if hub_id is not None:
        return f"[{hub_id}](https://huggingface.co/datasets/{hub_id}) (Hub dataset)", hub_id
    return f"local file `{Path(source).name}`", None


def training_summary(record: dict[str, Any], config: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """What the card says about how a model was made, from its training record (``grace_training.json``).

    Args:
        record: the training record the trainer saved with the model (``{}`` when there is none).
        config: the model's ``config.json``; its ``_name_or_path`` names the base model when the record has no Hub
            id for it.

    Returns:
        None for an untrained model (no record); else a dict with ``base_model`` (Hub id or None),
        ``base_model_text`` (how the card names it), ``data`` (card text per source), ``hub_datasets`` (Hub ids only,
        for the card metadata), ``global_step``, ``license``, ``model_name``, ``grace_st_version``, ``settings`` (a
        markdown table of the reward and generation settings), ``system_prompt`` (of the training rollouts) and
        ``config_json`` (the full training configuration, token values redacted).

    Raises:
        ValueError: a known field of the record has the wrong type.

    Example:
        >>> summary = training_summary({"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        ...                             "training_datasets": ["sick:/data/SICK_train.txt", "org/triplets"]})
        >>> summary["base_model"], summary["hub_datasets"]
        ('HuggingFaceTB/SmolLM2-135M-Instruct', ['org/triplets'])
    """
    if not record:
        return None
    for key, expected in TRAINING_RECORD_TYPES.items():
        value = record.get(key)
        if value is not None and (not isinstance(value, expected) or isinstance(value, bool) and expected is int):
            raise ValueError(
                f"{TRAINING_INFO_FILE}: {key!r} is {value!r} ({type(value).__name__}); expected {expected.__name__}."
            )
    sources = record.get("training_datasets") or []
    if not all(isinstance(source, str) for source in sources):
        raise ValueError(f"{TRAINING_INFO_FILE}: 'training_datasets' must be a list of strings, got {sources!r}.")
    described = [_describe_data_source(source) for source in sources]
    # ``base_model`` is the Hub id (None when the trainer knew none); ``base_model_source`` what the trainer was given.
    sources_of_base = [record.get("base_model"), record.get("base_model_source")]
    base_model = next(filter(None, map(_hub_id, sources_of_base)), None) or _hub_id(
        (config or {}).get("_name_or_path")
    )
    local_base = next((source for source in sources_of_base if source), None)
    if base_model is not None:
        base_text = base_model
    elif local_base:
        base_text = f"local folder {Path(local_base).name}"
    else:
        base_text = "unknown"
    generation = dict(record.get("generation") or {})
    system_prompt = generation.pop("system_prompt", None)  # shown as text below the table, not as a cell
    settings = [(f"reward: {key}", value) for key, value in sorted((record.get("reward") or {}).items())]
    settings += [(f"generation: {key}", value) for key, value in sorted(generation.items())]
    return {
        "base_model": base_model,
        "base_model_text": base_text,
        "data": [text for text, _ in described] or ["not recorded"],
        "hub_datasets": [hub_id for _, hub_id in described if hub_id is not None],
        "global_step": record.get("global_step"),
        "license": record.get("license"),
        "model_name": record.get("grace_model_name"),
        "grace_st_version": record.get("grace_st_version") or "unknown",
        "system_prompt": system_prompt,
        "settings": markdown_table(["setting", "value"], [(k, _setting_text(v)) for k, v in settings])
        if settings
        else None,
        "config_json": json.dumps(_redact(record["config"]), indent=2, sort_keys=True)
        if record.get("config")
        else None,
    }


def _setting_text(value: Any) -> str:
    """A setting as one table cell (strings quoted, so an empty or multi-line system prompt stays visible)."""
    text = json.dumps(value) if isinstance(value, str) or value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _redact(config: dict[str, Any]) -> dict[str, Any]:
    """The training configuration without secrets: values of ``*token`` fields (e.g. ``hub_token``) are redacted."""
    return {
        key: "<redacted>" if key.lower().endswith("token") and isinstance(value, str) and value else value
        for key, value in config.items()
    }
