"""Notebook 04 executed end to end through papermill with the smallest settings.

Run alone (no notebook 03 in the run folder), so it also trains its fallback reward model; a
private STARLING_CACHE, so the tiny model and the small warm-up are built here and the user's
cache is left alone.
"""

import json

import nbformat
import pytest

from starling_lib.mtbench import resolve_models

pytestmark = pytest.mark.slow

STEM = "04_policy_tuning"
SMALL = {"steps": 2, "rollouts_per_step": 4, "minibatch_size": 2, "micro_batch_size": 2, "max_new_tokens": 8,
         "max_prompt_tokens": 48, "eval_every": 1, "eval_samples": 1, "eval_prompts": 3, "sft_steps": 4,
         "rm_fallback_steps": 2, "checkpoint_every": 1, "device": "cpu"}
METHODS = ["apa", "ppo", "p3o", "dpo"]


def hand_sweep(folder):
    """A finished two-seed sweep of notebook 04 with APA's gain 0.1 and 0.3: mean 0.2."""
    for seed, gain in enumerate([0.1, 0.3]):
        (folder / f"seed_{seed}" / STEM).mkdir(parents=True)
        (folder / f"seed_{seed}" / STEM / "metrics.json").write_text(json.dumps(
            {"policy/apa/eval_reward_gain": gain, "policy/apa/eval_kl_final": 1.0 + gain, "params/seed": seed}))
        (folder / f"seed_{seed}" / "summary.json").write_text(json.dumps(
            {"run": {"status": "ok"}, "notebooks": {STEM: {"status": "ok", "wall_s": 1.0}}}))
    (folder / "sweep.json").write_text(json.dumps({"sweep": {"name": "hand", "status": "ok"},
                                                   "seeds": {"0": {"status": "ok"}, "1": {"status": "ok"}}}))
    return folder


@pytest.fixture(scope="module")
def executed(tmp_path_factory, run_notebook):
    tmp = tmp_path_factory.mktemp("nb04")
    sweep = hand_sweep(tmp / "sweep")
    out, metrics = run_notebook(STEM, tmp, {**SMALL, "sweep_dir": str(sweep)}, env={"STARLING_CACHE": str(tmp / "cache")})
    return tmp, out, metrics


def test_metrics(executed):
    tmp, _, m = executed
    assert all(k.startswith(("policy/", "params/", "run/")) for k in m)
    assert m["policy/reward_model_trained_here"] is True and m["policy/methods"] == ",".join(METHODS)
    assert m["policy/sft/steps"] == 4 and m["params/steps"] == 2 and str(tmp / "cache") in m["policy/initial_policy"]
    for method in METHODS:
        assert m[f"policy/{method}/eval_reward_initial"] == pytest.approx(m["policy/initial/eval_reward_mean"])
        assert m[f"policy/{method}/eval_reward_gain"] == pytest.approx(
            m[f"policy/{method}/eval_reward_final"] - m[f"policy/{method}/eval_reward_initial"], abs=1e-5)
        assert m[f"policy/{method}/eval_kl_final"] >= 0 and m[f"policy/{method}/optimizer_steps"] == 2 * 2 * 2
        assert m[f"policy/{method}/eval_length_change"] == pytest.approx(    # paired by prompt: the same mean
            m[f"policy/{method}/eval_response_length_final"] - m["policy/initial/eval_response_length"], abs=1e-4)
        assert m[f"policy/{method}/eval_stop_frac_change_se"] >= 0
    for method in ["apa", "ppo", "p3o"]:
        assert {f"policy/{method}/{k}" for k in ("reward_mean", "kl", "entropy", "response_length")} <= set(m)
    assert {"policy/ppo/clip_frac", "policy/p3o/clip_frac", "policy/apa/value_loss", "policy/ppo/value_loss"} <= set(m)
    # the frontier: online methods evaluated at steps 0, 1, 2; DPO before and after
    steps = {meth: [p["step"] for p in m["policy/frontier"] if p["method"] == meth] for meth in METHODS}
    assert steps == {"apa": [0, 1, 2], "ppo": [0, 1, 2], "p3o": [0, 1, 2], "dpo": [0, 2]}


def test_figures_policies_and_messages(executed):
    tmp, out, m = executed
    assert sorted(p.name for p in (out / "figures").glob("*.png")) == [
        "across_seeds.png", "dpo_training.png", "reward_kl_frontier.png", "reward_over_steps.png", "sft_warmup.png"]
    specs = resolve_models("", "", str(tmp / "run"))          # what notebook 05 will evaluate
    assert sorted(specs) == sorted(["initial", *METHODS])
    assert (tmp / "run" / "03_kwise_reward_training" / "reward_model" / "reward_model.json").exists()
    for method in ["apa", "ppo", "p3o"]:   # checkpoint_every: each method's own folder, the newest two kept
        saved = sorted(p.name for p in (tmp / "run" / STEM / "training" / method / "checkpoints").iterdir())
        assert saved == ["step-000001", "step-000002"]
    nb = nbformat.read(tmp / f"{STEM}.ipynb", as_version=4)
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    assert not any(o.get("output_type") == "error" for o in outputs)
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "Notebook 03's reward model is missing from this run folder: trained a small one here" in text


def test_readings_carry_intervals_and_the_sweep_across_seeds(executed):
    tmp, _, m = executed
    assert m["policy/apa/eval_kl_final_se"] >= 0 and m["params/sweep_dir"] == str(tmp / "sweep")
    nb = nbformat.read(tmp / f"{STEM}.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "stream")
    readings = text[text.index("Readings:"):]
    assert "1. apa raises the held-out reward:" in readings and "P3O's KL against apa's:" in readings
    assert "2. DPO's gain is indistinguishable from zero:" in readings
    # the hand-made sweep: gains 0.1 and 0.3, mean 0.2, t(0.975, 1) * sd / sqrt(2) = 12.706 * 0.1414 / 1.414 = 1.271
    assert "policy/apa/eval_reward_gain: +0.200 [-1.071, 1.471] over 2 seeds: indistinguishable from zero" in readings
