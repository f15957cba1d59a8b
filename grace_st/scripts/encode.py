"""The command line of corpus encoding on Ray Data (``grace-st-encode``): parse the flags, run
:func:`grace_st.encoding.distributed.encode_corpus_on_ray`, print a one-line summary."""

from __future__ import annotations

import argparse

from grace_st.encoding.distributed import encode_corpus_on_ray
from grace_st.scripts import setup_logging

ENCODE_USAGE = """Encode a corpus with a GRACE model on Ray Data: one model per actor, shards that a rerun resumes.

Usage:
    grace-st-encode --model runs/grace-sick --input corpus.jsonl --output encoded/ --num-workers 2
    grace-st-encode --model my-org/grace-smollm2 --revision <commit> --input s3://bucket/corpus/ \\
        --output /shared/encoded --address auto --num-workers 16 --gpus-per-worker 1

The input is Parquet, JSONL or CSV (a file, a folder or several), with a text column and an id column (without one,
the row's position is the id). The output folder gets manifest.json and part-*.parquet shards (id, position,
embedding, rationale, finished); rerunning the same command encodes only the texts not yet written. Read it with
grace_st.encoding.distributed.read_encoded. Needs the distributed extra: pip install "grace-st[distributed]".
"""


# Flags passed to encode_corpus_on_ray under their own names.
ENCODE_OPTIONS = (
    "revision",
    "text_column",
    "id_column",
    "num_workers",
    "cpus_per_worker",
    "gpus_per_worker",
    "batch_size",
    "rows_per_shard",
    "prompt_name",
    "address",
)


def encode_parser() -> argparse.ArgumentParser:
    """The argument parser of ``grace-st-encode``."""
    parser = argparse.ArgumentParser(
        prog="grace-st-encode", description=ENCODE_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="Folder of a saved GRACE model, or a Hub id.")
    parser.add_argument("--revision", default=None, help="Hub revision of the model (commit, branch or tag).")
    parser.add_argument("--input", required=True, nargs="+", help="Parquet/JSONL/CSV file(s) or folder(s).")
    parser.add_argument("--output", required=True, help="Output folder (new, or one an earlier run wrote).")
    parser.add_argument("--text-column", default="text", help="Column of the texts (default: text).")
    parser.add_argument(
        "--id-column", default=None, help="Column of the ids (default: id where the input has it, else row positions)."
    )
    parser.add_argument("--address", default=None, help="Ray cluster address (default: a local cluster for the run).")
    parser.add_argument("--num-workers", type=int, default=1, help="Actors, one model each (default: 1).")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per actor (default: 1).")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per actor (default: 0).")
    parser.add_argument("--batch-size", type=int, default=32, help="Texts decoded together per actor (default: 32).")
    parser.add_argument(
        "--rows-per-shard", type=int, default=None, help="Texts per Ray batch and output shard (default: up to 1024)."
    )
    parser.add_argument("--prompt-name", default=None, help="A saved prompt of the model (default: its default).")
    parser.add_argument("--no-normalize", action="store_true", help="Store embeddings without L2 normalisation.")
    return parser


def main(argv: list[str] | None = None) -> None:
    """``grace-st-encode``: :func:`grace_st.encoding.distributed.encode_corpus_on_ray`, then a one-line summary."""
    parser = encode_parser()
    args = parser.parse_args(argv)
    setup_logging()
    try:
        summary = encode_corpus_on_ray(
            args.model,
            args.input,
            args.output,
            normalize_embeddings=not args.no_normalize,
            **{name: getattr(args, name) for name in ENCODE_OPTIONS},
        )
    except (ValueError, FileNotFoundError, ImportError) as error:
        parser.exit(2, f"grace-st-encode: error: {error}\n")
    print(summary.line())
