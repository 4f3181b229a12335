"""Notebook 06 executed end to end through the pipeline runner on the tiny model, with a reward
model from "notebook 03" in the run folder, and once without one (the section is skipped)."""

import json

import nbformat
import pytest
import torch
from readings_check import reading_lines, underived_numbers

from starling_lib.laser import LASER_STAGE
from starling_lib.models import load_model_and_tokenizer
from starling_lib.pipeline import REPO_ROOT, run_config

pytestmark = pytest.mark.slow

SMALL = {"search_tokens": 512, "heldout_tokens": 512, "document_tokens": 128, "window": 128, "top_layers": 2,
         "reward_prompts": 2, "max_new_tokens": 8}


def run(out, **overrides):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")   # the tiny model's small ops: one thread is faster on a shared 2-core machine
        return run_config(REPO_ROOT / "papermill_runs" / "tiny_cpu.yaml", out_dir=out, only=["06"], progress_bar=False,
                          overrides={**SMALL, **overrides})


@pytest.fixture(scope="module")
def with_rm(tmp_path_factory):
    from starling_lib.reward_model import build_reward_model
    from starling_lib.rm_io import reward_model_dir, save_reward_model

    out = tmp_path_factory.mktemp("laser") / "run"
    rm, _ = build_reward_model("tiny", max_length=128)
    save_reward_model(rm, reward_model_dir(out))   # what notebook 03 leaves behind
    return run(out)


def test_metrics_figures_and_the_reward_model(with_rm):
    stage = with_rm / LASER_STAGE
    m = json.loads((stage / "metrics.json").read_text())
    assert m["laser/layers"] == [3, 2] and m["laser/candidates"] == 12 and m["params/top_layers"] == 2
    assert 0 <= m["laser/accepted"] <= m["laser/attempts"] <= 12
    for split in ("search", "heldout"):
        assert m[f"laser/{split}/ppl_initial"] > 1 and m[f"laser/{split}/ppl_final_se"] > 0
        assert m[f"laser/{split}/tokens"] <= 512
    assert m["laser/search/ppl_final"] <= m["laser/search/ppl_initial"]   # only improvements are kept
    assert m["laser/reward/prompts"] == 2 and "laser/reward/diff_se" in m
    assert len(m["laser/attempts_table"]) == 12 and all(k.startswith(("laser/", "params/", "run/")) for k in m)
    figures = sorted(p.name for p in (stage / "figures").glob("*.png"))
    assert figures == ["marchenko_pastur.png", "search.png", "search_vs_heldout.png"]
    executed = nbformat.read(with_rm / f"{LASER_STAGE}.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert "1. Spectra" in text and "6. Time" in text and "mean reward" in text
    lines = reading_lines(with_rm / f"{LASER_STAGE}.ipynb")
    assert len(lines) == 7 and underived_numbers(lines, m) == []   # every printed reading is this run's


def test_the_saved_model_loads_by_path(with_rm):
    m = json.loads((with_rm / LASER_STAGE / "metrics.json").read_text())
    model, _ = load_model_and_tokenizer(m["laser/model_dir"], device="cpu")
    info = json.loads((with_rm / LASER_STAGE / "model" / "laser.json").read_text())
    assert info["source"] == "tiny" and len(info["attempts"]) == 12
    logits = model(input_ids=torch.tensor([[1, 5, 9]])).logits
    assert logits.shape[:2] == (1, 3) and torch.isfinite(logits).all()


def test_without_a_reward_model_the_section_is_skipped(tmp_path):
    out = run(tmp_path / "run", top_layers=1, matrices="self_attn.o_proj")
    m = json.loads((out / LASER_STAGE / "metrics.json").read_text())
    assert not any(k.startswith("laser/reward/") for k in m) and m["laser/candidates"] == 1
    assert not (out / "03_kwise_reward_training").exists()   # looking for it creates nothing
    executed = nbformat.read(out / f"{LASER_STAGE}.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert "No reward model" in text
