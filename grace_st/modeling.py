"""GRACE modules ``[Transformer, RationalePooling, Normalize]``: the LM writes a rationale per text; the embedding is
the mean of its last-layer states over user text + rationale. Self-contained (torch, transformers,
sentence-transformers, and the decode engine ``_decode.py`` beside it, which also holds the transformers generation
paths): ``model.save()`` copies both files into the folder (this one as ``grace_st.py``), so saved and published GRACE
models load with plain sentence-transformers (``trust_remote_code=True``) where grace_st is not installed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from sentence_transformers.base.modules import InputModule, Module
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ._decode import generate_plain, generate_with_engine, generate_with_states, pad_rows

__version__ = "0.1.0"  # the grace_st version; saved in grace_config.json as "grace_st_version"

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "Read and analyze the following text, then you need to provide your reasoning within <think></think> tags. "
    "Finally, generate a comprehensive understanding of this text."
)
RationaleMode = Literal["generate", "none", "echo"]
RATIONALE_MODES: tuple[str, ...] = ("generate", "none", "echo")
POOLING_MODES: tuple[str, ...] = ("mean", "lasttoken")
MODULE_FILE_NAME = "grace_st.py"
ENGINE_FILE_NAME = "_decode.py"
DECODE_PATHS: tuple[str, ...] = ("engine", "generate")
_TEXT_PLACEHOLDER = "\u2063GRACE_ST_TEXT\u2063"  # where the user text goes when the chat template is rendered
_REAL = (int, float)
# Saved option -> (accepted types, check, what is allowed). bool is never accepted for a number, nor 0/1 for a bool.
_TRANSFORMER_RULES: dict[str, tuple[tuple[type, ...], Any, str]] = {
    "system_prompt": ((str,), lambda v: True, "a string"),
    "rationale_mode": ((str,), lambda v: v in RATIONALE_MODES, f"one of {RATIONALE_MODES}"),
    "max_new_tokens": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "max_input_tokens": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "do_sample": ((bool,), lambda v: True, "true or false (a boolean, not a string)"),
    "temperature": (_REAL, lambda v: 0 < v < math.inf, "a number > 0"),
    "top_p": (_REAL, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "top_k": ((int,), lambda v: v >= 0, "an integer >= 0 (0: no top-k cut-off)"),
    "repetition_penalty": (_REAL, lambda v: 0 < v < math.inf, "a number > 0"),
    "single_pass": ((bool,), lambda v: True, "true or false (a boolean, not a string)"),
}
OPTION_RULES = {
    **_TRANSFORMER_RULES,
    "embedding_dimension": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "pooling_mode": ((str,), lambda v: v in POOLING_MODES, f"one of {POOLING_MODES}"),
}


def check_option(name: str, value: Any, where: str = "") -> None:
    """Raise a ``ValueError`` naming the option when ``value`` has the wrong type or range (see ``OPTION_RULES``)."""
    types, ok, allowed = OPTION_RULES[name]
    if isinstance(value, bool) != (bool in types) or not isinstance(value, types) or not ok(value):
        raise ValueError(f"{where}{name}={value!r} is not allowed: it must be {allowed}.")


def check_texts(inputs: Any, name: str = "texts") -> list[str]:
    """Return ``inputs`` as a list of valid Unicode strings or raise naming the first bad entry as ``name[index]``.

    Example:
        >>> check_texts(["a", 3])
        Traceback (most recent call last):
        ...
        TypeError: texts[1] is 3 (int); GRACE encodes strings only.
    """
    if isinstance(inputs, (bytes, bytearray, Mapping)) or not isinstance(inputs, Iterable):
        raise TypeError(f"{name} must be a string or a list of strings, got {type(inputs).__name__}: {inputs!r:.80}.")
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{index}] is {text!r:.80} ({type(text).__name__}); GRACE encodes strings only.")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"{name}[{index}] = {text!r:.80} has a lone surrogate {text[error.start]!r} at character "
                f"{error.start}; only valid Unicode can be encoded."
            ) from None
    return texts


@dataclass
class RationaleBatch:
    """Rationales of one batch, right-padded: ``ids`` ``(batch, R)`` (pad id past a rationale's end), ``mask`` (1 for
    rationale tokens, the closing EOS included), ``finished`` ``(batch,)`` (ended with an EOS before the limit) and
    ``states`` ``(batch, P + R, hidden)``, the last-layer states over prompt + rationale kept from generation if asked.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    finished: torch.Tensor
    states: torch.Tensor | None = None


class GenerationBackend(Protocol):
    """What writes rationales instead of ``model.generate`` (``module.generation_backend = backend``; runtime, not
    saved). Multi-process encoding pickles the model: rebuild engines lazily. The ``repr`` names what changes the
    output (the embedding cache key uses it). Example: ``grace_st.vllm_backend.VLLMBackend``."""

    def generate(self, module: Transformer, features: dict[str, Any], **generate_kwargs: Any) -> RationaleBatch:
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


def pooling_span_mask(attention_mask: torch.Tensor, text_start: torch.Tensor) -> torch.Tensor:
    """New mask of the GRACE pooled span in ``(batch, P + R)`` ``attention_mask`` (not modified): from each row's
    ``text_start`` (first user-text token) to the end of the rationale, padding excluded.

    Example:
        >>> am = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
        >>> pooling_span_mask(am, torch.tensor([2, 1])).tolist()
        [[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    after_start = positions.unsqueeze(0) >= text_start.to(attention_mask.device).unsqueeze(1)
    return attention_mask.clone().long() * after_start.long()


class _Outputs(dict):
    """The forward output; names the valid choices when sentence-transformers asks for a missing ``output_value``."""

    def __missing__(self, key):
        raise KeyError(
            f"{key!r} is not an output of a GRACE model: use output_value='sentence_embedding' (default), "
            f"'token_embeddings', or None for every output per text (rationale text: model[0].decode_rationale(item))."
        )


class Transformer(InputModule):
    """Input module that owns a causal LM, writes a GRACE rationale for every text and returns its hidden states.

    User text (and a sentence-transformers prompt) is tokenized as plain text: special-token strings in it, such as
    ``<|im_end|>``, become ordinary tokens and cannot close the user turn of the chat prompt.

    Reads (from :meth:`preprocess`): ``input_ids``, ``attention_mask`` (left-padded prompts), ``text_start`` (and
    ``echo_ids``/``echo_mask``). Writes, over prompt + rationale with each row left-aligned (the text's own tokens
    first, then padding, so a row does not depend on its batch-mates): ``input_ids``, ``token_embeddings``,
    ``attention_mask``, ``pooling_mask``, ``text_start``; and ``rationale_ids``/``rationale_mask``/
    ``rationale_finished`` (text: :meth:`decode_rationale`). ``encode(output_value="token_embeddings")`` gives each
    text its own rows; rows from :attr:`span_start` on are the pooled span (``lasttoken`` pools the last row only).

    Args:
        model, tokenizer: the causal LM (any ``AutoModelForCausalLM``) and its tokenizer (must have a chat template).
        system_prompt: system message of the GRACE prompt. Defaults to the paper's prompt.
        rationale_mode: ``"generate"`` (GRACE), ``"none"`` (no rationale) or ``"echo"`` (the text repeated as the
            rationale). Defaults to ``"generate"``.
        max_new_tokens: rationale length limit in tokens. Defaults to 128.
        max_input_tokens: longer user texts are truncated (with a warning). Defaults to 1024.
        do_sample: sample instead of greedy decoding (greedy keeps embeddings deterministic). Defaults to False.
        temperature, top_p, top_k, repetition_penalty: sampling settings (with ``do_sample``) and the repetition
            penalty. Default to 1.0, 1.0, 0 (no top-k cut-off), 1.0.
        single_pass: pool the states generation computed instead of a second pass over prompt + rationale (same
            embedding within float tolerance; the two-pass path is the reference). Defaults to True.

    Runtime settings (not saved): ``generation_backend`` (a :class:`GenerationBackend`; None = transformers),
    ``decode_path`` (how transformers keeps states from generation) and ``decode_counts`` (a dict the engine adds its
    work counts to; benchmarks).
    """

    config_file_name = "grace_config.json"
    config_keys = list(_TRANSFORMER_RULES)
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
        options = {key: value for key, value in locals().items() if key in self.config_keys}
        for name, value in options.items():
            check_option(name, value)
            if OPTION_RULES[name][0] == _REAL:
                options[name] = float(value)
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"The tokenizer of {getattr(model.config, '_name_or_path', type(model).__name__)!r} has no chat "
                "template. GRACE needs an instruction-tuned backbone with a chat template (e.g. a '*-Instruct' "
                "model), or set `tokenizer.chat_template` before building the module."
            )
        self.model = model
        self.tokenizer = tokenizer
        if self.tokenizer.pad_token_id is None:  # padding positions are masked out everywhere
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.__dict__.update(options)
        self.generation_backend = None
        self._decode_path = "engine"
        self.decode_counts: dict[str, int] | None = None

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
    def max_seq_length(self) -> int:
        """Input limit in tokens of the user text (sentence-transformers' name for ``max_input_tokens``)."""
        return self.max_input_tokens

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        check_option("max_input_tokens", value)
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

    def template_pieces(self) -> tuple[list[int], list[int]]:
        """Token ids of the chat prompt before and after the user text (the system prompt in the chat template)."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": _TEXT_PLACEHOLDER})
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if rendered.count(_TEXT_PLACEHOLDER) != 1:
            raise ValueError("The chat template does not place the user message verbatim in the prompt.")
        before, after = rendered.split(_TEXT_PLACEHOLDER)  # the template's own special tokens are parsed here
        return tuple(self.tokenizer([before, after], add_special_tokens=False)["input_ids"])

    @property
    def span_start(self) -> int:
        """Index of the first pooled row in a left-aligned output row (the length of the prompt before the text)."""
        return len(self.template_pieces()[0])

    def text_token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of user texts as they enter the prompt: plain text, truncated to ``max_input_tokens``."""
        return [row[: self.max_input_tokens] for row in self._plain_ids(texts)]

    def _plain_ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def preprocess(self, inputs: Sequence[str], prompt: str | None = None, **kwargs) -> dict[str, Any]:
        """Left-padded chat prompts (``input_ids``, ``attention_mask``, ``text_start``; ``echo_ids``/``echo_mask``) of
        a batch of texts; a sentence-transformers ``prompt`` is prepended to each text (part of the pooled span)."""
        ids = self._plain_ids([(prompt or "") + text for text in check_texts(inputs, name="length-sorted batch")])
        if n_long := sum(len(row) > self.max_input_tokens for row in ids):
            message = "%d of %d texts were longer than max_input_tokens=%d and were truncated."
            logger.warning(message, n_long, len(ids), self.max_input_tokens)
        ids = [row[: self.max_input_tokens] for row in ids]
        before, after = self.template_pieces()
        rows = [before + row + after for row in ids]
        input_ids, attention_mask = pad_rows(rows, self.tokenizer.pad_token_id, left=True)
        text_start = torch.tensor([input_ids.shape[1] - len(row) + len(before) for row in rows], dtype=torch.long)
        features = {"input_ids": input_ids, "attention_mask": attention_mask, "text_start": text_start}
        if self.rationale_mode == "echo":
            features["echo_ids"], features["echo_mask"] = pad_rows(
                [row + [self.eos_token_ids[0]] for row in ids], self.tokenizer.pad_token_id
            )
        return features

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
        self, features: dict[str, Any], with_states: bool = False, **generate_kwargs
    ) -> RationaleBatch:
        """One rationale per prompt of ``features`` (:meth:`preprocess` output on the model's device).

        ``with_states`` also keeps the last-layer states generation computes, so no second pass is needed
        (transformers only; ``_decode.generate_with_engine``, else ``generate_with_states``). ``generate_kwargs``
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
            return self.generation_backend.generate(self, features, **kwargs)
        if not with_states:
            return self.rationale_batch(generate_plain(self.model, input_ids, attention_mask, kwargs))
        result = None
        if self.decode_path == "engine":
            prefix_len = len(self.template_pieces()[0])
            result = generate_with_engine(self.model, features, kwargs, prefix_len, self.decode_counts)
        if result is None:
            result = generate_with_states(self.model, input_ids, attention_mask, kwargs)
        batch = self.rationale_batch(result[0])
        batch.states = result[1]
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

    def outputs_from_states(self, features: dict[str, Any], rationales: RationaleBatch) -> dict[str, Any]:
        """The outputs of :meth:`embed` from the states kept during generation (single pass)."""
        prompt_mask = features["attention_mask"]
        attention_mask = torch.cat([prompt_mask, rationales.mask.to(prompt_mask.device)], 1)
        return {"token_embeddings": rationales.states, **self._masks(features, attention_mask)}

    def embed(self, features: dict[str, Any], rationales: RationaleBatch) -> dict[str, Any]:
        """Run the LM over prompt + rationale: ``token_embeddings``, ``attention_mask``, ``pooling_mask`` (left-padded
        prompt, right-padded rationale). The two-pass reference; training rewards call it too."""
        prompt_ids, prompt_mask = features["input_ids"], features["attention_mask"]
        input_ids = torch.cat([prompt_ids, rationales.ids.to(prompt_ids.device)], dim=1)
        attention_mask = torch.cat([prompt_mask, rationales.mask.to(prompt_mask.device)], dim=1)
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # positions of real tokens, as in generate
        kwargs = {"output_hidden_states": True, "use_cache": False}
        states = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        states = states.hidden_states[-1]
        return {"token_embeddings": states, **self._masks(features, attention_mask)}

    @staticmethod
    def _masks(features: dict[str, Any], attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "attention_mask": attention_mask,
            "pooling_mask": pooling_span_mask(attention_mask, features["text_start"]),
        }

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

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        single_pass = self.single_pass and self.rationale_mode == "generate"
        rationales = self.generate_rationales(features, with_states=single_pass)
        if single_pass and rationales.states is not None:
            output = self.outputs_from_states(features, rationales)
        else:
            output = self.embed(features, rationales)
        output["input_ids"] = torch.cat([features["input_ids"], rationales.ids.to(features["input_ids"].device)], 1)
        # Left-align each row: its own tokens first (order kept), then the padding.
        order = torch.sort(1 - output["attention_mask"], dim=1, stable=True).indices
        for key in ("input_ids", "attention_mask", "pooling_mask", "token_embeddings"):
            value = output[key]
            output[key] = value.gather(1, order if value.dim() == 2 else order.unsqueeze(-1).expand_as(value))
        n_pad = (features["attention_mask"] == 0).sum(dim=1)
        return _Outputs(
            output,
            text_start=features["text_start"] - n_pad.to(features["text_start"].device),
            rationale_ids=rationales.ids,
            rationale_mask=rationales.mask,
            rationale_finished=rationales.finished.to(rationales.ids.device),
        )

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        """Write the LM (safetensors), tokenizer, ``grace_config.json`` (with the writing ``grace_st_version``) and
        this file as ``grace_st.py``."""
        if not safe_serialization:
            raise ValueError("GRACE models are saved as safetensors only (safe_serialization=True).")
        self.model.save_pretrained(output_path, safe_serialization=True)
        self.save_tokenizer(output_path)
        with open(os.path.join(output_path, self.config_file_name), "w", encoding="utf-8") as f:
            json.dump({**self.get_config_dict(), "grace_st_version": __version__}, f, indent=4)
        shutil.copyfile(os.path.abspath(__file__), os.path.join(output_path, MODULE_FILE_NAME))
        engine = os.path.join(os.path.dirname(os.path.abspath(__file__)), ENGINE_FILE_NAME)
        shutil.copyfile(engine, os.path.join(output_path, ENGINE_FILE_NAME))

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs) -> Transformer:
        """Load from a folder or Hub id (sentence-transformers' loading arguments); saved options are checked."""
        hub = {key: kwargs.get(key) for key in ("token", "revision")}
        hub["local_files_only"] = kwargs.get("local_files_only", False)
        config = cls.load_config(model_name_or_path, subfolder, cache_folder=kwargs.get("cache_folder"), **hub)
        where = f"{cls.config_file_name} of {model_name_or_path!r}: "
        if not config:
            raise ValueError(f"{where}missing or empty; a GRACE model folder written by model.save() has one.")
        unknown = set(config) - set(cls.config_keys) - {"grace_st_version"}
        if unknown:
            raise ValueError(f"{where}unknown keys {sorted(unknown)}; known: {cls.config_keys}.")
        if not isinstance(config.pop("grace_st_version", ""), str):
            raise ValueError(f"{where}grace_st_version must be a version string.")
        for name, value in config.items():
            check_option(name, value, where)
        hub.update(cache_dir=kwargs.get("cache_folder"), **({"subfolder": subfolder} if subfolder else {}))
        model_kwargs = {**hub, **(kwargs.get("model_kwargs") or {}), **(kwargs.get("config_kwargs") or {})}
        processor_kwargs = {**hub, **(kwargs.get("processor_kwargs") or {})}
        return cls(*load_backbone(model_name_or_path, model_kwargs, processor_kwargs), **config)

    def __repr__(self) -> str:
        return f"Transformer({self.get_config_dict()}, backbone={type(self.model).__name__})"


class RationalePooling(Module):
    """Pools GRACE token states into one embedding: reads ``token_embeddings`` and ``pooling_mask`` (else
    ``attention_mask``), writes ``sentence_embedding``.

    Args:
        embedding_dimension: hidden size of the LM (checked against it when the model is assembled or loaded).
        pooling_mode: ``"mean"`` (GRACE: masked mean over user text + rationale) or ``"lasttoken"`` (the last pooled
            token, the EOS that closed the rationale; for ablations). Defaults to ``"mean"``.
    """

    config_keys = ["embedding_dimension", "pooling_mode"]

    def __init__(self, embedding_dimension: int, pooling_mode: Literal["mean", "lasttoken"] = "mean") -> None:
        super().__init__()
        check_option("embedding_dimension", embedding_dimension)
        check_option("pooling_mode", pooling_mode)
        self.embedding_dimension = embedding_dimension
        self.pooling_mode = pooling_mode

    def get_embedding_dimension(self) -> int:
        return self.embedding_dimension

    def on_model_ready(self, model) -> None:
        """Check that ``embedding_dimension`` is the hidden size of the model's LM."""
        first = model[0]
        if isinstance(first, Transformer) and first.get_embedding_dimension() != self.embedding_dimension:
            raise ValueError(
                f"RationalePooling embedding_dimension={self.embedding_dimension} does not match the LM's hidden "
                f"size {first.get_embedding_dimension()}."
            )

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


def load_backbone(
    name_or_path: str, model_kwargs: dict[str, Any] | None = None, processor_kwargs: dict[str, Any] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM (float32 unless ``model_kwargs["dtype"]`` says otherwise, eval mode) and its tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **{"dtype": torch.float32, **(model_kwargs or {})})
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **(processor_kwargs or {}))
    return model.eval(), tokenizer
