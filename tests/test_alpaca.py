"""starling_lib.alpaca: bundled outputs, AlpacaEval's win rate and length-controlled GLM, judging."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from fake_openai import FAST_RETRIES, FakeOpenAIServer, point_env_at
from scipy.special import expit

from starling_lib import alpaca, chat, length_control, llm_client, mtbench


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


def test_win_rate_matches_alpaca_evals_own():
    prefs = [2, 1, 1.5, 1.75, 0, np.nan, 1.2, 2, 2]
    with length_control.glm_module():
        from alpaca_eval.metrics.winrate import get_winrate
        theirs = get_winrate([{"preference": p} for p in prefs])
    ours = alpaca.win_rate(prefs)
    assert set(ours) == set(theirs)
    assert all(ours[k] == pytest.approx(float(theirs[k]), abs=1e-12) for k in ours)


# ---------------------------------------------------------------------------------------------
# length-controlled win rate (starling_lib.length_control: alpaca_eval's GLM)

def _synthetic(n=300, w_len=1.5, w_model=0.4, w_diff=0.0, seed=0, universe=805, hard=False):
    """Soft preferences drawn from the GLM itself (hard: 1 or 2, drawn with the GLM's probability),
    the model usually longer than the baseline; the instructions are `n` of AlpacaEval's indices,
    with a difficulty per index."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0, 1, universe)
    index = rng.choice(universe, n, replace=False)
    base = rng.integers(200, 2000, n)
    model = np.maximum(base + rng.normal(300, 400, n).astype(int), 1)
    d = (model - base).astype(float)
    logit = w_len * np.tanh(d / d.std(ddof=1)) + w_model + w_diff * difficulty[index]
    p = (rng.random(n) < expit(logit)).astype(float) if hard else expit(logit)
    return (1 + p, ["M" * m for m in model], ["b" * b for b in base], index, difficulty)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """df_gamed.csv as the hub dataset tatsu-lab/alpaca_eval serves it (same columns), written
    locally: two gamed baselines per AlpacaEval instruction, with an instruction difficulty."""
    import huggingface_hub

    def install(difficulty):
        rng = np.random.default_rng(1)
        n = len(difficulty)
        rows = [pd.DataFrame({"model": name, "index": np.arange(n), "std_delta_len": sd,
                              "preference": expit(-1.2 * np.tanh(sd) + 0.3 - 0.8 * difficulty),
                              "instruction_difficulty": difficulty, "not_gamed_baseline": False})
                for name, sd in (("verbose", rng.normal(-1, 0.5, n)), ("concise", rng.normal(1, 0.5, n)))]
        path = tmp_path / "df_gamed.csv"
        pd.concat(rows, ignore_index=True).to_csv(path, index=False)
        with length_control.glm_module() as g:
            monkeypatch.setattr(g, "hf_hub_download", lambda *a, **k: str(path))
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: str(path))
        length_control.load_gamed.cache_clear()

    yield install
    length_control.load_gamed.cache_clear()


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """The hub unreachable and its cache empty, as on these machines."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    length_control.load_gamed.cache_clear()
    length_control._WARNED.clear()
    yield
    length_control.load_gamed.cache_clear()


def _official(glm, pref, model, base, index):
    """alpaca_eval's own get_length_controlled_winrate on the same annotations."""
    ann = pd.DataFrame({"preference": pref, "output_1": base, "output_2": model, "index": index,
                        "generator_1": "baseline", "generator_2": "model"})
    with length_control.glm_module() as g:
        return g.get_length_controlled_winrate(ann, glm_name=glm, save_weights_dir=None, is_warn_extreme_changes=False)


def test_minimal_glm_recovers_the_model_term_without_the_length_effect():
    pref, model, base, _, _ = _synthetic()
    fit = length_control.length_controlled_win_rate(pref, model, base, glm="length_controlled_minimal", n_bootstrap=20)
    assert fit.glm == "length_controlled_minimal" and fit.reason == ""
    assert fit.weights["length"] == pytest.approx(-1.5, abs=0.05)   # alpaca_eval's sign: baseline minus model
    assert fit.weights["model"] == pytest.approx(0.4, abs=0.02)
    assert fit.lc_win_rate == pytest.approx(expit(0.4) * 100, abs=0.5)  # 59.87
    assert alpaca.win_rate(pref)["win_rate"] > fit.lc_win_rate + 10      # length inflated the raw rate
    # alpaca_eval's LC standard error: every prediction is the same, so 0
    assert fit.lc_standard_error == pytest.approx(0, abs=1e-9)


def test_bootstrap_standard_error_shrinks_as_one_over_root_n():
    se = {n: length_control.length_controlled_win_rate(
        *_synthetic(n=n, hard=True, seed=3)[:3], glm="length_controlled_minimal", n_bootstrap=40).lc_bootstrap_se
        for n in (200, 800)}
    # hard labels at p ~ 0.6: about sqrt(0.24 / n) x 100 = 3.5 and 1.7 (a little more: the length term is fitted too)
    assert 2 < se[200] < 6 and 0.35 < se[800] / se[200] < 0.7


def test_minimal_glm_equals_alpaca_evals_own_function(fake_hub):
    pref, model, base, index, difficulty = _synthetic(n=120, w_diff=-0.8)
    pref[[3, 17]] = np.nan         # unjudged: left out of the fit, as alpaca_eval does
    pref[[5, 40]] = 0.0            # a draw
    fake_hub(difficulty)           # alpaca_eval's function downloads the hub file even for this GLM
    ours = length_control.length_controlled_win_rate(pref, model, base, glm="length_controlled_minimal", n_bootstrap=0)
    theirs = _official("length_controlled_minimal", pref, model, base, index)
    assert ours.lc_win_rate == pytest.approx(theirs["length_controlled_winrate"], abs=1e-9)
    assert ours.lc_standard_error == pytest.approx(theirs["lc_standard_error"], abs=1e-9)


def test_v1_glm_is_alpaca_evals_and_uses_the_difficulty(fake_hub):
    pref, model, base, index, difficulty = _synthetic(n=150, w_diff=-0.8, seed=2)
    fake_hub(difficulty)
    fit = length_control.length_controlled_win_rate(pref, model, base, alpaca_index=index, glm="auto", n_bootstrap=10)
    theirs = _official("length_controlled_v1", pref, model, base, index)
    assert fit.glm == "length_controlled_v1" and fit.reason == ""
    assert fit.lc_win_rate == pytest.approx(theirs["length_controlled_winrate"], abs=1e-9)
    assert fit.lc_standard_error == pytest.approx(theirs["lc_standard_error"], abs=1e-9) and fit.lc_standard_error > 0
    assert fit.weights["instruction_difficulty"] == pytest.approx(-0.8, abs=0.15)
    # the mirror the bootstrap refits agrees with alpaca_eval's function
    gamed, _ = length_control.load_gamed()
    with length_control.glm_module() as g:
        pred, _ = length_control._fit(g, length_control._features(
            pref, np.array([len(b) for b in base], float), np.array([len(m) for m in model], float), index, gamed),
            "length_controlled_v1", gamed)
    assert pred.mean() * 100 == pytest.approx(fit.lc_win_rate, abs=1e-9)


def test_auto_without_the_hub_fits_the_minimal_glm_and_says_so(no_hub):
    pref, model, base, index, _ = _synthetic(n=60)
    with pytest.warns(UserWarning, match=r"df_gamed\.csv.*not available.*fitted alpaca_eval's length_controlled_minimal"):
        fit = length_control.length_controlled_win_rate(pref, model, base, alpaca_index=index, n_bootstrap=0)
    assert fit.glm == "length_controlled_minimal" and "df_gamed.csv" in fit.reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # said once per process, not once per model
        length_control.length_controlled_win_rate(pref, model, base, alpaca_index=index, n_bootstrap=0)
    with pytest.raises(RuntimeError, match="length_controlled_v1' cannot be fitted: df_gamed.csv"):
        length_control.length_controlled_win_rate(pref, model, base, alpaca_index=index, glm="length_controlled_v1")
    with pytest.warns(UserWarning, match="not all AlpacaEval's"):   # no index: no difficulty to look up
        fit = length_control.length_controlled_win_rate(pref, model, base, n_bootstrap=0)
    assert fit.glm == "length_controlled_minimal"


def test_a_judge_that_only_rewards_length_gives_lc_50():
    pref, model, base, _, _ = _synthetic(w_len=2.0, w_model=0.0)
    with pytest.warns(UserWarning, match="very different from the raw one"):   # alpaca_eval's check, 10+ points
        fit = length_control.length_controlled_win_rate(pref, model, base, glm="length_controlled_minimal",
                                                        n_bootstrap=0)
    assert alpaca.win_rate(pref)["win_rate"] > 65
    assert fit.lc_win_rate == pytest.approx(50.0, abs=1.0)


def test_lc_stays_finite_on_separable_hard_labels():
    model, base = ["m" * n for n in (900, 1000, 300, 250, 950, 120)], ["b" * n for n in (100, 200, 800, 900, 50, 700)]
    with pytest.warns(UserWarning, match="very different from the raw one"):
        fit = length_control.length_controlled_win_rate([2, 2, 1, 1, 2, 1], model, base,   # longer always wins
                                                        glm="length_controlled_minimal", n_bootstrap=5)
    assert np.isfinite(fit.weights["length"]) and 0 < fit.lc_win_rate < 100


def test_lc_needs_five_judged_instructions_and_valid_settings():
    with pytest.warns(UserWarning, match="4 judged instruction.*at least 5"):
        fit = length_control.length_controlled_win_rate([2, 1, 2, 1, np.nan], ["m"] * 5, ["bb"] * 5,
                                                        glm="length_controlled_minimal")
    assert np.isnan(fit.lc_win_rate) and np.isnan(fit.lc_bootstrap_se)
    with pytest.raises(ValueError, match="glm must be one of auto, length_controlled_v1, length_controlled_minimal"):
        length_control.length_controlled_win_rate([2] * 5, ["m"] * 5, ["b"] * 5, glm="v2")


def test_summarize_uses_the_outputs_lengths():
    ann = pd.DataFrame({"preference": [1.8, 1.3, 1.7, 1.2, 1.9, 1.5],
                        "output_1": ["b" * 10] * 6,
                        "output_2": ["m" * 30, "m" * 5, "m" * 25, "m" * 2, "m" * 40, "m" * 8]})
    s = alpaca.summarize(ann, lc_glm="length_controlled_minimal", lc_bootstrap=5)
    fit = length_control.length_controlled_win_rate(ann["preference"], ann["output_2"], ann["output_1"],
                                                    glm="length_controlled_minimal", n_bootstrap=5)
    assert s["win_rate"] == pytest.approx(56.67, abs=0.01)
    assert s["length_controlled_winrate"] == pytest.approx(fit.lc_win_rate) and 40 < fit.lc_win_rate < s["win_rate"]
    assert s["lc_bootstrap_se"] == pytest.approx(fit.lc_bootstrap_se) and s["glm"] == "length_controlled_minimal"
    assert s["length_weight"] > 0 and s["avg_length"] == pytest.approx(110 / 6)  # the longer output wins
    m = alpaca.summary_metrics(pd.DataFrame([{**s, "judge": "j"}], index=["x"]))
    run = alpaca.eval_metrics(pd.DataFrame([{**s, "judge": "j"}], index=["x"]), "gpt4_1106_preview", ["i"] * 6)
    assert run == {**m, "eval/alpaca_eval/baseline": "gpt4_1106_preview", "eval/alpaca_eval/num_instructions": 6}
    assert m["eval/alpaca_eval/x/win_rate"] == 56.6667 and m["eval/alpaca_eval/x/lc_win_rate_se"] == 0.0
    assert m["eval/alpaca_eval/x/lc_win_rate_bootstrap_se"] > 0
    assert m["eval/alpaca_eval/x/n_judged"] == 6 and isinstance(m["eval/alpaca_eval/x/n_judged"], int)
    assert m["eval/alpaca_eval/x/judge"] == "j" and m["eval/alpaca_eval/x/lc_glm"] == "length_controlled_minimal"
    assert (m["eval/alpaca_eval/x/n_failed"], m["eval/alpaca_eval/x/n_unparsable"]) == (0, 0)


def test_evaluate_outputs_checks_the_lc_settings_before_judging():
    judge = PrefersMarkedOutput()
    for bad, match in (({"lc_glm": "length_controlled_v2"}, "lc_glm must be one of auto"),
                       ({"lc_bootstrap": -1}, "lc_bootstrap must be at least 0")):
        with pytest.raises(ValueError, match=match):
            alpaca.evaluate_outputs({"m": ["GOOD"]}, ["task"], ["base"], judge, progress=False, **bad)
    assert judge.calls == 0


def test_alpaca_indices_finds_alpacaevals_instructions():
    instructions = alpaca.load_outputs("gpt4_1106_preview")["instruction"]
    assert alpaca.alpaca_indices(instructions[[7, 3, 804]]) == [7, 3, 804]
    assert alpaca.alpaca_indices([instructions[0], "not an AlpacaEval instruction"]) is None


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
    with pytest.warns(UserWarning, match="2 judged instruction.*LC is left undefined"):
        s = alpaca.summarize(ann)
    assert (s["n_total"], s["n_failed"], s["n_unparsable"]) == (2, 1, 1) and np.isnan(s["length_controlled_winrate"])
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
