"""grace_st.evaluation.metrics: Spearman (as scipy computes it) and the paired bootstrap of a mean over sets."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from grace_st.evaluation.metrics import (
    bootstrap_indices,
    bootstrap_means,
    bootstrap_query_means,
    bootstrap_spearmans,
    ndcg_at_k,
    percentile_interval,
    retrieval_ndcg,
    spearman,
)


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


def test_ndcg_at_k_by_hand_with_ties_in_corpus_order():
    # Query 0: relevant documents 1 and 3; ranking 0, 1, 2, 3 (scores tie: corpus order) -> hits at ranks 2 and 4.
    # Query 1: relevant document 2 ranked first -> 1. Query 2: relevant 0 is 3rd of 3 but k=2 -> 0.
    scores = np.array([[0.5, 0.5, 0.5, 0.5], [0.1, 0.2, 0.9, 0.3], [0.1, 0.8, 0.9, 0.0]])
    values = ndcg_at_k(scores, [[1, 3], [2], [0]], k=2)
    ideal = 1 + 1 / np.log2(3)
    assert values[0] == pytest.approx((1 / np.log2(3)) / ideal)
    assert values[1] == pytest.approx(1.0) and values[2] == 0.0
    full = ndcg_at_k(scores, [[1, 3], [2], [0]], k=10)
    assert full[0] == pytest.approx((1 / np.log2(3) + 1 / np.log2(5)) / ideal) and full[2] == pytest.approx(0.5)


def test_ndcg_at_k_rejects_undefined_and_out_of_range_queries():
    scores = np.zeros((2, 3))
    with pytest.raises(ValueError, match="query 1 has no relevant document"):
        ndcg_at_k(scores, [[0], []])
    with pytest.raises(ValueError, match="outside the corpus of 3"):
        ndcg_at_k(scores, [[0], [3]])
    with pytest.raises(ValueError, match="k=0"):
        ndcg_at_k(scores, [[0], [1]], k=0)


def _brute_force_ndcg(scores, relevant, k):
    values = []
    for row, docs in zip(scores, relevant, strict=True):
        ranked = sorted(range(len(row)), key=lambda doc: (-row[doc], doc))[:k]
        dcg = sum(1 / np.log2(rank + 2) for rank, doc in enumerate(ranked) if doc in docs)
        values.append(dcg / sum(1 / np.log2(rank + 2) for rank in range(min(k, len(docs)))))
    return np.array(values)


def test_retrieval_ndcg_matches_trec_eval():
    rng = np.random.default_rng(0)
    queries, corpus = rng.normal(size=(12, 8)), rng.normal(size=(40, 8))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    relevant = [sorted(rng.choice(40, size=int(rng.integers(1, 15)), replace=False).tolist()) for _ in range(12)]
    values = retrieval_ndcg(queries, corpus, relevant, k=10)
    scores = queries @ corpus.T  # continuous scores: no ties, so every implementation ranks alike
    np.testing.assert_allclose(values, _brute_force_ndcg(scores, relevant, 10), atol=1e-12)
    pytrec_eval = pytest.importorskip("pytrec_eval")
    qrels = {f"q{q}": {f"d{d}": 1 for d in docs} for q, docs in enumerate(relevant)}
    run = {f"q{q}": {f"d{d}": float(scores[q, d]) for d in range(40)} for q in range(12)}
    measured = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    np.testing.assert_allclose(values, [measured[f"q{q}"]["ndcg_cut_10"] for q in range(12)], atol=1e-6)


def test_bootstrap_query_means_and_spearmans_share_the_resamples():
    indices = bootstrap_indices([5, 7, 4], 30, seed=2)
    predicted, gold = _synthetic_sets(5)[0][:1] + _synthetic_sets(7)[0][:1], _synthetic_sets(5)[1][:1]
    gold += _synthetic_sets(7)[1][:1]
    per_set = bootstrap_spearmans(predicted, gold, indices[:2])
    assert per_set.shape == (2, 30)
    np.testing.assert_allclose(per_set.mean(axis=0), bootstrap_means(predicted, gold, indices[:2]))
    values = np.array([0.0, 1.0, 0.5, 0.25])
    np.testing.assert_allclose(bootstrap_query_means(values, indices[2]), values[indices[2]].mean(axis=1))
    with pytest.raises(ValueError, match="indices per resample"):
        bootstrap_query_means(values, indices[0])
