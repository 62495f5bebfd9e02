"""Shared fixtures: the real data folder and composing the real Hydra config."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# huggingface_hub reads this when first imported (during collection): set it before any import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """`KAR_DATA_DIR`, else ../shared/data next to the repository."""
    path = Path(os.environ.get("KAR_DATA_DIR", ROOT.parent / "shared" / "data"))
    if not (path / "ml-100k" / "u.data").is_file():
        pytest.skip(f"real MovieLens-100K not found under {path}; set KAR_DATA_DIR")
    return path


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture
def compose_cfg() -> Iterator[Callable[..., DictConfig]]:
    """Compose conf/config.yaml with overrides, as `python -m kar` would (no run dir)."""
    from kar.config import register_schema

    register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):

        def _compose(*overrides: str) -> DictConfig:
            return compose(config_name="config", overrides=list(overrides))

        yield _compose
    GlobalHydra.instance().clear()
