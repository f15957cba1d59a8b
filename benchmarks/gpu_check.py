"""GPU check of the decode engine: a random model of Qwen2.5-1.5B-Instruct's shape in bf16, old and new decode paths.

Usage:
    python benchmarks/gpu_check.py                          # on a CUDA machine (about 2-3 minutes on one H100)
    python benchmarks/gpu_check.py --device cpu --tiny      # the same code path on a tiny config (smoke test)
    python benchmarks/gpu_check.py --tokenizer DIR          # where grace_st.default_backbone() is not available

Without CUDA (and without ``--device cpu``) it prints a message and exits 0. The model is built from a config written
here (hidden 1536, 28 layers, 12 heads, 2 KV heads, intermediate 8960, vocab 151936, tied embeddings, rope theta 1e6;
no download), randomly initialised (seed 0), in bf16, with the default backbone's tokenizer. The embedding rows of the
ids that tokenizer does not have, and of its end-of-sequence ids, are zeroed: with tied embeddings their logits are
exactly 0 while the largest logit of a random model is positive, so greedy decoding never picks them and every
rationale has exactly ``--new-tokens`` tokens (checked). Measured, for the decode engine (``decode_path="engine"``)
and the reference path (``"generate"``: ``model.generate`` + one cached step):
  - single-pass vs two-pass agreement: cosine similarity of the embedding pooled from the states kept during
    generation and of the one from a second forward pass over the same prompt + rationale; bf16 tolerance: >= 0.99;
  - engine vs reference: identical greedy rationales (bf16 near-ties may flip) and the embeddings' cosine similarity;
  - encode throughput (texts/s, best of --repeats) at batch 32 and 128, and peak GPU memory during encode.
A compact summary is printed and, when $OUT is set, written as JSON to $OUT/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QWEN25_15B = {
    "hidden_size": 1536,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "intermediate_size": 8960,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "rope_theta": 1e6,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
}
TINY = {**QWEN25_15B, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
COSINE_TOLERANCE = 0.99  # bf16: single-pass and two-pass states differ in the last bits of every layer


def texts_for(n: int) -> list[str]:
    """``n`` distinct English sentences from the package's demo data (it travels with the repository)."""
    rows = []
    for name in ("demo_train.jsonl", "demo_dev.jsonl"):
        with open(ROOT / "grace_st" / "data" / name, encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    texts = list(dict.fromkeys(text for row in rows for text in (row["positive"], row["negative"], row["query"])))
    if len(texts) < n:
        texts += [f"{text} (variant {i})" for i in range(1, n // len(texts) + 2) for text in texts]
    return texts[:n]


def build(args, torch):
    """The random bf16 model wrapped as a GRACE sentence-transformers model."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    import grace_st

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or grace_st.default_backbone())
    config = Qwen2Config(**(TINY if args.tiny else QWEN25_15B))
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings[len(tokenizer) :] = 0  # ids without a token: never generated
        embeddings[tokenizer.eos_token_id] = 0  # end of sequence (the only EOS id now): never generated
    return grace_st.build_grace_model(model, tokenizer, max_new_tokens=args.new_tokens, device=args.device)


def agreement(model, texts: list[str], torch) -> dict:
    """Single vs two pass per path; engine vs reference rationales and embeddings."""
    import torch.nn.functional as F

    from grace_st.model import pool

    module = model[0]
    features = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in module.preprocess(texts).items()}
    result, pooled, rationales = {}, {}, {}
    for path in ("generate", "engine"):
        module.decode_path = path
        with torch.no_grad():
            batch = module.generate_rationales(features, with_states=True)
            single = module.outputs_from_states(features, batch)
            double = module.embed(features, batch)
        a = F.normalize(pool(single["token_embeddings"], single["pooling_mask"]).float(), dim=1)
        b = F.normalize(pool(double["token_embeddings"], double["pooling_mask"]).float(), dim=1)
        result[f"min_cos_single_vs_two_pass_{path}"] = round(float((a * b).sum(1).min()), 5)
        pooled[path], rationales[path] = a, batch
        lengths = batch.mask.sum(1)
        result[f"rationale_tokens_{path}"] = sorted({int(x) for x in lengths})
    same = (rationales["engine"].ids == rationales["generate"].ids).all(1)
    cos = (pooled["engine"] * pooled["generate"]).sum(1)
    result["identical_rationales"] = f"{int(same.sum())}/{len(texts)}"
    result["min_cos_engine_vs_reference_same_rationale"] = round(float(cos[same].min()), 5) if same.any() else None
    module.decode_path = "engine"
    return result


def throughput(model, texts: list[str], batch_size: int, repeats: int, torch) -> dict:
    module = model[0]
    out = {}
    cuda = model.device.type == "cuda"
    for path in ("generate", "engine"):
        module.decode_path = path
        model.encode(texts[:batch_size], batch_size=batch_size)  # warm-up
        best = float("inf")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(repeats):
            start = time.perf_counter()
            model.encode(texts, batch_size=batch_size)
            if cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        out[path] = {"texts_per_s": round(len(texts) / best, 1), "seconds": round(best, 2)}
        if cuda:
            out[path]["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    module.decode_path = "engine"
    out["engine_speedup"] = round(out["engine"]["texts_per_s"] / out["generate"]["texts_per_s"], 3)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny, a smoke test)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer config of the same vocabulary (smoke test)")
    parser.add_argument("--tokenizer", help="tokenizer folder; defaults to grace_st.default_backbone()")
    parser.add_argument("--new-tokens", type=int, default=64, help="fixed rationale length (EOS is never generated)")
    parser.add_argument("--texts", type=int, default=256, help="texts per throughput measurement")
    parser.add_argument("--batch-sizes", default="32,128")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to measure (run it on a GPU machine, or --device cpu --tiny).")
        return 0
    if args.device not in ("cuda", "cpu"):
        raise SystemExit(f"--device {args.device!r} is not supported; choose 'cuda' or 'cpu'.")
    sys.path.insert(0, str(ROOT))
    import transformers

    started = time.perf_counter()
    model = build(args, torch)
    texts = texts_for(args.texts)
    summary = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "config": "tiny" if args.tiny else "Qwen2.5-1.5B-Instruct shape, random init, bf16",
        "attention": model[0].model.config._attn_implementation,
        "new_tokens": args.new_tokens,
        "cosine_tolerance": COSINE_TOLERANCE,
        "agreement": agreement(model, texts[:32], torch),
        "throughput": {},
    }
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        summary["throughput"][str(batch_size)] = throughput(model, texts, batch_size, args.repeats, torch)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    checks = summary["agreement"]
    summary["ok"] = bool(
        min(checks["min_cos_single_vs_two_pass_generate"], checks["min_cos_single_vs_two_pass_engine"])
        >= COSINE_TOLERANCE
        and checks["rationale_tokens_engine"] == [args.new_tokens] == checks["rationale_tokens_generate"]
    )
    print(json.dumps(summary, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
