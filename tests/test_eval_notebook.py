"""Notebook 05 executed end to end through the pipeline runner, with a saved policy from "notebook 04"."""

import json

import nbformat
import pytest

from starling_lib.models import load_model_and_tokenizer
from starling_lib.pipeline import REPO_ROOT, run_config

pytestmark = pytest.mark.slow

STAGE = "05_mt_bench_evaluation"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    # What notebook 04 leaves behind: a from_pretrained folder per policy.
    model, tokenizer = load_model_and_tokenizer("tiny", device="cpu", seed=1)
    policy = out / "04_policy_tuning" / "policies" / "apa"
    model.save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    with pytest.MonkeyPatch.context() as mp:
        # One OpenMP thread: on a 2-core machine shared with other jobs, two threads wait on each other
        # at every one of the tiny model's many small ops and run several times slower.
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")   # as on these machines: no hub, so AlpacaEval's minimal LC GLM
        return run_config(REPO_ROOT / "papermill_runs" / "tiny_cpu.yaml", out_dir=out, only=["05"],
                          progress_bar=False, overrides={"max_new_tokens": 8, "alpaca_instructions": 5,
                                                                      "alpaca_lc_bootstrap": 5})


def test_every_model_gets_an_mt_bench_score(run):
    m = json.loads((run / STAGE / "metrics.json").read_text())
    assert m["eval/models"] == ["tiny", "apa"]  # the listed model, then the saved policy
    for model in ["tiny", "apa"]:
        assert 1 <= m[f"eval/mt_bench/{model}"] <= 10
        assert m[f"eval/mt_bench/{model}/judge_mode"] == "likelihood"
        assert (m[f"eval/mt_bench/{model}/n_valid"], m[f"eval/mt_bench/{model}/n_failed"]) == (16, 0)
        assert set(m["eval/mt_bench_by_category"][model]) == {"writing", "roleplay", "reasoning", "math", "coding",
                                                               "extraction", "stem", "humanities"}
    assert m["eval/mt_bench/tiny"] != m["eval/mt_bench/apa"]  # different weights, different answers
    assert m["eval/mt_bench/num_questions"] == 8 and m["eval/mt_bench/judge"] == "local:tiny:likelihood"
    for model in ["Starling-LM-7B-alpha", "tiny", "apa"]:
        assert 0 <= m[f"eval/alpaca_eval/{model}/win_rate"] <= 100
        assert 0 <= m[f"eval/alpaca_eval/{model}/lc_win_rate"] <= 100
        assert m[f"eval/alpaca_eval/{model}/n_judged"] == 5
        # offline: alpaca_eval's minimal GLM, whose own LC standard error is 0; the bootstrap one is not
        assert m[f"eval/alpaca_eval/{model}/lc_glm"] == "length_controlled_minimal"
        assert m[f"eval/alpaca_eval/{model}/lc_win_rate_se"] == 0
        assert m[f"eval/alpaca_eval/{model}/lc_win_rate_bootstrap_se"] >= 0
    assert m["params/max_new_tokens"] == 8 and all("/" in k for k in m)


def test_mmlu_runs_on_the_bundled_task_through_lm_eval(run):
    m = json.loads((run / STAGE / "metrics.json").read_text())
    assert (m["eval/mmlu/task"], m["eval/mmlu/lm_eval_task"], m["eval/mmlu/num_fewshot"]) == ("local", "mmlu_local", 5)
    assert m["eval/mmlu/chat_template"] is False and m["eval/mmlu/lm_eval_version"].startswith("0.4.13")
    for model in ["tiny", "apa"]:
        assert 0 <= m[f"eval/mmlu/{model}"] <= 1 and m[f"eval/mmlu/{model}/n"] == 20
        assert m[f"eval/mmlu/{model}/se"] > 0 and m[f"eval/mmlu/{model}/ci95_low"] <= m[f"eval/mmlu/{model}"]
        assert set(m["eval/mmlu_by_subject"][model]) == {"geography", "elementary_mathematics", "astronomy", "biology"}
    executed = nbformat.read(run / f"{STAGE}.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "4. MMLU, local task (20 questions, 5-shot" in printed and "apa minus tiny, paired by question" in printed


def test_figures_caches_and_executed_notebook(run):
    figures = sorted(p.name for p in (run / STAGE / "figures").glob("*.png"))
    assert figures == ["alpaca_eval.png", "mmlu.png", "mt_bench_by_category.png", "mt_bench_vs_published.png",
                       "rating_distribution.png"]
    cache = run / STAGE / "cache"
    answers = [json.loads(line) for line in (cache / "answers.jsonl").read_text().splitlines() if line]
    assert len(answers) == 2 * 8 * 2  # two models, eight questions, two turns
    assert (cache / "judgments.jsonl").is_file() and (cache / "alpaca_eval.jsonl").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["notebooks"][STAGE]["status"] == "ok"
    executed = nbformat.read(run / f"{STAGE}.ipynb", as_version=4)
    images = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 5
