"""Regression check of the encode path: embeddings and rationales of 20 real sentences, saved once and compared later.

Usage:
    .venv/bin/python benchmarks/reference_check.py --save /tmp/grace-ref.npz      # on the version you trust
    .venv/bin/python benchmarks/reference_check.py --compare /tmp/grace-ref.npz   # on the changed version

The sentences are the first 20 distinct sentences of STS 2013 headlines (``sts2013/headlines.test.tsv`` of the data
folder: --data-dir, else $GRACE_ST_DATA, else ../shared/data from the working directory; read with
grace_st.readers.read_pairs); the model is the untrained default backbone with the default GRACE settings (greedy,
128 new tokens), encoded in batches of 8. ``--compare``
prints the largest absolute embedding difference and the number of rationales that differ, and exits non-zero when
either check fails (max |diff| >= 1e-5 or any rationale differs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

import grace_st
from grace_st.readers import read_pairs, resolve_data_path

HEADLINES = "sts2013/headlines.test.tsv"


def sentences(n: int = 20, data_dir: str | None = None) -> list[str]:
    """The first ``n`` distinct sentences of STS 2013 headlines, in file order (sentence1 before sentence2)."""
    distinct = dict.fromkeys(text for pair in read_pairs(resolve_data_path(HEADLINES, data_dir)) for text in pair[:2])
    return list(distinct)[:n]


def run(batch_size: int, data_dir: str | None = None) -> tuple[np.ndarray, list[str]]:
    model = grace_st.from_backbone(grace_st.default_backbone(), device="cpu")
    items = model.encode(sentences(data_dir=data_dir), batch_size=batch_size, output_value=None)
    embeddings = np.stack([torch.as_tensor(item["sentence_embedding"]).float().numpy() for item in items])
    return embeddings, [model[0].decode_rationale(item) for item in items]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", help="write the reference .npz here")
    group.add_argument("--compare", help="compare with this reference .npz")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data-dir", default=None, help="data folder (default: $GRACE_ST_DATA or ../shared/data)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    embeddings, rationales = run(args.batch_size, args.data_dir)
    print(f"encoded {len(rationales)} sentences in {time.perf_counter() - start:.1f} s")
    if args.save:
        np.savez(args.save, embeddings=embeddings, rationales=json.dumps(rationales))
        print(f"saved the reference to {args.save}")
        return
    reference = np.load(args.compare)
    ref_rationales = json.loads(str(reference["rationales"]))
    diff = float(np.abs(embeddings - reference["embeddings"]).max())
    differ = [i for i, (a, b) in enumerate(zip(rationales, ref_rationales, strict=True)) if a != b]
    print(f"max |embedding diff| = {diff:.3g}; rationales that differ: {len(differ)} of {len(rationales)} {differ}")
    sys.exit(0 if diff < 1e-5 and not differ else 1)


if __name__ == "__main__":
    main()
