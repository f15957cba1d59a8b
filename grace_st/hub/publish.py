"""Assemble a GRACE model folder for the Hugging Face Hub and upload it.

:func:`build_publish_folder` writes exactly what gets uploaded: the safetensors weights, the sentence-transformers
configs and tokenizer files, ``grace_st.py`` (the module code, so the model loads with plain sentence-transformers
and ``trust_remote_code=True`` where grace_st is not installed), the mteb results of this model, and the model card
(:mod:`grace_st.hub.model_card`). :func:`upload_folder` pushes such a folder with ``huggingface_hub.HfApi`` and
then pins the card's usage snippet to the commit it made; the token comes from the usual places (``HF_TOKEN``,
``hf auth login``) and is never printed or logged.

mteb results are read with mteb's own ``ResultCache`` and ``TaskResult`` (the eval extra), as evaluation reads them.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from grace_st.artifacts import (
    DIAGNOSTICS_FOLDER,
    EXCLUDED_ROOT_FILES,
    MODEL_FILE_SUFFIXES,
    RESULTS_FOLDER,
    folder_revision,
)
from grace_st.hub.model_card import REVISION_PLACEHOLDER, render_card
from grace_st.model import CORE_FILES, MODULE_FILE_NAME
from grace_st.model_kind import folder_kind
from grace_st.readers import read_json

logger = logging.getLogger(__name__)

EXAMPLE_TEXTS: tuple[str, ...] = (
    "A man is playing a guitar on stage.",
    "The central bank raised interest rates by half a point to curb inflation.",
    "How do I reset a forgotten email password?",
)
_CODE_FILES = tuple(CORE_FILES)  # the model's remote code, written by model.save()


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
        and ((p.suffix in MODEL_FILE_SUFFIXES and p.name not in EXCLUDED_ROOT_FILES) or p.name in _CODE_FILES)
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
    """The mteb results folder (``results/<model>/<revision>``) of a model revision under an mteb output dir.

    The folders are listed by mteb's ``ResultCache`` (the cache evaluation writes), local results only.
    """
    cache = _mteb().ResultCache(cache_path=results_dir)
    paths = cache.get_cache_paths(require_model_meta=False, include_remote=False)
    matches = sorted({path.parent for path in paths if path.parent.name == revision})
    if len(matches) > 1:
        logger.warning("Several result folders for revision %s: %s; using %s", revision, matches, matches[0])
    return matches[0] if matches else None


def read_results(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Main scores of every task result in an mteb results folder (one model revision, no experiment overrides).

    Returns:
        One dict per task: ``task``, ``type``, ``dataset``, ``split``, ``metric``, ``score`` (0-1), ``revision``
        and the rationale ``diagnostics`` written by :func:`grace_st.evaluation.mteb_evaluation.evaluate_model` (if
        any).
    """
    folder = Path(folder)
    rows = []
    for path in sorted(folder.glob("*.json")):
        if path.name == "model_meta.json":
            continue
        if not {"scores", "task_name"} <= set(read_json(path)):
            continue  # not a task result
        result = _mteb().TaskResult.from_disk(path)
        sidecar = read_json(folder / DIAGNOSTICS_FOLDER / path.name)
        task = sidecar.get("task") or _registry_task_info(result.task_name)
        for split in result.scores:
            rows.append(
                {
                    "task": result.task_name,
                    "type": task.get("type", "unknown"),
                    "dataset": task.get("dataset") or f"local/{result.task_name}",
                    "split": split,
                    "metric": task.get("main_score", "main_score"),
                    "score": float(result.get_score(splits=[split])),
                    "revision": result.dataset_revision,
                    "diagnostics": sidecar.get("stats"),
                }
            )
    return rows


def _mteb():
    """mteb, which reads and lists the results (the eval extra)."""
    try:
        import mteb
    except ImportError as error:
        raise ImportError('Reading mteb results needs the eval extra: pip install "grace-st[eval]"') from error
    return mteb


def _registry_task_info(name: str) -> dict[str, Any]:
    """Type, dataset and main score of an mteb registry task (results written by plain mteb have no sidecar)."""
    try:
        metadata = _mteb().get_task(name).metadata
    except KeyError:
        return {}
    return {"type": metadata.type, "dataset": metadata.dataset["path"], "main_score": metadata.main_score}


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
