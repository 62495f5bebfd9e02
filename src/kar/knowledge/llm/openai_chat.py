"""An OpenAI-compatible chat-completions provider (OpenAI itself, vLLM, llama.cpp, Ollama...).

Every answer is committed to the knowledge store the moment it arrives, so an interrupted run
resumes where it stopped and a finished one never pays for a prompt twice. Transient failures
(rate limits, server errors, timeouts, lost connections) are retried with exponential backoff,
honouring the server's Retry-After; a prompt the server rejects is logged and left out. The API
key is read from the environment at the last moment, only when a prompt needs the server, and
never appears in the provider's key, in messages or in logs.
"""

from __future__ import annotations

import email.utils
import logging
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import requests
from tenacity import (
    RetryCallState,
    Retrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)
from tqdm.auto import tqdm

from kar.errors import KarError
from kar.knowledge.llm.base import Knowledge, LLMProvider
from kar.knowledge.prompts import PromptRequest
from kar.knowledge.store import KnowledgeStore
from kar.registry import LLMS, ConfigError

log = logging.getLogger(__name__)

# Worth another try: the server is busy or briefly broken, not the request wrong.
_TRANSIENT_STATUS = frozenset({408, 409, 429})
# A rejection that would repeat for every prompt (bad key, no such model or endpoint).
_FATAL_STATUS = frozenset({401, 403, 404})
_MAX_RETRY_AFTER_S = 300.0
_EXPONENTIAL_BACKOFF = wait_exponential_jitter(max=60.0)  # 1, 2, 4, ... s plus up to 1 s jitter


class LLMServerError(KarError, RuntimeError):
    """The LLM server stayed unreachable or failing after all retries, or refuses every prompt."""


class _TransientError(Exception):
    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class _RejectedError(Exception):
    """The server refused this one prompt (e.g. HTTP 400: too long, filtered)."""


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asks us to wait: Retry-After (seconds or HTTP date) or retry-after-ms."""
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(float(ms) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("Retry-After")
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


def _wait(state: RetryCallState) -> float:
    """The server's Retry-After when it sent one, else exponential backoff with jitter."""
    outcome = state.outcome
    err = outcome.exception() if outcome is not None else None
    if isinstance(err, _TransientError) and err.retry_after_s is not None:
        return min(err.retry_after_s, _MAX_RETRY_AFTER_S)
    return _EXPONENTIAL_BACKOFF(state)


def _server_message(response: requests.Response) -> str:
    """The error text a server sent, shortened (OpenAI: {"error": {"message": ...}})."""
    try:
        body = response.json()
        message = body["error"]["message"] if isinstance(body.get("error"), dict) else body
    except (ValueError, AttributeError, KeyError, TypeError):
        message = response.text
    return " ".join(str(message).split())[:300]


@LLMS.register("openai")
class OpenAIChat(LLMProvider):
    """Answers from ``POST {base_url}/chat/completions``, one user message per prompt.

    ``model`` defaults to the paper's gpt-3.5-turbo; it has a default because only keyword
    arguments with defaults are settable from YAML (see kar.registry).
    """

    def __init__(
        self,
        *,
        model: str = "gpt-3.5-turbo",
        base_url: str = "https://api.openai.com/v1",
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_tokens: int = 512,
        timeout_s: float = 60.0,
        max_retries: int = 6,
    ) -> None:
        if not model:
            raise ConfigError("llm.model is empty; name the chat model, e.g. gpt-3.5-turbo")
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"llm.base_url={base_url!r} is not an http(s) URL; use e.g. "
                "https://api.openai.com/v1 or http://localhost:8000/v1"
            )
        if not api_key_env:
            raise ConfigError("llm.api_key_env is empty; name the variable that holds the key")
        if max_tokens < 1:
            raise ConfigError(f"llm.max_tokens={max_tokens}; it must be >= 1")
        if timeout_s <= 0:
            raise ConfigError(f"llm.timeout_s={timeout_s}; it must be > 0")
        if max_retries < 0:
            raise ConfigError(f"llm.max_retries={max_retries}; it must be >= 0")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.max_retries = max_retries

    @property
    def key(self) -> str:
        """Provider, model, endpoint and generation parameters; never the API key."""
        return f"openai:{self.model}:{self.base_url}:t={self.temperature}:max={self.max_tokens}"

    def prefix_lengths(self) -> dict[str, int] | None:
        return None  # prompts are rendered by us from the dataset's own knowledge prefix

    def generate(
        self, requests: Sequence[PromptRequest], store: KnowledgeStore
    ) -> dict[tuple[str, str], Knowledge]:
        prompts = list(dict.fromkeys(r.prompt for r in requests))
        answers = store.get_answers(self.key, prompts)
        missing = [p for p in prompts if p not in answers]
        log.info(
            "%s: %d distinct prompts, %d answered in the store, %d to ask",
            self.key, len(prompts), len(answers), len(missing),
        )  # fmt: skip
        if missing:
            store.require_writable()  # before paying for answers that could not be kept
            answers.update(self._ask(missing, self._api_key(len(missing)), store))
        return {
            (r.kind, r.raw_id): Knowledge(prompt=r.prompt, answer=answers[r.prompt])
            for r in requests
            if r.prompt in answers
        }

    def _api_key(self, n_prompts: int) -> str:
        api_key = os.environ.get(self.api_key_env, "").strip()
        if not api_key:
            raise ConfigError(
                f"{n_prompts} prompts need the LLM but environment variable {self.api_key_env} "
                f"is not set; export it, point llm.api_key_env at the variable holding your key, "
                f"or use llm=klg to import knowledge files"
            )
        return api_key

    def _ask(self, prompts: list[str], api_key: str, store: KnowledgeStore) -> dict[str, str]:
        """Answers of the server for `prompts`, each stored as soon as it arrives."""
        answers: dict[str, str] = {}
        failures: Counter[str] = Counter()
        with requests.Session() as session:
            session.headers["Authorization"] = f"Bearer {api_key}"
            with tqdm(prompts, desc=f"LLM {self.model}", unit="prompt") as bar:
                for prompt in bar:
                    try:
                        answer, meta = self._complete(session, prompt)
                    except _RejectedError as err:
                        failures[str(err)] += 1
                        log.warning("%s: prompt %r... rejected: %s", self.key, prompt[:60], err)
                        bar.set_postfix(failed=sum(failures.values()))
                        continue
                    store.put_answer(self.key, prompt, answer, meta=meta)
                    answers[prompt] = answer
        n_failed = sum(failures.values())
        log.info("%s: %d prompts answered, %d rejected", self.key, len(answers), n_failed)
        if n_failed:
            reason, count = failures.most_common(1)[0]
            log.warning(
                "%s: %d prompts got no answer and are left out (most common: %s, x%d); "
                "they are asked again on the next run",
                self.key, n_failed, reason, count,
            )  # fmt: skip
        return answers

    def _complete(self, session: requests.Session, prompt: str) -> tuple[str, dict[str, Any]]:
        """One chat completion, retried while the failure is transient."""
        retrying = Retrying(
            retry=retry_if_exception_type(_TransientError),
            wait=_wait,
            stop=stop_after_attempt(self.max_retries + 1),
            before_sleep=before_sleep_log(log, logging.WARNING),
            reraise=True,
        )
        try:
            answer, meta = retrying(self._post, session, prompt)
        except _TransientError as err:
            raise LLMServerError(
                f"the LLM server at {self.base_url} kept failing after "
                f"{self.max_retries + 1} attempts ({err}). Answers received so far are in the "
                f"knowledge store and a rerun resumes from there. Check llm.base_url, that the "
                f"server is up and reachable, and your rate limits (llm.max_retries, "
                f"llm.timeout_s)"
            ) from None
        meta["attempts"] = retrying.statistics.get("attempt_number", 1)
        return answer, meta

    def _post(self, session: requests.Session, prompt: str) -> tuple[str, dict[str, Any]]:
        payload = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        started = time.perf_counter()
        try:
            response = session.post(
                f"{self.base_url}/chat/completions", json=payload, timeout=self.timeout_s
            )
        except requests.Timeout:
            raise _TransientError(f"no response within llm.timeout_s={self.timeout_s} s") from None
        except requests.ConnectionError as err:
            raise _TransientError(f"cannot connect: {type(err).__name__}") from None
        latency_s = time.perf_counter() - started
        status = response.status_code
        if status in _TRANSIENT_STATUS or status >= 500:
            raise _TransientError(f"HTTP {status}", _retry_after_s(response.headers))
        if status in _FATAL_STATUS:
            raise self._fatal(response)
        if status >= 400:
            raise _RejectedError(f"HTTP {status}: {_server_message(response)}")
        return self._parse(response, latency_s)

    def _fatal(self, response: requests.Response) -> LLMServerError:
        status = response.status_code
        if status in (401, 403):
            # The body is not shown: servers echo (part of) the rejected key in it.
            return LLMServerError(
                f"the LLM server at {self.base_url} rejected the API key from environment "
                f"variable {self.api_key_env} (HTTP {status}); export a valid key there or "
                f"point llm.api_key_env at the variable holding it"
            )
        return LLMServerError(
            f"the LLM server at {self.base_url} answered HTTP {status} for model "
            f"{self.model!r} ({_server_message(response)}); check llm.model and llm.base_url "
            f"(it must end where /chat/completions begins, e.g. .../v1)"
        )

    def _parse(self, response: requests.Response, latency_s: float) -> tuple[str, dict[str, Any]]:
        try:
            body = response.json()
            choice = body["choices"][0]
            answer = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _RejectedError(
                f"HTTP {response.status_code} but not a chat completion: {response.text[:200]!r}"
            ) from None
        finish_reason = choice.get("finish_reason")
        if not isinstance(answer, str) or not answer.strip():
            raise _RejectedError(f"empty answer (finish_reason={finish_reason})")
        usage = body.get("usage") or {}
        meta = {
            "model": body.get("model", self.model),
            "finish_reason": finish_reason,
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "total_tokens": usage.get("total_tokens"),
            "latency_s": round(latency_s, 3),
        }
        return answer, meta
