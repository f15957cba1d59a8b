"""Rationale writing for the GRACE ``Transformer`` module: the generation settings, the transformers generation paths
and the decode engine (``_decode.py``), an optional :class:`GenerationBackend`, and rationale ids to text.

Self-contained (torch and ``_decode.py``): saved and published models carry it as ``_rationales.py`` beside their
remote code ``grace_st.py``, whose ``Transformer`` inherits :class:`RationaleWriter`.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ._decode import generate_plain, generate_with_engine, generate_with_states, pad_rows

logger = logging.getLogger(__name__)

DECODE_PATHS: tuple[str, ...] = ("engine", "generate")


@dataclass
class RationaleBatch:
    """Rationales of one batch, right-padded: ``ids`` ``(batch, R)`` (pad id past a rationale's end), ``mask`` (1 for
    rationale tokens, the closing EOS included), ``finished`` ``(batch,)`` (ended with an EOS before the limit) and
    ``states`` ``(batch, P + R, hidden)``, the last-layer states over prompt + rationale kept from generation if asked,
    and ``suffix_states`` ``(batch, hidden)``, the state of each row's last summary-suffix token (engine only).
    """

    ids: torch.Tensor
    mask: torch.Tensor
    finished: torch.Tensor
    states: torch.Tensor | None = None
    suffix_states: torch.Tensor | None = None


class GenerationBackend(Protocol):
    """What writes rationales instead of ``model.generate`` (``module.generation_backend = backend``; runtime, not
    saved). Multi-process encoding pickles the model: rebuild engines lazily. The ``repr`` names what changes the
    output (the embedding cache key uses it). Example: ``grace_st.vllm_backend.VLLMBackend``."""

    def generate(self, module: Any, features: dict[str, Any], **generate_kwargs: Any) -> RationaleBatch:
        """Rationales for the left-padded prompts of ``features`` (``states`` may stay None)."""


def rationale_mask(generated: torch.Tensor, eos_token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of the rationale tokens in generated ids (everything up to and including the first EOS) and ``finished``.

    Example:
        >>> mask, finished = rationale_mask(torch.tensor([[5, 2, 2], [5, 6, 7]]), [2])
        >>> mask.tolist(), finished.tolist()
        ([[1, 1, 0], [1, 1, 1]], [True, False])
    """
    if generated.shape[1] == 0:
        return generated.new_zeros(generated.shape), torch.zeros(generated.shape[0], dtype=torch.bool)
    is_eos = torch.isin(generated, torch.tensor(list(eos_token_ids), device=generated.device)).long()
    mask = (torch.cumsum(is_eos, dim=1) - is_eos == 0).long()  # no EOS strictly before the position
    return mask, is_eos.bool().any(dim=1).cpu()


class RationaleWriter:
    """Mixin of :class:`grace_st.Transformer` that writes rationales; it reads the module's ``model``, ``tokenizer``,
    saved decoding options and :meth:`template_pieces`.

    Runtime settings (not saved): ``generation_backend`` (a :class:`GenerationBackend`; None = transformers),
    ``decode_path`` (how transformers keeps states from generation) and ``decode_counts`` (a dict the engine adds its
    work counts to; benchmarks).
    """

    @property
    def decode_path(self) -> str:
        """``"engine"`` (``_decode.decode``, default) or the reference ``"generate"`` (``model.generate`` + a hook)."""
        return self._decode_path

    @decode_path.setter
    def decode_path(self, value: str) -> None:
        if value not in DECODE_PATHS:
            raise ValueError(f"decode_path={value!r} is not supported; choose one of {DECODE_PATHS}.")
        self._decode_path = value

    @property
    def generation_backend(self) -> GenerationBackend | None:
        """What writes the rationales: None (transformers' ``generate``) or a :class:`GenerationBackend`."""
        return self._generation_backend

    @generation_backend.setter
    def generation_backend(self, backend: GenerationBackend | None) -> None:
        if backend is not None and not callable(getattr(backend, "generate", None)):
            raise ValueError(
                f"generation_backend={backend!r} is not allowed: use None (transformers) or an object with a "
                "generate(module, features, **generate_kwargs) method, e.g. grace_st.vllm_backend.VLLMBackend()."
            )
        self._generation_backend = backend

    @property
    def eos_token_ids(self) -> list[int]:
        """Token ids that end a rationale: the generation config's EOS ids plus the tokenizer's EOS."""
        ids = self.model.generation_config.eos_token_id
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def generation_kwargs(self) -> dict[str, Any]:
        """Arguments for ``model.generate`` built from the module's saved decoding settings."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "eos_token_id": self.eos_token_ids,
            "pad_token_id": self.tokenizer.pad_token_id,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:  # unset the backbone's sampling defaults so greedy decoding does not warn about them
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def generate_rationales(
        self, features: dict[str, Any], with_states: bool = False, seeds: list[int] | None = None, **generate_kwargs
    ) -> RationaleBatch:
        """One rationale per prompt of ``features`` (:meth:`preprocess` output on the model's device).

        ``with_states`` also keeps the last-layer states generation computes, so no second pass is needed
        (transformers only; ``_decode.generate_with_engine``, which also feeds the summary suffix, else
        ``generate_with_states``). ``seeds``: one sampling seed per row (see :meth:`text_seeds`). ``generate_kwargs``
        override :meth:`generation_kwargs` (e.g. ``temperature`` in training)."""
        input_ids, attention_mask = features["input_ids"], features["attention_mask"]
        if self.rationale_mode == "none":
            empty = input_ids.new_zeros((input_ids.shape[0], 0))
            return RationaleBatch(empty, empty.clone(), torch.zeros(input_ids.shape[0], dtype=torch.bool))
        if self.rationale_mode == "echo":
            ones = torch.ones(input_ids.shape[0], dtype=torch.bool)
            return RationaleBatch(features["echo_ids"], features["echo_mask"], ones)
        kwargs = {**self.generation_kwargs(), **generate_kwargs}
        if self.generation_backend is not None:
            if seeds is not None:
                raise ValueError("Seeded sampling (do_sample=True in encode) needs the transformers generation path.")
            return self.generation_backend.generate(self, features, **kwargs)
        seeded = {} if seeds is None else {"seeds": seeds}
        if not with_states:
            return self.rationale_batch(generate_plain(self.model, input_ids, attention_mask, kwargs, **seeded))
        result = suffix = None
        if "suffix_ids" in features:
            pair = features["suffix_ids"], features["suffix_mask"]
            suffix = [row[mask.bool()].tolist() for row, mask in zip(*pair, strict=True)]
        if self.decode_path == "engine":
            prefix_len = len(self.template_pieces()[0])
            engine = seeded if suffix is None else {**seeded, "suffix_ids": suffix}
            result = generate_with_engine(self.model, features, kwargs, prefix_len, self.decode_counts, **engine)
        if result is None:
            result = generate_with_states(self.model, input_ids, attention_mask, kwargs, **seeded)
        batch = self.rationale_batch(result[0])
        batch.states = result[1]
        batch.suffix_states = result[2] if len(result) > 2 else None
        if batch.states is None:  # the hooked norm was not on the forward path: callers use the two-pass path
            logger.warning("Could not capture the last-layer states during generation; using a second forward pass.")
        return batch

    def rationale_batch(self, generated: torch.Tensor | Sequence[Sequence[int]]) -> RationaleBatch:
        """:class:`RationaleBatch` of generated ids: a ``(batch, R)`` tensor as ``generate`` returns it, or rows of
        different lengths (e.g. an engine's completions; right-padded, and the padding never ends a rationale)."""
        valid = None
        if not isinstance(generated, torch.Tensor):
            generated, valid = pad_rows(generated, self.tokenizer.pad_token_id)
        mask, finished = rationale_mask(generated, self.eos_token_ids)
        if valid is not None:
            mask = mask * valid.to(mask.device)
            is_eos = torch.isin(generated, torch.tensor(self.eos_token_ids, device=generated.device))
            finished = (is_eos & mask.bool()).any(dim=1).cpu()
        return RationaleBatch(generated.masked_fill(mask == 0, self.tokenizer.pad_token_id), mask, finished)

    def decode_rationales(self, rationales: RationaleBatch) -> list[str]:
        """Text of each rationale of a batch (closing EOS and special tokens removed)."""
        rows = zip(rationales.ids, rationales.mask, rationales.finished, strict=True)
        return [self.decode_ids(ids[mask.bool()].tolist(), bool(finished)) for ids, mask, finished in rows]

    def decode_rationale(self, item: dict[str, Any]) -> str:
        """Rationale text of an item of ``encode(texts, output_value=None)``: ``model[0].decode_rationale(item)``."""
        ids = item["rationale_ids"][item["rationale_mask"].bool()].tolist()
        return self.decode_ids(ids, bool(item["rationale_finished"]))

    def decode_ids(self, ids: list[int], finished: bool = False) -> str:
        """Text of rationale token ids (``finished``: the last id is the closing EOS, left out; special tokens too)."""
        return self.tokenizer.decode(ids[:-1] if finished else ids, skip_special_tokens=True)

    def text_seeds(self, features: dict[str, Any]) -> list[int]:
        """``num_rationales`` sampling seeds per row, derived from the row's prompt ids (the same text always draws
        the same rationales, whatever its batch)."""
        seeds = []
        for ids, mask in zip(features["input_ids"], features["attention_mask"], strict=True):
            crc = zlib.crc32(ids[mask.bool()].cpu().numpy().astype("<i8").tobytes())
            seeds += [zlib.crc32(j.to_bytes(4, "little"), crc) for j in range(self.num_rationales)]
        return seeds
