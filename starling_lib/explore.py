"""Tables behind notebook 01: what Nectar contains and what GPT-4's rankings reward.

Each function takes a Nectar `datasets.Dataset` (from `data.load_nectar`) or the per-answer frame
built from it and returns a pandas object or a dict; the notebook only plots and reads them, and
records `nectar_metrics` in its metrics.json.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from starling_lib.stats import CONFIDENCE, normal_interval, t_interval, verdict, wilson_interval


def answers_frame(ds) -> pd.DataFrame:
    """One row per answer: prompt index, answering model, GPT-4 rank, length, prompt facts."""
    rows = []
    for i, rec in enumerate(ds):
        source = rec["source"][0] if rec["source"] else "unknown"
        for a in rec["answers"]:
            rows.append({
                "prompt_idx": i,
                "model": a["model"],
                "rank": int(a["rank"]),
                "answer_chars": len(a["answer"]),
                "answer_words": len(a["answer"].split()),
                "turns": rec["turns"],
                "source": source,
                "good_natured": rec["good_natured"],
            })
    return pd.DataFrame(rows)


def overview(ds, answers: pd.DataFrame) -> dict:
    """Headline counts. A K-answer ranking holds K(K-1)/2 pairwise comparisons."""
    k = np.asarray(ds["num_responses"])
    good = [g for g in ds["good_natured"] if g is not None]
    return {
        "num_prompts": len(ds),
        "num_answers": int(k.sum()),
        "num_pairwise_comparisons": int((k * (k - 1) // 2).sum()),
        "pairwise_comparisons_per_prompt": float((k * (k - 1) / 2).mean()),
        "num_answering_models": int(answers["model"].nunique()),
        "mean_turns": float(np.mean(ds["turns"])),
        "multi_turn_share": float(np.mean(np.asarray(ds["turns"]) > 1)),
        "source_known_share": float(np.mean([s is not None for s in ds["source"]])),
        "good_natured_share": float(np.mean(good)) if good else float("nan"),
        "num_empty_answers": int((answers["answer_chars"] == 0).sum()),
    }


def random_mean_rank(answers: pd.DataFrame) -> float:
    """The mean rank a judge that ranks at random gives every model: (K + 1) / 2, K the mean
    number of answers per prompt (7 in Nectar)."""
    return float((answers.groupby("prompt_idx").size().mean() + 1) / 2)


def model_rank_table(answers: pd.DataFrame, min_answers: int = 10, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Per answering model: answers, mean GPT-4 rank (1 = best) with its standard error and normal
    interval (`rank_ci_low`/`rank_ci_high`), share ranked first, and `vs_random`: "better" or
    "worse" than a random ranking's `random_mean_rank` where the interval excludes it, else
    "indistinguishable".

    Models with fewer than `min_answers` answers are pooled as "other (<min_answers each)", so
    the table stays readable and no answer is left out of it. The interval treats a model's
    answers as independent; they come from different prompts, so they nearly are.
    """
    counts = answers["model"].value_counts()
    small = counts[counts < min_answers].index
    model = answers["model"].where(~answers["model"].isin(small), f"other (<{min_answers} each)")
    table = (answers.assign(model=model, first=answers["rank"] == 1)
             .groupby("model")
             .agg(answers=("rank", "size"), mean_rank=("rank", "mean"),
                  rank_sem=("rank", "sem"), share_ranked_first=("first", "mean"))
             .sort_values("mean_rank"))
    bounds = [normal_interval(m, se, confidence) for m, se in zip(table["mean_rank"], table["rank_sem"])]
    table["rank_ci_low"], table["rank_ci_high"] = [b[0] for b in bounds], [b[1] for b in bounds]
    said = {"below": "better", "above": "worse", "indistinguishable": "indistinguishable"}
    table["vs_random"] = [said[verdict(lo, hi, random_mean_rank(answers))] for lo, hi in bounds]
    return table


def single_models(models: pd.DataFrame) -> pd.DataFrame:
    """The rows of a `model_rank_table` that are one model each (the pooled "other" row is not)."""
    return models[~models.index.str.startswith("other (")]


def length_bias(answers: pd.DataFrame, confidence: float = CONFIDENCE) -> dict:
    """Does GPT-4 prefer longer answers? Correlations of length with rank (rank 1 = best).

    Within-prompt: for each prompt the Spearman correlation between its answers' lengths and
    ranks, averaged over prompts; negative means longer answers rank better. This removes the
    effect of prompts that simply need long answers. Prompts are independent, so the mean's
    standard error is the per-prompt correlations' sd / sqrt(n), with a t-interval
    (`..._ci_low`/`_ci_high`). `longest_ranked_first` is the share of prompts whose longest answer
    was ranked first (chance: 1/K), with its Wilson interval; the pooled correlation, over all
    answers at once, mixes prompts that need long answers with the judge's taste and has no
    interval here (its answers are not independent).
    """
    per_prompt = []
    longest_first = []
    for _, g in answers.groupby("prompt_idx"):
        if g["answer_chars"].nunique() > 1:
            per_prompt.append(stats.spearmanr(g["answer_chars"], g["rank"]).statistic)
        longest_first.append(bool(g.loc[g["answer_chars"].idxmax(), "rank"] == 1))
    pooled = stats.spearmanr(answers["answer_chars"], answers["rank"])
    k = answers.groupby("prompt_idx").size().mean()
    rho = t_interval(per_prompt, confidence)
    first_low, first_high = wilson_interval(sum(longest_first), len(longest_first), confidence)
    return {
        "length_rank_spearman_pooled": float(pooled.statistic),
        "length_rank_spearman_within_prompt": rho["mean"],
        "length_rank_spearman_within_prompt_se": rho["se"],
        "length_rank_spearman_within_prompt_ci_low": rho["ci95_low"],
        "length_rank_spearman_within_prompt_ci_high": rho["ci95_high"],
        "length_rank_spearman_num_prompts": rho["n"],
        "longest_ranked_first": float(np.mean(longest_first)),
        "longest_ranked_first_ci_low": first_low,
        "longest_ranked_first_ci_high": first_high,
        "longest_ranked_first_chance": float(1.0 / k),
    }


def preview(text: str, limit: int = 200, one_line: bool = False) -> str:
    """`text` cut to `limit` characters for printing, marked "… (N more characters)" where cut;
    `one_line` shows line breaks as "⏎" so each text prints on one line."""
    shown = text if len(text) <= limit else text[:limit] + f"… ({len(text) - limit:,} more characters)"
    return shown.replace("\r\n", "⏎").replace("\n", "⏎") if one_line else shown


def count_table(values, name: str) -> pd.DataFrame:
    """Counts and shares of a categorical column, most common first."""
    s = pd.Series(list(values), name=name).value_counts()
    return pd.DataFrame({"count": s, "share": s / s.sum()})


def nectar_metrics(summary: dict, bias: dict, report, split, models: pd.DataFrame, random_rank: float) -> dict:
    """The metrics of notebook 01, keys `nectar/...`.

    summary: `overview`; bias: `length_bias`; report: the `data.LoadReport` of the load;
    split: `data.split_by_prompt` of the prompts; models: `model_rank_table`; random_rank:
    `random_mean_rank`.
    """
    named = single_models(models)
    return {
        **{f"nectar/{k}": v for k, v in summary.items()},
        **{f"nectar/{k}": v for k, v in bias.items()},
        "nectar/num_records_read": report.num_read,
        "nectar/num_records_dropped": sum(report.dropped.values()),
        "nectar/num_train_prompts": len(split["train"]),
        "nectar/num_test_prompts": len(split["test"]),
        "nectar/best_model_by_mean_rank": models["mean_rank"].idxmin(),
        "nectar/mean_rank_by_model": models["mean_rank"].round(4).to_dict(),
        "nectar/mean_rank_ci_low_by_model": models["rank_ci_low"].round(4).to_dict(),
        "nectar/mean_rank_ci_high_by_model": models["rank_ci_high"].round(4).to_dict(),
        "nectar/answers_by_model": models["answers"].astype(int).to_dict(),
        "nectar/models_vs_random": models["vs_random"].to_dict(),
        "nectar/num_models_vs_random": {**{v: int(n) for v, n in named["vs_random"].value_counts().items()},
                                        "models": len(named)},
        "nectar/random_mean_rank": random_rank,
    }
