"""Import of released knowledge files (the paper's .klg format) as if an LLM had answered.

A .klg file is JSON ``{raw_id: {"prompt": str, "ans": str}}``. The file's prompt is what the LLM
saw, so it is the prompt returned with each answer even where our rendering differs; the
differences are counted and logged so a template drift does not pass unnoticed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kar.errors import DataError
from kar.knowledge.llm.base import Knowledge, LLMProvider
from kar.knowledge.prompts import PromptRequest
from kar.knowledge.store import KnowledgeStore
from kar.registry import LLMS, ConfigError

log = logging.getLogger("kar.knowledge")

_FORMAT = '{raw_id: {"prompt": str, "ans": str}}'


def _read_json(path: Path, config_key: str, what: str) -> tuple[Any, bytes]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} {path} does not exist; set {config_key} to the path of an existing file "
            "(KAR_DATA_DIR sets the data folder), or generate knowledge with an LLM provider "
            "instead of importing it (e.g. llm=gpt35)"
        )
    content = path.read_bytes()
    try:
        return json.loads(content.decode("utf-8")), content
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(
            f"{what} {path} is not valid UTF-8 JSON ({err}); fix the file or {config_key}"
        ) from None


def read_klg(path: Path, config_key: str) -> tuple[dict[str, Knowledge], bytes]:
    """Entries of a .klg file by raw id, and the file's bytes (for the import's identity)."""
    data, content = _read_json(path, config_key, "knowledge file")
    if not isinstance(data, dict):
        raise DataError(
            f"knowledge file {path} holds a JSON {type(data).__name__}, expected an object "
            f"{_FORMAT}; fix the file or {config_key}"
        )
    entries = {}
    for raw_id, entry in data.items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("prompt"), str)
            and isinstance(entry.get("ans"), str)
        ):
            raise DataError(
                f"knowledge file {path}: entry {raw_id!r} is not {{'prompt': str, 'ans': str}} "
                f"(got {json.dumps(entry)[:120]}); every entry must follow {_FORMAT}"
            )
        entries[raw_id] = Knowledge(prompt=entry["prompt"], answer=entry["ans"])
    return entries, content


def read_begin_index(path: Path) -> dict[str, int]:
    """{raw_user_id: k}: the user's first k ratings (time order) formed the prompt's history."""
    data, _ = _read_json(path, "llm.begin_index", "begin index file")
    if not isinstance(data, dict):
        raise DataError(
            f"begin index file {path} holds a JSON {type(data).__name__}, expected an object "
            "{raw_user_id: number of prefix ratings}"
        )
    for raw_id, k in data.items():
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise DataError(
                f"begin index file {path}: entry {raw_id!r} is {k!r}, expected a non-negative "
                "integer (how many first ratings of that user the prompt showed)"
            )
    return dict(data)


@LLMS.register("klg")
class KlgImport(LLMProvider):
    """Answers read from a user .klg and an item .klg file instead of generated."""

    def __init__(
        self,
        *,
        user_file: str | None = None,
        item_file: str | None = None,
        begin_index: str | None = None,
    ) -> None:
        if user_file is None or item_file is None:
            raise ConfigError(
                "llm=klg needs llm.user_file and llm.item_file (paths of the .klg files); "
                f"got user_file={user_file!r}, item_file={item_file!r}"
            )
        user_entries, user_bytes = read_klg(Path(user_file), "llm.user_file")
        item_entries, item_bytes = read_klg(Path(item_file), "llm.item_file")
        self._entries = {"user": user_entries, "item": item_entries}
        digest = hashlib.sha256(user_bytes + b"\0" + item_bytes).hexdigest()
        self.key = f"klg:{digest[:12]}"
        self._prefix_lengths = None if begin_index is None else read_begin_index(Path(begin_index))

    def prefix_lengths(self) -> dict[str, int] | None:
        return None if self._prefix_lengths is None else dict(self._prefix_lengths)

    def generate(
        self, requests: Sequence[PromptRequest], store: KnowledgeStore
    ) -> dict[tuple[str, str], Knowledge]:
        found: dict[tuple[str, str], Knowledge] = {}
        differing: list[PromptRequest] = []
        requested = {"user": 0, "item": 0}
        for request in requests:
            if request.kind not in self._entries:
                raise ValueError(f"prompt request kind must be 'user' or 'item', got {request!r}")
            requested[request.kind] += 1
            knowledge = self._entries[request.kind].get(request.raw_id)
            if knowledge is None:
                continue
            found[(request.kind, request.raw_id)] = knowledge
            if knowledge.prompt != request.prompt:
                differing.append(request)
        added = store.put_answers(self.key, [(k.prompt, k.answer) for k in found.values()])
        for kind, n_requested in requested.items():
            n_found = sum(1 for found_kind, _ in found if found_kind == kind)
            log.info(
                "%s: %d of %d %s requests found in the .klg file, %d missing",
                self.key,
                n_found,
                n_requested,
                kind,
                n_requested - n_found,
            )
        log.info("%s: %d answers newly imported into %s", self.key, added, store.path)
        if repeated := len(found) - len({k.prompt for k in found.values()}):
            # Identical catalogue titles give identical prompts; the store holds one answer per
            # prompt, while the returned knowledge keeps each raw id's own answer.
            log.info(
                "%s: %d found entries repeat another entry's prompt; the store keeps the first "
                "answer of each prompt",
                self.key,
                repeated,
            )
        if differing:
            first = differing[0]
            log.warning(
                "%s: %d rendered prompts differ from the file's prompts (the file's are kept, "
                "as the LLM saw them); first: %s %s",
                self.key,
                len(differing),
                first.kind,
                first.raw_id,
            )
        else:
            log.info("%s: all rendered prompts equal the file's prompts", self.key)
        return found
