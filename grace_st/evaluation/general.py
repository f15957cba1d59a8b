"""Does a GRACE model keep its general abilities? Compare its causal LM with the backbone's.

GRACE trains the LM itself, so the generator must still work. Three measures, base vs GRACE:

- :func:`perplexity` on held-out text (lower is better; a large rise means the LM was damaged);
- :func:`multiple_choice` accuracy on a small local question set, scored by log-likelihood like lm-evaluation-harness
  (``acc`` and the length-normalised ``acc_norm``);
- :func:`run_lm_eval`: real lm-evaluation-harness tasks (gsm8k, mmlu, ...) for machines with Hub access; lm-eval is
  imported only there (``pip install lm-eval``).

A saved GRACE folder is itself a causal LM folder (the Transformer module saves the LM at its root), so
:func:`load_lm` loads base and GRACE the same way. The command line of ``eval/general_run.py`` is
:mod:`grace_st.scripts.general`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from grace_st.backbone import resolve_backbone
from grace_st.readers import read_lines, read_pairs
from grace_st.tables import format_cell, markdown_table

logger = logging.getLogger(__name__)

LM_EVAL_EXTRA = 'pip install lm-eval  (the "general" extra of grace-st)'
# News sentences that neither training nor the dev tasks use; relative to the data folder (grace_st.readers.data_dir).
DEFAULT_HELD_OUT = "sts2012/MSRpar.train.tsv"


def bundled_questions_path() -> str:
    """Path of the bundled multiple-choice set (``grace_st/data/general_mc.jsonl``: 40 questions written for this
    project)."""
    return str(resources.files("grace_st") / "data" / "general_mc.jsonl")


def load_lm(name_or_path: str, device: str = "cpu") -> tuple[Any, Any]:
    """Load a causal LM and tokenizer from a backbone folder, a saved GRACE folder, a Hub id or ``"default"``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name_or_path = resolve_backbone(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@torch.no_grad()
def _continuation_logprobs(
    model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int
) -> list[tuple[float, int]]:
    """Sum of log-probabilities of each continuation given its context, and its token count.

    Context and continuation are tokenized separately and concatenated (as lm-evaluation-harness does), so the
    continuation's tokens are exactly the scored ones. The BOS token, if the tokenizer has one, starts each sequence.
    """
    device = next(model.parameters()).device
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows = []
    for context, continuation in pairs:
        ctx = bos + tokenizer(context, add_special_tokens=False)["input_ids"]
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not ctx:  # the first token has no prediction; score it from the EOS as a neutral context
            ctx = [tokenizer.eos_token_id]
        rows.append((ctx, cont))
    out: list[tuple[float, int]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(c) + len(t) for c, t in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (ctx, cont) in enumerate(chunk):
            ids[i, : len(ctx) + len(cont)] = torch.tensor(ctx + cont)
            mask[i, : len(ctx) + len(cont)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        for i, (ctx, cont) in enumerate(chunk):
            positions = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1, device=device)
            targets = torch.tensor(cont, device=device)
            out.append((float(logprobs[i, positions, targets].sum()), len(cont)))
    return out


def held_out_sentences(path: str | os.PathLike, limit: int = 200) -> list[str]:
    """Distinct first sentences of a pair file (STS, SICK or MSRP: :func:`grace_st.readers.read_pairs`), in order.

    Raises:
        FileNotFoundError: the file is missing (the message says how to point at another file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Held-out text {path} not found; pass --text-file or --data-dir (or $GRACE_ST_DATA).")
    sentences = dict.fromkeys(pair.sentence1 for pair in read_pairs(path) if pair.sentence1)
    return list(sentences)[:limit]


def perplexity(model, tokenizer, texts: Sequence[str], batch_size: int = 8) -> float:
    """Token-level perplexity of ``texts`` (each scored from its BOS), pooled over all tokens.

    Returns:
        ``exp(total negative log-likelihood / total tokens)``.
    """
    scored = _continuation_logprobs(model, tokenizer, [("", text) for text in texts], batch_size)
    total, tokens = sum(s for s, _ in scored), sum(n for _, n in scored)
    return math.exp(-total / max(tokens, 1))


@dataclass
class ChoiceQuestion:
    """One multiple-choice item: ``question``, ``choices`` and the index of the right one (``answer``)."""

    question: str
    choices: list[str]
    answer: int


def load_questions(path: str | os.PathLike | None = None) -> list[ChoiceQuestion]:
    """Read a JSONL file of ``{"question", "choices", "answer"}`` items (answer = index into choices).

    Args:
        path: the file; None reads the bundled set (:func:`bundled_questions_path`).

    Raises:
        ValueError: a line that is not a JSON object with those fields, or an answer that is not an index into the
            choices (naming the file and line).
    """
    path = path if path is not None else bundled_questions_path()
    items = []
    for number, line in read_lines(path):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            item = ChoiceQuestion(str(data["question"]), [str(c) for c in data["choices"]], data["answer"])
        except (json.JSONDecodeError, TypeError, KeyError) as error:
            raise ValueError(
                f"{path}:{number}: expected a JSON object with 'question', 'choices' (a list) and 'answer' "
                f"({error!r})."
            ) from None
        if (
            isinstance(item.answer, bool)
            or not isinstance(item.answer, int)
            or not 0 <= item.answer < len(item.choices)
        ):
            raise ValueError(f"{path}:{number}: answer={item.answer!r} is not an index into {item.choices!r}.")
        items.append(item)
    return items


def multiple_choice(model, tokenizer, questions: Sequence[ChoiceQuestion], batch_size: int = 16) -> dict[str, float]:
    """Log-likelihood multiple-choice accuracy, as lm-evaluation-harness scores such tasks.

    Each choice is scored as the continuation ``" " + choice`` of ``"Question: ...\\nAnswer:"``.

    Returns:
        ``acc`` (highest summed log-probability) and ``acc_norm`` (highest log-probability per character).
    """
    pairs = [(f"Question: {q.question}\nAnswer:", f" {choice}") for q in questions for choice in q.choices]
    scores = iter(_continuation_logprobs(model, tokenizer, pairs, batch_size))
    right = right_norm = 0
    for q in questions:
        values = [next(scores)[0] for _ in q.choices]
        normed = [v / max(len(c), 1) for v, c in zip(values, q.choices, strict=True)]
        right += int(max(range(len(values)), key=values.__getitem__) == q.answer)
        right_norm += int(max(range(len(normed)), key=normed.__getitem__) == q.answer)
    return {"acc": right / len(questions), "acc_norm": right_norm / len(questions)}


def run_lm_eval(
    name_or_path: str, tasks: Sequence[str], limit: int | None = None, batch_size: int = 8, device: str = "cpu"
) -> dict[str, dict[str, float]]:
    """Run lm-evaluation-harness tasks on a causal LM (real use; needs Hub access for the task data).

    Args:
        name_or_path: backbone or GRACE folder, or Hub id.
        tasks: lm-eval task names, e.g. ``["gsm8k", "mmlu"]``.
        limit: examples per task (None: all).
        batch_size: lm-eval batch size.
        device: torch device.

    Returns:
        Metrics per task as lm-eval reports them.

    Raises:
        ImportError: lm-eval is not installed (the message names the package to install).
    """
    try:
        import lm_eval
    except ImportError as error:
        raise ImportError(f"The lm-evaluation-harness check needs lm-eval: {LM_EVAL_EXTRA}") from error
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={name_or_path},dtype=float32",
        tasks=list(tasks),
        limit=limit,
        batch_size=batch_size,
        device=device,
    )
    return {
        task: {k: v for k, v in metrics.items() if isinstance(v, float)}
        for task, metrics in results["results"].items()
    }


def general_table(report: dict[str, Any]) -> str:
    """The markdown table of a :func:`main` report: perplexity and multiple-choice accuracy per model.

    Example:
        >>> row = {"perplexity": 12.345, "acc": 0.5, "acc_norm": 0.25}
        >>> print(general_table({"held_out_texts": 3, "questions": 4, "models": {"base": row}}), end="")
        | model | perplexity (3 held-out texts) | MC acc (4 q.) | MC acc_norm |
        |:------|------------------------------:|--------------:|------------:|
        | base  |                         12.35 |         0.500 |       0.250 |
    """
    header = [
        "model",
        f"perplexity ({report['held_out_texts']} held-out texts)",
        f"MC acc ({report['questions']} q.)",
        "MC acc_norm",
    ]
    rows = [
        [label, format_cell(row["perplexity"], 2), format_cell(row["acc"], 3), format_cell(row["acc_norm"], 3)]
        for label, row in report["models"].items()
    ]
    return markdown_table(header, rows)


def general_report(
    models: dict[str, str],
    texts: Sequence[str],
    questions: Sequence[ChoiceQuestion],
    *,
    lm_eval_tasks: Sequence[str] = (),
    limit: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Perplexity on ``texts`` and multiple-choice accuracy of each model's LM (and lm-eval tasks if given).

    Args:
        models: ``{label: folder or Hub id}``, in table order (GRACE and +CL folders save the LM at their root).
        texts: held-out passages (:func:`held_out_sentences`, :func:`grace_st.readers.read_texts`).
        questions: :func:`load_questions`.
        lm_eval_tasks: lm-evaluation-harness tasks (:func:`run_lm_eval`); empty runs none. Defaults to ().
        limit: examples per lm-eval task. Defaults to None (all).
        device: torch device. Defaults to ``"cpu"``.

    Returns:
        ``{"held_out_texts", "questions", "models": {label: {"name", "perplexity", "acc", "acc_norm", ...}}}``.
    """
    report: dict[str, Any] = {"held_out_texts": len(texts), "questions": len(questions), "models": {}}
    for label, name in models.items():
        model, tokenizer = load_lm(name, device=device)
        row = {"name": name, "perplexity": perplexity(model, tokenizer, texts)}
        row.update(multiple_choice(model, tokenizer, questions))
        if lm_eval_tasks:
            row["lm_eval"] = run_lm_eval(name, lm_eval_tasks, limit=limit, device=device)
        report["models"][label] = row
        del model
    return report
