"""Names and schemas of what GRACE writes beside a model: the training records, the results folders, the sidecars.

Training writes these files, evaluation and the Hub read them; this module is the one place that names them, so none
of the three imports another for a file name.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from grace_st.model import Transformer

# The training record the GRACE trainer saves with the model (read by the model card and by evaluation).
TRAINING_INFO_FILE = "grace_training.json"
# The record the contrastive (+CL) trainer saves with its model: budget, minutes and steps used.
CL_TRAINING_RECORD = "cl_training.json"
# mteb results inside an mteb output folder and inside a published model folder (``results/<model>/<revision>``).
RESULTS_FOLDER = "results"
# Rationale diagnostics written beside an mteb result, one ``<task>.json`` per task.
DIAGNOSTICS_FOLDER = "grace_diagnostics"
# The saved settings of a GRACE model's Transformer module (named by the module itself).
GRACE_CONFIG_FILE = Transformer.config_file_name

# Fields of the training record and their JSON types (the trainer writes them, the model card checks them).
TRAINING_RECORD_TYPES: dict[str, type | tuple[type, ...]] = {
    "grace_st_version": str,
    "base_model": str,
    "base_model_source": str,
    "training_datasets": list,
    "license": str,
    "global_step": int,
    "reward": dict,
    "reward_terms": dict,
    "generation": dict,
    "config": dict,
    "grace_model_name": str,
}
# The config fields the training record lists under "reward" and "generation", in this order.
TRAINING_RECORD_REWARD_FIELDS: tuple[str, ...] = (
    "mode",
    "reward_form",
    "query_rollouts",
    "consistency_weight",
    "hard_negative_weight",
    "reward_temperature",
    "truncation_penalty",
    "copy_penalty",
    "copy_min_span",
)
TRAINING_RECORD_GENERATION_FIELDS: tuple[str, ...] = (
    "num_generations",
    "max_completion_length",
    "temperature",
    "query_temperature",
    "system_prompt",
    "prompt_template",
    "summary_suffix",
    "pooling_mode",
    "save_pooling_mode",
)

# Hub repo ids as the Hub accepts them (``org/name``); anything else in a training record is described as local.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]$")

GRACE_CITATION = """@article{grace2025,
  title   = {GRACE: Generative Representation Learning via Contrastive Policy Optimization},
  journal = {arXiv preprint arXiv:2510.04506},
  year    = {2025},
  url     = {https://arxiv.org/abs/2510.04506}
}"""

# Top-level files of a saved GRACE model that hold its weights, configs and tokenizer (the published repo's files and
# what its revision hash covers).
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".jinja", ".txt", ".model")
EXCLUDED_ROOT_FILES = {"README.md", "trainer_state.json", "training_args.json"}


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
        if relative in EXCLUDED_ROOT_FILES or file.suffix not in MODEL_FILE_SUFFIXES:
            continue
        digest.update(relative.encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:12]
