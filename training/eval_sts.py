"""Score GRACE models and the cheap baselines on real STS pairs from ../shared/data (Spearman of cosine).

Usage:
    python training/eval_sts.py --model outputs/grace-sick/grace-model [--limit 200] [--threads 1]
    python training/eval_sts.py --model outputs/grace-sick/grace-model --contrastive outputs/cl-sick

Rows: no rationale, echo, untrained GRACE (the trained model's prompt and rationale length on the untrained
backbone), optionally a contrastive (+CL) model, and each --model. Sets: the first --limit pairs of SICK_trial
(relatedness) and of STS 2013 headlines. Rationale diagnostics (finish rate, copy rate, mean length) are printed too.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer

import grace_st
from grace_st.quickeval import format_table, read_sts_pairs, sts_spearman

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SETS = {"sick_trial": "sick2014/SICK_trial.txt", "sts13_headlines": "sts2013/headlines.test.tsv"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="trained GRACE model folder (repeatable)")
    parser.add_argument("--contrastive", default=None, help="a contrastive (+CL) model folder")
    parser.add_argument("--data-dir", default=str(DATA))
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    pairs = {name: read_sts_pairs(str(Path(args.data_dir) / rel), limit=args.limit) for name, rel in SETS.items()}
    reference = SentenceTransformer(args.model[0], trust_remote_code=True, device="cpu") if args.model else None
    options = {}
    if reference is not None:
        options = {"system_prompt": reference[0].system_prompt, "max_new_tokens": reference[0].max_new_tokens}
    backbone = grace_st.default_backbone()
    candidates = [
        ("no rationale", lambda: grace_st.from_backbone(backbone, rationale_mode="none", device="cpu", **options)),
        ("echo", lambda: grace_st.from_backbone(backbone, rationale_mode="echo", device="cpu", **options)),
        ("GRACE untrained", lambda: grace_st.from_backbone(backbone, device="cpu", **options)),
    ]
    if args.contrastive:
        candidates.append(("contrastive (+CL)", lambda: SentenceTransformer(args.contrastive, trust_remote_code=True)))
    for path in args.model:
        candidates.append((f"trained: {path}", lambda path=path: SentenceTransformer(path, trust_remote_code=True)))
    rows = []
    for name, load in candidates:
        model = load()
        scores = {}
        for set_name, set_pairs in pairs.items():
            result = sts_spearman(model, set_pairs, batch_size=args.batch_size)
            scores[set_name] = result["spearman"]
            for key in ("finish_rate", "copy_rate", "mean_length", "seconds"):
                scores[f"{set_name}:{key}"] = result[key]
        rows.append((name, scores))
        print(f"{name}: " + ", ".join(f"{k} {scores[k]:.4f}" for k in pairs), flush=True)
    columns = [*pairs, "sick_trial:finish_rate", "sick_trial:copy_rate", "sick_trial:mean_length"]
    print(f"\nSpearman (cosine) on the first {args.limit} pairs of each set")
    print(format_table(rows, columns))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows), indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
