"""The ranking judge (starling_lib.judge): requests, parsing, the runner and its cache (with the
simulated judge), and the API judge end to end against a scripted OpenAI-compatible server on
127.0.0.1 (the client's retries and errors are in test_llm_client.py)."""

import itertools
from collections import Counter

import pytest
from fake_openai import FAST_RETRIES, KEY, FakeOpenAIServer, point_env_at

from starling_lib import bias, judge, llm_client
from starling_lib.data import load_nectar
from starling_lib.jsonl_cache import JsonlCache
from starling_lib.simulated_judge import SimulatedJudge, SimulatedJudgeConfig



@pytest.fixture(scope="module")
def nectar():
    return list(load_nectar().select(range(12)))


def toy_record(k=7):
    return {"prompt": "\n\nHuman: Name a colour.\n\nAssistant: ",
            "answers": [{"answer": f"colour number {i}", "model": f"model-{i}", "rank": float(i + 1)} for i in range(k)]}


# ---------------------------------------------------------------------------------------------
# Requests

def test_request_shuffles_letters_and_records_the_permutation():
    rec = toy_record()
    req = judge.build_request(rec, "no_pairwise", index=5, seed=1)
    assert sorted(req.permutation) == list(range(7)) and req.permutation != list(range(7))
    assert [a["answer"] for a in req.answers] == [rec["answers"][i]["answer"] for i in req.permutation]
    user = req.messages[1]["content"]
    for letter, a in zip("ABCDEFG", req.answers):  # each answer under its letter, in display order
        assert f"[ANSWER {letter}]\n{a['answer']}\n[END OF ANSWER {letter}]" in user
    assert user.index("[ANSWER A]") < user.index("[ANSWER G]")
    system = req.messages[0]["content"]
    assert "Helpfulness" in system and "Harmlessness" in system
    assert "[['_', '_', '_', '_', '_', '_', '_']]" in system


def test_request_is_deterministic_and_shares_the_shuffle_across_variants():
    rec = toy_record()
    a = judge.build_request(rec, "tiebreak_order_given", index=3, seed=0)
    b = judge.build_request(rec, "tiebreak_order_given", index=3, seed=0)
    assert a.messages == b.messages and a.permutation == b.permutation
    assert judge.build_request(rec, "no_pairwise", index=3, seed=0).permutation == a.permutation
    assert judge.build_request(rec, "no_pairwise", index=4, seed=0).permutation != a.permutation


def test_each_variant_gets_its_pair_order_and_tiebreak_rule():
    rec = toy_record()
    lexicographic = list(itertools.combinations("ABCDEFG", 2))
    reqs = {v: judge.build_request(rec, v, index=0) for v in judge.VARIANTS}
    assert reqs["no_pairwise"].pair_order is None and reqs["pairwise_no_given_order"].pair_order is None
    assert reqs["pairwise_not_random"].pair_order == lexicographic
    for v in ("baseline_no_tiebreak", "tiebreak_order_given", "tiebreak_order_given_static_2"):
        assert sorted(reqs[v].pair_order) == lexicographic and reqs[v].pair_order != lexicographic
        assert "PAIRWISE ORDER: (" in reqs[v].messages[1]["content"]
    assert [v for v in judge.VARIANTS if reqs[v].tiebreak_order] == ["tiebreak_order_given", "tiebreak_order_given_static_2"]
    assert "TIEBREAK ORDER" not in reqs["baseline_no_tiebreak"].messages[0]["content"]
    assert "TIEBREAK ORDER: " in reqs["tiebreak_order_given"].messages[1]["content"]
    # the static order is the same for every prompt; the random one is not
    static = {tuple(judge.build_request(rec, "tiebreak_order_given_static_2", index=i).tiebreak_order) for i in range(5)}
    rand = {tuple(judge.build_request(rec, "tiebreak_order_given", index=i).tiebreak_order) for i in range(5)}
    assert static == {tuple(judge.static_tiebreak_order(7))} and len(rand) > 1


def test_request_for_a_smaller_k():
    req = judge.build_request(toy_record(), "pairwise_not_random", index=0, k=4)
    assert req.k == 4 and len(req.answers) == 4 and len(set(req.permutation)) == 4
    user = req.messages[1]["content"]
    assert "[ANSWER D]" in user and "[ANSWER E]" not in user
    assert req.pair_order == list(itertools.combinations("ABCD", 2))
    assert "compare the answers two at a time" in req.messages[0]["content"]
    with pytest.raises(ValueError, match="K=8"):
        judge.build_request(toy_record(), "no_pairwise", k=8)
    with pytest.raises(ValueError, match="unknown variant"):
        judge.build_request(toy_record(), "best_of_luck")


# ---------------------------------------------------------------------------------------------
# Parsing

@pytest.mark.parametrize("text, expected", [
    ("This is a good natured conversation.\n\nRanking: [['C', 'A', 'B']]", [2, 0, 1]),
    ("Draft: [['A', 'B', 'C']]\nOn reflection, final: [['B', 'C', 'A']]", [1, 2, 0]),  # the last one counts
    ("[('C', 'A', 'B')]", [2, 0, 1]),                      # a tuple in a list
    ('[["C", "A", "B"]]', [2, 0, 1]),                      # double quotes
    ("[[C, A, B]]", [2, 0, 1]),                            # bare letters
    ("[['c', 'a', 'b']]", [2, 0, 1]),                      # lower case
    ("[['Model C', 'Model A', 'Model B']]", [2, 0, 1]),
    ("[['C', 'A', 'B',]]", [2, 0, 1]),                     # trailing comma
    ("('A', 'B'): B\n('A', 'C'): C\nFinal Ranking: ['C', 'B', 'A']", [2, 1, 0]),  # flat list after pair lines
    ("A vs B: B\nFinal ranking: C, B, A.", [2, 1, 0]),     # bare letters ending a line
    ("Sure! Here it is:\n\n[['B', 'A', 'C']]\n\nHope this helps.", [1, 0, 2]),  # extra text around
])
def test_parse_accepts(text, expected):
    assert judge.parse_ranking(text, 3) == expected


@pytest.mark.parametrize("text, kind, mentions", [
    ("[['A', 'B', 'B']]", "duplicate_letters", "B repeated"),
    ("[['A', 'B']]", "missing_letters", "C not ranked"),
    ("[['A', 'B', 'C', 'D']]", "unknown_letters", "D with K=3"),    # a ranking for the wrong K
    ("[['A', 'B', 'H']]", "unknown_letters", "H"),
    ("[('A', 'B'), ('B', 'C'), ('A', 'C')]", "no_ranking", "output ends"),  # a list of pairs is no ranking
    ("[['1', '2', '3']]", "not_letters", "'1'"),
    ("[['best', 'A', 'B']]", "not_letters", "best"),
    ("I cannot decide between these answers.", "no_ranking", "cannot decide"),
    ("", "no_ranking", "empty"),
    (None, "no_ranking", "empty"),
])
def test_parse_refuses_with_a_reason(text, kind, mentions):
    with pytest.raises(judge.RankingParseError) as err:
        judge.parse_ranking(text, 3)
    assert err.value.kind == kind and mentions in str(err.value)


def test_parser_recovers_every_ranking_in_the_authors_runs():
    """Our parser reads all 1143 GPT-4 outputs of the bundled runs as the authors' pipeline did."""
    n = 0
    for name, run in bias.load_rating_runs().items():
        for rec in run:
            assert judge.parse_ranking(rec["rating_text"], rec["k"]) == rec["ranking_order"], name
            n += 1
    assert n == 1143


# ---------------------------------------------------------------------------------------------
# Runner and cache

def test_runner_writes_the_rating_experiment_schema(tmp_path, nectar):
    out = tmp_path / "run" / "rankings.jsonl"
    report = judge.rate_dataset(nectar, SimulatedJudge(), "tiebreak_order_given", out, progress=False)
    assert (report.num_prompts, report.num_ranked, report.num_cached) == (12, 12, 0)
    assert report.prompt_tokens > 0 and not report.parse_errors
    run = bias.load_rating_run(out.parent)  # the analysis reads it like the authors' runs
    assert len(run) == 12
    for row, rec in zip(run, nectar):
        assert row["prompt"] == rec["prompt"] and row["k"] == 7 and row["variant"] == "tiebreak_order_given"
        assert [a["answer"] for a in row["answers"]] == [rec["answers"][i]["answer"] for i in row["permutation"]]
        assert row["model_ranking"] == [row["answers"][p]["model"] for p in row["ranking_order"]]
        assert row["parse_error"] is None and row["request_error"] is None
    assert bias.bias_summary(run, n_boot=20)["num_ratings"] == 12


def test_runner_takes_any_iterable_and_a_limit(tmp_path, nectar):
    report = judge.rate_dataset((r for r in nectar), SimulatedJudge(), "no_pairwise", tmp_path / "r.jsonl",
                                limit=3, progress=False)
    assert report.num_prompts == 3 and [r["index"] for r in bias.load_rating_run(tmp_path / "r.jsonl")] == [0, 1, 2]
    assert not (tmp_path / "r.jsonl.tmp").exists()


def test_unparsable_outputs_are_kept_and_counted(tmp_path, nectar):
    j = SimulatedJudge(SimulatedJudgeConfig(malformed_rate=1.0))
    out = tmp_path / "rankings.jsonl"
    with pytest.warns(UserWarning, match="unparsable output"):
        report = judge.rate_dataset(nectar[:4], j, "no_pairwise", out, progress=False)
    assert report.num_ranked == 0 and report.parse_errors == Counter({"missing_letters": 4})
    assert "prompt 0: missing_letters" in report.examples[0] and "output ends" in report.examples[0]
    rows = bias.load_rating_run(out)
    assert len(rows) == 4 and all(r["ranking_order"] is None and "not ranked" in r["parse_error"] for r in rows)
    assert all(r["rating_text"] for r in rows)  # the raw output is kept for inspection


class CountingJudge:
    """Wraps a judge, counts calls, and can stop the run like Ctrl-C after `stop_after` calls."""

    def __init__(self, inner, stop_after=None):
        self.inner, self.stop_after, self.calls = inner, stop_after, 0
        self.name = inner.name

    def cache_identity(self):
        return self.inner.cache_identity()

    def complete(self, request):
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise KeyboardInterrupt
        self.calls += 1
        return self.inner.complete(request)


def test_an_interrupted_run_resumes_without_asking_again(tmp_path, nectar):
    cache, out = tmp_path / "cache.jsonl", tmp_path / "rankings.jsonl"
    first = CountingJudge(SimulatedJudge(), stop_after=5)
    with pytest.raises(KeyboardInterrupt):
        judge.rate_dataset(nectar, first, "pairwise_not_random", out, cache_path=cache, progress=False)
    assert first.calls == 5 and len(cache.read_text().splitlines()) == 5 and not out.exists()

    second = CountingJudge(SimulatedJudge())
    report = judge.rate_dataset(nectar, second, "pairwise_not_random", out, cache_path=cache, progress=False)
    assert second.calls == 7 and report.num_cached == 5 and report.num_ranked == 12
    assert report.cached_prompt_tokens > 0
    # the resumed run is the run that was never interrupted
    judge.rate_dataset(nectar, SimulatedJudge(), "pairwise_not_random", tmp_path / "fresh.jsonl", progress=False)
    resumed, fresh = bias.load_rating_run(out), bias.load_rating_run(tmp_path / "fresh.jsonl")
    assert [r["rating_text"] for r in resumed] == [r["rating_text"] for r in fresh]
    assert [r["cached"] for r in resumed] == [True] * 5 + [False] * 7


def test_a_torn_cache_line_is_skipped_and_that_prompt_asked_again(tmp_path, nectar):
    cache, out = tmp_path / "cache.jsonl", tmp_path / "rankings.jsonl"
    judge.rate_dataset(nectar[:3], SimulatedJudge(), "no_pairwise", out, cache_path=cache, progress=False)
    lines = cache.read_text().splitlines()
    cache.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:40])  # the last write was cut short
    counting = CountingJudge(SimulatedJudge())
    with pytest.warns(UserWarning, match="skipped 1 unreadable line"):
        report = judge.rate_dataset(nectar[:3], counting, "no_pairwise", out, cache_path=cache, progress=False)
    assert counting.calls == 1 and report.num_cached == 2
    with pytest.warns(UserWarning, match="skipped 1 unreadable line"):
        assert len(JsonlCache(cache, judge.CACHE_KEY_FIELDS)) == 3  # the new row did not glue onto the torn one


def test_the_cache_depends_on_the_judge_settings(tmp_path, nectar):
    cache = tmp_path / "cache.jsonl"
    judge.rate_dataset(nectar[:2], SimulatedJudge(), "no_pairwise", tmp_path / "a.jsonl", cache_path=cache,
                       progress=False)
    other = CountingJudge(SimulatedJudge(SimulatedJudgeConfig(position_bonus=0.0)))
    judge.rate_dataset(nectar[:2], other, "no_pairwise", tmp_path / "b.jsonl", cache_path=cache, progress=False)
    assert other.calls == 2


# ---------------------------------------------------------------------------------------------
# The API judge, against a scripted server on loopback

GOOD = "This is a good natured conversation.\n\nRanking: [['B', 'A', 'C', 'D', 'E', 'F', 'G']]"


@pytest.fixture
def server():
    with FakeOpenAIServer(default=GOOD) as srv:
        yield srv


@pytest.fixture
def env(monkeypatch, server):
    point_env_at(monkeypatch, server.url)


def http_judge(**overrides):
    settings = {**FAST_RETRIES, **overrides}
    return judge.OpenAIJudge(llm_client.ChatClient(llm_client.ClientConfig.from_env(**settings), sleep=lambda s: None))


def test_api_judge_sends_the_request_messages(env, server):
    j = judge.OpenAIJudge()
    request = judge.build_request(toy_record(), "no_pairwise")
    reply = j.complete(request)
    assert reply.text == GOOD and j.name == "fake-judge" and KEY not in repr(j)
    assert server.requests[0]["body"]["messages"] == request.messages
    assert j.cache_identity() == {"model": "fake-judge", "temperature": 0.0, "max_tokens": None}


def test_http_end_to_end_with_cache_resume_tokens_and_no_key_on_disk(env, server, tmp_path, nectar):
    records = nectar[:6]
    server.script = [("status", 500), ("ok", GOOD), ("ok", "I think they are all lovely."),
                     ("status", 400, f"bad request from key {KEY}")]
    j = http_judge(max_retries=2)
    out, cache = tmp_path / "live" / "rankings.jsonl", tmp_path / "live" / "cache.jsonl"
    with pytest.warns(UserWarning, match="failed request"):
        report = judge.rate_dataset(records, j, "no_pairwise", out, cache_path=cache, progress=False)
    # prompt 0: 500 then ok; 1: unparsable; 2: rejected (400); 3-5: ok
    assert (report.num_prompts, report.num_ranked, report.retries) == (6, 4, 1)
    assert report.parse_errors == Counter({"no_ranking": 1}) and report.request_errors == Counter({"http_400": 1})
    assert (report.prompt_tokens, report.completion_tokens) == (500, 100)  # 5 answered requests
    rows = bias.load_rating_run(out)
    assert rows[0]["ranking_order"] == [1, 0, 2, 3, 4, 5, 6] and rows[0]["judge"] == "fake-judge"
    assert rows[1]["ranking_order"] is None and "no_ranking" in rows[1]["parse_error"]
    assert rows[2]["rating_text"] is None and "http_400" in rows[2]["request_error"]
    assert len(JsonlCache(cache, judge.CACHE_KEY_FIELDS)) == 5  # the failed request is not cached

    # Resume: only the failed prompt is asked again; everything else comes from the cache.
    before = len(server.requests)
    j2 = http_judge()
    with pytest.warns(UserWarning, match="unparsable output"):  # the cached unparsable reply is counted again
        report2 = judge.rate_dataset(records, j2, "no_pairwise", out, cache_path=cache, progress=False)
    assert len(server.requests) - before == 1 and report2.num_cached == 5 and report2.num_ranked == 5
    assert report2.cached_prompt_tokens == 500 and report2.prompt_tokens == 100

    assert all(r["authorization"] == f"Bearer {KEY}" for r in server.requests)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY not in path.read_text(), f"the API key leaked into {path}"
    assert KEY not in str(report) + str(report2)


def test_consecutive_failures_stop_the_run_with_partial_output(env, server, tmp_path, nectar):
    server.script = [("status", 502)] * 20
    j = http_judge(max_retries=0)
    out = tmp_path / "rankings.jsonl"
    with pytest.raises(llm_client.ClientError, match="3 requests in a row failed"):
        judge.rate_dataset(nectar, j, "no_pairwise", out, progress=False, max_consecutive_failures=3)
    rows = bias.load_rating_run(out)
    assert len(rows) == 3 and all("server_error_502" in r["request_error"] for r in rows)
