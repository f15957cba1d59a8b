"""GraceGRPOTrainer on a tiny random Llama: seams, inference parity, smoke training, checkpoints, resume, final model,
training record, 2 processes."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from tiny_training import TINY_CPU_SETTINGS
from transformers import TrainerCallback

import grace_st
from grace_st.artifacts import TRAINING_INFO_FILE
from grace_st.diagnostics import copy_rate, distinct_per_group, rationale_stats
from grace_st.factory import build_grace_model
from grace_st.model import RationaleBatch
from grace_st.training.checkpoints import CHECKPOINT_COMPLETE_FILE, last_complete_checkpoint
from grace_st.training.config import GraceGRPOConfig
from grace_st.training.provenance import base_model_info
from grace_st.training.trainer import GraceGRPOTrainer, GraceRollouts

TERMS = ("grace/contrastive", "grace/consistency", "grace/hard_negative", "grace/copy_penalty")
DIAGNOSTICS = (
    "grace/copy_rate",
    "grace/distinct_per_group",
    "grace/group_reward_std",
    "grace/mean_length",
    "grace/finish_rate",
    "grace/truncation_rate",
    "grace/query_finish_rate",
)


def tiny_dataset() -> Dataset:
    return Dataset.from_dict(
        {
            "prompt": [
                "A cat sleeps on the sofa.",
                "Stocks fell sharply today.",
                "It rained all night.",
                "Bees make honey.",
            ],
            "query": ["where is the cat", "market news", "weather last night", "what do bees produce"],
            "negative": ["A dog runs outside.", "The team won the match.", "The sun is hot.", "Ants dig tunnels."],
        }
    )


def records(groups=(0, 1), group_size: int = 2) -> list[dict]:
    """Prompt records as TRL hands them to the rollout function: each row repeated for its group."""
    data = tiny_dataset()
    return [
        {"text": data["prompt"][g], "query": data["query"][g], "negative": data["negative"][g]}
        for g in groups
        for _ in range(group_size)
    ]


def make_args(tmp_path, **overrides) -> GraceGRPOConfig:
    options = dict(
        TINY_CPU_SETTINGS,
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_completion_length=8,
        max_steps=2,
        learning_rate=5e-2,
        logging_steps=1,
        seed=0,
    )
    options.update(overrides)
    return GraceGRPOConfig(**options)


@pytest.fixture
def tiny_dir(tiny_backbone_dir, tmp_path) -> str:
    path = tmp_path / "tiny"
    shutil.copytree(tiny_backbone_dir, path)
    return str(path)


class _Recorder:
    """Wraps a trainer's rollout function (TRL calls ``trainer.rollout_func``) and keeps each call's prompts and
    output."""

    def __init__(self, trainer: GraceGRPOTrainer) -> None:
        self.prompts: list[list[dict]] = []
        self.outputs: list[dict] = []
        self.inner = trainer.rollout_func
        trainer.rollout_func = self

    def __call__(self, prompts, trainer):
        out = self.inner(prompts, trainer)
        self.prompts.append(list(prompts))
        self.outputs.append(out)
        return out


def _rollout_and_reward(trainer, rows) -> dict:
    """One rollout of ``rows`` and its reward; the metrics the reward logged."""
    out = trainer.grace_rollout(rows)
    logged, log_metric = _metric_log()
    trainer.grace_reward(
        prompts=rows,
        completions=None,
        completion_ids=out["completion_ids"],
        grace_rollouts=[out["grace_rollouts"]] * len(rows),
        log_metric=log_metric,
    )
    return logged


def _metric_log() -> tuple[dict, object]:
    """A stand-in for TRL's ``log_metric`` keyword and the dict it fills."""
    logged: dict[str, float] = {}
    return logged, logged.__setitem__


# ---------------------------------------------------------------------- datasets, prompts, parity
def test_dataset_columns_are_checked(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="to_grpo_dataset"):
        GraceGRPOTrainer(tiny_dir, make_args(tmp_path), train_dataset=Dataset.from_dict({"prompt": ["x"]}))


def test_rows_reach_trl_as_prompt_records(tiny_dir, tmp_path):
    trainer = GraceGRPOTrainer(tiny_dir, make_args(tmp_path), train_dataset=tiny_dataset())
    assert trainer.train_dataset[1]["prompt"] == {
        "text": "Stocks fell sharply today.",
        "query": "market news",
        "negative": "The team won the match.",
    }
    assert trainer.train_dataset["query"][:2] == ["where is the cat", "market news"]  # columns stay readable
    with pytest.raises(ValueError, match="must be a string"):
        trainer.grace_rollout([{"text": 5, "query": "q", "negative": ""}] * 2)
    streamed = GraceGRPOTrainer(tiny_dir, make_args(tmp_path), train_dataset=tiny_dataset().to_iterable_dataset())
    assert next(iter(streamed.train_dataset))["prompt"] == {
        "text": "A cat sleeps on the sofa.",
        "query": "where is the cat",
        "negative": "A dog runs outside.",
    }


def _assert_reward_embeds_as_inference(trainer, texts: list[str], **options):
    """The reward's embedding of each text + the rationale model.encode wrote for it equals model.encode's embedding
    (the inference model built from the trainer's policy with ``options``); returns that model."""
    policy = trainer.accelerator.unwrap_model(trainer.model).eval()
    model = build_grace_model(
        policy, trainer.processing_class, system_prompt=trainer.args.system_prompt, max_new_tokens=6, **options
    )
    items = model.encode(texts, output_value=None, batch_size=2)
    expected = torch.stack([torch.as_tensor(item["sentence_embedding"]) for item in items])
    # The completions as TRL hands them to the reward: ids up to and including the first EOS.
    completions = [item["rationale_ids"][item["rationale_mask"].bool()].tolist() for item in items]
    with torch.no_grad():
        got = trainer.embed_with_rationales(texts, trainer.rationale_batch(completions))
    torch.testing.assert_close(got, expected.float(), atol=2e-5, rtol=1e-4)
    return model


def test_reward_embedding_equals_inference_embedding(tiny_dir, tmp_path):
    """Parity: the reward's embedding of text + rationale is what model.encode gives when it writes that rationale."""
    trainer = GraceGRPOTrainer(tiny_dir, make_args(tmp_path, max_completion_length=6), train_dataset=tiny_dataset())
    texts = list(tiny_dataset()["prompt"])
    model = _assert_reward_embeds_as_inference(trainer, texts)
    # The GRPO prompt ids the rollout function hands TRL are the inference prompt, token for token.
    out = trainer.grace_rollout(records(groups=(0,)))
    features = model[0].preprocess(texts[:1])
    assert out["prompt_ids"][0] == features["input_ids"][0][features["attention_mask"][0].bool()].tolist()


def test_text_summary_readout_in_the_reward_and_a_saved_readout_of_its_own(tiny_dir, tmp_path):
    """The reward reads out mean+summary+text_summary as inference does; save_pooling_mode picks the saved readout."""
    from sentence_transformers import SentenceTransformer

    suffix = '\nThis: "{text}" in one word:'
    options = {"max_completion_length": 6, "summary_suffix": suffix, "pooling_mode": "mean+summary+text_summary"}
    trainer = GraceGRPOTrainer(tiny_dir, make_args(tmp_path / "a", **options), train_dataset=tiny_dataset())
    assert trainer.grace_module.text_summary
    texts = list(tiny_dataset()["prompt"])
    _assert_reward_embeds_as_inference(trainer, texts, summary_suffix=suffix, pooling_mode="mean+summary+text_summary")
    options.update(pooling_mode="summary", save_pooling_mode="mean+summary+text_summary")
    trainer = GraceGRPOTrainer(tiny_dir, make_args(tmp_path / "b", **options), train_dataset=tiny_dataset())
    assert not trainer.grace_module.text_summary and trainer.grace_pooling.pooling_mode == "summary"
    loaded = SentenceTransformer(trainer.save_grace_model(), trust_remote_code=True, device="cpu")
    assert loaded[1].pooling_mode == "mean+summary+text_summary" and loaded[0].text_summary


def test_rationale_batch_marks_finished_rows(tiny_dir, tmp_path):
    trainer = GraceGRPOTrainer(tiny_dir, make_args(tmp_path), train_dataset=tiny_dataset())
    eos = trainer.grace_module.eos_token_ids[0]
    batch = trainer.rationale_batch([[5, 6, eos], [7]])
    assert isinstance(batch, RationaleBatch)
    assert batch.finished.tolist() == [True, False]
    assert batch.mask.tolist() == [[1, 1, 1], [1, 0, 0]]


# ---------------------------------------------------------------------- seams (issue 11 point 2)
def test_seam_missing_rollout_func_fails_at_construction(tiny_dir, tmp_path, monkeypatch):
    """A TRL without ``GRPOTrainer(rollout_func=...)`` is refused with the tested versions, before any training."""
    from trl import GRPOTrainer

    original = GRPOTrainer.__init__

    def init_without_rollout_func(
        self, model, reward_funcs=None, args=None, train_dataset=None, eval_dataset=None, processing_class=None,
        reward_processing_classes=None, callbacks=None, optimizers=(None, None), peft_config=None,
    ):  # fmt: skip
        original(self, model, reward_funcs, args, train_dataset, eval_dataset, processing_class)

    monkeypatch.setattr(GRPOTrainer, "__init__", init_without_rollout_func)
    with pytest.raises(RuntimeError, match=r"no 'rollout_func'.*trl 1\.16"):
        GraceGRPOTrainer(tiny_dir, make_args(tmp_path), train_dataset=tiny_dataset())


def test_seam_missing_generation_settings_fail_at_construction(tiny_dir, tmp_path, monkeypatch):
    """GRACE samples with TRL's ``generation_kwargs``; a TRL that no longer sets them is refused at construction."""
    from trl import GRPOTrainer

    original = GRPOTrainer.__init__

    @functools.wraps(original)
    def init_then_drop(self, *args, **kwargs):
        original(self, *args, **kwargs)
        del self.generation_kwargs

    monkeypatch.setattr(GRPOTrainer, "__init__", init_then_drop)
    with pytest.raises(RuntimeError, match="generation_kwargs"):
        GraceGRPOTrainer(tiny_dir, make_args(tmp_path), train_dataset=tiny_dataset())


def test_seam_bypassed_rollout_fails_at_the_first_step(tiny_dir, tmp_path):
    """If TRL trained on prompt ids the GRACE rollout function did not build (e.g. its own tokenization of the raw
    text, what a skipped seam would give), the first step raises instead of training the wrong thing."""
    trainer = GraceGRPOTrainer(tiny_dir, make_args(tmp_path, max_steps=1), train_dataset=tiny_dataset())
    grace_rollout = trainer.rollout_func
    tokenizer = trainer.processing_class

    def raw_text_prompts(prompts, trl_trainer):
        out = grace_rollout(prompts, trl_trainer)
        out["prompt_ids"] = tokenizer([p["text"] for p in prompts], add_special_tokens=False)["input_ids"]
        return out

    trainer.rollout_func = raw_text_prompts
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    with pytest.raises(RuntimeError, match="rollout_func seam was bypassed"):
        trainer.train()
    assert all(torch.equal(before[name], p) for name, p in trainer.model.named_parameters())


def test_seam_dropped_rollout_fields_fail_at_the_first_step(tiny_dir, tmp_path):
    """If TRL stopped forwarding the rollout function's extra field to the reward, the reward raises."""
    trainer = GraceGRPOTrainer(tiny_dir, make_args(tmp_path, max_steps=1), train_dataset=tiny_dataset())
    grace_rollout = trainer.rollout_func
    trainer.rollout_func = lambda prompts, t: {
        k: v for k, v in grace_rollout(prompts, t).items() if k != "grace_rollouts"
    }
    with pytest.raises(RuntimeError, match="grace_rollouts"):
        trainer.train()


# ---------------------------------------------------------------------- generation paths
def test_joint_generation_writes_rollouts_and_side_rationales_in_one_call(tiny_dir, tmp_path):
    """One generate call: G rollouts per document, then one query and one negative rationale per group.

    With a near-zero query temperature the side rationales are the greedy ones; the reward's single-pass embeddings
    equal the two-pass reference of the same text + rationale.
    """
    args = make_args(tmp_path, max_completion_length=6, query_temperature=1e-4, temperature=1.0)
    trainer = GraceGRPOTrainer(tiny_dir, args, train_dataset=tiny_dataset())
    data = tiny_dataset()
    torch.manual_seed(0)
    out = trainer.grace_rollout(records())
    rollouts: GraceRollouts = out["grace_rollouts"]
    completion_ids = out["completion_ids"]
    assert len(rollouts.parts) == 1 and len(completion_ids) == 4 and out["logprobs"] is None
    features, joint = rollouts.parts[0]
    assert joint.ids.shape[0] == 4 + 2 + 2  # rollouts, 2 queries, 2 negatives
    assert joint.states is not None
    assert rollouts.firsts == [0, 2] and rollouts.supervised
    # Side rationales: greedy continuations of the queries and negatives of both groups.
    side_texts = [data["query"][0], data["query"][1], data["negative"][0], data["negative"][1]]
    greedy = trainer.grace_module.generate_rationales(trainer._features(side_texts), do_sample=False)
    for k in range(4):
        got = joint.ids[4 + k][joint.mask[4 + k].bool()].tolist()
        assert got == greedy.ids[k][greedy.mask[k].bool()].tolist()
    # Rollouts handed to TRL are the first rows, up to and including their EOS.
    for i, ids in enumerate(completion_ids):
        assert ids == joint.ids[i][joint.mask[i].bool()].tolist()
    # Single pass (states kept from generation) == two-pass reference on the same rationales.
    single = trainer._pooled(features, joint)
    two_pass = trainer._pooled(features, RationaleBatch(joint.ids, joint.mask, joint.finished))
    torch.testing.assert_close(single, two_pass, atol=1e-5, rtol=1e-4)


def test_sampling_filters_fall_back_to_separate_generation(tiny_dir, tmp_path):
    trainer = GraceGRPOTrainer(tiny_dir, make_args(tmp_path, top_k=5, max_steps=1), train_dataset=tiny_dataset())
    assert not trainer.joint_generation_possible()
    out = trainer.grace_rollout(records())
    (doc_features, rollouts), (side_features, side) = out["grace_rollouts"].parts
    assert rollouts.states is None and rollouts.ids.shape[0] == 4  # the reward embeds them with a second pass
    assert side.ids.shape[0] == 4 and side.states is not None  # 2 queries, 2 negatives
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "grace/total" in entry]
    assert logs and all(key in logs[0] for key in TERMS)


def test_vllm_rollouts_are_scored_with_the_two_pass_reference(tiny_dir, tmp_path):
    """With vLLM (a fake engine here), TRL's vllm_generation writes the rollouts for the GRACE prompt ids; the
    reward embeds them with a second pass and writes the query/negative rationales itself."""
    trainer = GraceGRPOTrainer(tiny_dir, make_args(tmp_path), train_dataset=tiny_dataset())
    eos = trainer.grace_module.eos_token_ids[0]

    class FakeVLLMGeneration:
        calls: list = []

        def generate(self, prompts, images, num_generations, profiler=None):
            self.calls.append((prompts, images, num_generations))
            completions = [[100 + i, 200 + i, eos] for i in range(len(prompts))]
            logprobs = [[[-0.5]] * len(row) for row in completions]
            return prompts, completions, logprobs, None

    trainer.use_vllm = True
    trainer.vllm_generation = FakeVLLMGeneration()
    assert not trainer.joint_generation_possible()
    rows = records()
    out = trainer.grace_rollout(rows)
    prompt_ids, images, group_size = FakeVLLMGeneration.calls[0]
    assert prompt_ids == out["prompt_ids"] and images is None and group_size == 2
    assert out["logprobs"] == [[-0.5] * 3] * 4
    logged, log_metric = _metric_log()
    rewards = trainer.grace_reward(
        prompts=rows,
        completions=None,
        completion_ids=out["completion_ids"],
        grace_rollouts=[out["grace_rollouts"]] * 4,
        log_metric=log_metric,
    )
    texts = [row["text"] for row in rows]
    with torch.no_grad():
        expected = trainer.embed_with_rationales(texts, trainer.rationale_batch(out["completion_ids"]))
        got = trainer._pooled(*out["grace_rollouts"].parts[0])
    torch.testing.assert_close(got, expected)
    assert len(rewards) == 4 and all(torch.isfinite(torch.tensor(rewards)))
    assert logged["grace/finish_rate"] == 1.0 and logged["grace/mean_length"] == 2.0  # 3 ids, the last the EOS


def test_logged_copy_rate_is_token_weighted_and_the_penalty_per_rollout(tiny_dir, tmp_path):
    """``grace/copy_rate`` is the evaluation's token-weighted rate of the batch; the copy penalty uses each rollout's
    own rate. Rollouts of different lengths and copy rates (written by a fake vLLM engine) tell the two apart."""
    trainer = GraceGRPOTrainer(tiny_dir, make_args(tmp_path, copy_penalty=0.5), train_dataset=tiny_dataset())
    eos = trainer.grace_module.eos_token_ids[0]
    rows = records()
    sources = trainer.grace_module.text_token_ids([row["text"] for row in rows])
    # Row 0 copies its whole text (>= 6 tokens), rows 1-3 write 2 new tokens each; row 3 is cut (no EOS).
    written = [sources[0] + [eos], [101, 102, eos], [103, 104, eos], [105, 106]]

    class FakeVLLMGeneration:
        def generate(self, prompts, images, num_generations, profiler=None):
            return prompts, written, [[[-0.5]] * len(row) for row in written], None

    trainer.use_vllm = True
    trainer.vllm_generation = FakeVLLMGeneration()
    logged = _rollout_and_reward(trainer, rows)
    rationales = [sources[0], [101, 102], [103, 104], [105, 106]]
    weighted = rationale_stats(rationales, sources, [True, True, True, False]).copy_rate
    assert weighted == pytest.approx(len(sources[0]) / (len(sources[0]) + 6))
    per_rollout = [copy_rate(r, s) for r, s in zip(rationales, sources, strict=True)]
    assert per_rollout == [1.0, 0.0, 0.0, 0.0] and weighted > 0.5 > sum(per_rollout) / 4  # the two differ here
    assert logged["grace/copy_rate"] == pytest.approx(weighted)
    assert logged["grace/copy_penalty"] == pytest.approx(0.5 * sum(per_rollout) / 4)
    written[:] = [[eos]] * 4  # every rollout empty: no rationale tokens, so the batch has no copy rate to log
    logged = _rollout_and_reward(trainer, rows)
    assert "grace/copy_rate" not in logged and logged["grace/copy_penalty"] == 0.0


# ---------------------------------------------------------------------- which reward terms teach
def _reward_of_real_rollouts(trainer, group_size: int = 4) -> dict:
    """The rollouts the tiny policy writes for two groups, and the metrics their reward logs."""
    return _rollout_and_reward(trainer, records(groups=(0, 1), group_size=group_size))


def test_every_term_of_the_per_rollout_reward_varies_within_a_group_on_real_rollouts(tiny_dir, tmp_path):
    args = make_args(tmp_path, reward_form="infonce", num_generations=4, per_device_train_batch_size=8)
    trainer = GraceGRPOTrainer(tiny_dir, args, train_dataset=tiny_dataset())
    logged = _reward_of_real_rollouts(trainer)
    stds = {key.rsplit("/", 1)[1]: value for key, value in logged.items() if key.startswith("grace/term_std/")}
    assert set(stds) == {"infonce", "consistency"}
    assert all(value > 0 for value in stds.values()), stds
    shares = {key.rsplit("/", 1)[1]: v for key, v in logged.items() if key.startswith("grace/advantage_share/")}
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-4) and shares["infonce"] > 0


def test_the_paper_reward_logs_a_zero_advantage_share_for_its_negative_terms(tiny_dir, tmp_path):
    args = make_args(tmp_path, num_generations=4, per_device_train_batch_size=8)
    trainer = GraceGRPOTrainer(tiny_dir, args, train_dataset=tiny_dataset())
    logged = _reward_of_real_rollouts(trainer)
    for cancelled in ("negative", "hard_negative"):
        assert logged[f"grace/advantage_share/{cancelled}"] == pytest.approx(0.0, abs=1e-6)
        assert logged[f"grace/term_std/{cancelled}"] == pytest.approx(0.0, abs=1e-6)
    assert logged["grace/advantage_share/positive"] != 0 and logged["grace/term_std/positive"] > 0


def test_query_rollouts_write_rationales_for_the_queries(tiny_dir, tmp_path):
    args = make_args(tmp_path, query_rollouts=True, max_steps=2, per_device_train_batch_size=8)
    trainer = GraceGRPOTrainer(tiny_dir, args, train_dataset=tiny_dataset())
    recorder = _Recorder(trainer)
    trainer.train()
    rolled = {prompt["text"] for prompts in recorder.prompts for prompt in prompts}
    data = tiny_dataset()
    assert rolled & set(data["query"]) and rolled & set(data["prompt"])
    for prompts in recorder.prompts:
        for prompt in prompts:  # a query group is scored against its positive document
            if prompt["text"] in data["query"]:
                assert prompt["query"] == data["prompt"][data["query"].index(prompt["text"])]
    assert trainer.reward_term_summary()["positive"]["steps"] == 2


# ---------------------------------------------------------------------- the embedding loss
def _loss_batch(out: dict, order: list[int], pad: int) -> dict:
    """TRL's loss batch of a rollout output in a shuffled order: prompts left-padded, rollouts right-padded."""
    prompts = [out["prompt_ids"][i] for i in order]
    completions = [out["completion_ids"][i] for i in order]
    width, depth = max(map(len, prompts)), max(map(len, completions))
    return {
        "prompt_ids": torch.tensor([[pad] * (width - len(p)) + p for p in prompts]),
        "prompt_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]),
        "completion_ids": torch.tensor([c + [pad] * (depth - len(c)) for c in completions]),
    }


def test_embedding_loss_is_the_infonce_of_each_rollout_against_the_queries_with_gradients(tiny_dir, tmp_path):
    args = make_args(tmp_path, embedding_loss_weight=1.0, embedding_loss_temperature=0.5, num_generations=2)
    trainer = GraceGRPOTrainer(tiny_dir, args, train_dataset=tiny_dataset())
    trainer.model.train()
    rows = records(groups=(0, 1, 2), group_size=2)
    out = trainer.grace_rollout(rows)
    trainer.grace_reward(
        prompts=rows,
        completions=None,
        completion_ids=out["completion_ids"],
        grace_rollouts=[out["grace_rollouts"]] * len(rows),
        log_metric=_metric_log()[1],
    )
    order = [4, 1, 5, 0, 3, 2]  # TRL shuffles the generation batch before the loss
    pad = trainer.processing_class.pad_token_id
    loss = trainer.embedding_loss(trainer.model, _loss_batch(out, order, pad))
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.parameters())
    # The same loss from the inference path: each rollout against the three queries and its own hard negative.
    rollouts: GraceRollouts = out["grace_rollouts"]
    side_ids = rollouts.side_rationale_ids()
    with torch.no_grad():
        docs = trainer.embed_with_rationales(
            [rows[i]["text"] for i in order], trainer.rationale_batch([out["completion_ids"][i] for i in order])
        )
        side = trainer.embed_with_rationales(rollouts.side_texts, trainer.rationale_batch(side_ids))
    assert rollouts.side_texts == [rows[i]["query"] for i in (0, 2, 4)] + [rows[i]["negative"] for i in (0, 2, 4)]
    expected = []
    for doc, i in zip(docs, order, strict=True):
        group = i // 2
        logits = torch.cat([side[:3] @ doc, (side[3 + group] @ doc).reshape(1)]) / 0.5
        expected.append(-torch.log_softmax(logits, 0)[group])
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)
    # A row that is not a rollout of this generation batch is refused.
    foreign = _loss_batch(out, order, pad)
    foreign["completion_ids"][0, 0] = (foreign["completion_ids"][0, 0] + 1) % trainer.processing_class.vocab_size
    with pytest.raises(RuntimeError, match="not a rollout of the latest GRACE generation batch"):
        trainer.embedding_loss(trainer.model, foreign)


def test_training_with_the_embedding_loss_logs_it_and_changes_the_update(tiny_dir, tmp_path):
    params = {}
    for weight in (0.0, 1.0):
        args = make_args(tmp_path / str(weight), embedding_loss_weight=weight, max_steps=1)
        trainer = GraceGRPOTrainer(tiny_dir, args, train_dataset=tiny_dataset())
        trainer.train()
        logs = [entry for entry in trainer.state.log_history if "grace/contrastive" in entry]
        assert ("grace/embedding_loss" in logs[0]) == (weight > 0)
        params[weight] = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    assert any(not torch.equal(params[0.0][name], params[1.0][name]) for name in params[0.0])


# ---------------------------------------------------------------------- training
def test_smoke_training_logs_every_term_from_the_rollouts_and_saves_a_grace_model(tiny_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    trainer = GraceGRPOTrainer(tiny_dir, make_args(tmp_path, copy_penalty=0.1), train_dataset=tiny_dataset())
    recorder = _Recorder(trainer)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [name for name, p in trainer.model.named_parameters() if not torch.equal(before[name], p)]
    assert changed, "no parameter changed"
    logs = [entry for entry in trainer.state.log_history if "grace/contrastive" in entry]
    assert len(logs) == 2 and len(recorder.outputs) == 2, "one generation and one log per step"
    for key in (*TERMS, *DIAGNOSTICS, "reward"):
        assert all(key in entry for entry in logs), key
    # The diagnostics are computed from the very rollouts the rollout function wrote.
    eos = set(trainer.grace_module.eos_token_ids)
    for entry, prompts, out in zip(logs, recorder.prompts, recorder.outputs, strict=True):
        completions = out["completion_ids"]
        stats = rationale_stats(
            [[t for t in ids if t not in eos] for ids in completions],
            trainer.grace_module.text_token_ids([prompt["text"] for prompt in prompts]),
            [bool(ids) and ids[-1] in eos for ids in completions],
        )
        assert entry["grace/copy_rate"] == pytest.approx(stats.copy_rate)
        assert entry["grace/distinct_per_group"] == distinct_per_group(completions, 2)
        assert entry["grace/mean_length"] == pytest.approx(stats.mean_length)  # the closing EOS not counted
        assert entry["grace/total"] == pytest.approx(entry["reward"], abs=1e-5)
    path = trainer.save_grace_model()
    assert Path(path, "modules.json").is_file()
    assert sorted(p.name for p in Path(path).parent.iterdir()) == ["grace-model"]  # no staging folder left
    loaded = SentenceTransformer(path, trust_remote_code=True, device="cpu")
    assert loaded.encode(["hello world"]).shape == (1, 32)
    assert loaded[0].system_prompt == trainer.args.system_prompt and loaded[0].max_new_tokens == 8


def test_lora_training_saves_a_merged_model(tiny_dir, tmp_path, caplog):
    from peft import LoraConfig
    from sentence_transformers import SentenceTransformer

    args = make_args(tmp_path, max_steps=1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = GraceGRPOTrainer(tiny_dir, args, train_dataset=tiny_dataset(), peft_config=lora)
    trainer.train()
    with caplog.at_level("WARNING", logger="grace_st.model.modules"):
        path = trainer.save_grace_model(str(tmp_path / "merged"))
    # Saving encodes the card's widget examples with the merged copy: its single-pass hook must see the states.
    assert "Could not capture" not in caplog.text
    assert not any(name.startswith("adapter") for name in os.listdir(path))
    loaded = SentenceTransformer(path, trust_remote_code=True, device="cpu")
    assert not any("lora" in name for name, _ in loaded[0].model.named_parameters())
    texts = ["A cat sleeps on the sofa."]
    policy = trainer.accelerator.unwrap_model(trainer.model).eval()
    rationales = loaded.encode(texts, output_value=None)[0]
    completion = rationales["rationale_ids"][rationales["rationale_mask"].bool()].tolist()
    with torch.no_grad():
        trainer.grace_module.model = policy
        expected = trainer.embed_with_rationales(texts, trainer.rationale_batch([completion]))
    torch.testing.assert_close(
        torch.as_tensor(rationales["sentence_embedding"]).float(), expected[0], atol=2e-5, rtol=1e-4
    )


def test_unsupervised_mode_uses_other_texts_as_negatives(tiny_dir, tmp_path):
    from grace_st.training.data import to_grpo_dataset

    texts = Dataset.from_dict({"text": list(tiny_dataset()["prompt"])})
    args = make_args(tmp_path, mode="unsupervised", max_steps=1)
    trainer = GraceGRPOTrainer(tiny_dir, args, train_dataset=to_grpo_dataset(texts, "unsupervised"))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "grace/hard_negative" in entry]
    assert logs and logs[0]["grace/hard_negative"] != 0.0  # two groups per batch: the other text is a negative


# ---------------------------------------------------------------------- item 6: the final model folder
def test_save_refuses_a_folder_it_did_not_write(tiny_dir, tmp_path):
    trainer = GraceGRPOTrainer(tiny_dir, make_args(tmp_path), train_dataset=tiny_dataset())
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("my notes")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        trainer.save_grace_model(str(target))
    assert (target / "notes.txt").read_text() == "my notes" and sorted(os.listdir(target)) == ["notes.txt"]
    assert sorted(os.listdir(tmp_path)) == ["mine", "run", "tiny"]  # no staging folder left behind
    trainer.save_grace_model(str(target), overwrite=True)  # an explicit overwrite replaces it
    assert not (target / "notes.txt").exists() and (target / TRAINING_INFO_FILE).is_file()


def test_save_replaces_its_own_previous_output_and_no_foreign_tmp_folder(tiny_dir, tmp_path):
    trainer = GraceGRPOTrainer(tiny_dir, make_args(tmp_path), train_dataset=tiny_dataset())
    target = tmp_path / "model"
    foreign_tmp = tmp_path / "model.tmp"  # a user's folder that merely looks like a staging folder
    foreign_tmp.mkdir()
    (foreign_tmp / "keep.txt").write_text("keep")
    trainer.save_grace_model(str(target))
    first = json.loads((target / TRAINING_INFO_FILE).read_text())
    (target / "stale.txt").write_text("left by the first save")
    trainer.state.global_step = 7
    trainer.save_grace_model(str(target))  # a previous output of this method: replaced
    assert json.loads((target / TRAINING_INFO_FILE).read_text())["global_step"] == 7 != first["global_step"]
    assert not (target / "stale.txt").exists()
    assert (foreign_tmp / "keep.txt").read_text() == "keep"
    assert sorted(os.listdir(tmp_path)) == ["model", "model.tmp", "run", "tiny"]


def test_run_training_refuses_a_foreign_final_folder_before_training(tiny_dir, tmp_path):
    from trl import ModelConfig

    from grace_st.scripts.train import run_training
    from grace_st.training.config import GraceDataArguments

    final = tmp_path / "final"
    final.mkdir()
    (final / "data.csv").write_text("a,b\n")
    args = make_args(tmp_path, final_model_dir=str(final), max_steps=1)
    with pytest.raises(FileExistsError, match=str(final)):
        run_training(args, ModelConfig(model_name_or_path=tiny_dir), GraceDataArguments(max_train_samples=4))
    assert not Path(args.output_dir, "checkpoint-1").exists()
    assert os.listdir(final) == ["data.csv"]


# ---------------------------------------------------------------------- item 7: checkpoints
def test_checkpoint_state_names_the_final_folders(tiny_dir, tmp_path):
    """Every saved trainer_state.json names real checkpoint folders (best model included), never a staging one."""
    args = make_args(
        tmp_path,
        save_strategy="steps",
        save_steps=1,
        eval_strategy="steps",
        eval_steps=1,
        per_device_eval_batch_size=4,
        metric_for_best_model="reward",
        num_iterations=2,  # step 2 reuses step 1's rollouts after an evaluation generated others
    )
    trainer = GraceGRPOTrainer(tiny_dir, args, train_dataset=tiny_dataset(), eval_dataset=tiny_dataset())
    trainer.train()
    run = Path(args.output_dir)
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["checkpoint-1", "checkpoint-2"]
    for step in (1, 2):
        text = (run / f"checkpoint-{step}" / "trainer_state.json").read_text()
        assert "tmp-" not in text
        best = json.loads(text)["best_model_checkpoint"]
        assert best is not None and Path(best).is_dir() and Path(best).parent == run
        assert (run / f"checkpoint-{step}" / CHECKPOINT_COMPLETE_FILE).is_file()


def test_hub_push_reads_the_final_checkpoint_folder(tiny_dir, tmp_path, monkeypatch):
    """push_to_hub + hub_strategy='checkpoint' uploads asynchronously from the folder it is given: that folder must
    be the final checkpoint, complete, and stay in place (no rename after the push started)."""
    pushed = []

    def record_push(self, folder):
        pushed.append((folder, sorted(os.listdir(folder))))

    monkeypatch.setattr(GraceGRPOTrainer, "init_hf_repo", lambda self, token=None: None)
    monkeypatch.setattr(GraceGRPOTrainer, "_push_from_checkpoint", record_push)
    monkeypatch.setattr(GraceGRPOTrainer, "push_to_hub", lambda self, *a, **k: None)
    args = make_args(
        tmp_path, max_steps=1, save_strategy="steps", save_steps=1, push_to_hub=True, hub_strategy="checkpoint"
    )
    trainer = GraceGRPOTrainer(tiny_dir, args, train_dataset=tiny_dataset())
    trainer.train()
    final = os.path.join(args.output_dir, "checkpoint-1")
    assert [folder for folder, _ in pushed] == [final]
    assert "trainer_state.json" in pushed[0][1] and "model.safetensors" in pushed[0][1]
    assert Path(final, "trainer_state.json").is_file()


def test_failed_save_leaves_no_partial_checkpoint(tiny_dir, tmp_path):
    args = make_args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    trainer = GraceGRPOTrainer(tiny_dir, args, train_dataset=tiny_dataset())
    run = Path(args.output_dir)
    (run / "checkpoint-0").mkdir(parents=True)  # not written by this run: must stay
    original = trainer.save_model

    def failing_save(output_dir=None, _internal_call=False):
        original(output_dir, _internal_call=_internal_call)
        raise OSError("No space left on device")

    trainer.save_model = failing_save
    with pytest.raises(OSError, match="No space left"):
        trainer.train()
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["checkpoint-0"]


def test_resume_skips_an_incomplete_checkpoint(tiny_dir, tmp_path):
    args = make_args(tmp_path, max_steps=2)
    run = Path(args.output_dir)
    partial = run / "checkpoint-5"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"half")  # a kill during the save
    assert last_complete_checkpoint(run) is None
    trainer = GraceGRPOTrainer(tiny_dir, args, train_dataset=tiny_dataset())
    with pytest.raises(ValueError, match="no complete checkpoint"):
        trainer.train(resume_from_checkpoint=True)
    (run / "checkpoint-3").mkdir()
    (run / "checkpoint-3" / CHECKPOINT_COMPLETE_FILE).write_text("step 3\n")
    assert last_complete_checkpoint(run) == str(run / "checkpoint-3")


# ---------------------------------------------------------------------- item 8: resume
class _KillAfterSave(TrainerCallback):
    """Ends the run like a kill right after the checkpoint of ``step`` was written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


class _StepCounter(TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def eight_rows() -> Dataset:
    more = {
        "prompt": ["The train was late again.", "She planted tomatoes.", "The bridge is closed.", "He sold his car."],
        "query": ["train delay", "gardening", "road closure", "car sale"],
        "negative": ["The bus was early.", "He cut the grass.", "The tunnel is open.", "She bought a bike."],
    }
    data = tiny_dataset()
    return Dataset.from_dict({k: list(data[k]) + more[k] for k in more})


def test_resume_runs_only_the_remaining_steps_and_ends_with_the_uninterrupted_weights(tiny_dir, tmp_path):
    """Killed right after checkpoint-2 (a generation boundary: one generation per step), resumed to step 4: only
    steps 3 and 4 run (2 generations) and the weights equal those of an uninterrupted 4-step run (CPU, fixed seed;
    tolerance 1e-6, observed exact). The 4 steps stay within one epoch: TRL's RepeatSampler restarts its shuffle on
    resume, so past the first epoch the data order differs (the trainer warns)."""
    options = dict(max_steps=4, save_strategy="steps", save_steps=2)
    full = GraceGRPOTrainer(tiny_dir, make_args(tmp_path / "full", **options), train_dataset=eight_rows())
    full.train()
    expected = {name: p.detach().clone() for name, p in full.model.named_parameters()}

    args = make_args(tmp_path / "killed", **options)
    killed = GraceGRPOTrainer(tiny_dir, args, train_dataset=eight_rows(), callbacks=[_KillAfterSave(2)])
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    run = Path(args.output_dir)
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]

    counter = _StepCounter()
    resumed = GraceGRPOTrainer(
        tiny_dir, make_args(tmp_path / "killed", **options), train_dataset=eight_rows(), callbacks=[counter]
    )
    recorder = _Recorder(resumed)
    resumed.train(resume_from_checkpoint=True)
    assert counter.steps == [3, 4] and len(recorder.outputs) == 2
    assert resumed.state.global_step == 4
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-2", "checkpoint-4"]
    worst = max((p.detach() - expected[name]).abs().max().item() for name, p in resumed.model.named_parameters())
    assert worst <= 1e-6, f"resumed weights differ from the uninterrupted run by {worst}"


# ---------------------------------------------------------------------- item 12: the training record
def test_trained_model_folder_carries_its_training_record(tiny_dir, tmp_path):
    from trl import ModelConfig

    from grace_st.hub.model_card import render_card
    from grace_st.scripts.train import run_training
    from grace_st.training.config import GraceDataArguments

    # A local backbone whose config records its Hub id (as a downloaded model's folder may).
    config_path = Path(tiny_dir, "config.json")
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "_name_or_path": "org/tiny-llm"}))
    Path(tiny_dir, "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    args = make_args(tmp_path, max_steps=1, copy_penalty=0.25, query_temperature=0.4)
    data_args = GraceDataArguments(train_data="demo", max_train_samples=4)
    trainer, path = run_training(args, ModelConfig(model_name_or_path=tiny_dir), data_args)
    record = json.loads(Path(path, TRAINING_INFO_FILE).read_text())
    assert record["grace_st_version"] == grace_st.__version__
    assert (record["base_model"], record["license"], record["base_model_source"]) == ("org/tiny-llm", "mit", tiny_dir)
    assert record["training_datasets"] == ["demo"] and record["global_step"] == 1
    assert record["reward"] == {
        "mode": "supervised",
        "reward_form": "paper",
        "query_rollouts": False,
        "consistency_weight": 0.2,
        "hard_negative_weight": 0.2,
        "reward_temperature": 0.1,
        "truncation_penalty": None,
        "copy_penalty": 0.25,
        "copy_min_span": 4,
    }
    assert record["generation"] == {
        "num_generations": 2,
        "max_completion_length": 8,
        "temperature": 1.0,
        "query_temperature": 0.4,
        "system_prompt": args.system_prompt,
        "prompt_template": "{text}",
        "summary_suffix": "",
        "pooling_mode": "mean",
        "save_pooling_mode": None,
    }
    assert record["config"]["copy_penalty"] == 0.25 and record["config"]["output_dir"] == args.output_dir
    terms = record["reward_terms"]
    assert set(terms) == {"positive", "negative", "hard_negative", "consistency", "copy"}
    assert terms["negative"]["advantage_share"] == pytest.approx(0.0, abs=1e-6) and terms["negative"]["steps"] == 1
    card = render_card(path)  # the card reads the record (its display is hub.py's)
    assert "base_model: org/tiny-llm" in card and "license: mit" in card


def test_base_model_of_the_default_backbone(default_backbone_dir, tmp_path):
    default = ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
    assert base_model_info("default") == default and base_model_info(None) == default
    assert base_model_info(default_backbone_dir) == default
    assert base_model_info("HuggingFaceTB/SmolLM2-135M-Instruct") == default
    assert base_model_info(str(tmp_path)) == (None, None)  # a folder that tells nothing


# ---------------------------------------------------------------------- two processes
TWO_PROCESS_SCRIPT = Path(__file__).resolve().parents[1] / "two_process_train.py"


def test_two_processes_share_in_batch_negatives(tiny_backbone_dir, tmp_path):
    """Two CPU processes (gloo): each process's reward sees the other's rollouts as in-batch negatives.

    accelerate 1.15 runs `accelerate launch --cpu --num_processes 2` as ONE process (its multi-CPU path needs mpirun);
    `--multi_gpu` starts torchrun workers, and `use_cpu=True` in the config makes them CPU processes on gloo.
    """
    out = tmp_path / "two"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(TWO_PROCESS_SCRIPT), tiny_backbone_dir, str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records_ = [torch.load(out / f"rank{rank}.pt") for rank in (0, 1)]
    assert [record["world"] for record in records_] == [(2, "gloo"), (2, "gloo")]
    for rank, record in enumerate(records_):
        local = record["local_positive"]
        gathered = record["gathered_positive"]
        assert gathered.shape[0] == 2 * local.shape[0]
        # The gathered batch holds both processes' own embeddings, in process order.
        torch.testing.assert_close(gathered[: local.shape[0]], records_[0]["local_positive"])
        torch.testing.assert_close(gathered[local.shape[0] :], records_[1]["local_positive"])
        # The hard-negative term of this process's group uses the other process's rollouts.
        group_size = record["group_size"]
        query = record["gathered_query"]
        own = rank * local.shape[0] // group_size
        other = 1 - own
        best = (query[own * group_size] @ gathered[other * group_size : (other + 1) * group_size].T).max()
        assert record["hard_negative"][own * group_size].item() == pytest.approx(best.item(), abs=1e-5)
