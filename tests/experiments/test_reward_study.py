"""experiments/reward_study.py: the runs it trains and the rows it asks the comparison for."""

from __future__ import annotations

import pytest
import yaml
from helpers import load_experiment

from grace_st import from_backbone
from grace_st.evaluation.dev_comparison import DEFAULT_SUMMARY_SUFFIX, comparison_rows, row_file
from grace_st.scripts.compare_dev import dev_set_parser

study = load_experiment("reward_study")


def test_each_run_config_is_the_recipe_with_its_settings(tmp_path):
    recipe = yaml.safe_load(study.RECIPE.read_text(encoding="utf-8"))
    for label, settings in study.CONFIGURATIONS.items():
        config = yaml.safe_load(study.run_config(tmp_path, label, 7, 3.5).read_text(encoding="utf-8"))
        assert config["seed"] == 7 and config["max_train_minutes"] == 3.5 and config["budget_clock"] == "cpu"
        changed = {key for key in recipe if config[key] != recipe[key]}
        wanted = {**study.STUDY_BASE, **(settings or {})}  # every row starts from the study's base
        assert changed == {"seed", "max_train_minutes"} | {
            k for k, v in wanted.items() if recipe[k] != yaml.safe_load(v)
        }
        assert all(config[k] == yaml.safe_load(v) for k, v in wanted.items())
    light = yaml.safe_load(
        study.run_config(tmp_path, "GRACE InfoNCE + query rollouts, light guards", 1, 12).read_text(encoding="utf-8")
    )
    assert light["truncation_penalty"] is None and light["copy_penalty"] == 0.1
    names = {study.run_name(label, 1) for label in study.CONFIGURATIONS}
    assert len(names) == len(study.CONFIGURATIONS) and all(name.replace("-", "").isalnum() for name in names)


def test_a_setting_the_recipe_lacks_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(study.CONFIGURATIONS, "GRACE odd", {"no_such_key": "1"})
    with pytest.raises(ValueError, match="no line for \\['no_such_key'\\]"):
        study.run_config(tmp_path, "GRACE odd", 1, 1.0)


def test_the_scoring_shares_cover_exactly_the_rows_the_comparison_builds(tiny_backbone_dir, tmp_path):
    """Every row the study asks for is a row compare_dev builds from the study's flags, and none is left out."""
    for label, settings in study.CONFIGURATIONS.items():  # each folder saved with its configuration's readout
        readout = study.saved_readout(settings)
        for seed in (1, 2):
            suffix = {"summary_suffix": DEFAULT_SUMMARY_SUFFIX} if "summary" in readout else {}
            model = from_backbone(tiny_backbone_dir, max_new_tokens=12, pooling_mode=readout, device="cpu", **suffix)
            model.save(str(study.model_folder(tmp_path, label, seed)))
    flags = study.compare_flags(tmp_path, [1, 2], 50)
    args, _ = dev_set_parser("", 50, "out").parse_known_args(flags)
    trained = [flags[i + 1] for i, flag in enumerate(flags) if flag == "--trained"]
    contrastive = [flags[i + 1] for i, flag in enumerate(flags) if flag == "--contrastive"]
    readout = flags[flags.index("--trained-readout") + 1]
    assert readout == "saved"  # each run read out as it was trained
    rows = comparison_rows(tiny_backbone_dir, trained=trained, contrastive=contrastive, trained_readout=readout)
    built = {row.label for row in rows}
    shares = study.row_shares([1, 2], 2)
    asked = [row for share in shares for row in share]
    assert len(asked) == len(set(asked)) and set(asked) <= built
    assert built - set(asked) == {"no rationale", "echo"}  # the cheap reference rows are not part of the study
    assert any(set(study.untrained_rows()) <= set(share) for share in shares)  # one generation
    assert "untrained GRACE (mean+summary)" in study.untrained_rows()
    grace_runs = 2 * sum(settings is not None for settings in study.CONFIGURATIONS.values())
    assert args.limit == 50 and len(args.trained) == grace_runs and len(contrastive) == 2


def test_rows_with_a_file_do_not_weigh_on_the_split(tmp_path):
    rows = [row for share in study.row_shares([1, 2], 1) for row in share]
    heavy = [row for row in rows if row.startswith("GRACE") and not row.endswith("removed")]
    for row in heavy[:-1]:  # all rows that write rationales but one already have their file
        row_file(tmp_path, row).parent.mkdir(parents=True, exist_ok=True)
        row_file(tmp_path, row).write_text("{}")
    shares = study.row_shares([1, 2], 2, done=tmp_path)
    assert heavy[-1] in shares[0] or heavy[-1] in shares[1]
    loads = [sum(1 for row in share if row not in heavy[:-1]) for share in shares]
    assert min(loads) >= 3  # the remaining rows are spread, not left to one process
