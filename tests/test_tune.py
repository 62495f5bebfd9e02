"""Hydra's Optuna sweeper maximises the validation AUC that `python -m kar` returns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")

ROOT = Path(__file__).resolve().parents[1]
# A small study over the training settings only: the bare backbone needs no encoder, so each
# trial takes seconds. The shipped preset (experiment=tune_kar) is checked by composition below.
STUDY = """\
# @package _global_
defaults:
  - override /hydra/sweeper: optuna
  - override /hydra/sweeper/sampler: tpe
hydra:
  sweeper:
    direction: maximize
    n_trials: 3
    sampler:
      seed: 7
    params:
      train.lr: tag(log, interval(1e-4, 1e-2))
      train.batch_size: choice(2048, 4096)
"""


@pytest.mark.slow
def test_optuna_sweep_picks_the_trial_with_the_best_validation_auc(
    data_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "tiny_study.yaml").write_text(STUDY)
    sweep_dir = tmp_path / "sweep"
    command = [
        sys.executable, "-m", "kar", "-m", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        "experiment=tiny_study", "adaptor=none", "train.max_epochs=1", "logger=none",
        f"hydra.sweep.dir={sweep_dir}", f"paths.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    env = {**os.environ, "KAR_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    trials = []
    for metrics_path in sweep_dir.glob("*/metrics.json"):
        config = yaml.safe_load((metrics_path.parent / "config.yaml").read_text())
        valid_auc = json.loads(metrics_path.read_text())["valid"]["auc"]
        trials.append((valid_auc, {"train.lr": config["train"]["lr"],
                                   "train.batch_size": config["train"]["batch_size"]}))  # fmt: skip
    assert len(trials) == 3
    assert len({params["train.lr"] for _, params in trials}) == 3  # the sampler varied them
    best_auc, best_params = max(trials, key=lambda t: t[0])
    result = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(best_auc, abs=1e-12)
    assert result["best_params"] == pytest.approx(best_params)


def test_the_tuning_preset_searches_existing_settings(compose_cfg) -> None:
    """Every parameter of experiment=tune_kar names a key of the composed config."""
    cfg = compose_cfg("experiment=tune_kar")
    params = OmegaConf.load(ROOT / "conf" / "experiment" / "tune_kar.yaml").hydra.sweeper.params
    assert len(params) >= 3
    for key in params:
        assert OmegaConf.select(cfg, key, throw_on_missing=True) is not None, key
