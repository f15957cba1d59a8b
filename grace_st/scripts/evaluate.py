"""The command line of mteb evaluation (``grace-st-eval``, ``eval/mteb_run.py``): evaluate, print, save the table."""

from __future__ import annotations

import argparse
from pathlib import Path

from grace_st.evaluation.local_tasks import resolve_tasks
from grace_st.evaluation.mteb_evaluation import (
    DEFAULT_BASELINE_MAX_NEW_TOKENS,
    ModelSpec,
    baseline_options,
    comparison_table,
    evaluate_model,
    standard_rows,
)
from grace_st.scripts import setup_logging

USAGE = """Evaluate a GRACE model (or any SentenceTransformer) with mteb; optionally compare it with other models.

Usage:
    python eval/mteb_run.py --model default@max_new_tokens=32 --local-task sick_trial_relatedness \\
        --compare "echo=default@rationale_mode=echo" --compare "no rationale=default@rationale_mode=none"
    python eval/mteb_run.py --model outputs/grace-sick/grace-model --baselines default \\
        --compare "contrastive (+CL)=outputs/cl-sick" --local-task sick_trial_relatedness sts13_headlines
    python eval/mteb_run.py --model runs/grace-sick --benchmark "MTEB(eng, v1)" --output-dir runs/mteb   # Hub access

A model is ``[LABEL=]NAME_OR_PATH[@KEY=VALUE,...]``: a GRACE folder, a SentenceTransformer folder or Hub id, a causal
LM (made into GRACE), or ``default`` (the embedded SmolLM2-135M-Instruct); KEY=VALUE override GRACE options
(rationale_mode, max_new_tokens, ...). --local-task takes spec files or the names of the bundled specs (msrp_pairs,
msrp_retrieval, sick_contradiction, sick_trial_relatedness, sts12_msrpar, sts13_headlines, trecqa_dev), whose data is
read from --data-dir, else $GRACE_ST_DATA, else ../shared/data from the working directory. Results are written in
mteb's results layout under --output-dir and reused on the next run; the comparison table is printed and saved to
<output-dir>/comparison.md.
"""


def main(argv: list[str] | None = None) -> str:
    """The command line of ``grace-st-eval`` and ``eval/mteb_run.py`` (:data:`USAGE`); returns the table."""
    parser = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Model spec: [LABEL=]NAME_OR_PATH[@KEY=VALUE,...].")
    parser.add_argument("--tasks", nargs="*", default=[], help="mteb task names, e.g. STS13 SICK-R.")
    parser.add_argument("--benchmark", default=None, help='mteb benchmark, e.g. "MTEB(eng, v1)" (needs Hub access).')
    parser.add_argument(
        "--local-task", nargs="*", default=[], help="Local task spec files, or names of bundled specs."
    )
    parser.add_argument(
        "--data-dir", default=None, help="Data folder of local specs (default: $GRACE_ST_DATA, else ../shared/data)."
    )
    parser.add_argument(
        "--output-dir", default="runs/mteb", help="Results root (mteb results layout). Default: runs/mteb."
    )
    parser.add_argument(
        "--compare", action="append", default=[], help="Another model spec for the table (repeatable)."
    )
    parser.add_argument(
        "--baselines",
        default=None,
        metavar="BACKBONE",
        help="Add the no-rationale, echo and untrained GRACE rows of BACKBONE (e.g. default) to the comparison; "
        "they use the system prompt and rationale limit of --model when it is a GRACE folder.",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="Rationale limit of the --baselines rows (default: that of --model, else "
        f"{DEFAULT_BASELINE_MAX_NEW_TOKENS}).",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="Encode batch size. Default: 16.")
    parser.add_argument("--device", default=None, help="torch device (default: what sentence-transformers picks).")
    parser.add_argument("--overwrite", action="store_true", help="Recompute results that already exist.")
    args = parser.parse_args(argv)
    setup_logging()

    tasks = resolve_tasks(args.tasks, args.benchmark, args.local_task, data_dir=args.data_dir)
    if not tasks:
        parser.error("no tasks: give --tasks, --benchmark or --local-task")
    model = ModelSpec.parse(args.model)
    # Table order of issue 7: cheap baselines first, then other models, the model under test last.
    specs = []
    if args.baselines:
        options = baseline_options(model)
        if args.max_new_tokens is not None:
            options["max_new_tokens"] = args.max_new_tokens
        options.setdefault("max_new_tokens", DEFAULT_BASELINE_MAX_NEW_TOKENS)
        specs += standard_rows(args.baselines, **options)
    specs += [ModelSpec.parse(text) for text in args.compare]
    specs.append(model)

    rows = []
    for spec in specs:
        row = evaluate_model(
            spec, tasks, args.output_dir, batch_size=args.batch_size, device=args.device, overwrite=args.overwrite
        )
        reused = f", reused {len(row.reused)}/{len(tasks)} task results" if row.reused else ""
        print(f"{row.label}: {row.seconds:.1f} s{reused}")
        rows.append(row)
    table = comparison_table(rows, [t.metadata.name for t in tasks])
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "comparison.md").write_text(table, encoding="utf-8")
    print(table)
    return table
