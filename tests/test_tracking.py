"""Experiment tracking (starling_lib.tracking): the trainers write TensorBoard event files holding
the same namespaced metrics as their history, plus sample responses as text."""

import dataclasses
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from starling_lib import tracking
from starling_lib.models import tiny_model_path
from starling_lib.policy import PolicyTrainConfig, train_policy
from starling_lib.reward_model import build_reward_model
from starling_lib.rm_io import save_reward_model
from starling_lib.rm_train import RMTrainConfig, train_reward_model


def events(folder: Path) -> EventAccumulator:
    files = list(folder.glob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file in {folder}"
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_report_to_is_checked_on_construction():
    assert tracking.tracker_names("none") == [] and tracking.tracker_names("") == []
    assert tracking.tracker_names("TensorBoard, wandb") == ["tensorboard", "wandb"]
    for ok in ("none", "tensorboard", "tensorboard,wandb", "mlflow"):
        PolicyTrainConfig(report_to=ok)
    for bad in ("tensorbord", "none,tensorboard"):
        with pytest.raises(ValueError, match=f"report_to must be 'none' or trackers from .*got {bad!r}"):
            RMTrainConfig(report_to=bad)


def test_no_tracking_without_an_output_dir_or_with_none():
    assert tracking.accelerator_kwargs(PolicyTrainConfig(output_dir="")) == {}
    assert tracking.accelerator_kwargs(PolicyTrainConfig(output_dir="x", report_to="none")) == {}
    assert tracking.accelerator_kwargs(PolicyTrainConfig(output_dir="x")) == {
        "log_with": ["tensorboard"], "project_dir": str(Path("x") / "tracking")}


def test_a_policy_run_writes_its_history_and_samples_to_tensorboard(tmp_path):
    rm_dir = save_reward_model(build_reward_model("tiny", max_length=96, seed=0)[0], tmp_path / "rm")
    cfg = PolicyTrainConfig(policy=str(tiny_model_path()), reward_model=str(rm_dir), method="ppo", steps=2,
                            rollouts_per_step=4, minibatch_size=2, micro_batch_size=2, max_new_tokens=8,
                            max_prompt_tokens=48, unfrozen_layers=2, device="cpu", progress=False, eval_every=2,
                            eval_prompts=2, eval_samples=1, output_dir=str(tmp_path / "ppo"))
    result = train_policy(cfg)
    acc = events(tmp_path / "ppo" / "tracking" / "policy_ppo")
    scalars = acc.Tags()["scalars"]
    for key in ("policy/ppo/reward_mean", "policy/ppo/kl", "policy/ppo/time_generate_s", "policy/ppo/eval_reward_mean"):
        assert key in scalars, (key, scalars)
    logged = [(e.step, e.value) for e in acc.Scalars("policy/ppo/reward_mean")]
    assert logged == [(h["step"], pytest.approx(h["policy/ppo/reward_mean"], rel=1e-6)) for h in result.history]
    assert [e.step for e in acc.Scalars("policy/ppo/eval_reward_mean")] == [0, 2]
    assert any("eval_samples" in tag for tag in acc.Tags()["tensors"])   # the sample responses, as text
    # the tracker does not change the run: the same history as an untracked one
    untracked = train_policy(dataclasses.replace(cfg, report_to="none", output_dir=str(tmp_path / "untracked")))
    assert not (tmp_path / "untracked" / "tracking").exists()
    assert [h["policy/ppo/reward_mean"] for h in untracked.history] == [h["policy/ppo/reward_mean"] for h in result.history]


def test_a_reward_model_run_writes_its_loss_to_tensorboard(tmp_path):
    cfg = RMTrainConfig(backbone="tiny", max_length=96, steps=3, batch_size=2, micro_batch_size=2, train_prompts=6,
                        eval_every=3, eval_prompts=4, device="cpu", progress=False, output_dir=str(tmp_path),
                        save_model=False)
    result = train_reward_model(cfg)
    acc = events(tmp_path / "tracking" / "reward_model_kwise")
    assert [e.step for e in acc.Scalars("rm/loss")] == [1, 2, 3]
    assert [e.value for e in acc.Scalars("rm/loss")] == pytest.approx([h["rm/loss"] for h in result.history], rel=1e-6)
    assert [e.step for e in acc.Scalars("rm/heldout_pair_accuracy")] == [3]
