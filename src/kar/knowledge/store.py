"""The knowledge store: one DuckDB file, shared by all runs, of LLM answers and encoder vectors.

Rows are keyed by who produced them (an LLM key or an encoder key) and the sha256 of the input
text, so a prompt is never answered twice by the same LLM setup and a text is never encoded
twice by the same encoder. Each answer carries what it cost (tokens, latency, USD, attempts);
prompts an LLM failed on are kept in a `failures` table so that a rerun can report them and
decide whether to ask again. DuckDB lets one process write a file, or several processes read it;
opening a file that another process holds waits (with backoff) instead of failing at once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import numpy as np
import pandas as pd
from tenacity import (
    RetryError,
    Retrying,
    before_sleep_log,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from kar.errors import DataError, KarError

log = logging.getLogger("kar.knowledge")

SCHEMA_VERSION = 2
# A read-only store of an older version is read as it is (v2 only added columns and a table);
# it is migrated the first time a process opens it for writing.
_OLDEST_READABLE_VERSION = 1
# Answer columns that schema 2 added, filled from the v1 JSON `meta` where it had them.
_ANSWER_COST_COLUMNS = {
    "prompt_tokens": "INTEGER",
    "completion_tokens": "INTEGER",
    "latency_s": "DOUBLE",
    "cost_usd": "DOUBLE",
    "attempts": "INTEGER",
}

# Each entry migrates a store from the version before it to its key's version.
_MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE answers (
            llm_key VARCHAR NOT NULL,
            prompt_sha256 VARCHAR NOT NULL,
            prompt VARCHAR NOT NULL,
            answer VARCHAR NOT NULL,
            meta VARCHAR,  -- JSON: token usage, latency, cost
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
            PRIMARY KEY (llm_key, prompt_sha256))""",
        """CREATE TABLE vectors (
            encoder_key VARCHAR NOT NULL,
            text_sha256 VARCHAR NOT NULL,
            text VARCHAR NOT NULL,
            dim INTEGER NOT NULL,
            vector FLOAT[] NOT NULL,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
            PRIMARY KEY (encoder_key, text_sha256))""",
    ],
    2: [
        *(
            f"ALTER TABLE answers ADD COLUMN {name} {sql_type}"
            for name, sql_type in _ANSWER_COST_COLUMNS.items()
        ),
        "UPDATE answers SET "
        + ", ".join(
            f"{name} = TRY_CAST(json_extract_string(meta, '$.{name}') AS {sql_type})"
            for name, sql_type in _ANSWER_COST_COLUMNS.items()
        )
        + " WHERE meta IS NOT NULL",
        # The latest failure of each prompt that has no answer yet; an answer deletes it.
        """CREATE TABLE failures (
            llm_key VARCHAR NOT NULL,
            prompt_sha256 VARCHAR NOT NULL,
            prompt VARCHAR NOT NULL,
            error_class VARCHAR NOT NULL,  -- rejected | fatal | transient
            status INTEGER,                -- HTTP status, when there was one
            message VARCHAR NOT NULL,
            attempts INTEGER NOT NULL,
            failed_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
            PRIMARY KEY (llm_key, prompt_sha256))""",
    ],
}

# How DuckDB words damage that is only found when a block is read.
_DAMAGE_SIGNS = ("corrupt", "could not read enough bytes")

_view_ids = itertools.count()
R = TypeVar("R")


class StoreLockedError(KarError, TimeoutError):
    """Another process kept the store file locked for longer than we were willing to wait."""


class StoreReadOnlyError(PermissionError):
    """A write was needed on a store opened read_only: reopen it for writing and try again."""


# What a failure means for the next run. `rejected`: the server refused this prompt (HTTP 400,
# context too long, empty answer) and would again, so later runs skip it unless asked to retry.
# `fatal`: the setup is wrong for every prompt (bad key, unknown model). `transient`: the server
# kept failing past all retries. Both of the latter are asked again on the next run.
FAILURE_CLASSES = ("rejected", "fatal", "transient")


@dataclass(frozen=True)
class AnswerRecord:
    """One answer and what it cost; the cost fields are None where a source does not know them."""

    prompt: str
    answer: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_s: float | None = None
    cost_usd: float | None = None
    attempts: int | None = None
    meta: Mapping[str, object] | None = None  # anything else worth keeping (model, finish reason)


@dataclass(frozen=True)
class FailureRecord:
    """Why a prompt got no answer (see FAILURE_CLASSES)."""

    prompt: str
    error_class: str
    message: str
    attempts: int
    status: int | None = None

    def __post_init__(self) -> None:
        if self.error_class not in FAILURE_CLASSES:
            raise ValueError(
                f"error_class must be one of {FAILURE_CLASSES}, got {self.error_class!r}"
            )

    @property
    def permanent(self) -> bool:
        """Whether asking again would fail the same way."""
        return self.error_class == "rejected"


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _number(value: object, kind: type[int] | type[float]) -> Any:
    """`value` as an int or float when it is a number, else None (meta is free-form)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return kind(value)


def _chunks(rows: list[tuple[Any, ...]], size: int = 500) -> Iterator[list[tuple[Any, ...]]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _placeholders(rows: list[tuple[Any, ...]]) -> str:
    """``(?, ?), (?, ?)`` for rows of that many values."""
    row = "(" + ", ".join("?" * len(rows[0])) + ")"
    return ", ".join([row] * len(rows))


def _is_lock_conflict(err: BaseException) -> bool:
    return isinstance(err, duckdb.IOException) and "lock" in str(err).lower()


class KnowledgeStore:
    """LLM answers and encoder vectors in one DuckDB file.

    Open for reading with ``read_only=True`` (many processes at once) and for writing without
    it (one process at a time; others wait up to `lock_timeout_s`). Close it, or use it as a
    context manager, as soon as the work is done: an open writer blocks every other process.
    A store is safe to share between threads of one process.
    """

    def __init__(
        self, path: str | os.PathLike, *, read_only: bool = False, lock_timeout_s: float = 60.0
    ) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._lock = threading.Lock()
        if read_only and not self.path.exists():
            raise FileNotFoundError(
                f"knowledge store {self.path} does not exist; run the generate/encode stages "
                "first (they create it) or point the store path at an existing file"
            )
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._con = self._connect(lock_timeout_s)
        try:
            self._check_schema()
        except duckdb.Error as err:
            self._con.close()
            raise self._unreadable(err) from err
        except BaseException:
            self._con.close()
            raise

    # -- opening ------------------------------------------------------------------------------

    def _connect(self, lock_timeout_s: float) -> duckdb.DuckDBPyConnection:
        retrying = Retrying(
            retry=retry_if_exception(_is_lock_conflict),
            wait=wait_exponential(multiplier=0.05, max=5.0) + wait_random(0, 0.2),
            stop=stop_after_delay(lock_timeout_s),
            before_sleep=before_sleep_log(log, logging.INFO),
        )
        try:
            return retrying(self._connect_once)
        except RetryError as err:
            cause = err.last_attempt.exception()
            raise StoreLockedError(
                f"knowledge store {self.path} stayed locked by another process for "
                f"{lock_timeout_s:g} s ({cause}). DuckDB allows one writing process per file: "
                "wait for that process to finish (or stop it), or open with read_only=True when "
                "no process is writing."
            ) from cause

    def _unreadable(self, err: duckdb.Error) -> ValueError:
        return ValueError(
            f"knowledge store {self.path} cannot be read ({err}). If the file is corrupt or not "
            "a DuckDB database, move it away (e.g. rename it to *.bak) and rerun to start a new "
            "store; its answers and vectors will be regenerated."
        )

    def _connect_once(self) -> duckdb.DuckDBPyConnection:
        try:
            return duckdb.connect(str(self.path), read_only=self.read_only)
        except duckdb.ConnectionException as err:
            raise RuntimeError(
                f"knowledge store {self.path} is already open in this process with "
                f"read_only={not self.read_only}; DuckDB needs one configuration per file and "
                f"process, so close that store first or reuse it ({err})"
            ) from err
        except duckdb.Error as err:
            if _is_lock_conflict(err):
                raise
            raise self._unreadable(err) from err

    def _check_schema(self) -> None:
        tables = {row[0] for row in self._query("SELECT table_name FROM duckdb_tables()")}
        if "meta" not in tables:
            if tables:
                raise DataError(
                    f"{self.path} is a DuckDB file but not a kar knowledge store (tables: "
                    f"{sorted(tables)}); point the store path elsewhere or move the file away"
                )
            if self.read_only:
                raise DataError(
                    f"knowledge store {self.path} is empty; open it once for writing to create it"
                )
            version = 0
        else:
            rows = self._query("SELECT value FROM meta WHERE key = 'schema_version'")
            version = int(rows[0][0]) if rows else 0
        if version > SCHEMA_VERSION:
            raise DataError(
                f"knowledge store {self.path} has schema version {version}, newer than this "
                f"kar's {SCHEMA_VERSION}; upgrade kar or use another store path"
            )
        self.schema_version = version
        if version < SCHEMA_VERSION:
            if self.read_only and version >= _OLDEST_READABLE_VERSION:
                return  # read as it is; the first writer migrates it
            if self.read_only:
                raise DataError(
                    f"knowledge store {self.path} has schema version {version} and needs "
                    f"migrating to {SCHEMA_VERSION}; open it once without read_only to migrate"
                )
            self._migrate(version)
            self.schema_version = SCHEMA_VERSION

    def _migrate(self, version: int) -> None:
        with self._transaction():
            self._query("CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[target]:
                    self._query(statement)
            self._query(
                "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)]
            )
        log.info("knowledge store %s: schema %d -> %d", self.path, version, SCHEMA_VERSION)

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def __enter__(self) -> KnowledgeStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KnowledgeStore({str(self.path)!r}, read_only={self.read_only})"

    # -- helpers ------------------------------------------------------------------------------

    def _query(self, sql: str, params: Sequence[object] | None = None) -> list[tuple[Any, ...]]:
        # Always drain the result: DuckDB refuses further work on a connection with a pending one.
        return self._fetch(sql, params, duckdb.DuckDBPyConnection.fetchall)

    def _fetch(self, sql: str, params: Sequence[object] | None, fetch: Callable[[Any], R]) -> R:
        try:
            return fetch(self._con.execute(sql, params))
        except duckdb.Error as err:
            # Damaged blocks surface only when read; name the file and the way out.
            if any(sign in str(err).lower() for sign in _DAMAGE_SIGNS):
                raise self._unreadable(err) from err
            raise

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._query("BEGIN TRANSACTION")
        try:
            yield
        except BaseException:
            self._query("ROLLBACK")
            raise
        self._query("COMMIT")

    def _with_frame(self, frame: pd.DataFrame, run: Callable[[str], R]) -> R:
        """Run `run(view_name)` with `frame` visible to SQL under a unique name."""
        name = f"_kar_frame_{next(_view_ids)}"
        self._con.register(name, frame)
        try:
            return run(name)
        finally:
            self._con.unregister(name)

    def require_writable(self) -> None:
        """Raise `StoreReadOnlyError` if this store cannot be written.

        Callers about to compute something costly (LLM calls, encoding) that they will store
        check first, so that a read-only store fails before the work, not after it.
        """
        if self.read_only:
            raise StoreReadOnlyError(f"knowledge store {self.path} was opened read_only")

    # -- answers ------------------------------------------------------------------------------

    def get_answers(self, llm_key: str, prompts: Sequence[str]) -> dict[str, str]:
        """prompt -> answer for the prompts this LLM setup has answered."""
        if not prompts:
            return {}
        frame = pd.DataFrame({"sha": [text_sha256(p) for p in prompts]}).drop_duplicates()
        with self._lock:
            rows = self._with_frame(
                frame,
                lambda view: self._query(
                    f"SELECT a.prompt, a.answer FROM {view} f JOIN answers a "
                    "ON a.prompt_sha256 = f.sha AND a.llm_key = ?",
                    [llm_key],
                ),
            )
        return dict(rows)

    def put_answer(
        self,
        llm_key: str,
        prompt: str,
        answer: str,
        *,
        meta: Mapping[str, object] | None = None,
    ) -> None:
        """Store one answer (first answer wins); committed to disk when this returns.

        Cost fields found in `meta` (prompt_tokens, completion_tokens, latency_s, cost_usd,
        attempts) also fill the answer's cost columns.
        """
        known = dict(meta or {})
        costs = {
            name: _number(known.get(name), int if sql_type == "INTEGER" else float)
            for name, sql_type in _ANSWER_COST_COLUMNS.items()
        }
        self.record(llm_key, answers=[AnswerRecord(prompt, answer, meta=meta, **costs)])

    def record(
        self,
        llm_key: str,
        *,
        answers: Sequence[AnswerRecord] = (),
        failures: Sequence[FailureRecord] = (),
    ) -> int:
        """Commit answers and failures of one LLM setup in one transaction; returns new answers.

        An answer clears the prompt's recorded failure; a failure replaces the prompt's earlier
        one and is ignored where the prompt already has an answer. Committed when this returns,
        so a process killed right after loses nothing recorded here.
        """
        self.require_writable()
        # Parameterised VALUES lists, not registered frames: a generation stage commits a few
        # rows many times a second, and a frame's fixed cost would dominate.
        first_answers = {a.prompt: a for a in reversed(answers)}  # the first answer wins
        last_failures = {f.prompt: f for f in failures if f.prompt not in first_answers}
        answer_rows = [
            (
                llm_key,
                text_sha256(a.prompt),
                a.prompt,
                a.answer,
                None if a.meta is None else json.dumps(dict(a.meta), sort_keys=True),
                *(getattr(a, name) for name in _ANSWER_COST_COLUMNS),
            )
            for a in first_answers.values()
        ]
        failure_rows = [
            (
                llm_key,
                text_sha256(f.prompt),
                f.prompt,
                f.error_class,
                f.status,
                f.message,
                f.attempts,
            )
            for f in last_failures.values()
        ]
        if not answer_rows and not failure_rows:
            return 0
        columns = ", ".join(_ANSWER_COST_COLUMNS)
        added = 0
        with self._lock, self._transaction():
            for chunk in _chunks(answer_rows):
                [(n,)] = self._query(
                    "INSERT INTO answers "
                    f"(llm_key, prompt_sha256, prompt, answer, meta, {columns}) "
                    f"VALUES {_placeholders(chunk)} ON CONFLICT DO NOTHING",
                    [value for row in chunk for value in row],
                )
                added += int(n)
                shas = [row[1] for row in chunk]
                self._query(
                    "DELETE FROM failures WHERE llm_key = ? AND prompt_sha256 IN "
                    f"({', '.join('?' * len(shas))})",
                    [llm_key, *shas],
                )
            for chunk in _chunks(failure_rows):
                shas = [row[1] for row in chunk]
                answered = {
                    sha
                    for (sha,) in self._query(
                        "SELECT prompt_sha256 FROM answers WHERE llm_key = ? AND prompt_sha256 "
                        f"IN ({', '.join('?' * len(shas))})",
                        [llm_key, *shas],
                    )
                }
                if kept := [row for row in chunk if row[1] not in answered]:
                    self._query(
                        "INSERT OR REPLACE INTO failures (llm_key, prompt_sha256, prompt, "
                        f"error_class, status, message, attempts) VALUES {_placeholders(kept)}",
                        [value for row in kept for value in row],
                    )
        return added

    def get_failures(self, llm_key: str, prompts: Sequence[str]) -> dict[str, FailureRecord]:
        """prompt -> its recorded failure, for the prompts this LLM setup failed on (no answer)."""
        if not prompts or self.schema_version < 2:  # an old read-only store records none
            return {}
        frame = pd.DataFrame({"sha": [text_sha256(p) for p in prompts]}).drop_duplicates()
        with self._lock:
            rows = self._with_frame(
                frame,
                lambda view: self._query(
                    "SELECT x.prompt, x.error_class, x.message, x.attempts, x.status "
                    f"FROM {view} f JOIN failures x "
                    "ON x.prompt_sha256 = f.sha AND x.llm_key = ?",
                    [llm_key],
                ),
            )
        return {
            prompt: FailureRecord(prompt, error_class, message, int(attempts), status)
            for prompt, error_class, message, attempts, status in rows
        }

    def spending(self, llm_key: str) -> dict[str, float]:
        """What this LLM setup's stored answers cost in total: answers, tokens, USD."""
        if self.schema_version < 2:
            with self._lock:
                [(n,)] = self._query("SELECT count(*) FROM answers WHERE llm_key = ?", [llm_key])
            return {"answers": n, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
        with self._lock:
            [(n, prompt_tokens, completion_tokens, cost)] = self._query(
                "SELECT count(*), coalesce(sum(prompt_tokens), 0), "
                "coalesce(sum(completion_tokens), 0), coalesce(sum(cost_usd), 0) "
                "FROM answers WHERE llm_key = ?",
                [llm_key],
            )
        return {
            "answers": n,
            "prompt_tokens": int(prompt_tokens),
            "completion_tokens": int(completion_tokens),
            "cost_usd": float(cost),
        }

    def put_answers(self, llm_key: str, items: Sequence[tuple[str, str]]) -> int:
        """Store (prompt, answer) pairs in one transaction; returns how many were new.

        Re-putting only stored prompts changes nothing, so it is allowed on a read-only store:
        an importer (e.g. a .klg file) can always hand over everything it has.
        """
        first = dict(reversed(list(items)))  # reversed: the first answer of a repeated prompt wins
        if self.read_only and len(self.get_answers(llm_key, list(first))) == len(first):
            return 0
        self.require_writable()
        if not first:
            return 0
        frame = pd.DataFrame(
            {
                "sha": [text_sha256(p) for p in first],
                "prompt": list(first),
                "answer": list(first.values()),
            }
        )
        return self._insert_new(
            frame,
            "INSERT INTO answers (llm_key, prompt_sha256, prompt, answer) "
            "SELECT ?, sha, prompt, answer FROM {view} ON CONFLICT DO NOTHING",
            [llm_key],
        )

    def _insert_new(self, frame: pd.DataFrame, sql: str, params: list[Any]) -> int:
        def insert(view: str) -> int:
            with self._transaction():
                return int(self._query(sql.format(view=view), params)[0][0])

        with self._lock:
            return self._with_frame(frame, insert)

    # -- vectors ------------------------------------------------------------------------------

    def get_vectors(self, encoder_key: str, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """text -> float32 vector (dim,) for the texts this encoder setup has encoded."""
        if not texts:
            return {}
        frame = pd.DataFrame({"sha": [text_sha256(t) for t in texts]}).drop_duplicates()
        with self._lock:
            columns = self._with_frame(
                frame,
                lambda view: self._fetch(
                    f"SELECT v.text, v.vector FROM {view} f JOIN vectors v "
                    "ON v.text_sha256 = f.sha AND v.encoder_key = ?",
                    [encoder_key],
                    duckdb.DuckDBPyConnection.fetchnumpy,
                ),
            )
        return {
            text: np.asarray(vector, dtype=np.float32)
            for text, vector in zip(columns["text"], columns["vector"], strict=True)
        }

    def put_vectors(self, encoder_key: str, texts: Sequence[str], vectors: np.ndarray) -> int:
        """Store vectors (N, dim) of `texts` in one transaction; returns how many were new."""
        self.require_writable()
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(texts):
            raise DataError(
                f"put_vectors needs vectors of shape (len(texts)={len(texts)}, dim); "
                f"got {vectors.shape}"
            )
        if not texts:
            return 0
        dim = vectors.shape[1]
        with self._lock:
            stored = self._query(
                "SELECT dim FROM vectors WHERE encoder_key = ? LIMIT 1", [encoder_key]
            )
        if stored and stored[0][0] != dim:
            raise DataError(
                f"encoder {encoder_key!r} has {stored[0][0]}-dim vectors in {self.path} but "
                f"{dim}-dim ones were given; an encoder key must identify one vector size"
            )
        frame = pd.DataFrame(
            {"sha": [text_sha256(t) for t in texts], "text": list(texts), "vector": list(vectors)}
        ).drop_duplicates("sha")
        return self._insert_new(
            frame,
            "INSERT INTO vectors (encoder_key, text_sha256, text, dim, vector) "
            "SELECT ?, sha, text, ?, vector::FLOAT[] FROM {view} ON CONFLICT DO NOTHING",
            [encoder_key, dim],
        )

    # -- overview -----------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counts: schema_version, answers, llm_keys, failures, vectors, encoder_keys."""
        with self._lock:
            [(answers, llm_keys)] = self._query(
                "SELECT count(*), count(DISTINCT llm_key) FROM answers"
            )
            [(vectors, encoder_keys)] = self._query(
                "SELECT count(*), count(DISTINCT encoder_key) FROM vectors"
            )
            failures = 0
            if self.schema_version >= 2:  # an old store read as it is has no failures table
                [(failures,)] = self._query("SELECT count(*) FROM failures")
        return {
            "schema_version": self.schema_version,
            "answers": answers,
            "llm_keys": llm_keys,
            "failures": failures,
            "vectors": vectors,
            "encoder_keys": encoder_keys,
        }
