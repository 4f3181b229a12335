"""The one OpenAI-compatible chat client of the LLM judges: configuration, errors, retries.

Every API judge of the project talks to its endpoint through `ChatClient`: the 7-wise ranking
judge (judge.OpenAIJudge), MT-Bench's (mtbench.ApiJudge) and AlpacaEval's (alpaca.ApiPairwiseJudge).

  * Configuration (`ClientConfig.from_env`): the endpoint and model come from environment variables
    (STARLING_JUDGE_BASE_URL, unset for OpenAI, e.g. http://localhost:8000/v1 for a vLLM server;
    STARLING_JUDGE_MODEL, default gpt-4-0613), the rest from the caller.
  * The API key comes from the environment only (STARLING_JUDGE_API_KEY, falling back to
    OPENAI_API_KEY). It is not a config field, and it never appears in a repr or an error message.
  * `complete_messages` sends one chat completion. It retries 408/409/429, 5xx, timeouts, dropped
    connections and 200 answers that are not a chat completion, with exponential backoff and
    jitter (or the server's Retry-After when longer). A 400/413/422 fails that request only
    (RequestError); a 401/403/404 (bad key, no access, unknown model) raises ClientError, since
    every request would fail the same way.
  * `timeout_s` bounds each whole attempt, not each read: the reply is read as it arrives and the
    attempt is abandoned (a "timeout", retried like any other) as soon as a piece of it arrives
    after timeout_s, or when nothing at all arrives for timeout_s. A server that trickles its
    reply a few bytes at a time therefore cannot stretch an attempt past timeout_s by more than
    the wait for its next piece; no reply that took longer than timeout_s is accepted.

This module imports nothing else from starling_lib; the judges build on it.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

ENV_BASE_URL = "STARLING_JUDGE_BASE_URL"
ENV_MODEL = "STARLING_JUDGE_MODEL"
ENV_API_KEY = "STARLING_JUDGE_API_KEY"
ENV_FALLBACK_API_KEY = "OPENAI_API_KEY"
DEFAULT_MODEL = "gpt-4-0613"  # the judge of the Starling authors' positional-bias experiments
# Status codes after which every request would fail the same way: stop instead of retrying.
FATAL_KINDS = ("http_401", "http_403", "http_404")


class ClientError(RuntimeError):
    """The endpoint cannot be used at all (no key, bad key, unknown model, or down): the run stops."""


class RequestError(RuntimeError):
    """One request failed for good (retries used up, or rejected): `.kind` says why."""

    def __init__(self, kind: str, detail: str):
        self.kind, self.detail = kind, detail
        super().__init__(f"{kind}: {detail}")


@dataclass
class ChatReply:
    """What the model answered to one request."""

    text: str                  # the model's output
    model: str                 # the model that answered (as the server reports it)
    prompt_tokens: int = 0     # tokens billed for the request (estimated by offline judges)
    completion_tokens: int = 0
    retries: int = 0           # failed attempts before this reply


@dataclass
class ClientConfig:
    """Settings of the chat client. The API key is deliberately not a field: it is read from the
    environment when the client is made, so it cannot end up in a notebook, a log or a cache."""

    model: str = DEFAULT_MODEL            # chat model name at the endpoint
    base_url: str | None = None           # OpenAI-compatible endpoint, e.g. http://localhost:8000/v1; None = OpenAI
    temperature: float = 0.0              # the judges all judge at temperature 0
    max_tokens: int | None = None         # output cap per request; None = the server's default
    timeout_s: float = 120.0              # per attempt, for the whole reply; a slow one counts as a failed attempt
    max_retries: int = 6                  # attempts after the first, for retryable failures only
    backoff_base_s: float = 2.0           # wait before retry n is about base * 2**n (with jitter) ...
    backoff_max_s: float = 60.0           # ... but never longer than this

    @classmethod
    def from_env(cls, model: str | None = None, **overrides) -> "ClientConfig":
        """Model (`model` if given, else STARLING_JUDGE_MODEL, else DEFAULT_MODEL) and base URL
        (STARLING_JUDGE_BASE_URL) from the environment, then the other `overrides`."""
        settings: dict[str, Any] = {"model": model or os.environ.get(ENV_MODEL) or DEFAULT_MODEL,
                                    "base_url": os.environ.get(ENV_BASE_URL) or None}
        settings.update(overrides)
        return cls(**settings)


def api_key_from_env() -> str | None:
    """STARLING_JUDGE_API_KEY, else OPENAI_API_KEY, else None."""
    return os.environ.get(ENV_API_KEY) or os.environ.get(ENV_FALLBACK_API_KEY) or None


class _MalformedResponse(Exception):
    pass


class _AttemptTimedOut(Exception):
    pass


def _http_module():
    """The HTTP library the openai client is built on (httpx2 in openai >= 3, httpx before): its
    exceptions surface directly while a streamed reply is read."""
    try:
        import httpx2 as http
    except ImportError:  # pragma: no cover - older openai
        import httpx as http
    return http


def _classify(exc: Exception) -> tuple[str, bool, float | None]:
    """(kind, retryable, the server's Retry-After in seconds) of a failed attempt."""
    import openai
    http = _http_module()
    if isinstance(exc, (openai.APITimeoutError, _AttemptTimedOut, http.TimeoutException)):
        return "timeout", True, None
    if isinstance(exc, (openai.APIConnectionError, http.TransportError, http.StreamError)):
        return "connection", True, None
    if isinstance(exc, (_MalformedResponse, json.JSONDecodeError, UnicodeDecodeError)):
        return "malformed_response", True, None
    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        retry_after = None
        try:
            retry_after = float(exc.response.headers.get("retry-after"))
        except (TypeError, ValueError):
            pass
        if code == 429:
            return "rate_limited", True, retry_after
        if code >= 500:
            return f"server_error_{code}", True, retry_after
        if code in (408, 409):
            return f"http_{code}", True, retry_after
        return f"http_{code}", False, None
    raise exc  # a bug, not a service failure: let it surface


class ChatClient:
    """Chat completions from an OpenAI-compatible endpoint, with the retries of the module docstring.

    `sleep` waits between attempts (tests pass a recorder). `retry_counts` tallies the retried
    failures by kind.
    """

    def __init__(self, config: ClientConfig | None = None, sleep: Callable[[float], None] = time.sleep):
        import openai
        self.config = config or ClientConfig.from_env()
        key = api_key_from_env()
        if key is None and self.config.base_url is None:
            raise ClientError(f"no API key: set {ENV_API_KEY} (or {ENV_FALLBACK_API_KEY}) in the environment, "
                              f"or {ENV_BASE_URL} for a local server that needs none")
        self._secret = key
        # Local servers such as vLLM accept any key; the client insists on one.
        self._client = openai.OpenAI(api_key=key or "EMPTY", base_url=self.config.base_url,
                                     timeout=self.config.timeout_s, max_retries=0)
        self._sleep = sleep
        self._rng = np.random.default_rng()
        self.retry_counts: Counter = Counter()

    def __repr__(self) -> str:  # never shows the key
        return f"ChatClient(model={self.config.model!r}, base_url={self.config.base_url!r})"

    def cache_identity(self) -> dict:
        """What, besides the messages, decides the reply (the endpoint and key do not)."""
        return {"model": self.config.model, "temperature": self.config.temperature,
                "max_tokens": self.config.max_tokens}

    def _scrub(self, text: str) -> str:
        """`text` without the key, cut to 300 characters, for an error message."""
        if self._secret:
            text = text.replace(self._secret, "***")
        return text[:300]

    def _request(self, kwargs: dict, failures: int) -> ChatReply:
        """One attempt, read as it arrives so that `timeout_s` bounds the whole of it."""
        timeout_s = self.config.timeout_s
        deadline = time.monotonic() + timeout_s
        body = bytearray()
        with self._client.chat.completions.with_streaming_response.create(**kwargs) as resp:
            for chunk in resp.iter_bytes():
                body += chunk
                if time.monotonic() > deadline:
                    raise _AttemptTimedOut(f"the reply was not complete after timeout_s={timeout_s:g} s "
                                           f"({len(body)} bytes so far)")
        if time.monotonic() > deadline:
            raise _AttemptTimedOut(f"the reply took longer than timeout_s={timeout_s:g} s")
        data = json.loads(bytes(body))
        choices = data.get("choices") if isinstance(data, dict) else None
        first = choices[0] if isinstance(choices, list) and choices else None
        message = first.get("message") if isinstance(first, dict) else None
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise _MalformedResponse(f"not a chat completion: {bytes(body[:120])!r}")
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        return ChatReply(text=message["content"], model=data.get("model") or self.config.model,
                         prompt_tokens=usage.get("prompt_tokens") or 0,
                         completion_tokens=usage.get("completion_tokens") or 0, retries=failures)

    def complete_messages(self, messages: list[dict]) -> ChatReply:
        """One chat completion for `messages`; RequestError when it fails for good."""
        cfg = self.config
        kwargs: dict[str, Any] = {"model": cfg.model, "messages": messages, "temperature": cfg.temperature}
        if cfg.max_tokens is not None:
            kwargs["max_tokens"] = cfg.max_tokens
        failures = 0
        while True:
            try:
                return self._request(kwargs, failures)
            except Exception as exc:  # classified below; anything unexpected is re-raised there
                kind, retryable, retry_after = _classify(exc)
                detail = self._scrub(str(exc))
                if kind in FATAL_KINDS:
                    raise ClientError(f"the judge endpoint refused the request ({kind}: {detail}); check "
                                      f"{ENV_API_KEY}/{ENV_FALLBACK_API_KEY}, {ENV_MODEL} and {ENV_BASE_URL}") from None
                if not retryable:
                    raise RequestError(kind, detail) from None
                if failures >= cfg.max_retries:
                    raise RequestError(kind, f"gave up after {failures + 1} attempts; last: {detail}") from None
                self.retry_counts[kind] += 1
                self._sleep(self._backoff(failures, retry_after))
                failures += 1

    def _backoff(self, failures: int, retry_after: float | None) -> float:
        return backoff_seconds(failures, self.config.backoff_base_s, self.config.backoff_max_s, self._rng, retry_after)


def backoff_seconds(failures: int, base_s: float, max_s: float, rng: np.random.Generator,
                    retry_after: float | None = None) -> float:
    """Seconds to wait before retry `failures + 1`: base_s * 2**failures * U(0.5, 1) (exponential
    backoff with jitter, so that clients that failed together do not retry together), at least the
    server's Retry-After, at most max_s. Shared with the reward-server client (reward_client)."""
    wait = base_s * 2 ** failures * rng.uniform(0.5, 1.0)
    if retry_after is not None:
        wait = max(wait, retry_after)
    return min(wait, max_s)
