"""Hydra entry point: `python -m kar [overrides]` (or the `kar` console script).

Composes ``conf/``, checks it, runs the pipeline and returns the validation metric so Hydra
sweepers (grid, Optuna) can optimise it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from kar.config import register_schema, validate
from kar.errors import KarError

log = logging.getLogger("kar")


def _config_dir() -> str:
    """`KAR_CONFIG_DIR`, else the repository's top-level ``conf/``."""
    env = os.environ.get("KAR_CONFIG_DIR")
    if env:
        return str(Path(env).resolve())
    return str(Path(__file__).resolve().parents[2] / "conf")


register_schema()


@hydra.main(version_base="1.3", config_path=_config_dir(), config_name="config")
def main(cfg: DictConfig) -> float | None:
    from kar.pipeline import run  # heavy imports after Hydra has parsed the command line

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        outcome = run(validate(cfg), run_dir)
    except (KarError, FileNotFoundError) as err:
        log.error("%s", err)
        print(f"kar: error: {err}", file=sys.stderr)
        if HydraConfig.get().mode.name == "RUN":
            sys.exit(2)
        raise
    if outcome is None:
        print(f"kar: stopped after stage={cfg.stage.value} -> {run_dir}")
        return None
    print(outcome.summary_line)
    return float(outcome.metrics["valid"][cfg.task.monitor])


if __name__ == "__main__":
    main()
