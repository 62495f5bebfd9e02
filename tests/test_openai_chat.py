"""The OpenAI-compatible provider against a real HTTP server speaking /v1/chat/completions.

The server (kar.knowledge.llm.fake_server) listens on 127.0.0.1, counts every request per
prompt and injects the faults a test asks for.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from kar.knowledge.llm.base import LLMProvider
from kar.knowledge.llm.fake_server import FakeChatServer, fake_answer
from kar.knowledge.llm.openai_chat import LLMServerError, OpenAIChat
from kar.knowledge.prompts import PromptRequest
from kar.knowledge.store import KnowledgeStore
from kar.registry import LLMS, ConfigError, schema_for

SECRET = "sk-test-9f8e7d6c5b4a-never-store-me"
REQUESTS = [
    PromptRequest(kind="item", raw_id="1", prompt="Introduce movie Toy Story (1995)."),
    PromptRequest(kind="item", raw_id="2", prompt="Introduce movie GoldenEye (1995)."),
    PromptRequest(kind="user", raw_id="7", prompt="Given a female user who is aged 35 ..."),
]
PROMPTS = [r.prompt for r in REQUESTS]
# Fast retries: tests must not wait for production backoff.
FAST = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05}


@pytest.fixture
def server() -> Iterator[FakeChatServer]:
    with FakeChatServer() as fake:
        yield fake


@pytest.fixture
def secret_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    return SECRET


def chat(server: FakeChatServer, **kwargs: object) -> OpenAIChat:
    return OpenAIChat(**{"model": "gpt-3.5-turbo", "base_url": server.base_url, **FAST, **kwargs})


def stored(path: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute(sql).fetchall()


def test_registered_with_its_options() -> None:
    assert LLMS.get("openai") is OpenAIChat
    assert isinstance(OpenAIChat(model="gpt-3.5-turbo"), LLMProvider)
    options = set(schema_for(OpenAIChat).__dataclass_fields__)
    assert {"concurrency", "max_cost_usd", "dry_run", "retry_failed", "api_key_env"} <= options
    assert {"price_per_1m_input_tokens", "price_per_1m_output_tokens", "max_retries"} <= options


def test_key_names_what_changes_answers_and_never_the_secret(secret_key: str) -> None:
    llm = OpenAIChat(model="gpt-3.5-turbo", temperature=0.7, max_tokens=300, timeout_s=5.0)
    assert llm.key == "openai:gpt-3.5-turbo:https://api.openai.com/v1:t=0.7:max=300"
    # Transport, price and budget do not change answers, so they do not change the key.
    same = OpenAIChat(
        model="gpt-3.5-turbo",
        temperature=0.7,
        max_tokens=300,
        concurrency=64,
        max_retries=1,
        price_per_1m_input_tokens=9.0,
        max_cost_usd=1.0,
        dry_run=True,
    )
    assert same.key == llm.key
    assert OpenAIChat(model="gpt-4o-mini", temperature=0.7, max_tokens=300).key != llm.key
    assert secret_key not in llm.key and secret_key not in repr(vars(llm))
    assert llm.prefix_lengths() is None


def test_answers_are_stored_with_their_cost_and_never_asked_twice(
    server: FakeChatServer, secret_key: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    shared_prompt = PromptRequest(kind="item", raw_id="99", prompt=REQUESTS[0].prompt)
    store_path = tmp_path / "knowledge.duckdb"
    llm = chat(server, price_per_1m_input_tokens=0.5, price_per_1m_output_tokens=1.5)

    with KnowledgeStore(store_path) as store:
        found = llm.generate([*REQUESTS, shared_prompt], store)

    assert set(found) == {("item", "1"), ("item", "2"), ("user", "7"), ("item", "99")}
    assert found[("user", "7")].answer == fake_answer(REQUESTS[2].prompt)
    assert found[("item", "99")] == found[("item", "1")]
    assert server.requests == dict.fromkeys(PROMPTS, 1)  # the shared prompt was asked once
    assert server.authorizations == {f"Bearer {secret_key}"}
    body = server.bodies[PROMPTS[0]]
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("gpt-3.5-turbo", 0.0, 512)
    assert body["messages"] == [{"role": "user", "content": PROMPTS[0]}]

    rows = stored(
        store_path,
        "SELECT prompt, prompt_tokens, completion_tokens, cost_usd, attempts, latency_s "
        "FROM answers",
    )
    assert len(rows) == 3
    for prompt, prompt_tokens, completion_tokens, cost, attempts, latency in rows:
        # The fake server counts words as tokens.
        assert prompt_tokens == len(prompt.split())
        assert completion_tokens == len(fake_answer(prompt).split())
        assert cost == pytest.approx((0.5 * prompt_tokens + 1.5 * completion_tokens) / 1e6)
        assert attempts == 1 and latency >= 0
    report = llm.last_report
    assert report is not None
    assert (report.to_send, report.answered, report.requests, report.retries) == (3, 3, 3, 0)
    assert report.cost_usd == pytest.approx(sum(row[3] for row in rows))

    second = chat(server)
    with KnowledgeStore(store_path) as store:
        again = second.generate(REQUESTS, store)
    assert server.total_requests == 3  # nothing asked the second time
    assert again == {k: v for k, v in found.items() if k != ("item", "99")}
    assert (second.last_report.cached, second.last_report.requests) == (3, 0)

    for file in tmp_path.iterdir():
        assert secret_key.encode() not in file.read_bytes(), file
    assert secret_key not in caplog.text


def test_retry_after_is_honoured_and_pauses_every_request(
    server: FakeChatServer, secret_key: str, tmp_path: Path
) -> None:
    requests = [PromptRequest("item", str(i), f"prompt number {i}") for i in range(8)]
    server.faults = {"prompt number 0": ["429"]}
    server.retry_after_s = 0.5
    server.latency_s = 0.05
    # Backoff alone would wait 30 s: only the server's Retry-After can make this quick.
    llm = chat(server, concurrency=2, backoff_initial_s=30.0, backoff_max_s=30.0)

    started = time.perf_counter()
    with KnowledgeStore(tmp_path / "k.duckdb") as store:
        found = llm.generate(requests, store)
    elapsed = time.perf_counter() - started

    assert len(found) == 8 and 0.5 <= elapsed < 5.0
    limited_at = next(t for t, p in server.arrivals if p == "prompt number 0")
    answered_at = limited_at + server.latency_s
    # Once the 429 arrived, no request started before its Retry-After was over.
    too_early = [p for t, p in server.arrivals if answered_at + 0.02 < t < answered_at + 0.45]
    assert too_early == []
    assert llm.last_report.retries == 1 and dict(llm.last_report.retry_reasons) == {"HTTP 429": 1}


def test_rejected_prompt_is_recorded_skipped_later_and_retried_on_request(
    server: FakeChatServer, secret_key: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rejected = PROMPTS[1]
    server.faults = {rejected: ["400"]}
    store_path = tmp_path / "k.duckdb"

    with caplog.at_level(logging.WARNING), KnowledgeStore(store_path) as store:
        found = chat(server).generate(REQUESTS, store)
    assert set(found) == {("item", "1"), ("user", "7")}
    assert "HTTP 400" in caplog.text and "context_length_exceeded" in caplog.text
    assert stored(store_path, "SELECT prompt, error_class, status, attempts FROM failures") == [
        (rejected, "rejected", 400, 1)
    ]

    caplog.clear()
    with caplog.at_level(logging.WARNING), KnowledgeStore(store_path) as store:
        llm = chat(server)
        assert len(llm.generate(REQUESTS, store)) == 2
    assert server.total_requests == 3  # the rejected prompt is not paid for again
    assert llm.last_report.skipped_failed == 1 and "llm.retry_failed=true" in caplog.text

    with KnowledgeStore(store_path) as store:  # asked again only on request; now it passes
        assert len(chat(server, retry_failed=True).generate(REQUESTS, store)) == 3
    assert server.requests[rejected] == 2
    assert stored(store_path, "SELECT count(*) FROM failures") == [(0,)]


def test_missing_key_stops_before_anything_is_sent_and_cache_needs_none(
    server: FakeChatServer, secret_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = chat(server, api_key_env="KAR_LLM_KEY")  # the secret sits in OPENAI_API_KEY
    with KnowledgeStore(tmp_path / "k.duckdb") as store:
        with pytest.raises(ConfigError) as err:
            llm.generate(REQUESTS, store)
        message = str(err.value)
        assert "3 prompts need the LLM" in message and "KAR_LLM_KEY" in message
        assert "llm=klg" in message and secret_key not in message
        monkeypatch.setenv("KAR_LLM_KEY", "   ")
        with pytest.raises(ConfigError, match="KAR_LLM_KEY"):
            llm.generate(REQUESTS, store)
        assert server.total_requests == 0

        chat(server).generate(REQUESTS, store)
        assert server.total_requests == 3
        monkeypatch.delenv("OPENAI_API_KEY")
        monkeypatch.delenv("KAR_LLM_KEY")
        cached = chat(server).generate(REQUESTS[:2], store)
    assert set(cached) == {("item", "1"), ("item", "2")}
    assert server.total_requests == 3  # fully cached: no key needed, no request sent


def test_a_server_without_key_gets_no_authorization_header(
    server: FakeChatServer, secret_key: str, tmp_path: Path
) -> None:
    with KnowledgeStore(tmp_path / "k.duckdb") as store:
        assert len(chat(server, api_key_env=None).generate(REQUESTS, store)) == 3
    assert server.authorizations == {""}


def test_rejected_key_stops_the_run_without_echoing_it(
    secret_key: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    requests = [PromptRequest("item", str(i), f"prompt {i}") for i in range(20)]
    store_path = tmp_path / "k.duckdb"
    # The server expects another key and echoes the one it got, as OpenAI does.
    with (
        FakeChatServer(api_key="sk-the-right-one") as server,
        caplog.at_level(logging.DEBUG),
        KnowledgeStore(store_path) as store,
        pytest.raises(LLMServerError, match="OPENAI_API_KEY") as err,
    ):
        chat(server, concurrency=2).generate(requests, store)
    assert "HTTP 401" in str(err.value) and secret_key not in str(err.value)
    assert secret_key not in caplog.text
    assert server.total_requests <= 2  # one per worker at most, not one per prompt
    assert secret_key.encode() not in store_path.read_bytes()
    failures = stored(store_path, "SELECT error_class, status FROM failures")
    assert failures and set(failures) == {("fatal", 401)}


def test_unknown_model_stops_the_run_naming_the_setting(
    server: FakeChatServer, secret_key: str, tmp_path: Path
) -> None:
    server.faults = {PROMPTS[0]: ["404"]}
    with (
        KnowledgeStore(tmp_path / "k.duckdb") as store,
        pytest.raises(LLMServerError, match="HTTP 404") as err,
    ):
        chat(server, concurrency=1).generate(REQUESTS, store)
    assert "llm.model" in str(err.value) and "does not exist" in str(err.value)
    assert server.total_requests == 1


def test_a_server_that_keeps_failing_stops_the_run_after_the_retries(
    server: FakeChatServer, secret_key: str, tmp_path: Path
) -> None:
    server.faults = {PROMPTS[0]: ["500"] * 5}
    store_path = tmp_path / "k.duckdb"
    with (
        KnowledgeStore(store_path) as store,
        pytest.raises(LLMServerError, match="after 3 attempts") as err,
    ):
        chat(server, concurrency=1, max_retries=2).generate(REQUESTS, store)
    assert server.base_url in str(err.value) and "HTTP 500" in str(err.value)
    assert server.requests[PROMPTS[0]] == 3
    assert stored(store_path, "SELECT error_class, status, attempts FROM failures") == [
        ("transient", 500, 3)
    ]
    # Not a verdict on the prompt: the next run asks it again (and now the server answers).
    with KnowledgeStore(store_path) as store:
        assert len(chat(server, max_retries=2).generate(REQUESTS, store)) == 3


def test_unreachable_server_names_base_url(secret_key: str, tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on once the socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}/v1"
    llm = OpenAIChat(model="m", base_url=base_url, max_retries=1, timeout_s=2.0, **FAST)
    with (
        KnowledgeStore(tmp_path / "k.duckdb") as store,
        pytest.raises(LLMServerError, match="2 attempts") as err,
    ):
        llm.generate(REQUESTS, store)
    assert base_url in str(err.value) and "connection failed" in str(err.value)


def test_dry_run_sends_nothing_and_needs_no_key_or_writable_store(
    server: FakeChatServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    path = tmp_path / "k.duckdb"
    KnowledgeStore(path).close()
    llm = chat(server, dry_run=True, price_per_1m_input_tokens=1.0, price_per_1m_output_tokens=2.0)
    with KnowledgeStore(path, read_only=True) as store:
        assert llm.generate(REQUESTS, store) == {}
    report = llm.last_report
    assert server.total_requests == 0
    assert (report.stopped, report.to_send, report.unsent) == ("dry_run", 3, 3)
    # chars/4 for the prompts, max_tokens (512) per answer.
    expected_input = sum(-(-len(p) // 4) for p in PROMPTS)
    assert report.estimated_input_tokens == expected_input
    assert report.estimated_output_tokens == 3 * 512
    assert report.estimated_cost_usd == pytest.approx((expected_input + 2 * 3 * 512) / 1e6)


def test_budget_stops_sending_before_it_is_exceeded_and_a_rerun_goes_on(
    server: FakeChatServer, secret_key: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    requests = [PromptRequest("item", str(i), f"prompt {i:02d} abcd") for i in range(20)]
    # At $1 per token: a request's worst case is 4 estimated input + 10 output tokens = $14;
    # each answer actually costs 3 + 5 tokens (the server counts words) = $8.
    prices = {"price_per_1m_input_tokens": 1e6, "price_per_1m_output_tokens": 1e6}
    store_path = tmp_path / "k.duckdb"
    llm = chat(server, concurrency=1, max_tokens=10, max_cost_usd=60.0, **prices)
    with caplog.at_level(logging.WARNING), KnowledgeStore(store_path) as store:
        found = llm.generate(requests, store)
    report = llm.last_report
    # Sent while spent + $14 <= $60: 6 answers ($48); a 7th could have reached $62.
    assert report.stopped == "budget" and "llm.max_cost_usd=$60" in caplog.text
    assert len(found) == report.answered == server.total_requests == 6
    assert report.cost_usd == pytest.approx(48.0) and report.unsent == 14
    [(spent,)] = stored(store_path, "SELECT sum(cost_usd) FROM answers")
    assert spent == pytest.approx(48.0)

    with KnowledgeStore(store_path) as store:
        rest = chat(server, concurrency=4, max_tokens=10, **prices).generate(requests, store)
    assert len(rest) == 20 and server.total_requests == 20  # nothing answered was resent

    # Even one request may cost more than a budget below its worst case: nothing is sent.
    with KnowledgeStore(tmp_path / "other.duckdb") as store:
        tight = chat(server, max_tokens=10, max_cost_usd=13.0, **prices)
        assert tight.generate(requests, store) == {}
    assert tight.last_report.stopped == "budget" and server.total_requests == 20


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": ""}, "llm.model"),
        ({"base_url": "api.openai.com/v1"}, "llm.base_url"),
        ({"max_tokens": 0}, "llm.max_tokens"),
        ({"max_retries": -1}, "llm.max_retries"),
        ({"api_key_env": " "}, "llm.api_key_env"),
        ({"concurrency": 0}, "llm.concurrency"),
        ({"max_cost_usd": -1.0}, "llm.max_cost_usd"),
        ({"price_per_1m_output_tokens": -0.5}, "llm.price_per_1m_output_tokens"),
        ({"timeout_s": 0.0}, "llm.timeout_s"),
    ],
)
def test_bad_settings_raise_config_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        OpenAIChat(**{"model": "gpt-3.5-turbo", **kwargs})
