"""starling_lib.simulated_judge: the offline ranking judge with a known truth and a set positional
bias, answering judge.RankingRequests through the same parser as a real judge."""

import pytest

from starling_lib import judge
from starling_lib.simulated_judge import SimulatedJudge, SimulatedJudgeConfig


def toy_record(k=7):
    return {"prompt": "\n\nHuman: Name a colour.\n\nAssistant: ",
            "answers": [{"answer": f"colour number {i}", "model": f"model-{i}", "rank": float(i + 1)} for i in range(k)]}


def ranked_by(j, variant, records, **kw):
    """Judge `records` and return the parsed rankings with the requests."""
    out = []
    for i, rec in enumerate(records):
        req = judge.build_request(rec, variant, index=i, **kw)
        out.append((req, judge.parse_ranking(j.complete(req).text, req.k)))
    return out


def true_order(req):
    return sorted(range(req.k), key=lambda p: req.answers[p]["rank"])


@pytest.mark.parametrize("variant", judge.VARIANTS)
def test_without_bias_and_with_wide_gaps_the_simulated_judge_finds_the_truth(variant):
    j = SimulatedJudge(SimulatedJudgeConfig(position_bonus=0, pair_first_bonus=0,
                                            utility_spread=120, tie_margin=0))
    for req, order in ranked_by(j, variant, [toy_record()] * 5):
        assert order == true_order(req)


def test_a_huge_position_bonus_puts_the_first_shown_answer_on_top():
    j = SimulatedJudge(SimulatedJudgeConfig(position_bonus=50, bonus_decay=0.5, utility_spread=0.1))
    winners = [order[0] for _, order in ranked_by(j, "no_pairwise", [toy_record()] * 20)]
    assert winners == [0] * 20


def test_when_every_pair_ties_the_tiebreak_rule_decides():
    # bonuses 1e12, 1e10, ..., 100, 1 logits: the impression orders the display positions for sure
    cfg = SimulatedJudgeConfig(position_bonus=1e12, bonus_decay=0.01, tie_margin=1e9)
    j = SimulatedJudge(cfg)
    for req, order in ranked_by(j, "tiebreak_order_given", [toy_record()] * 5):
        assert [req.letters[p] for p in order] == req.tiebreak_order  # ties go by the given order
    for _, order in ranked_by(j, "baseline_no_tiebreak", [toy_record()] * 5):
        assert order == list(range(7))  # no rule: tied win counts fall back to the biased impression
    static = [order for _, order in ranked_by(j, "tiebreak_order_given_static_2", [toy_record()] * 10)]
    first = "ABCDEFG".index(judge.static_tiebreak_order(7)[0])
    assert {o[0] for o in static} == {first}  # a static order is a positional bias of its own


def test_simulated_judge_is_deterministic_and_reports_token_estimates():
    j = SimulatedJudge()
    req = judge.build_request(toy_record(), "tiebreak_order_given", index=2)
    a, b = j.complete(req), j.complete(req)
    assert a.text == b.text and a.text.count("): ") == 21
    assert a.prompt_tokens == sum(len(m["content"]) for m in req.messages) // 4 > 0


def test_simulated_judge_needs_ranks():
    rec = toy_record()
    del rec["answers"][0]["rank"]
    with pytest.raises(ValueError, match="numeric `rank`"):
        SimulatedJudge().complete(judge.build_request(rec, "no_pairwise"))
