"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, for the tests of
starling_lib.llm_client and of the judges that use it (judge, mtbench).

Each POST takes the next step of `server.script` (or answers `server.default` when the script is
empty) and is recorded in `server.requests` as {path, authorization, body}. Steps:
    ("ok", text)                          a chat completion whose content is `text`
    ("status", code[, message[, headers]]) an error answer with that status code
    ("malformed",)                        a 200 whose body is cut off
    ("slow", seconds)                     a completion of `default` after `seconds`
    ("trickle", seconds)                  a completion of `default` sent at once in its headers, then its
                                          body a few bytes at a time, spread over `seconds`
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEY = "sk-test-" + "S3cr3tV4lue" * 3  # looks like a real key, so runs.write_metrics would refuse it too
FAST_RETRIES = dict(timeout_s=0.3, max_retries=5, backoff_base_s=0.001, backoff_max_s=0.01)  # ClientConfig settings


def point_env_at(monkeypatch, url: str, key: str = KEY) -> None:
    """Set the judge's environment variables to this server (model "fake-judge") and unset OPENAI_API_KEY."""
    monkeypatch.setenv("STARLING_JUDGE_BASE_URL", url)
    monkeypatch.setenv("STARLING_JUDGE_MODEL", "fake-judge")
    monkeypatch.setenv("STARLING_JUDGE_API_KEY", key)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def completion(text: str, model: str, prompt_tokens: int = 100, completion_tokens: int = 20) -> dict:
    """A chat.completion response body."""
    return {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, code: int, body: bytes, headers=()):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            server.requests.append({"path": self.path, "authorization": self.headers.get("Authorization"),
                                    "body": body})
            step = server.script.pop(0) if server.script else ("ok", server.default)
        try:
            if step[0] == "ok":
                self._send(200, json.dumps(completion(step[1], body["model"])).encode())
            elif step[0] == "status":
                message = step[2] if len(step) > 2 else "error"
                headers = step[3] if len(step) > 3 else ()
                self._send(step[1], json.dumps({"error": {"message": message, "type": "test"}}).encode(), headers)
            elif step[0] == "malformed":
                self._send(200, b'{"id": "chatcmpl-test", "choices": [{"mess')
            elif step[0] == "slow":
                time.sleep(step[1])
                self._send(200, json.dumps(completion(server.default, body["model"])).encode())
            elif step[0] == "trickle":
                data = json.dumps(completion(server.default, body["model"])).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                pieces = [data[i:i + 8] for i in range(0, len(data), 8)]
                for piece in pieces:
                    self.wfile.write(piece)
                    self.wfile.flush()
                    time.sleep(step[1] / len(pieces))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting, as it should


class FakeOpenAIServer:
    """`with FakeOpenAIServer(default) as server:` a running server; `server.url` is its /v1 base URL."""

    def __init__(self, default: str):
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.script, self._httpd.requests, self._httpd.default = [], [], default
        self._httpd.lock = threading.Lock()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    @property
    def script(self) -> list:
        return self._httpd.script

    @script.setter
    def script(self, steps: list) -> None:
        self._httpd.script[:] = steps

    @property
    def requests(self) -> list:
        return self._httpd.requests

    def __enter__(self) -> "FakeOpenAIServer":
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
