"""Tests of the optional vLLM generation backend (grace_st/vllm_backend.py) with a fake ``vllm`` module.

vLLM needs a GPU and is not installed here: the fake's ``LLM.generate`` runs the same tiny HF model's ``generate`` on
the token ids it is given, one prompt at a time, and returns objects shaped like vLLM's ``RequestOutput``.
"""

from __future__ import annotations

import copy
import doctest
import json
import pickle
import sys
import threading
import types

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import grace_st
import grace_st.vllm_backend
from grace_st.encoding import encode_corpus
from grace_st.vllm_backend import VLLMBackend, vllm_sampling_kwargs

TEXTS = [
    "A man is playing a guitar.",
    "The stock market fell sharply after the announcement.",
    "",
    "Cats sleep.",
]


class FakeVLLM:
    """Stands in for the ``vllm`` package and records what GRACE hands it."""

    def __init__(self) -> None:
        self.engines: list[dict] = []  # kwargs of every LLM(...)
        self.sampling: list[dict] = []  # kwargs of every SamplingParams(...)
        self.prompts: list[list[int]] = []  # prompt token ids of every request
        self.drop_stop_token = False  # some vLLM versions leave the stop token out of `token_ids`
        self.canned: list[tuple[list[int], str, int | None]] | None = None  # fixed (token_ids, finish, stop_reason)
        fake = self

        class SamplingParams:
            def __init__(self, **kwargs) -> None:
                fake.sampling.append(kwargs)
                self.__dict__.update(kwargs)

        class LLM:
            def __init__(self, model: str, **kwargs) -> None:
                fake.engines.append({"model": model, **kwargs})
                self.lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
                self._lock = threading.Lock()  # like a real engine, this object cannot be copied or pickled

            def generate(self, prompts, sampling_params, use_tqdm=True):
                return [self._one(prompt["prompt_token_ids"], sampling_params) for prompt in prompts]

            def _one(self, ids: list[int], sp: SamplingParams):
                fake.prompts.append(list(ids))
                if fake.canned is not None:
                    token_ids, finish, stop = fake.canned[len(fake.prompts) - 1]
                else:
                    sample = sp.temperature > 0
                    extra = {"temperature": sp.temperature, "top_p": sp.top_p, "top_k": max(sp.top_k, 0)}
                    with torch.no_grad():
                        out = self.lm.generate(
                            input_ids=torch.tensor([ids]),
                            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=sp.max_tokens,
                            do_sample=sample,
                            eos_token_id=sp.stop_token_ids,
                            pad_token_id=sp.stop_token_ids[0],
                            repetition_penalty=sp.repetition_penalty,
                            **(extra if sample else {"temperature": None, "top_p": None, "top_k": None}),
                        )
                    token_ids = out[0, len(ids) :].tolist()
                    finished = bool(token_ids) and token_ids[-1] in sp.stop_token_ids
                    finish, stop = ("stop", token_ids[-1]) if finished else ("length", None)
                    if finished and fake.drop_stop_token:
                        token_ids = token_ids[:-1]
                completion = types.SimpleNamespace(token_ids=tuple(token_ids), finish_reason=finish, stop_reason=stop)
                return types.SimpleNamespace(prompt_token_ids=list(ids), outputs=[completion])

        self.module = types.ModuleType("vllm")
        self.module.LLM = LLM
        self.module.SamplingParams = SamplingParams


@pytest.fixture
def backbone_dir(tiny_backbone_dir) -> str:
    """The shared tiny backbone (its greedy rationales differ between texts and between steps)."""
    return tiny_backbone_dir


@pytest.fixture
def fake_vllm(monkeypatch) -> FakeVLLM:
    fake = FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    return fake


@pytest.fixture
def no_vllm(monkeypatch) -> list[str]:
    """Make ``import vllm`` fail and record every attempt to import it."""
    attempts: list[str] = []

    class Finder:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "vllm" or name.startswith("vllm."):
                attempts.append(name)
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])
    return attempts


def _model(backbone_dir, **options):
    return grace_st.from_backbone(backbone_dir, max_new_tokens=8, device="cpu", **options)


def _rationales(model, items) -> list[str]:
    return [model[0].decode_rationale(item) for item in items]


def _forbid_transformers_generate(model) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the transformers generate ran although the vllm backend is selected")

    model[0].model.generate = refuse


# ---------------------------------------------------------------- same results as the transformers backend
def test_vllm_backend_gives_the_transformers_embeddings_and_rationales(backbone_dir, fake_vllm):
    expected = _model(backbone_dir).encode(TEXTS, output_value=None, batch_size=len(TEXTS))
    model = _model(backbone_dir)
    model[0].generation_backend = VLLMBackend()
    _forbid_transformers_generate(model)
    got = model.encode(TEXTS, output_value=None, batch_size=len(TEXTS))
    assert len(fake_vllm.prompts) == len(TEXTS), "every rationale must come from the vLLM engine"
    assert _rationales(model, got) == _rationales(model, expected)
    assert all(_rationales(model, got)) and len(set(_rationales(model, got))) == len(TEXTS)
    delta = max(
        float((a["sentence_embedding"] - b["sentence_embedding"]).abs().max())
        for a, b in zip(got, expected, strict=True)
    )
    assert delta < 1e-5
    for a, b in zip(got, expected, strict=True):
        mask = a["rationale_mask"].bool()
        assert torch.equal(a["rationale_ids"][mask], b["rationale_ids"][b["rationale_mask"].bool()])


def test_vllm_prompts_are_the_chat_prompts_without_padding(backbone_dir, fake_vllm):
    model = _model(backbone_dir)
    model[0].generation_backend = VLLMBackend()
    model.encode(TEXTS, batch_size=len(TEXTS))
    tokenizer = model[0].tokenizer
    rendered = {
        tokenizer.apply_chat_template(
            [{"role": "system", "content": grace_st.DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": text}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for text in TEXTS
    }
    assert {tokenizer.decode(ids) for ids in fake_vllm.prompts} == rendered
    assert all(ids[0] == tokenizer.bos_token_id for ids in fake_vllm.prompts), "left padding must be stripped"


@pytest.mark.parametrize("drop_stop_token", [False, True])
def test_vllm_rationale_batch_equals_the_transformers_one_when_rows_stop_early(
    backbone_dir, fake_vllm, drop_stop_token
):
    fake_vllm.drop_stop_token = drop_stop_token
    module = _model(backbone_dir)[0]
    features = module.preprocess(TEXTS)
    # Make a token that greedy decoding writes early in row 0 an end-of-sequence id, so rows end at different steps.
    row = module.generate_rationales(features).ids[0].tolist()
    stop = next(token for i, token in enumerate(row) if i >= 2 and token not in row[:i])
    module.model.generation_config.eos_token_id = [module.tokenizer.eos_token_id, stop]
    reference = module.generate_rationales(features)
    module.generation_backend = VLLMBackend()
    got = module.generate_rationales(features)
    assert stop in fake_vllm.sampling[-1]["stop_token_ids"]
    assert bool(reference.finished[0]) and int(reference.mask[0].sum()) < reference.mask.shape[1]
    assert torch.equal(got.ids, reference.ids)
    assert torch.equal(got.mask, reference.mask)
    assert torch.equal(got.finished, reference.finished)
    assert got.states is None


def test_vllm_rows_cut_short_are_padded_without_counting_the_padding(backbone_dir, fake_vllm):
    module = _model(backbone_dir)[0]
    module.generation_backend = VLLMBackend()
    eos, pad = module.tokenizer.eos_token_id, module.tokenizer.pad_token_id
    assert pad == eos  # the padding could pass for an EOS: it must still not finish a row
    # Row 0 stops on EOS; row 1 is cut short without one (e.g. at the engine's context limit); row 2 fills the width.
    fake_vllm.canned = [([5, 6, eos], "stop", eos), ([7], "length", None), ([8, 9, 10, 11], "length", None)]
    batch = module.generate_rationales(module.preprocess(TEXTS[:3]))
    assert batch.mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert batch.finished.tolist() == [True, False, False]
    assert batch.ids.tolist() == [[5, 6, eos, pad], [7, pad, pad, pad], [8, 9, 10, 11]]


# ---------------------------------------------------------------- decoding settings
def test_sampling_params_carry_the_greedy_settings(backbone_dir, fake_vllm):
    model = grace_st.from_backbone(backbone_dir, max_new_tokens=5, repetition_penalty=1.3, device="cpu")
    model[0].generation_backend = VLLMBackend()
    model.encode(TEXTS[:2])
    params = fake_vllm.sampling[-1]
    assert params["temperature"] == 0.0
    assert params["max_tokens"] == 5
    assert params["stop_token_ids"] == model[0].eos_token_ids == [model[0].tokenizer.eos_token_id]
    assert params["repetition_penalty"] == pytest.approx(1.3)
    assert params["n"] == 1


def test_sampling_params_carry_the_sampling_settings(backbone_dir, fake_vllm):
    module = grace_st.from_backbone(
        backbone_dir, max_new_tokens=6, do_sample=True, temperature=0.7, top_p=0.9, top_k=5, device="cpu"
    )[0]
    module.generation_backend = VLLMBackend()
    features = module.preprocess(TEXTS[:2])
    module.generate_rationales(features)
    params = fake_vllm.sampling[-1]
    assert (params["temperature"], params["top_p"], params["top_k"], params["max_tokens"]) == (0.7, 0.9, 5, 6)
    # Per-call overrides, as the trainer passes them; top_k=0 (no cut-off) is vLLM's -1.
    module.generate_rationales(features, temperature=0.5, top_p=1.0, top_k=0)
    params = fake_vllm.sampling[-1]
    assert (params["temperature"], params["top_p"], params["top_k"]) == (0.5, 1.0, -1)
    with pytest.raises(ValueError, match="num_beams"):
        module.generate_rationales(features, num_beams=2)


def test_vllm_sampling_kwargs_translation():
    greedy = vllm_sampling_kwargs({"max_new_tokens": 4, "eos_token_id": 2, "do_sample": False, "temperature": None})
    assert greedy == {
        "n": 1,
        "max_tokens": 4,
        "stop_token_ids": [2],
        "repetition_penalty": 1.0,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": -1,
    }
    sampled = vllm_sampling_kwargs({"max_new_tokens": 4, "eos_token_id": [2, 7], "do_sample": True, "top_k": 3})
    assert (sampled["temperature"], sampled["top_k"], sampled["stop_token_ids"]) == (1.0, 3, [2, 7])


# ---------------------------------------------------------------- engine
def test_engine_is_built_lazily_once_from_the_model_folder(backbone_dir, fake_vllm):
    model = _model(backbone_dir)
    model[0].generation_backend = VLLMBackend(gpu_memory_utilization=0.5)
    assert fake_vllm.engines == [], "the engine must be built on first use only"
    model.encode(TEXTS[:2])
    model.encode(TEXTS[2:])
    assert fake_vllm.engines == [{"model": backbone_dir, "dtype": "float32", "gpu_memory_utilization": 0.5}]


def test_in_memory_model_must_be_saved_first(backbone_dir, fake_vllm, tmp_path):
    model = _model(backbone_dir)
    model[0].model.config._name_or_path = ""
    model[0].generation_backend = VLLMBackend()
    with pytest.raises(ValueError, match=r"Save the model first.*VLLMBackend\(model=path\)"):
        model.encode(TEXTS[:1])
    assert fake_vllm.engines == []
    model.save(str(tmp_path / "saved"))
    model[0].generation_backend = VLLMBackend(model=str(tmp_path / "saved"))
    model.encode(TEXTS[:1])
    assert fake_vllm.engines[0]["model"] == str(tmp_path / "saved")


def test_copied_module_leaves_the_engine_behind(backbone_dir, fake_vllm):
    model = _model(backbone_dir)
    model[0].generation_backend = VLLMBackend()
    expected = model.encode(TEXTS[:2])
    clone = copy.deepcopy(model[0])
    assert isinstance(clone.generation_backend, VLLMBackend) and clone.generation_backend._engine is None
    assert model[0].generation_backend._engine is not None, "copying must not drop the original's engine"
    features = clone.preprocess(TEXTS[:2])
    assert clone.generate_rationales(features).ids.shape[0] == 2
    assert len(fake_vllm.engines) == 2
    np.testing.assert_allclose(model.encode(TEXTS[:2]), expected, atol=1e-6)


def test_backend_with_an_engine_pickles_for_multi_process_encoding(backbone_dir, fake_vllm):
    model = _model(backbone_dir)
    model[0].generation_backend = VLLMBackend(gpu_memory_utilization=0.5)
    expected = model.encode(TEXTS[:2])
    restored = pickle.loads(pickle.dumps(model[0].generation_backend))  # the engine holds a lock: not picklable
    assert restored._engine is None and restored.engine_kwargs["gpu_memory_utilization"] == 0.5
    model[0].generation_backend = restored
    np.testing.assert_allclose(model.encode(TEXTS[:2]), expected, atol=1e-6)
    assert len(fake_vllm.engines) == 2, "the unpickled copy builds its own engine on first use"


# ---------------------------------------------------------------- options and errors
def test_missing_vllm_raises_an_import_error_that_says_how_to_install(backbone_dir, no_vllm):
    model = _model(backbone_dir)
    model.encode(TEXTS[:2])
    assert no_vllm == [], "the default backend must not import vllm"
    with pytest.raises(ImportError, match=r"pip install vllm.*GPU|GPU.*pip install vllm"):
        VLLMBackend()
    assert no_vllm and model[0].generation_backend is None


@pytest.mark.parametrize("bad", ["vllm", "transformers", 3])
def test_a_backend_must_have_a_generate_method(backbone_dir, bad):
    module = _model(backbone_dir)[0]
    with pytest.raises(ValueError, match=rf"generation_backend={bad!r} is not allowed.*VLLMBackend\(\)"):
        module.generation_backend = bad
    assert module.generation_backend is None


def test_backend_is_not_saved(backbone_dir, fake_vllm, tmp_path):
    model = _model(backbone_dir)
    model[0].generation_backend = VLLMBackend(gpu_memory_utilization=0.5)
    model.save(str(tmp_path / "saved"))
    config = json.loads((tmp_path / "saved" / "grace_config.json").read_text())
    assert set(config) == {*grace_st.Transformer.config_keys, "grace_st_version"}
    assert "vllm" not in json.dumps(config).lower() and "gpu_memory_utilization" not in json.dumps(config)
    reloaded = grace_st.Transformer.load(str(tmp_path / "saved"))
    assert reloaded.generation_backend is None


def test_embedding_cache_keeps_the_backends_apart(backbone_dir, fake_vllm, tmp_path):
    model = _model(backbone_dir)
    expected = encode_corpus(model, TEXTS, cache_dir=tmp_path)
    model[0].generation_backend = VLLMBackend()
    got = encode_corpus(model, TEXTS, cache_dir=tmp_path)
    assert len(fake_vllm.prompts) == len(TEXTS), "entries of the transformers backend must not be reused"
    assert len(list(tmp_path.rglob("*.npz"))) == 2 * len(TEXTS)
    np.testing.assert_allclose(got.embeddings, expected.embeddings, atol=1e-5)
    assert got.rationales == expected.rationales


def test_doctests_of_the_module_pass():
    result = doctest.testmod(grace_st.vllm_backend)
    assert result.attempted >= 1 and result.failed == 0
