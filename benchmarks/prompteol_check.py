"""Acceptance check 2 of issue 14: the harness's PromptEOL row against an independent few-line PromptEOL.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/prompteol_check.py [--limit 100] [--backbone default] [--data-dir DIR]

The independent side uses transformers only (and grace_st's one Spearman): the whole prompt
``This sentence : "<text>" means in one word:"`` as one string, the plain tokenizer call, one forward pass per text,
the last layer's state at the last token, no chat template. The harness side is the "PromptEOL" row of
``grace_st.evaluation.dev_comparison`` (the same modules every GRACE model uses: prompt template without chat
template, rationale_mode="none", last-token pooling). Both score the same pairs (the five dev sets, first --limit
pairs each). Prints both five-set means, |Δ|, and the lowest cosine between the two embeddings of one text; exits
1 when |Δ| > 0.01 (the acceptance bound).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grace_st.backbone import resolve_backbone
from grace_st.evaluation.dev_comparison import (
    PROMPTEOL_ROW,
    build_row_model,
    comparison_rows,
    load_dev_sets,
    missing_features,
)
from grace_st.evaluation.metrics import spearman

BOUND = 0.01


@torch.no_grad()
def independent_embeddings(backbone: str, texts: list[str]) -> np.ndarray:
    """PromptEOL in a few lines: whole prompt, plain tokenizer call, last-token last-layer state, L2-normalised."""
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    model = AutoModelForCausalLM.from_pretrained(backbone, dtype=torch.float32).eval()
    rows = []
    for text in texts:
        inputs = tokenizer(f'This sentence : "{text}" means in one word:"', return_tensors="pt")
        state = model(**inputs, output_hidden_states=True).hidden_states[-1][0, -1]
        rows.append((state / state.norm()).numpy())
    return np.stack(rows)


def five_set_scores(vectors: dict[str, np.ndarray], dev_sets) -> dict[str, float]:
    """Spearman of cosine per set (:func:`grace_st.evaluation.metrics.spearman`), from ``{text: unit vector}``."""
    scores = {}
    for name, pairs in dev_sets.items():
        cosine = [float(vectors[a] @ vectors[b]) for a, b, _ in (pair[:3] for pair in pairs)]
        scores[name] = spearman(cosine, [pair[2] for pair in pairs])
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=100, help="pairs per set (default 100)")
    parser.add_argument("--backbone", default="default", help="backbone folder or Hub id (default: the embedded one)")
    parser.add_argument("--data-dir", default=None, help="data folder (default: $GRACE_ST_DATA or ../shared/data)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    missing = missing_features(["prompt_template", "chat_template"])
    if missing:
        sys.exit(f"this grace_st lacks the module options {missing}; the harness has no PromptEOL row to check.")
    backbone = resolve_backbone(args.backbone)
    dev_sets = load_dev_sets(args.data_dir, args.limit)
    texts = list(dict.fromkeys(text for pairs in dev_sets.values() for pair in pairs for text in pair[:2]))

    start = time.perf_counter()
    independent = dict(zip(texts, independent_embeddings(backbone, texts), strict=True))
    seconds_independent = time.perf_counter() - start
    start = time.perf_counter()
    row = next(row for row in comparison_rows(backbone) if row.label == PROMPTEOL_ROW)
    harness_model = build_row_model(row)
    harness = dict(zip(texts, harness_model.encode(texts, batch_size=16, normalize_embeddings=True), strict=True))
    seconds_harness = time.perf_counter() - start

    ours, theirs = five_set_scores(harness, dev_sets), five_set_scores(independent, dev_sets)
    agreement = min(float(harness[text] @ independent[text]) for text in texts)
    print(f"{len(texts)} distinct texts, first {args.limit} pairs per set; backbone {backbone}")
    print(f"{'set':<16} {'harness':>8} {'independent':>12}")
    for name in dev_sets:
        print(f"{name:<16} {ours[name]:8.4f} {theirs[name]:12.4f}")
    mean_ours, mean_theirs = float(np.mean(list(ours.values()))), float(np.mean(list(theirs.values())))
    delta = abs(mean_ours - mean_theirs)
    print(f"{'five-set mean':<16} {mean_ours:8.4f} {mean_theirs:12.4f}   |Δ| = {delta:.4f} (bound {BOUND})")
    print(f"lowest cosine between the two embeddings of a text: {agreement:.6f}")
    print(f"seconds: harness {seconds_harness:.1f}, independent {seconds_independent:.1f}")
    sys.exit(0 if delta <= BOUND else 1)


if __name__ == "__main__":
    main()
