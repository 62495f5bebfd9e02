"""`python -m kar` on bad input: one clear error that names the problem and the fix.

Every case runs the real entry point in a subprocess, from the repository root, with its cache
and run directory under tmp_path. "Clear" means: exit code != 0, no traceback, the message once
(a single ``kar: error:`` line on stderr, not echoed again by the console log).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kar.data.protocol import CTRData

ROOT = Path(__file__).resolve().parents[1]
ML100K_FILES = ("u.data", "u.user", "u.item", "u.genre")
SECRET = "sk-test-SECRET123"


def run_kar(
    tmp_path: Path, *overrides: str, env: dict[str, str] | None = None, unset: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", **(env or {})}
    for name in unset:
        environment.pop(name, None)
    command = [
        sys.executable,
        "-m",
        "kar",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "logger=none",
        *overrides,
    ]
    return subprocess.run(
        command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=180
    )


def error_message(result: subprocess.CompletedProcess[str]) -> str:
    """The one error the run reported; fails unless it is exactly one, without a traceback."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, f"rc={result.returncode}\n{output}"
    assert "Traceback" not in output, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("kar: error: ")]
    assert len(errors) == 1, output
    message = errors[0].removeprefix("kar: error: ")
    assert output.count(message) == 1, f"the error is shown more than once:\n{output}"
    return message


def cached_data(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache" / "data").glob("*.pt"))


def closed_port() -> int:
    """A localhost port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def knowledge_overrides(data_dir: Path) -> list[str]:
    """The real .klg files, wherever the raw data under test lives."""
    knowledge = data_dir / "ml-100k" / "knowledge"
    return [
        f"llm.user_file={knowledge / 'user.klg'}",
        f"llm.item_file={knowledge / 'item.klg'}",
        f"llm.begin_index={knowledge / 'begin_index.json'}",
    ]


@pytest.mark.parametrize(
    ("download_url", "reason"),
    [("null", "no download URL is configured"), ("unreachable", "downloading http://127.0.0.1")],
)
def test_missing_data_without_a_possible_download(
    data_dir: Path, tmp_path: Path, download_url: str, reason: str
) -> None:
    if download_url == "unreachable":
        download_url = f"http://127.0.0.1:{closed_port()}/ml-100k.zip"
    empty = tmp_path / "data"
    result = run_kar(
        tmp_path,
        f"paths.data_dir={empty}",
        f"dataset.download_url={download_url}",
        *knowledge_overrides(data_dir),
    )

    message = error_message(result)
    assert f"missing data file(s) {', '.join(ML100K_FILES)} in {empty / 'ml-100k'}" in message
    assert reason in message
    assert "KAR_DATA_DIR" in message  # the fix: files there, or point at a folder that has them
    assert not cached_data(tmp_path)
    leftovers = list((empty / "ml-100k").iterdir()) if (empty / "ml-100k").exists() else []
    assert leftovers == []  # no partial download left behind


def test_corrupt_ratings_file_names_file_line_and_fix(data_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "data" / "ml-100k"
    copy.mkdir(parents=True)
    for name in ML100K_FILES:
        shutil.copy(data_dir / "ml-100k" / name, copy / name)
    lines = (copy / "u.data").read_text(encoding="latin-1").splitlines(keepends=True)
    user, item, _, _ = lines[4999].split("\t")
    lines[4999] = f"{user}\t{item}\n"  # a line cut short: rating and timestamp lost
    (copy / "u.data").write_text("".join(lines), encoding="latin-1")

    data_override = f"paths.data_dir={tmp_path / 'data'}"
    result = run_kar(tmp_path, data_override, *knowledge_overrides(data_dir))

    message = error_message(result)
    assert f"{copy / 'u.data'}, line 5000" in message
    assert "expected 4" in message and "found 2" in message
    assert "re-download" in message
    assert not cached_data(tmp_path)


def test_missing_knowledge_file_stops_before_the_data_stage(data_dir: Path, tmp_path: Path) -> None:
    result = run_kar(tmp_path, f"paths.data_dir={data_dir}", "llm.user_file=/nonexistent")

    message = error_message(result)
    assert "/nonexistent does not exist" in message and "set llm.user_file" in message
    assert not cached_data(tmp_path)


def test_misfit_adaptor_out_dim_stops_before_anything_is_computed(tmp_path: Path) -> None:
    result = run_kar(tmp_path, "backbone=autoint", "adaptor.out_dim=16")

    message = error_message(result)
    assert "adaptor.out_dim=16" in message and "backbone.embed_dim=32" in message
    assert not (tmp_path / "cache").exists()
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_bad_encoder_setting_stops_before_the_data_stage(data_dir: Path, tmp_path: Path) -> None:
    # Only the encoder, built from the model folder's config, knows its position limit.
    result = run_kar(tmp_path, f"paths.data_dir={data_dir}", "encoder.max_length=1000")

    message = error_message(result)
    assert "encoder.max_length=1000" in message and "encoder.max_length <= 512" in message
    assert not cached_data(tmp_path)


def test_hydra_rejects_a_typo_without_a_traceback(tmp_path: Path) -> None:
    result = run_kar(tmp_path, "train.lrr=1")

    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    assert "Key 'lrr' not in 'TrainConfig'" in result.stderr
    assert not (tmp_path / "cache").exists()


def test_gpt35_without_api_key_stops_before_training_and_keeps_the_data(
    data_dir: Path, tmp_path: Path
) -> None:
    result = run_kar(tmp_path, f"paths.data_dir={data_dir}", "llm=gpt35", unset=("OPENAI_API_KEY",))

    message = error_message(result)
    assert "environment variable OPENAI_API_KEY is not set" in message
    assert "export it" in message and "llm=klg" in message  # the fixes
    assert "prompts need the LLM" in message
    # Nothing already computed is lost: the data stage's tensors stay cached, intact.
    (cached,) = cached_data(tmp_path)
    assert CTRData.load(cached).feature_spec["user"] == 944
    run_dir = tmp_path / "run"
    assert not (run_dir / "checkpoint.pt").exists() and not (run_dir / "metrics.json").exists()
    assert "epoch" not in (run_dir / "kar.log").read_text()


def test_api_key_never_reaches_output_or_files(data_dir: Path, tmp_path: Path) -> None:
    result = run_kar(
        tmp_path,
        f"paths.data_dir={data_dir}",
        "llm=gpt35",
        f"llm.base_url=http://127.0.0.1:{closed_port()}/v1",
        "+llm.max_retries=0",
        "logger=wandb",  # offline: W&B writes its files into the run dir, checked below
        env={"OPENAI_API_KEY": SECRET, "WANDB_MODE": "offline"},
    )

    message = error_message(result)
    assert "kept failing" in message and "llm.base_url" in message
    assert SECRET not in result.stdout + result.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {"config.yaml", "kar.log"} <= {p.name for p in written}
    assert any(p.suffix == ".wandb" for p in written)  # W&B's own record is checked too
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), f"the API key leaked into {path}"
