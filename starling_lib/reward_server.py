"""A reward model served apart: an HTTP scoring service for policy tuning.

    CUDA_VISIBLE_DEVICES=6,7 python -m starling_lib.reward_server Nexusflow/Starling-RM-34B --port 8000
    python -m starling_lib.reward_server rm_runs/starling_rm_7b/reward_model --host 0.0.0.0 --port 8000 --batch-size 8

and in the policy config `reward_model: http://<host>:8000` (the client: starling_lib.reward_client).

Why: Starling-LM-7B-beta is PPO of Openchat-3.5-0106 against Starling-RM-34B. In bf16 the 34B
reward model takes 68 GB: it does not fit beside a 7B policy on every rank of a DDP run, so it is
loaded once, on GPUs of its own, and every rank asks it over HTTP. The standard library's
ThreadingHTTPServer is enough (no new dependency): requests arrive on threads and are serialised
on the model by one lock, so the GPU runs one scoring at a time, each in batches of `--batch-size`.

Endpoints (JSON in, JSON out):
  POST /score   {"prompts": [...], "answers": [...]}: a prompt is a list of chat messages
                ({"role": ..., "content": ...}, ending with the user's turn) or a plain string (one
                user turn); an answer is a string. The server renders each pair in its model's
                chat format, truncated to its max_length (RewardModel.score). Or {"texts": [...]}:
                already-rendered chats in the reward model's format (RewardModel.score_texts).
                -> {"rewards": [float, ...]} in the order given.
  GET /health   -> {"status": "ok", "model", "backbone", "chat_format", "max_length", "batch_size",
                    "device", "dtype", "requests_served"}.
A malformed request gets 400 and {"error": what is wrong, "where": e.g. "prompts[3][1].content"};
an unknown path 404; a body over --max-request-mb 413; a failure while scoring 500 and its message
(the client retries 5xx, and gives up with a clear error after its tries).

Departures from a trainer's in-process reward model: nothing (the same RewardModel.score); the
wire carries messages and text, never token ids, since the policy's tokenizer is not the reward
model's. No authentication: it binds 127.0.0.1 unless --host says otherwise; keep it on a
trusted network.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Sequence

import torch

DEFAULT_PORT = 8000
DEFAULT_MAX_REQUEST_MB = 64


class BadRequest(ValueError):
    """What is wrong with a request, and where in its JSON."""

    def __init__(self, message: str, where: str = ""):
        self.message, self.where = message, where
        super().__init__(f"{message} (at {where})" if where else message)


def _check_strings(items: Any, name: str) -> list[str]:
    if not isinstance(items, list):
        raise BadRequest(f"{name} must be a list of strings, got {type(items).__name__}", name)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise BadRequest(f"must be a string, got {type(item).__name__}", f"{name}[{i}]")
    return items


def _check_prompt(prompt: Any, where: str) -> list[dict] | str:
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list) or not prompt:
        raise BadRequest("a prompt must be a string or a non-empty list of messages "
                         f"{{\"role\": ..., \"content\": ...}}, got {json.dumps(prompt)[:60]}", where)
    for j, message in enumerate(prompt):
        if not isinstance(message, dict):
            raise BadRequest(f"a message must be an object with role and content, got {type(message).__name__}",
                             f"{where}[{j}]")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                got = "missing" if key not in message else f"of type {type(message[key]).__name__}"
                raise BadRequest(f"{key} must be a string, it is {got}", f"{where}[{j}].{key}")
    return prompt


def parse_score_request(body: bytes) -> dict[str, list]:
    """The checked request: {"prompts", "answers"} or {"texts"}, or BadRequest naming what and where."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f"line {e.lineno}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise BadRequest(f"the body is not valid JSON: {getattr(e, 'msg', e)}", where) from None
    if not isinstance(request, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(request).__name__}")
    keys = set(request)
    if keys == {"texts"}:
        return {"texts": _check_strings(request["texts"], "texts")}
    if keys == {"prompts", "answers"}:
        prompts, answers = request["prompts"], _check_strings(request["answers"], "answers")
        if not isinstance(prompts, list):
            raise BadRequest(f"prompts must be a list, got {type(prompts).__name__}", "prompts")
        if len(prompts) != len(answers):
            raise BadRequest(f"{len(prompts)} prompts but {len(answers)} answers: one answer per prompt")
        return {"prompts": [_check_prompt(p, f"prompts[{i}]") for i, p in enumerate(prompts)], "answers": answers}
    raise BadRequest(f"expected the keys prompts and answers, or texts alone; got {sorted(keys) or 'none'}")


class RewardServer(ThreadingHTTPServer):
    """The HTTP service around one loaded RewardModel (see the module docstring).

    model:      a RewardModel in eval mode (rm_io.load_reward_model), or anything with its `score`,
                `score_texts`, `max_length`, `chat_format`, `backbone_name`.
    address:    (host, port); port 0 picks a free one (see `url`).
    batch_size: pairs per forward.
    name:       what /health calls the model (the id or folder it was loaded from).
    """

    daemon_threads = True          # a hung client does not keep the process alive at exit
    allow_reuse_address = True     # a restarted server gets its port back at once

    def __init__(self, model, address: tuple[str, int] = ("127.0.0.1", DEFAULT_PORT), batch_size: int = 8,
                 name: str = "", max_request_mb: float = DEFAULT_MAX_REQUEST_MB, log_requests: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}")
        self.model, self.batch_size, self.name = model, batch_size, name or getattr(model, "backbone_name", "")
        self.max_request_bytes = int(max_request_mb * 2**20)
        self.log_requests = log_requests
        self.lock = threading.Lock()    # one scoring at a time on the model
        self.requests_served = 0
        self._thread: threading.Thread | None = None
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"

    def health(self) -> dict[str, Any]:
        model = self.model
        param = next(model.parameters(), None) if hasattr(model, "parameters") else None
        return {"status": "ok", "model": self.name, "backbone": getattr(model, "backbone_name", ""),
                "chat_format": getattr(model, "chat_format", ""), "max_length": getattr(model, "max_length", None),
                "batch_size": self.batch_size, "device": str(param.device) if param is not None else "",
                "dtype": str(param.dtype).removeprefix("torch.") if param is not None else "",
                "requests_served": self.requests_served}

    def score(self, request: dict[str, list]) -> list[float]:
        """Rewards for a checked request (parse_score_request), under the lock."""
        n = len(request.get("answers", request.get("texts", [])))
        if n == 0:
            return []
        with self.lock, torch.inference_mode():
            if "texts" in request:
                rewards = self.model.score_texts(request["texts"], batch_size=self.batch_size)
            else:
                rewards = self.model.score(request["prompts"], request["answers"], batch_size=self.batch_size)
            self.requests_served += 1
        return [float(r) for r in rewards.float().cpu()]

    def start(self) -> "RewardServer":
        """Serve on a background thread (notebooks, tests); `stop()` ends it."""
        self._thread = threading.Thread(target=self.serve_forever, name=f"reward-server-{self.url}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the port: later connections are refused."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.0"     # one request per connection: nothing to keep alive between rollouts
    server_version = "starling-reward-server"

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, where: str = "") -> None:
        self._reply(status, {"error": message, **({"where": where} if where else {})})

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/health":
            self._reply(HTTPStatus.OK, self.server.health())
        elif self.path.rstrip("/") == "/score":
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, "POST a JSON body to /score")
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint {self.path!r}: POST /score or GET /health")

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/score":
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint {self.path!r}: POST /score or GET /health")
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._error(HTTPStatus.LENGTH_REQUIRED, "send the JSON body with a Content-Length header")
            return
        if int(length) > self.server.max_request_bytes:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"the body has {int(length)} bytes, the server takes at most {self.server.max_request_bytes} "
                        "(--max-request-mb): send fewer pairs per request")
            return
        t = time.perf_counter()
        try:
            request = parse_score_request(self.rfile.read(int(length)))
        except BadRequest as e:
            self._error(HTTPStatus.BAD_REQUEST, e.message, e.where)
            return
        try:
            rewards = self.server.score(request)
        except Exception as e:   # noqa: BLE001 - the client is told what failed; the server carries on
            # A chat template that refuses a conversation (e.g. roles out of order) is the request's fault.
            bad_input = type(e).__name__ == "TemplateError" or isinstance(e, (ValueError, TypeError, KeyError))
            status = HTTPStatus.BAD_REQUEST if bad_input else HTTPStatus.INTERNAL_SERVER_ERROR
            self._error(status, f"scoring failed: {type(e).__name__}: {e}")
            return
        self._reply(HTTPStatus.OK, {"rewards": rewards})
        if self.server.log_requests:
            sys.stderr.write(f"{self.address_string()} scored {len(rewards)} in {time.perf_counter() - t:.2f} s\n")

    def log_message(self, format: str, *args) -> None:   # noqa: A002 - the base class's name
        if self.server.log_requests:
            super().log_message(format, *args)


def serve(model_name: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT, batch_size: int = 8,
          device: str | None = None, dtype: str | None = None, max_request_mb: float = DEFAULT_MAX_REQUEST_MB,
          log_requests: bool = True) -> RewardServer:
    """Load the reward model (rm_io.load_reward_model) and return a RewardServer bound to host:port,
    not yet serving (`serve_forever()`, or `start()` for a thread). The port is bound only once the
    model is loaded, so clients see "connection refused" (and retry) until it can answer."""
    from starling_lib.rm_io import load_reward_model

    model = load_reward_model(model_name, device=device, dtype=None if dtype in (None, "auto") else dtype)
    return RewardServer(model, (host, port), batch_size=batch_size, name=model_name, max_request_mb=max_request_mb,
                        log_requests=log_requests)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m starling_lib.reward_server",
        description="Serve a reward model over HTTP for policy tuning (POST /score, GET /health); set the policy "
                    "config's reward_model to http://HOST:PORT.")
    parser.add_argument("model", help="the reward model: a folder saved by rm_io.save_reward_model (notebook 03, "
                                      "rm_train) or an id rm_io.load_reward_model accepts, e.g. "
                                      "Nexusflow/Starling-RM-34B")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 for every interface: "
                             "there is no authentication, keep it on a trusted network)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    parser.add_argument("--batch-size", type=int, default=8, help="(prompt, answer) pairs per forward pass (default 8)")
    parser.add_argument("--device", default=None,
                        help="torch device of the model, e.g. cuda, cuda:1, cpu (default: the best available). "
                             "A model larger than one GPU: pick the GPUs with CUDA_VISIBLE_DEVICES")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                        help="weights' dtype (default auto: bf16 on a GPU that has it, else float32)")
    parser.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_MB,
                        help=f"largest request body accepted (default {DEFAULT_MAX_REQUEST_MB} MB)")
    parser.add_argument("--quiet", action="store_true", help="do not log every request to stderr")
    args = parser.parse_args(argv)
    server = serve(args.model, args.host, args.port, args.batch_size, args.device, args.dtype, args.max_request_mb,
                   log_requests=not args.quiet)
    print(f"serving {args.model} on {server.url} (batch size {args.batch_size}); GET {server.url}/health", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
