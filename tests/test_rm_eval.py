"""starling_lib.rm_eval: ranking metrics, benchmark scoring rules, the Plackett-Luce simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau

from starling_lib.rm_eval import (
    BENCHMARKS,
    LengthReward,
    benchmark_correct,
    evaluate_benchmarks,
    fit_linear_reward,
    length_correlation,
    load_benchmark,
    pair_accuracy,
    prompt_scores,
    ranking_metrics,
    sample_pl_rankings,
    simulate_pl_estimation,
)


# ---------------------------------------------------------------------------------------------
# ranking metrics


def test_pair_accuracy_hand_computed():
    assert pair_accuracy(torch.tensor([[3.0, 2.0, 1.0]])).item() == 1.0
    assert pair_accuracy(torch.tensor([[1.0, 2.0, 3.0]])).item() == 0.0
    # pairs (0,1) tie -> 1/2, (0,2) right, (1,2) right
    assert pair_accuracy(torch.tensor([[1.0, 1.0, 0.0]])).item() == pytest.approx(2.5 / 3)
    # the masked third answer takes no part: only the pair (0, 1), wrong; second list: 3 pairs right
    rewards = torch.tensor([[0.0, 1.0, 9.0], [3.0, 2.0, 1.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert pair_accuracy(rewards, mask).item() == pytest.approx(3 / 4)


def test_prompt_scores_hand_computed_and_tau_matches_scipy():
    s = prompt_scores([3.0, 1.0, 2.0])  # GPT-4 order best first; pairs (0,1) ok, (0,2) ok, (1,2) wrong
    assert s["pair_accuracy"] == pytest.approx(2 / 3)
    assert s["kendall_tau"] == pytest.approx(1 / 3)
    assert s["top1"] == 1.0
    rng = np.random.default_rng(0)
    for _ in range(5):
        r = rng.normal(size=7)
        assert prompt_scores(r)["kendall_tau"] == pytest.approx(kendalltau(r, -np.arange(7)).statistic)


def test_ties_get_no_free_credit():
    # a constant model must score chance, not "the first index wins the argmax"
    s = prompt_scores([0.0] * 7)
    assert s == {"pair_accuracy": 0.5, "top1": pytest.approx(1 / 7), "kendall_tau": 0.0}
    assert prompt_scores([2.0, 2.0, 0.0])["top1"] == 0.5


def test_ranking_metrics_average_pairs_over_all_pairs_and_prompts_equally_for_the_rest():
    m = ranking_metrics([[2.0, 1.0], [1.0, 2.0, 3.0]])   # 1 pair right; 3 pairs wrong
    assert m["pair_accuracy"] == pytest.approx(1 / 4)
    assert m["top1_accuracy"] == pytest.approx(0.5)
    assert m["kendall_tau"] == pytest.approx((1 + -1) / 2)
    assert m["top1_chance"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert m["num_prompts"] == 2 and m["num_pairs"] == 4
    assert m["pair_accuracy_se"] == pytest.approx(np.std([1.0, 0.0], ddof=1) / np.sqrt(2))


# ---------------------------------------------------------------------------------------------
# benchmarks


def test_bundled_benchmarks_have_their_published_sizes():
    sizes = {name: len(load_benchmark(name)) for name in BENCHMARKS}
    assert sizes == {"human_preference": 1000, "truthfulness": 817, "safety": 1000, "verbosity": 30}
    a, b = load_benchmark("safety", limit=50, seed=3), load_benchmark("safety", limit=50, seed=3)
    assert len(a) == 50 and a == b and a != load_benchmark("safety", limit=50, seed=4)
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("helpfulness")


def test_scoring_rules_of_the_starling_authors():
    """As efrick2002/Starling reward-model-training/score.py scores: argmax picks a on a tie."""
    pref = [{"winner": "model_a"}, {"winner": "model_b"}, {"winner": "model_b"}, {"winner": "model_a"}]
    got = benchmark_correct("human_preference", pref, {"response_a": np.array([1.0, 1.0, 2.0, 2.0]),
                                                       "response_b": np.array([0.0, 2.0, 2.0, 2.0])})
    assert got.tolist() == [1.0, 1.0, 0.0, 1.0]                 # a tie counts for a
    safety = [{"safer_response_id": 0}, {"safer_response_id": 1}, {"safer_response_id": 1}]
    got = benchmark_correct("safety", safety, {"response_a": np.array([0.0, 0.0, 1.0]),
                                               "response_b": np.array([1.0, 1.0, 1.0])})
    assert got.tolist() == [0.0, 1.0, 0.0]
    # truthfulness: a true, b false, c best -> [a > b], [c > b], [c >= a] to two decimals
    got = benchmark_correct("truthfulness", [{}] * 4, {"response_a": np.array([1.0, 2.0, 0.0, 1.004]),
                                                       "response_b": np.array([0.0, 0.0, 1.0, 0.0]),
                                                       "response_c": np.array([1.0, 1.0, 0.0, 1.0])})
    assert got == pytest.approx([1.0, 2 / 3, 1 / 3, 1.0])       # 1.0 >= 1.004 once rounded
    got = benchmark_correct("verbosity", [{}] * 3, {"response_a": np.array([3.0, 0.0, 1.0]),
                                                    "response_b": np.array([1.0, 1.0, 1.0])})
    assert got.tolist() == [0.0, 1.0, 0.0]                      # the concise answer b must win outright


def test_evaluate_benchmarks_scores_every_response_of_every_item():
    table = evaluate_benchmarks(LengthReward(), limit=20).set_index("benchmark")
    assert list(table.index) == list(BENCHMARKS) and (table["items"] == 20).all()
    verbose = load_benchmark("verbosity", limit=20)
    expected = np.mean([len(it["response_b"]) > len(it["response_a"]) for it in verbose])
    assert table.loc["verbosity", "accuracy"] == pytest.approx(expected)
    assert table.loc["verbosity", "accuracy"] == 0.0            # the trap: every concise answer is shorter
    assert LengthReward().score(["p", "q"], ["ab", ""]).tolist() == [2.0, 0.0]
    human = load_benchmark("human_preference", limit=20)
    right = np.array([(len(it["response_b"]) > len(it["response_a"])) == (it["winner"] == "model_b") for it in human], float)
    assert table.loc["human_preference", "accuracy_se"] == pytest.approx(right.std(ddof=1) / math.sqrt(20))


def test_length_correlation_hand_computed():
    rows = [{"answers": ["aaa", "aa", "a"]}, {"answers": ["a", "aa", "aaa"]}, {"answers": ["x", "y", "z"]}]
    # prompt 1: rewards follow length (rho 1); prompt 2: rewards 1, 3, 2 against lengths 1, 2, 3 (rho 0.5);
    # prompt 3: all lengths equal, left out
    got = length_correlation([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [0.0, 1.0, 2.0]], rows)
    assert got["num_prompts"] == 2 and got["mean"] == pytest.approx(0.75)
    assert got["se"] == pytest.approx(np.std([1.0, 0.5], ddof=1) / math.sqrt(2))


# ---------------------------------------------------------------------------------------------
# the simulation


def test_plackett_luce_sampling_frequencies():
    # rewards log 1, log 2, log 3: P(first) = 1/6, 2/6, 3/6; P(order 3,2,1) = 3/6 * 2/3
    g = torch.Generator().manual_seed(0)
    features = torch.eye(3, dtype=torch.float64).expand(20000, 3, 3)
    theta = torch.log(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    ranked = sample_pl_rankings(features, theta, g)
    first = ranked[:, 0].argmax(-1)
    freq = torch.bincount(first, minlength=3).double() / 20000
    assert torch.allclose(freq, torch.tensor([1 / 6, 2 / 6, 3 / 6], dtype=torch.float64), atol=0.015)
    order_321 = (ranked.argmax(-1) == torch.tensor([2, 1, 0])).all(-1).double().mean().item()
    assert order_321 == pytest.approx(1 / 3, abs=0.015)


def test_both_estimators_recover_theta_and_errors_shrink_with_more_rankings():
    g = torch.Generator().manual_seed(1)
    theta = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
    ranked = sample_pl_rankings(torch.randn(1000, 5, 3, generator=g, dtype=torch.float64), theta, g)
    for loss in ("kwise", "pairwise"):
        assert (fit_linear_reward(ranked, loss) - theta).norm() < 0.15
    df = simulate_pl_estimation(num_rankings=(20, 400), k=5, dim=4, trials=3)
    means = df.groupby(["estimator", "n"])["error"].mean()
    assert set(df["estimator"]) == {"K-wise MLE (Plackett-Luce)", "pairwise-split MLE"}
    for est in df["estimator"].unique():
        assert means[est, 400] < means[est, 20] / 2             # ~ 1/sqrt(n): 20x data, ~4.5x smaller
    assert math.isfinite(df["error"].max())
