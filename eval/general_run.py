"""General-ability check: does the GRACE model's LM still work as well as its backbone's?

Usage:
    python eval/general_run.py --base default --model runs/grace-sick                      # offline
    python eval/general_run.py --base HuggingFaceTB/SmolLM2-135M-Instruct --model org/grace \
        --lm-eval-tasks gsm8k mmlu --limit 200                                             # lm-eval, Hub access

Offline it reports perplexity on held-out text (default: news sentences of STS 2012 MSRpar.train from
../shared/data, which neither training nor the dev tasks use) and log-likelihood accuracy on
eval/data/general_mc.jsonl (40 questions written for this project), for each model; results go to
<output-dir>/general.json and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from grace_st.general import held_out_sentences, load_lm, load_questions, multiple_choice, perplexity, run_lm_eval

HERE = Path(__file__).resolve().parent
DATA_DIR = Path(os.environ.get("GRACE_ST_DATA") or HERE.parents[1] / "shared" / "data")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="default", help="Backbone: folder, Hub id or 'default'.")
    parser.add_argument("--model", required=True, help="GRACE model folder or Hub id.")
    parser.add_argument("--text-file", default=None, help="Held-out text, one passage per line.")
    parser.add_argument("--max-texts", type=int, default=200, help="Held-out passages to score. Default: 200.")
    parser.add_argument("--questions", default=str(HERE / "data" / "general_mc.jsonl"), help="Multiple-choice JSONL.")
    parser.add_argument("--lm-eval-tasks", nargs="*", default=[], help="lm-evaluation-harness tasks (needs lm-eval).")
    parser.add_argument("--limit", type=int, default=None, help="Examples per lm-eval task.")
    parser.add_argument("--output-dir", default="runs/general", help="Where general.json goes. Default: runs/general.")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.text_file:
        lines = Path(args.text_file).read_text(encoding="utf-8").splitlines()
        texts = [t.strip() for t in lines if t.strip()][: args.max_texts]
    else:
        texts = held_out_sentences(DATA_DIR / "sts2012" / "MSRpar.train.tsv", args.max_texts)
    questions = load_questions(args.questions)
    report: dict = {"held_out_texts": len(texts), "questions": len(questions), "models": {}}
    for label, name in (("base", args.base), ("GRACE", args.model)):
        model, tokenizer = load_lm(name, device=args.device)
        row = {"name": name, "perplexity": perplexity(model, tokenizer, texts)}
        row.update(multiple_choice(model, tokenizer, questions))
        if args.lm_eval_tasks:
            row["lm_eval"] = run_lm_eval(name, args.lm_eval_tasks, limit=args.limit, device=args.device)
        report["models"][label] = row
        del model
    table = [
        f"| model | perplexity ({len(texts)} held-out texts) | MC acc ({len(questions)} q.) | MC acc_norm |",
        "|---|---:|---:|---:|",
    ]
    for label, row in report["models"].items():
        table.append(f"| {label} | {row['perplexity']:.2f} | {row['acc']:.3f} | {row['acc_norm']:.3f} |")
    report["table"] = "\n".join(table) + "\n"
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "general.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(report["table"])
    return report


if __name__ == "__main__":
    main()
