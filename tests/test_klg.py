"""Import of released .klg knowledge: real ML-100K files, malformed files, store import."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pandas as pd
import pytest

from kar.knowledge.llm.base import Knowledge, LLMProvider
from kar.knowledge.llm.klg import KlgImport
from kar.knowledge.prompts import PromptRequest
from kar.knowledge.store import KnowledgeStore
from kar.registry import LLMS, ConfigError, schema_for


@pytest.fixture(scope="module")
def knowledge_dir(data_dir: Path) -> Path:
    return data_dir / "ml-100k" / "knowledge"


@pytest.fixture(scope="module")
def provider(knowledge_dir: Path) -> KlgImport:
    return KlgImport(
        user_file=str(knowledge_dir / "user.klg"),
        item_file=str(knowledge_dir / "item.klg"),
        begin_index=str(knowledge_dir / "begin_index.json"),
    )


def requests_from_files(knowledge_dir: Path) -> list[PromptRequest]:
    """One request per file entry, carrying the file's own prompt."""
    return [
        PromptRequest(kind=kind, raw_id=raw_id, prompt=entry["prompt"])
        for kind in ("user", "item")
        for raw_id, entry in json.loads((knowledge_dir / f"{kind}.klg").read_text()).items()
    ]


def test_registered_with_config_schema() -> None:
    assert LLMS.get("klg") is KlgImport
    fields = schema_for(KlgImport).__dataclass_fields__
    assert set(fields) == {"user_file", "item_file", "begin_index"}


def test_real_files_answer_every_user_and_item(
    provider: KlgImport, knowledge_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert isinstance(provider, LLMProvider)
    assert re.fullmatch(r"klg:[0-9a-f]{12}", provider.key)
    requests = requests_from_files(knowledge_dir)
    user_klg = json.loads((knowledge_dir / "user.klg").read_text())
    with KnowledgeStore(tmp_path / "store.duckdb") as store:
        with caplog.at_level(logging.INFO, logger="kar.knowledge"):
            knowledge = provider.generate(requests, store)
        assert sum(kind == "user" for kind, _ in knowledge) == 943
        assert sum(kind == "item" for kind, _ in knowledge) == 1682
        assert knowledge[("user", "1")] == Knowledge(
            prompt=user_klg["1"]["prompt"], answer=user_klg["1"]["ans"]
        )
        # Same-titled items (e.g. two "The Ice Storm (1997)") share a prompt: one row each.
        distinct_prompts = len({r.prompt for r in requests})
        assert 943 + 1682 - 20 < distinct_prompts < 943 + 1682
        assert store.stats()["answers"] == distinct_prompts
        stored = store.get_answers(provider.key, [user_klg["1"]["prompt"]])
        assert stored == {user_klg["1"]["prompt"]: user_klg["1"]["ans"]}
        assert "943 of 943 user requests found" in caplog.text
        assert f"{distinct_prompts} answers newly imported" in caplog.text
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="kar.knowledge"):
            assert provider.generate(requests, store) == knowledge
        assert "0 answers newly imported" in caplog.text
        assert store.stats()["answers"] == distinct_prompts


def test_file_prompt_wins_and_differences_are_logged(
    provider: KlgImport, knowledge_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    item_klg = json.loads((knowledge_dir / "item.klg").read_text())
    requests = [
        PromptRequest(kind="item", raw_id="1", prompt="Introduce movie Toy Story, The (1995)."),
        PromptRequest(kind="item", raw_id="2", prompt=item_klg["2"]["prompt"]),
        PromptRequest(kind="item", raw_id="99999", prompt="Introduce movie Nothing (2099)."),
        PromptRequest(kind="user", raw_id="99999", prompt="Given a user ..."),
    ]
    with (
        KnowledgeStore(tmp_path / "store.duckdb") as store,
        caplog.at_level(logging.INFO, logger="kar.knowledge"),
    ):
        knowledge = provider.generate(requests, store)
    assert set(knowledge) == {("item", "1"), ("item", "2")}
    assert knowledge[("item", "1")].prompt == item_klg["1"]["prompt"]
    assert "2 of 3 item requests found in the .klg file, 1 missing" in caplog.text
    assert "0 of 1 user requests found in the .klg file, 1 missing" in caplog.text
    assert "1 rendered prompts differ from the file's prompts" in caplog.text


def test_prefix_lengths_follow_the_protocol(provider: KlgImport, data_dir: Path) -> None:
    ratings = pd.read_csv(data_dir / "ml-100k" / "u.data", sep="\t", header=None, dtype=str)
    n_ratings = ratings[0].value_counts()
    prefix = provider.prefix_lengths()
    assert prefix is not None and len(prefix) == 943
    assert all(k == min((n_ratings[user] + 1) // 2, 30) for user, k in prefix.items())


def test_key_changes_with_file_contents(knowledge_dir: Path, tmp_path: Path) -> None:
    items = tmp_path / "item.klg"
    items.write_text(json.dumps({"1": {"prompt": "Introduce movie A (1990).", "ans": "A film."}}))
    first = KlgImport(user_file=str(knowledge_dir / "user.klg"), item_file=str(items))
    items.write_text(json.dumps({"1": {"prompt": "Introduce movie A (1990).", "ans": "Changed."}}))
    second = KlgImport(user_file=str(knowledge_dir / "user.klg"), item_file=str(items))
    assert first.key != second.key
    assert first.prefix_lengths() is None


def write_pair(tmp_path: Path, item_text: str) -> dict[str, str]:
    users = tmp_path / "user.klg"
    users.write_text(json.dumps({"1": {"prompt": "Given a male user ...", "ans": "Likes noir."}}))
    items = tmp_path / "item.klg"
    items.write_text(item_text)
    return {"user_file": str(users), "item_file": str(items)}


@pytest.mark.parametrize(
    ("item_text", "message"),
    [
        ('{"1": {"prompt": "Introduce', "not valid UTF-8 JSON"),
        ('[{"prompt": "p", "ans": "a"}]', "holds a JSON list, expected an object"),
        ('{"1": {"prompt": "p", "ans": "a"}, "7": {"prompt": "p"}}', "entry '7'"),
        ('{"7": {"prompt": 3, "ans": "a"}}', "entry '7'"),
        ('{"7": "just an answer"}', "entry '7'"),
    ],
)
def test_malformed_klg_names_file_and_entry(tmp_path: Path, item_text: str, message: str) -> None:
    paths = write_pair(tmp_path, item_text)
    with pytest.raises(ValueError, match=message) as err:
        KlgImport(**paths)
    assert paths["item_file"] in str(err.value)


def test_missing_files_name_the_config_key(tmp_path: Path) -> None:
    paths = write_pair(tmp_path, '{"1": {"prompt": "p", "ans": "a"}}')
    with pytest.raises(FileNotFoundError, match=r"llm\.user_file"):
        KlgImport(user_file=str(tmp_path / "nope.klg"), item_file=paths["item_file"])
    with pytest.raises(FileNotFoundError, match=r"llm\.item_file"):
        KlgImport(user_file=paths["user_file"], item_file=str(tmp_path / "nope.klg"))
    with pytest.raises(FileNotFoundError, match=r"llm\.begin_index"):
        KlgImport(**paths, begin_index=str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError, match=r"llm\.user_file"):
        KlgImport(item_file=paths["item_file"])


@pytest.mark.parametrize("value", ['"12"', "2.5", "-1", "true"])
def test_begin_index_values_must_be_counts(tmp_path: Path, value: str) -> None:
    paths = write_pair(tmp_path, '{"1": {"prompt": "p", "ans": "a"}}')
    begin_index = tmp_path / "begin_index.json"
    begin_index.write_text(f'{{"1": 10, "2": {value}}}')
    with pytest.raises(ValueError, match="entry '2'"):
        KlgImport(**paths, begin_index=str(begin_index))
