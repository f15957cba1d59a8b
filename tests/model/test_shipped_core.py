"""The code a saved model carries (grace_st/model/): small, public imports only, falls back instead of failing, saves
again from a loaded folder, names a missing file, and folders written by earlier versions keep loading."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

import grace_st
from grace_st.model import CORE_FILES

MODEL_DIR = Path(grace_st.model.__file__).resolve().parent
PROBE = Path(__file__).resolve().parent / "load_and_encode.py"
LEGACY = Path(__file__).resolve().parents[1] / "data" / "folder_written_by_0.1.0.tar.gz"
TEXTS = ["A man is playing a guitar.", "The stock market fell sharply on Monday.", "Cats sleep.", "Rain again."]
MAX_CORE_LINES = 820  # "at most ~800"
ALLOWED_PACKAGES = {"torch", "transformers", "sentence_transformers"}


def forbidden_imports(source: str, siblings: set[str]) -> list[str]:
    """Imports of ``source`` outside the standard library, torch, the public API of transformers (top-level names)
    and sentence-transformers, and relative imports of files other than ``siblings`` (module names)."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.module not in siblings:
                    bad.append(f"from {'.' * node.level}{node.module or ''} import ...")
                continue
            names = [node.module]
            if node.module == "transformers" or node.module.startswith("transformers."):
                private = [a.name for a in node.names if a.name.startswith("_")]
                if node.module != "transformers" or private:
                    bad.append(f"from {node.module} import {', '.join(a.name for a in node.names)}")
                    continue
        else:
            continue
        for name in names:
            root = name.split(".")[0]
            private = any(part.startswith("_") for part in name.split(".")[1:])
            if private or (root not in sys.stdlib_module_names and root not in ALLOWED_PACKAGES):
                bad.append(name)
    return bad


def test_the_core_files_are_the_model_package():
    files = {path.name for path in MODEL_DIR.glob("*.py")} - {"__init__.py"}
    assert set(CORE_FILES.values()) == files


def test_the_shipped_core_is_small():
    lines = sum(len((MODEL_DIR / source).read_text(encoding="utf-8").splitlines()) for source in CORE_FILES.values())
    assert lines <= MAX_CORE_LINES, f"the shipped core has {lines} lines (at most {MAX_CORE_LINES})"


def test_the_shipped_core_imports_only_public_api_of_its_dependencies():
    siblings = {Path(source).stem for source in CORE_FILES.values()}
    for source in CORE_FILES.values():
        assert forbidden_imports((MODEL_DIR / source).read_text(encoding="utf-8"), siblings) == [], source
    # The check itself: each of these must be refused.
    for line in [
        "from grace_st.engine import decode",
        "import grace_st",
        "from transformers.cache_utils import DynamicLayer",
        "from transformers import _private",
        "import numpy",
        "from .engine import decode",
        "from torch._dynamo import config",
    ]:
        assert forbidden_imports(line, siblings), line
    assert not forbidden_imports(
        "import json\nfrom transformers import AutoTokenizer\nfrom .options import x", siblings
    )


@pytest.fixture(scope="module")
def tiny(tiny_backbone_dir):
    return grace_st.from_backbone(tiny_backbone_dir, max_new_tokens=8, device="cpu")


@pytest.fixture(scope="module")
def reference(tiny):
    """Rationales and embeddings of the reference path (``model.generate``) of the installed code."""
    tiny[0].decode_path = "generate"
    try:
        items = tiny.encode(TEXTS, output_value=None)
    finally:
        tiny[0].decode_path = "engine"
    rationales = [tiny[0].decode_rationale(item) for item in items]
    return rationales, np.stack([item["sentence_embedding"].numpy() for item in items])


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("saved") / "grace"
    tiny.save(str(path))
    return path


@pytest.fixture(scope="module")
def published(saved, tmp_path_factory) -> Path:
    """What a Hub repo of the model holds (the files publishing uploads), in a folder of its own."""
    from grace_st.hub.publish import model_files

    path = tmp_path_factory.mktemp("published") / "org--grace"
    for name in model_files(saved):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(saved / name, path / name)
    return path


def run_probe(folder: Path, case: str, tmp_path: Path, save_to: Path | None = None) -> dict:
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    args = [sys.executable, str(PROBE), str(folder), case, json.dumps(TEXTS)] + ([str(save_to)] if save_to else [])
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_same_model(result: dict, reference) -> None:
    rationales, embeddings = reference
    assert result["modules"] == ["Transformer", "RationalePooling", "Normalize"]
    assert result["rationales"] == rationales
    assert np.abs(np.array(result["embeddings"]) - embeddings).max() < 1e-5


@pytest.mark.parametrize("kind", ["saved", "published"])
@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no_grace_st", "is not installed"),
        ("no_dynamic_layer", "DynamicLayer"),
        ("changed_cache_api", "DynamicLayer.update has parameters"),
        ("other_engine_version", "API version 99"),
    ],
)
def test_a_loaded_folder_falls_back_to_the_reference_path_with_one_warning(
    kind, case, reason, saved, published, reference, tmp_path
):
    folder = saved if kind == "saved" else published
    result = run_probe(folder, case, tmp_path)
    assert result["module"].startswith("transformers_modules"), "the folder runs its own copy of the code"
    assert_same_model(result, reference)
    assert len(result["warnings"]) == 1, result["warnings"]
    assert reason in result["warnings"][0]


def test_a_loaded_folder_uses_the_installed_engine_without_a_warning(saved, reference, tmp_path):
    result = run_probe(saved, "installed", tmp_path)
    assert_same_model(result, reference)
    assert result["warnings"] == []


def test_the_engine_is_used_only_when_its_api_version_matches(tiny, monkeypatch, caplog):
    import grace_st.engine

    module = tiny[0]
    kwargs = module.generation_kwargs()
    assert module.decode_engine(kwargs) is grace_st.engine
    monkeypatch.setattr(grace_st.engine, "API_VERSION", grace_st.engine.API_VERSION + 1)
    with caplog.at_level("WARNING"):
        assert module.decode_engine(kwargs) is None
        assert module.decode_engine(kwargs) is None
    assert len([r for r in caplog.records if "reference path" in r.getMessage()]) == 1


@pytest.mark.parametrize("installed", [True, False])
def test_a_loaded_folder_saves_the_same_model_again(installed, saved, reference, tmp_path):
    again = tmp_path / "again"
    result = run_probe(saved, "installed" if installed else "no_grace_st", tmp_path, save_to=again)
    assert_same_model(result, reference)
    for name in CORE_FILES:
        assert (again / name).read_bytes() == (saved / name).read_bytes(), name
    assert json.loads((again / "modules.json").read_text()) == json.loads((saved / "modules.json").read_text())


def test_a_model_loaded_in_this_process_saves_the_same_model_again(saved, tmp_path):
    loaded = SentenceTransformer(str(saved), trust_remote_code=True, device="cpu")
    loaded.save(str(tmp_path / "again"))
    again = SentenceTransformer(str(tmp_path / "again"), trust_remote_code=True, device="cpu")
    assert [type(m).__name__ for m in again] == [type(m).__name__ for m in loaded]
    for name in CORE_FILES:
        assert (tmp_path / "again" / name).read_bytes() == (saved / name).read_bytes(), name
    np.testing.assert_allclose(again.encode(TEXTS), loaded.encode(TEXTS), atol=1e-5)


@pytest.mark.parametrize("name", sorted(CORE_FILES))
def test_a_folder_missing_a_core_file_is_an_error_naming_it(name, saved, tmp_path):
    folder = tmp_path / "grace"
    shutil.copytree(saved, folder)
    (folder / name).unlink()
    with pytest.raises(FileNotFoundError, match=rf"lacks {name}"):
        SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")


def test_a_folder_written_by_grace_st_0_1_0_keeps_loading(saved, reference, tmp_path):
    """A folder whose code is grace_st 0.1.0's (four files: grace_st.py, _decode.py, _options.py, _rationales.py)
    runs that code: same rationales and embeddings."""
    folder = tmp_path / "old"
    shutil.copytree(saved, folder)
    for name in CORE_FILES:
        (folder / name).unlink()
    with tarfile.open(LEGACY) as archive:
        archive.extractall(folder, filter="data")
    config = json.loads((folder / "grace_config.json").read_text(encoding="utf-8"))
    del config["text_summary"]  # an option added after 0.2.0: a folder of 0.1.0 has no such key
    (folder / "grace_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert sorted(p.name for p in folder.glob("*.py")) == [
        "_decode.py",
        "_options.py",
        "_rationales.py",
        "grace_st.py",
    ]
    result = run_probe(folder, "installed", tmp_path)
    assert result["module"].startswith("transformers_modules")
    assert_same_model(result, reference)


def test_a_model_built_here_saves_its_core(saved):
    for name, source in CORE_FILES.items():
        assert (saved / name).read_bytes() == (MODEL_DIR / source).read_bytes(), name
    assert torch.is_grad_enabled()
