"""The on-disk embedding cache of :func:`grace_st.encode_corpus`: keys that cover everything that changes an entry, and
entries written atomically with a checksum."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers

from grace_st.model import __version__

logger = logging.getLogger(__name__)

CACHE_FORMAT = "grace-embedding-cache-3"  # part of every key: entries of another format are never read


@dataclass
class CacheEntry:
    """One text's cached result: the model's embedding (before optional normalisation), its rationale ids (closing
    EOS included, as the model wrote them) and whether the rationale finished (with ``num_rationales=k > 1``, never
    cached: a list of k id arrays and of k flags)."""

    embedding: np.ndarray
    ids: np.ndarray | list[np.ndarray]
    finished: bool | list[bool]


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Hash of every parameter and buffer of ``model`` (names, dtypes, shapes, bytes), read in full at every call.

    There is no shortcut: an in-place edit through ``.data`` (EMA, peft's ``merge_adapter``, hand edits) bumps no
    version counter and keeps the storage, so only the bytes tell. Cost: about 0.7 s per GB of weights (blake2b on one
    CPU core; SmolLM2-135M in float32 is 0.65 GB). A tensor held under several names (tied embeddings) is read once.
    """
    digest, seen = hashlib.blake2b(digest_size=20), {}
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        where = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride(), str(tensor.device))
        if where not in seen:
            data = tensor.detach().cpu().contiguous().reshape(-1)  # reshape: 0-dim tensors (per-tensor scales) too
            seen[where] = hashlib.blake2b(data.view(torch.uint8).numpy(), digest_size=20).hexdigest()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|{seen[where]}".encode())
    return digest.hexdigest()


def _settings(model, prompt: str | None) -> str:
    """The JSON of everything but the text that changes an embedding or rationale (see :func:`cache_keys`)."""
    module = model[0]
    lm = module.model
    drop = {"_name_or_path", "transformers_version"}  # where the weights came from does not change them
    settings = {
        "format": CACHE_FORMAT,
        "weights": weights_fingerprint(model),
        "lm_config": {k: v for k, v in lm.config.to_dict().items() if k not in drop},
        "generation_config": {k: v for k, v in lm.generation_config.to_dict().items() if k not in drop},
        "modules": [[type(m).__name__, m.get_config_dict()] for m in model],
        "template": module.template_pieces(),
        "eos": module.eos_token_ids,
        "pad": module.tokenizer.pad_token_id,
        "backend": None if module.generation_backend is None else repr(module.generation_backend),
        "truncate_dim": model.truncate_dim,
        "prompt": prompt,
        "device": model.device.type,
        "versions": [torch.__version__, transformers.__version__, __version__],
    }
    return json.dumps(settings, sort_keys=True, default=str)


def model_fingerprint(model, prompt: str | None = None) -> str:
    """Hash of everything but the text that changes a GRACE model's embeddings and rationales: the shared part of
    every :func:`cache_keys` key (weights, LM and generation configs, module options, chat template, prompt, device
    type, library versions).

    Two models with the same fingerprint write the same embeddings for the same texts; the distributed encoder
    (:mod:`grace_st.encoding.distributed`) records it so that a rerun never mixes two models' outputs.

    Args:
        model: a GRACE ``SentenceTransformer``.
        prompt: the prompt prepended to every text (as :func:`grace_st.encoding.resolve_prompt` gives it). Defaults
            to None.

    Returns:
        40 hex digits.
    """
    return hashlib.blake2b(_settings(model, prompt).encode(), digest_size=20).hexdigest()


def cache_keys(model, texts: list[str], prompt: str | None) -> list[str]:
    """Cache key of each text: everything that changes its embedding or rationale.

    Covered: the weights (:func:`weights_fingerprint`), the LM config, every module's saved options, the chat prompt
    around the text (system prompt and chat template, as token ids), the text's own token ids as the prompt builder
    makes them (so any tokenizer change that alters them), the generation config (EOS ids, ...), the generation
    backend, the model's ``truncate_dim``, the device type and the torch / transformers / grace_st versions. All but
    the text are :func:`model_fingerprint`'s settings.
    """
    base = _settings(model, prompt)
    ids = model[0].text_token_ids([(prompt or "") + text for text in texts])
    return [hashlib.blake2b(f"{base}\0{row}".encode(), digest_size=20).hexdigest() for row in ids]


class EmbeddingCache:
    """On-disk cache of :class:`CacheEntry` rows, one small file per key (see :func:`cache_keys`).

    Entries are written atomically (temporary file + rename) with a checksum and the umask's permissions, so several
    processes and users may share a folder. Each entry records its own key. A corrupt entry, one of the wrong shape or
    dtype, or one that records another key (a file copied or moved) is recomputed and rewritten, never returned. A
    failed write removes its temporary file, warns once and leaves the result intact.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder).expanduser()
        self._warned = False

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npz"

    def get(self, key: str, dim: int | None = None) -> CacheEntry | None:
        """The entry of ``key``, or None when it is absent, corrupt, of another key or not a ``(dim,)`` float32
        embedding."""
        try:
            blob = self.path(key).read_bytes()
        except OSError:
            return None
        digest, payload = blob[:16], blob[16:]
        try:
            if hashlib.blake2b(payload, digest_size=16).digest() != digest:
                raise ValueError("checksum mismatch")
            with np.load(io.BytesIO(payload), allow_pickle=False) as data:
                entry, stored = CacheEntry(data["embedding"], data["ids"], data["finished"]), str(data["key"])
            if stored != key:
                raise ValueError(f"it holds the entry of key {stored[:80]!r}")
            ok = entry.embedding.dtype == np.float32 and entry.embedding.ndim == 1
            ok = ok and (dim is None or entry.embedding.shape == (dim,)) and entry.ids.ndim == 1
            if not (
                ok and entry.ids.dtype == np.int64 and entry.finished.dtype == np.bool_ and entry.finished.ndim == 0
            ):
                raise ValueError("unexpected shape or dtype")
        except (ValueError, OSError, KeyError) as error:
            logger.warning("Embedding cache entry %s is invalid (%s); recomputing it.", self.path(key), error)
            return None
        entry.finished = bool(entry.finished)
        return entry

    def put(self, key: str, entry: CacheEntry) -> bool:
        """Write ``entry``; returns False (after one warning per cache) when the folder cannot be written."""
        buffer = io.BytesIO()
        np.savez(buffer, key=np.str_(key), embedding=entry.embedding, ids=entry.ids, finished=np.bool_(entry.finished))
        payload = buffer.getvalue()
        path = self.path(key)
        tmp = path.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # os.open with 0o666 lets the umask decide the permissions (mkstemp would force 0600).
            handle = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                with os.fdopen(handle, "wb") as f:
                    f.write(hashlib.blake2b(payload, digest_size=16).digest() + payload)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as error:
            if not self._warned:
                logger.warning(
                    "Cannot write the embedding cache in %s (%s); results are not cached.", self.folder, error
                )
                self._warned = True
            return False
        return True
