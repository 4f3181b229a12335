"""starling_lib.mtbench: FastChat's protocol (questions, judge prompts, rating parser, scores), the
likelihood judge, resuming from the caches and the OpenAI-compatible judge over HTTP."""

import numpy as np
import pandas as pd
import pytest
from fake_openai import FakeOpenAIServer

from starling_lib import chat, llm_client, mtbench
from starling_lib.mtbench import Rating, parse_rating


# ---------------------------------------------------------------------------------------------
# questions and judge prompts

def test_questions_and_references():
    qs = mtbench.load_questions()
    assert len(qs) == 80 and [q["question_id"] for q in qs] == list(range(81, 161))
    assert all(len(q["turns"]) == 2 for q in qs)
    assert pd.Series([q["category"] for q in qs]).value_counts().to_dict() == dict.fromkeys(mtbench.CATEGORIES, 10)
    with_ref = {q["category"] for q in qs if q["reference"]}
    assert with_ref == set(mtbench.NEED_REF_CATS) and sum(bool(q["reference"]) for q in qs) == 30
    subset = mtbench.load_questions(per_category=1)
    assert [q["category"] for q in subset] == mtbench.CATEGORIES
    assert [q["category"] for q in mtbench.load_questions(per_category=2, categories=["math"])] == ["math", "math"]
    with pytest.raises(ValueError, match="unknown"):
        mtbench.load_questions(categories=["poetry"])


@pytest.mark.parametrize("category,turn,expected", [
    ("writing", 1, "single-v1"), ("writing", 2, "single-v1-multi-turn"),
    ("humanities", 2, "single-v1-multi-turn"), ("extraction", 1, "single-v1"),
    ("math", 1, "single-math-v1"), ("math", 2, "single-math-v1-multi-turn"),
    ("reasoning", 1, "single-math-v1"), ("coding", 2, "single-math-v1-multi-turn"),
])
def test_judge_prompt_selection(category, turn, expected):
    assert mtbench.judge_prompt_name(category, turn) == expected


def test_judge_prompts_show_what_the_original_shows():
    qs = {q["category"]: q for q in mtbench.load_questions(per_category=1)}
    math, writing = qs["math"], qs["writing"]
    a = ["FIRST-ANSWER", "SECOND-ANSWER"]

    name, system, user = mtbench.judge_prompt(math, a, 1)
    assert name == "single-math-v1" and system == "You are a helpful assistant."
    assert math["turns"][0] in user and math["reference"][0] in user and "FIRST-ANSWER" in user
    assert "SECOND-ANSWER" not in user and math["turns"][1] not in user

    name, system, user = mtbench.judge_prompt(math, a, 2)
    assert name == "single-math-v1-multi-turn" and "second" in system
    for text in [*math["turns"], *math["reference"], *a]:
        assert text in user
    assert user.index("FIRST-ANSWER") < user.rindex(math["turns"][1]) < user.index("SECOND-ANSWER")

    name, _, user = mtbench.judge_prompt(writing, a, 2)
    assert name == "single-v1-multi-turn" and "Reference" not in user
    assert all(t in user for t in [*writing["turns"], *a])
    assert "{" not in user.replace(writing["turns"][0], "").replace(writing["turns"][1], "")  # every slot filled


# ---------------------------------------------------------------------------------------------
# the rating parser

@pytest.mark.parametrize("text,expected", [
    ("The answer is fine. Rating: [[5]]", 5.0),
    ("Rating: [[7.5]]", 7.5),
    ("Rating: [[10]]", 10.0),
    ("Rating: [[5.]]", 5.0),
    ("Rating: [[3]] ... on reflection [[9]]", 3.0),          # the first [[N]]
    ("see [2] above. Rating: [[6]]", 6.0),                    # [[N]] wins over an earlier [N]
    ("Rating: [8]", 8.0),                                     # fallback: [N]
    ("Rating: [[11]]", 11.0),                                 # not clipped, as in FastChat
    ("Rating: [[A]]", -1.0),
    ("Rating: [[-3]]", -1.0),
    ("Rating: [[ 7 ]]", -1.0),
    ("Rating: [[5/10]]", -1.0),
    ("Rating: 8 out of 10", -1.0),
    ("", -1.0),
    (None, -1.0),
])
def test_parse_rating_follows_fastchat(text, expected):
    got = parse_rating(text)
    assert isinstance(got, float) and got == expected


# ---------------------------------------------------------------------------------------------
# scores

def _judgments(rows):
    return pd.DataFrame([dict(zip(["model", "question_id", "category", "turn", "rating"], r),
                              judge="j", mode="generate") for r in rows])


def test_scores_exclude_failed_judgments():
    j = _judgments([("a", 81, "writing", 1, 8.0), ("a", 81, "writing", 2, -1.0),
                    ("a", 101, "math", 1, 6.0), ("a", 101, "math", 2, 4.0),
                    ("b", 81, "writing", 1, -1.0), ("b", 81, "writing", 2, -1.0)])
    s = mtbench.scores(j).set_index("model")
    assert s.loc["a", "mt_bench"] == pytest.approx(6.0)  # (8 + 6 + 4) / 3, the -1 left out
    assert s.loc["a", "turn_1"] == pytest.approx(7.0) and s.loc["a", "turn_2"] == pytest.approx(4.0)
    assert (s.loc["a", "n_valid"], s.loc["a", "n_failed"]) == (3, 1)
    assert np.isnan(s.loc["b", "mt_bench"]) and (s.loc["b", "n_valid"], s.loc["b", "n_failed"]) == (0, 2)
    cat = mtbench.category_scores(j).set_index(["model", "category"])["score"]
    assert cat[("a", "writing")] == 8.0 and cat[("a", "math")] == 5.0 and ("b", "writing") not in cat.index
    m = mtbench.score_metrics(mtbench.scores(j))
    assert m["eval/mt_bench/a"] == 6.0 and m["eval/mt_bench/b"] is None and m["eval/mt_bench/a/judge_mode"] == "generate"
    assert m["eval/mt_bench/a/n_failed"] == 1


def test_rating_distribution_mixes_probabilities_and_written_ratings():
    j = pd.DataFrame([
        {"model": "a", "mode": "likelihood", "rating": 5.5, "probs": [0.1] * 10},
        {"model": "a", "mode": "likelihood", "rating": 9.1, "probs": [0.0] * 9 + [1.0]},
        {"model": "b", "mode": "generate", "rating": 7.0, "probs": None},
        {"model": "b", "mode": "generate", "rating": 3.0, "probs": None},
        {"model": "b", "mode": "generate", "rating": -1.0, "probs": None},  # failed: not in the distribution
    ])
    d = mtbench.rating_distribution(j).set_index(["model", "rating"])["share"]
    assert d["a"].sum() == pytest.approx(1) and d["b"].sum() == pytest.approx(1)
    assert d[("a", 10)] == pytest.approx(0.55) and d[("a", 1)] == pytest.approx(0.05)
    assert d[("b", 7)] == d[("b", 3)] == 0.5


def test_standard_errors_over_questions_and_paired_differences():
    j = _judgments([("a", 81, "writing", 1, 8.0), ("a", 81, "writing", 2, 6.0),      # question means: a 7, 4
                    ("a", 101, "math", 1, 4.0), ("a", 101, "math", 2, 4.0),
                    ("b", 81, "writing", 1, 5.0), ("b", 81, "writing", 2, 5.0),      # b 5, 3
                    ("b", 101, "math", 1, 3.0), ("b", 101, "math", 2, -1.0)])
    s = mtbench.scores(j).set_index("model")
    assert s.loc["a", "mt_bench_se"] == pytest.approx(np.std([7.0, 4.0], ddof=1) / np.sqrt(2))
    d = mtbench.paired_difference(j, "a", "b")                                    # differences 2 and 1
    assert (d["diff"], d["n"]) == (pytest.approx(1.5), 2) and d["se"] == pytest.approx(0.5)


def test_comparison_table_puts_published_rows_beside_this_run():
    run = pd.DataFrame([{"model": "apa", "judge": "gpt-4", "mode": "generate", "mt_bench": 5.5},
                        {"model": "ppo", "judge": "local:tiny:likelihood", "mode": "likelihood", "mt_bench": 5.4}])
    t = mtbench.comparison_table(run, num_questions=80).set_index("model")
    assert t.loc["apa", "mt_bench"] == 5.5 and "gpt-4" in t.loc["apa", "source"]
    assert "ppo" not in t.index                       # another judge's scale is not drawn beside GPT-4's
    assert "apa" not in mtbench.comparison_table(run, num_questions=8)["model"].tolist()   # nor a subset of questions
    assert t.loc["Starling-7B", "mt_bench"] == 8.09 and t.loc["Openchat-3.5", "mt_bench"] == 7.81
    assert t.loc["GPT-4", "mt_bench"] == 8.99 and t.loc["Zephyr-7B-beta", "mt_bench"] == 7.34
    assert t.loc["Claude-2", "source"].startswith("published")


def test_resolve_models_adds_saved_policies(tmp_path, capsys):
    policies = tmp_path / "04_policy_tuning" / "policies"
    for name in ["ppo", "apa", "tiny"]:
        (policies / name).mkdir(parents=True)
        (policies / name / "config.json").write_text("{}")
    (policies / "logs").mkdir()  # not a from_pretrained folder
    specs = mtbench.resolve_models("tiny, org/Some-Model", "", str(tmp_path))
    assert specs == {"tiny": "tiny", "Some-Model": "org/Some-Model", "apa": str(policies / "apa"),
                     "ppo": str(policies / "ppo"), "policy-tiny": str(policies / "tiny")}
    assert mtbench.resolve_models("tiny", str(tmp_path / "nowhere"), "") == {"tiny": "tiny"}
    assert "no saved policies" in capsys.readouterr().out
    with pytest.raises(ValueError, match="nothing to evaluate"):
        mtbench.resolve_models("", str(tmp_path / "nowhere"), "")


# ---------------------------------------------------------------------------------------------
# the local judge

def test_likelihood_rating_is_an_expectation_over_1_to_10(tiny):
    model, tok = tiny
    judge = mtbench.LocalJudge(model, tok, "tiny", mode="likelihood")
    q = mtbench.load_questions(per_category=1, categories=["math"])[0]
    prompts = [mtbench.judge_prompt(q, ["42", "43"], turn)[1:] for turn in (1, 2)]
    seen = []
    ratings = judge.rate(prompts, on_rating=lambda i, r: seen.append((i, r)))
    assert seen == list(enumerate(ratings))             # each handed over as it is made
    for r, (system, user) in zip(ratings, prompts):
        p = np.asarray(r.probs)
        assert r.mode == "likelihood" and p.shape == (10,) and (p > 0).all()
        assert p.sum() == pytest.approx(1.0, abs=1e-9)
        assert 1.0 <= r.rating <= 10.0 and r.rating == pytest.approx(float(p @ np.arange(1, 11)))
        # the probabilities are the model's, renormalised over the ten rating continuations
        prompt = mtbench.render_judge_prompt(tok, system, user) + " Rating: [["
        logp = chat.continuation_logprobs(model, tok, prompt, [f"{k}]]" for k in range(1, 11)]).double()
        np.testing.assert_allclose(p, logp.softmax(-1).numpy(), rtol=1e-6)
    assert ratings[0].rating != ratings[1].rating


def test_generate_mode_parses_what_the_judge_writes(tiny):
    model, tok = tiny
    judge = mtbench.LocalJudge(model, tok, "tiny", mode="generate", max_new_tokens=8)
    r = judge.rate([("You are a helpful assistant.", "Rate: hello")])[0]
    assert r.mode == "generate" and r.rating == parse_rating(r.text)


# ---------------------------------------------------------------------------------------------
# resumable caches

class FakeModel:
    """Enough of a model for the cache fingerprint; generation is replaced in these tests."""
    name_or_path = "fake-model"
    config = None


class Interrupted(Exception):
    pass


class CountingJudge:
    """A judge written without `on_rating`: judge_answers caches its ratings per batch."""
    id = "counting-judge"
    mode = "generate"

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def rate(self, prompts, progress=False):
        out = []
        for _ in prompts:
            if self.fail_after is not None and self.calls >= self.fail_after:
                raise Interrupted
            self.calls += 1
            out.append(Rating(7.0, self.mode, text="Rating: [[7]]"))
        return out


def test_interrupted_evaluation_resumes_without_regenerating_or_rejudging(tiny, tmp_path, monkeypatch):
    _, tok = tiny
    questions = mtbench.load_questions(per_category=1)  # 8 questions, 16 answers, 16 judgments
    generated = []

    def fake_generate(model, tokenizer, prompts, config, progress=False, desc="", temperatures=None):
        if fail[0] is not None and len(generated) >= fail[0]:
            raise Interrupted
        generated.extend(prompts)
        return [f"answer {len(generated) - len(prompts) + i}" for i in range(len(prompts))]

    monkeypatch.setattr(mtbench.chat, "generate", fake_generate)
    run = dict(max_new_tokens=16, batch_size=4, progress=False)

    fail = [6]  # the run dies while generating
    with pytest.raises(Interrupted):
        mtbench.evaluate(FakeModel(), tok, "m", questions, CountingJudge(), tmp_path, **run)
    assert 6 <= len(generated) < 16
    fail = [None]
    judge = CountingJudge(fail_after=5)  # then dies while judging
    with pytest.raises(Interrupted):
        mtbench.evaluate(FakeModel(), tok, "m", questions, judge, tmp_path, **run)
    assert len(generated) == 16 and len(set(generated)) == 16  # each prompt generated exactly once
    assert judge.calls == 5

    judge = CountingJudge()
    answers, judgments = mtbench.evaluate(FakeModel(), tok, "m", questions, judge, tmp_path, **run)
    assert len(generated) == 16  # nothing regenerated
    assert judge.calls == 16 - 4  # only the unfinished judgments (this judge's first batch of 4 was cached)
    assert len(judgments) == 16 and (judgments["rating"] == 7.0).all()
    assert all(len(a) == 2 for a in answers.values())

    judge = CountingJudge()
    mtbench.evaluate(FakeModel(), tok, "m", questions, judge, tmp_path, **run)
    assert len(generated) == 16 and judge.calls == 0  # a finished evaluation costs nothing

    # other generation settings are another evaluation: regenerated and re-judged
    mtbench.evaluate(FakeModel(), tok, "m", questions, judge, tmp_path, **{**run, "max_new_tokens": 32})
    assert len(generated) == 32 and judge.calls == 16


def test_turn_two_is_generated_after_the_first_answer(tiny, tmp_path, monkeypatch):
    _, tok = tiny
    q = mtbench.load_questions(per_category=1, categories=["writing"])
    seen = []

    def fake_generate(model, tokenizer, prompts, config, progress=False, desc="", temperatures=None):
        seen.append((prompts, temperatures))
        return [f"REPLY-{len(seen)}" for _ in prompts]

    monkeypatch.setattr(mtbench.chat, "generate", fake_generate)
    answers = mtbench.generate_answers(FakeModel(), tok, q, "m", tmp_path / "a.jsonl", progress=False)
    assert answers[81] == ["REPLY-1", "REPLY-2"]
    (first, t1), (second, t2) = seen
    assert t1 == t2 == [0.7]  # writing is sampled at 0.7
    assert second[0] == chat.render(tok, [{"role": "user", "content": q[0]["turns"][0]},
                                         {"role": "assistant", "content": "REPLY-1"},
                                         {"role": "user", "content": q[0]["turns"][1]}])


# ---------------------------------------------------------------------------------------------
# the OpenAI-compatible judge over HTTP

SECRET = "sk-test-" + "z9" * 16


@pytest.fixture
def server(monkeypatch):
    with FakeOpenAIServer(default="Rating: [[5]]") as srv:
        monkeypatch.setenv("STARLING_JUDGE_BASE_URL", srv.url)
        monkeypatch.setenv("STARLING_JUDGE_MODEL", "gpt-4")
        monkeypatch.setenv("STARLING_JUDGE_API_KEY", SECRET)
        yield srv


def _api_judge():
    client = llm_client.ChatClient(llm_client.ClientConfig.from_env(temperature=0.0, max_tokens=2048),
                                   sleep=lambda s: None)
    return mtbench.ApiJudge(client=client)


def test_api_judge_retries_and_never_writes_the_key(server, tmp_path):
    judge = _api_judge()
    assert judge.id == "api:gpt-4" and SECRET not in repr(judge)
    q = mtbench.load_questions(per_category=1, categories=["math"])
    server.script = [("status", 429), ("status", 500), ("status", 503), ("ok", "Correct. Rating: [[9]]"),
                     ("ok", "Wrong. Rating: [[2]]")]
    answers = {q[0]["question_id"]: ["a1", "a2"]}
    judgments = mtbench.judge_answers(q, answers, "m", judge, tmp_path / "judgments.jsonl", progress=False)
    assert judgments["rating"].tolist() == [9.0, 2.0] and judgments["error"].isna().all()
    assert len(server.requests) == 5  # three retried failures, then two answers
    req = server.requests[-1]
    assert req["path"] == "/v1/chat/completions" and req["authorization"] == f"Bearer {SECRET}"
    assert req["body"]["model"] == "gpt-4" and req["body"]["temperature"] == 0.0
    assert req["body"]["max_tokens"] == 2048
    assert [m["role"] for m in req["body"]["messages"]] == ["system", "user"]
    assert req["body"]["messages"][1]["content"] == mtbench.judge_prompt(q[0], ["a1", "a2"], 2)[2]
    for path in tmp_path.rglob("*"):
        assert SECRET not in path.read_text(errors="ignore")


def test_failed_api_request_is_rated_minus_one_and_not_cached(server, tmp_path):
    judge = _api_judge()
    q = mtbench.load_questions(per_category=1, categories=["writing"])
    server.script = [("status", 400), ("ok", "Rating: [[6]]")]
    j = mtbench.judge_answers(q, {81: ["a1", "a2"]}, "m", judge, tmp_path / "j.jsonl", progress=False)
    assert j["rating"].tolist() == [-1.0, 6.0] and isinstance(j["error"][0], str)
    assert mtbench.scores(j)["n_failed"].item() == 1
    server.script = [("ok", "Rating: [[4]]")]  # the rerun asks only for the failed one
    j = mtbench.judge_answers(q, {81: ["a1", "a2"]}, "m", judge, tmp_path / "j.jsonl", progress=False)
    assert j["rating"].tolist() == [4.0, 6.0] and len(server.requests) == 3


def test_default_api_judge_is_configured_from_the_environment_with_fastchats_settings(server):
    judge = mtbench.make_judge("gpt-4-0125")  # a model name at the endpoint
    assert judge.id == "api:gpt-4-0125" and SECRET not in repr(judge)
    assert (judge.client.config.temperature, judge.client.config.max_tokens) == (0.0, 2048)
    assert judge.client.config.base_url == server.url
    assert mtbench.make_judge("env").client.config.model == "gpt-4"  # STARLING_JUDGE_MODEL


def test_eval_metrics_adds_the_run_settings_to_the_scores():
    j = _judgments([("a", 81, "writing", 1, 8.0), ("a", 81, "writing", 2, 6.0)])

    class Judge:
        id, mode = "local:tiny:likelihood", "likelihood"

    m = mtbench.eval_metrics(mtbench.scores(j), mtbench.category_scores(j), [{"question_id": 81}], Judge(), {"a": "a"})
    assert m == {**mtbench.score_metrics(mtbench.scores(j)), "eval/mt_bench/num_questions": 1,
                 "eval/mt_bench/judge": "local:tiny:likelihood", "eval/mt_bench/judge_mode": "likelihood",
                 "eval/mt_bench_by_category": {"a": {"writing": 7.0}}, "eval/models": ["a"]}



class PaidClient:
    """A ChatClient on the fake server that dies (as if killed) before its request number `die_at`."""

    def __init__(self, die_at=None):
        self.client = llm_client.ChatClient(llm_client.ClientConfig.from_env(temperature=0.0, max_tokens=2048),
                                            sleep=lambda s: None)
        self.config, self.die_at, self.calls = self.client.config, die_at, 0

    def complete_messages(self, messages):
        if self.die_at is not None and self.calls >= self.die_at:
            raise Interrupted
        self.calls += 1
        return self.client.complete_messages(messages)


def test_a_kill_mid_batch_loses_no_paid_judgment(server, tmp_path):
    q = mtbench.load_questions(per_category=2)[:10]     # 10 questions, 20 judgments, batches of 8
    answers = {x["question_id"]: ["a1", "a2"] for x in q}
    path = tmp_path / "judgments.jsonl"
    with pytest.raises(Interrupted):
        mtbench.judge_answers(q, answers, "m", mtbench.ApiJudge(client=PaidClient(die_at=5)), path, progress=False)
    assert len(server.requests) == 5 and len(path.read_text().splitlines()) == 5   # every paid one is on disk
    j = mtbench.judge_answers(q, answers, "m", mtbench.ApiJudge(client=PaidClient()), path, progress=False)
    assert len(server.requests) == 20                   # the rerun paid for the other 15 only
    assert len(j) == 20 and (j["rating"] == 5.0).all()


def test_a_401_mid_batch_keeps_the_judgments_already_paid(server, tmp_path):
    q = mtbench.load_questions(per_category=1, categories=["writing", "roleplay"])   # 4 judgments, one batch
    answers = {x["question_id"]: ["a1", "a2"] for x in q}
    path = tmp_path / "judgments.jsonl"
    server.script = [("ok", "Rating: [[8]]"), ("ok", "Rating: [[6]]"), ("status", 401, "key revoked")]
    with pytest.raises(llm_client.ClientError, match="http_401"):
        mtbench.judge_answers(q, answers, "m", _api_judge(), path, progress=False)
    assert len(path.read_text().splitlines()) == 2
    j = mtbench.judge_answers(q, answers, "m", _api_judge(), path, progress=False)
    assert len(server.requests) == 3 + 2                # the rerun asks only for the two not yet judged
    assert j["rating"].tolist() == [8.0, 6.0, 5.0, 5.0]


def test_a_judge_that_returns_too_few_ratings_is_an_error(tmp_path):
    class Short(CountingJudge):
        def rate(self, prompts, progress=False):
            return super().rate(prompts)[:-1]

    q = mtbench.load_questions(per_category=1, categories=["writing"])
    with pytest.raises(RuntimeError, match="returned 1 ratings for 2 prompts"):
        mtbench.judge_answers(q, {81: ["a1", "a2"]}, "m", Short(), tmp_path / "j.jsonl", progress=False)


def test_a_batch_of_categories_is_answered_in_one_call_each_at_its_temperature(tiny, tmp_path, monkeypatch):
    _, tok = tiny
    q = mtbench.load_questions(per_category=1, categories=["writing", "math", "stem"])
    calls = []

    def fake_generate(model, tokenizer, prompts, config, progress=False, desc="", temperatures=None):
        calls.append(list(temperatures))
        return ["reply" for _ in prompts]

    monkeypatch.setattr(mtbench.chat, "generate", fake_generate)
    mtbench.generate_answers(FakeModel(), tok, q, "m", tmp_path / "a.jsonl", batch_size=8, progress=False)
    assert calls == [[0.0, 0.1, 0.7]] * 2   # one call per turn, sorted by temperature: math, stem, writing
