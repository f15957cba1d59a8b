"""Tests of grace_st/streaming.py: continuous batching (decode_stream) against the per-batch decode engine."""

from __future__ import annotations

import pytest
import torch
from helpers import TEXTS, engine_output, split_rows, tiny_grace_model

from grace_st.engine import decode_stream


@pytest.mark.parametrize("refill_at", [0.0, 0.5, 0.875, 1.0])
def test_decode_stream_equals_decode(tiny_backbone_dir, refill_at):
    module = tiny_grace_model(tiny_backbone_dir, max_new_tokens=10)[0]
    split_rows(module, module.preprocess(TEXTS), 10)
    texts = TEXTS * 3
    features = module.preprocess(texts)
    prefix_len = len(module.template_pieces()[0])
    kwargs = module.generation_kwargs()
    reference = engine_output(module, features)
    pairs = zip(features["input_ids"], features["attention_mask"], strict=True)
    real = [ids[mask.bool()].tolist() for ids, mask in pairs]
    counts = {}
    rows = list(
        decode_stream(
            module.model,
            real[0][:prefix_len],
            [row[prefix_len:] for row in real],
            10,
            kwargs["eos_token_id"],
            kwargs["pad_token_id"],
            batch_size=5,
            counts=counts,
            refill_at=refill_at,
        )
    )
    assert sorted(row.index for row in rows) == list(range(len(texts)))
    assert counts["refills"] >= len(texts) // 5 and counts["prompt_tokens"] < features["input_ids"].numel()
    width = features["input_ids"].shape[1]
    batch = module.rationale_batch(reference.generated)
    for row in rows:
        i, n = row.index, int(batch.mask[row.index].sum())
        assert row.generated.tolist() == reference.generated[i, :n].tolist()
        seen = torch.cat([features["attention_mask"][i], batch.mask[i]]).bool()
        expected = reference.states[i, : width + reference.generated.shape[1]][seen]
        assert row.states.shape == expected.shape
        assert float((row.states - expected).abs().max()) < 1e-5


def test_decode_stream_arguments_are_checked(tiny_backbone_dir):
    module = tiny_grace_model(tiny_backbone_dir)[0]
    with pytest.raises(ValueError, match="at least one token"):
        next(decode_stream(module.model, [1, 2], [[3], []], 4, [2], 2, batch_size=2))
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
