"""Per-batch decoding: rationales plus last-layer states with no decode work for finished rows and a shared prefix.

Installed only (saved models do not carry it; their ``Transformer`` uses it through :mod:`grace_st.engine` where a
compatible grace_st is installed). :func:`decode` replaces ``model.generate`` + the final cached step of the
reference single-pass path (``grace_st.model.generation.generate_with_states``):

- the chat-prompt prefix shared by every row (system prompt + user header) is run once per call, for one row, and its
  keys/values are reused by every row through the KV cache;
- each row's own part of the prompt (user text + assistant header) is left-padded *after* the prefix, so padding sits
  between prefix and text; explicit position ids and the attention mask give every real token the position and
  context it has in the left-padded prompt of ``model.generate`` (the embeddings do not change);
- every token is fed once (its state is part of the embedding), and finished rows leave the batch (their cache rows
  are dropped) once at most half of the batch's rows are still writing: fewer decode row-steps, one cache copy per
  halving;
- the KV cache is kept in :class:`~grace_st.engine.cache.SpareLayer` layers (a decode step writes its column in
  place), and on a CPU the weights are laid out for few-row products while it runs
  (:func:`~grace_st.engine.cpu.cpu_weight_layout`).

Supported: decoder-only LMs whose decoder ends with a ``norm`` module (Llama, Qwen2/3, Mistral, ...), ``eager`` or
``sdpa`` attention, full attention in every layer (no sliding window), greedy or sampled decoding with temperature
(one value or one per row), top-k and top-p. :func:`unsupported_reason` says why anything else (flash attention,
whose unpadding does not expect padding inside a row; repetition penalty; other generation-config processors) must use
``model.generate`` instead.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, NamedTuple

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.generation import TopKLogitsWarper, TopPLogitsWarper

from grace_st.engine.cache import spare_cache
from grace_st.engine.cpu import cpu_weight_layout
from grace_st.model.generation import pad_rows

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
    """

    generated: torch.Tensor
    states: torch.Tensor
    suffix_states: torch.Tensor | None = None


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


def check_suffix_ids(suffix_ids: Any, batch: int, vocab_size: int | None = None) -> list[list[int]]:
    """``suffix_ids`` as a list of ``batch`` non-empty lists of token ids; a ValueError names a bad entry."""
    if not isinstance(suffix_ids, (list, tuple)) or len(suffix_ids) != batch:
        size = len(suffix_ids) if isinstance(suffix_ids, (list, tuple)) else type(suffix_ids).__name__
        raise ValueError(f"suffix_ids must be a list of one id list per row ({batch} rows), got {size!r}.")
    rows = []
    for index, row in enumerate(suffix_ids):
        row = row.tolist() if isinstance(row, torch.Tensor) else row
        ok = isinstance(row, (list, tuple)) and len(row) > 0
        ok = ok and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in row)
        if ok and vocab_size is not None:
            ok = all(t < vocab_size for t in row)
        if not ok:
            limit = "" if vocab_size is None else f" < {vocab_size}"
            raise ValueError(f"suffix_ids[{index}] = {row!r:.80} must be a non-empty list of token ids >= 0{limit}.")
        rows.append(list(row))
    return rows


def check_seeds(seeds: Any, batch: int) -> list[int]:
    """``seeds`` as a list of ``batch`` ints; a ValueError names a bad entry."""
    if not isinstance(seeds, (list, tuple)) or len(seeds) != batch:
        size = len(seeds) if isinstance(seeds, (list, tuple)) else type(seeds).__name__
        raise ValueError(f"seeds must be a list of one int per row ({batch} rows), got {size!r}.")
    for index, seed in enumerate(seeds):
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise ValueError(f"seeds[{index}] = {seed!r} must be an int in [0, 2**63).")
    return list(seeds)


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
    compact_at: float = 0.5,
    suffix_ids: list[list[int]] | None = None,
    seeds: list[int] | None = None,
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
            (1.0: as soon as any row finishes). Defaults to 0.5.
        suffix_ids: per row, token ids (at least one) fed after the row's rationale ends (after its EOS, or after
            ``max_new_tokens`` tokens: a cut rationale is treated like a finished one), as teacher-forced cached decode
            steps at the positions that follow the rationale directly; they are not part of ``generated``. Rows may
            have suffixes of different lengths. None (the default): nothing extra is computed.
        seeds: per row, the seed of its own ``torch.Generator`` for sampling (``do_sample`` only): a row's sampled
            rationale then depends neither on its batch-mates nor on the global RNG. None (the default): the global
            RNG, one draw for the whole batch per step.

    Returns:
        A :class:`DecodeOutput` ``(generated, states, suffix_states)``; None when the states of the decoder's final
        ``norm`` could not be captured (it is not on the model's forward path).
    """
    batch, width = input_ids.shape
    device = input_ids.device
    if suffix_ids is not None:
        suffix_ids = check_suffix_ids(suffix_ids, batch, getattr(model.config, "vocab_size", None))
    if seeds is not None:
        if not do_sample:
            raise ValueError("seeds are per-row sampling seeds: pass them with do_sample=True (greedy draws nothing).")
        seeds = check_seeds(seeds, batch)
    columns = torch.arange(width, device=device)
    prefix_cols = (text_start.to(device) - prefix_len).unsqueeze(1) + torch.arange(prefix_len, device=device)
    prefix = input_ids.gather(1, prefix_cols)
    if bool((prefix != prefix[:1]).any()) or bool((attention_mask.gather(1, prefix_cols) == 0).any()):
        raise ValueError("decode: the rows do not share the same prefix of prefix_len tokens.")
    own_start = int(text_start.min())
    own_ids = input_ids[:, own_start:]
    own_mask = (columns[own_start:].unsqueeze(0) >= text_start.to(device).unsqueeze(1)).long()
    if bool((own_mask.bool() & (attention_mask[:, own_start:] == 0)).any()):
        raise ValueError("decode: padding after text_start; the prompts must be left-padded.")

    # Logits of the last prompt position only, where the model (or a wrapper passing keywords on: PEFT) takes it.
    params = inspect.signature(model.forward).parameters
    keeps = "logits_to_keep" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    last_only = {"logits_to_keep": 1} if keeps else {}
    captured: list[torch.Tensor] = []
    layout = contextlib.ExitStack()
    try:
        layout.enter_context(cpu_weight_layout(model))
        hook = model.get_decoder().norm.register_forward_hook(lambda module, args, output: captured.append(output))
        layout.callback(hook.remove)
        # The shared prefix, once, for one row.
        positions = torch.arange(prefix_len, device=device).unsqueeze(0)
        out = model(input_ids=prefix[:1], position_ids=positions, use_cache=True, **last_only)
        if len(captured) != 1 or captured[0].shape[:2] != (1, prefix_len):
            return None  # the hooked norm is not on the forward path (e.g. a re-wrapped model)
        prefix_states = captured.pop()
        prefix_kv = [(keys, values) for keys, values, *_ in out.cache]
        # Every row's own tokens after it, padding between prefix and text; positions as in the left-padded prompt.
        room = own_ids.shape[1] + max_new_tokens + max((len(row) for row in suffix_ids or []), default=0)
        cache = spare_cache([(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in prefix_kv], room)
        mask, positions = after_prefix(own_mask, prefix_len)
        out = model(
            input_ids=own_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, **last_only
        )
        own_states = captured.pop()
        logits = out.logits[:, -1]
        if counts is not None:
            counts["prompt_tokens"] = counts.get("prompt_tokens", 0) + prefix_len + own_ids.numel()

        states = own_states.new_zeros(batch, width + max_new_tokens, own_states.shape[-1])
        states[:, own_start:width] = own_states * own_mask.unsqueeze(-1).to(own_states.dtype)
        states[torch.arange(batch, device=device).unsqueeze(1), prefix_cols] = prefix_states.expand(batch, -1, -1)
        generated = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        rows = torch.arange(batch, device=device)  # original index of each batch row
        alive = torch.ones(batch, dtype=torch.bool, device=device)  # still writing its rationale
        length = torch.zeros(batch, dtype=torch.long, device=device)  # tokens generated so far, per batch row
        lengths = length.clone()  # the same, per original row
        position = positions[:, -1] + 1
        suffix_states = None
        if suffix_ids is not None:
            suffix_table, _ = pad_rows(suffix_ids, pad_token_id)
            suffix_table = suffix_table.to(device)
            suffix_len = torch.tensor([len(row) for row in suffix_ids], dtype=torch.long, device=device)
            suffix_pos = torch.zeros(batch, dtype=torch.long, device=device)  # next suffix token, per batch row
            suffix_states = own_states.new_zeros(batch, own_states.shape[-1])
        generators = None
        if seeds is not None:
            generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        if isinstance(temperature, torch.Tensor):
            temperature = temperature.to(device=device, dtype=torch.float32).unsqueeze(1)
        eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
        warpers = [TopKLogitsWarper(top_k)] if do_sample and top_k else []
        warpers += [TopPLogitsWarper(top_p)] if do_sample and top_p is not None and top_p < 1.0 else []
        while True:
            if bool(alive.any()):
                scores = logits.float()
                if do_sample:
                    if isinstance(temperature, torch.Tensor):
                        scores = scores / temperature[rows]
                    elif temperature is not None and temperature != 1.0:
                        scores = scores / temperature
                    for warper in warpers:
                        scores = warper(None, scores)
                    probs = torch.softmax(scores, dim=-1)
                    if generators is None:
                        token = torch.multinomial(probs, num_samples=1).squeeze(1)
                    else:  # each writing row draws from its own generator, once per own step
                        token = torch.full_like(rows, pad_token_id)
                        for i in alive.nonzero().squeeze(1).tolist():
                            token[i] = torch.multinomial(probs[i], 1, generator=generators[int(rows[i])])[0]
                else:
                    token = scores.argmax(dim=-1)
                token = token.masked_fill(~alive, pad_token_id)
                generated[rows[alive], length[alive]] = token[alive]
            else:
                token = torch.full_like(rows, pad_token_id)
            length = length + alive.long()
            lengths[rows] = length
            in_suffix = None
            if suffix_ids is not None:
                # Rows whose rationale has ended are fed their next suffix token instead (teacher forcing).
                in_suffix = ~alive & (suffix_pos < suffix_len[rows])
                if not bool(alive.any()):
                    # No row writes any more: the rest of every suffix in one cached forward (right-padded).
                    tail = (suffix_table, suffix_pos, suffix_len, suffix_states, in_suffix)
                    suffix_states = _suffix_tail(
                        model, cache, captured, mask, position, rows, tail, pad_token_id, counts
                    )
                    break
                next_suffix = suffix_table[rows, suffix_pos.clamp(max=suffix_table.shape[1] - 1)]
                token = torch.where(in_suffix, next_suffix, token)
            # Feed every row's new token once: its state is part of the embedding.
            out, mask = decode_step(model, token, mask, position, cache)
            step_states = captured.pop()[:, -1]
            states[rows[alive], width + length[alive] - 1] = step_states[alive]
            if counts is not None:
                counts["decode_row_steps"] = counts.get("decode_row_steps", 0) + len(rows)
                counts["decode_steps"] = counts.get("decode_steps", 0) + 1
            alive = alive & ~torch.isin(token, eos) & (length < max_new_tokens)
            active = alive  # rows with work left: writing, or (with suffixes) feeding their suffix
            if in_suffix is not None:
                suffix_pos = suffix_pos + in_suffix.long()
                done = in_suffix & (suffix_pos == suffix_len[rows])
                suffix_states[rows[done]] = step_states[done]
                active = alive | (suffix_pos < suffix_len[rows])
            n_active = int(active.sum())
            if n_active == 0:
                break
            logits, position = out.logits[:, -1], position + 1
            if n_active <= compact_at * len(rows) and n_active < len(rows):
                # Finished rows leave the batch (cache, mask, positions, per-row settings). Until then they ride along
                # (fed padding, outputs ignored): one copy of the cache per halving, and a matrix product with a few
                # rows fewer is not cheaper on every BLAS. Rows still feeding their suffix stay.
                keep = active.nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                rows, length, mask, logits, position, alive = (
                    rows[keep],
                    length[keep],
                    mask[keep],
                    logits[keep],
                    position[keep],
                    alive[keep],
                )
                if in_suffix is not None:
                    suffix_pos = suffix_pos[keep]
    finally:
        layout.close()
    longest = int(lengths.max())
    return DecodeOutput(generated[:, :longest], states[:, : width + longest], suffix_states)


def after_prefix(own_mask: torch.Tensor, prefix_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(attention mask, position ids)`` of rows' own tokens (``own_mask``: left-padded) fed after a shared prefix of
    ``prefix_len`` cached tokens: the mask covers prefix + own columns; every real token gets the position it has in
    its own left-padded prompt (padding between prefix and text takes no position)."""
    mask = torch.cat([own_mask.new_ones(len(own_mask), prefix_len), own_mask], dim=1)
    return mask, (prefix_len + own_mask.cumsum(1) - 1).clamp(min=prefix_len)


def decode_step(
    model: Any,
    token: torch.Tensor,
    mask: torch.Tensor,
    position: torch.Tensor,
    cache: Any,
    attend: torch.Tensor | None = None,
):
    """Feed one new token per row through the KV cache: ``(model output, attention mask grown by one column)``.
    ``attend`` (``(batch,)`` bool): rows whose new column later steps attend to (default: every row)."""
    column = mask.new_ones(len(token), 1) if attend is None else attend.to(mask.dtype).unsqueeze(1)
    mask = torch.cat([mask, column], dim=1)
    ids, position_ids = token.unsqueeze(1), position.unsqueeze(1)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True)
    return out, mask


def _suffix_tail(model, cache, captured, mask, position, rows, tail, pad_token_id, counts) -> torch.Tensor:
    """Feed what is left of every row's suffix in one cached forward (rows right-padded: padding after a row's last
    suffix token changes none of its states) and return ``suffix_states`` with the last suffix states filled in.
    ``tail`` is ``(suffix_table, suffix_pos, suffix_len, suffix_states, in_suffix)`` of :func:`decode`'s loop."""
    suffix_table, suffix_pos, suffix_len, suffix_states, in_suffix = tail
    keep = in_suffix.nonzero().squeeze(1)
    if len(keep) == 0:
        return suffix_states
    if len(keep) < len(rows):
        cache.batch_select_indices(keep)
        rows, mask, position, suffix_pos = rows[keep], mask[keep], position[keep], suffix_pos[keep]
    left = suffix_len[rows] - suffix_pos
    span = int(left.max())
    offsets = torch.arange(span, device=rows.device).unsqueeze(0)
    real = offsets < left.unsqueeze(1)
    index = (suffix_pos.unsqueeze(1) + offsets).clamp(max=suffix_table.shape[1] - 1)
    tokens = suffix_table[rows.unsqueeze(1), index].masked_fill(~real, pad_token_id)
    model(
        input_ids=tokens,
        attention_mask=torch.cat([mask, real.long().to(mask.dtype)], dim=1),
        position_ids=position.unsqueeze(1) + offsets,
        cache=cache,
        use_cache=True,
    )
    tail = captured.pop()
    suffix_states = suffix_states.clone()
    suffix_states[rows] = tail[torch.arange(len(rows), device=rows.device), left - 1]
    if counts is not None:
        counts["suffix_tokens"] = counts.get("suffix_tokens", 0) + tokens.numel()
    return suffix_states


def generate_with_engine(
    model: Any,
    features: dict[str, Any],
    generate_kwargs: dict[str, Any],
    prefix_len: int,
    counts: dict[str, int] | None = None,
    suffix_ids: list[list[int]] | None = None,
    seeds: list[int] | None = None,
) -> DecodeOutput | None:
    """:func:`generate_with_states` by :func:`decode` (the shared prompt prefix of ``prefix_len`` tokens runs once,
    finished rows leave the batch) for the left-padded prompts of ``features`` (``input_ids``, ``attention_mask``,
    ``text_start``); None where it does not apply (no prefix, :func:`unsupported_reason`, states not captured): then
    the caller uses ``model.generate``. ``counts``, ``suffix_ids`` and ``seeds`` as in :func:`decode`; returns its
    :class:`DecodeOutput` ``(generated, states, suffix_states)``."""
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
            **sampling,
        )
