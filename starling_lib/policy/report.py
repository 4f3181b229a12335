"""Tables and metrics of a policy-tuning run, for notebook 04's plots and its metrics.json.

Every number a table shows is computed from the run's own evaluations: the held-out rewards of
the initial policy and of each method on the same prompts with the same random numbers, so a
method's gain is paired by prompt and carries its standard error over prompts.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import pandas as pd
import torch

from starling_lib.models import count_parameters, resolve_model
from starling_lib.policy.config import PolicyTrainResult
from starling_lib.rollout import SharedTrunkPolicy


def strip_method(record: dict, method: str) -> dict:
    """{"step": 3, "policy/apa/kl": 0.1} -> {"step": 3, "kl": 0.1} (keys of other methods dropped)."""
    prefix = f"policy/{method}/"
    return {("step" if k == "step" else k[len(prefix):]): v for k, v in record.items()
            if k == "step" or k.startswith(prefix)}


def history_frame(results: dict[str, PolicyTrainResult]):
    """One long table of every method's per-step training metrics: columns method, step, reward_mean, kl, ..."""
    rows = [{"method": name, **strip_method(r, res.config.method)} for name, res in results.items() for r in res.history]
    return pd.DataFrame(rows)


PHASES = ("generate", "score", "forward", "update")   # online.train_online's per-step clock, in step order


def phase_frame(results: dict[str, PolicyTrainResult]):
    """Where an online step's time goes: per method and phase (generate, score, forward, update),
    the median seconds over its steps and the share of the step; columns method, phase, seconds, share.
    DPO (TRL's loop) has no such clock and is left out."""
    rows = []
    for name, res in results.items():
        steps = [strip_method(r, res.config.method) for r in res.history]
        if not steps or "time_generate_s" not in steps[0]:
            continue
        med = {ph: float(pd.Series([r[f"time_{ph}_s"] for r in steps]).median()) for ph in PHASES}
        rows += [{"method": name, "phase": ph, "seconds": v, "share": v / sum(med.values())} for ph, v in med.items()]
    return pd.DataFrame(rows, columns=["method", "phase", "seconds", "share"])


def paired_difference(before: dict, after: dict, key: str = "rewards") -> tuple[float, float]:
    """(mean difference, standard error) of a per-response quantity (`key`: "rewards", "kls",
    "lengths" or "stops")
    from evaluation `before` to `after` of the same prompts.

    Paired by prompt: each prompt's mean over its samples, after minus before; the error is the
    standard error of those differences over prompts.
    """
    b = torch.tensor(before[key]).view(-1, before["samples"]).mean(1)
    a = torch.tensor(after[key]).view(-1, after["samples"]).mean(1)
    if a.shape != b.shape:
        raise ValueError(f"evaluations of different prompt sets ({len(b)} vs {len(a)} prompts)")
    d = a - b
    return d.mean().item(), (d.std() / math.sqrt(len(d))).item() if len(d) > 1 else 0.0


def reward_gain(before: dict, after: dict) -> tuple[float, float]:
    """(mean gain, standard error) in reward from evaluation `before` to `after`: `paired_difference`."""
    return paired_difference(before, after, "rewards")


def summary_table(initial: dict, results: dict[str, PolicyTrainResult]):
    """One row per method: held-out reward of the initial and the tuned policy, the paired gain,
    KL to the initial policy, response length and share stopped with their paired changes from the
    initial policy (NaN for evaluations that kept only the means), and the cost (time, responses,
    optimizer steps)."""
    rows = []
    for name, res in results.items():
        final = res.eval_details[-1]
        gain, se = reward_gain(initial, final)
        changes = {}
        for key, column in (("lengths", "length change"), ("stops", "stopped change")):
            paired = key in initial and key in final
            diff, diff_se = paired_difference(initial, final, key) if paired else (float("nan"), float("nan"))
            changes.update({column: diff, f"{column} s.e.": diff_se})
        rows.append({"method": name, "initial reward": initial["reward_mean"], "final reward": final["reward_mean"],
                     "gain": gain, "gain s.e.": se, "KL to initial": final["kl"], "KL s.e.": final.get("kl_se", float("nan")),
                     "response length": final["response_length"], "stopped": final["stop_frac"], **changes,
                     "train s": res.wall_s, "eval s": res.eval_s,
                     "sequences": res.extra.get("responses_generated", 2 * res.extra.get("num_pairs", 0)),
                     "optimizer steps": res.extra["optimizer_steps"]})
    return pd.DataFrame(rows).set_index("method")


def samples_frame(initial: dict, results: dict[str, PolicyTrainResult], prompts: int = 3):
    """The first sample for the first `prompts` evaluation prompts: the initial policy's and each method's, with rewards."""
    k = initial["samples"]
    rows = []
    for i in range(min(prompts, len(initial["examples"]) // k)):
        first = initial["examples"][i * k]
        rows.append({"prompt": first["prompt"][:80], "policy": "initial", "response": first["response"],
                     "reward": first["reward"]})
        for name, res in results.items():
            e = res.eval_details[-1]["examples"][i * k]
            rows.append({"prompt": first["prompt"][:80], "policy": name, "response": e["response"], "reward": e["reward"]})
    return pd.DataFrame(rows)


def frontier_frame(results: dict[str, PolicyTrainResult]):
    """The reward-against-KL frontier: per method and evaluation, step, eval reward (and its standard
    error) and eval KL to the initial policy, from the held-out evaluations."""
    rows = []
    for name, res in results.items():
        for e in res.evals:
            s = strip_method(e, res.config.method)
            rows.append({"method": name, "step": s["step"], "reward": s["eval_reward_mean"],
                         "reward_se": s["eval_reward_se"], "kl": s["eval_kl"],
                         "response_length": s["eval_response_length"]})
    return pd.DataFrame(rows)


def parameter_counts(name_or_path: str, num_trainable_layers: int) -> dict[str, int]:
    """Parameters of the whole model, of what SharedTrunkPolicy trains, and of its reference copy.

    Counted on the meta device from the config alone: no weights are loaded (cheap for a 7B model).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model(name_or_path)))
    shared = SharedTrunkPolicy(model, num_trainable_layers)
    return {"whole model": count_parameters(model),
            f"trained: top {num_trainable_layers} layers + value head": count_parameters(shared, trainable_only=True),
            f"reference: frozen copy of the top {num_trainable_layers} layers": count_parameters(shared.ref_layers),
            "a separate reference model instead": count_parameters(model)}


def policy_metrics(initial: dict, results: dict[str, PolicyTrainResult], *, initial_path: str, reward_model: str,
                   reward_model_trained_here: bool, num_train_prompts: int, num_eval_prompts: int,
                   saved: Mapping[str, Any], sft: dict | None = None) -> dict[str, Any]:
    """Notebook 04's metrics.json: the run's inputs, the initial policy's held-out reward, and per
    method the held-out reward before and after with the paired gain and its standard error, KL,
    length, cost, where the policy was saved, and the last training batch's metrics.

    initial: `evaluate_initial`'s output; saved: method -> folder (`io.save_policies`);
    sft: `sft.sft_history` of the warm-up when the initial policy is the tiny SFT model.
    """
    table = summary_table(initial, results)
    metrics: dict[str, Any] = {
        "policy/initial_policy": initial_path, "policy/reward_model": str(reward_model),
        "policy/reward_model_trained_here": reward_model_trained_here, "policy/methods": ",".join(results),
        "policy/num_train_prompts": num_train_prompts, "policy/num_eval_prompts": num_eval_prompts,
        "policy/initial/eval_reward_mean": initial["reward_mean"], "policy/initial/eval_reward_se": initial["reward_se"],
        "policy/initial/eval_response_length": initial["response_length"],
        "policy/initial/eval_stop_frac": initial["stop_frac"],
        "policy/frontier": frontier_frame(results).to_dict("records")}
    if sft is not None:
        tail = sft["losses"][-20:]
        metrics.update({"policy/sft/steps": len(sft["losses"]), "policy/sft/wall_s": sft["wall_s"],
                        "policy/sft/final_loss": sum(tail) / len(tail)})
    for name, res in results.items():
        row = table.loc[name]
        metrics.update({f"policy/{name}/eval_reward_initial": row["initial reward"],
                        f"policy/{name}/eval_reward_final": row["final reward"],
                        f"policy/{name}/eval_reward_gain": row["gain"], f"policy/{name}/eval_reward_gain_se": row["gain s.e."],
                        f"policy/{name}/eval_kl_final": row["KL to initial"], f"policy/{name}/eval_kl_final_se": row["KL s.e."],
                        f"policy/{name}/eval_response_length_final": row["response length"],
                        f"policy/{name}/eval_stop_frac_final": row["stopped"], f"policy/{name}/train_wall_s": res.wall_s,
                        f"policy/{name}/eval_s": res.eval_s, f"policy/{name}/optimizer_steps": res.extra["optimizer_steps"],
                        f"policy/{name}/policy_dir": str(saved[name])})
        for column, metric in (("length change", "eval_length_change"), ("stopped change", "eval_stop_frac_change")):
            if not math.isnan(row[column]):   # older evaluations kept only the means
                metrics.update({f"policy/{name}/{metric}": row[column], f"policy/{name}/{metric}_se": row[f"{column} s.e."]})
        if res.config.method != "dpo":
            metrics.update({k: v for k, v in res.history[-1].items() if k.startswith(f"policy/{name}/")})
    return metrics
