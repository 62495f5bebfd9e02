"""A local OpenAI-compatible chat-completions server for tests, benchmarks and offline trials.

It answers ``POST /v1/chat/completions`` with a deterministic text after a fixed latency,
reports token usage, counts every request per prompt, and injects faults on request: for each
prompt, a list of faults served to its first requests (then it is answered normally).

Faults: ``429`` (with Retry-After), ``500``, ``slow`` (answers only after ``slow_s``, beyond a
short client timeout), ``malformed`` (HTTP 200 with a truncated JSON body), ``drop`` (closes the
connection without a response), ``400`` (context too long), ``401`` (echoes the key it got) and
``404`` (no such model).

    python -m kar.knowledge.llm.fake_server --latency-s 0.2   # prints its base URL
    curl http://127.0.0.1:PORT/v1/stats                          # requests served so far
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULTS = ("429", "500", "slow", "malformed", "drop", "400", "401", "404")


def fake_answer(prompt: str) -> str:
    """The answer the server gives to `prompt`."""
    return f"Knowledge about: {prompt}"


class FakeChatServer:
    """An OpenAI-compatible server on 127.0.0.1, in a background thread; a context manager."""

    def __init__(
        self,
        *,
        latency_s: float = 0.0,
        faults: Mapping[str, Sequence[str]] | None = None,
        retry_after_s: float = 0.1,
        slow_s: float = 2.0,
        api_key: str | None = None,
        hold_after_answers: int | None = None,
        port: int = 0,
    ) -> None:
        unknown = {f for plan in (faults or {}).values() for f in plan} - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {FAULTS}")
        self.latency_s = latency_s
        self.faults = {prompt: list(plan) for prompt, plan in (faults or {}).items()}
        self.retry_after_s = retry_after_s
        self.slow_s = slow_s
        self.api_key = api_key
        # After this many normal answers, requests wait until `release()` (a run to kill).
        self.hold_after_answers = hold_after_answers
        self.requests: Counter[str] = Counter()  # per prompt, every request
        self.answered: Counter[str] = Counter()  # per prompt, normal answers sent
        self.faults_served: Counter[str] = Counter()
        self.authorizations: set[str] = set()
        self.bodies: dict[str, dict[str, Any]] = {}  # per prompt, the last request's JSON
        self.arrivals: list[tuple[float, str]] = []  # (time.monotonic(), prompt) per request
        self._lock = threading.Lock()
        self._promised = 0  # normal answers decided on (sent or being sent)
        self._released = threading.Event()
        self._httpd = _Server(("127.0.0.1", port), self)
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,))
        self._thread.daemon = True

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    def start(self) -> FakeChatServer:
        self._thread.start()
        return self

    def release(self) -> None:
        """Let held requests go on (see `hold_after_answers`)."""
        self._released.set()

    def stop(self) -> None:
        self.release()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> FakeChatServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- called by the request handler threads ------------------------------------------------

    def _next_fault(
        self, prompt: str, body: dict[str, Any], authorization: str | None
    ) -> str | None:
        """Count the request and pick its fault (None = answer normally)."""
        with self._lock:
            self.arrivals.append((time.monotonic(), prompt))
            self.bodies[prompt] = body
            served = self.requests[prompt]
            self.requests[prompt] += 1
            self.authorizations.add(authorization or "")
            plan = self.faults.get(prompt, [])
            fault = plan[served] if served < len(plan) else None
            if fault is None and self.api_key is not None:
                fault = None if authorization == f"Bearer {self.api_key}" else "401"
            if fault is not None:
                self.faults_served[fault] += 1
            return fault

    def _hold(self) -> None:
        """Wait for `release()` if `hold_after_answers` answers are already on their way."""
        with self._lock:
            held = self.hold_after_answers is not None and self._promised >= self.hold_after_answers
            self._promised += not held
        if held:
            self._released.wait()

    def _count_answer(self, prompt: str) -> None:
        with self._lock:
            self.answered[prompt] += 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The default backlog of 5 drops the SYNs of a larger burst of new connections, which the
    # client retries only a second later: a timeout that no real server would cause.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], fake: FakeChatServer) -> None:
        self.fake = fake
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out and closed its socket is expected here


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a pooled client reuses its connections
    # Headers and body go out in two writes; with Nagle's algorithm the second one waits for the
    # client's delayed ACK (~40 ms), a latency no real server adds.
    disable_nagle_algorithm = True
    server: _Server

    def do_GET(self) -> None:
        """``GET /stats``: the request counts, for a client in another process."""
        fake = self.server.fake
        if not self.path.endswith("/stats"):
            self._json(404, {"error": {"message": f"no route {self.path}"}})
            return
        with fake._lock:
            counts = {
                "requests": fake.total_requests,
                "answered": sum(fake.answered.values()),
                "faults": dict(fake.faults_served),
            }
        self._json(200, counts)

    def do_POST(self) -> None:
        fake = self.server.fake
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        fault = fake._next_fault(prompt, body, self.headers.get("Authorization"))
        if fake.latency_s:
            time.sleep(fake.latency_s)
        if not self.path.endswith("/chat/completions"):
            self._json(404, {"error": {"message": f"no route {self.path}"}})
        elif fault is None:
            fake._hold()
            self._answer(body, prompt)
            fake._count_answer(prompt)
        else:
            self._fault(fault, body, prompt)

    def _answer(self, body: dict[str, Any], prompt: str) -> None:
        answer = fake_answer(prompt)
        prompt_tokens, completion_tokens = len(prompt.split()), len(answer.split())
        self._json(
            200,
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "model": body.get("model", "fake"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
        )

    def _fault(self, fault: str, body: dict[str, Any], prompt: str) -> None:
        fake = self.server.fake
        if fault == "429":
            headers = {"Retry-After": f"{fake.retry_after_s:g}"}
            self._json(429, {"error": {"message": "Rate limit reached"}}, headers)
        elif fault == "500":
            self._json(500, {"error": {"message": "The server had an error"}})
        elif fault == "slow":
            time.sleep(fake.slow_s)
            self._answer(body, prompt)
        elif fault == "malformed":
            self._raw(200, b'{"choices": [{"message": {"content": "cut sh')
        elif fault == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        elif fault == "400":
            message = "This model's maximum context length is 4097 tokens (context_length_exceeded)"
            self._json(400, {"error": {"message": message, "code": "context_length_exceeded"}})
        elif fault == "401":
            given = self.headers.get("Authorization", "").removeprefix("Bearer ")
            self._json(401, {"error": {"message": f"Incorrect API key provided: {given}"}})
        elif fault == "404":
            self._json(404, {"error": {"message": "The model does not exist"}})

    def _json(self, status: int, payload: object, headers: Mapping[str, str] | None = None) -> None:
        self._raw(status, json.dumps(payload).encode(), headers)

    def _raw(self, status: int, data: bytes, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request would drown everything else


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-s", type=float, default=0.0, help="delay of every answer")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port")
    args = parser.parse_args(argv)
    with FakeChatServer(latency_s=args.latency_s, port=args.port) as server:
        print(server.base_url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
