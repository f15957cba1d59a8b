"""TEMPORARY stand-in for ``grace_st.encoding.encode_corpus`` until that module (written on another branch) is merged.

Same contract: texts in, ``EncodedCorpus(embeddings (n, dim) float32, rationales, rationale_ids (closing EOS
excluded), finished)`` out, texts repeated within the call encoded once. Delete this file and the ``except
ImportError`` fallback that imports it (grace_st/quickeval.py, the only caller) when encoding.py lands.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class EncodedCorpus:
    embeddings: np.ndarray
    rationales: list[str]
    rationale_ids: list[list[int]]
    finished: list[bool]


def encode_corpus(
    model, texts: Sequence[str], batch_size: int = 32, prompt: str | None = None, normalize_embeddings: bool = True
) -> EncodedCorpus:
    texts = list(texts)
    unique = list(dict.fromkeys(texts))
    module = model[0]
    eos = set(module.eos_token_ids)
    items = model.encode(unique, batch_size=batch_size, prompt=prompt, output_value=None, show_progress_bar=False)
    rows = np.stack([torch.as_tensor(item["sentence_embedding"]).float().cpu().numpy() for item in items])
    if normalize_embeddings:
        rows = rows / np.linalg.norm(rows, axis=1, keepdims=True).clip(min=1e-12)
    ids = [
        [int(t) for t in item["rationale_ids"][item["rationale_mask"].bool()].tolist() if int(t) not in eos]
        for item in items
    ]
    where = {text: i for i, text in enumerate(unique)}
    index = [where[text] for text in texts]
    return EncodedCorpus(
        rows[index].astype(np.float32),
        [items[i]["rationale"] for i in index],
        [ids[i] for i in index],
        [bool(items[i]["rationale_finished"]) for i in index],
    )
