"""GRACE training on TRL: :class:`GraceGRPOTrainer`, a ``trl.GRPOTrainer`` whose reward is the contrastive quality of
the policy's own embeddings.

How a batch flows (``../shared/GRACE.md``):

1. Each row's GRPO prompt is a record ``{"text", "query", "negative"}`` (the trainer packs the dataset's ``prompt``,
   ``query`` and ``negative`` columns into it), so the rollout function sees the whole row. The rollout function
   (TRL's ``rollout_func``) builds the prompt of the positive document with :meth:`grace_st.Transformer.preprocess`
   (the very prompt an inference model builds) and hands TRL those prompt ids with the rollouts.
2. With transformers generation (the default), one ``generate`` call writes the ``num_generations`` rollouts of every
   document *and* one rationale for the query and the hard negative of each group (per-row temperatures:
   ``temperature`` for rollouts, ``query_temperature`` for the others), keeping the last-layer states generation
   computes (:meth:`grace_st.Transformer.generate_rationales` with ``with_states=True``). With vLLM (TRL's
   ``trainer.vllm_generation``) or non-neutral sampling filters (top-k/top-p/min-p, repetition penalty,
   ``generation_kwargs``), the rollouts are generated on their own with TRL's generation settings and the
   query/negative rationales in a second call; the reward then embeds the rollouts with a second pass
   (:meth:`grace_st.Transformer.embed`, the two-pass reference).
3. The reward function receives what generation kept (an extra field of the rollout function's output), pools it
   with the inference model's own :class:`grace_st.RationalePooling` and ``Normalize`` modules, gathers the
   embeddings of all processes and scores every rollout with :func:`grace_st.training.rewards.grace_rewards`. TRL
   computes
   group-relative advantages and the clipped policy loss; checkpoints, PEFT, DeepSpeed and logging are TRL's and
   transformers'.

Every reward term and the collapse diagnostics (copy rate, distinct rollouts per group, within-group reward std, mean
length, finish rate) are logged every step under ``grace/*`` (through the reward function's ``log_metric``), and so is
which terms teach: ``grace/term_std/<term>`` (the term's within-group std) and ``grace/advantage_share/<term>`` (its
share of the advantage's variance; :func:`grace_st.training.rewards.term_statistics`), averaged over the run in the
training record's ``reward_terms``. ``query_rollouts=True`` adds, for every row, a row whose rollouts are rationales of
the query (:func:`grace_st.training.data.with_query_rollouts`).
``grace/copy_rate`` is token-weighted over each generation batch, as evaluation reports it
(:class:`grace_st.diagnostics.RationaleStats`; not logged for a batch without rationale tokens); the copy-penalty
reward term uses each rollout's own rate.

Seams: the trainer overrides no private TRL or transformers method. It uses TRL's experimental ``rollout_func``
(checked at construction; ``pyproject.toml`` caps trl to the tested minor version), the reward-function keywords
``log_metric`` and extra rollout fields (checked at the first step), and public ``compute_loss``/``train`` and
callbacks. At every optimisation step it checks that the prompt ids TRL trains on are the GRACE prompt ids its
rollout function built, so a TRL change that bypasses the rollout function fails loudly instead of training on
other prompts.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import json
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch

import grace_st
from grace_st.artifacts import TRAINING_INFO_FILE, TRAINING_RECORD_GENERATION_FIELDS, TRAINING_RECORD_REWARD_FIELDS
from grace_st.diagnostics import RationaleStats, copy_rate, distinct_per_group, group_reward_std, rationale_stats
from grace_st.factory import build_grace_model
from grace_st.model import RationaleBatch, RationalePooling, Transformer
from grace_st.tables import format_cell
from grace_st.training.callbacks import TimeBudget
from grace_st.training.checkpoints import (
    CheckpointCompletion,
    check_writable_folder,
    checkpoint_folders,
    is_complete_checkpoint,
    last_complete_checkpoint,
    remove_partial_checkpoints,
    write_folder,
)
from grace_st.training.config import GraceGRPOConfig
from grace_st.training.data import as_prompt_records, prompt_record, with_query_rollouts
from grace_st.training.provenance import base_model_info
from grace_st.training.rewards import grace_rewards, infonce_log_probs, term_statistics

try:
    from accelerate.utils import gather_object
    from sentence_transformers.base.modules import Normalize
    from transformers import LogitsProcessor, LogitsProcessorList
    from trl import GRPOTrainer
    from trl.models.utils import unwrap_model_for_generation
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError('GRACE training needs TRL: pip install "grace-st[train]"') from error

logger = logging.getLogger(__name__)

TESTED_WITH = "trl 1.16 and transformers 5.24"


class RowTemperature(LogitsProcessor):
    """Divides the logits of each row by that row's own sampling temperature (for ``model.generate``).

    The decode engine takes per-row temperatures directly (``temperature`` as a tensor); this processor gives
    ``model.generate`` the same behaviour. Pass ``temperature=1.0`` to ``generate`` so no global temperature is
    applied too.

    Args:
        temperatures: ``(batch,)`` temperatures, all > 0.
    """

    def __init__(self, temperatures: torch.Tensor) -> None:
        temperatures = torch.as_tensor(temperatures, dtype=torch.float32)
        if temperatures.ndim != 1 or bool((temperatures <= 0).any()):
            raise ValueError(f"temperatures must be a 1-D tensor of values > 0, got {temperatures.tolist()!r}.")
        self.temperatures = temperatures

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperatures.to(device=scores.device, dtype=scores.dtype).unsqueeze(1)


@dataclass
class GraceRollouts:
    """What the rollout function keeps for the reward of the same batch (TRL forwards it as an extra field).

    Attributes:
        parts: ``(features, rationales)`` pairs, pooled in order: the rollouts of the local rows first, then the
            query (and negative) rationales. One pair when everything was generated in one call.
        completion_ids: the rollouts as handed to TRL.
        firsts: local rows that own the query/negative rationale of their group.
        supervised: whether hard negatives were written.
        side_texts: the texts of the query (and negative) rationales: the queries of ``firsts``, then their negatives.
        prompt_ids: the GRACE prompt ids of the local rows, as handed to TRL.
    """

    parts: list[tuple[dict[str, Any], RationaleBatch]]
    completion_ids: list[list[int]]
    firsts: list[int]
    supervised: bool
    side_texts: list[str] = dataclasses.field(default_factory=list)
    prompt_ids: list[list[int]] = dataclasses.field(default_factory=list)

    def side_rationale_ids(self) -> list[list[int]]:
        """The query (and negative) rationales as id lists (closing EOS kept), in the order of ``side_texts``."""
        rows = []
        for _, rationales in self.parts:
            ids, mask = rationales.ids.cpu(), rationales.mask.cpu().bool()
            rows += [ids[i][mask[i]].tolist() for i in range(ids.shape[0])]
        return rows[len(self.completion_ids) :]


@dataclass
class EmbeddingBatch:
    """What the embedding loss needs of one generation batch (texts and rationale ids; no tensors are kept).

    Attributes:
        keys: ``(prompt ids, rollout ids)`` of every local row, in the order of ``documents``.
        documents: the text of every local row.
        rollouts: every local row's rollout (ids, closing EOS kept).
        groups: the group (index into the side texts' queries) of every local row.
        side_texts: one query per group, then (when ``supervised``) one hard negative per group.
        side_rationales: their rationales.
        supervised: whether hard negatives were written.
    """

    keys: list[tuple[tuple[int, ...], tuple[int, ...]]]
    documents: list[str]
    rollouts: list[list[int]]
    groups: list[int]
    side_texts: list[str]
    side_rationales: list[list[int]]
    supervised: bool

    def rows_of(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor, pad: int):
        """The local row of each row of a loss batch (prompt ids left-padded, rollouts right-padded with ``pad``).

        Raises:
            RuntimeError: a row that is not a rollout of this generation batch.
        """
        found = []
        for prompt, mask, completion in zip(prompt_ids.cpu(), prompt_mask.cpu(), completion_ids.cpu(), strict=True):
            prompt_key, row = tuple(prompt[mask.bool()].tolist()), completion.tolist()
            matches = [
                i
                for i, (p, c) in enumerate(self.keys)
                if p == prompt_key and tuple(row[: len(c)]) == c and all(t == pad for t in row[len(c) :])
            ]
            if not matches:
                raise RuntimeError(
                    "A row of TRL's loss batch is not a rollout of the latest GRACE generation batch, so the "
                    f"embedding loss cannot find its text; GRACE is tested with {TESTED_WITH}."
                )
            found.append(max(matches, key=lambda i: len(self.keys[i][1])))  # pad == EOS: the longest match
        return found


class GraceGRPOTrainer(GRPOTrainer):
    """GRPO trainer for GRACE embedding models.

    Args:
        model: causal LM (Hub id, local folder, ``PreTrainedModel`` or ``PeftModel``); an instruction-tuned model with
            a chat template.
        args: a :class:`grace_st.training.config.GraceGRPOConfig`.
        train_dataset: rows with ``prompt`` (the positive document, a plain string), ``query`` and ``negative``
            (``""`` when there is none), e.g. from :func:`grace_st.training.data.to_grpo_dataset`. The trainer packs
            each row
            into a prompt record ``{"text", "query", "negative"}``: TRL and the reward see that record as ``prompt``.
        eval_dataset: same columns, optional.
        processing_class: the tokenizer; loaded from ``model`` when None.
        callbacks: extra ``TrainerCallback`` objects.
        optimizers: ``(optimizer, scheduler)`` as in ``transformers.Trainer``.
        peft_config: a ``peft.LoraConfig`` to train an adapter instead of the full model.

    Raises:
        RuntimeError: the installed TRL lacks an extension point GRACE needs (at construction), or TRL bypassed
            the GRACE rollout function (at the first step).
    """

    _tag_names = ["trl", "grpo", "grace"]

    def __init__(
        self,
        model,
        args: GraceGRPOConfig,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
    ) -> None:
        if not isinstance(args, GraceGRPOConfig):
            raise TypeError(f"args must be a GraceGRPOConfig, got {type(args).__name__}.")
        check_trl_seams()
        if args.embedding_loss_weight > 0 and args.world_size > 1:
            raise ValueError(
                f"embedding_loss_weight={args.embedding_loss_weight!r} needs a single process (got "
                f"{args.world_size}): the embedding loss runs through the unwrapped policy; set it to 0 for "
                "distributed training."
            )
        if args.use_transformers_continuous_batching:
            raise ValueError(
                "use_transformers_continuous_batching=True is not supported by GraceGRPOTrainer: GRACE writes the "
                "rollouts with model.generate (keeping the states for the reward) or with vLLM (use_vllm=True)."
            )
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: as_prompt_records(v, f"eval_dataset[{k!r}]") for k, v in eval_dataset.items()}
        else:
            eval_dataset = as_prompt_records(eval_dataset, "eval_dataset")
        with warnings.catch_warnings():
            # rollout_func is experimental in TRL; GRACE checks it here and pins the tested TRL version instead.
            warnings.filterwarnings("ignore", message="You are using 'rollout_func'", category=UserWarning)
            super().__init__(
                model=model,
                reward_funcs=[self.grace_reward],
                args=args,
                train_dataset=as_prompt_records(
                    with_query_rollouts(train_dataset) if args.query_rollouts else train_dataset, "train_dataset"
                ),
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                callbacks=callbacks,
                optimizers=optimizers,
                peft_config=peft_config,
                rollout_func=self.grace_rollout,
            )
        self._check_generation_seam()
        # The one inference module; its `model` is pointed at the (unwrapped) policy whenever it is used.
        self.grace_module = Transformer(
            self.accelerator.unwrap_model(self.model),
            self.processing_class,
            system_prompt=args.system_prompt,
            prompt_template=args.prompt_template,
            summary_suffix=args.summary_suffix,
            max_new_tokens=args.max_completion_length,
            max_input_tokens=args.max_input_tokens,
            text_summary="text_summary" in args.pooling_mode,
        )
        # The pooling tail of the saved model, so the reward embeds exactly as inference does.
        self.grace_pooling = RationalePooling(
            self.grace_module.get_embedding_dimension(), pooling_mode=args.pooling_mode
        )
        self.grace_normalize = Normalize()
        source = model if isinstance(model, str) else getattr(getattr(model, "config", None), "name_or_path", None)
        self.base_model_source: str | None = source or None
        self._last_collapse_warning = -(10**9)
        # Each reward term's statistics at every training step (averaged in the training record's "reward_terms").
        self._term_history: dict[str, list[dict[str, float | None]]] = {}
        # Prompt ids of the latest rollouts, per mode: training may reuse its rollouts after an evaluation.
        self._rollout_prompt_ids: dict[str, set[tuple[int, ...]]] = {}
        # The latest training generation batch, for the embedding loss; its values since the last log.
        self._embedding_batch: EmbeddingBatch | None = None
        self._embedding_losses: list[float] = []
        if args.max_train_minutes is not None:
            self.add_callback(TimeBudget(args.max_train_minutes, clock=args.budget_clock))
        # First in line: a checkpoint is marked complete as soon as transformers finished it, whatever other
        # callbacks do in their on_save.
        self.callback_handler.callbacks.insert(0, CheckpointCompletion())

    def _check_generation_seam(self) -> None:
        if self.use_vllm:
            generate = getattr(getattr(self, "vllm_generation", None), "generate", None)
            needed = {"prompts", "images", "num_generations"}
            if generate is None or not needed <= set(inspect.signature(generate).parameters):
                raise RuntimeError(
                    f"GRACE generates vLLM rollouts with trainer.vllm_generation.generate(prompts, images, "
                    f"num_generations), which this TRL version does not provide; GRACE is tested with {TESTED_WITH}."
                )
        elif not isinstance(getattr(self, "generation_kwargs", None), dict):
            raise RuntimeError(
                "GRACE samples rollouts with TRL's trainer.generation_kwargs, which this TRL version does not set; "
                f"GRACE is tested with {TESTED_WITH}."
            )

    # ------------------------------------------------------------------ embeddings
    def _features(self, texts: list[str]) -> dict[str, Any]:
        features = self.grace_module.preprocess(texts)
        return {k: v.to(self.accelerator.device) if torch.is_tensor(v) else v for k, v in features.items()}

    def embed_with_rationales(self, texts: list[str], rationales: RationaleBatch) -> torch.Tensor:
        """L2-normalised GRACE embeddings of ``texts`` given their rationales, with the inference code path.

        Args:
            texts: the texts.
            rationales: one rationale per text (ids, mask, finished).

        Returns:
            ``(len(texts), dim)`` float32 tensor.
        """
        return self._pooled(self._features(texts), rationales)

    def _pooled(self, features: dict[str, Any], rationales: RationaleBatch) -> torch.Tensor:
        """Embeddings through the saved model's pooling and normalisation, from kept states when there are any."""
        output = self.grace_normalize(self.grace_pooling(dict(self.grace_module.outputs(features, rationales))))
        return output["sentence_embedding"].float()

    def rationale_batch(self, completion_ids: list[list[int]]) -> RationaleBatch:
        """Right-padded :class:`RationaleBatch` from TRL's completion ids (each ends with EOS unless it was cut)."""
        pad = self.processing_class.pad_token_id
        width = max((len(ids) for ids in completion_ids), default=0)
        ids = torch.full((len(completion_ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(completion_ids), width), dtype=torch.long)
        eos = set(self.grace_module.eos_token_ids)
        finished = torch.zeros(len(completion_ids), dtype=torch.bool)
        for i, row in enumerate(completion_ids):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
            finished[i] = bool(row) and row[-1] in eos
        return RationaleBatch(ids.to(self.accelerator.device), mask.to(self.accelerator.device), finished)

    # ------------------------------------------------------------------ generation
    def _group_size(self) -> int:
        return self.num_generations if self.model.training else self.num_generations_eval

    def _side_plan(self, query: list[str], negative: list[str]) -> tuple[list[int], list[str], bool]:
        """Which local rows write the query/negative rationale of their group, and the texts to write them for.

        One query (and negative) rationale per group, written by the process holding the group's first row; rows of a
        group split across processes use the first local row's.

        Returns:
            ``(firsts, side_texts, supervised)``: indices of the writing rows, their queries then (when supervised)
            their negatives, and whether hard negatives are used.
        """
        group_size = self._group_size()
        offset = self.accelerator.process_index * len(query)
        firsts = [i for i in range(len(query)) if i == 0 or (offset + i) % group_size == 0]
        supervised = self.args.mode == "supervised" and all(negative[i] for i in firsts)
        side_texts = [query[i] for i in firsts] + ([negative[i] for i in firsts] if supervised else [])
        return firsts, side_texts, supervised

    def joint_generation_possible(self) -> bool:
        """Whether rollouts and query/negative rationales can be sampled in one ``generate`` call.

        Per-row temperatures are applied by a logits processor (:class:`RowTemperature`) that transformers runs after
        its own sampling filters, so the joint call needs neutral filters; vLLM returns no hidden states.
        """
        args: GraceGRPOConfig = self.args
        return (
            not self.use_vllm
            and not args.generation_kwargs
            and args.top_p == 1.0
            and not args.top_k
            and args.min_p is None
            and args.repetition_penalty == 1.0
        )

    def grace_rollout(self, prompts: list, trainer: GRPOTrainer | None = None) -> dict[str, Any]:
        """TRL ``rollout_func``: GRACE prompt ids, the rollouts, and what the reward needs (``grace_rollouts``).

        Args:
            prompts: this process's prompt records (``{"text", "query", "negative"}``), each repeated for its group.
            trainer: the trainer (TRL passes it; unused, this is a bound method).

        Returns:
            ``prompt_ids``, ``completion_ids``, ``logprobs`` (vLLM only, else None) and ``grace_rollouts`` (a
            :class:`GraceRollouts`).
        """
        records = [prompt_record(prompt) for prompt in prompts]
        documents = [record["text"] for record in records]
        firsts, side_texts, supervised = self._side_plan(
            [record["query"] for record in records], [record["negative"] for record in records]
        )
        args: GraceGRPOConfig = self.args
        n = len(documents)
        logprobs = None
        if self.joint_generation_possible():
            features = self._features(documents + side_texts)
            temperatures = [args.temperature] * n + [args.query_temperature] * len(side_texts)
            with self._policy_for_generation():
                rationales = self.grace_module.generate_rationales(
                    features,
                    with_states=True,
                    # per-row temperatures (model.generate takes one temperature: a logits processor applies them)
                    **{
                        **self.generation_kwargs,
                        **{"top_p": 1.0, "top_k": 0, "min_p": None, "temperature": 1.0},
                        "logits_processor": LogitsProcessorList([RowTemperature(torch.tensor(temperatures))]),
                    },
                )
            parts = [(features, rationales)]
            ids, mask = rationales.ids.cpu(), rationales.mask.cpu().bool()
            completion_ids = [ids[i][mask[i]].tolist() for i in range(n)]
        else:
            features = self._features(documents)
            if self.use_vllm:
                _, completion_ids, sampled, _ = self.vllm_generation.generate(
                    prompts=_unpadded(features, n), images=None, num_generations=self._group_size()
                )
                logprobs = [[lp[0] for lp in row] for row in sampled]  # the sampled token's logprob, as TRL keeps it
                rollouts = self.rationale_batch(completion_ids)
            else:
                with self._policy_for_generation():
                    rollouts = self.grace_module.generate_rationales(features, **self.generation_kwargs)
                ids, mask = rollouts.ids.cpu(), rollouts.mask.cpu().bool()
                completion_ids = [ids[i][mask[i]].tolist() for i in range(n)]
            side_features = self._features(side_texts)
            with self._policy_for_generation():
                side = self.grace_module.generate_rationales(
                    side_features,
                    with_states=True,
                    do_sample=True,
                    temperature=args.query_temperature,
                    top_p=1.0,
                    top_k=0,
                    max_new_tokens=args.max_completion_length,
                )
            parts = [(features, rollouts), (side_features, side)]
        prompt_ids = _unpadded(features, n)
        self._rollout_prompt_ids["train" if self.model.training else "eval"] = {tuple(row) for row in prompt_ids}
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": completion_ids,
            "logprobs": logprobs,
            "grace_rollouts": GraceRollouts(parts, completion_ids, firsts, supervised, side_texts, prompt_ids),
        }

    @contextlib.contextmanager
    def _policy_for_generation(self):
        """The unwrapped policy in eval mode, without gradients, set as the inference module's LM."""
        args: GraceGRPOConfig = self.args
        with (
            unwrap_model_for_generation(
                self.model_wrapped, self.accelerator, gather_deepspeed3_params=args.ds3_gather_for_generation
            ) as policy,
            torch.no_grad(),
        ):
            was_training = policy.training
            policy.eval()
            if self.grace_module.model is not policy:
                self.grace_module.model = policy
            try:
                yield policy
            finally:
                if was_training:
                    policy.train()

    # ------------------------------------------------------------------ the prompt-id check
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's GRPO loss, after checking that its prompt ids are the GRACE prompt ids of the rollouts; in training
        with ``embedding_loss_weight`` > 0, plus λ_e times :meth:`embedding_loss`."""
        self.check_prompt_ids(inputs)
        loss = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        weight = self.args.embedding_loss_weight
        if weight > 0 and self.model.training:
            embedding_loss = self.embedding_loss(model, inputs)
            self._embedding_losses.append(embedding_loss.item())
            loss = loss + weight * embedding_loss
        return loss

    def embedding_loss(self, model, inputs: dict[str, Any]) -> torch.Tensor:
        """InfoNCE on the GRACE embeddings of the loss batch's rows (text + rollout), computed with gradients.

        Each row is the anchor; the candidates are the queries of every group of its generation batch (each with the
        rationale written for it) and its group's hard negative; the target is its own query:
        ``-mean_i log softmax_c(cos(e_i, c) / τ_e)``. Both sides are embedded through the saved model's readout, so
        the readout learns to read text + rationale, while GRPO teaches which rationale to write.

        Raises:
            RuntimeError: the loss batch holds rows that are not rollouts of the latest generation batch.
        """
        batch = self._embedding_batch
        if batch is None:
            raise RuntimeError(
                "The embedding loss found no generation batch: the GRACE reward did not run before the loss; GRACE is "
                f"tested with {TESTED_WITH}."
            )
        rows = batch.rows_of(
            inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"], self.processing_class.pad_token_id
        )
        policy = self.accelerator.unwrap_model(model)
        if self.grace_module.model is not policy:
            self.grace_module.model = policy
        anchors = self.embed_with_rationales(
            [batch.documents[i] for i in rows], self.rationale_batch([batch.rollouts[i] for i in rows])
        )
        side = self.embed_with_rationales(batch.side_texts, self.rationale_batch(batch.side_rationales))
        n_groups = len(batch.side_texts) // (2 if batch.supervised else 1)
        own = torch.tensor([batch.groups[i] for i in rows], device=anchors.device)
        negative = side[n_groups + own] if batch.supervised else None
        temperature = self.args.embedding_loss_temperature
        return -infonce_log_probs(anchors, side[:n_groups], own, negative, temperature).mean()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's log, with the mean embedding loss since the last training log (``grace/embedding_loss``)."""
        if self._embedding_losses and self.model.training:
            logs = {**logs, "grace/embedding_loss": sum(self._embedding_losses) / len(self._embedding_losses)}
            self._embedding_losses = []
        super().log(logs, start_time)

    def check_prompt_ids(self, inputs: dict[str, Any]) -> None:
        """Raise unless every row's prompt ids in a loss batch were built by :meth:`grace_rollout` for this batch.

        Raises:
            RuntimeError: TRL did not generate through the GRACE rollout function (or changed its batch format).
        """
        prompt_ids, prompt_mask = inputs.get("prompt_ids"), inputs.get("prompt_mask")
        if prompt_ids is None or prompt_mask is None:
            raise RuntimeError(
                f"TRL's loss batch has no 'prompt_ids'/'prompt_mask' (keys: {sorted(inputs)}); GRACE cannot check "
                f"that it trains on GRACE prompts. GRACE is tested with {TESTED_WITH}."
            )
        rows = {
            tuple(row[mask.bool()].tolist()) for row, mask in zip(prompt_ids.cpu(), prompt_mask.cpu(), strict=True)
        }
        built = self._rollout_prompt_ids.get("train" if self.model.training else "eval")
        if built is None or not rows <= built:
            raise RuntimeError(
                "TRL is computing the policy loss on prompt ids that the GRACE rollout function did not build: the "
                "rollout_func seam was bypassed, so the loss would be conditioned on other prompts than the "
                f"rollouts. GRACE is tested with {TESTED_WITH}; pin those versions."
            )

    # ------------------------------------------------------------------ reward
    def grace_reward(
        self, prompts, completions, completion_ids, grace_rollouts=None, log_metric=None, **kwargs
    ) -> list[float]:
        """TRL reward function: the GRACE reward of each local rollout (see
        :func:`grace_st.training.rewards.grace_rewards`).

        Embeddings of all processes are gathered first, so groups and in-batch negatives span the global batch.
        """
        if grace_rollouts is None or log_metric is None:
            raise RuntimeError(
                "TRL did not pass the rollout function's 'grace_rollouts' field and 'log_metric' to the reward "
                f"function; GRACE is tested with {TESTED_WITH}."
            )
        rollouts: GraceRollouts = grace_rollouts[0]
        n_local = len(prompts)
        if any(r is not rollouts for r in grace_rollouts) or rollouts.completion_ids != [
            list(ids) for ids in completion_ids
        ]:
            raise RuntimeError(
                "The completions the reward received are not the rollouts the GRACE rollout function wrote; "
                f"GRACE is tested with {TESTED_WITH}."
            )
        args: GraceGRPOConfig = self.args
        mode = "train" if self.model.training else "eval"
        group_size = self._group_size()
        offset = self.accelerator.process_index * n_local
        documents = [prompt_record(prompt)["text"] for prompt in prompts]
        with self._policy_for_generation():
            embeddings = torch.cat([self._pooled(features, rationales) for features, rationales in rollouts.parts])
        finished_all = torch.cat([rationales.finished.cpu() for _, rationales in rollouts.parts])
        positive, side = embeddings[:n_local], embeddings[n_local:]
        finished, side_finished = finished_all[:n_local], finished_all[n_local:]
        firsts, supervised = rollouts.firsts, rollouts.supervised
        owner = [max(f for f in firsts if f <= i) for i in range(n_local)]
        index = {f: k for k, f in enumerate(firsts)}
        rows = torch.tensor([index[o] for o in owner], device=side.device)
        query_emb = side[rows]
        negative_emb = side[rows + len(firsts)] if supervised else None
        source_ids = self.grace_module.text_token_ids(documents)
        eos = set(self.grace_module.eos_token_ids)
        rationale_ids = [[t for t in ids if t not in eos] for ids in completion_ids]
        copies = torch.tensor(
            [copy_rate(ids, src, args.copy_min_span) for ids, src in zip(rationale_ids, source_ids, strict=True)],
            device=positive.device,
        )
        # The logged copy rate and mean length are those of RationaleStats over the global batch, as evaluation reports
        # them (token-weighted copy rate; length without the closing EOS); the per-rollout rates above are the reward.
        local = rationale_stats(rationale_ids, source_ids, finished.tolist(), min_span=args.copy_min_span)
        totals = torch.tensor([[local.copied_tokens, local.tokens, local.rationales]], device=positive.device)
        copied_tokens, tokens, n = self.accelerator.gather(totals).sum(dim=0).tolist()  # over all processes
        batch_stats = RationaleStats(texts=int(n), rationales=int(n), tokens=int(tokens), copied_tokens=copied_tokens)
        gather = self.accelerator.gather
        # Within a group the first row's query (and negative) is used, so groups split across processes stay coherent.
        all_positive, all_query = gather(positive), gather(query_emb)
        has_negative = bool(gather(torch.tensor([float(supervised)], device=positive.device)).min().item())
        all_negative = gather(negative_emb) if has_negative else None
        all_finished = gather(finished.to(positive.device))
        all_copies = gather(copies)
        rewards = grace_rewards(
            _first_of_group(all_query, group_size),
            all_positive,
            None if all_negative is None else _first_of_group(all_negative, group_size),
            group_size,
            mode=args.mode,
            form=args.reward_form,
            consistency_weight=args.consistency_weight,
            hard_negative_weight=args.hard_negative_weight,
            temperature=args.reward_temperature,
            finished=all_finished,
            truncation_penalty=args.truncation_penalty,
            copy_rate=all_copies,
            copy_penalty=args.copy_penalty,
        )
        all_ids = gather_object(list(completion_ids))
        side_finished = gather(side_finished.float().mean().reshape(1).to(positive.device)).mean()
        metrics = {
            "grace/contrastive": rewards.contrastive.mean().item(),
            "grace/consistency": rewards.consistency.mean().item(),
            "grace/hard_negative": rewards.hard_negative.mean().item(),
            "grace/copy_penalty": (args.copy_penalty * rewards.copy_rate).mean().item(),
            "grace/truncation_rate": rewards.truncated.float().mean().item(),
            "grace/total": rewards.total.mean().item(),
            "grace/copy_rate": batch_stats.copy_rate,
            "grace/distinct_per_group": distinct_per_group(all_ids, group_size),
            "grace/group_reward_std": group_reward_std(rewards.total, group_size),
            "grace/mean_length": batch_stats.mean_length,
            "grace/finish_rate": 1.0 - rewards.truncated.float().mean().item(),
            "grace/query_finish_rate": side_finished.item(),
        }
        # Which terms teach: within-group std of each term and its share of the advantage's variance (a term that is
        # constant within every group has share 0: GRPO's group baseline cancels it).
        terms = term_statistics(rewards, group_size)
        for term, stats in terms.items():
            metrics[f"grace/term_std/{term}"] = stats["within_group_std"]
            metrics[f"grace/advantage_share/{term}"] = stats["advantage_share"]
        for name, value in metrics.items():
            if value is not None:  # no copy rate for a batch without rationale tokens (all rollouts empty)
                log_metric(name, value)
        if mode == "train" and args.embedding_loss_weight > 0:
            self._embedding_batch = EmbeddingBatch(
                keys=[(tuple(p), tuple(c)) for p, c in zip(rollouts.prompt_ids, completion_ids, strict=True)],
                documents=documents,
                rollouts=[list(ids) for ids in completion_ids],
                groups=rows.tolist(),
                side_texts=rollouts.side_texts,
                side_rationales=rollouts.side_rationale_ids(),
                supervised=supervised,
            )
        if mode == "train":
            self._check_collapse(metrics)
            for term, stats in terms.items():
                self._term_history.setdefault(term, []).append(stats)
        local = slice(offset, offset + n_local)
        return rewards.total[local].tolist()

    def reward_term_summary(self) -> dict[str, dict[str, float | int | None]]:
        """Each reward term's within-group std and advantage share, averaged over the training steps of this run
        (:func:`grace_st.training.rewards.term_statistics`): ``{term: {"within_group_std", "advantage_share",
        "steps"}}`` (None where a value was never defined); the training record's ``reward_terms``."""
        summary: dict[str, dict[str, float | int | None]] = {}
        for term, steps in self._term_history.items():
            summary[term] = {"steps": len(steps)}
            for key in ("within_group_std", "advantage_share"):
                values = [step[key] for step in steps if step[key] is not None]
                summary[term][key] = sum(values) / len(values) if values else None
        return summary

    def _check_collapse(self, metrics: dict[str, float | None]) -> None:
        args: GraceGRPOConfig = self.args
        step = self.state.global_step
        std, distinct = metrics["grace/group_reward_std"], metrics["grace/distinct_per_group"]
        if (
            std < args.collapse_reward_std or distinct < args.collapse_distinct
        ) and step - self._last_collapse_warning >= 10:
            self._last_collapse_warning = step
            logger.warning(
                "Step %d: possible collapse - within-group reward std %.4f (warn < %s), distinct rollouts per group "
                "%.2f (warn < %s), copy rate %s. Consider beta > 0 (KL), copy_penalty > 0, a lower learning rate or "
                "larger groups.",
                step,
                std,
                args.collapse_reward_std,
                distinct,
                args.collapse_distinct,
                format_cell(metrics["grace/copy_rate"], 2),
            )

    # ------------------------------------------------------------------ training, checkpoints and the final model
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """``transformers.Trainer.train``, resuming only from a complete checkpoint.

        ``resume_from_checkpoint=True`` picks the last *complete* checkpoint in ``output_dir`` (one whose save
        finished; see :mod:`grace_st.training.checkpoints`); a named checkpoint must be complete. If training fails,
        the
        partial ``checkpoint-N`` of a save that was interrupted by the failure is removed.
        """
        run_dir = self.args.output_dir
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(run_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"resume_from_checkpoint=True, but {run_dir} holds no complete checkpoint.")
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)):
            folder = os.fspath(resume_from_checkpoint)
            if not os.path.isfile(os.path.join(folder, "trainer_state.json")):
                raise ValueError(
                    f"resume_from_checkpoint={folder!r} is not a checkpoint folder (no trainer_state.json)."
                )
            if not is_complete_checkpoint(folder):
                logger.warning("Checkpoint %s carries no completion marker; its save may not have finished.", folder)
        if resume_from_checkpoint and self.args.shuffle_dataset:
            with open(os.path.join(resume_from_checkpoint, "trainer_state.json"), encoding="utf-8") as handle:
                epoch = json.load(handle).get("epoch") or 0.0
            if epoch >= 1.0:
                logger.warning(
                    "Resuming at epoch %.2f: TRL's GRPO sampler restarts its shuffling on resume, so the data order "
                    "from here differs from an uninterrupted run (within the first epoch it is the same).",
                    epoch,
                )
        existing = [str(p) for p in checkpoint_folders(run_dir)]
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        except BaseException:
            if self.args.should_save:
                remove_partial_checkpoints(run_dir, existing)
            raise

    def training_record(self, training_datasets: list[str] | None = None) -> dict[str, Any]:
        """What made this model, as written to ``grace_training.json`` (read by the model card and evaluation).

        Args:
            training_datasets: the training data sources as given (Hub id, file, ``"sick:..."``, ``"demo"``).

        Returns:
            A JSON-safe dict: ``grace_st_version``, ``grace_model_name``, ``base_model`` (Hub id or None),
            ``base_model_source`` (what the trainer was given), ``training_datasets``, ``license`` (the base model's,
            None when unknown), ``global_step``, ``reward``, ``generation`` and ``config`` (every config field).
        """
        args: GraceGRPOConfig = self.args
        hub_id, license_ = base_model_info(self.base_model_source)
        return {
            "grace_st_version": grace_st.__version__,
            "grace_model_name": args.hub_model_id,
            "base_model": hub_id,
            "base_model_source": self.base_model_source,
            "training_datasets": list(training_datasets) if training_datasets is not None else None,
            "license": license_,
            "global_step": self.state.global_step,
            "reward": {field: getattr(args, field) for field in TRAINING_RECORD_REWARD_FIELDS},
            "reward_terms": self.reward_term_summary(),
            "generation": {field: getattr(args, field) for field in TRAINING_RECORD_GENERATION_FIELDS},
            "config": json.loads(args.to_json_string()),
        }

    def final_model_dir(self) -> str:
        """Where :meth:`save_grace_model` writes by default: ``final_model_dir`` or ``<output_dir>/grace-model``."""
        args: GraceGRPOConfig = self.args
        return args.final_model_dir or os.path.join(args.output_dir, "grace-model")

    def save_grace_model(
        self,
        output_dir: str | None = None,
        *,
        overwrite: bool = False,
        training_datasets: list[str] | None = None,
    ) -> str:
        """Save the policy as a GRACE SentenceTransformer folder (LoRA merged, greedy rationales, same prompt).

        The folder loads with ``SentenceTransformer(path, trust_remote_code=True)`` and carries the training record
        ``grace_training.json`` (:meth:`training_record`). It is written to a fresh staging folder beside the target
        and renamed into place. An existing target is replaced only when it is empty or a previous output of this
        method (it holds ``grace_training.json``), or with ``overwrite=True``. DeepSpeed ZeRO-3 is not supported here
        (use ZeRO-2 or save a checkpoint and merge).

        Args:
            output_dir: target folder; defaults to :meth:`final_model_dir`.
            overwrite: replace an existing folder whatever it holds. Defaults to False.
            training_datasets: the data sources to record (``run_training`` passes the one it loaded).

        Returns:
            The folder path.

        Raises:
            FileExistsError: the target holds files this method did not write and ``overwrite`` is False.
        """
        args: GraceGRPOConfig = self.args
        output_dir = output_dir or self.final_model_dir()
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            check_writable_folder(output_dir, marker=TRAINING_INFO_FILE, overwrite=overwrite)
            policy = self.accelerator.unwrap_model(self.model)
            # Merge a copy: the trainer keeps its adapter (training may go on after saving).
            merged = copy.deepcopy(policy)
            if hasattr(merged, "merge_and_unload"):
                merged = merged.merge_and_unload()
            # accelerate may have replaced `forward` on the instance with a wrapper closing over the *original*
            # model's forward; a deep copy keeps that closure, so the copy would run the original's modules (and the
            # single-pass hook on the copy's final norm would never fire). The class forward is the right one here.
            merged.__dict__.pop("forward", None)
            merged.eval()
            st_model = build_grace_model(
                merged,
                copy.deepcopy(self.processing_class),
                system_prompt=args.system_prompt,
                prompt_template=args.prompt_template,
                summary_suffix=args.summary_suffix,
                max_new_tokens=args.inference_max_new_tokens or args.max_completion_length,
                max_input_tokens=args.max_input_tokens,
                pooling_mode=args.save_pooling_mode or args.pooling_mode,
            )
            record = self.training_record(training_datasets)

            def write(path: str) -> None:
                st_model.save(path)
                with open(os.path.join(path, TRAINING_INFO_FILE), "w", encoding="utf-8") as handle:
                    json.dump(record, handle, indent=2)

            write_folder(output_dir, write, marker=TRAINING_INFO_FILE, overwrite=overwrite)
            logger.info("Saved the GRACE model to %s", output_dir)
        self.accelerator.wait_for_everyone()
        return output_dir


def check_trl_seams() -> None:
    """Raise unless the installed TRL has the extension point GRACE builds on (``GRPOTrainer(rollout_func=...)``).

    Raises:
        RuntimeError: naming the missing seam and the tested versions.
    """
    if "rollout_func" not in inspect.signature(GRPOTrainer.__init__).parameters:
        raise RuntimeError(
            "trl.GRPOTrainer has no 'rollout_func' argument in this TRL version; GRACE generates its rollouts "
            f"through it. GRACE is tested with {TESTED_WITH}: pip install 'trl>=1.16,<1.17'."
        )


def _unpadded(features: dict[str, Any], n: int) -> list[list[int]]:
    """The first ``n`` prompts of a :meth:`grace_st.Transformer.preprocess` batch, without their left padding."""
    ids, mask = features["input_ids"][:n].cpu(), features["attention_mask"][:n].cpu().bool()
    return [row[m].tolist() for row, m in zip(ids, mask, strict=True)]


def _first_of_group(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Repeat the first row of every group over the group (query/negative shared by the whole group)."""
    return x.view(-1, group_size, *x.shape[1:])[:, :1].expand(-1, group_size, *x.shape[1:]).reshape(x.shape)
