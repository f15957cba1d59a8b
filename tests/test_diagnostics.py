"""Rationale diagnostics: one definition of copy rate, finish rate, mean length, distinct rollouts per group and
within-group reward std, with stated edge cases."""

from __future__ import annotations

import doctest
import json
import math

import pytest
import torch

from grace_st import diagnostics
from grace_st.diagnostics import RationaleStats, copy_rate, distinct_per_group, group_reward_std, rationale_stats


def test_doctests():
    result = doctest.testmod(diagnostics)
    assert result.attempted > 0 and result.failed == 0


def test_copy_rate_counts_tokens_in_copied_spans():
    assert copy_rate([1, 2, 3, 4], [9, 1, 2, 3, 4, 9]) == 1.0
    assert copy_rate([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4]) == 0.5
    # Overlapping copied windows mark each token once: tokens 1..5 copied, 9 not.
    assert copy_rate([1, 2, 3, 4, 5, 9], [1, 2, 3, 4, 5]) == pytest.approx(5 / 6)
    # Three tokens in order but no 4-token run in common: nothing copied.
    assert copy_rate([1, 2, 3, 7, 5], [1, 2, 3, 4, 5]) == 0.0
    assert copy_rate([1, 2, 3], [1, 2, 3, 4], min_span=4) == 1.0  # shorter than the span: copied as a whole
    assert copy_rate([1, 2, 9], [1, 2, 3, 4], min_span=4) == 0.0
    assert copy_rate([1, 2, 9], [1, 2, 3, 4], min_span=2) == pytest.approx(2 / 3)


def test_distinct_per_group():
    assert distinct_per_group([[1], [1], [1], [1]], 2) == 1.0
    assert distinct_per_group([[1], [2], [3], [3]], 2) == 1.5
    assert distinct_per_group([[1, 2], [2, 1], [1, 2], [4], [5], [6]], 3) == 2.5  # token order matters
    assert distinct_per_group([], 4) == 0.0
    with pytest.raises(ValueError, match="3 rollouts cannot be split into groups of group_size=2"):
        distinct_per_group([[1], [2], [3]], 2)
    with pytest.raises(ValueError, match="group_size=0"):
        distinct_per_group([[1]], 0)


def test_group_reward_std_is_the_mean_of_per_group_population_stds():
    rewards = torch.tensor([0.0, 0.0, 1.0, 3.0, 2.0, 5.0, 2.0, 5.0])
    expected = [torch.tensor(g).std(unbiased=False).item() for g in ([0.0, 0.0], [1.0, 3.0], [2.0, 5.0], [2.0, 5.0])]
    assert group_reward_std(rewards, 2) == pytest.approx(sum(expected) / 4)  # (0 + 1 + 1.5 + 1.5) / 4
    assert group_reward_std(rewards, 4) == pytest.approx((math.sqrt(1.5) + 1.5) / 2)  # population std of 0, 0, 1, 3
    with pytest.raises(ValueError, match="8 rewards cannot be split into groups of group_size=3"):
        group_reward_std(rewards, 3)


def test_stats_are_token_weighted_and_round_trip():
    stats = RationaleStats()
    stats.add([1, 2, 3, 4], [1, 2, 3, 4], finished=True, text="a b c d", rationale="a b c d")
    stats.add([7, 8, 9, 10, 11, 12], [1, 2, 3, 4], finished=False, text="x", rationale="new")
    # 4 copied of 10 tokens (not the mean of the per-rationale rates, 0.5).
    assert stats.copy_rate == pytest.approx(0.4)
    assert stats.mean_length == 5 and stats.finish_rate == 0.5 and stats.texts == stats.rationales == 2
    assert stats.examples == [{"text": "a b c d", "rationale": "a b c d"}, {"text": "x", "rationale": "new"}]
    again = RationaleStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert again.to_dict() == stats.to_dict()
    merged = stats.merge(RationaleStats(texts=1, seconds=2.0))
    assert merged.texts == 3 and merged.rationales == 2 and merged.seconds_per_text == pytest.approx(2 / 3)


def test_empty_rationale_counts_as_zero_tokens():
    stats = rationale_stats([[], [5, 6, 7, 8]], [[1, 2], [5, 6, 7, 8]], [True, True])
    assert copy_rate([], [1, 2]) == 0.0 and copy_rate([], []) == 0.0
    assert stats.mean_length == 2.0 and stats.finish_rate == 1.0
    assert stats.copy_rate == 1.0  # the empty rationale weighs nothing in the copy rate
    only_empty = rationale_stats([[]], [[1, 2]], [True])
    assert only_empty.copy_rate is None and only_empty.mean_length == 0.0 and only_empty.finish_rate == 1.0


def test_no_rationales_give_none():
    stats = RationaleStats(texts=4, seconds=1.0)
    assert (stats.copy_rate, stats.mean_length, stats.finish_rate) == (None, None, None)
    assert stats.seconds_per_text == 0.25
    assert RationaleStats().seconds_per_text is None


def test_echo_is_measured_like_any_rationale():
    # Echo repeats the text: every token is copied, the rationale is finished.
    texts = [[10, 11, 12, 13, 14], [20, 21]]
    stats = rationale_stats(texts, texts, [True, True])
    assert stats.copy_rate == 1.0 and stats.finish_rate == 1.0 and stats.mean_length == 3.5


def test_lengths_must_match():
    with pytest.raises(ValueError, match="one entry per text; got 2, 1 and 2"):
        rationale_stats([[1], [2]], [[1]], [True, False])
