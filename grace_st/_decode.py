"""GRACE decode engine: rationales plus last-layer states with no decode work for finished rows and a shared prefix.

Self-contained (imports only torch, transformers and the standard library; never ``modeling.py``): saved and published
models carry it as ``_decode.py`` beside their remote code ``grace_st.py``, which imports it. It also holds the
transformers generation paths of ``Transformer.generate_rationales`` (plain functions taking the model and the
``generate`` arguments): :func:`generate_plain` (``model.generate``), :func:`generate_with_states` (the reference
single-pass path: ``model.generate`` with the last-layer states captured, plus one cached decode step for the final
token, which generation never feeds back) and :func:`generate_with_engine` (:func:`decode`).

:func:`decode` replaces ``model.generate`` + the final cached step of the single-pass path:

- the chat-prompt prefix shared by every row (system prompt + user header) is run once per call, for one row, and its
  keys/values are reused by every row through the KV cache;
- each row's own part of the prompt (user text + assistant header) is left-padded *after* the prefix, so padding sits
  between prefix and text; explicit position ids and the attention mask give every real token the position and
  context it has in the left-padded prompt of ``model.generate`` (the embeddings do not change);
- every token is fed once (its state is part of the embedding), and finished rows leave the batch (their cache rows
  are dropped) once at most half of the batch's rows are still writing: fewer decode row-steps, one cache copy per
  halving, and no step with a few rows fewer than a full batch (on MKL, a matrix product with 9-15 rows costs more
  than one with 16: ``benchmarks/encode_speed.py``).

Supported: decoder-only LMs whose decoder ends with a ``norm`` module (Llama, Qwen2/3, Mistral, ...), ``eager`` or
``sdpa`` attention, full attention in every layer (no sliding window), greedy or sampled decoding with temperature
(one value or one per row), top-k and top-p. :func:`unsupported_reason` says why anything else (flash attention,
whose unpadding does not expect padding inside a row; repetition penalty; other generation-config processors) must use
``model.generate`` instead.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicLayer
from transformers.generation import TopKLogitsWarper, TopPLogitsWarper

ENGINE_ATTENTION = ("eager", "sdpa")
# Generation-config fields the engine honours (or that do not change which tokens are produced).
_ENGINE_GENERATION_FIELDS = frozenset(
    {"bos_token_id", "eos_token_id", "pad_token_id", "max_length", "max_new_tokens", "do_sample", "temperature"}
    | {"top_k", "top_p", "repetition_penalty", "use_cache", "output_attentions", "output_hidden_states"}
    | {"return_dict_in_generate", "transformers_version", "_from_model_config"}
)


class RowTemperature(LogitsProcessor):
    """Divides the logits of each row by that row's own sampling temperature (for ``model.generate``).

    :func:`decode` takes per-row temperatures directly (``temperature`` as a tensor) and re-indexes them as rows
    leave; this processor gives ``model.generate`` the same behaviour. Pass ``temperature=1.0`` to ``generate`` so no
    global temperature is applied too.

    Args:
        temperatures: ``(batch,)`` temperatures, all > 0.
    """

    def __init__(self, temperatures: torch.Tensor) -> None:
        temperatures = torch.as_tensor(temperatures, dtype=torch.float32)
        if temperatures.ndim != 1 or bool((temperatures <= 0).any()):
            raise ValueError(f"temperatures must be a 1-D tensor of values > 0, got {temperatures.tolist()!r}.")
        self.temperatures = temperatures

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperatures.to(device=scores.device, dtype=scores.dtype).unsqueeze(1)


def pad_rows(rows: Any, pad: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` of id rows of different lengths, right-padded with ``pad`` (``left``: left-padded)."""
    width = max((len(row) for row in rows), default=0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(list(row), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def unsupported_reason(model: Any, generate_kwargs: dict[str, Any]) -> str | None:
    """Why :func:`decode` cannot reproduce ``model.generate(**generate_kwargs)`` on ``model``, or None if it can."""
    attention = model.config._attn_implementation
    if attention not in ENGINE_ATTENTION:
        return f"attention implementation {attention!r} (the engine supports {ENGINE_ATTENTION})"
    if not isinstance(getattr(model.get_decoder(), "norm", None), torch.nn.Module):
        return "the decoder has no final `norm` module to read the last-layer states from"
    if any(type(layer) is not DynamicLayer for layer in DynamicCache(config=model.config).layers):
        return "a layer that is not full attention (sliding window, linear, shared KV, ...)"
    extra = sorted(
        set(generate_kwargs)
        - {"max_new_tokens", "do_sample", "eos_token_id", "pad_token_id"}
        - {"temperature", "top_p", "top_k", "repetition_penalty"}
    )
    if extra:
        return f"generate arguments {extra}"
    if generate_kwargs.get("repetition_penalty") not in (None, 1.0):
        return f"repetition_penalty={generate_kwargs['repetition_penalty']!r}"
    fields = sorted(set(model.generation_config.to_diff_dict()) - _ENGINE_GENERATION_FIELDS)
    if fields:
        return f"generation-config settings {fields}"
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
    compact_at: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor] | None:
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
        counts: if given, ``decode_row_steps`` (rows fed during decoding) and ``prompt_tokens`` (prompt positions run
            through the model, padding included) are added to it.
        compact_at: finished rows are dropped from the batch once at most this fraction of its rows is still writing
            (1.0: as soon as any row finishes). Defaults to 0.5.

    Returns:
        ``(generated, states)``: ``(batch, R)`` ids in the layout of ``model.generate`` (pad id after a row's end) and
        ``(batch, P + R, hidden)`` last-layer states laid out like prompt + generated ids; positions outside the
        attention mask (padding, after a rationale's end) hold zeros. None when the states of the decoder's final
        ``norm`` could not be captured (it is not on the model's forward path).
    """
    batch, width = input_ids.shape
    device = input_ids.device
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
    hook = model.get_decoder().norm.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        # The shared prefix, once, for one row.
        positions = torch.arange(prefix_len, device=device).unsqueeze(0)
        out = model(input_ids=prefix[:1], position_ids=positions, use_cache=True, **last_only)
        if len(captured) != 1 or captured[0].shape[:2] != (1, prefix_len):
            return None  # the hooked norm is not on the forward path (e.g. a re-wrapped model)
        prefix_states = captured.pop()
        prefix_kv = [(keys, values) for keys, values, *_ in out.cache]
        # Every row's own tokens after it, padding between prefix and text; positions as in the left-padded prompt.
        cache = DynamicCache([(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in prefix_kv])
        mask = torch.cat([own_mask.new_ones(batch, prefix_len), own_mask], dim=1)
        positions = (prefix_len + own_mask.cumsum(1) - 1).clamp(min=prefix_len)
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
        if isinstance(temperature, torch.Tensor):
            temperature = temperature.to(device=device, dtype=torch.float32).unsqueeze(1)
        eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
        warpers = [TopKLogitsWarper(top_k)] if do_sample and top_k else []
        warpers += [TopPLogitsWarper(top_p)] if do_sample and top_p is not None and top_p < 1.0 else []
        while True:
            scores = logits.float()
            if do_sample:
                if isinstance(temperature, torch.Tensor):
                    scores = scores / temperature[rows]
                elif temperature is not None and temperature != 1.0:
                    scores = scores / temperature
                for warper in warpers:
                    scores = warper(None, scores)
                token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                token = scores.argmax(dim=-1)
            token = token.masked_fill(~alive, pad_token_id)
            generated[rows[alive], length[alive]] = token[alive]
            length = length + alive.long()
            lengths[rows] = length
            # Feed every row's new token once: its state is part of the embedding.
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            out = model(
                input_ids=token.unsqueeze(1),
                attention_mask=mask,
                position_ids=position.unsqueeze(1),
                cache=cache,
                use_cache=True,
            )
            states[rows[alive], width + length[alive] - 1] = captured.pop()[alive, -1]
            if counts is not None:
                counts["decode_row_steps"] = counts.get("decode_row_steps", 0) + len(rows)
            alive = alive & ~torch.isin(token, eos) & (length < max_new_tokens)
            n_alive = int(alive.sum())
            if n_alive == 0:
                break
            logits, position = out.logits[:, -1], position + 1
            if n_alive <= compact_at * len(rows):
                # Finished rows leave the batch (cache, mask, positions, per-row settings). Until then they ride along
                # (fed padding, outputs ignored): one copy of the cache per halving, and a matrix product with a few
                # rows fewer is not cheaper on every BLAS.
                keep = alive.nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                rows, length, mask, logits, position = (
                    rows[keep],
                    length[keep],
                    mask[keep],
                    logits[keep],
                    position[keep],
                )
                alive = alive[keep]
    finally:
        hook.remove()
    longest = int(lengths.max())
    return generated[:, :longest], states[:, : width + longest]


def _generate_kwargs(generate_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``generate_kwargs`` for ``model.generate``, which takes one temperature: per-row ones become a processor."""
    kwargs = dict(generate_kwargs)
    if isinstance(kwargs.get("temperature"), torch.Tensor):
        processors = [*(kwargs.get("logits_processor") or []), RowTemperature(kwargs["temperature"])]
        kwargs.update(temperature=1.0, logits_processor=LogitsProcessorList(processors))
    return kwargs


def generate_plain(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, generate_kwargs: dict[str, Any]
) -> torch.Tensor:
    """The ``(batch, R)`` ids ``model.generate`` writes after the left-padded prompts (no states)."""
    with torch.no_grad():
        sequences = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, **_generate_kwargs(generate_kwargs)
        )
    return sequences[:, input_ids.shape[1] :]


class _LastLayerStates:
    """Collects the last-layer states of every forward call while active: a hook on the decoder's final norm when the
    architecture has one (Llama, Qwen, Mistral, ...), else ``output_hidden_states`` (all layers, more memory)."""

    def __init__(self, model: Any) -> None:
        self.norm = getattr(model.get_decoder(), "norm", None)
        self.needs_hidden_states = not isinstance(self.norm, torch.nn.Module)
        self.states: list[torch.Tensor] = []
        self._handle = None

    def __enter__(self) -> _LastLayerStates:
        if not self.needs_hidden_states:
            self._handle = self.norm.register_forward_hook(lambda module, args, output: self.states.append(output))
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()


def generate_with_states(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, generate_kwargs: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(generated, states)``: the ids of :func:`generate_plain` and the ``(batch, P + R, hidden)`` last-layer states
    of prompt + generated ids, from generation (prefill + decode steps) plus one cached decode step for the final
    token. ``states`` is None when the hooked norm was not on the forward path (e.g. a re-wrapped copy)."""
    kwargs = _generate_kwargs(generate_kwargs)
    with torch.no_grad(), _LastLayerStates(model) as captured:
        kwargs.update(return_dict_in_generate=True, output_hidden_states=captured.needs_hidden_states)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        generated = out.sequences[:, input_ids.shape[1] :]
        if captured.needs_hidden_states:
            captured.states = [step[-1] for step in out.hidden_states]
        # Generation never feeds its last token back; one cached decode step gives that token's state.
        full_mask = torch.cat([attention_mask, torch.ones_like(generated)], dim=1)
        last = model(
            input_ids=generated[:, -1:],
            attention_mask=full_mask,
            position_ids=full_mask.sum(dim=1, keepdim=True) - 1,
            cache=out.cache,
            cache_position=torch.tensor([full_mask.shape[1] - 1], device=full_mask.device),
            use_cache=True,
            output_hidden_states=captured.needs_hidden_states,
        )
        if captured.needs_hidden_states:
            captured.states.append(last.hidden_states[-1])
    if sum(state.shape[1] for state in captured.states) != input_ids.shape[1] + generated.shape[1]:
        return generated, None
    return generated, torch.cat(captured.states, dim=1)


def generate_with_engine(
    model: Any,
    features: dict[str, Any],
    generate_kwargs: dict[str, Any],
    prefix_len: int,
    counts: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`generate_with_states` by :func:`decode` (the shared prompt prefix of ``prefix_len`` tokens runs once,
    finished rows leave the batch) for the left-padded prompts of ``features`` (``input_ids``, ``attention_mask``,
    ``text_start``); None where it does not apply (no prefix, :func:`unsupported_reason`, states not captured): then
    the caller uses ``model.generate``. ``counts`` as in :func:`decode`."""
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
            **sampling,
        )
