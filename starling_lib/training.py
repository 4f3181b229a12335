"""Plumbing the trainers share: checkpoints and resuming, the learning-rate schedule, mixed precision.

The reward-model trainer (rm_train) and the online policy trainer (policy) are written top to
bottom, each readable alone; what they do identically lives here. A trainer's config is any
dataclass with the fields used below (`output_dir`, `resume`, `keep_checkpoints`, `steps`,
`warmup_steps`, `lr_schedule`, `mixed_precision`, `device`) and a `fingerprint()` method: the
fields that decide the trained weights, which a checkpoint must agree with to be resumed.

A checkpoint is `output_dir/checkpoints/step-NNNNNN/`: accelerate's state (model, optimizer,
scheduler, RNG of every process) plus `trainer_state.json` (step, config fingerprint, history),
written last, so a checkpoint interrupted mid-save has none and is ignored.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch


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
