"""General-ability check: perplexity and multiple-choice scoring of the LM inside a GRACE model."""

from __future__ import annotations

import doctest
import importlib.util
import json
import math

import pytest
import torch

from grace_st.evaluation import general
from grace_st.evaluation.general import (
    ChoiceQuestion,
    held_out_sentences,
    load_lm,
    load_questions,
    multiple_choice,
    perplexity,
    run_lm_eval,
)
from grace_st.scripts.general import main

TEXTS = ["The cat sat on the mat.", "Stocks fell sharply on Monday after the report.", "It is raining."]


@pytest.fixture(scope="module")
def tiny_lm(tiny_backbone_dir):
    return load_lm(tiny_backbone_dir)


@pytest.fixture(scope="module")
def other_lm_dir(tiny_backbone_dir, tmp_path_factory) -> str:
    """The tiny backbone with perturbed weights: a different LM with the same tokenizer."""
    model, tokenizer = load_lm(tiny_backbone_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    path = tmp_path_factory.mktemp("other-lm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def direct_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | BOS + context), one unpadded sequence, written independently of the library."""
    ctx = [tokenizer.bos_token_id] + tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ctx + cont])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return sum(float(logprobs[len(ctx) - 1 + i, token]) for i, token in enumerate(cont))


def test_doctests():
    result = doctest.testmod(general)
    assert result.attempted > 0 and result.failed == 0


def test_perplexity_matches_a_direct_computation(tiny_lm):
    model, tokenizer = tiny_lm
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert perplexity(model, tokenizer, TEXTS[:1]) == pytest.approx(math.exp(loss.item()), rel=1e-4)
    # Padding in a batch does not change the result.
    assert perplexity(model, tokenizer, TEXTS, batch_size=3) == pytest.approx(perplexity(model, tokenizer, TEXTS, 1))


def test_grace_folder_is_scored_like_its_backbone(tiny_lm, tiny_backbone_dir, other_lm_dir, tmp_path):
    from grace_st import from_backbone

    from_backbone(tiny_backbone_dir, max_new_tokens=4, device="cpu").save(str(tmp_path / "grace"))
    grace, tokenizer = load_lm(str(tmp_path / "grace"))
    assert perplexity(grace, tokenizer, TEXTS) == pytest.approx(perplexity(*tiny_lm, TEXTS), rel=1e-5)
    other = perplexity(*load_lm(other_lm_dir), TEXTS)
    assert other != pytest.approx(perplexity(*tiny_lm, TEXTS), rel=1e-3)  # the comparison can tell LMs apart


def test_multiple_choice_matches_a_direct_computation(tiny_lm):
    questions = load_questions()
    assert len(questions) == 40 and all(len(q.choices) == 4 for q in questions)
    model, tokenizer = tiny_lm
    picked = []
    for q in questions[:6]:
        scores = [direct_logprob(model, tokenizer, f"Question: {q.question}\nAnswer:", f" {c}") for c in q.choices]
        picked.append(max(range(len(scores)), key=scores.__getitem__))
    # Make every direct pick right in one copy and wrong in another: acc must follow.
    right = [ChoiceQuestion(q.question, q.choices, p) for q, p in zip(questions[:6], picked, strict=True)]
    wrong = [ChoiceQuestion(q.question, q.choices, (p + 1) % 4) for q, p in zip(questions[:6], picked, strict=True)]
    assert multiple_choice(model, tokenizer, right, batch_size=5)["acc"] == 1.0
    assert multiple_choice(model, tokenizer, wrong, batch_size=5)["acc"] == 0.0
    sure = [ChoiceQuestion("Pick one", ["a", "a a a a a a a a a a a a"], 0)]
    assert multiple_choice(model, tokenizer, sure)["acc"] == 1.0  # a longer continuation has a lower log-probability


def test_question_and_text_file_errors(tmp_path):
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 2}) + "\n")
    with pytest.raises(ValueError, match="q.jsonl:1: answer=2"):
        load_questions(tmp_path / "q.jsonl")
    (tmp_path / "l.jsonl").write_text('{"question": "q", "choices": ["a"], "answer": 0}\n[1, 2]\n')
    with pytest.raises(ValueError, match="l.jsonl:2: expected a JSON object"):
        load_questions(tmp_path / "l.jsonl")
    with pytest.raises(FileNotFoundError, match="--text-file"):
        held_out_sentences(tmp_path / "missing.tsv")
    (tmp_path / "s.tsv").write_text("1\tOne.\tUno.\n2\tTwo.\tDos.\n3\tOne.\tEins.\n")
    assert held_out_sentences(tmp_path / "s.tsv") == ["One.", "Two."]


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm-eval is installed")
def test_lm_eval_missing_names_the_package():
    with pytest.raises(ImportError, match="pip install lm-eval"):
        run_lm_eval("x", ["gsm8k"])


def test_command_line(tiny_lm, tiny_backbone_dir, other_lm_dir, tmp_path, capsys):
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n\n")
    report = main(
        ["--base", tiny_backbone_dir, "--model", other_lm_dir, "--text-file", str(tmp_path / "texts.txt")]
        + ["--output-dir", str(tmp_path)]
    )
    assert report["held_out_texts"] == 3 and report["questions"] == 40
    assert report["models"]["base"]["perplexity"] == pytest.approx(perplexity(*tiny_lm, TEXTS))
    assert report["models"]["GRACE"]["perplexity"] == pytest.approx(perplexity(*load_lm(other_lm_dir), TEXTS))
    assert json.loads((tmp_path / "general.json").read_text())["models"]["GRACE"]["name"] == other_lm_dir
    out = capsys.readouterr().out
    assert "| GRACE |" in out and f"{report['models']['GRACE']['perplexity']:.2f}" in out


def test_default_held_out_text_comes_from_the_data_folder(shared_data):
    sentences = held_out_sentences(shared_data / general.DEFAULT_HELD_OUT, limit=5)
    assert len(sentences) == 5 and len(set(sentences)) == 5
