"""starling_lib.policy: one short run of each method, training that learns, resume, accumulation, configs and the bookkeeping."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from starling_lib.models import load_model_and_tokenizer, tiny_model_path
from starling_lib.policy import (PolicyTrainConfig, PolicyTrainResult, check_strategy, evaluate_policy, frontier_frame,
                                 history_frame, load_config, load_or_train_reward_model, load_prompts,
                                 normalize_scores, phase_frame, reward_gain, step_prompts, train_policy)
from starling_lib.policy.__main__ import main
from starling_lib.policy.online import check_world_size, local_minibatches
from starling_lib.policy.prompts import process_units
from starling_lib.rm_io import load_reward_model
from starling_lib.rollout import SharedTrunkPolicy

REPO = Path(__file__).resolve().parent.parent
PHASES = ["time_generate_s", "time_score_s", "time_forward_s", "time_update_s"]
COMMON = ["reward_mean", "reward_std", "kl", "entropy", "response_length", "stop_frac", "policy_loss", "grad_norm", "lr",
          "elapsed_s",
          *PHASES]
OWN = {"apa": ["value_loss", "approx_kl", "log_ratio_mean", "target_mean", "value_clip_frac"],
       "ppo": ["value_loss", "clip_frac", "approx_kl", "ratio_mean", "value_clip_frac", "non_score_reward"],
       "p3o": ["clip_frac", "seq_log_ratio_mean"]}


@pytest.fixture(scope="module")
def tiny_cfg(rm_dir):
    return PolicyTrainConfig(policy=str(tiny_model_path()), reward_model=rm_dir, steps=2, rollouts_per_step=4,
                             minibatch_size=2, micro_batch_size=2, max_new_tokens=8, max_prompt_tokens=48,
                             unfrozen_layers=2, lr=1e-3, device="cpu", progress=False, eval_every=2, eval_prompts=2,
                             eval_samples=1)


def _initial_state():
    return load_model_and_tokenizer(str(tiny_model_path()), device="cpu")[0].state_dict()


# ---------------------------------------------------------------------------------------------
# one short run of each method


@pytest.mark.parametrize("method", ["apa", "ppo", "p3o"])
def test_each_method_trains_only_the_top_layers_and_logs_its_metrics(tiny_cfg, method):
    result = train_policy(dataclasses.replace(tiny_cfg, method=method))
    before, after = _initial_state(), result.policy.model.state_dict()
    top = ("model.layers.2.", "model.layers.3.")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(top) for k in changed), sorted(changed)[:5]
    assert any(k.startswith("model.layers.2.") for k in changed) and any(k.startswith("model.layers.3.") for k in changed)
    # the reference is still the initial policy's top layers
    for i, layer in enumerate(result.policy.ref_layers):
        for name, p in layer.state_dict().items():
            assert torch.equal(p, before[f"model.layers.{2 + i}.{name}"])
    assert (result.policy.value_head is None) == (method == "p3o")

    assert [h["step"] for h in result.history] == [1, 2]
    assert set(result.history[-1]) == {"step"} | {f"policy/{method}/{k}" for k in COMMON + OWN[method]}
    assert all(torch.isfinite(torch.tensor(v)) for k, v in result.history[-1].items())
    assert result.history[0][f"policy/{method}/kl"] == pytest.approx(0.0, abs=1e-5)   # the first batch is the initial policy's
    assert result.history[-1][f"policy/{method}/kl"] > 0
    assert [e["step"] for e in result.evals] == [0, 2]
    assert result.evals[0][f"policy/{method}/eval_kl"] == pytest.approx(0.0, abs=1e-5)
    assert result.extra["responses_generated"] == 8 and result.extra["optimizer_steps"] == 2 * 2 * 2
    assert result.eval_details[-1]["num_responses"] == 2
    # The phases of a step account for its time: the second step's clock minus the first's, less
    # the evaluation after step 2, is its four phases plus the metrics' bookkeeping.
    phases = sum(result.history[1][f"policy/{method}/{k}"] for k in PHASES)
    step_s = result.history[1][f"policy/{method}/elapsed_s"] - result.history[0][f"policy/{method}/elapsed_s"]
    assert all(result.history[1][f"policy/{method}/{k}"] > 0 for k in PHASES)
    assert 0.8 * step_s <= phases <= step_s
    table = phase_frame({method: result})          # notebook 04's "where a step's time goes"
    assert list(table["phase"]) == ["generate", "score", "forward", "update"]
    assert table["share"].sum() == pytest.approx(1.0) and (table["seconds"] > 0).all()


def test_dpo_runs_through_trl_with_the_same_budget_and_evaluation(tiny_cfg, tmp_path):
    result = train_policy(dataclasses.replace(tiny_cfg, method="dpo", output_dir=str(tmp_path)))
    assert result.extra["optimizer_steps"] == tiny_cfg.steps * tiny_cfg.optimizer_steps_per_step == 8
    assert result.extra["num_pairs"] == 4 and result.extra["sequences_per_optimizer_step"] == tiny_cfg.minibatch_size
    before = _initial_state()
    saved = load_model_and_tokenizer(str(result.policy_dir), device="cpu")[0].state_dict()
    changed = {k for k in before if not torch.equal(before[k], saved[k])}
    assert changed and all(k.startswith(("model.layers.2.", "model.layers.3.")) for k in changed)
    assert [e["step"] for e in result.evals] == [0, 2] and result.evals[0]["policy/dpo/eval_kl"] == pytest.approx(0, abs=1e-5)
    assert result.evals[-1]["policy/dpo/eval_kl"] > 0
    assert len(result.history) == 8 and "policy/dpo/reward_accuracy" in result.history[-1]
    # The reference's log-probs were read from the policy before its first update: there the two
    # are one model, so the first step's loss is log 2 and its implicit reward margin 0.
    assert result.history[0]["policy/dpo/policy_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert result.history[0]["policy/dpo/reward_margin"] == pytest.approx(0, abs=1e-5)
    assert result.history[-1]["policy/dpo/policy_loss"] != pytest.approx(math.log(2), abs=1e-3)
    # tracked through TRL's own report_to, beside the online methods' runs
    assert list((tmp_path / "tracking" / "policy_dpo").glob("events.out.tfevents.*"))


def test_the_initial_evaluation_is_every_method_s_step_0_and_is_reused_not_repeated(tiny_cfg):
    from starling_lib.policy import evaluate_initial
    initial = evaluate_initial(tiny_cfg)
    for method in ("ppo", "dpo"):
        cfg = dataclasses.replace(tiny_cfg, method=method)
        computed = train_policy(cfg).eval_details[0]
        # what reuse rests on: at step 0 each method's own evaluation is the initial policy's, response for response
        assert computed["step"] == 0 and computed["rewards"] == pytest.approx(initial["rewards"], abs=1e-5)
        reused = train_policy(cfg, initial_eval=initial)
        assert reused.eval_details[0]["rewards"] is initial["rewards"]


# ---------------------------------------------------------------------------------------------
# checkpoints and resume


def test_resume_after_an_interruption_gives_the_same_weights(tiny_cfg, tmp_path):
    cfg = dataclasses.replace(tiny_cfg, method="ppo", steps=3, eval_every=0)
    straight = train_policy(dataclasses.replace(cfg, output_dir=str(tmp_path / "straight")))
    interrupted = dataclasses.replace(cfg, output_dir=str(tmp_path / "resumed"), checkpoint_every=1)
    first = train_policy(interrupted, stop_after=2)
    assert first.steps_run == 2 and first.policy_dir is None
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    latest = tmp_path / "resumed" / "checkpoints" / "step-000002"
    assert (latest / "custom_state_0.json").is_file() and not list(latest.glob("custom_checkpoint_*.pkl"))  # no pickle
    # a copy whose latest checkpoint was damaged after the fact: named, and resumed from the one before
    shutil.copytree(tmp_path / "resumed", tmp_path / "damaged")
    weights = tmp_path / "damaged" / "checkpoints" / "step-000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.warns(UserWarning, match=r"step-000002 is damaged \(model.safetensors has 100 bytes"):
        fallback = train_policy(dataclasses.replace(interrupted, output_dir=str(tmp_path / "damaged")))
    assert fallback.steps_run == 2
    rewards = [h["policy/ppo/reward_mean"] for h in straight.history]
    assert [h["policy/ppo/reward_mean"] for h in fallback.history] == rewards
    c = fallback.policy.state_dict()
    assert all(torch.allclose(a_v, c[k], atol=1e-6) for k, a_v in straight.policy.state_dict().items())
    resumed = train_policy(interrupted)
    assert resumed.steps_run == 1 and len(resumed.history) == 3
    assert [h["policy/ppo/reward_mean"] for h in resumed.history] == [h["policy/ppo/reward_mean"] for h in straight.history]
    a, b = straight.policy.state_dict(), resumed.policy.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)          # optimizer state and value head included
    assert not torch.equal(a["value_head.weight"], torch.zeros_like(a["value_head.weight"]))
    reloaded = load_model_and_tokenizer(str(resumed.policy_dir), device="cpu")[0].state_dict()
    assert all(torch.allclose(reloaded[k], v, atol=1e-6) for k, v in straight.policy.model.state_dict().items())
    # started again after the end: nothing to train, but the final evaluation is there to read
    again = train_policy(dataclasses.replace(interrupted, eval_every=3, eval_prompts=2, eval_samples=1))
    assert again.steps_run == 0 and [d["step"] for d in again.eval_details] == [3] and [e["step"] for e in again.evals] == [3]


def test_resume_refuses_a_checkpoint_of_another_config(tiny_cfg, tmp_path):
    cfg = dataclasses.replace(tiny_cfg, method="p3o", output_dir=str(tmp_path), checkpoint_every=1, eval_every=0)
    train_policy(cfg, stop_after=1)
    with pytest.raises(ValueError, match="different config.*lr: checkpoint 0.001 vs now 0.002"):
        train_policy(dataclasses.replace(cfg, lr=2e-3))


def test_gradient_accumulation_matches_one_big_micro_batch(tiny_cfg):
    """P3O's loss is a mean over pairs, so two micro-batches of one pair each, accumulated, give the
    gradient of one micro-batch of two. The weights agree to float32 rounding, which AdamW's division
    by sqrt(v) can blow up for a few near-zero gradients; one optimizer step per micro-batch instead
    would move nearly every weight by about lr."""
    cfg = dataclasses.replace(tiny_cfg, method="p3o", steps=1, minibatch_size=4, epochs_per_batch=1, eval_every=0)
    whole = train_policy(dataclasses.replace(cfg, micro_batch_size=4)).policy.state_dict()
    accumulated = train_policy(dataclasses.replace(cfg, micro_batch_size=2)).policy.state_dict()
    diff = torch.cat([(whole[k] - accumulated[k]).abs().flatten() for k in whole])
    assert diff.max() < 1e-4 and (diff > 1e-6).sum() <= 100, (diff.max(), (diff > 1e-6).sum())
    moved = torch.cat([(whole[f"model.{k}"] - v).abs().flatten() for k, v in _initial_state().items()])
    assert (moved > 5e-4).sum() > 10_000                                     # it did train, by about lr


def _launch(tmp_path, name: str, processes: int, settings: dict) -> tuple[dict, dict, dict]:
    """Run starling_lib.policy through `accelerate launch` on `processes` CPU processes (gloo):
    (the last record it printed, its history.json, the saved policy's weights)."""
    out = tmp_path / name
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(REPO / "configs/accelerate/ddp.yaml"),
           "--num_processes", str(processes), "--mixed_precision", "no", "-m", "starling_lib.policy",
           str(REPO / "configs/policy/tiny_cpu.yaml")]
    cmd += [arg for k, v in {**settings, "output_dir": str(out)}.items() for arg in ("--set", f"{k}={v}")]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    saved = load_model_and_tokenizer(str(out / "policy"), device="cpu")[0].state_dict()
    return summary, json.loads((out / "history.json").read_text()), saved


@pytest.mark.slow
def test_three_processes_give_the_one_process_update_at_starlings_batch_shape(tiny_cfg, tmp_path):
    """Starling's batch shape scaled down (64 rollouts, minibatch 28 -> 16 and 7) on 3 processes:
    16 prompts split 6 + 5 + 5, minibatches of 7, 7 and 2 drawn from the whole batch, so a process
    can hold none of a minibatch. With near-greedy sampling (the same responses whatever the split)
    the run must be the one-process run: the same metrics each step and the same trained weights,
    although the one-process run takes each minibatch in one micro-batch and the three take theirs
    in micro-batches of 2. The scores are whitened and the advantages too: statistics of the whole batch.
    The held-out evaluations are shared out among the processes and gathered."""
    settings = {**{k: v for k, v in dataclasses.asdict(tiny_cfg).items() if k not in ("progress",)},
                "method": "apa", "mixed_precision": "no", "rollouts_per_step": 16, "minibatch_size": 7,
                "micro_batch_size": 7, "epochs_per_batch": 2, "steps": 2, "temperature": 1e-4, "score_norm": "whiten",
                "lr": 3e-3, "eval_every": 2, "eval_prompts": 6, "eval_samples": 1, "eval_batch_size": 2}
    cfg = dataclasses.replace(tiny_cfg, **settings)
    shares = [process_units(16, r, 3) for r in range(3)]
    assert [len(s) for s in shares] == [6, 5, 5]
    local = [local_minibatches(16, 7, 2, s, torch.Generator().manual_seed(0)) for s in shares]
    assert any(len(mb) == 0 for mbs in local for mb in mbs)          # the zero-weight pass is exercised
    assert step_prompts(0, list(range(100)), cfg) == sum((step_prompts(0, list(range(100)), cfg, r, 3)
                                                          for r in range(3)), [])

    one, one_history, one_saved = _launch(tmp_path, "one", 1, settings)
    three, three_history, three_saved = _launch(tmp_path, "three", 3, {**settings, "micro_batch_size": 2})
    assert one["num_processes"] == 1 and three["num_processes"] == 3 and three["responses_generated"] == 32
    # the evaluations, 3 batches of 2 prompts shared out one per process, are the one process's too
    for a, b in zip(one_history["evals"], three_history["evals"], strict=True):
        assert sorted(a) == sorted(b) and a["step"] == b["step"]
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), k
    for a, b in zip(one_history["history"], three_history["history"], strict=True):
        keys = [k for k in a if k != "step" and not k.endswith(("_s", "/lr"))]
        assert sorted(keys) == sorted(k for k in b if k != "step" and not k.endswith(("_s", "/lr")))
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), k
    before = _initial_state()
    changed = {k for k in before if not torch.equal(before[k], three_saved[k])}
    assert changed and all(k.startswith(("model.layers.2.", "model.layers.3.")) for k in changed)
    diff = torch.cat([(one_saved[k] - three_saved[k]).abs().flatten() for k in changed])
    moved = torch.cat([(one_saved[k] - before[k]).abs().flatten() for k in changed])
    # AdamW divides by sqrt(v): float32 rounding in a near-zero gradient can move a few weights apart.
    assert diff.max() < 1e-3 and (diff > 1e-5).sum() <= 0.001 * diff.numel(), (diff.max(), (diff > 1e-5).sum())
    assert (moved > 1e-3).float().mean() > 0.5                       # while most weights moved by about lr


def test_a_world_size_with_fewer_prompts_than_processes_is_refused_with_the_numbers(tiny_cfg):
    check_world_size(dataclasses.replace(tiny_cfg, rollouts_per_step=64, minibatch_size=28), 7)   # 10 + 6 x 9
    with pytest.raises(ValueError, match=r"rollouts_per_step=16 is 8 prompt\(s\) a step \(2 responses each\), fewer "
                                         r"than the 9 processes.*to 18 or more"):
        check_world_size(dataclasses.replace(tiny_cfg, method="p3o", rollouts_per_step=16, minibatch_size=8), 9)


def test_minibatches_are_drawn_from_the_whole_batch_and_shared_out():
    assert [len(process_units(64, r, 7)) for r in range(7)] == [10, 9, 9, 9, 9, 9, 9]
    assert [u for r in range(7) for u in process_units(64, r, 7)] == list(range(64))
    one = local_minibatches(64, 28, 2, range(64), torch.Generator().manual_seed(3))
    assert [len(mb) for mb in one] == [28, 28, 8, 28, 28, 8]
    shares = [process_units(64, r, 8) for r in range(8)]
    per_rank = [local_minibatches(64, 28, 2, s, torch.Generator().manual_seed(3)) for s in shares]
    for i, mb in enumerate(one):
        pieces = torch.cat([per_rank[r][i] + shares[r].start for r in range(8)])
        assert sorted(pieces.tolist()) == sorted(mb.tolist())


# ---------------------------------------------------------------------------------------------
# pieces


def test_step_prompts_pairs_for_p3o_and_shares_per_process(tiny_cfg):
    prompts = [f"p{i}" for i in range(10)]
    apa = step_prompts(3, prompts, tiny_cfg)
    assert len(apa) == 4 and len(set(apa)) == 4 and apa == step_prompts(3, prompts, tiny_cfg)
    p3o = step_prompts(3, prompts, dataclasses.replace(tiny_cfg, method="p3o"))
    assert len(p3o) == 4 and p3o[0] == p3o[1] and p3o[2] == p3o[3] and p3o[0] != p3o[2]
    two = step_prompts(3, prompts, tiny_cfg, rank=0, num_processes=2) + step_prompts(3, prompts, tiny_cfg, 1, 2)
    assert two == apa
    assert step_prompts(4, prompts, tiny_cfg) != apa


def test_fsdp_and_deepspeed_are_refused_with_the_reason_and_ddp_is_not():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    with pytest.raises(ValueError, match="FSDP.*ddp.yaml"):
        check_strategy(SimpleNamespace(distributed_type=DistributedType.FSDP))
    with pytest.raises(ValueError, match="DeepSpeed.*micro-batches.*ddp.yaml"):
        check_strategy(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED))
    for kind in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        check_strategy(SimpleNamespace(distributed_type=kind))


def test_normalize_scores():
    s = torch.tensor([1.0, 2.0, 6.0])
    assert torch.equal(normalize_scores(s, "none"), s)
    assert torch.allclose(normalize_scores(s, "center"), torch.tensor([-2.0, -1.0, 3.0]))
    assert torch.allclose(normalize_scores(s, "whiten"), torch.tensor([-2.0, -1.0, 3.0]) / s.std())
    pairs = torch.tensor([1.0, 3.0, 2.0, 6.0])          # two prompts, two responses each: means 2 and 4
    assert torch.allclose(normalize_scores(pairs, "prompt", 2), torch.tensor([-1.0, 1.0, -2.0, 2.0]))


def test_responses_per_prompt_groups_rows_and_is_checked(tiny_cfg):
    prompts = [f"p{i}" for i in range(10)]
    cfg = dataclasses.replace(tiny_cfg, responses_per_prompt=2, score_norm="prompt")
    rows = step_prompts(3, prompts, cfg)
    assert len(rows) == 4 and rows[0] == rows[1] and rows[2] == rows[3] and rows[0] != rows[2]
    with pytest.raises(ValueError, match="multiples of it"):
        dataclasses.replace(tiny_cfg, responses_per_prompt=3)
    with pytest.raises(ValueError, match="responses_per_prompt >= 2"):
        dataclasses.replace(tiny_cfg, score_norm="prompt")


def test_reward_gain_is_paired_by_prompt():
    before = {"samples": 2, "rewards": [1.0, 2.0, 3.0, 4.0]}          # prompt means 1.5, 3.5
    after = {"samples": 2, "rewards": [2.0, 2.0, 5.0, 5.0]}           # prompt means 2.0, 5.0
    gain, se = reward_gain(before, after)                              # differences 0.5, 1.5
    assert gain == pytest.approx(1.0) and se == pytest.approx(0.5)
    with pytest.raises(ValueError, match="different prompt sets"):
        reward_gain(before, {"samples": 1, "rewards": [1.0]})
    from starling_lib.policy import paired_difference
    shorter = {"samples": 2, "lengths": [10.0, 12.0, 8.0, 8.0]}      # prompt means 11, 8
    longer = {"samples": 2, "lengths": [12.0, 12.0, 9.0, 11.0]}      # prompt means 12, 10: differences 1, 2
    assert paired_difference(shorter, longer, "lengths") == pytest.approx((1.5, 0.5))


def test_frontier_and_history_tables():
    cfg = PolicyTrainConfig(method="p3o", reward_model="x")
    res = PolicyTrainResult(policy=None, tokenizer=None, config=cfg, wall_s=1.0, eval_s=0.5, steps_run=2,
                            history=[{"step": 1, "policy/p3o/reward_mean": 1.0, "policy/p3o/kl": 0.0},
                                     {"step": 2, "policy/p3o/reward_mean": 2.0, "policy/p3o/kl": 0.5}],
                            evals=[{"step": s, "policy/p3o/eval_reward_mean": r, "policy/p3o/eval_reward_se": 0.1,
                                    "policy/p3o/eval_kl": k, "policy/p3o/eval_response_length": 3.0}
                                   for s, r, k in [(0, 5.0, 0.0), (2, 5.5, 1.2)]])
    frontier = frontier_frame({"pairwise": res})
    assert frontier[["method", "step", "reward", "kl"]].values.tolist() == [["pairwise", 0, 5.0, 0.0], ["pairwise", 2, 5.5, 1.2]]
    history = history_frame({"pairwise": res})
    assert history.columns.tolist() == ["method", "step", "reward_mean", "kl"] and history["reward_mean"].tolist() == [1.0, 2.0]


def test_evaluation_is_repeatable_and_leaves_the_callers_rng_alone(tiny_cfg):
    model, tok = load_model_and_tokenizer(str(tiny_model_path()), device="cpu")
    policy = SharedTrunkPolicy(model, 2, value_head=False)
    rm = load_reward_model(tiny_cfg.reward_model, device="cpu")
    _, prompts = load_prompts(tiny_cfg, tok)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = evaluate_policy(policy, tok, rm, prompts[:2], samples=2, max_new_tokens=6, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = evaluate_policy(policy, tok, rm, prompts[:2], samples=2, max_new_tokens=6, seed=5)
    c = evaluate_policy(policy, tok, rm, prompts[:2], samples=2, max_new_tokens=6, seed=6)
    assert a["rewards"] == b["rewards"] and a["rewards"] != c["rewards"] and a["num_responses"] == 4
    assert a["kl"] == pytest.approx(0.0, abs=1e-5) and [e["prompt"] for e in a["examples"]][::2] == [p[-1]["content"] for p in prompts[:2]]
    # per response, for paired comparisons of length and stopping: their means are the reported ones
    assert len(a["lengths"]) == len(a["stops"]) == 4 and set(a["stops"]) <= {0.0, 1.0}
    assert (sum(a["lengths"]) / 4, sum(a["stops"]) / 4) == pytest.approx((a["response_length"], a["stop_frac"]))
    assert all(1 <= n <= 6 for n in a["lengths"])


def test_evaluation_shared_out_among_processes_is_the_one_process_evaluation(tiny_cfg):
    """Three processes take every third batch of 2 rows; gathered, they give one process's result
    exactly (each batch draws its own random numbers, wherever it runs)."""
    model, tok = load_model_and_tokenizer(str(tiny_model_path()), device="cpu")
    policy = SharedTrunkPolicy(model, 2, value_head=False)
    rm = load_reward_model(tiny_cfg.reward_model, device="cpu")
    _, prompts = load_prompts(dataclasses.replace(tiny_cfg, eval_prompts=4), tok)
    assert len(prompts) == 4
    settings = dict(samples=2, max_new_tokens=6, seed=5, batch_size=2)
    one = evaluate_policy(policy, tok, rm, prompts[:4], **settings)              # 8 rows: batches 0-3
    shards = {}

    class Gathered(Exception):
        pass

    def record(objs, rank):   # ranks 1 and 2 hand their part over and stop there
        shards[rank] = objs[0]
        raise Gathered
    for rank in (1, 2):
        with pytest.raises(Gathered):
            evaluate_policy(policy, tok, rm, prompts[:4], **settings, shard=(rank, 3), gather=lambda o, r=rank: record(o, r))

    def gather0(objs):       # rank 0 gets every part back
        shards[0] = objs[0]
        return [objs[0], shards[1], shards[2]]
    mine = evaluate_policy(policy, tok, rm, prompts[:4], **settings, shard=(0, 3), gather=gather0)
    assert sorted(shards[0]) == [0, 3] and sorted(shards[1]) == [1] and sorted(shards[2]) == [2]
    assert mine == one


def test_configs_load_and_validate(tmp_path):
    tiny = load_config(REPO / "configs/policy/tiny_cpu.yaml")
    starling = load_config(REPO / "configs/policy/starling_apa_7b.yaml")
    assert tiny.method == "apa" and tiny.lam == 0.1 and tiny.device == "cpu"
    assert (starling.policy, starling.method, starling.lam, starling.lr, starling.unfrozen_layers, starling.minibatch_size,
            starling.rollouts_per_step, starling.epochs_per_batch, starling.max_new_tokens) == \
        ("openchat/openchat_3.5", "apa", 0.1, 2e-7, 4, 28, 64, 2, 1024)
    lora = load_config(REPO / "configs/policy/starling_apa_7b_lora.yaml")
    assert (lora.lora_r, lora.unfrozen_layers, lora.cache_trunk) == (16, -1, False)
    assert {k: v for k, v in dataclasses.asdict(lora).items() if getattr(starling, k) != v} == {
        "lora_r": 16, "lora_alpha": 32, "unfrozen_layers": -1, "cache_trunk": False, "lr": 1e-5,
        "output_dir": "policy_runs/starling_apa_7b_lora"}    # otherwise Starling's recipe
    assert load_config(None, ["lr=1e-5", "method=ppo", "steps=3"]).lr == 1e-5
    assert load_config(None, ["mixed_precision=no"]).mixed_precision == "no"    # not YAML's False
    with pytest.raises(ValueError, match="did you mean 'lam'"):
        load_config(None, ["lamb=0.1"])
    with pytest.raises(ValueError, match="method must be one of"):
        PolicyTrainConfig(method="grpo")
    with pytest.raises(ValueError, match="must be even"):
        PolicyTrainConfig(method="p3o", micro_batch_size=3, minibatch_size=6, rollouts_per_step=6)


def test_method_lr_gives_single_methods_their_own_learning_rate():
    from starling_lib.policy import method_config, parse_method_lr
    assert parse_method_lr("") == {} and parse_method_lr(" ppo:1e-3 , p3o : 2e-4,") == {"ppo": 1e-3, "p3o": 2e-4}
    base = PolicyTrainConfig(lr=3e-4)
    assert method_config(base, "ppo", "ppo:1e-3", output_dir="x").lr == 1e-3
    apa = method_config(base, "apa", "ppo:1e-3")
    assert (apa.method, apa.lr) == ("apa", 3e-4)
    for spec, message in (("grpo:1e-3", "'grpo:1e-3' is not method:rate"), ("ppo", "'ppo' is not method:rate"),
                          ("ppo=1e-3", "'ppo=1e-3' is not method:rate"), ("ppo:1e-3,ppo:2e-3", "ppo is given twice"),
                          ("ppo:fast", "positive number, got 'fast'"), ("ppo:0", "positive number, got '0'")):
        with pytest.raises(ValueError, match=message):
            parse_method_lr(spec)


def test_command_line_writes_history(tiny_cfg, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main([str(REPO / "configs/policy/tiny_cpu.yaml"), "--set", f"policy={tiny_cfg.policy}",
                 "--set", f"reward_model={tiny_cfg.reward_model}", "--set", "steps=1", "--set", "max_new_tokens=4",
                 "--set", "eval_every=0", "--set", "checkpoint_every=0", "--set", f"output_dir={out}",
                 "--set", "progress=false"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "apa" and summary["steps"] == 1
    assert len(json.loads((out / "history.json").read_text())["history"]) == 1 and (out / "policy" / "config.json").exists()


def test_an_existing_reward_model_is_used_not_retrained(rm_dir, tmp_path):
    import shutil
    target = tmp_path / "03_kwise_reward_training" / "reward_model"
    shutil.copytree(rm_dir, target)
    assert load_or_train_reward_model(tmp_path) == (target, False)


# ---------------------------------------------------------------------------------------------
# training that learns: each online method raises a simple, learnable reward


class LetterReward:
    """A known reward: 1 if the response contains the letter "e", else 0.

    Learnable by a short warm-up of the tiny model (its next-token distribution is peaked on
    common Nectar tokens, some with an "e" and some without) within a few dozen updates, with
    responses of two tokens: a bandit, so the test measures the methods, not credit assignment.
    """

    def score(self, prompts, responses, batch_size: int = 0, progress: bool = False) -> torch.Tensor:
        return torch.tensor([float("e" in r) for r in responses])


@pytest.fixture(scope="module")
def warm_policy():
    """The tiny model after 60 steps of the SFT warm-up (cached in $STARLING_CACHE, about 20 s to build)."""
    from starling_lib.sft import SFTConfig, sft_policy_path
    return str(sft_policy_path(cfg=SFTConfig(steps=60), progress=False))


@pytest.mark.parametrize("method,group", [("apa", 1), ("ppo", 1), ("p3o", 1), ("apa", 4)])
def test_each_online_method_raises_a_learnable_reward(tiny_cfg, warm_policy, method, group):
    # 32 rollouts a step in minibatches of 16 (the APA authors sample 64-128 a step, minibatches of 8-16)
    # and 32 samples on each of 32 held-out prompts. With 16 rollouts and 16 x 16 samples, APA's seed 0
    # passed on one machine and failed on another (gain 0.11 +- 0.06 on an AMD EPYC); with 8 and 8 every
    # method failed on some seed. Measured here, gains at seeds 0/1/2: APA +0.15/+0.16/+0.12,
    # PPO +0.19/+0.12/+0.13, P3O +0.14/+0.17/+0.12, s.e. 0.02-0.05.
    cfg = dataclasses.replace(tiny_cfg, policy=warm_policy, method=method, reward_model="", steps=16, rollouts_per_step=32,
                              minibatch_size=16, micro_batch_size=4, max_new_tokens=2, lr=3e-3, beta=0.0,
                              eval_every=16, eval_prompts=32, eval_samples=32, responses_per_prompt=group,
                              score_norm="prompt" if group > 1 else "center")   # group 4: 8 prompts x 4, each its baseline
    result = train_policy(cfg, reward_model=LetterReward())
    before, after = result.eval_details[0], result.eval_details[-1]
    assert (before["step"], after["step"]) == (0, 16)
    gain, se = reward_gain(before, after)   # paired by prompt: same prompts, same random numbers
    # an untrained policy gains exactly 0
    assert gain > 0.1 and gain > 2.5 * se, (method, before["reward_mean"], after["reward_mean"], gain, se)


def test_apa_pulls_towards_the_initial_policy_not_the_rollout_policy():
    """APA's minibatch loss is stationary exactly at log pi = log pi_init + A / lam (ref_logprobs,
    not the rollout policy's old_logprobs), and the better response's tokens get A > 0."""
    from starling_lib.policy.methods import apa_minibatch_loss, apa_targets
    cfg = PolicyTrainConfig(method="apa", lam=0.1)
    mask = torch.tensor([[True, True], [True, False]])
    ref, old = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]]), torch.tensor([[-3.0, -0.2], [-1.5, 0.0]])
    b = {"mask": mask, "old_logprobs": old, "ref_logprobs": ref, "kl": (old - ref) * mask,
         "scores": torch.tensor([0.5, -0.5]), "values": torch.tensor([[0.1, -0.2], [0.3, 0.0]]) * mask}
    b.update(apa_targets(cfg, b)[0])
    assert b["advantages"][0, 1] > 0 > b["advantages"][1, 0]
    values = b["values"].clone().requires_grad_(True)
    for anchor, stationary in ((ref, True), (old, False)):
        lp = (anchor + b["advantages"] / cfg.lam).requires_grad_(True)
        (g,) = torch.autograd.grad(apa_minibatch_loss(cfg, {"logprobs": lp, "values": values}, b)[0], lp)
        assert (g[mask].abs().max() < 1e-6) == stationary and g[~mask].abs().max() == 0


def test_the_cached_trunk_trains_as_the_full_forward_does(tiny_cfg):
    cached = train_policy(dataclasses.replace(tiny_cfg, method="ppo", eval_every=0))
    full = train_policy(dataclasses.replace(tiny_cfg, method="ppo", eval_every=0, cache_trunk=False))
    for key in ("policy/ppo/policy_loss", "policy/ppo/value_loss", "policy/ppo/kl", "policy/ppo/reward_mean"):
        assert [h[key] for h in cached.history] == pytest.approx([h[key] for h in full.history], rel=1e-4, abs=1e-6), key
    # The cached run starts from the trunk output the sampler kept while generating, equal to the
    # full forward's to float rounding (test_rollout); Adam's first steps divide each gradient by its
    # own size, which turns rounding in near-zero gradients into differences of a fraction of the
    # learning rate: the weights agree to 1% of how far training moved them.
    a, b, init = cached.policy.model.state_dict(), full.policy.model.state_dict(), _initial_state()
    moved = max((b[k] - init[k]).abs().max().item() for k in b)
    assert moved > 1e-3
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 0.01 * moved
