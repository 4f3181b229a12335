"""The papermill runner (starling_lib.pipeline) on throwaway notebooks built here.

Each executed notebook costs a kernel start (a few seconds on a small CPU machine), so one
successful run is shared by several tests and only the failure tests start kernels of their own.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import nbformat
import pytest
import yaml

from starling_lib.pipeline import PipelineError, load_config, main, parse_set, run_config
from toy_notebooks import make_notebook, write_config

WRITE_METRICS = """\
import json, os, pathlib
out = pathlib.Path(run_dir) / "{stem}"
out.mkdir(parents=True, exist_ok=True)
(out / "metrics.json").write_text(json.dumps({metrics}))
"""


@pytest.fixture(scope="module")
def nbs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("notebooks")
    # alpha declares x and seed; beta declares neither (and has no kernelspec metadata).
    make_notebook(folder, "10_alpha", "x: int = 1  # a number\nseed: int = 0  # the seed\n", [
        WRITE_METRICS.format(stem="10_alpha", metrics='{"alpha/x": x, "alpha/x_type": type(x).__name__, '
                                                      '"alpha/seed": seed, "alpha/cwd": os.getcwd()}'),
    ])
    make_notebook(folder, "20_beta", 'y: str = "b"  # a word\nz: str | None = None  # papermill misses this one\n', [
        WRITE_METRICS.format(stem="20_beta", metrics='{"beta/y": y, "beta/z": z, '
                                                     '"beta/has_seed": "seed" in globals(), "beta/table": [1, 2]}'),
    ], kernelspec=False)
    make_notebook(folder, "40_broken", "", ["a = 1", "b = 2\nraise ValueError('boom in broken')"])
    make_notebook(folder, "50_after", "", ["pass"])
    return folder


@pytest.fixture(scope="module")
def good_run(nbs, tmp_path_factory):
    """One run through the CLI: shared params, a per-notebook param, --set, an optional missing notebook."""
    cfg = write_config(nbs, {
        "name": "unit",
        "description": "test run",
        "parameters": {"seed": 3, "x": 2},
        "notebooks": [
            {"path": str(nbs / "10_alpha.ipynb")},
            {"path": str(nbs / "20_beta.ipynb"), "parameters": {"y": "hello", "z": "zed"}},
            {"path": str(nbs / "30_gamma.ipynb"), "optional": True, "parameters": {"anything": 1}},
        ],
    }, "good.yaml")
    run_dir = tmp_path_factory.mktemp("runs") / "good"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main([str(cfg), "--out", str(run_dir), "--set", "x=5", "--no-progress"])
    return run_dir, rc, stdout.getvalue()


@pytest.mark.slow
def test_run_layout(good_run):
    run_dir, rc, _ = good_run
    assert rc == 0
    for name in ["10_alpha.ipynb", "20_beta.ipynb", "summary.json", "summary.md", "config.yaml",
                 "10_alpha/metrics.json", "20_beta/metrics.json"]:
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "30_gamma.ipynb").exists()


@pytest.mark.slow
def test_summary_merges_metrics(good_run, nbs):
    run_dir, _, _ = good_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run"]["status"] == "ok"
    assert summary["run"]["name"] == "unit"
    assert summary["metrics"]["10_alpha"]["alpha/seed"] == 3
    assert summary["metrics"]["20_beta"]["beta/y"] == "hello"
    assert summary["metrics"]["20_beta"]["beta/table"] == [1, 2]
    assert summary["metrics"]["20_beta"]["beta/z"] == "zed"  # `str | None` is a declared parameter
    # executed with the notebook's folder as cwd, as JupyterLab does
    assert summary["metrics"]["10_alpha"]["alpha/cwd"] == str(nbs)
    for stem in ["10_alpha", "20_beta"]:
        info = summary["notebooks"][stem]
        assert info["status"] == "ok" and info["wall_s"] > 0 and info["num_metrics"] >= 3
        assert info["parameters"]["run_dir"] == str(run_dir)
    md = (run_dir / "summary.md").read_text()
    assert "| 10_alpha | ok |" in md and "| 30_gamma | skipped |" in md


@pytest.mark.slow
def test_shared_parameters_only_where_declared(good_run):
    run_dir, _, _ = good_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["notebooks"]["20_beta"]["parameters"] == {"y": "hello", "z": "zed", "run_dir": str(run_dir)}
    assert summary["metrics"]["20_beta"]["beta/has_seed"] is False
    injected = nbformat.read(run_dir / "20_beta.ipynb", as_version=4).metadata.papermill.parameters
    assert "seed" not in injected and "x" not in injected


@pytest.mark.slow
def test_set_override_is_typed_and_recorded(good_run):
    run_dir, _, _ = good_run
    metrics = json.loads((run_dir / "10_alpha" / "metrics.json").read_text())
    assert metrics["alpha/x"] == 5 and metrics["alpha/x_type"] == "int"
    used = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert used["parameters"] == {"seed": 3, "x": 5}


@pytest.mark.slow
def test_optional_missing_is_skipped_and_reported(good_run):
    run_dir, _, stdout = good_run
    summary = json.loads((run_dir / "summary.json").read_text())
    gamma = summary["notebooks"]["30_gamma"]
    assert gamma["status"] == "skipped" and "does not exist" in gamma["reason"]
    assert "30_gamma" in stdout and "does not exist" in stdout


@pytest.mark.slow
def test_failure_names_notebook_and_cell(nbs, tmp_path):
    cfg = write_config(tmp_path, {"name": "broken", "notebooks": [
        str(nbs / "40_broken.ipynb"), str(nbs / "50_after.ipynb")]})
    run_dir = tmp_path / "run"
    with pytest.raises(PipelineError) as err:
        run_config(cfg, out_dir=run_dir, progress_bar=False)
    msg = str(err.value)
    assert "40_broken" in msg and "cell index 2" in msg
    assert "ValueError" in msg and "boom in broken" in msg and "raise ValueError" in msg
    assert (run_dir / "40_broken.ipynb").is_file()  # kept, with the traceback
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run"]["status"] == "failed"
    broken = summary["notebooks"]["40_broken"]
    assert broken["status"] == "failed" and broken["error"]["ename"] == "ValueError"
    assert broken["error"]["cell_index"] == 2
    assert summary["notebooks"]["50_after"]["status"] == "not run"
    assert not (run_dir / "50_after.ipynb").exists()
    assert "| 40_broken | failed |" in (run_dir / "summary.md").read_text()


@pytest.mark.slow
def test_cli_returns_nonzero_on_failure(nbs, tmp_path, capsys):
    cfg = write_config(tmp_path, {"notebooks": [str(nbs / "40_broken.ipynb")]})
    assert main([str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) != 0
    assert "40_broken" in capsys.readouterr().err


# ---- Checks made before any kernel starts -------------------------------------------------

def _raises(tmp_path, config: dict, match: str, **kwargs) -> None:
    cfg = write_config(tmp_path, config)
    with pytest.raises(PipelineError, match=match):
        run_config(cfg, out_dir=tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_unknown_parameter_names_notebook_and_parameter(nbs, tmp_path):
    _raises(tmp_path, {"notebooks": [{"path": str(nbs / "10_alpha.ipynb"), "parameters": {"sed": 1}}]},
            r"10_alpha.*'sed'.*did you mean 'seed'")


def test_wrong_type_is_refused(nbs, tmp_path):
    _raises(tmp_path, {"notebooks": [{"path": str(nbs / "10_alpha.ipynb"), "parameters": {"x": "two"}}]},
            r"'x' is declared `int`")


def test_missing_notebook_is_an_error(nbs, tmp_path):
    _raises(tmp_path, {"notebooks": [str(nbs / "10_alpha.ipynb"), str(nbs / "99_nowhere.ipynb")]},
            r"not found: .*99_nowhere")


def test_nothing_to_run(nbs, tmp_path):
    _raises(tmp_path, {"notebooks": [{"path": str(nbs / "99_nowhere.ipynb"), "optional": True}]},
            "nothing to run")


@pytest.mark.parametrize("name", ["api_key", "openai_api_key", "hf_token", "secret", "db_password"])
def test_credential_like_parameter_refused(nbs, tmp_path, name):
    _raises(tmp_path, {"parameters": {name: "x"}, "notebooks": [str(nbs / "10_alpha.ipynb")]},
            "looks like a credential")


def test_credential_refused_from_set_and_values(nbs, tmp_path):
    _raises(tmp_path, {"notebooks": [str(nbs / "10_alpha.ipynb")]}, "credential", overrides={"hf_token": "x"})
    _raises(tmp_path, {"parameters": {"judge": "sk-" + "a" * 30}, "notebooks": [str(nbs / "10_alpha.ipynb")]},
            "looks like an API key")


def test_token_counts_are_not_credentials(tmp_path):
    cfg = write_config(tmp_path, {"parameters": {"max_new_tokens": 1024, "tokenizer": "t"},
                                  "notebooks": ["x.ipynb"]})
    assert load_config(cfg).parameters["max_new_tokens"] == 1024


def test_set_unknown_key_refused(nbs, tmp_path):
    _raises(tmp_path, {"notebooks": [str(nbs / "10_alpha.ipynb")]}, "--set steps", overrides={"steps": 3})


def test_only_selects_by_number(nbs, tmp_path):
    _raises(tmp_path, {"notebooks": [str(nbs / "10_alpha.ipynb")]}, "--only '77'", only=["77"])


def test_bad_config_files(tmp_path):
    with pytest.raises(PipelineError, match="no such file"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("notebooks: [unclosed\n")
    with pytest.raises(PipelineError, match=r"bad\.yaml.*not valid YAML"):
        load_config(bad)
    for text, match in [("name: x\n", "missing the `notebooks` key"),
                        ("notebook: [a.ipynb]\n", "unknown top-level key"),
                        ("notebooks:\n  - {path: a.ipynb, optinal: true}\n", "unknown key.*optinal")]:
        bad.write_text(text)
        with pytest.raises(PipelineError, match=match):
            load_config(bad)


def test_parse_set():
    # The values stay text until each notebook's declaration types them (tests/test_sweep.py).
    assert parse_set(["steps=10", "lr=1e-5", "device=cpu", "flag=true"]) == {
        "steps": "10", "lr": "1e-5", "device": "cpu", "flag": "true"}
    with pytest.raises(PipelineError):
        parse_set(["steps"])


def test_repo_configs_validate_against_the_notebooks(tmp_path):
    """Every parameter the repo configs pass is one its notebook declares, with the right type;
    an entry is optional only while its notebook does not exist yet."""
    from starling_lib.pipeline import notebook_parameters, resolve_parameters
    from starling_lib.runs import REPO_ROOT
    for name in ["demo_cpu", "tiny_cpu", "full_gpu"]:
        config = load_config(REPO_ROOT / "papermill_runs" / f"{name}.yaml")
        assert config.name == name
        assert [e.stem[:2] for e in config.entries] == ["01", "02", "03", "04", "05", "06", "07"]
        for entry in config.entries:
            if entry.path.exists():
                assert not entry.optional, f"{name}: {entry.stem} exists; `make demo` must not skip it"
                resolve_parameters(config, entry, notebook_parameters(entry.path), tmp_path)
            else:
                assert entry.optional
    lr = {e.stem: e.parameters.get("lr") for e in load_config(REPO_ROOT / "papermill_runs/full_gpu.yaml").entries}
    assert lr["03_kwise_reward_training"] == 1e-5 and lr["04_policy_tuning"] == 2e-7


def test_kernels_get_text_progress_bars_and_an_inline_backend_and_the_environment_is_restored(monkeypatch):
    from starling_lib.pipeline import _kernel_env
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("STARLING_PLAIN_PROGRESS", raising=False)
    with _kernel_env():
        assert "MPLBACKEND" not in os.environ and os.environ["STARLING_PLAIN_PROGRESS"] == "1"
    assert os.environ["MPLBACKEND"] == "Agg" and "STARLING_PLAIN_PROGRESS" not in os.environ


# ---- parameter values, checked before any kernel starts (starling_lib/notebook_checks.py) ----

@pytest.mark.parametrize("only, overrides, message", [
    ("03", {"k": 1}, "notebook .*03_kwise_reward_training.*: k must be at least 2 .*got 1"),
    ("03", {"lr": -1.0}, "lr must be greater than 0; got -1.0"),
    ("03", {"steps": 0}, "steps must be at least 1; got 0"),
    ("03", {"test_fraction": 1.5}, "test_fraction must lie strictly between 0 and 1 .*got 1.5"),
    ("01", {"test_fraction": 1.5}, "01_nectar_exploration.*test_fraction must lie strictly between 0 and 1"),
    ("04", {"methods": "apa,foo"}, "methods='apa,foo': unknown method\\(s\\) foo; allowed: apa, ppo, p3o, dpo"),
    ("04", {"eval_every": 0}, "eval_every must be at least 1 .*got 0"),
    ("04", {"reward_model": "/nonexistent/rm"}, "reward_model='/nonexistent/rm' is not a folder"),
    ("04", {"rollouts_per_step": 3, "minibatch_size": 4}, "micro_batch_size <= minibatch_size <= rollouts_per_step"),
    ("05", {"alpaca_lc_glm": "v2"}, "alpaca_lc_glm must be one of auto, length_controlled_v1, length_controlled_minimal"),
    ("05", {"alpaca_baseline": "gpt4"}, "alpaca_baseline must be one of gpt4_1106_preview, text_davinci_003"),
    ("05", {"alpaca_lc_bootstrap": -1}, "alpaca_lc_bootstrap must be at least 0; got -1"),
    ("07", {"proxy_fraction": 1.5}, "07_reward_overoptimisation.*proxy_fraction must lie in \\(0, 1\\]"),
    ("07", {"rl_methods": "apa,dpo"}, "methods: dpo not online methods"),
    ("07", {"proxy_settings": "steps:3"}, "proxy_settings: steps is set by proxy_fraction"),
    ("07", {"gold_reward_model": "/nonexistent/rm"}, "gold_reward_model='/nonexistent/rm' is not a reward-model folder"),
])
def test_bad_values_are_refused_before_any_kernel_starts(tmp_path, only, overrides, message):
    from starling_lib.pipeline import REPO_ROOT, plan_run
    with pytest.raises(PipelineError, match=message):
        plan_run(REPO_ROOT / "papermill_runs" / "tiny_cpu.yaml", tmp_path / "run", only=only, overrides=overrides)
    assert not (tmp_path / "run").exists()   # nothing written, nothing run


def test_the_shipped_configs_pass_the_value_checks(tmp_path):
    from starling_lib.pipeline import REPO_ROOT, plan_run
    for name in ("tiny_cpu.yaml", "demo_cpu.yaml", "full_gpu.yaml"):
        plan = plan_run(REPO_ROOT / "papermill_runs" / name, tmp_path / name)
        assert plan.steps, name
