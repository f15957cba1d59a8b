"""The one table formatter: cells, alignment, widths and row checks."""

from __future__ import annotations

import doctest

import pytest

from grace_st import tables
from grace_st.tables import MISSING, format_cell, markdown_table


def test_doctests():
    result = doctest.testmod(tables)
    assert result.attempted >= 2 and result.failed == 0


def test_format_cell():
    assert format_cell(0.12345) == "0.123"
    assert format_cell(0.12355, digits=2) == "0.12"
    assert format_cell(0.4567, 2, 100) == "45.67"
    assert format_cell(2.0, 0) == "2"
    assert format_cell(None) == MISSING == "–"
    assert format_cell(3, 2, 100) == "3"  # integers are counts: neither scaled nor given decimals
    assert format_cell("text") == "text"


def test_columns_are_padded_and_aligned():
    table = markdown_table(["model", "accuracy", "n"], [["GRACE trained", 0.9, 12], ["echo", None, 3]], digits=2)
    lines = table.splitlines()
    assert table.endswith("\n") and len(lines) == 4
    assert len({len(line) for line in lines}) == 1, "every line has the same width"
    assert lines[0] == "| model         | accuracy |  n |"
    assert lines[1] == "|:--------------|---------:|---:|"
    assert lines[2] == "| GRACE trained |     0.90 | 12 |"  # first column left-aligned, the others right-aligned
    assert lines[3] == "| echo          |        – |  3 |"


def test_scale_applies_to_every_float_cell():
    table = markdown_table(["task", "a", "b"], [["sts", 0.5, 0.25]], digits=1, scale=100)
    assert table.splitlines()[2] == "| sts  | 50.0 | 25.0 |"


def test_header_only():
    assert markdown_table(["model", "x"], []) == "| model | x |\n|:------|--:|\n"


@pytest.mark.parametrize("row", [["echo"], ["echo", 0.5, 0.1]])
def test_row_length_must_match_the_header(row):
    with pytest.raises(ValueError, match=rf"has {len(row)} cells; the header has 2"):
        markdown_table(["model", "score"], [["ok", 0.1], row])
