"""The GRACE reward terms on hand-built embeddings (the rationale diagnostics are tested in test_diagnostics.py)."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

import grace_st.training.rewards as rewards
from grace_st.training.rewards import (
    consistency_term,
    contrastive_term,
    grace_rewards,
    hard_negative_term,
    infonce_term,
    self_negative_term,
    term_statistics,
)


def unit(*values: float) -> list[float]:
    norm = math.sqrt(sum(v * v for v in values))
    return [v / norm for v in values]


@pytest.fixture
def batch():
    """Two groups of G=2 rollouts in 3-d, with per-rollout query and negative rows (repeated within a group)."""
    q = torch.tensor([unit(1, 0, 0), unit(1, 0, 0), unit(0, 1, 0), unit(0, 1, 0)])
    d = torch.tensor([unit(1, 1, 0), unit(1, 0, 1), unit(0, 1, 1), unit(1, 1, 1)])
    neg = torch.tensor([unit(0, 0, 1), unit(0, 0, 1), unit(1, 0, 0), unit(1, 0, 0)])
    return q, d, neg


def test_doctests():
    result = doctest.testmod(rewards)
    assert result.failed == 0 and result.attempted >= 10  # the examples really ran


def test_supervised_terms_match_the_formula(batch):
    q, d, neg = batch
    cos = lambda a, b: float(torch.dot(a, b))  # noqa: E731
    result = grace_rewards(q, d, neg, 2, consistency_weight=0.2, hard_negative_weight=0.2, temperature=0.1)
    for i in range(4):
        g, other = divmod(i, 2)[0], 1 - divmod(i, 2)[0]
        mate = i + 1 if i % 2 == 0 else i - 1
        contrastive = cos(q[i], d[i]) - cos(q[i], neg[i])
        consistency = cos(d[i], d[mate])
        hard = max(cos(q[2 * g], d[2 * other]), cos(q[2 * g], d[2 * other + 1]))  # mean over the single other group
        expected = (contrastive + 0.2 * consistency - 0.2 * hard) / 0.1
        assert result.contrastive[i].item() == pytest.approx(contrastive, abs=1e-6)
        assert result.consistency[i].item() == pytest.approx(consistency, abs=1e-6)
        assert result.hard_negative[i].item() == pytest.approx(hard, abs=1e-6)
        assert result.total[i].item() == pytest.approx(expected, abs=1e-5)
    assert not result.truncated.any()


def test_hard_negative_is_mean_over_other_groups_of_the_max():
    q = torch.eye(3).repeat_interleave(2, dim=0)  # three groups, queries e0, e1, e2
    d = torch.tensor([unit(1, 0, 0), unit(1, 0, 0), unit(1, 1, 0), unit(0, 1, 0), unit(0, 0, 1), unit(1, 0, 1)])
    term = hard_negative_term(q, d, 2)
    # group 0 (q=e0): other groups' best: max(0.7071, 0) and max(0, 0.7071) -> mean 0.7071
    assert term[0].item() == pytest.approx(math.sqrt(0.5), abs=1e-6)
    assert torch.equal(term[0], term[1])
    # group 1 (q=e1): best of group 0 = 0, of group 2 = 0 -> 0
    assert term[2].item() == pytest.approx(0.0, abs=1e-6)


def test_single_group_has_no_in_batch_negatives():
    q = torch.tensor([unit(1, 0), unit(1, 0)])
    d = torch.tensor([unit(1, 1), unit(1, 0)])
    assert hard_negative_term(q, d, 2).tolist() == [0.0, 0.0]
    assert self_negative_term(q, d, 2).tolist() == [0.0, 0.0]


def test_consistency_is_mean_over_the_other_rollouts():
    d = torch.tensor([unit(1, 0), unit(1, 0), unit(0, 1)])
    assert consistency_term(d, 3).tolist() == pytest.approx([0.5, 0.5, 0.0])


def test_contrastive_without_negative_is_the_positive_cosine():
    q, d = torch.tensor([unit(1, 0)]), torch.tensor([unit(1, 1)])
    assert contrastive_term(q, d).item() == pytest.approx(math.sqrt(0.5))


def test_truncated_rollouts_get_the_fixed_penalty(batch):
    q, d, neg = batch
    finished = torch.tensor([True, False, True, True])
    result = grace_rewards(q, d, neg, 2, finished=finished, truncation_penalty=-1.0)
    assert result.total[1].item() == -1.0
    assert result.truncated.tolist() == [False, True, False, False]
    unpenalised = grace_rewards(q, d, neg, 2, finished=finished, truncation_penalty=None)
    assert unpenalised.total[1].item() == pytest.approx(grace_rewards(q, d, neg, 2).total[1].item())
    assert torch.equal(unpenalised.total[[0, 2, 3]], result.total[[0, 2, 3]])


def test_copy_penalty_lowers_the_reward_by_weight_times_rate_over_tau(batch):
    q, d, neg = batch
    rates = torch.tensor([1.0, 0.0, 0.5, 0.0])
    base = grace_rewards(q, d, neg, 2, copy_rate=rates)
    guarded = grace_rewards(q, d, neg, 2, copy_rate=rates, copy_penalty=0.5)
    assert (base.total - guarded.total).tolist() == pytest.approx([5.0, 0.0, 2.5, 0.0], abs=1e-5)
    assert guarded.copy_rate.tolist() == rates.tolist()


def test_unsupervised_reward(batch):
    q, d, _ = batch
    result = grace_rewards(q, d, None, 2, mode="unsupervised", temperature=0.1)
    own = (q * d).sum(-1)
    other_queries = torch.stack([q[2], q[2], q[0], q[0]])
    negatives = (d * other_queries).sum(-1)
    expected = (own + 0.2 * consistency_term(d, 2) - 0.2 * negatives) / 0.1
    assert result.total.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert result.hard_negative.tolist() == pytest.approx(negatives.tolist(), abs=1e-6)


def test_bad_arguments_raise(batch):
    q, d, neg = batch
    with pytest.raises(ValueError, match="group_size=3"):
        grace_rewards(q, d, neg, 3)
    with pytest.raises(ValueError, match="mode='weird'"):
        grace_rewards(q, d, neg, 2, mode="weird")
    with pytest.raises(ValueError, match="temperature"):
        grace_rewards(q, d, neg, 2, temperature=0)
    with pytest.raises(ValueError, match="temperature=nan"):
        grace_rewards(q, d, neg, 2, temperature=float("nan"))
    with pytest.raises(ValueError, match="copy_penalty=inf"):
        grace_rewards(q, d, neg, 2, copy_penalty=float("inf"))
    with pytest.raises(ValueError, match=r"query \(4, 2\) and positive \(4, 3\)"):
        grace_rewards(q[:, :2], d, neg, 2)
    with pytest.raises(ValueError, match=r"negative \(2, 3\)"):
        grace_rewards(q, d, neg[:2], 2)
    with pytest.raises(ValueError, match=r"finished has shape \(3,\)"):
        grace_rewards(q, d, neg, 2, finished=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"copy_rate has shape \(4, 1\)"):
        grace_rewards(q, d, neg, 2, copy_rate=torch.zeros(4, 1))


def test_infonce_term_is_the_log_softmax_over_all_queries_and_the_own_negative(batch):
    q, d, neg = batch
    tau = 0.1
    got = infonce_term(q, d, neg, 2, tau)
    for i in range(4):
        g = i // 2
        candidates = [q[0], q[2], neg[i]]
        logits = torch.tensor([float(torch.dot(d[i], c)) / tau for c in candidates])
        expected = tau * (logits[g] - torch.logsumexp(logits, 0)).item()
        assert got[i].item() == pytest.approx(expected, abs=1e-6)
    no_negative = infonce_term(q, d, None, 2, tau)
    assert (no_negative >= got - 1e-7).all()  # one candidate fewer: never a lower log-probability


def test_every_term_of_the_infonce_form_varies_within_a_group_and_the_paper_form_cancels_two():
    # Groups of 3 (with 2 rollouts, consistency is cos(d_1, d_2) for both: constant in any form).
    q = torch.tensor([unit(1, 0, 0)] * 3 + [unit(0, 1, 0)] * 3)
    neg = torch.tensor([unit(0, 0, 1)] * 3 + [unit(1, 0, 0)] * 3)
    d = torch.tensor([unit(1, 1, 0), unit(1, 0, 1), unit(2, 1, 1), unit(0, 1, 1), unit(1, 1, 1), unit(1, 3, 0)])
    copies = torch.tensor([0.0, 0.5, 0.25, 0.0, 0.1, 0.0])
    per_rollout = grace_rewards(q, d, neg, 3, form="infonce", copy_rate=copies, copy_penalty=0.5)
    assert set(per_rollout.terms) == {"infonce", "consistency", "copy"}
    stats = term_statistics(per_rollout, 3)
    assert all(stats[name]["within_group_std"] > 0 for name in per_rollout.terms)
    assert all(stats[name]["advantage_share"] != 0 for name in per_rollout.terms)
    paper = grace_rewards(q, d, neg, 3)
    assert set(paper.terms) == {"positive", "negative", "hard_negative", "consistency"}
    stats = term_statistics(paper, 3)
    for cancelled in ("negative", "hard_negative"):
        assert stats[cancelled]["within_group_std"] == pytest.approx(0.0, abs=1e-7)
        assert stats[cancelled]["advantage_share"] == pytest.approx(0.0, abs=1e-7)
    assert stats["positive"]["advantage_share"] > 0
    assert sum(s["advantage_share"] for s in stats.values()) == pytest.approx(1.0, abs=1e-5)


def test_contributions_sum_to_the_total_with_truncation():
    q = torch.tensor([unit(1, 0, 0)] * 3 + [unit(0, 1, 0)] * 3)
    d = torch.tensor([unit(1, 1, 0), unit(1, 0, 1), unit(0, 1, 1), unit(1, 1, 1), unit(0, 1, 0), unit(1, 2, 0)])
    finished = torch.tensor([True, False, True, True, True, False])
    for form in ("paper", "infonce"):
        result = grace_rewards(q, d, None, 3, form=form, finished=finished, copy_rate=torch.rand(6), copy_penalty=0.3)
        parts = result.contributions()
        torch.testing.assert_close(sum(parts.values()), result.total)
        scored = sum(weight * values / 0.1 for values, weight in result.terms.values())
        torch.testing.assert_close(parts["truncation"], torch.where(finished, 0.0, -1.0 - scored))
        stats = term_statistics(result, 3)
        assert sum(s["advantage_share"] for s in stats.values()) == pytest.approx(1.0, abs=1e-5)
        assert stats["truncation"]["within_group_std"] is None and stats["truncation"]["advantage_share"] != 0


def test_terms_constant_in_a_group_keep_a_zero_share_when_rollouts_are_cut(batch):
    q, d, neg = batch
    result = grace_rewards(q, d, neg, 2, finished=torch.tensor([True, False, True, True]))
    stats = term_statistics(result, 2)
    assert stats["negative"]["advantage_share"] == pytest.approx(0.0, abs=1e-7)
    assert stats["hard_negative"]["advantage_share"] == pytest.approx(0.0, abs=1e-7)
    assert stats["truncation"]["advantage_share"] > 0


def test_a_batch_without_advantage_has_no_shares():
    q = torch.tensor([unit(1, 0)] * 2)
    result = grace_rewards(q, q.clone(), None, 2)
    assert all(s["advantage_share"] is None for s in term_statistics(result, 2).values())
    with pytest.raises(ValueError, match="form='nce'"):
        grace_rewards(q, q, None, 2, form="nce")
