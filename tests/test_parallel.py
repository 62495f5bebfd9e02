"""Parallel jobs on one knowledge store: read-only opens, a joblib multirun, a failing job.

DuckDB lets many processes read a file but only one write it, and a writer shuts readers out,
so jobs whose knowledge is all stored must open the store read-only to run side by side.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kar.knowledge.store import KnowledgeStore
from kar.pipeline import tracked_run_settings, with_store
from test_e2e import encode_counts, run_kar, tiny_encoder  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
N_USERS, N_ITEMS = 943, 1682

# A process that opens the store through the pipeline's `with_store` and, while holding it,
# waits until the other process holds it too: only read-only opens can overlap like this.
READER = """
import sys, time
from pathlib import Path
from kar.pipeline import with_store

store_path, me, other = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])

def read_while_the_other_reads(store):
    me.touch()
    deadline = time.monotonic() + 30
    while not other.exists():
        if time.monotonic() > deadline:
            sys.exit("the other process never opened the store while this one held it")
        time.sleep(0.05)
    return len(store.get_vectors("enc", ["a", "b"])), store.read_only

print(*with_store(store_path, read_while_the_other_reads))
"""


def test_two_processes_read_a_complete_store_at_the_same_time(tmp_path: Path) -> None:
    path = tmp_path / "knowledge.duckdb"
    with KnowledgeStore(path) as store:
        store.put_vectors("enc", ["a", "b"], np.ones((2, 4), dtype=np.float32))
    marks = [tmp_path / "first.open", tmp_path / "second.open"]
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", READER, str(path), str(me), str(other)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for me, other in (marks, marks[::-1])
    ]
    for reader in readers:
        out, err = reader.communicate(timeout=90)
        assert reader.returncode == 0, err
        assert out.split() == ["2", "True"], err  # both vectors, through a read-only store


def test_a_store_lacking_entries_is_reopened_for_writing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "knowledge.duckdb"
    with KnowledgeStore(path) as store:
        store.put_answers("llm", [("p1", "a1")])

    def add_missing(store: KnowledgeStore) -> tuple[bool, int]:
        have = store.get_answers("llm", ["p1", "p2"])
        added = store.put_answers("llm", [("p2", "a2")]) if "p2" not in have else 0
        return store.read_only, added

    with caplog.at_level(logging.INFO, logger="kar"):
        assert with_store(path, add_missing) == (False, 1)
    assert "reopening it to add them" in caplog.text
    assert with_store(path, add_missing) == (True, 0)  # now complete: read-only suffices
    with KnowledgeStore(path, read_only=True) as store:
        assert store.get_answers("llm", ["p1", "p2"]) == {"p1": "a1", "p2": "a2"}


def test_tracked_runs_are_grouped_by_sweep_and_tagged(compose_cfg) -> None:
    cfg = compose_cfg("backbone=deepfm", "adaptor=base", "logger.tags=[mine]")
    settings = tracked_run_settings(cfg, sweep_name="12-00-00")
    assert settings.group == "12-00-00"
    assert settings.tags == [
        "deepfm", "hea", "ml-100k", "klg", "transformers", "knowledge=both", "mine",
    ]  # fmt: skip
    assert tracked_run_settings(cfg, sweep_name=None).group is None
    chosen = compose_cfg("logger.group=ablation")
    assert tracked_run_settings(chosen, sweep_name="12-00-00").group == "ablation"


def multirun(data_dir: Path, sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    """`python -m kar -m` with two joblib worker processes; fails the test unless rc == 0."""
    command = [
        sys.executable, "-m", "kar", "-m",
        "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep_dir}",
        "train.max_epochs=1", "train.batch_size=2048", "logger=none", *overrides,
    ]  # fmt: skip
    env = {**os.environ, "KAR_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    return result


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The sweep's job folders, in job order."""
    return sorted(
        (p for p in sweep_dir.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("_")[0])
    )


@pytest.mark.slow
def test_joblib_multirun_jobs_share_the_store_without_encoding(
    data_dir: Path,
    tiny_encoder: Path,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> None:
    cache = tmp_path / "cache"
    # A first run fills the store, so the parallel jobs only read it.
    run_kar(data_dir, tiny_encoder, cache, tmp_path / "fill", "stage=encode")
    sweep_dir = tmp_path / "sweep"
    start = time.monotonic()
    multirun(
        data_dir, sweep_dir,
        f"encoder.path={tiny_encoder}", "encoder.max_length=128", "encoder.stride=32",
        f"paths.cache_dir={cache}", "adaptor=base", "seed=1,2",
    )  # fmt: skip
    elapsed = time.monotonic() - start
    jobs = job_dirs(sweep_dir)
    assert len(jobs) == 2
    for job in jobs:
        log = (job / "kar.log").read_text()
        assert encode_counts(log) == {"user": (N_USERS, 0), "item": (N_ITEMS, 0)}, log
        assert "0 answers newly imported" in log
        assert "reopening" not in log  # read-only opens sufficed
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["epochs_run"] == 1
    assert {json.loads((job / "metrics.json").read_text())["seed"] for job in jobs} == {1, 2}
    print(f"2-job joblib multirun: {elapsed:.1f} s")


@pytest.mark.slow
def test_a_failing_multirun_job_is_marked_and_the_others_complete(
    data_dir: Path, tmp_path: Path
) -> None:
    knowledge = data_dir / "ml-100k" / "knowledge"
    missing = tmp_path / "absent.klg"
    sweep_dir = tmp_path / "sweep"
    result = multirun(
        data_dir, sweep_dir,
        f"llm.user_file={missing},{knowledge / 'user.klg'}", "adaptor=none",
        f"paths.cache_dir={tmp_path / 'cache'}",
    )  # fmt: skip
    output = result.stdout + result.stderr
    failed, completed = job_dirs(sweep_dir)
    record = json.loads((failed / "failed.json").read_text())
    assert record["error"] == "FileNotFoundError"
    assert str(missing) in record["message"] and "llm.user_file" in record["message"]
    assert not (failed / "metrics.json").exists()
    assert not (completed / "failed.json").exists()
    assert json.loads((completed / "metrics.json").read_text())["epochs_run"] == 1
    assert f"kar: error: {record['message']}" in output
