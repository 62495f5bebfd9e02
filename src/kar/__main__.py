"""Hydra entry point: `python -m kar [overrides]` (or the `kar` console script).

Composes ``conf/``, checks it, runs the pipeline and returns the validation metric so Hydra
sweepers (grid, Optuna) can optimise it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from kar.config import config_dir, register_schema, validate
from kar.errors import KarError

log = logging.getLogger("kar")

# Bad input a user can fix: reported as one message, without a traceback. Everything else is a
# bug and keeps its traceback.
USER_ERRORS = (KarError, FileNotFoundError)


def _log_to_files_only(err: BaseException) -> None:
    """Record `err` with its traceback in the run's log file, but not on the console.

    The console shows the message once, on stderr; the traceback stays findable in the log in
    case the "bad input" was a bug after all.
    """
    record = log.makeRecord(
        log.name, logging.ERROR, __file__, 0, "%s", (err,), (type(err), err, err.__traceback__)
    )
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)


def _destroy_process_group() -> None:
    """Under `accelerate launch`, a gloo/NCCL thread alive at exit would abort the process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _mark_failed(run_dir: Path, err: BaseException) -> None:
    """`failed.json` in the job's folder: a multirun goes on, and this says which job broke."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"error": type(err).__name__, "message": str(err)}
    (run_dir / "failed.json").write_text(json.dumps(record, indent=2))


register_schema()
atexit.register(_destroy_process_group)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> float | None:
    # heavy imports after Hydra has parsed the command line
    from kar.pipeline import Stopped, run

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode.name == "MULTIRUN"
    # The sweep folder's name groups a multirun's tracked runs.
    sweep_name = Path(hydra_cfg.sweep.dir).name if multirun else None
    try:
        outcome = run(validate(cfg), run_dir, sweep_name=sweep_name)
    except USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":  # as for Hydra's own errors: show it all
            raise
        _log_to_files_only(err)
        print(f"kar: error: {err}", file=sys.stderr)
        if not multirun:
            sys.exit(2)
        # One job's bad input must not stop the other jobs of the sweep (raising would).
        _mark_failed(run_dir, err)
        return None
    if isinstance(outcome, Stopped):
        print(outcome.line(run_dir))
        return None
    print(outcome.summary_line)
    return float(outcome.metrics["valid"][cfg.task.monitor])


if __name__ == "__main__":
    main()
