"""Seed sweeps: a run config executed once per seed, and its metrics summarised across the seeds.

    python -m starling_lib.pipeline papermill_runs/tiny_cpu.yaml --seeds 0,1,2,3
    python -m starling_lib.pipeline papermill_runs/tiny_cpu.yaml --seeds 0-3 --only 03,04

and in a notebook, to show a sweep's table and figure:

    from starling_lib.sweep import load_sweep, plot_sweep, sweep_table
    summary = load_sweep(run_dir, r"policy/.*/eval_reward_gain")   # one row per metric
    sweep_table(summary)                                             # the same, formatted for reading
    plot_sweep(summary)

Notebooks 03 and 04 end with an "Across seeds" section that does this for the sweep named by their
`sweep_dir` parameter, or the one their run belongs to (`find_sweep`).

Each seed is an ordinary pipeline run (starling_lib/pipeline.py) with the `seed` parameter set to
it, in its own folder of the sweep's run folder:

    <run_dir>/                        default papermill_runs/outputs/<name>-sweep-<YYYYmmdd-HHMMSS>/
      sweep.json                      the sweep: config, seeds, each seed's status, wall time, failure
      seed_<n>/                       one run folder per seed: config.yaml, executed notebooks,
                                      <stem>/metrics.json, summary.json, summary.md
      sweep_summary.csv               one row per (notebook, numeric metric): n, mean, sd, se,
                                      ci95_low, ci95_high, missing (seeds without a value), seed_<n>...
      sweep_summary.json              the same rows, the seeds and the failures
      sweep_summary.md                the seeds (failures first), the headline metrics, every metric
      figures/sweep_headlines.png     headline metrics: each seed's value and mean +- 95% interval

Statistics. For a metric, take the n seeds that recorded a finite number for it (a seed whose
notebook failed, or that wrote null, is left out of that metric and listed in its `missing`
column; bools, text, tables and the `params/` and `run/` keys are not metrics here):

    mean   = sum(x) / n
    sd     = sqrt(sum((x - mean)^2) / (n - 1))          the sample standard deviation across seeds
    se     = sd / sqrt(n)                                the standard error of the mean
    95% CI = mean -+ t(0.975, n - 1) * se                Student's t (scipy.stats.t), not the normal

The t quantile matters at sweep sizes: 12.71 for 2 seeds, 3.18 for 4, 2.26 for 10 (1.96 only in
the limit). The interval is for the mean over seeds of this config's metric: it assumes the
seeds' values are roughly normal and independent, and it covers only the variation the seed
causes (the data split, the initialisation, the sampling), not that of other choices. With
one seed, sd, se and the interval are undefined (NaN).

A failed seed is never dropped silently: the sweep goes on with the next seed, `sweep.json` and
the summary list the failure (notebook, cell, exception), every metric shows its own n, and the
CLI exits non-zero. Rerun a failed seed into the same folder after a fix with
`--seeds <n> --out <run_dir>` (or `--only 04,05` to rerun the tail of every seed): the summary
always covers every `seed_<n>` folder of the sweep.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from starling_lib.pipeline import (KERNEL, NotebookFailed, PipelineError, _new_run_dir, _now, _rel,
                                   execute_plan, plan_run)
from starling_lib.runs import git_commit
from starling_lib.stats import CONFIDENCE, t_interval

SEED_PARAMETER = "seed"
SEED_DIR_PREFIX = "seed_"
SKIPPED_NAMESPACES = ("params/", "run/")  # inputs and provenance, not results

SWEEP_JSON = "sweep.json"
SUMMARY_CSV = "sweep_summary.csv"
SUMMARY_JSON = "sweep_summary.json"
SUMMARY_MD = "sweep_summary.md"
FIGURE = Path("figures") / "sweep_headlines.png"

STAT_COLUMNS = ["n", "mean", "sd", "se", "ci95_low", "ci95_high"]


class SweepFailed(PipelineError):
    """Some seeds of a sweep failed; the others ran and the summary was written. `run_dir` is the
    sweep's folder, `failures` the failed seeds' entries of `sweep_seeds`."""

    def __init__(self, message: str, run_dir: Path, failures: list[dict[str, Any]]):
        super().__init__(message)
        self.run_dir = run_dir
        self.failures = failures


# --------------------------------------------------------------------------------------------
# Headline metrics: what the figure shows


@dataclass(frozen=True)
class Headline:
    """A panel of the sweep figure: the metrics whose whole name matches the regular expression
    `pattern` and not `exclude`, on one axis labelled `xlabel`, with a reference line at
    `reference` (chance, or no change) when there is a natural one."""
    pattern: str
    title: str
    xlabel: str
    reference: float | None = None
    reference_label: str = ""
    exclude: str | None = None

    def matches(self, metric: str) -> bool:
        return bool(re.fullmatch(self.pattern, metric)) and not (self.exclude and re.fullmatch(self.exclude, metric))


HEADLINES: tuple[Headline, ...] = (
    Headline(r"bias/sim/biased/[^/]+/tv_distance",
             "02 simulated position-biased judge: top-position bias by prompting variant",
             "TV distance of the top position from uniform", 0.0, "no positional bias"),
    Headline(r"rm/(?:(?:other_loss|baseline)/)?heldout_pair_accuracy",
             "03 reward model: held-out pair accuracy (K-wise, other loss, TRL baseline)",
             "pair accuracy", 0.5, "chance"),
    Headline(r"rm/(?:(?:other_loss|baseline)/)?heldout_kendall_tau",
             "03 reward model: held-out Kendall tau with the ranking", "Kendall tau", 0.0, "no agreement"),
    Headline(r"policy/[^/]+/eval_reward_gain",
             "04 policies: held-out reward gain over the initial policy", "reward gain", 0.0, "no gain"),
    Headline(r"policy/[^/]+/eval_kl_final", "04 policies: KL to the initial policy after training",
             "KL (nats)", 0.0, "the initial policy"),
    Headline(r"eval/mt_bench/.+", "05 MT-Bench score by model", "score (1-10)",
             exclude=r"eval/mt_bench/num_questions|.+/(?:se|turn_1|turn_2|n_valid|n_failed)"),
    Headline(r"eval/alpaca_eval/.+/win_rate", "05 AlpacaEval win rate against the baseline",
             "win rate (%)", 50.0, "even with the baseline"),
    Headline(r"laser/(?:search|heldout)/relative_change", "06 LaserRMT: relative change in perplexity, search and held-out",
             "relative change in perplexity", 0.0, "no change"),
)


# --------------------------------------------------------------------------------------------
# Seeds on the command line


def parse_seeds(text: str) -> list[int]:
    """`"0,1,2,3"` -> [0, 1, 2, 3]; a range `"0-3"` is the same, and `"0-2,7"` is [0, 1, 2, 7].

    Seeds are whole numbers >= 0, each once. Raises PipelineError saying what is wrong."""
    seeds: list[int] = []
    tokens = [t.strip() for t in str(text).split(",")]
    if not any(tokens):
        raise PipelineError(f"--seeds {text!r}: give seeds as comma-separated whole numbers, e.g. 0,1,2,3 or 0-3")
    for token in tokens:
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", token)
        if not m:
            raise PipelineError(f"--seeds {text!r}: {token!r} is not a seed; give whole numbers >= 0 separated "
                                f"by commas, e.g. 0,1,2,3, or a range such as 0-3")
        first, last = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if last < first:
            raise PipelineError(f"--seeds {text!r}: the range {token!r} runs backwards; write {last}-{first}")
        seeds.extend(range(first, last + 1))
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise PipelineError(f"--seeds {text!r}: seed(s) {repeated} given twice; each seed runs once")
    return seeds


# --------------------------------------------------------------------------------------------
# Running a sweep


def seed_dir(run_dir: str | os.PathLike, seed: int) -> Path:
    """The run folder of one seed of a sweep: `run_dir/seed_<seed>`."""
    return Path(run_dir) / f"{SEED_DIR_PREFIX}{seed}"


def run_sweep(config_path: str | os.PathLike, seeds: Sequence[int], out_dir: str | os.PathLike | None = None,
              only: Sequence[str] | str | None = None, overrides: Mapping[str, Any] | None = None,
              *, log_output: bool = False, progress_bar: bool = True, kernel: str = KERNEL) -> Path:
    """Run the config once per seed (its `seed` parameter set to each) and summarise; return the
    sweep's folder.

    Every seed's run is checked before the first starts (a bad config fails at once, nothing
    written). A seed whose notebook fails is recorded and the sweep goes on with the next; at the
    end SweepFailed (a PipelineError) names the failed seeds, after the summary has been written.
    `out_dir`, `only`, `overrides` and the keywords are as for `pipeline.run_config`; an existing
    sweep folder is resumed (each seed's folder as `run_config` resumes one).
    """
    seeds = list(seeds)
    if not seeds:
        raise PipelineError("--seeds: no seeds given")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0]
    if bad:
        raise PipelineError(f"--seeds: seeds are whole numbers >= 0, got {bad}")
    if len(set(seeds)) < len(seeds):
        raise PipelineError(f"--seeds: a seed is given twice in {seeds}")
    overrides = dict(overrides or {})
    if SEED_PARAMETER in overrides:
        raise PipelineError(f"--set {SEED_PARAMETER}={overrides[SEED_PARAMETER]} and --seeds together: the sweep "
                            f"sets `{SEED_PARAMETER}` for each run; drop the --set")

    # Check every seed's run before anything starts (the plans differ only in the seed).
    unseeded = plan_run(config_path, None, only, overrides, kernel=kernel)
    if not any(SEED_PARAMETER in params for _, params in unseeded.steps):
        raise PipelineError(f"config {unseeded.config.path}: no notebook of this run declares a `{SEED_PARAMETER}` "
                            f"parameter, so every seed would run the same; nothing to sweep")
    plans = {int(s): plan_run(config_path, None, only, {**overrides, SEED_PARAMETER: int(s)}, kernel=kernel)
             for s in seeds}
    first = next(iter(plans.values()))
    config = first.config
    sweep_path = Path(out_dir).resolve() if out_dir else None
    if sweep_path is not None and (sweep_path / "summary.json").is_file() and not (sweep_path / SWEEP_JSON).is_file():
        raise PipelineError(f"--out {sweep_path} is the folder of a single run (summary.json), not of a seed "
                            f"sweep; give a new or a sweep's folder")
    if sweep_path is None:
        sweep_path = _new_run_dir(f"{config.name}-sweep")
    sweep_path.mkdir(parents=True, exist_ok=True)

    record = _read_json(sweep_path / SWEEP_JSON) or {}
    seed_records: dict[str, dict[str, Any]] = record.get("seeds", {})
    for s in plans:
        seed_records[str(s)] = {"status": "pending", "run_dir": _rel(seed_dir(sweep_path, s))}
    header = {"name": config.name, "description": config.description, "config": _rel(config.path),
              "run_dir": str(sweep_path), "seeds": list(plans), "only": first.only,
              "overrides": {k: v for k, v in config.overrides.items() if k != SEED_PARAMETER},
              "kernel": kernel, "status": "running", "started": _now(), "finished": None,
              "git_commit": git_commit(), "python": sys.executable}

    def save() -> None:
        ordered = dict(sorted(seed_records.items(), key=lambda kv: int(kv[0])))
        (sweep_path / SWEEP_JSON).write_text(json.dumps({"sweep": header, "seeds": ordered}, indent=2,
                                                        default=str) + "\n")
        write_sweep_summary(sweep_path)

    print(f"Seed sweep {config.name} over seeds {', '.join(map(str, plans))} -> {sweep_path}", flush=True)
    save()
    for i, (s, plan) in enumerate(plans.items(), 1):
        print(f"=== seed {s} ({i}/{len(plans)}) ===", flush=True)
        plan.run_dir = seed_dir(sweep_path, s)
        entry = seed_records[str(s)]
        entry.update(status="running", started=_now())
        t0 = time.perf_counter()
        try:
            execute_plan(plan, log_output=log_output, progress_bar=progress_bar)
        except KeyboardInterrupt:
            entry.update(status="interrupted", wall_s=round(time.perf_counter() - t0, 2), finished=_now())
            for later in list(plans)[i:]:
                seed_records[str(later)].update(status="not run", reason=f"seed {s} was interrupted")
            header.update(status="interrupted", finished=_now())
            save()
            raise
        except NotebookFailed as exc:
            entry.update(status="failed", failed_notebook=exc.notebook,
                         error=_failure_note(_read_json(exc.run_dir / "summary.json") or {}))
            print(f"seed {s} failed ({exc.notebook}); going on with the next seed\n{exc}", file=sys.stderr, flush=True)
        else:
            entry["status"] = "ok"
        entry.update(wall_s=round(time.perf_counter() - t0, 2), finished=_now())
        save()

    failures = sweep_failures(sweep_path)
    header.update(status="failed" if failures else "ok", finished=_now())
    save()
    print(f"Sweep summary: {sweep_path / SUMMARY_MD}")
    if failures:
        listed = "; ".join(f"seed {f['seed']}: {f['note']}" for f in failures)
        raise SweepFailed(f"seed sweep {config.name}: {len(failures)} of {len(seed_records)} seed(s) did not finish: "
                          f"{listed}\n  the summary lists them and gives each metric's n: {sweep_path / SUMMARY_MD}\n"
                          f"  after a fix, rerun them there (with this run's --only and --set): python -m starling_lib.pipeline "
                          f"{config.path} --seeds {','.join(str(f['seed']) for f in failures)} --out {sweep_path}",
                          sweep_path, failures)
    return sweep_path


# --------------------------------------------------------------------------------------------
# Reading a sweep


def _read_json(path: Path) -> Any:
    with contextlib.suppress(OSError, json.JSONDecodeError):
        return json.loads(path.read_text())
    return None


def _sweep_seed_numbers(run_dir: Path, record: Mapping[str, Any]) -> list[int]:
    found = {int(p.name[len(SEED_DIR_PREFIX):]) for p in run_dir.glob(f"{SEED_DIR_PREFIX}*")
             if p.is_dir() and p.name[len(SEED_DIR_PREFIX):].isdigit()}
    return sorted(found | {int(s) for s in record.get("seeds", {})})


def _failure_note(summary: Mapping[str, Any]) -> str:
    """What went wrong in a seed's run, from its summary.json: the failed notebook, cell and exception."""
    for stem, info in summary.get("notebooks", {}).items():
        if info.get("status") in ("failed", "interrupted"):
            err = info.get("error") or {}
            where = f" in cell {err['cell_index']}" if "cell_index" in err else ""
            evalue = str(err.get("evalue") or "").splitlines()
            what = f": {err['ename']}: {evalue[0] if evalue else ''}" if err.get("ename") else ""
            return f"{stem} {info['status']}{where}{what}".strip()
    return f"run status {summary.get('run', {}).get('status', 'unknown')}"


def sweep_seeds(run_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per seed of a sweep: seed, status (`ok`, `failed`, `interrupted`, `running`,
    `pending`, `not run`, or `no summary.json`), wall_s, notebooks_ok (of those the run has),
    note (the failure: notebook, cell, exception) and run_dir. A seed counts if sweep.json lists it
    or its `seed_<n>` folder exists."""
    run_dir = Path(run_dir)
    record = _read_json(run_dir / SWEEP_JSON) or {}
    rows = []
    for s in _sweep_seed_numbers(run_dir, record):
        entry = record.get("seeds", {}).get(str(s), {})
        folder = seed_dir(run_dir, s)
        summary = _read_json(folder / "summary.json")
        row = {"seed": s, "status": entry.get("status", "not run"), "wall_s": entry.get("wall_s"),
               "notebooks_ok": None, "note": entry.get("reason") or "", "run_dir": str(folder)}
        if summary is None:
            if folder.is_dir():
                row.update(status="no summary.json", note="the seed's folder has no (readable) summary.json")
        else:
            notebooks = summary.get("notebooks", {})
            ran = [info for info in notebooks.values() if info.get("status") != "skipped"]
            row["notebooks_ok"] = f"{sum(info.get('status') == 'ok' for info in ran)}/{len(ran)}"
            row["status"] = summary.get("run", {}).get("status", "unknown")
            if row["status"] != "ok":
                row["note"] = _failure_note(summary)
            if row["wall_s"] is None:
                walls = [info["wall_s"] for info in notebooks.values() if info.get("wall_s") is not None]
                row["wall_s"] = round(sum(walls), 2) if walls else None
        rows.append(row)
    return pd.DataFrame(rows, columns=["seed", "status", "wall_s", "notebooks_ok", "note", "run_dir"])


def sweep_failures(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The seeds of a sweep that did not finish `ok`, as dicts (see sweep_seeds)."""
    seeds = sweep_seeds(run_dir)
    return seeds[seeds["status"] != "ok"].to_dict("records")


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _seed_metrics(folder: Path) -> dict[str, dict[str, Any]]:
    """{notebook stem: its metrics.json} of one seed's run: the notebooks its summary.json marks `ok`
    (a failed notebook's, or one not rerun after a failure, may be stale), or, without a
    summary.json, every `<stem>/metrics.json` there."""
    summary = _read_json(folder / "summary.json")
    if summary is not None:
        stems = [stem for stem, info in summary.get("notebooks", {}).items() if info.get("status") == "ok"]
    else:
        stems = sorted(p.parent.name for p in folder.glob("*/metrics.json"))
    out = {}
    for stem in stems:
        metrics = _read_json(folder / stem / "metrics.json")
        if isinstance(metrics, dict):
            out[stem] = metrics
    return out


def sweep_values(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Long table seed, notebook, metric, value: every metric of every seed's notebooks that
    finished `ok`, with value NaN where the seed recorded null or a non-finite number (so the
    metric still shows that seed as missing). Non-numeric values and `params/` / `run/` keys are
    left out."""
    run_dir = Path(run_dir)
    record = _read_json(run_dir / SWEEP_JSON) or {}
    rows = []
    for s in _sweep_seed_numbers(run_dir, record):
        for stem, metrics in _seed_metrics(seed_dir(run_dir, s)).items():
            for key, value in metrics.items():
                if key.startswith(SKIPPED_NAMESPACES):
                    continue
                if _is_number(value):
                    rows.append((s, stem, key, float(value)))
                elif value is None or isinstance(value, float):  # null (a NaN when written) or inf
                    rows.append((s, stem, key, math.nan))
    return pd.DataFrame(rows, columns=["seed", "notebook", "metric", "value"])


def summarize_values(values: pd.DataFrame, seeds: Sequence[int]) -> pd.DataFrame:
    """One row per (notebook, metric) of a `sweep_values` table: t_interval's n, mean, sd, se,
    ci95_low, ci95_high; `missing`, the seeds of `seeds` without a finite value (text, e.g. "2"
    or "1, 3"; "" when none); and each seed's value as `seed_<n>`. Rows keep the order metrics
    first appear in (the notebooks' order, then metrics.json's)."""
    seed_cols = [f"{SEED_DIR_PREFIX}{s}" for s in seeds]
    rows = []
    notebook_order = {stem: i for i, stem in enumerate(dict.fromkeys(values["notebook"]))}
    values = values.sort_values("notebook", key=lambda col: col.map(notebook_order), kind="stable")
    for (stem, key), group in values.groupby(["notebook", "metric"], sort=False):
        by_seed = dict(zip(group["seed"], group["value"]))
        finite = {s: v for s, v in by_seed.items() if math.isfinite(v)}
        row = {"notebook": stem, "metric": key, **t_interval(finite.values()),
               "missing": ", ".join(str(s) for s in seeds if s not in finite)}
        row.update({col: by_seed.get(s, math.nan) for col, s in zip(seed_cols, seeds)})
        rows.append(row)
    return pd.DataFrame(rows, columns=["notebook", "metric", *STAT_COLUMNS, "missing", *seed_cols])


def _rows(summary: pd.DataFrame, keep) -> pd.DataFrame:
    """The rows of a summary whose metric name passes `keep` (an empty table stays a table)."""
    return summary[np.array([bool(keep(m)) for m in summary["metric"]], dtype=bool)]


def _match(metric: str, patterns: str | Sequence[str] | None) -> bool:
    if patterns is None:
        return True
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(re.fullmatch(p, metric) for p in patterns)


def load_sweep(run_dir: str | os.PathLike, metrics: str | Sequence[str] | None = None) -> pd.DataFrame:
    """A sweep's summary across seeds, from its seed folders: one row per numeric metric (columns
    notebook, metric, n, mean, sd, se, ci95_low, ci95_high, missing, seed_<n>...; see
    summarize_values and this module's docstring for the 95% t-interval).

    metrics: a regular expression matched against the whole metric name, or a list of them
    (`r"policy/.*/eval_reward_gain"`, `["rm/heldout_pair_accuracy", "rm/baseline/.*"]`); None
    keeps every metric. `.attrs` holds "name", "seeds" (all of the sweep's), "failures" (the seeds
    that did not finish, as sweep_seeds rows: they are in `missing` where they lack a value).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no sweep folder {run_dir}")
    seeds = sweep_seeds(run_dir)
    if seeds.empty:
        raise FileNotFoundError(f"{run_dir} is not a seed sweep: no {SWEEP_JSON} and no {SEED_DIR_PREFIX}<n> folders")
    summary = summarize_values(sweep_values(run_dir), list(seeds["seed"]))
    summary = _rows(summary, lambda m: _match(m, metrics)).reset_index(drop=True)
    record = _read_json(run_dir / SWEEP_JSON) or {}
    summary.attrs.update(name=record.get("sweep", {}).get("name", run_dir.name), seeds=list(seeds["seed"]),
                         failures=seeds[seeds["status"] != "ok"].to_dict("records"), run_dir=str(run_dir))
    return summary


def find_sweep(run_dir: str | os.PathLike, sweep_dir: str | os.PathLike = "") -> Path | None:
    """The sweep a notebook shows in its "Across seeds" section: `sweep_dir` when given (an error
    if it is not a sweep), else the sweep `run_dir` is one seed of (a `seed_<n>` folder whose
    parent holds sweep.json: while that sweep runs, only the seeds finished so far have values),
    else None."""
    if sweep_dir:
        path = Path(sweep_dir)
        if not (path / SWEEP_JSON).is_file() and not any(path.glob(f"{SEED_DIR_PREFIX}*")):
            raise FileNotFoundError(f"sweep_dir={str(sweep_dir)!r} is not a seed sweep: no {SWEEP_JSON} and no "
                                    f"{SEED_DIR_PREFIX}<n> folders (make one with python -m starling_lib.pipeline CONFIG --seeds 0-3)")
        return path
    if not run_dir:
        return None
    run_dir = Path(run_dir).resolve()
    if run_dir.name.startswith(SEED_DIR_PREFIX) and (run_dir.parent / SWEEP_JSON).is_file():
        return run_dir.parent
    return None


def across_seeds(run_dir: str | os.PathLike, sweep_dir: str | os.PathLike = "",
                 metrics: str | Sequence[str] | None = None) -> pd.DataFrame | None:
    """A notebook's "Across seeds" section: `load_sweep(find_sweep(run_dir, sweep_dir), metrics)`,
    with a line saying which sweep and seeds it shows; None (and a line saying so) when the run
    is not part of a sweep and none is named."""
    path = find_sweep(run_dir, sweep_dir)
    if path is None:
        print("This run is not part of a seed sweep (set sweep_dir to show one): its readings rest on one seed.")
        return None
    summary = load_sweep(path, metrics)
    print(f"Seed sweep {path}: seeds {summary.attrs['seeds']}, {len(summary.attrs['failures'])} not finished (yet)")
    return summary


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    return f"{value:.{digits}g}"


def sweep_table(summary: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """A `load_sweep` table formatted for reading, indexed by metric: n (with the missing seeds),
    "mean", "95% CI" as [low, high], sd, se and each seed's value, as text with `digits`
    significant digits ("–" where undefined)."""
    seed_cols = [c for c in summary.columns if c.startswith(SEED_DIR_PREFIX)]
    out = pd.DataFrame(index=pd.Index(summary["metric"], name="metric"))
    n_total = len(summary.attrs.get("seeds", seed_cols))
    out["n"] = [f"{n}/{n_total}" + (f" (no seed {m})" if m else "") for n, m in zip(summary["n"], summary["missing"])]
    out["mean"] = [_fmt(v, digits) for v in summary["mean"]]
    out["95% CI"] = [f"[{_fmt(lo, digits)}, {_fmt(hi, digits)}]" if math.isfinite(lo) else "–"
                     for lo, hi in zip(summary["ci95_low"], summary["ci95_high"])]
    out["sd"] = [_fmt(v, digits) for v in summary["sd"]]
    out["se"] = [_fmt(v, digits) for v in summary["se"]]
    for col in seed_cols:
        out[col.replace("_", " ")] = [_fmt(v, digits) for v in summary[col]]
    return out


# --------------------------------------------------------------------------------------------
# The figure


def _panels(summary: pd.DataFrame, metrics: str | Sequence[str] | Sequence[Headline] | None) -> list[tuple[Headline, pd.DataFrame]]:
    """(panel, its rows) to draw: the headlines that match a metric with a value; without any, up
    to six metrics that vary across seeds (else the first six), one panel each, as scales differ."""
    have = summary[summary["n"] > 0]
    if metrics is None:
        headlines: Sequence[Headline] = HEADLINES
    elif isinstance(metrics, str):
        headlines = [Headline(metrics, metrics, "value")]
    else:
        headlines = [m if isinstance(m, Headline) else Headline(m, m, "value") for m in metrics]
    panels = []
    for h in headlines:
        rows = _rows(have, h.matches)
        if len(rows):
            panels.append((h, rows))
    if panels or metrics is not None:
        return panels
    varying = have[have["sd"] > 0]
    chosen, why = (varying, "varies across seeds") if len(varying) else (have, "no metric varies across seeds")
    return [(Headline(re.escape(m), f"{m} ({why}; no headline metric in this sweep)", m), chosen[chosen["metric"] == m])
            for m in chosen["metric"][:6]]


def plot_sweep(source: str | os.PathLike | pd.DataFrame,
               metrics: str | Sequence[str] | Sequence[Headline] | None = None):
    """A figure of a sweep: per panel, each seed's value of the metrics (one colour per seed, the
    same in every panel) and their mean with its 95% t-interval (black), with a dashed reference
    line where the quantity has one (0 for a gain, 0.5 for pair accuracy, ...).

    source: a sweep folder or a `load_sweep` table. metrics: None for HEADLINES (the figure the
    pipeline writes), a regular expression or a list of them (one panel each), or Headline panels.
    Returns the matplotlib Figure, or None when there is nothing to draw.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    summary = source if isinstance(source, pd.DataFrame) else load_sweep(source)
    panels = _panels(summary, metrics)
    if not panels:
        return None
    seed_cols = [c for c in summary.columns if c.startswith(SEED_DIR_PREFIX)]
    seed_names = [c.replace("_", " ") for c in seed_cols]
    palette = dict(zip(seed_names, sns.color_palette("tab10", max(len(seed_names), 1))))
    n_seeds = len(summary.attrs.get("seeds", seed_cols))
    heights = [0.55 * len(rows) + 1.4 for _, rows in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (panel, rows) in zip(axes[:, 0], panels):
        # a metric some seeds lack says so in its label
        rows = rows.assign(label=[m if n == n_seeds else f"{m} (n={n}/{n_seeds})" for m, n in zip(rows["metric"], rows["n"])])
        labels = list(rows["label"])
        points = rows.melt(id_vars="label", value_vars=seed_cols, var_name="seed", value_name="value").dropna()
        points["seed"] = points["seed"].str.replace("_", " ")
        sns.stripplot(data=points, x="value", y="label", hue="seed", order=labels, palette=palette,
                      hue_order=[s for s in seed_names if s in set(points["seed"])], jitter=0.12, size=7,
                      alpha=0.8, ax=ax)
        y = np.arange(len(labels)) + 0.3
        mean = rows["mean"].to_numpy()
        low = np.nan_to_num(mean - rows["ci95_low"].to_numpy())
        high = np.nan_to_num(rows["ci95_high"].to_numpy() - mean)
        ax.errorbar(mean, y, xerr=[low, high], fmt="D", color="black", ecolor="black", capsize=4,
                    markersize=5, label="mean ± 95% t-interval")
        if panel.reference is not None:
            ax.axvline(panel.reference, color="grey", linestyle="--", linewidth=1,
                       label=panel.reference_label or f"{panel.reference:g}")
        ax.set_ylim(len(labels) - 0.4, -0.6)
        ax.set_title(panel.title, fontsize=10, loc="left")
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel("metric")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    failures = summary.attrs.get("failures") or []
    fig.suptitle(f"Seed sweep {summary.attrs.get('name', '')}: {n_seeds - len(failures)} of {n_seeds} seeds ok"
                 + (f" (not ok: seed {', '.join(str(f['seed']) for f in failures)})" if failures else "")
                 + "\neach point one seed; black: mean ± 95% t-interval across seeds", fontsize=11)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# Writing the summary files


def _md_table(frame: pd.DataFrame, index_name: str, text_columns: Sequence[str] = ()) -> list[str]:
    """A markdown table of `frame` with its index first; numbers right-aligned, `text_columns` left."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")
    cols = [index_name, *frame.columns]
    align = ["---"] + ["---" if c in text_columns else "---:" for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(align) + "|"]
    for idx, row in frame.iterrows():
        lines.append("| " + " | ".join([cell(idx)] + [cell(v) for v in row]) + " |")
    return lines


def _json_ready(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _json_ready(value.item())
    return value


def write_sweep_summary(run_dir: str | os.PathLike) -> dict[str, Path]:
    """Write the sweep's summary files (sweep_summary.csv/.json/.md, figures/sweep_headlines.png)
    from its seed folders, and return their paths by kind. The figure is left out (and the
    markdown says so) while no seed has a numeric metric."""
    run_dir = Path(run_dir)
    summary = load_sweep(run_dir)
    seeds = sweep_seeds(run_dir)
    record = _read_json(run_dir / SWEEP_JSON) or {}
    header = record.get("sweep", {})
    failures = summary.attrs["failures"]
    paths = {"csv": run_dir / SUMMARY_CSV, "json": run_dir / SUMMARY_JSON, "md": run_dir / SUMMARY_MD}

    summary.to_csv(paths["csv"], index=False)
    rows = [{k: _json_ready(v) for k, v in row.items()} for row in summary.to_dict("records")]
    paths["json"].write_text(json.dumps({
        "sweep": header, "seeds": [{k: _json_ready(v) for k, v in r.items()} for r in seeds.to_dict("records")],
        "failures": failures, "confidence": CONFIDENCE,
        "interval": "mean -+ t(0.975, n-1) * sd / sqrt(n) over the seeds with a value (Student's t)",
        "metrics": rows}, indent=2, default=str) + "\n")

    figure = None
    if len(summary) and (summary["n"] > 0).any():
        import matplotlib.pyplot as plt
        fig = plot_sweep(summary)
        if fig is not None:
            figure = run_dir / FIGURE
            figure.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(figure, dpi=110, bbox_inches="tight")
            plt.close(fig)
            paths["figure"] = figure

    n_ok = int((seeds["status"] == "ok").sum())
    md = [f"# Seed sweep `{summary.attrs['name']}`: {n_ok} of {len(seeds)} seeds ok"
          + (f", {len(failures)} not" if failures else ""), ""]
    if header:
        md += [f"config `{header.get('config')}`, status {header.get('status')}, started {header.get('started')}, "
               f"finished {header.get('finished') or '-'}"
               + (f", only {header['only']}" if header.get("only") else "")
               + (f", overrides {header['overrides']}" if header.get("overrides") else ""), ""]
    if failures:
        md += ["**Seeds without a finished `ok` run** (a metric they have no value for lists them as missing, "
               "and its n is smaller):", ""]
        md += [f"* seed {f['seed']}: {f['status']}" + (f", {f['note']}" if f["note"] else "") + f" ({f['run_dir']})"
               for f in failures] + [""]
    md += ["## Seeds", ""]
    seed_rows = pd.DataFrame({"status": list(seeds["status"]),
                              "wall s": [_fmt(v, 5) for v in seeds["wall_s"]],
                              "notebooks ok": [v or "" for v in seeds["notebooks_ok"]],
                              "note": list(seeds["note"])}, index=pd.Index(seeds["seed"], name="seed"))
    md += _md_table(seed_rows, "seed", text_columns=("status", "note")) + [""]
    md += ["Each metric: n = seeds with a value, mean, 95% interval = mean ± t(0.975, n−1)·sd/√n "
           "(Student's t), sd across seeds, se = sd/√n, then each seed's value.", ""]
    headline_rows = _rows(summary, lambda m: any(h.matches(m) for h in HEADLINES))
    if len(headline_rows):
        md += ["## Headline metrics", ""]
        if figure is not None:
            md += [f"![headline metrics across seeds]({FIGURE.as_posix()})", ""]
        md += _md_table(sweep_table(_with_attrs(headline_rows, summary)), "metric") + [""]
    elif figure is not None:
        md += [f"![metrics across seeds]({FIGURE.as_posix()})", ""]
    md += ["## Every numeric metric, by notebook", ""]
    if not len(summary):
        md += ["No numeric metrics yet.", ""]
    for stem, rows in summary.groupby("notebook", sort=False):
        md += [f"### {stem}", ""] + _md_table(sweep_table(_with_attrs(rows, summary)), "metric") + [""]
    paths["md"].write_text("\n".join(md))
    return paths


def _with_attrs(rows: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    rows = rows.copy()
    rows.attrs.update(summary.attrs)
    return rows
