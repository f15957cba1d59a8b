"""The equivalence tests of the generation paths, in one place: the engine against the reference path
(``model.generate`` + one cached step), continuous batching against one batch, the single-pass states against the
two-pass reference (a second forward over prompt + rationale), and the summary suffix's states against a two-pass
forward; on the tiny model and, marked slow, on the real backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import (
    TEXTS,
    VARIED_CORPUS,
    both_paths,
    engine_output,
    split_rows,
    suffix_token_ids,
    tiny_grace_model,
    two_pass_suffix_states,
    varied_model,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import grace_st
from grace_st import SUMMARY_SUFFIX
from grace_st.encoding import continuous_reason, encode_corpus
from grace_st.engine import decode_stream
from grace_st.engine.decode import decode


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("head", ["bfloat16 head", "float32 logits"])
def test_engine_equals_the_reference_path_greedy(tiny_backbone_dir, attention, head, monkeypatch):
    import grace_st.engine.cpu as cpu

    if head == "bfloat16 head":  # on any CPU (the maths does not depend on its instructions, only the speed does)
        monkeypatch.setattr(cpu, "bf16_products_reason", lambda device: None)
    else:
        monkeypatch.setattr(cpu, "SCREENED_HEAD", False)
    model = tiny_grace_model(tiny_backbone_dir, attention)
    module = model[0]
    features = module.preprocess(TEXTS)
    split_rows(module, features, 10)
    reference, engine = both_paths(module, features)
    assert torch.equal(engine.ids, reference.ids)
    assert torch.equal(engine.mask, reference.mask)
    assert torch.equal(engine.finished, reference.finished)
    assert 0 < int(engine.finished.sum()) < len(TEXTS)
    # Rows left the batch: fewer decode row-steps than rows x steps, and the prefix ran once.
    width = reference.ids.shape[1]
    assert int(reference.mask.sum()) <= module.decode_counts["decode_row_steps"] < len(TEXTS) * width
    prefix_len = len(module.template_pieces()[0])
    own_width = features["input_ids"].shape[1] - int(features["text_start"].min())
    own = torch.arange(features["input_ids"].shape[1]) >= features["text_start"].unsqueeze(1)
    own_real = int((own & features["attention_mask"].bool()).sum())
    # The prefix once, then each row's own tokens (padded within groups of similar length on a CPU).
    assert prefix_len + own_real <= module.decode_counts["prompt_tokens"] <= prefix_len + len(TEXTS) * own_width
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
    model = tiny_grace_model(tiny_backbone_dir)
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


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("compact_at", [0.5, 1.0, 0.0])
def test_suffix_states_equal_the_two_pass_reference(tiny_backbone_dir, attention, compact_at):
    module = tiny_grace_model(tiny_backbone_dir, attention, max_new_tokens=10)[0]
    features = module.preprocess(TEXTS)
    split_rows(module, features, 10)  # rows end at different steps; a quarter is cut at max_new_tokens
    suffix_ids = suffix_token_ids(module, len(TEXTS))
    assert len({len(row) for row in suffix_ids}) >= 3
    kwargs = module.generation_kwargs()
    args = (module.model, features["input_ids"], features["attention_mask"], features["text_start"])
    args += (
        len(module.template_pieces()[0]),
        kwargs["max_new_tokens"],
        kwargs["eos_token_id"],
        kwargs["pad_token_id"],
    )
    counts, counts_plain = {}, {}
    with torch.no_grad():
        out = decode(*args, counts=counts, compact_at=compact_at, suffix_ids=suffix_ids)
        plain = decode(*args, counts=counts_plain, compact_at=compact_at)
    # The suffix is not part of the rationale and changes neither it nor its states.
    assert torch.equal(out.generated, plain.generated)
    assert float((out.states - plain.states).abs().max()) < 1e-5
    batch = module.rationale_batch(out.generated)
    assert 0 < int(batch.finished.sum()) < len(TEXTS)  # finished and cut rationales both get a suffix
    reference = two_pass_suffix_states(
        module.model, features["input_ids"], features["attention_mask"], batch.ids, batch.mask, suffix_ids
    )
    assert out.suffix_states.shape == (len(TEXTS), module.get_embedding_dimension())
    assert float((out.suffix_states - reference).abs().max()) < 1e-5
    # Different from the state of the last rationale token: the suffix was really fed.
    last = batch.mask.sum(1) - 1
    width = features["input_ids"].shape[1]
    rationale_end = out.states[torch.arange(len(TEXTS)), width + last]
    assert float((out.suffix_states - rationale_end).abs().amax(1).min()) > 1e-2
    # The rest of the suffixes ran in one tail forward once no row was writing.
    assert counts["suffix_tokens"] > 0 and "suffix_tokens" not in counts_plain
    assert counts["decode_row_steps"] >= counts_plain["decode_row_steps"]


@pytest.mark.parametrize("compact_at", [0.5, 1.0])
def test_text_suffix_states_equal_the_two_pass_reference(tiny_backbone_dir, compact_at):
    """text_suffix feeds each row's suffix after its prompt at prefill, over a copy of its cache: its state equals
    one forward over prompt + suffix, and the rationales, their states and the suffix states after them stay the same
    (3 slots for 8 rows: rows join and leave the batch in another order than they came)."""
    module = tiny_grace_model(tiny_backbone_dir, max_new_tokens=10)[0]
    features = module.preprocess(TEXTS)
    split_rows(module, features, 10)
    suffix_ids = suffix_token_ids(module, len(TEXTS))
    counts, counts_plain = {}, {}
    options = {"suffix_ids": suffix_ids, "slots": 3, "compact_at": compact_at}
    with torch.no_grad():
        out = engine_output(module, features, counts=counts, text_suffix=True, **options)
        plain = engine_output(module, features, counts=counts_plain, **options)
    assert torch.equal(out.generated, plain.generated) and plain.text_suffix_states is None
    assert float((out.states - plain.states).abs().max()) < 1e-5
    assert float((out.suffix_states - plain.suffix_states).abs().max()) < 1e-5
    none = torch.zeros(len(TEXTS), 0, dtype=torch.long)
    reference = two_pass_suffix_states(
        module.model, features["input_ids"], features["attention_mask"], none, none, suffix_ids
    )
    assert out.text_suffix_states.shape == out.suffix_states.shape
    assert float((out.text_suffix_states - reference).abs().max()) < 1e-5
    assert float((out.text_suffix_states - out.suffix_states).abs().amax(1).min()) > 1e-2  # no rationale before it
    assert counts["suffix_tokens"] - counts_plain["suffix_tokens"] >= sum(len(row) for row in suffix_ids)
    assert counts["prompt_tokens"] == counts_plain["prompt_tokens"]  # no second pass over the prompts
    with pytest.raises(ValueError, match="pass suffix_ids too"):
        engine_output(module, features, text_suffix=True)


def test_encode_with_text_summary_runs_no_second_pass_over_the_prompt(tiny_backbone_dir, monkeypatch):
    """The engine's text-suffix states serve model.encode and encode_corpus; they equal the reference path's (a
    second forward over prompt + suffix, Transformer.embed), which the engine paths no longer call."""
    model = varied_model(tiny_backbone_dir, summary_suffix="\nIn one word:", text_summary=True)
    model[1].pooling_mode = "mean+summary+text_summary"
    model[0].decode_path = "generate"
    reference = model.encode(VARIED_CORPUS, batch_size=4, output_value=None)
    model[0].decode_path = "engine"

    def second_pass(*args, **kwargs):
        raise AssertionError("a second forward pass over the prompt")

    monkeypatch.setattr(model[0], "embed", second_pass)
    engine = model.encode(VARIED_CORPUS, batch_size=4, output_value=None)
    corpus = encode_corpus(model, VARIED_CORPUS, batch_size=4, normalize_embeddings=False)
    for a, b, c in zip(reference, engine, corpus.embeddings, strict=True):
        assert model[0].decode_rationale(a) == model[0].decode_rationale(b)
        assert float((a["text_summary_embeddings"] - b["text_summary_embeddings"]).abs().max()) < 1e-5
        assert float((a["sentence_embedding"] - b["sentence_embedding"]).abs().max()) < 1e-5
        assert float(np.abs(a["sentence_embedding"].numpy() - c).max()) < 1e-5


def test_an_engine_without_text_suffix_still_writes_the_rationales(tiny_backbone_dir, monkeypatch, caplog):
    """A model's code beside an installed engine of the same API version from before text_suffix: the engine still
    writes the rationales (no warning) and the text-summary state comes from the second pass; a model without
    text_summary never passes the keyword, whatever the engine offers."""
    import grace_st.engine as engine

    real, calls = engine.generate, []

    def older(module, features, generate_kwargs, suffix_ids=None, seeds=None):
        calls.append(len(features["input_ids"]))
        return real(module, features, generate_kwargs, suffix_ids=suffix_ids, seeds=seeds)

    model = varied_model(tiny_backbone_dir, summary_suffix="\nIn one word:", text_summary=True)
    model[1].pooling_mode = "mean+summary+text_summary"
    expected = model.encode(VARIED_CORPUS, batch_size=4, convert_to_tensor=True)
    monkeypatch.setattr(engine, "generate", older)
    monkeypatch.delattr(engine, "TEXT_SUFFIX")
    plain = varied_model(tiny_backbone_dir, summary_suffix="\nIn one word:")
    plain[1].pooling_mode = "mean+summary"
    with caplog.at_level("WARNING"):
        got = model.encode(VARIED_CORPUS, batch_size=4, convert_to_tensor=True)
        assert sum(calls) == len(VARIED_CORPUS), "the engine wrote every rationale"
        assert float((got - expected).abs().max()) < 1e-5
        monkeypatch.setattr(engine, "TEXT_SUFFIX", True, raising=False)  # offered, but this model does not ask
        plain.encode(VARIED_CORPUS, batch_size=4)
    assert sum(calls) == 2 * len(VARIED_CORPUS)
    assert "reference path" not in caplog.text


def test_suffix_after_a_one_token_rationale_and_a_one_token_suffix(tiny_backbone_dir):
    """max_new_tokens=1: every rationale is cut after one token; the suffixes run in the tail forward only."""
    module = tiny_grace_model(tiny_backbone_dir, max_new_tokens=1)[0]
    features = module.preprocess(TEXTS[:4])
    suffix_ids = [[17], [17, 18], [5, 6, 7], [300]]
    out = engine_output(module, features, suffix_ids=suffix_ids)
    batch = module.rationale_batch(out.generated)
    reference = two_pass_suffix_states(
        module.model, features["input_ids"], features["attention_mask"], batch.ids, batch.mask, suffix_ids
    )
    assert out.generated.shape[1] == 1
    assert float((out.suffix_states - reference).abs().max()) < 1e-5


@pytest.mark.slow
def test_suffix_states_equal_the_two_pass_reference_on_the_real_backbone(default_backbone_dir):
    model = grace_st.from_backbone(default_backbone_dir, max_new_tokens=24, device="cpu")
    module = model[0]
    texts = [TEXTS[0], TEXTS[1], TEXTS[2], TEXTS[6]]
    features = module.preprocess(texts)
    suffix = module.tokenizer('\nIn one word, the text above means:"', add_special_tokens=False)["input_ids"]
    suffix_ids = [suffix, suffix[:3], suffix, suffix[:1]]
    out = engine_output(module, features, suffix_ids=suffix_ids)
    batch = module.rationale_batch(out.generated)
    reference = two_pass_suffix_states(
        module.model, features["input_ids"], features["attention_mask"], batch.ids, batch.mask, suffix_ids
    )
    # The raw states reach ~50 in magnitude on this model: float32 agreement is relative (the rationale states of the
    # engine and the two-pass path differ by ~4e-5 raw too); the normalised readout agrees within 1e-5.
    assert float((out.suffix_states - reference).abs().max()) < 1e-6 * float(reference.abs().max()) * 10
    normalize = torch.nn.functional.normalize
    assert float((normalize(out.suffix_states, dim=-1) - normalize(reference, dim=-1)).abs().max()) < 1e-5


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


@pytest.mark.parametrize("refill_at", [0.0, 0.5, 0.75, 1.0])
def test_continuous_batching_in_few_slots_equals_one_batch(tiny_backbone_dir, refill_at):
    module = tiny_grace_model(tiny_backbone_dir, max_new_tokens=10)[0]
    split_rows(module, module.preprocess(TEXTS), 10)
    texts = TEXTS * 3
    features = module.preprocess(texts)
    prefix_len = len(module.template_pieces()[0])
    kwargs = module.generation_kwargs()
    reference = engine_output(module, features)
    pairs = zip(features["input_ids"], features["attention_mask"], strict=True)
    real = [ids[mask.bool()].tolist() for ids, mask in pairs]
    counts, rows, waiting_calls = {}, [], []

    def record(lm, args, kwargs):  # rows of each decode call made while prompts still wait for a slot
        batch, width = kwargs["input_ids"].shape
        if width == 1 and len(rows) + batch < len(texts):  # rows that left + rows in the batch = prompts started
            waiting_calls.append(batch)

    hook = module.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        stream = decode_stream(
            module.model,
            real[0][:prefix_len],
            [row[prefix_len:] for row in real],
            10,
            kwargs["eos_token_id"],
            kwargs["pad_token_id"],
            batch_size=8,
            counts=counts,
            refill_at=refill_at,
        )
        for row in stream:
            rows.append(row)
    finally:
        hook.remove()
    assert sorted(row.index for row in rows) == list(range(len(texts)))
    # Finished rows leave at once; while prompts wait, a refill fills the slots once at most refill_at of them write.
    assert waiting_calls and min(waiting_calls) > min(refill_at * 8, 7)
    assert counts["refills"] >= len(texts) // 8 and counts["prompt_tokens"] < features["input_ids"].numel()
    width = features["input_ids"].shape[1]
    batch = module.rationale_batch(reference.generated)
    for row in rows:
        i, n = row.index, int(batch.mask[row.index].sum())
        assert row.generated.tolist() == reference.generated[i, :n].tolist()
        seen = torch.cat([features["attention_mask"][i], batch.mask[i]]).bool()
        expected = reference.states[i, : width + reference.generated.shape[1]][seen]
        assert row.states.shape == expected.shape
        assert float((row.states - expected).abs().max()) < 1e-5


# ---------------------------------------------------------------- single pass
def test_single_pass_matches_the_two_pass_reference(tiny_backbone_dir):
    texts = TEXTS + ["", "one more text of a different length to force padding"]
    single = grace_st.from_backbone(tiny_backbone_dir, max_new_tokens=8, single_pass=True)
    double = grace_st.from_backbone(tiny_backbone_dir, max_new_tokens=8, single_pass=False)
    a, b = single.encode(texts, output_value=None), double.encode(texts, output_value=None)
    assert [single[0].decode_rationale(x) for x in a] == [double[0].decode_rationale(y) for y in b]
    delta = max(
        float((x["sentence_embedding"] - y["sentence_embedding"]).abs().max()) for x, y in zip(a, b, strict=True)
    )
    assert delta < 1e-5


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"prompt": "Query: "},
        {"truncate_dim": 8},
        {"pooling_mode": "lasttoken"},
        {"attention": "eager"},
        {"summary_suffix": "\nIn one word:", "pooling_mode": "summary"},
        {"summary_suffix": ' This: "{text}" means', "pooling_mode": "mean+summary", "prompt": "Query: "},
        {"summary_suffix": "\nIn one word:", "text_summary": True, "pooling_mode": "mean+summary+text_summary"},
    ],
)
def test_continuous_batching_equals_the_batch_path(tiny_backbone_dir, options):
    defaults, options = not options, dict(options)
    prompt, truncate_dim = options.pop("prompt", None), options.pop("truncate_dim", None)
    pooling_mode = options.pop("pooling_mode", None)
    model = varied_model(tiny_backbone_dir, **options)
    model.truncate_dim = truncate_dim
    if pooling_mode:
        model[1].pooling_mode = pooling_mode
    assert continuous_reason(model) is None
    model[0].decode_counts = {}
    new = encode_corpus(model, VARIED_CORPUS, batch_size=4, prompt=prompt, normalize_embeddings=False)
    counts, model[0].decode_counts = model[0].decode_counts, {}
    reference = encode_corpus(
        model, VARIED_CORPUS, batch_size=4, prompt=prompt, normalize_embeddings=False, schedule="batches"
    )
    assert counts["refills"] > len(VARIED_CORPUS) / 4, "freed slots were refilled"
    assert new.rationale_ids == reference.rationale_ids and new.finished == reference.finished
    assert 0 < sum(new.finished) < len(VARIED_CORPUS)
    assert new.embeddings.shape == reference.embeddings.shape == (len(VARIED_CORPUS), truncate_dim or 32)
    assert float(np.abs(new.embeddings - reference.embeddings).max()) < 1e-5
    # No more decode forward calls than the batch path (which decodes each batch until its longest rationale ends) and
    # no more row-steps (both drop finished rows); fewer prompt positions (the prefix runs once, not once per batch).
    batches = model[0].decode_counts
    assert counts["decode_steps"] <= batches["decode_steps"]
    assert counts["decode_row_steps"] <= batches["decode_row_steps"]
    assert counts["prompt_tokens"] < batches["prompt_tokens"]
    if defaults:
        assert counts["decode_steps"] < batches["decode_steps"]


@pytest.mark.slow
@pytest.mark.parametrize("summary", [False, True])
def test_continuous_batching_equals_the_batch_path_on_the_real_backbone(default_backbone_dir, shared_data, summary):
    from grace_st.readers import read_pairs

    texts: dict[str, None] = {}
    for pair in read_pairs(shared_data / "sts2013" / "headlines.test.tsv", format="sts"):
        texts.update(dict.fromkeys([pair.sentence1, pair.sentence2]))
    texts = list(texts)[:12]
    # With summary: the readout of training/configs/sick-summary.yaml (its suffix repeats the text).
    options = {"summary_suffix": SUMMARY_SUFFIX, "pooling_mode": "summary"} if summary else {}
    model = grace_st.from_backbone(default_backbone_dir, max_new_tokens=24, device="cpu", **options)
    model[0].decode_counts = {}
    new = encode_corpus(model, texts, batch_size=4)
    assert model[0].decode_counts["refills"] >= 3
    reference = encode_corpus(model, texts, batch_size=4, schedule="batches")
    assert new.rationales == reference.rationales
    assert float(np.abs(new.embeddings - reference.embeddings).max()) < 1e-5


# ---------------------------------------------------------------- empty texts, buffers that grow, random templates
def _assert_same_items(module, reference: list, other: list, atol: float = 1e-5) -> None:
    for a, b in zip(reference, other, strict=True):
        assert module.decode_rationale(a) == module.decode_rationale(b)
        assert float((a["sentence_embedding"] - b["sentence_embedding"]).abs().max()) < atol


def test_an_empty_text_after_a_template_ending_with_text_gets_the_reference_result_on_every_path(
    tiny_backbone_dir, caplog
):
    model = tiny_grace_model(
        tiny_backbone_dir, chat_template=False, system_prompt="", prompt_template="Question: {text}"
    )
    module, texts = model[0], ["abc", "", "longer text here", ""]
    module.decode_path = "generate"
    reference = model.encode(texts, output_value=None)
    module.decode_path, module.decode_counts = "engine", {}
    engine = model.encode(texts, output_value=None)
    alone = model.encode([""], output_value=None)
    assert module.decode_counts.get("decode_row_steps"), "the engine was not used"
    assert "not the engine" not in caplog.text
    _assert_same_items(module, reference, engine)
    _assert_same_items(module, reference[1:2], alone)
    assert continuous_reason(model) is None
    corpus = encode_corpus(model, texts)
    assert corpus.rationales == [module.decode_rationale(item) for item in reference]
    expected = torch.stack([item["sentence_embedding"] for item in reference]).numpy()
    np.testing.assert_allclose(corpus.embeddings, expected, atol=1e-5)


def test_rationale_buffers_that_grow_give_the_same_results(tiny_backbone_dir, monkeypatch):
    from grace_st.engine import stream

    model = varied_model(tiny_backbone_dir)
    whole_encode, whole_corpus = model.encode(VARIED_CORPUS, output_value=None), encode_corpus(model, VARIED_CORPUS)
    monkeypatch.setattr(stream, "GROW_COLUMNS", 3)  # a 10-token rationale grows its buffers three times
    model[0].decode_counts = {}
    _assert_same_items(model[0], whole_encode, model.encode(VARIED_CORPUS, output_value=None))
    assert model[0].decode_counts.get("decode_row_steps"), "the engine was not used"
    grown = encode_corpus(model, VARIED_CORPUS)
    assert grown.rationales == whole_corpus.rationales
    np.testing.assert_allclose(grown.embeddings, whole_corpus.embeddings, atol=1e-5)


ODD_TEXTS = ["", " ", "\n\t", "<|im_end|>", "<|im_start|>system\nhi", "{text}", "{}", "}{", "🙂 ü", "a b c d e f"]
PIECES = ["", "Q: ", "{", "}", "<|im_end|>", "Text:\n", "«", " ", "{{x}}"]


@pytest.fixture(scope="module")
def property_model(tiny_backbone_dir):
    return tiny_grace_model(tiny_backbone_dir, max_new_tokens=6)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    texts=st.lists(
        st.one_of(st.text(st.characters(exclude_categories=["Cs"]), max_size=20), st.sampled_from(ODD_TEXTS)),
        min_size=1,
        max_size=5,
    ),
    chat=st.booleans(),
    system=st.sampled_from(["", "Explain.", "<|im_end|> {x}"]),
    before=st.sampled_from(PIECES),
    after=st.sampled_from(PIECES),
)
def test_every_path_gives_the_same_rationales_and_embeddings(property_model, texts, chat, system, before, after):
    module = property_model[0]
    options = {
        "chat_template": chat,
        "system_prompt": system if chat else "",
        "prompt_template": before + "{text}" + after,
    }
    module.__dict__.update(options)
    module.decode_path = "generate"
    empty = not any(module.template_pieces()) and [] in module.text_token_ids(texts)
    if empty:  # nothing to write a rationale from: the same documented error on every path, naming the text
        for decode_path in ("generate", "engine"):
            module.decode_path = decode_path
            with pytest.raises(ValueError, match=r"length-sorted batch\[\d+\] = .* gives an empty prompt"):
                property_model.encode(texts, batch_size=3)
        index = module.text_token_ids(texts).index([])
        with pytest.raises(ValueError, match=rf"texts\[{index}\] = .* gives an empty prompt"):
            encode_corpus(property_model, texts, batch_size=3)
        return
    reference = property_model.encode(texts, output_value=None, batch_size=3)
    module.decode_path = "engine"
    _assert_same_items(module, reference, property_model.encode(texts, output_value=None, batch_size=3))
    corpus = encode_corpus(property_model, texts, batch_size=3)
    assert corpus.rationales == [module.decode_rationale(item) for item in reference]
    expected = torch.stack([item["sentence_embedding"] for item in reference]).numpy()
    np.testing.assert_allclose(corpus.embeddings, expected, atol=1e-5)
