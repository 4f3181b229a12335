"""Notebook 03 executed end to end through papermill with very small settings, with a stand-in of
Starling-RM-7B-alpha (tests/released_rm_fakes.py) scored beside it from a local hub cache, offline."""

import json

import nbformat
import pytest
import torch

from hub_caches import put_hf
from released_rm_fakes import files, llama2_base, rm_7b_alpha

from starling_lib.rm_io import load_reward_model, reward_model_dir

pytestmark = pytest.mark.slow

STEM = "03_kwise_reward_training"
SMALL = {"max_prompts": 60, "k": 4, "steps": 4, "batch_size": 2, "micro_batch_size": 2, "max_length": 64,
         "eval_every": 2, "baseline_steps": 2, "benchmark_limit": 6, "theory_trials": 1, "device": "cpu"}


@pytest.fixture(scope="module")
def executed(tmp_path_factory, run_notebook):
    tmp = tmp_path_factory.mktemp("nb03")
    base = llama2_base(tmp / "llama2")
    put_hf(tmp / "hub", "meta-llama/Llama-2-7b-chat-hf", files(base), "model")
    put_hf(tmp / "hub", "berkeley-nest/Starling-RM-7B-alpha", files(rm_7b_alpha(tmp / "rm7", base)), "model")
    out, metrics = run_notebook(STEM, tmp, {**SMALL, "released_reward_model": "berkeley-nest/Starling-RM-7B-alpha"},
                                env={"HF_HUB_CACHE": str(tmp / "hub"), "HF_HUB_OFFLINE": "1"})
    return tmp, out, metrics


def test_metrics(executed):
    _, _, m = executed
    assert all(k.startswith(("rm/", "params/", "run/")) for k in m)
    assert m["rm/steps"] == 4 and m["rm/baseline/steps"] == 2 and m["params/k"] == 4
    for key in ("rm/heldout_pair_accuracy", "rm/baseline/heldout_pair_accuracy"):
        assert 0.0 <= m[key] <= 1.0
    assert -1.0 <= m["rm/heldout_kendall_tau"] <= 1.0
    assert m["rm/heldout_top1_chance"] == pytest.approx(1 / 7)    # held-out prompts are scored on all 7 answers
    assert {f"rm/benchmark/{b}" for b in ("human_preference", "truthfulness", "safety", "verbosity")} <= set(m)
    assert m["rm/released/model"] == "berkeley-nest/Starling-RM-7B-alpha"
    assert all(0.0 <= m[f"rm/released/benchmark/{b}"] <= 1.0
               for b in ("human_preference", "truthfulness", "safety", "verbosity"))
    assert [p["step"] for p in m["rm/heldout_curve"]] == [2, 4]
    assert m["rm/baseline/s_per_step_ratio"] > 0 and m["rm/theory/kwise_error_at_max_n"] > 0


def test_figures_and_the_saved_reward_model(executed):
    tmp, out, m = executed
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figures == ["benchmarks.png", "kwise_vs_pairwise.png", "sequence_lengths.png", "theory_check.png",
                       "training_curves.png"]
    model_dir = reward_model_dir(tmp / "run")
    assert m["rm/model_dir"] == str(model_dir)
    rm = load_reward_model(model_dir, device="cpu")
    assert rm.max_length == 64 and json.loads((model_dir / "reward_model.json").read_text())["backbone"] == "tiny"
    rewards = rm.score(["Name a fruit."] * 2, ["Apple.", "I will not answer that."])
    assert rewards.shape == (2,) and torch.isfinite(rewards).all()
    executed_nb = nbformat.read(tmp / f"{STEM}.ipynb", as_version=4)
    assert not any(o.get("output_type") == "error" for c in executed_nb.cells for o in c.get("outputs", []))
