"""Ray scaling benchmark: corpus encoding on Ray Data with 2 actors against 1, and Ray with 1 actor against
``encode_corpus`` in one process; and whether they give the same embeddings and rationales.

Usage:
    .venv/bin/python benchmarks/ray_scaling.py [--texts 256] [--max-new-tokens 48] [--batch-size 16]
        [--rows-per-shard 32] [--num-cpus 2] [--actors 1,2]
    .venv/bin/python benchmarks/ray_scaling.py --texts 500 --actors 2   # the identity check alone

On real sentences (../shared/data STS files), the real default backbone (``grace_st.default_backbone()``), greedy
decoding and one torch thread per actor (and in the single process), it encodes the same texts three times:
``encode_corpus`` in this process, then ``encode_corpus_on_ray`` with 1 and with 2 actors on a local Ray cluster
of ``--num-cpus`` CPUs started for each run. It prints, per run, the wall time (Ray: cluster start and model loads
included) and the steady-state time (Ray: from the first batch's start to the last batch's end in the actors), and:
  - throughput of 2 actors / 1 actor (target >= 1.6), steady state and wall;
  - time of Ray with 1 actor / ``encode_corpus`` in one process (target <= 1.10), steady state and wall;
  - the largest embedding difference and the number of differing rationales, Ray (2 actors) against one process.
The load average of the machine is printed before and after, with its parallel headroom: the throughput of two
processes spinning in pure Python at once over one alone (2.0 on two idle cores). Other processes on a shared machine
slow the runs with more actors most: 2 actors / 1 actor cannot exceed the headroom.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encode_speed import real_sentences  # noqa: E402

SPIN = "import time; t = time.perf_counter(); sum(range(40_000_000)); print(time.perf_counter() - t)"


def headroom() -> float:
    """Throughput of two pure-Python processes at once over one alone: the cores this machine gives right now."""
    alone = float(subprocess.run([sys.executable, "-c", SPIN], capture_output=True, text=True).stdout)
    pair = [subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    together = max(float(p.communicate()[0]) for p in pair)
    return 2 * alone / together


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rows-per-shard", type=int, default=32)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--actors", default="1,2", help="Ray runs to make (the ratios need 1,2).")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported; Ray's workers inherit it
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    import grace_st
    from grace_st.encoding import encode_corpus
    from grace_st.encoding.distributed import encode_corpus_on_ray, read_encoded

    torch.set_num_threads(1)
    print(f"load average before: {os.getloadavg()}, parallel headroom {headroom():.2f}")
    texts = real_sentences(args.texts)
    with tempfile.TemporaryDirectory(prefix="grace-ray-bench-") as tmp:
        folder = Path(tmp) / "model"
        grace_st.from_backbone(grace_st.default_backbone(), max_new_tokens=args.max_new_tokens, device="cpu").save(
            str(folder)
        )
        corpus = Path(tmp) / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))

        model = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
        start = time.perf_counter()
        single = encode_corpus(model, texts, batch_size=args.batch_size)
        single_seconds = time.perf_counter() - start
        del model
        print(f"encode_corpus, one process: {single_seconds:.1f} s ({len(texts) / single_seconds:.2f} texts/s)")

        runs = {}
        for workers in sorted({int(n) for n in args.actors.split(",")}):
            import ray

            ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING")
            try:
                summary = encode_corpus_on_ray(
                    folder,
                    corpus,
                    Path(tmp) / f"out-{workers}",
                    num_workers=workers,
                    batch_size=args.batch_size,
                    rows_per_shard=args.rows_per_shard,
                )
            finally:
                ray.shutdown()
            runs[workers] = summary
            print(
                f"Ray, {workers} actor(s): wall {summary.seconds:.1f} s, steady state {summary.encode_seconds:.1f} s "
                f"({len(texts) / summary.encode_seconds:.2f} texts/s), {len({b['pid'] for b in summary.batches})} "
                "actor processes wrote"
            )
        two = runs[max(runs)]
        if {1, 2} <= set(runs):
            one = runs[1]
            print(
                f"throughput 2 actors / 1 actor: steady state {one.encode_seconds / two.encode_seconds:.2f}, "
                f"wall {one.seconds / two.seconds:.2f} (target >= 1.6)"
            )
            print(
                f"Ray 1 actor / encode_corpus in one process: steady state {one.encode_seconds / single_seconds:.2f}, "
                f"wall {one.seconds / single_seconds:.2f} (target <= 1.10)"
            )
        result = read_encoded(two.output)
        assert result.ids.tolist() == list(range(len(texts))), "each id once, in input order"
        differing = sum(a != b for a, b in zip(result.rationales, single.rationales, strict=True))
        print(
            f"Ray {max(runs)} actor(s) vs one process, {len(texts)} texts: max |d embedding| "
            f"{np.abs(result.embeddings - single.embeddings).max():.2e}, rationales differing: {differing}"
        )
    print(f"load average after: {os.getloadavg()}, parallel headroom {headroom():.2f}")


if __name__ == "__main__":
    main()
