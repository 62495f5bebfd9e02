"""Structured-config schemas: what `conf/` may contain, with types, checked at start.

The top-level schema is registered in Hydra's ConfigStore as ``kar_schema`` and is the first entry
of ``conf/config.yaml``'s defaults, so Hydra itself rejects unknown keys and wrong types in the
fixed groups (train, paths, logger, task). The pluggable groups (dataset, llm, encoder, adaptor,
backbone) differ per implementation; `validate` checks each against the schema derived from the
registered class's signature (see `kar.registry.schema_for`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from kar import components  # noqa: F401  (registers every implementation)
from kar.engine import TrainConfig
from kar.errors import ConfigError
from kar.nn.adaptor import NoAdaptor
from kar.registry import ADAPTORS, BACKBONES, DATASETS, ENCODERS, LLMS, validate_group
from kar.slices import SliceConfig
from kar.tracking import LoggerConfig


class Stage(str, Enum):
    """Where a run stops; each later stage includes the earlier ones."""

    data = "data"
    generate = "generate"
    encode = "encode"
    train = "train"


STAGE_ORDER = [Stage.data, Stage.generate, Stage.encode, Stage.train]


@dataclass
class PathsConfig:
    data_dir: str = MISSING
    cache_dir: str = MISSING
    store: str = MISSING


@dataclass
class TaskConfig:
    name: str = "ctr"
    monitor: str = "auc"
    slices: SliceConfig = field(default_factory=SliceConfig)


@dataclass
class KARConfig:
    dataset: Any = MISSING
    llm: Any = MISSING
    encoder: Any = MISSING
    adaptor: Any = MISSING
    backbone: Any = MISSING
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 42
    stage: Stage = Stage.train
    knowledge: str = "both"


# Longest run directory suffix made from overrides; file systems allow 255 bytes per name.
MAX_SUFFIX_CHARS = 120


def run_dir_suffix(overrides: str) -> str:
    """``_<overrides>`` as part of ONE directory name, or "" without overrides.

    Hydra's ``override_dirname`` is not fit for a name as it is: a path or hub id in an override
    (``encoder.path=/models/x``, ``llm.model=org/name``) would nest directories, and a long sweep
    would exceed the file system's name limit. A shortened suffix ends in a hash of the whole,
    so distinct runs stay distinct.
    """
    if not overrides:
        return ""
    name = overrides.replace("/", "_").replace("\\", "_")
    if len(name) > MAX_SUFFIX_CHARS:
        digest = hashlib.sha256(overrides.encode()).hexdigest()[:12]
        name = f"{name[: MAX_SUFFIX_CHARS - 13]}~{digest}"
    return f"_{name}"


def register_schema() -> None:
    """Register the top-level schema (``kar_schema``) and the resolvers ``conf/`` uses."""
    ConfigStore.instance().store(name="kar_schema", node=KARConfig)
    OmegaConf.register_new_resolver("kar.dir_suffix", run_dir_suffix, replace=True)


# Keys each group's YAML carries for the framework itself, besides the implementation's own
# hyperparameters: (type, default).
_DATASET_KEYS: dict[str, tuple[Any, Any]] = {
    "name": (str, MISSING),
    "root": (str, MISSING),
    "label_threshold": (int, 3),
    "history_len": (int, 10),
    "prefix_max": (int, 30),
    "test_ratio": (float, 0.1),
    "valid_ratio": (float, 0.1),
    "split_seed": (int, 42),
    "prompts": (dict[str, Any], MISSING),
}
_ENCODER_KEYS: dict[str, tuple[Any, Any]] = {
    "name": (str, MISSING),
    "user_text": (str, "history+answer"),
}
_NAMED: dict[str, tuple[Any, Any]] = {"name": (str, MISSING)}
_BACKBONE_KEYS: dict[str, tuple[Any, Any]] = {"name": (str, MISSING), "embed_dim": (int, 32)}
_ADAPTOR_KEYS: dict[str, tuple[Any, Any]] = {"name": (str, MISSING), "out_dim": (int, 32)}

USER_TEXTS = ("history+answer", "answer")
KNOWLEDGE_KINDS = ("both", "user", "item")
TASKS = ("ctr",)
MONITORS = ("auc",)  # validation metrics where higher is better (early stopping keeps the max)


def config_dir() -> str:
    """`KAR_CONFIG_DIR`, else the repository's top-level ``conf/``."""
    env = os.environ.get("KAR_CONFIG_DIR")
    if env:
        return str(Path(env).resolve())
    return str(Path(__file__).resolve().parents[2] / "conf")


def validate(cfg: DictConfig) -> DictConfig:
    """Type-check every pluggable group against its implementation; return the checked config.

    Raises `ConfigError` naming the group, the key and the fix. Nothing is computed before this.
    """
    groups = {
        "dataset": (DATASETS, _DATASET_KEYS),
        "llm": (LLMS, _NAMED),
        "encoder": (ENCODERS, _ENCODER_KEYS),
        "backbone": (BACKBONES, _BACKBONE_KEYS),
        "adaptor": (ADAPTORS, _ADAPTOR_KEYS),
    }
    checked = cfg.copy()
    for group, (registry, keys) in groups.items():
        node = cfg[group]
        if not isinstance(node, DictConfig) or "name" not in node:
            raise ConfigError(f"config group {group} has no `name`; pick one with {group}=<option>")
        cls = registry.get(node.name)
        with open_dict(checked):
            checked[group] = validate_group(group, node, cls, keys)
    _check_choice("encoder.user_text", checked.encoder.user_text, USER_TEXTS)
    _check_adaptor_fits_backbone(checked)
    _check_choice("knowledge", checked.knowledge, KNOWLEDGE_KINDS)
    _check_choice("task.name", checked.task.name, TASKS)
    _check_choice("task.monitor", checked.task.monitor, MONITORS)
    for key, value in checked.task.slices.items():
        if value < 0:
            raise ConfigError(f"task.slices.{key}={value} must be >= 0")
    for key in ("test_ratio", "valid_ratio"):
        value = checked.dataset[key]
        if not 0.0 < value < 1.0:
            raise ConfigError(f"dataset.{key}={value} must lie strictly between 0 and 1")
    for key in ("batch_size", "max_epochs"):
        if checked.train[key] < 1:
            raise ConfigError(f"train.{key}={checked.train[key]} must be at least 1")
    if checked.train.lr <= 0:
        raise ConfigError(f"train.lr={checked.train.lr} must be positive")
    OmegaConf.resolve(checked)
    return checked


def _check_adaptor_fits_backbone(cfg: DictConfig) -> None:
    """Field-injection backbones take the adaptor output as extra fields of size embed_dim.

    `kar.models.build_model` enforces this too, but only at the train stage, after the data,
    generate and encode stages have run; checked here, the mistake costs nothing.
    """
    backbone_cls = BACKBONES.get(cfg.backbone.name)
    if ADAPTORS.get(cfg.adaptor.name) is NoAdaptor or backbone_cls.injection != "field":
        return
    out_dim, embed_dim = cfg.adaptor.out_dim, cfg.backbone.embed_dim
    if out_dim != embed_dim:
        dense = [n for n in BACKBONES.names() if BACKBONES.get(n).injection == "dense"]
        raise ConfigError(
            f"adaptor.out_dim={out_dim} does not fit backbone={cfg.backbone.name}: it takes "
            f"knowledge as extra fields, so adaptor.out_dim must equal backbone.embed_dim="
            f"{embed_dim}. Fix: drop the adaptor.out_dim override (it defaults to "
            f"${{backbone.embed_dim}}), set adaptor.out_dim={embed_dim}, or pick a backbone that "
            f"takes dense knowledge ({', '.join(dense)})"
        )


def _check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not an option; use one of: {', '.join(allowed)}")
