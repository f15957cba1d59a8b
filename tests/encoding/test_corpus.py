"""Tests of corpus encoding (grace_st/encoding/): de-duplication, rationales per text, the on-disk cache."""

from __future__ import annotations

import json
import logging
import os
import stat

import numpy as np
import pytest
import torch
from helpers import VARIED_CORPUS, varied_model
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import StaticEmbedding

import grace_st
import grace_st.encoding.corpus
import grace_st.engine
from grace_st.encoding import (
    CacheEntry,
    EmbeddingCache,
    cache_keys,
    continuous_reason,
    encode_corpus,
    weights_fingerprint,
)

TEXTS = ["A man is playing a guitar.", "The stock market fell sharply.", "Cats sleep most of the day."]


@pytest.fixture
def model(tiny_backbone_dir):
    return grace_st.from_backbone(tiny_backbone_dir, max_new_tokens=6, device="cpu")


def count_generated_rows(model, monkeypatch) -> list[int]:
    """Rows generated from now on, whichever path writes them (model.encode or continuous batching)."""
    rows: list[int] = []
    original = model[0].generate_rationales
    stream = grace_st.engine.decode_stream

    def counting_generate(features, *args, **kwargs):
        rows.append(features["input_ids"].shape[0])
        return original(features, *args, **kwargs)

    def counting_stream(model, prefix_ids, own_ids, *args, **kwargs):
        rows.append(len(own_ids))
        return stream(model, prefix_ids, own_ids, *args, **kwargs)

    model[0].generate_rationales = counting_generate
    monkeypatch.setattr(grace_st.engine, "decode_stream", counting_stream)
    return rows


def entries(folder) -> list:
    return sorted(folder.rglob("*.npz"))


# ---------------------------------------------------------------- encode_corpus
def test_encode_corpus_matches_encode_with_rationales_in_the_callers_order(model, monkeypatch):
    texts = ["beta", "alpha", "gamma", "alpha", "beta"]
    rows = count_generated_rows(model, monkeypatch)
    corpus = encode_corpus(model, texts, batch_size=2)
    assert sum(rows) == 3, "each distinct text is generated once"
    unique = ["beta", "alpha", "gamma"]
    items = model.encode(unique, output_value=None)
    expected = {t: item for t, item in zip(unique, items, strict=True)}
    assert corpus.embeddings.dtype == np.float32 and corpus.embeddings.shape == (5, model.get_embedding_dimension())
    for i, text in enumerate(texts):
        item = expected[text]
        np.testing.assert_allclose(corpus.embeddings[i], item["sentence_embedding"].numpy(), atol=1e-6)
        assert corpus.rationales[i] == model[0].decode_rationale(item)
        ids = item["rationale_ids"][item["rationale_mask"].bool()].tolist()
        assert corpus.finished[i] == bool(item["rationale_finished"])
        assert corpus.rationale_ids[i] == (ids[:-1] if corpus.finished[i] else ids)
    assert len(set(corpus.rationales)) == 3
    assert corpus.rationale_ids[1] is not corpus.rationale_ids[3], "repeated texts get their own lists"


def test_finished_rationales_exclude_the_closing_eos(model):
    module = model[0]
    first = module.generate_rationales(module.preprocess(TEXTS[:1])).ids[0].tolist()
    module.model.generation_config.eos_token_id = [module.tokenizer.eos_token_id, first[2]]
    corpus = encode_corpus(model, TEXTS[:1])
    assert corpus.finished == [True] and corpus.rationale_ids == [first[:2]]
    assert corpus.rationales == [module.tokenizer.decode(first[:2], skip_special_tokens=True)]


def test_encode_corpus_prompts_and_normalisation(tiny_backbone_dir):
    model = grace_st.from_backbone(
        tiny_backbone_dir, rationale_mode="echo", prompts={"query": "Query: "}, default_prompt_name="query"
    )
    default = encode_corpus(model, TEXTS)
    np.testing.assert_allclose(default.embeddings, model.encode(TEXTS), atol=1e-6)
    assert default.rationales == ["Query: " + t for t in TEXTS]
    explicit = encode_corpus(model, TEXTS, prompt="")
    np.testing.assert_allclose(explicit.embeddings, model.encode(TEXTS, prompt=""), atol=1e-6)
    with pytest.raises(ValueError, match=r"prompt_name='passage' is not a prompt of this model.*'query'"):
        encode_corpus(model, TEXTS, prompt_name="passage")
    model.truncate_dim = 8  # truncated rows are no longer unit length unless normalised
    raw = encode_corpus(model, TEXTS, normalize_embeddings=False).embeddings
    assert raw.shape == (3, 8) and not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    assert np.allclose(np.linalg.norm(encode_corpus(model, TEXTS).embeddings, axis=1), 1.0, atol=1e-6)


def test_encode_corpus_empty_and_bad_input(model):
    empty = encode_corpus(model, [])
    assert empty.embeddings.shape == (0, model.get_embedding_dimension()) and empty.rationales == []
    with pytest.raises(TypeError, match=r"texts\[2\] is None \(NoneType\)"):
        encode_corpus(model, ["a", "b", None])
    with pytest.raises(ValueError, match=r"texts\[1\] = 'x\\ud800' has a lone surrogate"):
        encode_corpus(model, ["a", "x\ud800"])
    with pytest.raises(TypeError, match="texts must be a string or a list of strings, got bytes"):
        encode_corpus(model, b"abc")
    with pytest.raises(TypeError, match="got dict"):
        encode_corpus(model, {"a": 1})
    assert encode_corpus(model, "one text").embeddings.shape == (1, model.get_embedding_dimension())


def test_encode_corpus_with_a_model_that_is_not_grace(model, tmp_path):
    static = StaticEmbedding(model[0].tokenizer.backend_tokenizer, embedding_dim=8)
    plain = SentenceTransformer(modules=[static], device="cpu")
    corpus = encode_corpus(plain, ["a cat", "a dog", "a cat"])
    expected = plain.encode(["a cat", "a dog", "a cat"], normalize_embeddings=True)
    np.testing.assert_allclose(corpus.embeddings, expected, atol=1e-6)
    assert corpus.rationales == ["", "", ""] and corpus.finished == [False] * 3
    with pytest.raises(ValueError, match="cache_dir needs a GRACE model"):
        encode_corpus(plain, ["a"], cache_dir=tmp_path)


# ---------------------------------------------------------------- the cache
def test_cache_reuses_entries_and_repairs_corrupt_ones(model, tmp_path, monkeypatch):
    expected = encode_corpus(model, TEXTS)
    rows = count_generated_rows(model, monkeypatch)
    first = encode_corpus(model, TEXTS, cache_dir=tmp_path)
    assert sum(rows) == 3 and len(entries(tmp_path)) == 3
    second = encode_corpus(model, TEXTS, cache_dir=tmp_path)
    assert sum(rows) == 3, "cached texts must not be generated again"
    for got in (first, second):
        np.testing.assert_allclose(got.embeddings, expected.embeddings, atol=1e-6)
        assert got.rationales == expected.rationales and got.rationale_ids == expected.rationale_ids
        assert got.finished == expected.finished
    entry = entries(tmp_path)[0]
    entry.write_bytes(entry.read_bytes()[:-5] + b"xxxxx")
    third = encode_corpus(model, TEXTS, cache_dir=tmp_path)
    assert sum(rows) == 4
    np.testing.assert_allclose(third.embeddings, expected.embeddings, atol=1e-6)
    encode_corpus(model, TEXTS, cache_dir=tmp_path)
    assert sum(rows) == 4, "the repaired entry is used again"


def _change_max_new_tokens(model):
    model[0].max_new_tokens = 4


def _change_system_prompt(model):
    model[0].system_prompt = "Summarise the text."


def _change_rationale_mode(model):
    model[0].rationale_mode = "echo"


def _change_max_seq_length(model):
    model.max_seq_length = 3


def _change_pooling_mode(model):
    model[1].pooling_mode = "lasttoken"


def _change_chat_template(model):
    model[0].tokenizer.chat_template = "Note:\n" + model[0].tokenizer.chat_template


def _change_eos_ids(model):
    module = model[0]
    first = module.generate_rationales(module.preprocess(TEXTS[:1])).ids[0].tolist()
    module.model.generation_config.eos_token_id = [module.tokenizer.eos_token_id, first[1]]


def _change_tokenizer(model):
    from tokenizers import normalizers

    model[0].tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()  # "A man" now tokenizes as "a man"


def _change_weights_in_place(model):
    with torch.no_grad():
        model[0].model.get_input_embeddings().weight.mul_(1.5)


def _swap_the_lm(model):
    lm = model[0].model
    other = type(lm)(lm.config).eval()
    with torch.no_grad():
        for target, source in zip(other.parameters(), lm.parameters(), strict=True):
            target.copy_(source * 0.9)
    other.generation_config = lm.generation_config
    model[0].model = other


def _change_truncate_dim(model):
    model.truncate_dim = 16


@pytest.mark.parametrize(
    "change",
    [
        _change_max_new_tokens,
        _change_system_prompt,
        _change_rationale_mode,
        _change_max_seq_length,
        _change_pooling_mode,
        _change_chat_template,
        _change_eos_ids,
        _change_tokenizer,
        _change_weights_in_place,
        _swap_the_lm,
        _change_truncate_dim,
    ],
)
def test_cache_key_covers_what_changes_an_embedding(model, tmp_path, change):
    texts = TEXTS[:2]  # long enough to be cut by a small max_seq_length
    before = encode_corpus(model, texts, cache_dir=tmp_path)
    change(model)
    fresh = encode_corpus(model, texts)
    assert not np.allclose(fresh.embeddings, before.embeddings[:, : fresh.embeddings.shape[1]], atol=1e-6), (
        "the change must change the embedding, or this test proves nothing"
    )
    cached = encode_corpus(model, texts, cache_dir=tmp_path)
    np.testing.assert_allclose(cached.embeddings, fresh.embeddings, atol=1e-6)
    assert cached.rationales == fresh.rationales
    assert len(entries(tmp_path)) == 4


def test_lm_config_is_part_of_the_key(tiny_backbone_copy, tmp_path):
    """Same weights, another config.json (e.g. a fixed rope or norm setting): other embeddings, other keys."""
    model = grace_st.from_backbone(tiny_backbone_copy, max_new_tokens=6)
    before = encode_corpus(model, TEXTS, cache_dir=tmp_path / "cache")
    config = json.loads((tmp_path / "backbone" / "config.json").read_text())
    (tmp_path / "backbone" / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 0.5}))
    other = grace_st.from_backbone(tiny_backbone_copy, max_new_tokens=6)
    fresh = encode_corpus(other, TEXTS)
    assert not np.allclose(fresh.embeddings, before.embeddings, atol=1e-6)
    np.testing.assert_allclose(encode_corpus(other, TEXTS, cache_dir=tmp_path / "cache").embeddings, fresh.embeddings)


def test_prompt_and_backend_are_part_of_the_key(model, tmp_path):
    plain = cache_keys(model, TEXTS, None)
    assert cache_keys(model, TEXTS, "Query: ") != plain
    assert cache_keys(model, TEXTS, None) == plain, "the key is stable"

    class Backend:
        def generate(self, module, features, **generate_kwargs):
            raise AssertionError("not called: only the key is computed")

        def __repr__(self) -> str:
            return "Backend(engine='other')"

    model[0].generation_backend = Backend()
    assert not set(cache_keys(model, TEXTS, None)) & set(plain)


def test_weights_fingerprint_follows_in_place_changes_and_new_tensors(model):
    lm = model[0].model
    first = weights_fingerprint(model)
    assert weights_fingerprint(model) == first
    weight = lm.get_input_embeddings().weight
    version = weight._version
    with torch.inference_mode():
        weight.add_(0.0)  # same values, new version: rehashed, same fingerprint
    assert weight._version > version, "torch bumps the version counter on in-place changes (the probe needs it)"
    assert weights_fingerprint(model) == first
    with torch.no_grad():
        weight[0, 0] += 1.0
    changed = weights_fingerprint(model)
    assert changed != first
    lm.load_state_dict({k: v.clone() for k, v in lm.state_dict().items()})
    assert weights_fingerprint(model) == changed


def test_zero_dim_tensors_do_not_crash_the_fingerprint(model, tmp_path):
    model[0].model.register_buffer("scale", torch.tensor(0.5))
    first = weights_fingerprint(model)
    model[0].model.scale.fill_(0.25)
    assert weights_fingerprint(model) != first
    assert encode_corpus(model, TEXTS, cache_dir=tmp_path).embeddings.shape[0] == 3


def test_unwritable_cache_warns_and_returns_the_embeddings(model, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    expected = encode_corpus(model, TEXTS)
    with caplog.at_level(logging.WARNING, logger="grace_st.encoding"):
        got = encode_corpus(model, TEXTS, cache_dir=blocker / "cache")
    np.testing.assert_allclose(got.embeddings, expected.embeddings, atol=1e-6)
    assert got.rationales == expected.rationales
    warnings = [r for r in caplog.records if "Cannot write the embedding cache" in r.getMessage()]
    assert len(warnings) == 1


def test_entries_get_the_umasks_permissions(model, tmp_path):
    old = os.umask(0o022)
    try:
        encode_corpus(model, TEXTS[:1], cache_dir=tmp_path)
    finally:
        os.umask(old)
    (entry,) = entries(tmp_path)
    assert stat.S_IMODE(entry.stat().st_mode) == 0o644
    assert stat.S_IMODE(entry.parent.stat().st_mode) == 0o755


@pytest.mark.parametrize(
    "bad",
    [
        CacheEntry(np.zeros(16, dtype=np.float32), np.zeros(2, dtype=np.int64), False),  # wrong dimension
        CacheEntry(np.zeros(32, dtype=np.float64), np.zeros(2, dtype=np.int64), False),  # wrong dtype
        CacheEntry(np.zeros((2, 32), dtype=np.float32), np.zeros(2, dtype=np.int64), False),  # not a row
        CacheEntry(np.zeros(32, dtype=np.float32), np.zeros((1, 2), dtype=np.int64), False),  # ids not a row
    ],
)
def test_an_entry_of_the_wrong_shape_or_dtype_is_recomputed(model, tmp_path, bad):
    expected = encode_corpus(model, TEXTS)
    cache = EmbeddingCache(tmp_path)
    for key in cache_keys(model, TEXTS, None):
        assert cache.put(key, bad)
    got = encode_corpus(model, TEXTS, cache_dir=tmp_path)
    np.testing.assert_allclose(got.embeddings, expected.embeddings, atol=1e-6)
    again = EmbeddingCache(tmp_path).get(cache_keys(model, TEXTS, None)[0], model.get_embedding_dimension())
    assert again is not None and again.embedding.shape == (32,), "the bad entry was rewritten"


def test_a_failed_write_leaves_no_temporary_file(model, tmp_path, monkeypatch, caplog):
    def failing_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    expected = encode_corpus(model, TEXTS)
    with caplog.at_level(logging.WARNING, logger="grace_st.encoding"):
        got = encode_corpus(model, TEXTS, cache_dir=tmp_path)
    np.testing.assert_allclose(got.embeddings, expected.embeddings, atol=1e-6)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []
    assert any("disk full" in r.getMessage() for r in caplog.records)


def test_continuous_batching_falls_back_where_it_does_not_apply(tiny_backbone_dir, monkeypatch):
    model = varied_model(tiny_backbone_dir)
    expected = encode_corpus(model, VARIED_CORPUS[:5], schedule="batches")
    for change, reason in [
        (lambda m: setattr(m[0], "decode_path", "generate"), "decode_path"),
        (lambda m: setattr(m[0], "do_sample", True), "sampling"),
        (lambda m: setattr(m[0], "repetition_penalty", 1.2), "repetition_penalty"),
        (lambda m: setattr(m[0], "single_pass", False), "single_pass"),
        (lambda m: m.append(torch.nn.Identity()), "Identity"),
    ]:
        model = varied_model(tiny_backbone_dir)
        change(model)
        assert reason in continuous_reason(model)
        if reason in ("decode_path", "single_pass"):  # same embeddings by model.encode; the stream is not called
            rows = count_generated_rows(model, monkeypatch)
            got = encode_corpus(model, VARIED_CORPUS[:5])
            assert rows == [5] and got.rationale_ids == expected.rationale_ids
    with pytest.raises(ValueError, match="schedule='fast'.*continuous"):
        encode_corpus(model, VARIED_CORPUS[:2], schedule="fast")
    with pytest.raises(ValueError, match="batch_size=0"):
        encode_corpus(model, VARIED_CORPUS[:2], batch_size=0)


def test_cache_file_format_is_checked(tmp_path):
    cache = EmbeddingCache(tmp_path)
    entry = CacheEntry(np.arange(4, dtype=np.float32), np.array([5, 2], dtype=np.int64), True)
    assert cache.put("ab" + "0" * 38, entry)
    got = cache.get("ab" + "0" * 38, 4)
    assert got.finished is True and got.ids.tolist() == [5, 2] and got.embedding.tolist() == [0, 1, 2, 3]
    assert cache.get("ab" + "0" * 38, 5) is None
    assert cache.get("cd" + "0" * 38, 4) is None
    json.dumps(got.finished)  # a plain bool


def test_encode_corpus_returns_the_k_rationales_of_each_text(tiny_backbone_dir):
    model = grace_st.from_backbone(tiny_backbone_dir, max_new_tokens=4, do_sample=True, num_rationales=2, device="cpu")
    texts = ["A man is playing a guitar.", "Cats sleep.", "A man is playing a guitar."]
    corpus = grace_st.encode_corpus(model, texts, batch_size=2)
    assert all(len(r) == 2 and len(i) == 2 and len(f) == 2 for r, i, f in zip(
        corpus.rationales, corpus.rationale_ids, corpus.finished, strict=True))  # fmt: skip
    items = model.encode(texts[:2], output_value=None)
    for item, ids in zip(items, corpus.rationale_ids[:2], strict=True):
        expected = [r[m.bool()].tolist() for r, m in zip(item["rationale_ids"], item["rationale_mask"], strict=True)]
        finished = item["rationale_finished"].tolist()
        assert ids == [row[: len(row) - int(f)] for row, f in zip(expected, finished, strict=True)]
    assert np.allclose(corpus.embeddings[0], corpus.embeddings[2])
    with pytest.raises(ValueError, match="cache_dir is not supported with num_rationales=2"):
        grace_st.encode_corpus(model, texts, cache_dir="unused")


def test_a_summary_readout_model_encodes_through_the_module(tiny_backbone_dir):
    model = grace_st.from_backbone(
        tiny_backbone_dir, max_new_tokens=4, summary_suffix="\nIn one word:", pooling_mode="summary", device="cpu"
    )
    texts = ["A man is playing a guitar.", "Cats sleep."]
    corpus = encode_corpus(model, texts)
    assert np.allclose(corpus.embeddings, model.encode(texts), atol=1e-5)


def test_continuous_batching_serves_a_saved_model_loaded_through_its_own_code(tiny_backbone_dir, tmp_path):
    model = varied_model(tiny_backbone_dir, summary_suffix="\nIn one word:")
    model[1].pooling_mode = "mean+summary"
    model.save(str(tmp_path / "saved"))
    loaded = SentenceTransformer(str(tmp_path / "saved"), device="cpu", trust_remote_code=True)
    assert type(loaded[0]) is not grace_st.Transformer  # sentence-transformers loads the saved copy of the code
    assert continuous_reason(loaded) is None
    loaded[0].decode_counts = {}
    new = encode_corpus(loaded, VARIED_CORPUS, batch_size=4)
    assert loaded[0].decode_counts["refills"] >= 2, "the stream ran"
    reference = encode_corpus(model, VARIED_CORPUS, batch_size=4, schedule="batches")
    assert new.rationale_ids == reference.rationale_ids
    assert float(np.abs(new.embeddings - reference.embeddings).max()) < 1e-5
    # Code that expects another engine version (another grace_st) is not run by the stream: model.encode serves it.
    code = (tmp_path / "saved" / "generation.py").read_text(encoding="utf-8")
    assert "ENGINE_API_VERSION = 1\n" in code
    (tmp_path / "saved" / "generation.py").write_text(
        code.replace("ENGINE_API_VERSION = 1\n", "ENGINE_API_VERSION = 99\n")
    )
    (tmp_path / "saved").rename(tmp_path / "other")
    other = SentenceTransformer(str(tmp_path / "other"), device="cpu", trust_remote_code=True)
    assert "expects engine API 99" in continuous_reason(other)


def test_a_failure_while_pooling_puts_the_weights_back(tiny_backbone_dir, monkeypatch):
    from grace_st.engine.cpu import _LAYOUT_LOCK

    model = varied_model(tiny_backbone_dir)
    linears = [m for m in model[0].model.modules() if isinstance(m, torch.nn.Linear)]

    def fail(*args, **kwargs):
        raise RuntimeError("pooling failed")

    monkeypatch.setattr(grace_st.encoding.corpus, "_pool_rows", fail)
    with pytest.raises(RuntimeError, match="pooling failed") as caught:
        encode_corpus(model, VARIED_CORPUS, batch_size=4)
    assert caught.value is not None  # the traceback (and the stream's frame) is still alive here
    assert torch.is_grad_enabled(), "the caller's grad mode is as it was"
    assert all(m.weight.is_contiguous() and "forward" not in vars(m) for m in linears)
    assert _LAYOUT_LOCK.acquire(blocking=False)
    _LAYOUT_LOCK.release()


@pytest.mark.parametrize("decode_path", ["generate", "engine"])
def test_the_cache_sees_weights_edited_through_data(tiny_backbone_dir, tmp_path, decode_path):
    """EMA, peft's merge_adapter and hand edits change ``.data`` in place: no version bump, the same storage."""
    model = varied_model(tiny_backbone_dir)
    model[0].decode_path = decode_path  # the reference path keeps the weights' storage where they are
    first = encode_corpus(model, TEXTS, cache_dir=tmp_path)
    weight = model[0].model.model.layers[0].mlp.down_proj.weight
    pointer, version = weight.data_ptr(), weight._version
    weight.data.mul_(3.0)
    assert weight._version == version and (decode_path == "engine" or weight.data_ptr() == pointer)
    again = encode_corpus(model, TEXTS, cache_dir=tmp_path)
    true = encode_corpus(model, TEXTS)
    np.testing.assert_allclose(again.embeddings, true.embeddings, atol=1e-6)
    assert np.abs(again.embeddings - first.embeddings).max() > 1e-2


def test_an_entry_copied_over_another_key_is_recomputed_with_a_warning(model, tmp_path, caplog):
    expected = encode_corpus(model, TEXTS)
    encode_corpus(model, TEXTS, cache_dir=tmp_path)
    keys = cache_keys(model, TEXTS, None)
    cache = EmbeddingCache(tmp_path)
    cache.path(keys[0]).write_bytes(cache.path(keys[1]).read_bytes())  # text 1's entry under text 0's key
    with caplog.at_level(logging.WARNING, logger="grace_st.encoding.cache"):
        got = encode_corpus(model, TEXTS, cache_dir=tmp_path)
    assert "holds the entry of key" in caplog.text and keys[1][:8] in caplog.text
    np.testing.assert_allclose(got.embeddings, expected.embeddings, atol=1e-6)
    assert got.rationales == expected.rationales
    assert cache.get(keys[0]) is not None, "the entry is rewritten under its own key"
