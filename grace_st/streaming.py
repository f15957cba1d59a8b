"""Continuous batching for corpus encoding (:func:`grace_st.encode_corpus`): :func:`decode_stream` keeps a batch of
rows decoding and hands a finished row's slot to the next waiting text, against the shared prompt prefix's cache.

Part of the installed package only (saved models do not carry it): a model's own ``encode`` uses the per-batch engine
of ``_decode.py``; this scheduler works over a whole corpus, which sentence-transformers never hands to a module.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import torch
from transformers import DynamicCache

from grace_st._decode import decode_step, pad_rows


class StreamRow(NamedTuple):
    """One finished row of :func:`decode_stream`.

    Attributes:
        index: the row's index in ``own_ids``.
        generated: ``(r,)`` its rationale ids, the closing EOS included when it finished (no padding).
        states: ``(prefix_len + len(own_ids[index]) + r, hidden)`` last-layer states of the shared prefix, the row's
            own tokens and its rationale, in order (no padding).
    """

    index: int
    generated: torch.Tensor
    states: torch.Tensor


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
) -> Any:
    """Greedy rationales for many prompts ``prefix_ids + own_ids[i]`` with continuous batching: yields a
    :class:`StreamRow` per prompt as the rows leave the batch (not in input order).

    At most ``batch_size`` rows decode together. The shared prefix runs once for the whole call. When at most
    ``refill_at`` of the batch's rows are still writing, the finished rows leave and waiting prompts take their
    slots: their own tokens are prefilled (together, left-padded after the prefix, as in :func:`decode`) against the
    prefix's keys/values, and their cache rows join the batch's, right-aligned with the other rows' last column
    (padding columns between prefix and text are masked; positions are explicit, so every real token has the position
    and context it has in its own left-padded prompt). Columns masked in every row are dropped at each refill. Once no
    prompt waits, finished rows leave as in :func:`decode` (at most half the rows writing). The rationales and states
    equal :func:`decode`'s on the same prompts within float tolerance (batch shapes differ, so do the last bits).

    Args:
        model: a causal LM for which :func:`unsupported_reason` is None, in eval mode (greedy decoding only).
        prefix_ids: the prompt prefix every row shares (at least one token).
        own_ids: each row's own prompt tokens after the prefix (at least one token each). Process them longest first
            to keep prefill padding small.
        max_new_tokens, eos_token_ids, pad_token_id: as in :func:`decode`.
        batch_size: rows decoding at once.
        counts: if given, ``decode_row_steps`` (rows fed during decoding), ``decode_steps`` (decode forward calls),
            ``prompt_tokens`` (prompt positions run, padding included; the prefix once) and ``refills`` (prefill
            forward calls after the prefix) are added to it.
        refill_at: refill once at most this fraction of the batch's rows is still writing. Defaults to 0.875 (on
            this CPU, 0.75-1.0 gave the same CPU time within noise: 64 texts, batch 16, 48 tokens).

    Returns:
        A generator of :class:`StreamRow`; it must run to its end (or be closed) to release the model hook.
    """
    if not prefix_ids or any(len(row) == 0 for row in own_ids):
        raise ValueError("decode_stream: the prefix and every row's own tokens need at least one token.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1.")
    if not 0.0 <= refill_at <= 1.0:
        raise ValueError(f"refill_at={refill_at!r} must be in [0, 1].")
    device = model.device
    params = inspect.signature(model.forward).parameters
    keeps = "logits_to_keep" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    last_only = {"logits_to_keep": 1} if keeps else {}
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
    prefix_len = len(prefix_ids)
    captured: list[torch.Tensor] = []
    hook = model.get_decoder().norm.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        with torch.no_grad():
            out = model(
                input_ids=torch.tensor([prefix_ids], device=device),
                position_ids=torch.arange(prefix_len, device=device).unsqueeze(0),
                use_cache=True,
                **last_only,
            )
            prefix_states = captured.pop()[0]
            prefix_kv = [(keys, values) for keys, values, *_ in out.cache]
            if counts is not None:
                counts["prompt_tokens"] = counts.get("prompt_tokens", 0) + prefix_len
            waiting = 0  # next row of own_ids to enter
            # Batch state, one entry per batch row.
            cache: DynamicCache | None = None
            mask = rows = alive = length = position = logits = own_states = generated = gen_states = None
            while True:
                n_alive = 0 if alive is None else int(alive.sum())
                n_rows = 0 if rows is None else len(rows)
                refill = waiting < len(own_ids) and n_alive <= refill_at * n_rows and n_alive < batch_size
                compact = not refill and n_rows and n_alive < n_rows and (n_alive == 0 or n_alive <= 0.5 * n_rows)
                if n_rows and (refill or compact):
                    # Finished rows leave the batch (and are handed out).
                    for i in (~alive).nonzero().squeeze(1).tolist():
                        r = int(length[i])
                        yield StreamRow(
                            int(rows[i]),
                            generated[i, :r].clone(),
                            torch.cat([prefix_states, own_states[i], gen_states[i, :r]], dim=0),
                        )
                    keep = alive.nonzero().squeeze(1)
                    rows, alive, length, position, logits = (t[keep] for t in (rows, alive, length, position, logits))
                    generated, gen_states, mask = generated[keep], gen_states[keep], mask[keep]
                    own_states = [own_states[i] for i in keep.tolist()]
                    kv = [(k[keep], v[keep]) for k, v, *_ in cache]
                    live = mask.bool().any(dim=0)  # columns some row still attends to
                    if not bool(live.all()):
                        mask = mask[:, live]
                        kv = [(k[:, :, live], v[:, :, live]) for k, v in kv]
                    cache = DynamicCache(kv)
                    n_rows = len(rows)
                if n_rows == 0 and waiting >= len(own_ids):
                    break
                if refill:
                    new = list(range(waiting, min(len(own_ids), waiting + batch_size - n_rows)))
                    waiting = new[-1] + 1
                    ids, new_mask = pad_rows([own_ids[i] for i in new], pad_token_id, left=True)
                    ids, new_mask = ids.to(device), new_mask.to(device)
                    k = len(new)
                    new_cache = DynamicCache(
                        [(a.expand(k, -1, -1, -1), b.expand(k, -1, -1, -1)) for a, b in prefix_kv]
                    )
                    full_mask = torch.cat([new_mask.new_ones(k, prefix_len), new_mask], dim=1)
                    positions = (prefix_len + new_mask.cumsum(1) - 1).clamp(min=prefix_len)
                    out = model(
                        input_ids=ids,
                        attention_mask=full_mask,
                        position_ids=positions,
                        cache=new_cache,
                        use_cache=True,
                        **last_only,
                    )
                    states_new = captured.pop()
                    if counts is not None:
                        counts["prompt_tokens"] = counts.get("prompt_tokens", 0) + ids.numel()
                        counts["refills"] = counts.get("refills", 0) + 1
                    new_own = [states_new[j][new_mask[j].bool()] for j in range(k)]
                    new_rows = torch.tensor(new, dtype=torch.long, device=device)
                    hidden = states_new.shape[-1]
                    if n_rows == 0:
                        cache, mask, own_states = new_cache, full_mask, new_own
                        rows, logits, position = new_rows, out.logits[:, -1], positions[:, -1] + 1
                        alive = torch.ones(k, dtype=torch.bool, device=device)
                        length = torch.zeros(k, dtype=torch.long, device=device)
                        generated = torch.full((k, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
                        gen_states = states_new.new_zeros(k, max_new_tokens, hidden)
                    else:
                        # Right-align both groups' columns: masked zero columns on the left of the narrower one.
                        width = max(mask.shape[1], full_mask.shape[1])
                        kv = [
                            (
                                torch.cat([_left_pad(a, width), _left_pad(na, width)], dim=0),
                                torch.cat([_left_pad(b, width), _left_pad(nb, width)], dim=0),
                            )
                            for (a, b, *_), (na, nb, *_) in zip(cache, new_cache, strict=True)
                        ]
                        cache = DynamicCache(kv)
                        mask = torch.cat([_left_pad(mask, width), _left_pad(full_mask, width)], dim=0)
                        own_states = own_states + new_own
                        rows = torch.cat([rows, new_rows])
                        logits = torch.cat([logits, out.logits[:, -1]])
                        position = torch.cat([position, positions[:, -1] + 1])
                        alive = torch.cat([alive, torch.ones(k, dtype=torch.bool, device=device)])
                        length = torch.cat([length, torch.zeros(k, dtype=torch.long, device=device)])
                        generated = torch.cat(
                            [generated, generated.new_full((k, max_new_tokens), pad_token_id)], dim=0
                        )
                        gen_states = torch.cat([gen_states, gen_states.new_zeros(k, max_new_tokens, hidden)], dim=0)
                # One greedy decode step for every batch row (finished rows ride along, fed padding).
                token = logits.float().argmax(dim=-1).masked_fill(~alive, pad_token_id)
                index = torch.arange(len(rows), device=device)
                generated[index[alive], length[alive]] = token[alive]
                length = length + alive.long()
                out, mask = decode_step(model, token, mask, position, cache)
                gen_states[index[alive], length[alive] - 1] = captured.pop()[alive, -1]
                if counts is not None:
                    counts["decode_row_steps"] = counts.get("decode_row_steps", 0) + len(rows)
                    counts["decode_steps"] = counts.get("decode_steps", 0) + 1
                alive = alive & ~torch.isin(token, eos) & (length < max_new_tokens)
                logits, position = out.logits[:, -1], position + 1
    finally:
        hook.remove()


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """``tensor`` with zero columns prepended along its sequence axis (-2 for cache keys/values, 1 for a mask)."""
    axis = 1 if tensor.dim() == 2 else 2
    missing = width - tensor.shape[axis]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)
