"""Publish a saved GRACE model to the Hugging Face Hub (or write the exact folder that would be uploaded).

Usage:
    python eval/publish.py --model runs/grace-sick --repo-id my-org/grace-smollm2-135m --results-dir runs/mteb \
        --dry-run /tmp/grace-publish
    python eval/publish.py --model runs/grace-sick --repo-id my-org/grace-smollm2 --results-dir runs/mteb --private

The folder holds the safetensors weights, the sentence-transformers configs, grace_st.py (the module code, so the
model loads where grace_st is not installed), the mteb results of this exact model and the rendered model card.
The token comes from HF_TOKEN or `hf auth login`; it is never printed.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from grace_st.hub import build_publish_folder, upload_folder


def main(argv: list[str] | None = None) -> Path | str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Folder of a saved GRACE model.")
    parser.add_argument("--repo-id", required=True, help="Hub repository, ORG/NAME.")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument(
        "--dry-run", metavar="OUTDIR", default=None, help="Write the folder to OUTDIR, upload nothing."
    )
    parser.add_argument(
        "--results-dir", default=None, help="mteb output dir of eval/mteb_run.py with this model's results."
    )
    parser.add_argument(
        "--comparison",
        default=None,
        help="Markdown comparison table for the card (default: <results-dir>/comparison.md).",
    )
    parser.add_argument(
        "--template", default=None, help="Model card template (default: model_cards/grace_model_card.md)."
    )
    parser.add_argument("--license", default=None, help="License id for the card metadata, e.g. apache-2.0.")
    parser.add_argument("--no-examples", action="store_true", help="Skip generating example rationales and timing.")
    parser.add_argument("--device", default=None, help="Device for the example rationales.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if "/" not in args.repo_id:
        parser.error(f"--repo-id must be ORG/NAME, got {args.repo_id!r}")
    comparison = args.comparison
    if comparison is None and args.results_dir and (Path(args.results_dir) / "comparison.md").is_file():
        comparison = str(Path(args.results_dir) / "comparison.md")

    def build(target: str) -> Path:
        return build_publish_folder(
            args.model,
            target,
            repo_id=args.repo_id,
            results_dir=args.results_dir,
            comparison=comparison,
            template=args.template,
            measure_examples=not args.no_examples,
            device=args.device,
            license=args.license,
        )

    if args.dry_run:
        folder = build(args.dry_run)
        print(f"Wrote {folder} ({sum(1 for p in folder.rglob('*') if p.is_file())} files); nothing was uploaded.")
        return folder
    with tempfile.TemporaryDirectory(prefix="grace-publish-") as tmp:
        folder = build(str(Path(tmp) / "repo"))
        url = upload_folder(folder, args.repo_id, private=args.private)
    print(f"Uploaded to {args.repo_id}: {url}")
    return url


if __name__ == "__main__":
    main()
