"""Rationale diagnostics: copy rate, mean length and finish rate of generated rationales (no mteb needed).

They tell whether a rationale earns its generation cost: a rationale that copies its input is the cheap "echo"
embedding in disguise, and one cut at the length limit never finished its thought.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any


def copy_rate(rationale_ids: Sequence[int], input_ids: Sequence[int], min_span: int = 4) -> float:
    """Share of rationale tokens that lie inside a span of ``min_span`` or more tokens copied from the input.

    A rationale token counts as copied when some window of ``min_span`` consecutive rationale tokens containing it
    also occurs contiguously in the input. For inputs shorter than ``min_span`` the whole input is the span, so a
    verbatim echo of a short text still counts as a copy.

    Args:
        rationale_ids: token ids of the rationale, without the closing end-of-sequence token.
        input_ids: token ids of the input text.
        min_span: shortest copied span that counts. Defaults to 4.

    Returns:
        A value in ``[0, 1]``; 0.0 for an empty rationale.

    Example:
        >>> copy_rate([1, 2, 3, 4, 9], [0, 1, 2, 3, 4, 5])
        0.8
        >>> copy_rate([7, 8], [7, 8])
        1.0
    """
    rationale, source = list(rationale_ids), list(input_ids)
    if not rationale or not source:
        return 0.0
    n = max(1, min(min_span, len(source)))
    grams = {tuple(source[i : i + n]) for i in range(len(source) - n + 1)}
    copied = [False] * len(rationale)
    for i in range(len(rationale) - n + 1):
        if tuple(rationale[i : i + n]) in grams:
            copied[i : i + n] = [True] * n
    return sum(copied) / len(rationale)


@dataclasses.dataclass
class RationaleStats:
    """Running totals of rationale diagnostics over the texts of one task.

    Attributes:
        texts: texts whose rationale was generated (each unique text once).
        tokens: rationale tokens in total (closing end-of-sequence tokens not counted).
        copied_tokens: rationale tokens inside spans copied from the input (see :func:`copy_rate`).
        finished: rationales that ended with an end-of-sequence token before the length limit.
        seconds: wall time spent encoding these texts.
        examples: a few ``{"text", "rationale"}`` pairs for model cards and eyeballing.
    """

    texts: int = 0
    tokens: int = 0
    copied_tokens: float = 0.0
    finished: int = 0
    seconds: float = 0.0
    examples: list[dict[str, str]] = dataclasses.field(default_factory=list)

    max_examples = 3

    def add(self, text: str, rationale: str, rationale_ids: Sequence[int], text_ids: Sequence[int], finished: bool):
        self.texts += 1
        self.tokens += len(rationale_ids)
        self.copied_tokens += copy_rate(rationale_ids, text_ids) * len(rationale_ids)
        self.finished += int(finished)
        if len(self.examples) < self.max_examples:
            self.examples.append({"text": text, "rationale": rationale})

    def merge(self, other: RationaleStats) -> RationaleStats:
        return RationaleStats(
            texts=self.texts + other.texts,
            tokens=self.tokens + other.tokens,
            copied_tokens=self.copied_tokens + other.copied_tokens,
            finished=self.finished + other.finished,
            seconds=self.seconds + other.seconds,
            examples=(self.examples + other.examples)[: self.max_examples],
        )

    @property
    def copy_rate(self) -> float | None:
        return self.copied_tokens / self.tokens if self.tokens else None

    @property
    def mean_length(self) -> float | None:
        return self.tokens / self.texts if self.texts else None

    @property
    def finish_rate(self) -> float | None:
        return self.finished / self.texts if self.texts else None

    @property
    def seconds_per_text(self) -> float | None:
        return self.seconds / self.texts if self.texts else None

    def to_dict(self) -> dict[str, Any]:
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
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})
