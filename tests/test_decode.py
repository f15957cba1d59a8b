"""Tests of the decode engine (grace_st/_decode.py) against the reference path (``model.generate`` + one step)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import grace_st
from grace_st._decode import RowTemperature, decode, unsupported_reason

TEXTS = [
    "A man is playing a guitar.",
    "The stock market fell sharply on Monday after the report.",
    "Cats sleep.",
    "",
    "one more text of a clearly different length to force padding between the prefix and the text",
    "Rain again.",
    "The committee approved the budget for next year without changes.",
    "Birds fly south in winter.",
]


def _model(tiny_backbone_dir, attention="sdpa", **options):
    """The tiny LM with larger, seeded random weights: varied rationales with clear greedy margins (the fixture's
    small initialisation writes the same token everywhere, on near-ties)."""
    options.setdefault("max_new_tokens", 10)
    model = grace_st.from_backbone(
        tiny_backbone_dir, device="cpu", model_kwargs={"attn_implementation": attention}, **options
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model[0].model.named_parameters():
            if "norm" not in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def _both_paths(module, features, **kwargs):
    """(reference, engine) rationale batches of the same features, with the engine's counts."""
    module.decode_path = "generate"
    reference = module.generate_rationales(features, with_states=True, **kwargs)
    module.decode_path = "engine"
    module.decode_counts = {}
    engine = module.generate_rationales(features, with_states=True, **kwargs)
    return reference, engine


def _split_rows(module, features, max_new_tokens):
    """Make tokens of the greedy rationales of 3/4 of the rows end-of-sequence ids (of the LM's generation config, so
    that generation and the rationale masks agree): rows finish at different steps, and the engine drops rows."""
    module.decode_path = "generate"
    ids = module.generate_rationales(features, max_new_tokens=max_new_tokens).ids
    assert ids.shape[1] == max_new_tokens, "fixture: a rationale ended on the tokenizer's own EOS"
    n = len(ids)
    module.model.generation_config.eos_token_id = sorted({int(ids[r, 1 + r // 2]) for r in range(n * 3 // 4)})


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_engine_equals_the_reference_path_greedy(tiny_backbone_dir, attention):
    model = _model(tiny_backbone_dir, attention)
    module = model[0]
    features = module.preprocess(TEXTS)
    _split_rows(module, features, 10)
    reference, engine = _both_paths(module, features)
    assert torch.equal(engine.ids, reference.ids)
    assert torch.equal(engine.mask, reference.mask)
    assert torch.equal(engine.finished, reference.finished)
    assert 0 < int(engine.finished.sum()) < len(TEXTS)
    # Rows left the batch: fewer decode row-steps than rows x steps, and the prefix ran once.
    width = reference.ids.shape[1]
    assert int(reference.mask.sum()) <= module.decode_counts["decode_row_steps"] < len(TEXTS) * width
    prefix_len = len(module.template_pieces()[0])
    own_width = features["input_ids"].shape[1] - int(features["text_start"].min())
    assert module.decode_counts["prompt_tokens"] == prefix_len + len(TEXTS) * own_width
    # Every readout of forward: the same states where the masks look, the same masks.
    ref_out = module.outputs_from_states(features, reference)
    new_out = module.outputs_from_states(features, engine)
    for key in ("attention_mask", "pooling_mask"):
        assert torch.equal(new_out[key], ref_out[key])
    assert new_out["token_embeddings"].shape == ref_out["token_embeddings"].shape
    seen = new_out["attention_mask"].bool()
    delta = (new_out["token_embeddings"] - ref_out["token_embeddings"])[seen].abs().max()
    assert float(delta) < 1e-5
    assert float(new_out["token_embeddings"][~seen].abs().max()) == 0.0  # positions outside the mask hold zeros


def test_encode_with_the_engine_equals_encode_with_the_reference(tiny_backbone_dir):
    model = _model(tiny_backbone_dir)
    model[0].decode_path = "generate"
    reference = model.encode(TEXTS, batch_size=3, output_value=None)
    model[0].decode_path = "engine"
    model[0].decode_counts = {}
    engine = model.encode(TEXTS, batch_size=3, output_value=None)
    assert model[0].decode_counts["decode_row_steps"] > 0, "the engine was not used"
    for a, b in zip(reference, engine, strict=True):
        assert model[0].decode_rationale(a) == model[0].decode_rationale(b)
        assert float((a["sentence_embedding"] - b["sentence_embedding"]).abs().max()) < 1e-5
        assert torch.equal(a["rationale_ids"], b["rationale_ids"]) and torch.equal(
            a["pooling_mask"], b["pooling_mask"]
        )


def test_engine_runs_no_forward_over_the_whole_sequence(tiny_backbone_dir):
    model = _model(tiny_backbone_dir, max_new_tokens=6)
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
    # The prefix for one row, then each row's own tokens, then one token per step.
    assert lengths[0] == (1, prefix_len)
    assert lengths[1] == (len(TEXTS), features["input_ids"].shape[1] - int(features["text_start"].min()))
    assert all(shape[1] == 1 for shape in lengths[2:])


def test_sampling_with_a_seed_returns_valid_rows(tiny_backbone_dir):
    module = _model(tiny_backbone_dir)[0]
    features = module.preprocess(TEXTS)
    _split_rows(module, features, 10)
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
    module = _model(tiny_backbone_dir, max_new_tokens=10)[0]
    features = module.preprocess([TEXTS[0], TEXTS[7], TEXTS[1], TEXTS[6]])
    module.decode_path = "generate"
    greedy_free = module.generate_rationales(features).ids
    eos = sorted({greedy_free[0, 1].item(), greedy_free[2, 1].item()})  # rows 0 and 2 stop after two tokens
    assert not set(eos) & set(greedy_free[3].tolist()), "fixture: row 3 must not contain these tokens"
    module.model.generation_config.eos_token_id = eos
    greedy = module.generate_rationales(features)
    for path in ("engine", "generate"):
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
    module = _model(tiny_backbone_dir)[0]
    module.model = peft.get_peft_model(module.model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in module.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # a trained adapter: changes the output
    features = module.preprocess(TEXTS)
    _split_rows(module, features, 10)
    reference, engine = _both_paths(module, features)
    assert module.decode_counts["decode_row_steps"] > 0, "the engine was not used"
    assert torch.equal(engine.ids, reference.ids)
    seen = module.outputs_from_states(features, reference)["attention_mask"].bool()
    assert float((engine.states - reference.states)[seen].abs().max()) < 1e-5


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [({"repetition_penalty": 1.3}, "repetition_penalty"), ({"num_beams": 2}, "num_beams")],
)
def test_unsupported_settings_use_the_reference_path(tiny_backbone_dir, kwargs, reason):
    module = _model(tiny_backbone_dir)[0]
    features = module.preprocess(TEXTS[:3])
    assert reason in unsupported_reason(module.model, {**module.generation_kwargs(), **kwargs})
    if "num_beams" in kwargs:
        return
    reference, engine = _both_paths(module, features, **kwargs)
    assert module.decode_counts == {}, "the engine must not run"
    assert torch.equal(engine.ids, reference.ids) and torch.equal(engine.states, reference.states)


def test_unsupported_models_are_named(tiny_backbone_dir):
    module = _model(tiny_backbone_dir)[0]
    kwargs = module.generation_kwargs()
    assert unsupported_reason(module.model, kwargs) is None
    module.model.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in unsupported_reason(module.model, kwargs)
    module.model.config._attn_implementation = "sdpa"
    module.model.generation_config.no_repeat_ngram_size = 3
    assert "no_repeat_ngram_size" in unsupported_reason(module.model, kwargs)


def test_a_decoder_norm_off_the_forward_path_falls_back(tiny_backbone_dir):
    module = _model(tiny_backbone_dir)[0]
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
    module = _model(tiny_backbone_dir)[0]
    features = module.preprocess(TEXTS[:2])
    ids = features["input_ids"].clone()
    ids[1, int(features["text_start"][1]) - 2] += 1
    prefix_len = len(module.template_pieces()[0])
    with pytest.raises(ValueError, match="prefix"):
        decode(module.model, ids, features["attention_mask"], features["text_start"], prefix_len, 4, [2], 2)


def test_decode_path_is_validated(tiny_backbone_dir):
    module = _model(tiny_backbone_dir)[0]
    with pytest.raises(ValueError, match="decode_path='fast'.*engine"):
        module.decode_path = "fast"
    with pytest.raises(ValueError, match="temperatures"):
        RowTemperature(torch.tensor([1.0, -1.0]))


@pytest.mark.slow
def test_engine_equals_the_reference_on_the_real_backbone(default_backbone_dir, shared_data):
    import csv

    texts: dict[str, None] = {}
    with open(shared_data / "sts2013" / "headlines.test.tsv", encoding="utf-8") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            texts.update(dict.fromkeys(row[1:3]))
    texts = list(texts)[:8]
    model = grace_st.from_backbone(default_backbone_dir, max_new_tokens=32, device="cpu")
    model[0].decode_path = "generate"
    reference = model.encode(texts, batch_size=8, output_value=None)
    model[0].decode_path = "engine"
    engine = model.encode(texts, batch_size=8, output_value=None)
    assert [model[0].decode_rationale(a) for a in reference] == [model[0].decode_rationale(b) for b in engine]
    delta = max(
        float((a["sentence_embedding"] - b["sentence_embedding"]).abs().max())
        for a, b in zip(reference, engine, strict=True)
    )
    assert delta < 1e-5


# ---------------------------------------------------------------- benchmarks/gpu_check.py
GPU_CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_exits_cleanly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    done = subprocess.run([sys.executable, str(GPU_CHECK)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout


def test_gpu_check_runs_on_a_tiny_cpu_config(default_backbone_dir, tmp_path):
    command = [sys.executable, str(GPU_CHECK), "--device", "cpu", "--tiny", "--texts", "40"]
    command += ["--batch-sizes", "8,32", "--new-tokens", "4", "--repeats", "1", "--tokenizer", default_backbone_dir]
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["ok"] and summary["agreement"]["rationale_tokens_engine"] == [4]
    assert set(summary["throughput"]) == {"8", "32"}
    assert summary["throughput"]["32"]["engine"]["texts_per_s"] > 0
