"""Seed sweeps (starling_lib.sweep, `python -m starling_lib.pipeline CONFIG --seeds ...`).

The statistics are checked on hand-made seed folders against numbers computed by hand (t
quantiles from a printed table); a real sweep runs notebooks 01 and 02 for two seeds (about a
minute on a small CPU); a sweep of throwaway notebooks built here has a seed that fails.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from starling_lib.pipeline import PipelineError, main, run_config
from starling_lib.sweep import (HEADLINES, SweepFailed, load_sweep, parse_seeds, plot_sweep, run_sweep,
                                sweep_seeds, sweep_table, write_sweep_summary)
from test_stats import T975
from toy_notebooks import make_notebook, write_config

# ---- --seeds text ----------------------------------------------------------------------------

def test_parse_seeds():
    assert parse_seeds("0,1,2,3") == [0, 1, 2, 3]
    assert parse_seeds(" 3, 1 ") == [3, 1]
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("0-2,7") == [0, 1, 2, 7]
    for text, match in [("", "comma-separated whole numbers"), ("0,,1", "'' is not a seed"),
                        ("a", "'a' is not a seed"), ("-1", "'-1' is not a seed"), ("1.5", "not a seed"),
                        ("3-1", "runs backwards"), ("0,1,1", r"\[1\] given twice"), ("0-2,2", "given twice")]:
        with pytest.raises(PipelineError, match=match):
            parse_seeds(text)


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture
def hand_sweep(tmp_path) -> Path:
    """Three seeds, two notebooks; seed 2's notebook 20_b failed (a stale metrics.json of it is
    left from an earlier run and must not count); seed 1 wrote null for a/z."""
    run = tmp_path / "sweep"
    a = {0: {"a/x": 1, "a/z": 0.5, "policy/apa/eval_reward_gain": 0.1},
         1: {"a/x": 2, "a/z": None, "policy/apa/eval_reward_gain": 0.3},
         2: {"a/x": 4, "a/z": 1.5, "policy/apa/eval_reward_gain": -0.1}}
    b = {0: {"b/y": 0.5}, 1: {"b/y": 0.7}, 2: {"b/y": 99.0}}
    for seed in range(3):
        folder = run / f"seed_{seed}"
        common = {"a/flag": True, "a/name": "text", "a/table": [1, 2], "params/seed": seed, "run/git_commit": "abc"}
        _write(folder / "10_a" / "metrics.json", {**a[seed], **common})
        _write(folder / "20_b" / "metrics.json", {**b[seed], "params/seed": seed})
        failed = seed == 2
        _write(folder / "summary.json", {
            "run": {"status": "failed" if failed else "ok"},
            "notebooks": {"10_a": {"status": "ok", "wall_s": 1.0},
                          "20_b": ({"status": "failed", "wall_s": 2.0,
                                    "error": {"ename": "ValueError", "evalue": "boom\nmore", "cell_index": 3}}
                                   if failed else {"status": "ok", "wall_s": 2.0}),
                          "30_c": {"status": "skipped", "reason": "not selected by --only"}}})
    _write(run / "sweep.json", {"sweep": {"name": "hand", "config": "cfg.yaml", "status": "failed"},
                                "seeds": {str(s): {"status": "failed" if s == 2 else "ok", "wall_s": 3.0}
                                          for s in range(3)}})
    return run


def test_find_sweep_from_a_seed_folder_or_by_name(hand_sweep, tmp_path):
    from starling_lib.sweep import find_sweep
    assert find_sweep(hand_sweep / "seed_1") == hand_sweep          # a seed's run folder inside the sweep
    assert find_sweep(tmp_path / "elsewhere") is None and find_sweep("") is None
    assert find_sweep("", sweep_dir=hand_sweep) == hand_sweep
    with pytest.raises(FileNotFoundError, match="is not a seed sweep"):
        find_sweep("", sweep_dir=tmp_path)


def test_aggregation_by_hand(hand_sweep):
    summary = load_sweep(hand_sweep)
    assert list(summary["metric"]) == ["a/x", "a/z", "policy/apa/eval_reward_gain", "b/y"]  # numbers only, no params/
    rows = summary.set_index("metric")

    x = rows.loc["a/x"]  # 1, 2, 4
    sd = math.sqrt(7 / 3)
    assert x["n"] == 3 and x["missing"] == ""
    assert x["mean"] == pytest.approx(7 / 3) and x["sd"] == pytest.approx(sd) and x["se"] == pytest.approx(sd / math.sqrt(3))
    assert x["ci95_low"] == pytest.approx(7 / 3 - T975[2] * sd / math.sqrt(3), abs=1e-4)
    assert x["ci95_high"] == pytest.approx(7 / 3 + T975[2] * sd / math.sqrt(3), abs=1e-4)
    assert [x["seed_0"], x["seed_1"], x["seed_2"]] == [1, 2, 4]

    y = rows.loc["b/y"]  # 0.5, 0.7; seed 2's notebook failed: its stale 99 is not used
    assert y["n"] == 2 and y["missing"] == "2" and math.isnan(y["seed_2"])
    assert y["mean"] == pytest.approx(0.6) and y["sd"] == pytest.approx(math.sqrt(0.02)) and y["se"] == pytest.approx(0.1)
    assert y["ci95_low"] == pytest.approx(0.6 - T975[1] * 0.1, abs=1e-4)
    assert y["ci95_high"] == pytest.approx(0.6 + T975[1] * 0.1, abs=1e-4)

    z = rows.loc["a/z"]  # seed 1 wrote null
    assert z["n"] == 2 and z["missing"] == "1" and z["mean"] == pytest.approx(1.0)

    assert summary.attrs["seeds"] == [0, 1, 2] and summary.attrs["name"] == "hand"
    (failure,) = summary.attrs["failures"]
    assert failure["seed"] == 2 and failure["status"] == "failed"
    assert failure["note"] == "20_b failed in cell 3: ValueError: boom"

    assert list(load_sweep(hand_sweep, r"a/.*")["metric"]) == ["a/x", "a/z"]
    assert list(load_sweep(hand_sweep, ["b/y", "a/x"])["metric"]) == ["a/x", "b/y"]

    shown = sweep_table(summary)
    assert shown.loc["b/y", "n"] == "2/3 (no seed 2)" and shown.loc["a/x", "n"] == "3/3"
    assert shown.loc["a/x", "mean"] == "2.333" and shown.loc["b/y", "seed 2"] == "–"


def test_seed_status_table(hand_sweep, tmp_path):
    seeds = sweep_seeds(hand_sweep).set_index("seed")
    assert list(seeds["status"]) == ["ok", "ok", "failed"]
    assert seeds.loc[0, "notebooks_ok"] == "2/2" and seeds.loc[2, "notebooks_ok"] == "1/2"
    # a seed asked for but never started, and a folder without summary.json, are listed too
    record = json.loads((hand_sweep / "sweep.json").read_text())
    record["seeds"]["3"] = {"status": "not run", "reason": "seed 2 was interrupted"}
    (hand_sweep / "sweep.json").write_text(json.dumps(record))
    (hand_sweep / "seed_4").mkdir()
    seeds = sweep_seeds(hand_sweep).set_index("seed")
    assert seeds.loc[3, "status"] == "not run" and seeds.loc[4, "status"] == "no summary.json"
    assert load_sweep(hand_sweep).set_index("metric").loc["a/x", "missing"] == "3, 4"
    with pytest.raises(FileNotFoundError, match="not a seed sweep"):
        load_sweep(tmp_path)


def test_summary_files(hand_sweep):
    paths = write_sweep_summary(hand_sweep)
    assert set(paths) == {"csv", "json", "md", "figure"}
    csv = pd.read_csv(paths["csv"]).set_index("metric")
    assert csv.loc["a/x", "mean"] == pytest.approx(7 / 3) and csv.loc["b/y", "n"] == 2
    data = json.loads(paths["json"].read_text())  # strict JSON: NaN written as null
    assert data["failures"][0]["seed"] == 2
    by_metric = {r["metric"]: r for r in data["metrics"]}
    assert by_metric["b/y"]["seed_2"] is None and by_metric["b/y"]["missing"] == "2"
    md = paths["md"].read_text()
    assert md.startswith("# Seed sweep `hand`: 2 of 3 seeds ok, 1 not")
    assert "* seed 2: failed, 20_b failed in cell 3: ValueError: boom" in md
    assert "## Headline metrics" in md and "| policy/apa/eval_reward_gain | 3/3 |" in md
    assert "### 20_b" in md and "| b/y | 2/3 (no seed 2) | 0.6 |" in md
    assert "t(0.975, n−1)" in md
    assert paths["figure"].is_file() and paths["figure"].stat().st_size > 5000


def test_figure(hand_sweep):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plot_sweep(hand_sweep)  # the headline panel: policy/<method>/eval_reward_gain
    (ax,) = fig.axes
    assert "reward gain" in ax.get_title(loc="left") and ax.get_xlabel() == "reward gain" and ax.get_ylabel() == "metric"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["policy/apa/eval_reward_gain"]
    assert any(list(line.get_xdata()) == [0.0, 0.0] for line in ax.get_lines())  # reference line at 0
    labels = ax.get_legend_handles_labels()[1]
    assert {"seed 0", "seed 1", "seed 2", "mean ± 95% t-interval", "no gain"} <= set(labels)
    assert "2 of 3 seeds ok (not ok: seed 2)" in fig._suptitle.get_text()
    plt.close(fig)

    fig = plot_sweep(hand_sweep, "b/y")  # seed 2 lacks it: the label says n
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["b/y (n=2/3)"]
    plt.close(fig)

    fig = plot_sweep(load_sweep(hand_sweep), [r"a/.*", "b/y"])  # chosen metrics, one panel each
    assert [a.get_title(loc="left") for a in fig.axes] == ["a/.*", "b/y"]
    plt.close(fig)
    assert plot_sweep(hand_sweep, "nothing/here") is None


def test_headlines_name_real_metrics():
    for metric in ["rm/heldout_pair_accuracy", "rm/baseline/heldout_pair_accuracy", "policy/ppo/eval_reward_gain",
                   "eval/mt_bench/tiny", "eval/alpaca_eval/sft-tiny/win_rate", "bias/sim/biased/no_pairwise/tv_distance",
                   "laser/heldout/relative_change", "laser/search/relative_change"]:
        assert sum(h.matches(metric) for h in HEADLINES) == 1, metric
    for metric in ["rm/heldout_pair_accuracy_se", "policy/ppo/eval_reward_gain_se", "eval/mt_bench/tiny/se",
                   "eval/mt_bench/num_questions", "eval/mt_bench/tiny/turn_1", "laser/heldout/relative_change_se"]:
        assert not any(h.matches(metric) for h in HEADLINES), metric


# ---- sweeps that run notebooks ----------------------------------------------------------------

@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """A config of one throwaway notebook: metrics from the seed, a failure for seed `fail_seed`."""
    folder = tmp_path_factory.mktemp("toy")
    make_notebook(folder, "10_toy", 'seed: int = 0\nfail_seed: int = -1\njudge: str = "local"\n', [
        "import json, pathlib\n"
        "if seed == fail_seed:\n"
        "    raise ValueError(f'boom for seed {seed}')\n"
        "out = pathlib.Path(run_dir) / '10_toy'\n"
        "out.mkdir(parents=True, exist_ok=True)\n"
        "(out / 'metrics.json').write_text(json.dumps({'toy/square': seed * seed, 'toy/judge': judge,\n"
        "    'toy/judge_type': type(judge).__name__, 'params/seed': seed}))\n"])
    make_notebook(folder, "20_seedless", "", ["pass"])
    return write_config(folder, {"name": "toy", "parameters": {"seed": 0},
                                 "notebooks": [str(folder / "10_toy.ipynb")]})


def _cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_a_failed_seed_is_listed_and_the_others_run(toy, tmp_path):
    run = tmp_path / "sweep"
    rc, _, err = _cli([str(toy), "--seeds", "0,1,2", "--set", "fail_seed=1", "--set", "judge=no",
                       "--out", str(run), "--no-progress"])
    assert rc == 1
    assert "seed 1" in err and "10_toy" in err and "boom for seed 1" in err and "--seeds 1 --out" in err
    record = json.loads((run / "sweep.json").read_text())
    assert {s: r["status"] for s, r in record["seeds"].items()} == {"0": "ok", "1": "failed", "2": "ok"}
    assert record["seeds"]["1"]["failed_notebook"] == "10_toy"
    assert record["seeds"]["1"]["error"] == "10_toy failed in cell 1: ValueError: boom for seed 1"
    assert record["sweep"]["status"] == "failed"
    # seed 2 ran after seed 1 failed; `--set judge=no` reached the `str` parameter as text
    metrics = json.loads((run / "seed_2" / "10_toy" / "metrics.json").read_text())
    assert metrics["toy/square"] == 4 and metrics["toy/judge"] == "no" and metrics["toy/judge_type"] == "str"

    row = load_sweep(run).set_index("metric").loc["toy/square"]
    assert row["n"] == 2 and row["missing"] == "1" and row["mean"] == 2.0
    md = (run / "sweep_summary.md").read_text()
    assert "2 of 3 seeds ok, 1 not" in md and "* seed 1: failed, 10_toy failed in cell 1: ValueError: boom for seed 1" in md
    assert "| toy/square | 2/3 (no seed 1) | 2 |" in md

    # After the "fix", rerunning seed 1 into the sweep folder completes the table.
    rc, _, err = _cli([str(toy), "--seeds", "1", "--set", "judge=no", "--out", str(run), "--no-progress"])
    assert rc == 0, err
    row = load_sweep(run).set_index("metric").loc["toy/square"]
    assert row["n"] == 3 and row["missing"] == "" and row["mean"] == pytest.approx(5 / 3)
    record = json.loads((run / "sweep.json").read_text())
    assert [r["status"] for r in record["seeds"].values()] == ["ok", "ok", "ok"]
    assert "3 of 3 seeds ok" in (run / "sweep_summary.md").read_text()

    # From Python: SweepFailed, after the summary is written, names the seed.
    with pytest.raises(SweepFailed, match="seed 5: 10_toy failed") as err:
        run_sweep(toy, [5], out_dir=tmp_path / "py", overrides={"fail_seed": 5}, progress_bar=False)
    assert [f["seed"] for f in err.value.failures] == [5] and (err.value.run_dir / "sweep_summary.md").is_file()


def test_sweep_refusals(toy, tmp_path):
    out = tmp_path / "sweep"
    with pytest.raises(PipelineError, match="--set seed=3 and --seeds together"):
        run_sweep(toy, [0, 1], out_dir=out, overrides={"seed": 3})
    with pytest.raises(PipelineError, match="no notebook of this run declares a `seed`"):
        run_sweep(write_config(tmp_path, {"notebooks": [str(toy.parent / "20_seedless.ipynb")]}), [0, 1], out_dir=out)
    with pytest.raises(PipelineError, match="'sed'"):  # a config error stops the sweep before any seed runs
        run_sweep(toy, [0, 1], out_dir=out, overrides={"sed": 1})
    assert not out.exists()
    rc, _, err = _cli([str(toy), "--seeds", "0,x", "--out", str(out)])
    assert rc == 1 and "'x' is not a seed" in err and not out.exists()
    # as `python -m`, where the module runs as __main__: still a one-line error, no traceback
    proc = subprocess.run([sys.executable, "-m", "starling_lib.pipeline", str(toy), "--seeds", "3-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: --seeds '3-1'") and "Traceback" not in proc.stderr
    single = tmp_path / "single"
    single.mkdir()
    (single / "summary.json").write_text("{}")
    with pytest.raises(PipelineError, match="folder of a single run"):
        run_sweep(toy, [0], out_dir=single)
    (out / "seed_0").mkdir(parents=True)
    (out / "sweep.json").write_text("{}")
    with pytest.raises(PipelineError, match="folder of a seed sweep"):
        run_config(toy, out_dir=out)


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory):
    """Notebooks 01 and 02 (small bootstrap and simulation) for seeds 0 and 1, through the CLI."""
    folder = tmp_path_factory.mktemp("real")
    cfg = write_config(folder, {"name": "sweep01", "parameters": {"seed": 0}, "notebooks": [
        {"path": "notebooks/01_nectar_exploration.ipynb", "parameters": {"nectar_source": "bundled"}},
        {"path": "notebooks/02_positional_bias.ipynb", "parameters": {"n_bootstrap": 200, "sim_prompts": 60}}]})
    run = folder / "sweep"
    rc, out, err = _cli([str(cfg), "--seeds", "0,1", "--out", str(run), "--no-progress"])
    assert rc == 0, err[-3000:]
    return run


@pytest.mark.slow
def test_real_sweep_layout_and_seeds(real_sweep):
    run = real_sweep
    for name in ["sweep.json", "sweep_summary.csv", "sweep_summary.json", "sweep_summary.md",
                 "figures/sweep_headlines.png"]:
        assert (run / name).is_file(), name
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("seed_")) == ["seed_0", "seed_1"]
    metrics = {}
    for seed in (0, 1):
        folder = run / f"seed_{seed}"
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["run"]["status"] == "ok" and summary["run"]["overrides"] == {"seed": seed}
        assert (folder / "01_nectar_exploration.ipynb").is_file() and (folder / "02_positional_bias.ipynb").is_file()
        for stem in ["01_nectar_exploration", "02_positional_bias"]:
            m = json.loads((folder / stem / "metrics.json").read_text())
            assert m["params/seed"] == seed and m["params/run_dir"] == str(folder)
            metrics.setdefault(stem, []).append(m)
    # The data read does not depend on the seed; the simulated judge's noise does.
    nectar = metrics["01_nectar_exploration"]
    assert nectar[0]["nectar/num_prompts"] == nectar[1]["nectar/num_prompts"]
    bias = metrics["02_positional_bias"]
    sim = [k for k in bias[0] if k.startswith("bias/sim/") and isinstance(bias[0][k], float)]
    assert sim and any(bias[0][k] != bias[1][k] for k in sim)


@pytest.mark.slow
def test_real_sweep_summary(real_sweep):
    summary = load_sweep(real_sweep)
    assert summary.attrs["failures"] == [] and summary.attrs["seeds"] == [0, 1]
    assert set(summary["notebook"]) == {"01_nectar_exploration", "02_positional_bias"}
    assert (summary["n"] == 2).all() and not summary["metric"].str.startswith("params/").any()
    rows = summary.set_index("metric")
    assert rows.loc["nectar/num_prompts", "sd"] == 0
    varying = summary[summary["sd"] > 0]
    assert len(varying) and ((varying["ci95_low"] < varying["mean"]) & (varying["mean"] < varying["ci95_high"])).all()
    tv = load_sweep(real_sweep, r"bias/sim/biased/.*/tv_distance")
    assert len(tv) == 6
    md = (real_sweep / "sweep_summary.md").read_text()
    assert md.startswith("# Seed sweep `sweep01`: 2 of 2 seeds ok")
    assert "## Headline metrics" in md and "### 02_positional_bias" in md
    assert "sweep_headlines.png" in md
    record = json.loads((real_sweep / "sweep.json").read_text())
    assert record["sweep"]["status"] == "ok" and record["sweep"]["seeds"] == [0, 1]
