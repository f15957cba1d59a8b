"""Tests of the model fingerprint of grace_st/encoding/cache.py: the shared part of every cache key."""

from __future__ import annotations

import hashlib
import json

import torch
import transformers
from sentence_transformers import SentenceTransformer

import grace_st
from grace_st.encoding import cache_keys, model_fingerprint
from grace_st.encoding.cache import CACHE_FORMAT
from grace_st.model import __version__

TEXTS = ["A man is playing a guitar.", "The stock market fell sharply.", ""]


def keys_as_first_written(model, texts: list[str], prompt: str | None) -> list[str]:
    """The cache key formula as grace_st wrote it before the fingerprint was factored out (existing caches hold
    entries under these keys, so they must keep hitting)."""
    module = model[0]
    lm = module.model
    drop = {"_name_or_path", "transformers_version"}
    settings = {  # in name order: the JSON sorts its keys
        "backend": None if module.generation_backend is None else repr(module.generation_backend),
        "device": model.device.type,
        "eos": module.eos_token_ids,
        "format": CACHE_FORMAT,
        "generation_config": {k: v for k, v in lm.generation_config.to_dict().items() if k not in drop},
        "lm_config": {k: v for k, v in lm.config.to_dict().items() if k not in drop},
        "modules": [[type(m).__name__, m.get_config_dict()] for m in model],
        "pad": module.tokenizer.pad_token_id,
        "prompt": prompt,
        "template": module.template_pieces(),
        "truncate_dim": model.truncate_dim,
        "versions": [torch.__version__, transformers.__version__, __version__],
        "weights": grace_st.encoding.weights_fingerprint(model),
    }
    base = json.dumps(settings, sort_keys=True, default=str)
    ids = module.text_token_ids([(prompt or "") + text for text in texts])
    return [hashlib.blake2b(f"{base}\0{row}".encode(), digest_size=20).hexdigest() for row in ids]


def test_cache_keys_are_those_existing_caches_were_written_with(tiny_backbone_dir):
    model = grace_st.from_backbone(tiny_backbone_dir, max_new_tokens=6, device="cpu")
    for prompt in (None, "Query: "):
        assert cache_keys(model, TEXTS, prompt) == keys_as_first_written(model, TEXTS, prompt)


def test_model_fingerprint_follows_the_model_and_prompt_not_the_object(tiny_backbone_dir, tmp_path):
    model = grace_st.from_backbone(tiny_backbone_dir, max_new_tokens=6, device="cpu")
    first = model_fingerprint(model)
    assert len(first) == 40 and int(first, 16) >= 0
    again = grace_st.from_backbone(tiny_backbone_dir, max_new_tokens=6, device="cpu")
    assert model_fingerprint(again) == first, "the same model built twice has one fingerprint"
    model.save(str(tmp_path / "saved"))
    loaded = SentenceTransformer(str(tmp_path / "saved"), trust_remote_code=True, device="cpu")
    assert model_fingerprint(loaded) == first, "a saved folder loaded through its own code has the same fingerprint"
    assert model_fingerprint(model, "Query: ") != first
    assert model_fingerprint(grace_st.from_backbone(tiny_backbone_dir, max_new_tokens=7, device="cpu")) != first
    with torch.no_grad():
        next(model[0].model.parameters()).mul_(1.5)
    assert model_fingerprint(model) != first
