"""Encode-path benchmark: encode (decode engine, reference path) against ``model.generate`` alone, and the work done.

Usage:
    .venv/bin/python benchmarks/encode_speed.py [--texts 64] [--batch-size 16] [--large-batch 64] [--repeats 3]
        [--settings paper48,paper128,sick40] [--trained FOLDER] [--memory] [--extras] [--memory-texts 1000]

For each setting (``paper48``: the paper's prompt, 48 new tokens; ``paper128``: 128 new tokens; ``sick40``: the
system prompt of training/configs/sick.yaml, 40 new tokens; ``trained``, with --trained: a saved model with its own
settings and readout), on the same real sentences (../shared/data STS files),
the default backbone, greedy decoding, one thread, prints:
  (a) encode / time of model.generate alone on the same length-sorted batches and settings, for continuous batching
      (``grace_st.encoding.encode_corpus``, ``schedule="continuous"``: finished rows hand their slot to the next
      text), for the decode engine one batch at a time (``model.encode``, ``decode_path="engine"``, the default)
      and for the reference path (``"generate"``: generate + one step); and model.encode with --large-batch
      (64) texts per batch against model.generate over the same batches of 64,
      as the ratio of medians over --repeats interleaved runs (wall clock; CPU time of this process beside it,
      which other processes on a loaded machine disturb less); no embedding or rationale cache between runs;
  (w) the work each path does, counted in an untimed pass: decode forward calls (on a CPU each costs a fixed read
      of the weights plus a little per row, so calls matter more than rows), decode row-steps computed / useful
      (useful: one per rationale token, the final EOS included), prefix tokens computed / needed (needed: the
      shared system prompt + user header once) and prompt positions computed / real (padding included);
  and that the engine and continuous batching give the reference's rationales, with the largest embedding
  difference.
With --extras also (b) single-pass / two-pass encode, (c) half repeats / all unique and (e) peak RSS of encode vs
generate over --memory-texts texts (each in a fresh child process), for the first setting.
With --memory, (m) peak RSS of ``model.generate``, ``model.encode`` and ``encode_corpus`` on the same --texts texts
(each in a fresh child process), for the first setting.
The load average of the machine is printed before and after. Only the standard library, PyYAML and the project are
used.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def settings() -> dict[str, dict]:
    """Name -> Transformer options of each benchmarked setting."""
    import yaml

    sick = yaml.safe_load((ROOT / "training" / "configs" / "sick.yaml").read_text(encoding="utf-8"))
    return {
        "paper48": {"max_new_tokens": 48},
        "paper128": {"max_new_tokens": 128},
        "sick40": {"max_new_tokens": sick["inference_max_new_tokens"], "system_prompt": sick["system_prompt"]},
    }


def build(single_pass: bool = True, folder: str | None = None, **options):
    """The default backbone with ``options``, or (``folder``) a saved GRACE model as it was saved."""
    import grace_st

    if folder is not None:
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(folder, device="cpu", trust_remote_code=True)
    return grace_st.from_backbone(grace_st.default_backbone(), single_pass=single_pass, device="cpu", **options)


def sorted_batches(texts: list[str], batch_size: int) -> list[list[str]]:
    """The batches encode forms: sentence-transformers sorts by length (characters), longest first, as here."""
    import numpy as np

    ordered = [texts[i] for i in np.argsort([-len(text) for text in texts])]
    return [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]


def generate_only(model, texts: list[str], batch_size: int) -> None:
    """model.generate alone on the batches encode would form (length-sorted), same settings."""
    import torch

    module = model[0]
    with torch.inference_mode():
        for batch in sorted_batches(texts, batch_size):
            features = module.preprocess(batch)
            module.model.generate(
                input_ids=features["input_ids"],
                attention_mask=features["attention_mask"],
                **module.generation_kwargs(),
            )


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def work_counts(model, texts: list[str], batch_size: int) -> tuple[dict[str, dict[str, int]], list, list, list]:
    """Work of the reference path, of the engine and of continuous batching on the same texts (untimed), and the
    three paths' outputs."""
    import torch

    from grace_st.encoding import encode_corpus

    module = model[0]
    prefix_len = len(module.template_pieces()[0])
    counts = {"reference": {}, "engine": {}}
    outputs = {}
    for path in ("generate", "engine"):
        module.decode_path = path
        module.decode_counts = {}
        items = model.encode(texts, batch_size=batch_size, output_value=None, show_progress_bar=False)
        outputs[path] = items
        if path == "engine":
            counts["engine"] = {
                "decode_steps": module.decode_counts["decode_steps"],
                "decode_computed": module.decode_counts["decode_row_steps"],
                "prompt_computed": module.decode_counts["prompt_tokens"],
            }
    module.decode_path = "engine"
    module.decode_counts = {}
    corpus = encode_corpus(model, texts, batch_size=batch_size, normalize_embeddings=False)
    counts["continuous"] = {
        "decode_steps": module.decode_counts["decode_steps"],
        "decode_computed": module.decode_counts["decode_row_steps"],
        "prompt_computed": module.decode_counts["prompt_tokens"],
    }
    outputs["continuous"] = [  # rationale ids without the closing EOS, as encode_corpus returns them
        {"sentence_embedding": torch.from_numpy(corpus.embeddings[i]), "rationale_ids": corpus.rationale_ids[i]}
        for i in range(len(texts))
    ]
    module.decode_counts = None
    useful = prompt_real = prompt_padded = decode_padded = own_real = n_batches = rows = steps = 0
    for batch in sorted_batches(texts, batch_size):
        features = module.preprocess(batch)
        index = {text: i for i, text in enumerate(texts)}
        masks = [outputs["generate"][index[text]]["rationale_mask"] for text in batch]
        width = max(int(m.shape[0]) for m in masks)
        useful += sum(int(m.sum()) for m in masks)
        decode_padded += len(batch) * width  # generate's steps + the final step, every row
        steps += width
        prompt_real += int(features["attention_mask"].sum())
        prompt_padded += int(features["attention_mask"].numel())
        own_real += int(features["attention_mask"].sum()) - len(batch) * prefix_len
        n_batches += 1
        rows += len(batch)
    counts["reference"] = {"decode_steps": steps, "decode_computed": decode_padded, "prompt_computed": prompt_padded}
    for path, c in counts.items():
        c.update(decode_useful=useful, prompt_real=prompt_real, prefix_needed=prefix_len, own_real=own_real)
        c["prefix_computed"] = prefix_len * {"reference": rows, "engine": n_batches, "continuous": 1}[path]
    return counts, outputs["generate"], outputs["engine"], outputs["continuous"]


def compare(reference: list[dict], engine: list[dict], eos: list[int]) -> tuple[int, float]:
    """(rationales that differ, max |embedding diff|) of two paths' items (closing EOS ids left out)."""

    def ids(item: dict) -> list[int]:
        row = item["rationale_ids"]
        row = row[item["rationale_mask"].bool()].tolist() if "rationale_mask" in item else list(row)
        return row[:-1] if row and row[-1] in eos else row

    differ = sum(ids(a) != ids(b) for a, b in zip(reference, engine, strict=True))
    delta = max(
        float((a["sentence_embedding"] - b["sentence_embedding"]).abs().max())
        for a, b in zip(reference, engine, strict=True)
    )
    return differ, delta


def ratio_run(name: str, options: dict, texts: list[str], batch_size: int, repeats: int, large: int = 0) -> dict:
    from grace_st.encoding import encode_corpus

    model = build(**options)
    module = model[0]
    counts, reference, engine, continuous = work_counts(model, texts, batch_size)
    differ, delta = compare(reference, engine, module.eos_token_ids)
    differ_c, delta_c = compare(reference, continuous, module.eos_token_ids)

    def encode(path: str, size: int = batch_size):
        def run():
            module.decode_path = path
            model.encode(texts, batch_size=size, show_progress_bar=False)

        return run

    def corpus():
        module.decode_path = "engine"
        encode_corpus(model, texts, batch_size=batch_size, schedule="continuous")

    runs = {"generate": [], "continuous": [], "engine": [], "reference": []}
    jobs = [
        ("generate", lambda: generate_only(model, texts, batch_size)),
        ("continuous", corpus),
        ("engine", encode("engine")),
        ("reference", encode("generate")),
    ]
    if large:
        runs.update(generate_large=[], engine_large=[])
        jobs += [
            ("generate_large", lambda: generate_only(model, texts, large)),
            ("engine_large", encode("engine", large)),
        ]
    for repeat in range(repeats):
        # Interleaved, in a rotating order, so that a change of machine load hits every path alike.
        for key, job in jobs[repeat % len(jobs) :] + jobs[: repeat % len(jobs)]:
            runs[key].append(timed(job))
    module.decode_path = "engine"
    median = {key: tuple(statistics.median(run[i] for run in values) for i in (0, 1)) for key, values in runs.items()}
    pooling = next((m for m in model if type(m).__name__ == "RationalePooling"), None)
    source = options.get("folder") or "the default backbone (untrained)"
    suffix = "yes" if module.summary_suffix else "no"
    about = (
        f"Model: {source}; max_new_tokens {module.max_new_tokens}; readout "
        f"{getattr(pooling, 'pooling_mode', None)!r}; summary suffix: {suffix}; system prompt "
        f"{module.system_prompt[:60]!r}."
    )
    return {
        "name": name,
        "about": about,
        "counts": counts,
        "differ": differ,
        "delta": delta,
        "differ_continuous": differ_c,
        "delta_continuous": delta_c,
        "median": median,
        "runs": runs,
        "large": large,
    }


def print_ratio(result: dict, n_texts: int, batch_size: int) -> None:
    median, counts = result["median"], result["counts"]
    g_wall, g_cpu = median["generate"]
    print(f"\n### {result['name']}: {n_texts} real sentences, batch {batch_size}, greedy, one thread")
    print(result["about"])
    from grace_st.tables import markdown_table

    labels = {
        "continuous": "continuous batching (encode_corpus)",
        "engine": "decode engine, batch by batch (model.encode)",
        "reference": "reference (generate + 1 step)",
    }
    rows = []
    for key, label in labels.items():
        wall, cpu = median[key]
        per_run = ", ".join(
            f"{a[0] / b[0]:.3f}" for a, b in zip(result["runs"][key], result["runs"]["generate"], strict=True)
        )
        rows.append([label, f"{wall / g_wall:.3f}", f"{cpu / g_cpu:.3f}", f"{wall:.1f}", f"{g_wall:.1f}", per_run])
    if result["large"]:
        wall, cpu = median["engine_large"]
        g_wall, g_cpu = median["generate_large"]
        per_run = ", ".join(
            f"{a[0] / b[0]:.3f}"
            for a, b in zip(result["runs"]["engine_large"], result["runs"]["generate_large"], strict=True)
        )
        label = f"model.encode, batch {result['large']} / generate over the same batches of {result['large']}"
        rows.append([label, f"{wall / g_wall:.3f}", f"{cpu / g_cpu:.3f}", f"{wall:.1f}", f"{g_wall:.1f}", per_run])
    header = ["path", "encode / generate alone (wall)", "(CPU)", "encode s", "generate s", "runs (wall ratio)"]
    print(markdown_table(header, rows), end="")
    rows = []
    for key, label in (("reference", "reference"), ("engine", "decode engine"), ("continuous", "continuous")):
        c = counts[key]
        rows.append(
            [
                label,
                c["decode_steps"],
                f"{c['decode_computed']} / {c['decode_useful']} "
                f"({c['decode_useful'] / c['decode_computed']:.0%} useful)",
                f"{c['prefix_computed']} / {c['prefix_needed']}",
                f"{c['prompt_computed']} / {c['prompt_real']}",
            ]
        )
    header = [
        "path",
        "decode forward calls",
        "decode row-steps computed / useful",
        "prefix tokens computed / needed",
        "prompt positions computed / real",
    ]
    print(markdown_table(header, rows), end="")
    print(
        f"Engine vs reference: {result['differ']} of {n_texts} rationales differ; "
        f"max |embedding diff| = {result['delta']:.1e} (target: 0, < 1e-5)."
    )
    print(
        f"Continuous vs reference: {result['differ_continuous']} of {n_texts} rationales differ; "
        f"max |embedding diff| = {result['delta_continuous']:.1e} (target: 0, < 1e-5)."
    )


def child(mode: str, n: int, batch_size: int, max_new_tokens: int) -> None:
    """Run one workload in this (fresh) process and print its peak RSS in MiB as JSON."""
    model = build(max_new_tokens=max_new_tokens)
    texts = real_sentences(n)
    baseline = _vm_hwm_mib()
    if mode == "encode":
        model.encode(texts, batch_size=batch_size)
    elif mode == "corpus":
        from grace_st.encoding import encode_corpus

        encode_corpus(model, texts, batch_size=batch_size)
    else:
        generate_only(model, texts, batch_size)
    print(json.dumps({"mode": mode, "peak_rss_mib": _vm_hwm_mib(), "after_load_mib": baseline}))


def _vm_hwm_mib() -> float:
    """This process's peak RSS (MiB): VmHWM, which exec resets (ru_maxrss keeps the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def extras(texts: list[str], batch_size: int, max_new_tokens: int, repeats: int, memory_texts: int) -> None:
    """(b) single / two pass, (c) repeats / unique, (e) peak RSS (the measures of earlier issues)."""
    import numpy as np

    from grace_st.encoding import encode_corpus

    half = texts[: len(texts) // 2]
    single, double = build(True, max_new_tokens=max_new_tokens), build(False, max_new_tokens=max_new_tokens)
    kwargs = {"batch_size": batch_size, "show_progress_bar": False}
    times: dict[str, list[float]] = {k: [] for k in ("single", "double", "repeats")}
    for _ in range(repeats):
        times["single"].append(timed(lambda: single.encode(texts, **kwargs))[0])
        times["double"].append(timed(lambda: double.encode(texts, **kwargs))[0])
        # encode_corpus generates each distinct text of a call once (model.encode does not de-duplicate)
        times["repeats"].append(timed(lambda: encode_corpus(single, half + half, batch_size=batch_size))[0])
    best = {k: statistics.median(v) for k, v in times.items()}
    delta = float(np.abs(single.encode(texts[:16], **kwargs) - double.encode(texts[:16], **kwargs)).max())
    peaks = peak_rss(("generate", "encode"), memory_texts, batch_size, max_new_tokens)
    print(f"\n### extras: max_new_tokens={max_new_tokens}, medians of {repeats} runs")
    print("| measure | value | target |")
    print("|---|---|---|")
    print(
        f"| (b) single-pass / two-pass | {best['single'] / best['double']:.3f} "
        f"({best['single']:.1f} s / {best['double']:.1f} s), max abs diff {delta:.1e} | < 1, diff < 1e-5 |"
    )
    print(
        f"| (c) half repeats / all unique | {best['repeats'] / best['single']:.3f} "
        f"({best['repeats']:.1f} s / {best['single']:.1f} s) | <= 0.60 |"
    )
    print(
        f"| (e) peak RSS, encode / generate, {memory_texts} texts | {peaks['encode'] / peaks['generate']:.3f} "
        f"({peaks['encode']:.0f} MiB / {peaks['generate']:.0f} MiB) | <= 1.5 |"
    )


def peak_rss(modes, n_texts: int, batch_size: int, max_new_tokens: int) -> dict[str, float]:
    """Peak RSS (MiB) of each workload in ``modes`` (``generate``, ``encode``, ``corpus``), each in a fresh process."""
    peaks = {}
    for mode in modes:
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode, "--memory-texts", str(n_texts)]
            + ["--batch-size", str(batch_size), "--max-new-tokens", str(max_new_tokens)],
            capture_output=True,
            text=True,
            check=True,
        )
        peaks[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    return peaks


def print_memory(n_texts: int, batch_size: int, max_new_tokens: int) -> None:
    from grace_st.tables import markdown_table

    peaks = peak_rss(("generate", "encode", "corpus"), n_texts, batch_size, max_new_tokens)
    print(f"\n### (m) peak RSS, {n_texts} texts, batch {batch_size}, max_new_tokens={max_new_tokens}")
    labels = {"generate": "model.generate", "encode": "model.encode", "corpus": "encode_corpus"}
    rows = [
        [label, f"{peaks[mode]:.0f}", f"{peaks[mode] / peaks['generate']:.3f}", "<= 1.5" if mode == "corpus" else ""]
        for mode, label in labels.items()
    ]
    print(markdown_table(["path", "peak RSS MiB", "/ generate", "target"], rows), end="")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--large-batch", type=int, default=64, help="also model.encode with this batch size (0: not measured)"
    )
    parser.add_argument("--memory", action="store_true", help="peak RSS of generate, encode, encode_corpus")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--settings", default="paper48,paper128,sick40", help="comma-separated: " + ",".join(settings())
    )
    parser.add_argument("--extras", action="store_true", help="also (b), (c) and (e) for the first setting")
    parser.add_argument(
        "--trained",
        help="a saved GRACE model folder (e.g. trained with training/configs/sick-summary.yaml): adds the setting "
        "'trained', with the model's own prompt, rationale length and readout",
    )
    parser.add_argument("--memory-texts", type=int, default=1000)
    parser.add_argument("--max-new-tokens", type=int, default=48, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["encode", "generate", "corpus"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    if args.child:
        child(args.child, args.memory_texts, args.batch_size, args.max_new_tokens)
        return
    known = settings()
    chosen = [name.strip() for name in args.settings.split(",") if name.strip()]
    if args.trained:
        known["trained"] = {"folder": args.trained}
        chosen += [] if "trained" in chosen else ["trained"]
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise SystemExit(f"Unknown settings {unknown}; choose from {sorted(known)}.")
    texts = real_sentences(args.texts)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    for name in chosen:
        result = ratio_run(name, known[name], texts, args.batch_size, args.repeats, args.large_batch)
        print_ratio(result, len(texts), args.batch_size)
        sys.stdout.flush()
    if args.memory:
        print_memory(len(texts), args.batch_size, known[chosen[0]].get("max_new_tokens", 48))
    if args.extras:
        extras(texts, args.batch_size, known[chosen[0]]["max_new_tokens"], args.repeats, args.memory_texts)
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        "Targets (paper48): encode_corpus / generate <= 0.70; model.encode / generate over the same batches <= 0.75 "
        "at batch 16 and 64; peak RSS of encode_corpus <= 1.5 x generate's."
    )


if __name__ == "__main__":
    main()
