"""tqdm bars in a Jupyter kernel (starling_lib/progress.py): ipywidgets bars as in JupyterLab, text
bars when a runner sets STARLING_PLAIN_PROGRESS=1, as papermill runs do."""

import nbformat
import papermill

from starling_lib.progress import PLAIN_ENV

WIDGET = "application/vnd.jupyter.widget-view+json"


def run_bar(tmp_path, monkeypatch, plain: bool) -> list[dict]:
    """The outputs of one cell that imports starling_lib and draws a tqdm.auto bar, run by papermill."""
    if plain:
        monkeypatch.setenv(PLAIN_ENV, "1")
    else:
        monkeypatch.delenv(PLAIN_ENV, raising=False)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import starling_lib\nfrom tqdm.auto import tqdm\n"
                                          "for _ in tqdm(range(3), desc='bar'):\n    pass")]
    path = tmp_path / "bar.ipynb"
    nbformat.write(nb, path)
    out = papermill.execute_notebook(str(path), str(tmp_path / "out.ipynb"), kernel_name="python3",
                                     progress_bar=False)
    return out.cells[0].outputs


def test_text_bars_when_a_runner_asks(tmp_path, monkeypatch):
    outputs = run_bar(tmp_path, monkeypatch, plain=True)
    assert not any(WIDGET in o.get("data", {}) for o in outputs)
    stderr = "".join(o["text"] for o in outputs if o.get("name") == "stderr")
    assert "bar: 100%" in stderr and "3/3" in stderr


def test_widget_bars_otherwise(tmp_path, monkeypatch):
    outputs = run_bar(tmp_path, monkeypatch, plain=False)
    assert any(WIDGET in o.get("data", {}) for o in outputs), outputs
