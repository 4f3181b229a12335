"""Shared test plumbing: the tiny model; executing a notebook end to end through papermill; a
script in a one-process torch.distributed group; tests marked vllm skipped where vLLM is not installed."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import papermill
import pytest
from ports import free_port

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def pytest_collection_modifyitems(config, items):
    """Tests marked vllm need vLLM, which lives in its own environment (.venv-vllm: `make vllm-env`;
    `make test` runs them there): skipped where it is not installed. Only its absence skips: an
    installed vLLM that fails to import fails the tests."""
    if importlib.util.find_spec("vllm") is not None:
        return
    skip = pytest.mark.skip(reason="vLLM is not installed here; these run in .venv-vllm (make test-vllm)")
    for item in items:
        if item.get_closest_marker("vllm") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer) of the offline "tiny" model on the CPU in eval mode: one per test module,
    so a module that trains or freezes it does not change another module's."""
    from starling_lib.models import load_model_and_tokenizer
    return load_model_and_tokenizer("tiny", device="cpu")


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    """A saved reward model on the tiny body with an untrained (random) head: enough to drive the
    policy trainer's and the reward server's mechanics."""
    from starling_lib.reward_model import build_reward_model
    from starling_lib.rm_io import save_reward_model
    model, _ = build_reward_model("tiny", max_length=96, seed=0)
    return str(save_reward_model(model, tmp_path_factory.mktemp("rm") / "reward_model"))


@pytest.fixture(scope="session")
def run_notebook():
    """run_notebook(stem, tmp, parameters, env={}) -> (stage folder, its metrics.json as a dict).

    Executes notebooks/<stem>.ipynb into tmp/<stem>.ipynb with run_dir = tmp/run. `env` is set for
    the kernel (which inherits this process's environment) and restored afterwards.
    """
    def run(stem: str, tmp: Path, parameters: dict, env: dict | None = None):
        # Busy-waiting OpenMP threads collapse when other jobs share the cores; passive waiting does not.
        # Progress bars as text, not widgets nobody watches (starling_lib/progress.py).
        env = {"OMP_WAIT_POLICY": "PASSIVE", "STARLING_PLAIN_PROGRESS": "1", **(env or {})}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            papermill.execute_notebook(str(NOTEBOOKS / f"{stem}.ipynb"), str(tmp / f"{stem}.ipynb"),
                                       cwd=str(NOTEBOOKS), kernel_name="python3", progress_bar=False,
                                       parameters={"run_dir": str(tmp / "run"), **parameters})
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        out = tmp / "run" / stem
        return out, json.loads((out / "metrics.json").read_text())
    return run


@pytest.fixture(scope="session")
def run_distributed_script():
    """run_distributed_script(code) -> subprocess.CompletedProcess of `python -c code`, with
    MASTER_ADDR / MASTER_PORT set to a free local port for the script's own one-process gloo group
    (in a subprocess, so this process's torch.distributed state is left alone)."""
    def run(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    return run
