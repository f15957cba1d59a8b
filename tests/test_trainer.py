"""GraceGRPOTrainer on a tiny random Llama: config checks, inference parity, smoke training, resume, 2 processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from grace_st.config import GraceGRPOConfig
from grace_st.modeling import RationaleBatch
from grace_st.factory import build_grace_model
from grace_st.trainer import GraceGRPOTrainer

TERMS = ("grace/contrastive", "grace/consistency", "grace/hard_negative", "grace/copy_penalty")
DIAGNOSTICS = (
    "grace/copy_rate",
    "grace/distinct_per_group",
    "grace/group_reward_std",
    "grace/mean_length",
    "grace/finish_rate",
    "grace/truncation_rate",
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


def make_args(tmp_path, **overrides) -> GraceGRPOConfig:
    options = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        max_steps=2,
        learning_rate=5e-2,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        truncation_penalty=None,  # random tiny models rarely stop: keep the reward informative
        seed=0,
        disable_tqdm=True,
    )
    options.update(overrides)
    return GraceGRPOConfig(**options)


@pytest.fixture
def tiny_dir(tiny_backbone_dir, tmp_path) -> str:
    path = tmp_path / "tiny"
    shutil.copytree(tiny_backbone_dir, path)
    return str(path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mode": "weird"}, "mode='weird'"),
        ({"pooling_mode": "max"}, "pooling_mode='max'"),
        ({"reward_temperature": 0.0}, "reward_temperature"),
        ({"consistency_weight": -1.0}, "consistency_weight"),
        ({"remove_unused_columns": True}, "remove_unused_columns"),
        ({"max_completion_length": 0}, "max_completion_length"),
    ],
)
def test_config_rejects_bad_values(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


def test_config_defaults_follow_the_paper(tmp_path):
    args = GraceGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    assert (args.consistency_weight, args.hard_negative_weight, args.reward_temperature) == (0.2, 0.2, 0.1)
    assert (args.truncation_penalty, args.query_temperature, args.mode) == (-1.0, 0.5, "supervised")
    assert args.scale_rewards == "none" and args.beta == 0.0 and args.num_generations == 8


def test_dataset_columns_are_checked(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="to_grpo_dataset"):
        GraceGRPOTrainer(tiny_dir, make_args(tmp_path), train_dataset=Dataset.from_dict({"prompt": ["x"]}))


def test_reward_embedding_equals_inference_embedding(tiny_dir, tmp_path):
    """Parity: the reward's embedding of text + rationale is what model.encode gives when it writes that rationale."""
    trainer = GraceGRPOTrainer(tiny_dir, make_args(tmp_path, max_completion_length=6), train_dataset=tiny_dataset())
    texts = list(tiny_dataset()["prompt"])
    policy = trainer.accelerator.unwrap_model(trainer.model).eval()
    model = build_grace_model(
        policy, trainer.processing_class, system_prompt=trainer.args.system_prompt, max_new_tokens=6
    )
    items = model.encode(texts, output_value=None, batch_size=2)
    expected = torch.stack([torch.as_tensor(item["sentence_embedding"]) for item in items])
    # The completions as TRL hands them to the reward: ids up to and including the first EOS.
    completions = [item["rationale_ids"][item["rationale_mask"].bool()].tolist() for item in items]
    with torch.no_grad():
        got = trainer.embed_with_rationales(texts, trainer.rationale_batch(completions))
    torch.testing.assert_close(got, expected.float(), atol=2e-5, rtol=1e-4)
    # The GRPO prompt is the inference prompt, token for token.
    prompt_ids, _, _ = trainer._tokenize_prompts(texts[:1])
    features = model[0].preprocess(texts[:1])
    assert prompt_ids[0] == features["input_ids"][0][features["attention_mask"][0].bool()].tolist()


def test_rationale_batch_marks_finished_rows(tiny_dir, tmp_path):
    trainer = GraceGRPOTrainer(tiny_dir, make_args(tmp_path), train_dataset=tiny_dataset())
    eos = trainer.grace_module.eos_token_ids[0]
    batch = trainer.rationale_batch([[5, 6, eos], [7]])
    assert isinstance(batch, RationaleBatch)
    assert batch.finished.tolist() == [True, False]
    assert batch.mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_smoke_training_logs_every_term_and_saves_a_grace_model(tiny_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    trainer = GraceGRPOTrainer(tiny_dir, make_args(tmp_path, copy_penalty=0.1), train_dataset=tiny_dataset())
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [name for name, p in trainer.model.named_parameters() if not torch.equal(before[name], p)]
    assert changed, "no parameter changed"
    logs = [entry for entry in trainer.state.log_history if "grace/contrastive" in entry]
    assert len(logs) == 2, "reward terms must be logged every step"
    for key in (*TERMS, *DIAGNOSTICS, "reward"):
        assert all(key in entry for entry in logs), key
    assert 1.0 <= logs[0]["grace/distinct_per_group"] <= 2.0
    path = trainer.save_grace_model()
    assert Path(path, "modules.json").is_file() and not Path(path + ".tmp").exists()
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
    with caplog.at_level("WARNING", logger="grace_st.modeling"):
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


class _Kill(TrainerCallback):
    """Stops the process-like run abruptly after a given step (as a kill would), after its checkpoint was written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step + 1:
            raise KeyboardInterrupt


def test_resume_after_a_kill_finishes_at_max_steps(tiny_dir, tmp_path):
    args = make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    trainer = GraceGRPOTrainer(tiny_dir, args, train_dataset=tiny_dataset(), callbacks=[_Kill(2)])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    run = Path(args.output_dir)
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert (run / "checkpoint-2" / "trainer_state.json").is_file()
    resumed = GraceGRPOTrainer(
        tiny_dir, make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2), train_dataset=tiny_dataset()
    )
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-2", "checkpoint-4"]


def test_stale_staging_folder_is_replaced(tiny_dir, tmp_path):
    args = make_args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    run = Path(args.output_dir)
    (run / "tmp-checkpoint-1" / "checkpoint-1").mkdir(parents=True)  # what a kill during saving leaves
    (run / "tmp-checkpoint-1" / "checkpoint-1" / "half-written").write_text("x")
    trainer = GraceGRPOTrainer(tiny_dir, args, train_dataset=tiny_dataset())
    trainer.train()
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    assert not (run / "checkpoint-1" / "half-written").exists()


TWO_PROCESS_SCRIPT = Path(__file__).with_name("two_process_train.py")


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
    records = [torch.load(out / f"rank{rank}.pt") for rank in (0, 1)]
    assert [record["world"] for record in records] == [(2, "gloo"), (2, "gloo")]
    for rank, record in enumerate(records):
        local = record["local_positive"]
        gathered = record["gathered_positive"]
        assert gathered.shape[0] == 2 * local.shape[0]
        # The gathered batch holds both processes' own embeddings, in process order.
        torch.testing.assert_close(gathered[: local.shape[0]], records[0]["local_positive"])
        torch.testing.assert_close(gathered[local.shape[0] :], records[1]["local_positive"])
        # The hard-negative term of this process's group uses the other process's rollouts.
        group_size = record["group_size"]
        query = record["gathered_query"]
        own = rank * local.shape[0] // group_size
        other = 1 - own
        best = (query[own * group_size] @ gathered[other * group_size : (other + 1) * group_size].T).max()
        assert record["hard_negative"][own * group_size].item() == pytest.approx(best.item(), abs=1e-5)


def test_unsupervised_mode_uses_other_texts_as_negatives(tiny_dir, tmp_path):
    from grace_st.data import to_grpo_dataset

    texts = Dataset.from_dict({"text": list(tiny_dataset()["prompt"])})
    args = make_args(tmp_path, mode="unsupervised", max_steps=1)
    trainer = GraceGRPOTrainer(tiny_dir, args, train_dataset=to_grpo_dataset(texts, "unsupervised"))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "grace/hard_negative" in entry]
    assert logs and logs[0]["grace/hard_negative"] != 0.0  # two groups per batch: the other text is a negative


def test_row_temperature_divides_each_row_by_its_own_value():
    from grace_st.trainer import RowTemperature

    scores = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    out = RowTemperature(torch.tensor([1.0, 0.5]))(torch.zeros(2, 1, dtype=torch.long), scores)
    assert out.tolist() == [[1.0, 2.0], [2.0, 4.0]]
    with pytest.raises(ValueError, match="temperatures"):
        RowTemperature(torch.tensor([1.0, 0.0]))


def _joint_generation(trainer, rows):
    trainer._batch_inputs = rows
    prompt_ids, _, _ = trainer._tokenize_prompts([row["prompt"] for row in rows])
    completion_ids, logprobs = trainer._generate_single_turn(prompt_ids, None, {}, trainer.num_generations)
    return completion_ids, trainer._joint


def test_joint_generation_writes_rollouts_and_side_rationales_in_one_call(tiny_dir, tmp_path):
    """One generate call: G rollouts per document, then one query and one negative rationale per group.

    With a near-zero query temperature the side rationales are the greedy ones; the reward's single-pass embeddings
    equal the two-pass reference of the same text + rationale.
    """
    args = make_args(tmp_path, max_completion_length=6, query_temperature=1e-4, temperature=1.0)
    trainer = GraceGRPOTrainer(tiny_dir, args, train_dataset=tiny_dataset())
    data = tiny_dataset()
    rows = [{k: data[k][g] for k in ("prompt", "query", "negative")} for g in (0, 1) for _ in range(2)]
    torch.manual_seed(0)
    completion_ids, joint = _joint_generation(trainer, rows)
    assert joint is not None and joint.n_rollouts == 4 and len(completion_ids) == 4
    assert joint.rationales.ids.shape[0] == 4 + 2 + 2  # rollouts, 2 queries, 2 negatives
    assert joint.rationales.states is not None
    # Side rationales: greedy continuations of the queries and negatives of both groups.
    side_texts = [data["query"][0], data["query"][1], data["negative"][0], data["negative"][1]]
    greedy = trainer.grace_module.generate_rationales(trainer._features(side_texts), do_sample=False)
    side = joint.rationales
    for k in range(4):
        got = side.ids[4 + k][side.mask[4 + k].bool()].tolist()
        assert got == greedy.ids[k][greedy.mask[k].bool()].tolist()
    # Rollouts handed to TRL are the first rows, up to and including their EOS.
    for i, ids in enumerate(completion_ids):
        assert ids == side.ids[i][side.mask[i].bool()].tolist()
    # Single pass (states kept from generation) == two-pass reference on the same rationales.
    single = trainer._pooled(joint.features, joint.rationales)
    reference = RationaleBatch(side.ids, side.mask, side.finished)
    two_pass = trainer._pooled(joint.features, reference)
    torch.testing.assert_close(single, two_pass, atol=1e-5, rtol=1e-4)


def test_sampling_filters_fall_back_to_trl_generation(tiny_dir, tmp_path):
    trainer = GraceGRPOTrainer(tiny_dir, make_args(tmp_path, top_k=5, max_steps=1), train_dataset=tiny_dataset())
    data = tiny_dataset()
    rows = [{k: data[k][g] for k in ("prompt", "query", "negative")} for g in (0, 1) for _ in range(2)]
    completion_ids, joint = _joint_generation(trainer, rows)
    assert joint is None and len(completion_ids) == 4
    trainer._batch_inputs = None
    trainer.train()  # the reward writes the query/negative rationales itself
    logs = [entry for entry in trainer.state.log_history if "grace/total" in entry]
    assert logs and all(key in logs[0] for key in TERMS)


@pytest.mark.parametrize("name", ["demo.yaml", "sick.yaml"])
def test_shipped_cpu_configs_parse_with_the_guards_on(name):
    """The CPU configs parse with train.py's parser and keep the issue-7 guards (KL, copy penalty) switched on."""
    from trl import ModelConfig, TrlParser

    from grace_st.config import GraceDataArguments

    path = Path(__file__).resolve().parents[1] / "training" / "configs" / name
    args, model_args, data_args = TrlParser((GraceGRPOConfig, ModelConfig, GraceDataArguments)).parse_args_and_config(
        ["--config", str(path), "--output_dir", "/tmp/unused"]
    )
    assert args.beta > 0 and args.copy_penalty > 0
    assert model_args.use_peft and args.use_cpu
