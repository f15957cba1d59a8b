"""The decode engine: faster GRACE rationale writing for an installed grace_st (never shipped with a model).

A saved model's ``Transformer`` (``grace_st.model``) writes rationales with ``model.generate`` (the reference path) and
uses this engine instead only where it finds it installed with the :data:`API_VERSION` its code expects and
:func:`unsupported_reason` is None. The engine's results equal the reference path's within float tolerance.

Modules: :mod:`~grace_st.engine.decode` (one batch), :mod:`~grace_st.engine.stream` (continuous batching),
:mod:`~grace_st.engine.cache` (KV cache layers) and :mod:`~grace_st.engine.cpu` (CPU kernels).
"""

from __future__ import annotations

from typing import Any

from grace_st.engine.cache import cache_api_reason
from grace_st.engine.decode import (
    DecodeOutput,
    arguments_unsupported_reason,
    decode,
    generate_with_engine,
    model_unsupported_reason,
)
from grace_st.engine.stream import StreamRow, decode_stream

# The contract between a model's shipped code and this engine: the calls below and what they return. A model whose
# code expects another version uses the reference path.
API_VERSION = 1
# Additions within version 1 that a model's code looks for before it uses them: generate(..., text_suffix=True).
TEXT_SUFFIX = True
# A batch handed to a model's forward decodes in at most SLOTS rows at once (continuous batching within a larger batch:
# a finished row's slot goes to the batch's next text), and finished rows leave the batch as soon as they finish
# (COMPACT_AT = 1.0; the cache rows after them move up in place). On the 2-core CPU of the README (64 STS sentences,
# 48 new tokens, one thread), model.encode at batch 64 took 0.80x generate's time with 32 slots and rows leaving once
# half had finished, 0.73x with 64 slots, and 0.69x with 64 slots and rows leaving at once; at batch 16, rows leaving
# at once gave 0.77x against 0.82x (interleaved A/B runs of benchmarks/encode_speed.py's paths; its full run is in
# the README, "Performance").
SLOTS = 64
COMPACT_AT = 1.0

__all__ = [
    "API_VERSION",
    "TEXT_SUFFIX",
    "DecodeOutput",
    "StreamRow",
    "decode",
    "decode_stream",
    "generate",
    "unsupported_arguments",
    "unsupported_reason",
]


def unsupported_reason(module: Any) -> str | None:
    """Why the engine cannot write ``module``'s rationales at all (then the module uses ``model.generate`` and warns
    once), or None if it can: the installed transformers, the model's attention and architecture, the prompt.

    Args:
        module: a GRACE ``Transformer`` (the installed class or a saved model's copy of it).
    """
    reason = cache_api_reason()
    before, after = module.template_pieces()
    if reason is None and not before:
        reason = "the prompt has no prefix shared by every text"
    elif reason is None and len(before) == 1 and not after:  # then "" leaves no prompt token of its own
        reason = "the prompt's shared prefix is a single token and no token follows the text"
    return reason or model_unsupported_reason(module.model)


def unsupported_arguments(generate_kwargs: dict[str, Any]) -> str | None:
    """Why the engine cannot honour these ``generate`` arguments of one call (then that call uses
    ``model.generate``, silently: the arguments are the caller's choice), or None if it can."""
    return arguments_unsupported_reason(generate_kwargs)


def generate(
    module: Any,
    features: dict[str, Any],
    generate_kwargs: dict[str, Any],
    suffix_ids: list[list[int]] | None = None,
    seeds: list[int] | None = None,
    text_suffix: bool = False,
) -> DecodeOutput | None:
    """``(generated, states, suffix_states, text_suffix_states)`` for the left-padded prompts of ``features``, or None
    when the states could not be captured (the module then uses the reference path). See
    :func:`~grace_st.engine.decode.generate_with_engine`."""
    prefix_len = len(module.template_pieces()[0])
    counts = module.decode_counts
    slots = min(len(features["input_ids"]), SLOTS)
    return generate_with_engine(
        module.model,
        features,
        generate_kwargs,
        prefix_len,
        counts,
        suffix_ids=suffix_ids,
        seeds=seeds,
        text_suffix=text_suffix,
        slots=slots,
        compact_at=COMPACT_AT,
    )
