"""The command line of publishing (``grace-st-publish``, ``eval/publish.py``): build the folder, upload it."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from grace_st.hub.publish import build_publish_folder, upload_folder
from grace_st.scripts import setup_logging

PUBLISH_USAGE = """Publish a saved GRACE model to the Hugging Face Hub (or write the folder that would be uploaded).

Usage:
    grace-st-publish --model runs/grace-sick --repo-id my-org/grace-smollm2-135m --results-dir runs/mteb \\
        --dry-run /tmp/grace-publish
    grace-st-publish --model runs/grace-sick --repo-id my-org/grace-smollm2 --results-dir runs/mteb --private
(`python eval/publish.py ...` is the same command.)

The folder holds the safetensors weights, the sentence-transformers configs, grace_st.py (the module code, so the
model loads where grace_st is not installed), the mteb results of this exact model and the rendered model card.
An upload then pins the card's usage snippet to the commit it made (revision=...). The token comes from HF_TOKEN or
`hf auth login`; it is never printed.
"""


def publish_parser() -> argparse.ArgumentParser:
    """The argument parser of ``grace-st-publish``."""
    parser = argparse.ArgumentParser(
        prog="grace-st-publish", description=PUBLISH_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="Folder of a saved GRACE model.")
    parser.add_argument("--repo-id", required=True, help="Hub repository, ORG/NAME.")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument(
        "--dry-run", metavar="OUTDIR", default=None, help="Write the folder to OUTDIR, upload nothing."
    )
    parser.add_argument(
        "--results-dir", default=None, help="mteb output dir of grace-st-eval with this model's results."
    )
    parser.add_argument(
        "--comparison",
        default=None,
        help="Markdown comparison table for the card (default: <results-dir>/comparison.md).",
    )
    parser.add_argument("--template", default=None, help="Model card template (default: the one grace_st ships).")
    parser.add_argument("--license", default=None, help="License id for the card metadata, e.g. apache-2.0.")
    parser.add_argument("--no-examples", action="store_true", help="Skip generating example rationales and timing.")
    parser.add_argument("--device", default=None, help="Device for the example rationales.")
    return parser


def main(argv: list[str] | None = None) -> None:
    """``grace-st-publish``: build the publish folder; write it to ``--dry-run`` or upload it and print the commit."""
    parser = publish_parser()
    args = parser.parse_args(argv)
    setup_logging()
    if args.repo_id.count("/") != 1 or not all(args.repo_id.split("/")):
        parser.error(f"--repo-id must be ORG/NAME, got {args.repo_id!r}")
    comparison = args.comparison
    if comparison is None and args.results_dir and (Path(args.results_dir) / "comparison.md").is_file():
        comparison = str(Path(args.results_dir) / "comparison.md")

    def build(target: str | Path) -> Path:
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
        return
    with tempfile.TemporaryDirectory(prefix="grace-publish-") as tmp:
        folder = build(Path(tmp) / "repo")
        url = upload_folder(folder, args.repo_id, private=args.private)
    print(f"Uploaded to {args.repo_id}: {url}")
