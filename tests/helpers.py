"""Helpers shared by the tests: the tiny GRACE model with varied rationales, both generation paths, and references."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

import grace_st
from grace_st.engine.decode import generate_with_engine
from grace_st.engine.stream import check_suffix_ids
from grace_st.model.generation import pad_rows

TEXTS = [
    "A man is playing a guitar.",
    "The stock market fell sharply on Monday after the report.",
    "Cats sleep.",
    "",
    "one more text of a clearly different length to force padding between the prefix and the text",
    "Rain again.",
    "The committee approved the budget for next year without changes.",
    "Birds fly south in winter.",
]


def tiny_grace_model(tiny_backbone_dir, attention="sdpa", **options):
    """The tiny LM with larger, seeded random weights: varied rationales with clear greedy margins (the fixture's
    small initialisation writes the same token everywhere, on near-ties)."""
    options.setdefault("max_new_tokens", 10)
    model = grace_st.from_backbone(
        tiny_backbone_dir, device="cpu", model_kwargs={"attn_implementation": attention}, **options
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model[0].model.named_parameters():
            if "norm" not in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def both_paths(module, features, **kwargs):
    """(reference, engine) rationale batches of the same features, with the engine's counts."""
    module.decode_path = "generate"
    reference = module.generate_rationales(features, with_states=True, **kwargs)
    module.decode_path = "engine"
    module.decode_counts = {}
    engine = module.generate_rationales(features, with_states=True, **kwargs)
    return reference, engine


def split_rows(module, features, max_new_tokens):
    """Make tokens of the greedy rationales of 3/4 of the rows end-of-sequence ids (of the LM's generation config, so
    that generation and the rationale masks agree): rows finish at different steps, and the engine drops rows."""
    module.decode_path = "generate"
    ids = module.generate_rationales(features, max_new_tokens=max_new_tokens).ids
    assert ids.shape[1] == max_new_tokens, "fixture: a rationale ended on the tokenizer's own EOS"
    n = len(ids)
    module.model.generation_config.eos_token_id = sorted({int(ids[r, 1 + r // 2]) for r in range(n * 3 // 4)})


def engine_output(module, features, **kwargs):
    prefix_len = len(module.template_pieces()[0])
    return generate_with_engine(module.model, features, module.generation_kwargs(), prefix_len, **kwargs)


def two_pass_suffix_states(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    rationale_ids: torch.Tensor,
    rationale_mask: torch.Tensor,
    suffix_ids: list[list[int]],
) -> torch.Tensor:
    """``(batch, hidden)`` last-layer state of each row's last suffix token from one forward pass over prompt +
    rationale + suffix (the two-pass reference of :func:`decode`'s ``suffix_states``, and the fallback where the
    engine does not apply).

    Args:
        model: the causal LM.
        input_ids, attention_mask: ``(batch, P)`` the left-padded prompts.
        rationale_ids, rationale_mask: ``(batch, R)`` the rationales (mask: 1 for rationale tokens, the closing EOS
            included).
        suffix_ids: per row, the suffix token ids (at least one).
    """
    suffix_ids = check_suffix_ids(suffix_ids, len(input_ids), getattr(model.config, "vocab_size", None))
    rows = [
        ids[mask.bool()].tolist() + r_ids[r_mask.bool()].tolist() + suffix
        for ids, mask, r_ids, r_mask, suffix in zip(
            input_ids, attention_mask, rationale_ids, rationale_mask.to(rationale_ids.device), suffix_ids, strict=True
        )
    ]
    ids, mask = pad_rows(rows, 0, left=True)  # left padding: every row's last suffix token is in the last column
    ids, mask = ids.to(input_ids.device), mask.to(input_ids.device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # as Transformer.embed and generate
    with torch.no_grad():
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True, use_cache=False
        )
    return out.hidden_states[-1][:, -1]


# ---------------------------------------------------------------- suffix_ids: teacher-forced steps after the rationale
SUFFIXES = ["\nIn one word:", '\nIn one word, the text above means:"', ".", " Summary", "\n", " In short", "!", ""]


def suffix_token_ids(module, n):
    """Suffixes of different lengths (1 to ~10 tokens), one per row."""
    rows = module.tokenizer([SUFFIXES[i % len(SUFFIXES)] or "x" for i in range(n)], add_special_tokens=False)
    return [list(row) for row in rows["input_ids"]]


# ---------------------------------------------------------------- continuous batching
CORPUS_TEXTS = ["A man is playing a guitar.", "The stock market fell sharply.", "Cats sleep most of the day."]
VARIED_CORPUS = [
    t + s
    for t in CORPUS_TEXTS + ["", "Rain again.", "Birds fly south in winter."]
    for s in ("", " now", " and then more")
]


def varied_model(tiny_backbone_dir, **options):
    """The tiny LM with clear greedy margins and EOS ids that end rows at different steps (some are cut)."""
    model = tiny_grace_model(tiny_backbone_dir, max_new_tokens=10, **options)
    split_rows(model[0], model[0].preprocess(VARIED_CORPUS[::2]), 10)
    model[0].decode_path = "engine"
    return model


def load_experiment(name: str) -> ModuleType:
    """``experiments/<name>.py`` (a study script, not a package) as a module named ``name``."""
    path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
