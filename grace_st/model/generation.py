"""Rationale writing for the GRACE ``Transformer``: the reference path (``model.generate`` with the last-layer states
captured), the decode engine of an installed, compatible grace_st (:data:`ENGINE_API_VERSION`; anything else falls back
to the reference path with one warning naming the reason), a :class:`GenerationBackend`, and ids to text."""

from __future__ import annotations

import importlib
import logging
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

logger = logging.getLogger(__name__)

DECODE_PATHS: tuple[str, ...] = ("engine", "generate")
# The engine contract this file was written against: grace_st.engine.API_VERSION must equal it.
ENGINE_API_VERSION = 1


@dataclass
class RationaleBatch:
    """Rationales of one batch, right-padded: ``ids`` ``(batch, R)``, ``mask`` (the closing EOS included), ``finished``
    (ended with an EOS), last-layer ``states`` ``(batch, P + R, hidden)`` if kept, ``suffix_states`` (summary)."""

    ids: torch.Tensor
    mask: torch.Tensor
    finished: torch.Tensor
    states: torch.Tensor | None = None
    suffix_states: torch.Tensor | None = None
    text_suffix_states: torch.Tensor | None = None  # the suffix's state right after the prompt (engine, text_summary)


class GenerationBackend(Protocol):
    """What writes rationales instead of ``model.generate`` (``module.generation_backend = backend``, not saved; e.g.
    ``grace_st.vllm_backend.VLLMBackend``). Rebuild engines lazily (pickled to workers); ``repr`` names settings."""

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
    """Mixin of :class:`grace_st.Transformer` that writes rationales (reads ``model``, ``tokenizer``, options). Runtime
    settings (not saved): ``generation_backend`` (a :class:`GenerationBackend`; None = transformers), ``decode_path``
    (``"engine"`` or ``"generate"``) and ``decode_counts`` (a dict the engine adds its work counts to)."""

    engine_api_version = ENGINE_API_VERSION  # what this code expects of an installed grace_st.engine

    @property
    def decode_path(self) -> str:
        """``"engine"`` (the installed engine where it applies; default) or the reference ``"generate"``."""
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
                f"generation_backend={backend!r} is not allowed: use None (transformers) or an object with a generate("
                "module, features, **generate_kwargs) method, e.g. grace_st.vllm_backend.VLLMBackend()."
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
        kwargs = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, eos_token_id=self.eos_token_ids)
        kwargs.update(pad_token_id=self.tokenizer.pad_token_id, repetition_penalty=self.repetition_penalty)
        # Greedy: unset the backbone's sampling defaults so that generate does not warn about them.
        sampling = (self.temperature, self.top_p, self.top_k) if self.do_sample else (None, None, None)
        return {**kwargs, **dict(zip(("temperature", "top_p", "top_k"), sampling, strict=True))}

    def generate_rationales(
        self, features: dict[str, Any], with_states: bool = False, seeds: list[int] | None = None, **generate_kwargs
    ) -> RationaleBatch:
        """One rationale per prompt of ``features`` (:meth:`preprocess` output on the model's device). ``with_states``
        also keeps the last-layer states generation computes (no second pass; the engine also feeds the summary
        suffix). ``seeds``: one sampling seed per row (:meth:`text_seeds`). ``generate_kwargs`` override
        :meth:`generation_kwargs` (e.g. ``temperature`` in training)."""
        input_ids, attention_mask = features["input_ids"], features["attention_mask"]
        if self.rationale_mode != "generate":  # "echo": the text again; "none": no rationale
            echo, none = self.rationale_mode == "echo", input_ids.new_zeros((input_ids.shape[0], 0))
            ids, mask = (features["echo_ids"], features["echo_mask"]) if echo else (none, none.clone())
            return RationaleBatch(ids, mask, torch.full((input_ids.shape[0],), echo, dtype=torch.bool))
        kwargs = {**self.generation_kwargs(), **generate_kwargs}
        if self.generation_backend is not None:
            if seeds is not None:
                raise ValueError("Seeded sampling (do_sample=True in encode) needs the transformers generation path.")
            return self.generation_backend.generate(self, features, **kwargs)
        result = engine = None
        if with_states and self.decode_path == "engine":
            engine = self.decode_engine(kwargs)
        if engine is not None:
            pairs = zip(features.get("suffix_ids", []), features.get("suffix_mask", []), strict=True)
            suffix = [row[mask.bool()].tolist() for row, mask in pairs] if "suffix_ids" in features else None
            alone = {"text_suffix": True} if getattr(self, "text_summary", False) and suffix else {}
            alone = alone if getattr(engine, "TEXT_SUFFIX", False) else {}  # an older engine does not take it
            try:
                result = engine.generate(self, features, kwargs, suffix_ids=suffix, seeds=seeds, **alone)
            except Exception as error:  # an optional speed path never stops encoding
                self._warn_once(f"it failed: {error!r}")
        if result is None:
            result = generate_with_states(self.model, input_ids, attention_mask, kwargs, seeds, with_states)
        batch = self.rationale_batch(result[0])
        batch.states, batch.suffix_states, batch.text_suffix_states = (*result[1:4], None, None)[:3]
        if with_states and batch.states is None:  # the hooked norm was not on the forward path: use the two-pass path
            logger.warning("Could not capture the last-layer states during generation; using a second forward pass.")
        return batch

    def decode_engine(self, generate_kwargs: dict[str, Any]) -> Any:
        """The installed ``grace_st.engine`` if it can write these rationales, else None (reference path; warns once
        per reason, but not for ``unsupported_arguments``: the call's choice). Never raises."""
        try:
            engine = importlib.import_module("grace_st.engine")
            version = getattr(engine, "API_VERSION", None)
            if version != ENGINE_API_VERSION:
                reason = f"the installed grace_st engine has API version {version!r}, this code {ENGINE_API_VERSION!r}"
            else:
                reason = engine.unsupported_reason(self)
                if reason is None:  # these arguments are the caller's choice: the reference path serves them silently
                    return engine if engine.unsupported_arguments(generate_kwargs) is None else None
        except ModuleNotFoundError as error:
            missing = (error.name or "").split(".")[0] == "grace_st"
            reason = "grace_st (with its engine) is not installed" if missing else f"it failed to import: {error!r}"
        except Exception as error:  # an optional speed path never stops encoding
            reason = f"it failed to import or check: {error!r}"
        self._warn_once(reason)
        return None

    def _warn_once(self, reason: str) -> None:
        warned = self.__dict__.setdefault("_engine_warnings", set())
        if reason not in warned:
            warned.add(reason)
            logger.warning("Rationales are written by model.generate (the reference path), not the engine: %s", reason)

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

    def decode_rationale(self, item: dict[str, Any]) -> str | list[str]:
        """Rationale text of an item of ``encode(texts, output_value=None)``: ``model[0].decode_rationale(item)`` (with
        ``num_rationales=k``: the list of the k texts)."""
        ids, mask, done = (item[key] for key in ("rationale_ids", "rationale_mask", "rationale_finished"))
        if ids.dim() == 2:
            return [self.decode_ids(i[m.bool()].tolist(), bool(f)) for i, m, f in zip(ids, mask, done, strict=True)]
        return self.decode_ids(ids[mask.bool()].tolist(), bool(done))

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


def pad_rows(rows: Any, pad: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` of id rows of different lengths, right-padded with ``pad`` (``left``: left-padded)."""
    width = max((len(row) for row in rows), default=0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(list(row), dtype=torch.long), 1
    return ids, mask


def hook_outputs(module: torch.nn.Module) -> tuple[list[torch.Tensor], Any]:
    """``(captured, handle)``: ``module``'s outputs in this thread's forwards (not another call's) until removed."""
    captured, me = [], threading.get_ident()
    record = lambda m, a, out: captured.append(out) if threading.get_ident() == me else None  # noqa: E731
    return captured, module.register_forward_hook(record)


def generate_with_states(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    generate_kwargs: dict[str, Any],
    seeds: list[int] | None = None,
    with_states: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference path: ``(generated, states)``, the ids ``model.generate`` writes, the ``(batch, P + R, hidden)``
    last-layer states of prompt + generated ids (hooked on the decoder's final norm, else ``output_hidden_states``),
    plus one cached decode step for the final token, which generation never feeds back. ``states`` is None when the
    hooked norm was not on the forward path (e.g. a re-wrapped copy).
    ``seeds`` (sampling only): one seed per row; each row is then generated alone, without its padding, under
    ``torch.random.fork_rng()`` + ``torch.manual_seed(seed)`` (the global RNG is left as it was; zeros at padding)."""
    if seeds is not None:
        if not generate_kwargs.get("do_sample") or len(seeds) != len(input_ids):
            raise ValueError(f"seeds must be one int per row ({len(input_ids)} rows) and need do_sample=True.")
        rows = []
        for row, seed in enumerate(seeds):
            keep = attention_mask[row].bool()
            with torch.random.fork_rng(devices=[input_ids.device] if input_ids.device.type == "cuda" else []):
                torch.manual_seed(seed)
                ids, mask = input_ids[row : row + 1, keep], attention_mask[row : row + 1, keep]
                rows.append(generate_with_states(model, ids, mask, generate_kwargs, with_states=with_states))
        generated = pad_rows([ids[0].tolist() for ids, _ in rows], generate_kwargs["pad_token_id"])[0]
        generated, width = generated.to(input_ids.device), input_ids.shape[1]
        if not with_states or any(states is None for _, states in rows):
            return generated, None
        states = rows[0][1].new_zeros(len(rows), width + generated.shape[1], rows[0][1].shape[-1])
        for index, (ids, row_states) in enumerate(rows):  # laid out like the left-padded batch
            states[index, width - row_states.shape[1] + ids.shape[1] : width + ids.shape[1]] = row_states[0]
        return generated, states
    if not with_states:
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        return out[:, input_ids.shape[1] :], None
    norm = getattr(model.get_decoder(), "norm", None)
    hidden = not isinstance(norm, torch.nn.Module)  # no final norm to hook: every layer's states (more memory)
    captured, handle = ([], None) if hidden else hook_outputs(norm)
    kwargs = {**generate_kwargs, "return_dict_in_generate": True, "output_hidden_states": hidden}
    try:
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            generated = out.sequences[:, input_ids.shape[1] :]
            full_mask = torch.cat([attention_mask, torch.ones_like(generated)], dim=1)
            step = dict(position_ids=full_mask.sum(dim=1, keepdim=True) - 1, cache=out.cache, use_cache=True)
            step["cache_position"] = torch.tensor([full_mask.shape[1] - 1], device=full_mask.device)
            last = model(input_ids=generated[:, -1:], attention_mask=full_mask, output_hidden_states=hidden, **step)
    finally:
        if handle is not None:
            handle.remove()
    if hidden:
        captured = [step[-1] for step in out.hidden_states] + [last.hidden_states[-1]]
    if sum(state.shape[1] for state in captured) != input_ids.shape[1] + generated.shape[1]:
        return generated, None
    return generated, torch.cat(captured, dim=1)
