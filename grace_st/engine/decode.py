"""Per-batch decoding: rationales plus last-layer states of one batch, by the engine's one decode loop
(:func:`~grace_st.engine.stream.decode_stream`, continuous batching) run over the batch's rows.

Installed only (saved models do not carry it; their ``Transformer`` uses it through :mod:`grace_st.engine` where a
compatible grace_st is installed). :func:`decode` replaces ``model.generate`` + the final cached step of the
reference single-pass path (``grace_st.model.generation.generate_with_states``) with the same rationales and states
within float tolerance:

- the chat-prompt prefix shared by every row (system prompt + user header) is run once per call, for one row, and its
  keys/values are reused by every row through the KV cache;
- each row's own part of the prompt (user text + assistant header) is left-padded *after* the prefix; explicit
  position ids and the attention mask give every real token the position and context it has in the left-padded
  prompt of ``model.generate``;
- every token is fed once (its state is part of the embedding); with fewer ``slots`` than rows a finished row's slot
  goes to the next row, and finished rows leave the batch once at most ``compact_at`` of its rows are writing (by
  default as soon as they finish);
- on a CPU, prompts are prefilled in groups of similar length (:func:`~grace_st.engine.stream.prefill_groups`);
- the KV cache keeps free columns (:class:`~grace_st.engine.cache.SpareLayer`), and on a CPU with bfloat16
  instructions (AVX512-BF16) greedy decode steps take the next token from a screened bfloat16 product of the output
  head, not from float32 logits (:mod:`~grace_st.engine.cpu`).

Supported: decoder-only LMs whose decoder ends with a ``norm`` module (Llama, Qwen2/3, Mistral, ...), ``eager`` or
``sdpa`` attention, full attention in every layer (no sliding window), greedy or sampled decoding with temperature
(one value or one per row), top-k and top-p. :func:`unsupported_reason` says why anything else (flash attention,
whose unpadding does not expect padding inside a row; repetition penalty; other generation-config processors) must use
``model.generate`` instead.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from grace_st.engine.stream import StatesNotCaptured, decode_stream

ENGINE_ATTENTION = ("eager", "sdpa")
# Generation-config fields the engine honours (or that do not change which tokens are produced).
_ENGINE_GENERATION_FIELDS = frozenset(
    {"bos_token_id", "eos_token_id", "pad_token_id", "max_length", "max_new_tokens", "do_sample", "temperature"}
    | {"top_k", "top_p", "repetition_penalty", "use_cache", "output_attentions", "output_hidden_states"}
    | {"return_dict_in_generate", "transformers_version", "_from_model_config"}
)


class DecodeOutput(NamedTuple):
    """What :func:`decode` and :func:`generate_with_engine` return (a named tuple: ``out[0]``, ``out.states``, ...).

    Attributes:
        generated: ``(batch, R)`` rationale ids in the layout of ``model.generate`` (pad id after a row's end).
        states: ``(batch, P + R, hidden)`` last-layer states laid out like prompt + generated ids; positions outside
            the attention mask (padding, after a rationale's end) hold zeros.
        suffix_states: ``(batch, hidden)`` last-layer state of each row's last suffix token when ``suffix_ids`` was
            given, else None.
        text_suffix_states: ``(batch, hidden)`` the same suffix's last state fed right after the prompt (no rationale
            before it) with ``text_suffix``, else None.
    """

    generated: torch.Tensor
    states: torch.Tensor
    suffix_states: torch.Tensor | None = None
    text_suffix_states: torch.Tensor | None = None


def unsupported_reason(model: Any, generate_kwargs: dict[str, Any]) -> str | None:
    """Why :func:`decode` cannot reproduce ``model.generate(**generate_kwargs)`` on ``model``, or None if it can."""
    return model_unsupported_reason(model) or arguments_unsupported_reason(generate_kwargs)


def model_unsupported_reason(model: Any) -> str | None:
    """Why :func:`decode` cannot serve ``model`` at all (its attention, architecture or generation config), or None."""
    attention = model.config._attn_implementation
    if attention not in ENGINE_ATTENTION:
        return f"attention implementation {attention!r} (the engine supports {ENGINE_ATTENTION})"
    if not isinstance(getattr(model.get_decoder(), "norm", None), torch.nn.Module):
        return "the decoder has no final `norm` module to read the last-layer states from"
    if any(type(layer) is not DynamicLayer for layer in DynamicCache(config=model.config).layers):
        return "a layer that is not full attention (sliding window, linear, shared KV, ...)"
    fields = sorted(set(model.generation_config.to_diff_dict()) - _ENGINE_GENERATION_FIELDS)
    if fields:
        return f"generation-config settings {fields}"
    return None


def arguments_unsupported_reason(generate_kwargs: dict[str, Any]) -> str | None:
    """Why :func:`decode` cannot honour these ``generate`` arguments (a caller's choice), or None if it can."""
    extra = sorted(
        set(generate_kwargs)
        - {"max_new_tokens", "do_sample", "eos_token_id", "pad_token_id"}
        - {"temperature", "top_p", "top_k", "repetition_penalty"}
    )
    if extra:
        return f"generate arguments {extra}"
    if generate_kwargs.get("repetition_penalty") not in (None, 1.0):
        return f"repetition_penalty={generate_kwargs['repetition_penalty']!r}"
    return None


def decode(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    text_start: torch.Tensor,
    prefix_len: int,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    do_sample: bool = False,
    temperature: float | torch.Tensor | None = 1.0,
    top_k: int | None = 0,
    top_p: float | None = 1.0,
    counts: dict[str, int] | None = None,
    compact_at: float = 1.0,
    suffix_ids: list[list[int]] | None = None,
    seeds: list[int] | None = None,
    slots: int | None = None,
    text_suffix: bool = False,
) -> DecodeOutput | None:
    """Generate one rationale per left-padded prompt and keep the last-layer state of every prompt and rationale token.

    Args:
        model: a causal LM for which :func:`unsupported_reason` is None, in eval mode.
        input_ids: ``(batch, P)`` left-padded prompts; each row is ``prefix + own tokens``.
        attention_mask: ``(batch, P)`` their mask.
        text_start: ``(batch,)`` column where each row's own tokens start (``prefix_len`` after its prefix starts).
        prefix_len: length of the prefix shared by every row (it must be identical in every row).
        max_new_tokens: rationale length limit.
        eos_token_ids: ids that end a rationale (empty: every rationale has ``max_new_tokens`` tokens).
        pad_token_id: fills the generated ids after a rationale's end.
        do_sample: sample instead of greedy decoding.
        temperature: sampling temperature, one value or a ``(batch,)`` tensor (one per row). Defaults to 1.0.
        top_k: top-k cut-off when sampling, 0/None for none.
        top_p: nucleus mass when sampling, 1.0/None for none.
        counts: if given, ``decode_row_steps`` (rows fed during decoding, suffix steps included), ``decode_steps``
            (decode forward calls: on a CPU each costs a fixed weight read plus a little per row), ``prompt_tokens``
            (prompt positions run through the model, padding included) and, with ``suffix_ids``, ``suffix_tokens``
            (suffix positions run, padding included) are added to it.
        compact_at: finished rows are dropped from the batch once at most this fraction of its rows is still writing
            (1.0: as soon as any row finishes; the cache rows after them move up in place). Defaults to 1.0.
        slots: rows decoding at once (default: the whole batch); with fewer slots than rows, a finished row's slot
            goes to the next row (continuous batching within the batch).
        suffix_ids: per row, token ids (at least one) fed after the row's rationale ends (after its EOS, or after
            ``max_new_tokens`` tokens: a cut rationale is treated like a finished one), in one cached forward when the
            row leaves the batch, at the positions that follow the rationale directly; they are not part of
            ``generated``. Rows may have suffixes of different lengths. None (the default): nothing extra is computed.
        seeds: per row, the seed of its own ``torch.Generator`` for sampling (``do_sample`` only): a row's sampled
            rationale then depends neither on its batch-mates nor on the global RNG. None (the default): the global
            RNG, one draw for the whole batch per step.
        text_suffix: also feed ``suffix_ids`` right after each prompt (no rationale before it), at prefill over a copy
            of the prompt's cache: ``text_suffix_states``. Defaults to False.

    Returns:
        A :class:`DecodeOutput` ``(generated, states, suffix_states, text_suffix_states)``; None when the states of
        the decoder's final ``norm`` could not be captured (it is not on the model's forward path).
    """
    batch, width = input_ids.shape
    device = input_ids.device
    columns = torch.arange(width, device=device)
    text_start = text_start.to(device)
    prefix_cols = (text_start - prefix_len).unsqueeze(1) + torch.arange(prefix_len, device=device)
    prefix = input_ids.gather(1, prefix_cols)
    if bool((prefix != prefix[:1]).any()) or bool((attention_mask.gather(1, prefix_cols) == 0).any()):
        raise ValueError("decode: the rows do not share the same prefix of prefix_len tokens.")
    own_mask = columns.unsqueeze(0) >= text_start.unsqueeze(1)
    if bool((own_mask & (attention_mask == 0)).any()):
        raise ValueError("decode: padding after text_start; the prompts must be left-padded.")
    own_ids = [ids[mask].tolist() for ids, mask in zip(input_ids, own_mask, strict=True)]
    sampling = {"do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p, "seeds": seeds}
    limits = (max_new_tokens, eos_token_ids, pad_token_id, slots or batch, counts)
    stream = decode_stream(
        model,
        prefix[0].tolist(),
        own_ids,
        *limits,
        suffix_ids=suffix_ids,
        compact_at=compact_at,
        text_suffix=text_suffix,
        **sampling,
    )
    try:
        with contextlib.closing(stream):
            finished = sorted(stream, key=lambda row: row.index)
    except StatesNotCaptured:
        return None
    longest = max(len(row.generated) for row in finished)
    generated = torch.full((batch, longest), pad_token_id, dtype=torch.long, device=device)
    first = finished[0].states
    states = first.new_zeros(batch, width + longest, first.shape[-1])
    for row in finished:  # laid out like the left-padded prompts + the generated ids, zeros elsewhere
        r = len(row.generated)
        generated[row.index, :r] = row.generated
        states[row.index, width + r - len(row.states) : width + r] = row.states
    suffix_states = None if suffix_ids is None else torch.stack([row.suffix_state for row in finished])
    alone = torch.stack([row.text_suffix_state for row in finished]) if text_suffix else None
    return DecodeOutput(generated, states, suffix_states, alone)


def generate_with_engine(
    model: Any,
    features: dict[str, Any],
    generate_kwargs: dict[str, Any],
    prefix_len: int,
    counts: dict[str, int] | None = None,
    suffix_ids: list[list[int]] | None = None,
    seeds: list[int] | None = None,
    slots: int | None = None,
    compact_at: float = 1.0,
    text_suffix: bool = False,
) -> DecodeOutput | None:
    """:func:`generate_with_states` by :func:`decode` (the shared prompt prefix of ``prefix_len`` tokens runs once,
    finished rows leave the batch) for the left-padded prompts of ``features`` (``input_ids``, ``attention_mask``,
    ``text_start``); None where it does not apply (no prefix, :func:`unsupported_reason`, states not captured): then
    the caller uses ``model.generate``. ``counts``, ``suffix_ids``, ``seeds`` and ``text_suffix`` as in :func:`decode`;
    returns its :class:`DecodeOutput`."""
    if prefix_len == 0 or unsupported_reason(model, generate_kwargs) is not None:
        return None
    kwargs, sampling = generate_kwargs, {}
    if kwargs["do_sample"]:  # unset sampling settings fall back to the LM's generation config, as in `generate`
        defaults = model.generation_config.to_dict()
        sampling = {
            k: defaults.get(k) if kwargs.get(k) is None else kwargs[k] for k in ("temperature", "top_k", "top_p")
        }
    eos = kwargs["eos_token_id"]
    with torch.no_grad():
        return decode(
            model,
            features["input_ids"],
            features["attention_mask"],
            features["text_start"],
            prefix_len,
            max_new_tokens=kwargs["max_new_tokens"],
            eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
            pad_token_id=kwargs["pad_token_id"],
            do_sample=bool(kwargs["do_sample"]),
            counts=counts,
            suffix_ids=suffix_ids,
            seeds=seeds,
            slots=slots,
            compact_at=compact_at,
            text_suffix=text_suffix,
            **sampling,
        )
