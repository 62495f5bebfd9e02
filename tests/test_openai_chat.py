"""The OpenAI chat provider against a real HTTP server speaking /v1/chat/completions."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import duckdb
import pytest

from kar.knowledge.llm.base import LLMProvider
from kar.knowledge.llm.openai_chat import LLMServerError, OpenAIChat
from kar.knowledge.prompts import PromptRequest
from kar.knowledge.store import KnowledgeStore
from kar.registry import LLMS, ConfigError

SECRET = "sk-test-9f8e7d6c5b4a-never-store-me"
REQUESTS = [
    PromptRequest(kind="item", raw_id="1", prompt="Introduce movie Toy Story (1995)."),
    PromptRequest(kind="item", raw_id="2", prompt="Introduce movie GoldenEye (1995)."),
    PromptRequest(kind="user", raw_id="7", prompt="Given a female user who is aged 35 ..."),
]


@dataclass
class FakeOpenAI:
    """A chat-completions server: scripted failures per prompt, then answers; counts requests."""

    base_url: str = ""
    received: list[dict] = field(default_factory=list)
    scripts: dict[str, list[tuple[int, dict[str, str], dict]]] = field(default_factory=dict)

    def prompts_received(self) -> list[str]:
        return [body["messages"][0]["content"] for body in self.received]


def _handler(fake: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            body["_authorization"] = self.headers.get("Authorization")
            fake.received.append(body)
            prompt = body["messages"][0]["content"]
            if self.path != "/v1/chat/completions":
                self._reply(404, {}, {"error": {"message": f"no route {self.path}"}})
            elif fake.scripts.get(prompt):
                self._reply(*fake.scripts[prompt].pop(0))
            else:
                completion = {
                    "model": body["model"] + "-0613",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": f"About: {prompt}"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16},
                }
                self._reply(200, {}, completion)

        def _reply(self, status: int, headers: dict[str, str], body: dict) -> None:
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
            pass

    return Handler


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    fake.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield fake
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def secret_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    return SECRET


def _stored_meta(path: Path) -> list[dict]:
    with duckdb.connect(str(path), read_only=True) as con:
        return [json.loads(m) for (m,) in con.execute("SELECT meta FROM answers").fetchall()]


def test_registered_and_a_provider() -> None:
    assert LLMS.get("openai") is OpenAIChat
    assert isinstance(OpenAIChat(model="gpt-3.5-turbo"), LLMProvider)


def test_key_names_generation_settings_not_the_secret(secret_key: str) -> None:
    llm = OpenAIChat(model="gpt-3.5-turbo", temperature=0.7, max_tokens=300, timeout_s=5.0)
    assert llm.key == "openai:gpt-3.5-turbo:https://api.openai.com/v1:t=0.7:max=300"
    assert llm.key == OpenAIChat(model="gpt-3.5-turbo", temperature=0.7, max_tokens=300).key
    assert secret_key not in llm.key and secret_key not in repr(vars(llm))
    assert llm.prefix_lengths() is None


def test_answers_are_stored_and_never_asked_twice(
    server: FakeOpenAI, secret_key: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    shared_prompt = PromptRequest(kind="item", raw_id="99", prompt=REQUESTS[0].prompt)
    store_path = tmp_path / "knowledge.duckdb"
    llm = OpenAIChat(model="gpt-3.5-turbo", base_url=server.base_url + "/")

    with KnowledgeStore(store_path) as store:
        found = llm.generate([*REQUESTS, shared_prompt], store)

    assert set(found) == {("item", "1"), ("item", "2"), ("user", "7"), ("item", "99")}
    assert found[("user", "7")].answer == f"About: {REQUESTS[2].prompt}"
    assert found[("item", "99")] == found[("item", "1")]
    assert sorted(server.prompts_received()) == sorted(r.prompt for r in REQUESTS)  # deduped
    first = server.received[0]
    assert first["_authorization"] == f"Bearer {secret_key}"
    assert (first["model"], first["temperature"], first["max_tokens"]) == (
        "gpt-3.5-turbo",
        0.0,
        512,
    )
    assert first["messages"] == [{"role": "user", "content": first["messages"][0]["content"]}]

    meta = _stored_meta(store_path)
    assert len(meta) == 3
    assert all(m["total_tokens"] == 16 and m["latency_s"] >= 0 and m["attempts"] == 1 for m in meta)
    assert {m["model"] for m in meta} == {"gpt-3.5-turbo-0613"}

    with KnowledgeStore(store_path) as store:
        again = OpenAIChat(model="gpt-3.5-turbo", base_url=server.base_url).generate(
            REQUESTS, store
        )
    assert len(server.received) == 3  # nothing asked the second time
    assert again == {k: v for k, v in found.items() if k != ("item", "99")}

    for file in tmp_path.iterdir():
        assert secret_key.encode() not in file.read_bytes(), file
    assert secret_key not in caplog.text


def test_rate_limit_and_server_errors_are_retried(
    server: FakeOpenAI, secret_key: str, tmp_path: Path
) -> None:
    flaky, broken = REQUESTS[0].prompt, REQUESTS[1].prompt
    server.scripts[flaky] = [(429, {"Retry-After": "0"}, {"error": {"message": "slow down"}})]
    server.scripts[broken] = [
        (503, {"Retry-After": "0"}, {"error": {"message": "overloaded"}}),
        (500, {"retry-after-ms": "0"}, {"error": {"message": "oops"}}),
    ]
    llm = OpenAIChat(model="gpt-3.5-turbo", base_url=server.base_url, max_retries=2)

    started = time.perf_counter()
    with KnowledgeStore(tmp_path / "knowledge.duckdb") as store:
        found = llm.generate(REQUESTS, store)

    # Retry-After: 0 was honoured instead of the >= 1 s exponential backoff.
    assert time.perf_counter() - started < 1.0
    assert len(found) == 3
    assert server.prompts_received().count(flaky) == 2
    assert server.prompts_received().count(broken) == 3
    attempts = {m["attempts"] for m in _stored_meta(tmp_path / "knowledge.duckdb")}
    assert attempts == {1, 2, 3}


def test_rejected_prompt_is_left_out_and_others_answered(
    server: FakeOpenAI, secret_key: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rejected = REQUESTS[1].prompt
    server.scripts[rejected] = [
        (400, {}, {"error": {"message": "context_length_exceeded", "type": "invalid_request"}})
    ]
    llm = OpenAIChat(model="gpt-3.5-turbo", base_url=server.base_url)

    with caplog.at_level(logging.WARNING), KnowledgeStore(tmp_path / "k.duckdb") as store:
        found = llm.generate(REQUESTS, store)
        assert set(store.get_answers(llm.key, [r.prompt for r in REQUESTS])) == {
            REQUESTS[0].prompt,
            REQUESTS[2].prompt,
        }
    assert set(found) == {("item", "1"), ("user", "7")}
    assert "HTTP 400" in caplog.text and "context_length_exceeded" in caplog.text

    with KnowledgeStore(tmp_path / "k.duckdb") as store:  # a rerun asks only the failed prompt
        found = llm.generate(REQUESTS, store)
    assert len(found) == 3
    assert server.prompts_received()[3:] == [rejected]


def test_missing_key_is_a_config_error_only_when_prompts_need_the_server(
    server: FakeOpenAI, secret_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The secret sits in OPENAI_API_KEY; the provider is pointed at an unset variable.
    llm = OpenAIChat(model="gpt-3.5-turbo", base_url=server.base_url, api_key_env="KAR_LLM_KEY")
    with KnowledgeStore(tmp_path / "k.duckdb") as store:
        with pytest.raises(ConfigError) as err:
            llm.generate(REQUESTS, store)
        message = str(err.value)
        assert "3 prompts need the LLM" in message and "KAR_LLM_KEY" in message
        assert "llm=klg" in message and secret_key not in message
        monkeypatch.setenv("KAR_LLM_KEY", "   ")
        with pytest.raises(ConfigError, match="KAR_LLM_KEY"):
            llm.generate(REQUESTS, store)
        assert server.received == []

        OpenAIChat(model="gpt-3.5-turbo", base_url=server.base_url).generate(REQUESTS, store)
        assert len(server.received) == 3
        monkeypatch.delenv("OPENAI_API_KEY")
        monkeypatch.delenv("KAR_LLM_KEY")
        cached = OpenAIChat(model="gpt-3.5-turbo", base_url=server.base_url).generate(
            REQUESTS[:2], store
        )
    assert set(cached) == {("item", "1"), ("item", "2")}
    assert len(server.received) == 3  # fully cached: no key needed, no request sent


def test_rejected_key_stops_without_echoing_it(
    server: FakeOpenAI, secret_key: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    echo = {"error": {"message": f"Incorrect API key provided: {SECRET}"}}
    server.scripts[REQUESTS[0].prompt] = [(401, {}, echo)]
    llm = OpenAIChat(model="gpt-3.5-turbo", base_url=server.base_url)
    with (
        caplog.at_level(logging.DEBUG),
        KnowledgeStore(tmp_path / "k.duckdb") as store,
        pytest.raises(LLMServerError, match="OPENAI_API_KEY") as err,
    ):
        llm.generate(REQUESTS, store)
    assert "HTTP 401" in str(err.value) and secret_key not in str(err.value)
    assert secret_key not in caplog.text
    assert len(server.received) == 1  # a bad key is not tried on every prompt


def test_failing_server_names_base_url_after_retries(
    server: FakeOpenAI, secret_key: str, tmp_path: Path
) -> None:
    overloaded = (503, {"Retry-After": "0"}, {"error": {"message": "overloaded"}})
    server.scripts[REQUESTS[0].prompt] = [overloaded] * 5
    llm = OpenAIChat(model="gpt-3.5-turbo", base_url=server.base_url, max_retries=2)
    with (
        KnowledgeStore(tmp_path / "k.duckdb") as store,
        pytest.raises(LLMServerError, match="3 attempts") as err,
    ):
        llm.generate(REQUESTS, store)
    assert server.base_url in str(err.value) and "HTTP 503" in str(err.value)
    assert len(server.received) == 3


def test_unreachable_server_names_base_url(secret_key: str, tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on once the socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}/v1"
    llm = OpenAIChat(model="gpt-3.5-turbo", base_url=base_url, max_retries=1, timeout_s=2.0)
    with (
        KnowledgeStore(tmp_path / "k.duckdb") as store,
        pytest.raises(LLMServerError, match="2 attempts") as err,
    ):
        llm.generate(REQUESTS, store)
    assert base_url in str(err.value) and "cannot connect" in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": ""}, "llm.model"),
        ({"base_url": "api.openai.com/v1"}, "llm.base_url"),
        ({"max_tokens": 0}, "llm.max_tokens"),
        ({"max_retries": -1}, "llm.max_retries"),
    ],
)
def test_bad_settings_raise_config_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        OpenAIChat(**{"model": "gpt-3.5-turbo", **kwargs})
