"""Tests of grace_st/generation.py (the rationale-writing mixin): doctests, seeds, rationale batches."""

from __future__ import annotations

import doctest

import grace_st
from grace_st.model import generation


def test_doctests():
    result = doctest.testmod(generation)
    assert result.attempted >= 2 and result.failed == 0


def test_text_seeds_depend_on_the_text_only(tiny_backbone_dir):
    module = grace_st.from_backbone(tiny_backbone_dir, do_sample=True, num_rationales=2)[0]
    alone = module.text_seeds(module.preprocess(["a cat"]))
    batch = module.text_seeds(module.preprocess(["a much longer text about dogs", "a cat"]))
    assert len(alone) == 2 and len(batch) == 4 and alone != alone[::-1]
    assert batch[2:] == alone  # padding in the batch does not change the seeds
    assert batch[:2] != alone


def test_rationale_batch_of_rows_of_different_lengths(tiny_backbone_dir):
    module = grace_st.from_backbone(tiny_backbone_dir)[0]
    eos = module.eos_token_ids[0]
    batch = module.rationale_batch([[5, 6, eos], [7]])
    assert batch.mask.tolist() == [[1, 1, 1], [1, 0, 0]] and batch.finished.tolist() == [True, False]
    assert batch.ids[1, 1:].tolist() == [module.tokenizer.pad_token_id] * 2


def test_hooked_outputs_are_only_this_threads(tiny_backbone_dir):
    """Another call on the same model (another thread) runs the hooked module too: its outputs are not this call's."""
    import threading

    import torch

    from grace_st.model.generation import hook_outputs

    module = grace_st.from_backbone(tiny_backbone_dir, max_new_tokens=2, device="cpu")[0]
    norm = module.model.get_decoder().norm
    captured, handle = hook_outputs(norm)
    try:
        other = threading.Thread(target=lambda: norm(torch.ones(1, 2, norm.weight.shape[0])))
        other.start()
        other.join()
        assert captured == []
        norm(torch.ones(1, 3, norm.weight.shape[0]))
        assert [tuple(state.shape) for state in captured] == [(1, 3, norm.weight.shape[0])]
    finally:
        handle.remove()
