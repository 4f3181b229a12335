"""Notebook 07 executed end to end through the pipeline runner on the tiny model, with a gold reward
model from "notebook 03" in the run folder (trained by rm_train in a few seconds, so that its
settings are recorded for the proxy to copy)."""

import json

import nbformat
import pytest
from readings_check import reading_lines, underived_numbers

from starling_lib.overoptimisation import OVEROPT_STAGE
from starling_lib.pipeline import REPO_ROOT, run_config

pytestmark = pytest.mark.slow

SMALL = {"proxy_steps": 2, "heldout_prompts": 3, "seeds": 2, "steps": 3, "rollouts_per_step": 4,
         "responses_per_prompt": 2, "minibatch_size": 4, "micro_batch_size": 4, "max_new_tokens": 6,
         "max_prompt_tokens": 64}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from starling_lib.rm_train import RMTrainConfig, train_reward_model
    from starling_lib.runs import RM_STAGE, stage_dir

    out = tmp_path_factory.mktemp("overopt") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")   # the tiny model's small ops: one thread is faster on a shared 2-core machine
        # what notebook 03 leaves behind: rm_train's folder with its settings in reward_model.json
        train_reward_model(RMTrainConfig(backbone="tiny", steps=2, max_length=64, unfrozen_layers=1, cache_trunk=True,
                                         train_prompts=8, output_dir=str(stage_dir(out, RM_STAGE)), progress=False,
                                         report_to="none", device="cpu"))
        return run_config(REPO_ROOT / "papermill_runs" / "tiny_cpu.yaml", out_dir=out, only=["07"], progress_bar=False,
                          overrides=SMALL)


def test_metrics_figures_and_readings(run):
    stage = run / OVEROPT_STAGE
    m = json.loads((stage / "metrics.json").read_text())
    assert m["overopt/methods"] == ["apa", "ppo"] and m["overopt/seeds"] == 2 and m["params/steps"] == 3
    assert m["overopt/proxy/train_prompts"] == 2 and m["overopt/proxy/gold_train_prompts"] == 8
    assert m["overopt/proxy/heldout_prompts"] == 3 and len(m["overopt/curves"]) == 12
    for method in ("apa", "ppo"):
        for rm in ("gold", "proxy"):
            assert m[f"overopt/{method}/{rm}/final_step"] == 2 and 0 <= m[f"overopt/{method}/{rm}/peak_step"] <= 2
        assert m[f"overopt/{method}/gold/final_kl"] > 0
    assert all(k.startswith(("overopt/", "params/", "run/")) for k in m)
    figures = sorted(p.name for p in (stage / "figures").glob("*.png"))
    assert figures == ["kl_and_gap.png", "overoptimisation.png", "responses.png"]
    assert (stage / "proxy" / "reward_model" / "reward_model.json").exists()
    lines = reading_lines(run / f"{OVEROPT_STAGE}.ipynb")
    assert len(lines) == 6 and lines[0].startswith("1. Proxy gain") and lines[-1].startswith("6. Time")
    assert underived_numbers(lines, m) == []   # every printed reading is this run's
    executed = nbformat.read(run / f"{OVEROPT_STAGE}.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert "held-out pair accuracy" in text and "each scored by both models" in text
