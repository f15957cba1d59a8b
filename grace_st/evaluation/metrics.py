"""The metrics of GRACE evaluation: Spearman rank correlation, retrieval nDCG@k and their bootstrap intervals.

Every Spearman grace_st reports comes from :func:`spearman` (average ranks for ties, as ``scipy.stats.spearmanr``);
every nDCG from :func:`ndcg_at_k` (binary relevance, ties broken by corpus order). Bootstrap intervals resample pairs
within each STS set and queries within each retrieval set (:func:`bootstrap_indices`), so rows scored on the same sets
get the same resamples and their difference has a paired interval.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def _rank_rows(values: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(values, axis=-1)  # ties get their average rank, as in scipy.stats.spearmanr


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise Pearson correlation; NaN where a row is constant."""
    x = x - x.mean(axis=-1, keepdims=True)
    y = y - y.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((x * x).sum(axis=-1) * (y * y).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (x * y).sum(axis=-1) / np.where(denominator > 0, denominator, 1), np.nan)


def spearman(predicted: Sequence[float], gold: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant.

    Example:
        >>> round(spearman([0.1, 0.5, 0.3], [1.0, 5.0, 2.0]), 3), round(spearman([3, 2, 1], [1, 2, 3]), 3)
        (1.0, -1.0)
    """
    predicted, gold = np.asarray(predicted, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    if predicted.shape != gold.shape or predicted.ndim != 1:
        raise ValueError(f"predicted and gold must be 1-d of one length; got {predicted.shape} and {gold.shape}.")
    return float(_pearson_rows(_rank_rows(predicted), _rank_rows(gold)))


def bootstrap_indices(sizes: Sequence[int], resamples: int = 1000, seed: int = 0) -> list[np.ndarray]:
    """Per set, a ``(resamples, size)`` array of pair indices drawn with replacement.

    They depend only on ``sizes``, ``resamples`` and ``seed``: rows scored on the same sets get the same resamples, so
    their bootstrap means can be subtracted (a paired interval).
    """
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples={resamples!r} is not allowed; use an integer >= 1.")
    rng = np.random.default_rng(seed)
    return [rng.integers(0, size, size=(resamples, size)) for size in sizes]


def bootstrap_spearmans(
    predicted: Sequence[np.ndarray], gold: Sequence[np.ndarray], indices: Sequence[np.ndarray]
) -> np.ndarray:
    """The Spearman of each set recomputed on each resample: shape ``(sets, resamples)``.

    Args:
        predicted: per set, the predicted similarity of each pair.
        gold: per set, the gold score of each pair.
        indices: :func:`bootstrap_indices` of the set sizes.

    Returns:
        One Spearman per set and resample (NaN where a resample is constant on one side).
    """
    if not (len(predicted) == len(gold) == len(indices)):
        raise ValueError(f"got {len(predicted)} predicted, {len(gold)} gold and {len(indices)} index sets.")
    per_set = []
    for p, g, idx in zip(predicted, gold, indices, strict=True):
        p, g = np.asarray(p, dtype=np.float64), np.asarray(g, dtype=np.float64)
        if not (len(p) == len(g) == idx.shape[1]):
            raise ValueError(f"a set has {len(p)} predictions, {len(g)} gold scores and {idx.shape[1]} indices.")
        per_set.append(_pearson_rows(_rank_rows(p[idx]), _rank_rows(g[idx])))
    return np.asarray(per_set).reshape(len(indices), -1)


def bootstrap_means(
    predicted: Sequence[np.ndarray], gold: Sequence[np.ndarray], indices: Sequence[np.ndarray]
) -> np.ndarray:
    """The mean over sets of :func:`bootstrap_spearmans` (same arguments): one value per resample, ``(resamples,)``
    (NaN where a resample of some set is constant on one side)."""
    return np.mean(bootstrap_spearmans(predicted, gold, indices), axis=0)


def bootstrap_query_means(values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The mean of per-query values (e.g. :func:`ndcg_at_k`) on each resample of queries: shape ``(resamples,)``.

    Args:
        values: one value per query.
        indices: a ``(resamples, queries)`` array of :func:`bootstrap_indices`.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or indices.shape[1] != len(values):
        raise ValueError(f"got {values.shape} per-query values and {indices.shape[1]} indices per resample.")
    return values[indices].mean(axis=1)


def ndcg_at_k(scores: np.ndarray, relevant: Sequence[Sequence[int]], k: int = 10) -> np.ndarray:
    """Per-query nDCG@k with binary relevance from a ``(queries, documents)`` score matrix.

    Documents are ranked by decreasing score; equal scores keep corpus order (a stable sort), so the value is
    deterministic. DCG sums ``1 / log2(rank + 1)`` over the relevant documents in the first ``k`` ranks; the ideal DCG
    puts ``min(k, number relevant)`` relevant documents first.

    Args:
        scores: similarity of each query (row) to each document (column).
        relevant: per query, the column indices of its relevant documents (at least one each).
        k: the cut-off. Defaults to 10.

    Returns:
        One nDCG@k in [0, 1] per query.

    Raises:
        ValueError: ``k`` < 1, a query without relevant documents (nDCG is undefined), an index outside the corpus,
            or one entry of ``relevant`` per query not given.

    Example:
        >>> ndcg_at_k(np.array([[0.9, 0.1, 0.5]]), [[2]], k=10).round(4).tolist()  # the relevant one ranks 2nd
        [0.6309]
    """
    scores = np.asarray(scores, dtype=np.float64)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} is not allowed; use an integer >= 1.")
    if scores.ndim != 2 or scores.shape[0] != len(relevant):
        raise ValueError(f"scores must be (queries, documents) with one row per query; got {scores.shape} and "
                         f"{len(relevant)} queries' relevant documents.")  # fmt: skip
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    values = np.empty(len(relevant))
    for query, docs in enumerate(relevant):
        docs = sorted(set(docs))
        if not docs:
            raise ValueError(f"query {query} has no relevant document; nDCG is undefined (leave such queries out).")
        if docs[0] < 0 or docs[-1] >= scores.shape[1]:
            raise ValueError(f"query {query}: relevant index {docs} outside the corpus of {scores.shape[1]}.")
        gains = np.isin(order[query], docs)
        ideal = discounts[: min(k, len(docs))].sum()
        values[query] = (gains * discounts[: len(gains)]).sum() / ideal
    return values


def retrieval_ndcg(
    query_embeddings: np.ndarray, corpus_embeddings: np.ndarray, relevant: Sequence[Sequence[int]], k: int = 10
) -> np.ndarray:
    """Per-query nDCG@k of cosine retrieval: L2-normalised query and corpus embeddings, ranked by dot product.

    Args:
        query_embeddings: ``(queries, dim)``, L2-normalised.
        corpus_embeddings: ``(documents, dim)``, L2-normalised.
        relevant: per query, the row indices of its relevant documents in ``corpus_embeddings``.
        k: the cut-off. Defaults to 10.

    Returns:
        :func:`ndcg_at_k` of the cosine scores.
    """
    scores = np.asarray(query_embeddings, dtype=np.float64) @ np.asarray(corpus_embeddings, dtype=np.float64).T
    return ndcg_at_k(scores, relevant, k)


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> dict[str, Any]:
    """``{"low", "high", "resamples", "undefined"}``: the percentile interval of the finite samples.

    ``undefined`` counts the resamples whose statistic was NaN (a constant resample); they are reported, not hidden.
    """
    finite = samples[np.isfinite(samples)]
    undefined = int(samples.size - finite.size)
    if undefined:
        logger.warning("%d of %d bootstrap resamples had an undefined Spearman; left out.", undefined, samples.size)
    if not finite.size:
        return {"low": None, "high": None, "resamples": int(samples.size), "undefined": undefined}
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return {"low": float(low), "high": float(high), "resamples": int(samples.size), "undefined": undefined}
