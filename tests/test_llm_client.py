"""starling_lib.llm_client: configuration from the environment, retries with backoff, errors, and
that the key never shows, against a scripted OpenAI-compatible server on 127.0.0.1."""

import json
import time
from collections import Counter
from dataclasses import asdict

import pytest
from fake_openai import FAST_RETRIES, KEY, FakeOpenAIServer, point_env_at

from starling_lib import llm_client

MESSAGES = [{"role": "system", "content": "You are a judge."}, {"role": "user", "content": "Rate this."}]


@pytest.fixture
def server():
    with FakeOpenAIServer(default="Rating: [[7]]") as srv:
        yield srv


@pytest.fixture
def env(monkeypatch, server):
    point_env_at(monkeypatch, server.url)


def client(**overrides):
    settings = {**FAST_RETRIES, **overrides}
    waits = []
    return llm_client.ChatClient(llm_client.ClientConfig.from_env(**settings), sleep=waits.append), waits


def test_config_from_env_and_overrides(env, server):
    cfg = llm_client.ClientConfig.from_env(max_tokens=5)
    assert (cfg.model, cfg.base_url, cfg.max_tokens) == ("fake-judge", server.url, 5)
    assert llm_client.ClientConfig.from_env("gpt-4").model == "gpt-4"  # an explicit model wins
    assert llm_client.ClientConfig.from_env(None).model == "fake-judge"


def test_retries_500_429_malformed_and_slow_then_succeeds(env, server):
    server.script = [("status", 500), ("status", 429), ("malformed",), ("slow", 1.0), ("ok", "fine")]
    c, waits = client()
    reply = c.complete_messages(MESSAGES)
    assert reply.text == "fine" and reply.retries == 4 and len(server.requests) == 5
    assert (reply.prompt_tokens, reply.completion_tokens, reply.model) == (100, 20, "fake-judge")
    assert c.retry_counts == Counter({"server_error_500": 1, "rate_limited": 1, "malformed_response": 1, "timeout": 1})
    assert len(waits) == 4 and all(0 < w <= 0.01 for w in waits)
    sent = server.requests[-1]
    assert sent["path"] == "/v1/chat/completions" and sent["authorization"] == f"Bearer {KEY}"
    assert sent["body"]["model"] == "fake-judge" and sent["body"]["temperature"] == 0.0
    assert sent["body"]["messages"] == MESSAGES and "max_tokens" not in sent["body"]


def test_backoff_grows_and_respects_retry_after(env, server):
    server.script = [("status", 503), ("status", 429, "slow down", [("Retry-After", "7")]), ("status", 503),
                     ("status", 503)]
    c, waits = client(backoff_base_s=1.0, backoff_max_s=6.0)
    c.complete_messages(MESSAGES)
    # base * 2**n times a factor in [0.5, 1]; the server's Retry-After wins when longer; all capped at 6 s
    assert 0.5 <= waits[0] <= 1 and waits[1] == 6.0 and 2 <= waits[2] <= 4 and 4 <= waits[3] <= 6


def test_gives_up_after_max_retries(env, server):
    server.script = [("status", 500)] * 10
    c, _ = client(max_retries=2)
    with pytest.raises(llm_client.RequestError, match="gave up after 3 attempts") as err:
        c.complete_messages(MESSAGES)
    assert err.value.kind == "server_error_500" and len(server.requests) == 3


def test_400_fails_the_request_without_retrying(env, server):
    server.script = [("status", 400, "prompt too long")]
    c, _ = client(max_tokens=9)
    with pytest.raises(llm_client.RequestError) as err:
        c.complete_messages(MESSAGES)
    assert err.value.kind == "http_400" and "prompt too long" in str(err.value) and len(server.requests) == 1
    assert server.requests[0]["body"]["max_tokens"] == 9


def test_401_stops_and_the_key_is_not_echoed(env, server):
    server.script = [("status", 401, f"Incorrect API key provided: {KEY}")]
    c, _ = client()
    with pytest.raises(llm_client.ClientError) as err:
        c.complete_messages(MESSAGES)
    assert "http_401" in str(err.value) and KEY not in str(err.value) and "STARLING_JUDGE_API_KEY" in str(err.value)
    assert KEY not in repr(c) and "key" not in json.dumps(asdict(c.config)).lower()


def test_a_rejected_request_does_not_echo_the_key(env, server):
    server.script = [("status", 422, f"bad request from key {KEY}")]
    c, _ = client()
    with pytest.raises(llm_client.RequestError) as err:
        c.complete_messages(MESSAGES)
    assert "***" in str(err.value) and KEY not in str(err.value)


def test_no_key_and_no_local_server_is_a_clear_error(monkeypatch):
    for name in ("STARLING_JUDGE_API_KEY", "OPENAI_API_KEY", "STARLING_JUDGE_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(llm_client.ClientError, match="STARLING_JUDGE_API_KEY"):
        llm_client.ChatClient()


def test_a_local_server_needs_no_key(monkeypatch, server):
    for name in ("STARLING_JUDGE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STARLING_JUDGE_BASE_URL", server.url)
    reply = llm_client.ChatClient(llm_client.ClientConfig.from_env("local-model")).complete_messages(MESSAGES)
    assert reply.text == "Rating: [[7]]" and server.requests[0]["authorization"] == "Bearer EMPTY"


def test_timeout_bounds_the_whole_attempt_not_each_read(env, server):
    # The trickled reply sends a piece every ~0.05 s for 2 s: no single read waits timeout_s, but the
    # attempt as a whole does, so it is abandoned (and retried) instead of accepted after 2 s.
    server.script = [("trickle", 2.0), ("ok", "fine")]
    c, waits = client(timeout_s=0.3)
    start = time.monotonic()
    reply = c.complete_messages(MESSAGES)
    assert time.monotonic() - start < 1.0
    assert reply.text == "fine" and reply.retries == 1 and c.retry_counts == Counter({"timeout": 1})
    server.script = [("trickle", 2.0)]
    c, _ = client(timeout_s=0.3, max_retries=0)
    start = time.monotonic()
    with pytest.raises(llm_client.RequestError, match="not complete after timeout_s=0.3") as err:
        c.complete_messages(MESSAGES)
    assert err.value.kind == "timeout" and time.monotonic() - start < 1.0


def test_a_trickled_reply_within_the_timeout_is_read_whole(env, server):
    server.script = [("trickle", 0.2)]
    c, _ = client(timeout_s=5.0)
    reply = c.complete_messages(MESSAGES)
    assert reply.text == "Rating: [[7]]" and reply.retries == 0 and reply.completion_tokens == 20
