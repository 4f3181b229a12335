"""The client of a reward model served apart (starling_lib.reward_server): a drop-in for the
in-process RewardModel wherever the policy trainer scores responses.

    rm = RemoteRewardModel("http://rm-host:8000")           # waits for the server (retrying), reads /health
    rewards = rm.score([messages_a, "a plain prompt"], ["answer a", "answer b"])   # (2,) float32, CPU
    rm = load_reward_scorer(cfg.reward_model, device=..., dtype=...)   # a URL -> this client, a folder -> rm_io

Why: Starling-LM-7B-beta was tuned against Starling-RM-34B. A 34B reward model in bf16 (68 GB)
does not fit beside a 7B policy, its reference layers and optimizer state on every rank of a DDP
run, so it runs once, on GPUs of its own, as an HTTP service that every rank asks
(`PolicyTrainConfig.reward_model = "http://host:port"`).

What the client does:
  * `score(prompts, answers)` and `score_texts(texts)` as RewardModel's: float32 rewards on the CPU,
    in order. The server renders the chats in *its* model's chat format and truncates to *its*
    max_length, so the client sends messages and text, never token ids (the policy's tokenizer is
    not the reward model's: Openchat-3.5's vs Yi's for Starling-RM-34B). Hence no `score_ids`.
  * Requests of at most `request_size` pairs each; `batch_size` is accepted for the interface and
    ignored: the forward batch is the server's `--batch-size`.
  * Retries: connection errors (refused, reset, dropped), timeouts, 5xx, 408/429 and replies that
    are not the expected JSON, `tries` attempts in all with exponential backoff and jitter
    (llm_client.backoff_seconds, as the judges' client). After the last one: `RewardServerError`,
    naming the URL, the attempts, the time spent and the last failure. A 4xx other than 408/429
    is the request's fault, not the server's: `RewardRequestError` at once, with the server's message.
  * `timeout_s` bounds each connect and each read of an attempt (urllib's socket timeout).
  * Defaults from the environment (so that a YAML config's `reward_model: http://...` needs no
    more fields): STARLING_RM_TRIES (8), STARLING_RM_TIMEOUT_S (600), STARLING_RM_BACKOFF_MAX_S (60).
    With the defaults the client waits 7 times, about 2, 4, 8, 16, 32, 60, 60 s (2-3 minutes in all), before giving up.

When the server stays down during a policy run, policy.online stops the run with this error on
every process, after a checkpoint of the last completed step (see `_score_rollouts` there), and
running the same command again resumes from it once the server is back.

Departure from an in-process RewardModel: no trunk cache, no token-id scoring (see above), and
rewards pass through JSON (exact: a float32 survives the round trip through a double's repr).

The server is unauthenticated: keep it on a trusted network (the server binds 127.0.0.1 unless told).
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

import numpy as np
import torch

from starling_lib.llm_client import backoff_seconds

URL_SCHEMES = ("http://", "https://")
ENV_TRIES = "STARLING_RM_TRIES"
ENV_TIMEOUT_S = "STARLING_RM_TIMEOUT_S"
ENV_BACKOFF_MAX_S = "STARLING_RM_BACKOFF_MAX_S"
RETRY_STATUS = (408, 429)       # besides every 5xx


class RewardServerError(RuntimeError):
    """The reward server could not be reached, or kept failing, through every try."""


class RewardRequestError(ValueError):
    """The reward server refused a request as malformed (a 4xx): retrying would not help."""


def is_reward_server_url(name: str) -> bool:
    """Whether a reward-model name is a server's URL (http:// or https://) rather than a folder or hub id."""
    return isinstance(name, str) and name.lower().startswith(URL_SCHEMES)


def check_server_url(url: str) -> str:
    """`url` without a trailing slash, or a ValueError saying what is wrong with it: an http(s)
    scheme, a host, a valid port, no query or fragment (a path prefix, behind a proxy, is fine)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"reward server URL {url!r} must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"reward server URL {url!r} has no host (expected e.g. http://localhost:8000)")
    try:
        parts.port
    except ValueError as e:
        raise ValueError(f"reward server URL {url!r}: {e}") from None
    if parts.query or parts.fragment:
        raise ValueError(f"reward server URL {url!r} may not have a query or fragment; set the client's "
                         f"tries and timeout with {ENV_TRIES} / {ENV_TIMEOUT_S}")
    return url.rstrip("/")


def _env_number(name: str, default: float, cast: Callable = float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        return cast(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a {cast.__name__}") from None


class _Retryable(Exception):
    """One failed attempt worth another: `kind` (connection, timeout, http_503, malformed_response) and detail."""

    def __init__(self, kind: str, detail: str):
        self.kind, self.detail = kind, detail
        super().__init__(f"{kind}: {detail}")


class RemoteRewardModel:
    """A reward model served by starling_lib.reward_server, with RewardModel's scoring methods.

    url:          the server, e.g. "http://localhost:8000" (requests go to url + "/score", "/health").
    tries:        attempts per request in all (>= 1); None: $STARLING_RM_TRIES, else 8.
    timeout_s:    socket timeout of each connect and read; None: $STARLING_RM_TIMEOUT_S, else 600.
    request_size: most (prompt, answer) pairs per request.
    backoff_base_s, backoff_max_s: the wait before retry n is about base * 2**n s (jitter U(0.5, 1)),
                  at most max (None: $STARLING_RM_BACKOFF_MAX_S, else 60).
    check:        ask /health now (with the retries): fail here, not at the first rollout, when
                  the server is not there; `info` then holds its answer.
    sleep:        waits between attempts (tests pass a recorder).
    `retry_counts` tallies the retried failures by kind; `attempts` counts every request sent.
    """

    def __init__(self, url: str, *, tries: int | None = None, timeout_s: float | None = None, request_size: int = 64,
                 backoff_base_s: float = 2.0, backoff_max_s: float | None = None, check: bool = True,
                 sleep: Callable[[float], None] = time.sleep, seed: int | None = None):
        self.url = check_server_url(url)
        self.tries = int(tries if tries is not None else _env_number(ENV_TRIES, 8, int))
        self.timeout_s = float(timeout_s if timeout_s is not None else _env_number(ENV_TIMEOUT_S, 600.0))
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = float(backoff_max_s if backoff_max_s is not None else _env_number(ENV_BACKOFF_MAX_S, 60.0))
        if self.tries < 1 or self.timeout_s <= 0 or request_size < 1 or backoff_base_s < 0:
            raise ValueError(f"need tries >= 1, timeout_s > 0, request_size >= 1, backoff_base_s >= 0; got "
                             f"{self.tries}, {self.timeout_s}, {request_size}, {backoff_base_s}")
        self.request_size = request_size
        self._sleep, self._rng = sleep, np.random.default_rng(seed)
        self.retry_counts: Counter = Counter()
        self.attempts = 0
        self.info: dict[str, Any] = self.health() if check else {}

    def __repr__(self) -> str:
        return f"RemoteRewardModel({self.url!r}, tries={self.tries}, timeout_s={self.timeout_s:g})"

    # ---- what the trainer calls

    def health(self) -> dict[str, Any]:
        """The server's GET /health: its model's name, chat format, max_length, batch size, device."""
        return self._call("/health", None)

    def score(self, prompts: Sequence[Sequence[dict] | str], answers: Sequence[str], batch_size: int = 16,
              progress: bool = False, trunk_cache=None) -> torch.Tensor:
        """Rewards (N,) float32 on CPU for N (prompt, answer) pairs, as RewardModel.score; a prompt
        is a message list or a plain string. batch_size: ignored (the server's --batch-size)."""
        if trunk_cache is not None:
            raise ValueError("a remote reward model has no trunk cache: pass trunk_cache=None")
        prompts, answers = list(prompts), list(answers)
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        return self._score_chunks(len(prompts), progress,
                                  lambda i, j: {"prompts": prompts[i:j], "answers": answers[i:j]})

    def score_texts(self, texts: Sequence[str], batch_size: int = 16, progress: bool = False) -> torch.Tensor:
        """Rewards for already-rendered chats, in the *reward model's* chat format (RewardModel.score_texts)."""
        texts = list(texts)
        return self._score_chunks(len(texts), progress, lambda i, j: {"texts": texts[i:j]})

    # ---- the plumbing

    def _score_chunks(self, n: int, progress: bool, body: Callable[[int, int], dict]) -> torch.Tensor:
        from tqdm.auto import tqdm

        rewards = []
        for start in tqdm(range(0, n, self.request_size), desc="scoring (remote)", disable=not progress, leave=False):
            end = min(n, start + self.request_size)
            rewards += self._call("/score", body(start, end))["rewards"]   # their number checked in _attempt
        return torch.tensor(rewards, dtype=torch.float32)

    def _call(self, path: str, payload: dict | None) -> dict:
        """One request with the retries of the module docstring: the reply's JSON object."""
        endpoint = self.url + path
        data = None if payload is None else json.dumps(payload).encode()
        expected = None if payload is None else len(payload.get("answers", payload.get("texts", [])))
        t0, failures = time.monotonic(), 0
        while True:
            try:
                return self._attempt(endpoint, data, expected)
            except _Retryable as exc:
                failures += 1
                if failures >= self.tries:
                    tries = f"{failures} tr{'y' if failures == 1 else 'ies'} over {time.monotonic() - t0:.1f} s"
                    raise RewardServerError(
                        f"the reward server at {endpoint} did not answer after {tries}; last failure: {exc}. Is "
                        f"`python -m starling_lib.reward_server` running there? (tries and timeout: "
                        f"{ENV_TRIES}={self.tries}, {ENV_TIMEOUT_S}={self.timeout_s:g})") from None
                self.retry_counts[exc.kind] += 1
                self._sleep(backoff_seconds(failures - 1, self.backoff_base_s, self.backoff_max_s, self._rng))

    def _attempt(self, endpoint: str, data: bytes | None, expected: int | None) -> dict:
        self.attempts += 1
        request = urllib.request.Request(endpoint, data=data, method="GET" if data is None else "POST",
                                         headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:   # before URLError, its base class
            detail = _error_detail(e)
            if e.code >= 500 or e.code in RETRY_STATUS:
                raise _Retryable(f"http_{e.code}", detail) from None
            raise RewardRequestError(f"the reward server at {endpoint} refused the request (HTTP {e.code}): "
                                     f"{detail}") from None
        except urllib.error.URLError as e:
            reason = e.reason
            kind = "timeout" if isinstance(reason, TimeoutError) else "connection"
            raise _Retryable(kind, f"{type(reason).__name__}: {reason}") from None
        except TimeoutError as e:                          # a read timed out (socket.timeout is TimeoutError)
            raise _Retryable("timeout", f"no answer within timeout_s={self.timeout_s:g} s ({e})") from None
        except (ConnectionError, http.client.HTTPException, OSError) as e:   # reset, dropped, cut short
            raise _Retryable("connection", f"{type(e).__name__}: {e}") from None
        try:
            reply = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _Retryable("malformed_response", f"not JSON: {body[:120]!r}") from None
        if not isinstance(reply, dict):
            raise _Retryable("malformed_response", f"not a JSON object: {body[:120]!r}")
        if expected is not None:
            rewards = reply.get("rewards")
            if not (isinstance(rewards, list) and len(rewards) == expected
                    and all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in rewards)):
                raise _Retryable("malformed_response",
                                 f"expected {{\"rewards\": [{expected} numbers]}}, got {body[:120]!r}")
        return reply


def _error_detail(error: urllib.error.HTTPError) -> str:
    """The server's JSON error ("error", and "where" when it says), else the start of the body."""
    try:
        body = error.read()
    except OSError:
        return error.reason or ""
    try:
        reply = json.loads(body)
        message = reply["error"] + (f" (at {reply['where']})" if reply.get("where") else "")
    except (ValueError, KeyError, TypeError):
        message = body[:300].decode(errors="replace") or str(error.reason)
    return message


def load_reward_scorer(name: str, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None):
    """What the trainers score with for `PolicyTrainConfig.reward_model`: a RemoteRewardModel for an
    http(s):// URL (device and dtype are the server's business), else the saved reward model
    `rm_io.load_reward_model(name, device, dtype)`."""
    if is_reward_server_url(name):
        return RemoteRewardModel(name)
    from starling_lib.rm_io import load_reward_model
    return load_reward_model(name, device=device, dtype=dtype)
