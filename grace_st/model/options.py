"""Saved options of the GRACE modules (the one registry: what each accepts, checked at build, load); input checks."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

DEFAULT_SYSTEM_PROMPT = (
    "Read and analyze the following text, then you need to provide your reasoning within <think></think> tags. "
    "Finally, generate a comprehensive understanding of this text."
)
RATIONALE_MODES: tuple[str, ...] = ("generate", "none", "echo")
POOLING_MODES: tuple[str, ...] = ("mean", "lasttoken", "summary", "mean+summary", "mean+summary+text_summary")
TEXT_FIELD = "{text}"
_REAL = (int, float)

# Saved option -> (accepted types, check, what is allowed). bool is never accepted for a number, nor 0/1 for a bool.
TRANSFORMER_RULES: dict[str, tuple[tuple[type, ...], Any, str]] = {
    "system_prompt": ((str,), lambda v: True, "a string"),
    "prompt_template": ((str,), lambda v: v.count(TEXT_FIELD) == 1, "a string holding '{text}' exactly once"),
    "chat_template": ((bool,), lambda v: True, "true or false (a boolean, not a string)"),
    "rationale_mode": ((str,), lambda v: v in RATIONALE_MODES, f"one of {RATIONALE_MODES}"),
    "max_new_tokens": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "max_input_tokens": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "do_sample": ((bool,), lambda v: True, "true or false (a boolean, not a string)"),
    "temperature": (_REAL, lambda v: 0 < v < math.inf, "a number > 0"),
    "top_p": (_REAL, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "top_k": ((int,), lambda v: v >= 0, "an integer >= 0 (0: no top-k cut-off)"),
    "repetition_penalty": (_REAL, lambda v: 0 < v < math.inf, "a number > 0"),
    "single_pass": ((bool,), lambda v: True, "true or false (a boolean, not a string)"),
    "summary_suffix": ((str,), lambda v: v.count(TEXT_FIELD) <= 1, "a string holding '{text}' at most once, or ''"),
    "num_rationales": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "text_summary": ((bool,), lambda v: True, "true or false (a boolean, not a string)"),
}
OPTION_RULES = {
    **TRANSFORMER_RULES,
    "embedding_dimension": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "pooling_mode": ((str,), lambda v: v in POOLING_MODES, f"one of {POOLING_MODES}"),
}


def is_real(name: str) -> bool:
    """Whether option ``name`` is a number stored as a float."""
    return OPTION_RULES[name][0] == _REAL


def check_option(name: str, value: Any, where: str = "") -> None:
    """Raise a ``ValueError`` naming the option when ``value`` has the wrong type or range (see ``OPTION_RULES``).

    Example:
        >>> check_option("max_new_tokens", 0)
        Traceback (most recent call last):
        ...
        ValueError: max_new_tokens=0 is not allowed: it must be an integer >= 1.
    """
    types, ok, allowed = OPTION_RULES[name]
    if isinstance(value, bool) != (bool in types) or not isinstance(value, types) or not ok(value):
        raise ValueError(f"{where}{name}={value!r} is not allowed: it must be {allowed}.")


def check_combination(options: Mapping[str, Any], where: str = "") -> None:
    """Raise a ``ValueError`` for Transformer options that are valid alone but not together."""
    if not options["chat_template"] and options["system_prompt"]:
        raise ValueError(
            f"{where}system_prompt={options['system_prompt']!r:.60} needs chat_template=True: without the chat "
            "template the prompt is prompt_template alone. Set system_prompt='' or chat_template=True."
        )
    if options.get("text_summary") and not options["summary_suffix"]:
        raise ValueError(f"{where}text_summary=True needs a summary_suffix (it is ''): it feeds it after the text.")
    if options["num_rationales"] > 1 and not options["do_sample"]:  # greedy decoding writes one rationale
        raise ValueError(
            f"{where}num_rationales={options['num_rationales']} needs do_sample=True (greedy: k equal ones)."
        )


def check_texts(inputs: Any, name: str = "texts") -> list[str]:
    """Return ``inputs`` as a list of valid Unicode strings or raise naming the first bad entry as ``name[index]``.

    Example:
        >>> check_texts(["a", 3])
        Traceback (most recent call last):
        ...
        TypeError: texts[1] is 3 (int); GRACE encodes strings only.
    """
    if isinstance(inputs, (bytes, bytearray, Mapping)) or not isinstance(inputs, Iterable):
        raise TypeError(f"{name} must be a string or a list of strings, got {type(inputs).__name__}: {inputs!r:.80}.")
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{index}] is {text!r:.80} ({type(text).__name__}); GRACE encodes strings only.")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"{name}[{index}] = {text!r:.80} has a lone surrogate {text[error.start]!r} at character "
                f"{error.start}; only valid Unicode can be encoded."
            ) from None
    return texts


def check_prompts(prompts: list[list[int]], texts: list[str], name: str = "texts") -> None:
    """Raise a ``ValueError`` naming the first text whose prompt ids are empty (a rationale needs a start)."""
    if [] in prompts:
        raise ValueError(
            f"{name}[{prompts.index([])}] = {texts[prompts.index([])]!r} gives an empty prompt: the template adds no "
            "token to it. Give prompt_template text of its own (e.g. 'Text: {text}') or use the chat template."
        )
