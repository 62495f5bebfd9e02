"""The training loop on small synthetic problems whose outcome is known in advance."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kar.engine import TrainConfig, fit
from kar.metrics import ctr_metrics, rerank_metrics
from kar.registry import ConfigError

TESTS_DIR = Path(__file__).resolve().parent
N_ITEMS = 20
# One thread: faster for these tiny models, and immune to OpenMP stalls on a loaded machine.
FAST = TrainConfig(
    max_epochs=6, batch_size=128, eval_batch_size=512, lr=0.02, cpu=True, num_threads=1
)


def learnable_split(n_rows: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Labels drawn from a logistic model of a dense vector and a categorical item effect."""
    x = torch.randn(n_rows, 4, generator=generator)  # (N, 4)
    item = torch.randint(1, N_ITEMS + 1, (n_rows,), generator=generator)  # (N,)
    item_effect = torch.linspace(-2.0, 2.0, N_ITEMS + 1)  # (N_ITEMS + 1,)
    logit = 2.0 * x @ torch.tensor([1.0, -1.0, 0.5, 0.0]) + item_effect[item]  # (N,)
    label = (torch.rand(n_rows, generator=generator) < torch.sigmoid(logit)).float()
    return {"x": x, "item": item, "label": label}


class TinyCTRModel(nn.Module):
    """Dense linear part + item embedding (embedding init std 1e-4, as the contract says)."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(4, 1)
        self.item_embedding = nn.Embedding(N_ITEMS + 1, 1, padding_idx=0)
        nn.init.normal_(self.item_embedding.weight, std=1e-4)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        dense = self.dense(batch["x"]).squeeze(-1)  # (B,)
        return dense + self.item_embedding(batch["item"]).squeeze(-1)  # (B,)


@pytest.fixture(scope="module")
def learnable_splits() -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    sizes = (("train", 3000), ("valid", 1000), ("test", 1000))
    return {name: learnable_split(n, generator) for name, n in sizes}


def fixed_ranking_splits() -> dict[str, dict[str, torch.Tensor]]:
    """A precomputed score per sample; train labels are mostly positive."""
    generator = torch.Generator().manual_seed(1)
    splits = {}
    for name, n_rows in (("train", 600), ("valid", 300), ("test", 300)):
        # distinct, well-separated scores: adding a bias can never reorder or tie them
        score = torch.randperm(n_rows, generator=generator).float() / n_rows * 4 - 2  # (N,)
        label = (torch.rand(n_rows, generator=generator) < torch.sigmoid(score + 1.0)).float()
        splits[name] = {"score": score, "label": label}
    return splits


class BiasOnlyModel(nn.Module):
    """logit = fixed score + learned bias: training shifts the logloss, never the ranking (AUC)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return batch["score"] + self.bias  # (B,)


def new_tiny_model(seed: int = 0) -> TinyCTRModel:
    torch.manual_seed(seed)
    return TinyCTRModel()


def test_fit_learns_a_learnable_signal(learnable_splits, tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt" / "best.pt"
    threads = torch.get_num_threads()
    result = fit(new_tiny_model(), learnable_splits, FAST, seed=0, checkpoint_path=checkpoint)
    assert torch.get_num_threads() == threads  # cfg.num_threads applies only inside fit
    assert result.valid["auc"] > 0.8
    assert result.test["auc"] > 0.8
    assert checkpoint.is_file()
    assert len(result.history) == result.epochs_run
    assert 1 <= result.best_epoch <= result.epochs_run
    losses = [entry["train_loss"] for entry in result.history]
    assert losses[-1] < losses[0]


def test_early_stopping_stops_after_patience_epochs_without_improvement(tmp_path: Path) -> None:
    splits = fixed_ranking_splits()
    for patience in (1, 2, 3):
        cfg = replace(FAST, max_epochs=10, patience=patience, lr=0.05)
        result = fit(BiasOnlyModel(), splits, cfg, seed=0, checkpoint_path=tmp_path / "b.pt")
        # validation AUC is identical every epoch, so epoch 1 stays the best
        assert result.best_epoch == 1
        assert result.epochs_run == 1 + patience
        assert len({entry["valid_auc"] for entry in result.history}) == 1


def test_best_checkpoint_is_restored_before_the_test_evaluation(tmp_path: Path) -> None:
    splits = fixed_ranking_splits()
    checkpoint = tmp_path / "best.pt"
    cfg = replace(FAST, max_epochs=10, patience=3, lr=0.05)
    model = BiasOnlyModel()
    result = fit(model, splits, cfg, seed=0, checkpoint_path=checkpoint)
    assert result.best_epoch == 1 and result.epochs_run == 4
    # training moved the bias after epoch 1, so the last epoch's weights differ from the best
    assert result.history[-1]["valid_logloss"] != pytest.approx(result.valid["logloss"])
    assert result.valid["logloss"] == result.history[0]["valid_logloss"]

    best = BiasOnlyModel()
    best.load_state_dict(torch.load(checkpoint, weights_only=True))
    assert torch.equal(best.bias, model.bias)  # the caller's model holds the best weights
    with torch.no_grad():
        test_logits = best(splits["test"]).numpy()
        valid_logits = best(splits["valid"]).numpy()
    expected_test = ctr_metrics(splits["test"]["label"].numpy(), test_logits)
    expected_valid = ctr_metrics(splits["valid"]["label"].numpy(), valid_logits)
    assert result.test == pytest.approx(expected_test, rel=1e-6)
    assert result.valid == pytest.approx(expected_valid, rel=1e-6)


def test_fit_is_deterministic_for_a_fixed_seed(learnable_splits, tmp_path: Path) -> None:
    cfg = replace(FAST, max_epochs=2)
    first = fit(new_tiny_model(), learnable_splits, cfg, seed=3, checkpoint_path=tmp_path / "a.pt")
    again = fit(new_tiny_model(), learnable_splits, cfg, seed=3, checkpoint_path=tmp_path / "b.pt")
    other = fit(new_tiny_model(), learnable_splits, cfg, seed=4, checkpoint_path=tmp_path / "c.pt")
    assert without_timings(first.history) == without_timings(again.history)
    assert first.history[0]["train_samples_per_s"] > 0
    assert first.test == again.test
    # the seed drives the batch order, so another seed gives another trajectory
    assert other.history[0]["train_loss"] != first.history[0]["train_loss"]


def test_cosine_schedule_with_warmup_and_floor(learnable_splits, tmp_path: Path) -> None:
    # 3000 rows / 128 = 24 steps per epoch, 4 epochs = 96 steps, no early stop (patience 4)
    cfg = replace(FAST, max_epochs=4, patience=4, lr=0.01, warmup_ratio=0.5, min_lr_ratio=0.1)
    result = fit(new_tiny_model(), learnable_splits, cfg, seed=0, checkpoint_path=tmp_path / "s.pt")
    lrs = [entry["lr"] for entry in result.history]
    assert lrs[0] == pytest.approx(0.01 * 24 / 48)  # halfway through the 48 warmup steps
    assert lrs[1] == pytest.approx(0.01)  # warmup just ended: the peak
    assert lrs[3] == pytest.approx(0.01 * 0.1)  # cosine ends at the floor


class RecordingTracker:
    """Keeps what the engine logs (implements the kar.tracking.Tracker protocol)."""

    def __init__(self) -> None:
        self.logged: list[tuple[dict, int | None]] = []
        self.summaries: list[dict] = []

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.logged.append((dict(metrics), step))

    def summary(self, metrics: Mapping[str, float]) -> None:
        self.summaries.append(dict(metrics))


def test_fit_logs_epochs_steps_and_a_summary(learnable_splits, tmp_path: Path) -> None:
    tracker = RecordingTracker()
    cfg = replace(FAST, max_epochs=2, patience=2, log_every_n_steps=10)
    result = fit(
        new_tiny_model(),
        learnable_splits,
        cfg,
        seed=0,
        checkpoint_path=tmp_path / "t.pt",
        tracker=tracker,
    )
    epoch_logs = [metrics for metrics, _ in tracker.logged if "valid/auc" in metrics]
    step_logs = [step for metrics, step in tracker.logged if "train/loss" in metrics]
    assert [m["epoch"] for m in epoch_logs] == [1, 2]
    assert {"train/epoch_loss", "train/lr", "valid/logloss"} <= set(epoch_logs[0])
    assert step_logs == [10, 20, 30, 40]  # 24 steps per epoch, 48 in total
    steps = [step for _, step in tracker.logged]
    assert steps == sorted(steps)  # W&B requires non-decreasing steps
    assert tracker.summaries[-1]["test/auc"] == result.test["auc"]
    assert tracker.summaries[-1]["best_epoch"] == result.best_epoch


def test_fit_supports_list_outputs_with_rerank_metrics(tmp_path: Path) -> None:
    # lists of 5 candidates whose relevance is the sign of a learnable dense score
    generator = torch.Generator().manual_seed(2)
    splits = {}
    for name, n_lists in (("train", 400), ("valid", 100), ("test", 100)):
        x = torch.randn(n_lists, 5, 3, generator=generator)  # (N, 5, 3)
        label = (x @ torch.tensor([1.0, -1.0, 0.5]) > 0).float()  # (N, 5)
        splits[name] = {"x": x, "label": label}

    class ListScorer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 1)

        def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
            return self.linear(batch["x"]).squeeze(-1)  # (B, 5)

    torch.manual_seed(0)
    model = ListScorer()
    result = fit(
        model,
        splits,
        replace(FAST, max_epochs=3, batch_size=32),
        seed=0,
        checkpoint_path=tmp_path / "r.pt",
        metrics_fn=rerank_metrics,
        monitor="ndcg@5",
    )
    assert result.test["ndcg@5"] > 0.9
    assert set(result.test) == {f"{m}@{k}" for m in ("map", "ndcg") for k in (1, 3, 5, 7)}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mixed_precision": "fp32"}, "mixed_precision"),
        ({"patience": 0}, "patience"),
        ({"warmup_ratio": 1.0}, "warmup_ratio"),
        ({"lr": 0.0}, "lr"),
    ],
)
def test_invalid_settings_raise_config_errors(
    change: dict, message: str, learnable_splits, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=message):
        fit(
            new_tiny_model(),
            learnable_splits,
            replace(FAST, **change),
            seed=0,
            checkpoint_path=tmp_path / "x.pt",
        )


def test_bad_splits_and_bad_logits_are_named(learnable_splits, tmp_path: Path) -> None:
    without_test = {k: v for k, v in learnable_splits.items() if k != "test"}
    with pytest.raises(ValueError, match="'test' is missing"):
        fit(new_tiny_model(), without_test, FAST, seed=0, checkpoint_path=tmp_path / "x.pt")
    ragged = dict(learnable_splits) | {
        "valid": learnable_splits["valid"] | {"x": learnable_splits["valid"]["x"][:-1]}
    }
    with pytest.raises(ValueError, match="'x' has 999 rows"):
        fit(new_tiny_model(), ragged, FAST, seed=0, checkpoint_path=tmp_path / "x.pt")

    class WrongShape(TinyCTRModel):
        def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
            return super().forward(batch).unsqueeze(-1)  # (B, 1): violates the contract

    with pytest.raises(ValueError, match=r"logits \(B,\)"):
        fit(WrongShape(), learnable_splits, FAST, seed=0, checkpoint_path=tmp_path / "x.pt")


def without_timings(history: list[dict]) -> list[dict]:
    """Epoch records minus wall-clock fields, which differ between identical runs."""
    timed = ("train_seconds", "train_samples_per_s")
    return [{k: v for k, v in entry.items() if k not in timed} for entry in history]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_fit_under_accelerate_launch_with_two_processes(tmp_path: Path) -> None:
    # `--cpu` makes accelerate's launcher start a single process; `--multi_gpu` is the torchrun
    # launcher, which on a machine without GPUs runs gloo over CPU processes.
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={_free_port()}",
        str(TESTS_DIR / "multiprocess_fit.py"),
        str(tmp_path),
    ]
    env = os.environ | {
        "WANDB_MODE": "offline",
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["process_index"] for r in reports] == [0, 1]
    assert all(r["num_processes"] == 2 for r in reports)
    for key in ("valid", "test", "best_epoch", "epochs_run", "predictions"):
        assert reports[0][key] == reports[1][key], key
    assert without_timings(reports[0]["history"]) == without_timings(reports[1]["history"])
    # every rank holds every test sample's prediction: they give the reported test metrics
    labels, logits = (np.array(v) for v in reports[0]["predictions"]["test"])
    assert ctr_metrics(labels, logits) == pytest.approx(reports[0]["test"])
    assert reports[0]["valid"]["auc"] > 0.75
    assert all(r["gathered_labels_match"] for r in reports)
    assert (tmp_path / "best.pt").is_file()
    # only rank 0 tracks: exactly one W&B run
    runs = list((tmp_path / "wandb_run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
