"""Throwaway notebooks and run configs for the pipeline and sweep tests."""

from __future__ import annotations

from pathlib import Path

import nbformat
import yaml


def make_notebook(folder: Path, stem: str, params: str, body: list[str], kernelspec: bool = True) -> Path:
    nb = nbformat.v4.new_notebook()
    if kernelspec:
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cell = nbformat.v4.new_code_cell('run_dir: str = ""  # the run folder\n' + params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell] + [nbformat.v4.new_code_cell(src) for src in body]
    path = folder / f"{stem}.ipynb"
    nbformat.write(nb, path)
    return path


def write_config(folder: Path, config: dict, name: str = "cfg.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
