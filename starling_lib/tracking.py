"""Experiment tracking: the trainers' metrics, live, through accelerate's trackers.

A multi-day policy run should be watched, not read from stdout afterwards. The reward-model and
policy trainers log every record they keep in their history (the same namespaced keys as
metrics.json: `rm/loss`, `policy/apa/reward_mean`, `policy/apa/time_generate_s`, ...) and a few
sample responses as text at each evaluation, through `accelerate`'s trackers; DPO through TRL's
own `report_to`. Settings (`report_to` in the trainer configs):

    "tensorboard"   the default: event files under `<output_dir>/tracking/<run name>`
                    (`tensorboard --logdir <output_dir>/tracking`)
    "wandb", "mlflow", ...   any tracker accelerate knows, configured as that tool is (WANDB_API_KEY,
                    WANDB_PROJECT, MLFLOW_TRACKING_URI...); several: "tensorboard,wandb"
    "none"          nothing tracked

Tracking needs somewhere to write: without an `output_dir` nothing is tracked (notebook runs give
one). Only the main process writes (accelerate's trackers do that themselves).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

TRACKING_DIR = "tracking"


def tracker_names(report_to: str) -> list[str]:
    """"tensorboard,wandb" -> ["tensorboard", "wandb"]; "none" or "" -> []."""
    names = [n.strip().lower() for n in report_to.split(",") if n.strip()]
    return [] if names in ([], ["none"]) else names


def check_report_to(report_to: str) -> None:
    """Raise a ValueError naming what is wrong with a `report_to` setting (called by the configs)."""
    from accelerate.utils import LoggerType

    known = {t.value for t in LoggerType} - {"all"}
    names = tracker_names(report_to)
    unknown = [n for n in names if n not in known]
    if unknown or ("none" in names):
        raise ValueError(f"report_to must be 'none' or trackers from {', '.join(sorted(known))} (comma-separated); "
                         f"got {report_to!r}")


def accelerator_kwargs(cfg: Any) -> dict:
    """What `Accelerator(...)` needs to track `cfg`'s run: log_with and project_dir, or nothing."""
    names = tracker_names(getattr(cfg, "report_to", "none"))
    if not names or not getattr(cfg, "output_dir", ""):
        return {}
    return {"log_with": names, "project_dir": str(Path(cfg.output_dir) / TRACKING_DIR)}


def _plain(value: Any) -> Any:
    # Trackers take numbers, strings and booleans as run settings (TensorBoard's hparams refuse the rest).
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def start(accelerator, run_name: str, settings: Mapping[str, Any]) -> bool:
    """Open the trackers of `accelerator` (if it has any) with the run's settings; whether it tracks."""
    if not accelerator.log_with:
        return False
    accelerator.init_trackers(run_name, config={k: _plain(v) for k, v in settings.items()})
    return True


def log(accelerator, record: Mapping[str, Any], step: int) -> None:
    """One history record (its numbers; "step" is the x-axis, not a metric) at `step`."""
    if accelerator.log_with:
        accelerator.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
                         and not isinstance(v, bool)}, step=step)


def log_samples(accelerator, key: str, examples: list[Mapping[str, Any]], step: int, limit: int = 3) -> None:
    """A few (prompt, response, reward) examples as one Markdown text, for reading a run as it goes."""
    if not accelerator.log_with or not examples:
        return
    lines = ["| prompt | response | reward |", "|---|---|---|"]
    for e in examples[:limit]:
        cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")[:500]  # noqa: E731
        lines.append(f"| {cell(e.get('prompt', ''))} | {cell(e.get('response', ''))} | {e.get('reward', float('nan')):.3f} |")
    accelerator.log({key: "\n".join(lines)}, step=step)


def end(accelerator) -> None:
    """Flush and close the trackers (the event files are complete after this). Not
    `accelerator.end_training()`: that also destroys the process group, which the trainer's
    saving (and any later trainer in the same processes) still needs."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
