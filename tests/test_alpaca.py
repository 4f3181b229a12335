"""starling_lib.alpaca: bundled outputs, AlpacaEval's win rate and length-controlled GLM, judging."""

import json

import numpy as np
import pandas as pd
import pytest
from fake_openai import FAST_RETRIES, FakeOpenAIServer, point_env_at
from scipy.special import expit

from starling_lib import alpaca, chat, llm_client, mtbench


def test_bundled_outputs_share_the_805_instructions():
    names = list(alpaca.BUNDLED_OUTPUTS)
    outputs = {n: alpaca.load_outputs(n) for n in names}
    assert all(len(o) == 805 for o in outputs.values())
    assert all((o["generator"] == n).all() for n, o in outputs.items())
    first = outputs[names[0]]["instruction"].tolist()
    assert all(o["instruction"].tolist() == first for o in outputs.values())
    assert alpaca.load_outputs(names[0], limit=3)["instruction"].tolist() == first[:3]


def test_published_starling_rows():
    row = alpaca.published_rows().loc["Starling-LM-7B-alpha"]
    assert row["win_rate"] == pytest.approx(14.25, abs=0.01)
    assert row["length_controlled_winrate"] == pytest.approx(14.69, abs=0.01)
    assert row["n_total"] == 805


def test_comparison_table_keeps_published_and_run_rows_apart():
    summary = pd.DataFrame({"win_rate": [40.0], "length_controlled_winrate": [35.0], "judge": ["j"]},
                           index=pd.Index(["Starling-LM-7B-alpha"], name="model"))
    t = alpaca.comparison_table(summary).set_index(["model", "metric"])["value"]
    assert t[("Starling-LM-7B-alpha", "win rate")] == 40.0 and t[("Starling-LM-7B-alpha", "LC win rate")] == 35.0
    assert t[("Starling-LM-7B-alpha (published)", "LC win rate")] == pytest.approx(14.69, abs=0.01)


# ---------------------------------------------------------------------------------------------
# win rate

def test_win_rate_on_hand_made_preferences():
    # 2: model wins, 1: baseline wins, 1.5 or 0: draw, 1.75: a weighted preference; NaN: dropped
    out = alpaca.win_rate([2, 1, 1.5, 1.75, 0, np.nan])
    x = np.array([1, 0, 0.5, 0.75, 0.5])
    assert out["win_rate"] == pytest.approx(55.0)
    assert out["standard_error"] == pytest.approx(x.std(ddof=1) / np.sqrt(5) * 100)
    assert (out["n_wins"], out["n_wins_base"], out["n_draws"], out["n_total"]) == (2, 1, 2, 5)
    assert out["discrete_win_rate"] == pytest.approx(60.0)  # (2 wins + 2 draws / 2) / 5
    with pytest.raises(ValueError, match=r"\[1, 2\]"):
        alpaca.win_rate([0.5, 2])


# ---------------------------------------------------------------------------------------------
# length-controlled win rate

def _synthetic(n=400, w_len=1.5, w_model=0.4, w_diff=None, seed=0):
    """Soft preferences drawn from the GLM itself, with the model usually longer than the baseline."""
    rng = np.random.default_rng(seed)
    base = rng.integers(200, 2000, n).astype(float)
    model = base + rng.normal(300, 400, n)
    d = model - base
    logit = w_len * np.tanh(d / d.std(ddof=1)) + w_model
    difficulty = rng.normal(0, 1, n)
    if w_diff is not None:
        logit = logit + w_diff * difficulty
    return 1 + expit(logit), model, base, difficulty


def test_lc_recovers_the_model_term_without_the_length_effect():
    pref, model, base, _ = _synthetic()
    fit = alpaca.length_controlled_win_rate(pref, model, base, l2=0.0)
    assert fit.weights["length"] == pytest.approx(1.5, abs=1e-4)
    assert fit.weights["model"] == pytest.approx(0.4, abs=1e-4)
    assert fit.lc_win_rate == pytest.approx(expit(0.4) * 100, abs=1e-3)  # 59.87
    assert alpaca.win_rate(pref)["win_rate"] > fit.lc_win_rate + 10      # length inflated the raw rate
    assert fit.glm == "length_controlled_minimal" and np.isnan(fit.lc_standard_error)


def test_lc_with_instruction_difficulty():
    pref, model, base, difficulty = _synthetic(w_diff=-0.8)
    fit = alpaca.length_controlled_win_rate(pref, model, base, instruction_difficulty=difficulty, l2=0.0)
    assert fit.weights["instruction_difficulty"] == pytest.approx(-0.8, abs=1e-4)
    assert fit.lc_win_rate == pytest.approx(expit(0.4 - 0.8 * difficulty).mean() * 100, abs=1e-3)
    assert fit.glm == "length_controlled_v1_noreg" and fit.lc_standard_error > 0


def test_a_judge_that_only_rewards_length_gives_lc_50():
    pref, model, base, _ = _synthetic(w_len=2.0, w_model=0.0)
    fit = alpaca.length_controlled_win_rate(pref, model, base)  # default l2 (C = 100)
    assert alpaca.win_rate(pref)["win_rate"] > 65
    assert fit.lc_win_rate == pytest.approx(50.0, abs=0.5)


def test_lc_stays_finite_on_separable_hard_labels():
    model, base = np.array([900, 1000, 300, 250.0]), np.array([100, 200, 800, 900.0])
    fit = alpaca.length_controlled_win_rate([2, 2, 1, 1], model, base)  # longer always wins
    assert np.isfinite(fit.weights["length"]) and 0 < fit.lc_win_rate < 100


def test_summarize_uses_the_outputs_lengths():
    ann = pd.DataFrame({"preference": [2.0, 1.0, 2.0, 1.0],
                        "output_1": ["b" * 10, "b" * 10, "b" * 10, "b" * 10],
                        "output_2": ["m" * 30, "m" * 5, "m" * 25, "m" * 2]})
    s = alpaca.summarize(ann)
    fit = alpaca.length_controlled_win_rate(ann["preference"], [30, 5, 25, 2], [10] * 4)
    assert s["win_rate"] == 50.0 and s["length_controlled_winrate"] == pytest.approx(fit.lc_win_rate)
    assert s["length_weight"] > 0 and s["avg_length"] == 15.5
    m = alpaca.summary_metrics(pd.DataFrame([{**s, "judge": "j"}], index=["x"]))
    run = alpaca.eval_metrics(pd.DataFrame([{**s, "judge": "j"}], index=["x"]), "gpt4_1106_preview", ["i"] * 4)
    assert run == {**m, "eval/alpaca_eval/baseline": "gpt4_1106_preview", "eval/alpaca_eval/num_instructions": 4}
    assert m["eval/alpaca_eval/x/win_rate"] == 50.0 and m["eval/alpaca_eval/x/lc_win_rate_se"] is None
    assert m["eval/alpaca_eval/x/n_judged"] == 4 and isinstance(m["eval/alpaca_eval/x/n_judged"], int)
    assert m["eval/alpaca_eval/x/judge"] == "j"
    assert (m["eval/alpaca_eval/x/n_failed"], m["eval/alpaca_eval/x/n_unparsable"]) == (0, 0)


# ---------------------------------------------------------------------------------------------
# judging

class PrefersMarkedOutput:
    """Prefers whichever shown output contains GOOD: p = 1 if it is output_1 ("m"), 2 if output_2."""
    id = "marker-judge"

    def __init__(self):
        self.calls = 0

    def prefer(self, system, user):
        self.calls += 1
        return 1.0 if user.index("GOOD") < user.index('"model_identifier": "M"') else 2.0


class PrefersSecondPosition:
    id = "position-judge"

    def prefer(self, system, user):
        return 2.0


def test_annotate_flips_swapped_preferences_back(tmp_path):
    n = 40
    instructions = [f"task {i}" for i in range(n)]
    good, bad = [f"GOOD {i}" for i in range(n)], [f"meh {i}" for i in range(n)]
    judge = PrefersMarkedOutput()
    ann = alpaca.annotate(instructions, good, bad, judge, model_name="m", cache_path=tmp_path / "c.jsonl",
                          progress=False)
    assert 0 < ann["swapped"].sum() < n
    assert (ann["preference"] == 2.0).all()  # the model's output wins wherever it was shown
    assert alpaca.annotate(instructions, bad, good, judge, model_name="m2", progress=False)["preference"].eq(1).all()
    # a judge that always picks the second position gives the model exactly its unswapped share
    biased = alpaca.annotate(instructions, good, bad, PrefersSecondPosition(), model_name="m", progress=False)
    assert alpaca.win_rate(biased["preference"])["win_rate"] == pytest.approx(100 * (~ann["swapped"]).mean())
    # cached: a rerun asks nothing
    calls = judge.calls
    alpaca.annotate(instructions, good, bad, judge, model_name="m", cache_path=tmp_path / "c.jsonl", progress=False)
    assert judge.calls == calls


def test_judge_prompt_labels_outputs_m_and_M():
    system, user = alpaca.judge_prompt("Say hi", "FIRST", "SECOND")
    assert "leaderboard" in system
    assert user.index('"instruction": """Say hi"""') < user.index("FIRST") < user.index("SECOND")
    assert user.index('"model_identifier": "m"') < user.index("FIRST") < user.index('"model_identifier": "M"')
    assert user.endswith("## Best Model Identifier")
    _, cut = alpaca.judge_prompt("Say hi", "x" * 50, "y" * 50, max_chars=10)
    assert "x" * 10 in cut and "x" * 11 not in cut


def test_local_pairwise_preference_is_the_m_versus_M_probability(tiny):
    model, tok = tiny
    judge = alpaca.LocalPairwiseJudge(model, tok, "tiny")
    system, user = alpaca.judge_prompt("Say hi", "hi", "hello there")
    p = judge.prefer(system, user)
    prompt = mtbench.render_judge_prompt(tok, system, user) + " "
    assert mtbench.start_reply(prompt[:-1]) == prompt and mtbench.start_reply("x\n", "y") == "x\ny"
    logp = chat.continuation_logprobs(model, tok, prompt, ["m", "M"]).double().exp()
    assert 1 < p < 2 and p == pytest.approx(2 - logp[0] / logp.sum())


def test_api_pairwise_judge_reads_the_identifier():
    class Reply:
        def __init__(self, text):
            self.text = text

    class FakeClient:
        class config:
            model = "gpt-4-1106-preview"

        def __init__(self, texts):
            self.texts, self.seen = list(texts), []

        def complete_messages(self, messages):
            self.seen.append(messages)
            return Reply(self.texts.pop(0))

    client = FakeClient(["m", "M", "Neither"])
    judge = alpaca.ApiPairwiseJudge(client=client)
    assert judge.id == "api:gpt-4-1106-preview"
    prefs = [judge.prefer(*alpaca.judge_prompt("x", "a", "b")) for _ in range(3)]
    assert prefs[:2] == [1.0, 2.0] and np.isnan(prefs[2])
    assert [m["role"] for m in client.seen[0]] == ["system", "user"]


def test_default_api_pairwise_judge_asks_the_environment_model_for_one_token(monkeypatch):
    monkeypatch.setenv("STARLING_JUDGE_BASE_URL", "http://127.0.0.1:9/v1")  # never contacted
    monkeypatch.setenv("STARLING_JUDGE_MODEL", "gpt-4")
    judge = alpaca.ApiPairwiseJudge(model="gpt-4-1106-preview")
    assert judge.id == "api:gpt-4-1106-preview"
    assert (judge.client.config.temperature, judge.client.config.max_tokens) == (0.0, 1)
    assert alpaca.pairwise_judge_for(mtbench.ApiJudge()).id == "api:gpt-4"



@pytest.fixture
def server(monkeypatch):
    with FakeOpenAIServer(default="M") as srv:
        point_env_at(monkeypatch, srv.url)
        yield srv


def _api_pairwise_judge():
    config = llm_client.ClientConfig.from_env(temperature=0.0, max_tokens=1, **FAST_RETRIES)
    return alpaca.ApiPairwiseJudge(client=llm_client.ChatClient(config, sleep=lambda s: None))


def test_failed_and_unparsable_replies_are_told_apart_counted_and_only_unparsable_cached(server, tmp_path):
    instructions = [f"task {i}" for i in range(4)]
    model, base = [f"model {i}" for i in range(4)], [f"base {i}" for i in range(4)]
    cache = tmp_path / "prefs.jsonl"
    server.script = [("ok", "m"), ("status", 400, "prompt too long"), ("ok", "Neither"), ("ok", "M")]
    with pytest.warns(UserWarning, match="1 failed request.*1 unparsable reply"):
        ann = alpaca.annotate(instructions, model, base, _api_pairwise_judge(), model_name="x", cache_path=cache,
                              progress=False)
    assert ann["status"].tolist() == ["ok", "failed", "unparsable", "ok"]
    assert "http_400" in ann["error"][1] and "'Neither'" in ann["error"][2] and pd.isna(ann["error"][0])
    assert ann["preference"][[1, 2]].isna().all() and ann["preference"][[0, 3]].notna().all()
    s = alpaca.summarize(ann)
    assert (s["n_total"], s["n_failed"], s["n_unparsable"]) == (2, 1, 1)
    m = alpaca.summary_metrics(pd.DataFrame([{**s, "judge": "j"}], index=["x"]))
    assert (m["eval/alpaca_eval/x/n_failed"], m["eval/alpaca_eval/x/n_unparsable"]) == (1, 1)
    records = [json.loads(line) for line in cache.read_text().splitlines()]
    assert [(r["index"], r["status"]) for r in records] == [(0, "ok"), (2, "unparsable"), (3, "ok")]
    assert records[1]["reply"] == "Neither" and records[1]["shown_preference"] is None

    # the rerun pays only for the failed request; the unparsable reply was paid for and is kept
    with pytest.warns(UserWarning, match="0 failed request.*1 unparsable reply"):
        again = alpaca.annotate(instructions, model, base, _api_pairwise_judge(), model_name="x", cache_path=cache,
                                progress=False)
    assert len(server.requests) == 5
    assert again["status"].tolist() == ["ok", "ok", "unparsable", "ok"]
    assert again["preference"][[0, 3]].tolist() == ann["preference"][[0, 3]].tolist()


def test_api_pairwise_judge_raises_a_failed_request_instead_of_calling_it_no_preference(server):
    server.script = [("status", 400, "prompt too long")]
    with pytest.raises(llm_client.RequestError, match="http_400"):
        _api_pairwise_judge().prefer(*alpaca.judge_prompt("x", "a", "b"))
