"""Runs trained outside a notebook, read back for it: notebooks 03 and 04 report a reward model or
policies that `python -m starling_lib.rm_train` / `python -m starling_lib.policy` trained (under
`accelerate launch`, as `make gpu` does: starling_lib/launch.py) as they report their own.

A trainer's output folder (its `output_dir`) holds what the notebook needs:

    reward_model/ or policy/   the trained model (rm_io.save_reward_model / policy.io.save_policy),
                               written only once the run has done all its steps
    history.json               training.run_record: history, evaluations (with the policy
                               trainers' per-response details), this invocation's counts, the config
    checkpoints/               for resuming (kept)

    result = load_rm_run("<run>/03_kwise_reward_training", device="cuda")   # an RMTrainResult
    results = load_policy_runs("<run>/04_policy_tuning/training", ["apa"])  # {method: PolicyTrainResult}

A notebook's parameters that decide what it evaluates must be the trained run's (`check_matches`,
fields RM_MATCH / POLICY_MATCH): the held-out split, the backbone, the loss it names in its plots.
The launcher passes them from the trainer's config, so they agree by construction under `make gpu`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

HISTORY_FILE = "history.json"          # training.HISTORY_FILE (not imported: this module stays light)
RM_MODEL = "reward_model"               # rm_train saves output_dir/reward_model
POLICY_MODEL = "policy"                 # policy trainers save output_dir/policy
RM_DONE = "reward_model.json"           # rm_io.CONFIG_FILE, written last by save_reward_model
POLICY_DONE = "policy_training.json"    # policy.io.save_policy's info file, written last

# Notebook parameters that must equal the trained run's settings for the notebook's report to be
# about that run: notebook 03 rebuilds the held-out split and names the loss and k in its plots
# (its own comparison runs, other_loss and TRL's baseline, still train here with its parameters);
# notebook 04 evaluates the initial policy on the trained runs' held-out prompts with their
# settings and tabulates their budget.
RM_MATCH = ("backbone", "nectar_source", "max_prompts", "train_prompts", "test_fraction", "seed", "k", "loss",
            "max_length")
POLICY_MATCH = ("policy", "nectar_source", "test_fraction", "seed", "max_prompt_tokens", "steps", "rollouts_per_step",
                "responses_per_prompt", "score_norm", "minibatch_size", "micro_batch_size", "epochs_per_batch",
                "max_new_tokens", "top_k", "lr", "unfrozen_layers", "lam", "beta", "clip_eps", "p3o_variant",
                "dpo_beta", "eval_every", "eval_samples", "eval_prompts")


def read_record(folder: str | os.PathLike) -> dict[str, Any]:
    """The trainer's history.json in `folder` (training.run_record), checked to be there."""
    path = Path(folder) / HISTORY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {HISTORY_FILE}; not the output_dir of a finished "
                                "`python -m starling_lib.rm_train` / `starling_lib.policy` run")
    record = json.loads(path.read_text())
    if "config" not in record:
        raise ValueError(f"{path} holds no `config`: written by an older version of training.config_main; "
                         "rerun the trainer in the same output_dir (it resumes at its last step and rewrites it)")
    return record


def rm_run_complete(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a finished reward-model run: its model saved and its history.json written."""
    folder = Path(folder)
    return (folder / RM_MODEL / RM_DONE).is_file() and (folder / HISTORY_FILE).is_file()


def policy_run_complete(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a finished policy run: its policy saved and its history.json written."""
    folder = Path(folder)
    return (folder / POLICY_MODEL / POLICY_DONE).is_file() and (folder / HISTORY_FILE).is_file()


def check_matches(params: Mapping[str, Any], trained: Mapping[str, Any], fields: Sequence[str], what: str) -> None:
    """Raise ValueError naming every parameter in `fields` whose notebook value differs from the
    trained run's setting (`trained`: its config as a dict)."""
    differ = [f"{name}: notebook {params[name]!r}, trained run {trained[name]!r}" for name in fields
              if name in params and name in trained and params[name] != trained[name]
              and not (isinstance(params[name], (int, float)) and isinstance(trained[name], (int, float))
                       and float(params[name]) == float(trained[name]))]
    if differ:
        raise ValueError(f"{what} was trained with other settings than this notebook's parameters: "
                         + "; ".join(differ) + ". Give the notebook the trained run's values "
                         "(make gpu does: starling_lib/launch.py)")


def load_rm_run(folder: str | os.PathLike, device: str | None = None):
    """The reward-model run in `folder` (a finished rm_train output_dir) as an `RMTrainResult`:
    the saved model (loaded on `device`, default the best), its history, counts and config."""
    import dataclasses

    from starling_lib.rm_io import load_reward_model
    from starling_lib.rm_train import RMTrainConfig, RMTrainResult

    folder = Path(folder)
    if not rm_run_complete(folder):
        raise FileNotFoundError(f"{folder}: no finished reward-model run ({RM_MODEL}/{RM_DONE} and {HISTORY_FILE}); "
                                "train it with python -m starling_lib.rm_train CONFIG --set output_dir=" + str(folder))
    record = read_record(folder)
    names = {f.name for f in dataclasses.fields(RMTrainConfig)}
    config = RMTrainConfig(**{k: v for k, v in record["config"].items() if k in names})
    counts = record.get("result", {})
    model = load_reward_model(folder / RM_MODEL, device=None if device in (None, "", "auto") else device)
    return RMTrainResult(model=model, history=record["history"], wall_s=counts.get("wall_s", float("nan")),
                         sequences=counts.get("sequences", 0), tokens=counts.get("tokens", 0),
                         steps_run=counts.get("steps_run", 0), config=config, model_dir=folder / RM_MODEL,
                         extra={"eval_s": counts.get("eval_s", 0.0), **counts.get("extra", {})})


def load_policy_run(folder: str | os.PathLike):
    """The policy run in `folder` (a finished `python -m starling_lib.policy` output_dir) as a
    `PolicyTrainResult` without the model (`policy` and `tokenizer` are None; the tuned model is
    `policy_dir`, a from_pretrained folder): history, evaluations with their details, counts, config."""
    import dataclasses

    from starling_lib.policy.config import PolicyTrainConfig, PolicyTrainResult

    folder = Path(folder)
    if not policy_run_complete(folder):
        raise FileNotFoundError(f"{folder}: no finished policy run ({POLICY_MODEL}/{POLICY_DONE} and {HISTORY_FILE}); "
                                "train it with python -m starling_lib.policy CONFIG --set output_dir=" + str(folder))
    record = read_record(folder)
    if not record.get("eval_details"):
        raise ValueError(f"{folder / HISTORY_FILE}: no evaluation details (eval_every 0?); notebook 04 compares the "
                         "methods on their held-out evaluations")
    names = {f.name for f in dataclasses.fields(PolicyTrainConfig)}
    config = PolicyTrainConfig(**{k: v for k, v in record["config"].items() if k in names})
    counts = record.get("result", {})
    return PolicyTrainResult(policy=None, tokenizer=None, history=record["history"], evals=record["evals"],
                             wall_s=counts.get("wall_s", float("nan")), eval_s=counts.get("eval_s", 0.0),
                             steps_run=counts.get("steps_run", 0), config=config, policy_dir=folder / POLICY_MODEL,
                             extra=counts.get("extra", {}), eval_details=record["eval_details"])


def load_policy_runs(root: str | os.PathLike, methods: Sequence[str]) -> dict[str, Any]:
    """{method: load_policy_run(root/method)} for each method, in order; a missing one is an error naming it."""
    root = Path(root)
    missing = [m for m in methods if not policy_run_complete(root / m)]
    if missing:
        raise FileNotFoundError(f"{root}: no finished policy run for {', '.join(missing)} (expected "
                                f"{root}/<method>/{POLICY_MODEL}/ and {HISTORY_FILE}, as make gpu's launch writes them)")
    return {m: load_policy_run(root / m) for m in methods}


def initial_evaluation(results: Mapping[str, Any]) -> dict | None:
    """The initial policy's held-out evaluation from the runs' step-0 evaluation (every method's is
    the same, prompt for prompt), or None when none has one (a run resumed past step 0 keeps only
    its later evaluations' details)."""
    for res in results.values():
        for detail in res.eval_details:
            if detail.get("step") == 0:
                return {k: v for k, v in detail.items() if k != "step"}
    return None


def _link_or_copy(src: Path, dst: Path) -> Path:
    """A copy of folder `src` at `dst`, by hard links where the filesystem allows (a 7B policy is 14 GB)."""
    if dst.exists():
        shutil.rmtree(dst)

    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    shutil.copytree(src, dst, copy_function=link)
    return dst


def place_policies(run_dir: str | os.PathLike | None, initial_path: str, results: Mapping[str, Any]) -> dict[str, Path]:
    """What `policy.io.save_policies` does for policies trained outside the notebook: each run's saved
    policy linked (or copied) to policies/<method> of the run, where notebook 05 finds it, and the
    initial policy saved there too when it is a local folder."""
    from starling_lib.policy.io import policies_dir, save_initial_policy

    root = policies_dir(run_dir)
    paths = save_initial_policy(root, initial_path)
    for name, res in results.items():
        src = Path(res.policy_dir)
        paths[name] = src if src.resolve() == (root / name).resolve() else _link_or_copy(src, root / name)
    return paths
