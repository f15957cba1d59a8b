"""Small, dependency-light evaluations for training runs: triplet dev sets and STS pairs, with rationale diagnostics.

The full MTEB evaluation lives in :mod:`grace_st.evaluation.mteb_evaluation`; these helpers give the numbers
``training/demo.py`` and
training benchmarks print (a few hundred texts, seconds to minutes on a CPU). Pair files are read with
:func:`grace_st.readers.read_pairs`; the diagnostics are :class:`grace_st.diagnostics.RationaleStats`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from grace_st.diagnostics import RationaleStats, rationale_stats
from grace_st.encoding import encode_corpus
from grace_st.evaluation.metrics import spearman
from grace_st.model_kind import is_grace_model
from grace_st.tables import markdown_table


@dataclass
class Encoded:
    """Embeddings of a list of texts and the diagnostics of their rationales.

    Attributes:
        embeddings: ``(n, dim)`` L2-normalised float32 array, one row per input text (repeats included).
        stats: rationale diagnostics over the distinct texts (rates are None for models without rationales).
    """

    embeddings: np.ndarray
    stats: RationaleStats


def encode(model, texts: Sequence[str], batch_size: int = 16, prompt: str | None = None) -> Encoded:
    """Encode ``texts`` with a GRACE (or any) SentenceTransformer and measure the rationales.

    GRACE models go through :func:`grace_st.encoding.encode_corpus` (repeated texts are generated once); the copy
    rate's source is each text as it enters the prompt (``Transformer.text_token_ids``, the prompt prefix included).

    Args:
        model: a ``SentenceTransformer``.
        texts: the texts.
        batch_size: encoding batch size. Defaults to 16.
        prompt: a sentence-transformers prompt prepended to every text (None: none).

    Returns:
        An :class:`Encoded`.
    """
    start = time.perf_counter()
    texts = list(texts)
    unique = list(dict.fromkeys(texts))
    if not is_grace_model(model) or model[0].rationale_mode == "none":
        embeddings = model.encode(
            texts, batch_size=batch_size, prompt=prompt, normalize_embeddings=True, show_progress_bar=False
        )
        stats = RationaleStats(texts=len(unique))
    else:
        corpus = encode_corpus(model, texts, batch_size=batch_size, prompt=prompt, normalize_embeddings=True)
        embeddings = corpus.embeddings
        first = {text: i for i, text in reversed(list(enumerate(texts)))}
        rows = [first[text] for text in unique]
        sources = model[0].text_token_ids([(prompt or "") + text for text in unique])
        ids, finished, rationales = corpus.rationale_ids, corpus.finished, corpus.rationales
        ids, finished, rationales = ([field[i] for i in rows] for field in (ids, finished, rationales))
        k, distinct = model[0].num_rationales, len(unique)
        if k > 1:  # every one of the k rationales of a text counts
            ids, finished, rationales = ([x for per_text in f for x in per_text] for f in (ids, finished, rationales))
            sources, unique = ([x for x in field for _ in range(k)] for field in (sources, unique))
        # texts counts the distinct texts (seconds per text is per text, not per rationale); rationales counts k each
        stats = rationale_stats(ids, sources, finished, texts=unique, rationales=rationales)
        stats = replace(stats, texts=distinct)
    stats.seconds = time.perf_counter() - start
    return Encoded(np.asarray(embeddings, dtype=np.float32), stats)


def _diagnostics(stats: RationaleStats) -> dict[str, Any]:
    return {
        "finish_rate": stats.finish_rate,
        "copy_rate": stats.copy_rate,
        "mean_length": stats.mean_length,
        "seconds": stats.seconds,
        "examples": stats.examples,
    }


def triplet_scores(model, rows: Sequence[dict[str, str]], batch_size: int = 16) -> dict[str, Any]:
    """Dev-set scores on (query, positive, negative) rows.

    ``accuracy``: share of queries closer to their positive than to their negative. ``mrr@10``: each query ranks the
    corpus of all positives and negatives of the set; reciprocal rank of its positive (0 beyond rank 10).

    Args:
        model: a ``SentenceTransformer``.
        rows: dicts with ``query``, ``positive``, ``negative``.
        batch_size: encoding batch size. Defaults to 16.

    Returns:
        ``{"accuracy", "mrr@10", "finish_rate", "copy_rate", "mean_length", "seconds", "examples"}`` (diagnostics as
        in :class:`grace_st.diagnostics.RationaleStats`: None without rationales).
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
    return {"accuracy": accuracy, "mrr@10": mrr, **_diagnostics(encoded.stats)}


def sts_spearman(model, pairs: Sequence[Sequence[Any]], batch_size: int = 16) -> dict[str, Any]:
    """Spearman correlation between cosine similarity and gold scores of sentence pairs.

    Args:
        model: a ``SentenceTransformer``.
        pairs: :class:`grace_st.readers.Pair` s (:func:`grace_st.readers.read_pairs`) or ``(sentence1, sentence2,
            score)`` tuples.
        batch_size: encoding batch size. Defaults to 16.

    Returns:
        ``{"spearman", "finish_rate", "copy_rate", "mean_length", "seconds", "examples"}``.
    """
    texts = [pair[0] for pair in pairs] + [pair[1] for pair in pairs]
    encoded = encode(model, texts, batch_size=batch_size)
    n = len(pairs)
    cosine = (encoded.embeddings[:n] * encoded.embeddings[n:]).sum(axis=1)
    return {"spearman": spearman(cosine, [float(pair[2]) for pair in pairs]), **_diagnostics(encoded.stats)}


def format_table(rows: Sequence[tuple[str, dict[str, Any]]], columns: Sequence[str]) -> str:
    """Score dicts as a :func:`grace_st.tables.markdown_table`: one row per ``(name, scores)``, None as ``–``.

    Example:
        >>> print(format_table([("echo", {"accuracy": 0.5})], ["accuracy", "copy_rate"]), end="")
        | model | accuracy | copy_rate |
        |:------|---------:|----------:|
        | echo  |    0.500 |         – |
    """
    return markdown_table(["model", *columns], [[name, *(scores.get(c) for c in columns)] for name, scores in rows])
