"""The command line of the general-ability check (``eval/general_run.py``): base LM vs GRACE LM, print the table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from grace_st.evaluation.general import (
    DEFAULT_HELD_OUT,
    general_report,
    general_table,
    held_out_sentences,
    load_questions,
)
from grace_st.readers import read_texts, resolve_data_path
from grace_st.scripts import setup_logging

USAGE = """General-ability check: does the GRACE model's LM still work as well as its backbone's?

Usage:
    python eval/general_run.py --base default --model runs/grace-sick                      # offline
    python eval/general_run.py --base HuggingFaceTB/SmolLM2-135M-Instruct --model org/grace \\
        --lm-eval-tasks gsm8k mmlu --limit 200                                             # lm-eval, Hub access

Offline it reports perplexity on held-out text (default: the first sentences of STS 2012 MSRpar.train, news that
neither training nor the dev tasks use, from --data-dir, else $GRACE_ST_DATA, else ../shared/data from the working
directory) and log-likelihood accuracy on the bundled multiple-choice set (40 questions written for this project),
for each model; results go to <output-dir>/general.json and a markdown table.
"""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The command line of ``eval/general_run.py`` (see :data:`USAGE`); returns the report."""
    parser = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="default", help="Backbone: folder, Hub id or 'default'.")
    parser.add_argument("--model", required=True, help="GRACE model folder or Hub id.")
    parser.add_argument("--text-file", default=None, help="Held-out text, one passage per line.")
    parser.add_argument("--data-dir", default=None, help="Data folder of the default held-out text.")
    parser.add_argument("--max-texts", type=int, default=200, help="Held-out passages to score. Default: 200.")
    parser.add_argument("--questions", default=None, help="Multiple-choice JSONL (default: the bundled set).")
    parser.add_argument("--lm-eval-tasks", nargs="*", default=[], help="lm-evaluation-harness tasks (needs lm-eval).")
    parser.add_argument("--limit", type=int, default=None, help="Examples per lm-eval task.")
    parser.add_argument("--output-dir", default="runs/general", help="Where general.json goes. Default: runs/general.")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    setup_logging()

    if args.text_file:
        texts = read_texts(args.text_file, args.max_texts)
    else:
        texts = held_out_sentences(resolve_data_path(DEFAULT_HELD_OUT, args.data_dir), args.max_texts)
    questions = load_questions(args.questions)
    report = general_report(
        {"base": args.base, "GRACE": args.model},
        texts,
        questions,
        lm_eval_tasks=args.lm_eval_tasks,
        limit=args.limit,
        device=args.device,
    )
    report["table"] = general_table(report)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "general.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(report["table"])
    return report
