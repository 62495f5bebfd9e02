"""The generation stage that every answer-producing provider (API or local model) shares.

Given prompt requests, it answers only what the knowledge store lacks: it plans and logs what the
rest will cost, sends it through the provider's `Sender` with bounded concurrency, commits every
answer (tokens, latency, cost) and every failure as it arrives, keeps to a budget, shows progress
and ends with a `GenerationReport`. A provider supplies only how a batch of prompts is answered.

Durability: answers are committed in small transactions by one writer while requests are in
flight, so a crash, Ctrl-C or ``kill -9`` loses at most the answers in flight or received in the
last few milliseconds; rerunning sends only what the store lacks.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Protocol, TypeVar

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from kar.errors import KarError
from kar.knowledge.llm.base import Knowledge
from kar.knowledge.prompts import PromptRequest
from kar.knowledge.store import AnswerRecord, FailureRecord, KnowledgeStore
from kar.registry import ConfigError

log = logging.getLogger("kar.knowledge")

# The rule of thumb OpenAI gives for English text; prompts are estimated with it before sending
# (the actual counts come back with each answer and are what the ledger records).
CHARS_PER_TOKEN = 4
# Rejected prompts logged one by one; the rest are counted in the summary.
_LOGGED_FAILURES = 5
# The writer commits what arrived at most this often. A DuckDB commit costs a few ms of CPU, so
# committing every answer of a fast server apart would take a core; a kill loses at most the
# answers of this window (and those in flight).
COMMIT_INTERVAL_S = 0.05
T = TypeVar("T")


def estimate_tokens(text: str) -> int:
    """Approximate token count of `text`: one token per 4 characters, at least 1."""
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


@dataclass(frozen=True)
class Pricing:
    """USD per million input (prompt) and output (completion) tokens; 0 for local models."""

    input_per_1m: float = 0.0
    output_per_1m: float = 0.0

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return (prompt_tokens * self.input_per_1m + completion_tokens * self.output_per_1m) / 1e6

    def __str__(self) -> str:
        return f"${self.input_per_1m:g}/${self.output_per_1m:g} per 1M input/output tokens"


@dataclass(frozen=True)
class GenerationSettings:
    """How a provider's generation stage runs (its `llm.*` options, checked here)."""

    pricing: Pricing = field(default_factory=Pricing)
    max_output_tokens: int = 512  # the provider's cap per answer: the worst case for the budget
    expected_output_tokens: int | None = None  # for the printed estimate; None = the cap
    max_cost_usd: float | None = None
    dry_run: bool = False
    retry_failed: bool = False
    concurrency: int = 1  # batches in flight at once
    batch_size: int = 1  # prompts per request

    def __post_init__(self) -> None:
        checks = (
            (self.pricing.input_per_1m >= 0, "price_per_1m_input_tokens", "must be >= 0"),
            (self.pricing.output_per_1m >= 0, "price_per_1m_output_tokens", "must be >= 0"),
            (self.concurrency >= 1, "concurrency", "must be >= 1"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (
                self.expected_output_tokens is None or self.expected_output_tokens >= 1,
                "expected_output_tokens",
                "must be >= 1, or null to estimate with the output cap",
            ),
            (
                self.max_cost_usd is None or self.max_cost_usd >= 0,
                "max_cost_usd",
                "must be >= 0, or null for no limit",
            ),
        )
        for ok, name, rule in checks:
            if not ok:
                raise ConfigError(f"llm.{name}={getattr(self, name, None)!r}: it {rule}")

    def worst_case_cost(self, prompt_tokens: float) -> float:
        return self.pricing.cost(prompt_tokens, self.max_output_tokens)


@dataclass(frozen=True)
class Completion:
    """An answer as a sender returns it; token counts are None where the source gave none."""

    prompt: str
    answer: str
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_s: float
    attempts: int = 1
    meta: dict[str, Any] = field(default_factory=dict)


Outcome = Completion | FailureRecord


class StopGeneration(Exception):
    """Raised by a sender: no further prompt should be sent, and `error` ends the stage.

    `failure` (if any) is recorded for the prompt that showed the problem. Requests already in
    flight complete and are stored first.
    """

    def __init__(self, error: KarError, failure: FailureRecord | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.failure = failure


class RunControl(Protocol):
    """What a sender sees of the running stage."""

    @property
    def stopping(self) -> bool:
        """True once the stage sends nothing new: a sender should not retry either."""
        ...

    def note_request(self) -> None:
        """One request went out (retries included)."""
        ...

    def note_retry(self, reason: str) -> None:
        """A request is about to be repeated because of `reason` (e.g. "HTTP 429")."""
        ...


class Sender(Protocol):
    """Answers batches of prompts (a provider's part of the stage)."""

    async def send(self, prompts: list[str], run: RunControl) -> list[Outcome]:
        """An outcome per prompt; a prompt left out was abandoned (the stage is stopping)."""
        ...


@dataclass
class GenerationReport:
    """What one generation stage did: cached, sent, failed, spent. Logged and tracked."""

    llm_key: str
    prompts: int = 0  # distinct prompts requested
    cached: int = 0  # answered in the store before this run
    skipped_failed: int = 0  # rejected in an earlier run and not retried (llm.retry_failed)
    to_send: int = 0
    answered: int = 0  # new answers stored by this run
    failed: int = 0  # prompts recorded as failed by this run
    requests: int = 0  # requests sent, retries included
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    estimated_input_tokens: int = 0
    estimated_output_tokens: int = 0
    estimated_cost_usd: float = 0.0
    elapsed_s: float = 0.0
    stopped: str | None = None  # None (done) | dry_run | budget | error | interrupted
    retry_reasons: Counter[str] = field(default_factory=Counter)
    failure_reasons: Counter[str] = field(default_factory=Counter)

    @property
    def unsent(self) -> int:
        """Prompts still without an answer or a failure record from this run."""
        if self.stopped == "dry_run":
            return self.to_send
        return self.to_send - self.answered - self.failed

    def metrics(self) -> dict[str, float]:
        """Flat numbers for the experiment tracker."""
        names = (
            "prompts", "cached", "skipped_failed", "to_send", "answered", "failed", "unsent",
            "requests", "retries", "prompt_tokens", "completion_tokens", "cost_usd",
            "estimated_cost_usd", "elapsed_s",
        )  # fmt: skip
        return {f"generate/{name}": float(getattr(self, name)) for name in names}

    def summary(self) -> str:
        retries = f"{self.retries} retries"
        if self.retry_reasons:
            retries += " (" + ", ".join(f"{r} x{n}" for r, n in self.retry_reasons.items()) + ")"
        line = (
            f"{self.prompts} prompts: {self.cached} cached, {self.skipped_failed} skipped as "
            f"failed before, {self.answered} answered, {self.failed} failed, {self.unsent} "
            f"unsent; {self.requests} requests, {retries}; {self.prompt_tokens} input + "
            f"{self.completion_tokens} output tokens, ${self.cost_usd:.4f} spent (estimate "
            f"${self.estimated_cost_usd:.4f}) in {self.elapsed_s:.1f} s"
        )
        if self.failure_reasons:
            common = self.failure_reasons.most_common(3)
            line += "; failures: " + ", ".join(f"{r} x{n}" for r, n in common)
        if self.stopped:
            line += f"; stopped: {self.stopped}"
        return line


def run_generation(
    requests: Sequence[PromptRequest],
    store: KnowledgeStore,
    *,
    llm_key: str,
    settings: GenerationSettings,
    open_sender: Callable[[int], AbstractAsyncContextManager[Sender]],
    label: str,
    report: GenerationReport | None = None,
) -> dict[tuple[str, str], Knowledge]:
    """Answers keyed by (kind, raw_id); `report` (if given) is filled in as the stage goes.

    `open_sender(n_prompts)` is called only when prompts must be sent, before any is: it reads
    credentials or loads a model, raising a `KarError` that names the fix when it cannot.
    Raises the error a sender stopped the stage with, after storing what arrived and logging the
    report; ``report.stopped`` says why a stage that returned did not send everything.
    """
    stage = _GenerationStage(store, llm_key, settings, label, report)
    answers = stage.run(list(dict.fromkeys(r.prompt for r in requests)), open_sender)
    return {
        (r.kind, r.raw_id): Knowledge(prompt=r.prompt, answer=answers[r.prompt])
        for r in requests
        if r.prompt in answers
    }


def _run_coroutine(make: Callable[[], Any]) -> Any:
    """Run the coroutine `make()` to completion, also from code already inside an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        in_loop = False
    else:
        in_loop = True
    if not in_loop:
        return asyncio.run(make())
    with ThreadPoolExecutor(max_workers=1) as pool:  # e.g. a notebook: a loop of our own
        return pool.submit(lambda: asyncio.run(make())).result()


class _GenerationStage:
    """One run of the stage for one LLM setup: plan, send, commit, report."""

    def __init__(
        self,
        store: KnowledgeStore,
        llm_key: str,
        settings: GenerationSettings,
        label: str,
        report: GenerationReport | None,
    ) -> None:
        self.store = store
        self.key = llm_key
        self.settings = settings
        self.label = label
        self.report = report if report is not None else GenerationReport(llm_key=llm_key)
        self.answers: dict[str, str] = {}
        self.error: KarError | None = None
        self._stopping = False
        self._spent = 0.0  # actual cost of the answers received (committed or not)
        self._reserved = 0.0  # worst-case cost of the requests in flight
        self._estimated_in = 0  # input tokens estimated for, and reported by, answered prompts
        self._reported_in = 0
        self._arrived: list[Outcome] = []  # received, not yet committed
        self._closing = False  # no worker will add to _arrived any more
        self._bar: Any = None

    # -- RunControl -----------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping

    def note_request(self) -> None:
        self.report.requests += 1

    def note_retry(self, reason: str) -> None:
        self.report.retries += 1
        self.report.retry_reasons[reason] += 1

    # -- plan -----------------------------------------------------------------------------------

    def run(
        self,
        prompts: list[str],
        open_sender: Callable[[int], AbstractAsyncContextManager[Sender]],
    ) -> dict[str, str]:
        report, settings = self.report, self.settings
        self.answers = self.store.get_answers(self.key, prompts)
        missing = [p for p in prompts if p not in self.answers]
        failed_before = self.store.get_failures(self.key, missing)
        skipped = [
            p
            for p in missing
            if p in failed_before and failed_before[p].permanent and not settings.retry_failed
        ]
        skipped_set = set(skipped)
        to_send = [p for p in missing if p not in skipped_set]
        report.prompts, report.cached = len(prompts), len(self.answers)
        report.skipped_failed, report.to_send = len(skipped), len(to_send)
        report.estimated_input_tokens = sum(estimate_tokens(p) for p in to_send)
        per_answer = settings.expected_output_tokens or settings.max_output_tokens
        report.estimated_output_tokens = per_answer * len(to_send)
        report.estimated_cost_usd = settings.pricing.cost(
            report.estimated_input_tokens, report.estimated_output_tokens
        )
        if to_send and not settings.dry_run:
            # Before the plan is shown: a read-only store is reopened for writing and this runs
            # again, and nothing may be paid for that could not be kept.
            self.store.require_writable()
        self._log_plan(skipped, failed_before, to_send, per_answer)
        if settings.dry_run:
            report.stopped = "dry_run"
            log.info("%s: llm.dry_run=true: nothing sent", self.key)
            return self.answers
        if not to_send:
            return self.answers
        sender = open_sender(len(to_send))
        started = time.perf_counter()
        try:
            with logging_redirect_tqdm(loggers=[logging.getLogger()]):
                self._bar = tqdm(total=len(to_send), desc=f"LLM {self.label}", unit="prompt")
                try:
                    _run_coroutine(lambda: self._send_all(to_send, sender))
                finally:
                    self._commit_arrived()  # whatever a cancelled writer left behind
                    self._bar.close()
        except BaseException:  # Ctrl-C, or a bug: what arrived is stored; say so, then raise
            report.stopped = report.stopped or "interrupted"
            report.elapsed_s = time.perf_counter() - started
            log.warning("%s: generation interrupted: %s", self.key, report.summary())
            raise
        report.elapsed_s = time.perf_counter() - started
        self._log_summary()
        if self.error is not None:
            raise self.error
        return self.answers

    def _log_plan(
        self,
        skipped: list[str],
        failed_before: dict[str, FailureRecord],
        to_send: list[str],
        per_answer: int,
    ) -> None:
        report, settings = self.report, self.settings
        output_basis = (
            f"llm.expected_output_tokens={per_answer} per answer"
            if settings.expected_output_tokens
            else f"the cap of {per_answer} per answer, an upper bound"
        )
        log.info(
            "%s: %d distinct prompts: %d answered in the store, %d skipped, %d to send",
            self.key, report.prompts, report.cached, len(skipped), len(to_send),
        )  # fmt: skip
        if to_send:
            log.info(
                "%s: to send: ~%d input tokens (%d characters per token) + ~%d output tokens "
                "(%s) = ~$%.4f at %s",
                self.key, report.estimated_input_tokens, CHARS_PER_TOKEN,
                report.estimated_output_tokens, output_basis, report.estimated_cost_usd,
                settings.pricing,
            )  # fmt: skip
        if skipped:
            first = failed_before[skipped[0]]
            log.warning(
                "%s: %d prompts were rejected in an earlier run and are skipped (first: %s); "
                "set llm.retry_failed=true to ask again",
                self.key, len(skipped), first.message,
            )  # fmt: skip
        limit = settings.max_cost_usd
        if to_send and limit is not None and report.estimated_cost_usd > limit:
            log.warning(
                "%s: the estimate ~$%.4f exceeds llm.max_cost_usd=$%g: sending stops before "
                "the spending could pass it (answers so far are kept; raise the limit and rerun "
                "to continue)",
                self.key, report.estimated_cost_usd, limit,
            )  # fmt: skip

    # -- send -----------------------------------------------------------------------------------

    async def _send_all(
        self, prompts: list[str], opened: AbstractAsyncContextManager[Sender]
    ) -> None:
        settings = self.settings
        pending = iter(prompts)
        wake = asyncio.Event()
        n_workers = min(settings.concurrency, math.ceil(len(prompts) / settings.batch_size))
        async with opened as sender:
            writer = asyncio.create_task(self._write(wake))
            workers = [
                asyncio.create_task(self._work(pending, sender, wake)) for _ in range(n_workers)
            ]
            try:
                await asyncio.gather(*workers)
            finally:
                for worker in workers:
                    worker.cancel()
                self._closing = True
                wake.set()
                await asyncio.shield(writer)

    async def _work(self, pending: Iterator[str], sender: Sender, wake: asyncio.Event) -> None:
        while not self._stopping:
            batch, reserved = self._take(pending)
            if not batch:
                return
            try:
                outcomes = await sender.send(batch, self)
            except StopGeneration as stop:
                self._stop("error", stop.error)
                outcomes = [stop.failure] if stop.failure is not None else []
            finally:
                self._reserved -= reserved
            for outcome in outcomes:
                if isinstance(outcome, Completion):
                    self._spent += self._cost(outcome)[2]
            self._arrived.extend(outcomes)
            wake.set()

    def _take(self, pending: Iterator[str]) -> tuple[list[str], float]:
        """The next batch, with its worst-case cost reserved; empty when none fits the budget."""
        batch: list[str] = []
        reserved = 0.0
        limit = self.settings.max_cost_usd
        for prompt in islice(pending, self.settings.batch_size):
            need = self.settings.worst_case_cost(estimate_tokens(prompt) * self._input_scale())
            if limit is not None and self._spent + self._reserved + need > limit:
                log.warning(
                    "%s: llm.max_cost_usd=$%g reached ($%.4f spent, $%.4f in flight): no new "
                    "requests; answers so far are kept, raise the limit and rerun to continue",
                    self.key, limit, self._spent, self._reserved,
                )  # fmt: skip
                self._stop("budget")
                break
            self._reserved += need
            reserved += need
            batch.append(prompt)
        return batch, reserved

    def _input_scale(self) -> float:
        """How far actual prompt tokens exceeded the estimate so far (>= 1), for the budget."""
        if not self._estimated_in:
            return 1.0
        return max(1.0, self._reported_in / self._estimated_in)

    def _stop(self, reason: str, error: KarError | None = None) -> None:
        if not self._stopping:
            self._stopping = True
            self.report.stopped = reason
        if error is not None and self.error is None:
            self.error = error

    def _cost(self, completion: Completion) -> tuple[int, int, float]:
        prompt_tokens = completion.prompt_tokens
        if prompt_tokens is None:
            prompt_tokens = estimate_tokens(completion.prompt)
        completion_tokens = completion.completion_tokens
        if completion_tokens is None:
            completion_tokens = estimate_tokens(completion.answer)
        return (
            prompt_tokens,
            completion_tokens,
            self.settings.pricing.cost(prompt_tokens, completion_tokens),
        )

    # -- commit ---------------------------------------------------------------------------------

    async def _write(self, wake: asyncio.Event) -> None:
        """The one writer: commits whatever arrived, as one transaction, while requests run."""
        try:
            await self._write_until_closed(wake)
        except BaseException:
            self._stopping = True  # what cannot be stored must not be paid for: no new requests
            raise

    async def _write_until_closed(self, wake: asyncio.Event) -> None:
        while True:
            await wake.wait()
            wake.clear()
            batch, self._arrived = self._arrived, []  # taken in the loop's thread: no race
            if batch:
                started = time.monotonic()
                # Committed in a thread, so that responses keep arriving meanwhile.
                await asyncio.to_thread(self._commit, batch)
                if not self._closing:
                    await asyncio.sleep(COMMIT_INTERVAL_S - (time.monotonic() - started))
            if self._closing and not self._arrived:
                return

    def _commit_arrived(self) -> None:
        """Commit what is left once the event loop is gone (cancelled writer, Ctrl-C)."""
        batch, self._arrived = self._arrived, []
        self._commit(batch)

    def _commit(self, batch: list[Outcome]) -> None:
        if not batch:
            return
        answers, failures = [], []
        for outcome in batch:
            if isinstance(outcome, Completion):
                answers.append(self._answer_record(outcome))
            else:
                failures.append(outcome)
        self.store.record(self.key, answers=answers, failures=failures)
        report = self.report
        for answer in answers:
            self.answers[answer.prompt] = answer.answer
            report.answered += 1
            report.prompt_tokens += answer.prompt_tokens or 0
            report.completion_tokens += answer.completion_tokens or 0
            report.cost_usd += answer.cost_usd or 0.0
        for failure in failures:
            report.failed += 1
            report.failure_reasons[failure.message.split(":")[0]] += 1
            if report.failed <= _LOGGED_FAILURES:
                log.warning(
                    "%s: prompt %r... got no answer (%s, %d attempts): %s",
                    self.key, failure.prompt[:60], failure.error_class, failure.attempts,
                    failure.message,
                )  # fmt: skip
        self._bar.update(len(batch))
        self._bar.set_postfix_str(
            f"tokens {report.prompt_tokens}+{report.completion_tokens}, "
            f"${report.cost_usd:.4f}, failed {report.failed}, retries {report.retries}",
            refresh=False,
        )

    def _answer_record(self, completion: Completion) -> AnswerRecord:
        prompt_tokens, completion_tokens, cost = self._cost(completion)
        meta = dict(completion.meta)
        if completion.prompt_tokens is None or completion.completion_tokens is None:
            meta["usage_estimated"] = True  # the source reported no usage: chars/4 was used
        else:
            self._estimated_in += estimate_tokens(completion.prompt)
            self._reported_in += completion.prompt_tokens
        return AnswerRecord(
            prompt=completion.prompt,
            answer=completion.answer,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency_s=round(completion.latency_s, 4),
            cost_usd=cost,
            attempts=completion.attempts,
            meta=meta,
        )

    def _log_summary(self) -> None:
        log.info("%s: %s", self.key, self.report.summary())
        ledger = self.store.spending(self.key)
        log.info(
            "%s: the store holds %d answers of this setup, which cost $%.4f in all",
            self.key, ledger["answers"], ledger["cost_usd"],
        )  # fmt: skip
        if self.report.stopped == "budget":
            log.warning(
                "%s: stopped at llm.max_cost_usd=$%g with %d prompts unsent; raise it and rerun "
                "to continue",
                self.key, self.settings.max_cost_usd, self.report.unsent,
            )  # fmt: skip
