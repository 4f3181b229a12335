"""Policies on disk: saving tuned policies where notebook 05 finds them, and finding (or
training) the reward model notebook 03 left in the run folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

from starling_lib.models import load_model_and_tokenizer
from starling_lib.policy.config import PolicyTrainResult
from starling_lib.rm_io import CONFIG_FILE, reward_model_dir
from starling_lib.rm_train import RMTrainConfig, train_reward_model
from starling_lib.runs import POLICY_STAGE, stage_dir


def save_policy(model, tokenizer, path: str | os.PathLike, info: dict | None = None) -> Path:
    """Save a causal LM and its tokenizer as a from_pretrained folder (what notebook 05 loads)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    if info is not None:
        (path / "policy_training.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    return path


def policies_dir(run_dir: str | os.PathLike | None) -> Path:
    """`run_dir/04_policy_tuning/policies`: one from_pretrained folder per policy, for notebook 05."""
    return stage_dir(run_dir, POLICY_STAGE) / "policies"


def save_policies(run_dir: str | os.PathLike | None, initial_path: str,
                  results: dict[str, PolicyTrainResult]) -> dict[str, Path]:
    """Save every tuned policy, and the initial one when it is a local folder, as from_pretrained
    folders in `policies_dir(run_dir)`, where notebook 05 finds them: policies/<method>, policies/initial.

    An initial policy from the hub (e.g. openchat/openchat_3.5) is not copied: notebook 05 takes
    hub ids directly (its `models` parameter).
    """
    root = policies_dir(run_dir)
    paths = save_initial_policy(root, initial_path)
    for name, res in results.items():
        paths[name] = save_policy(res.policy.model, res.tokenizer, root / name,
                                  {"method": res.config.method, "training": res.config.fingerprint()})
    return paths


def save_initial_policy(root: Path, initial_path: str) -> dict[str, Path]:
    """{"initial": root/initial} with the initial policy saved there when it is a local folder, else {}."""
    if not Path(initial_path).is_dir():
        return {}
    model, tokenizer = load_model_and_tokenizer(initial_path, device="cpu")
    return {"initial": save_policy(model, tokenizer, root / "initial", {"method": "initial", "source": initial_path})}


def load_or_train_reward_model(run_dir: str | os.PathLike | None, steps: int = 30, device: str = "auto",
                               seed: int = 0, progress: bool = True) -> tuple[Path, bool]:
    """(folder of notebook 03's reward model in this run, whether it had to be trained here).

    When notebook 03 has not run in `run_dir`, trains a small K-wise reward model on the tiny
    backbone with rm_train (notebook 03's default settings, `steps` steps) and saves it where
    notebook 03 would have, so later runs reuse it.
    """
    path = reward_model_dir(run_dir)
    if (path / CONFIG_FILE).exists():
        return path, False
    cfg = RMTrainConfig(backbone="tiny", steps=steps, device=device, seed=seed, output_dir=str(path.parent),
                        progress=progress)   # the other settings: RMTrainConfig's defaults, notebook 03's demo
    result = train_reward_model(cfg)
    assert result.model_dir == path, (result.model_dir, path)
    return path, True
