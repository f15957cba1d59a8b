"""GRACE training on TRL: :class:`GraceGRPOTrainer`, a ``trl.GRPOTrainer`` whose reward is the contrastive quality of
the policy's own embeddings.

How a batch flows (``../shared/GRACE.md``):

1. The GRPO prompt of a row is its positive document, rendered with :meth:`grace_st.Transformer.preprocess` (the very
   prompt an inference model builds); TRL samples ``num_generations`` rationales for it (transformers or vLLM).
2. With transformers generation (the default), one ``generate`` call writes the ``num_generations`` rollouts of every
   document *and* one rationale for the query and the hard negative of each group (per-row temperatures:
   ``temperature`` for rollouts, ``query_temperature`` for the others), keeping the last-layer states generation
   computes (:meth:`grace_st.Transformer.generate_rationales` with ``with_states=True``). The reward pools those states
   with :func:`grace_st.modeling.pool`, the inference code, so no second pass over prompt + rationale is run. With vLLM
   or non-neutral sampling filters (top-k/top-p/min-p, repetition penalty, ``generation_kwargs``), TRL generates the
   rollouts and the reward embeds them with :meth:`grace_st.Transformer.embed` and writes the query/negative
   rationales in a second call (the two-pass reference). Embeddings of all processes are gathered and every rollout
   is scored with :func:`grace_st.rewards.grace_rewards`.
3. TRL computes group-relative advantages and the clipped policy loss; checkpoints, PEFT, DeepSpeed and logging are
   TRL's and transformers'.

Every reward term and the collapse diagnostics (copy rate, distinct rollouts per group, within-group reward std, mean
length, finish rate) are logged every step under ``grace/*``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from grace_st.config import GraceGRPOConfig
from grace_st.diagnostics import copy_rate, distinct_per_group, group_reward_std
from grace_st.factory import build_grace_model
from grace_st.modeling import (
    RationaleBatch,
    RowTemperature,  # noqa: F401  (re-exported: it used to live here)
    Transformer,
    pool,
)
from grace_st.rewards import grace_rewards

try:
    from accelerate.utils import gather_object
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
    from trl import GRPOTrainer
    from trl.models.utils import unwrap_model_for_generation
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError('GRACE training needs TRL: pip install "grace-st[train]"') from error

logger = logging.getLogger(__name__)

_STAGING_PREFIX = "tmp-"


@dataclass
class _JointGeneration:
    """What :meth:`GraceGRPOTrainer._generate_single_turn` keeps for the reward of the same batch."""

    features: dict[str, Any]  # preprocess() of documents + side texts, one left-padded batch
    rationales: RationaleBatch  # rollouts, then side rationales; states kept from generation
    completion_ids: list[list[int]]  # the rollouts as handed to TRL
    n_rollouts: int


class GraceGRPOTrainer(GRPOTrainer):
    """GRPO trainer for GRACE embedding models.

    Args:
        model: causal LM (Hub id, local folder, ``PreTrainedModel`` or ``PeftModel``); an instruction-tuned model with
            a chat template.
        args: a :class:`grace_st.config.GraceGRPOConfig`.
        train_dataset: rows with ``prompt`` (the positive document, a plain string), ``query`` and ``negative``
            (``""`` when there is none), e.g. from :func:`grace_st.data.to_grpo_dataset`.
        eval_dataset: same columns, optional.
        processing_class: the tokenizer; loaded from ``model`` when None.
        callbacks: extra ``TrainerCallback`` objects.
        optimizers: ``(optimizer, scheduler)`` as in ``transformers.Trainer``.
        peft_config: a ``peft.LoraConfig`` to train an adapter instead of the full model.
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
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            columns = getattr(dataset, "column_names", None)
            if columns is not None and not {"prompt", "query", "negative"} <= set(columns):
                raise ValueError(
                    f"{name} has columns {columns}; GRACE needs 'prompt', 'query' and 'negative' "
                    "(use grace_st.data.to_grpo_dataset)."
                )
        super().__init__(
            model=model,
            reward_funcs=[self.grace_reward],
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            peft_config=peft_config,
        )
        # The one inference module; its `model` is pointed at the (unwrapped) policy whenever it is used.
        self.grace_module = Transformer(
            self.accelerator.unwrap_model(self.model),
            self._tokenizer,
            system_prompt=args.system_prompt,
            max_new_tokens=args.max_completion_length,
            max_input_tokens=args.max_input_tokens,
        )
        self._last_collapse_warning = -(10**9)
        self._batch_inputs: list[dict] | None = None  # rows of the batch being generated (query/negative columns)
        self._joint: _JointGeneration | None = None  # what that batch's joint generation kept for its reward
        if args.max_train_minutes is not None:
            self.add_callback(_TimeBudget(args.max_train_minutes))

    # ------------------------------------------------------------------ prompts
    def _tokenize_prompts(self, prompts: list):
        """Token ids of the GRACE chat prompts, built by :meth:`grace_st.Transformer.preprocess` (no padding)."""
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise ValueError(f"GRACE prompts are plain texts (the positive documents); got {bad[0]!r}.")
        features = self.grace_module.preprocess(prompts)
        ids = [
            row[mask.bool()].tolist()
            for row, mask in zip(features["input_ids"], features["attention_mask"], strict=True)
        ]
        return ids, None, {}

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

    def rationale_batch(self, completion_ids: list[list[int]]) -> RationaleBatch:
        """Right-padded :class:`RationaleBatch` from TRL's completion ids (each ends with EOS unless it was cut)."""
        pad = self._tokenizer.pad_token_id
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
    def _generate_and_score_completions(self, inputs):
        # The rows (with their query and negative columns) are kept for the joint generation of this batch.
        self._batch_inputs = inputs
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._batch_inputs = None
            self._joint = None

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

    def _joint_generation_possible(self, images, multimodal_fields) -> bool:
        args: GraceGRPOConfig = self.args
        return (
            self._batch_inputs is not None
            and not self.use_vllm
            and not getattr(self, "use_transformers_continuous_batching", False)
            and not self.tools
            and images is None
            and not multimodal_fields
            and not args.generation_kwargs
            and args.top_p == 1.0
            and not args.top_k
            and args.min_p is None
            and args.repetition_penalty == 1.0
        )

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """Rollouts and the query/negative rationales in one ``generate`` call, keeping the states for the reward.

        Falls back to TRL's generation (vLLM, continuous batching, sampling filters) when that is not possible; the
        reward then embeds with a second pass and writes the query/negative rationales itself.
        """
        self._joint = None
        if not self._joint_generation_possible(images, multimodal_fields):
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images=has_tool_images
            )
        args: GraceGRPOConfig = self.args
        rows = self._batch_inputs
        documents = [row["prompt"] for row in rows]
        _, side_texts, _ = self._side_plan([row["query"] for row in rows], [row["negative"] for row in rows])
        features = self._features(documents + side_texts)
        temperatures = [args.temperature] * len(documents) + [args.query_temperature] * len(side_texts)
        with self._policy_for_generation():
            rationales = self.grace_module.generate_rationales(
                features,
                with_states=True,
                do_sample=True,
                temperature=torch.tensor(temperatures),  # per row; re-indexed by the decode engine as rows finish
                top_p=1.0,
                top_k=0,
                max_new_tokens=args.max_completion_length,
            )
        ids, mask = rationales.ids.cpu(), rationales.mask.cpu().bool()
        completion_ids = [ids[i][mask[i]].tolist() for i in range(len(documents))]
        self._joint = _JointGeneration(features, rationales, completion_ids, len(documents))
        return completion_ids, None

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

    # ------------------------------------------------------------------ reward
    def _pooled(self, features: dict[str, Any], rationales: RationaleBatch) -> torch.Tensor:
        """L2-normalised pooled embeddings, from the states kept during generation when there are any."""
        if rationales.states is not None:
            output = self.grace_module.outputs_from_states(features, rationales)
        else:
            output = self.grace_module.embed(features, rationales)
        embeddings = pool(output["token_embeddings"], output["pooling_mask"], self.args.pooling_mode)
        return F.normalize(embeddings, p=2, dim=1).float()

    def grace_reward(self, prompts, completions, completion_ids, query, negative, **kwargs) -> list[float]:
        """TRL reward function: the GRACE reward of each local rollout (see :func:`grace_st.rewards.grace_rewards`).

        Embeddings of all processes are gathered first, so groups and in-batch negatives span the global batch.
        """
        args: GraceGRPOConfig = self.args
        mode = "train" if self.model.training else "eval"
        group_size = self._group_size()
        n_local = len(prompts)
        offset = self.accelerator.process_index * n_local
        firsts, side_texts, supervised = self._side_plan(list(query), list(negative))
        owner = [max(f for f in firsts if f <= i) for i in range(n_local)]
        joint = self._joint
        if (
            joint is not None
            and joint.n_rollouts == n_local
            and joint.completion_ids == list(map(list, completion_ids))
        ):
            # Single pass: pool the states generation kept; the side rationales were written in the same call.
            embeddings = self._pooled(joint.features, joint.rationales)
            positive, side = embeddings[:n_local], embeddings[n_local:]
            side_finished = joint.rationales.finished[n_local:]
            finished = joint.rationales.finished[:n_local]
        else:
            with self._policy_for_generation():
                rollouts = self.rationale_batch(completion_ids)
                positive = self.embed_with_rationales(list(prompts), rollouts)
                features = self._features(side_texts)
                side_rationales = self.grace_module.generate_rationales(
                    features, with_states=True, do_sample=True, temperature=args.query_temperature, top_p=1.0, top_k=0
                )
                side = self._pooled(features, side_rationales)
            side_finished, finished = side_rationales.finished, rollouts.finished
        index = {f: k for k, f in enumerate(firsts)}
        rows = torch.tensor([index[o] for o in owner], device=side.device)
        query_emb = side[rows]
        negative_emb = side[rows + len(firsts)] if supervised else None
        source_ids = self.grace_module.text_token_ids(list(prompts))
        eos = set(self.grace_module.eos_token_ids)
        copies = torch.tensor(
            [
                copy_rate([t for t in ids if t not in eos], src, args.copy_min_span)
                for ids, src in zip(completion_ids, source_ids, strict=True)
            ],
            device=positive.device,
        )
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
            consistency_weight=args.consistency_weight,
            hard_negative_weight=args.hard_negative_weight,
            temperature=args.reward_temperature,
            finished=all_finished,
            truncation_penalty=args.truncation_penalty,
            copy_rate=all_copies,
            copy_penalty=args.copy_penalty,
        )
        all_ids = gather_object(list(completion_ids))
        lengths = torch.tensor([len(ids) for ids in all_ids], dtype=torch.float32)
        side_finished = gather(side_finished.float().mean().reshape(1).to(positive.device)).mean()
        metrics = {
            "grace/contrastive": rewards.contrastive.mean().item(),
            "grace/consistency": rewards.consistency.mean().item(),
            "grace/hard_negative": rewards.hard_negative.mean().item(),
            "grace/copy_penalty": (args.copy_penalty * rewards.copy_rate).mean().item(),
            "grace/truncation_rate": rewards.truncated.float().mean().item(),
            "grace/total": rewards.total.mean().item(),
            "grace/copy_rate": rewards.copy_rate.mean().item(),
            "grace/distinct_per_group": distinct_per_group(all_ids, group_size),
            "grace/group_reward_std": group_reward_std(rewards.total, group_size),
            "grace/mean_length": lengths.mean().item(),
            "grace/finish_rate": 1.0 - rewards.truncated.float().mean().item(),
            "grace/query_finish_rate": side_finished.item(),
        }
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)
        if mode == "train":
            self._check_collapse(metrics)
        local = slice(offset, offset + n_local)
        return rewards.total[local].tolist()

    def _check_collapse(self, metrics: dict[str, float]) -> None:
        args: GraceGRPOConfig = self.args
        step = self.state.global_step
        std, distinct = metrics["grace/group_reward_std"], metrics["grace/distinct_per_group"]
        if (
            std < args.collapse_reward_std or distinct < args.collapse_distinct
        ) and step - self._last_collapse_warning >= 10:
            self._last_collapse_warning = step
            logger.warning(
                "Step %d: possible collapse - within-group reward std %.4f (warn < %s), distinct rollouts per group "
                "%.2f (warn < %s), copy rate %.2f. Consider beta > 0 (KL), copy_penalty > 0, a lower learning rate or "
                "larger groups.",
                step,
                std,
                args.collapse_reward_std,
                distinct,
                args.collapse_distinct,
                metrics["grace/copy_rate"],
            )

    # ------------------------------------------------------------------ checkpoints and the final model
    def _get_output_dir(self, trial) -> str:
        staging = getattr(self, "_checkpoint_staging", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Write the checkpoint into a staging folder, then rename it: a kill never leaves a partial checkpoint."""
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, f"{_STAGING_PREFIX}{name}")
        if self.args.should_save and os.path.isdir(staging):
            shutil.rmtree(staging)  # left over by a killed run
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_staging = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            if self.state.best_model_checkpoint and self.state.best_model_checkpoint.startswith(staging):
                self.state.best_model_checkpoint = self.state.best_model_checkpoint.replace(
                    os.path.join(staging, name), final
                )
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()

    def save_grace_model(self, output_dir: str | None = None) -> str:
        """Save the policy as a GRACE SentenceTransformer folder (LoRA merged, greedy rationales, same prompt).

        The folder loads with ``SentenceTransformer(path, trust_remote_code=True)``. It is written to a staging folder
        and renamed into place. DeepSpeed ZeRO-3 is not supported here (use ZeRO-2 or save a checkpoint and merge).

        Args:
            output_dir: target folder; defaults to ``args.final_model_dir`` or ``<output_dir>/grace-model``.

        Returns:
            The folder path.
        """
        args: GraceGRPOConfig = self.args
        output_dir = output_dir or args.final_model_dir or os.path.join(args.output_dir, "grace-model")
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
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
                copy.deepcopy(self._tokenizer),
                system_prompt=args.system_prompt,
                max_new_tokens=args.inference_max_new_tokens or args.max_completion_length,
                max_input_tokens=args.max_input_tokens,
                pooling_mode=args.pooling_mode,
            )
            staging = output_dir.rstrip("/") + ".tmp"
            shutil.rmtree(staging, ignore_errors=True)
            st_model.save(staging)
            if os.path.isdir(output_dir):
                shutil.rmtree(output_dir)
            os.replace(staging, output_dir)
            logger.info("Saved the GRACE model to %s", output_dir)
        self.accelerator.wait_for_everyone()
        return output_dir


class _TimeBudget(TrainerCallback):
    """Stops training once ``minutes`` of wall time have passed since training began (checked after each step)."""

    def __init__(self, minutes: float) -> None:
        self.seconds = minutes * 60.0
        self.start: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = 0.0 if self.start is None else time.monotonic() - self.start
        if elapsed > self.seconds and not control.should_training_stop:
            logger.warning("Time budget %.1f min reached at step %d; stopping.", self.seconds / 60, state.global_step)
            control.should_training_stop = True
            control.should_save = args.save_strategy != "no"


def _first_of_group(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Repeat the first row of every group over the group (query/negative shared by the whole group)."""
    return x.view(-1, group_size, *x.shape[1:])[:, :1].expand(-1, group_size, *x.shape[1:]).reshape(x.shape)


def run_training(training_args: GraceGRPOConfig, model_args, data_args, resume_from_checkpoint=None):
    """Load data and model as the three parsed configs say, train, and save the GRACE model.

    Args:
        training_args: a :class:`GraceGRPOConfig`.
        model_args: a ``trl.ModelConfig`` (``model_name_or_path``; None or ``"default"`` is the embedded default
            backbone; ``dtype``; ``use_peft`` and the ``lora_*`` options).
        data_args: a :class:`grace_st.config.GraceDataArguments`.
        resume_from_checkpoint: a checkpoint folder, True for the last one in ``output_dir``, or None.

    Returns:
        ``(trainer, path of the saved GRACE model)``.
    """
    from trl import get_peft_config

    from grace_st.backbone import resolve_backbone
    from grace_st.data import load_training_data

    name = resolve_backbone(model_args.model_name_or_path)
    model_init_kwargs = dict(training_args.model_init_kwargs or {})
    if model_args.dtype not in (None, "auto"):
        model_init_kwargs.setdefault("dtype", model_args.dtype)
    if model_args.attn_implementation is not None:
        model_init_kwargs.setdefault("attn_implementation", model_args.attn_implementation)
    training_args.model_init_kwargs = model_init_kwargs
    dataset = load_training_data(data_args, training_args.mode)
    trainer = GraceGRPOTrainer(
        model=name, args=training_args, train_dataset=dataset, peft_config=get_peft_config(model_args)
    )
    if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.lower() in ("true", "last", "latest"):
        resume_from_checkpoint = True
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer, trainer.save_grace_model()
