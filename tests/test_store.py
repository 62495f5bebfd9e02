"""The DuckDB knowledge store: idempotent, durable, fast in bulk, shared between processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import numpy as np
import pytest

from kar.knowledge.store import (
    SCHEMA_VERSION,
    AnswerRecord,
    FailureRecord,
    KnowledgeStore,
    StoreLockedError,
)


def start_child(code: str, *args: str) -> subprocess.Popen[str]:
    """Another Python process running `code` (with sys.argv[1:] = args)."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_line(child: subprocess.Popen[str], expected: str) -> None:
    line = child.stdout.readline().strip()
    assert line == expected, f"child said {line!r}; stderr: {child.stderr.read()}"


HOLD_WRITER = """
    import sys, time
    from kar.knowledge.store import KnowledgeStore
    with KnowledgeStore(sys.argv[1]) as store:
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
        store.put_answer("llm", "written while locked", "by the child")
"""


def test_answers_roundtrip_and_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    with KnowledgeStore(path) as store:
        store.put_answer("gpt:a", "p1", "a1", meta={"tokens": 12, "latency_s": 0.5})
        assert store.put_answers("gpt:a", [("p1", "other"), ("p2", "a2"), ("p2", "x")]) == 1
        assert store.put_answers("gpt:a", [("p1", "a1"), ("p2", "a2")]) == 0
        assert store.put_answers("gpt:b", [("p1", "b1")]) == 1
        assert store.get_answers("gpt:a", ["p1", "p2", "p3"]) == {"p1": "a1", "p2": "a2"}
        assert store.get_answers("gpt:b", ["p1", "p2"]) == {"p1": "b1"}
        assert store.get_answers("gpt:c", ["p1"]) == {}
        stats = store.stats()
    assert stats == {
        "schema_version": SCHEMA_VERSION,
        "answers": 3,
        "llm_keys": 2,
        "failures": 0,
        "vectors": 0,
        "encoder_keys": 0,
    }
    with duckdb.connect(str(path), read_only=True) as con:
        [(meta,)] = con.execute(
            "SELECT meta FROM answers WHERE prompt = 'p1' AND llm_key = 'gpt:a'"
        ).fetchall()
    assert json.loads(meta) == {"latency_s": 0.5, "tokens": 12}


def test_durable_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    with KnowledgeStore(path) as store:
        store.put_answer("llm", "prompt", "answer")
        store.put_vectors("enc", ["text"], np.ones((1, 4)))
    with KnowledgeStore(path, read_only=True) as store:
        assert store.get_answers("llm", ["prompt"]) == {"prompt": "answer"}
        np.testing.assert_array_equal(store.get_vectors("enc", ["text"])["text"], np.ones(4))


def test_put_answer_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    child = start_child(
        """
        import sys, time
        from kar.knowledge.store import KnowledgeStore
        store = KnowledgeStore(sys.argv[1])
        store.put_answer("llm", "prompt", "answer", meta={"cost": 0.01})
        print("stored", flush=True)
        time.sleep(60)
        """,
        str(path),
    )
    wait_for_line(child, "stored")
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    with KnowledgeStore(path, read_only=True) as store:
        assert store.get_answers("llm", ["prompt"]) == {"prompt": "answer"}


def test_vectors_bulk_roundtrip_is_fast_and_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    texts = [f"user text {i}: " + "history " * 50 for i in range(2600)]
    vectors = rng.standard_normal((2600, 384)).astype(np.float32)
    with KnowledgeStore(tmp_path / "store.duckdb") as store:
        start = time.perf_counter()
        assert store.put_vectors("minilm:mean", texts, vectors) == 2600
        got = store.get_vectors("minilm:mean", texts)
        elapsed = time.perf_counter() - start
        assert store.put_vectors("minilm:mean", texts[:10], vectors[:10]) == 0
        assert store.get_vectors("bert:cls", texts) == {}
    assert elapsed < 2.0, f"2,600 vectors put+get took {elapsed:.2f} s"
    assert len(got) == 2600
    stacked = np.stack([got[t] for t in texts])
    assert stacked.dtype == np.float32
    np.testing.assert_array_equal(stacked, vectors)


def test_vector_shape_errors(tmp_path: Path) -> None:
    with KnowledgeStore(tmp_path / "store.duckdb") as store:
        with pytest.raises(ValueError, match=r"shape \(len\(texts\)=2, dim\)"):
            store.put_vectors("enc", ["a", "b"], np.zeros((3, 4)))
        store.put_vectors("enc", ["a"], np.zeros((1, 4)))
        with pytest.raises(ValueError, match="4-dim vectors"):
            store.put_vectors("enc", ["b"], np.zeros((1, 8)))


def test_threads_share_one_store(tmp_path: Path) -> None:
    with KnowledgeStore(tmp_path / "store.duckdb") as store:
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda i: store.put_answer("llm", f"p{i}", f"a{i}"), range(100)))
        answers = store.get_answers("llm", [f"p{i}" for i in range(100)])
    assert answers == {f"p{i}": f"a{i}" for i in range(100)}


def test_second_process_reads_after_writer_closes(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    with KnowledgeStore(path) as store:
        store.put_answers("llm", [(f"p{i}", f"a{i}") for i in range(5)])
    reader = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from kar.knowledge.store import KnowledgeStore\n"
            "with KnowledgeStore(sys.argv[1], read_only=True) as s: print(s.stats()['answers'])",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert reader.returncode == 0, reader.stderr
    assert reader.stdout.strip() == "5"


def test_writer_waits_for_lock_held_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    KnowledgeStore(path).close()
    child = start_child(HOLD_WRITER, str(path), "1.5")
    wait_for_line(child, "locked")
    start = time.perf_counter()
    with KnowledgeStore(path, lock_timeout_s=30) as store:
        waited = time.perf_counter() - start
        assert store.get_answers("llm", ["written while locked"]) == {
            "written while locked": "by the child"
        }
    assert child.wait(timeout=30) == 0
    assert waited > 0.5, "the store opened while another process held the lock"


def test_lock_timeout_names_file_and_lock(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    KnowledgeStore(path).close()
    child = start_child(HOLD_WRITER, str(path), "30")
    try:
        wait_for_line(child, "locked")
        with pytest.raises(StoreLockedError, match="stayed locked") as err:
            KnowledgeStore(path, read_only=True, lock_timeout_s=0.5)
        assert str(path) in str(err.value)
        assert f"PID {child.pid}" in str(err.value)
    finally:
        child.kill()
        child.wait()


def test_read_only_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.duckdb"
    with pytest.raises(FileNotFoundError, match=str(path)):
        KnowledgeStore(path, read_only=True)
    assert not path.exists()


def test_read_only_store_accepts_puts_that_add_nothing(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    with KnowledgeStore(path) as store:
        store.put_answers("llm", [("p", "a")])
    with KnowledgeStore(path, read_only=True) as store:
        assert store.put_answers("llm", [("p", "a")]) == 0
        with pytest.raises(PermissionError):
            store.put_answers("llm", [("p", "a"), ("q", "b")])


def test_read_only_store_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    KnowledgeStore(path).close()
    with KnowledgeStore(path, read_only=True) as store, pytest.raises(PermissionError):
        store.put_answers("llm", [("p", "a")])


def test_corrupt_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    path.write_text("this is not a database\n" * 200)
    for read_only in (False, True):
        with pytest.raises(ValueError, match="move it away") as err:
            KnowledgeStore(path, read_only=read_only)
        assert str(path) in str(err.value)


def test_truncated_store_is_named(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    with KnowledgeStore(path) as store:
        store.put_vectors("enc", [str(i) for i in range(3000)], np.ones((3000, 384)))
    os.truncate(path, path.stat().st_size // 100)
    with pytest.raises(ValueError, match="move it away") as err:
        KnowledgeStore(path, read_only=True)
    assert str(path) in str(err.value)


def test_foreign_duckdb_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE ratings (user_id INTEGER)")
    with pytest.raises(ValueError, match="not a kar knowledge store"):
        KnowledgeStore(path)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    KnowledgeStore(path).close()
    with duckdb.connect(str(path)) as con:
        con.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    with pytest.raises(ValueError, match="schema version 999"):
        KnowledgeStore(path, read_only=True)


def test_answers_keep_their_cost_and_failures_are_kept_until_answered(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    cost = {"prompt_tokens": 12, "completion_tokens": 30, "latency_s": 0.25, "cost_usd": 5e-5}
    with KnowledgeStore(path) as store:
        added = store.record(
            "llm",
            answers=[
                AnswerRecord("p1", "a1", **cost, attempts=2, meta={"model": "m-0613"}),
                AnswerRecord("p1", "second answer of p1 is dropped"),
                AnswerRecord("p2", "a2"),
            ],
            failures=[
                FailureRecord("p3", "transient", "HTTP 503", attempts=7, status=503),
                FailureRecord("p3", "rejected", "HTTP 400: too long", attempts=1, status=400),
                FailureRecord("p2", "rejected", "ignored: p2 is answered", attempts=1),
            ],
        )
        assert added == 2
        assert store.get_answers("llm", ["p1", "p2"]) == {"p1": "a1", "p2": "a2"}
        [(p3, failure)] = store.get_failures("llm", ["p1", "p2", "p3", "p4"]).items()
        assert (p3, failure.error_class, failure.status, failure.attempts) == (
            "p3",
            "rejected",
            400,
            1,
        )
        assert failure.permanent and failure.message == "HTTP 400: too long"
        assert store.get_failures("other llm", ["p3"]) == {}
        # An answer at last clears the failure; a new failure of an answered prompt is ignored.
        assert store.record("llm", answers=[AnswerRecord("p3", "a3", cost_usd=1e-4)]) == 1
        store.record("llm", failures=[FailureRecord("p1", "fatal", "HTTP 401", attempts=1)])
        assert store.get_failures("llm", ["p1", "p3"]) == {}
        assert store.spending("llm") == {
            "answers": 3,
            "prompt_tokens": 12,
            "completion_tokens": 30,
            "cost_usd": pytest.approx(1.5e-4),
        }
        assert store.stats()["failures"] == 0
    with duckdb.connect(str(path), read_only=True) as con:
        row = con.execute(
            "SELECT prompt_tokens, completion_tokens, latency_s, cost_usd, attempts, meta "
            "FROM answers WHERE prompt = 'p1'"
        ).fetchone()
    assert row == (12, 30, 0.25, 5e-5, 2, '{"model": "m-0613"}')


def test_failure_classes_are_checked() -> None:
    with pytest.raises(ValueError, match="error_class"):
        FailureRecord("p", "flaky", "?", attempts=1)
    assert not FailureRecord("p", "transient", "HTTP 503", attempts=3).permanent


def test_put_answer_fills_cost_columns_from_meta(tmp_path: Path) -> None:
    with KnowledgeStore(tmp_path / "store.duckdb") as store:
        store.put_answer("llm", "p", "a", meta={"prompt_tokens": 7, "cost_usd": 0.5, "x": "y"})
        store.put_answer("llm", "q", "b", meta={"prompt_tokens": "not a number"})
        assert store.spending("llm")["prompt_tokens"] == 7
        assert store.spending("llm")["cost_usd"] == 0.5


V1_SCHEMA = [
    "CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
    "INSERT INTO meta VALUES ('schema_version', '1')",
    """CREATE TABLE answers (llm_key VARCHAR NOT NULL, prompt_sha256 VARCHAR NOT NULL,
        prompt VARCHAR NOT NULL, answer VARCHAR NOT NULL, meta VARCHAR,
        created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
        PRIMARY KEY (llm_key, prompt_sha256))""",
    """CREATE TABLE vectors (encoder_key VARCHAR NOT NULL, text_sha256 VARCHAR NOT NULL,
        text VARCHAR NOT NULL, dim INTEGER NOT NULL, vector FLOAT[] NOT NULL,
        created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
        PRIMARY KEY (encoder_key, text_sha256))""",
]


def test_schema_1_store_is_read_as_is_and_migrated_by_the_first_writer(tmp_path: Path) -> None:
    path = tmp_path / "v1.duckdb"
    with duckdb.connect(str(path)) as con:
        for statement in V1_SCHEMA:
            con.execute(statement)
        for prompt, meta in (("p1", '{"prompt_tokens": 11, "latency_s": 0.5}'), ("p2", None)):
            con.execute(
                "INSERT INTO answers (llm_key, prompt_sha256, prompt, answer, meta) "
                "VALUES ('llm', sha256(?), ?, 'answer', ?)",
                [prompt, prompt, meta],
            )

    # Parallel jobs open the store read-only: an old schema must not stop them.
    with KnowledgeStore(path, read_only=True) as store:
        assert store.schema_version == 1
        assert store.get_answers("llm", ["p1", "p2"]) == {"p1": "answer", "p2": "answer"}
        assert store.get_failures("llm", ["p3"]) == {}
        assert store.stats()["failures"] == 0
        with pytest.raises(PermissionError):
            store.require_writable()

    with KnowledgeStore(path) as store:
        assert store.schema_version == SCHEMA_VERSION == 2
        assert store.get_answers("llm", ["p1", "p2"]) == {"p1": "answer", "p2": "answer"}
        assert store.spending("llm")["prompt_tokens"] == 11
        store.record("llm", failures=[FailureRecord("p3", "rejected", "HTTP 400", attempts=1)])
        assert set(store.get_failures("llm", ["p3"])) == {"p3"}
    with duckdb.connect(str(path), read_only=True) as con:
        latency = con.execute("SELECT latency_s FROM answers WHERE prompt = 'p1'").fetchone()
        version = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert latency == (0.5,) and version == ("2",)
