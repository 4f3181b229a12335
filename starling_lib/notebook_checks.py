"""Parameter values checked before a notebook's kernel starts.

The pipeline (starling_lib/pipeline.py) checks every notebook's parameters by name and declared
type; this module checks their values, for the notebooks whose parameters feed a trainer or a
loader, by building the same config dataclass the notebook will build (validated on construction)
from the same parameters:

    check_notebook("03_kwise_reward_training", params)    # a ValueError naming parameter, value, rule

So `k=1`, `lr=-1`, `steps=0`, `test_fraction=1.5`, `methods=apa,foo`, `eval_every=0` for notebook
04 or a reward-model folder that is not there fail in a second, in the runner, rather than
inside a cell after a kernel has started and a reward model has been trained. A notebook not
listed here has no value checks beyond its own cells.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from starling_lib import hub
from starling_lib.runs import config_from_params


def _check_nectar(params: Mapping[str, Any]) -> None:
    """Notebook 01: the loader's and the split's settings."""
    if params.get("on_error", "raise") not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip'; got {params['on_error']!r}")
    for name, low in (("max_prompts", 0), ("min_answers_per_model", 1)):
        if name in params and params[name] < low:
            raise ValueError(f"{name} must be at least {low}; got {params[name]!r}")
    fraction = params.get("test_fraction", 0.1)
    if not 0 < fraction < 1:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1 (the share of prompts held out); got {fraction!r}")


def _check_reward_model(params: Mapping[str, Any]) -> None:
    """Notebook 03: its RMTrainConfig, as the notebook builds it."""
    from starling_lib.rm_train import RMTrainConfig

    config_from_params(RMTrainConfig, params, output_dir="<run_dir>/03_kwise_reward_training")
    for name in ("baseline_steps", "benchmark_limit"):
        if name in params and params[name] < 0:
            raise ValueError(f"{name} must be at least 0 (0 skips it); got {params[name]!r}")
    if params.get("theory_trials", 1) < 1:
        raise ValueError(f"theory_trials must be at least 1; got {params['theory_trials']!r}")


def _check_policy(params: Mapping[str, Any]) -> None:
    """Notebook 04: a PolicyTrainConfig per method, the evaluation cadence, a named reward model."""
    from starling_lib.policy.config import METHODS, PolicyTrainConfig
    from starling_lib.reward_client import is_reward_server_url

    methods = [m.strip() for m in str(params.get("methods", "")).split(",") if m.strip()]
    if not methods:
        raise ValueError(f"methods must name at least one of {', '.join(METHODS)}; got {params.get('methods')!r}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods={params['methods']!r}: unknown method(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(METHODS)}")
    if params.get("eval_every", 1) < 1:
        raise ValueError(f"eval_every must be at least 1 (the methods are compared on the held-out evaluations); "
                         f"got {params['eval_every']!r}")
    reward_model = params.get("reward_model", "")
    if (reward_model and not is_reward_server_url(reward_model) and not Path(reward_model).is_dir()
            and hub.parse(reward_model) is None):
        raise ValueError(f"reward_model={reward_model!r} is not a folder (notebook 03 writes one to "
                         f"<run_dir>/03_kwise_reward_training/reward_model; \"\" uses this run's), a released "
                         "reward model's hub id (berkeley-nest/Starling-RM-7B-alpha) nor a reward server's http(s):// URL")
    for method in methods:   # as the notebook builds them: each method writes under training/<method>
        config_from_params(PolicyTrainConfig, params, method=method, policy="<initial policy>",
                           reward_model=reward_model or "<notebook 03's>", save_policy=False,
                           output_dir=f"<run_dir>/04_policy_tuning/training/{method}")
    for name, low in (("sft_steps", 1), ("rm_fallback_steps", 1)):
        if name in params and params[name] < low:
            raise ValueError(f"{name} must be at least {low}; got {params[name]!r}")


def _check_evaluation(params: Mapping[str, Any]) -> None:
    """Notebook 05: the AlpacaEval and MMLU settings (the MT-Bench ones are checked as the notebook loads its models)."""
    from starling_lib.alpaca import BUNDLED_OUTPUTS
    from starling_lib.length_control import GLMS
    from starling_lib.mmlu import TASKS

    baselines = [b for b in BUNDLED_OUTPUTS if b != "Starling-LM-7B-alpha"]
    if params.get("alpaca_baseline", baselines[0]) not in baselines:
        raise ValueError(f"alpaca_baseline must be one of {', '.join(baselines)} (the bundled reference outputs); "
                         f"got {params['alpaca_baseline']!r}")
    if params.get("alpaca_lc_glm", "auto") not in GLMS:
        raise ValueError(f"alpaca_lc_glm must be one of {', '.join(GLMS)}; got {params['alpaca_lc_glm']!r}")
    for name in ("alpaca_instructions", "alpaca_lc_bootstrap", "alpaca_max_chars", "mmlu_fewshot", "mmlu_limit"):
        if params.get(name, 0) < 0:
            raise ValueError(f"{name} must be at least 0; got {params[name]!r}")
    if params.get("mmlu_task", "") not in ("", *TASKS):
        raise ValueError(f"mmlu_task must be one of {', '.join(map(repr, TASKS))} or \"\" (skip); got {params['mmlu_task']!r}")


def _check_overoptimisation(params: Mapping[str, Any]) -> None:
    """Notebook 07: its OveroptConfig (methods, the proxy's share and settings, the policy runs'
    batch sizes), and a named gold reward model."""
    from starling_lib.overoptimisation import config_from_params as overopt_config

    overopt_config(params)
    gold = params.get("gold_reward_model", "")
    if gold and not (Path(gold) / "reward_model.json").exists():
        raise ValueError(f"gold_reward_model={gold!r} is not a reward-model folder saved by rm_train (no reward_model.json); "
                         "\"\" uses notebook 03's of this run")
    for name, low in (("rm_fallback_steps", 1), ("heldout_prompts", 0)):
        if name in params and params[name] < low:
            raise ValueError(f"{name} must be at least {low}; got {params[name]!r}")


CHECKS: dict[str, Callable[[Mapping[str, Any]], None]] = {
    "01_nectar_exploration": _check_nectar,
    "03_kwise_reward_training": _check_reward_model,
    "04_policy_tuning": _check_policy,
    "05_mt_bench_evaluation": _check_evaluation,
    "07_reward_overoptimisation": _check_overoptimisation,
}


def check_notebook(stem: str, params: Mapping[str, Any]) -> None:
    """Check the parameter values notebook `stem` will run with; ValueError naming what is wrong."""
    check = CHECKS.get(stem)
    if check is not None:
        check(params)
