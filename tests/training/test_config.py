"""GraceGRPOConfig and GraceDataArguments: defaults, range and type checks, YAML through TrlParser."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from grace_st.training.config import (
    GraceDataArguments,
    GraceGRPOConfig,
    _allowed_types,
    grace_field_names,
    module_option_names,
)

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"


def make_config(tmp_path, **overrides) -> GraceGRPOConfig:
    options = dict(output_dir=str(tmp_path / "run"), use_cpu=True, bf16=False, report_to="none")
    options.update(overrides)
    return GraceGRPOConfig(**options)


def parse(tmp_path, yaml_text: str):
    from trl import ModelConfig, TrlParser

    path = tmp_path / "config.yaml"
    path.write_text(yaml_text)
    parser = TrlParser((GraceGRPOConfig, ModelConfig, GraceDataArguments))
    return parser.parse_args_and_config(
        ["--config", str(path), "--output_dir", str(tmp_path / "run"), "--use_cpu", "true", "--bf16", "false"]
    )


def test_defaults_follow_the_paper(tmp_path):
    args = make_config(tmp_path)
    assert (args.consistency_weight, args.hard_negative_weight, args.reward_temperature) == (0.2, 0.2, 0.1)
    assert (args.truncation_penalty, args.query_temperature, args.mode) == (-1.0, 0.5, "supervised")
    assert args.scale_rewards == "none" and args.beta == 0.0 and args.num_generations == 8


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mode": "weird"}, "mode='weird'"),
        ({"pooling_mode": "max"}, "pooling_mode='max'"),
        ({"save_pooling_mode": "max"}, "save_pooling_mode: pooling_mode='max'"),
        ({"save_pooling_mode": "mean+summary"}, "save_pooling_mode='mean\\+summary' needs a summary_suffix"),
        ({"reward_temperature": 0.0}, "reward_temperature=0.0"),
        ({"query_temperature": -1.0}, "query_temperature=-1.0"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"consistency_weight": -1.0}, "consistency_weight=-1.0"),
        ({"embedding_loss_weight": -0.5}, "embedding_loss_weight=-0.5"),
        ({"embedding_loss_temperature": 0.0}, "embedding_loss_temperature=0.0"),
        ({"copy_min_span": 0}, "copy_min_span=0"),
        ({"max_input_tokens": 0}, "max_input_tokens=0"),
        ({"num_generations": 1}, "at least 2 generations"),
        ({"max_completion_length": 0}, "max_completion_length=0"),
        ({"inference_max_new_tokens": 0}, "inference_max_new_tokens=0"),
        ({"max_train_minutes": 0.0}, "max_train_minutes=0.0"),
        ({"collapse_distinct": -1.0}, "collapse_distinct=-1.0"),
        ({"prompt_template": "no text field"}, "prompt_template='no text field'"),
        ({"summary_suffix": "{text} {text}"}, "summary_suffix="),
        ({"final_model_dir": ""}, "final_model_dir=''"),
        ({"remove_unused_columns": True}, "remove_unused_columns"),
        ({"reward_form": "contrastive"}, "reward_form='contrastive'"),
        ({"query_rollouts": True, "mode": "unsupervised"}, "query_rollouts=True needs mode='supervised'"),
        ({"budget_clock": "gpu"}, "budget_clock='gpu'"),
    ],
)
def test_bad_values_are_rejected_naming_the_field(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **overrides)


def _wrong_values(annotation) -> list:
    """Values of the wrong type for a field annotated ``annotation`` (the usual YAML/CLI mistakes)."""
    allowed = _allowed_types(annotation)
    if bool in allowed:
        return ["true", 1]
    if str in allowed:
        return [5, ["a list"]]
    if int in allowed:
        return ["4", 4.5, True]
    if float in allowed:
        return ["0.5", True, [0.5]]
    raise AssertionError(f"no wrong values for {annotation!r}")


HINTS = typing.get_type_hints(GraceGRPOConfig)
GRACE_FIELD_CASES = [(name, value) for name in grace_field_names() for value in _wrong_values(HINTS[name])]


def test_every_grace_field_has_type_cases():
    assert {name for name, _ in GRACE_FIELD_CASES} == set(grace_field_names())


@pytest.mark.parametrize("name, value", GRACE_FIELD_CASES)
def test_config_types_are_checked_naming_the_field(tmp_path, name, value):
    with pytest.raises(ValueError, match=f"^{name}=.* has type {type(value).__name__}"):
        make_config(tmp_path, **{name: value})


def test_numbers_are_stored_as_floats_and_must_be_finite(tmp_path):
    args = make_config(tmp_path, query_temperature=1, copy_penalty=0)
    assert args.query_temperature == 1.0 and isinstance(args.query_temperature, float)
    assert isinstance(args.copy_penalty, float)
    with pytest.raises(ValueError, match="consistency_weight=nan"):
        make_config(tmp_path, consistency_weight=float("nan"))
    with pytest.raises(ValueError, match="reward_temperature=inf"):
        make_config(tmp_path, reward_temperature=float("inf"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"skip_invalid": "false"}, "skip_invalid='false' has type str"),
        ({"skip_invalid": 1}, "skip_invalid=1 has type int"),
        ({"max_train_samples": "10"}, "max_train_samples='10' has type str"),
        ({"max_train_samples": 0}, "max_train_samples=0"),
        ({"train_data": ""}, "train_data=''"),
        ({"query_field": None}, "query_field=None has type NoneType"),
    ],
)
def test_data_arguments_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        GraceDataArguments(**overrides)


def test_yaml_values_reach_the_checks(tmp_path):
    """TrlParser converts quoted YAML strings with the field's type, and hands other YAML values over unchanged."""
    args, _, data_args = parse(tmp_path, 'query_temperature: "0.25"\ncopy_penalty: 1e-3\nskip_invalid: "true"\n')
    assert args.query_temperature == 0.25 and args.copy_penalty == pytest.approx(1e-3)
    assert data_args.skip_invalid is True
    with pytest.raises(ValueError, match=r"^copy_penalty=\[0.5\] has type list"):
        parse(tmp_path, "copy_penalty: [0.5]\n")
    with pytest.raises(ValueError, match="^skip_invalid=1 has type int"):
        parse(tmp_path, "skip_invalid: 1\n")
    with pytest.raises(ValueError, match="^copy_min_span=4.5 has type float"):
        parse(tmp_path, "copy_min_span: 4.5\n")


@pytest.mark.parametrize("name", ["demo.yaml", "sick.yaml"])
def test_shipped_cpu_configs_parse_with_the_guards_on(name):
    """The CPU configs parse with train.py's parser and keep the collapse guards (KL, copy penalty) switched on."""
    from trl import ModelConfig, TrlParser

    args, model_args, data_args = TrlParser((GraceGRPOConfig, ModelConfig, GraceDataArguments)).parse_args_and_config(
        ["--config", str(CONFIGS / name), "--output_dir", "/tmp/unused"]
    )
    assert args.beta > 0 and args.copy_penalty > 0
    assert model_args.use_peft and args.use_cpu


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "accelerate_zero2.yaml"))
def test_every_shipped_training_config_parses(name):
    from trl import ModelConfig, TrlParser

    TrlParser((GraceGRPOConfig, ModelConfig, GraceDataArguments)).parse_args_and_config(
        ["--config", str(CONFIGS / name), "--output_dir", "/tmp/unused", "--use_cpu", "true", "--bf16", "false"]
    )


@pytest.mark.parametrize("system_prompt", ["", "  "])
def test_an_empty_system_prompt_is_accepted_as_the_module_accepts_it(tmp_path, system_prompt):
    assert make_config(tmp_path, system_prompt=system_prompt).system_prompt == system_prompt


def test_module_options_are_checked_by_the_module_rules():
    assert set(module_option_names()) == {
        "system_prompt",
        "prompt_template",
        "summary_suffix",
        "pooling_mode",
        "max_input_tokens",
    }
