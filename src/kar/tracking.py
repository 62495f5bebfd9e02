"""Experiment tracking: Weights & Biases (offline by default) or nothing.

`tracking_run` opens one run, yields a `Tracker`, and always finishes the run, marking it failed
when the body raises, so a Hydra multirun survives one broken job. Only the main process logs.
The logged config goes through `redact` first: secrets never reach W&B files or servers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from omegaconf import DictConfig, ListConfig, OmegaConf

from kar.registry import ConfigError

REDACTED = "<redacted>"
TRACKER_NAMES = ("wandb", "none")
WANDB_MODES = ("disabled", "offline", "online")
# A key (config entry or environment variable name) whose value is a credential.
# A key holds a secret when its name ENDS in one of these words (`api_key`, `hf_token`), so
# `api_key_env` (the name of a variable) and `max_tokens` (a hyperparameter) stay visible.
SECRET_KEY_PATTERN = re.compile(
    r"(api_?key|token|secret|password|passwd|authorization|credentials?)$", re.IGNORECASE
)
# The variables launchers use for the global rank, in the order accelerate reads them.
RANK_ENV_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


@dataclass
class LoggerConfig:
    """Where and how runs are tracked (the `logger` config group)."""

    name: str = "wandb"  # "wandb" | "none"
    project: str = "kar"
    entity: str | None = None
    mode: str = "offline"  # "disabled" | "offline" | "online"; env WANDB_MODE overrides it
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    dir: str | None = None  # where W&B writes its files; None = the run directory


@runtime_checkable
class Tracker(Protocol):
    """What the engine and pipeline log through."""

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def summary(self, metrics: Mapping[str, float]) -> None: ...


class NullTracker:
    """Logs nothing: tracking disabled, or a process other than the main one."""

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        del metrics, step

    def summary(self, metrics: Mapping[str, float]) -> None:
        del metrics


class WandbTracker:
    """Forwards metrics to one open W&B run."""

    def __init__(self, run: Any) -> None:
        self.run = run

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.run.log(dict(metrics), step=step)

    def summary(self, metrics: Mapping[str, float]) -> None:
        self.run.summary.update(dict(metrics))


def _secret_env_values() -> set[str]:
    # Values of credential-named environment variables (OPENAI_API_KEY, HF_TOKEN, ...): a config
    # that picked one up through `${oc.env:...}` under an innocent key is still redacted.
    return {
        value
        for name, value in os.environ.items()
        if SECRET_KEY_PATTERN.search(name) and len(value) >= 4
    }


def redact(config: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """A plain-container copy of `config` with every secret replaced by "<redacted>".

    Secret = the value of any key matching api_key/apikey/token/secret/password/authorization
    (case-insensitive, at any depth), or a string containing the value of an environment
    variable whose name matches that pattern.
    """
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)  # type: ignore[assignment]
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping, got {type(config).__name__}")
    env_secrets = _secret_env_values()

    def clean(value: Any) -> Any:
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        if isinstance(value, Mapping):
            return {
                key: REDACTED if SECRET_KEY_PATTERN.search(str(key)) else clean(item)
                for key, item in value.items()
            }
        if isinstance(value, (list, tuple)):
            return [clean(item) for item in value]
        if isinstance(value, str) and any(secret in value for secret in env_secrets):
            return REDACTED
        return value

    return clean(config)


def is_main_process() -> bool:
    """Whether this process is the one that logs (global rank 0).

    Uses accelerate's PartialState when it already exists; otherwise reads the launcher's rank
    variables instead of creating the state here, because creating it fixes the device and
    backend before the engine's `Accelerator(cpu=..., mixed_precision=...)` gets to choose.
    """
    from accelerate import PartialState

    if PartialState._shared_state:  # initialised by an Accelerator or PartialState already
        return PartialState().is_main_process
    for name in RANK_ENV_VARS:
        if name in os.environ:
            return int(os.environ[name]) == 0
    return True


def resolve_mode(cfg: LoggerConfig) -> str:
    """The W&B mode to use: env WANDB_MODE when set, else `cfg.mode`."""
    mode = os.environ.get("WANDB_MODE") or cfg.mode
    if mode not in WANDB_MODES:
        source = (
            "environment variable WANDB_MODE" if os.environ.get("WANDB_MODE") else "logger.mode"
        )
        raise ConfigError(f"{source}={mode!r} is not one of {', '.join(WANDB_MODES)}")
    return mode


def _validate(cfg: LoggerConfig) -> None:
    if cfg.name not in TRACKER_NAMES:
        raise ConfigError(f"logger.name={cfg.name!r} is not one of {', '.join(TRACKER_NAMES)}")


@contextmanager
def tracking_run(
    cfg: LoggerConfig, config: Mapping[str, Any], run_dir: Path, name: str | None = None
) -> Iterator[Tracker]:
    """Open a tracked run for the body; finish it however the body ends.

    W&B files go under `cfg.dir` or else `run_dir` (never the working directory). The run is
    finished with exit code 1 if the body raises, and the exception propagates.
    """
    _validate(cfg)
    mode = resolve_mode(cfg)
    if cfg.name == "none" or mode == "disabled" or not is_main_process():
        yield NullTracker()
        return

    import wandb  # slow import: only when a run is actually tracked

    wandb_dir = Path(cfg.dir) if cfg.dir is not None else Path(run_dir)
    wandb_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        group=cfg.group,
        tags=list(cfg.tags),
        name=name,
        mode=mode,
        dir=str(wandb_dir),
        config=redact(config),
        # Metadata holds sys.argv (Hydra overrides may carry keys) and git remotes (may embed
        # tokens); console capture duplicates the Hydra job log. Neither is worth the risk.
        settings=wandb.Settings(x_disable_meta=True, console="off", save_code=False),
    )
    try:
        yield WandbTracker(run)
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
