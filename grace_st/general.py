"""Does a GRACE model keep its general abilities? Compare its causal LM with the backbone's.

GRACE trains the LM itself, so the generator must still work. Three measures, base vs GRACE:

- :func:`perplexity` on held-out text (lower is better; a large rise means the LM was damaged);
- :func:`multiple_choice` accuracy on a small local question set, scored by log-likelihood like lm-evaluation-harness
  (``acc`` and the length-normalised ``acc_norm``);
- :func:`run_lm_eval`: real lm-evaluation-harness tasks (gsm8k, mmlu, ...) for machines with Hub access; lm-eval is
  imported only there (``pip install lm-eval``).

A saved GRACE folder is itself a causal LM folder (the Transformer module saves the LM at its root), so
:func:`load_lm` loads base and GRACE the same way.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

LM_EVAL_EXTRA = 'pip install lm-eval  (the "general" extra of grace-st)'


def load_lm(name_or_path: str, device: str = "cpu") -> tuple[Any, Any]:
    """Load a causal LM and tokenizer from a backbone folder, a saved GRACE folder, a Hub id or ``"default"``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path == "default":
        from grace_st.backbone import default_backbone

        name_or_path = default_backbone()
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
    """Distinct first sentences of an STS-style TSV (``score<TAB>sentence1<TAB>sentence2``), in file order.

    Raises:
        FileNotFoundError: the file is missing (the message says how to point at another file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Held-out text {path} not found; pass --text-file or set $GRACE_ST_DATA.")
    sentences: dict[str, None] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        for sentence in line.split("\t")[1:2]:
            if sentence.strip():
                sentences.setdefault(sentence.strip())
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


def load_questions(path: str | os.PathLike) -> list[ChoiceQuestion]:
    """Read a JSONL file of ``{"question", "choices", "answer"}`` items (answer = index into choices)."""
    items = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        data = json.loads(line)
        item = ChoiceQuestion(data["question"], list(data["choices"]), int(data["answer"]))
        if not 0 <= item.answer < len(item.choices):
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
