"""Run the numbered notebooks in order with papermill, as a run config (papermill_runs/*.yaml) says.

    python -m starling_lib.pipeline papermill_runs/demo_cpu.yaml
    python -m starling_lib.pipeline papermill_runs/demo_cpu.yaml --only 01,03 --set seed=1
    python -m starling_lib.pipeline papermill_runs/full_gpu.yaml --out papermill_runs/outputs/mine
    python -m starling_lib.pipeline papermill_runs/tiny_cpu.yaml --seeds 0,1,2,3   # a seed sweep

or from Python (tests, notebooks):

    from starling_lib.pipeline import run_config
    run_dir = run_config("papermill_runs/demo_cpu.yaml", only=["01"], overrides={"seed": 1})

A config lists notebooks and their parameters, plus parameters shared by all of them (see
papermill_runs/README.md for the schema). The runner

  * checks everything before it starts a kernel: the YAML, that listed notebooks exist (an entry
    with `optional: true` is skipped when its notebook doesn't exist yet), that every parameter a
    notebook is given is one it declares in its `parameters` cell, with the declared type, and
    that no parameter looks like a credential (keys come from environment variables only), and
    the values of the parameters that feed a trainer or a loader (`notebook_checks`: `k=1`,
    `lr=-1`, an unknown method, a missing reward-model folder fail here, in a second);
  * passes a shared parameter only to the notebooks that declare it, and `run_dir` (the run
    folder, absolute) to every notebook;
  * types a `--set key=value` value as the notebook declares the parameter: read as YAML
    (`steps=10` is an int), except that a `str` parameter keeps the text (`judge=no` is "no",
    not YAML 1.1's False; `policy=1.0` is "1.0");
  * executes each notebook with cwd = the notebook's folder (as JupyterLab does) and kernel
    `python3`, i.e. the environment of the interpreter running this module;
  * writes into the run folder (default `papermill_runs/outputs/<name>-<YYYYmmdd-HHMMSS>/`):
        config.yaml            the config used, `--set` overrides applied
        <stem>.ipynb           each executed notebook (kept when it fails)
        <stem>/                what the notebook itself writes: metrics.json, figures/, artifacts
        summary.json           {"run": ..., "config": ..., "notebooks": {stem: status, wall_s, ...},
                                "metrics": {stem: that notebook's metrics.json}}
        summary.md             a table: notebook, status, wall seconds, number of metrics
  * stops at the first failing notebook, naming it, the failing cell and the exception; the
    summary marks it "failed" and the CLI exits non-zero.

`--out` names the run folder itself. Pointing it at an earlier run folder resumes that run: a
notebook finds its predecessors' artifacts there, and summary.json keeps the earlier notebooks'
entries, so `--only 03,04,05 --out <run>` reruns the tail of a run after a fix.

`--seeds 0,1,2,3` runs the config once per seed, into `<run folder>/seed_<n>/`, and summarises
the metrics across seeds (mean, standard deviation, standard error, 95% t-interval): see
starling_lib/sweep.py.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import re
import sys
import time
import tokenize
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from starling_lib.notebook_checks import check_notebook
from starling_lib.runs import (CREDENTIAL_NAME, CREDENTIAL_VALUE, REPO_ROOT, git_commit, parse_setting,
                               read_yaml, split_sets)

OUTPUTS_DIR = REPO_ROOT / "papermill_runs" / "outputs"
KERNEL = "python3"

CONFIG_KEYS = {"name", "description", "parameters", "launch", "notebooks"}  # launch: starling_lib/launch.py
ENTRY_KEYS = {"path", "parameters", "optional"}
RESERVED = {"run_dir"}  # set by the runner for every notebook


# papermill's marker cells and the cell it injects (tags), see papermill.execute.
_ERROR_MARKER_TAG = "papermill-error-cell-tag"
_INJECTED_TAG = "injected-parameters"


class PipelineError(Exception):
    """A bad config or a failed notebook; the message says which and why."""


class NotebookFailed(PipelineError):
    """A notebook of the run raised (the config was fine): `run_dir` is the run folder, `notebook`
    the failing notebook's stem; the message names the cell and the exception."""

    def __init__(self, message: str, run_dir: Path, notebook: str):
        super().__init__(message)
        self.run_dir = run_dir
        self.notebook = notebook


class SetText(str):
    """A `--set` value as typed on the command line. Its Python type is decided once the notebook's
    declaration is known (`typed_setting`): YAML would read `judge=no` as False."""


def parse_set(items: Iterable[str]) -> dict[str, SetText]:
    """`["steps=10", "judge=no"]` -> `{"steps": SetText("10"), "judge": SetText("no")}`: the
    values stay text until `resolve_parameters` types them by each notebook's declaration (see
    `typed_setting`). Split and checked by `runs.split_sets`, as every `--set` of the project;
    errors are PipelineError."""
    try:
        return {key: SetText(text) for key, text in split_sets(items).items()}
    except ValueError as exc:
        raise PipelineError(str(exc)) from None


# --------------------------------------------------------------------------------------------
# Config

@dataclass
class Entry:
    path: Path          # resolved
    spec: str           # as written in the config
    parameters: dict[str, Any]
    optional: bool

    @property
    def stem(self) -> str:
        return self.path.stem


@dataclass
class Config:
    path: Path
    name: str
    description: str
    parameters: dict[str, Any]
    entries: list[Entry]
    overrides: dict[str, Any] = field(default_factory=dict)
    keys_in_file: set[str] = field(default_factory=set)  # every parameter name the YAML mentions
    launch: dict[str, Any] | None = None   # the `launch` section (make gpu's trainer runs), read by starling_lib.launch

    def as_dict(self) -> dict[str, Any]:
        """The config as run (overrides applied), for config.yaml and summary.json."""
        return {
            "name": self.name,
            "description": self.description,
            "parameters": dict(self.parameters),
            "notebooks": [{"path": e.spec, "parameters": dict(e.parameters),
                           **({"optional": True} if e.optional else {})} for e in self.entries],
            **({"launch": self.launch} if self.launch is not None else {}),
        }


def _check_secrets(where: str, params: Mapping[str, Any]) -> None:
    for name, value in params.items():
        if CREDENTIAL_NAME.search(str(name)):
            raise PipelineError(f"{where}: parameter {name!r} looks like a credential; never put keys in a "
                                f"config or on the command line: read them from an environment variable in the notebook")
        if CREDENTIAL_VALUE.search(json.dumps(value, default=str)):
            raise PipelineError(f"{where}: the value of parameter {name!r} looks like an API key; "
                                f"read keys from environment variables instead")


def _resolve_notebook_path(spec: str) -> Path:
    # Relative to the repository root, so a config means the same thing from any working directory.
    path = Path(spec).expanduser()
    return (path if path.is_absolute() else REPO_ROOT / path).resolve()


def load_config(config_path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read and check a run config; `overrides` (from `--set`) replace shared parameters and any
    per-notebook parameter of the same name, so the command line has the last word."""
    path = Path(config_path)
    where = f"config {path}"
    if not path.is_file():
        raise PipelineError(f"{where}: no such file")
    try:
        raw = read_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise PipelineError(f"{where}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise PipelineError(f"{where}: expected a mapping with a `notebooks` list at the top level")
    unknown = set(raw) - CONFIG_KEYS
    if unknown:
        raise PipelineError(f"{where}: unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(CONFIG_KEYS)}")
    if "notebooks" not in raw:
        raise PipelineError(f"{where}: missing the `notebooks` key (a list of notebook entries)")
    if not isinstance(raw["notebooks"], list) or not raw["notebooks"]:
        raise PipelineError(f"{where}: `notebooks` must be a non-empty list")

    name = str(raw.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise PipelineError(f"{where}: name {name!r} is used in a folder name; use letters, digits, '.', '_', '-'")
    shared = raw.get("parameters") or {}
    if not isinstance(shared, dict):
        raise PipelineError(f"{where}: `parameters` must be a mapping of name: value")
    launch = raw.get("launch")
    if launch is not None and not isinstance(launch, dict):
        raise PipelineError(f"{where}: `launch` must be a mapping of stage: settings (see starling_lib/launch.py); "
                            f"the notebooks-only runner ignores it")

    entries = []
    for i, item in enumerate(raw["notebooks"]):
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict) or "path" not in item:
            raise PipelineError(f"{where}: notebooks[{i}] needs a `path`")
        unknown = set(item) - ENTRY_KEYS
        if unknown:
            raise PipelineError(f"{where}: notebooks[{i}] ({item['path']}): unknown key(s) {sorted(unknown)}; "
                                f"allowed: {sorted(ENTRY_KEYS)}")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise PipelineError(f"{where}: notebooks[{i}] ({item['path']}): `parameters` must be a mapping")
        optional = item.get("optional", False)
        if not isinstance(optional, bool):
            raise PipelineError(f"{where}: notebooks[{i}] ({item['path']}): `optional` must be true or false")
        entries.append(Entry(_resolve_notebook_path(str(item["path"])), str(item["path"]), dict(params), optional))

    stems = [e.stem for e in entries]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise PipelineError(f"{where}: notebook(s) {dupes} listed twice; their outputs would collide")

    overrides = dict(overrides or {})
    _check_secrets(f"{where} (--set)", overrides)
    _check_secrets(f"{where}: parameters", shared)
    for e in entries:
        _check_secrets(f"{where}: {e.spec}", e.parameters)
    for scope, params in [("parameters", shared), ("--set", overrides)] + [(e.spec, e.parameters) for e in entries]:
        reserved = RESERVED & set(params)
        if reserved:
            raise PipelineError(f"{where}: {scope}: {sorted(reserved)} is set by the runner (use --out for the run folder)")

    keys_in_file = set(shared).union(*(e.parameters for e in entries))
    shared = {**shared, **overrides}
    for e in entries:
        e.parameters.update({k: v for k, v in overrides.items() if k in e.parameters})
    return Config(path, name, str(raw.get("description") or ""), shared, entries, overrides, keys_in_file,
                  dict(launch) if launch is not None else None)


# --------------------------------------------------------------------------------------------
# Notebook parameters

def notebook_parameters(path: Path, kernel: str = KERNEL) -> dict[str, dict[str, Any]]:
    """`{name: {"type", "default", "help"}}` from the notebook's cell tagged `parameters`.

    Read with `ast` rather than papermill.inspect_notebook: papermill's line regex misses
    annotations such as `str | None` and joins an untyped parameter with the following line, and
    a parameter it misses would be refused here as unknown. papermill's own inspection is the
    fallback for a cell that isn't plain Python (a magic, say).
    """
    import nbformat

    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as exc:  # a half-saved or merge-conflicted notebook
        raise PipelineError(f"notebook {path}: cannot read it: {type(exc).__name__}: {exc}") from None
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    if not cells:
        raise PipelineError(f"notebook {path}: no cell tagged `parameters`; every notebook declares at least "
                            f"`run_dir: str = \"\"` there")
    source = cells[0].source
    try:
        tree = ast.parse(source)
    except SyntaxError:
        from papermill.translators import papermill_translators
        translator = papermill_translators.find_translator(kernel, "python")
        return {p.name: {"type": None if p.inferred_type_name == "None" else p.inferred_type_name,
                         "default": p.default, "help": p.help} for p in translator.inspect(cells[0])}

    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out = {}
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names, ann = [node.target.id], ast.unparse(node.annotation)
        elif isinstance(node, ast.Assign):
            names, ann = [t.id for t in node.targets if isinstance(t, ast.Name)], None
        else:
            continue
        default = ast.unparse(node.value) if node.value is not None else None
        for n in names:
            out[n] = {"type": ann, "default": default, "help": comments.get(node.end_lineno, "")}
    return out


def _declared_defaults(declared: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The parameters cell's defaults that are literals (`steps: int = 30`), as values."""
    out = {}
    for name, info in declared.items():
        try:
            out[name] = ast.literal_eval(info.get("default") or "")
        except (ValueError, SyntaxError):
            pass
    return out


_SIMPLE_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (float, int), "str": (str,), "bool": (bool,), "None": (type(None),),
    "list": (list,), "List": (list,), "tuple": (list, tuple), "Tuple": (list, tuple),
    "dict": (dict,), "Dict": (dict,),
}


def _allowed_types(annotation: str | None) -> tuple[type, ...] | None:
    """Python types a YAML value may have for an annotation; None when we can't tell (no check)."""
    if not annotation:
        return None
    ann = annotation.replace(" ", "")
    m = re.fullmatch(r"(?:typing\.)?Optional\[(.+)\]", ann)
    parts = [m.group(1), "None"] if m else ann.split("|")
    allowed: tuple[type, ...] = ()
    for part in parts:
        base = re.sub(r"\[.*\]$", "", part).removeprefix("typing.")
        if base not in _SIMPLE_TYPES:
            return None
        allowed += _SIMPLE_TYPES[base]
    return allowed


def _type_ok(value: Any, allowed: tuple[type, ...]) -> bool:
    # bool is an int to isinstance; `k: int` given `true` is a mistake.
    if isinstance(value, bool):
        return bool in allowed
    return isinstance(value, allowed)


def typed_setting(text: str, annotation: str | None) -> Any:
    """A `--set` value for a parameter declared with `annotation` (e.g. "int", "str | None").

    The YAML reading (`10` -> 10, `1e-5` -> 1e-05, `true` -> True, `null` -> None) when the
    declared type accepts it; otherwise the text itself when the type accepts text, so a `str`
    parameter keeps what was typed (`no`, `off`, `1.0`, `10` stay text, where YAML 1.1 would give
    False, False, 1.0, 10). Otherwise, and for an undeclared or unreadable type, the YAML reading,
    which the type check then reports if it does not fit.
    """
    try:
        value = parse_setting(str(text))
    except Exception:  # not valid YAML, e.g. `a: b: c`: fine for a text parameter
        value = str(text)
    allowed = _allowed_types(annotation)
    if allowed is not None and not _type_ok(value, allowed) and str in allowed:
        return str(text)
    return value


def _untyped_value(value: Any) -> Any:
    """A value with no declaration to type it by: a `--set` text read as YAML."""
    return typed_setting(value, None) if isinstance(value, SetText) else value


def resolve_parameters(config: Config, entry: Entry, declared: Mapping[str, Mapping[str, Any]],
                       run_dir: Path) -> dict[str, Any]:
    """What the notebook receives: the shared parameters it declares, its own, and `run_dir`.

    A `--set` value (SetText) is typed here by the notebook's declaration (`typed_setting`), so
    the same text can be a str for one notebook and an int for another that declares it so.
    """
    unknown = [k for k in entry.parameters if k not in declared]
    if unknown:
        import difflib
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, list(declared), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise PipelineError(
            f"config {config.path}: notebook {entry.spec} does not declare parameter(s) {', '.join(hints)}; "
            f"it declares: {', '.join(sorted(declared)) or 'nothing'}")
    if "run_dir" not in declared:
        raise PipelineError(f"notebook {entry.spec}: its parameters cell must declare `run_dir: str = \"\"` "
                            f"(where it writes its outputs)")

    params = {k: v for k, v in config.parameters.items() if k in declared}
    params.update(entry.parameters)
    params["run_dir"] = str(run_dir)
    for name, value in params.items():
        if isinstance(value, SetText):
            value = params[name] = typed_setting(value, declared[name].get("type"))
        allowed = _allowed_types(declared[name].get("type"))
        if allowed is not None and not _type_ok(value, allowed):
            raise PipelineError(
                f"config {config.path}: notebook {entry.spec}: parameter {name!r} is declared "
                f"`{declared[name]['type']}` but is given {value!r} ({type(value).__name__})")
    return params


def _select(entries: Sequence[Entry], only: Sequence[str] | None) -> set[str]:
    """Stems chosen by `--only 01,03` (a number prefix or a whole stem)."""
    if not only:
        return {e.stem for e in entries}
    chosen = set()
    for token in only:
        token = token.strip().removesuffix(".ipynb")
        hits = [e.stem for e in entries if e.stem == token or e.stem.startswith(token + "_")]
        if not hits:
            raise PipelineError(f"--only {token!r} matches no notebook of the config "
                                f"({', '.join(e.stem for e in entries)})")
        chosen.update(hits)
    return chosen


# --------------------------------------------------------------------------------------------
# Running

def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _new_run_dir(name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for i in range(1, 100):
        run_dir = OUTPUTS_DIR / (f"{name}-{stamp}" + (f"-{i}" if i > 1 else ""))
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:  # two runs started within the same second
            continue
    raise PipelineError(f"cannot create a run folder under {OUTPUTS_DIR}")


@contextlib.contextmanager
def _kernel_env():
    # `MPLBACKEND=Agg` (set for headless runs) reaches the kernel and keeps ipykernel from choosing
    # its inline backend, so executed notebooks would have no figures in them. Inline is headless too.
    # STARLING_PLAIN_PROGRESS: tqdm bars as text in the log, not widgets nobody watches (progress.py).
    saved = {name: os.environ.get(name) for name in ("MPLBACKEND", "STARLING_PLAIN_PROGRESS")}
    if saved["MPLBACKEND"] is not None and saved["MPLBACKEND"].lower() == "agg":
        del os.environ["MPLBACKEND"]
    os.environ["STARLING_PLAIN_PROGRESS"] = "1"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _read_metrics(path: Path) -> tuple[dict[str, Any], str | None]:
    if not path.is_file():
        return {}, f"no {path.name} written"
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        return {}, f"{path.name} is not valid JSON: {exc}"
    if not isinstance(metrics, dict):
        return {}, f"{path.name} is not a JSON object"
    return metrics, None


def _failure_message(entry: Entry, exc: BaseException, executed: Path) -> tuple[str, dict[str, Any]]:
    from papermill.exceptions import PapermillExecutionError

    if not isinstance(exc, PapermillExecutionError):
        error = {"ename": type(exc).__name__, "evalue": str(exc)}
        msg = (f"notebook {entry.stem} ({entry.spec}) failed: {type(exc).__name__}: {exc}\n"
               f"  executed notebook (as far as it got): {executed}")
        return msg, error

    # papermill counts the cells of the executed copy, which has one more (the injected
    # parameters) than the source notebook; give the index a reader of the source would use too.
    index = source_index = exc.cell_index
    try:
        import nbformat
        cells = [c for c in nbformat.read(executed, as_version=4).cells
                 if _ERROR_MARKER_TAG not in c.metadata.get("tags", [])]
        injected = next((i for i, c in enumerate(cells) if _INJECTED_TAG in c.metadata.get("tags", [])), None)
        if injected is not None and index > injected:
            source_index = index - 1
    except Exception:
        pass
    lines = (exc.source or "").splitlines()
    head = "\n".join(f"    | {line}" for line in lines[:5]) + ("\n    | ..." if len(lines) > 5 else "")
    error = {"ename": exc.ename, "evalue": exc.evalue, "cell_index": source_index,
             "executed_cell_index": index, "exec_count": exc.exec_count, "cell_source": exc.source}
    msg = (f"notebook {entry.stem} ({entry.spec}) failed in cell index {source_index} "
           f"(In [{exc.exec_count}] in the executed notebook):\n{head}\n"
           f"  {exc.ename}: {exc.evalue}\n"
           f"  executed notebook with the traceback: {executed}")
    return msg, error


def _write_summary(run_dir: Path, run: dict[str, Any], config: Config,
                   notebooks: dict[str, dict[str, Any]]) -> None:
    metrics = {}
    for stem, info in notebooks.items():
        if info.get("status") == "ok":
            metrics[stem], problem = _read_metrics(run_dir / stem / "metrics.json")
            info["num_metrics"] = len(metrics[stem])
            if problem:
                info["note"] = problem
    summary = {"run": run, "config": config.as_dict(), "notebooks": notebooks, "metrics": metrics}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")

    rows = ["| notebook | status | wall s | metrics | note |", "|---|---|---:|---:|---|"]
    for stem, info in notebooks.items():
        wall = f"{info['wall_s']:.1f}" if info.get("wall_s") is not None else ""
        note = info.get("reason") or info.get("note") or ""
        if info.get("error"):
            err = info["error"]
            where = f"cell {err['cell_index']}: " if "cell_index" in err else ""
            note = f"{where}{err['ename']}: {str(err['evalue']).splitlines()[0] if err['evalue'] else ''}"
        note = note.replace("|", "\\|")
        rows.append(f"| {stem} | {info['status']} | {wall} | {info.get('num_metrics', '')} | {note} |")
    md = [f"# Run `{run['name']}`: {run['status']}", "",
          f"config `{run['config']}`, started {run['started']}, finished {run.get('finished') or '-'}"
          + (f", overrides {run['overrides']}" if run.get("overrides") else ""), "", *rows, ""]
    (run_dir / "summary.md").write_text("\n".join(md))


@dataclass
class RunPlan:
    """A checked run, not started: what `plan_run` found and `execute_plan` carries out."""
    config: Config
    only: list[str] | None
    kernel: str
    notebooks: dict[str, dict[str, Any]]   # every entry of the config: stem -> its summary entry
    steps: list[tuple[Entry, dict[str, Any]]]  # the notebooks to execute, in order, with their parameters
    unused: list[str]                      # shared parameters no notebook of this run declares
    run_dir: Path | None                   # None: a new folder under OUTPUTS_DIR when it starts


def _record_typed_overrides(config: Config, steps: Sequence[tuple[Entry, dict[str, Any]]]) -> None:
    """Replace the `--set` texts in `config` by their typed values, for config.yaml and summary.json:
    as the first notebook of the run that receives the parameter typed it, else read as YAML."""
    typed = {}
    for key, value in config.overrides.items():
        if isinstance(value, SetText):
            typed[key] = next((params[key] for _, params in steps if key in params), _untyped_value(value))
    config.overrides.update(typed)
    config.parameters.update({k: v for k, v in typed.items() if k in config.parameters})
    run = {entry.stem: params for entry, params in steps}
    for entry in config.entries:
        for key in set(typed) & set(entry.parameters):
            entry.parameters[key] = run[entry.stem][key] if entry.stem in run else typed[key]


def plan_run(config_path: str | os.PathLike, out_dir: str | os.PathLike | None = None,
             only: Sequence[str] | str | None = None, overrides: Mapping[str, Any] | None = None,
             *, kernel: str = KERNEL, entry_parameters: Mapping[str, Mapping[str, Any]] | None = None) -> RunPlan:
    """Check a run without starting it (nothing is written): the config, the notebooks, their
    parameters and the `--set` keys. Raises PipelineError naming what is wrong.

    entry_parameters: {stem: {name: value}} set on those notebooks after the config and `--set`
    (starling_lib.launch gives notebooks 03 and 04 the artifacts it trained); checked like the rest."""
    config = load_config(config_path, overrides)
    for stem, extra in (entry_parameters or {}).items():
        entry = next((e for e in config.entries if e.stem == stem), None)
        if entry is None:
            raise PipelineError(f"config {config.path}: no notebook {stem!r} to give {sorted(extra)}")
        _check_secrets(f"config {config.path}: {entry.spec}", extra)
        entry.parameters.update(extra)
    if isinstance(only, str):
        only = only.split(",")
    selected = _select(config.entries, only)

    # Check every notebook that will run before the first kernel starts: a typo found after an
    # hour of reward-model training is an hour lost.
    notebooks: dict[str, dict[str, Any]] = {}
    steps: list[tuple[Entry, dict[str, Any]]] = []
    run_dir = Path(out_dir).resolve() if out_dir else None
    if run_dir is not None and (run_dir / "sweep.json").is_file():
        raise PipelineError(f"--out {run_dir} is the folder of a seed sweep (sweep.json); rerun the sweep "
                            f"with --seeds, or give one seed's folder, {run_dir}/seed_<n>")
    placeholder = run_dir or OUTPUTS_DIR / f"{config.name}-<timestamp>"
    missing = []
    for entry in config.entries:
        info: dict[str, Any] = {"path": _rel(entry.path)}
        notebooks[entry.stem] = info
        if entry.stem not in selected:
            info.update(status="skipped", reason="not selected by --only")
        elif not entry.path.is_file():
            if entry.optional:
                info.update(status="skipped", reason="optional, notebook does not exist yet")
            else:
                missing.append(entry.spec)
        else:
            declared = notebook_parameters(entry.path, kernel)
            params = resolve_parameters(config, entry, declared, placeholder)
            try:
                check_notebook(entry.stem, {**_declared_defaults(declared), **params})
            except ValueError as e:
                raise PipelineError(f"config {config.path}: notebook {entry.spec}: {e}") from None
            steps.append((entry, params))
    if missing:
        raise PipelineError(f"config {config.path}: notebook(s) not found: {', '.join(missing)} "
                            f"(paths are relative to {REPO_ROOT}; mark an entry `optional: true` "
                            f"to skip it while it doesn't exist)")
    if not steps:
        raise PipelineError(f"config {config.path}: nothing to run (no selected notebook exists)")
    used = {k for _, params in steps for k in params}
    for key in config.overrides:
        # A name the config already uses is a known parameter, maybe of a notebook not run now;
        # a new one must be declared by a notebook of this run, or it is a typo.
        if key not in used and key not in config.keys_in_file:
            raise PipelineError(f"--set {key}: neither the config nor any notebook in this run has a "
                                f"parameter {key!r}")
    _record_typed_overrides(config, steps)
    unused = [k for k in config.parameters if k not in used]
    return RunPlan(config, list(only) if only else None, kernel, notebooks, steps, unused, run_dir)


def run_config(config_path: str | os.PathLike, out_dir: str | os.PathLike | None = None,
               only: Sequence[str] | str | None = None, overrides: Mapping[str, Any] | None = None,
               *, log_output: bool = False, progress_bar: bool = True, kernel: str = KERNEL) -> Path:
    """Run a config's notebooks in order and return the run folder.

    `out_dir` is the run folder itself (default `papermill_runs/outputs/<name>-<timestamp>/`);
    `only` selects notebooks by number prefix or stem (`["01", "03"]` or `"01,03"`); `overrides`
    replace parameters like `--set` (Python values, or `parse_set`'s texts, typed by each
    notebook's declaration). Raises PipelineError for a bad config, before anything runs, and
    NotebookFailed (a PipelineError) for a failed notebook.
    """
    plan = plan_run(config_path, out_dir, only, overrides, kernel=kernel)
    return execute_plan(plan, log_output=log_output, progress_bar=progress_bar)


def execute_plan(plan: RunPlan, *, log_output: bool = False, progress_bar: bool = True) -> Path:
    """Carry out a `plan_run` plan (see run_config) and return the run folder."""
    import papermill

    config, notebooks, steps, kernel, only = plan.config, plan.notebooks, plan.steps, plan.kernel, plan.only
    run_dir = plan.run_dir if plan.run_dir is not None else _new_run_dir(config.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = {}
    if (run_dir / "summary.json").is_file():  # resuming a run folder: keep what ran before
        with contextlib.suppress(Exception):
            previous = json.loads((run_dir / "summary.json").read_text()).get("notebooks", {})
    for stem, info in notebooks.items():
        if info.get("status") == "skipped" and previous.get(stem, {}).get("status") in ("ok", "failed"):
            notebooks[stem] = previous[stem]
    for entry, params in steps:
        params["run_dir"] = str(run_dir)
        notebooks[entry.stem].update(status="pending", parameters=params)

    header = "# config used for this run" + (f"; --set {config.overrides}" if config.overrides else "") + "\n"
    (run_dir / "config.yaml").write_text(header + yaml.safe_dump(config.as_dict(), sort_keys=False))
    run = {"name": config.name, "description": config.description, "config": _rel(config.path),
           "run_dir": str(run_dir), "status": "running", "started": _now(), "finished": None,
           "only": only, "overrides": config.overrides, "kernel": kernel,
           "python": sys.executable, "git_commit": git_commit()}

    print(f"Run {config.name} -> {run_dir}")
    for stem, info in notebooks.items():
        if info["status"] == "pending":
            shown = {k: v for k, v in info["parameters"].items() if k != "run_dir"}
            print(f"  run   {stem}  {shown}")
        elif info.get("reason"):
            print(f"  skip  {stem}  ({info['reason']})")
        else:
            print(f"  keep  {stem}  ({info['status']} in an earlier invocation)")
    if plan.unused:
        print(f"  note: shared parameter(s) {plan.unused} declared by no notebook in this run")
    _write_summary(run_dir, run, config, notebooks)

    failure = None
    for i, (entry, params) in enumerate(steps, 1):
        info = notebooks[entry.stem]
        executed = run_dir / f"{entry.stem}.ipynb"
        # A metrics.json left by an earlier run of this folder must not pass for this run's.
        (run_dir / entry.stem / "metrics.json").unlink(missing_ok=True)
        print(f"[{i}/{len(steps)}] {entry.stem}", flush=True)
        info.update(started=_now(), executed_notebook=executed.name)
        t0 = time.perf_counter()
        try:
            with _kernel_env():
                papermill.execute_notebook(
                    str(entry.path), str(executed), parameters=params, kernel_name=kernel, language="python",
                    cwd=str(entry.path.parent), progress_bar=progress_bar, log_output=log_output,
                    stdout_file=sys.stdout if log_output else None,
                    stderr_file=sys.stderr if log_output else None)
        except KeyboardInterrupt:
            info.update(status="interrupted", wall_s=round(time.perf_counter() - t0, 2), finished=_now())
            run.update(status="interrupted", finished=_now())
            _write_summary(run_dir, run, config, notebooks)
            raise
        except Exception as exc:
            message, error = _failure_message(entry, exc, executed)
            info.update(status="failed", error=error)
            failure = message
        else:
            info["status"] = "ok"
        info.update(wall_s=round(time.perf_counter() - t0, 2), finished=_now())
        if failure:
            for later, _ in steps[i:]:
                notebooks[later.stem].update(status="not run", reason=f"{entry.stem} failed")
            break
        _write_summary(run_dir, run, config, notebooks)
        print(f"  ok in {info['wall_s']:.1f} s, {info.get('num_metrics', 0)} metrics", flush=True)

    run.update(status="failed" if failure else "ok", finished=_now())
    _write_summary(run_dir, run, config, notebooks)
    if failure:
        raise NotebookFailed(f"{failure}\n  run folder: {run_dir} (summary.json marks it failed)\n"
                             f"  after a fix, rerun from there: python -m starling_lib.pipeline {config.path} "
                             f"--only {','.join(e.stem.split('_')[0] for e, _ in steps[i - 1:])} --out {run_dir}",
                             run_dir, entry.stem)
    print(f"Done: {run_dir / 'summary.md'}")
    return run_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m starling_lib.pipeline",
        description="Run the notebooks of a papermill_runs/*.yaml config in order (see papermill_runs/README.md).")
    parser.add_argument("config", help="run config, e.g. papermill_runs/demo_cpu.yaml")
    parser.add_argument("--only", help="comma-separated notebook numbers or stems to run, e.g. 01,03")
    parser.add_argument("--out", help="the run folder (default papermill_runs/outputs/<name>-<timestamp>, "
                                      "<name>-sweep-<timestamp> with --seeds); an existing run folder is resumed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter, typed as the notebook declares it (steps=10 is an int "
                             "for `steps: int`, judge=no stays text for `judge: str`); repeatable")
    parser.add_argument("--seeds", metavar="0,1,2,3",
                        help="a seed sweep: run the notebooks once per seed (the `seed` parameter), each "
                             "into <run folder>/seed_<n>/, and summarise the metrics across seeds")
    parser.add_argument("--log-output", action="store_true", help="stream the notebooks' cell output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--kernel", default=KERNEL, help=f"Jupyter kernel (default {KERNEL}: this interpreter)")
    args = parser.parse_args(argv)
    options = dict(out_dir=args.out, only=args.only.split(",") if args.only else None,
                   log_output=args.log_output, progress_bar=not args.no_progress, kernel=args.kernel)
    try:
        overrides = parse_set(args.overrides)
        if args.seeds is not None:
            from starling_lib.sweep import parse_seeds, run_sweep
            run_sweep(args.config, parse_seeds(args.seeds), overrides=overrides, **options)
        else:
            run_config(args.config, overrides=overrides, **options)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy's: starling_lib.sweep raises
    # starling_lib.pipeline.PipelineError, which a __main__.PipelineError handler would not catch.
    from starling_lib.pipeline import main as _main
    sys.exit(_main())
