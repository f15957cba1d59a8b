"""Rationale diagnostics: the one definition of copy rate, finish rate, mean length and distinct rollouts.

Training logs them every step, evaluation and the quick dev scores report them; all call these functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def copy_rate(rationale: Sequence[int], source: Sequence[int], min_span: int = 4) -> float:
    """Share of rationale tokens that lie in a run of ``min_span`` tokens also found in ``source``.

    A rationale shorter than ``min_span`` counts as copied when it occurs in ``source`` as a whole.

    Args:
        rationale: token ids of the rationale (without the closing end-of-sequence token).
        source: token ids of the input text.
        min_span: minimum copied run length in tokens. Defaults to 4.

    Returns:
        A value in ``[0, 1]`` (0.0 for an empty rationale).

    Example:
        >>> copy_rate([1, 2, 3, 4, 9, 9], [0, 1, 2, 3, 4, 5])
        0.6666666666666666
        >>> copy_rate([7, 8], [1, 7, 8]), copy_rate([5, 6, 7, 8], [1, 2, 3, 4])
        (1.0, 0.0)
    """
    rationale, source = list(rationale), list(source)
    if not rationale:
        return 0.0
    span = min(min_span, len(rationale))
    grams = {tuple(source[i : i + span]) for i in range(len(source) - span + 1)}
    copied = [False] * len(rationale)
    for start in range(len(rationale) - span + 1):
        if tuple(rationale[start : start + span]) in grams:
            for position in range(start, start + span):
                copied[position] = True
    return sum(copied) / len(rationale)


def distinct_per_group(rollouts: Sequence[Sequence[int]], group_size: int) -> float:
    """Mean number of distinct rollouts per group (``group_size`` when all differ, 1 when all are identical).

    Example:
        >>> distinct_per_group([[1, 2], [1, 2], [3], [4]], 2)
        1.5
    """
    if group_size < 1 or len(rollouts) % group_size:
        raise ValueError(f"{len(rollouts)} rollouts cannot be split into groups of group_size={group_size!r}.")
    counts = [
        len({tuple(r) for r in rollouts[start : start + group_size]}) for start in range(0, len(rollouts), group_size)
    ]
    return sum(counts) / max(len(counts), 1)


def group_reward_std(rewards: torch.Tensor, group_size: int) -> float:
    """Mean over groups of the (population) standard deviation of the rewards within a group.

    Example:
        >>> group_reward_std(torch.tensor([1.0, 3.0, 2.0, 2.0]), 2)
        0.5
    """
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards cannot be split into groups of group_size={group_size!r}.")
    return rewards.float().view(-1, group_size).std(dim=1, unbiased=False).mean().item()
