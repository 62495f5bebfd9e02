"""An OpenAI-compatible chat-completions provider: OpenAI itself, vLLM, Ollama, llama.cpp...

One user message per prompt, sent with bounded concurrency (``llm.concurrency`` requests in
flight) over one aiohttp connection pool (httpx spends ~20x more CPU per request at 64 in
flight, encode/httpx#3215, which would cap a fast local server's throughput). Transient failures
(429, 408, 409, 5xx, timeouts, lost connections, a body that is not a chat completion) are
retried with exponential backoff and jitter, honouring the server's Retry-After, which also
pauses the other requests. A prompt the server refuses (400, context too long, an empty answer)
is recorded as failed and the run goes on; a bad key (401/403) or an unknown model or endpoint
(404) is recorded and stops the run, as every other prompt would fail the same way. See
`kar.knowledge.llm.generation` for the stage around it (cache, budget, commits, report).

The API key is read from the environment variable named by ``llm.api_key_env`` only when
something must be sent, and never appears in the provider's key, messages or logs: server
messages are scrubbed of it, and 401/403 bodies (which may echo it) are not shown at all.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import time
import urllib.request
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from kar.errors import KarError
from kar.knowledge.llm.base import Knowledge, LLMProvider
from kar.knowledge.llm.generation import (
    Completion,
    GenerationReport,
    GenerationSettings,
    Outcome,
    Pricing,
    RunControl,
    Sender,
    StopGeneration,
    run_generation,
)
from kar.knowledge.prompts import PromptRequest
from kar.knowledge.store import FailureRecord, KnowledgeStore
from kar.registry import LLMS, ConfigError

log = logging.getLogger("kar.knowledge")

# Worth another try: the server is busy or briefly broken, not the request wrong.
_TRANSIENT_STATUS = frozenset({408, 409, 425, 429})
# A rejection that would repeat for every prompt (bad key, no such model or endpoint).
_FATAL_STATUS = frozenset({401, 403, 404})
_MAX_RETRY_AFTER_S = 300.0
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "0.0.0.0")


class LLMServerError(KarError, RuntimeError):
    """The LLM server stayed unreachable or failing after all retries, or refuses every prompt."""


class _TransientError(Exception):
    def __init__(
        self, reason: str, *, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.retry_after_s = retry_after_s


class _RejectedError(Exception):
    """The server refused this one prompt (e.g. HTTP 400: too long, filtered)."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.status = status


class _FatalError(Exception):
    """The server refuses this setup (key, model, endpoint): every prompt would fail."""

    def __init__(self, reason: str, status: int) -> None:
        super().__init__(reason)
        self.status = status


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asks us to wait: Retry-After (seconds or HTTP date) or retry-after-ms."""
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(float(ms) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max((when - datetime.now(timezone.utc)).total_seconds(), 0.0)


@dataclass(frozen=True)
class _Reply:
    """A server's response, read in full."""

    status: int
    headers: Mapping[str, str]  # case-insensitive
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)

    def server_message(self) -> str:
        """The error text the server sent, shortened (OpenAI: {"error": {"message": ...}})."""
        try:
            body = self.json()
            message = body["error"]["message"] if isinstance(body.get("error"), dict) else body
        except (ValueError, AttributeError, KeyError, TypeError):
            message = self.text
        return " ".join(str(message).split())[:300]


@LLMS.register("openai")
class OpenAIChat(LLMProvider):
    """Answers from ``POST {base_url}/chat/completions``, one user message per prompt.

    Generation parameters (model, temperature, max_tokens) and the endpoint make up `key`;
    transport settings (concurrency, timeouts, retries), prices and the budget do not, as they
    do not change answers. ``model`` defaults to the paper's gpt-3.5-turbo; it has a default
    because only keyword arguments with defaults are settable from YAML (see kar.registry).
    """

    def __init__(
        self,
        *,
        model: str = "gpt-3.5-turbo",
        base_url: str = "https://api.openai.com/v1",
        api_key_env: str | None = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_tokens: int = 512,
        concurrency: int = 8,
        timeout_s: float = 60.0,
        max_retries: int = 6,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
        price_per_1m_input_tokens: float = 0.0,
        price_per_1m_output_tokens: float = 0.0,
        expected_output_tokens: int | None = None,
        max_cost_usd: float | None = None,
        dry_run: bool = False,
        retry_failed: bool = False,
    ) -> None:
        if not model:
            raise ConfigError("llm.model is empty; name the chat model, e.g. gpt-3.5-turbo")
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"llm.base_url={base_url!r} is not an http(s) URL; use e.g. "
                "https://api.openai.com/v1 or http://localhost:8000/v1"
            )
        if api_key_env is not None and not api_key_env.strip():
            raise ConfigError(
                "llm.api_key_env is empty; name the variable that holds the key, or set it to "
                "null for a server that needs none"
            )
        for name, value, minimum in (
            ("max_tokens", max_tokens, 1),
            ("max_retries", max_retries, 0),
        ):
            if value < minimum:
                raise ConfigError(f"llm.{name}={value}; it must be >= {minimum}")
        for name, value in (
            ("timeout_s", timeout_s),
            ("backoff_initial_s", backoff_initial_s),
            ("backoff_max_s", backoff_max_s),
        ):
            if value <= 0:
                raise ConfigError(f"llm.{name}={value}; it must be > 0")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.settings = GenerationSettings(
            pricing=Pricing(price_per_1m_input_tokens, price_per_1m_output_tokens),
            max_output_tokens=max_tokens,
            expected_output_tokens=expected_output_tokens,
            max_cost_usd=max_cost_usd,
            dry_run=dry_run,
            retry_failed=retry_failed,
            concurrency=concurrency,
        )
        self.last_report = None

    @property
    def key(self) -> str:
        """Provider, model, endpoint and generation parameters; never the API key."""
        return f"openai:{self.model}:{self.base_url}:t={self.temperature}:max={self.max_tokens}"

    def prefix_lengths(self) -> dict[str, int] | None:
        return None  # prompts are rendered by us from the dataset's own knowledge prefix

    def generate(
        self, requests: Sequence[PromptRequest], store: KnowledgeStore
    ) -> dict[tuple[str, str], Knowledge]:
        pricing = self.settings.pricing
        if pricing == Pricing() and urlsplit(self.base_url).hostname not in _LOCAL_HOSTS:
            log.warning(
                "%s: no price set (llm.price_per_1m_input_tokens / _output_tokens): costs are "
                "shown as $0 and llm.max_cost_usd cannot limit spending",
                self.key,
            )
        self.last_report = GenerationReport(llm_key=self.key)
        knowledge = run_generation(
            requests,
            store,
            llm_key=self.key,
            settings=self.settings,
            open_sender=self._open_sender,
            label=self.model,
            report=self.last_report,
        )
        return knowledge

    def _open_sender(self, n_prompts: int) -> AbstractAsyncContextManager[Sender]:
        """A connection pool for sending; the key is read now, before anything is sent."""
        api_key = self._api_key(n_prompts)
        return _open_chat_sender(self, api_key)

    def _api_key(self, n_prompts: int) -> str | None:
        if self.api_key_env is None:
            return None  # a local server that needs no key
        api_key = os.environ.get(self.api_key_env, "").strip()
        if not api_key:
            raise ConfigError(
                f"{n_prompts} prompts need the LLM but environment variable {self.api_key_env} "
                f"is not set; export it, point llm.api_key_env at the variable holding your key "
                f"(null for a server that needs none), or use llm=klg to import knowledge files"
            )
        return api_key


@asynccontextmanager
async def _open_chat_sender(provider: OpenAIChat, api_key: str | None) -> AsyncIterator[Sender]:
    headers = {} if api_key is None else {"Authorization": f"Bearer {api_key}"}
    session = aiohttp.ClientSession(
        headers=headers,
        connector=aiohttp.TCPConnector(limit=provider.settings.concurrency),
        # Bounds the whole exchange: a server that trickles bytes cannot hold a request forever.
        timeout=aiohttp.ClientTimeout(total=provider.timeout_s),
        # Not trust_env: it looks up netrc and proxies in a thread on every request (a large
        # share of the CPU per request); the proxy is resolved once instead (_env_proxy).
        trust_env=False,
    )
    async with session:
        yield _ChatSender(provider, session, api_key)


class _ChatSender:
    """Sends one prompt per request; retries what is transient (see the module docstring)."""

    def __init__(
        self, provider: OpenAIChat, session: aiohttp.ClientSession, api_key: str | None
    ) -> None:
        self.p = provider
        self.session = session
        self._api_key = api_key
        self._url = f"{provider.base_url}/chat/completions"
        self._proxy = _env_proxy(self._url)
        self._resume_at = 0.0  # monotonic time before which no request starts (Retry-After)
        # initial, 2x, 4x ... up to the cap, plus up to `initial` of jitter so that requests
        # failing together do not come back together.
        self._backoff = wait_exponential(
            multiplier=provider.backoff_initial_s, max=provider.backoff_max_s
        ) + wait_random(0, provider.backoff_initial_s)

    def _scrub(self, text: str) -> str:
        """`text` without the API key, should a server or library have echoed it."""
        return text.replace(self._api_key, "<redacted>") if self._api_key else text

    def _wait(self, state: RetryCallState) -> float:
        """The server's Retry-After when it sent one, else exponential backoff with jitter."""
        err = state.outcome.exception() if state.outcome is not None else None
        if isinstance(err, _TransientError) and err.retry_after_s is not None:
            return min(err.retry_after_s, _MAX_RETRY_AFTER_S)
        return self._backoff(state)

    async def send(self, prompts: list[str], run: RunControl) -> list[Outcome]:
        outcomes = []
        for prompt in prompts:  # one per request: the stage runs `concurrency` of these at once
            outcome = await self._ask(prompt, run)
            if outcome is not None:
                outcomes.append(outcome)
        return outcomes

    async def _ask(self, prompt: str, run: RunControl) -> Outcome | None:
        """The prompt's answer or failure; None when given up because the run is stopping."""
        attempts = 0

        def should_retry(err: BaseException) -> bool:
            return isinstance(err, _TransientError) and not run.stopping

        def before_sleep(state: RetryCallState) -> None:
            err = state.outcome.exception() if state.outcome is not None else None
            reason = str(err).split(" (")[0] if err is not None else "unknown"
            run.note_retry(reason)
            log.debug("%s: retrying %r... after %s", self.p.key, prompt[:40], err)

        retrying = AsyncRetrying(
            retry=retry_if_exception(should_retry),
            wait=self._wait,
            stop=stop_after_attempt(self.p.max_retries + 1),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    if attempts > 1 and run.stopping:
                        return None
                    await self._respect_retry_after()
                    run.note_request()
                    return await self._post(prompt, attempts)
        except _TransientError as err:
            if run.stopping:
                return None  # left for the next run, like every prompt not sent yet
            failure = FailureRecord(prompt, "transient", str(err), attempts, err.status)
            raise StopGeneration(
                LLMServerError(
                    f"the LLM server at {self.p.base_url} kept failing after {attempts} "
                    f"attempts ({err}). Answers received so far are in the knowledge store and "
                    f"a rerun resumes from there. Check llm.base_url, that the server is up and "
                    f"reachable, and your rate limits (llm.max_retries, llm.timeout_s, "
                    f"llm.concurrency)"
                ),
                failure,
            ) from None
        except _RejectedError as err:
            return FailureRecord(prompt, "rejected", str(err), attempts, err.status)
        except _FatalError as err:
            failure = FailureRecord(prompt, "fatal", str(err), attempts, err.status)
            raise StopGeneration(LLMServerError(str(err)), failure) from None
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def _respect_retry_after(self) -> None:
        delay = self._resume_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _post(self, prompt: str, attempts: int) -> Completion:
        p = self.p
        payload = {
            "model": p.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": p.temperature,
            "max_tokens": p.max_tokens,
        }
        started = time.perf_counter()
        try:
            async with self.session.post(self._url, json=payload, proxy=self._proxy) as response:
                reply = _Reply(response.status, response.headers, await response.read())
        except asyncio.TimeoutError:  # aiohttp's timeouts derive from it
            raise _TransientError(
                f"timeout (no response within llm.timeout_s={p.timeout_s} s)"
            ) from None
        except aiohttp.ClientError as err:  # refused, reset, closed early, body cut short
            raise _TransientError(f"connection failed ({type(err).__name__})") from None
        latency_s = time.perf_counter() - started
        status = reply.status
        if status in _TRANSIENT_STATUS or status >= 500:
            retry_after = _retry_after_s(reply.headers)
            if retry_after is not None:  # the server's word holds for every request
                resume_at = time.monotonic() + min(retry_after, _MAX_RETRY_AFTER_S)
                self._resume_at = max(self._resume_at, resume_at)
            raise _TransientError(f"HTTP {status}", status=status, retry_after_s=retry_after)
        if status in _FATAL_STATUS:
            raise self._fatal(reply)
        if status >= 400:
            message = self._scrub(reply.server_message())
            raise _RejectedError(f"HTTP {status}: {message}", status)
        return self._parse(prompt, reply, latency_s, attempts)

    def _fatal(self, reply: _Reply) -> _FatalError:
        p, status = self.p, reply.status
        if status in (401, 403):
            # The body is not shown: servers echo (part of) the rejected key in it.
            return _FatalError(
                f"the LLM server at {p.base_url} rejected the API key from environment "
                f"variable {p.api_key_env} (HTTP {status}); export a valid key there or point "
                f"llm.api_key_env at the variable holding it",
                status,
            )
        return _FatalError(
            f"the LLM server at {p.base_url} answered HTTP {status} for model {p.model!r} "
            f"({self._scrub(reply.server_message())}); check llm.model and llm.base_url "
            f"(it must end where /chat/completions begins, e.g. .../v1)",
            status,
        )

    def _parse(self, prompt: str, reply: _Reply, latency_s: float, attempts: int) -> Completion:
        try:
            body = reply.json()
            choice = body["choices"][0]
            answer = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            # A proxy or an overloaded server cut the body short: worth another try.
            raise _TransientError(
                f"malformed response (HTTP {reply.status}, not a chat completion: "
                f"{self._scrub(reply.text[:80])!r})",
                status=reply.status,
            ) from None
        finish_reason = choice.get("finish_reason")
        if not isinstance(answer, str) or not answer.strip():
            raise _RejectedError(f"empty answer (finish_reason={finish_reason})")
        usage: dict[str, Any] = body.get("usage") or {}
        return Completion(
            prompt=prompt,
            answer=answer,
            prompt_tokens=_int_or_none(usage.get("prompt_tokens")),
            completion_tokens=_int_or_none(usage.get("completion_tokens")),
            latency_s=latency_s,
            attempts=attempts,
            meta={"model": body.get("model", self.p.model), "finish_reason": finish_reason},
        )


def _env_proxy(url: str) -> str | None:
    """The proxy HTTP(S)_PROXY / ALL_PROXY set for `url`, unless NO_PROXY exempts its host."""
    parts = urlsplit(url)
    if parts.hostname is None or urllib.request.proxy_bypass(parts.hostname):
        return None
    proxies = urllib.request.getproxies()
    return proxies.get(parts.scheme) or proxies.get("all")


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
