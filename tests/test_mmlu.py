"""starling_lib.mmlu: MMLU through lm-evaluation-harness, run here on the bundled 20-question task in
MMLU's format (offline, seconds on the tiny model), with lm-eval's choices checked against the
model's own log-probabilities."""

import time

import numpy as np
import pandas as pd
import pytest

from starling_lib import chat, mmlu, mtbench
from starling_lib.hub import HubError

SUBJECTS = ["geography", "elementary_mathematics", "astronomy", "biology"]
LETTERS = [" A", " B", " C", " D"]


@pytest.fixture(scope="module")
def tiny_run(tiny):
    model, tokenizer = tiny
    return mmlu.evaluate(model, tokenizer, "tiny", "local")


def _answered_examples(prompt: str) -> int:
    """How many solved examples a prompt shows: every "Answer:" but the last is followed by its letter."""
    return sum(prompt.count(f"\nAnswer: {letter}\n") for letter in "ABCD")


def test_the_local_task_runs_through_lm_eval_and_returns_an_accuracy_with_its_stderr(tiny_run):
    r = tiny_run
    assert (r.task, r.n, r.num_fewshot, r.chat_template) == ("local", 20, 5, False)
    assert r.lm_eval_version.startswith("0.4.13")   # the release pyproject.toml pins
    assert 0 <= r.acc <= 1 and 0 < r.acc_stderr < 0.2
    assert r.acc == pytest.approx(r.samples["correct"].mean())      # the group's accuracy: the mean over questions
    assert list(r.subjects["subject"]) == SUBJECTS and list(r.subjects["n"]) == [5] * 4
    by_subject = r.samples.groupby("subject")["correct"].mean()
    for s in r.subjects.itertuples():
        assert s.acc == pytest.approx(by_subject[s.subject])
        assert s.acc_stderr == pytest.approx(np.std(r.samples[r.samples.subject == s.subject]["correct"], ddof=1) / np.sqrt(5))
    assert (r.samples["correct"] == (r.samples["pred"] == r.samples["target"])).all()
    assert r.samples["question"].iloc[0] == "What is the capital of France?" and r.samples["target"].iloc[0] == 2


def test_lm_eval_picks_the_argmax_of_the_models_own_log_probs(tiny, tiny_run):
    """The integration, not just the run: for one question per subject, lm-eval's loglikelihood of
    each letter and its choice equal what the project's own scorer computes from the model."""
    model, tokenizer = tiny
    checked = tiny_run.samples.groupby("subject").head(1)
    for row in checked.itertuples():
        ours = chat.continuation_logprobs(model, tokenizer, row.prompt, LETTERS)
        assert np.allclose(ours.numpy(), row.loglikelihoods, atol=1e-4), (row.subject, ours, row.loglikelihoods)
        assert int(ours.argmax()) == row.pred
    assert len(checked) == 4


def test_the_few_shot_count_is_honoured(tiny, tiny_run):
    prompt = tiny_run.samples["prompt"].iloc[0]
    assert prompt.startswith("The following are multiple choice questions (with answers) about geography.\n\n"
                             "What is the capital of Italy?\nA. Rome")          # the subject's first dev question
    assert _answered_examples(prompt) == 5 and prompt.endswith("What is the capital of France?\nA. Berlin\n"
                                                                "B. Madrid\nC. Paris\nD. Rome\nAnswer:")
    model, tokenizer = tiny
    for shots in (0, 2):
        r = mmlu.evaluate(model, tokenizer, "tiny", "local", num_fewshot=shots, limit=1)
        assert r.n == 4 and r.num_fewshot == shots and r.limit == 1
        assert [_answered_examples(p) for p in r.samples["prompt"]] == [shots] * 4


def test_the_chat_template_renders_the_few_shot_examples_as_turns(tiny):
    model, tokenizer = tiny
    r = mmlu.evaluate(model, tokenizer, "tiny", "local", limit=1, apply_chat_template=True)
    prompt = r.samples["prompt"].iloc[0]
    # tiny speaks OpenChat-3.5: five solved examples as earlier turns, then the open assistant turn
    assert prompt.count("GPT4 Correct User:") == 6 and prompt.count("GPT4 Correct Assistant:") == 6
    assert prompt.endswith("Answer:<|end_of_turn|>GPT4 Correct Assistant:") and r.chat_template


def test_mmlu_offline_without_a_cache_stops_in_one_line_before_any_model_loads(monkeypatch, tmp_path):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)   # an empty cache
    monkeypatch.setattr("starling_lib.models.load_model_and_tokenizer",
                        lambda *a, **k: pytest.fail("a model was loaded before the data set was checked"))
    with pytest.raises(HubError, match=r"^MMLU needs the Hugging Face hub: lm-eval's mmlu task reads the data set "
                                       r"cais/mmlu .*`python -m starling_lib\.mmlu --precache`") as e:
        mmlu.evaluate_models({"tiny": "tiny"}, "mmlu")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="task must be one of 'local', 'mmlu'"):
        mmlu.check_available("mmlu_pro")
    mmlu.check_available("local")   # offline is no obstacle for the bundled task


def test_tables_metrics_and_the_published_figures(tiny_run):
    table = mmlu.results_table([tiny_run]).iloc[0]
    assert table["ci95_low"] <= table["acc"] <= table["ci95_high"] and table["vs_chance"] in {"above", "below", "indistinguishable"}
    picks = tiny_run.samples["pred"].value_counts()
    assert table["most_picked"] == "ABCD"[picks.index[0]] and table["most_picked_share"] == picks.iloc[0] / 20
    assert list(mmlu.results_table([]).columns) == mmlu.RESULT_COLUMNS
    m = mmlu.eval_metrics([tiny_run], "local", 5, 0, False)
    assert m["eval/mmlu/tiny"] == round(tiny_run.acc, 4) and m["eval/mmlu/tiny/n"] == 20
    assert m["eval/mmlu/lm_eval_task"] == "mmlu_local" and m["eval/mmlu/metric"] == "acc"
    assert set(m["eval/mmlu_by_subject"]["tiny"]) == set(SUBJECTS)
    assert mmlu.eval_metrics([], "", 5, 0, False)["eval/mmlu/task"] == ""
    published = mmlu.published_table().set_index("model")["mmlu"]
    card = mtbench.published_table().set_index("model")["mmlu"]
    assert published["Starling-7B"] == card["Starling-7B"] == 63.9 and published["Openchat-3.5"] == card["Openchat-3.5"] == 64.3
    # the bundled task is never drawn beside MMLU scores
    assert not mmlu.comparable_to_published(tiny_run)
    assert len(mmlu.comparison_table([tiny_run])) == len(published)


def test_smollm2_on_the_local_task():
    """The real model (SmolLM2-135M-Instruct, Q4_1 weights) through the same path on 2 questions per
    subject (all 20 take about 40 s here), its choices checked against its own log-probabilities.
    Its accuracy is printed, not asserted: on all 20 it measured 0.30 (6/20, Wilson 95% 0.15-0.52,
    no better than chance), because it answers "C" to 19 of them: a 135M model has not learnt
    MMLU's letter format, whatever it knows."""
    from starling_lib.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("smollm2-135m", device="cpu")
    start = time.perf_counter()
    r = mmlu.evaluate(model, tokenizer, "smollm2-135m", "local", limit=2)
    row = mmlu.results_table([r]).iloc[0]
    print(f"smollm2-135m, bundled task, 5-shot, 2 questions per subject: accuracy {r.acc:.2f} +- {r.acc_stderr:.2f} "
          f"({r.n_correct}/{r.n}; picked {row['most_picked']} on {row['most_picked_share']:.0%}), "
          f"{time.perf_counter() - start:.1f} s")
    assert r.n == 8 and 0 <= r.acc <= 1
    other = r.samples[r.samples["pred"] != r.samples["pred"].mode()[0]].head(1)   # a question it answered otherwise
    for row in pd.concat([r.samples.head(1), other]).itertuples():
        ours = chat.continuation_logprobs(model, tokenizer, row.prompt, LETTERS)
        assert np.allclose(ours.numpy(), row.loglikelihoods, atol=1e-3) and int(ours.argmax()) == row.pred


def test_notebook_05s_mmlu_settings_are_checked_before_its_kernel_starts():
    from starling_lib.notebook_checks import check_notebook

    check_notebook("05_mt_bench_evaluation", {"mmlu_task": "", "mmlu_fewshot": 0, "mmlu_limit": 0})
    with pytest.raises(ValueError, match="mmlu_task must be one of 'local', 'mmlu' or \"\" \\(skip\\); got 'mmul'"):
        check_notebook("05_mt_bench_evaluation", {"mmlu_task": "mmul"})
    with pytest.raises(ValueError, match="mmlu_fewshot must be at least 0"):
        check_notebook("05_mt_bench_evaluation", {"mmlu_fewshot": -1})
