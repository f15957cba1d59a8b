"""Tests of model building (grace_st/factory.py): from_backbone and build_grace_model."""

from __future__ import annotations

import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Normalize

import grace_st
from grace_st.factory import build_grace_model, from_backbone
from grace_st.model import RationalePooling, Transformer, load_backbone


def test_from_backbone_composes_the_grace_pipeline_with_the_given_options(tiny_backbone_dir):
    model = from_backbone(
        tiny_backbone_dir,
        pooling_mode="lasttoken",
        device="cpu",
        prompts={"query": "Query: "},
        default_prompt_name="query",
        max_new_tokens=5,
        rationale_mode="echo",
        system_prompt="Explain.",
    )
    transformer, pooling, normalize = list(model)
    assert isinstance(transformer, Transformer) and isinstance(pooling, RationalePooling)
    assert isinstance(normalize, Normalize)
    assert (transformer.max_new_tokens, transformer.rationale_mode, transformer.system_prompt) == (
        5,
        "echo",
        "Explain.",
    )
    assert pooling.pooling_mode == "lasttoken" and pooling.embedding_dimension == 32
    assert model.prompts["query"] == "Query: " and model.default_prompt_name == "query"
    assert transformer.model.dtype == torch.float32 and model.device.type == "cpu"
    assert model.similarity_fn_name == "cosine"


def test_from_backbone_dtype_and_model_kwargs(tiny_backbone_dir):
    model = from_backbone(tiny_backbone_dir, device="cpu", dtype=torch.bfloat16, max_new_tokens=2)
    assert model[0].model.dtype == torch.bfloat16
    assert model.encode(["a"]).shape == (1, 32)


def test_unknown_options_are_refused_by_name(tiny_backbone_dir):
    with pytest.raises(ValueError, match=r"Unknown GRACE option\(s\) \['max_tokens'\].*'max_new_tokens'"):
        from_backbone(tiny_backbone_dir, max_tokens=3)
    lm, tokenizer = load_backbone(tiny_backbone_dir)
    with pytest.raises(ValueError, match="Unknown GRACE option"):
        build_grace_model(lm, tokenizer, beams=2)


def test_build_grace_model_keeps_the_in_memory_lm(tiny_backbone_dir):
    lm, tokenizer = load_backbone(tiny_backbone_dir)
    model = build_grace_model(lm, tokenizer, max_new_tokens=3)
    assert model[0].model is lm and model[0].tokenizer is tokenizer
    assert model.device == lm.device
    expected = grace_st.from_backbone(tiny_backbone_dir, max_new_tokens=3, device="cpu").encode(["a cat"])
    torch.testing.assert_close(torch.from_numpy(model.encode(["a cat"])), torch.from_numpy(expected))


def test_a_pooling_of_the_wrong_size_is_refused_when_assembled(tiny_backbone_dir):
    lm, tokenizer = load_backbone(tiny_backbone_dir)
    with pytest.raises(ValueError, match="embedding_dimension=64 does not match the LM's hidden size 32"):
        SentenceTransformer(modules=[Transformer(lm, tokenizer), RationalePooling(64), Normalize()], device="cpu")
