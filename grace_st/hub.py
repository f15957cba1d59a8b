"""Assemble a GRACE model folder for the Hugging Face Hub and upload it.

:func:`build_publish_folder` writes exactly what gets uploaded: the safetensors weights, the sentence-transformers
configs and tokenizer files, ``grace_st.py`` (the module code, so the model loads with plain sentence-transformers
and ``trust_remote_code=True`` where grace_st is not installed), the mteb results of this model, and a model card
with a Hub-readable ``model-index``, rendered from the template shipped as package data
(``grace_st/templates/grace_model_card.md``, a copy of ``model_cards/grace_model_card.md`` that a test keeps
identical). :func:`upload_folder` pushes such a folder with ``huggingface_hub.HfApi`` and then pins the card's usage
snippet to the commit it made; the token comes from the usual places (``HF_TOKEN``, ``hf auth login``) and is never
printed or logged.

This module does not need mteb: results are read from mteb's JSON files directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from grace_st.backbone import DEFAULT_BACKBONE_HUB_ID, DEFAULT_BACKBONE_LICENSE
from grace_st.model import CORE_FILES, MODULE_FILE_NAME
from grace_st.model_kind import folder_kind, folder_parameters
from grace_st.tables import format_cell, markdown_table

logger = logging.getLogger(__name__)

TRAINING_INFO_FILE = "grace_training.json"
RESULTS_FOLDER = "results"
DIAGNOSTICS_FOLDER = "grace_diagnostics"
GRACE_CITATION = """@article{grace2025,
  title   = {GRACE: Generative Representation Learning via Contrastive Policy Optimization},
  journal = {arXiv preprint arXiv:2510.04506},
  year    = {2025},
  url     = {https://arxiv.org/abs/2510.04506}
}"""
# Package data; ``model_cards/grace_model_card.md`` in the checkout is the copy people edit (tests/test_packaging.py).
TEMPLATE_RESOURCE = ("templates", "grace_model_card.md")
# Written into the card's usage snippet until the upload knows the commit; upload_folder replaces it with the hash.
REVISION_PLACEHOLDER = "<commit hash of this upload>"
# Licences of backbones whose licence is known, used when neither the caller nor the training record names one.
KNOWN_BACKBONE_LICENSES = {DEFAULT_BACKBONE_HUB_ID: DEFAULT_BACKBONE_LICENSE}
EXAMPLE_TEXTS: tuple[str, ...] = (
    "A man is playing a guitar on stage.",
    "The central bank raised interest rates by half a point to curb inflation.",
    "How do I reset a forgotten email password?",
)
# Top-level files of a saved GRACE model that belong in the published repo (weights, configs, tokenizer).
_ROOT_SUFFIXES = (".json", ".safetensors", ".jinja", ".txt", ".model")
_EXCLUDED_ROOT_FILES = {"README.md", "trainer_state.json", "training_args.json"}
_CODE_FILES = tuple(CORE_FILES)  # the model's remote code, written by model.save()
# Hub repo ids as the Hub accepts them (``org/name``); anything else in a training record is described as local.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]$")
_LOCAL_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet", ".arrow")


def default_template() -> str:
    """Text of the model card template shipped with grace_st (package data)."""
    return resources.files("grace_st").joinpath(*TEMPLATE_RESOURCE).read_text(encoding="utf-8")


def folder_revision(folder: str | os.PathLike) -> str:
    """Content hash (12 hex digits) of a model folder's configs and weights; the mteb revision of a local model.

    Files are hashed with their relative paths, so a copied or published folder keeps its revision and a retrained
    one does not. The card, the module code, results and hidden files are left out: they do not change embeddings.
    """
    folder = Path(folder)
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = file.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in relative.split("/")) or relative.split("/")[0] == RESULTS_FOLDER:
            continue
        if relative in _EXCLUDED_ROOT_FILES or file.suffix not in _ROOT_SUFFIXES:
            continue
        digest.update(relative.encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def model_files(model_path: str | os.PathLike) -> list[Path]:
    """Files of a saved GRACE model that belong in its repo, relative to the folder.

    Root configs, safetensors weights, tokenizer and chat-template files, the module file ``grace_st.py`` if the
    model was saved with one, and the folders of the modules listed in ``modules.json``; trainer state, checkpoints,
    pickled weights and old cards are left out.

    Raises:
        ValueError: the folder is not a saved GRACE model, or it holds pickled (``.bin``/``.pt``) weights only.
    """
    folder = Path(model_path)
    if not (folder / "modules.json").is_file():
        raise ValueError(
            f"{folder} is not a saved SentenceTransformer (no modules.json). Build and save a GRACE model first, e.g. "
            "grace_st.from_backbone(path).save(folder)."
        )
    if folder_kind(folder) != "grace":
        raise ValueError(f"{folder} is not a GRACE model: modules.json names no grace_st module.")
    entries = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    files = [
        p.relative_to(folder)
        for p in sorted(folder.iterdir())
        if p.is_file()
        and ((p.suffix in _ROOT_SUFFIXES and p.name not in _EXCLUDED_ROOT_FILES) or p.name in _CODE_FILES)
    ]
    if not any(p.suffix == ".safetensors" for p in files):
        raise ValueError(f"{folder} has no .safetensors weights; GRACE models are published as safetensors only.")
    missing = sorted(name for name in _CODE_FILES if not (folder / name).is_file())
    if missing:
        raise ValueError(
            f"{folder} lacks the module code {missing} (saved by an older grace_st): load it with "
            "SentenceTransformer(folder, trust_remote_code=True) and save it again with model.save()."
        )
    for entry in entries:
        if entry.get("path"):
            sub = folder / entry["path"]
            files += [p.relative_to(folder) for p in sorted(sub.rglob("*")) if p.is_file()]
    return files


# ---------------------------------------------------------------------------------------------------------- results
def find_results(results_dir: str | os.PathLike, revision: str) -> Path | None:
    """The mteb results folder (``results/<model>/<revision>``) of a model revision under an mteb output dir."""
    matches = sorted(Path(results_dir).glob(f"results/*/{revision}"))
    if len(matches) > 1:
        logger.warning("Several result folders for revision %s: %s; using %s", revision, matches, matches[0])
    return matches[0] if matches else None


def read_results(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Main scores of every task result in an mteb results folder (one model revision, no experiment overrides).

    Returns:
        One dict per task: ``task``, ``type``, ``dataset``, ``split``, ``metric``, ``score`` (0-1), ``revision``
        and the rationale ``diagnostics`` written by :func:`grace_st.evaluation.evaluate_model` (if any).
    """
    folder = Path(folder)
    rows = []
    for path in sorted(folder.glob("*.json")):
        if path.name == "model_meta.json":
            continue
        result = json.loads(path.read_text(encoding="utf-8"))
        if "scores" not in result or "task_name" not in result:
            continue
        sidecar = _read_json(folder / DIAGNOSTICS_FOLDER / path.name)
        task = sidecar.get("task") or _registry_task_info(result["task_name"])
        for split, entries in result["scores"].items():
            values = [entry["main_score"] for entry in entries]
            rows.append(
                {
                    "task": result["task_name"],
                    "type": task.get("type", "unknown"),
                    "dataset": task.get("dataset") or f"local/{result['task_name']}",
                    "split": split,
                    "metric": task.get("main_score", "main_score"),
                    "score": sum(values) / len(values),
                    "revision": result.get("dataset_revision"),
                    "diagnostics": sidecar.get("stats"),
                }
            )
    return rows


def _registry_task_info(name: str) -> dict[str, Any]:
    """Type, dataset and main score of an mteb registry task (results written by plain mteb have no sidecar)."""
    try:
        import mteb

        metadata = mteb.get_task(name).metadata
    except (ImportError, KeyError):
        return {}
    return {"type": metadata.type, "dataset": metadata.dataset["path"], "main_score": metadata.main_score}


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


# ---------------------------------------------------------------------------------------------------------- the card
def _examples_and_latency(model_path: Path, texts: Sequence[str], device: str | None) -> dict[str, Any]:
    """Generate rationales for a few texts with the saved model and time it (for the card)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_path), trust_remote_code=True, device=device)
    model.encode(texts[:1])  # warm-up: first-call overheads are not what a user pays per text
    tick = time.perf_counter()
    outputs = model.encode(list(texts), output_value=None, batch_size=len(texts))
    seconds = time.perf_counter() - tick
    module = model[0]
    lengths = [int(o["rationale_mask"].sum()) for o in outputs]
    return {
        "examples": [
            {"text": t, "rationale": _rationale_text(module, o)} for t, o in zip(texts, outputs, strict=True)
        ],
        "seconds_per_text": seconds / len(texts),
        "rationale_tokens": sum(lengths) / len(lengths),
        "device": _describe_device(model.device),
        "max_new_tokens": module.max_new_tokens,
    }


def _rationale_text(module: Any, output: dict[str, Any]) -> str:
    """The rationale of one ``encode(..., output_value=None)`` item; the card's usage snippet shows the same read."""
    return module.decode_rationale(output).strip()


def _describe_device(device: Any) -> str:
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(device)
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{device} ({platform.machine()}, {torch.get_num_threads()} threads{load})"


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
    grace_config = _read_json(folder / "grace_config.json")
    pooling = next((_read_json(p) for p in folder.glob("*_RationalePooling/config.json")), {})
    config = _read_json(folder / "config.json")
    st_config = _read_json(folder / "config_sentence_transformers.json")
    training = training_summary(_read_json(folder / TRAINING_INFO_FILE), config)
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


_RECORD_TYPES: dict[str, type | tuple[type, ...]] = {
    "grace_st_version": str,
    "base_model": str,
    "base_model_source": str,
    "training_datasets": list,
    "license": str,
    "global_step": int,
    "reward": dict,
    "generation": dict,
    "config": dict,
    "grace_model_name": str,
}


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
    for key, expected in _RECORD_TYPES.items():
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


# ---------------------------------------------------------------------------------------------------------- publish
def build_publish_folder(
    model_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    repo_id: str | None = None,
    results_dir: str | os.PathLike | None = None,
    comparison: str | os.PathLike | None = None,
    template: str | os.PathLike | None = None,
    measure_examples: bool = True,
    device: str | None = None,
    license: str | None = None,
) -> Path:
    """Write the folder that :func:`upload_folder` pushes: model files, ``grace_st.py``, results and the card.

    Args:
        model_path: a saved GRACE model (``model.save(path)`` or a trainer's output).
        output_dir: where to write; must not exist or be empty.
        repo_id: the Hub id the model will have (``org/name``).
        results_dir: an mteb output dir (``eval/mteb_run.py --output-dir``) holding results of this exact model
            (matched by :func:`folder_revision`); copied to ``results/`` and shown in the card.
        comparison: a markdown comparison table file to show in the card.
        template: model card template file; defaults to the shipped template (:func:`default_template`).
        measure_examples: generate rationales for a few example texts and time them for the card. Defaults to True.
        device: device for that measurement.
        license: SPDX id for the card metadata.

    Returns:
        The folder.
    """
    source = Path(model_path)
    final = Path(output_dir)
    if final.exists() and any(final.iterdir()):
        raise FileExistsError(f"{final} is not empty; choose a new --dry-run folder.")
    files = model_files(source)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed at the end, so a failed build never leaves a half-written folder.
    target = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        _fill_publish_folder(
            source, target, files, repo_id, results_dir, comparison, template, measure_examples, device, license
        )
        if final.exists():
            final.rmdir()
        os.replace(target, final)
    finally:
        shutil.rmtree(target, ignore_errors=True)
    return final


def _fill_publish_folder(
    source: Path,
    target: Path,
    files: list[Path],
    repo_id: str | None,
    results_dir: str | os.PathLike | None,
    comparison: str | os.PathLike | None,
    template: str | os.PathLike | None,
    measure_examples: bool,
    device: str | None,
    license: str | None,
) -> None:
    for relative in files:
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / relative, target / relative)

    rows: list[dict[str, Any]] = []
    if results_dir is not None:
        revision = folder_revision(source)
        found = find_results(results_dir, revision)
        if found is None:
            logger.warning(
                "No mteb results for revision %s under %s; the card will have no MTEB table.", revision, results_dir
            )
        else:
            shutil.copytree(found, target / RESULTS_FOLDER, ignore=shutil.ignore_patterns("experiments"))
            rows = read_results(found)
    table = Path(comparison).read_text(encoding="utf-8") if comparison else None
    examples = _examples_and_latency(target, EXAMPLE_TEXTS, device) if measure_examples else None
    card = render_card(target, repo_id, rows, table, template, examples, license)
    (target / "README.md").write_text(card, encoding="utf-8")
    if folder_revision(target) != folder_revision(source):
        raise RuntimeError("The publish folder's model files differ from the source model; refusing to continue.")


def upload_folder(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str = "Upload GRACE model",
) -> str:
    """Create the model repo if needed, upload a publish folder to it, and pin the card to that commit.

    The card's usage snippet loads remote code (``grace_st.py``), so it shows ``revision=`` with a commit hash; that
    hash is known only once the folder is committed. When the card still holds :data:`REVISION_PLACEHOLDER`, a second
    commit replaces it in ``README.md`` with the hash of the first (the commit that holds the code and weights). The
    local folder is not changed.

    Args:
        folder: output of :func:`build_publish_folder`.
        repo_id: ``org/name``.
        private: create the repo as private. Defaults to False.
        token: Hub token; None uses ``HF_TOKEN`` or the stored ``hf auth login`` token. It is never printed.
        endpoint: Hub endpoint; None uses ``$HF_ENDPOINT`` (read at call time) or huggingface.co.
        commit_message: the commit message.

    Returns:
        The URL of the commit that holds the code and weights (the revision the card pins).
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "README.md").is_file() or not (folder / MODULE_FILE_NAME).is_file():
        raise ValueError(f"{folder} does not look like a publish folder (README.md and {MODULE_FILE_NAME} expected).")
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=commit_message
    )
    logger.info("Uploaded %s to %s (commit %s)", folder, repo_id, info.oid)
    card = (folder / "README.md").read_text(encoding="utf-8")
    if REVISION_PLACEHOLDER in card:
        api.upload_file(
            path_or_fileobj=card.replace(REVISION_PLACEHOLDER, info.oid).encode("utf-8"),
            path_in_repo="README.md",
            repo_id=repo_id,
            repo_type="model",
            commit_message=f"Pin the model card's usage snippet to revision {info.oid}",
            parent_commit=info.oid,
        )
        logger.info("Pinned the card's usage snippet of %s to revision %s", repo_id, info.oid)
    return str(info.commit_url)
