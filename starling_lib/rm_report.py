"""What notebook 03 records of a reward-model run: the `rm/...` metrics of its metrics.json.

    metrics = rm_metrics(result, heldout=heldout, by_length=by_length, benchmarks=benchmarks,
                         benchmarks_by_length=benchmarks_by_length, theory=theory, truncated_share=share,
                         length_corr=length_corr, other=other, other_heldout=other_heldout,
                         baseline=baseline, baseline_heldout=baseline_heldout, baseline_benchmarks=baseline_benchmarks,
                         released=released_reward_model, released_benchmarks=released_benchmarks)
    runs.write_metrics(out_dir, metrics, params)

The inputs are what the library's functions return: the trainer's `RMTrainResult`s
(`rm_train.train_reward_model`, `train_pairwise_baseline`), held-out ranking metrics
(`rm_eval.evaluate_rankings`, `rm_eval.length_correlation`), benchmark tables
(`rm_eval.evaluate_benchmarks`) and the theory check's table (`rm_eval.simulate_pl_estimation`);
a released Starling reward model's benchmark table (`rm_io.load_reward_model` of its hub id) too.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from starling_lib.rm_train import RMTrainResult

KWISE_ESTIMATOR = "K-wise MLE (Plackett-Luce)"     # simulate_pl_estimation's estimator labels
PAIRWISE_ESTIMATOR = "pairwise-split MLE"


def _per_step(result: RMTrainResult) -> float:
    return result.wall_s / max(1, result.steps_run)


def _benchmarks(prefix: str, table) -> dict[str, float]:
    """`prefix/benchmark/<name>` (accuracy) and `<name>_se`, one pair per row of an `evaluate_benchmarks` table."""
    out = {}
    for row in table.to_dict("records"):
        out[f"{prefix}/benchmark/{row['benchmark']}"] = row["accuracy"]
        if "accuracy_se" in row:
            out[f"{prefix}/benchmark/{row['benchmark']}_se"] = row["accuracy_se"]
    return out


def _heldout(prefix: str, heldout: Mapping[str, float]) -> dict[str, float]:
    return {f"{prefix}/heldout_pair_accuracy": heldout["pair_accuracy"],
            f"{prefix}/heldout_pair_accuracy_se": heldout["pair_accuracy_se"],
            f"{prefix}/heldout_top1_accuracy": heldout["top1_accuracy"],
            f"{prefix}/heldout_kendall_tau": heldout["kendall_tau"]}


def rm_metrics(result: RMTrainResult, *, heldout: Mapping[str, float], by_length: Mapping[str, float],
               benchmarks, benchmarks_by_length, theory, truncated_share: float,
               length_corr: Mapping[str, float] | None = None, other: RMTrainResult | None = None,
               other_heldout: Mapping[str, float] | None = None, baseline: RMTrainResult | None = None,
               baseline_heldout: Mapping[str, float] | None = None, baseline_benchmarks=None,
               released: str = "", released_benchmarks=None) -> dict[str, Any]:
    """The metrics of notebook 03, keys `rm/...`.

    result:          the K-wise trainer's run (its config gives backbone, loss and k)
    heldout:         `evaluate_rankings` of result.model on the held-out prompts
    by_length:       the same for `LengthReward` (the "longer is better" reference)
    benchmarks, benchmarks_by_length: `evaluate_benchmarks` of result.model and of LengthReward
    theory:          `simulate_pl_estimation`'s table; the errors at its largest n are recorded
    truncated_share: share of training answers longer than max_length
    length_corr:     `length_correlation` of result.model's held-out rewards (`rm/heldout_length_spearman`)
    other, other_heldout: the same data and steps with the other loss and its held-out metrics
                     (both or none; keys `rm/other_loss/...`)
    baseline, baseline_heldout, baseline_benchmarks: TRL's pairwise run and its evaluations (all three
                     or none; their keys are `rm/baseline/...`)
    released, released_benchmarks: a released reward model's id and its `evaluate_benchmarks` table
                     (both or none; keys `rm/released/...`)
    """
    given = [x is not None for x in (baseline, baseline_heldout, baseline_benchmarks)]
    if any(given) and not all(given):
        raise ValueError("give baseline, baseline_heldout and baseline_benchmarks together, or none of them")
    if (other is None) != (other_heldout is None):
        raise ValueError("give other and other_heldout together, or neither")
    if bool(released) != (released_benchmarks is not None):
        raise ValueError("give released and released_benchmarks together, or neither")
    cfg = result.config
    at_max_n = theory[theory["n"] == theory["n"].max()].groupby("estimator")["error"].mean()
    curve = [{"step": h["step"], "rm/heldout_pair_accuracy": h["rm/heldout_pair_accuracy"]}
             for h in result.history
             if h.get("rm/heldout_pair_accuracy") is not None and not math.isnan(h["rm/heldout_pair_accuracy"])]
    metrics = {
        "rm/backbone": cfg.backbone, "rm/loss_type": cfg.loss, "rm/k": cfg.k,
        "rm/num_train_prompts": result.extra["num_train_prompts"], "rm/num_heldout_prompts": heldout["num_prompts"],
        "rm/steps": result.steps_run, "rm/train_wall_s": result.wall_s, "rm/train_s_per_step": _per_step(result),
        "rm/train_tokens_per_s": result.tokens / max(result.wall_s, 1e-9), "rm/train_sequences": result.sequences,
        "rm/final_train_loss": result.history[-1]["rm/loss"] if result.history else None,
        "rm/heldout_pair_accuracy": heldout["pair_accuracy"], "rm/heldout_pair_accuracy_se": heldout["pair_accuracy_se"],
        "rm/heldout_top1_accuracy": heldout["top1_accuracy"],
        "rm/heldout_top1_chance": heldout["top1_chance"], "rm/heldout_kendall_tau": heldout["kendall_tau"],
        "rm/truncated_share": truncated_share, "rm/model_dir": str(result.model_dir) if result.model_dir else None,
        "rm/reference_length/heldout_pair_accuracy": by_length["pair_accuracy"],
        "rm/reference_length/heldout_top1_accuracy": by_length["top1_accuracy"],
        "rm/theory/kwise_error_at_max_n": float(at_max_n[KWISE_ESTIMATOR]),
        "rm/theory/pairwise_error_at_max_n": float(at_max_n[PAIRWISE_ESTIMATOR]),
        "rm/heldout_curve": curve,
        **_benchmarks("rm", benchmarks),
        **_benchmarks("rm/reference_length", benchmarks_by_length),
    }
    if length_corr is not None:
        metrics.update({"rm/heldout_length_spearman": length_corr["mean"],
                        "rm/heldout_length_spearman_se": length_corr["se"]})
    if other is not None:
        metrics.update({"rm/other_loss/loss_type": other.config.loss, "rm/other_loss/steps": other.steps_run,
                        "rm/other_loss/wall_s": other.wall_s, **_heldout("rm/other_loss", other_heldout)})
    if baseline is not None:
        metrics.update({
            "rm/baseline/steps": baseline.steps_run, "rm/baseline/wall_s": baseline.wall_s,
            "rm/baseline/s_per_step": baseline.wall_s / baseline.steps_run,
            "rm/baseline/train_sequences": baseline.sequences,
            **_heldout("rm/baseline", baseline_heldout),
            "rm/baseline/s_per_step_ratio": (baseline.wall_s / baseline.steps_run) / _per_step(result),
            **_benchmarks("rm/baseline", baseline_benchmarks),
        })
    if released:
        metrics.update({"rm/released/model": released, **_benchmarks("rm/released", released_benchmarks)})
    return metrics
