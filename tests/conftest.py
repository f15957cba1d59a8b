"""Shared fixtures: a tiny random causal LM with the real SmolLM2 tokenizer and chat template."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

# Tests import shared helpers (helpers.py, tiny_sts.py) from this folder; test files are imported by path
# (--import-mode=importlib), so the subfolders may hold files of the same name.
sys.path.insert(0, str(Path(__file__).resolve().parent))
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VARIED_TEXTS = ["A man is playing a guitar.", "The stock market fell sharply.", "Cats sleep most of the day."]


@pytest.fixture(scope="session")
def default_backbone_dir() -> str:
    """Path of the embedded default backbone (converted once into the user cache)."""
    import grace_st

    try:
        return grace_st.default_backbone()
    except ImportError as error:
        pytest.skip(f"default backbone unavailable: {error}")


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory, default_backbone_dir) -> str:
    """A saved tiny random LlamaForCausalLM (2 layers, hidden 32) with SmolLM2's real tokenizer and chat template.

    Its weights are drawn with a large std (0.2), so greedy rationales differ between texts and between steps (the
    fixture checks it): a model that writes the same token everywhere would hide row-order and masking mistakes.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from grace_st.model import Transformer

    tokenizer = AutoTokenizer.from_pretrained(default_backbone_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    module = Transformer(model, tokenizer, max_new_tokens=8)
    rows = module.generate_rationales(module.preprocess(VARIED_TEXTS)).ids.tolist()
    assert len({tuple(row) for row in rows}) == len(rows), "greedy rationales of different texts must differ"
    assert all(len(set(row)) >= 3 for row in rows), "each rationale must use several distinct tokens"
    path = tmp_path_factory.mktemp("tiny-backbone")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny_backbone_copy(tiny_backbone_dir, tmp_path) -> str:
    """A function-scoped copy of the tiny backbone folder, free to modify."""
    target = tmp_path / "backbone"
    shutil.copytree(tiny_backbone_dir, target)
    return str(target)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder beside the checkout; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (see README: ../shared/data beside the checkout)")
    return SHARED_DATA
