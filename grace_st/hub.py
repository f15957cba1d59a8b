"""Assemble a GRACE model folder for the Hugging Face Hub and upload it.

:func:`build_publish_folder` writes exactly what gets uploaded: the safetensors weights, the sentence-transformers
configs and tokenizer files, ``grace_st.py`` (a copy of :mod:`grace_st.modeling`, so the model loads with plain
sentence-transformers and ``trust_remote_code=True`` where grace_st is not installed), the mteb results of this
model, and a model card rendered from ``model_cards/grace_model_card.md`` with a Hub-readable ``model-index``.
:func:`upload_folder` pushes such a folder with ``huggingface_hub.HfApi``; the token comes from the usual places
(``HF_TOKEN``, ``hf auth login``) and is never printed or logged.

This module does not need mteb: results are read from mteb's JSON files directly.
"""

from __future__ import annotations

import hashlib
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

logger = logging.getLogger(__name__)

MODULE_FILE_NAME = "grace_st.py"
TRAINING_INFO_FILE = "grace_training.json"
RESULTS_FOLDER = "results"
DIAGNOSTICS_FOLDER = "grace_diagnostics"
GRACE_CITATION = """@article{grace2025,
  title   = {GRACE: Generative Representation Learning via Contrastive Policy Optimization},
  journal = {arXiv preprint arXiv:2510.04506},
  year    = {2025},
  url     = {https://arxiv.org/abs/2510.04506}
}"""
DEFAULT_TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "grace_model_card.md"
EXAMPLE_TEXTS: tuple[str, ...] = (
    "A man is playing a guitar on stage.",
    "The central bank raised interest rates by half a point to curb inflation.",
    "How do I reset a forgotten email password?",
)
# Top-level files of a saved GRACE model that belong in the published repo (weights, configs, tokenizer).
_ROOT_SUFFIXES = (".json", ".safetensors", ".jinja", ".txt", ".model")
_EXCLUDED_ROOT_FILES = {"README.md", MODULE_FILE_NAME, "trainer_state.json", "training_args.json"}


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

    Root configs, safetensors weights, tokenizer and chat-template files, and the folders of the modules listed in
    ``modules.json``; trainer state, checkpoints, pickled weights and old cards are left out.

    Raises:
        ValueError: the folder is not a saved GRACE model, or it holds pickled (``.bin``/``.pt``) weights only.
    """
    folder = Path(model_path)
    modules = folder / "modules.json"
    if not modules.is_file():
        raise ValueError(
            f"{folder} is not a saved SentenceTransformer (no modules.json). Build and save a GRACE model first, e.g. "
            "grace_st.from_backbone(path).save(folder)."
        )
    entries = json.loads(modules.read_text(encoding="utf-8"))
    if not any(entry.get("type", "").startswith("grace_st.") for entry in entries):
        raise ValueError(f"{folder} is not a GRACE model: modules.json names no grace_st module.")
    files = [
        p.relative_to(folder)
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix in _ROOT_SUFFIXES and p.name not in _EXCLUDED_ROOT_FILES
    ]
    if not any(p.suffix == ".safetensors" for p in files):
        raise ValueError(f"{folder} has no .safetensors weights; GRACE models are published as safetensors only.")
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
    lines = [
        "| task | type | split | metric | score | copy rate | mean length | finish rate |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        stats = row.get("diagnostics") or {}

        def fmt(key: str, digits: int = 2, stats=stats) -> str:
            value = stats.get(key)
            return "–" if value is None else f"{value:.{digits}f}"

        lines.append(
            f"| {row['task']} | {row['type']} | {row['split']} | {row['metric']} | {100 * row['score']:.2f} | "
            f"{fmt('copy_rate')} | {fmt('mean_length', 1)} | {fmt('finish_rate')} |"
        )
    return "\n".join(lines) + "\n"


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
            {"text": t, "rationale": module.decode_rationale(o).strip()} for t, o in zip(texts, outputs, strict=True)
        ],
        "seconds_per_text": seconds / len(texts),
        "rationale_tokens": sum(lengths) / len(lengths),
        "device": _describe_device(model.device),
        "max_new_tokens": module.max_new_tokens,
    }


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
) -> str:
    """Render the GRACE model card (README.md text) for a saved model.

    Args:
        model_path: the saved GRACE model.
        repo_id: the Hub id it will have (``org/name``); the card's usage snippet and model-index use it.
        results: rows from :func:`read_results`; they become the MTEB table and the ``model-index`` metadata.
        comparison: a markdown comparison table (e.g. ``comparison.md`` written by ``eval/mteb_run.py``).
        template: Jinja template; defaults to ``model_cards/grace_model_card.md``.
        examples: output of the example/latency measurement (rationales and seconds per text), if measured.
        license: SPDX id for the card metadata; defaults to ``grace_training.json``'s ``license``, else the
            backbone's.

    Returns:
        The card text: YAML metadata (parseable by ``huggingface_hub.ModelCard``) and the rendered body.
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(model_path)
    template = Path(template) if template else DEFAULT_TEMPLATE
    if not template.is_file():
        raise FileNotFoundError(f"Model card template {template} not found; pass template=PATH.")
    grace_config = _read_json(folder / "grace_config.json")
    pooling = next((_read_json(p) for p in folder.glob("*_RationalePooling/config.json")), {})
    config = _read_json(folder / "config.json")
    training = _read_json(folder / TRAINING_INFO_FILE)
    st_config = _read_json(folder / "config_sentence_transformers.json")
    base_model = training.get("base_model") or config.get("_name_or_path") or None
    name = repo_id or training.get("grace_model_name") or folder.name
    card_data = ModelCardData(
        model_name=name,
        language=["en"],
        license=license or training.get("license"),
        library_name="sentence-transformers",
        pipeline_tag="sentence-similarity",
        tags=["sentence-transformers", "sentence-similarity", "feature-extraction", "grace", "mteb"],
        base_model=base_model if base_model and "/" in base_model else None,
        datasets=training.get("training_datasets"),
        eval_results=eval_results(results) or None,
    )
    return str(
        ModelCard.from_template(
            card_data,
            template_path=str(template),
            model_name=name,
            repo_id=repo_id or f"<org>/{folder.name}",
            base_model=base_model or "unknown",
            grace_config=grace_config,
            pooling_mode=pooling.get("pooling_mode", "mean"),
            embed_dim=config.get("hidden_size"),
            n_parameters=_count_parameters(folder),
            prompts={k: v for k, v in (st_config.get("prompts") or {}).items() if v},
            training=training or None,
            training_json=json.dumps(training.get("config", training), indent=2) if training else None,
            results=list(results),
            results_table=results_table(results) if results else None,
            comparison=comparison,
            examples=examples,
            citation=GRACE_CITATION,
        )
    )


def _count_parameters(folder: Path) -> int | None:
    from safetensors import safe_open

    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                count = 1
                for size in shape:
                    count *= size
                total += count
    return total or None


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
        template: model card template; defaults to ``model_cards/grace_model_card.md``.
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
    import grace_st.modeling

    for relative in files:
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / relative, target / relative)
    shutil.copy2(grace_st.modeling.__file__, target / MODULE_FILE_NAME)

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
    """Create the model repo if needed and upload a publish folder to it.

    Args:
        folder: output of :func:`build_publish_folder`.
        repo_id: ``org/name``.
        private: create the repo as private. Defaults to False.
        token: Hub token; None uses ``HF_TOKEN`` or the stored ``hf auth login`` token. It is never printed.
        endpoint: Hub endpoint; None uses ``$HF_ENDPOINT`` (read at call time) or huggingface.co.
        commit_message: the commit message.

    Returns:
        The URL of the commit.
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
    logger.info("Uploaded %s to %s", folder, repo_id)
    return str(info.commit_url)
