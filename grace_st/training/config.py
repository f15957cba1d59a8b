"""Configuration of GRACE training: :class:`GraceGRPOConfig` (a ``trl.GRPOConfig``) and :class:`GraceDataArguments`.

Both are plain dataclasses whose fields carry ``metadata={"help": ...}``, so ``trl.TrlParser`` turns them into CLI
flags and YAML keys (see ``training/train.py``).
"""

from __future__ import annotations

import functools
import math
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

from grace_st.model.options import DEFAULT_SYSTEM_PROMPT, OPTION_RULES, check_option
from grace_st.training.callbacks import TimeBudget
from grace_st.training.rewards import REWARD_FORMS

try:
    from trl import GRPOConfig
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError('GRACE training needs TRL: pip install "grace-st[train]"') from error

MODES: tuple[str, ...] = ("supervised", "unsupervised")

# trl.GRPOConfig fields that GRACE reads itself (their types are checked with GRACE's own fields).
_GRPO_FIELDS_USED = ("num_generations", "max_completion_length", "temperature")


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    # Read from the class annotations: transformers' HfArgumentParser rewrites the dataclass `Field.type` objects
    # (it drops `None` from optional fields), so `dataclasses.fields(...)[i].type` is not reliable after parsing.
    return typing.get_type_hints(cls)


def _allowed_types(annotation: Any) -> tuple[type, ...]:
    """The types a field annotation such as ``float | None`` allows."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return tuple(typing.get_args(annotation))
    return (annotation,)


def check_field_types(config: Any, names: Iterable[str]) -> None:
    """Check that each named dataclass field holds a value of its annotated type; raise naming the field if not.

    YAML and Python callers can hand a config any value (``"0.5"`` for a float, ``"false"`` for a bool, ``1`` for a
    bool): none of them is converted silently. An ``int`` is accepted for a ``float`` field (and stored as float);
    ``bool`` is never accepted as a number; float values must be finite.

    Args:
        config: a dataclass instance.
        names: the fields to check.

    Raises:
        ValueError: naming the field, its value and the expected type.
    """
    annotations = _type_hints(type(config))
    for name in names:
        value = getattr(config, name)
        allowed = _allowed_types(annotations[name])
        if value is None and type(None) in allowed:
            continue
        if isinstance(value, bool):
            ok = bool in allowed
        elif isinstance(value, int):
            ok = int in allowed or float in allowed
        else:
            ok = isinstance(value, tuple(t for t in allowed if t is not type(None)))
        if not ok:
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise ValueError(f"{name}={value!r} has type {type(value).__name__}; it must be {expected}.")
        if float in allowed and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError(f"{name}={value!r} is not allowed; it must be a finite number.")
            setattr(config, name, float(value))


@dataclass
class GraceGRPOConfig(GRPOConfig):
    r"""Configuration of :class:`grace_st.training.trainer.GraceGRPOTrainer`: every ``trl.GRPOConfig`` field plus
    GRACE's.

    Defaults follow the authors' script (``../shared/GRACE.md``) where they apply: λ_c = λ_h = 0.2, τ = 0.1,
    truncation penalty −1, query/negative rationales at temperature 0.5, advantages not divided by the group std
    (``scale_rewards="none"``), KL coefficient ``beta=0``.

    Parameters that control the task:
        mode (`str`, defaults to `"supervised"`): ``"supervised"`` trains on (query, positive, negative) rows, the
            positive document being the GRPO prompt; ``"unsupervised"`` trains on plain texts, the text being both the
            prompt and (with its own rationale) the query.

    Parameters that control rationale generation (the prompt and pooling are saved in the final model):
        system_prompt (`str`): system message of the GRACE chat prompt. Defaults to the paper's prompt.
        pooling_mode (`str`, defaults to `"mean"`): the readout the reward and the embedding loss use (and the saved
            model's): ``"mean"``, ``"lasttoken"``, ``"summary"``, ``"mean+summary"``, ``"mean+summary+text_summary"``.
        save_pooling_mode (`str` or `None`, defaults to `None`): the saved model's readout if not ``pooling_mode``.
        max_input_tokens (`int`, defaults to `1024`): user texts are truncated to this many tokens.
        query_temperature (`float`, defaults to `0.5`): sampling temperature of the single rationale written for the
            query and for the hard negative (shared by the whole group). The G rollouts of the positive use
            ``temperature``.
        inference_max_new_tokens (`int` or `None`): rationale limit of the saved model; None uses
            ``max_completion_length`` (the length it was trained with).

    Parameters that control the reward (see :func:`grace_st.training.rewards.grace_rewards`):
        reward_form (`str`, defaults to `"paper"`): ``"paper"`` (the published reward, whose ``cos(q, d-)`` and
            in-batch hard-negative terms are constant within a group and cancel in GRPO's advantage) or ``"infonce"``
            (each rollout anchors an InfoNCE term over the batch's queries and its group's hard negative).
        query_rollouts (`bool`, defaults to `False`): also roll out queries (supervised): each row gives a second row
            whose rollouts are rationales of its query, scored against its positive.
        consistency_weight (`float`, defaults to `0.2`): λ_c, weight of the within-group consistency term.
        hard_negative_weight (`float`, defaults to `0.2`): λ_h, weight of the in-batch hard-negative term.
        reward_temperature (`float`, defaults to `0.1`): τ, the reward is divided by it.
        truncation_penalty (`float` or `None`, defaults to `-1.0`): fixed reward of a rollout cut at
            ``max_completion_length``; None scores such rollouts like the others.
        copy_penalty (`float`, defaults to `0.0`): weight of an extra term ``-copy_penalty * copy_rate`` (inside the
            division by τ) against rationales that copy their input (a guard against the "echo" collapse).
        copy_min_span (`int`, defaults to `4`): a rationale token counts as copied when it lies in a run of at least
            this many tokens that also occurs in the input.
        embedding_loss_weight (`float`, defaults to `0.0`): λ_e of a second loss added to GRPO's (0: GRPO only): an
            InfoNCE loss on the embeddings of text + rationale, computed with gradients, so the readout learns to read
            the rationales the policy writes (:meth:`GraceGRPOTrainer.embedding_loss`). Single process only.
        embedding_loss_temperature (`float`, defaults to `0.05`): τ_e of that loss.

    Parameters that control the collapse guards (diagnostics are logged every step in any case):
        collapse_reward_std (`float`, defaults to `0.01`): warn when the mean within-group std of the total reward
            falls below this value (no learning signal left).
        collapse_distinct (`float`, defaults to `1.5`): warn when the mean number of distinct rollouts per group
            falls below this value.

    Parameters that control the output and the run:
        max_train_minutes (`float` or `None`): stop after this many minutes of training (a time budget, e.g. for the
            CPU demo); the step count reached is in the trainer state.
        budget_clock (`str`, defaults to `"wall"`): clock of ``max_train_minutes``: ``"wall"`` or ``"cpu"`` (this
            process's CPU time: equal budgets for runs sharing a machine).
        final_model_dir (`str` or `None`): where the final GRACE SentenceTransformer (LoRA merged) is written;
            None gives ``<output_dir>/grace-model``.
    """

    # Defaults that differ from trl.GRPOConfig: the authors' GRACE settings.
    scale_rewards: str = field(
        default="none",
        metadata={
            "help": "Advantage scaling: 'none' (GRACE: reward minus group mean), 'group' (divide by the group std) "
            "or 'batch'."
        },
    )
    num_generations: int | None = field(
        default=8, metadata={"help": "Rollouts (rationales) per positive document, G. GRACE uses 8."}
    )
    max_completion_length: int | None = field(
        default=256, metadata={"help": "Rationale length limit in tokens during training."}
    )

    mode: str = field(
        default="supervised",
        metadata={"help": "'supervised' ((query, positive, negative) rows) or 'unsupervised' (plain texts)."},
    )
    system_prompt: str = field(
        default=DEFAULT_SYSTEM_PROMPT,
        metadata={"help": "System message of the GRACE chat prompt (saved in the final model)."},
    )
    prompt_template: str = field(
        default="{text}",
        metadata={"help": "User message of the GRACE chat prompt; '{text}' marks where the text goes (saved)."},
    )
    summary_suffix: str = field(
        default="",
        metadata={
            "help": "Text fed after each rationale for the summary readout ('{text}': the text again); '' for none. "
            "The reward reads out as the saved model does."
        },
    )
    pooling_mode: str = field(
        default="mean",
        metadata={
            "help": "Readout of the final model and of the reward: 'mean' (GRACE), 'lasttoken', 'summary', "
            "'mean+summary' or 'mean+summary+text_summary' (the last three need summary_suffix)."
        },
    )
    save_pooling_mode: str | None = field(
        default=None,
        metadata={
            "help": "Readout of the saved model when it is not pooling_mode (the readout the reward and the embedding "
            "loss train), e.g. train 'summary' and save 'mean+summary+text_summary'. None: pooling_mode."
        },
    )
    max_input_tokens: int = field(default=1024, metadata={"help": "User texts are truncated to this many tokens."})
    query_temperature: float = field(
        default=0.5,
        metadata={"help": "Sampling temperature of the one rationale written for the query and for the negative."},
    )
    inference_max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "Rationale limit of the saved model; None uses max_completion_length."},
    )
    reward_form: str = field(
        default="paper",
        metadata={
            "help": "The contrastive reward: 'paper' (cos(q, d+) - cos(q, d-), in-batch hard negatives: the last two "
            "are constant within a group and cancel in the advantage) or 'infonce' (each rollout is the anchor of an "
            "InfoNCE term over the batch's queries and its group's hard negative: every term varies per rollout)."
        },
    )
    query_rollouts: bool = field(
        default=False,
        metadata={
            "help": "Also roll out queries: every (query, positive, negative) row gives a second row whose rollouts "
            "are rationales of the query, scored against the positive (supervised mode only)."
        },
    )
    consistency_weight: float = field(default=0.2, metadata={"help": "λ_c: weight of the within-group consistency."})
    hard_negative_weight: float = field(
        default=0.2, metadata={"help": "λ_h: weight of the in-batch hard-negative term."}
    )
    reward_temperature: float = field(default=0.1, metadata={"help": "τ: the reward is divided by it."})
    truncation_penalty: float | None = field(
        default=-1.0,
        metadata={"help": "Fixed reward of a rollout cut at the length limit; null scores it like any other."},
    )
    copy_penalty: float = field(
        default=0.0,
        metadata={"help": "Weight of the term -copy_penalty * copy_rate (guard against copied rationales)."},
    )
    copy_min_span: int = field(
        default=4, metadata={"help": "Minimum length in tokens of a span copied from the input to count as a copy."}
    )
    embedding_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "λ_e: weight of an InfoNCE loss on the embeddings of text + rationale (with gradients), added to "
            "GRPO's loss so the readout learns to read the rationales; 0 trains with GRPO only."
        },
    )
    embedding_loss_temperature: float = field(default=0.05, metadata={"help": "τ_e of the embedding loss."})
    collapse_reward_std: float = field(
        default=0.01, metadata={"help": "Warn when the mean within-group reward std falls below this value."}
    )
    collapse_distinct: float = field(
        default=1.5, metadata={"help": "Warn when the mean number of distinct rollouts per group falls below this."}
    )
    max_train_minutes: float | None = field(
        default=None,
        metadata={"help": "Stop training after this many minutes (checkpoint saved if saving is on); null: no limit."},
    )
    budget_clock: str = field(
        default="wall",
        metadata={
            "help": "Clock of max_train_minutes: 'wall' (elapsed) or 'cpu' (this process's CPU time, all threads: "
            "equal budgets for runs that share a machine)."
        },
    )
    final_model_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of the final GRACE SentenceTransformer; null gives <output_dir>/grace-model."},
    )

    def __post_init__(self) -> None:
        # Types first: TRL's own __post_init__ and the range checks below compare values.
        check_field_types(self, grace_field_names())
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not supported; choose one of {MODES}.")
        if self.reward_form not in REWARD_FORMS:
            raise ValueError(f"reward_form={self.reward_form!r} is not supported; choose one of {REWARD_FORMS}.")
        if self.query_rollouts and self.mode != "supervised":
            raise ValueError(
                f"query_rollouts=True needs mode='supervised' (got mode={self.mode!r}): an unsupervised row's query "
                "is its own text, which is already rolled out."
            )
        if self.budget_clock not in TimeBudget.CLOCKS:
            raise ValueError(
                f"budget_clock={self.budget_clock!r} is not supported; choose one of {sorted(TimeBudget.CLOCKS)}."
            )
        for name in module_option_names():  # saved in the final model: the module's own rules
            check_option(name, getattr(self, name))
        if self.save_pooling_mode is not None:
            check_option("pooling_mode", self.save_pooling_mode, "save_pooling_mode: ")
        for name in ("pooling_mode", "save_pooling_mode"):
            if "summary" in (getattr(self, name) or "") and not self.summary_suffix:
                raise ValueError(f"{name}={getattr(self, name)!r} needs a summary_suffix (it is '').")
        for name in ("consistency_weight", "hard_negative_weight", "copy_penalty", "embedding_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; it must be >= 0.")
        for name in ("reward_temperature", "query_temperature", "temperature", "embedding_loss_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; it must be > 0.")
        if self.copy_min_span < 1:
            raise ValueError(f"copy_min_span={self.copy_min_span!r} is not allowed; it must be >= 1.")
        if self.num_generations is None or self.num_generations < 2:
            raise ValueError(
                f"num_generations={self.num_generations!r} is not allowed; GRPO needs at least 2 rollouts per group."
            )
        if self.max_completion_length is None or self.max_completion_length < 1:
            raise ValueError(
                f"max_completion_length={self.max_completion_length!r}: GRACE needs a rationale length limit >= 1."
            )
        if self.inference_max_new_tokens is not None and self.inference_max_new_tokens < 1:
            raise ValueError(
                f"inference_max_new_tokens={self.inference_max_new_tokens!r} is not allowed; use an integer >= 1 "
                "or null for max_completion_length."
            )
        if self.max_train_minutes is not None and self.max_train_minutes <= 0:
            raise ValueError(f"max_train_minutes={self.max_train_minutes!r} is not allowed; use a value > 0 or null.")
        if self.collapse_reward_std < 0 or self.collapse_distinct < 0:
            raise ValueError(
                f"collapse_reward_std={self.collapse_reward_std!r} and collapse_distinct={self.collapse_distinct!r} "
                "must be >= 0 (0 switches the warning off)."
            )
        if self.final_model_dir is not None and not self.final_model_dir.strip():
            raise ValueError("final_model_dir='' is not allowed; give a folder or null for <output_dir>/grace-model.")
        if self.remove_unused_columns:
            raise ValueError(
                "remove_unused_columns=True would drop the 'query' and 'negative' columns the GRACE reward needs; "
                "set remove_unused_columns=False."
            )


@functools.cache
def module_option_names() -> tuple[str, ...]:
    """The fields of :class:`GraceGRPOConfig` that are options of the saved GRACE modules (checked by their rules,
    :data:`grace_st.model.options.OPTION_RULES`)."""
    trl_fields = {f.name for f in fields(GRPOConfig)}
    return tuple(f.name for f in fields(GraceGRPOConfig) if f.name in OPTION_RULES and f.name not in trl_fields)


def grace_field_names() -> list[str]:
    """Names of the fields :class:`GraceGRPOConfig` adds to ``trl.GRPOConfig``, plus the TRL fields GRACE reads."""
    trl_fields = {f.name for f in fields(GRPOConfig)}
    return [f.name for f in fields(GraceGRPOConfig) if f.name not in trl_fields] + list(_GRPO_FIELDS_USED)


@dataclass
class GraceDataArguments:
    """Where the training data comes from (``training/train.py`` parses it next to the configs).

    Args:
        train_data: a ``.jsonl``/``.json``/``.csv``/``.tsv``/``.txt`` file, a Hub dataset id, ``"demo"`` (the bundled
            demo set) or ``"sick:<path to SICK_train.txt>"`` (SICK triplets).
        train_split: split of a Hub dataset. Defaults to ``"train"``.
        query_field, positive_field, negative_field, text_field: column names (aliases such as ``anchor``/``pos``/
            ``neg`` are recognised when the default names are absent).
        skip_invalid: drop rows with a missing or empty field (their count is logged) instead of raising.
        max_train_samples: keep only the first N rows.
    """

    train_data: str = field(
        default="demo",
        metadata={
            "help": "Training data: a .jsonl/.json/.csv/.tsv/.txt file, a Hub dataset id, 'demo' (bundled set) or "
            "'sick:<path to SICK_train.txt>'."
        },
    )
    train_split: str = field(default="train", metadata={"help": "Split of a Hub dataset."})
    query_field: str = field(default="query", metadata={"help": "Column of the query (supervised)."})
    positive_field: str = field(default="positive", metadata={"help": "Column of the positive document."})
    negative_field: str = field(default="negative", metadata={"help": "Column of the hard negative."})
    text_field: str = field(default="text", metadata={"help": "Column of the text (unsupervised)."})
    skip_invalid: bool = field(
        default=False, metadata={"help": "Drop rows with a missing/empty field (count logged) instead of raising."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N rows."})

    def __post_init__(self) -> None:
        check_field_types(self, [f.name for f in fields(self)])
        for name in ("train_data", "train_split", "query_field", "positive_field", "negative_field", "text_field"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; it must be a non-empty text.")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(
                f"max_train_samples={self.max_train_samples!r} is not allowed; use an integer >= 1 or null."
            )
