"""General-ability check: perplexity and multiple-choice scoring of the LM inside a GRACE model."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from grace_st.general import (
    ChoiceQuestion,
    held_out_sentences,
    load_lm,
    load_questions,
    multiple_choice,
    perplexity,
    run_lm_eval,
)

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["The cat sat on the mat.", "Stocks fell sharply on Monday after the report.", "It is raining."]


@pytest.fixture(scope="module")
def tiny_lm(tiny_backbone_dir):
    return load_lm(tiny_backbone_dir)


def test_perplexity_matches_a_direct_computation(tiny_lm):
    import torch

    model, tokenizer = tiny_lm
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert perplexity(model, tokenizer, TEXTS[:1]) == pytest.approx(math.exp(loss.item()), rel=1e-4)
    # Padding in a batch does not change the result.
    assert perplexity(model, tokenizer, TEXTS, batch_size=3) == pytest.approx(perplexity(model, tokenizer, TEXTS, 1))


def test_grace_folder_is_scored_like_its_backbone(tiny_lm, tiny_backbone_dir, tmp_path):
    from grace_st import from_backbone

    from_backbone(tiny_backbone_dir, max_new_tokens=4, device="cpu").save(str(tmp_path / "grace"))
    grace, tokenizer = load_lm(str(tmp_path / "grace"))
    assert perplexity(grace, tokenizer, TEXTS) == pytest.approx(perplexity(*tiny_lm, TEXTS), rel=1e-5)


def test_multiple_choice_on_the_shipped_questions(tiny_lm):
    questions = load_questions(REPO / "eval" / "data" / "general_mc.jsonl")
    assert len(questions) == 40 and all(len(q.choices) == 4 for q in questions)
    scores = multiple_choice(*tiny_lm, questions[:5])
    assert set(scores) == {"acc", "acc_norm"} and all(0 <= v <= 1 for v in scores.values())
    sure = [ChoiceQuestion("Pick one", ["a", "a a a a a a a a a a a a"], 0)]
    assert multiple_choice(*tiny_lm, sure)["acc"] == 1.0  # a longer continuation has a lower summed log-probability


def test_question_and_text_file_errors(tmp_path):
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 2}) + "\n")
    with pytest.raises(ValueError, match="answer=2"):
        load_questions(tmp_path / "q.jsonl")
    with pytest.raises(FileNotFoundError, match="--text-file"):
        held_out_sentences(tmp_path / "missing.tsv")
    (tmp_path / "s.tsv").write_text("1\tOne.\tUno.\n2\tTwo.\tDos.\n3\tOne.\tEins.\n")
    assert held_out_sentences(tmp_path / "s.tsv") == ["One.", "Two."]


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm-eval is installed")
def test_lm_eval_missing_names_the_package():
    with pytest.raises(ImportError, match="pip install lm-eval"):
        run_lm_eval("x", ["gsm8k"])


def test_general_run_script(tiny_backbone_dir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("general_run", REPO / "eval" / "general_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS))
    report = module.main(
        ["--base", tiny_backbone_dir, "--model", tiny_backbone_dir, "--text-file", str(tmp_path / "texts.txt")]
        + ["--output-dir", str(tmp_path)]
    )
    assert report["models"]["base"]["perplexity"] == pytest.approx(report["models"]["GRACE"]["perplexity"])
    assert json.loads((tmp_path / "general.json").read_text())["questions"] == 40
    assert "| GRACE |" in capsys.readouterr().out
