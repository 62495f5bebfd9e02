"""W&B tracking: real offline runs written into a temporary directory."""

from __future__ import annotations

import struct
import sys
import time
from pathlib import Path

import pytest
import wandb
from omegaconf import OmegaConf
from wandb.proto import wandb_internal_pb2

from kar.registry import ConfigError
from kar.tracking import (
    REDACTED,
    LoggerConfig,
    NullTracker,
    Tracker,
    WandbTracker,
    redact,
    tracking_run,
)

SECRET = "sk-test-6b1f0c9e2d"  # under a key that names a secret
ENV_SECRET = "tok-env-55aa31c7e8"  # the value of a secret-named environment variable
HEADER_SECRET = "bearer-9f8e7d6c5b"


@pytest.fixture
def wandb_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep every W&B side file (cache, settings, debug logs) inside tmp_path."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for variable, folder in (
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
    ):
        monkeypatch.setenv(variable, str(tmp_path / "wandb_home" / folder))
    return tmp_path


def wandb_records(run_file: Path) -> list[wandb_internal_pb2.Record]:
    """Decode an offline `.wandb` file: a 7-byte W&B header, then a LevelDB-style log of
    32 KiB blocks whose chunks (4-byte crc, 2-byte length, 1-byte type) carry Record protos."""
    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, header = 32768, 7
    records, pending, position = [], b"", 7
    while position + header <= len(data):
        if block - position % block < header:  # block trailer padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + header])
        if kind == 0:
            break
        payload = data[position + header : position + header + length]
        position += header + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):  # FULL or LAST chunk completes a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def exit_codes(run_dir: Path, timeout_s: float = 10.0) -> list[int]:
    """Exit codes recorded in the run's offline file.

    wandb-core may still be flushing the file for a few milliseconds after `finish` returns,
    so poll until the exit record appears (or give up and return what is there).
    """
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + timeout_s
    while True:
        codes = [r.exit.exit_code for r in wandb_records(run_file) if r.HasField("exit")]
        if codes or time.monotonic() > deadline:
            return codes
        time.sleep(0.05)


def files_containing(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_redact_replaces_secret_keys_at_any_depth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAR_TEST_TOKEN", ENV_SECRET)
    config = {
        "llm": {"api_key": SECRET, "apiKey": SECRET, "model": "m"},
        "providers": [{"Authorization": HEADER_SECRET, "url": "http://x"}],
        "HF_TOKEN": SECRET,
        "db_password": SECRET,
        "client_secret": {"nested": SECRET},
        "endpoint": f"https://host/?key={ENV_SECRET}",  # innocent key, env secret value
        "lr": 0.001,
    }
    clean = redact(config)
    assert clean == {
        "llm": {"api_key": REDACTED, "apiKey": REDACTED, "model": "m"},
        "providers": [{"Authorization": REDACTED, "url": "http://x"}],
        "HF_TOKEN": REDACTED,
        "db_password": REDACTED,
        "client_secret": REDACTED,
        "endpoint": REDACTED,
        "lr": 0.001,
    }
    assert config["llm"]["api_key"] == SECRET  # the input is not modified


def test_redact_keeps_variable_names_and_hyperparameters_visible() -> None:
    # `api_key_env` names a variable and `max_tokens` is a hyperparameter: neither is a secret.
    config = {"llm": {"api_key_env": "OPENAI_API_KEY", "max_tokens": 512, "api_key": SECRET}}
    assert redact(config) == {
        "llm": {"api_key_env": "OPENAI_API_KEY", "max_tokens": 512, "api_key": REDACTED}
    }


def test_redact_resolves_omegaconf_interpolations_before_redacting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAR_TEST_API_KEY", ENV_SECRET)
    config = OmegaConf.create(
        {"llm": {"key_from_env": "${oc.env:KAR_TEST_API_KEY}", "name": "x"}, "epochs": 3}
    )
    assert redact(config) == {"llm": {"key_from_env": REDACTED, "name": "x"}, "epochs": 3}


def test_offline_run_writes_under_run_dir_without_secrets(
    wandb_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAR_TEST_TOKEN", ENV_SECRET)
    monkeypatch.setenv("WANDB_MODE", "offline")  # wins over the config's "online"
    # Hydra overrides end up in sys.argv; W&B must not record them
    monkeypatch.setattr(sys, "argv", [sys.argv[0], f"llm.api_key={SECRET}"])
    monkeypatch.chdir(wandb_home)
    config = {
        "llm": {"api_key": SECRET, "model": "visible-model-name"},
        "headers": {"Authorization": HEADER_SECRET},
        "from_env": ENV_SECRET,
    }
    run_dir = wandb_home / "runs" / "job0"
    cfg = LoggerConfig(mode="online", project="kar-test", tags=["unit"])
    with tracking_run(cfg, config, run_dir, name="job0") as tracker:
        assert isinstance(tracker, WandbTracker)
        assert isinstance(tracker, Tracker)
        tracker.log({"valid/auc": 0.75}, step=1)
        tracker.summary({"test/auc": 0.7})
    assert wandb.run is None
    assert exit_codes(run_dir) == [0]
    assert not (wandb_home / "wandb").exists()  # nothing in the working directory
    # the grep can see the logged config, so finding no secret means none was written
    assert files_containing(wandb_home, "visible-model-name")
    for secret in (SECRET, ENV_SECRET, HEADER_SECRET):
        assert files_containing(wandb_home, secret) == [], secret


def test_run_is_finished_as_failed_when_the_body_raises(wandb_home: Path) -> None:
    run_dir = wandb_home / "run"
    with (
        pytest.raises(RuntimeError, match="training blew up"),
        tracking_run(LoggerConfig(), {"a": 1}, run_dir),
    ):
        raise RuntimeError("training blew up")
    assert wandb.run is None
    assert exit_codes(run_dir) == [1]


def test_logger_dir_overrides_the_run_dir(wandb_home: Path) -> None:
    elsewhere = wandb_home / "elsewhere"
    cfg = LoggerConfig(dir=str(elsewhere))
    with tracking_run(cfg, {}, wandb_home / "run"):
        pass
    assert list(elsewhere.glob("wandb/offline-run-*/run-*.wandb"))
    assert not (wandb_home / "run").exists()


@pytest.mark.parametrize(
    ("env_mode", "cfg"),
    [
        ("disabled", LoggerConfig(mode="online")),
        (None, LoggerConfig(mode="disabled")),
        (None, LoggerConfig(name="none")),
    ],
)
def test_disabled_tracking_creates_nothing(
    env_mode: str | None, cfg: LoggerConfig, wandb_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if env_mode is not None:
        monkeypatch.setenv("WANDB_MODE", env_mode)
    monkeypatch.chdir(wandb_home)
    with tracking_run(cfg, {"api_key": SECRET}, wandb_home / "run") as tracker:
        assert isinstance(tracker, NullTracker)
        tracker.log({"x": 1.0}, step=1)
        tracker.summary({"y": 2.0})
    assert list(wandb_home.rglob("*")) == []


def test_invalid_names_and_modes_fail_early(
    wandb_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (
        pytest.raises(ConfigError, match=r"logger\.name"),
        tracking_run(LoggerConfig(name="tensorboard"), {}, wandb_home),
    ):
        pass
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with (
        pytest.raises(ConfigError, match="WANDB_MODE"),
        tracking_run(LoggerConfig(), {}, wandb_home),
    ):
        pass
