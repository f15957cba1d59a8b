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
"""

from __future__ import annotations

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


@dataclass
class GraceRewards:
    """All parts of the GRACE reward of one batch, each ``(n,)``.

    Attributes:
        total: the reward GRPO uses (``truncation_penalty`` where a rollout was cut).
        contrastive: ``cos(q, d+) - cos(q, d-)`` (supervised) or ``cos(q, d)`` (unsupervised), unweighted.
        consistency: mean cosine to the other rollouts of the group, unweighted.
        hard_negative: in-batch negative similarity, unweighted (it enters the total with a minus sign).
        copy_rate: share of rationale tokens copied from the input (zeros when not given).
        truncated: True where the rollout was cut at the length limit.
    """

    total: torch.Tensor
    contrastive: torch.Tensor
    consistency: torch.Tensor
    hard_negative: torch.Tensor
    copy_rate: torch.Tensor
    truncated: torch.Tensor


def grace_rewards(
    query: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor | None,
    group_size: int,
    *,
    mode: str = "supervised",
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
    if mode == "supervised":
        contrastive = contrastive_term(query, positive, None if negative is None else negative.float())
        negatives = hard_negative_term(query, positive, group_size)
    else:
        contrastive = contrastive_term(query, positive)
        negatives = self_negative_term(query, positive, group_size)
    consistency = consistency_term(positive, group_size)
    copy = positive.new_zeros(positive.shape[0]) if copy_rate is None else copy_rate.float().to(positive.device)
    total = contrastive + consistency_weight * consistency - hard_negative_weight * negatives - copy_penalty * copy
    total = total / temperature
    if finished is None:
        truncated = torch.zeros(positive.shape[0], dtype=torch.bool, device=positive.device)
    else:
        truncated = ~finished.to(device=positive.device, dtype=torch.bool)
    if truncation_penalty is not None:
        total = torch.where(truncated, torch.full_like(total, float(truncation_penalty)), total)
    return GraceRewards(total, contrastive, consistency, negatives, copy, truncated)
