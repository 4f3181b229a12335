"""starling_lib.reward_server and reward_client: a reward model served apart scores as the in-process
one does, refuses malformed requests with a message, is retried while down, fails clearly when it
stays down, and drives a policy run (which stops with a checkpoint when the server dies, and resumes)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from ports import free_port
from starling_lib.models import tiny_model_path
from starling_lib.policy import PolicyTrainConfig, evaluate_initial, load_config, train_policy
from starling_lib.reward_client import (RemoteRewardModel, RewardRequestError, RewardServerError, check_server_url,
                                        load_reward_scorer)
from starling_lib.reward_server import RewardServer
from starling_lib.rm_io import load_reward_model
from starling_lib.rm_layout import chat_texts

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [[{"role": "user", "content": "What is the capital of France?"}],
           "Write a haiku about rain.",
           [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke about cats, a long one please."}],
           "Explain PPO in one sentence.", [{"role": "user", "content": "2+2?"}]]
ANSWERS = ["Paris.", "Drops on the window / the grey afternoon / a kettle sings", "A cat walked into a bar...",
           "It clips the policy ratio so updates stay small.", "4"]


@pytest.fixture(scope="module")
def local_rm(rm_dir):
    return load_reward_model(rm_dir, device="cpu")


def _server(rm_dir, port: int = 0) -> RewardServer:
    return RewardServer(load_reward_model(rm_dir, device="cpu"), ("127.0.0.1", port), batch_size=4, name=rm_dir,
                        log_requests=False).start()


@pytest.fixture(scope="module")
def server(rm_dir):
    s = _server(rm_dir)
    yield s
    s.stop()


def _post(url: str, body: bytes | str) -> tuple[int, dict]:
    data = body.encode() if isinstance(body, str) else body
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method="POST"), timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ---------------------------------------------------------------------------------------------
# scoring


def test_remote_scores_equal_the_in_process_ones_and_health_describes_the_model(server, local_rm, rm_dir):
    client = RemoteRewardModel(server.url, request_size=2)          # 5 pairs: 3 requests
    assert client.info["status"] == "ok" and client.info["model"] == rm_dir
    assert (client.info["max_length"], client.info["chat_format"], client.info["batch_size"]) == (96, local_rm.chat_format, 4)
    assert client.info["device"] == "cpu" and client.info["dtype"] == "float32"
    served = server.requests_served
    remote = client.score(PROMPTS, ANSWERS)
    assert server.requests_served == served + 3 and client.attempts == 4   # /health and 3 /score
    local = local_rm.score(PROMPTS, ANSWERS)
    assert remote.dtype == torch.float32 and remote.device.type == "cpu"
    assert torch.allclose(remote, local, atol=1e-5), (remote, local)
    texts = ["".join(chat_texts(local_rm.tokenizer, p, a)) for p, a in zip(PROMPTS, ANSWERS)]
    assert torch.allclose(client.score_texts(texts), local_rm.score_texts(texts), atol=1e-5)
    assert client.score([], []).shape == (0,)
    # what the trainers load for a URL, and for a folder
    assert isinstance(load_reward_scorer(server.url + "/"), RemoteRewardModel)
    assert not isinstance(load_reward_scorer(rm_dir, device="cpu"), RemoteRewardModel)


@pytest.mark.parametrize("body, status, message, where", [
    ("{not json", 400, "the body is not valid JSON", "line 1, column 2"),
    ("[1, 2]", 400, "must be a JSON object, got list", None),
    ('{"prompts": ["a"]}', 400, "expected the keys prompts and answers, or texts alone; got \\['prompts'\\]", None),
    ('{"prompts": ["a"], "answers": ["x"], "texts": ["t"]}', 400, "expected the keys", None),
    ('{"prompts": ["a", "b"], "answers": ["x"]}', 400, "2 prompts but 1 answers", None),
    ('{"prompts": "a", "answers": ["x"]}', 400, "prompts must be a list, got str", "prompts"),
    ('{"prompts": ["a", 7], "answers": ["x", "y"]}', 400, "a prompt must be a string or a non-empty list", "prompts[1]"),
    ('{"prompts": [[{"role": "user"}]], "answers": ["x"]}', 400, "content must be a string, it is missing",
     "prompts[0][0].content"),
    ('{"prompts": [[{"role": "user", "content": 3}]], "answers": ["x"]}', 400, "content must be a string, it is of type int",
     "prompts[0][0].content"),
    ('{"prompts": ["a"], "answers": [null]}', 400, "must be a string, got NoneType", "answers[0]"),
    ('{"texts": "abc"}', 400, "texts must be a list of strings, got str", "texts"),
])
def test_malformed_requests_get_400_saying_what_and_where(server, body, status, message, where):
    code, reply = _post(server.url + "/score", body)
    assert code == status
    assert reply["error"] and re.search(message, reply["error"]), reply
    assert reply.get("where") == where


def test_unknown_endpoints_and_a_refused_request_are_not_retried(server):
    assert _post(server.url + "/scores", "{}")[0] == 404
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server.url + "/score", timeout=30)
    assert e.value.code == 405
    client = RemoteRewardModel(server.url, sleep=lambda s: pytest.fail("a 400 is not retried"))
    with pytest.raises(RewardRequestError, match=r"HTTP 400\): content must be a string.*at prompts\[0\]\[0\]\.content"):
        client.score([[{"role": "user"}]], ["x"])
    assert client.attempts == 2        # /health, then the one refused /score


# ---------------------------------------------------------------------------------------------
# retries


def test_a_server_down_on_the_first_tries_is_retried_until_it_answers(rm_dir, local_rm):
    port, started, waits = free_port(), [], []

    def sleep(seconds):                # the server comes up during the client's second wait
        waits.append(seconds)
        if len(waits) == 2:
            started.append(_server(rm_dir, port))

    try:
        client = RemoteRewardModel(f"http://127.0.0.1:{port}", tries=4, backoff_base_s=0.01, sleep=sleep)
        assert client.retry_counts == {"connection": 2} and len(waits) == 2 and client.attempts == 3
        assert torch.allclose(client.score(PROMPTS, ANSWERS), local_rm.score(PROMPTS, ANSWERS), atol=1e-5)
    finally:
        for s in started:
            s.stop()


def test_a_5xx_is_retried(server, local_rm, monkeypatch):
    real, failures = server.model.score, []

    def flaky(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(server.model, "score", flaky)
    client = RemoteRewardModel(server.url, backoff_base_s=0.01)
    assert torch.allclose(client.score(PROMPTS, ANSWERS), local_rm.score(PROMPTS, ANSWERS), atol=1e-5)
    assert client.retry_counts == {"http_500": 1}


def test_a_server_that_stays_down_gives_a_clear_error_after_n_tries():
    url, waits = f"http://127.0.0.1:{free_port()}", []
    with pytest.raises(RewardServerError, match=rf"reward server at {url}/health did not answer after 3 tries .*"
                                                r"last failure: connection: ConnectionRefusedError"):
        RemoteRewardModel(url, tries=3, sleep=waits.append)
    assert len(waits) == 2 and 1.0 <= waits[0] <= 2.0 and 2.0 <= waits[1] <= 4.0   # base 2 s, doubling, jitter
    client = RemoteRewardModel(url, tries=1, check=False)
    with pytest.raises(RewardServerError, match=rf"{url}/score did not answer after 1 try"):
        client.score(["p"], ["a"])


def test_urls_are_checked_and_the_environment_sets_the_retries(monkeypatch):
    assert check_server_url("https://rm.example.org/starling/") == "https://rm.example.org/starling"
    for bad, message in [("http://:8000", "has no host"), ("http://h:99999", "Port out of range"),
                         ("ftp://h:1", "must start with http"), ("http://h:8000?tries=3", "query or fragment")]:
        with pytest.raises(ValueError, match=message):
            check_server_url(bad)
    assert PolicyTrainConfig(reward_model="http://localhost:8000").reward_model == "http://localhost:8000"
    with pytest.raises(ValueError, match="has no host"):
        PolicyTrainConfig(reward_model="http://:8000")
    monkeypatch.setenv("STARLING_RM_TRIES", "3")
    monkeypatch.setenv("STARLING_RM_TIMEOUT_S", "12.5")
    client = RemoteRewardModel("http://localhost:1", check=False)
    assert (client.tries, client.timeout_s, client.backoff_max_s) == (3, 12.5, 60.0)
    monkeypatch.setenv("STARLING_RM_TRIES", "many")
    with pytest.raises(ValueError, match="STARLING_RM_TRIES='many' is not a int"):
        RemoteRewardModel("http://localhost:1", check=False)


# ---------------------------------------------------------------------------------------------
# the policy trainer against a served reward model


@pytest.fixture(scope="module")
def tiny_cfg(rm_dir):
    return PolicyTrainConfig(policy=str(tiny_model_path()), reward_model=rm_dir, method="ppo", steps=2,
                             rollouts_per_step=4, minibatch_size=2, micro_batch_size=2, max_new_tokens=8,
                             max_prompt_tokens=48, unfrozen_layers=2, lr=1e-3, device="cpu", progress=False,
                             report_to="none", eval_every=2, eval_prompts=2, eval_samples=1)


def _history(result, *keys):
    return [h[f"policy/ppo/{k}"] for h in result.history for k in keys]


KEYS = ("reward_mean", "reward_std", "policy_loss", "value_loss", "kl")


def test_a_policy_run_against_the_server_equals_the_in_process_one(tiny_cfg, server):
    local = train_policy(tiny_cfg)
    served = server.requests_served
    remote = train_policy(dataclasses.replace(tiny_cfg, reward_model=server.url))
    assert server.requests_served == served + 2 + 2       # a rollout batch per step, evaluations at 0 and 2
    assert _history(remote, *KEYS) == pytest.approx(_history(local, *KEYS), rel=1e-5, abs=1e-6)
    assert [r for d in remote.eval_details for r in d["rewards"]] == \
        pytest.approx([r for d in local.eval_details for r in d["rewards"]], abs=1e-5)
    initial = evaluate_initial(dataclasses.replace(tiny_cfg, reward_model=server.url))   # its own load site
    assert initial["rewards"] == pytest.approx(local.eval_details[0]["rewards"], abs=1e-5)


def test_a_server_killed_mid_run_stops_it_with_a_checkpoint_and_a_rerun_resumes(tiny_cfg, rm_dir, tmp_path, monkeypatch):
    cfg = dataclasses.replace(tiny_cfg, steps=3, eval_every=0)
    straight = train_policy(cfg)                                  # in process, uninterrupted
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    run = dataclasses.replace(cfg, reward_model=url, output_dir=str(tmp_path / "run"))   # checkpoint_every=0
    monkeypatch.setenv("STARLING_RM_TRIES", "2")
    monkeypatch.setenv("STARLING_RM_BACKOFF_MAX_S", "0.01")
    servers, calls, real_score = [_server(rm_dir, port)], [], RemoteRewardModel.score

    def score_and_kill_before_the_third_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            servers[0].stop()                                     # the server dies: connections refused
        return real_score(self, *args, **kwargs)

    monkeypatch.setattr(RemoteRewardModel, "score", score_and_kill_before_the_third_batch)
    try:
        with pytest.raises(RewardServerError) as e:
            train_policy(run)
        message = str(e.value)
        assert f"{url}/score did not answer after 2 tries" in message and "ConnectionRefusedError" in message
        assert "stopped at step 3 of 3" in message and "resumes from step 2" in message
        checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
        assert checkpoints == ["step-000002"], checkpoints       # saved on the way out: no checkpoint_every
        assert not (tmp_path / "run" / "policy").exists()

        servers.append(_server(rm_dir, port))                     # back, at the same address
        resumed = train_policy(run)
    finally:
        for s in servers:
            s.stop()
    assert resumed.steps_run == 1 and len(resumed.history) == 3
    assert _history(resumed, *KEYS) == pytest.approx(_history(straight, *KEYS), rel=1e-5, abs=1e-6)
    a, b = straight.policy.state_dict(), resumed.policy.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# ---------------------------------------------------------------------------------------------
# the command line and the recipes


def test_the_command_line_serves_a_folder(rm_dir, local_rm):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "starling_lib.reward_server", rm_dir, "--port", str(port),
                             "--device", "cpu", "--dtype", "float32", "--batch-size", "2", "--quiet"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:   # refused while it starts (imports, loading): retried every 0.5 s for up to a minute
        client = RemoteRewardModel(f"http://127.0.0.1:{port}", tries=120, backoff_base_s=0.5, backoff_max_s=0.5)
        assert client.info["batch_size"] == 2 and client.info["model"] == rm_dir
        assert torch.allclose(client.score(PROMPTS, ANSWERS), local_rm.score(PROMPTS, ANSWERS), atol=1e-5)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert f"serving {rm_dir} on http://127.0.0.1:{port}" in out, err[-2000:]


def test_the_beta_recipes_parse_into_valid_configs(tmp_path):
    from starling_lib.pipeline import notebook_parameters, plan_run, resolve_parameters
    from starling_lib.pipeline import load_config as load_run_config

    beta = load_config(REPO / "configs/policy/starling_ppo_beta_7b.yaml")
    assert (beta.policy, beta.method, beta.reward_model, beta.unfrozen_layers, beta.rollouts_per_step,
            beta.minibatch_size) == ("openchat/openchat-3.5-0106", "ppo", "http://localhost:8000", 4, 64, 28)
    run = load_run_config(REPO / "papermill_runs/full_gpu_beta.yaml")
    assert run.name == "full_gpu_beta" and [e.stem[:2] for e in run.entries] == ["01", "04", "05"]
    for entry in run.entries:
        resolve_parameters(run, entry, notebook_parameters(entry.path), tmp_path)
    policy = {e.stem: e.parameters for e in run.entries}["04_policy_tuning"]
    assert (policy["policy"], policy["methods"], policy["reward_model"]) == (beta.policy, "ppo", beta.reward_model)
    assert plan_run(REPO / "papermill_runs/full_gpu_beta.yaml", tmp_path / "run").steps   # the value checks pass
