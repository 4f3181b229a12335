"""Positional-bias statistics (starling_lib.bias) on hand-made runs and on the bundled runs."""

import json
import math

import numpy as np
import pytest

from starling_lib import bias


def record(order, k=3, ranks=None):
    """A rating record whose answers are shown in display order; `ranks` are the answers' `rank`."""
    ranks = ranks or list(range(1, k + 1))
    return {"prompt": "\n\nHuman: hi\n\nAssistant: ", "k": k, "ranking_order": order,
            "answers": [{"answer": f"answer {i}", "model": f"m{i}", "rank": ranks[i]} for i in range(k)]}


# Four parsed rankings of K = 3 and one unparsable row. Winners at positions 0, 0, 1, 2.
HAND_RUN = [record([0, 1, 2]), record([0, 2, 1]), record([1, 0, 2]), record([2, 1, 0]), record(None)]


def test_top_position_on_a_hand_made_run():
    orders = bias.ranking_orders(HAND_RUN)
    assert orders.shape == (4, 3) and bias.num_unparsed(HAND_RUN) == 1
    assert bias.top_position_counts(orders).tolist() == [2, 1, 1]
    assert bias.top_position_distribution(orders).tolist() == [0.5, 0.25, 0.25]


def test_position_rank_matrix_on_a_hand_made_run():
    m = bias.position_rank_matrix(bias.ranking_orders(HAND_RUN))
    # rank 1 went to positions 0,0,1,2; rank 2 to 1,2,0,1; rank 3 to 2,1,2,0
    expected = np.array([[0.50, 0.25, 0.25],
                         [0.25, 0.50, 0.25],
                         [0.25, 0.25, 0.50]])
    np.testing.assert_allclose(m, expected)


def test_tv_chi2_and_summary_on_a_hand_made_run():
    s = bias.bias_summary(HAND_RUN, n_boot=200)
    # TV = 1/2 (|1/2 - 1/3| + 2 |1/4 - 1/3|) = 1/6
    assert s["tv_distance"] == pytest.approx(1 / 6)
    # chi2 = sum (O - E)^2 / E with E = 4/3: (4/9 + 1/9 + 1/9) / (4/3) = 1/2; 2 dof: p = exp(-chi2 / 2)
    assert s["chi2"] == pytest.approx(0.5)
    assert s["chi2_p_value"] == pytest.approx(math.exp(-0.25))
    assert s["winner_mean_position"] == pytest.approx((1 + 1 + 2 + 3) / 4)
    # ranked at their own position: 3 answers in [0,1,2], 1 in each of the others; 12 answers
    assert s["rank_equals_position"] == pytest.approx(6 / 12)
    assert s["display_order_kept"] == pytest.approx(1 / 4)
    assert (s["num_ratings"], s["num_unparsed"], s["k"]) == (4, 1, 3)
    assert s["top_position"] == [0.5, 0.25, 0.25]


def test_tv_distance_extremes():
    assert bias.tv_distance([1 / 7] * 7) == pytest.approx(0.0)
    assert bias.tv_distance([1, 0, 0, 0, 0, 0, 0]) == pytest.approx(6 / 7)
    assert bias.tv_distance([0.5, 0.5], [1.0, 0.0]) == pytest.approx(0.5)


def test_bootstrap_interval_is_degenerate_when_every_winner_is_first():
    orders = np.array([[0, 1, 2]] * 30)
    lo, hi = bias.bootstrap_top_position(orders, n_boot=100)
    assert lo.tolist() == [1.0, 0.0, 0.0] and hi.tolist() == [1.0, 0.0, 0.0]


def test_bootstrap_interval_covers_the_estimate_and_shrinks_with_more_prompts():
    small = bias.ranking_orders(HAND_RUN)
    big = np.repeat(small, 25, axis=0)  # same shares, 25 times the prompts
    lo_s, hi_s = bias.bootstrap_top_position(small, n_boot=500, seed=1)
    lo_b, hi_b = bias.bootstrap_top_position(big, n_boot=500, seed=1)
    p = bias.top_position_distribution(big)
    assert np.all(lo_b <= p) and np.all(p <= hi_b)
    assert np.all(hi_b - lo_b < hi_s - lo_s)
    # normal approximation for position 1 with n = 100: 0.5 +- 1.96 * sqrt(0.25 / 100) = 0.5 +- 0.098
    assert hi_b[0] - lo_b[0] == pytest.approx(0.196, abs=0.04)


def test_tv_null_matches_the_normal_approximation():
    # E|p_hat - 1/7| = sqrt(2/pi) sqrt(p (1 - p) / n) per position; TV = 7/2 of that = 0.0709 at n = 190
    expected = 3.5 * math.sqrt(2 / math.pi) * math.sqrt((1 / 7) * (6 / 7) / 190)
    assert bias.tv_null(190, 7, n_sim=4000).mean() == pytest.approx(expected, abs=0.004)


def test_kendall_tau():
    assert bias.kendall_tau([0, 1, 2], [0, 1, 2]) == 1.0
    assert bias.kendall_tau([2, 1, 0], [0, 1, 2]) == -1.0
    assert bias.kendall_tau([0, 2, 1], [0, 1, 2]) == pytest.approx(1 / 3)  # 2 concordant, 1 discordant
    with pytest.raises(ValueError):
        bias.kendall_tau([0, 1, 1], [0, 1, 2])


def test_kendall_tau_a_counts_tied_pairs_as_neither():
    assert bias.kendall_tau_a([3, 2, 1], [30, 20, 10]) == 1.0
    assert bias.kendall_tau_a([1, 2, 3], [3, 2, 1]) == -1.0
    assert bias.kendall_tau_a([2, 2, 0], [2, 1, 0]) == pytest.approx(2 / 3)  # the tied pair counts 0
    assert bias.kendall_tau_a([0] * 7, range(7)) == 0.0
    # two rankings, listed best first, are two scorings by minus the place
    assert bias.kendall_tau([0, 2, 1], [0, 1, 2]) == bias.kendall_tau_a([0, -2, -1], [0, -1, -2])
    with pytest.raises(ValueError, match="same 2 or more items"):
        bias.kendall_tau_a([1, 2], [1, 2, 3])


def test_reference_agreement_uses_the_answers_rank():
    # answers shown with true ranks 3, 1, 2: the true order of positions is [1, 2, 0]
    perfect = record([1, 2, 0], ranks=[3, 1, 2])
    reversed_ = record([0, 2, 1], ranks=[3, 1, 2])
    assert bias.reference_agreement([perfect]) == 1.0
    assert bias.reference_agreement([perfect, reversed_, record(None)]) == pytest.approx(0.0)


def test_tv_bootstrap_is_degenerate_on_an_all_first_run_and_covers_the_estimate():
    all_first = bias.ranking_orders([record([0, 1, 2])] * 20)
    assert np.allclose(bias.bootstrap_tv(all_first, n_boot=50), 2 / 3)  # every resample: TV = 1 - 1/3
    s = bias.bias_summary(HAND_RUN, n_boot=500)
    assert s["tv_ci_low"] <= s["tv_distance"] <= s["tv_ci_high"]


def test_tv_difference_sees_a_large_gap_and_not_a_null_one():
    # 60 rankings with every winner first (TV 2/3) against 60 with winners spread evenly (TV 0)
    front = [record([0, 1, 2])] * 60
    even = [record([p, (p + 1) % 3, (p + 2) % 3]) for p in range(3)] * 20
    d = bias.tv_difference(even, front, n_boot=500)
    assert d["diff"] == pytest.approx(-2 / 3) and d["ci_high"] < 0 and d["verdict"] == "below"
    same = bias.tv_difference(even, even, n_boot=500)
    assert same["diff"] == 0 and same["ci_low"] <= 0 <= same["ci_high"] and same["verdict"] == "indistinguishable"
    changes = bias.tv_changes({"no_pairwise": front, "fixed": even}, n_boot=200)
    assert list(changes) == ["fixed"] and changes["fixed"]["verdict"] == "below"


def test_tau_difference_is_paired_by_prompt_and_skips_unparsed_rows():
    # truth = display order; run a ranks prompts 1, 2 perfectly (tau 1) and prompt 3 reversed (-1);
    # run b ranks all three perfectly and cannot parse a fourth: differences 0, 0, -2 over 3 prompts.
    a = [record([0, 1, 2]), record([0, 1, 2]), record([2, 1, 0]), record([0, 1, 2])]
    b = [record([0, 1, 2]), record([0, 1, 2]), record([0, 1, 2]), record(None)]
    assert bias.prompt_taus(b) == [1.0, 1.0, 1.0, None]
    d = bias.tau_difference(a, b)
    assert d["n"] == 3 and d["diff"] == pytest.approx(-2 / 3)
    half = 4.3027 * (2 / math.sqrt(3)) / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n), sd of (0, 0, -2) = 2/sqrt(3)
    assert d["ci_low"] == pytest.approx(-2 / 3 - half, abs=1e-3) and d["verdict"] == "indistinguishable"
    with pytest.raises(ValueError, match="same prompts"):
        bias.tau_difference(a, b[:3])
    costs = bias.tau_costs({("biased", "v"): a, ("unbiased", "v"): b})
    assert costs["v"]["diff"] == pytest.approx(-2 / 3)


def test_mixed_k_in_one_run_is_refused():
    with pytest.raises(ValueError, match="one K"):
        bias.ranking_orders([record([0, 1, 2]), record([0, 1], k=2)])


def test_a_run_without_any_parsed_ranking_is_a_clear_error():
    with pytest.raises(ValueError, match="no parsed rankings"):
        bias.bias_summary([record(None), record(None)])


# ---------------------------------------------------------------------------------------------
# The bundled runs

# Winner positions counted once by hand from the files (and the file sizes): the analysis must
# reproduce exactly these.
BUNDLED_COUNTS = {
    "no_pairwise": [61, 60, 34, 19, 9, 6, 6],
    "pairwise_no_given_order": [52, 42, 20, 25, 21, 16, 11],
    "pairwise_not_random": [54, 25, 18, 31, 25, 18, 28],
    "baseline_no_tiebreak": [54, 34, 15, 26, 21, 24, 20],
    "tiebreak_order_given": [40, 27, 19, 30, 23, 27, 21],
    "tiebreak_order_given_static_2": [38, 35, 11, 31, 13, 29, 24],
}


@pytest.fixture(scope="module")
def bundled():
    return bias.load_rating_runs()


def test_bundled_runs_load_in_blog_order(bundled):
    assert list(bundled) == list(bias.RATING_VARIANTS) == list(BUNDLED_COUNTS)
    for name, counts in BUNDLED_COUNTS.items():
        orders = bias.ranking_orders(bundled[name])
        assert len(orders) == sum(counts) and orders.shape[1] == 7
        assert bias.top_position_counts(orders).tolist() == counts, name


def test_bundled_plain_ranking_is_strongly_front_loaded(bundled):
    s = bias.bias_summary(bundled["no_pairwise"], n_boot=300)
    assert s["top_position"][0] == pytest.approx(61 / 195)
    assert s["tv_distance"] == pytest.approx(0.3663, abs=1e-4)
    assert s["chi2_p_value"] < 1e-20
    assert s["ci_low"][0] > 1 / 7  # the interval of position 1 excludes no bias


def test_enforced_pair_order_often_just_keeps_the_display_order(bundled):
    # 22 of 199 GPT-4 rankings are exactly A, B, ..., G (chance: 1 in 5040): each pair's first answer "won"
    s = bias.bias_summary(bundled["pairwise_not_random"], n_boot=50)
    assert s["display_order_kept"] == pytest.approx(22 / 199)
    assert bias.bias_summary(bundled["tiebreak_order_given"], n_boot=50)["display_order_kept"] == 0.0


def test_bundled_summary_table_orders_most_to_least_biased(bundled):
    summaries = {name: bias.bias_summary(run, n_boot=100) for name, run in bundled.items()}
    table = bias.summary_table(summaries, bias.RATING_VARIANTS)
    assert table.index[0] == "no_pairwise" and table.index[-1] == "tiebreak_order_given"
    assert list(table["tv_distance"]) == sorted(table["tv_distance"], reverse=True)
    # random tie-break order is the only run whose winner positions pass the test against uniform
    assert table.loc["tiebreak_order_given", "chi2_p_value"] > 0.05
    assert (table.drop(index="tiebreak_order_given")["chi2_p_value"] < 0.001).all()


def test_bias_metrics_of_a_run_with_a_simulated_and_a_live_part():
    from starling_lib.judge import RatingReport
    summaries = {"a": bias.bias_summary(HAND_RUN, n_boot=50), "b": bias.bias_summary(HAND_RUN[:2], n_boot=50)}
    sim_runs = {(who, "a"): HAND_RUN for who in ("biased", "unbiased")}
    sim_summaries = {key: summaries["a"] for key in sim_runs}
    live = RatingReport(variant="a", judge="fake-judge", path="x", prompt_tokens=30, completion_tokens=6)
    m = bias.bias_metrics(summaries, sim_summaries, sim_runs, 5)
    assert m["bias/a/tv_ci_low"] <= m["bias/a/tv_distance"] <= m["bias/a/tv_ci_high"]
    compared = bias.bias_metrics(summaries, sim_summaries, sim_runs, 5,
                                 tv_change={"b": {"diff": 0.5, "ci_low": 0.1, "ci_high": 0.9}},
                                 tau_cost={"a": {"diff": -0.2, "ci_low": -0.3, "ci_high": -0.1}})
    assert (compared["bias/b/tv_change_vs_plain"], compared["bias/b/tv_change_vs_plain_ci_high"]) == (0.5, 0.9)
    assert compared["bias/sim/a/kendall_tau_cost_ci_low"] == -0.3
    assert m["bias/most_biased"] == "b" and m["bias/least_biased"] == "a"  # b: every winner shown first
    assert m["bias/top_position"] == {"a": [0.5, 0.25, 0.25], "b": [1.0, 0.0, 0.0]}
    assert m["bias/a/num_ratings"] == 4 and m["bias/a/tv_distance"] == pytest.approx(1 / 6)
    assert m["bias/sim/num_prompts"] == 5 and m["bias/sim/top_position"] == {"a": [0.5, 0.25, 0.25]}
    assert m["bias/sim/unbiased/a/kendall_tau"] == bias.reference_agreement(HAND_RUN)
    assert m["bias/sim/biased/a/num_unparsed"] == 1 and not any(k.startswith("bias/live") for k in m)
    with_live = bias.bias_metrics(summaries, sim_summaries, sim_runs, 5, summaries["b"], live)
    assert with_live["bias/live/judge"] == "fake-judge" and with_live["bias/live/num_ratings"] == 2
    assert (with_live["bias/live/prompt_tokens"], with_live["bias/live/completion_tokens"]) == (30, 6)
    assert set(with_live) - set(m) == {f"bias/live/{k}" for k in (
        "tv_distance", "chi2_p_value", "num_ratings", "num_unparsed", "top_position", "judge", "prompt_tokens",
        "completion_tokens")}


# ---------------------------------------------------------------------------------------------
# Loading errors

def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_load_accepts_a_folder_and_keeps_unparsed_rows(tmp_path):
    write_lines(tmp_path / "rankings.jsonl", [json.dumps(r) for r in HAND_RUN])
    run = bias.load_rating_run(tmp_path)
    assert len(run) == 5 and bias.num_unparsed(run) == 1


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({**record([0, 1, 2]), "ranking_order": [0, 1, 1]}), "not a permutation"),
    (json.dumps({**record([0, 1, 2]), "ranking_order": [0, 1, 3]}), "not a permutation"),
    (json.dumps({**record([0, 1, 2]), "ranking_order": "A,B,C"}), "not a list of positions"),
    (json.dumps({**record([0, 1, 2]), "k": 7}), "k=7 but 3 answers"),
    (json.dumps({**record([0, 1, 2]), "answers": [{"answer": "only one"}]}), "fewer than 2"),
    (json.dumps({**record([0, 1, 2]), "prompt": None}), "prompt"),
])
def test_malformed_lines_name_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "rankings.jsonl", [json.dumps(record([0, 1, 2])), "", bad])
    with pytest.raises(bias.RatingFormatError, match=message) as err:
        bias.load_rating_run(path)
    assert err.value.line == 3 and str(path) in str(err.value)


def test_empty_run_and_unknown_name(tmp_path):
    with pytest.raises(bias.RatingFormatError, match="no rating records"):
        bias.load_rating_run(write_lines(tmp_path / "rankings.jsonl", [""]))
    with pytest.raises(FileNotFoundError, match="no_pairwise"):
        bias.load_rating_run("no_such_variant")


def test_plot_has_one_panel_per_run_and_the_uniform_line():
    import matplotlib
    matplotlib.use("Agg")
    summaries = {"a": bias.bias_summary(HAND_RUN, n_boot=50), "b": bias.bias_summary(HAND_RUN[:2], n_boot=50)}
    fig = bias.plot_top_position(summaries, {"a": "first run"}, ncols=3)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 2
    assert visible[0].get_title().startswith("first run") and visible[1].get_title().startswith("b")
    assert any(np.allclose(line.get_ydata(), 1 / 3) for line in visible[0].get_lines())
    assert visible[0].get_xlabel() and visible[0].get_ylabel()
