"""Tests of grace_st/options.py: the saved options' rules, their combinations and the text checks."""

from __future__ import annotations

import doctest

import pytest

from grace_st.model import options
from grace_st.model.options import OPTION_RULES, TRANSFORMER_RULES, check_combination, check_option, check_texts


def test_doctests():
    result = doctest.testmod(options)
    assert result.attempted >= 2 and result.failed == 0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("prompt_template", "no placeholder"),
        ("prompt_template", "{text} and {text}"),
        ("prompt_template", 3),
        ("chat_template", "false"),
        ("chat_template", 0),
        ("summary_suffix", "{text}{text}"),
        ("summary_suffix", None),
        ("num_rationales", 0),
        ("num_rationales", 2.0),
        ("num_rationales", True),
        ("pooling_mode", "cls"),
    ],
)
def test_bad_values_are_refused_naming_the_option(name, value):
    with pytest.raises(ValueError, match=f"^{name}="):
        check_option(name, value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("prompt_template", 'This sentence : "{text}" means in one word:"'),
        ("chat_template", False),
        ("summary_suffix", ""),
        ("summary_suffix", "\nIn one word:"),
        ("num_rationales", 4),
        ("pooling_mode", "mean+summary"),
    ],
)
def test_good_values_pass(name, value):
    check_option(name, value)


def test_every_transformer_option_is_a_rule():
    assert set(TRANSFORMER_RULES) <= set(OPTION_RULES)


def test_combinations():
    base = {"chat_template": True, "system_prompt": "sys", "num_rationales": 1, "do_sample": False}
    check_combination(base)
    check_combination({**base, "chat_template": False, "system_prompt": ""})
    with pytest.raises(ValueError, match="needs chat_template=True"):
        check_combination({**base, "chat_template": False})
    with pytest.raises(ValueError, match="num_rationales=2 needs do_sample=True"):
        check_combination({**base, "num_rationales": 2})
    check_combination({**base, "num_rationales": 2, "do_sample": True})


def test_check_texts():
    assert check_texts("a") == ["a"]
    with pytest.raises(TypeError, match=r"texts\[1\] is None"):
        check_texts(["a", None])
    with pytest.raises(ValueError, match="lone surrogate"):
        check_texts(["\ud800"])
