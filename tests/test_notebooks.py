"""Every committed notebook follows the house conventions: no outputs, the project's kernel, a typed
parameters cell.

The executed runs of the notebooks live in tests/test_<stage>_notebook.py (nectar, bias, rm,
policy, eval), through the run_notebook fixture of conftest.py.
"""

import ast
import copy
import re
from pathlib import Path

import nbformat
import papermill
import pytest

from starling_lib.notebook_format import KERNELSPEC, strip_outputs

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.fixture(params=NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def nb(request):
    return request.param, nbformat.read(request.param, as_version=4)


def test_committed_without_outputs(nb):
    path, notebook = nb
    dirty = [i for i, c in enumerate(notebook.cells)
             if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; clear them before committing"


def test_committed_as_the_lab_saves_it(nb):
    # JupyterLab's pre-save hook (make lab) writes this form; a notebook already in it saves unchanged.
    path, notebook = nb
    assert strip_outputs(copy.deepcopy(notebook)) == notebook, \
        f"{path.name}: run metadata left in it (widget state, cell timings, language_info details)"


def test_names_the_project_kernel(nb):
    path, notebook = nb
    assert notebook.metadata.get("kernelspec") == KERNELSPEC, (
        f"{path.name}: kernelspec {notebook.metadata.get('kernelspec')}, expected {KERNELSPEC} (the kernel "
        f"`make setup` installs); run: .venv/bin/python scripts/set_kernelspec.py notebooks/{path.name}")


def test_no_path_echoed_above_a_figure(nb):
    # runs.save_figure returns the file's path: as a cell's last expression Jupyter prints
    # PosixPath('.../figures/x.png') above the figure. End the line with ";" (or assign it).
    def echoes(source):
        body = ast.parse(source).body
        if not body or not isinstance(body[-1], ast.Expr) or "save_figure" not in ast.unparse(body[-1]):
            return False
        last = body[-1]
        return not source.splitlines()[last.end_lineno - 1][last.end_col_offset:].lstrip().startswith(";")

    path, notebook = nb
    echoing = [c.id for c in notebook.cells if c.cell_type == "code" and echoes(c.source)]
    assert not echoing, f"{path.name}: cells {echoing} end with runs.save_figure(...) and echo its path; add ';'"


def test_one_parameters_cell_with_typed_literals_and_help(nb):
    path, notebook = nb
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
    tree = ast.parse(tagged[0].source)
    lines = tagged[0].source.splitlines()
    for stmt in tree.body:
        assert isinstance(stmt, ast.AnnAssign), f"{path.name}: line {stmt.lineno} is not `name: type = value  # help`"
        ast.literal_eval(stmt.value)  # no derived values: every default is a literal
        assert "#" in lines[stmt.lineno - 1], f"{path.name}: parameter {stmt.target.id} has no help comment"
    names = [s.target.id for s in tree.body]
    assert "run_dir" in names, f"{path.name}: every notebook takes the pipeline's run_dir"


def test_papermill_lists_every_parameter_with_help(nb):
    path, _ = nb
    params = papermill.inspect_notebook(str(path))
    assert params and all(p["help"] for p in params.values()), params
    # papermill skips (with a log line only) any line with a second "=", e.g. ">=" in its help
    cell = next(c for c in nb[1].cells if "parameters" in c.metadata.get("tags", []))
    declared = [s.target.id for s in ast.parse(cell.source).body]
    assert sorted(params) == sorted(declared), f"{path.name}: papermill cannot read {set(declared) - set(params)}"
    assert all(p["inferred_type_name"] != "None" for p in params.values())


def test_title_lesson_and_metrics(nb):
    path, notebook = nb
    first = notebook.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), f"{path.name}: starts with an H1 title"
    assert "what you'll learn" in first.source.lower()
    assert any(c.cell_type == "markdown" and "\n## " in "\n" + c.source for c in notebook.cells)
    last_code = [c for c in notebook.cells if c.cell_type == "code"][-1]
    assert "write_metrics" in last_code.source, f"{path.name}: the last cell writes metrics.json"
    imports = "\n".join(c.source for c in notebook.cells if c.cell_type == "code")
    assert "starling_lib" in imports


def test_the_reading_text_quotes_no_figures(nb):
    """"Reading the figures" says what to look for; the numbers come from the cell below it, which
    prints this run's. A decimal or a percentage typed into that markdown would be another run's."""
    path, notebook = nb
    readings = [c.source for c in notebook.cells if c.cell_type == "markdown"
                and c.source.lstrip().startswith("## Reading the figures")]
    assert len(readings) == 1, f"{path.name}: one '## Reading the figures' section"
    prose = re.sub(r"\$\$.*?\$\$|\$[^$]*\$|`[^`]*`", "", readings[0], flags=re.S)  # formulas and names may hold numbers
    typed = [n for n in re.findall(r"(?<![\w.-])\d+(?:\.\d+)?%|(?<![\w.-])\d+\.\d+", prose) if n != "95%"]
    assert typed == [], f"{path.name}: figures typed into 'Reading the figures': {typed}"
    after = notebook.cells[[c.source for c in notebook.cells].index(readings[0]) + 1:]
    assert any(c.cell_type == "code" and "print(" in c.source for c in after), f"{path.name}: a cell prints the readings"


def test_parameters_are_recorded_from_the_parameters_cell(nb):
    # runs.notebook_params(globals()) reads the names from __annotations__: only the parameters
    # cell may annotate at top level, or other names would be recorded as parameters.
    path, notebook = nb
    others = [c for c in notebook.cells if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", [])]
    for cell in others:
        annotated = [s for s in ast.parse(cell.source).body if isinstance(s, ast.AnnAssign)]
        assert not annotated, f"{path.name}: annotated assignment outside the parameters cell: {cell.source[:80]!r}"
    assert any("runs.notebook_params(globals())" in c.source for c in others), \
        f"{path.name}: record the parameters with runs.notebook_params(globals()), not a hand-written dict"
