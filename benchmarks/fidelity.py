"""Fidelity check: grace_st against an independent, minimal implementation of ../shared/GRACE.md.

Usage:
    .venv/bin/python benchmarks/fidelity.py [--pairs 100] [--max-new-tokens 48]

Both embed the same real STS pairs (STS 2013 headlines and SICK trial relatedness from the data folder: --data-dir,
else $GRACE_ST_DATA, else ../shared/data from the working directory) with the
untrained default backbone, greedy decoding; the script prints each Spearman correlation and their difference.
The reference renders the whole chat prompt as one string, generates one text at a time (no padding), re-tokenises
prompt + rationale and locates the user text by character offsets — none of grace_st's code is used for it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import grace_st
from grace_st.evaluation.metrics import spearman
from grace_st.readers import read_pairs, resolve_data_path
from grace_st.tables import markdown_table

SETS = {"sts13-headlines": "sts2013/headlines.test.tsv", "sick-trial": "sick2014/SICK_trial.txt"}
SYSTEM = (
    "Read and analyze the following text, then you need to provide your reasoning within <think></think> tags. "
    "Finally, generate a comprehensive understanding of this text."
)


def load_pairs(name: str, n: int, data_dir: str | None = None) -> tuple[list[str], list[str], list[float]]:
    pairs = read_pairs(resolve_data_path(SETS[name], data_dir), limit=n)
    return [p.sentence1 for p in pairs], [p.sentence2 for p in pairs], [p.score for p in pairs]


class Reference:
    """GRACE.md step by step, one text at a time."""

    def __init__(self, path: str, max_new_tokens: int) -> None:
        self.tok = AutoTokenizer.from_pretrained(path)
        self.lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def embed(self, text: str) -> np.ndarray:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
        prompt = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        out = self.lm.generate(
            ids,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=self.tok.eos_token_id,
            eos_token_id=self.tok.eos_token_id,
        )
        rationale = self.tok.decode(out[0, ids.shape[1] :], skip_special_tokens=False)
        full = prompt + rationale
        enc = self.tok(full, return_tensors="pt", add_special_tokens=False, return_offsets_mapping=True)
        hidden = self.lm(input_ids=enc.input_ids, output_hidden_states=True).hidden_states[-1][0]
        text_char = prompt.rindex(text) if text else prompt.rindex("<|im_end|>\n<|im_start|>assistant")
        starts = enc.offset_mapping[0, :, 0]
        first = int((starts >= text_char).nonzero()[0])
        emb = hidden[first:].mean(dim=0)
        return torch.nn.functional.normalize(emb, dim=0).numpy()


def cosine_spearman(embed, a, b, scores) -> float:
    ea, eb = embed(a), embed(b)
    return spearman((ea * eb).sum(axis=1), scores)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--data-dir", default=None, help="data folder (default: $GRACE_ST_DATA or ../shared/data)")
    args = parser.parse_args()
    path = grace_st.default_backbone()
    reference = Reference(path, args.max_new_tokens)
    model = grace_st.from_backbone(path, max_new_tokens=args.max_new_tokens, device="cpu")
    rows = []
    for name in SETS:
        a, b, scores = load_pairs(name, args.pairs, args.data_dir)
        t0 = time.perf_counter()
        ours = cosine_spearman(lambda t: model.encode(t, batch_size=16), a, b, scores)
        t1 = time.perf_counter()
        ref = cosine_spearman(lambda t: np.stack([reference.embed(x) for x in t]), a, b, scores)
        t2 = time.perf_counter()
        rows.append(
            [name, len(scores), f"{ours:.4f}", f"{ref:.4f}", f"{ours - ref:+.4f}", f"{t1 - t0:.0f}", f"{t2 - t1:.0f}"]
        )
    header = ["set", "pairs", "grace_st", "reference", "diff", "grace_st s", "reference s"]
    print(markdown_table(header, rows), end="")


if __name__ == "__main__":
    main()
