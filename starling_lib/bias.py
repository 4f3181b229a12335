"""Positional bias of K-wise ranking judges: rating runs and the statistics of notebook 02.

A *rating run* is a JSONL file in the schema of the Starling authors' rating experiments
(bundled/PROVENANCE.md, "Rating experiments"), one prompt per line:

    prompt:        str, the Nectar conversation
    answers:       the K answers in the order they were SHOWN to the judge (position 0 = "A")
    rating_text:   the judge's output (null when the request itself failed)
    ranking_order: the shown positions from best to worst, so ranking_order[0] is where the winner
                   was shown; null when the judge's output could not be parsed
    model_ranking: the answers' source models, best to worst (optional)
    k:             K

`starling_lib.judge` writes new runs in this schema (with extra fields such as `parse_error`), so the
six bundled runs and any fresh run are analysed by the same functions here.

A judge without positional bias puts the winner at each of the K positions equally often, since
the answers are shuffled before display. The statistics:
  * the top-position distribution P(winner shown at position i), i = 1..K, with a percentile
    bootstrap interval per position (prompts resampled with replacement);
  * the position-by-rank matrix: the share of prompts in which the answer shown at position p got
    rank r (each row and each column sums to 1; all entries are 1/K without bias);
  * a chi-square goodness-of-fit test of the winners' positions against uniform;
  * whether the ranking simply follows the display order: the share of answers ranked at their
    own display position (1/K without bias) and of rankings identical to the display order
    (1/K! without bias);
  * one summary number per run: the total-variation distance from uniform,
    TV = 1/2 sum_i |p_i - 1/K|, and its null distribution for the run's size (a finite run of
    an unbiased judge still has TV > 0: about 0.07 for 190 prompts and K = 7).
Every comparison carries its interval (starling_lib/stats.py): TV has a percentile bootstrap
interval, the difference of two runs' TV an interval from resampling each run (`tv_difference`,
`tv_changes` for each mitigation against the plain ranking), and the cost of a simulated bias in
label quality a paired t-interval over prompts (`tau_difference`, `tau_costs`).
Label quality against a known truth is Kendall's tau (`kendall_tau_a`, the project's one Kendall
tau, which rm_eval uses too); `bias_metrics` assembles notebook 02's metrics.json entries.

Departures from the Starling blog: the bootstrap intervals, the tests, TV, the rank matrix and the
display-order statistics are this project's additions to the blog's top-position bars. The authors'
script skipped prompts whose output it could not parse or whose request failed (the runs whose
arguments are logged asked for 200 prompts; the files hold 181 to 199), so the bundled runs have no
failed rows; runs written by `starling_lib.judge` keep them with `ranking_order: null`, and the
statistics count them apart instead of dropping them silently.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from starling_lib.stats import CONFIDENCE, paired_interval, percentile_interval, verdict

# The six bundled runs, in the order of the Starling blog's positional-bias figures: folder name
# -> a short label for plots and tables.
RATING_VARIANTS: dict[str, str] = {
    "no_pairwise": "plain ranking",
    "pairwise_no_given_order": "pairwise first",
    "pairwise_not_random": "enforced pairwise order",
    "baseline_no_tiebreak": "random pairwise order, no tie-break",
    "tiebreak_order_given": "random tie-break order",
    "tiebreak_order_given_static_2": "static tie-break order",
}

# What each variant asked the judge to do (read off the authors' prompt logs and outputs).
VARIANT_DESCRIPTIONS: dict[str, str] = {
    "no_pairwise": "rank all K answers at once",
    "pairwise_no_given_order": "compare all K(K-1)/2 pairs in an order of the judge's choosing, then rank",
    "pairwise_not_random": "compare the pairs in the given order (A,B), (A,C), ..., (F,G), then rank",
    "baseline_no_tiebreak": "compare the pairs in a given order, shuffled per prompt; no rule for ties",
    "tiebreak_order_given": "as above, ties broken by a TIEBREAK ORDER shuffled per prompt",
    "tiebreak_order_given_static_2": "as above, ties broken by one fixed TIEBREAK ORDER for all prompts",
}


class RatingFormatError(ValueError):
    """A malformed rating-run line: `.path` and `.line` (1-based) say where, `.detail` what."""

    def __init__(self, path: str | os.PathLike, line: int, detail: str):
        self.path, self.line, self.detail = str(path), line, detail
        super().__init__(f"{path}:{line}: {detail}")


# ----------------------------------------------------------------------------------------------
# Loading

def rating_run_path(variant_or_path: str | os.PathLike) -> Path:
    """The rankings.jsonl of a bundled variant (a RATING_VARIANTS key), a folder, or a file."""
    from starling_lib.data import bundled_path
    if isinstance(variant_or_path, str) and variant_or_path in RATING_VARIANTS:
        return bundled_path("nectar_rating_experiments", variant_or_path, "rankings.jsonl")
    path = Path(variant_or_path)
    if path.is_dir():
        path = path / "rankings.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no rating run at {path} (bundled variants: {', '.join(RATING_VARIANTS)})")
    return path


def check_rating_record(rec: Any) -> str | None:
    """Why `rec` is not a valid rating record, or None when it is."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"
    if not isinstance(rec.get("prompt"), str):
        return "prompt missing or not a string"
    answers = rec.get("answers")
    if not isinstance(answers, list) or len(answers) < 2:
        return "answers missing, not a list, or fewer than 2"
    for j, a in enumerate(answers):
        if not isinstance(a, dict) or not isinstance(a.get("answer"), str):
            return f"answers[{j}] has no answer text"
    k = rec.get("k", len(answers))
    if not isinstance(k, int) or isinstance(k, bool) or k != len(answers):
        return f"k={k!r} but {len(answers)} answers"
    order = rec.get("ranking_order")
    if order is not None:
        if not isinstance(order, list) or any(not isinstance(p, int) or isinstance(p, bool) for p in order):
            return f"ranking_order {order!r:.80} is not a list of positions"
        if sorted(order) != list(range(k)):
            return f"ranking_order {order} is not a permutation of 0..{k - 1}"
    return None


def load_rating_run(variant_or_path: str | os.PathLike) -> list[dict]:
    """Read and validate a rating run: a bundled variant name, a run folder or a rankings.jsonl.

    Every line must be a valid record (see `check_rating_record`); the first bad one raises a
    RatingFormatError naming the file and line. Rows whose `ranking_order` is null (the judge's
    output could not be parsed, or the request failed) are kept: `ranking_orders` leaves them out
    and `bias_summary` counts them.
    """
    path = rating_run_path(variant_or_path)
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise RatingFormatError(path, line_no, f"not valid JSON ({e.msg})") from None
            problem = check_rating_record(rec)
            if problem:
                raise RatingFormatError(path, line_no, problem)
            rec.setdefault("k", len(rec["answers"]))
            records.append(rec)
    if not records:
        raise RatingFormatError(path, 0, "no rating records in the file")
    return records


def load_rating_runs(variants: Sequence[str] = tuple(RATING_VARIANTS)) -> dict[str, list[dict]]:
    """Several runs by name or path, in the given order: {name: records}."""
    return {str(v): load_rating_run(v) for v in variants}


# ----------------------------------------------------------------------------------------------
# Statistics

def ranking_orders(records: Sequence[Mapping]) -> np.ndarray:
    """The parsed rankings as an (n, K) int array of display positions, best first.

    Rows with `ranking_order` null are left out (count them with `num_unparsed`).
    """
    orders = [r["ranking_order"] for r in records if r.get("ranking_order") is not None]
    ks = {len(o) for o in orders}
    if len(ks) > 1:
        raise ValueError(f"a rating run must have one K; found rankings of lengths {sorted(ks)}")
    if not orders:
        return np.zeros((0, records[0]["k"] if records else 0), dtype=int)
    return np.asarray(orders, dtype=int)


def num_unparsed(records: Sequence[Mapping]) -> int:
    """Rows without a ranking (unparsable output or failed request)."""
    return sum(r.get("ranking_order") is None for r in records)


def top_position_counts(orders: np.ndarray, k: int | None = None) -> np.ndarray:
    """How often the winner was shown at each position: (K,) counts."""
    k = orders.shape[1] if k is None else k
    return np.bincount(orders[:, 0], minlength=k)


def top_position_distribution(orders: np.ndarray) -> np.ndarray:
    """P(winner shown at position i), i = 0..K-1 (position 1..K in the text)."""
    if len(orders) == 0:
        raise ValueError("no parsed rankings to measure")
    return top_position_counts(orders) / len(orders)


def position_rank_matrix(orders: np.ndarray) -> np.ndarray:
    """(K, K) matrix M[p, r]: share of rankings in which the answer shown at position p got rank r+1."""
    n, k = orders.shape
    m = np.zeros((k, k))
    for rank in range(k):
        m[:, rank] = np.bincount(orders[:, rank], minlength=k)
    return m / n


def tv_distance(p: Sequence[float], q: Sequence[float] | None = None) -> float:
    """Total-variation distance 1/2 sum |p - q|; q defaults to uniform. 0 = unbiased, max 1 - 1/K."""
    p = np.asarray(p, dtype=float)
    q = np.full_like(p, 1.0 / len(p)) if q is None else np.asarray(q, dtype=float)
    return float(0.5 * np.abs(p - q).sum())


def chi2_uniform(counts: Sequence[int]) -> tuple[float, float]:
    """Pearson chi-square test of counts against uniform: (statistic, p-value), K-1 dof."""
    from scipy import stats
    res = stats.chisquare(np.asarray(counts, dtype=float))
    return float(res.statistic), float(res.pvalue)


def bootstrap_top_position(orders: np.ndarray, n_boot: int = 2000, level: float = 0.95,
                           seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of each position's top share: (low, high), each (K,).

    Prompts are resampled with replacement, so the intervals reflect how many prompts the run has.
    """
    n, k = orders.shape
    rng = np.random.default_rng(seed)
    onehot = np.eye(k)[orders[:, 0]]                      # (n, K)
    idx = rng.integers(0, n, size=(n_boot, n))
    shares = onehot[idx].mean(axis=1)                     # (n_boot, K)
    tail = (1.0 - level) / 2
    return np.quantile(shares, tail, axis=0), np.quantile(shares, 1.0 - tail, axis=0)


def bootstrap_tv(orders: np.ndarray, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """TV distance from uniform of `n_boot` bootstrap resamples of the run's prompts: (n_boot,).

    The replicates give TV's percentile interval, and, drawn for two runs, the interval of their
    difference (`tv_difference`). TV of a finite run is biased upwards (an unbiased judge's is
    about 0.07 at 190 prompts), so read a single run's TV against `tv_null`, and a difference
    between runs of similar size, where the bias mostly cancels, against its interval.
    """
    n, k = orders.shape
    rng = np.random.default_rng(seed)
    onehot = np.eye(k)[orders[:, 0]]                      # (n, K)
    idx = rng.integers(0, n, size=(n_boot, n))
    shares = onehot[idx].mean(axis=1)                     # (n_boot, K)
    return 0.5 * np.abs(shares - 1.0 / k).sum(axis=1)     # (n_boot,)


def tv_difference(records_a: Sequence[Mapping], records_b: Sequence[Mapping], n_boot: int = 2000,
                  confidence: float = CONFIDENCE, seed: int = 0) -> dict[str, Any]:
    """TV(a) - TV(b) of two rating runs with its percentile bootstrap interval: keys diff,
    ci_low, ci_high, verdict ("below": a is less biased than b; "above": more; else
    "indistinguishable").

    Each run's prompts are resampled on their own. The six bundled runs share most of their
    prompts, and a judge's bias on a prompt is likely alike across variants, so this interval is
    if anything wider than a paired one would be: a difference it calls distinguishable is.
    """
    a, b = ranking_orders(records_a), ranking_orders(records_b)
    diff = tv_distance(top_position_distribution(a)) - tv_distance(top_position_distribution(b))
    reps = bootstrap_tv(a, n_boot, seed) - bootstrap_tv(b, n_boot, seed + 1)
    low, high = percentile_interval(reps, confidence)
    return {"diff": float(diff), "ci_low": low, "ci_high": high, "verdict": verdict(low, high)}


def tv_null(n: int, k: int, n_sim: int = 5000, seed: int = 0) -> np.ndarray:
    """TV distances from uniform of `n_sim` simulated runs of n prompts by an unbiased judge."""
    rng = np.random.default_rng(seed)
    shares = rng.multinomial(n, np.full(k, 1.0 / k), size=n_sim) / n
    return 0.5 * np.abs(shares - 1.0 / k).sum(axis=1)


def kendall_tau_a(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-a of two scorings of the same items (higher = better in both).

    (concordant - discordant pairs) / all K(K-1)/2 pairs; a pair tied in either scoring counts as
    neither, so ties pull tau towards 0. The one Kendall tau of the project: `kendall_tau` (two
    rankings) and rm_eval (rewards against GPT-4's order) both count pairs here.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.ndim != 1 or x.shape != y.shape or len(x) < 2:
        raise ValueError(f"kendall_tau_a needs two scorings of the same 2 or more items, "
                         f"got shapes {x.shape} and {y.shape}")
    i, j = np.triu_indices(len(x), 1)
    return float((np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])).sum() / len(i))


def kendall_tau(order: Sequence[int], reference: Sequence[int]) -> float:
    """Kendall's tau between two rankings of the same items, each listed best first.

    1 = same order, -1 = reversed: (concordant - discordant pairs) / (K(K-1)/2).
    """
    if sorted(order) != sorted(reference) or len(set(order)) != len(order):
        raise ValueError(f"rankings {list(order)} and {list(reference)} are not of the same items")
    place = {item: i for i, item in enumerate(reference)}
    # Score each item by minus its place, in `order` (the items listed in that order) and in `reference`.
    return kendall_tau_a(-np.arange(len(order)), [-place[item] for item in order])


def prompt_taus(records: Sequence[Mapping]) -> list[float | None]:
    """Per record, Kendall's tau between its parsed ranking and the order of its answers' `rank`
    field; None where the judge's output had no ranking (so two runs over the same prompts stay
    aligned record by record, as `paired_interval` needs).

    In a run of the simulated judge `rank` is the known truth, so this measures label quality. In
    the bundled runs `rank` is Nectar's released label (another GPT-4 ranking), not a truth.
    """
    taus: list[float | None] = []
    for r in records:
        if r.get("ranking_order") is None:
            taus.append(None)
            continue
        ranks = [a.get("rank") for a in r["answers"]]
        if any(x is None for x in ranks):
            raise ValueError("reference_agreement needs a `rank` on every answer")
        truth = sorted(range(len(ranks)), key=lambda p: ranks[p])
        taus.append(kendall_tau(r["ranking_order"], truth))
    return taus


def reference_agreement(records: Sequence[Mapping]) -> float:
    """Mean over the parsed rankings of `prompt_taus`: the run's agreement with the `rank` field."""
    taus = [t for t in prompt_taus(records) if t is not None]
    return float(np.mean(taus)) if taus else float("nan")


def tau_difference(records_a: Sequence[Mapping], records_b: Sequence[Mapping],
                   confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean per-prompt Kendall tau of run a minus run b over the prompts both ranked, with the
    paired t-interval: keys diff, ci_low, ci_high, n, verdict ("below": a agrees less with the
    reference). The two runs must rate the same prompts in the same order (as notebook 02's
    biased and unbiased simulated judges do); a prompt either run could not parse is left out."""
    if len(records_a) != len(records_b) or any(x["prompt"] != y["prompt"] for x, y in zip(records_a, records_b)):
        raise ValueError("tau_difference needs two runs of the same prompts in the same order")
    d = paired_interval(prompt_taus(records_a), prompt_taus(records_b), confidence)
    return {"diff": d["mean"], "ci_low": d["ci95_low"], "ci_high": d["ci95_high"], "n": d["n"],
            "verdict": verdict(d["ci95_low"], d["ci95_high"])}


def bias_summary(records: Sequence[Mapping], n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0) -> dict:
    """Every statistic of one run, as plain Python values.

    num_ratings, num_unparsed, k, top_position (list, P(position 1..K)), ci_low / ci_high (lists),
    tv_distance with tv_ci_low / tv_ci_high (its percentile bootstrap interval), tv_null_mean / tv_null_q95 (TV of an unbiased judge on as many prompts: mean and
    95th percentile), tv_p_value (share of unbiased runs with TV at least as large), chi2,
    chi2_p_value, winner_mean_position (1-based; (K+1)/2 without bias), rank_equals_position
    (share of answers ranked at their own display position; 1/K without bias), display_order_kept
    (share of rankings identical to the display order A, B, C, ...; 1/K! without bias) and
    num_display_order_kept (their number).
    """
    orders = ranking_orders(records)
    n, k = orders.shape
    if n == 0:
        raise ValueError(f"no parsed rankings in this run ({num_unparsed(records)} unparsed rows)")
    p = top_position_distribution(orders)
    lo, hi = bootstrap_top_position(orders, n_boot=n_boot, level=level, seed=seed)
    chi2, chi2_p = chi2_uniform(top_position_counts(orders, k))
    tv = tv_distance(p)
    tv_low, tv_high = percentile_interval(bootstrap_tv(orders, n_boot=n_boot, seed=seed), level)
    null = tv_null(n, k, seed=seed)
    return {
        "num_ratings": int(n),
        "num_unparsed": num_unparsed(records),
        "k": int(k),
        "top_position": [float(x) for x in p],
        "ci_low": [float(x) for x in lo],
        "ci_high": [float(x) for x in hi],
        "tv_distance": tv,
        "tv_ci_low": tv_low,
        "tv_ci_high": tv_high,
        "tv_null_mean": float(null.mean()),
        "tv_null_q95": float(np.quantile(null, 0.95)),
        "tv_p_value": float((null >= tv - 1e-12).mean()),
        "chi2": chi2,
        "chi2_p_value": chi2_p,
        "winner_mean_position": float((orders[:, 0] + 1).mean()),
        "rank_equals_position": float((orders == np.arange(k)).mean()),
        "display_order_kept": float((orders == np.arange(k)).all(axis=1).mean()),
        "num_display_order_kept": int((orders == np.arange(k)).all(axis=1).sum()),
    }


def tv_changes(rating_runs: Mapping[str, Sequence[Mapping]], baseline: str = "no_pairwise", n_boot: int = 2000,
               seed: int = 0) -> dict[str, dict[str, Any]]:
    """`tv_difference` of every run but `baseline` against it, by variant: what each mitigation
    did to the bias, with the interval that says whether it did anything this run can see."""
    return {name: tv_difference(run, rating_runs[baseline], n_boot=n_boot, seed=seed)
            for name, run in rating_runs.items() if name != baseline}


def tau_costs(sim_runs: Mapping[tuple[str, str], Sequence[Mapping]]) -> dict[str, dict[str, Any]]:
    """By variant, `tau_difference` of the biased simulated judge's run against the unbiased one's
    (sim_runs keyed by (judge, variant), judge "biased" / "unbiased"): the label quality the bias
    costs, negative when it flips pairwise labels."""
    variants = [v for who, v in sim_runs if who == "biased"]
    return {v: tau_difference(sim_runs["biased", v], sim_runs["unbiased", v]) for v in variants}


def summary_table(summaries: Mapping[str, Mapping], labels: Mapping[str, str] | None = None):
    """One row per run from `bias_summary` outputs, most biased (largest TV) first."""
    import pandas as pd
    labels = labels or {}
    rows = []
    for name, s in summaries.items():
        rows.append({"run": name, "label": labels.get(name, name), "prompts": s["num_ratings"],
                     "unparsed": s["num_unparsed"], "P(top = 1)": s["top_position"][0],
                     "tv_distance": s["tv_distance"], "tv_ci_low": s["tv_ci_low"], "tv_ci_high": s["tv_ci_high"],
                     "tv_null_q95": s["tv_null_q95"],
                     "chi2": s["chi2"], "chi2_p_value": s["chi2_p_value"],
                     "winner_mean_position": s["winner_mean_position"],
                     "rank_equals_position": s["rank_equals_position"],
                     "display_order_kept": s["display_order_kept"]})
    return pd.DataFrame(rows).sort_values("tv_distance", ascending=False).set_index("run")


# The per-run statistics of `bias_summary` that notebook 02 records in metrics.json.
METRIC_KEYS = ("tv_distance", "tv_ci_low", "tv_ci_high", "tv_null_q95", "chi2", "chi2_p_value", "num_ratings", "winner_mean_position",
               "rank_equals_position", "display_order_kept", "num_display_order_kept")
LIVE_METRIC_KEYS = ("tv_distance", "chi2_p_value", "num_ratings", "num_unparsed")


def bias_metrics(summaries: Mapping[str, Mapping], sim_summaries: Mapping[tuple[str, str], Mapping],
                 sim_runs: Mapping[tuple[str, str], Sequence[Mapping]], num_sim_prompts: int,
                 live_summary: Mapping | None = None, live_report: Any = None,
                 tv_change: Mapping[str, Mapping] | None = None, tau_cost: Mapping[str, Mapping] | None = None,
                 comparisons: Mapping[str, Mapping] | None = None) -> dict:
    """Notebook 02's metrics.json entries, all under `bias/`.

    summaries: `bias_summary` of each bundled run, by variant. sim_summaries and sim_runs: the
    simulated judge's summaries and rating runs by (judge, variant), judge "biased" or "unbiased";
    num_sim_prompts: the prompts each simulated run rated. live_summary and live_report (the
    judge.RatingReport of the live run): None when there was no live run. tv_change: `tv_changes`
    of the bundled runs; tau_cost: `tau_costs` of the simulated runs (each recorded as diff,
    ci_low, ci_high when given); comparisons: any other `tv_difference` / `tau_difference` results
    the notebook reads, by name, recorded as `bias/compare/<name>/diff|ci_low|ci_high`.
    """
    table = summary_table(summaries)
    metrics: dict[str, Any] = {
        "bias/top_position": {name: s["top_position"] for name, s in summaries.items()},
        "bias/top_position_ci_low": {name: s["ci_low"] for name, s in summaries.items()},
        "bias/top_position_ci_high": {name: s["ci_high"] for name, s in summaries.items()},
        "bias/most_biased": table.index[0],
        "bias/least_biased": table.index[-1],
        "bias/sim/num_prompts": num_sim_prompts,
        "bias/uniform_share": 1.0 / next(iter(summaries.values()))["k"],
        "bias/sim/top_position": {variant: s["top_position"] for (who, variant), s in sim_summaries.items()
                                  if who == "biased"},
    }
    for name, s in summaries.items():
        metrics.update({f"bias/{name}/{key}": s[key] for key in METRIC_KEYS})
    for (who, variant), s in sim_summaries.items():
        metrics[f"bias/sim/{who}/{variant}/tv_distance"] = s["tv_distance"]
        metrics[f"bias/sim/{who}/{variant}/num_unparsed"] = s["num_unparsed"]
    for (who, variant), run in sim_runs.items():
        tau = reference_agreement(run)
        metrics[f"bias/sim/{who}/{variant}/kendall_tau"] = tau
        metrics[f"bias/sim/{who}/{variant}/pairs_flipped"] = (1 - tau) / 2  # the share of the K(K-1)/2 labels wrong
    for name, d in (tv_change or {}).items():
        metrics.update({f"bias/{name}/tv_change_vs_plain{suffix}": d[key]
                        for suffix, key in (("", "diff"), ("_ci_low", "ci_low"), ("_ci_high", "ci_high"))})
    for name, d in (comparisons or {}).items():
        metrics.update({f"bias/compare/{name}/{key}": d[key] for key in ("diff", "ci_low", "ci_high")})
    for variant, d in (tau_cost or {}).items():
        metrics.update({f"bias/sim/{variant}/kendall_tau_cost{suffix}": d[key]
                        for suffix, key in (("", "diff"), ("_ci_low", "ci_low"), ("_ci_high", "ci_high"))})
    if live_summary is not None:
        metrics.update({f"bias/live/{key}": live_summary[key] for key in LIVE_METRIC_KEYS})
        metrics.update({"bias/live/top_position": live_summary["top_position"], "bias/live/judge": live_report.judge,
                        "bias/live/prompt_tokens": live_report.prompt_tokens,
                        "bias/live/completion_tokens": live_report.completion_tokens})
    return metrics


def top_position_frame(summaries: Mapping[str, Mapping], labels: Mapping[str, str] | None = None):
    """Long table for plotting: run, label, position (1..K), share, ci_low, ci_high."""
    import pandas as pd
    labels = labels or {}
    rows = []
    for name, s in summaries.items():
        for i, (p, lo, hi) in enumerate(zip(s["top_position"], s["ci_low"], s["ci_high"])):
            rows.append({"run": name, "label": labels.get(name, name), "position": i + 1,
                         "share": p, "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Plots

def plot_top_position(summaries: Mapping[str, Mapping], labels: Mapping[str, str] | None = None,
                      title: str = "Where the winner was shown", ncols: int = 3):
    """One panel per run: P(top = position) with its bootstrap interval and the uniform 1/K line."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    labels = labels or {}
    n = len(summaries)
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.3 * ncols, 3.3 * nrows), sharey=True,
                             layout="constrained", squeeze=False)
    colors = sns.color_palette("crest", n)
    for ax, color, (name, s) in zip(axes.flat, colors, summaries.items()):
        k = s["k"]
        x = np.arange(1, k + 1)
        p, lo, hi = (np.asarray(s[f]) for f in ("top_position", "ci_low", "ci_high"))
        ax.bar(x, p, yerr=[p - lo, hi - p], capsize=3, color=color, ecolor="black", label="observed, 95% CI")
        ax.axhline(1 / k, color="firebrick", ls="--", lw=1.2, label=f"no bias (1/{k})")
        ax.set(title=f"{labels.get(name, name)}\nTV = {s['tv_distance']:.2f}, n = {s['num_ratings']}",
               xlabel="display position of the winner", xticks=x)
    for ax in axes[:, 0]:
        ax.set_ylabel("P(winner at position)")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    axes.flat[0].legend(loc="upper right", fontsize="small")
    fig.suptitle(title)
    return fig


def plot_tv_changes(changes: Mapping[str, Mapping], labels: Mapping[str, str] | None = None,
                    title: str = "Change in TV distance against the plain ranking"):
    """One row per run of `tv_changes`: TV(run) - TV(baseline) with its 95% interval, and the
    zero line (no change). Left of it the mitigation lowered the bias."""
    import matplotlib.pyplot as plt
    labels = labels or {}
    names = list(changes)
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(names) + 1.4), layout="constrained")
    y = np.arange(len(names))
    diff = np.array([changes[n]["diff"] for n in names])
    low = np.array([changes[n]["ci_low"] for n in names])
    high = np.array([changes[n]["ci_high"] for n in names])
    colors = ["C0" if changes[n]["verdict"] == "below" else "C3" if changes[n]["verdict"] == "above" else "grey"
              for n in names]
    ax.hlines(y, low, high, colors=colors, lw=2.5)
    ax.scatter(diff, y, color=colors, zorder=3, label="change, 95% bootstrap interval")
    ax.axvline(0, color="black", ls="--", lw=1, label="no change")
    ax.set_yticks(y, [labels.get(n, n) for n in names])
    ax.invert_yaxis()
    ax.set(title=title, xlabel="TV(variant) - TV(plain ranking)  (negative = less positional bias)",
           ylabel="prompting variant")
    ax.legend(loc="lower right", fontsize="small")
    return fig
