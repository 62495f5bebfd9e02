"""Slices of a split (cold items, users with short histories), checked against plain counting."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from kar.data.protocol import build_ctr_data
from kar.metrics import ctr_metrics
from kar.slices import SliceConfig, ratings_per_user, slice_masks, slice_metrics
from test_protocol import TOY_SPLIT, toy_raw


def test_masks_follow_the_thresholds_on_hand_counted_data() -> None:
    raw = toy_raw()
    data = build_ctr_data(raw, **TOY_SPLIT)
    # Counted from the raw ratings, independently of the protocol's tensors.
    ratings_of = Counter(raw.ratings["user_id"])
    train_of = Counter(data.item_ids[i - 1] for i in data.splits["train"]["item"].tolist())

    assert ratings_per_user(data).tolist() == [0] + [ratings_of[u] for u in data.user_ids]
    for cfg in (SliceConfig(1, 5), SliceConfig(3, 12), SliceConfig(0, 0)):
        for split in ("train", "valid", "test"):
            masks = slice_masks(data, split, cfg)
            samples = data.splits[split]
            items = [data.item_ids[i - 1] for i in samples["item"].tolist()]
            users = [data.user_ids[u - 1] for u in samples["user"].tolist()]
            assert masks["cold_items"].tolist() == [
                train_of[i] <= cfg.cold_item_max_train for i in items
            ]
            assert masks["short_history_users"].tolist() == [
                ratings_of[u] <= cfg.short_user_max_ratings for u in users
            ]


def test_slice_metrics_score_only_the_masked_samples() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200).astype(np.float32)
    logits = rng.normal(size=200) + labels  # informative, so the AUCs differ by slice
    first_half = np.arange(200) < 100
    only_positives = labels == 1

    result = slice_metrics(
        labels, logits, {"half": first_half, "positives": only_positives}, ctr_metrics
    )

    assert result["half"] == {
        "samples": 100,
        "positive_rate": pytest.approx(labels[:100].mean()),
        **ctr_metrics(labels[:100], logits[:100]),
    }
    # One class only: no AUC, but the count says why.
    assert result["positives"] == {
        "samples": int(only_positives.sum()),
        "positive_rate": 1.0,
    }


def test_a_mask_of_another_split_is_refused() -> None:
    with pytest.raises(ValueError, match="same split"):
        slice_metrics(np.zeros(4), np.zeros(4), {"x": np.ones(5, dtype=bool)}, ctr_metrics)
