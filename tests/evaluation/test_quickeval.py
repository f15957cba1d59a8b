"""Quick dev evaluations: triplet and STS scores against direct computations, and their rationale diagnostics."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

from grace_st.diagnostics import rationale_stats
from grace_st.evaluation import quickeval
from grace_st.evaluation.quickeval import encode, sts_spearman, triplet_scores
from grace_st.factory import from_backbone
from grace_st.readers import read_pairs
from grace_st.training.data import demo_data_path, load_triplets

TEXTS = ["a cat sits on the mat", "a dog runs", "a cat sits on the mat", "stocks fell sharply today"]


@pytest.fixture(scope="module")
def tiny_grace(tiny_backbone_dir):
    return from_backbone(tiny_backbone_dir, device="cpu", max_new_tokens=4)


def test_doctests():
    result = doctest.testmod(quickeval)
    assert result.attempted > 0 and result.failed == 0


def test_encode_matches_the_model_and_measures_distinct_texts(tiny_grace):
    encoded = encode(tiny_grace, TEXTS, batch_size=2)
    np.testing.assert_allclose(encoded.embeddings, tiny_grace.encode(TEXTS), atol=1e-5)
    assert encoded.embeddings.dtype == np.float32 and encoded.embeddings.shape == (4, 32)
    items = tiny_grace.encode(TEXTS[:2] + TEXTS[3:], output_value=None)
    eos = set(tiny_grace[0].eos_token_ids)
    masked = [item["rationale_ids"][item["rationale_mask"].bool()].tolist() for item in items]
    ids = [[t for t in row if t not in eos] for row in masked]
    sources = tiny_grace[0].text_token_ids(TEXTS[:2] + TEXTS[3:])
    expected = rationale_stats(ids, sources, [bool(item["rationale_finished"]) for item in items])
    stats = encoded.stats
    assert stats.texts == 3 and (stats.tokens, stats.finished) == (expected.tokens, expected.finished)
    assert stats.copy_rate == expected.copy_rate and stats.seconds > 0
    assert [e["text"] for e in stats.examples] == [TEXTS[0], TEXTS[1], TEXTS[3]]


def test_k_rationales_count_per_rationale_but_time_per_text(tiny_backbone_dir):
    model = from_backbone(tiny_backbone_dir, device="cpu", max_new_tokens=4, num_rationales=3, do_sample=True)
    stats = encode(model, TEXTS).stats
    assert (stats.texts, stats.rationales) == (3, 9)  # three distinct texts, three rationales each
    assert stats.seconds_per_text == pytest.approx(stats.seconds / 3)
    assert stats.mean_length == pytest.approx(stats.tokens / 9)


def test_prompt_reaches_the_model(tiny_grace):
    encoded = encode(tiny_grace, TEXTS[:2], prompt="query: ")
    np.testing.assert_allclose(encoded.embeddings, tiny_grace.encode(TEXTS[:2], prompt="query: "), atol=1e-5)
    assert not np.allclose(encoded.embeddings, encode(tiny_grace, TEXTS[:2]).embeddings, atol=1e-3)


def test_echo_none_and_other_models(tiny_backbone_dir):
    echo = encode(from_backbone(tiny_backbone_dir, device="cpu", rationale_mode="echo"), TEXTS).stats
    assert echo.copy_rate == 1.0 and echo.finish_rate == 1.0 and echo.mean_length > 3
    none = encode(from_backbone(tiny_backbone_dir, device="cpu", rationale_mode="none"), TEXTS).stats
    assert (none.copy_rate, none.mean_length, none.finish_rate, none.texts) == (None, None, None, 3)


def test_triplet_scores_match_a_direct_computation(tiny_grace):
    rows = list(load_triplets(demo_data_path("dev"), max_rows=6))
    scores = triplet_scores(tiny_grace, rows, batch_size=4)
    q = tiny_grace.encode([r["query"] for r in rows])
    p = tiny_grace.encode([r["positive"] for r in rows])
    n = tiny_grace.encode([r["negative"] for r in rows])
    closer = (q * p).sum(axis=1) > (q * n).sum(axis=1)
    assert scores["accuracy"] == pytest.approx(closer.mean())
    swapped = triplet_scores(tiny_grace, [{**r, "positive": r["negative"], "negative": r["positive"]} for r in rows])
    assert swapped["accuracy"] == pytest.approx(1 - scores["accuracy"])  # rows are not mixed up
    assert scores["mean_length"] <= 4 and set(scores) >= {"mrr@10", "finish_rate", "copy_rate", "examples"}


def test_sts_spearman_matches_a_direct_computation(tiny_grace, tmp_path):
    from scipy.stats import spearmanr

    path = tmp_path / "sts.tsv"
    path.write_text("4.0\ta cat sits\ta cat is sitting\n1.0\ta dog runs\tstocks fell\n2.5\tit rains\tit is wet\n")
    pairs = read_pairs(path)
    a, b = tiny_grace.encode([x.sentence1 for x in pairs]), tiny_grace.encode([x.sentence2 for x in pairs])
    expected = spearmanr((a * b).sum(axis=1), [x.score for x in pairs]).statistic
    assert sts_spearman(tiny_grace, pairs)["spearman"] == pytest.approx(expected)
    assert sts_spearman(tiny_grace, [tuple(x[:3]) for x in pairs])["spearman"] == pytest.approx(expected)
