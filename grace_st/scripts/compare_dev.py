"""The command line of the dev-set comparison (``eval/compare_dev.py``): score the rows, write the table and JSON."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from grace_st.evaluation.dev_comparison import (
    DEFAULT_LIMIT,
    DEFAULT_SUMMARY_SUFFIX,
    TRECQA_DEV,
    Row,
    compare,
    comparison_markdown,
    comparison_rows,
    general_check,
    labelled_folder,
    load_dev_sets,
    optional_trecqa_dev,
)
from grace_st.scripts import setup_logging

logger = logging.getLogger(__name__)

USAGE = """The comparison on the dev sets of the data folder: five STS sets (Spearman of cosine, first --limit pairs)
and TrecQA dev (nDCG@10: every answered question retrieves among all answering sentences; never limited).

Usage:
    OMP_NUM_THREADS=1 python eval/compare_dev.py --trained outputs/grace-sick-summary/grace-model \\
        --trained-readout summary --contrastive outputs/cl-sick-summary --out runs/compare --general
    OMP_NUM_THREADS=1 python eval/compare_dev.py --rows "no rationale" echo PromptEOL --limit 10 --out runs/dry
    # several trained models, two seeds each, two +CL baselines (labels name the rows):
    OMP_NUM_THREADS=1 python eval/compare_dev.py --trained "GRACE paper, seed 1=outputs/paper-s1/grace-model" \\
        --trained "GRACE paper, seed 2=outputs/paper-s2/grace-model" \\
        --contrastive "+CL, seed 1=outputs/cl-s1" --contrastive "+CL, seed 2=outputs/cl-s2" --out runs/compare
    # the same rows split over two processes, then one run that only assembles the table from <out>/rows/:
    python eval/compare_dev.py <flags> --rows PromptEOL "GRACE paper, seed 1" --only-row-files --out runs/compare &
    python eval/compare_dev.py <flags> --rows echo "GRACE paper, seed 2" --only-row-files --out runs/compare &
    wait; python eval/compare_dev.py <flags> --out runs/compare

Writes <out>/comparison.md (the table, also printed) and <out>/comparison.json (every number: per-set Spearman and
nDCG@10, the STS mean, the mean over all sets with its bootstrap interval (pairs resampled within each STS set,
questions within TrecQA), each pair's cosine and each question's nDCG, rationale diagnostics, timings, the command),
after the table and again after each further part.

Rows: no rationale, echo, PromptEOL, untrained GRACE (mean / summary readout), +CL, trained GRACE; rows without a
folder are listed as skipped. --trained and --contrastive repeat, each FOLDER or LABEL=FOLDER. One bare --trained
FOLDER gives today's rows "trained GRACE (mean)", "trained GRACE (best readout)" (--trained-readout) and "trained
GRACE (best readout), rationale removed"; a labelled one gives "LABEL" (--trained-readout) and "LABEL, rationale
removed" (same model and readout, no rationale written), no mean row. A bare --contrastive is "+CL (equal budget)",
a labelled one "LABEL". Several folders of one kind need labels; labels must be unique. The untrained rows use the
first trained folder's system prompt and rationale limit. "–" marks a number that does not exist (no rationale).

Every scored row is also saved as <out>/rows/<label>-<hash>.json with a key of everything that changes its numbers
(label, model folder and a fingerprint of its files, options, readout, the sets' texts and sizes, bootstrap seed and
resamples; not the batch size). A later run with the same key reads the file instead of scoring (a changed key
rescores), so an interrupted run resumes, and processes given disjoint --rows share one --out (--only-row-files: fill
<out>/rows/ without writing the table). --no-trecqa gives the five-STS-set table; without the TrecQA file in the data
folder the comparison leaves it out with a logged warning.
"""


def dev_set_parser(description: str, limit: int, out: str) -> argparse.ArgumentParser:
    """An argument parser with the flags of every dev-set command: the backbone and trained folder, the untrained
    model's settings, the data, the bootstrap and the machine (``eval/compare_dev.py``, ``experiments/k_curve.py``).

    Args:
        description: the usage text.
        limit: default pairs per set.
        out: default output folder.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="default", help="Backbone of the training-free rows. Default: default.")
    parser.add_argument(
        "--trained",
        action="append",
        default=None,
        metavar="[LABEL=]FOLDER",
        help="Trained GRACE model folder; repeat for several, each LABEL=FOLDER (the row label).",
    )
    parser.add_argument("--limit", type=int, default=limit, help=f"Pairs per set. Default: {limit}.")
    parser.add_argument("--data-dir", default=None, help="Data folder (default: $GRACE_ST_DATA, else ../shared/data).")
    parser.add_argument("--out", default=out, help=f"Output folder. Default: {out}.")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="Untrained rows' limit (trained's, else 40).")
    parser.add_argument(
        "--system-prompt", default=None, help="Untrained rows' system prompt (trained's, else default)."
    )
    parser.add_argument("--summary-suffix", default=DEFAULT_SUMMARY_SUFFIX, help="Suffix of the summary readout.")
    parser.add_argument("--bootstrap", type=int, default=1000, help="Bootstrap resamples. Default: 1000.")
    parser.add_argument("--seed", type=int, default=0, help="Bootstrap seed. Default: 0.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads. Default: 1.")
    parser.add_argument("--device", default="cpu")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The command line of ``eval/compare_dev.py`` (:data:`USAGE`); returns the report (``"table"``: comparison.md)."""
    parser = dev_set_parser(USAGE, limit=DEFAULT_LIMIT, out="runs/compare")
    parser.add_argument(
        "--trained-readout",
        default="summary",
        help="Readout of the trained rows ('saved': each folder's own). Default: summary.",
    )
    parser.add_argument(
        "--contrastive",
        action="append",
        default=None,
        metavar="[LABEL=]FOLDER",
        help="+CL model folder (training/train_contrastive.py); repeat for several, each LABEL=FOLDER.",
    )
    parser.add_argument("--rows", nargs="*", default=None, metavar="ROW", help="Only these rows (labels).")
    parser.add_argument("--no-trecqa", action="store_true", help="Leave TrecQA dev out (the five STS sets only).")
    parser.add_argument(
        "--only-row-files", action="store_true", help="Score the rows into <out>/rows/ only; write no table."
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace comparison.json/.md already in --out.")
    parser.add_argument("--general", action="store_true", help="Also the general-ability check of trained rows.")
    args = parser.parse_args(argv)
    setup_logging()

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    targets = [out / "comparison.json", out / "comparison.md"]
    if not args.overwrite and not args.only_row_files and any(path.exists() for path in targets):
        raise SystemExit(f"{out} already holds comparison results; pass --overwrite or another --out.")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    dev_sets: dict[str, Any] = dict(load_dev_sets(args.data_dir, args.limit))
    if not args.no_trecqa:
        dev_sets.update(optional_trecqa_dev(args.data_dir))
    # The flags named as comparison_rows names its arguments.
    settings = ("trained", "trained_readout", "contrastive", "max_new_tokens", "system_prompt", "summary_suffix")
    rows = comparison_rows(args.backbone, only=args.rows, **{name: getattr(args, name) for name in settings})
    report: dict[str, Any] = {
        "command": ["eval/compare_dev.py", *(argv if argv is not None else sys.argv[1:])],
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs",
        "rows_options": {row.label: _row_record(row) for row in rows},
    }
    if TRECQA_DEV[0] in dev_sets:  # the questions nDCG cannot score, listed rather than dropped silently
        report["trecqa_unanswered_questions"] = list(dev_sets[TRECQA_DEV[0]].unanswered)

    def save(results: dict[str, Any]) -> None:
        report.update(results, seconds=time.perf_counter() - started)
        if not args.only_row_files:
            targets[0].write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")

    results = compare(
        rows, dev_sets, batch_size=args.batch_size, resamples=args.bootstrap, seed=args.seed, device=args.device,
        on_row=save, rows_dir=out / "rows",
    )  # fmt: skip
    save(results)
    minutes = (time.perf_counter() - started) / 60
    text = f"Spearman of cosine, first {args.limit} pairs per STS set"
    if TRECQA_DEV[0] in dev_sets:
        text += f"; nDCG@10 of all {len(dev_sets[TRECQA_DEV[0]])} answered TrecQA dev questions"
    text += "; mean over all sets\n\n" + comparison_markdown(results)
    text += f"\n{len(results['rows'])} rows in {minutes:.1f} min ({report['machine']}).\n"

    def write(text: str) -> None:  # after each part, so a later failure keeps what was measured
        report["seconds"] = time.perf_counter() - started
        report["table"] = text
        targets[0].write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        targets[1].write_text(text, encoding="utf-8")

    if args.only_row_files:
        logger.info("--only-row-files: %d rows in %s; no table written.", len(results["rows"]), out / "rows")
        report["table"] = text
        return report
    write(text)
    if args.general:
        folders = {}
        for flag, kind in ((args.contrastive, "+CL"), (args.trained, "trained GRACE")):
            for label, folder in map(labelled_folder, flag or ()):
                folders[label or kind] = folder
        if folders:
            report["general"] = general_check(folders, args.backbone, data_dir=args.data_dir, device=args.device)
            text += "\nGeneral abilities (lower perplexity is better)\n\n" + report["general"]["table"]
            write(text)
        else:
            logger.warning("--general needs --trained or --contrastive; nothing to check.")
    return report


def _row_record(row: Row) -> dict[str, Any]:
    spec = row.spec
    return {
        "model": None if spec is None else spec.name_or_path,
        "options": {} if spec is None else dict(spec.options),
        "pooling_mode": row.pooling_mode,
    }
