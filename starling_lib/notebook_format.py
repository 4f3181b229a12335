"""The committed form of the notebooks: the project's kernel, no outputs.

notebooks/*.ipynb are committed without outputs and name the kernel that `make setup` installs
(`ipykernel install --sys-prefix --name starling`). JupyterLab, as `make lab` starts it
(lab/jupyter_server_config.py), passes every notebook it saves through `pre_save_hook`, so saving
in the lab keeps the tracked files clean: the outputs stay on screen, the file on disk gets none.
`scripts/set_kernelspec.py` sets the kernelspec; tests/test_notebooks.py checks both.
"""

from __future__ import annotations

from typing import Any, MutableMapping

KERNEL_NAME = "starling"
KERNELSPEC = {"name": KERNEL_NAME, "display_name": "Python (starling)", "language": "python"}

# What running a notebook writes into it. The kernel's full language_info (its Python version,
# pygments lexer, ...) would make every save by a different Python a diff; "name" is all Jupyter needs.
_RUN_CELL_METADATA = ("execution", "scrolled")  # timings (recordTiming), scroll state of an output area
_RUN_NOTEBOOK_METADATA = ("widgets",)           # saved ipywidgets state (the tqdm bars' widgets)


def strip_outputs(nb: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Remove, in place, what executing `nb` (a notebook as a dict or nbformat node) left in it:
    outputs, execution counts, cell timings, widget state, the kernel's language_info details.
    Sources, cell ids, tags and the kernelspec are kept. Returns `nb`."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        for key in _RUN_CELL_METADATA:
            cell.get("metadata", {}).pop(key, None)
    metadata = nb.setdefault("metadata", {})
    for key in _RUN_NOTEBOOK_METADATA:
        metadata.pop(key, None)
    if "language_info" in metadata:
        metadata["language_info"] = {"name": metadata["language_info"].get("name", "python")}
    return nb


def set_kernelspec(nb: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Make `nb` (in place) name the project's kernel; returns `nb`."""
    nb.setdefault("metadata", {})["kernelspec"] = dict(KERNELSPEC)
    return nb


def pre_save_hook(model: MutableMapping[str, Any], **kwargs: Any) -> None:
    """jupyter_server's ContentsManager.pre_save_hook: notebooks are saved without outputs."""
    if model.get("type") == "notebook" and isinstance(model.get("content"), dict):
        strip_outputs(model["content"])
