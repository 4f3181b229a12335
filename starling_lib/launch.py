"""`make gpu`: the reproduction as its authors ran it. The stages that train at scale go through
`accelerate launch` on every GPU of the machine, then the notebooks run (papermill, starling_lib.pipeline)
and report what those launches trained instead of training it themselves.

    python -m starling_lib.launch papermill_runs/full_gpu.yaml                   # launches, then notebooks
    python -m starling_lib.launch papermill_runs/full_gpu.yaml --dry-run         # print the plan, run nothing
    NUM_PROCESSES=8 python -m starling_lib.launch papermill_runs/full_gpu.yaml --dry-run
    python -m starling_lib.launch papermill_runs/full_gpu.yaml --out papermill_runs/outputs/full_gpu-1   # resume

The run config's `launch` section names the stages (papermill_runs/README.md has the schema):

    launch:
      reward_model:                              # notebook 03's reward model: python -m starling_lib.rm_train
        accelerate_config: configs/accelerate/fsdp.yaml
        config: configs/rm/starling_7b.yaml
        set: {}                                  # trainer settings over the config's (optional)
        accelerate_args: []                      # more `accelerate launch` options (optional)
      policy:                                    # notebook 04's methods: python -m starling_lib.policy, one run each
        accelerate_config: configs/accelerate/ddp.yaml
        config: configs/policy/starling_apa_7b.yaml

What the launcher does with it:

  * the reward model trains into `<run>/03_kwise_reward_training/` (its model in reward_model/,
    where notebook 03 would have saved it: rm_io.reward_model_dir); each method of notebook 04's
    `methods` parameter into `<run>/04_policy_tuning/training/<method>/` (where notebook 04 would
    have trained it) against that reward model. The trainer's output_dir is set there, so its
    checkpoints are there too;
  * processes: `--num-processes`, else $NUM_PROCESSES, else the GPUs here (torch, or nvidia-smi);
    none is an error except in a dry run. A stage runs on the most processes, up to that, that its
    batches split into: the online policy methods on any number up to a step's prompts; the reward
    model and DPO on a divisor (DPO's 14 pairs a step in micro-batches of 2 split into 7 of 8 GPUs);
  * every run checkpoints (a trainer config with checkpoint_every 0 is refused): rerunning the same
    run folder (`--out`) resumes an interrupted trainer from its last checkpoint, and skips a stage
    whose model and history.json are there (artifacts.rm_run_complete / policy_run_complete);
  * each command's output goes to `<run>/launch/<stage>.log`; `<run>/launch/launch.json` records the
    commands and their status. A failed command stops the run with the command, its exit code and the
    log's last lines;
  * then the notebooks, in the same run folder, with `trained_reward_model` (03) and `trained_policies`
    (04) pointing at those folders, and the trainer configs' values for the parameters that decide
    what the notebooks evaluate (artifacts.RM_MATCH, POLICY_MATCH), so they report the runs as trained.

Everything is checked before the first command starts: the launch section, the trainer configs
(read as the trainers read them), the batch split, the notebooks and their parameters.
`python -m starling_lib.pipeline` on the same config ignores `launch` and trains in the notebooks
(one device; the path for a single GPU and for teaching).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from starling_lib.artifacts import POLICY_MATCH, RM_MATCH, RM_MODEL, policy_run_complete, rm_run_complete
from starling_lib.pipeline import (OUTPUTS_DIR, PipelineError, RunPlan, _new_run_dir, _select, execute_plan,
                                   load_config, notebook_parameters, parse_set, plan_run, typed_setting)
from starling_lib.runs import POLICY_STAGE, REPO_ROOT, RM_STAGE

STAGES = {   # launch section key -> (trainer module, the notebook that reads its output)
    "reward_model": ("starling_lib.rm_train", RM_STAGE),
    "policy": ("starling_lib.policy", POLICY_STAGE),
}
STAGE_KEYS = {"accelerate_config", "config", "set", "accelerate_args"}
LAUNCH_DIR = "launch"          # <run>/launch/: the logs and launch.json
TAIL_LINES = 40


class LaunchFailed(PipelineError):
    """A launched trainer exited non-zero (or left no model): the message has the command, the exit
    code and the end of its log."""


@dataclass
class Launch:
    """One `accelerate launch` of a trainer."""
    name: str                  # e.g. "03_reward_model", "04_policy_apa": its log is <run>/launch/<name>.log
    argv: list[str]            # the command, `accelerate` first; config paths relative to the repository
    output_dir: Path
    kind: str                  # "reward_model" or "policy": how completeness is checked
    num_processes: int
    note: str = ""

    def command(self) -> str:
        return shlex.join(self.argv)

    def complete(self) -> bool:
        return (rm_run_complete if self.kind == "reward_model" else policy_run_complete)(self.output_dir)


@dataclass
class LaunchPlan:
    config_path: Path
    run_dir: Path              # where it runs (a placeholder under OUTPUTS_DIR until started, see new_run_dir)
    new_run_dir: bool          # True: no --out, a fresh folder is made when it starts
    num_processes: int
    launches: list[Launch]
    notebooks: RunPlan
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# processes


def gpu_count() -> int:
    """GPUs visible here: torch's count, else the lines of `nvidia-smi -L`, else 0."""
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except Exception:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
            return sum(1 for line in out.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.SubprocessError):
            pass
    return 0


def resolve_num_processes(requested: int | None = None, env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """(processes, where that number came from): `requested`, else $NUM_PROCESSES, else the GPU count."""
    env = os.environ if env is None else env
    if requested is not None:
        n, source = requested, "--num-processes"
    elif env.get("NUM_PROCESSES", "").strip():
        text = env["NUM_PROCESSES"].strip()
        if not text.isdigit():
            raise PipelineError(f"NUM_PROCESSES={text!r}: expected a whole number of processes (GPUs)")
        n, source = int(text), "NUM_PROCESSES"
    else:
        n, source = gpu_count(), "GPUs found here"
    if n < 0:
        raise PipelineError(f"{source}: {n} processes")
    return n, source


def _fits(n: int, cfg: Any, kind: str) -> bool:
    """Whether `cfg`'s batches split into n processes as the trainer requires (rm_train.rm_accelerator;
    policy.online.check_world_size: any number up to a step's prompts; policy.dpo.dpo_batch_split)."""
    from starling_lib.policy.dpo import dpo_batch_split
    from starling_lib.policy.online import check_world_size

    if kind == "reward_model":
        return cfg.batch_size % n == 0 and (cfg.batch_size // n) % cfg.micro_batch_size == 0
    try:
        dpo_batch_split(cfg, n) if cfg.method == "dpo" else check_world_size(cfg, n)
    except ValueError:
        return False
    return True


def processes_for(cfg: Any, kind: str, available: int) -> int:
    """The most processes, up to `available`, that `cfg`'s batches split into (at least 1)."""
    return next((n for n in range(max(available, 1), 0, -1) if _fits(n, cfg, kind)), 1)


# --------------------------------------------------------------------------------------------
# the plan


def _setting(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _repo_file(where: str, key: str, value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise PipelineError(f"{where}: `{key}` must be a file path (relative to the repository root)")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else REPO_ROOT / path
    if not path.is_file():
        raise PipelineError(f"{where}: {key} {value!r}: no such file")
    return path


def _stage_settings(where: str, stage: Any) -> tuple[Path, Path, dict[str, Any], list[str]]:
    if not isinstance(stage, dict):
        raise PipelineError(f"{where}: expected a mapping with accelerate_config and config")
    unknown = set(stage) - STAGE_KEYS
    if unknown:
        raise PipelineError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(STAGE_KEYS)}")
    accel = _repo_file(where, "accelerate_config", stage.get("accelerate_config"))
    trainer = _repo_file(where, "config", stage.get("config"))
    sets = stage.get("set") or {}
    if not isinstance(sets, dict):
        raise PipelineError(f"{where}: `set` must be a mapping of trainer setting: value")
    if "output_dir" in sets:
        raise PipelineError(f"{where}: set.output_dir is the launcher's (the run folder's stage folder)")
    extra = stage.get("accelerate_args") or []
    if not isinstance(extra, list) or not all(isinstance(a, (str, int, float)) for a in extra):
        raise PipelineError(f"{where}: `accelerate_args` must be a list of command-line words")
    return accel, trainer, dict(sets), [str(a) for a in extra]


def _trainer_config(where: str, cls, path: Path, sets: Mapping[str, Any]):
    from starling_lib.runs import load_dataclass_config
    try:
        cfg = load_dataclass_config(cls, path, [f"{k}={_setting(v)}" for k, v in sets.items()])
    except (ValueError, TypeError) as exc:
        raise PipelineError(f"{where}: {_rel(path)}: {exc}") from None
    if not cfg.checkpoint_every:
        raise PipelineError(f"{where}: {_rel(path)} has checkpoint_every 0; a launched run must checkpoint so that "
                            f"rerunning the run folder resumes it: set checkpoint_every")
    return cfg


def _argv(accel: Path, n: int | None, extra: Sequence[str], module: str, trainer: Path,
          sets: Mapping[str, Any]) -> list[str]:
    argv = ["accelerate", "launch", "--config_file", _rel(accel)]
    if n:
        argv += ["--num_processes", str(n)]
    argv += [*extra, "-m", module, _rel(trainer)]
    for key, value in sets.items():
        argv += ["--set", f"{key}={_setting(value)}"]
    return argv


def _matching(cfg: Any, fields: Sequence[str], declared: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The trainer config's values of `fields`, for the notebook parameters of those names."""
    values = dataclasses.asdict(cfg)
    return {name: values[name] for name in fields if name in declared and name in values}


def _notebook_value(config, entry, name: str, declared) -> Any:
    """A notebook's parameter as the run would give it (--set, the entry, the shared value, its default)."""
    import ast
    if name in config.overrides:
        return typed_setting(config.overrides[name], declared[name].get("type"))
    if name in entry.parameters:
        return entry.parameters[name]
    if name in config.parameters:
        return config.parameters[name]
    return ast.literal_eval(declared[name]["default"])


def plan_launch(config_path: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                only: Sequence[str] | str | None = None, overrides: Mapping[str, Any] | None = None,
                num_processes: int | None = None, *, dry_run: bool = False) -> LaunchPlan:
    """Check everything and return the plan; nothing runs and nothing is written. Raises PipelineError."""
    from starling_lib.policy.config import PolicyTrainConfig, parse_method_lr
    from starling_lib.rm_train import RMTrainConfig

    config = load_config(config_path, overrides)
    where = f"config {config.path}: launch"
    if not config.launch:
        raise PipelineError(f"config {config.path} has no `launch` section: nothing trains outside the notebooks; "
                            f"run it with python -m starling_lib.pipeline {config.path}")
    unknown = set(config.launch) - set(STAGES)
    if unknown:
        raise PipelineError(f"{where}: unknown stage(s) {sorted(unknown)}; allowed: {sorted(STAGES)}")
    n, source = resolve_num_processes(num_processes)
    notes = []
    if n == 0:
        if not dry_run:
            raise PipelineError("no GPU found here (torch sees none, nvidia-smi lists none): `make gpu` trains on GPUs. "
                                "Set NUM_PROCESSES=<n> (or --num-processes) if the GPUs are there but not seen; "
                                "`make demo` runs the notebooks on a CPU")
        notes.append("no GPU found here and NUM_PROCESSES unset: the commands have no --num_processes (accelerate "
                     "then takes the config file's); NUM_PROCESSES=8 plans for 8 GPUs")
    else:
        notes.append(f"{n} process(es) per launch at most ({source})")
    if out_dir:
        run_dir, new = Path(out_dir).resolve(), False
    else:
        run_dir, new = OUTPUTS_DIR / f"{config.name}-<timestamp>", True

    if isinstance(only, str):
        only = only.split(",")
    selected = _select(config.entries, only)
    entries = {e.stem: e for e in config.entries}
    launches: list[Launch] = []
    given: dict[str, dict[str, Any]] = {}
    rm_dir = run_dir / RM_STAGE / RM_MODEL     # rm_io.reward_model_dir(run_dir), without creating it

    if "reward_model" in config.launch:
        stage_where = f"{where}.reward_model"
        module, stem = STAGES["reward_model"]
        if stem not in entries:
            raise PipelineError(f"{stage_where}: the config has no notebook {stem} to read the reward model")
        accel, trainer, sets, extra = _stage_settings(stage_where, config.launch["reward_model"])
        output_dir = run_dir / RM_STAGE
        cfg = _trainer_config(stage_where, RMTrainConfig, trainer, {**sets, "output_dir": str(output_dir)})
        k = processes_for(cfg, "reward_model", n) if n else 0
        note = "" if k == n else f"batch_size {cfg.batch_size} splits into {k}, not {n}, processes"
        if stem in selected:
            launches.append(Launch("03_reward_model", _argv(accel, k, extra, module, trainer,
                                                            {**sets, "output_dir": str(output_dir)}),
                                   output_dir, "reward_model", k, note))
        declared = notebook_parameters(entries[stem].path)
        given[stem] = {"trained_reward_model": str(output_dir), **_matching(cfg, RM_MATCH, declared)}

    if "policy" in config.launch:
        stage_where = f"{where}.policy"
        module, stem = STAGES["policy"]
        if stem not in entries:
            raise PipelineError(f"{stage_where}: the config has no notebook {stem} to read the policies")
        accel, trainer, sets, extra = _stage_settings(stage_where, config.launch["policy"])
        if "method" in sets:
            raise PipelineError(f"{stage_where}: set.method: the methods are notebook 04's `methods` parameter")
        entry = entries[stem]
        declared = notebook_parameters(entry.path)
        methods = [m.strip() for m in str(_notebook_value(config, entry, "methods", declared)).split(",") if m.strip()]
        reward_model = _notebook_value(config, entry, "reward_model", declared) if "reward_model" in declared else ""
        if not reward_model:
            if "reward_model" not in config.launch:
                raise PipelineError(f"{stage_where}: the policies need a reward model before the notebooks run: add a "
                                    f"reward_model stage, or give notebook {stem} a `reward_model`")
            reward_model = str(rm_dir)
        if "reward_model" in sets:
            reward_model = str(sets.pop("reward_model"))
        root = run_dir / POLICY_STAGE / "training"
        # the notebook's per-method learning rates replace the trainer's lr for those methods
        method_lr = _notebook_value(config, entry, "method_lr", declared) if "method_lr" in declared else ""
        try:
            rates = parse_method_lr(str(method_lr))
        except ValueError as exc:
            raise PipelineError(f"{stage_where}: notebook {stem}'s {exc}") from None
        cfgs = {}
        for m in methods:
            method_sets = {**sets, "method": m, "reward_model": reward_model, "output_dir": str(root / m),
                           **({"lr": rates[m]} if m in rates else {})}
            cfg = cfgs[m] = _trainer_config(f"{stage_where} ({m})", PolicyTrainConfig, trainer, method_sets)
            k = processes_for(cfg, "policy", n) if n else 0
            note = "" if k == n else (f"minibatch_size {cfg.minibatch_size} and micro_batch_size {cfg.micro_batch_size} "
                                      f"split into {k}, not {n}, processes" if m == "dpo" else
                                      f"rollouts_per_step {cfg.rollouts_per_step} is {k} prompts, fewer than {n} processes")
            if stem in selected:
                launches.append(Launch(f"04_policy_{m}", _argv(accel, k, extra, module, trainer, method_sets),
                                       root / m, "policy", k, note))
        if methods:
            shared = cfgs[methods[0]]
            if methods[0] in rates:   # the notebook's lr is the trainer's, which that method's rate replaced
                shared = _trainer_config(stage_where, PolicyTrainConfig, trainer,
                                         {**sets, "method": methods[0], "reward_model": reward_model,
                                          "output_dir": str(root / methods[0])})
            given[stem] = {"trained_policies": str(root), **_matching(shared, POLICY_MATCH, declared)}
            if reward_model != str(rm_dir) and "reward_model" in declared:
                given[stem]["reward_model"] = reward_model   # the one the policies were tuned against
        rm_launched = any(la.kind == "reward_model" for la in launches)
        if (stem in selected and methods and reward_model == str(rm_dir) and not rm_launched
                and not rm_run_complete(rm_dir.parent)):
            message = (f"{stage_where}: the policies are tuned against {rm_dir}, which is not there and which this "
                       f"run does not train (--only leaves out {RM_STAGE}): add it to --only, or give the run "
                       f"folder of a run that trained it (--out)")
            if not dry_run:
                raise PipelineError(message)
            notes.append(message)

    # What the notebooks are given instead of their configured values, said where it differs.
    for stem, params in given.items():
        entry = entries[stem]
        declared = notebook_parameters(entry.path)
        changed = {k: v for k, v in params.items() if not k.startswith("trained_")
                   and k in declared and _notebook_value(config, entry, k, declared) != v}
        if changed:
            notes.append(f"{stem} gets the trained run's " + ", ".join(f"{k}={v!r}" for k, v in changed.items())
                         + " (its config or default differs)")
    notebooks = plan_run(config_path, None if new else run_dir, only, overrides, entry_parameters=given)
    return LaunchPlan(config.path, run_dir, new, n, launches, notebooks, notes)


def format_plan(plan: LaunchPlan) -> str:
    """The plan as text: the launch commands, then the notebooks and their parameters."""
    lines = [f"Run {plan.notebooks.config.name} -> {plan.run_dir}" + (" (made when it starts)" if plan.new_run_dir else "")]
    lines += [f"  note: {note}" for note in plan.notes]
    lines.append(f"Launches ({len(plan.launches)}), from {REPO_ROOT}, each logging to {plan.run_dir / LAUNCH_DIR}/<name>.log:")
    for launch in plan.launches:
        state = "  [done: skipped]" if launch.complete() else ""
        lines.append(f"  {launch.name}{state}" + (f"  ({launch.note})" if launch.note else ""))
        lines.append(f"    {launch.command()}")
    lines.append(f"Notebooks (papermill, kernel {plan.notebooks.kernel}, cwd notebooks/):")
    for stem, info in plan.notebooks.notebooks.items():
        if info.get("status") == "skipped":
            lines.append(f"  skip  {stem}  ({info.get('reason', '')})")
    for entry, params in plan.notebooks.steps:
        shown = {k: v for k, v in params.items() if k != "run_dir"}
        lines.append(f"  run   {entry.stem}  {shown}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# running


def _accelerate_executable() -> str:
    beside = Path(sys.executable).parent / "accelerate"   # the environment running this module
    return str(beside) if beside.exists() else (shutil.which("accelerate") or "accelerate")


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    # tqdm's carriage-return updates: keep each line's last state
    kept = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join(kept[-lines:])


def _write_record(run_dir: Path, records: list[dict]) -> None:
    folder = run_dir / LAUNCH_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "launch.json").write_text(json.dumps({"launches": records}, indent=1) + "\n")


def run_launches(plan: LaunchPlan, run_dir: Path, *, echo: bool = False) -> list[dict]:
    """Run the plan's launches in order in `run_dir` (skipping finished ones); LaunchFailed on the first failure."""
    records = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for i, launch in enumerate(plan.launches, 1):
        log = run_dir / LAUNCH_DIR / f"{launch.name}.log"
        record = {"name": launch.name, "command": launch.command(), "output_dir": str(launch.output_dir),
                  "num_processes": launch.num_processes, "log": str(log)}
        records.append(record)
        if launch.complete():
            record["status"] = "skipped: already finished"
            print(f"[launch {i}/{len(plan.launches)}] {launch.name}: finished in an earlier run ({launch.output_dir}), skipped",
                  flush=True)
            _write_record(run_dir, records)
            continue
        print(f"[launch {i}/{len(plan.launches)}] {launch.name}: {launch.command()}\n  log: {log}", flush=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        launch.output_dir.mkdir(parents=True, exist_ok=True)
        record.update(status="running", started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        _write_record(run_dir, records)
        t0 = time.perf_counter()
        with open(log, "a", buffering=1) as out:
            out.write(f"$ {launch.command()}\n")
            out.flush()
            proc = subprocess.Popen([_accelerate_executable(), *launch.argv[1:]], cwd=REPO_ROOT, env=env,
                                    stdout=subprocess.PIPE if echo else out, stderr=subprocess.STDOUT, text=True)
            if echo:
                for line in proc.stdout:
                    out.write(line)
                    sys.stdout.write(line)
            try:
                code = proc.wait()
            except KeyboardInterrupt:
                proc.terminate()
                proc.wait()
                record.update(status="interrupted")
                _write_record(run_dir, records)
                raise
        record.update(wall_s=round(time.perf_counter() - t0, 2), exit_code=code)
        if code != 0 or not launch.complete():
            why = (f"exited with code {code}" if code != 0 else
                   "exited 0 but left no finished model and history.json in its output_dir")
            record["status"] = "failed"
            _write_record(run_dir, records)
            raise LaunchFailed(f"launch {launch.name} {why}:\n  command: {launch.command()}\n  log: {log}\n"
                               f"  last lines of the log:\n" + "\n".join(f"    | {line}" for line in _tail(log).splitlines())
                               + f"\n  after a fix, rerun into the same run folder to resume from its last checkpoint: "
                               f"python -m starling_lib.launch {_rel(plan.config_path)} --out {run_dir}")
        record["status"] = "ok"
        _write_record(run_dir, records)
        print(f"  ok in {record['wall_s']:.1f} s", flush=True)
    return records


def run_launch_config(config_path: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                      only: Sequence[str] | str | None = None, overrides: Mapping[str, Any] | None = None,
                      num_processes: int | None = None, *, log_output: bool = False, progress_bar: bool = True) -> Path:
    """Plan, run the launches, then the notebooks; return the run folder (raises PipelineError)."""
    plan = plan_launch(config_path, out_dir, only, overrides, num_processes)
    run_dir = _new_run_dir(plan.notebooks.config.name) if plan.new_run_dir else plan.run_dir
    if plan.new_run_dir:   # the plan named a placeholder folder: plan again with the real one
        plan = plan_launch(config_path, run_dir, only, overrides, num_processes)
    run_dir.mkdir(parents=True, exist_ok=True)
    print(format_plan(plan), flush=True)
    run_launches(plan, run_dir, echo=log_output)
    return execute_plan(plan.notebooks, log_output=log_output, progress_bar=progress_bar)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m starling_lib.launch",
        description="make gpu: train the reward model and the policies with accelerate launch on every GPU, then run "
                    "the notebooks on what they trained (the config's `launch` section; papermill_runs/README.md).")
    parser.add_argument("config", help="run config with a `launch` section, e.g. papermill_runs/full_gpu.yaml")
    parser.add_argument("--dry-run", action="store_true", help="print the launch commands and the notebook plan; run nothing")
    parser.add_argument("--num-processes", type=int, help="processes per launch (default $NUM_PROCESSES, else the GPUs here)")
    parser.add_argument("--out", help="the run folder; an existing one is resumed (finished launches are skipped)")
    parser.add_argument("--only", help="comma-separated notebooks (and their launches) to run, e.g. 03,04")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a notebook parameter, as python -m starling_lib.pipeline; trainer settings "
                             "are the launch section's `set`")
    parser.add_argument("--log-output", action="store_true", help="stream the launches' and notebooks' output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar for the notebooks")
    args = parser.parse_args(argv)
    only = args.only.split(",") if args.only else None
    try:
        overrides = parse_set(args.overrides)
        if args.dry_run:
            plan = plan_launch(args.config, args.out, only, overrides, args.num_processes, dry_run=True)
            print(format_plan(plan))
            print("Dry run: nothing was started.")
            return 0
        run_launch_config(args.config, args.out, only, overrides, args.num_processes,
                          log_output=args.log_output, progress_bar=not args.no_progress)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # The imported module's main, so that PipelineError is the class starling_lib raises (see pipeline.py).
    from starling_lib.launch import main as _main
    sys.exit(_main())
