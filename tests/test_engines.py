"""starling_lib.engines without vLLM: the hf engine's contract (shapes, stops, lengths, seeds,
log-probs), rollouts through a serving engine (a recording fake), the trainer's weight pushes
after each step, the vllm-server client against a stand-in server, and the errors.

The same contract against the real vLLM: tests/test_engines_vllm.py (in .venv-vllm)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import load_file

from fake_engines import LengthReward, RecordingEngine
from starling_lib import engines
from starling_lib.chat import stop_token_ids
from starling_lib.engines import HFEngine, SamplingSettings, VLLMServerEngine, VLLMServerError
from starling_lib.models import tiny_model_path
from starling_lib.rollout import generate, logprobs_from_logits
from starling_lib.sampling import ENGINES, SERVING_ENGINES, check_engine, use_fast_sampling

PROMPTS = [[{"role": "user", "content": "Hello"}],
           [{"role": "user", "content": "Can you tell me the functions of the Federal Reserve?"}],
           [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Write a haiku about rain."}]]


def prompt_ids(tok, prompts=PROMPTS) -> list[list[int]]:
    return [tok(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
            ["input_ids"] for m in prompts]


@pytest.fixture
def fake_vllm(monkeypatch):
    """Engine "vllm" is a RecordingEngine over the hf engine on the same model; the engines made are listed."""
    made = []

    def factory(model, tokenizer):
        made.append(RecordingEngine(HFEngine(model, tokenizer.pad_token_id, sampler="hf")))
        return made[-1]
    monkeypatch.setitem(engines.FACTORIES, "vllm", factory)
    return made


# ---------------------------------------------------------------------------------------------
# the hf engine


@pytest.mark.parametrize("sampler", ["hf", "fast"])
def test_hf_engine_greedy_tokens_are_rollout_generate_s(tiny, sampler):
    model, tok = tiny
    batch = generate(model, tok, PROMPTS, max_new_tokens=10, do_sample=False, engine=sampler)
    engine = engines.engine_for(model, sampler, tok)
    assert isinstance(engine, HFEngine) and engines.attached(model) is None   # nothing kept for hf
    out = engine.generate(prompt_ids(tok), SamplingSettings(10, temperature=0.0, stop_ids=stop_token_ids(tok)))
    expected = [row[mask].tolist() for row, mask in zip(batch.response_ids, batch.response_mask)]
    assert out.token_ids == expected and out.logprobs is None


def test_hf_engine_honours_stop_tokens_and_max_lengths_and_returns_the_model_s_logprobs(tiny):
    model, tok = tiny
    ids = prompt_ids(tok)
    free = HFEngine(model, tok.pad_token_id).generate(ids, SamplingSettings(12, temperature=0.0))
    assert all(len(t) == 12 for t in free.token_ids)               # no stop ids: every row runs to the limit
    stop = free.token_ids[0][3]                                   # a token row 0 emits greedily at position 3
    out = HFEngine(model, tok.pad_token_id).generate(ids, SamplingSettings(12, temperature=0.0, stop_ids=(stop,),
                                                                          logprobs=True))
    for tokens, unstopped in zip(out.token_ids, free.token_ids):
        cut = unstopped.index(stop) + 1 if stop in unstopped else 12
        assert tokens == unstopped[:cut]                            # ends at (and keeps) the first stop
    assert len(out.token_ids[0]) <= 4 and out.token_ids[0][-1] == stop
    # log-probs: one per token, the model's log-softmax at that position
    assert [len(lp) for lp in out.logprobs] == [len(t) for t in out.token_ids]
    seq = torch.tensor([ids[1] + out.token_ids[1]])
    with torch.no_grad():
        logits = model(seq).logits[:, len(ids[1]) - 1:-1]
    torch.testing.assert_close(torch.tensor([out.logprobs[1]]), logprobs_from_logits(logits, seq[:, len(ids[1]):]),
                               atol=1e-5, rtol=0)


def test_hf_engine_seeded_sampling_is_reproducible_and_leaves_the_caller_s_rng_alone(tiny):
    model, tok = tiny
    engine, ids = HFEngine(model, tok.pad_token_id), prompt_ids(tok) * 2
    s = SamplingSettings(10, temperature=1.0)
    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    a = engine.generate(ids, s, seed=11)
    assert torch.equal(torch.rand(3), before)                      # the caller's generator is untouched
    assert engine.generate(ids, s, seed=11).token_ids == a.token_ids
    assert engine.generate(ids, s, seed=12).token_ids != a.token_ids


def test_per_prompt_settings_mix_greedy_and_sampled_rows(tiny):
    model, tok = tiny
    engine, ids = HFEngine(model, tok.pad_token_id), prompt_ids(tok)
    greedy = engine.generate(ids, SamplingSettings(8, temperature=0.0)).token_ids
    mixed = engine.generate(ids, [SamplingSettings(8, temperature=t) for t in (0.0, 1.0, 0.0)], seed=3).token_ids
    assert mixed[0] == greedy[0] and mixed[2] == greedy[2]
    with pytest.raises(ValueError, match="3 prompts but 2 sampling settings"):
        engine.generate(ids, [SamplingSettings(8)] * 2)


def test_settings_and_engine_names_are_checked(tiny):
    assert ENGINES == ("auto", "fast", "hf", "vllm", "vllm-server") and set(SERVING_ENGINES) < set(ENGINES)
    for name in ENGINES:
        check_engine(name)
    with pytest.raises(ValueError, match="engine must be one of auto, fast, hf, vllm, vllm-server; got 'sglang'"):
        check_engine("sglang")
    model, _ = tiny
    assert not use_fast_sampling("vllm", model, 64) and use_fast_sampling("auto", model, 64)
    with pytest.raises(ValueError, match="max_new_tokens >= 1"):
        SamplingSettings(0)
    with pytest.raises(ValueError, match="0 < top_p <= 1"):
        SamplingSettings(4, top_p=0.0)
    with pytest.raises(ValueError, match="samples with 'auto', 'fast' or 'hf'"):
        HFEngine(model, 0, sampler="vllm")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_requested_without_vllm_says_how_to_get_it_in_one_line(tiny):
    model, tok = tiny
    with pytest.raises(ImportError, match=r"engine 'vllm' needs vLLM.*`make vllm-env`.*pip install vllm") as e:
        generate(model, tok, PROMPTS[:1], max_new_tokens=4, engine="vllm")
    assert "\n" not in str(e.value) and engines.attached(model) is None


# ---------------------------------------------------------------------------------------------
# rollouts and chat through a serving engine (the recording fake)


def test_rollouts_through_a_serving_engine_have_the_hf_engine_s_shapes_and_masks(tiny, fake_vllm):
    model, tok = tiny
    try:
        torch.manual_seed(0)
        served = generate(model, tok, PROMPTS, max_new_tokens=10, do_sample=False, engine="vllm")
        ref = generate(model, tok, PROMPTS, max_new_tokens=10, do_sample=False, engine="hf")
        for field in ("input_ids", "attention_mask", "response_mask"):
            assert torch.equal(getattr(served, field), getattr(ref, field)), field
        assert served.response_start == ref.response_start and served.responses == ref.responses
        assert served.trunk is None
        # one engine for the model, created once, asked with the rollout's settings and a seed from torch's generator
        torch.manual_seed(0)
        again = generate(model, tok, PROMPTS, max_new_tokens=10, temperature=0.7, engine="vllm")
        assert len(fake_vllm) == 1 and engines.attached(model) is fake_vllm[0]
        (n, settings, seed), (_, sampled, seed2) = fake_vllm[0].generations
        assert n == 3 and settings == SamplingSettings(10, 0.0, 1.0, 0, tuple(stop_token_ids(tok)))
        assert sampled.temperature == 0.7 and seed == seed2 and isinstance(seed, int)
        assert again.input_ids.shape[0] == 3
    finally:
        engines.release(model)
    assert fake_vllm[0].closed and engines.attached(model) is None


def test_one_vllm_engine_at_a_time_another_model_s_is_closed_first(tiny, fake_vllm, monkeypatch):
    import copy
    model, tok = tiny
    other = copy.deepcopy(model)
    monkeypatch.setitem(engines.FACTORIES, "vllm-server",
                        lambda m, t: RecordingEngine(HFEngine(m, t.pad_token_id), name="vllm-server"))
    served = copy.deepcopy(model)
    try:
        generate(served, tok, PROMPTS[:1], max_new_tokens=2, engine="vllm-server")
        generate(model, tok, PROMPTS[:1], max_new_tokens=2, engine="vllm")
        generate(other, tok, PROMPTS[:1], max_new_tokens=2, engine="vllm")
        assert fake_vllm[0].closed and engines.attached(model) is None      # vLLM in process: one at a time
        assert engines.attached(other) is fake_vllm[1] and not fake_vllm[1].closed
        assert engines.attached(served).name == "vllm-server"              # a server's client stays
    finally:
        for m in (model, other, served):
            engines.release(m)


def test_a_stop_token_ends_the_response_and_is_kept(tiny, fake_vllm):
    import copy
    model, tok = tiny
    model = copy.deepcopy(model)
    with torch.no_grad():  # make the end-of-turn the certain next token
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.eos_token_id] = 1.0
    try:
        out = generate(model, tok, PROMPTS[:2], max_new_tokens=5, do_sample=False, engine="vllm")
    finally:
        engines.release(model)
    assert out.response_ids.shape[1] == 1 and (out.response_ids[:, 0] == tok.eos_token_id).all()
    assert out.response_mask.all() and out.responses == ["", ""]


def test_chat_generate_through_a_serving_engine_mixes_temperatures(tiny, fake_vllm):
    from starling_lib import chat
    model, tok = tiny
    rendered = [chat.render(tok, m) for m in PROMPTS]
    try:
        greedy = chat.generate(model, tok, rendered, chat.DecodingConfig(max_new_tokens=8, engine="hf"))
        served = chat.generate(model, tok, rendered, chat.DecodingConfig(max_new_tokens=8, engine="vllm"))
        mixed = chat.generate(model, tok, rendered, chat.DecodingConfig(max_new_tokens=8, engine="vllm"),
                              temperatures=[0.0, 1.0, 0.0])
    finally:
        engines.release(model)
    assert served == greedy and mixed[0] == greedy[0] and mixed[2] == greedy[2]
    temps = [s.temperature for s in fake_vllm[0].generations[-1][1]]
    assert sorted(temps) == [0.0, 0.0, 1.0]


# ---------------------------------------------------------------------------------------------
# the trainer: pushes after each step


def test_online_training_pushes_the_trained_layers_to_the_engine_after_each_step(fake_vllm):
    from starling_lib.policy import PolicyTrainConfig
    from starling_lib.policy.online import train_online

    cfg = PolicyTrainConfig(method="apa", policy=str(tiny_model_path()), reward_model="unused", steps=2,
                            rollouts_per_step=4, minibatch_size=2, micro_batch_size=2, max_new_tokens=8,
                            max_prompt_tokens=48, unfrozen_layers=2, lr=1e-3, device="cpu", progress=False,
                            eval_every=2, eval_prompts=2, eval_samples=1, rollout_engine="vllm")
    result = train_online(cfg, reward_model=LengthReward())
    model = result.policy.model
    (engine,) = fake_vllm
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(n.startswith(("model.layers.2.", "model.layers.3.")) for n in trained)
    # one push per step, of exactly the trained layers; the last one holds the final weights
    assert len(engine.updates) == 2 and all(list(u) == trained for u in engine.updates)
    final = dict(model.named_parameters())
    assert all(torch.equal(t, final[n]) for n, t in engine.updates[-1].items())
    assert any(not torch.equal(engine.updates[0][n], engine.updates[1][n]) for n in trained)
    assert result.extra["engine_pushed_parameters"] == trained
    # per step: rollouts, sleep for the update, push; evaluations at steps 0 and 2 through the same engine
    assert engine.events == ["generate", "generate", "sleep", "update", "generate", "sleep", "update", "generate",
                             "close"]
    assert engine.closed and engines.attached(model) is None         # released at the end of the run
    assert all(torch.isfinite(torch.tensor(v)) for h in result.history for v in h.values())


def test_the_hf_engine_gets_no_pushes_and_its_run_is_unchanged(fake_vllm):
    from starling_lib.policy import PolicyTrainConfig
    from starling_lib.policy.online import train_online

    cfg = PolicyTrainConfig(method="apa", policy=str(tiny_model_path()), reward_model="unused", steps=1,
                            rollouts_per_step=2, minibatch_size=2, micro_batch_size=2, max_new_tokens=6,
                            max_prompt_tokens=48, unfrozen_layers=2, device="cpu", progress=False, eval_every=0)
    result = train_online(cfg, reward_model=LengthReward())
    assert not fake_vllm and "engine_pushed_parameters" not in result.extra


# ---------------------------------------------------------------------------------------------
# the vllm-server client, against a stand-in for vLLM's server


class _StandIn(BaseHTTPRequestHandler):
    """vLLM's routes as far as the client uses them: the completion is 5 tokens derived from the
    seed, the last one the first stop id; requests are recorded."""

    dev_mode = True
    requests: list = []

    def log_message(self, *args):
        pass

    def _reply(self, code: int, payload: dict | None = None):
        body = json.dumps(payload or {}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._reply(200, {"data": [{"id": "tiny"}]}) if self.path == "/v1/models" else self._reply(404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        type(self).requests.append((self.path, body))
        if self.path == "/v1/completions":
            tokens = [100 + (body.get("seed") or 0) % 50, 7, 8, (body["stop_token_ids"] or [9])[0], 11]
            tokens = tokens[:body["max_tokens"]]
            lp = {"token_logprobs": [-1.0] * len(tokens)} if body.get("logprobs") is not None else None
            self._reply(200, {"choices": [{"index": 0, "text": "", "token_ids": tokens, "logprobs": lp}]})
        elif self.path in ("/collective_rpc", "/reset_prefix_cache") and type(self).dev_mode:
            self._reply(200, {"success": True})
        else:
            self._reply(404, {"detail": "Not Found"})


@pytest.fixture
def stand_in():
    _StandIn.requests, _StandIn.dev_mode = [], True
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _StandIn
    server.shutdown()


def test_the_server_client_sends_one_request_per_prompt_with_its_own_seed(stand_in):
    url, handler = stand_in
    engine = VLLMServerEngine(url)
    assert engine.model_name == "tiny"
    out = engine.generate([[1, 2], [1, 2], [3]], SamplingSettings(8, temperature=1.0, top_k=0, stop_ids=(2, 9),
                                                                   logprobs=True), seed=4)
    assert out.token_ids == [[t, 7, 8, 2] for t in [out.token_ids[0][0], out.token_ids[1][0], out.token_ids[2][0]]]
    assert out.logprobs == [[-1.0] * 4] * 3
    bodies = [b for path, b in handler.requests if path == "/v1/completions"]
    assert sorted(b["prompt"] for b in bodies) == [[1, 2], [1, 2], [3]]
    assert len({b["seed"] for b in bodies}) == 3                   # rows of the same prompt do not sample alike
    assert all(b["top_k"] == -1 and b["stop_token_ids"] == [2, 9] and b["ignore_eos"] and b["return_token_ids"]
               and b["model"] == "tiny" and b["max_tokens"] == 8 and b["logprobs"] == 0 for b in bodies)
    short = engine.generate([[1]], SamplingSettings(2, temperature=0.0)).token_ids
    assert short == [[100, 7]] and "seed" not in handler.requests[-1][1]


def test_the_server_client_pushes_weights_through_a_folder(stand_in, tmp_path):
    url, handler = stand_in
    engine = VLLMServerEngine(url, weights_dir=str(tmp_path))
    weights = [("model.layers.3.mlp.up_proj.weight", torch.randn(4, 3)), ("model.norm.weight", torch.ones(3))]
    assert engine.update_weights(weights) == [n for n, _ in weights] == engine.pushed
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert set(saved) == {n for n, _ in weights} and all(torch.equal(saved[n], t) for n, t in weights)
    assert [p for p, _ in handler.requests] == ["/collective_rpc", "/reset_prefix_cache"]
    assert handler.requests[0][1] == {"method": "reload_weights", "kwargs": {"weights_path": str(tmp_path)}}
    handler.dev_mode = False
    with pytest.raises(VLLMServerError, match="VLLM_SERVER_DEV_MODE=1"):
        engine.update_weights(weights)


def test_the_server_client_names_the_url_when_nothing_answers():
    with pytest.raises(VLLMServerError, match=r"at http://127.0.0.1:9 did not answer GET /v1/models.*STARLING_VLLM_URL"):
        VLLMServerEngine("http://127.0.0.1:9", wait_s=0)
    with pytest.raises(ValueError, match="must be http"):
        VLLMServerEngine("localhost:8000")


def test_the_policy_config_takes_the_new_engines():
    from starling_lib.policy import PolicyTrainConfig
    assert PolicyTrainConfig(rollout_engine="vllm-server").rollout_engine == "vllm-server"
    with pytest.raises(ValueError, match="rollout_engine"):
        PolicyTrainConfig(rollout_engine="sglang")
    assert dataclasses.replace(PolicyTrainConfig(), rollout_engine="vllm").fingerprint() != PolicyTrainConfig().fingerprint()
