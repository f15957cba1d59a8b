"""The metrics of GRACE evaluation: Spearman rank correlation and its bootstrap intervals.

Every Spearman grace_st reports comes from :func:`spearman` (average ranks for ties, as ``scipy.stats.spearmanr``);
bootstrap intervals resample pairs within each set (:func:`bootstrap_indices`), so rows scored on the same sets get the
same resamples and their difference has a paired interval.
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


def bootstrap_means(
    predicted: Sequence[np.ndarray], gold: Sequence[np.ndarray], indices: Sequence[np.ndarray]
) -> np.ndarray:
    """The mean over sets of the per-set Spearman, recomputed on each resample: shape ``(resamples,)``.

    Args:
        predicted: per set, the predicted similarity of each pair.
        gold: per set, the gold score of each pair.
        indices: :func:`bootstrap_indices` of the set sizes.

    Returns:
        One five-set mean per resample (NaN where a resample of some set is constant on one side).
    """
    if not (len(predicted) == len(gold) == len(indices)):
        raise ValueError(f"got {len(predicted)} predicted, {len(gold)} gold and {len(indices)} index sets.")
    per_set = []
    for p, g, idx in zip(predicted, gold, indices, strict=True):
        p, g = np.asarray(p, dtype=np.float64), np.asarray(g, dtype=np.float64)
        if not (len(p) == len(g) == idx.shape[1]):
            raise ValueError(f"a set has {len(p)} predictions, {len(g)} gold scores and {idx.shape[1]} indices.")
        per_set.append(_pearson_rows(_rank_rows(p[idx]), _rank_rows(g[idx])))
    return np.mean(per_set, axis=0)


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
