"""Metrics on the slices where open-world knowledge should matter most.

- ``cold_items``: samples whose item has at most ``cold_item_max_train`` training samples, so
  the item-id embedding has learned little and facts about the item are all the model knows.
- ``short_history_users``: samples of users with at most ``short_user_max_ratings`` ratings in
  all (knowledge prefix included), whose preferences the rating history shows least.

A slice is a boolean mask over a split's samples, computed from the protocol's tensors only, so
every run on the same data (bare or KAR, any seed) is scored on exactly the same samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kar.data.protocol import CTRData


@dataclass
class SliceConfig:
    """Slice thresholds (the ``task.slices`` config node)."""

    cold_item_max_train: int = 20
    short_user_max_ratings: int = 40


def ratings_per_user(data: CTRData) -> np.ndarray:
    """(n_users + 1,) ratings each user has in all: knowledge prefix plus samples; row 0 = 0."""
    counts = np.zeros(data.feature_spec["user"], dtype=np.int64)
    for split in data.splits.values():
        counts += np.bincount(split["user"].numpy(), minlength=len(counts))
    prefix = np.array([0] + [len(data.prefixes.get(uid, [])) for uid in data.user_ids])
    return counts + prefix


def slice_masks(data: CTRData, split: str, cfg: SliceConfig) -> dict[str, np.ndarray]:
    """Slice name -> boolean mask over the samples of `split`, in split order."""
    samples = data.splits[split]
    train_per_item = np.bincount(
        data.splits["train"]["item"].numpy(), minlength=data.feature_spec["item"]
    )
    items = samples["item"].numpy()
    users = samples["user"].numpy()
    return {
        "cold_items": train_per_item[items] <= cfg.cold_item_max_train,
        "short_history_users": ratings_per_user(data)[users] <= cfg.short_user_max_ratings,
    }


def slice_metrics(
    labels: np.ndarray,
    logits: np.ndarray,
    masks: dict[str, np.ndarray],
    metrics_fn: Callable[[np.ndarray, np.ndarray], dict[str, float]],
) -> dict[str, dict[str, float | int | None]]:
    """Per slice: its sample count, positive rate and metrics.

    A slice with no samples or a single class has no AUC: it keeps its count and positive rate,
    so the report can say why its metrics are missing.
    """
    result: dict[str, dict[str, float | int | None]] = {}
    for name, mask in masks.items():
        if len(mask) != len(labels):
            raise ValueError(
                f"slice {name!r} has {len(mask)} entries for {len(labels)} predictions; "
                "masks must come from the same split as the predictions"
            )
        y, z = labels[mask], logits[mask]
        entry: dict[str, float | int | None] = {
            "samples": int(mask.sum()),
            "positive_rate": float(y.mean()) if len(y) else None,
        }
        if len(np.unique(y)) == 2:
            entry |= metrics_fn(y, z)
        result[name] = entry
    return result
