"""Rationale diagnostics: the one definition of copy rate, finish rate, mean length and distinct rollouts.

Training logs them every step, evaluation and the quick dev scores report them; all call these functions.

What the numbers mean, everywhere:

- A *rationale* is what the model wrote after the prompt (``rationale_mode="generate"``) or the text it repeated
  (``"echo"``), as token ids without the closing end-of-sequence token. Echo is measured like any rationale, so its
  copy rate is 1 (for texts of at least ``min_span`` tokens) and its finish rate 1. ``rationale_mode="none"`` and
  models that are not GRACE have no rationales: their copy rate, mean length and finish rate are None ("–").
- An *empty* rationale (the model ended at once) is a rationale of 0 tokens: it counts in the mean length and, when
  it ended with end-of-sequence, as finished; :func:`copy_rate` gives 0.0 for it and it weighs nothing in the
  token-weighted aggregate.
- *Copy rate* of a set of rationales is token-weighted: copied rationale tokens / all rationale tokens, None when
  there are no rationale tokens at all. The source of a text is the token ids of the text as it enters the prompt
  (``Transformer.text_token_ids``: truncated to ``max_input_tokens``, a sentence-transformers prompt included).
- *Finish rate*: share of rationales that ended with end-of-sequence before the length limit.
- *Mean length*: rationale tokens per rationale.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

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


@dataclasses.dataclass
class RationaleStats:
    """Running totals of rationale diagnostics over a set of texts (see the module docstring for the meanings).

    Attributes:
        texts: texts encoded (each distinct text once).
        rationales: texts that got a rationale (0 for ``rationale_mode="none"`` and models that are not GRACE).
        tokens: rationale tokens in total (closing end-of-sequence tokens not counted).
        copied_tokens: rationale tokens inside spans copied from the text (:func:`copy_rate` x length, summed).
        finished: rationales that ended with an end-of-sequence token before the length limit.
        seconds: wall time spent encoding these texts.
        examples: the first few ``{"text", "rationale"}`` pairs, for model cards and eyeballing.

    Example:
        >>> stats = RationaleStats()
        >>> stats.add([1, 2, 3, 4], [0, 1, 2, 3, 4], finished=True)
        >>> stats.add([], [5, 6], finished=True)
        >>> stats.copy_rate, stats.mean_length, stats.finish_rate
        (1.0, 2.0, 1.0)
        >>> RationaleStats(texts=3).copy_rate is None
        True
    """

    texts: int = 0
    rationales: int = 0
    tokens: int = 0
    copied_tokens: float = 0.0
    finished: int = 0
    seconds: float = 0.0
    examples: list[dict[str, str]] = dataclasses.field(default_factory=list)

    max_examples: ClassVar[int] = 3

    def add(
        self,
        rationale_ids: Sequence[int],
        source_ids: Sequence[int],
        finished: bool,
        text: str | None = None,
        rationale: str | None = None,
        min_span: int = 4,
    ) -> None:
        """Count one text and its rationale.

        Args:
            rationale_ids: the rationale's token ids, closing end-of-sequence token excluded.
            source_ids: the text's token ids as they enter the prompt (``Transformer.text_token_ids``).
            finished: the rationale ended with end-of-sequence before the length limit.
            text: the text, kept as an example with ``rationale`` while fewer than :attr:`max_examples` are kept.
            rationale: the decoded rationale.
            min_span: minimum copied run length of :func:`copy_rate`. Defaults to 4.
        """
        rationale_ids = list(rationale_ids)
        self.texts += 1
        self.rationales += 1
        self.tokens += len(rationale_ids)
        self.copied_tokens += copy_rate(rationale_ids, source_ids, min_span) * len(rationale_ids)
        self.finished += int(bool(finished))
        if text is not None and rationale is not None and len(self.examples) < self.max_examples:
            self.examples.append({"text": text, "rationale": rationale})

    def merge(self, other: RationaleStats) -> RationaleStats:
        """Totals of both (a new object); examples of ``self`` first."""
        return RationaleStats(
            texts=self.texts + other.texts,
            rationales=self.rationales + other.rationales,
            tokens=self.tokens + other.tokens,
            copied_tokens=self.copied_tokens + other.copied_tokens,
            finished=self.finished + other.finished,
            seconds=self.seconds + other.seconds,
            examples=(self.examples + other.examples)[: self.max_examples],
        )

    @property
    def copy_rate(self) -> float | None:
        """Copied rationale tokens / rationale tokens; None without rationale tokens."""
        return self.copied_tokens / self.tokens if self.tokens else None

    @property
    def mean_length(self) -> float | None:
        """Rationale tokens per rationale; None without rationales."""
        return self.tokens / self.rationales if self.rationales else None

    @property
    def finish_rate(self) -> float | None:
        """Share of rationales that ended before the limit; None without rationales."""
        return self.finished / self.rationales if self.rationales else None

    @property
    def seconds_per_text(self) -> float | None:
        """Encoding wall time per text; None without texts."""
        return self.seconds / self.texts if self.texts else None

    def to_dict(self) -> dict[str, Any]:
        """The totals and the derived rates, JSON-ready."""
        fields = dataclasses.asdict(self)
        fields.update(
            copy_rate=self.copy_rate,
            mean_length=self.mean_length,
            finish_rate=self.finish_rate,
            seconds_per_text=self.seconds_per_text,
        )
        return fields

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RationaleStats:
        """Inverse of :meth:`to_dict` (derived rates are recomputed, not read)."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


def rationale_stats(
    rationale_ids: Sequence[Sequence[int]],
    source_ids: Sequence[Sequence[int]],
    finished: Sequence[bool],
    texts: Sequence[str] | None = None,
    rationales: Sequence[str] | None = None,
    min_span: int = 4,
) -> RationaleStats:
    """:class:`RationaleStats` of a batch of rationales (evaluation, quick evaluation and training logs use it).

    Args:
        rationale_ids: per text, the rationale's token ids without the closing end-of-sequence token.
        source_ids: per text, its token ids as they enter the prompt (``Transformer.text_token_ids``).
        finished: per text, whether its rationale ended before the length limit.
        texts: the texts, for the kept examples (optional).
        rationales: the decoded rationales, for the kept examples (optional).
        min_span: minimum copied run length. Defaults to 4.

    Returns:
        The totals (``seconds`` 0).

    Example:
        >>> stats = rationale_stats([[1, 2, 3, 4], [9, 9]], [[1, 2, 3, 4], [1, 2]], [True, False])
        >>> stats.copy_rate, stats.finish_rate
        (0.6666666666666666, 0.5)
    """
    n = len(rationale_ids)
    if len(source_ids) != n or len(finished) != n:
        raise ValueError(
            f"rationale_ids, source_ids and finished must have one entry per text; got {n}, {len(source_ids)} and "
            f"{len(finished)}."
        )
    stats = RationaleStats()
    for index in range(n):
        stats.add(
            rationale_ids[index],
            source_ids[index],
            finished[index],
            text=texts[index] if texts is not None else None,
            rationale=rationales[index] if rationales is not None else None,
            min_span=min_span,
        )
    return stats
