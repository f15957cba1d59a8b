"""The one 'is this a GRACE model' predicate, for loaded models (installed or folder-carried class) and folders."""

from __future__ import annotations

import doctest
import json
import shutil
from pathlib import Path

import pytest
from sentence_transformers import SentenceTransformer

import grace_st
import grace_st.model.modules
from grace_st import model_kind
from grace_st.model_kind import folder_kind, folder_parameters, is_grace_model


def test_doctests():
    result = doctest.testmod(model_kind)
    assert result.attempted > 0 and result.failed == 0


@pytest.fixture(scope="module")
def grace_folder(tiny_backbone_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("grace")
    grace_st.from_backbone(tiny_backbone_dir, max_new_tokens=2, device="cpu").save(str(path))
    return path


def test_installed_class_and_folder(grace_folder, tiny_backbone_dir):
    assert is_grace_model(SentenceTransformer(str(grace_folder), trust_remote_code=True, device="cpu"))
    assert folder_kind(grace_folder) == "grace"
    assert folder_kind(tiny_backbone_dir) == "backbone"


def test_folder_carried_module_class_counts(grace_folder, tmp_path):
    # A published folder carries the module file as grace_st.py; sentence-transformers imports that copy first.
    folder = tmp_path / "published"
    shutil.copytree(grace_folder, folder)
    shutil.copy(Path(grace_st.model.modules.__file__), folder / "grace_st.py")
    model = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    assert type(model[0]) is not grace_st.Transformer  # an isinstance check would miss it
    assert is_grace_model(model)


def test_other_models_and_folders(tmp_path):
    from sentence_transformers.base.modules import Normalize

    assert not is_grace_model(SentenceTransformer(modules=[Normalize()], device="cpu"))
    (tmp_path / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.Transformer"}]))
    assert folder_kind(tmp_path) == "sentence-transformers"
    with pytest.raises(ValueError, match="neither a SentenceTransformer"):
        folder_kind(tmp_path / "missing")


def test_folder_parameters_from_headers(grace_folder, tmp_path):
    model = SentenceTransformer(str(grace_folder), trust_remote_code=True, device="cpu")
    # Tied input/output embeddings are stored once.
    n, size = folder_parameters(grace_folder)
    assert n == sum(p.numel() for p in model[0].model.parameters())
    assert size == sum(f.stat().st_size for f in grace_folder.rglob("*.safetensors"))
    assert folder_parameters(tmp_path) == (None, None)
