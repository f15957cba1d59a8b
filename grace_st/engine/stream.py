"""Continuous batching for corpus encoding (:func:`grace_st.encode_corpus`): :func:`decode_stream` keeps a batch of
rows decoding and hands a finished row's slot to the next waiting text, against the shared prompt prefix's cache.

Part of the installed package only (saved models do not carry it): a model's own ``encode`` uses the per-batch engine
of :mod:`grace_st.engine.decode`; this scheduler works over a whole corpus.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import weakref
from typing import Any, NamedTuple

import torch
from transformers import Cache
from transformers.generation import TopKLogitsWarper, TopPLogitsWarper

from grace_st.engine.cache import SpareLayer, spare_cache
from grace_st.engine.cpu import cpu_kernels, greedy_head, head_matches
from grace_st.model.generation import hook_outputs, pad_rows

logger = logging.getLogger(__name__)

# Columns the rationale buffers and the KV cache grow by (at most max_new_tokens): memory follows the rationales
# actually written, not the limit.
GROW_COLUMNS = 64
# What one more prefill forward costs, in prompt positions computed, per device type: prompts taken together are
# prefilled in groups of similar length where that costs less than their padding (on this 2-core CPU a forward's
# fixed part, ~60 ms, is what ~24 positions cost). Devices not listed prefill every group in one forward (padding costs
# little there next to a forward's launch).
PREFILL_CALL_POSITIONS = {"cpu": 24}
_MODEL_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def model_lock(model: Any) -> threading.RLock:
    """The lock that serialises the engine's decode loops on one model: while a loop runs, the CPU weight layout and
    the packed linears (:mod:`~grace_st.engine.cpu`) patch the model's shared modules."""
    with _MODEL_LOCKS_GUARD:
        return _MODEL_LOCKS.setdefault(model, threading.RLock())


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


def after_prefix(own_mask: torch.Tensor, prefix_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(attention mask, position ids)`` of rows' own tokens (``own_mask``: left-padded) fed after a shared prefix of
    ``prefix_len`` cached tokens: the mask covers prefix + own columns; every real token gets the position it has in
    its own left-padded prompt (padding between prefix and text takes no position)."""
    mask = torch.cat([own_mask.new_ones(len(own_mask), prefix_len), own_mask], dim=1)
    return mask, (prefix_len + own_mask.cumsum(1) - 1).clamp(min=prefix_len)


def prefill_groups(lengths: list[int], call_positions: int | None) -> list[list[int]]:
    """Indices into ``lengths`` (prompt lengths) in groups to prefill one forward each, longest first: the split of
    the length-sorted prompts that computes the fewest positions (each group padded to its longest prompt), counting
    ``call_positions`` for each forward; one group when ``call_positions`` is None."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if call_positions is None or len(order) < 2:
        return [order] if order else []
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j prompts; cut[j]: where its last group starts
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + call_positions + (j - i) * lengths[order[i]]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def decode_step(
    model: Any,
    token: torch.Tensor,
    mask: torch.Tensor,
    position: torch.Tensor,
    cache: Any,
    attend: torch.Tensor | None = None,
    **kwargs: Any,
):
    """Feed one new token per row through the KV cache: ``(model output, attention mask grown by one column)``.
    ``attend`` (``(batch,)`` bool): rows whose new column later steps attend to (default: every row); ``kwargs`` go
    to the model's forward (e.g. ``logits_to_keep``)."""
    column = mask.new_ones(len(token), 1) if attend is None else attend.to(mask.dtype).unsqueeze(1)
    mask = torch.cat([mask, column], dim=1)
    ids, position_ids = token.unsqueeze(1), position.unsqueeze(1)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True, **kwargs)
    return out, mask


class StreamRow(NamedTuple):
    """One finished row of :func:`decode_stream`.

    Attributes:
        index: the row's index in ``own_ids``.
        generated: ``(r,)`` its rationale ids, the closing EOS included when it finished (no padding).
        states: ``(prefix_len + len(own_ids[index]) + r, hidden)`` last-layer states of the shared prefix, the row's
            own tokens and its rationale, in order (no padding).
        suffix_state: ``(hidden,)`` the last-layer state of the row's last suffix token, fed after its rationale
            (with ``suffix_ids``; else None).
        text_suffix_state: ``(hidden,)`` the same suffix's last state fed right after the row's prompt, no rationale
            before it (with ``text_suffix``; else None).
    """

    index: int
    generated: torch.Tensor
    states: torch.Tensor
    suffix_state: torch.Tensor | None = None
    text_suffix_state: torch.Tensor | None = None


def decode_stream(
    model: Any,
    prefix_ids: list[int],
    own_ids: list[list[int]],
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    batch_size: int,
    counts: dict[str, int] | None = None,
    refill_at: float = 0.875,
    suffix_ids: list[list[int]] | None = None,
    compact_at: float = 1.0,
    do_sample: bool = False,
    temperature: float | torch.Tensor | None = 1.0,
    top_k: int | None = 0,
    top_p: float | None = 1.0,
    seeds: list[int] | None = None,
    text_suffix: bool = False,
) -> Any:
    """Rationales for many prompts ``prefix_ids + own_ids[i]`` with continuous batching: yields a
    :class:`StreamRow` per prompt as the rows leave the batch (not in input order). The one decode loop of the
    engine: :func:`~grace_st.engine.decode.decode` runs it over one batch.

    At most ``batch_size`` rows decode together. The shared prefix runs once for the whole call. Prompts are
    taken ``batch_size`` at a time, in order, whenever a slot needs one and none is ready, and prefilled: their own
    tokens in one forward per group of similar length (left-padded after the prefix, as in :func:`decode`) against
    the prefix's keys/values; they then wait for a slot with their cache rows, so a refill runs no forward of its own.
    When at most ``refill_at`` of the ``batch_size`` slots hold a writing row, the finished rows leave and ready
    prompts take the free slots: their cache rows join the batch's in one copy, right-aligned with the other rows'
    last column (padding columns between prefix and text are masked; positions are explicit, so every real token has
    the position and context it has in its own left-padded prompt). Columns masked in every row are dropped at each
    refill. Between refills, finished rows leave once at most ``compact_at`` of the rows are writing (the cache rows
    after them move up in place, without a copy of the whole cache). The cache keeps free columns (``SpareLayer``); on
    a CPU with bfloat16 instructions (AVX512-BF16), greedy decode steps compute no logits: the next tokens come from
    the states by a screened bfloat16 product of the output head (:class:`~grace_st.engine.cpu.GreedyHead`, where the
    model's logits are that head's product),
    and the weights may be packed for full batches and laid out for few-row products
    (:func:`~grace_st.engine.cpu.cpu_kernels`; off by default). The rationales and states equal :func:`decode`'s on
    the same prompts within float tolerance (batch shapes and kernels differ, so do the last bits).

    Args:
        model: a causal LM for which :func:`~grace_st.engine.decode.unsupported_reason` is None, in eval mode.
        prefix_ids: the prompt prefix every row shares (at least one token).
        own_ids: each row's own prompt tokens after the prefix (none: the row writes right after the prefix, which
            then needs two tokens at least). Process them longest first to keep prefill padding small.
        max_new_tokens: rationale length limit.
        eos_token_ids: ids that end a rationale (empty: every rationale has ``max_new_tokens`` tokens).
        pad_token_id: fills padding.
        batch_size: rows decoding at once.
        counts: if given, ``decode_row_steps`` (rows fed during decoding), ``decode_steps`` (decode forward calls),
            ``prompt_tokens`` (prompt positions run, padding included; the prefix once) and ``refills`` (prefill
            forward calls after the prefix) are added to it.
        refill_at: refill once at most this fraction of the ``batch_size`` slots holds a writing row. Defaults to
            0.875 (on this CPU, 0.875 and 1.0 gave the same time within noise: 64 texts, batch 16, 48 tokens).
        suffix_ids: per row of ``own_ids``, token ids (at least one) fed after its rationale ends, as in
            :func:`decode` (a cut rationale is treated like a finished one): the finished rows that leave the batch
            together run their suffixes in one forward over their cache rows (right-padded), at the positions that
            follow their rationales directly; ``StreamRow.suffix_state`` is the state of the last one. Counted as
            ``suffix_tokens`` (padding included).
        compact_at: between refills, finished rows leave when at most this fraction of the rows is writing.
            Defaults to 1.0 (as soon as they finish).
        do_sample: sample instead of greedy decoding, with ``temperature`` (one value, or a tensor with one per row
            of ``own_ids``), ``top_k`` (0/None: none) and ``top_p`` (1.0/None: none).
        seeds: per row of ``own_ids``, the seed of its own ``torch.Generator`` (``do_sample`` only): a row's sampled
            rationale then depends neither on its batch-mates nor on the global RNG. None: the global RNG, one draw
            for the whole batch per step.
        text_suffix: also feed each row's ``suffix_ids`` right after its prompt (no rationale before it) when it is
            prefilled, over a copy of its cache rows: ``StreamRow.text_suffix_state`` (the summary state of the text
            alone, without a second forward over the prompt). Counted in ``suffix_tokens``. Defaults to False.

    Returns:
        A generator of :class:`StreamRow`; it must run to its end (or be closed) to release the model hook, to put
        back the weights' layout and ``forward`` methods (values and results are the same meanwhile) and to release
        the model's lock (:func:`model_lock`: decode loops on one model take turns, from any thread). The rationale
        buffers and the KV cache grow by :data:`GROW_COLUMNS` columns as rationales get longer.
    """
    if len(prefix_ids) > 1 and any(len(row) == 0 for row in own_ids):
        # A row without tokens of its own ("" under a template ending with {text}) writes right after the prefix: the
        # prefix's last token becomes every row's first own token (the same prompts, the same results).
        prefix_ids, own_ids = prefix_ids[:-1], [prefix_ids[-1:] + row for row in own_ids]
    if not prefix_ids or any(len(row) == 0 for row in own_ids):
        raise ValueError("decode_stream: the prefix and every row's own tokens need at least one token.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1.")
    if not 0.0 <= refill_at <= 1.0:
        raise ValueError(f"refill_at={refill_at!r} must be in [0, 1].")
    if not 0.0 <= compact_at <= 1.0:
        raise ValueError(f"compact_at={compact_at!r} must be in [0, 1].")
    if suffix_ids is not None:
        suffix_ids = check_suffix_ids(suffix_ids, len(own_ids), getattr(model.config, "vocab_size", None))
    elif text_suffix:
        raise ValueError("text_suffix=True feeds each row's suffix after its prompt: pass suffix_ids too.")
    if seeds is not None:
        if not do_sample:
            raise ValueError("seeds are per-row sampling seeds: pass them with do_sample=True (greedy draws nothing).")
        seeds = check_seeds(seeds, len(own_ids))
    device = model.device
    choose = _TokenChooser(device, do_sample, temperature, top_k, top_p, seeds)
    params = inspect.signature(model.forward).parameters
    keeps = "logits_to_keep" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    last_only = {"logits_to_keep": 1} if keeps else {}
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
    prefix_len = len(prefix_ids)
    grow = min(GROW_COLUMNS, max_new_tokens)
    call_positions = PREFILL_CALL_POSITIONS.get(device.type)

    @torch.no_grad()
    def prefill(group: list[int]) -> _Prefilled:
        """The own tokens of prompts ``group`` in one forward, left-padded after the shared prefix's keys/values."""
        ids, own_mask = pad_rows([own_ids[i] for i in group], pad_token_id, left=True)
        ids, own_mask = ids.to(device), own_mask.to(device)
        k = len(group)
        cache = spare_cache([(a.expand(k, -1, -1, -1), b.expand(k, -1, -1, -1)) for a, b in prefix_kv], ids.shape[1])
        mask, positions = after_prefix(own_mask, prefix_len)
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, **last_only
        )
        states = captured.pop()
        if counts is not None:
            counts["prompt_tokens"] = counts.get("prompt_tokens", 0) + ids.numel()
            counts["refills"] = counts.get("refills", 0) + 1
        nonlocal head, head_checked
        logits = out.logits[:, -1]
        if head is not None and not head_checked:  # are the model's logits the head's product of the states?
            head_checked = True
            if not head_matches(head, states[:, -1], logits):
                head = None
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        return _Prefilled(
            torch.tensor(group, dtype=torch.long, device=device),
            kv,
            mask,
            logits if head is None else logits.float().argmax(dim=-1),
            positions[:, -1] + 1,
            [states[j][own_mask[j].bool()] for j in range(k)],
            list(suffix_run(group, kv, mask, positions[:, -1] + 1)) if text_suffix else [None] * k,
        )

    @torch.no_grad()
    def suffix_states(leaving: torch.Tensor) -> torch.Tensor:
        """The last suffix token's state of batch rows ``leaving``, fed after their rationales."""
        kv = [(layer.keys.index_select(0, leaving), layer.values.index_select(0, leaving)) for layer in cache.layers]
        return suffix_run(rows[leaving].tolist(), kv, mask[leaving], start[leaving] + length[leaving])

    def suffix_run(group: list[int], kv: list, context: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """The last suffix token's state of rows ``group`` of ``own_ids`` (their suffixes in one forward, right-padded)
        after ``kv`` (a copy is extended) with mask ``context``, at positions from ``first``."""
        tokens, real = pad_rows([suffix_ids[i] for i in group], pad_token_id)
        tokens, real = tokens.to(device), real.to(device)
        span = tokens.shape[1]
        model(
            input_ids=tokens,
            attention_mask=torch.cat([context, real.to(context.dtype)], dim=1),
            position_ids=first.unsqueeze(1) + torch.arange(span, device=device),
            cache=spare_cache(kv, span),
            use_cache=True,
            **(last_only if head is None else no_logits),  # its logits are never read
        )
        if counts is not None:
            counts["suffix_tokens"] = counts.get("suffix_tokens", 0) + tokens.numel()
        return captured.pop()[torch.arange(len(group), device=device), real.sum(dim=1) - 1]

    layout = contextlib.ExitStack()
    try:
        layout.enter_context(model_lock(model))
        layout.enter_context(cpu_kernels(model, min(batch_size, len(own_ids))))
        captured, hook = hook_outputs(model.get_decoder().norm)  # this call's states only
        layout.callback(hook.remove)
        # Greedy decoding on a CPU: the next tokens from the states by a screened bfloat16 head (decode steps then
        # compute no logits), where the model computes no logits for an empty `logits_to_keep` (checked here, on the
        # prefix) and its logits are that head's product of the states (checked at the first prefill).
        head = greedy_head(model, do_sample) if keeps else None
        head_checked = False
        no_logits = {"logits_to_keep": torch.zeros(0, dtype=torch.long, device=device)}
        # Grad mode is set around each forward, never across a yield: a suspended generator must not change the
        # caller's mode (nor restore a stale one when it is closed later).
        prefix = {
            "input_ids": torch.tensor([prefix_ids], device=device),
            "position_ids": torch.arange(prefix_len, device=device).unsqueeze(0),
            "use_cache": True,
        }
        with torch.no_grad():
            try:
                out = model(**prefix, **(last_only if head is None else no_logits))
            except Exception:  # a forward that cannot take an index: the logits, as without the head
                if head is None:
                    raise
                captured.clear()
                head, out = None, model(**prefix, **last_only)
        if head is not None and out.logits.shape[1] != 0:
            head = None
        if len(captured) != 1 or captured[0].shape[:2] != (1, prefix_len):
            raise StatesNotCaptured("the decoder's final norm is not on the forward path (e.g. a re-wrapped model)")
        prefix_states = captured.pop()[0]
        prefix_kv = [(keys, values) for keys, values, *_ in out.cache]
        if counts is not None:
            counts["prompt_tokens"] = counts.get("prompt_tokens", 0) + prefix_len
        next_prompt = 0  # next row of own_ids to prefill
        pending: list[list[int]] = []  # prompts taken for prefilling, in groups of similar length
        ready: _Prefilled | None = None  # prefilled prompts waiting for a slot

        def prompts_wait() -> bool:
            return next_prompt < len(own_ids) or bool(pending) or (ready is not None and len(ready.rows) > 0)

        # Batch state, one entry per batch row.
        cache: Cache | None = None
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        mask = rows = alive = length = position = start = logits = generated = gen_states = None
        own_states: list[torch.Tensor] = []
        alone: list[torch.Tensor | None] = []  # each batch row's text_suffix state
        while True:
            n_alive = 0 if alive is None else int(alive.sum())
            n_rows = 0 if rows is None else len(rows)
            waiting = prompts_wait()
            refill = waiting and n_alive <= refill_at * batch_size and n_alive < batch_size
            compact = not refill and n_rows and n_alive < n_rows and (n_alive == 0 or n_alive <= compact_at * n_rows)
            if n_rows and (refill or compact):
                # Finished rows leave the batch (and are handed out).
                leaving = (~alive).nonzero().squeeze(1)
                last = None if suffix_ids is None else suffix_states(leaving)
                for j, i in enumerate(leaving.tolist()):
                    r = int(length[i])
                    yield StreamRow(
                        int(rows[i]),
                        generated[i, :r].clone(),
                        torch.cat([prefix_states, own_states[i], gen_states[i, :r]], dim=0),
                        None if last is None else last[j],
                        alone[i],
                    )
                keep = alive.nonzero().squeeze(1)
                rows, alive, length, position, start, logits = (
                    t[keep] for t in (rows, alive, length, position, start, logits)
                )
                generated, gen_states, mask = generated[keep], gen_states[keep], mask[keep]
                own_states = [own_states[i] for i in keep.tolist()]
                alone = [alone[i] for i in keep.tolist()]
                if refill:  # the kept rows go into the joined cache below, without the columns no row attends to
                    kept = [
                        (layer.keys.index_select(0, keep), layer.values.index_select(0, keep))
                        for layer in cache.layers
                    ]
                    live = mask.bool().any(dim=0)
                    if not bool(live.all()):
                        mask, columns = mask[:, live], live.nonzero().squeeze(1)
                        kept = [(k.index_select(2, columns), v.index_select(2, columns)) for k, v in kept]
                else:  # the kept rows move up in place: a few rows are copied, not the whole cache
                    for layer in cache.layers:
                        layer.keep_rows(keep)
                n_rows = len(rows)
            if n_rows == 0 and not waiting:
                break
            if refill:
                # Free slots take prefilled prompts (taken batch_size at a time, prefilled in groups of similar
                # length, when none is ready).
                parts: list[_Prefilled] = []
                need = batch_size - n_rows
                while need > 0 and prompts_wait():
                    if ready is None or len(ready.rows) == 0:
                        if not pending:
                            taken = range(next_prompt, min(len(own_ids), next_prompt + batch_size))
                            next_prompt = taken[-1] + 1
                            pending = prefill_groups([len(own_ids[i]) for i in taken], call_positions)
                            pending = [[taken[j] for j in group] for group in pending]
                        ready = prefill(pending.pop(0))
                    part, ready = ready.split(need)
                    parts.append(part)
                    need -= len(part.rows)
                # Right-align every group's columns: masked zero columns on the left of the narrower ones.
                groups = ([kept] if n_rows else []) + [part.kv for part in parts]
                masks = ([mask] if n_rows else []) + [part.mask for part in parts]
                width = max(m.shape[1] for m in masks)
                cache = _joined_cache(groups, width, grow)
                mask = torch.cat([_left_pad(m, width) for m in masks], dim=0)
                k = sum(len(part.rows) for part in parts)
                own_states = own_states + [state for part in parts for state in part.own_states]
                alone = alone + [state for part in parts for state in part.text_suffix_states]
                rows = torch.cat(([rows] if n_rows else []) + [part.rows for part in parts])
                logits = torch.cat(([logits] if n_rows else []) + [part.logits for part in parts])
                position = torch.cat(([position] if n_rows else []) + [part.position for part in parts])
                start = torch.cat(([start] if n_rows else []) + [part.position for part in parts])
                alive = torch.cat(([alive] if n_rows else []) + [torch.ones(k, dtype=torch.bool, device=device)])
                length = torch.cat(([length] if n_rows else []) + [torch.zeros(k, dtype=torch.long, device=device)])
                columns = generated.shape[1] if n_rows else grow
                new_generated = torch.full((k, columns), pad_token_id, dtype=torch.long, device=device)
                generated = torch.cat(([generated] if n_rows else []) + [new_generated])
                new_states = prefix_states.new_zeros(k, columns, prefix_states.shape[-1])
                gen_states = torch.cat(([gen_states] if n_rows else []) + [new_states])
            if int((length * alive).max()) == generated.shape[1]:  # a writing row has filled its columns
                generated = torch.cat([generated, generated.new_full((len(rows), grow), pad_token_id)], dim=1)
                gen_states = torch.cat(
                    [gen_states, gen_states.new_zeros(len(rows), grow, gen_states.shape[-1])], dim=1
                )
            # One decode step for every batch row (finished rows ride along, fed padding that no row attends to: their
            # cache rows stay as they were when they finished, for their suffix).
            token = (logits if head is not None else choose(logits, rows, alive)).masked_fill(~alive, pad_token_id)
            index = torch.arange(len(rows), device=device)
            generated[index[alive], length[alive]] = token[alive]
            length = length + alive.long()
            with torch.no_grad():
                out, mask = decode_step(
                    model, token, mask, position, cache, attend=alive, **({} if head is None else no_logits)
                )
            states = captured.pop()[:, -1]
            gen_states[index[alive], length[alive] - 1] = states[alive]
            if counts is not None:
                counts["decode_row_steps"] = counts.get("decode_row_steps", 0) + len(rows)
                counts["decode_steps"] = counts.get("decode_steps", 0) + 1
            alive = alive & ~torch.isin(token, eos) & (length < max_new_tokens)
            position = position + 1
            if head is None:
                logits = out.logits[:, -1]
            else:  # the next token of every row still writing (the others' are never read)
                logits = torch.full_like(token, pad_token_id)
                logits[alive] = head(states[alive])
    finally:
        layout.close()


class StatesNotCaptured(RuntimeError):
    """The decoder's final norm, whose outputs are the last-layer states, did not run in the model's forward."""


class _TokenChooser:
    """The next token of each batch row from its logits: greedy, or sampled with temperature (one value or one per
    row), top-k and top-p, from the global RNG or from one generator per row (``seeds``)."""

    def __init__(self, device, do_sample, temperature, top_k, top_p, seeds) -> None:
        self.do_sample = do_sample
        self.temperature = temperature
        if isinstance(temperature, torch.Tensor):
            self.temperature = temperature.to(device=device, dtype=torch.float32).unsqueeze(1)
        self.warpers = [TopKLogitsWarper(top_k)] if do_sample and top_k else []
        self.warpers += [TopPLogitsWarper(top_p)] if do_sample and top_p is not None and top_p < 1.0 else []
        self.generators = None
        if seeds is not None:
            self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        scores = logits.float()
        if not self.do_sample:
            return scores.argmax(dim=-1)
        if isinstance(self.temperature, torch.Tensor):
            scores = scores / self.temperature[rows]
        elif self.temperature is not None and self.temperature != 1.0:
            scores = scores / self.temperature
        for warper in self.warpers:
            scores = warper(None, scores)
        probs = torch.softmax(scores, dim=-1)
        if self.generators is None:
            return torch.multinomial(probs, num_samples=1).squeeze(1)
        token = torch.zeros_like(rows)  # each writing row draws from its own generator, once per own step
        for i in alive.nonzero().squeeze(1).tolist():
            token[i] = torch.multinomial(probs[i], 1, generator=self.generators[int(rows[i])])[0]
        return token


class _Prefilled(NamedTuple):
    """Prompts of :func:`decode_stream` prefilled and waiting for a slot (rows of one prefill call not yet taken)."""

    rows: torch.Tensor  # (n,) their indices in own_ids
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, (n, heads, width, head_dim) keys and values
    mask: torch.Tensor  # (n, width) attention mask: prefix, left padding, own tokens
    logits: torch.Tensor  # (n, vocab) at each prompt's last position; (n,) next token ids with a greedy head
    position: torch.Tensor  # (n,) position of each row's first rationale token
    own_states: list[torch.Tensor]  # each row's last-layer states of its own tokens (no padding)
    text_suffix_states: list[torch.Tensor | None]  # each row's suffix state after its prompt (text_suffix)

    def split(self, n: int) -> tuple[_Prefilled, _Prefilled]:
        """The first ``n`` rows (views, no copy) and the rest."""
        head = _Prefilled(
            self.rows[:n],
            [(k[:n], v[:n]) for k, v in self.kv],
            self.mask[:n],
            self.logits[:n],
            self.position[:n],
            self.own_states[:n],
            self.text_suffix_states[:n],
        )
        tail = _Prefilled(
            self.rows[n:],
            [(k[n:], v[n:]) for k, v in self.kv],
            self.mask[n:],
            self.logits[n:],
            self.position[n:],
            self.own_states[n:],
            self.text_suffix_states[n:],
        )
        return head, tail


def _joined_cache(groups: list[list[tuple[torch.Tensor, torch.Tensor]]], width: int, spare: int) -> Cache:
    """A cache of :class:`~grace_st.engine.cache.SpareLayer` layers holding the rows of every group (per layer
    ``(keys, values)``), group after group, each right-aligned in ``width`` columns (zero columns on the left: masked)
    and ``spare`` free columns after them; one copy of every kept key and value."""
    layers = []
    for per_layer in zip(*groups, strict=True):
        first_keys, first_values = per_layer[0]
        rows = sum(keys.shape[0] for keys, _ in per_layer)
        buffers = [t.new_empty(rows, t.shape[1], width + spare, t.shape[3]) for t in (first_keys, first_values)]
        start = 0
        for pair in per_layer:
            stop = start + pair[0].shape[0]
            for buffer, tensor in zip(buffers, pair, strict=True):
                offset = width - tensor.shape[2]
                buffer[start:stop, :, :offset] = 0
                buffer[start:stop, :, offset:width] = tensor
            start = stop
        layers.append(SpareLayer(*buffers, spare, length=width))
    return Cache(layers=layers)


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """``tensor`` with zero columns prepended along its sequence axis (-2 for cache keys/values, 1 for a mask)."""
    axis = 1 if tensor.dim() == 2 else 2
    missing = width - tensor.shape[axis]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)
