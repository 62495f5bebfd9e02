"""The generation stage under injected faults, a kill -9 mid-run, and a real `python -m kar` run.

A real HTTP server on 127.0.0.1 (kar.knowledge.llm.fake_server) injects 429 with Retry-After,
500, responses slower than the client's timeout, malformed JSON, dropped connections and
context-length rejections, and counts every request per prompt; the assertions are on what it
saw and on what the knowledge store holds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pytest

from kar.knowledge.llm.fake_server import FakeChatServer, fake_answer
from kar.knowledge.llm.openai_chat import OpenAIChat
from kar.knowledge.prompts import PromptRequest
from kar.knowledge.store import KnowledgeStore

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk-fault-test-5e3a9c1d-never-store-me"
TRANSIENT = {"429", "500", "slow", "malformed", "drop"}
# Per prompt index: the faults its first requests get (then it is answered), or a rejection.
FAULT_PLAN = {
    0: ["429"],
    1: ["500"],
    2: ["slow"],
    3: ["malformed"],
    4: ["drop"],
    5: ["400"],
    6: ["429", "500", "drop"],
    7: ["slow", "malformed"],
    8: ["drop", "drop", "429", "500"],
    9: ["400"],
    10: ["500", "500"],
    11: ["malformed", "429"],
}


def requests_for(n: int, tag: str = "") -> list[PromptRequest]:
    kinds = ("user", "item")
    return [PromptRequest(kinds[i % 2], str(i), f"{tag}prompt {i}: tell me more") for i in range(n)]


def provider(server: FakeChatServer, **kwargs: object) -> OpenAIChat:
    settings = {
        "model": "gpt-3.5-turbo",
        "base_url": server.base_url,
        "api_key_env": "KAR_TEST_KEY",
        "concurrency": 8,
        "timeout_s": 0.5,
        "max_retries": 5,
        "backoff_initial_s": 0.02,
        "backoff_max_s": 0.1,
        **kwargs,
    }
    return OpenAIChat(**settings)


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("KAR_TEST_KEY", SECRET)
    return SECRET


def stored_answers(path: Path) -> set[str]:
    with duckdb.connect(str(path), read_only=True) as con:
        return {prompt for (prompt,) in con.execute("SELECT prompt FROM answers").fetchall()}


def stored_failures(path: Path) -> dict[str, tuple[str, int]]:
    with duckdb.connect(str(path), read_only=True) as con:
        rows = con.execute("SELECT prompt, error_class, status FROM failures").fetchall()
    return {prompt: (error_class, status) for prompt, error_class, status in rows}


def test_every_prompt_ends_answered_or_failed_and_none_is_answered_twice(
    key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requests = requests_for(60)
    prompts = [r.prompt for r in requests]
    faults = {prompts[i]: plan for i, plan in FAULT_PLAN.items()}
    rejected = {p for p, plan in faults.items() if plan == ["400"]}
    n_transient = sum(f in TRANSIENT for plan in faults.values() for f in plan)
    store_path = tmp_path / "knowledge.duckdb"

    with FakeChatServer(faults=faults, latency_s=0.01, slow_s=1.0, retry_after_s=0.1) as server:
        llm = provider(server)
        with KnowledgeStore(store_path) as store:
            found = llm.generate(requests, store)
        report = llm.last_report
        assert report is not None

        answered, failed = stored_answers(store_path), stored_failures(store_path)
        assert answered | set(failed) == set(prompts) and not answered & set(failed)
        assert failed == dict.fromkeys(rejected, ("rejected", 400))
        assert {r.prompt for r in requests if (r.kind, r.raw_id) in found} == answered
        assert all(found[(r.kind, r.raw_id)].answer == fake_answer(r.prompt) for r in requests[12:])
        # The server answered each prompt once (a late "slow" answer arrives after the client
        # gave up: it is counted apart), and rejected prompts were never retried.
        assert all(server.answered[p] == 1 for p in answered)
        assert all(server.answered[p] == 0 and server.requests[p] == 1 for p in rejected)
        for prompt in answered:
            plan = faults.get(prompt, [])
            assert server.requests[prompt] == len(plan) + 1, (prompt, plan)
        assert report.retries == n_transient == sum(server.requests.values()) - len(prompts)
        assert report.requests == server.total_requests
        assert (report.answered, report.failed, report.unsent) == (58, 2, 0)
        assert report.stopped is None

        with KnowledgeStore(store_path) as store:
            again = provider(server)
            assert again.generate(requests, store) == found
        second_run_requests = server.total_requests - report.requests
        assert second_run_requests == 0 and again.last_report.skipped_failed == 2

    assert SECRET.encode() not in store_path.read_bytes()
    with capsys.disabled():  # the numbers the closing note reports
        print(
            f"\nfault injection: {len(prompts)} prompts, {report.requests} requests, "
            f"{report.retries} retries {dict(report.retry_reasons)}, {report.failed} failed, "
            f"{report.answered} answers stored; second run: {second_run_requests} requests"
        )


CHILD = """
    import signal
    import sys

    # A shell that starts the test suite in the background makes its children ignore SIGINT;
    # restore the terminal's Ctrl-C, which is what this child stands for.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from kar.knowledge.llm.openai_chat import OpenAIChat
    from kar.knowledge.prompts import PromptRequest
    from kar.knowledge.store import KnowledgeStore

    base_url, store_path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    kinds = ("user", "item")
    requests = [
        PromptRequest(kinds[i % 2], str(i), f"prompt {i}: tell me more") for i in range(n)
    ]
    llm = OpenAIChat(
        model="gpt-3.5-turbo", base_url=base_url, api_key_env="KAR_TEST_KEY", concurrency=4
    )
    with KnowledgeStore(store_path) as store:
        llm.generate(requests, store)
"""


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_a_run_stopped_mid_way_keeps_its_answers_and_the_rerun_sends_only_the_rest(
    key: str, tmp_path: Path, stop: signal.Signals
) -> None:
    n, k = 40, 13
    requests = requests_for(n)
    store_path = tmp_path / "knowledge.duckdb"
    # After k answers the server holds every request: the child waits with 4 in flight.
    with FakeChatServer(hold_after_answers=k) as server:
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(CHILD),
                server.base_url,
                str(store_path),
                str(n),
            ],
            env={**os.environ, "KAR_TEST_KEY": SECRET},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while sum(server.answered.values()) < k or server.total_requests < k + 4:
                assert child.poll() is None, child.stderr.read() if child.stderr else ""
                assert time.monotonic() < deadline, "the child never got its answers"
                time.sleep(0.05)
            time.sleep(1.0)  # the child commits within its commit interval (50 ms)
            child.send_signal(stop)
            # Ctrl-C: the child stores what arrived and exits while its requests are held.
            child.wait(timeout=30)
        finally:
            child.kill()
            child.wait()
        if stop == signal.SIGINT:
            assert "KeyboardInterrupt" in child.stderr.read()
        server.release()
        paid_for = {p for p, count in server.answered.items() if count}
        assert len(paid_for) == k

        # Every answer the server sent before the kill is in the store.
        assert stored_answers(store_path) == paid_for
        sent_before = server.total_requests

        llm = provider(server)
        with KnowledgeStore(store_path) as store:
            found = llm.generate(requests, store)
        assert len(found) == n
        resent = {p for p in paid_for if server.requests[p] > 1}
        assert resent == set()
        assert server.total_requests - sent_before == n - k == llm.last_report.requests
        assert llm.last_report.cached == k

        with KnowledgeStore(store_path) as store:
            provider(server).generate(requests, store)
        assert server.total_requests - sent_before == n - k  # a third run sends nothing
    assert SECRET.encode() not in store_path.read_bytes()


def run_kar(
    tmp_path: Path, data_dir: Path, *overrides: str, wandb: str = "disabled"
) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "kar",
        f"paths.data_dir={data_dir}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'runs' / str(len(list(tmp_path.glob('runs/*'))))}",
        "stage=generate",
        "llm=openai-compatible",
        "llm.model=test-model",
        "llm.api_key_env=KAR_TEST_KEY",
        *overrides,
    ]
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "KAR_TEST_KEY": SECRET,
        "WANDB_MODE": wandb,
    }
    return subprocess.run(
        command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow  # two `python -m kar` runs on real data (~20 s)
def test_kar_generate_sends_once_resumes_with_nothing_and_never_writes_the_key(
    data_dir: Path, tmp_path: Path
) -> None:
    with FakeChatServer(api_key=SECRET) as server:
        url = f"llm.base_url={server.base_url}"
        first = run_kar(
            tmp_path, data_dir, url, "llm.concurrency=64", "logger=wandb", wandb="offline"
        )
        assert first.returncode == 0, first.stderr
        # 943 user and 1,682 item prompts, of which 18 repeat another item's (same title).
        assert "2607 to send" in first.stdout
        assert server.total_requests == len(server.answered) == 2607
        assert set(server.authorizations) == {f"Bearer {SECRET}"}

        # A dry run of the same generation: the plan says nothing is left, and nothing is sent.
        second = run_kar(tmp_path, data_dir, url, "llm.dry_run=true", "logger=none")
        assert second.returncode == 0, second.stderr
        assert server.total_requests == 2607
        assert "2607 answered in the store, 0 skipped, 0 to send" in second.stdout
        assert "kar: stopped after stage=generate (llm.dry_run=true" in second.stdout

    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in written)  # W&B's own record is checked too
    assert {"config.yaml", "kar.log", "knowledge.duckdb"} <= {p.name for p in written}
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), f"the API key leaked into {path}"
    for result in (first, second):
        assert SECRET not in result.stdout + result.stderr
