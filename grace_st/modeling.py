"""GRACE sentence-transformers modules: the rationale-generating input module and its pooling.

This file is self-contained on purpose (it imports only torch, transformers and sentence-transformers): a
published GRACE model carries a copy of it as ``grace_st.py`` so that it loads with plain
sentence-transformers where the ``grace_st`` package is not installed.

Pipeline: ``[Transformer, RationalePooling, Normalize]``. For every text, :class:`Transformer` builds the GRACE chat
prompt, lets the causal LM write a rationale, runs the LM over prompt + rationale and hands on the last-layer hidden
states together with a mask of the pooled span (user text through the end of the rationale). :class:`RationalePooling`
averages over that span.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from sentence_transformers.base.modules import InputModule, Module
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

try:  # The decode engine; its block moves into this file at merge (then this import goes).
    from grace_st._decode import RowTemperature, decode, unsupported_reason
except ImportError:  # A published copy of this file where grace_st is not installed: model.generate only.
    RowTemperature = decode = None

    def unsupported_reason(model, generate_kwargs):
        return "grace_st._decode is not installed"


logger = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "Read and analyze the following text, then you need to provide your reasoning within <think></think> tags. "
    "Finally, generate a comprehensive understanding of this text."
)

RationaleMode = Literal["generate", "none", "echo"]
RATIONALE_MODES: tuple[str, ...] = ("generate", "none", "echo")
GenerationBackend = Literal["transformers", "vllm"]
GENERATION_BACKENDS: tuple[str, ...] = ("transformers", "vllm")
DecodePath = Literal["engine", "generate"]
DECODE_PATHS: tuple[str, ...] = ("engine", "generate")
POOLING_MODES: tuple[str, ...] = ("mean", "lasttoken")
# Marks where the user text goes when the chat template is rendered once per system prompt.
_TEXT_PLACEHOLDER = "\u2063GRACE_ST_TEXT\u2063"


@dataclass
class RationaleBatch:
    """Generated (or given) rationales of one batch, right-padded.

    Attributes:
        ids: ``(batch, R)`` token ids of the rationales; positions past a rationale's end hold the pad id.
        mask: ``(batch, R)`` 1 for rationale tokens (including the end-of-sequence token that closed it), else 0.
        finished: ``(batch,)`` True where the rationale ended with an end-of-sequence token before the limit.
        states: ``(batch, P + R, hidden)`` last-layer states over prompt + rationale kept from generation, if asked.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    finished: torch.Tensor
    states: torch.Tensor | None = None


def rationale_mask(generated: torch.Tensor, eos_token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of the rationale tokens in generated ids: everything up to and including the first EOS.

    Args:
        generated: ``(batch, R)`` ids produced by ``generate`` (after the prompt).
        eos_token_ids: ids that end a rationale.

    Returns:
        ``(mask, finished)``: the ``(batch, R)`` long mask and a ``(batch,)`` bool tensor, True where an EOS was met.

    Example:
        >>> mask, finished = rationale_mask(torch.tensor([[5, 2, 2], [5, 6, 7]]), [2])
        >>> mask.tolist(), finished.tolist()
        ([[1, 1, 0], [1, 1, 1]], [True, False])
    """
    if generated.shape[1] == 0:
        return generated.new_zeros(generated.shape), torch.zeros(generated.shape[0], dtype=torch.bool)
    is_eos = torch.isin(generated, torch.tensor(list(eos_token_ids), device=generated.device))
    # Number of EOS tokens strictly before each position: a token is part of the rationale while that is 0.
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    mask = (eos_before == 0).long()
    return mask, is_eos.any(dim=1).cpu()


def pooling_span_mask(attention_mask: torch.Tensor, text_start: torch.Tensor) -> torch.Tensor:
    """Mask of the GRACE pooled span: from the first user-text token to the end of the rationale.

    The system prompt and the role headers before the user text are excluded; the tokens after the user text
    (end-of-turn and the assistant header) and the rationale are included; padding is excluded.

    Args:
        attention_mask: ``(batch, P + R)`` mask of the full sequence (left-padded prompt, right-padded
            rationale). It is not modified.
        text_start: ``(batch,)`` index of the first user-text token in each (padded) row.

    Returns:
        A new ``(batch, P + R)`` long tensor.

    Example:
        >>> am = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
        >>> pooling_span_mask(am, torch.tensor([2, 1])).tolist()
        [[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    after_start = positions.unsqueeze(0) >= text_start.to(attention_mask.device).unsqueeze(1)
    return attention_mask.clone().long() * after_start.long()


class Transformer(InputModule):
    """Input module that owns a causal LM, writes a GRACE rationale for every text and returns its hidden states.

    Reads (from :meth:`preprocess`): ``input_ids``, ``attention_mask`` (left-padded chat prompts), ``text_start``;
    in ``echo`` mode also ``echo_ids``/``echo_mask``.
    Writes: ``token_embeddings`` (last-layer hidden states over prompt + rationale), ``attention_mask`` (of that full
    sequence, a new tensor), ``pooling_mask`` (the GRACE span), ``rationale`` (list of strings), ``rationale_ids``,
    ``rationale_mask``, ``rationale_finished`` and ``batch_index`` (row of each text in its batch).

    Args:
        model: the causal LM (any ``AutoModelForCausalLM``).
        tokenizer: its tokenizer; must have a chat template.
        system_prompt: system message of the GRACE prompt. Defaults to the paper's prompt.
        rationale_mode: ``"generate"`` (GRACE), ``"none"`` (no rationale: the paper's base-model row) or ``"echo"``
            (the text repeated as the rationale, no generation). Defaults to ``"generate"``.
        max_new_tokens: rationale length limit in tokens. Defaults to 128.
        max_input_tokens: user texts longer than this many tokens are truncated (with one warning per call).
            Defaults to 1024.
        do_sample: sample rationales instead of greedy decoding. Greedy (the default) keeps embeddings deterministic.
        temperature: sampling temperature (only with ``do_sample``). Defaults to 1.0.
        top_p: nucleus sampling mass (only with ``do_sample``). Defaults to 1.0.
        top_k: top-k sampling cut-off, 0 for none (only with ``do_sample``). Defaults to 0.
        repetition_penalty: passed to ``generate``. Defaults to 1.0.
        single_pass: take the pooled states from generation itself instead of a second forward pass over prompt +
            rationale (same embedding within float tolerance; the two-pass path stays as the reference).
            Defaults to True.

    Runtime settings (not saved in ``grace_config.json``): ``embedding_cache_dir`` (see :class:`EmbeddingCache`), the
    generation backend (see :meth:`set_generation_backend`: ``"transformers"`` or ``"vllm"``), ``decode_path`` (see
    :meth:`generate_rationales`: ``"engine"`` or the reference ``"generate"``) and ``decode_counts`` (None, or a dict
    the engine adds its ``decode_row_steps`` and ``prompt_tokens`` to).
    """

    config_file_name = "grace_config.json"
    config_keys = [
        "system_prompt",
        "rationale_mode",
        "max_new_tokens",
        "max_input_tokens",
        "do_sample",
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "single_pass",
    ]
    save_in_root = True

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        rationale_mode: RationaleMode = "generate",
        max_new_tokens: int = 128,
        max_input_tokens: int = 1024,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        single_pass: bool = True,
    ) -> None:
        super().__init__()
        if rationale_mode not in RATIONALE_MODES:
            raise ValueError(f"rationale_mode={rationale_mode!r} is not supported; choose one of {RATIONALE_MODES}.")
        for name, value, minimum in (("max_new_tokens", max_new_tokens, 1), ("max_input_tokens", max_input_tokens, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name}={value!r} is not allowed; it must be an integer >= {minimum}.")
        if not isinstance(system_prompt, str):
            raise TypeError(f"system_prompt must be a string, got {system_prompt!r}.")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature!r} is not allowed; it must be > 0.")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p!r} is not allowed; it must be in (0, 1].")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"The tokenizer of {getattr(model.config, '_name_or_path', type(model).__name__)!r} has no chat "
                "template. GRACE needs an instruction-tuned backbone with a chat template (e.g. a '*-Instruct' "
                "model), or set `tokenizer.chat_template` before building the module."
            )
        self.model = model
        self.tokenizer = tokenizer
        if self.tokenizer.pad_token_id is None:
            # Decoder-only tokenizers often lack a pad token; padding positions are masked out everywhere.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.system_prompt = system_prompt
        self.rationale_mode = rationale_mode
        self.max_new_tokens = max_new_tokens
        self.max_input_tokens = max_input_tokens
        self.do_sample = do_sample
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = int(top_k)
        self.repetition_penalty = float(repetition_penalty)
        self.single_pass = bool(single_pass)
        self._template_cache: dict[str, tuple[list[int], list[int]]] = {}
        self._truncated_texts = 0
        self._fingerprint: str | None = None
        # Optional on-disk embedding cache (a runtime setting, not saved): see EmbeddingCache.
        self.embedding_cache_dir: str | None = None
        # What writes the rationales (a runtime setting, not saved): see set_generation_backend.
        self._generation_backend: str = "transformers"
        self._vllm_engine_kwargs: dict[str, Any] = {}
        self._vllm_engine: Any = None
        # How the transformers backend writes rationales with states (a runtime setting, not saved).
        self._decode_path: str = "engine"
        self.decode_counts: dict[str, int] | None = None

    # ------------------------------------------------------------------ properties
    @property
    def max_seq_length(self) -> int:
        """Input limit in tokens of the user text (sentence-transformers' name for it)."""
        return self.max_input_tokens

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self.max_input_tokens = value

    def get_embedding_dimension(self) -> int:
        return self.model.config.get_text_config().hidden_size

    @property
    def eos_token_ids(self) -> list[int]:
        """Token ids that end a rationale: the generation config's EOS ids plus the tokenizer's EOS."""
        ids = self.model.generation_config.eos_token_id
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    # ------------------------------------------------------------------ prompt building
    def _template_pieces(self, system_prompt: str) -> tuple[list[int], list[int]]:
        """Token ids of the chat prompt before and after the user text, for one system prompt (cached)."""
        if system_prompt not in self._template_cache:
            messages = [{"role": "user", "content": _TEXT_PLACEHOLDER}]
            if system_prompt:
                messages.insert(0, {"role": "system", "content": system_prompt})
            rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if rendered.count(_TEXT_PLACEHOLDER) != 1:
                raise ValueError("The chat template does not place the user message verbatim in the prompt.")
            before, after = rendered.split(_TEXT_PLACEHOLDER)
            encode = self.tokenizer
            self._template_cache[system_prompt] = (
                encode(before, add_special_tokens=False)["input_ids"],
                encode(after, add_special_tokens=False)["input_ids"],
            )
        return self._template_cache[system_prompt]

    def text_token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of the user texts as they enter the prompt (truncated to ``max_input_tokens``); no side effect."""
        return self._truncate(texts)[0]

    def _text_ids(self, texts: list[str]) -> list[list[int]]:
        """:meth:`text_token_ids`, counting truncated texts for the one warning per ``encode`` call."""
        ids, n_truncated = self._truncate(texts)
        self._truncated_texts += n_truncated
        return ids

    def _truncate(self, texts: list[str]) -> tuple[list[list[int]], int]:
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        n_truncated = sum(len(row) > self.max_input_tokens for row in ids)
        return [row[: self.max_input_tokens] for row in ids], n_truncated

    def preprocess(self, inputs: Sequence[str], prompt: str | None = None, **kwargs) -> dict[str, Any]:
        """Build left-padded GRACE chat prompts for a batch of texts.

        Args:
            inputs: the texts. Each must be a string.
            prompt: optional sentence-transformers prompt (e.g. a saved ``"query"`` prompt); it is prepended to the
                user text and so is part of the pooled span.

        Returns:
            ``input_ids``, ``attention_mask``, ``text_start`` (and ``echo_ids``/``echo_mask`` in ``echo`` mode).
        """
        texts = check_texts(inputs)
        if prompt:
            texts = [prompt + text for text in texts]
        before, after = self._template_pieces(self.system_prompt)
        text_ids = self._text_ids(texts)
        rows = [before + ids + after for ids in text_ids]
        width = max((len(row) for row in rows), default=0)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        text_start = torch.zeros(len(rows), dtype=torch.long)
        for i, row in enumerate(rows):
            offset = width - len(row)
            input_ids[i, offset:] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, offset:] = 1
            text_start[i] = offset + len(before)
        features: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "text_start": text_start}
        if self.rationale_mode == "echo":
            eos = self.eos_token_ids[0]
            echo = [ids + [eos] for ids in text_ids]
            features["echo_ids"], features["echo_mask"] = _right_pad(echo, pad)
        return features

    # ------------------------------------------------------------------ generation and embedding
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
        else:
            # Unset the backbone's sampling defaults so greedy decoding does not warn about them.
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    @property
    def generation_backend(self) -> str:
        """What writes the rationales: ``"transformers"`` (default) or ``"vllm"`` (:meth:`set_generation_backend`)."""
        return self._generation_backend

    @generation_backend.setter
    def generation_backend(self, backend: GenerationBackend) -> None:
        self.set_generation_backend(backend)

    def set_generation_backend(self, backend: GenerationBackend = "transformers", **engine_kwargs) -> None:
        """Choose what generates the rationales at inference time (a runtime setting, not saved with the model).

        With ``"vllm"``, a ``vllm.LLM`` engine, built on first use from the LM's folder, writes the rationales for
        the very prompt token ids that :meth:`preprocess` builds, with the module's decoding settings (greedy by
        default); the pooled states then come from one transformers forward pass over prompt + rationale (the
        two-pass path of :meth:`embed`), since vLLM does not return hidden states. The engine loads the weights from
        disk, not from memory: after changing weights, save the model and select the backend again with ``model=``.
        The transformers LM stays on its device for the pooling pass, so leave it room on the GPU
        (``gpu_memory_utilization``).

        Args:
            backend: ``"transformers"`` (``model.generate``; the default) or ``"vllm"`` (needs ``pip install vllm``
                and a GPU).
            **engine_kwargs: only with ``"vllm"``; passed to ``vllm.LLM`` (e.g. ``gpu_memory_utilization=0.5``,
                ``tensor_parallel_size=2``). ``model`` defaults to the folder (or Hub id) the LM was loaded from and
                ``dtype`` to the LM's dtype.

        Raises:
            ValueError: unknown backend, engine options without ``"vllm"``, or an LM with no folder to load from.
            ImportError: ``"vllm"`` without the vllm package installed.
        """
        if backend not in GENERATION_BACKENDS:
            raise ValueError(f"generation backend {backend!r} is not supported; choose one of {GENERATION_BACKENDS}.")
        if backend == "transformers":
            if engine_kwargs:
                raise ValueError(f"Engine options {sorted(engine_kwargs)} are only used with the 'vllm' backend.")
        else:
            _import_vllm()
            engine_kwargs = dict(engine_kwargs)
            if not engine_kwargs.get("model"):
                engine_kwargs["model"] = getattr(self.model.config, "_name_or_path", "")
            if not engine_kwargs["model"]:
                raise ValueError(
                    "The 'vllm' backend loads the LM from a folder or Hub id, and this in-memory LM has none. Save "
                    "the model first (`model.save(path)`) and pass its folder: "
                    "`model[0].set_generation_backend('vllm', model=path)`."
                )
            engine_kwargs.setdefault("dtype", str(self.model.dtype).removeprefix("torch."))
        self._generation_backend = backend
        self._vllm_engine_kwargs = engine_kwargs
        self._vllm_engine = None  # built on first use, with the options given here

    @property
    def decode_path(self) -> str:
        """How rationales with states are written by the transformers backend (a runtime setting, not saved).

        ``"engine"`` (default): :func:`grace_st._decode.decode`, which runs the shared prompt prefix once and drops
        finished rows from the batch; used when :func:`grace_st._decode.unsupported_reason` allows it (eager/sdpa
        attention, ...), otherwise ``"generate"``: ``model.generate`` plus one cached step, the reference.
        """
        return self._decode_path

    @decode_path.setter
    def decode_path(self, value: DecodePath) -> None:
        if value not in DECODE_PATHS:
            raise ValueError(f"decode_path={value!r} is not supported; choose one of {DECODE_PATHS}.")
        self._decode_path = value

    def generate_rationales(
        self, features: dict[str, Any], with_states: bool = False, **generate_kwargs
    ) -> RationaleBatch:
        """Generate one rationale per prompt in ``features`` (left-padded, with KV cache).

        Args:
            features: output of :meth:`preprocess` on the model's device.
            with_states: also keep the last-layer hidden states that generation computes (prefill + decode steps),
                completed by one decode step for the final token, so no second pass over prompt + rationale is
                needed (see :meth:`embed` for the two-pass reference). Written by the decode engine unless
                ``decode_path="generate"`` (see :attr:`decode_path`).
            **generate_kwargs: overrides of :meth:`generation_kwargs` (e.g. ``temperature`` in training;
                ``temperature`` may be a ``(batch,)`` tensor of per-row temperatures).

        Returns:
            The rationales as a :class:`RationaleBatch` (``states`` set when ``with_states``, except with the
            ``"vllm"`` generation backend, which returns no hidden states: see :meth:`set_generation_backend`).
        """
        input_ids, attention_mask = features["input_ids"], features["attention_mask"]
        if self.rationale_mode == "none":
            empty = input_ids.new_zeros((input_ids.shape[0], 0))
            return RationaleBatch(empty, empty.clone(), torch.zeros(input_ids.shape[0], dtype=torch.bool))
        if self.rationale_mode == "echo":
            return RationaleBatch(
                features["echo_ids"], features["echo_mask"], torch.ones(input_ids.shape[0], dtype=torch.bool)
            )
        kwargs = {**self.generation_kwargs(), **generate_kwargs}
        row_temperatures = isinstance(kwargs.get("temperature"), torch.Tensor)
        if self._generation_backend == "vllm":
            if row_temperatures:
                raise ValueError("Per-row temperatures (a tensor) are not supported by the 'vllm' backend.")
            # vLLM returns no hidden states: `states` stays unset and callers use the two-pass `embed`.
            return self._generate_with_vllm(features, kwargs)
        if with_states and self._decode_path == "engine":
            before, _ = self._template_pieces(self.system_prompt)
            reason = unsupported_reason(self.model, kwargs) or ("no shared prompt prefix" if not before else None)
            batch = None if reason else self._generate_with_engine(features, kwargs, len(before))
            if batch is not None:
                return batch
            logger.debug("Decode engine not used (%s); using model.generate.", reason or "states not captured")
        if row_temperatures:
            # `generate` takes one temperature: per-row temperatures become a logits processor.
            processors = [*(kwargs.get("logits_processor") or []), RowTemperature(kwargs["temperature"])]
            kwargs.update(temperature=1.0, logits_processor=LogitsProcessorList(processors))
        if not with_states:
            with torch.no_grad():
                sequences = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            return self._rationale_batch(sequences[:, input_ids.shape[1] :])
        with torch.no_grad(), _LastLayerStates(self.model) as captured:
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                return_dict_in_generate=True,
                output_hidden_states=captured.needs_hidden_states,
                **kwargs,
            )
            generated = out.sequences[:, input_ids.shape[1] :]
            if captured.needs_hidden_states:
                captured.states = [step[-1] for step in out.hidden_states]
            # Generation never feeds its last token back; one cached decode step gives that token's state.
            full_mask = torch.cat([attention_mask, torch.ones_like(generated)], dim=1)
            last = self.model(
                input_ids=generated[:, -1:],
                attention_mask=full_mask,
                position_ids=full_mask.sum(dim=1, keepdim=True) - 1,
                cache=out.cache,
                cache_position=torch.tensor([full_mask.shape[1] - 1], device=full_mask.device),
                use_cache=True,
                output_hidden_states=captured.needs_hidden_states,
            )
            if captured.needs_hidden_states:
                captured.states.append(last.hidden_states[-1])
        batch = self._rationale_batch(generated)
        expected = input_ids.shape[1] + generated.shape[1]
        if sum(state.shape[1] for state in captured.states) == expected:
            batch.states = torch.cat(captured.states, dim=1)
        else:
            # The hooked norm was not on the forward path (e.g. a copied or re-wrapped model): leave `states` unset
            # so callers fall back to the two-pass reference instead of pooling wrong states.
            logger.warning(
                "Could not capture the last-layer states during generation; using a second forward pass instead."
            )
        return batch

    def _generate_with_engine(
        self, features: dict[str, Any], kwargs: dict[str, Any], prefix_len: int
    ) -> RationaleBatch | None:
        """:meth:`generate_rationales` with states, by the decode engine (:attr:`decode_path`); None if impossible."""
        sampling = {}
        if kwargs["do_sample"]:
            # Unset sampling settings fall back to the LM's generation config, as in `generate`.
            sampling = {
                key: self.model.generation_config.to_dict().get(key) if kwargs.get(key) is None else kwargs[key]
                for key in ("temperature", "top_k", "top_p")
            }
        eos = kwargs["eos_token_id"]
        with torch.no_grad():
            result = decode(
                self.model,
                features["input_ids"],
                features["attention_mask"],
                features["text_start"],
                prefix_len,
                max_new_tokens=kwargs["max_new_tokens"],
                eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
                pad_token_id=kwargs["pad_token_id"],
                do_sample=bool(kwargs["do_sample"]),
                counts=self.decode_counts,
                **sampling,
            )
        if result is None:
            return None
        batch = self._rationale_batch(result[0])
        batch.states = result[1]
        return batch

    def _generate_with_vllm(self, features: dict[str, Any], generate_kwargs: dict[str, Any]) -> RationaleBatch:
        """Rationales for the prompts of ``features``, written by the vLLM engine (:meth:`set_generation_backend`)."""
        vllm = _import_vllm()
        if self._vllm_engine is None:
            logger.info("Building the vLLM engine: %s", self._vllm_engine_kwargs)
            self._vllm_engine = vllm.LLM(**self._vllm_engine_kwargs)
        params = vllm.SamplingParams(**vllm_sampling_kwargs(generate_kwargs))
        input_ids, attention_mask = features["input_ids"], features["attention_mask"]
        # The prompts exactly as `preprocess` built them, without their left padding.
        prompts = [
            {"prompt_token_ids": row[mask.bool()].tolist()}
            for row, mask in zip(input_ids.cpu(), attention_mask.cpu(), strict=True)
        ]
        outputs = self._vllm_engine.generate(prompts, params, use_tqdm=False)
        eos = self.eos_token_ids
        rows = []
        for output in outputs:
            completion = output.outputs[0]
            row = list(completion.token_ids)
            if completion.finish_reason == "stop" and eos and (not row or row[-1] not in eos):
                # A stop token that vLLM left out of `token_ids`: the rationale includes its closing EOS.
                # `stop_reason` is the stop token id, or None for the tokenizer's own EOS.
                stop = getattr(completion, "stop_reason", None)
                if stop not in eos:
                    stop = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id in eos else eos[0]
                row.append(stop)
            rows.append(row)
        ids, valid = _right_pad(rows, self.tokenizer.pad_token_id)
        return self._rationale_batch(ids.to(input_ids.device), valid.to(input_ids.device))

    def _rationale_batch(self, generated: torch.Tensor, valid: torch.Tensor | None = None) -> RationaleBatch:
        mask, finished = rationale_mask(generated, self.eos_token_ids)
        if valid is not None:
            # Rows of different lengths (vLLM) are right-padded: padding neither belongs to a rationale nor ends one.
            mask = mask * valid
            is_eos = torch.isin(generated, torch.tensor(self.eos_token_ids, device=generated.device))
            finished = (is_eos & mask.bool()).any(dim=1).cpu()
        ids = generated.masked_fill(mask == 0, self.tokenizer.pad_token_id)
        return RationaleBatch(ids, mask, finished)

    def outputs_from_states(self, features: dict[str, Any], rationales: RationaleBatch) -> dict[str, Any]:
        """The same outputs as :meth:`embed`, from the states kept during generation (single pass)."""
        attention_mask = torch.cat(
            [features["attention_mask"], rationales.mask.to(features["attention_mask"].device)], 1
        )
        return {
            "token_embeddings": rationales.states,
            "attention_mask": attention_mask,
            "pooling_mask": pooling_span_mask(attention_mask, features["text_start"]),
        }

    def embed(self, features: dict[str, Any], rationales: RationaleBatch) -> dict[str, Any]:
        """Run the LM over prompt + rationale and return hidden states with the GRACE pooling mask.

        This is the single place where embeddings' token states are computed; training rewards call it too.

        Args:
            features: output of :meth:`preprocess` (``input_ids``, ``attention_mask``, ``text_start``).
            rationales: the rationales of the same rows.

        Returns:
            ``token_embeddings``, ``attention_mask``, ``pooling_mask`` over the full sequence.
        """
        prompt_ids, prompt_mask = features["input_ids"], features["attention_mask"]
        rationale_ids = rationales.ids.to(prompt_ids.device)
        rationale_mask_ = rationales.mask.to(prompt_mask.device)
        input_ids = torch.cat([prompt_ids, rationale_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, rationale_mask_], dim=1)
        # Positions follow the real tokens only, as in generation with left padding.
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=True,
            use_cache=False,
        )
        return {
            "token_embeddings": outputs.hidden_states[-1],
            "attention_mask": attention_mask,
            "pooling_mask": pooling_span_mask(attention_mask, features["text_start"]),
        }

    def decode_rationales(self, rationales: RationaleBatch) -> list[str]:
        """Decode rationales to text (special tokens such as the closing EOS removed)."""
        if rationales.ids.shape[1] == 0:
            return [""] * rationales.ids.shape[0]
        return self.tokenizer.batch_decode(
            rationales.ids.masked_fill(rationales.mask == 0, 0), skip_special_tokens=True
        )

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        single_pass = self.single_pass and self.rationale_mode == "generate"
        rationales = self.generate_rationales(features, with_states=single_pass)
        output = dict(features)
        from_states = single_pass and rationales.states is not None
        output.update(
            self.outputs_from_states(features, rationales) if from_states else self.embed(features, rationales)
        )
        if self.rationale_mode == "echo":
            texts = self.tokenizer.batch_decode(
                features["echo_ids"].masked_fill(features["echo_mask"] == 0, 0), skip_special_tokens=True
            )
            output["rationale"] = texts
        else:
            output["rationale"] = self.decode_rationales(rationales)
        output["rationale_ids"] = rationales.ids
        output["rationale_mask"] = rationales.mask
        output["rationale_finished"] = rationales.finished.to(rationales.ids.device)
        output["batch_index"] = torch.arange(rationales.ids.shape[0], device=rationales.ids.device)
        return output

    def fingerprint(self, model) -> str:
        """Hash of the LM weights and every module's saved options (computed once per model object)."""
        if self._fingerprint is None:
            digest = hashlib.blake2b(digest_size=20)
            for name, tensor in sorted(self.model.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            for module in model:
                digest.update(json.dumps(module.get_config_dict(), sort_keys=True, default=str).encode())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def reset_fingerprint(self) -> None:
        """Forget the cached fingerprint, e.g. after changing weights in place."""
        self._fingerprint = None

    def __getstate__(self) -> dict[str, Any]:
        # A vLLM engine does not pickle (multi-process encoding, deepcopy): a copy builds its own on first use.
        state = super().__getstate__()
        state["_vllm_engine"] = None
        return state

    # ------------------------------------------------------------------ sentence-transformers integration
    def on_model_ready(self, model) -> None:
        """Guard ``model.encode``: input checks by index, ``[]`` → ``(0, dim)``, per-text rationales, one warning."""
        if not isinstance(model.__dict__.get("encode"), _EncodeGuard):
            model.encode = _EncodeGuard(model, self)

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        if not safe_serialization:
            raise ValueError("GRACE models are saved as safetensors only (safe_serialization=True).")
        self.model.save_pretrained(output_path, safe_serialization=True)
        self.save_tokenizer(output_path)
        self.save_config(output_path)

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        trust_remote_code: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        config_kwargs: dict[str, Any] | None = None,
        **kwargs,
    ) -> Transformer:
        config = cls.load_config(
            model_name_or_path,
            subfolder=subfolder,
            token=token,
            cache_folder=cache_folder,
            revision=revision,
            local_files_only=local_files_only,
        )
        unknown = set(config) - set(cls.config_keys)
        if unknown:
            raise ValueError(f"Unknown keys {sorted(unknown)} in {cls.config_file_name}; known: {cls.config_keys}.")
        hub_kwargs = {
            "token": token,
            "cache_dir": cache_folder,
            "revision": revision,
            "local_files_only": local_files_only,
        }
        if subfolder:
            hub_kwargs["subfolder"] = subfolder
        model, tokenizer = load_backbone(
            model_name_or_path,
            model_kwargs={**hub_kwargs, **(model_kwargs or {}), **(config_kwargs or {})},
            processor_kwargs={**hub_kwargs, **(processor_kwargs or {})},
        )
        return cls(model, tokenizer, **config)

    def __repr__(self) -> str:
        return f"Transformer({self.get_config_dict()}, backbone={type(self.model).__name__})"


class RationalePooling(Module):
    """Pools GRACE token states into one embedding.

    Reads ``token_embeddings`` and ``pooling_mask`` (falls back to ``attention_mask``); writes ``sentence_embedding``.
    Incoming masks are never modified.

    Args:
        embedding_dimension: hidden size of the LM.
        pooling_mode: ``"mean"`` (GRACE: masked mean over user text + rationale) or ``"lasttoken"`` (state of the last
            pooled token, the EOS that closed the rationale; kept for ablations). Defaults to ``"mean"``.
    """

    config_keys = ["embedding_dimension", "pooling_mode"]

    def __init__(self, embedding_dimension: int, pooling_mode: Literal["mean", "lasttoken"] = "mean") -> None:
        super().__init__()
        if pooling_mode not in POOLING_MODES:
            raise ValueError(f"pooling_mode={pooling_mode!r} is not supported; choose one of {POOLING_MODES}.")
        self.embedding_dimension = int(embedding_dimension)
        self.pooling_mode = pooling_mode

    def get_embedding_dimension(self) -> int:
        return self.embedding_dimension

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        states = features["token_embeddings"]
        mask = features.get("pooling_mask", features["attention_mask"]).to(states.device)
        features["sentence_embedding"] = pool(states, mask, self.pooling_mode)
        return features

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.save_config(output_path)


def pool(states: torch.Tensor, mask: torch.Tensor, pooling_mode: str = "mean") -> torch.Tensor:
    """Pool ``(batch, seq, dim)`` states over a ``(batch, seq)`` 0/1 mask, in float32 for stable averages.

    Example:
        >>> s = torch.arange(6.0).reshape(1, 3, 2)
        >>> pool(s, torch.tensor([[0, 1, 1]])).tolist(), pool(s, torch.tensor([[1, 1, 0]]), "lasttoken").tolist()
        ([[3.0, 4.0]], [[2.0, 3.0]])
    """
    weights = mask.to(torch.float32)
    if pooling_mode == "mean":
        summed = (states.float() * weights.unsqueeze(-1)).sum(dim=1)
        return (summed / weights.sum(dim=1, keepdim=True).clamp(min=1.0)).to(states.dtype)
    if pooling_mode == "lasttoken":
        positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
        last = (positions * (mask > 0)).argmax(dim=1)
        return states[torch.arange(states.shape[0], device=states.device), last]
    raise ValueError(f"pooling_mode={pooling_mode!r} is not supported; choose one of {POOLING_MODES}.")


def check_texts(inputs: Any) -> list[str]:
    """Return ``inputs`` as a list of strings or raise naming the first bad entry and its index.

    Example:
        >>> check_texts(["a", 3])
        Traceback (most recent call last):
        ...
        TypeError: texts[1] is 3 (int); GRACE encodes strings only.
    """
    if isinstance(inputs, str):
        inputs = [inputs]
    texts = list(inputs)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] is {text!r} ({type(text).__name__}); GRACE encodes strings only.")
    return texts


def load_backbone(
    name_or_path: str,
    model_kwargs: dict[str, Any] | None = None,
    processor_kwargs: dict[str, Any] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer (local folder or Hub id).

    Args:
        name_or_path: folder or Hub id.
        model_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``revision``, ...).
        processor_kwargs: passed to ``AutoTokenizer.from_pretrained``.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.
    """
    model_kwargs = dict(model_kwargs or {})
    model_kwargs.setdefault("dtype", torch.float32)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **(processor_kwargs or {}))
    model.eval()
    return model, tokenizer


def _import_vllm():
    """Import vllm (only when the ``"vllm"`` generation backend is selected) or say how to install it."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(
            "The 'vllm' generation backend needs the vllm package and a GPU: `pip install vllm` (see "
            "https://docs.vllm.ai for the build that matches your CUDA and torch), or keep the default "
            "'transformers' backend."
        ) from error
    return vllm


# The `generate` arguments that `vllm_sampling_kwargs` translates (those of `Transformer.generation_kwargs`).
_GENERATE_ARGS_FOR_VLLM = frozenset(
    {
        "max_new_tokens",
        "do_sample",
        "eos_token_id",
        "pad_token_id",
        "repetition_penalty",
        "temperature",
        "top_p",
        "top_k",
    }
)


def vllm_sampling_kwargs(generate_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Translate ``model.generate`` arguments (see :meth:`Transformer.generation_kwargs`) to ``vllm.SamplingParams``.

    Greedy decoding is ``temperature=0``; vLLM stops at the EOS ids (``stop_token_ids``) and keeps them in the output.

    Args:
        generate_kwargs: ``max_new_tokens``, ``eos_token_id``, and optionally ``do_sample``, ``temperature``,
            ``top_p``, ``top_k`` (0 = none), ``repetition_penalty``, ``pad_token_id`` (unused by vLLM).

    Returns:
        Keyword arguments for ``vllm.SamplingParams``.

    Example:
        >>> vllm_sampling_kwargs({"max_new_tokens": 8, "eos_token_id": [2], "do_sample": False})["temperature"]
        0.0
    """
    unsupported = sorted(set(generate_kwargs) - _GENERATE_ARGS_FOR_VLLM)
    if unsupported:
        raise ValueError(
            f"generate arguments {unsupported} have no translation for the 'vllm' backend; "
            f"supported: {sorted(_GENERATE_ARGS_FOR_VLLM)}."
        )
    eos = generate_kwargs["eos_token_id"]
    params: dict[str, Any] = {
        "n": 1,
        "max_tokens": int(generate_kwargs["max_new_tokens"]),
        "stop_token_ids": [eos] if isinstance(eos, int) else list(eos),
        "repetition_penalty": float(generate_kwargs.get("repetition_penalty") or 1.0),
    }
    if generate_kwargs.get("do_sample"):
        # None means the default, as in `generate`.
        temperature, top_p, top_k = (generate_kwargs.get(key) for key in ("temperature", "top_p", "top_k"))
        params.update(
            temperature=1.0 if temperature is None else float(temperature),
            top_p=1.0 if top_p is None else float(top_p),
            top_k=int(top_k) if top_k else -1,  # -1 = no top-k cut-off in every vLLM version
        )
    else:
        params.update(temperature=0.0, top_p=1.0, top_k=-1)
    return params


def _right_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(row) for row in rows), default=0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


class _LastLayerStates:
    """Collects the last-layer hidden states of every forward call while active.

    Hooks the decoder's final norm when the architecture has one (Llama, Qwen, Mistral, ...): only that layer's
    output is kept. Other architectures fall back to ``output_hidden_states`` (all layers, more memory).
    """

    def __init__(self, model: PreTrainedModel) -> None:
        self.norm = getattr(model.get_decoder(), "norm", None)
        self.needs_hidden_states = not isinstance(self.norm, torch.nn.Module)
        self.states: list[torch.Tensor] = []
        self._handle = None

    def __enter__(self) -> _LastLayerStates:
        if not self.needs_hidden_states:
            self._handle = self.norm.register_forward_hook(lambda module, args, output: self.states.append(output))
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()


class EmbeddingCache:
    """On-disk cache of final embeddings, one small file per (model fingerprint, settings, text).

    Off by default; enable with ``model[0].embedding_cache_dir = "path"``. Entries are written atomically (temporary
    file + rename) with a checksum, so several processes may share a folder; an unreadable or corrupt entry is
    recomputed and rewritten, never trusted. The model fingerprint hashes the weights and every saved option, once
    per model object (call :meth:`Transformer.reset_fingerprint` after changing weights in place).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        try:
            blob = self._path(key).read_bytes()
        except OSError:
            return None
        digest, payload = blob[:16], blob[16:]
        if hashlib.blake2b(payload, digest_size=16).digest() != digest:
            logger.warning("Embedding cache entry %s is corrupt; recomputing it.", self._path(key))
            return None
        try:
            return np.load(io.BytesIO(payload), allow_pickle=False)
        except (ValueError, OSError):
            return None

    def put(self, key: str, value: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(value), allow_pickle=False)
        payload = buffer.getvalue()
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(handle, "wb") as f:
            f.write(hashlib.blake2b(payload, digest_size=16).digest() + payload)
        os.replace(tmp, path)


class _EncodeGuard:
    """Wraps ``SentenceTransformer.encode`` of a GRACE model (installed by :meth:`Transformer.on_model_ready`).

    sentence-transformers sorts texts by length and only sees batches, so what needs the caller's whole list lives
    here: a non-string is reported with its index in the caller's list, ``[]`` gives a ``(0, dim)`` result,
    ``output_value=None`` yields each text's own ``rationale`` string, truncation warns once per call, texts repeated
    within one call are generated once, and the optional on-disk :class:`EmbeddingCache` is consulted.
    It is a plain class (not a closure) so the model stays picklable for multi-process encoding.
    """

    def __init__(self, model, module: Transformer) -> None:
        self.model = model
        self.module = module

    def __call__(self, inputs, *args, **kwargs):
        from sentence_transformers import SentenceTransformer

        encode = SentenceTransformer.encode
        bound = inspect.signature(encode).bind(self.model, inputs, *args, **kwargs)
        bound.apply_defaults()
        options = dict(bound.arguments)
        options.pop("self")
        options.update(options.pop("kwargs", {}))
        texts = check_texts(options.pop("inputs"))
        singular = isinstance(inputs, str)
        output_value = options["output_value"]
        if not texts:
            return self._empty(output_value, options)

        unique = list(dict.fromkeys(texts))
        self.module._truncated_texts = 0
        cache = self.module.embedding_cache_dir
        if cache is not None and output_value == "sentence_embedding" and options.get("pool") is None:
            result = self._encode_cached(EmbeddingCache(cache), unique, options)
        else:
            result = encode(self.model, unique, **options)
        if self.module._truncated_texts:
            logger.warning(
                "%d of %d texts were longer than max_input_tokens=%d and were truncated.",
                self.module._truncated_texts,
                len(unique),
                self.module.max_input_tokens,
            )
        if output_value is None:
            for item in result:
                item["rationale"] = item["rationale"][int(item.pop("batch_index"))]
        if len(unique) < len(texts):
            where = {text: i for i, text in enumerate(unique)}
            result = _gather(result, [where[text] for text in texts])
        return result[0] if singular else result

    def _encode_cached(self, cache: EmbeddingCache, texts: list[str], options: dict[str, Any]):
        from sentence_transformers import SentenceTransformer

        settings = {
            key: options.get(key)
            for key in ("prompt_name", "prompt", "normalize_embeddings", "precision", "truncate_dim")
        }
        settings["resolved_prompt"] = self.model._resolve_prompt(options.get("prompt"), options.get("prompt_name"))
        settings["model_truncate_dim"] = self.model.truncate_dim
        if self.module.generation_backend != "transformers":
            # Another engine may pick other greedy tokens on near-ties: its entries are kept apart.
            settings["generation_backend"] = self.module.generation_backend
        base = self.module.fingerprint(self.model) + json.dumps(settings, sort_keys=True, default=str)
        keys = [hashlib.blake2b((base + "\x00" + text).encode(), digest_size=20).hexdigest() for text in texts]
        rows: list[np.ndarray | None] = [cache.get(key) for key in keys]
        missing = [i for i, row in enumerate(rows) if row is None]
        if missing:
            fresh = SentenceTransformer.encode(
                self.model,
                [texts[i] for i in missing],
                **{**options, "convert_to_numpy": True, "convert_to_tensor": False},
            )
            for i, row in zip(missing, fresh, strict=True):
                rows[i] = row
                cache.put(keys[i], row)
        stacked = np.stack(rows)
        if options.get("convert_to_tensor"):
            return torch.from_numpy(stacked)
        if options.get("convert_to_numpy", True):
            return stacked
        return list(torch.from_numpy(stacked))

    def _empty(self, output_value, options):
        if output_value != "sentence_embedding":
            return []
        dim = self.model.get_embedding_dimension()
        if options.get("convert_to_tensor"):
            return torch.empty((0, dim), dtype=torch.float32)
        if options.get("convert_to_numpy", True):
            return np.empty((0, dim), dtype=np.float32)
        return []


def _gather(result, index: list[int]):
    """Expand results of unique texts back to the caller's list (dict items are copied, not shared)."""
    if isinstance(result, (np.ndarray, torch.Tensor)):
        return result[index]
    return [dict(result[i]) if isinstance(result[i], dict) else result[i] for i in index]
