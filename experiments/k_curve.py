"""Test-time scaling study: dev-set scores against seconds per text for ``num_rationales`` k = 1, 2, 4.

The dev sets are the comparison's: the five STS sets (Spearman, first --limit pairs) and TrecQA dev (nDCG@10 of all
answered questions); ``--sets trecqa`` runs the curve on TrecQA dev only, ``--sets sts`` on the STS sets only.

Usage:
    OMP_NUM_THREADS=1 python experiments/k_curve.py --model outputs/grace-sick-summary/grace-model --readout summary \
        --limit 40 --out runs/k-curve
    OMP_NUM_THREADS=1 python experiments/k_curve.py --limit 20        # the untrained default backbone, greedy k=1
    OMP_NUM_THREADS=1 python experiments/k_curve.py --model outputs/grace-sick-summary/grace-model --sets trecqa \
        --out runs/k-curve-trecqa

k rationales are sampled per text (seeded by the text) for k > 1; k = 1 keeps the model's decoding (greedy). Scores
come from the dev-set comparison of the library (:mod:`grace_st.evaluation.dev_comparison`); writes <out>/k_curve.json
and <out>/k_curve.md and prints the table.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from grace_st.evaluation.dev_comparison import (
    DevSets,
    Row,
    build_row_model,
    grace_options,
    labelled_folder,
    load_dev_sets,
    load_trecqa_dev,
    missing_features,
    optional_trecqa_dev,
    score_model,
)
from grace_st.evaluation.mteb_evaluation import ModelSpec
from grace_st.scripts import setup_logging
from grace_st.scripts.compare_dev import dev_set_parser
from grace_st.tables import format_cell, markdown_table

logger = logging.getLogger("k_curve")
SET_GROUPS = ("sts", "trecqa")


def k_curve(
    spec: ModelSpec,
    dev_sets: DevSets,
    ks: Sequence[int] = (1, 2, 4),
    *,
    pooling_mode: str | None = None,
    sampling: dict[str, Any] | None = None,
    batch_size: int = 16,
    resamples: int = 1000,
    seed: int = 0,
    device: str | None = "cpu",
) -> list[dict[str, Any]]:
    """Test-time scaling: the model of ``spec`` with ``num_rationales=k`` for each k: mean Spearman and seconds/text.

    Args:
        spec: the GRACE model (a backbone with options or a folder); ``num_rationales`` is set per point.
        dev_sets: ``{name: pairs or RetrievalSet}`` (a stated subset, e.g. ``load_dev_sets(limit=20)``, keeps k=4
            affordable; :func:`grace_st.evaluation.dev_comparison.load_trecqa_dev` adds TrecQA dev).
        ks: the values of k. Defaults to (1, 2, 4).
        pooling_mode: the readout (None: the model's).
        sampling: options for k > 1, which must sample (each text's k rationales are seeded from the text). Defaults
            to ``{"do_sample": True}`` (the model's temperature, top-p, top-k); k = 1 keeps the spec's decoding
            (greedy by default), the default of the module.
        batch_size, resamples, seed, device: see :func:`grace_st.evaluation.dev_comparison.compare`.

    Returns:
        One dict per k: ``{"k", "mean", "ci95", "scores" (per set: Spearman or nDCG@10), "spearman", "sts_mean",
        "seconds_per_text", "finish_rate", "mean_length", "pairs_per_set"}``.

    Raises:
        ValueError: this grace_st has no ``num_rationales`` option, or a k is not an integer >= 1.
    """
    if missing_features(["num_rationales"]):
        raise ValueError("k_curve needs the Transformer option num_rationales, which this grace_st lacks.")
    points = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r} is not allowed; use integers >= 1.")
        options = {**dict(spec.options), "num_rationales": k}
        if k > 1:
            options.update(sampling if sampling is not None else {"do_sample": True})
        row = Row(f"k={k}", ModelSpec(spec.name_or_path, f"k={k}", tuple(sorted(options.items()))), None, pooling_mode)
        result = score_model(
            build_row_model(row, device), dev_sets, batch_size=batch_size, resamples=resamples, seed=seed
        )
        keep = ("mean", "ci95", "scores", "spearman", "sts_mean", "seconds_per_text", "finish_rate", "mean_length")
        keep += ("copy_rate",)
        decoding = "sampled" if options.get("do_sample") else "greedy"
        points.append(
            {
                "k": k,
                "decoding": decoding,
                **{key: result[key] for key in keep},
                "pairs_per_set": results_sizes(dev_sets),
            }
        )
        logger.info("k=%d: mean %.4f, %.3f s/text", k, result["mean"], result["seconds_per_text"] or 0.0)
    return points


def results_sizes(dev_sets: DevSets) -> dict[str, int]:
    """``{set: number of pairs (STS) or questions (retrieval)}``."""
    return {name: len(pairs) for name, pairs in dev_sets.items()}


def k_curve_markdown(points: Sequence[dict[str, Any]]) -> str:
    """The k-curve as a table: k, each set's score, the mean, its 95% interval, seconds per text, finish, length."""
    sets = list(points[0]["scores"]) if points else []
    rows = [
        [
            p["k"],
            p["decoding"],
            *(p["scores"][name] for name in sets),
            p["mean"],
            f"[{format_cell(p['ci95']['low'])}, {format_cell(p['ci95']['high'])}]",
            None if p["seconds_per_text"] is None else f"{p['seconds_per_text']:.3f}",
            p["finish_rate"],
            None if p["mean_length"] is None else f"{p['mean_length']:.1f}",
        ]
        for p in points
    ]
    return markdown_table(["k", "decoding", *sets, "mean", "95% CI", "s/text", "finish", "length"], rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The command line (see the module docstring); returns ``{"k_curve": points, "table": markdown}``."""
    parser = dev_set_parser(__doc__, limit=20, out="runs/k-curve")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4], help="k values. Default: 1 2 4.")
    parser.add_argument("--model", default=None, help="A GRACE folder (default: the untrained backbone).")
    parser.add_argument("--readout", default=None, help="Readout (default: the model's).")
    parser.add_argument(
        "--sets",
        nargs="+",
        choices=SET_GROUPS,
        default=None,
        help="Dev sets: sts (the five STS sets), trecqa (TrecQA dev, nDCG@10). Default: both, TrecQA left out with a "
        "warning when the data folder lacks it (named explicitly, a missing file is an error).",
    )
    args = parser.parse_args(argv)
    setup_logging()

    import torch

    torch.set_num_threads(args.threads)
    trained = labelled_folder(args.trained[0])[1] if args.trained else None
    options = grace_options(trained, args.max_new_tokens, args.system_prompt)
    if args.readout and "summary" in args.readout:
        options["summary_suffix"] = args.summary_suffix
    if args.model:
        spec = ModelSpec(args.model, "k curve")
    else:
        spec = ModelSpec(args.backbone, "k curve", tuple(sorted(options.items())))
    started = time.perf_counter()
    sets = args.sets or list(SET_GROUPS)
    dev_sets: DevSets = load_dev_sets(args.data_dir, args.limit) if "sts" in sets else {}
    if "trecqa" in sets:
        dev_sets.update(load_trecqa_dev(args.data_dir) if args.sets else optional_trecqa_dev(args.data_dir))
    points = k_curve(
        spec, dev_sets, args.k, pooling_mode=args.readout,
        batch_size=args.batch_size, resamples=args.bootstrap, seed=args.seed, device=args.device,
    )  # fmt: skip
    text = f"num_rationales curve ({spec.name_or_path}, {dict(spec.options)}), sets {sets} (first {args.limit} "
    text += "pairs per STS set, all answered TrecQA questions), "
    text += f"{(time.perf_counter() - started) / 60:.1f} min\n\n" + k_curve_markdown(points)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "k_curve.json").write_text(json.dumps({"k_curve": points}, indent=2, default=str) + "\n", encoding="utf-8")
    (out / "k_curve.md").write_text(text, encoding="utf-8")
    return {"k_curve": points, "table": text}


if __name__ == "__main__":
    print(main()["table"])
