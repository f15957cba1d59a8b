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
  halving;
- the KV cache is kept in :class:`SpareLayer` layers (a decode step writes its column in place instead of copying
  the cache), and on a CPU the weights are laid out for few-row products while it runs (:func:`cpu_weight_layout`:
  in the usual layout, MKL's product with 9-15 rows costs more than one with 16; ``benchmarks/encode_speed.py``).

Supported: decoder-only LMs whose decoder ends with a ``norm`` module (Llama, Qwen2/3, Mistral, ...), ``eager`` or
``sdpa`` attention, full attention in every layer (no sliding window), greedy or sampled decoding with temperature
(one value or one per row), top-k and top-p. :func:`unsupported_reason` says why anything else (flash attention,
whose unpadding does not expect padding inside a row; repetition penalty; other generation-config processors) must use
``model.generate`` instead.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import Cache, DynamicLayer
from transformers.generation import TopKLogitsWarper, TopPLogitsWarper

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


class SpareLayer(DynamicLayer):
    """A full-attention cache layer whose keys/values are views into buffers with ``spare`` free columns after them:
    a decode step writes its new column in place, where :class:`DynamicLayer` copies the whole layer
    (``torch.cat``) at every step. When the room runs out the buffers grow by ``spare`` columns again. The cached
    values are the same as :class:`DynamicLayer`'s (attention over the strided views matched it bit for bit in the
    tests; other kernels may differ in the last bits).

    Args:
        keys, values: ``(batch, heads, length, head_dim)`` the layer's cached keys/values so far (copied); with
            ``length``, buffers whose first ``length`` columns hold them (used as they are, no copy).
        spare: free columns kept after them when the buffers grow (> 0).
        length: see ``keys``.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, spare: int, length: int | None = None) -> None:
        _check_cache_api()
        super().__init__()
        if not isinstance(spare, int) or spare < 1:
            raise ValueError(f"spare={spare!r} must be an int >= 1.")
        self.spare = spare
        self.lazy_initialization(keys, values)
        if length is None:
            self._grow(keys, values, keys[:, :, :0], values[:, :, :0])
        else:
            self._key_buffer, self._value_buffer = keys, values
            self.keys, self.values = keys[:, :, :length], values[:, :, :length]

    def _grow(self, keys: torch.Tensor, values: torch.Tensor, new_keys: torch.Tensor, new_values: torch.Tensor):
        length = keys.shape[2] + new_keys.shape[2]
        batch, heads, _, dim = new_keys.shape
        self._key_buffer = new_keys.new_empty(batch, heads, length + self.spare, dim)
        self._value_buffer = new_values.new_empty(batch, heads, length + self.spare, values.shape[-1])
        old = keys.shape[2]
        self._key_buffer[:, :, :old], self._key_buffer[:, :, old:length] = keys, new_keys
        self._value_buffer[:, :, :old], self._value_buffer[:, :, old:length] = values, new_values
        self.keys, self.values = self._key_buffer[:, :, :length], self._value_buffer[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.keys is None:  # reset: start again from empty buffers
            self.lazy_initialization(key_states, value_states)
            self._grow(key_states[:, :, :0], value_states[:, :, :0], key_states, value_states)
            return self.keys, self.values
        start, new = self.keys.shape[2], key_states.shape[2]
        if (
            start + new > self._key_buffer.shape[2]
            or key_states.shape[0] != self._key_buffer.shape[0]
            # keys/values replaced by an inherited method (reorder_cache, offload, ...): no longer views of the buffers
            or self.keys.data_ptr() != self._key_buffer.data_ptr()
            or self.values.data_ptr() != self._value_buffer.data_ptr()
        ):
            self._grow(self.keys, self.values, key_states, value_states)
        else:
            self._key_buffer[:, :, start : start + new] = key_states
            self._value_buffer[:, :, start : start + new] = value_states
            self.keys = self._key_buffer[:, :, : start + new]
            self.values = self._value_buffer[:, :, : start + new]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        length = self.keys.shape[2]
        self._key_buffer, self._value_buffer = self._key_buffer[indices], self._value_buffer[indices]
        self.keys, self.values = self._key_buffer[:, :, :length], self._value_buffer[:, :, :length]


@functools.cache
def _check_cache_api() -> None:
    """:class:`SpareLayer` overrides :class:`DynamicLayer` methods (public, but their contract may change): fail
    loudly, naming the tested versions, if their signatures are not the ones it was written against."""
    expected = {
        "update": ["self", "key_states", "value_states", "args", "kwargs"],
        "batch_select_indices": ["self", "indices"],
        "lazy_initialization": ["self", "key_states", "value_states"],
    }
    for name, params in expected.items():
        found = list(inspect.signature(getattr(DynamicLayer, name)).parameters)
        if found != params:
            raise RuntimeError(
                f"transformers.cache_utils.DynamicLayer.{name} has parameters {found}, not {params} (tested with "
                "transformers 5.24); grace_st's decode engine overrides it. Install transformers>=5.0,<6 as "
                "pyproject.toml pins it, or report the new version."
            )


def spare_cache(kv: Any, spare: int) -> Cache:
    """A :class:`~transformers.Cache` of :class:`SpareLayer` layers holding the ``(keys, values)`` pairs ``kv``."""
    return Cache(layers=[SpareLayer(keys, values, spare) for keys, values in kv])


_LAYOUT_LOCK = threading.Lock()


@contextlib.contextmanager
def cpu_weight_layout(model: Any) -> Iterator[None]:
    """While active, the float32 weights of the ``torch.nn.Linear`` modules of a model on a CPU are stored
    transposed (``[in, out]`` contiguous; the tensors keep their shape and values): ``x @ W.T`` then runs as a plain
    product, which on MKL costs less at a few rows (a decode step): ``benchmarks/encode_speed.py``. Products may
    differ from the usual layout's in the last bits. Costs one transposed copy of those weights while active (the
    original tensors are kept and put back on exit). A no-op on other devices and dtypes, and while another call
    already holds the layout. The model must not be changed or run by another thread meanwhile."""
    if model.device.type != "cpu" or not _LAYOUT_LOCK.acquire(blocking=False):
        yield
        return
    originals: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
    try:
        for module in model.modules():
            weight = getattr(module, "weight", None) if isinstance(module, torch.nn.Linear) else None
            if (
                isinstance(weight, torch.nn.Parameter)
                and id(weight) not in originals
                and weight.dtype == torch.float32
                and weight.device.type == "cpu"
                and weight.dim() == 2
                and weight.is_contiguous()
            ):
                originals[id(weight)] = (weight, weight.data)
                weight.data = weight.data.t().contiguous().t()
        yield
    finally:
        for weight, data in originals.values():
            weight.data = data
        _LAYOUT_LOCK.release()


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


def _generate_kwargs(generate_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``generate_kwargs`` for ``model.generate``, which takes one temperature: per-row ones become a processor."""
    kwargs = dict(generate_kwargs)
    if isinstance(kwargs.get("temperature"), torch.Tensor):
        processors = [*(kwargs.get("logits_processor") or []), RowTemperature(kwargs["temperature"])]
        kwargs.update(temperature=1.0, logits_processor=LogitsProcessorList(processors))
    return kwargs


def generate_plain(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    generate_kwargs: dict[str, Any],
    seeds: list[int] | None = None,
) -> torch.Tensor:
    """The ``(batch, R)`` ids ``model.generate`` writes after the left-padded prompts (no states).

    ``seeds`` (sampling only): one seed per row; each row is then generated alone, without its padding, under
    ``torch.random.fork_rng()`` + ``torch.manual_seed(seed)`` (the global RNG is left as it was). Deterministic and
    independent of the batch, but not the same draws as :func:`decode`'s per-row generators."""
    if seeds is not None:
        rows = _per_row(model, input_ids, attention_mask, generate_kwargs, seeds, with_states=False)
        return pad_rows([row[0][0].tolist() for row in rows], generate_kwargs["pad_token_id"])[0].to(input_ids.device)
    with torch.no_grad():
        sequences = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, **_generate_kwargs(generate_kwargs)
        )
    return sequences[:, input_ids.shape[1] :]


def _per_row(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    generate_kwargs: dict[str, Any],
    seeds: list[int],
    with_states: bool,
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(generated, states)`` of each row generated alone (its padding removed) under its own seed."""
    if not generate_kwargs.get("do_sample"):
        raise ValueError("seeds are per-row sampling seeds: pass them with do_sample=True (greedy draws nothing).")
    seeds = check_seeds(seeds, len(input_ids))
    devices = [input_ids.device] if input_ids.device.type == "cuda" else []
    results = []
    for row, seed in enumerate(seeds):
        kwargs = dict(generate_kwargs)
        if isinstance(kwargs.get("temperature"), torch.Tensor):
            kwargs["temperature"] = kwargs["temperature"][row : row + 1]
        keep = attention_mask[row].bool()
        ids, mask = input_ids[row : row + 1, keep], attention_mask[row : row + 1, keep]
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            if with_states:
                results.append(generate_with_states(model, ids, mask, kwargs))
            else:
                results.append((generate_plain(model, ids, mask, kwargs), None))
    return results


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
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    generate_kwargs: dict[str, Any],
    seeds: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(generated, states)``: the ids of :func:`generate_plain` and the ``(batch, P + R, hidden)`` last-layer states
    of prompt + generated ids, from generation (prefill + decode steps) plus one cached decode step for the final
    token. ``states`` is None when the hooked norm was not on the forward path (e.g. a re-wrapped copy).
    ``seeds`` as in :func:`generate_plain` (rows generated one by one; zeros at padding)."""
    if seeds is not None:
        return _assemble_rows(
            _per_row(model, input_ids, attention_mask, generate_kwargs, seeds, with_states=True),
            input_ids.shape[1],
            generate_kwargs["pad_token_id"],
        )
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


def _assemble_rows(
    rows: list[tuple[torch.Tensor, torch.Tensor | None]], width: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One batch ``(generated, states)`` from rows generated alone: ids right-padded with ``pad_token_id``; states
    laid out like a ``width``-column left-padded prompt + the generated ids, zeros at padding."""
    generated = pad_rows([row[0][0].tolist() for row in rows], pad_token_id)[0].to(rows[0][0].device)
    if any(states is None for _, states in rows):
        return generated, None
    first = rows[0][1]
    states = first.new_zeros(len(rows), width + generated.shape[1], first.shape[-1])
    for index, (ids, row_states) in enumerate(rows):
        prompt = row_states.shape[1] - ids.shape[1]
        states[index, width - prompt : width + ids.shape[1]] = row_states[0]
    return generated, states


def suffix_states_two_pass(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    rationale_ids: torch.Tensor,
    rationale_mask: torch.Tensor,
    suffix_ids: list[list[int]],
) -> torch.Tensor:
    """``(batch, hidden)`` last-layer state of each row's last suffix token from one forward pass over prompt +
    rationale + suffix (the two-pass reference of :func:`decode`'s ``suffix_states``, and the fallback where the
    engine does not apply).

    Args:
        model: the causal LM.
        input_ids, attention_mask: ``(batch, P)`` the left-padded prompts.
        rationale_ids, rationale_mask: ``(batch, R)`` the rationales (mask: 1 for rationale tokens, the closing EOS
            included).
        suffix_ids: per row, the suffix token ids (at least one).
    """
    suffix_ids = check_suffix_ids(suffix_ids, len(input_ids), getattr(model.config, "vocab_size", None))
    rows = [
        ids[mask.bool()].tolist() + r_ids[r_mask.bool()].tolist() + suffix
        for ids, mask, r_ids, r_mask, suffix in zip(
            input_ids, attention_mask, rationale_ids, rationale_mask.to(rationale_ids.device), suffix_ids, strict=True
        )
    ]
    ids, mask = pad_rows(rows, 0, left=True)  # left padding: every row's last suffix token is in the last column
    ids, mask = ids.to(input_ids.device), mask.to(input_ids.device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # as Transformer.embed and generate
    with torch.no_grad():
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True, use_cache=False
        )
    return out.hidden_states[-1][:, -1]


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
