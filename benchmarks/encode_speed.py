"""Encode-path benchmark: what pooling, a second pass and repeated texts cost on top of generation.

Usage:
    .venv/bin/python benchmarks/encode_speed.py [--texts 64] [--batch-size 16] [--max-new-tokens 48]
        [--memory-texts 1000] [--repeats 2]

Prints, measured in this run on the same real sentences (STS files of the data folder: $GRACE_ST_DATA, else
../shared/data from the working directory) with the default backbone:
  (a) encode time / time of model.generate alone on the same batches and settings,
  (b) single-pass encode / two-pass encode (and the largest embedding difference, fp32),
  (c) encode of a list where half the texts are repeats / encode of all-unique texts,
  (e) peak RSS of encode vs generate alone over --memory-texts texts (each in a fresh child process).
Times are the minimum over --repeats interleaved runs (the CPU may be shared). Only the standard library and the
project are used.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def real_sentences(limit: int) -> list[str]:
    """Unique sentences from the STS 2012/2013 files of the data folder (grace_st.readers.data_dir)."""
    from grace_st.readers import data_dir, read_pairs

    folder = data_dir()
    files = sorted((folder / "sts2012").glob("*.tsv")) + sorted((folder / "sts2013").glob("*.tsv"))
    if not files:
        raise SystemExit(f"Real sentences not found under {folder}; set $GRACE_ST_DATA or run beside ../shared/data.")
    seen: dict[str, None] = {}
    for file in files:
        for pair in read_pairs(file, format="sts"):
            seen.update(dict.fromkeys(text for text in (pair.sentence1, pair.sentence2) if text))
            if len(seen) >= limit:
                return list(seen)[:limit]
    return list(seen)[:limit]


def build(max_new_tokens: int, single_pass: bool = True):
    import grace_st

    return grace_st.from_backbone(
        grace_st.default_backbone(), max_new_tokens=max_new_tokens, single_pass=single_pass, device="cpu"
    )


def generate_only(model, texts: list[str], batch_size: int) -> None:
    """model.generate alone on the batches encode would form (length-sorted), same settings."""
    import torch

    module = model[0]
    ordered = sorted(texts, key=len, reverse=True)
    with torch.inference_mode():
        for start in range(0, len(ordered), batch_size):
            features = module.preprocess(ordered[start : start + batch_size])
            module.model.generate(
                input_ids=features["input_ids"],
                attention_mask=features["attention_mask"],
                **module.generation_kwargs(),
            )


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def child(mode: str, n: int, batch_size: int, max_new_tokens: int) -> None:
    """Run one workload in this (fresh) process and print its peak RSS in MiB as JSON."""
    model = build(max_new_tokens)
    texts = real_sentences(n)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if mode == "encode":
        model.encode(texts, batch_size=batch_size)
    else:
        generate_only(model, texts, batch_size)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "peak_rss_mib": peak, "after_load_mib": baseline}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--memory-texts", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=["encode", "generate"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.memory_texts, args.batch_size, args.max_new_tokens)
        return

    import numpy as np

    texts = real_sentences(args.texts)
    half = texts[: len(texts) // 2]
    with_repeats = half + half
    single, double = build(args.max_new_tokens, True), build(args.max_new_tokens, False)
    kwargs = {"batch_size": args.batch_size, "show_progress_bar": False}
    times: dict[str, list[float]] = {k: [] for k in ("generate", "single", "double", "unique", "repeats")}
    for _ in range(args.repeats):
        times["generate"].append(timed(lambda: generate_only(single, texts, args.batch_size)))
        times["single"].append(timed(lambda: single.encode(texts, **kwargs)))
        times["double"].append(timed(lambda: double.encode(texts, **kwargs)))
        times["repeats"].append(timed(lambda: single.encode(with_repeats, **kwargs)))
    times["unique"] = times["single"]
    best = {k: min(v) for k, v in times.items()}
    delta = float(np.abs(single.encode(texts[:16], **kwargs) - double.encode(texts[:16], **kwargs)).max())

    peaks = {}
    for mode in ("generate", "encode"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--memory-texts",
                str(args.memory_texts),
                "--batch-size",
                str(args.batch_size),
                "--max-new-tokens",
                str(args.max_new_tokens),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        peaks[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]

    print(f"{len(texts)} real sentences, batch {args.batch_size}, greedy, max_new_tokens={args.max_new_tokens}, CPU")
    print("| measure | value | target |")
    print("|---|---|---|")
    print(
        f"| (a) encode / generate alone | {best['single'] / best['generate']:.3f} "
        f"({best['single']:.1f} s / {best['generate']:.1f} s) | <= 1.10 |"
    )
    print(
        f"| (b) single-pass / two-pass | {best['single'] / best['double']:.3f} "
        f"({best['single']:.1f} s / {best['double']:.1f} s), max abs diff {delta:.1e} | < 1, diff < 1e-5 |"
    )
    print(
        f"| (c) half repeats / all unique | {best['repeats'] / best['unique']:.3f} "
        f"({best['repeats']:.1f} s / {best['unique']:.1f} s) | <= 0.60 |"
    )
    print(
        f"| (e) peak RSS, encode / generate, {args.memory_texts} texts | {peaks['encode'] / peaks['generate']:.3f} "
        f"({peaks['encode']:.0f} MiB / {peaks['generate']:.0f} MiB) | <= 1.5 |"
    )


if __name__ == "__main__":
    main()
