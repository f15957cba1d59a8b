"""Tests of grace_st/streaming.py: continuous batching (decode_stream) against the per-batch decode engine."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_grace_model

from grace_st.engine import decode_stream


def test_decode_stream_arguments_are_checked(tiny_backbone_dir):
    module = tiny_grace_model(tiny_backbone_dir)[0]
    with pytest.raises(ValueError, match="at least one token"):
        next(decode_stream(module.model, [1], [[3], []], 4, [2], 2, batch_size=2))  # "" needs a prefix of two
    with pytest.raises(ValueError, match="batch_size=0"):
        next(decode_stream(module.model, [1, 2], [[3]], 4, [2], 2, batch_size=0))
    with pytest.raises(ValueError, match="refill_at=2"):
        next(decode_stream(module.model, [1, 2], [[3]], 4, [2], 2, batch_size=1, refill_at=2))


def test_packed_linears_give_the_usual_products_and_are_removed(tiny_backbone_dir):
    from grace_st.engine.cpu import packed_linears, packing_unsupported_reason

    if not torch.backends.mkl.is_available():
        pytest.skip("this torch build has no MKL: packed_linears is a no-op")
    module = tiny_grace_model(tiny_backbone_dir)[0]
    model = module.model
    # torch's private MKL ops still have the tested signatures (this fails when a torch release changes them).
    assert packing_unsupported_reason(model) is None
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    hooked = linears[0]
    hooked.forward = hooked.forward  # a replaced forward (as accelerate's hooks do) is left alone
    generator = torch.Generator().manual_seed(2)
    ids = {rows: torch.randint(0, model.config.vocab_size, (rows, 1), generator=generator) for rows in (4, 3)}
    with torch.no_grad():
        expected = {rows: model(input_ids=x).logits for rows, x in ids.items()}
        with packed_linears(model, rows=4):
            assert all("forward" in vars(m) for m in linears)
            assert hooked.forward.__self__ is hooked
            found = {rows: model(input_ids=x).logits for rows, x in ids.items()}
    assert all(torch.equal(expected[rows], found[rows]) for rows in ids)
    assert all("forward" not in vars(m) for m in linears[1:]) and "forward" in vars(hooked)
    # Where gradients are needed the usual product runs (the packed op has no backward).
    linear = linears[1]
    x = torch.randn(4, linear.in_features, requires_grad=True)
    with packed_linears(model, rows=4):
        linear(x).sum().backward()
    assert x.grad is not None and linear.weight.grad is not None


def test_the_stream_reserves_columns_for_the_rationales_written_not_the_limit(tiny_backbone_dir, monkeypatch):
    from grace_st.engine import stream

    module = tiny_grace_model(tiny_backbone_dir)[0]
    spares: list[int] = []
    joined = stream._joined_cache

    def spy(groups, width, spare):
        spares.append(spare)
        return joined(groups, width, spare)

    monkeypatch.setattr(stream, "_joined_cache", spy)
    own = [[5, 6, 7], [8], [9, 10]]
    every_token_ends = list(range(module.model.config.vocab_size))  # one-token rationales
    context = module.model.config.max_position_embeddings
    rows = list(decode_stream(module.model, [1, 2], own, context, every_token_ends, 2, batch_size=2))
    assert sorted(len(row.generated) for row in rows) == [1, 1, 1]
    assert spares and max(spares) <= stream.GROW_COLUMNS < context


def _padded_positions(groups: list[list[int]], lengths: list[int], call_positions: int) -> int:
    return sum(call_positions + len(group) * max(lengths[i] for i in group) for group in groups)


@pytest.mark.parametrize("call_positions", [0, 5, 24, 1000])
def test_prefill_groups_split_prompts_where_it_computes_fewest_positions(call_positions):
    import itertools

    from grace_st.engine.stream import prefill_groups

    generator = torch.Generator().manual_seed(call_positions)
    for size in range(1, 8):
        lengths = torch.randint(1, 60, (size,), generator=generator).tolist()
        groups = prefill_groups(lengths, call_positions)
        assert sorted(i for group in groups for i in group) == list(range(size))  # every prompt once
        order = sorted(range(size), key=lambda i: -lengths[i])
        best = min(  # every split of the length-sorted prompts into consecutive groups
            _padded_positions([order[a:b] for a, b in itertools.pairwise((0, *cuts, size))], lengths, call_positions)
            for k in range(size)
            for cuts in itertools.combinations(range(1, size), k)
        )
        assert _padded_positions(groups, lengths, call_positions) == best
    assert prefill_groups([3, 9, 5], None) == [[1, 2, 0]]  # one forward, longest first
    assert prefill_groups([], 24) == []
