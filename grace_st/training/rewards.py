"""The GRACE reward, as plain functions over tensors (rationale diagnostics live in :mod:`grace_st.diagnostics`).

Layout used throughout: a batch of ``n = n_groups * group_size`` rollouts, group by group (rows ``g*G .. g*G+G-1``
belong to group ``g``), as in TRL's GRPO batches. Every embedding is L2-normalised, so a dot product is a cosine.
``query`` and ``negative`` are given per rollout (the same row repeated across a group).

Supervised reward of rollout ``i`` in group ``g`` (``../shared/GRACE.md``)::

    r_i = ( cos(q, d+_i) - cos(q, d-)                       # contrastive
          + λ_c * mean_{j != i} cos(d+_i, d+_j)             # consistency
          - λ_h * mean_{g' != g} max_{k in g'} cos(q, d+_k) # in-batch hard negatives
          - w_copy * copy_rate_i ) / τ                      # optional guard (0 in the paper)

Unsupervised: the contrastive term is ``cos(q_i, d_i)`` and the negative term ``mean_{g' != g} cos(d_i, q_g')``.
A rollout cut at the length limit gets the fixed ``truncation_penalty`` instead.

GRPO's advantage is the reward minus its group mean, so a term that is the same for every rollout of a group teaches
nothing. In the paper's form two terms are such constants: ``cos(q, d-)`` (query and hard negative are written once per
group) and the in-batch hard-negative term (it looks at the query, not at the rollout). What training optimises there
is ``cos(q, d+_i)`` + consistency - copy penalty. :func:`term_statistics` measures this in every run: each term's
within-group standard deviation and its share of the advantage's variance.

The per-rollout form (``form="infonce"``) makes the rollout the anchor of an InfoNCE term over the batch: the
candidates are the query of every group and the own group's hard negative, and the target is the own query::

    r_i = ( τ * log softmax_c( cos(d+_i, c) / τ )[q_g]       # c in {q_1 .. q_n_groups, d-_g}
          + λ_c * mean_{j != i} cos(d+_i, d+_j)
          - w_copy * copy_rate_i ) / τ

Every term depends on the rollout's own embedding, so every term varies within a group: the hard negative and the other
groups' queries now push each rollout away instead of cancelling. ``τ * log softmax`` is in cosine units (it tends to
``cos(d+_i, q_g) - max_c cos(d+_i, c)`` as τ → 0), so λ_c and the copy weight keep their meaning. Unsupervised, the
candidates are the query views of all texts of the batch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 1 or x.shape[0] % group_size:
        raise ValueError(f"{x.shape[0]} rollouts cannot be split into groups of group_size={group_size!r}.")
    return x.view(x.shape[0] // group_size, group_size, *x.shape[1:])


def contrastive_term(
    query: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None = None
) -> torch.Tensor:
    """``cos(q, d+) - cos(q, d-)`` per rollout (``cos(q, d+)`` when ``negative`` is None).

    Args:
        query: ``(n, dim)`` query embedding of each rollout's group.
        positive: ``(n, dim)`` embeddings of the rollouts (document + rationale).
        negative: ``(n, dim)`` hard-negative embedding of each rollout's group, or None.

    Returns:
        ``(n,)`` tensor.

    Example:
        >>> q, d, neg = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.6, 0.8]]), torch.tensor([[0.0, 1.0]])
        >>> contrastive_term(q, d, neg).tolist()
        [0.6000000238418579]
    """
    term = (query * positive).sum(dim=-1)
    if negative is not None:
        term = term - (query * negative).sum(dim=-1)
    return term


def consistency_term(positive: torch.Tensor, group_size: int) -> torch.Tensor:
    """``mean_{j != i} cos(d+_i, d+_j)`` over the other rollouts of the same group.

    Args:
        positive: ``(n, dim)`` rollout embeddings, group by group.
        group_size: rollouts per group, G (>= 2 for a non-zero term).

    Returns:
        ``(n,)`` tensor (zeros when ``group_size == 1``).

    Example:
        >>> d = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        >>> consistency_term(d, 3).tolist()
        [0.5, 0.5, 0.0]
    """
    groups = _groups(positive, group_size)
    if group_size == 1:
        return positive.new_zeros(positive.shape[0])
    sims = groups @ groups.transpose(1, 2)  # (n_groups, G, G)
    off_diagonal = sims.sum(dim=-1) - sims.diagonal(dim1=1, dim2=2)
    return (off_diagonal / (group_size - 1)).reshape(-1)


def hard_negative_term(query: torch.Tensor, positive: torch.Tensor, group_size: int) -> torch.Tensor:
    """``mean_{g' != g} max_{k in g'} cos(q_g, d+_k)``: how close the query is to other groups' best rollouts.

    Args:
        query: ``(n, dim)`` query embedding per rollout; the first row of each group is used.
        positive: ``(n, dim)`` rollout embeddings of the whole (gathered) batch.
        group_size: rollouts per group, G.

    Returns:
        ``(n,)`` tensor, constant within a group (zeros when the batch holds one group).

    Example:
        >>> q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
        >>> d = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]])
        >>> hard_negative_term(q, d, 2).tolist()
        [0.800000011920929, 0.800000011920929, 0.800000011920929, 0.800000011920929]
    """
    group_queries = _groups(query, group_size)[:, 0]  # (n_groups, dim)
    n_groups = group_queries.shape[0]
    if n_groups == 1:
        return query.new_zeros(query.shape[0])
    sims = group_queries @ positive.T  # (n_groups, n)
    best = sims.view(n_groups, n_groups, group_size).max(dim=-1).values  # best[g, g'] = max_k in g' cos(q_g, d_k)
    others = ~torch.eye(n_groups, dtype=torch.bool, device=query.device)
    per_group = (best * others).sum(dim=1) / (n_groups - 1)
    return per_group.repeat_interleave(group_size)


def self_negative_term(query: torch.Tensor, positive: torch.Tensor, group_size: int) -> torch.Tensor:
    """Unsupervised in-batch negatives: ``mean_{g' != g} cos(d_i, q_g')`` (other texts' query views).

    Args:
        query: ``(n, dim)`` query-view embedding per rollout; the first row of each group is used.
        positive: ``(n, dim)`` rollout embeddings.
        group_size: rollouts per group, G.

    Returns:
        ``(n,)`` tensor (zeros when the batch holds one group).

    Example:
        >>> q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
        >>> d = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]])
        >>> self_negative_term(q, d, 2).tolist()
        [0.0, 0.800000011920929, 0.800000011920929, 0.0]
    """
    group_queries = _groups(query, group_size)[:, 0]
    n_groups = group_queries.shape[0]
    if n_groups == 1:
        return query.new_zeros(query.shape[0])
    sims = positive @ group_queries.T  # (n, n_groups)
    own = torch.arange(n_groups, device=query.device).repeat_interleave(group_size)
    others = torch.ones_like(sims, dtype=torch.bool)
    others[torch.arange(sims.shape[0], device=query.device), own] = False
    return (sims * others).sum(dim=1) / (n_groups - 1)


def infonce_term(
    query: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor | None,
    group_size: int,
    temperature: float,
) -> torch.Tensor:
    """``τ * log softmax_c(cos(d+_i, c) / τ)`` at the rollout's own query: the rollout is the anchor.

    The candidates ``c`` are the query of every group of the batch and (when given) the own group's hard negative.

    Args:
        query: ``(n, dim)`` query embedding per rollout; the first row of each group is used.
        positive: ``(n, dim)`` rollout embeddings, group by group.
        negative: ``(n, dim)`` hard-negative embedding per rollout (first row of each group used), or None.
        group_size: rollouts per group, G.
        temperature: τ of the softmax (the result is multiplied back by τ, so it is in cosine units).

    Returns:
        ``(n,)`` tensor, <= 0; it varies with each rollout's own embedding.

    Example:
        >>> q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
        >>> d = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.0, 1.0]])
        >>> [round(x, 4) for x in infonce_term(q, d, None, 2, 0.1).tolist()]
        [-0.0, -0.2127, -0.0, -0.0]
    """
    group_queries = _groups(query, group_size)[:, 0]  # (n_groups, dim)
    own = torch.arange(group_queries.shape[0], device=positive.device).repeat_interleave(group_size)
    negatives = None if negative is None else _groups(negative, group_size)[:, 0].repeat_interleave(group_size, 0)
    return temperature * infonce_log_probs(positive, group_queries, own, negatives, temperature)


def infonce_log_probs(
    anchor: torch.Tensor,
    candidates: torch.Tensor,
    own: torch.Tensor,
    negative: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """``log softmax_c(cos(anchor_i, c) / τ)`` at each anchor's own candidate: the InfoNCE of the reward
    (:func:`infonce_term`) and of the trainer's embedding loss.

    Args:
        anchor: ``(n, dim)`` unit vectors.
        candidates: ``(m, dim)`` unit vectors shared by all anchors.
        own: ``(n,)`` index of each anchor's own candidate.
        negative: ``(n, dim)`` one more candidate per anchor (its hard negative), or None.
        temperature: τ.

    Returns:
        ``(n,)`` log-probabilities, <= 0.
    """
    logits = anchor @ candidates.T  # (n, m)
    if negative is not None:
        logits = torch.cat([logits, (anchor * negative).sum(dim=-1, keepdim=True)], dim=1)
    log_p = torch.log_softmax(logits / temperature, dim=1)
    return log_p[torch.arange(anchor.shape[0], device=anchor.device), own]


REWARD_FORMS: tuple[str, ...] = ("paper", "infonce")


@dataclass
class GraceRewards:
    """All parts of the GRACE reward of one batch, each ``(n,)``.

    Attributes:
        total: the reward GRPO uses (``truncation_penalty`` where a rollout was cut).
        contrastive: the contrastive term, unweighted: ``cos(q, d+) - cos(q, d-)`` (paper, supervised), ``cos(q, d)``
            (paper, unsupervised) or the InfoNCE term (``form="infonce"``).
        consistency: mean cosine to the other rollouts of the group, unweighted.
        hard_negative: in-batch negative similarity, unweighted (it enters the total with a minus sign; zeros in the
            InfoNCE form, where negatives are inside the softmax).
        copy_rate: share of rationale tokens copied from the input (zeros when not given).
        truncated: True where the rollout was cut at the length limit.
        terms: ``{name: (values, weight)}`` of every term that enters the total with a non-zero weight: the unweighted
            per-rollout values and their weight inside the bracket (before the division by τ). Names: ``positive``
            (``cos(q, d+)``), ``negative`` (``cos(q, d-)``, weight -1), ``hard_negative``, ``infonce``,
            ``consistency``, ``copy``.
        temperature: τ.
        truncation_penalty: the fixed reward of a cut rollout, or None (no override).
    """

    total: torch.Tensor
    contrastive: torch.Tensor
    consistency: torch.Tensor
    hard_negative: torch.Tensor
    copy_rate: torch.Tensor
    truncated: torch.Tensor
    terms: dict[str, tuple[torch.Tensor, float]] = dataclasses.field(default_factory=dict)
    temperature: float = 1.0
    truncation_penalty: float | None = None

    def contributions(self) -> dict[str, torch.Tensor]:
        """What each term adds to ``total``, per rollout: ``weight * values / τ``, and (with a truncation penalty) a
        ``truncation`` entry: what the override changes on cut rollouts (the penalty minus the terms' sum there, 0
        elsewhere). They sum to ``total``; a term that is constant within a group stays constant there."""
        parts = {name: weight * values / self.temperature for name, (values, weight) in self.terms.items()}
        if self.truncation_penalty is not None:
            scored = sum(parts.values(), torch.zeros_like(self.total))
            parts["truncation"] = torch.where(
                self.truncated, float(self.truncation_penalty) - scored, torch.zeros_like(self.total)
            )
        return parts


def term_statistics(rewards: GraceRewards, group_size: int) -> dict[str, dict[str, float | None]]:
    """Which reward terms teach: each term's within-group standard deviation and share of the advantage's variance.

    GRPO's advantage of rollout ``i`` is ``A_i = r_i - mean_group(r)`` (divided by a per-group scale in some settings,
    which leaves the shares unchanged). With ``c_t`` a term's contribution to the reward (see
    :meth:`GraceRewards.contributions`) centred within its group, ``A = sum_t c_t``, so
    ``share_t = sum_i c_t,i * A_i / sum_i A_i^2`` splits the advantage's variance exactly: the shares sum to 1, a term
    that is constant within every group has share 0, and a negative share means the term works against the others.

    Args:
        rewards: the rewards of one batch (:func:`grace_rewards`).
        group_size: rollouts per group, G.

    Returns:
        ``{term: {"within_group_std": mean over groups of the population std of the unweighted term (None for the
        truncation entry), "advantage_share": share (None when every advantage is 0)}}``.

    Example:
        >>> q = torch.tensor([[1.0, 0.0]] * 2)
        >>> d = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
        >>> neg = torch.tensor([[0.0, 1.0]] * 2)
        >>> stats = term_statistics(grace_rewards(q, d, neg, 2, consistency_weight=0.0), 2)
        >>> stats["positive"]["advantage_share"], stats["negative"]["advantage_share"]
        (1.0, 0.0)
    """
    parts = rewards.contributions()
    advantage = _groups(rewards.total.float(), group_size)
    advantage = advantage - advantage.mean(dim=1, keepdim=True)
    variance = float((advantage**2).sum())
    out: dict[str, dict[str, float | None]] = {}
    for name, contribution in parts.items():
        centred = _groups(contribution.float(), group_size)
        centred = centred - centred.mean(dim=1, keepdim=True)
        share = float((centred * advantage).sum()) / variance if variance > 0 else None
        std = None
        if name in rewards.terms:
            std = _groups(rewards.terms[name][0].float(), group_size).std(dim=1, unbiased=False).mean().item()
        out[name] = {"within_group_std": std, "advantage_share": share}
    return out


def grace_rewards(
    query: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor | None,
    group_size: int,
    *,
    mode: str = "supervised",
    form: str = "paper",
    consistency_weight: float = 0.2,
    hard_negative_weight: float = 0.2,
    temperature: float = 0.1,
    finished: torch.Tensor | None = None,
    truncation_penalty: float | None = -1.0,
    copy_rate: torch.Tensor | None = None,
    copy_penalty: float = 0.0,
) -> GraceRewards:
    """The GRACE reward of every rollout of a batch, with each term kept apart for logging.

    Args:
        query: ``(n, dim)`` L2-normalised query embedding per rollout (the text's own query view when unsupervised).
        positive: ``(n, dim)`` L2-normalised rollout embeddings (document + rationale), group by group.
        negative: ``(n, dim)`` hard-negative embedding per rollout, or None (unsupervised, or no negatives).
        group_size: rollouts per group, G.
        mode: ``"supervised"`` or ``"unsupervised"``. Defaults to ``"supervised"``.
        form: ``"paper"`` (the published reward) or ``"infonce"`` (the per-rollout InfoNCE term; see the module
            docstring; ``hard_negative_weight`` is unused there). Defaults to ``"paper"``.
        consistency_weight: λ_c. Defaults to 0.2.
        hard_negative_weight: λ_h. Defaults to 0.2.
        temperature: τ. Defaults to 0.1.
        finished: ``(n,)`` bool, False where a rollout was cut at the length limit; None means all finished.
        truncation_penalty: fixed total reward of a cut rollout; None disables the override. Defaults to -1.0.
        copy_rate: ``(n,)`` share of each rationale copied from its input (see :func:`copy_rate`), or None.
        copy_penalty: weight of ``-copy_rate`` inside the bracket. Defaults to 0.0 (the paper's reward).

    Returns:
        A :class:`GraceRewards`.

    Example:
        >>> q = torch.tensor([[1.0, 0.0]] * 2)
        >>> d = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
        >>> neg = torch.tensor([[0.0, 1.0]] * 2)
        >>> r = grace_rewards(q, d, neg, 2, finished=torch.tensor([True, False]))
        >>> [round(x, 4) for x in r.total.tolist()], [round(x, 4) for x in r.contrastive.tolist()]
        ([7.2, -1.0], [0.6, 1.0])
    """
    if mode not in ("supervised", "unsupervised"):
        raise ValueError(f"mode={mode!r} is not supported; choose 'supervised' or 'unsupervised'.")
    if form not in REWARD_FORMS:
        raise ValueError(f"form={form!r} is not supported; choose one of {REWARD_FORMS}.")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r} is not allowed; it must be a finite number > 0.")
    for name, value in (
        ("consistency_weight", consistency_weight),
        ("hard_negative_weight", hard_negative_weight),
        ("copy_penalty", copy_penalty),
        ("truncation_penalty", 0.0 if truncation_penalty is None else truncation_penalty),
    ):
        if not math.isfinite(value):
            raise ValueError(f"{name}={value!r} is not allowed; it must be a finite number.")
    if positive.ndim != 2 or query.shape != positive.shape:
        raise ValueError(
            f"query {tuple(query.shape)} and positive {tuple(positive.shape)} must both be (n, dim), the same."
        )
    if negative is not None and negative.shape != positive.shape:
        raise ValueError(f"negative {tuple(negative.shape)} must have the shape of positive {tuple(positive.shape)}.")
    for name, per_rollout in (("finished", finished), ("copy_rate", copy_rate)):
        if per_rollout is not None and tuple(per_rollout.shape) != (positive.shape[0],):
            raise ValueError(
                f"{name} has shape {tuple(per_rollout.shape)}; it needs one value per rollout ({positive.shape[0]},)."
            )
    query, positive = query.float(), positive.float()
    negative = None if negative is None or mode == "unsupervised" else negative.float()
    terms: dict[str, tuple[torch.Tensor, float]] = {}
    if form == "infonce":
        contrastive = infonce_term(query, positive, negative, group_size, temperature)
        negatives = positive.new_zeros(positive.shape[0])
        terms["infonce"] = (contrastive, 1.0)
    else:
        terms["positive"] = (contrastive_term(query, positive), 1.0)
        contrastive = terms["positive"][0]
        if negative is not None:
            terms["negative"] = (contrastive_term(query, negative), -1.0)
            contrastive = contrastive - terms["negative"][0]
        if mode == "supervised":
            negatives = hard_negative_term(query, positive, group_size)
        else:
            negatives = self_negative_term(query, positive, group_size)
        terms["hard_negative"] = (negatives, -hard_negative_weight)
    consistency = consistency_term(positive, group_size)
    terms["consistency"] = (consistency, consistency_weight)
    copy = positive.new_zeros(positive.shape[0]) if copy_rate is None else copy_rate.float().to(positive.device)
    terms["copy"] = (copy, -copy_penalty)
    terms = {name: term for name, term in terms.items() if term[1] != 0}
    total = sum((weight * values for values, weight in terms.values()), positive.new_zeros(positive.shape[0]))
    total = total / temperature
    if finished is None:
        truncated = torch.zeros(positive.shape[0], dtype=torch.bool, device=positive.device)
    else:
        truncated = ~finished.to(device=positive.device, dtype=torch.bool)
    if truncation_penalty is not None:
        total = torch.where(truncated, torch.full_like(total, float(truncation_penalty)), total)
    return GraceRewards(
        total, contrastive, consistency, negatives, copy, truncated, terms, temperature, truncation_penalty
    )
