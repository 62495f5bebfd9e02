"""Export of stored answers as .klg files, and their import back with llm=klg (a round trip)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from kar.config import register_schema, validate
from kar.errors import DataError
from kar.knowledge.export import export_klg, main
from kar.knowledge.llm.fake_server import FakeChatServer
from kar.knowledge.llm.klg import KlgImport
from kar.knowledge.llm.openai_chat import OpenAIChat
from kar.knowledge.prompts import PromptRequest
from kar.knowledge.store import KnowledgeStore
from kar.pipeline import build_requests, load_raw, prepare_data
from kar.registry import init_kwargs

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

REQUESTS = [
    PromptRequest("user", "1", "Given a male user who is aged 24 ... Analyze user's preferences"),
    PromptRequest("user", "2", "Given a female user who is aged 53 ... Analyze user's preferences"),
    PromptRequest("item", "1", "Introduce movie Toy Story (1995)."),
    PromptRequest("item", "2", "Introduce movie GoldenEye (1995)."),
    PromptRequest("item", "3", "Introduce movie Chasing Amy (1997)."),
    PromptRequest("item", "4", "Introduce movie Chasing Amy (1997)."),  # a repeated title
]


def test_generated_answers_round_trip_through_klg_files(tmp_path: Path) -> None:
    rejected = REQUESTS[3].prompt
    with FakeChatServer(faults={rejected: ["400"]}) as server:
        llm = OpenAIChat(model="m", base_url=server.base_url, api_key_env=None)
        with KnowledgeStore(tmp_path / "store.duckdb") as store:
            generated = llm.generate(REQUESTS, store)
            counts = export_klg(store, llm.key, REQUESTS, tmp_path / "out", {"1": 3, "2": 5})
            with pytest.raises(DataError, match="model, base_url, temperature"):
                export_klg(store, "openai:other-model", REQUESTS, tmp_path / "none")
    assert not (tmp_path / "none" / "user.klg").exists()
    assert counts == {"user": 2, "item": 3, "missing": 1}  # the rejected prompt has no answer
    item_file = json.loads((tmp_path / "out" / "item.klg").read_text())
    assert item_file["1"] == {"prompt": REQUESTS[2].prompt, "ans": generated[("item", "1")].answer}
    assert "2" not in item_file
    begin_index = json.loads((tmp_path / "out" / "begin_index.json").read_text())
    assert begin_index == {"1": 3, "2": 5}

    imported = KlgImport(
        user_file=str(tmp_path / "out" / "user.klg"),
        item_file=str(tmp_path / "out" / "item.klg"),
        begin_index=str(tmp_path / "out" / "begin_index.json"),
    )
    with KnowledgeStore(tmp_path / "other.duckdb") as store:
        assert imported.generate(REQUESTS, store) == generated
    assert imported.prefix_lengths() == {"1": 3, "2": 5}


def test_cli_exports_the_real_knowledge_exactly_as_released(data_dir: Path, tmp_path: Path) -> None:
    # Import the released files into a store through the pipeline, export them with the CLI,
    # and compare with the originals.
    overrides = [f"paths.data_dir={data_dir}", f"paths.cache_dir={tmp_path / 'cache'}"]
    register_schema()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = validate(compose(config_name="config", overrides=overrides))
    provider = KlgImport(**init_kwargs(cfg.llm, KlgImport))
    data = prepare_data(cfg, provider.prefix_lengths())
    requests = build_requests(cfg, load_raw(cfg), data)
    with KnowledgeStore(cfg.paths.store) as store:
        provider.generate(requests, store)

    out = tmp_path / "exported"
    counts = main(["--out", str(out), *overrides])
    assert counts == {"user": 943, "item": 1682, "missing": 0}

    released = data_dir / "ml-100k" / "knowledge"
    for name in ("user.klg", "begin_index.json"):
        assert json.loads((out / name).read_text()) == json.loads((released / name).read_text())
    original = json.loads((released / "item.klg").read_text())
    exported = json.loads((out / "item.klg").read_text())
    assert exported.keys() == original.keys()
    # One answer per prompt: items with the same title share the first one's answer.
    first_of_prompt: dict[str, str] = {}
    ids_of_prompt: defaultdict[str, list[str]] = defaultdict(list)
    for raw_id, entry in original.items():
        first_of_prompt.setdefault(entry["prompt"], entry["ans"])
        ids_of_prompt[entry["prompt"]].append(raw_id)
    for raw_id, entry in exported.items():
        assert entry["prompt"] == original[raw_id]["prompt"]
        assert entry["ans"] == first_of_prompt[entry["prompt"]]
    changed = [i for i in original if exported[i] != original[i]]
    assert all(len(ids_of_prompt[original[i]["prompt"]]) > 1 for i in changed)


def test_cli_needs_an_output_folder(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([])
    assert "--out" in capsys.readouterr().err
