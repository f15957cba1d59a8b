"""Small, dependency-light evaluations for training runs: triplet dev sets and STS pairs, with rationale diagnostics.

The full MTEB evaluation lives in :mod:`grace_st.evaluation`; these helpers give the numbers ``training/demo.py`` and
training benchmarks print (a few hundred texts, seconds to minutes on a CPU).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from grace_st.diagnostics import copy_rate


@dataclass
class Encoded:
    """Embeddings of a list of texts plus the diagnostics of their rationales.

    Attributes:
        embeddings: ``(n, dim)`` L2-normalised float32 array.
        finish_rate: share of rationales that ended before the limit (None without rationales).
        copy_rate: token-weighted share of rationale tokens copied from the input (None without rationales).
        mean_length: mean rationale length in tokens (EOS excluded).
        seconds: wall time of the encoding.
        examples: the first few ``(text, rationale)`` pairs.
    """

    embeddings: np.ndarray
    finish_rate: float | None
    copy_rate: float | None
    mean_length: float
    seconds: float
    examples: list[tuple[str, str]] = field(default_factory=list)


def encode(model, texts: Sequence[str], batch_size: int = 16) -> Encoded:
    """Encode ``texts`` with a GRACE (or any) SentenceTransformer and collect rationale diagnostics.

    Args:
        model: a ``SentenceTransformer``; for a GRACE model the rationales are inspected too.
        texts: the texts.
        batch_size: encoding batch size. Defaults to 16.

    Returns:
        An :class:`Encoded`.
    """
    start = time.perf_counter()
    texts = list(texts)
    module = model[0]
    if not hasattr(module, "rationale_mode"):  # not a GRACE model
        embeddings = model.encode(texts, batch_size=batch_size, normalize_embeddings=True)
        return Encoded(np.asarray(embeddings, dtype=np.float32), None, None, 0.0, time.perf_counter() - start)
    items = model.encode(texts, batch_size=batch_size, output_value=None)
    embeddings = np.stack([torch.as_tensor(item["sentence_embedding"]).float().cpu().numpy() for item in items])
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True).clip(min=1e-12)
    if module.rationale_mode != "generate":
        return Encoded(embeddings, None, None, 0.0, time.perf_counter() - start)
    eos = set(module.eos_token_ids)
    tokens = copied = finished = 0.0
    examples = []
    for text, item in zip(texts, items, strict=True):
        ids = [t for t in item["rationale_ids"][item["rationale_mask"].bool()].tolist() if t not in eos]
        source = module.tokenizer(text, add_special_tokens=False)["input_ids"]
        tokens += len(ids)
        copied += copy_rate(ids, source) * len(ids)
        finished += float(bool(item["rationale_finished"]))
        if len(examples) < 3:
            examples.append((text, module.decode_rationale(item)))
    return Encoded(
        embeddings,
        finished / len(texts),
        copied / tokens if tokens else 0.0,
        tokens / len(texts),
        time.perf_counter() - start,
        examples,
    )


def triplet_scores(model, rows: Sequence[dict[str, str]], batch_size: int = 16) -> dict[str, Any]:
    """Dev-set scores on (query, positive, negative) rows.

    ``accuracy``: share of queries closer to their positive than to their negative. ``mrr@10``: each query ranks the
    corpus of all positives and negatives of the set; reciprocal rank of its positive (0 beyond rank 10).

    Args:
        model: a ``SentenceTransformer``.
        rows: dicts with ``query``, ``positive``, ``negative``.
        batch_size: encoding batch size. Defaults to 16.

    Returns:
        ``{"accuracy", "mrr@10", "finish_rate", "copy_rate", "mean_length", "seconds", "examples"}``.
    """
    n = len(rows)
    texts = [r["query"] for r in rows] + [r["positive"] for r in rows] + [r["negative"] for r in rows]
    encoded = encode(model, texts, batch_size=batch_size)
    q, corpus = encoded.embeddings[:n], encoded.embeddings[n:]
    sims = q @ corpus.T  # corpus: positives 0..n-1, negatives n..2n-1
    positive = sims[np.arange(n), np.arange(n)]
    accuracy = float(np.mean(positive > sims[np.arange(n), np.arange(n) + n]))
    ranks = (sims > positive[:, None]).sum(axis=1) + 1
    mrr = float(np.mean(np.where(ranks <= 10, 1.0 / ranks, 0.0)))
    return {
        "accuracy": accuracy,
        "mrr@10": mrr,
        "finish_rate": encoded.finish_rate,
        "copy_rate": encoded.copy_rate,
        "mean_length": encoded.mean_length,
        "seconds": encoded.seconds,
        "examples": encoded.examples,
    }


def sts_spearman(model, pairs: Sequence[tuple[str, str, float]], batch_size: int = 16) -> dict[str, Any]:
    """Spearman correlation between cosine similarity and gold scores on ``(sentence1, sentence2, score)`` pairs.

    Returns:
        ``{"spearman", "finish_rate", "copy_rate", "mean_length", "seconds", "examples"}``.
    """
    from scipy.stats import spearmanr

    texts = [a for a, _, _ in pairs] + [b for _, b, _ in pairs]
    encoded = encode(model, texts, batch_size=batch_size)
    n = len(pairs)
    cosine = (encoded.embeddings[:n] * encoded.embeddings[n:]).sum(axis=1)
    return {
        "spearman": float(spearmanr(cosine, [s for _, _, s in pairs]).statistic),
        "finish_rate": encoded.finish_rate,
        "copy_rate": encoded.copy_rate,
        "mean_length": encoded.mean_length,
        "seconds": encoded.seconds,
        "examples": encoded.examples,
    }


def read_sts_pairs(path: str, limit: int | None = None) -> list[tuple[str, str, float]]:
    """Read STS pairs: SICK files (header with ``relatedness_score``) or STS TSV ``score<TAB>s1<TAB>s2`` files."""
    pairs: list[tuple[str, str, float]] = []
    with open(path, encoding="utf-8-sig") as handle:
        lines = handle.read().splitlines()
    if lines and lines[0].startswith("pair_ID"):
        header = lines[0].split("\t")
        a, b, s = header.index("sentence_A"), header.index("sentence_B"), header.index("relatedness_score")
        for line in lines[1:]:
            cells = line.split("\t")
            pairs.append((cells[a], cells[b], float(cells[s])))
    else:
        for line in lines:
            cells = line.split("\t")
            if len(cells) >= 3 and cells[0].strip():
                pairs.append((cells[1], cells[2], float(cells[0])))
    return pairs[:limit] if limit is not None else pairs


def format_table(rows: Sequence[tuple[str, dict[str, Any]]], columns: Sequence[str]) -> str:
    """A plain-text table: one row per ``(name, scores)``; missing or None values print as ``-``."""
    header = ["model", *columns]
    body = []
    for name, scores in rows:
        cells = [name]
        for column in columns:
            value = scores.get(column)
            cells.append("-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value))
        body.append(cells)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in [header, *body]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
