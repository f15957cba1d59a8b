"""Tests of grace_st/streaming.py: continuous batching (decode_stream) against the per-batch decode engine."""

from __future__ import annotations

import pytest
import torch
from test_decode import TEXTS, _engine, _model, _split_rows

from grace_st.streaming import decode_stream


@pytest.mark.parametrize("refill_at", [0.0, 0.5, 0.875, 1.0])
def test_decode_stream_equals_decode(tiny_backbone_dir, refill_at):
    module = _model(tiny_backbone_dir, max_new_tokens=10)[0]
    _split_rows(module, module.preprocess(TEXTS), 10)
    texts = TEXTS * 3
    features = module.preprocess(texts)
    prefix_len = len(module.template_pieces()[0])
    kwargs = module.generation_kwargs()
    reference = _engine(module, features)
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
    module = _model(tiny_backbone_dir)[0]
    with pytest.raises(ValueError, match="at least one token"):
        next(decode_stream(module.model, [1, 2], [[3], []], 4, [2], 2, batch_size=2))
    with pytest.raises(ValueError, match="batch_size=0"):
        next(decode_stream(module.model, [1, 2], [[3]], 4, [2], 2, batch_size=0))
    with pytest.raises(ValueError, match="refill_at=2"):
        next(decode_stream(module.model, [1, 2], [[3]], 4, [2], 2, batch_size=1, refill_at=2))
