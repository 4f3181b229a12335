"""The committed form of the notebooks (starling_lib.notebook_format): the lab's pre-save hook,
the lab config that installs it, and scripts/set_kernelspec.py. The browser test
(test_lab_browser.py) saves a notebook through a real JupyterLab."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import nbformat
from traitlets.config.loader import PyFileConfigLoader
from traitlets.utils.importstring import import_item

from starling_lib.notebook_format import KERNELSPEC, pre_save_hook, set_kernelspec, strip_outputs

REPO = Path(__file__).resolve().parent.parent


def executed_notebook() -> dict:
    """A notebook as JupyterLab sends it to the server after a run (JSON, plain dicts)."""
    nb = nbformat.v4.new_notebook(metadata={
        "kernelspec": dict(KERNELSPEC), "widgets": {"application/vnd.jupyter.widget-state+json": {}},
        "language_info": {"name": "python", "version": "3.11.7", "pygments_lexer": "ipython3"}})
    nb.cells = [nbformat.v4.new_markdown_cell("# title"),
                nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("print(x)", metadata={"execution": {"iopub.status.idle": "2026-01-01"},
                                                                "scrolled": True})]
    nb.cells[1].execution_count = 1
    nb.cells[2].execution_count = 2
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    return nbformat.from_dict(copy.deepcopy(nb))


def test_strip_outputs_keeps_sources_ids_tags_and_kernel():
    nb = executed_notebook()
    before = copy.deepcopy(nb)
    strip_outputs(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert nb.cells[2].metadata == {}
    assert nb.metadata == {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}
    assert [(c.id, c.source) for c in nb.cells] == [(c.id, c.source) for c in before.cells]
    assert nb.cells[1].metadata == {"tags": ["parameters"]}
    nbformat.validate(nb)


def test_pre_save_hook_strips_notebooks_only():
    model = {"type": "notebook", "content": executed_notebook()}
    pre_save_hook(model=model, path="01.ipynb", contents_manager=None)
    assert not model["content"]["cells"][2]["outputs"]
    text = {"type": "file", "format": "text", "content": "outputs"}
    pre_save_hook(model=text, path="notes.txt", contents_manager=None)
    assert text["content"] == "outputs"


def test_lab_config_installs_the_hook_and_allows_root():
    config = PyFileConfigLoader("jupyter_server_config.py", path=str(REPO / "lab")).load_config()
    assert import_item(config.ContentsManager.pre_save_hook) is pre_save_hook
    assert config.ServerApp.allow_root == (hasattr(os, "geteuid") and os.geteuid() == 0)
    # a value JupyterLab accepts: the lab starts with it (tests/test_lab_browser.py) and never searches PyPI
    from jupyterlab.labapp import LabApp
    assert config.LabApp.extension_manager == "readonly"
    assert LabApp(extension_manager="readonly").extension_manager == "readonly"


def test_set_kernelspec_changes_only_the_kernelspec(tmp_path):
    nb = executed_notebook()
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    script = [sys.executable, str(REPO / "scripts" / "set_kernelspec.py")]
    check = subprocess.run(script + ["--check", str(path)], capture_output=True, text=True)
    assert check.returncode == 1 and "python3" in check.stdout

    subprocess.run(script + [str(path)], check=True, capture_output=True)
    updated = nbformat.read(path, as_version=4)
    assert updated.metadata.kernelspec == KERNELSPEC
    assert updated.cells == nb.cells  # outputs and ids untouched
    assert subprocess.run(script + ["--check", str(path)], capture_output=True).returncode == 0
    assert set_kernelspec(copy.deepcopy(nb)).metadata.kernelspec == KERNELSPEC
