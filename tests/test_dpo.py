"""DPO: losses.dpo_loss is the loss TRL's DPOTrainer optimises; the DPO data follows the budget."""

import math

import datasets
import pytest
import torch
from trl import DPOConfig, DPOTrainer

from starling_lib.losses import dpo_loss
from starling_lib.models import load_model_and_tokenizer, tiny_model_path
from starling_lib.policy import PolicyTrainConfig
from starling_lib.policy.dpo import dpo_batch_split, dpo_dataset
from starling_lib.rollout import logprobs_from_logits

ROWS = [
    {"prompt": [{"role": "user", "content": "Name a fruit."}],
     "chosen": [{"role": "assistant", "content": "Apple."}],
     "rejected": [{"role": "assistant", "content": "I will not answer that question."}]},
    {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "What is 2 + 2?"}],
     "chosen": [{"role": "assistant", "content": "2 + 2 = 4."}],
     "rejected": [{"role": "assistant", "content": "5"}]},
    {"prompt": [{"role": "user", "content": "Write a haiku about rain."}],
     "chosen": [{"role": "assistant", "content": "Soft rain on the roof, / the garden drinks slowly, / clouds walk home."}],
     "rejected": [{"role": "assistant", "content": "Rain is wet."}]},
]


def test_trl_dpo_trainer_loss_equals_ours(tmp_path):
    path = str(tiny_model_path())
    model, tok = load_model_and_tokenizer(path, device="cpu", dtype=torch.float32)
    ref, _ = load_model_and_tokenizer(path, device="cpu", dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a reference unlike the policy, so that the log-ratios are not all zero
        for p in ref.model.layers[-1].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    beta = 0.5
    args = DPOConfig(output_dir=str(tmp_path), beta=beta, per_device_train_batch_size=3, report_to="none", use_cpu=True,
                     bf16=False, activation_checkpointing=False, max_length=None, disable_tqdm=True)
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(ROWS),
                         processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])   # [3 chosen; 3 rejected]
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)

        def sequence_logps(m):  # summed log-probs of the completion tokens, from a plain forward
            logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            per_token = logprobs_from_logits(logits[:, :-1], batch["input_ids"][:, 1:])
            return (per_token * batch["completion_mask"][:, 1:]).sum(-1)

        policy_logps, ref_logps = sequence_logps(model), sequence_logps(ref)
    ours, stats = dpo_loss(policy_logps[:3], policy_logps[3:], ref_logps[:3], ref_logps[3:], beta=beta)
    assert abs(ours.item() - math.log(2)) > 1e-3, "the test needs a batch where the loss is not log 2"
    assert trl_loss.item() == pytest.approx(ours.item(), abs=1e-5)
    # TRL's logged implicit rewards are ours too
    mode = "train" if trainer.model.training else "eval"
    assert trainer._metrics[mode]["rewards/margins"][-1] == pytest.approx(stats["reward_margin"].item(), abs=1e-5)


def test_dpo_dataset_has_the_online_budget_in_pairs():
    _, tok = load_model_and_tokenizer("tiny", device="cpu")
    cfg = PolicyTrainConfig(method="dpo", reward_model="unused", steps=3, rollouts_per_step=8, max_prompt_tokens=48)
    ds = dpo_dataset(cfg, tok)
    assert len(ds) == 3 * 8 // 2                                   # as many sequences as the online methods generate
    row = ds[0]
    assert row["prompt"][-1]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
    assert row["chosen"] != row["rejected"]
    lengths = [len(tok.apply_chat_template(r, tokenize=True, add_generation_prompt=True)) for r in ds["prompt"]]
    assert max(lengths) <= 48
    assert dpo_dataset(cfg, tok)["chosen"] == ds["chosen"]        # seeded


def test_dpo_batch_split_keeps_the_global_minibatch_at_any_world_size():
    """TRL multiplies per-device micro-batches by accumulation and processes: the split keeps that
    product at minibatch_size // 2 pairs, or names the numbers."""
    cfg = PolicyTrainConfig(method="dpo", rollouts_per_step=64, minibatch_size=28, micro_batch_size=4, reward_model="x")
    assert dpo_batch_split(cfg, 1) == (2, 7) and dpo_batch_split(cfg, 7) == (2, 1)
    with pytest.raises(ValueError, match=r"minibatch_size=28 is 14 pairs .* into 8 process\(es\) x whole micro-batches "
                                         r"of 2 pair\(s\)"):
        dpo_batch_split(cfg, 8)
