"""Plumbing the trainers share: configs, the step -> batch schedule, the accelerator, checkpoints
and resuming, the learning-rate schedule, mixed precision, the command line.

The reward-model trainer (rm_train), the online policy trainer (policy.online), DPO (policy.dpo)
and the SFT warm-up (sft) are written top to bottom, each readable alone; what they do
identically lives here. A trainer's config is a dataclass deriving from `TrainConfig` with the
fields used below (`output_dir`, `resume`, `keep_checkpoints`, `steps`, `warmup_steps`,
`lr_schedule`, `mixed_precision`, `device`): `fingerprint()` gives the fields that decide the
trained weights, which a checkpoint must agree with to be resumed.

A checkpoint is `output_dir/checkpoints/step-NNNNNN/`: accelerate's state (model, optimizer,
RNG of every process), the state of every object registered for checkpointing (the learning-rate
scheduler) as plain JSON, `custom_state_<i>.json`, and `trainer_state.json` (step, config
fingerprint, history, and the size of every file of the checkpoint), written last, so a checkpoint
interrupted mid-save has none and is ignored. Trusting and surviving a checkpoint:

  * resuming unpickles nothing that could run code: accelerate keeps registered objects as a
    pickle (custom_checkpoint_<i>.pkl) and loads it with weights_only=False, so the accelerator of
    `make_accelerator` keeps them as JSON instead, and refuses a checkpoint folder holding such a
    pickle (written by an older version, or planted). What accelerate itself loads (model weights
    as safetensors, optimizer and RNG states) it loads with weights_only=True (under DeepSpeed,
    DeepSpeed loads its own model and optimizer files);
  * every file is fsynced before `trainer_state.json` is written, and that file is written
    atomically (a temporary file, fsynced, then renamed over it), so a torn write leaves either
    the old file or none, never half of one;
  * a checkpoint whose trainer_state.json cannot be read, or whose files are missing, of another
    size than when saved, or joined by files it was not saved with, is damaged: `resume_point`
    warns, naming it and what is wrong, and resumes from the newest intact one before it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch

from starling_lib import tracking


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

    # Numeric fields every trainer shares, and what they must be: (lowest allowed, whether the
    # lowest is allowed itself). A subclass extends it; a field it lacks is not checked.
    RANGES: ClassVar[dict[str, tuple[float, bool]]] = {
        "steps": (1, True), "lr": (0.0, False), "batch_size": (1, True), "micro_batch_size": (1, True),
        "eval_every": (0, True), "eval_prompts": (0, True), "checkpoint_every": (0, True), "max_length": (1, True),
        "warmup_steps": (0, True), "max_grad_norm": (0.0, True), "keep_checkpoints": (1, True)}

    def check_ranges(self, **ranges: tuple[float, bool]) -> None:
        """Raise a ValueError naming the field, its value and what is allowed when a numeric field
        is out of range (RANGES and `ranges`); `test_fraction`, where a config has it, must lie
        strictly between 0 and 1."""
        for name, (low, inclusive) in {**self.RANGES, **ranges}.items():
            if not hasattr(self, name):
                continue
            value = getattr(self, name)
            if not (value >= low if inclusive else value > low) or value != value:   # NaN fails too
                raise ValueError(f"{name} must be {'at least' if inclusive else 'greater than'} {low:g}; got {value!r}")
        fraction = getattr(self, "test_fraction", None)
        if fraction is not None and not 0 < fraction < 1:
            raise ValueError(f"test_fraction must lie strictly between 0 and 1 (the share of prompts held out); "
                             f"got {fraction!r}")

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
    """An `accelerate.Accelerator` on `cfg.device` with `cfg.mixed_precision` (see mixed_precision)
    that checkpoints registered objects as JSON (`PlainStateAccelerator`, see the module docstring)
    and tracks the run as `cfg.report_to` says (starling_lib.tracking).

    A trainer adds its own checks (batch sizes that split into the processes, FSDP) after this.
    """
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but no CUDA GPU is visible; use device='auto' or 'cpu'")
    return _plain_state_accelerator_class()(cpu=cfg.device == "cpu", mixed_precision=mixed_precision(cfg),
                                            **tracking.accelerator_kwargs(cfg))


PLAIN_STATE_FILE = "custom_state_{}.json"        # a registered object's state_dict, as JSON
_PICKLED_STATE = re.compile(r"^custom_checkpoint_\d+\.pkl$")   # accelerate's pickle of the same, never loaded


@functools.lru_cache(maxsize=1)
def _plain_state_accelerator_class():
    from accelerate import Accelerator

    class PlainStateAccelerator(Accelerator):
        """accelerate's Accelerator, except that objects registered for checkpointing (the trainers'
        learning-rate scheduler) are saved as JSON of their state_dict, `custom_state_<i>.json`, and
        loaded from it, instead of pickled to custom_checkpoint_<i>.pkl and unpickled with
        weights_only=False (which runs whatever code a planted file holds)."""

        def register_for_checkpointing(self, *objects):
            for obj in objects:
                if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                    raise ValueError(f"{type(obj).__name__} has no state_dict/load_state_dict: "
                                     f"it cannot be checkpointed")
            self._plain_state_objects = [*getattr(self, "_plain_state_objects", []), *objects]

        def save_state(self, output_dir=None, **kwargs):
            if output_dir is None:
                raise ValueError("save_state needs the checkpoint folder (output_dir)")
            location = super().save_state(output_dir, **kwargs)
            if self.is_main_process:
                for i, obj in enumerate(getattr(self, "_plain_state_objects", [])):
                    try:
                        text = json.dumps(obj.state_dict(), indent=1)
                    except TypeError as e:
                        raise TypeError(f"the state of {type(obj).__name__} is not plain JSON ({e}); checkpoints "
                                        f"keep registered objects as JSON so that resuming never unpickles") from None
                    write_text_atomically(Path(output_dir) / PLAIN_STATE_FILE.format(i), text + "\n")
            return location

        def load_state(self, input_dir=None, **kwargs):
            if input_dir is None:
                raise ValueError("load_state needs the checkpoint folder (input_dir)")
            folder = Path(input_dir)
            pickled = sorted(p.name for p in folder.iterdir() if _PICKLED_STATE.match(p.name))
            if pickled:
                raise ValueError(f"checkpoint {folder} holds {', '.join(pickled)}, a pickle, which resuming does not "
                                 f"load (unpickling can run code); it was written by an older version or planted: "
                                 f"delete the checkpoint (or that file, if custom_state_<i>.json are there)")
            states = []
            for i, obj in enumerate(getattr(self, "_plain_state_objects", [])):
                path = folder / PLAIN_STATE_FILE.format(i)
                try:
                    states.append(json.loads(path.read_text()))
                except (OSError, ValueError) as e:
                    raise ValueError(f"checkpoint {folder}: cannot read the state of {type(obj).__name__} from "
                                     f"{path.name} ({e})") from None
            super().load_state(str(folder), **kwargs)
            for obj, state in zip(getattr(self, "_plain_state_objects", []), states):
                obj.load_state_dict(state)

    return PlainStateAccelerator


# --------------------------------------------------------------------------------------------
# checkpoints


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so that a crash leaves the old file or the new one, never a torn one:
    a temporary file beside it, flushed and fsynced, then renamed over it (and the folder fsynced)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (their trainer_state.json is written last), oldest first; intact or
    damaged (see checkpoint_damage)."""
    root = Path(output_dir) / "checkpoints"
    found = [p for p in root.glob("step-*") if (p / "trainer_state.json").exists()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _read_state(path: Path) -> dict:
    """The checkpoint's trainer_state.json, or a ValueError saying why it cannot be used."""
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"trainer_state.json cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"trainer_state.json is not valid JSON ({e.msg} at line {e.lineno}, "
                         f"column {e.colno})") from None
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("config"), dict)):
        raise ValueError("trainer_state.json has no step and config")
    return state


def _checkpoint_files(path: Path) -> dict[str, int]:
    """{relative path: size} of the files of a checkpoint folder, trainer_state.json (and temporary
    files) aside."""
    return {p.relative_to(path).as_posix(): p.stat().st_size for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "trainer_state.json" and not _is_temporary(p.name)}


def _is_temporary(name: str) -> bool:
    """A temporary file of write_text_atomically (left behind only by a crash mid-write)."""
    return name.startswith(".") and name.endswith(".tmp")


def checkpoint_damage(path: str | os.PathLike) -> str | None:
    """What is wrong with a complete checkpoint, or None if it is intact: trainer_state.json that
    cannot be read, a pickled custom state (which resuming does not load), and, against the sizes
    trainer_state.json recorded, a file missing, of another size, or not saved with it."""
    path = Path(path)
    try:
        state = _read_state(path)
    except ValueError as e:
        return str(e)
    files = _checkpoint_files(path)
    pickled = sorted(name for name in files if _PICKLED_STATE.match(name))
    if pickled:
        return f"it holds {', '.join(pickled)}, a pickle that resuming does not load (unpickling can run code)"
    saved = state.get("files")
    if saved is None:   # written before the sizes were recorded
        return None
    if not isinstance(saved, dict):
        return "trainer_state.json's list of files is not a mapping of names to sizes"
    for name, size in saved.items():
        if name not in files:
            return f"{name} is missing"
        if files[name] != size:
            return f"{name} has {files[name]} bytes, {size} were saved"
    extra = sorted(set(files) - set(saved))
    if extra:
        return f"it holds files it was not saved with: {', '.join(extra)}"
    return None


def check_fingerprint(path: Path, cfg: Any, state: dict | None = None) -> dict:
    """The checkpoint's trainer state, or a ValueError naming every field where `cfg` differs."""
    if state is None:
        try:
            state = _read_state(path)
        except ValueError as e:
            raise ValueError(f"checkpoint {path}: {e}") from None
    saved, now = state["config"], cfg.fingerprint()
    diff = {k: (saved.get(k), now[k]) for k in now if saved.get(k) != now[k]}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"checkpoint {path} was written by a different config ({lines}); "
                         f"delete {path.parent}, use another output_dir, or set resume=False to start over")
    return state


def resume_point(cfg: Any) -> tuple[Path | None, dict | None]:
    """(latest intact checkpoint, its trainer state) to resume from, or (None, None).

    Checked before anything slow happens: a checkpoint of another config fails here. A damaged
    checkpoint (checkpoint_damage) is named in a warning and the one before it is tried; if every
    checkpoint is damaged, a ValueError names them all (nothing is resumed, or started over, silently).
    """
    found = checkpoints(cfg.output_dir) if cfg.output_dir and cfg.resume else []
    damaged = []
    for path in reversed(found):
        why = checkpoint_damage(path)
        if why is None:
            if damaged:
                warnings.warn(f"resuming from {path}, the newest intact checkpoint: "
                              + "; ".join(f"{p} is damaged ({w})" for p, w in damaged), stacklevel=2)
            return path, check_fingerprint(path, cfg, _read_state(path))
        damaged.append((path, why))
    if damaged:
        raise ValueError(f"every checkpoint in {Path(cfg.output_dir) / 'checkpoints'} is damaged: "
                         + "; ".join(f"{p.name}: {w}" for p, w in damaged)
                         + "; delete them, or set resume=False to start over")
    return None, None


def save_checkpoint(accelerator, cfg: Any, state: dict) -> None:
    """Save accelerate's state and `state` as checkpoint step-<state["step"]>; keep the newest
    `cfg.keep_checkpoints` intact ones. Every process must call it (each saves its own RNG state).

    A folder of the same step already there (a damaged checkpoint the run resumed before, or one
    of a run not resumed) is removed first, so old and new files never mix. Every file is fsynced
    before trainer_state.json, which records their sizes and is written atomically, last.
    """
    path = Path(cfg.output_dir) / "checkpoints" / f"step-{state['step']:06d}"
    if accelerator.is_main_process and path.exists():
        shutil.rmtree(path)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))   # model, optimizer, RNG states (every process), custom_state_<i>.json
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = _checkpoint_files(path)
        for name in files:   # on disk before the file that says the checkpoint is complete
            fd = os.open(path / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        # Written last: a checkpoint without it was interrupted mid-save and is ignored on resume.
        write_text_atomically(path / "trainer_state.json", json.dumps({**state, "files": files}, indent=1) + "\n")
        intact = [p for p in checkpoints(cfg.output_dir) if checkpoint_damage(p) is None]
        for old in intact[:-cfg.keep_checkpoints or None]:
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
    JSON and write output_dir/history.json (rank 0 only; `run_record`), from which a notebook
    reports a run trained outside it (starling_lib/artifacts.py)."""
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
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            write_text_atomically(Path(cfg.output_dir) / HISTORY_FILE,
                                  json.dumps(run_record(cfg, result), indent=1, default=_jsonable) + "\n")
    sys.stdout.flush()
    return 0


HISTORY_FILE = "history.json"   # what config_main writes in output_dir


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):   # numpy / torch arrays and scalars
        return value.tolist()
    return str(value)


def run_record(cfg: Any, result: Any) -> dict:
    """What output_dir/history.json holds: everything of a trainer's result but the model.

    history, evals: the per-step and per-evaluation records (as the result's);
    eval_details: the evaluations' full output (per-response rewards and KLs, examples), where the
        trainer returns them (the policy trainers), for paired comparisons by prompt;
    result: steps_run, wall_s, eval_s, sequences, tokens (where the trainer counts them) and
        extra, as the result of this invocation (a resumed run's count from its resume);
    config: every setting of the run (dataclasses.asdict of its config).
    """
    summary = {name: getattr(result, name) for name in ("steps_run", "wall_s", "eval_s", "sequences", "tokens")
               if hasattr(result, name)}
    return {"history": result.history, "evals": getattr(result, "evals", []),
            "eval_details": getattr(result, "eval_details", []),
            "result": {**summary, "extra": dict(getattr(result, "extra", {}) or {})},
            "config": dataclasses.asdict(cfg)}
