"""The one table formatter: markdown tables for results, comparisons and the demo (they render as text too)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MISSING = "–"


def format_cell(value: Any, digits: int = 3, scale: float = 1.0) -> str:
    """A table cell: floats with ``digits`` decimals (after multiplying by ``scale``), None as ``–``, else ``str``.

    Example:
        >>> format_cell(0.12345), format_cell(0.5, 2, 100), format_cell(None), format_cell(7)
        ('0.123', '50.00', '–', '7')
    """
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value * scale:.{digits}f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3, scale: float = 1.0) -> str:
    """A markdown table; the first column is left-aligned, the others right-aligned, columns padded to one width.

    Args:
        header: column names.
        rows: one sequence of cells per row (same length as ``header``); cells go through :func:`format_cell`.
        digits: decimals of float cells. Defaults to 3.
        scale: float cells are multiplied by it (e.g. 100 for scores in percent). Defaults to 1.0.

    Returns:
        The table, ending with a newline.

    Example:
        >>> print(markdown_table(["model", "score"], [["echo", 0.5], ["grace", None]]), end="")
        | model | score |
        |:------|------:|
        | echo  | 0.500 |
        | grace |     – |
    """
    cells = [[str(name) for name in header]]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {list(row)!r} has {len(row)} cells; the header has {len(header)}.")
        cells.append([format_cell(value, digits, scale) for value in row])
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]

    def render(line: list[str]) -> str:
        rest = zip(line[1:], widths[1:], strict=True)
        padded = [line[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in rest]
        return "| " + " | ".join(padded) + " |"

    rule = "|:" + "-" * (widths[0] + 1) + "|" + "|".join("-" * (width + 1) + ":" for width in widths[1:]) + "|"
    return "\n".join([render(cells[0]), rule, *(render(line) for line in cells[1:])]) + "\n"
