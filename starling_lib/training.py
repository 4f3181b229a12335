"""Plumbing the trainers share: configs, the step -> batch schedule, the accelerator, checkpoints
and resuming, the learning-rate schedule, mixed precision, the command line.

The reward-model trainer (rm_train), the online policy trainer (policy.online), DPO (policy.dpo)
and the SFT warm-up (sft) are written top to bottom, each readable alone; what they do
identically lives here. A trainer's config is a dataclass deriving from `TrainConfig` with the
fields used below (`output_dir`, `resume`, `keep_checkpoints`, `steps`, `warmup_steps`,
`lr_schedule`, `mixed_precision`, `device`): `fingerprint()` gives the fields that decide the
trained weights, which a checkpoint must agree with to be resumed.

A checkpoint is `output_dir/checkpoints/step-NNNNNN/`: accelerate's state (model, optimizer,
scheduler, RNG of every process) plus `trainer_state.json` (step, config fingerprint, history),
written last, so a checkpoint interrupted mid-save has none and is ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch


# --------------------------------------------------------------------------------------------
# configs


class TrainConfig:
    """Base of the trainers' config dataclasses: checks shared by all, and the resume fingerprint.

    A subclass lists in NOT_IN_FINGERPRINT the fields that do not change the trained weights
    (where checkpoints go, how often to evaluate, progress bars): a checkpoint may be resumed
    under new values of those.
    """

    NOT_IN_FINGERPRINT: ClassVar[tuple[str, ...]] = ()
    CHOICES: ClassVar[dict[str, tuple]] = {"lr_schedule": ("constant", "linear", "cosine"),
                                           "device": ("auto", "cpu", "cuda")}

    def check_choices(self, **choices: Sequence) -> None:
        """Raise a ValueError naming the field when a text field is not one of its choices
        (those in CHOICES, which every trainer shares, and `choices`)."""
        for name, allowed in {**self.CHOICES, **choices}.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")
        if getattr(self, "checkpoint_every", 0) and not getattr(self, "output_dir", ""):
            raise ValueError("checkpoint_every needs an output_dir to write checkpoints to")

    def fingerprint(self) -> dict[str, Any]:
        """The fields that determine the trained weights (what a checkpoint must agree with)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.NOT_IN_FINGERPRINT}


# --------------------------------------------------------------------------------------------
# the step -> batch schedule


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(int(i) for i in np.random.default_rng([seed, epoch]).permutation(n))


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Row indices of the global batch of step `step` (0-based) over n rows.

    Walks through a fresh seeded permutation of the n rows each epoch; the same on every
    process and after a resume, because it depends only on its arguments.
    """
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        out.append(_permutation(n, seed, epoch)[i])
    return out


# --------------------------------------------------------------------------------------------
# the accelerator


def make_accelerator(cfg: Any):
    """An `accelerate.Accelerator` on `cfg.device` with `cfg.mixed_precision` (see mixed_precision).

    A trainer adds its own checks (batch sizes that split into the processes, FSDP) after this.
    """
    from accelerate import Accelerator

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but no CUDA GPU is visible; use device='auto' or 'cpu'")
    return Accelerator(cpu=cfg.device == "cpu", mixed_precision=mixed_precision(cfg))


# --------------------------------------------------------------------------------------------
# checkpoints


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (their trainer_state.json is written last), oldest first."""
    root = Path(output_dir) / "checkpoints"
    found = [p for p in root.glob("step-*") if (p / "trainer_state.json").exists()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def check_fingerprint(path: Path, cfg: Any) -> dict:
    """The checkpoint's trainer state, or a ValueError naming every field where `cfg` differs."""
    state = json.loads((path / "trainer_state.json").read_text())
    saved, now = state["config"], cfg.fingerprint()
    diff = {k: (saved.get(k), now[k]) for k in now if saved.get(k) != now[k]}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"checkpoint {path} was written by a different config ({lines}); "
                         f"delete {path.parent}, use another output_dir, or set resume=False to start over")
    return state


def resume_point(cfg: Any) -> tuple[Path | None, dict | None]:
    """(latest checkpoint, its trainer state) to resume from, or (None, None).

    Checked before anything slow happens: a checkpoint of another config fails here.
    """
    found = checkpoints(cfg.output_dir) if cfg.output_dir and cfg.resume else []
    if not found:
        return None, None
    return found[-1], check_fingerprint(found[-1], cfg)


def save_checkpoint(accelerator, cfg: Any, state: dict) -> None:
    """Save accelerate's state and `state` as checkpoint step-<state["step"]>; keep the newest
    `cfg.keep_checkpoints`. Every process must call it (each saves its own RNG state)."""
    path = Path(cfg.output_dir) / "checkpoints" / f"step-{state['step']:06d}"
    accelerator.save_state(str(path))   # model, optimizer, scheduler, RNG states (every process)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # Written last: a checkpoint without it was interrupted mid-save and is ignored on resume.
        (path / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")
        for old in checkpoints(cfg.output_dir)[:-cfg.keep_checkpoints or None]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def lr_lambda(cfg: Any) -> Callable[[int], float]:
    """LambdaLR factor: linear warm-up over `warmup_steps`, then constant, linear or cosine to 0 at `steps`."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def mixed_precision(cfg: Any) -> str | None:
    """accelerate's mixed_precision for `cfg.mixed_precision`: "auto" is bf16 on a GPU that has
    it, else "no"; None when `accelerate launch` was told (its flag or config file decides)."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None
    on_gpu = cfg.device != "cpu" and torch.cuda.is_available()
    return "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "no"


# --------------------------------------------------------------------------------------------
# command line: python -m starling_lib.<trainer> CONFIG.yaml [--set key=value ...]


def config_main(config_cls, train: Callable, argv: Sequence[str] | None, prog: str, description: str,
                example: str) -> int:
    """The trainers' command line: read a config (YAML + `--set`), train, print the last record as
    JSON and write output_dir/history.json (rank 0 only)."""
    import argparse

    from starling_lib.runs import load_dataclass_config

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("config", help=f"YAML file of {config_cls.__name__} fields, e.g. {example}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    args = parser.parse_args(argv)
    cfg = load_dataclass_config(config_cls, args.config, args.set)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        evals = getattr(result, "evals", [])
        last = {**(result.history[-1] if result.history else {}), **(evals[-1] if evals else {})}
        what = {"method": cfg.method} if hasattr(cfg, "method") else {}
        print(json.dumps({**what, "steps": cfg.steps, "wall_s": round(result.wall_s, 2), **result.extra, **last},
                         sort_keys=True, default=str))
        if cfg.output_dir:
            (Path(cfg.output_dir) / "history.json").write_text(
                json.dumps({"history": result.history, "evals": evals}, indent=1) + "\n")
    sys.stdout.flush()
    return 0
