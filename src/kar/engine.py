"""Training and evaluation loop on HuggingFace accelerate.

`fit` trains a model that maps a batch dict to logits, selects the epoch with the best validation
metric (early stopping), restores those weights and evaluates the test split once. The same code
runs on one CPU, one GPU, or several processes under `accelerate launch`.

Splits are dicts of tensors already in memory: the batch sampler yields lists of row indices and
the dataset slices every tensor once per batch (`__getitems__`). This avoids per-sample indexing
and collation, which dominate the step time of small CTR models on CPU.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from kar.metrics import ctr_metrics
from kar.registry import ConfigError
from kar.tracking import NullTracker, Tracker

logger = logging.getLogger("kar.engine")

Split = dict[str, Tensor]
MetricsFn = Callable[[np.ndarray, np.ndarray], dict[str, float]]
SPLIT_NAMES = ("train", "valid", "test")
MIXED_PRECISION_MODES = ("no", "fp16", "bf16")


@dataclass
class TrainConfig:
    """Optimisation settings (the `train` config group)."""

    max_epochs: int = 20
    batch_size: int = 1024
    eval_batch_size: int = 8192
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 2  # epochs without validation improvement before stopping
    grad_clip: float = 10.0  # max gradient norm; 0 disables clipping
    warmup_ratio: float = 0.0  # fraction of all optimizer steps spent warming up linearly
    min_lr_ratio: float = 0.0  # the cosine schedule ends at lr * min_lr_ratio
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    cpu: bool = False  # force CPU even when an accelerator is present
    log_every_n_steps: int = 50  # 0 = log per epoch only
    num_threads: int = 0  # torch intra-op threads; 0 = torch default


@dataclass
class FitResult:
    """Outcome of `fit`: metrics of the best epoch on validation, and on test."""

    valid: dict[str, float]
    test: dict[str, float]
    best_epoch: int
    epochs_run: int
    history: list[dict] = field(default_factory=list)  # one entry per epoch
    # split -> (labels, logits) of every sample in split order: validation at the best epoch,
    # test once; for metrics on slices of a split.
    predictions: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def validate_config(cfg: TrainConfig) -> None:
    """Raise ConfigError naming the first invalid setting."""
    positive = {
        "max_epochs": cfg.max_epochs,
        "batch_size": cfg.batch_size,
        "eval_batch_size": cfg.eval_batch_size,
        "patience": cfg.patience,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"train.{key}={value} must be >= 1")
    non_negative = {
        "weight_decay": cfg.weight_decay,
        "grad_clip": cfg.grad_clip,
        "log_every_n_steps": cfg.log_every_n_steps,
        "num_threads": cfg.num_threads,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"train.{key}={value} must be >= 0")
    if cfg.lr <= 0:
        raise ConfigError(f"train.lr={cfg.lr} must be > 0")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        raise ConfigError(f"train.warmup_ratio={cfg.warmup_ratio} must be in [0, 1)")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio={cfg.min_lr_ratio} must be in [0, 1]")
    if cfg.mixed_precision not in MIXED_PRECISION_MODES:
        raise ConfigError(
            f"train.mixed_precision={cfg.mixed_precision!r} is not one of "
            f"{', '.join(MIXED_PRECISION_MODES)}"
        )


def validate_splits(splits: Mapping[str, Split]) -> None:
    """Raise ValueError unless train/valid/test exist, hold "label", and agree on sample count."""
    for name in SPLIT_NAMES:
        if name not in splits:
            raise ValueError(
                f"split {name!r} is missing (got {sorted(splits)}); fit needs train, valid, test"
            )
        split = splits[name]
        if "label" not in split:
            raise ValueError(f"split {name!r} has no 'label' tensor (keys: {sorted(split)})")
        n = len(split["label"])
        if n == 0:
            raise ValueError(f"split {name!r} is empty")
        for key, tensor in split.items():
            if len(tensor) != n:
                raise ValueError(
                    f"split {name!r}: tensor {key!r} has {len(tensor)} rows, 'label' has {n}; "
                    "every tensor of a split must share the first dimension"
                )


class SplitBatches(Dataset):
    """A split dict whose `__getitems__` slices a whole batch at once.

    torch's DataLoader calls `__getitems__(indices)` with the batch sampler's index list when
    the dataset defines it, instead of `__getitem__` once per sample.
    """

    def __init__(self, split: Split) -> None:
        self.split = split
        self.n_rows = len(split["label"])

    def __len__(self) -> int:
        return self.n_rows

    def __getitems__(self, rows: list[int]) -> Split:
        index = torch.as_tensor(rows, dtype=torch.long)  # (B,)
        return {key: tensor[index] for key, tensor in self.split.items()}

    def __getitem__(self, row: int) -> Split:
        return {key: tensor[row] for key, tensor in self.split.items()}


def _already_collated(batch: Split) -> Split:
    return batch


class EpochPermutation(Sampler[int]):
    """A shuffle of range(n) that depends only on (seed, epoch).

    Every process draws the same permutation without sharing RNG state, which accelerate's batch
    sharding needs, and a rerun with the same seed sees the same batches.
    """

    def __init__(self, n_rows: int, seed: int) -> None:
        self.n_rows = n_rows
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(
            int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        )
        return iter(torch.randperm(self.n_rows, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n_rows


def make_loader(split: Split, batch_size: int, *, shuffle: EpochPermutation | None) -> DataLoader:
    """A DataLoader of whole-batch dicts; `shuffle` None = sequential order (evaluation)."""
    order: Sampler[int] = (
        shuffle if shuffle is not None else SequentialSampler(range(len(split["label"])))
    )
    return DataLoader(
        SplitBatches(split),
        batch_sampler=BatchSampler(order, batch_size=batch_size, drop_last=False),
        collate_fn=_already_collated,
    )


def _check_logits(logits: Tensor, labels: Tensor) -> None:
    if logits.shape != labels.shape:
        raise ValueError(
            f"model returned logits of shape {tuple(logits.shape)} for labels of shape "
            f"{tuple(labels.shape)}; the model contract is model(batch) -> logits (B,)"
        )


@torch.no_grad()
def predict(
    model: nn.Module, loader: DataLoader, accelerator: Accelerator
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, logits) of every sample of `loader`, gathered from all processes, in order."""
    model.eval()
    labels: list[Tensor] = []
    logits: list[Tensor] = []
    for batch in loader:
        batch_logits = model(batch)
        _check_logits(batch_logits, batch["label"])
        # gather_for_metrics drops the samples accelerate repeated to give processes equal batches
        batch_logits, batch_labels = accelerator.gather_for_metrics(
            (batch_logits.float(), batch["label"].float())
        )
        logits.append(batch_logits.cpu())
        labels.append(batch_labels.cpu())
    return torch.cat(labels).numpy(), torch.cat(logits).numpy()


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}


def _train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    accelerator: Accelerator,
    cfg: TrainConfig,
    *,
    log: Tracker,
    global_step: int,
    description: str,
) -> tuple[float, int]:
    """One pass over `loader`; returns (mean loss over all processes, updated global step)."""
    model.train()
    loss_fn = nn.BCEWithLogitsLoss()
    loss_sum = torch.zeros((), device=accelerator.device)
    n_batches = 0
    # disable=None: no bar when stdout is not a terminal (log files, CI), only the epoch lines.
    progress = tqdm(
        loader,
        desc=description,
        disable=None if accelerator.is_local_main_process else True,
        leave=False,
    )
    for batch in progress:
        logits = model(batch)
        _check_logits(logits, batch["label"])
        loss = loss_fn(logits.float(), batch["label"].float())
        accelerator.backward(loss)
        if cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        global_step += 1
        loss_sum += loss.detach()
        n_batches += 1
        if cfg.log_every_n_steps and global_step % cfg.log_every_n_steps == 0:
            step_loss = loss.item()  # a device sync: only every n steps
            progress.set_postfix(loss=f"{step_loss:.4f}")
            log.log(
                {"train/loss": step_loss, "train/lr": scheduler.get_last_lr()[0]},
                step=global_step,
            )
    mean_loss = accelerator.reduce(loss_sum / max(n_batches, 1), reduction="mean")
    return mean_loss.item(), global_step


def fit(
    model: nn.Module,
    splits: Mapping[str, Split],
    cfg: TrainConfig,
    *,
    seed: int,
    checkpoint_path: Path,
    tracker: Tracker | None = None,
    metrics_fn: MetricsFn = ctr_metrics,
    monitor: str = "auc",
) -> FitResult:
    """Train `model` on splits["train"], early-stop on splits["valid"], evaluate splits["test"].

    `model(batch) -> logits` shaped like batch["label"]; loss = BCEWithLogits. After each epoch
    the validation metrics (`metrics_fn(labels, logits)`) are computed; the epoch with the
    highest `monitor` value is kept: its state_dict is written to `checkpoint_path` (main process)
    and loaded back into `model` at the end, before the single test evaluation. Training stops
    after `cfg.patience` epochs without improvement. Deterministic for a given `seed` on CPU.
    """
    validate_config(cfg)
    validate_splits(splits)
    with _intra_op_threads(cfg.num_threads):
        return _fit(
            model,
            splits,
            cfg,
            seed=seed,
            checkpoint_path=Path(checkpoint_path),
            tracker=tracker,
            metrics_fn=metrics_fn,
            monitor=monitor,
        )


@contextmanager
def _intra_op_threads(n_threads: int) -> Iterator[None]:
    """Use `n_threads` torch threads inside the block (0 = leave as is), then restore."""
    previous = torch.get_num_threads()
    if n_threads > 0:
        torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _adamw(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where torch has one for the parameters' device.

    The unfused CPU AdamW loops over parameters with several ops each: for the small CTR
    models here that took about a third of the training step, the fused kernel a quarter of
    that. The update is the same up to float rounding.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _fit(
    model: nn.Module,
    splits: Mapping[str, Split],
    cfg: TrainConfig,
    *,
    seed: int,
    checkpoint_path: Path,
    tracker: Tracker | None,
    metrics_fn: MetricsFn,
    monitor: str,
) -> FitResult:
    accelerator = Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision)
    set_seed(seed)
    log = tracker if tracker is not None and accelerator.is_main_process else NullTracker()

    train_order = EpochPermutation(len(splits["train"]["label"]), seed)
    train_loader = make_loader(splits["train"], cfg.batch_size, shuffle=train_order)
    valid_loader = make_loader(splits["valid"], cfg.eval_batch_size, shuffle=None)
    test_loader = make_loader(splits["test"], cfg.eval_batch_size, shuffle=None)

    optimizer = _adamw(model, cfg)
    # accelerate steps a prepared scheduler once per process per optimizer step, so the schedule
    # is counted in whole-dataset batches: per-process steps x processes.
    steps_per_process = math.ceil(len(train_loader) / accelerator.num_processes)
    total_steps = cfg.max_epochs * steps_per_process * accelerator.num_processes
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=int(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
        min_lr_rate=cfg.min_lr_ratio,
    )
    model, optimizer, train_loader, valid_loader, test_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, valid_loader, test_loader, scheduler
    )

    history: list[dict] = []
    best_value = -math.inf
    best_epoch = 0
    best_state: dict[str, Tensor] | None = None
    best_valid: dict[str, float] = {}
    best_valid_prediction: tuple[np.ndarray, np.ndarray] | None = None
    epochs_without_improvement = 0
    global_step = 0

    for epoch in range(1, cfg.max_epochs + 1):
        started = time.perf_counter()
        train_order.set_epoch(epoch)
        train_loss, global_step = _train_epoch(
            model,
            train_loader,
            optimizer,
            scheduler,
            accelerator,
            cfg,
            log=log,
            global_step=global_step,
            description=f"epoch {epoch}/{cfg.max_epochs}",
        )
        # _train_epoch returns a .item(), so queued device work is done: the time is real.
        train_seconds = time.perf_counter() - started
        valid_prediction = predict(model, valid_loader, accelerator)
        valid = metrics_fn(*valid_prediction)
        if monitor not in valid:
            raise ValueError(
                f"monitor {monitor!r} is not a metric name; metrics are {sorted(valid)}"
            )
        lr = scheduler.get_last_lr()[0]
        samples_per_s = len(splits["train"]["label"]) / train_seconds
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "lr": lr,
                "train_seconds": train_seconds,
                "train_samples_per_s": samples_per_s,
            }
            | {f"valid_{key}": value for key, value in valid.items()}
        )
        log.log(
            {
                "epoch": epoch,
                "train/epoch_loss": train_loss,
                "train/lr": lr,
                "train/samples_per_s": samples_per_s,
            }
            | {f"valid/{key}": value for key, value in valid.items()}
            | {"epoch_seconds": time.perf_counter() - started},
            step=global_step,
        )
        if accelerator.is_local_main_process:
            logger.info(
                "epoch %d: train loss %.4f, %s, %.0f train samples/s",
                epoch,
                train_loss,
                ", ".join(f"valid {key} {value:.4f}" for key, value in valid.items()),
                samples_per_s,
            )

        if valid[monitor] > best_value:
            best_value, best_epoch, best_valid = valid[monitor], epoch, valid
            best_valid_prediction = valid_prediction
            epochs_without_improvement = 0
            # In memory for the restore (no shared filesystem needed), on disk for later use.
            best_state = _cpu_state(accelerator.unwrap_model(model))
            if accelerator.is_main_process:
                checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
            accelerator.save(best_state, checkpoint_path)
        else:
            epochs_without_improvement += 1
            if epochs_without_improvement >= cfg.patience:
                break

    # the first epoch always improves on -inf
    assert best_state is not None and best_valid_prediction is not None
    accelerator.unwrap_model(model).load_state_dict(best_state)
    test_prediction = predict(model, test_loader, accelerator)
    test = metrics_fn(*test_prediction)
    log.summary(
        {"best_epoch": best_epoch, "epochs_run": len(history)}
        | {f"valid/best_{key}": value for key, value in best_valid.items()}
        | {f"test/{key}": value for key, value in test.items()}
    )
    accelerator.wait_for_everyone()
    # Hand back the caller's module without accelerate's mixed-precision forward wrapper.
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    return FitResult(
        valid=best_valid,
        test=test,
        best_epoch=best_epoch,
        epochs_run=len(history),
        history=history,
        predictions={"valid": best_valid_prediction, "test": test_prediction},
    )
