"""grace_st.evaluation.metrics: Spearman (as scipy computes it) and the paired bootstrap of a mean over sets."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from grace_st.evaluation.metrics import bootstrap_indices, bootstrap_means, percentile_interval, spearman


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(1)
    predicted = rng.normal(size=50).round(1)  # ties on both sides
    gold = (predicted + rng.normal(size=50)).round(0)
    assert spearman(predicted, gold) == pytest.approx(spearmanr(predicted, gold).statistic, abs=1e-12)
    assert np.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="one length"):
        spearman([1.0, 2.0], [1.0, 2.0, 3.0])


def _synthetic_sets(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    gold = [rng.uniform(0, 5, size=n) for _ in range(5)]
    predicted = [g + rng.normal(scale=2.0, size=n) for g in gold]
    return predicted, gold


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_pairs():
    widths = []
    for n in (20, 400):
        predicted, gold = _synthetic_sets(n)
        point = np.mean([spearman(p, g) for p, g in zip(predicted, gold, strict=True)])
        means = bootstrap_means(predicted, gold, bootstrap_indices([n] * 5, 500, seed=3))
        interval = percentile_interval(means)
        assert interval["low"] < point < interval["high"]
        assert interval["resamples"] == 500 and interval["undefined"] == 0
        widths.append(interval["high"] - interval["low"])
    assert widths[1] < widths[0] / 2  # ~1/sqrt(20) of the pairs: about 4.5x narrower


def test_bootstrap_is_seeded_and_paired():
    first, second = bootstrap_indices([5, 7], 10, seed=0), bootstrap_indices([5, 7], 10, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not np.array_equal(first[0], bootstrap_indices([5, 7], 10, seed=1)[0])
    assert [a.shape for a in first] == [(10, 5), (10, 7)]
    with pytest.raises(ValueError, match="resamples=0"):
        bootstrap_indices([5], 0)


def test_undefined_resamples_are_counted_not_hidden():
    interval = percentile_interval(np.array([0.1, np.nan, 0.3, 0.2]))
    assert interval["undefined"] == 1 and interval["resamples"] == 4
    assert percentile_interval(np.array([np.nan]))["low"] is None


def test_doctests():
    import doctest

    from grace_st.evaluation import metrics

    assert doctest.testmod(metrics).failed == 0
