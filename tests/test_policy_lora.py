"""LoRA for the policy (starling_lib.lora_policy): the reference is the initial model, only the
adapters train, the saved policy is the merged model, and a LoRA run trains and resumes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from starling_lib.lora_policy import LoraPolicy
from starling_lib.models import load_model_and_tokenizer, tiny_model_path
from starling_lib.policy import PolicyTrainConfig, train_policy
from starling_lib.rollout import SharedTrunkPolicy, generate


def _tiny():
    return load_model_and_tokenizer(str(tiny_model_path()), device="cpu")


def _batch(model, tok):
    torch.manual_seed(0)
    prompts = [[{"role": "user", "content": "Name a colour."}], [{"role": "user", "content": "Say hello twice."}]]
    return generate(model, tok, prompts, max_new_tokens=6, engine="hf")


def test_the_reference_is_the_initial_model_and_only_the_adapters_train():
    model, tok = _tiny()
    batch = _batch(model, tok)
    args = (batch.input_ids, batch.attention_mask, batch.response_start)
    initial = SharedTrunkPolicy(_tiny()[0], 1, value_head=False)(*args)["logprobs"]
    policy = LoraPolicy(model, r=4, layers=-1)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("value_head.") for n in trainable)
    assert sum("lora_A" in n for n in trainable) == 4 * 7          # 4 layers x (q, k, v, o, gate, up, down)
    out = policy(*args, with_ref=True, with_values=True)
    # peft starts each B at zero: the policy is the initial model, and so is its reference
    assert torch.allclose(out["logprobs"], initial, atol=1e-6) and torch.allclose(out["ref_logprobs"], initial, atol=1e-6)
    assert torch.equal(out["values"], torch.zeros_like(out["values"]))
    with torch.no_grad():                                          # a trained adapter: B away from zero
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    moved = policy(*args, with_ref=True)
    assert (moved["logprobs"] - initial).abs().max() > 1e-3
    assert torch.allclose(moved["ref_logprobs"], initial, atol=1e-6)   # the adapters off: still the initial model
    merged = SharedTrunkPolicy(policy.merged(), 1, value_head=False)(*args)["logprobs"]
    assert torch.allclose(merged, moved["logprobs"], atol=1e-5)        # what is saved is what was trained
    assert any("lora_" in n for n, _ in policy.named_parameters())    # merging a copy left the policy as it was
    with pytest.raises(ValueError, match="no frozen trunk"):
        policy(*args, return_trunk=True)


def test_the_kv_cache_sampler_runs_the_adapters():
    """The sampler calls LoRA-wrapped projections as modules: its greedy tokens are generate's, with
    the adapters on and off."""
    model, tok = _tiny()
    policy = LoraPolicy(model, r=4)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    prompts = [[{"role": "user", "content": "Name a colour."}], [{"role": "user", "content": "Say hello twice."}]]

    def both():
        fast, hf = (generate(policy.model, tok, prompts, max_new_tokens=12, do_sample=False, engine=e) for e in ("fast", "hf"))
        assert torch.equal(fast.input_ids, hf.input_ids)
        return fast.input_ids
    adapted = both()
    with policy.peft.disable_adapter():
        initial = both()
    assert not torch.equal(adapted, initial)


def test_adapters_on_the_top_layers_only():
    policy = LoraPolicy(_tiny()[0], r=2, layers=1)
    adapted = {n.split(".layers.")[1].split(".")[0] for n, _ in policy.named_parameters() if "lora_A" in n}
    assert adapted == {"3"}


@pytest.fixture
def lora_cfg(rm_dir):
    return PolicyTrainConfig(policy=str(tiny_model_path()), reward_model=rm_dir, method="apa", steps=3,
                             rollouts_per_step=4, minibatch_size=2, micro_batch_size=2, max_new_tokens=8,
                             max_prompt_tokens=48, unfrozen_layers=-1, lora_r=4, lr=1e-2, device="cpu", progress=False,
                             eval_every=0)


def test_a_lora_run_trains_every_layer_through_its_adapters_and_resumes(lora_cfg, tmp_path):
    straight = train_policy(dataclasses.replace(lora_cfg, output_dir=str(tmp_path / "straight")))
    interrupted = dataclasses.replace(lora_cfg, output_dir=str(tmp_path / "resumed"), checkpoint_every=1)
    assert train_policy(interrupted, stop_after=2).steps_run == 2
    resumed = train_policy(interrupted)
    assert resumed.steps_run == 1
    rewards = [h["policy/apa/reward_mean"] for h in straight.history]
    assert [h["policy/apa/reward_mean"] for h in resumed.history] == rewards
    a, b = straight.policy.state_dict(), resumed.policy.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # the saved policy is a plain model with the adapters merged: every layer's projections moved,
    # the embeddings and the norms did not
    saved = load_model_and_tokenizer(str(resumed.policy_dir), device="cpu")[0].state_dict()
    before = _tiny()[0].state_dict()
    assert set(saved) == set(before)
    changed = {k for k in before if not torch.allclose(before[k], saved[k], atol=1e-7)}
    assert {k.split(".")[2] for k in changed if ".layers." in k} == {"0", "1", "2", "3"}
    assert all(k.endswith("proj.weight") for k in changed)
    kl = [h["policy/apa/kl"] for h in straight.history]
    assert kl[0] == pytest.approx(0.0, abs=1e-4) and kl[-1] > 1e-4     # it moved away from the reference


def test_lora_settings_are_checked(lora_cfg):
    with pytest.raises(ValueError, match="not for dpo"):
        dataclasses.replace(lora_cfg, method="dpo")
    with pytest.raises(ValueError, match="without the adapters"):
        dataclasses.replace(lora_cfg, rollout_engine="vllm")
    with pytest.raises(ValueError, match="-1 all; got 0"):
        dataclasses.replace(lora_cfg, unfrozen_layers=0)
    with pytest.raises(ValueError, match="only with lora_r"):
        dataclasses.replace(lora_cfg, lora_r=0)                      # unfrozen_layers -1 without LoRA
