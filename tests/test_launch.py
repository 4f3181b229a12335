"""make gpu (starling_lib/launch.py): the trainers under `accelerate launch`, then notebooks 03 and 04
on what they trained.

The plan for 8 GPUs is checked on papermill_runs/full_gpu.yaml itself (nothing starts); the path is
run end to end on the CPU with the tiny trainer configs (configs/rm/tiny_cpu.yaml,
configs/policy/tiny_cpu.yaml) at their smallest, one process each."""

import dataclasses
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from starling_lib import launch
from starling_lib.artifacts import RM_MATCH, check_matches, load_policy_run, load_rm_run
from starling_lib.launch import (Launch, LaunchFailed, LaunchPlan, format_plan, plan_launch, processes_for,
                                 resolve_num_processes, run_launches)
from starling_lib.pipeline import PipelineError, load_config, plan_run
from starling_lib.runs import REPO_ROOT

FULL = REPO_ROOT / "papermill_runs" / "full_gpu.yaml"


# --------------------------------------------------------------------------------------------
# the plan for 8 GPUs


@pytest.fixture(scope="module")
def plan8(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    return out, plan_launch(FULL, out, num_processes=8, overrides={"methods": "apa,dpo"}, dry_run=True)


def test_plan_for_8_gpus_names_the_commands_configs_and_folders(plan8):
    out, plan = plan8
    assert [la.name for la in plan.launches] == ["03_reward_model", "04_policy_apa", "04_policy_dpo"]
    rm, apa, dpo = (shlex.split(la.command()) for la in plan.launches)
    assert rm[:8] == ["accelerate", "launch", "--config_file", "configs/accelerate/fsdp.yaml", "--num_processes", "8",
                      "-m", "starling_lib.rm_train"]
    assert rm[8] == "configs/rm/starling_7b.yaml" and rm[-2:] == ["--set", f"output_dir={out}/03_kwise_reward_training"]
    # The online methods take any world size; DPO's 14 pairs a step in micro-batches of 2 pairs split
    # into 7 processes, not 8: the plan says so.
    for argv, method, n in ((apa, "apa", "8"), (dpo, "dpo", "7")):
        assert argv[:8] == ["accelerate", "launch", "--config_file", "configs/accelerate/ddp.yaml", "--num_processes", n,
                            "-m", "starling_lib.policy"]
        assert argv[8] == "configs/policy/starling_apa_7b.yaml"
        sets = dict(a.split("=", 1) for a in argv[9:] if a != "--set")
        assert sets == {"method": method, "reward_model": f"{out}/03_kwise_reward_training/reward_model",
                        "output_dir": f"{out}/04_policy_tuning/training/{method}"}
    assert plan.launches[1].note == "" and "split into 7, not 8" in plan.launches[2].note
    # ...and the notebooks are given those folders, with the trainers' settings for what they evaluate.
    given = {entry.stem: params for entry, params in plan.notebooks.steps}
    assert given["03_kwise_reward_training"]["trained_reward_model"] == f"{out}/03_kwise_reward_training"
    assert given["04_policy_tuning"]["trained_policies"] == f"{out}/04_policy_tuning/training"
    assert given["03_kwise_reward_training"]["backbone"] == "meta-llama/Llama-2-7b-chat-hf"
    assert given["04_policy_tuning"]["steps"] == 10000 and given["04_policy_tuning"]["methods"] == "apa,dpo"
    assert all(params["run_dir"] == str(out) for params in given.values())
    assert not out.exists()   # planning writes nothing


def test_launched_runs_checkpoint():
    """A trainer config that would not checkpoint is refused: make gpu's runs resume by default."""
    for path in ("configs/rm/starling_7b.yaml", "configs/policy/starling_apa_7b.yaml"):
        assert yaml.safe_load((REPO_ROOT / path).read_text())["checkpoint_every"] > 0
    from starling_lib.rm_train import RMTrainConfig
    with pytest.raises(PipelineError, match="checkpoint_every 0"):
        launch._trainer_config("launch.reward_model", RMTrainConfig, REPO_ROOT / "configs/rm/tiny_cpu.yaml",
                               {"checkpoint_every": 0})


def test_dry_run_through_the_cli_prints_the_plan_and_starts_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: pytest.fail("a dry run started a process"))
    monkeypatch.setenv("NUM_PROCESSES", "8")
    assert launch.main([str(FULL), "--dry-run", "--out", str(tmp_path / "run")]) == 0
    text = capsys.readouterr().out
    assert "--config_file configs/accelerate/fsdp.yaml --num_processes 8 -m starling_lib.rm_train" in text
    assert "--num_processes 8 -m starling_lib.policy configs/policy/starling_apa_7b.yaml --set method=apa" in text
    assert "run   03_kwise_reward_training" in text and "trained_reward_model" in text
    assert "Dry run: nothing was started." in text and not (tmp_path / "run").exists()


def test_make_gpu_dry_run(tmp_path):
    venv = Path(sys.prefix)
    if not (venv / ".starling-installed").exists():
        pytest.skip("this environment was not installed by make setup (no .starling-installed)")
    proc = subprocess.run(["make", "-s", "gpu", "DRY_RUN=1", f"VENV={venv}", f"OUT={tmp_path / 'run'}"], cwd=REPO_ROOT,
                          env={**os.environ, "NUM_PROCESSES": "8"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 8" in proc.stdout
    assert "Dry run: nothing was started." in proc.stdout and not (tmp_path / "run").exists()


def test_processes_come_from_the_flag_the_environment_or_the_gpus(monkeypatch):
    assert resolve_num_processes(3, {"NUM_PROCESSES": "8"}) == (3, "--num-processes")
    assert resolve_num_processes(None, {"NUM_PROCESSES": "8"}) == (8, "NUM_PROCESSES")
    with pytest.raises(PipelineError, match="whole number"):
        resolve_num_processes(None, {"NUM_PROCESSES": "eight"})
    monkeypatch.setattr(launch, "gpu_count", lambda: 0)
    monkeypatch.delenv("NUM_PROCESSES", raising=False)
    with pytest.raises(PipelineError, match="no GPU found here.*NUM_PROCESSES"):
        plan_launch(FULL)
    plan = plan_launch(FULL, dry_run=True)   # a dry run plans anyway, and says what it did
    assert "--num_processes" not in plan.launches[0].command() and "NUM_PROCESSES=8" in format_plan(plan)


def test_processes_for_splits_the_batches():
    from starling_lib.policy.config import PolicyTrainConfig
    from starling_lib.rm_train import RMTrainConfig
    assert processes_for(RMTrainConfig(batch_size=160, micro_batch_size=1), "reward_model", 8) == 8
    assert processes_for(RMTrainConfig(batch_size=12, micro_batch_size=2), "reward_model", 8) == 6
    policy = PolicyTrainConfig(rollouts_per_step=64, minibatch_size=28, micro_batch_size=4, reward_model="x")
    # the online methods: any world size up to a step's prompts (P3O: 32 pairs)
    assert [processes_for(policy, "policy", n) for n in (3, 7, 8, 64, 65)] == [3, 7, 8, 64, 64]
    assert processes_for(dataclasses.replace(policy, method="p3o"), "policy", 40) == 32
    # DPO: 14 pairs in micro-batches of 2 pairs split into 1 or 7 processes
    assert [processes_for(dataclasses.replace(policy, method="dpo"), "policy", n) for n in (8, 6)] == [7, 1]


def test_the_notebooks_only_runner_ignores_the_launch_section():
    config = load_config(FULL)
    assert set(config.launch) == {"reward_model", "policy"} and config.as_dict()["launch"] == config.launch
    params = {e.stem: p for e, p in plan_run(FULL).steps}
    assert "trained_reward_model" not in params["03_kwise_reward_training"]


def test_the_notebooks_method_lr_reaches_those_methods_trainers(tmp_path):
    plan = plan_launch(FULL, tmp_path / "run", num_processes=8, dry_run=True,
                       overrides={"methods": "ppo,apa", "method_lr": "ppo:1e-6"})
    sets = {la.name: dict(a.split("=", 1) for a in shlex.split(la.command())[9:] if a != "--set") for la in plan.launches}
    assert sets["04_policy_ppo"]["lr"] == "1e-06" and "lr" not in sets["04_policy_apa"]
    given = {entry.stem: params for entry, params in plan.notebooks.steps}["04_policy_tuning"]
    assert given["lr"] == 2e-7   # the trainer config's, which the notebook compares apa with
    with pytest.raises(PipelineError, match="method_lr: 'sft:1' is not method:rate"):
        plan_launch(FULL, tmp_path / "run", num_processes=8, dry_run=True, overrides={"method_lr": "sft:1"})


def test_bad_launch_sections_are_refused(tmp_path):
    def config(section):
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({"name": "c", "launch": section,
                                        "notebooks": ["notebooks/03_kwise_reward_training.ipynb",
                                                      "notebooks/04_policy_tuning.ipynb"]}))
        return path
    rm = {"accelerate_config": "configs/accelerate/fsdp.yaml", "config": "configs/rm/tiny_cpu.yaml"}
    cases = [({"rewardmodel": rm}, "unknown stage"), ({"reward_model": {**rm, "sett": {}}}, "unknown key"),
             ({"reward_model": {**rm, "config": "configs/rm/nope.yaml"}}, "no such file"),
             ({"reward_model": {**rm, "set": {"stpes": 3}}}, "stpes"),
             ({"policy": {"accelerate_config": "configs/accelerate/ddp.yaml", "config": "configs/policy/tiny_cpu.yaml"}},
              "need a reward model")]
    for section, message in cases:
        with pytest.raises(PipelineError, match=message):
            plan_launch(config(section), num_processes=1)
    with pytest.raises(PipelineError, match="no `launch` section"):
        plan_launch(REPO_ROOT / "papermill_runs/tiny_cpu.yaml", num_processes=1)


def test_a_notebook_refuses_a_trained_run_of_other_settings():
    with pytest.raises(ValueError, match=r"k: notebook 7, trained run 4.*make gpu"):
        check_matches({"k": 7, "loss": "kwise", "lr": 1.0}, {"k": 4, "loss": "kwise", "lr": 2.0}, RM_MATCH, "rm")
    check_matches({"k": 7, "lr": 1.0}, {"k": 7.0, "lr": 2.0}, RM_MATCH, "rm")   # lr is not a must-match setting


def test_a_failed_launch_reports_the_command_exit_code_and_log(tmp_path):
    bad = Launch("03_reward_model", ["accelerate", "launch", "--num_processes", "1", "-m", "starling_lib.rm_train",
                                     "configs/rm/no_such_config.yaml"], tmp_path / "rm", "reward_model", 1)
    plan = LaunchPlan(FULL, tmp_path, False, 1, [bad], None)
    with pytest.raises(LaunchFailed) as caught:
        run_launches(plan, tmp_path)
    message = str(caught.value)
    assert "launch 03_reward_model exited with code 1" in message and "configs/rm/no_such_config.yaml" in message
    assert "no_such_config.yaml" in message.split("last lines of the log:")[1]     # the trainer's own error
    assert f"--out {tmp_path}" in message
    record = json.loads((tmp_path / "launch" / "launch.json").read_text())["launches"][0]
    assert record["status"] == "failed" and record["exit_code"] == 1


# --------------------------------------------------------------------------------------------
# end to end on the CPU: the launches, then notebooks 03 and 04 on what they trained


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    from starling_lib.sft import SFTConfig, sft_policy_path

    tmp = tmp_path_factory.mktemp("launch")
    env = {"STARLING_CACHE": str(tmp / "cache"), "OMP_WAIT_POLICY": "PASSIVE", "STARLING_PLAIN_PROGRESS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        policy = str(sft_policy_path(cfg=SFTConfig(steps=4), progress=False))   # a 4-step warm-up, in the private cache
        cpu = ["--mixed_precision", "no"]
        config = {
            "name": "launch_tiny", "parameters": {"seed": 0, "device": "cpu"},
            "launch": {
                "reward_model": {"accelerate_config": "configs/accelerate/ddp.yaml", "config": "configs/rm/tiny_cpu.yaml",
                                 "set": {"steps": 4, "batch_size": 2, "micro_batch_size": 2, "k": 4, "max_prompts": 60,
                                         "max_length": 64, "eval_every": 2, "checkpoint_every": 2},
                                 "accelerate_args": cpu},
                "policy": {"accelerate_config": "configs/accelerate/ddp.yaml", "config": "configs/policy/tiny_cpu.yaml",
                           "set": {"policy": policy, "steps": 2, "rollouts_per_step": 4, "minibatch_size": 2,
                                   "micro_batch_size": 2, "max_new_tokens": 8, "max_prompt_tokens": 48, "eval_every": 1,
                                   "eval_samples": 1, "eval_prompts": 3, "checkpoint_every": 1},
                           "accelerate_args": cpu}},
            "notebooks": [{"path": "notebooks/03_kwise_reward_training.ipynb",
                           "parameters": {"compare_losses": False, "baseline_steps": 0, "benchmark_limit": 6,
                                          "theory_trials": 1}},
                          {"path": "notebooks/04_policy_tuning.ipynb", "parameters": {"methods": "apa"}}]}
        path = tmp / "launch_tiny.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        run = tmp / "run"
        assert launch.main([str(path), "--num-processes", "1", "--out", str(run), "--no-progress"]) == 0
        yield path, run
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.slow
def test_the_launches_write_where_the_notebooks_would_have(launched):
    _, run = launched
    rm = load_rm_run(run / "03_kwise_reward_training", device="cpu")
    assert rm.config.steps == 4 and rm.config.k == 4 and [h["step"] for h in rm.history] == [1, 2, 3, 4]
    assert rm.extra["num_processes"] == 1 and (run / "03_kwise_reward_training/checkpoints").is_dir()
    apa = load_policy_run(run / "04_policy_tuning/training/apa")
    assert apa.config.method == "apa" and apa.config.reward_model == str(run / "03_kwise_reward_training/reward_model")
    assert [d["step"] for d in apa.eval_details] == [0, 1, 2]
    records = json.loads((run / "launch/launch.json").read_text())["launches"]
    assert [(r["name"], r["status"], r["num_processes"]) for r in records] == [("03_reward_model", "ok", 1),
                                                                              ("04_policy_apa", "ok", 1)]
    assert "--num_processes 1" in (run / "launch/03_reward_model.log").read_text().splitlines()[0]


@pytest.mark.slow
def test_the_notebooks_report_the_launched_runs(launched):
    _, run = launched
    summary = json.loads((run / "summary.json").read_text())
    assert {s: n["status"] for s, n in summary["notebooks"].items()} == {"03_kwise_reward_training": "ok",
                                                                         "04_policy_tuning": "ok"}
    rm = summary["metrics"]["03_kwise_reward_training"]
    assert rm["rm/steps"] == 4 and rm["params/k"] == 4 and rm["params/max_length"] == 64
    assert rm["rm/model_dir"] == str(run / "03_kwise_reward_training/reward_model")
    assert [p["step"] for p in rm["rm/heldout_curve"]] == [2, 4] and 0 <= rm["rm/heldout_pair_accuracy"] <= 1
    assert rm["params/trained_reward_model"] == str(run / "03_kwise_reward_training")
    policy = summary["metrics"]["04_policy_tuning"]
    assert policy["params/trained_policies"] == str(run / "04_policy_tuning/training")
    assert policy["policy/apa/optimizer_steps"] == 2 * 2 * 2 and policy["policy/methods"] == "apa"
    assert [p["step"] for p in policy["policy/frontier"]] == [0, 1, 2]
    assert "policy/apa/eval_reward_gain_se" in policy
    assert (run / "04_policy_tuning/policies/apa/config.json").is_file()   # where notebook 05 looks
    executed = nbformat.read(run / "03_kwise_reward_training.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    assert "Trained outside this notebook on 1 process(es)" in text


@pytest.mark.slow
def test_a_rerun_skips_the_finished_launches(launched, capsys, monkeypatch):
    path, run = launched
    plan = plan_launch(path, run, num_processes=1)
    assert format_plan(plan).count("[done: skipped]") == 2
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: pytest.fail("a finished launch ran again"))
    records = run_launches(plan, run)
    assert [r["status"] for r in records] == ["skipped: already finished"] * 2
    assert "finished in an earlier run" in capsys.readouterr().out


def test_only_the_policies_needs_a_trained_reward_model(tmp_path):
    with pytest.raises(PipelineError, match="not there and which this run does not train"):
        plan_launch(FULL, tmp_path / "run", only="04", num_processes=8)
    plan = plan_launch(FULL, tmp_path / "run", only="04,05", num_processes=8, dry_run=True)
    assert [la.name for la in plan.launches] == ["04_policy_apa"] and any("--only" in n for n in plan.notes)
    assert [e.stem for e, _ in plan.notebooks.steps] == ["04_policy_tuning", "05_mt_bench_evaluation"]


@pytest.mark.slow
def test_an_interrupted_launch_resumes_from_its_checkpoint(launched):
    """Last in this file: it rewrites the reward model's folder. A run stopped after its last
    checkpoint but before its model was saved is launched again and resumes there."""
    import shutil
    path, run = launched
    stage = run / "03_kwise_reward_training"
    shutil.rmtree(stage / "reward_model")
    (stage / "history.json").unlink()
    plan = plan_launch(path, run, only="03", num_processes=1)
    assert "[done: skipped]" not in format_plan(plan)
    assert [r["status"] for r in run_launches(plan, run)] == ["ok"]
    assert "resumed from" in (run / "launch/03_reward_model.log").read_text()
    rm = load_rm_run(stage, device="cpu")
    assert rm.steps_run == 0 and [h["step"] for h in rm.history] == [1, 2, 3, 4]


def test_every_accelerate_config_loads_as_accelerate_reads_it():
    """accelerate's own loader rejects unknown keys and bad values; the two-node file names both nodes."""
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {p.name: load_config_from_file(str(p)) for p in sorted((REPO_ROOT / "configs/accelerate").glob("*.yaml"))}
    assert {"ddp.yaml", "ddp_2nodes.yaml", "fsdp.yaml"} <= set(configs)
    two = configs["ddp_2nodes.yaml"]
    assert (two.num_machines, two.num_processes, two.main_process_port) == (2, 16, 29500)
    assert all(c.num_machines == 1 for name, c in configs.items() if name != "ddp_2nodes.yaml")
