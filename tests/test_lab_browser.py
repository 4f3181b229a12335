"""JupyterLab as a user opens it: the server `make lab` starts, driven by a real headless Chromium.

Notebook 01 (a parameterised copy in a temporary folder, so nothing is written into the repository)
is opened in the lab, run with Run > Run All Cells, and then: every code cell ran on the project's
kernel ("Python (starling)") without an error, the figures are shown, tqdm's bars are widgets, no
cell echoes a path; saving it writes no outputs to disk (lab/jupyter_server_config.py).

Needs Debian's `chromium` (`apt-get install chromium`; .ci/run installs it) and the `playwright`
Python package (the dev extra); Playwright drives the system browser, `playwright install` is not
needed. Set STARLING_CHROMIUM to use another Chromium binary. Without either the test is skipped,
saying why, except in CI (CI=true), where it fails.
"""

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from ports import free_port
from starling_lib.notebook_format import KERNELSPEC

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
LAB_CONFIG = REPO / "lab"  # what `make lab` puts on JUPYTER_CONFIG_PATH
STEM = "01_nectar_exploration"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
KERNEL_LABEL = f"{KERNELSPEC['display_name']} | Idle"  # the status bar's kernel item

SERVER_START_S = 60
KERNEL_START_S = 60
RUN_ALL_S = 90


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason}; CI must run the browser test (.ci/run installs Debian's chromium, "
                    f"`make test` the dev extra with playwright)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium() -> str:
    path = os.environ.get("STARLING_CHROMIUM") or next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    if not path:
        _unavailable(f"no Chromium found ({', '.join(CHROMIUM_NAMES)} on PATH, or STARLING_CHROMIUM): "
                     f"apt-get install chromium")
    return path


@pytest.fixture(scope="module")
def sync_playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed: pip install -e '.[dev]'")
    return sync_playwright


def _check_kernel_installed():
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    try:
        KernelSpecManager().get_kernel_spec(KERNELSPEC["name"])
    except NoSuchKernel:
        pytest.fail(f"the notebooks name the Jupyter kernel {KERNELSPEC['name']!r}, which is not installed in "
                    f"{sys.prefix}: `make setup` installs it (ipykernel install --sys-prefix --name starling)")


def _parameterised_copy(tmp: Path) -> Path:
    """notebooks/ copied to tmp/notebooks, 01 with a cell after its parameters cell setting
    run_dir = tmp/run, as papermill injects parameters."""
    folder = tmp / "notebooks"
    shutil.copytree(REPO / "notebooks", folder, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    path = folder / f"{STEM}.ipynb"
    nb = nbformat.read(path, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell(f"run_dir = {str(tmp / 'run')!r}", metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, injected)
    nbformat.write(nb, path)
    return path


class Lab:
    """A JupyterLab server started as `make lab` starts it, on 127.0.0.1 with a token."""

    def __init__(self, root: Path, tmp: Path):
        self.port, self.token = free_port(), secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "jupyter-server.log"
        env = dict(os.environ)
        env["JUPYTER_CONFIG_PATH"] = os.pathsep.join(filter(None, [str(LAB_CONFIG), env.get("JUPYTER_CONFIG_PATH")]))
        # The user's own lab settings, workspaces and IPython history stay out of the test (and the
        # test's out of theirs); the kernel inherits STARLING_CACHE and draws its figures inline.
        env.update(JUPYTER_CONFIG_DIR=str(tmp / "jupyter-config"), JUPYTER_RUNTIME_DIR=str(tmp / "jupyter-runtime"),
                   IPYTHONDIR=str(tmp / "ipython"), STARLING_CACHE=str(tmp / "cache"))
        for name in ("MPLBACKEND", "STARLING_PLAIN_PROGRESS"):  # a headless Agg backend; text bars
            env.pop(name, None)
        jupyter = Path(sys.executable).parent / "jupyter"  # $(VENV)/bin/jupyter, as the Makefile runs it
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [str(jupyter), "lab", f"--notebook-dir={root}", "--no-browser", "--ip=127.0.0.1",
             f"--port={self.port}", "--port-retries=0", f"--IdentityProvider.token={self.token}"],
            env=env, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)

    def api(self, path: str, method: str = "GET") -> bytes:
        request = urllib.request.Request(f"{self.url}{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read()

    def wait_until_up(self) -> None:
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"jupyter lab exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.api("/api/status")
                return
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"jupyter lab did not answer on {self.url} within {SERVER_START_S} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        try:  # shut the kernels down through the server, then the server
            for kernel in json.loads(self.api("/api/kernels")):
                self.api(f"/api/kernels/{kernel['id']}", method="DELETE")
        except OSError:
            pass
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture
def lab(tmp_path):
    _check_kernel_installed()
    notebook = _parameterised_copy(tmp_path)
    server = Lab(notebook.parent, tmp_path)
    try:
        server.wait_until_up()
        yield server, notebook
    finally:
        server.stop()


# What the page shows, read from the DOM (textContent: cells scrolled out of view count too).
_DONE = """() => {
  const prompts = [...document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell .jp-InputPrompt')]
    .map(e => e.textContent.trim());
  const status = document.querySelector('#jp-main-statusbar')?.textContent ?? '';
  return prompts.some(p => /\\d/.test(p)) && !prompts.some(p => p.includes('*')) && status.includes('| Idle');
}"""
_RESULTS = """() => {
  const panel = document.querySelector('.jp-NotebookPanel');
  const outputs = sel => [...panel.querySelectorAll(sel)].map(e => e.textContent);
  return {
    prompts: [...panel.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(e => e.textContent.trim()),
    errors: outputs('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
      .filter(t => t.includes('Traceback (most recent call last)')),
    texts: outputs('.jp-OutputArea-output[data-mime-type="text/plain"]'),
    figures: panel.querySelectorAll('.jp-RenderedImage img[src^="data:image/png"]').length,
    progress_widgets: panel.querySelectorAll('.jupyter-widgets.widget-hprogress').length,
  };
}"""


def test_notebook_01_runs_from_the_lab(chromium, sync_playwright, lab, tmp_path):
    server, notebook = lab
    code_cells = sum(c.cell_type == "code" for c in nbformat.read(notebook, as_version=4).cells)
    screenshot = tmp_path / "lab.png"
    started = time.monotonic()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        try:
            page.goto(f"{server.url}/lab/tree/{notebook.name}?token={server.token}")
            page.locator("#jp-main-statusbar").get_by_text(KERNEL_LABEL).wait_for(timeout=KERNEL_START_S * 1000)

            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.locator(".lm-Menu-itemLabel").get_by_text("Run All Cells", exact=True).click()
            page.wait_for_function(_DONE, timeout=RUN_ALL_S * 1000, polling=500)
            results = page.evaluate(_RESULTS)

            mtime = notebook.stat().st_mtime_ns
            page.locator(".jp-NotebookPanel .jp-Cell").first.click()
            page.keyboard.press("Control+s")
            deadline = time.monotonic() + 15
            while notebook.stat().st_mtime_ns == mtime and time.monotonic() < deadline:
                time.sleep(0.2)
        except Exception:
            page.screenshot(path=str(screenshot))
            print(f"screenshot of the lab: {screenshot}\njupyter server log:\n{server.log_tail()}")
            raise
        finally:
            browser.close()
    print(f"lab: notebook 01 opened, run and saved in {time.monotonic() - started:.1f} s")

    assert not results["errors"], f"a cell failed in the lab:\n{results['errors'][0][-1500:]}"
    not_run = [i for i, p in enumerate(results["prompts"]) if not re.fullmatch(r"\[\d+\]:", p)]
    assert len(results["prompts"]) == code_cells and not not_run, \
        f"code cells {not_run} of {code_cells} did not run: prompts {results['prompts']}"
    assert results["figures"] >= 1, "no figure rendered (an <img> of a PNG plot) in the lab"
    assert results["progress_widgets"] >= 1, "tqdm's bars did not render as widgets (ipywidgets)"
    echoes = [t for t in results["texts"] if "PosixPath(" in t]
    assert not echoes, f"a cell echoes a path above its figure: {echoes[0]!r}"
    assert (tmp_path / "run" / STEM / "metrics.json").is_file(), "the notebook wrote its metrics to the run folder"

    saved = nbformat.read(notebook, as_version=4)
    assert notebook.stat().st_mtime_ns != mtime, "Ctrl+S did not save the notebook"
    assert saved.metadata.kernelspec == KERNELSPEC
    assert not any(c.get("outputs") or c.get("execution_count") for c in saved.cells if c.cell_type == "code"), \
        "the lab saved outputs into the notebook: the pre-save hook of lab/jupyter_server_config.py did not run"
