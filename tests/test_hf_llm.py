"""The local transformers provider (`llm=hf`) on a tiny randomly initialised Llama built here.

The tokenizer is the packaged all-MiniLM-L6-v2 one (no download) with a chat template added;
the model has one layer of width 16, so generation takes milliseconds on a CPU.
"""

from __future__ import annotations

import logging
from pathlib import Path

import duckdb
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from kar.knowledge.encoder import packaged_model_path
from kar.knowledge.llm.base import LLMProvider
from kar.knowledge.llm.hf_local import HFCausalLM
from kar.knowledge.prompts import PromptRequest
from kar.knowledge.store import KnowledgeStore
from kar.registry import LLMS, ConfigError, schema_for

TEMPLATE = (
    "{% for m in messages %}[CLS] {{ m['role'] }}: {{ m['content'] }} [SEP]{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
REQUESTS = [
    PromptRequest("item" if i % 3 else "user", str(i), "Introduce movie " + "very " * i + "good")
    for i in range(7)
]


def build_model(folder: Path, *, chat_template: bool = True, context: int = 128) -> str:
    tokenizer = AutoTokenizer.from_pretrained(packaged_model_path())
    if chat_template:
        tokenizer.chat_template = TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=context,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=None,  # random weights: every answer runs to max_new_tokens
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_model(tmp_path_factory.mktemp("tiny-llama"))


def test_registered_and_keyed_by_what_it_computes(model_dir: str, tmp_path: Path) -> None:
    assert LLMS.get("hf") is HFCausalLM
    assert {"model", "batch_size", "max_new_tokens", "do_sample", "dry_run"} <= set(
        schema_for(HFCausalLM).__dataclass_fields__
    )
    llm = HFCausalLM(model=model_dir, max_new_tokens=6)
    assert isinstance(llm, LLMProvider)
    assert llm.key.startswith("hf:tiny-llama") and llm.key.endswith(":greedy:max_new=6")
    assert HFCausalLM(model=model_dir, max_new_tokens=6, batch_size=2).key == llm.key
    assert HFCausalLM(model=model_dir, max_new_tokens=7).key != llm.key
    sampled = HFCausalLM(model=model_dir, max_new_tokens=6, do_sample=True, temperature=0.7)
    assert "sample(t=0.7" in sampled.key
    # Other weights in a folder of the same name are another model.
    other = build_model(tmp_path / "tiny-llama", context=64)
    assert HFCausalLM(model=other, max_new_tokens=6).key != llm.key
    # A hub id is only a name until prompts need the model: nothing is loaded here.
    assert HFCausalLM(model="Qwen/Qwen2.5-0.5B-Instruct").key.startswith("hf:Qwen/Qwen2.5")


def test_batched_greedy_answers_are_stored_per_batch_and_never_generated_twice(
    model_dir: str, tmp_path: Path
) -> None:
    store_path = tmp_path / "knowledge.duckdb"
    llm = HFCausalLM(model=model_dir, max_new_tokens=6, batch_size=3)
    with KnowledgeStore(store_path) as store:
        found = llm.generate(REQUESTS, store)
    report = llm.last_report
    assert set(found) == {(r.kind, r.raw_id) for r in REQUESTS}
    for request in REQUESTS:
        knowledge = found[(request.kind, request.raw_id)]
        assert knowledge.prompt == request.prompt and knowledge.answer.strip()
    assert (report.answered, report.requests, report.cost_usd) == (7, 3, 0.0)  # ceil(7 / 3)
    with duckdb.connect(str(store_path), read_only=True) as con:
        rows = con.execute(
            "SELECT prompt_tokens, completion_tokens, json_extract(meta, '$.batch_size') "
            "FROM answers"
        ).fetchall()
    assert len(rows) == 7
    assert all(prompt_tokens > 5 and completion == 6 for prompt_tokens, completion, _ in rows)

    # Left padding keeps batched greedy decoding equal to one prompt at a time.
    with KnowledgeStore(tmp_path / "one-by-one.duckdb") as store:
        single = HFCausalLM(model=model_dir, max_new_tokens=6, batch_size=1).generate(
            REQUESTS, store
        )
    assert single == found

    again = HFCausalLM(model=model_dir, max_new_tokens=6, batch_size=3)
    with KnowledgeStore(store_path) as store:
        assert again.generate(REQUESTS, store) == found
    assert (again.last_report.cached, again.last_report.requests) == (7, 0)


def test_a_tokenizer_without_chat_template_gets_plain_prompts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = build_model(tmp_path / "plain", chat_template=False)
    llm = HFCausalLM(model=folder, max_new_tokens=4, batch_size=4)
    with caplog.at_level(logging.WARNING), KnowledgeStore(tmp_path / "k.duckdb") as store:
        found = llm.generate(REQUESTS[:3], store)
    assert len(found) == 3 and "no chat template" in caplog.text


def test_a_prompt_beyond_the_context_is_recorded_as_rejected(tmp_path: Path) -> None:
    folder = build_model(tmp_path / "short", context=40)
    long_prompt = PromptRequest("item", "long", "Introduce movie " + "very " * 60 + "long")
    store_path = tmp_path / "k.duckdb"
    llm = HFCausalLM(model=folder, max_new_tokens=4, batch_size=4)
    with KnowledgeStore(store_path) as store:
        found = llm.generate([*REQUESTS[:2], long_prompt], store)
        failures = store.get_failures(llm.key, [long_prompt.prompt])
    assert set(found) == {(r.kind, r.raw_id) for r in REQUESTS[:2]}
    assert failures[long_prompt.prompt].error_class == "rejected"
    assert "context too long" in failures[long_prompt.prompt].message


def test_a_model_that_cannot_be_loaded_names_the_setting(tmp_path: Path) -> None:
    llm = HFCausalLM(model="kar-tests/no-such-model-anywhere")  # HF_HUB_OFFLINE=1 in conftest
    with KnowledgeStore(tmp_path / "k.duckdb") as store, pytest.raises(ConfigError) as err:
        llm.generate(REQUESTS, store)
    assert "llm.model='kar-tests/no-such-model-anywhere'" in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": ""}, "llm.model"),
        ({"max_new_tokens": 0}, "llm.max_new_tokens"),
        ({"dtype": "float8"}, "llm.dtype"),
        ({"batch_size": 0}, "llm.batch_size"),
        ({"do_sample": True, "temperature": 0.0}, "llm.temperature"),
    ],
)
def test_bad_settings_raise_config_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        HFCausalLM(**kwargs)
