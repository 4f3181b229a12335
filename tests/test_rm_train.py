"""starling_lib.rm_train: the batch schedule, micro-batches, configs, training that learns, resume, two
processes, TRL baseline."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from starling_lib.data import load_nectar, to_kwise
from starling_lib.losses import pairwise_split_loss
from starling_lib.reward_model import build_reward_model
from starling_lib.rm_eval import evaluate_rankings
from starling_lib.rm_io import load_reward_model
from starling_lib.rm_layout import chat_texts, encode_chats
from starling_lib.rm_train import (
    RMTrainConfig,
    collate_rankings,
    load_config,
    load_rankings,
    pairs_dataset,
    sub_ranking,
    train_pairwise_baseline,
    train_reward_model,
)
from starling_lib.training import batch_indices

REPO = Path(__file__).resolve().parent.parent

# Small enough for seconds on 2 CPU cores: 40 prompts, 4 answers of <= 64 tokens, 4 steps of 4
# prompts in micro-batches of 2 (so one process accumulates 2 micro-batches per step).
TINY = dict(max_prompts=40, max_length=64, k=4, steps=4, batch_size=4, micro_batch_size=2, lr=1e-3,
            device="cpu", progress=False, seed=0)
PROBE = ([[{"role": "user", "content": "Name a fruit."}]] * 3, ["Apple.", "A banana, which is yellow.", "No."])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted 4-step run in one process; the reference for resume and two processes."""
    out = tmp_path_factory.mktemp("straight")
    return train_reward_model(RMTrainConfig(**TINY, eval_every=2, eval_prompts=3, output_dir=str(out)))


@pytest.fixture(scope="module")
def rows():
    return to_kwise(load_nectar(limit=6))


@pytest.fixture(scope="module")
def tokenizer():
    return build_reward_model("tiny", max_length=96)[1]


# ---------------------------------------------------------------------------------------------
# data


def test_batch_schedule_visits_every_row_once_per_epoch_and_is_a_pure_function():
    n, bs = 10, 4
    first_epoch = [i for step in range(2) for i in batch_indices(step, bs, n, seed=0)] + batch_indices(2, bs, n, 0)[:2]
    assert sorted(first_epoch) == list(range(10))
    assert batch_indices(7, bs, n, seed=0) == batch_indices(7, bs, n, seed=0)
    assert batch_indices(0, bs, n, seed=0) != batch_indices(0, bs, n, seed=1)
    # a global batch of 4 is the concatenation of two processes' shares of 2
    assert batch_indices(3, 4, n, 0)[:2] + batch_indices(3, 4, n, 0)[2:] == batch_indices(3, 4, n, 0)


def test_sub_ranking_keeps_the_ranked_order():
    answers = ["a1", "a2", "a3", "a4", "a5", "a6", "a7"]
    sub = sub_ranking(answers, 3, seed=0, step=5, position=1)
    assert len(sub) == 3 and sub == sorted(sub, key=answers.index)
    assert sub == sub_ranking(answers, 3, seed=0, step=5, position=1)
    assert sub_ranking(answers[:2], 3, seed=0, step=0, position=0) == ["a1", "a2"]


def test_collate_encodes_each_answer_once_and_maps_rewards_back_per_prompt(rows, tokenizer):
    r0 = dict(rows[0])
    r1 = dict(rows[1], answers=rows[1]["answers"][:3])            # a prompt with only 3 answers
    mb = collate_rankings([r0, r1], tokenizer, k=7, max_length=96, seed=0, step=0, positions=[0, 1])
    assert mb["input_ids"].shape[0] == 7 + 3                      # 10 sequences, not 21 + 3 pairs
    assert mb["mask"].tolist() == [[True] * 7, [True] * 3 + [False] * 4]
    flat = torch.arange(10.0)
    per_prompt = flat.new_zeros(mb["mask"].shape).masked_scatter(mb["mask"], flat)
    assert per_prompt[0].tolist() == [0, 1, 2, 3, 4, 5, 6] and per_prompt[1, :3].tolist() == [7, 8, 9]
    ends = mb["input_ids"][torch.arange(10), mb["attention_mask"].sum(-1) - 1]
    assert (ends == tokenizer.convert_tokens_to_ids("<|end_of_turn|>")).all()


def test_pairs_dataset_holds_all_pairs_as_our_model_reads_them(rows, tokenizer):
    pairs = pairs_dataset([rows[0]], tokenizer, k=7, max_length=96, seed=0)
    texts = [chat_texts(tokenizer, rows[0]["messages"], a) for a in rows[0]["answers"]]
    seqs = encode_chats(tokenizer, [t[0] for t in texts], [t[1] for t in texts], max_length=96)
    assert len(pairs) == 21
    # pairs in order (1,2), (1,3), ..., (1,7), (2,3), ...: the best answer is chosen six times
    assert [p["chosen_ids"] for p in pairs.select(range(6))] == [seqs[0]] * 6
    assert [p["rejected_ids"] for p in pairs.select(range(6))] == seqs[1:]
    assert pairs[20]["chosen_ids"] == seqs[5] and pairs[20]["rejected_ids"] == seqs[6]


# ---------------------------------------------------------------------------------------------
# configs


def test_config_validation_and_yaml_coercion(tmp_path):
    with pytest.raises(ValueError, match="loss must be"):
        RMTrainConfig(loss="listwise")
    with pytest.raises(ValueError, match="not a multiple"):
        RMTrainConfig(batch_size=4, micro_batch_size=3)
    with pytest.raises(ValueError, match="needs an output_dir"):
        RMTrainConfig(checkpoint_every=5)
    # values out of range name the field, the value and the rule (steps=0 would save an untrained model)
    for bad, message in [({"steps": 0}, "steps must be at least 1; got 0"), ({"lr": -1e-4}, "lr must be greater than 0"),
                         ({"lr": float("nan")}, "lr must be greater than 0; got nan"),
                         ({"test_fraction": 1.5}, "test_fraction must lie strictly between 0 and 1"),
                         ({"eval_every": -1}, "eval_every must be at least 0"), ({"max_prompts": -5}, "max_prompts")]:
        with pytest.raises(ValueError, match=message):
            RMTrainConfig(**bad)
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-5\nsteps: 3\nbackbone: tiny\n")      # PyYAML reads 1e-5 as a string
    cfg = load_config(path, ["k=4", "resume=false"])
    assert cfg.lr == 1e-5 and cfg.steps == 3 and cfg.k == 4 and cfg.resume is False
    with pytest.raises(ValueError, match="did you mean 'steps'"):
        load_config(path, ["step=3"])
    with pytest.raises(TypeError, match="must be int"):
        load_config(path, ["steps=many"])


def test_shipped_configs_load():
    for name in ("tiny_cpu", "starling_7b"):
        cfg = load_config(REPO / "configs" / "rm" / f"{name}.yaml")
        assert cfg.loss == "kwise" and cfg.k == 7
    full = load_config(REPO / "configs" / "rm" / "starling_7b.yaml")
    assert (full.backbone, full.lr, full.max_length, full.unfrozen_layers) == ("meta-llama/Llama-2-7b-chat-hf", 1e-5, 2000, -1)
    assert full.batch_size % full.micro_batch_size == 0 and full.lr_schedule == "constant"


# ---------------------------------------------------------------------------------------------
# training, resume


def test_training_logs_evaluates_and_saves(straight):
    assert [h["step"] for h in straight.history] == [1, 2, 3, 4]
    assert {"rm/loss", "rm/train_pair_accuracy", "rm/lr", "rm/tokens"} <= set(straight.history[0])
    assert "rm/heldout_pair_accuracy" in straight.history[1] and "rm/heldout_pair_accuracy" not in straight.history[0]
    assert straight.sequences == 4 * 4 * 4 and straight.steps_run == 4
    assert straight.extra["grad_accum_steps"] == 2
    loaded = load_reward_model(straight.model_dir, device="cpu")
    assert torch.allclose(loaded.score(*PROBE), straight.model.score(*PROBE), atol=1e-6)
    assert json.loads((straight.model_dir / "reward_model.json").read_text())["steps_done"] == 4
    untrained = build_reward_model("tiny")[0].backbone.state_dict()
    assert not torch.equal(straight.model.backbone.state_dict()["norm.weight"], untrained["norm.weight"])


def keyword_rankings(path: Path, prompts: int = 64, k: int = 4, seed: int = 0) -> Path:
    """Nectar-format rankings with a known reward: an answer's reward is how often it says "great".

    Each answer is 8 words; the rank-r answer (1 = best) holds k - r "great"s among filler words,
    so every answer has the same length and only the keyword orders them. Written as .jsonl.
    """
    filler = "the a of and to in is it that was for on with as be at by this from or".split()
    rng = np.random.default_rng(seed)
    records = []
    for i in range(prompts):
        answers = []
        for rank in range(1, k + 1):
            words = list(rng.choice(filler, 8 - (k - rank))) + ["great"] * (k - rank)
            rng.shuffle(words)
            answers.append({"answer": " ".join(words), "model": "synthetic", "rank": float(rank)})
        records.append({"prompt": f"\n\nHuman: Tell me something, question {i}.\n\nAssistant: ",
                        "answers": [answers[j] for j in rng.permutation(k)],   # not stored best first
                        "turns": 1, "num_responses": k, "source": ["synthetic"], "good_natured": True})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_training_learns_a_known_reward(tmp_path):
    """On rankings ordered by a keyword count, the trained model orders held-out answers almost
    perfectly, where the untrained one (the same initialisation) is near chance."""
    cfg = RMTrainConfig(nectar_source=str(keyword_rankings(tmp_path / "keyword.jsonl")), test_fraction=0.25, k=4,
                        steps=30, batch_size=4, micro_batch_size=4, lr=1e-3, max_length=48, eval_every=30,
                        device="cpu", progress=False, seed=0)
    heldout = load_rankings(cfg)["test"]
    assert len(heldout) >= 10                                     # >= 60 held-out pairs
    untrained = build_reward_model("tiny", max_length=cfg.max_length, seed=cfg.seed)[0]
    before = evaluate_rankings(untrained, heldout)["pair_accuracy"]
    result = train_reward_model(cfg)
    after = evaluate_rankings(result.model, heldout)["pair_accuracy"]
    assert before < 0.7, before                                   # nothing learnt yet: about chance
    assert after > 0.9 and after > before + 0.25, (before, after)
    assert result.history[-1]["rm/heldout_pair_accuracy"] == pytest.approx(after)   # the trainer's own evaluation


def test_packed_and_padded_layouts_train_alike(straight):
    """Packing (the default) changes the layout only: losses agree with the padded run to rounding."""
    assert straight.config.packing
    padded = train_reward_model(RMTrainConfig(**TINY, packing=False))
    assert [h["rm/loss"] for h in padded.history] == pytest.approx([h["rm/loss"] for h in straight.history], rel=1e-4)
    assert padded.tokens == straight.tokens          # real tokens counted alike, whatever the layout
    with pytest.raises(ValueError, match="pack_length"):
        RMTrainConfig(max_length=64, pack_length=32)


@pytest.mark.slow
def test_the_compiled_training_step_trains_as_the_eager_one(straight, tmp_path):
    """compile_model runs the same step through torch.compile: the same losses and held-out
    accuracy to rounding, and the returned model is the plain eager one under the same names.
    Slow: 32 s on 2 CPU cores with a cold inductor cache (10 s warm)."""
    compiled = train_reward_model(RMTrainConfig(**TINY, eval_every=2, eval_prompts=3, output_dir=str(tmp_path),
                                                compile_model=True))
    assert [h["rm/loss"] for h in compiled.history] == pytest.approx([h["rm/loss"] for h in straight.history], rel=1e-4)
    assert [h.get("rm/heldout_pair_accuracy") for h in compiled.history] == \
        [h.get("rm/heldout_pair_accuracy") for h in straight.history]
    assert compiled.tokens == straight.tokens
    assert list(compiled.model.state_dict()) == list(straight.model.state_dict())   # no "_orig_mod." prefixes
    assert not hasattr(compiled.model, "_orig_mod")
    rewards = compiled.model.score(*PROBE)
    torch.testing.assert_close(rewards, straight.model.score(*PROBE), rtol=0, atol=1e-3)
    torch.testing.assert_close(load_reward_model(tmp_path / "reward_model", device="cpu").score(*PROBE), rewards)


def test_resume_after_an_interruption_gives_the_same_weights(straight, tmp_path):
    cfg = RMTrainConfig(**TINY, eval_every=2, eval_prompts=3, output_dir=str(tmp_path), checkpoint_every=2)
    first = train_reward_model(cfg, stop_after=2)                 # "interrupted" after step 2
    assert first.model_dir is None and first.steps_run == 2
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000002"]
    resumed = train_reward_model(cfg)
    assert resumed.steps_run == 2 and resumed.history == [
        {**h, "rm/elapsed_s": r["rm/elapsed_s"]} for h, r in zip(straight.history, resumed.history)]
    a = load_file(str(straight.model_dir / "model.safetensors"))
    b = load_file(str(resumed.model_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    cfg = RMTrainConfig(**{**TINY, "steps": 2}, output_dir=str(tmp_path), checkpoint_every=1)
    train_reward_model(cfg, stop_after=1)
    with pytest.raises(ValueError, match="different config.*lr: checkpoint 0.001 vs now 0.002"):
        train_reward_model(dataclasses.replace(cfg, lr=2e-3))


# ---------------------------------------------------------------------------------------------
# two processes (DDP over gloo, launched by accelerate) vs one process at the same global batch


def test_two_processes_match_one_process_at_the_same_global_batch(straight, tmp_path):
    """gloo sums the two halves' gradients in another order than one process accumulates them, so
    the runs agree to float32 rounding, not bit for bit; AdamW divides by sqrt(v), which can turn
    such a rounding difference on a near-zero gradient into a visible step for a few weights.
    So: per-step losses to 1e-4, rewards to 1e-3, and all but a handful of weights to 1e-5."""
    settings = {**TINY, "eval_every": 2, "eval_prompts": 3, "output_dir": str(tmp_path / "two"), "checkpoint_every": 0}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(REPO / "configs/accelerate/ddp.yaml"),
           "--num_processes", "2", "--mixed_precision", "no", "-m", "starling_lib.rm_train",
           str(REPO / "configs/rm/tiny_cpu.yaml")]
    cmd += [arg for k, v in settings.items() for arg in ("--set", f"{k}={v}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["num_processes"] == 2 and summary["grad_accum_steps"] == 1

    two_history = json.loads((tmp_path / "two" / "history.json").read_text())["history"]
    assert [h["rm/loss"] for h in two_history] == pytest.approx([h["rm/loss"] for h in straight.history], rel=1e-4)
    assert two_history[1]["rm/heldout_pair_accuracy"] == pytest.approx(straight.history[1]["rm/heldout_pair_accuracy"])
    a = load_file(str(straight.model_dir / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "reward_model" / "model.safetensors"))
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (diff > 1e-5).sum() <= 100 and diff.mean() < 1e-6, (diff.max(), (diff > 1e-5).sum())
    two_model = load_reward_model(tmp_path / "two" / "reward_model", device="cpu")
    assert torch.allclose(two_model.score(*PROBE), straight.model.score(*PROBE), atol=1e-3)


# ---------------------------------------------------------------------------------------------
# the TRL baseline


def test_trl_baseline_trains_on_all_pairs_and_is_scored_by_the_same_code(tmp_path):
    cfg = RMTrainConfig(**{**TINY, "steps": 1, "max_length": 64, "batch_size": 1, "micro_batch_size": 1,
                           "train_prompts": 3, "k": 4})
    result = train_pairwise_baseline(cfg, tmp_path / "trl")
    assert result.extra["num_pairs"] == 3 * 6                      # k=4 -> 6 pairs per prompt
    assert result.extra["pairs_per_step"] == 6                     # one ranking's pairs per step
    assert result.sequences == 12 and len(result.history) == 1
    probe = ([[{"role": "user", "content": "Hi"}]] * 2, ["Hello!", "Go away."])
    rewards = result.model.score(*probe)
    assert rewards.shape == (2,) and torch.isfinite(rewards).all()
    # The TRL model is a sequence classifier read at the last non-pad token, like ours.
    assert type(result.model.backbone).__name__ == "MistralModel"


def test_pairwise_loss_of_all_pairs_is_trl_s_mean_bradley_terry():
    """What TRL optimises on a batch of all pairs of one ranking is our pairwise-split loss."""
    r = torch.tensor([[0.3, -1.2, 2.0, 0.1]])
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    trl_loss = -torch.nn.functional.logsigmoid(torch.stack([r[0, i] - r[0, j] for i, j in pairs])).mean()
    assert pairwise_split_loss(r).item() == pytest.approx(trl_loss.item(), rel=1e-6)


def test_the_cached_trunk_trains_and_evaluates_as_the_full_forward_does():
    settings = dict(TINY, unfrozen_layers=1, packing=False, steps=12, eval_every=6, eval_prompts=4)
    # 12 steps of 4 over ~36 training prompts: the third epoch reads every sequence from the cache
    full = train_reward_model(RMTrainConfig(**settings))
    cached = train_reward_model(RMTrainConfig(**settings, cache_trunk=True))
    assert [h["rm/loss"] for h in cached.history] == pytest.approx([h["rm/loss"] for h in full.history], rel=1e-4)
    assert [h.get("rm/heldout_pair_accuracy") for h in cached.history] == \
        [h.get("rm/heldout_pair_accuracy") for h in full.history]
    a, b = full.model.state_dict(), cached.model.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert torch.allclose(cached.model.score(*PROBE), full.model.score(*PROBE), atol=1e-5)
    # every distinct training and held-out sequence ran through the trunk once, and most steps reused them
    assert 0 < cached.extra["trunk_cache_sequences"] < cached.sequences and full.extra["trunk_cache_sequences"] == 0
    with pytest.raises(ValueError, match="needs a frozen trunk"):
        RMTrainConfig(cache_trunk=True)                      # unfrozen_layers -1 trains the whole body


def test_one_trunk_cache_serves_a_second_loss_and_trl_s_baseline_and_refuses_another_trunk(tmp_path):
    settings = dict(TINY, unfrozen_layers=1, packing=False, steps=6, eval_every=6, eval_prompts=4, cache_trunk=True)
    first = train_reward_model(RMTrainConfig(**settings))
    filled = len(first.trunk_cache)
    # the same data with the other loss: every sequence is already cached, so no trunk runs at all
    other = train_reward_model(RMTrainConfig(**dict(settings, loss="pairwise")), trunk_cache=first.trunk_cache)
    alone = train_reward_model(RMTrainConfig(**dict(settings, loss="pairwise")))
    assert other.trunk_cache is first.trunk_cache and len(first.trunk_cache) == filled
    assert other.extra["trunk_cache_sequences"] == 0
    assert [h["rm/loss"] for h in other.history] == pytest.approx([h["rm/loss"] for h in alone.history], rel=1e-4)
    # scoring with the cache gives the full forward's rewards, for the TRL-trained model too
    baseline = train_pairwise_baseline(RMTrainConfig(**dict(settings, steps=1)), tmp_path / "trl")
    for model in (first.model, baseline.model):
        assert torch.allclose(model.score(*PROBE, trunk_cache=first.trunk_cache), model.score(*PROBE), atol=1e-5)
    # a body whose frozen trunk differs (fewer frozen blocks) is refused, not scored wrongly
    deeper = train_reward_model(RMTrainConfig(**dict(settings, unfrozen_layers=2, steps=1, eval_every=0)))
    with pytest.raises(ValueError, match="another trunk"):
        deeper.model.score(*PROBE, trunk_cache=first.trunk_cache)
