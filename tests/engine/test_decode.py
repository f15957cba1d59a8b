"""Tests of the decode engine (grace_st/engine/decode.py) against the reference path (``model.generate`` + a step)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    TEXTS,
    both_paths,
    engine_output,
    split_rows,
    suffix_token_ids,
    tiny_grace_model,
)

from grace_st.engine.decode import decode, generate_with_engine, unsupported_reason
from grace_st.model.generation import generate_with_states


def test_engine_runs_no_forward_over_the_whole_sequence(tiny_backbone_dir):
    model = tiny_grace_model(tiny_backbone_dir, max_new_tokens=6)
    module = model[0]
    lengths = []
    handle = module.model.register_forward_pre_hook(
        lambda m, args, kwargs: lengths.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        features = module.preprocess(TEXTS)
        module.generate_rationales(features, with_states=True)
    finally:
        handle.remove()
    prefix_len = len(module.template_pieces()[0])
    # The prefix for one row, then the rows' own tokens (in groups of similar length on a CPU: every row once, no
    # group wider than the batch's longest own part), then one token per step.
    assert lengths[0] == (1, prefix_len)
    own_width = features["input_ids"].shape[1] - int(features["text_start"].min())
    prefills = [shape for shape in lengths[1:] if shape[1] > 1]
    assert sum(shape[0] for shape in prefills) == len(TEXTS)
    assert max(shape[1] for shape in prefills) == own_width
    assert sum(shape[0] * shape[1] for shape in prefills) <= len(TEXTS) * own_width
    assert all(shape[1] == 1 for shape in lengths[1 + len(prefills) :])


def test_sampling_with_a_seed_returns_valid_rows(tiny_backbone_dir):
    module = tiny_grace_model(tiny_backbone_dir)[0]
    features = module.preprocess(TEXTS)
    split_rows(module, features, 10)
    module.decode_path = "engine"
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(
            module.generate_rationales(
                features, with_states=True, do_sample=True, temperature=0.7, top_k=50, top_p=0.9
            )
        )
    a, b = runs
    assert torch.equal(a.ids, b.ids) and torch.equal(a.states, b.states)
    vocab = module.model.config.vocab_size
    for row in range(len(TEXTS)):
        kept = a.mask[row].bool()
        n = int(kept.sum())
        assert n >= 1 and kept[:n].all() and not kept[n:].any()  # one contiguous rationale
        assert all(0 <= t < vocab for t in a.ids[row][kept].tolist())
        assert bool(a.finished[row]) == (a.ids[row, n - 1].item() in module.eos_token_ids)
    out = module.outputs_from_states(features, a)
    assert torch.isfinite(out["token_embeddings"]).all()


def test_per_row_temperatures_follow_their_rows_as_rows_leave(tiny_backbone_dir):
    """Cold rows 0 and 2 finish first and leave the batch; temperatures not re-indexed with them would give the hot
    temperature of row 1 to row 3."""
    module = tiny_grace_model(tiny_backbone_dir, max_new_tokens=10)[0]
    features = module.preprocess([TEXTS[0], TEXTS[7], TEXTS[1], TEXTS[6]])
    module.decode_path = "generate"
    greedy_free = module.generate_rationales(features).ids
    eos = sorted({greedy_free[0, 1].item(), greedy_free[2, 1].item()})  # rows 0 and 2 stop after two tokens
    assert not set(eos) & set(greedy_free[3].tolist()), "fixture: row 3 must not contain these tokens"
    module.model.generation_config.eos_token_id = eos
    greedy = module.generate_rationales(features)
    for path in ("engine",):  # per-row temperatures are the engine's (the trainer samples jointly only with it)
        module.decode_path = path
        module.decode_counts = {}
        torch.manual_seed(0)
        sampled = module.generate_rationales(
            features,
            with_states=True,
            do_sample=True,
            temperature=torch.tensor([1e-4, 1e4, 1e-4, 1e-4]),
            top_p=1.0,
            top_k=0,
        )
        assert sampled.mask[[0, 2]].sum(1).tolist() == [2, 2], path
        for row in (0, 2, 3):  # cold rows: the greedy rationale
            got, expected = sampled.ids[row][sampled.mask[row].bool()], greedy.ids[row][greedy.mask[row].bool()]
            assert got.tolist() == expected.tolist(), (path, row)
        hot, cold = sampled.ids[1][sampled.mask[1].bool()], greedy.ids[1][greedy.mask[1].bool()]
        assert hot.tolist() != cold.tolist(), path
        if path == "engine":  # the two finished rows left the batch: 4 rows for 2 steps, then 2 rows
            assert module.decode_counts["decode_row_steps"] == 4 * 2 + 2 * (sampled.ids.shape[1] - 2)


def test_engine_serves_a_peft_wrapped_policy(tiny_backbone_dir):
    """The trainer hands the engine its policy, a PeftModel when training LoRA adapters."""
    peft = pytest.importorskip("peft")
    module = tiny_grace_model(tiny_backbone_dir)[0]
    module.model = peft.get_peft_model(module.model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in module.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # a trained adapter: changes the output
    features = module.preprocess(TEXTS)
    split_rows(module, features, 10)
    reference, engine = both_paths(module, features)
    assert module.decode_counts["decode_row_steps"] > 0, "the engine was not used"
    assert torch.equal(engine.ids, reference.ids)
    seen = module.outputs_from_states(features, reference)["attention_mask"].bool()
    assert float((engine.states - reference.states)[seen].abs().max()) < 1e-5


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [({"repetition_penalty": 1.3}, "repetition_penalty"), ({"num_beams": 2}, "num_beams")],
)
def test_unsupported_settings_use_the_reference_path(tiny_backbone_dir, kwargs, reason):
    module = tiny_grace_model(tiny_backbone_dir)[0]
    features = module.preprocess(TEXTS[:3])
    assert reason in unsupported_reason(module.model, {**module.generation_kwargs(), **kwargs})
    if "num_beams" in kwargs:
        return
    reference, engine = both_paths(module, features, **kwargs)
    assert module.decode_counts == {}, "the engine must not run"
    assert torch.equal(engine.ids, reference.ids) and torch.equal(engine.states, reference.states)


def test_unsupported_models_are_named(tiny_backbone_dir):
    module = tiny_grace_model(tiny_backbone_dir)[0]
    kwargs = module.generation_kwargs()
    assert unsupported_reason(module.model, kwargs) is None
    module.model.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in unsupported_reason(module.model, kwargs)
    module.model.config._attn_implementation = "sdpa"
    module.model.generation_config.no_repeat_ngram_size = 3
    assert "no_repeat_ngram_size" in unsupported_reason(module.model, kwargs)


def test_a_decoder_norm_off_the_forward_path_falls_back(tiny_backbone_dir):
    module = tiny_grace_model(tiny_backbone_dir)[0]
    features = module.preprocess(TEXTS[:3])
    module.decode_path = "generate"
    expected = module.generate_rationales(features)
    detached = torch.nn.Module()
    detached.norm = torch.nn.LayerNorm(4)
    module.model.get_decoder = lambda: detached
    module.decode_path = "engine"
    got = module.generate_rationales(features, with_states=True)
    assert torch.equal(got.ids, expected.ids) and got.states is None  # the caller then runs the two-pass reference


def test_rows_with_different_prefixes_are_refused(tiny_backbone_dir):
    module = tiny_grace_model(tiny_backbone_dir)[0]
    features = module.preprocess(TEXTS[:2])
    ids = features["input_ids"].clone()
    ids[1, int(features["text_start"][1]) - 2] += 1
    prefix_len = len(module.template_pieces()[0])
    with pytest.raises(ValueError, match="prefix"):
        decode(module.model, ids, features["attention_mask"], features["text_start"], prefix_len, 4, [2], 2)


def test_decode_path_is_validated(tiny_backbone_dir):
    module = tiny_grace_model(tiny_backbone_dir)[0]
    with pytest.raises(ValueError, match="decode_path='fast'.*engine"):
        module.decode_path = "fast"


def test_without_suffix_nothing_extra_is_returned(tiny_backbone_dir):
    module = tiny_grace_model(tiny_backbone_dir)[0]
    out = engine_output(module, module.preprocess(TEXTS[:3]))
    assert out.suffix_states is None
    generated, states = out[:2]  # still indexable like the former (generated, states) pair
    assert generated is out.generated and states is out.states


@pytest.mark.parametrize(
    ("suffix_ids", "match"),
    [([[1], []], r"suffix_ids\[1\] = \[\]"), ([[1]], "2 rows"), ([[1], [-3]], r"suffix_ids\[1\]"), ("ab", "rows")],
)
def test_bad_suffix_ids_are_refused(tiny_backbone_dir, suffix_ids, match):
    module = tiny_grace_model(tiny_backbone_dir)[0]
    with pytest.raises(ValueError, match=match):
        engine_output(module, module.preprocess(TEXTS[:2]), suffix_ids=suffix_ids)


# ---------------------------------------------------------------- seeds: per-row sampling generators
def _sampling_kwargs(module, **extra):
    return {**module.generation_kwargs(), "do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, **extra}


def generate_plain(*args, **kwargs):
    return generate_with_states(*args, **kwargs, with_states=False)[0]


def _rationales(module, generated):
    batch = module.rationale_batch(generated)
    return [row[mask.bool()].tolist() for row, mask in zip(batch.ids, batch.mask, strict=True)]


def test_seeded_engine_rows_do_not_depend_on_batch_mates_or_the_global_rng(tiny_backbone_dir):
    module = tiny_grace_model(tiny_backbone_dir, max_new_tokens=10)[0]
    prefix_len = len(module.template_pieces()[0])
    kwargs = _sampling_kwargs(module)
    seeds = [11, 22, 33, 44, 55, 66, 77, 88]
    torch.manual_seed(0)
    together = _rationales(
        module, generate_with_engine(module.model, module.preprocess(TEXTS), kwargs, prefix_len, seeds=seeds).generated
    )
    for row in (0, 3, 4):
        torch.manual_seed(row + 100)  # another global RNG state: no effect
        alone = generate_with_engine(
            module.model, module.preprocess([TEXTS[row]]), kwargs, prefix_len, seeds=[seeds[row]]
        )
        assert _rationales(module, alone.generated)[0] == together[row], row
    # The same text under different seeds: different samples at temperature 1 (and they are samples, not greedy).
    same = module.preprocess([TEXTS[0]] * 4)
    drawn = _rationales(module, generate_with_engine(module.model, same, kwargs, prefix_len, seeds=[1, 2, 3, 4])[0])
    assert len({tuple(row) for row in drawn}) >= 3
    greedy = _rationales(module, engine_output(module, module.preprocess([TEXTS[0]])).generated)[0]
    assert any(row != greedy for row in drawn)
    again = _rationales(module, generate_with_engine(module.model, same, kwargs, prefix_len, seeds=[1, 2, 3, 4])[0])
    assert again == drawn


def test_seeded_engine_with_suffixes_and_per_row_temperatures(tiny_backbone_dir):
    """Seeds, per-row temperatures and suffixes together: a seeded row's rationale and suffix state match its run
    alone."""
    module = tiny_grace_model(tiny_backbone_dir, max_new_tokens=10)[0]
    features = module.preprocess(TEXTS[:4])
    split_rows(module, features, 10)
    prefix_len = len(module.template_pieces()[0])
    temperatures = torch.tensor([0.5, 1.0, 2.0, 0.7])
    kwargs = _sampling_kwargs(module, temperature=temperatures)
    suffix_ids = suffix_token_ids(module, 4)
    seeds = [5, 6, 7, 8]
    together = generate_with_engine(module.model, features, kwargs, prefix_len, suffix_ids=suffix_ids, seeds=seeds)
    for row in range(4):
        alone = generate_with_engine(
            module.model,
            module.preprocess([TEXTS[row]]),
            {**kwargs, "temperature": temperatures[row : row + 1]},
            prefix_len,
            suffix_ids=[suffix_ids[row]],
            seeds=[seeds[row]],
        )
        assert _rationales(module, alone.generated)[0] == _rationales(module, together.generated)[row]
        assert float((alone.suffix_states[0] - together.suffix_states[row]).abs().max()) < 1e-5


def test_seeded_reference_paths_are_per_row_and_leave_the_global_rng_alone(tiny_backbone_dir):
    module = tiny_grace_model(tiny_backbone_dir, max_new_tokens=10)[0]
    features = module.preprocess(TEXTS[:4])
    kwargs = _sampling_kwargs(module)
    seeds = [3, 1, 4, 1]
    args = (module.model, features["input_ids"], features["attention_mask"], kwargs)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    plain = generate_plain(*args, seeds=seeds)
    assert torch.equal(torch.random.get_rng_state(), before)
    generated, states = generate_with_states(*args, seeds=seeds)
    assert _rationales(module, plain) == _rationales(module, generated)
    for row in (0, 2):
        alone = module.preprocess([TEXTS[row]])
        single = generate_plain(module.model, alone["input_ids"], alone["attention_mask"], kwargs, seeds=[seeds[row]])
        assert _rationales(module, single)[0] == _rationales(module, plain)[row]
    # The states are those of the batch path for the same ids (two-pass forward over prompt + rationale).
    batch = module.rationale_batch(generated)
    batch.states = states
    single_pass = module.outputs_from_states(features, batch)
    two_pass = module.embed(features, batch)
    seen = two_pass["attention_mask"].bool()
    assert float((single_pass["token_embeddings"] - two_pass["token_embeddings"])[seen].abs().max()) < 1e-5
    assert len({tuple(row) for row in _rationales(module, generate_plain(*args, seeds=[9, 8, 7, 6]))}) > 1


def test_seeds_need_sampling(tiny_backbone_dir):
    module = tiny_grace_model(tiny_backbone_dir)[0]
    features = module.preprocess(TEXTS[:2])
    with pytest.raises(ValueError, match="do_sample=True"):
        engine_output(module, features, seeds=[1, 2])
    with pytest.raises(ValueError, match="do_sample=True"):
        generate_plain(
            module.model, features["input_ids"], features["attention_mask"], module.generation_kwargs(), seeds=[1, 2]
        )
    with pytest.raises(ValueError, match=r"seeds\[1\] = -1"):
        generate_with_engine(module.model, features, _sampling_kwargs(module), 5, seeds=[1, -1])


# ---------------------------------------------------------------- benchmarks/gpu_check.py
GPU_CHECK = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def test_gpu_check_exits_cleanly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    done = subprocess.run([sys.executable, str(GPU_CHECK)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout


def test_gpu_check_runs_on_a_tiny_cpu_config(default_backbone_dir, tmp_path):
    command = [sys.executable, str(GPU_CHECK), "--device", "cpu", "--tiny", "--texts", "40"]
    command += ["--batch-sizes", "8,32", "--new-tokens", "4", "--repeats", "1", "--tokenizer", default_backbone_dir]
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["ok"] and summary["agreement"]["rationale_tokens_engine"] == [4]
    assert set(summary["throughput"]) == {"8", "32"}
    assert summary["throughput"]["32"]["engine"]["texts_per_s"] > 0


def _decode_steps(model, cache, ids, steps):
    """Logits and last-layer states of ``steps`` greedy decode steps after ``ids`` through ``cache``."""
    out = model(input_ids=ids, cache=cache, use_cache=True, output_hidden_states=True)
    logits, states = [out.logits[:, -1]], [out.hidden_states[-1][:, -1]]
    for _ in range(steps):
        out = model(
            input_ids=logits[-1].argmax(-1, keepdim=True), cache=cache, use_cache=True, output_hidden_states=True
        )
        logits.append(out.logits[:, -1])
        states.append(out.hidden_states[-1][:, -1])
    return torch.stack(logits), torch.stack(states)


def test_spare_cache_equals_the_dynamic_cache(tiny_backbone_dir):
    from transformers import DynamicCache

    from grace_st.engine.cache import spare_cache

    model = tiny_grace_model(tiny_backbone_dir)[0].model
    ids = torch.randint(0, model.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        prefix = model(input_ids=ids[:, :4], use_cache=True).cache
        kv = [(layer.keys, layer.values) for layer in prefix.layers]
        expected = _decode_steps(model, DynamicCache(kv), ids[:, 4:], 5)
        # spare=1: the buffers grow during the steps (after the 2 prompt tokens and at every other step).
        cache = spare_cache(kv, 1)
        found = _decode_steps(model, cache, ids[:, 4:], 5)
        assert all(torch.equal(a, b) for a, b in zip(expected, found, strict=True))
        assert cache.layers[0].keys.shape[2] == 4 + 2 + 5
        # Rows leave: the rest go on as in a dynamic cache that dropped the same rows.
        reference, kept = DynamicCache(kv), spare_cache(kv, 3)
        _decode_steps(model, reference, ids[:, 4:], 1)
        _decode_steps(model, kept, ids[:, 4:], 1)
        keep = torch.tensor([0, 2])
        reference.batch_select_indices(keep)
        kept.batch_select_indices(keep)
        step = ids[keep, :1]
        assert all(
            torch.equal(a, b)
            for a, b in zip(_decode_steps(model, reference, step, 2), _decode_steps(model, kept, step, 2), strict=True)
        )


def test_spare_cache_survives_inherited_methods_that_replace_its_tensors(tiny_backbone_dir):
    from transformers import DynamicCache

    from grace_st.engine.cache import spare_cache

    model = tiny_grace_model(tiny_backbone_dir)[0].model
    ids = torch.randint(0, model.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        kv = [(layer.keys, layer.values) for layer in model(input_ids=ids[:, :4], use_cache=True).cache.layers]
        order = torch.tensor([2, 0, 1])
        reference, spare = DynamicCache(kv), spare_cache(kv, 4)
        reference.reorder_cache(order)
        spare.reorder_cache(order)  # replaces keys/values with new tensors: the next step must not use stale buffers
        step = ids[order, 4:]
        assert all(
            torch.equal(a, b)
            for a, b in zip(
                _decode_steps(model, reference, step, 2), _decode_steps(model, spare, step, 2), strict=True
            )
        )
        spare.reset()  # keys/values None: filled again from the next update
        fresh = _decode_steps(model, DynamicCache(), ids, 1)
        assert all(torch.equal(a, b) for a, b in zip(fresh, _decode_steps(model, spare, ids, 1), strict=True))


def test_a_changed_cache_layer_api_is_named(monkeypatch):
    from transformers.cache_utils import DynamicLayer

    from grace_st.engine.cache import cache_api_reason

    assert cache_api_reason.__wrapped__() is None  # the installed transformers has the signatures SpareLayer overrides
    monkeypatch.setattr(DynamicLayer, "update", lambda self, key_states, value_states, layer_index: None)
    reason = cache_api_reason.__wrapped__()
    assert "DynamicLayer.update has parameters" in reason and "tested: 5.24" in reason


def test_cpu_weight_layout_keeps_values_and_restores_the_weights(tiny_backbone_dir):
    from grace_st.engine.cpu import cpu_weight_layout

    model = tiny_grace_model(tiny_backbone_dir)[0].model
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    before = [(m.weight, m.weight.data, m.weight.detach().clone()) for m in linears]
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with cpu_weight_layout(model):
            assert all(not m.weight.is_contiguous() and m.weight.t().is_contiguous() for m in linears)
            assert all(torch.equal(m.weight, saved) for m, (_, _, saved) in zip(linears, before, strict=True))
            with cpu_weight_layout(model):  # nested: the layout is already held, nothing changes
                assert all(not m.weight.is_contiguous() for m in linears)
            assert all(not m.weight.is_contiguous() for m in linears)
            found = model(input_ids=ids).logits
    assert float((found - expected).abs().max()) < 1e-5
    for module, (parameter, _, saved) in zip(linears, before, strict=True):
        assert module.weight is parameter and torch.equal(module.weight, saved)
        assert module.weight.is_contiguous()
    # The layout is changed in place: an update of the values made meanwhile is kept.
    with torch.no_grad(), cpu_weight_layout(model):
        linears[0].weight.mul_(2.0)
    assert torch.equal(linears[0].weight, before[0][2] * 2.0) and linears[0].weight.is_contiguous()


@pytest.mark.parametrize("keep", [[0, 1, 2, 3, 4], [1, 3], [0, 2, 4], [4], [0], []])
def test_a_cache_layer_keeps_rows_in_place_like_a_selection(keep):
    from transformers.cache_utils import DynamicLayer

    from grace_st.engine.cache import SpareLayer

    generator = torch.Generator().manual_seed(len(keep))
    keys, values = torch.randn(5, 2, 3, 4, generator=generator), torch.randn(5, 2, 3, 4, generator=generator)
    layer, reference = SpareLayer(keys, values, spare=2), DynamicLayer()
    reference.update(keys, values)
    index = torch.tensor(keep, dtype=torch.long)
    buffer = layer._key_buffer
    layer.keep_rows(index)
    reference.batch_select_indices(index)
    assert torch.equal(layer.keys, reference.keys) and torch.equal(layer.values, reference.values)
    assert len(keep) == 0 or layer._key_buffer.data_ptr() == buffer.data_ptr()  # moved within the same buffer
    new_keys, new_values = torch.randn(len(keep), 2, 1, 4), torch.randn(len(keep), 2, 1, 4)
    got, expected = layer.update(new_keys, new_values), reference.update(new_keys, new_values)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_greedy_head_picks_the_float32_argmax_on_near_ties():
    from grace_st.engine.cpu import GreedyHead

    generator = torch.Generator().manual_seed(0)
    rows, hidden, vocab = 96, 64, 3000
    states = torch.randn(rows, hidden, generator=generator) * 4
    weight = torch.randn(vocab, hidden, generator=generator)
    top = torch.nn.functional.linear(states, weight).max(dim=1).values
    # Per row, a rival token whose float32 logit is the row's best +-0.001 to 1 (logits ~100: more than bfloat16's
    # error at these values, which is ~0.5).
    gaps = torch.logspace(-3, 0, rows) * torch.tensor([1.0, -1.0]).repeat(rows // 2)
    for r in range(rows):
        w = weight[2000 + r]
        weight[2000 + r] = w + (top[r] + gaps[r] - w @ states[r]) * states[r] / states[r].norm() ** 2
    expected = torch.nn.functional.linear(states, weight).argmax(dim=1)
    low = torch.nn.functional.linear(states.bfloat16(), weight.bfloat16())
    assert bool((low.argmax(dim=1) != expected).any())  # the bfloat16 product alone picks other tokens here
    # ... and for some rows the right token's bfloat16 logit is strictly below the row's largest: the bound finds it
    assert bool((low.gather(1, expected.unsqueeze(1)).squeeze(1) < low.max(dim=1).values).any())
    head = GreedyHead(weight)
    assert torch.equal(head(states), expected)
    assert head(states[:0]).shape == (0,)
    # The bound holds everywhere, and is not loose beyond Cauchy-Schwarz (the error reaches 0.23 of it here).
    error = (low.float() - torch.nn.functional.linear(states, weight)).abs()
    bound = head.bound(states.norm(dim=1, keepdim=True), low)
    assert bool((error <= bound).all()) and float((error / bound).max()) > 0.2


def test_greedy_head_falls_back_to_the_float32_head(monkeypatch):
    import grace_st.engine.cpu as cpu

    generator = torch.Generator().manual_seed(1)
    states, weight = torch.randn(6, 32, generator=generator), torch.randn(500, 32, generator=generator)
    expected = torch.nn.functional.linear(states, weight).argmax(dim=1)
    head = cpu.GreedyHead(weight)
    assert torch.equal(head(states), expected)
    states[2, 5] = float("nan")  # no candidate compares true: the whole head, as the float32 logits would
    assert torch.equal(head(states), torch.nn.functional.linear(states, weight).argmax(dim=1))
    states[2, 5], states[4, 0] = 0.0, float("inf")
    assert torch.equal(head(states), torch.nn.functional.linear(states, weight).argmax(dim=1))
    monkeypatch.setattr(cpu, "SCREEN_LIMIT", 0)  # a loose bound: the whole head
    assert torch.equal(head(states[:2]), expected[:2])


def test_engine_decode_steps_compute_no_logits_with_the_greedy_head(tiny_backbone_dir, monkeypatch):
    import grace_st.engine.cpu as cpu

    monkeypatch.setattr(cpu, "bf16_products_reason", lambda device: None)  # on any CPU (only the speed differs)
    model = tiny_grace_model(tiny_backbone_dir, max_new_tokens=6)
    module = model[0]
    positions = []
    head = module.model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda m, args: positions.append(args[0].shape[1]))
    try:
        reference, engine = both_paths(module, module.preprocess(TEXTS))
    finally:
        handle.remove()
    assert torch.equal(reference.ids, engine.ids)
    engine_positions = positions[-(1 + module.decode_counts["refills"] + module.decode_counts["decode_steps"]) :]
    assert engine_positions[0] == 0 and set(engine_positions[1:]) == {0, 1}  # prefix, prefills, then decode steps
    assert engine_positions.count(0) == 1 + module.decode_counts["decode_steps"]


def test_a_model_that_takes_no_index_of_positions_decodes_with_its_logits(tiny_backbone_dir, monkeypatch):
    import grace_st.engine.cpu as cpu

    monkeypatch.setattr(cpu, "bf16_products_reason", lambda device: None)
    model = tiny_grace_model(tiny_backbone_dir, max_new_tokens=6)
    module = model[0]
    lm, calls = module.model, []
    forward = lm.forward

    def int_only(*args, **kwargs):  # e.g. remote code that slices `[:, -logits_to_keep:]`
        calls.append(kwargs.get("logits_to_keep"))
        if isinstance(kwargs.get("logits_to_keep"), torch.Tensor):
            raise TypeError("logits_to_keep must be an int")
        return forward(*args, **kwargs)

    lm.forward = int_only
    try:
        reference, engine = both_paths(module, module.preprocess(TEXTS))
    finally:
        del lm.forward
    assert torch.equal(reference.ids, engine.ids)
    assert module.decode_counts["decode_steps"] > 0  # the engine wrote them (not the reference path after an error)
    assert any(isinstance(value, torch.Tensor) for value in calls)  # the index was tried, then not used again
    assert sum(isinstance(value, torch.Tensor) for value in calls) == 1


def test_a_model_whose_logits_are_not_its_heads_product_decodes_with_its_logits(tiny_backbone_dir, monkeypatch):
    import grace_st.engine.cpu as cpu

    monkeypatch.setattr(cpu, "bf16_products_reason", lambda device: None)  # on any CPU (only the speed differs)
    model = tiny_grace_model(tiny_backbone_dir, max_new_tokens=6)
    module = model[0]
    head = module.model.get_output_embeddings()
    shift = torch.zeros(head.weight.shape[0])
    shift[torch.randperm(len(shift), generator=torch.Generator().manual_seed(1))[:20]] = 4.0
    features = module.preprocess(TEXTS)
    module.decode_path = "generate"
    plain = module.generate_rationales(features).ids
    head.forward = lambda x: torch.nn.functional.linear(x, head.weight) + shift  # e.g. a logit bias
    try:
        reference, engine = both_paths(module, features)
    finally:
        del head.forward
    assert not torch.equal(plain, reference.ids)  # the shift changes the rationales
    assert torch.equal(reference.ids, engine.ids)
