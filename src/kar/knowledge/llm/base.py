"""What every LLM provider offers: answers to prompt requests, recorded in the knowledge store."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from kar.knowledge.prompts import PromptRequest
from kar.knowledge.store import KnowledgeStore

if TYPE_CHECKING:
    from kar.knowledge.llm.generation import GenerationReport


@dataclass(frozen=True)
class Knowledge:
    """An LLM's answer together with the prompt it actually answered."""

    prompt: str
    answer: str


@runtime_checkable
class LLMProvider(Protocol):
    """A source of knowledge: an API model, a local model, or an import of released answers.

    `key` identifies provider, model and generation parameters (never secrets); the store keys
    answers by it, so changing any of them means new answers and an unchanged key means none
    are generated twice. A provider that generates sets `last_report` in `generate`: what was
    cached, sent, failed and spent, and whether the stage stopped early (dry run, budget).
    """

    key: str
    last_report: GenerationReport | None = None

    def generate(
        self, requests: Sequence[PromptRequest], store: KnowledgeStore
    ) -> dict[tuple[str, str], Knowledge]:
        """Answers keyed by (kind, raw_id); requests that cannot be answered are absent."""
        ...

    def prefix_lengths(self) -> dict[str, int] | None:
        """Per raw user id, how many first ratings the provider's user prompts showed.

        A provider whose answers were made from a fixed history prefix (an import) returns it so
        that the data protocol keeps exactly those ratings out of the samples; None = use the
        protocol's own rule.
        """
        return None
