"""Run folders, metrics and figures: the small conventions every notebook shares.

The pipeline gives each notebook a `run_dir`; a notebook writes under `run_dir/<notebook stem>/`
(figures, `metrics.json`, artifacts) and finds a predecessor's artifacts there too. Run alone in
JupyterLab a notebook uses `papermill_runs/outputs/interactive/`.

`metrics.json` is one flat JSON object of namespaced keys (`nectar/num_prompts`,
`rm/heldout_pair_accuracy`, ...). A value is a number, string, bool or null; a nested value is
allowed only where it is itself a table (a dict or list, such as `top_position`). The notebook's
parameters go under `params/<name>` and the git commit under `run/git_commit`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

REPO_ROOT = Path(__file__).resolve().parent.parent
INTERACTIVE_RUN_DIR = REPO_ROOT / "papermill_runs" / "outputs" / "interactive"

# Each notebook's folder in a run (its stem): where it writes and where later stages look.
NECTAR_STAGE = "01_nectar_exploration"
BIAS_STAGE = "02_positional_bias"
RM_STAGE = "03_kwise_reward_training"      # notebook 04 finds the reward model in RM_STAGE/reward_model
POLICY_STAGE = "04_policy_tuning"          # notebook 05 finds the tuned policies in POLICY_STAGE/policies
EVAL_STAGE = "05_mt_bench_evaluation"

# Metrics files, configs and notebooks get shared: never let a credential into them. Names are
# matched as whole words, so `hf_token` and `openai_api_key` are refused but `max_new_tokens` and
# `tokenizer` are not. The pipeline uses the same patterns for run configs.
CREDENTIAL_NAME = re.compile(
    r"(?:^|[_\-])(api[_\-]?key|apikey|token|access[_\-]?key|secret|secret[_\-]?key|password|passwd|credentials?)(?:$|[_\-])",
    re.IGNORECASE,
)
CREDENTIAL_VALUE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{16,}|hf_[A-Za-z0-9]{20,})")


def stage_dir(run_dir: str | os.PathLike | None, stage: str) -> Path:
    """`run_dir/stage`, created. `run_dir` None or "" means the interactive default."""
    root = Path(run_dir) if run_dir else INTERACTIVE_RUN_DIR
    out = root / stage
    out.mkdir(parents=True, exist_ok=True)
    return out


def git_commit() -> str | None:
    """The checkout's commit (with `+dirty` when there are uncommitted changes), or None."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")


def _check_value(key: str, value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        if isinstance(value, str) and CREDENTIAL_VALUE.search(value):
            raise ValueError(f"metrics key {key!r} holds what looks like an API key; refusing to write it")
        return value
    if isinstance(value, (int, float)):
        return value if not (isinstance(value, float) and math.isnan(value)) else None
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return _check_value(key, value.item())
    if isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v))
        if CREDENTIAL_VALUE.search(text):
            raise ValueError(f"metrics key {key!r} holds what looks like an API key; refusing to write it")
        return json.loads(text)
    raise TypeError(f"metrics key {key!r}: unsupported value type {type(value).__name__}")


def write_metrics(out_dir: str | os.PathLike, metrics: Mapping[str, Any],
                  params: Mapping[str, Any] | None = None) -> Path:
    """Write `out_dir/metrics.json`: the metrics, `params/<name>` for each parameter, the commit.

    Keys must be namespaced (`stage/name`). Parameters whose name looks like a credential are
    refused: keys come from the environment, never from parameters.
    """
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if "/" not in key:
            raise ValueError(f"metrics key {key!r} is not namespaced; use e.g. 'nectar/{key}'")
        flat[key] = _check_value(key, value)
    for name, value in (params or {}).items():
        if CREDENTIAL_NAME.search(name):
            raise ValueError(f"parameter {name!r} looks like a credential; pass keys through environment variables")
        flat[f"params/{name}"] = _check_value(name, value)
    flat["run/git_commit"] = git_commit()
    path = Path(out_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(flat, indent=2, sort_keys=True) + "\n")
    return path


def save_figure(fig, out_dir: str | os.PathLike, name: str, dpi: int = 120) -> Path:
    """Save a matplotlib figure as `out_dir/figures/<name>.png` and return the path."""
    path = Path(out_dir) / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for a repeatable run."""
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass
    import torch
    torch.manual_seed(seed)


def cache_dir() -> Path:
    """Where built artifacts (the tiny model and tokenizer) are cached across notebooks and runs.

    `$STARLING_CACHE` if set, else `$XDG_CACHE_HOME/starling` or `~/.cache/starling`.
    """
    env = os.environ.get("STARLING_CACHE")
    if env:
        root = Path(env)
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "starling"
    root.mkdir(parents=True, exist_ok=True)
    return root


def build_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """Create the folder `final` by `write(tmp)` into a temporary folder beside it, then a rename.

    A rename within one filesystem is atomic, so an interrupted build leaves no half-written
    `final` for a later run to mistake for a finished one. If another process finished the same
    folder first, its result is kept.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".building-{final.name}-", dir=final.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # a real failure, not a concurrent builder that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------------
# settings from text: `--set key=value`, YAML files


@functools.lru_cache(maxsize=1)
def _yaml_loader():
    """PyYAML's safe loader with YAML 1.2 floats: PyYAML follows YAML 1.1, where `1e-5` (no dot)
    is a string, so a learning rate written that way would arrive as "1e-5"."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                        |[-+]?\.(?:inf|Inf|INF)
                        |\.(?:nan|NaN|NAN))$""", re.X),
        list("-+0123456789."),
    )
    return Loader


def read_yaml(text: str) -> Any:
    """YAML text as Python values, floats read the YAML 1.2 way (`1e-5` is a float)."""
    import yaml
    return yaml.load(text, Loader=_yaml_loader())


def parse_setting(text: str, text_field: bool = False) -> Any:
    """One `--set` value: `10` -> 10, `1e-5` -> 1e-05, `true` -> True, `cpu` -> 'cpu', `` -> ''.

    text_field: the setting is text, so the value stays as typed (YAML would read `no` as False
    and `1.0` as a float; `mixed_precision=no` and `policy=1.0` mean text there).
    """
    if text_field or not text.strip():
        return text
    return read_yaml(text)


def split_sets(items) -> dict[str, str]:
    """`["steps=10", "device=cpu"]` -> `{"steps": "10", "device": "cpu"}`: each `key=value` split at
    its first `=`, the value left as text; a later item wins over an earlier one of the same key."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"--set {item!r}: expected key=value with key a setting's name")
        out[key] = raw
    return out


def parse_sets(items, text_fields=()) -> dict[str, Any]:
    """`["steps=10", "device=cpu"]` -> `{"steps": 10, "device": "cpu"}` (see parse_setting)."""
    return {key: parse_setting(raw, key in text_fields) for key, raw in split_sets(items).items()}


def load_dataclass_config(cls, path: str | os.PathLike | None, overrides=()):
    """A trainer config dataclass from a YAML file of its fields plus `key=value` overrides.

    Unknown keys are errors (with a "did you mean"); values are checked against the field's
    default type; `--set` values are read by `parse_sets` (text fields stay text).
    """
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    if path is not None:
        values = read_yaml(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of settings, got {type(values).__name__}")
    values.update(parse_sets(overrides, [n for n, f in fields.items() if isinstance(f.default, str)]))
    return cls(**{k: coerce_setting(cls, k, v) for k, v in values.items()})


def coerce_setting(cls, name: str, value: Any) -> Any:
    """`value` for the field `name` of the dataclass `cls`, checked against the type of its default
    (an int is accepted for a float; text is never coerced); an unknown name is an error with a
    "did you mean"."""
    import dataclasses
    import difflib

    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        close = difflib.get_close_matches(name, fields, n=1)
        raise ValueError(f"unknown setting {name!r} of {cls.__name__}" + (f"; did you mean {close[0]!r}?" if close else ""))
    kind = type(fields[name].default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"setting {name!r} must be {kind.__name__}, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# notebooks: the parameters cell -> recorded parameters and a trainer config


def notebook_params(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The notebook's parameters with their values in this run: `notebook_params(globals())`.

    The parameters cell is the one cell whose assignments carry type annotations (`steps: int = 30`),
    so its names are those in the namespace's `__annotations__`; the values are the current ones,
    papermill's injected overrides included. These are what `write_metrics` records.
    """
    names = namespace.get("__annotations__", {})
    if not names:
        raise ValueError("no annotated parameters found: the parameters cell declares them as `name: type = value`")
    return {name: namespace[name] for name in names if name in namespace}


def config_from_params(cls, params: Mapping[str, Any], **overrides):
    """A config dataclass from a notebook's parameters: every parameter that names one of its
    fields, then `overrides` (settings the notebook computes, such as output_dir)."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in params.items() if k in fields}
    values.update(overrides)
    return cls(**{k: coerce_setting(cls, k, v) for k, v in values.items()})
