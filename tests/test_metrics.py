"""Metrics against values worked out by hand from their definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import ndcg_score

from kar.metrics import auc, ctr_metrics, logloss, map_at_k, ndcg_at_k, rerank_metrics


def test_auc_is_the_fraction_of_correctly_ordered_pairs() -> None:
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4) -> 3/4
    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)


def test_auc_counts_ties_as_half() -> None:
    # positives 0.5, 0.9 vs negatives 0.5, 0.2: tie (0.5) + 1 + 1 + 1 -> 3.5/4
    assert auc(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.2, 0.9])) == pytest.approx(0.875)


def test_auc_rejects_a_single_class_and_non_finite_scores() -> None:
    with pytest.raises(ValueError, match="single class"):
        auc(np.array([1, 1, 1]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="NaN"):
        auc(np.array([0, 1]), np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="0/1"):
        auc(np.array([0, 2]), np.array([0.1, 0.3]))


def test_logloss_is_mean_binary_cross_entropy() -> None:
    expected = -(math.log(0.8) + math.log(1 - 0.4)) / 2
    assert logloss(np.array([1, 0]), np.array([0.8, 0.4])) == pytest.approx(expected)


def test_logloss_clips_certain_wrong_predictions_to_1e_minus_7() -> None:
    value = logloss(np.array([0, 1]), np.array([1.0, 0.0]))
    assert value == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_ctr_metrics_apply_the_sigmoid_to_logits() -> None:
    logits = np.array([0.0, math.log(4.0)])  # sigmoid -> 0.5, 0.8
    metrics = ctr_metrics(np.array([0.0, 1.0]), logits)
    assert set(metrics) == {"auc", "logloss"}
    assert metrics["auc"] == pytest.approx(1.0)
    assert metrics["logloss"] == pytest.approx(-(math.log(0.5) + math.log(0.8)) / 2)


# One list already in score order; hits (label 1) at positions 2, 4, 5.
LIST_LABELS = np.array([[0, 1, 0, 1, 1]])
LIST_SCORES = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])


def test_map_at_k_averages_precision_at_each_hit_in_the_top_k() -> None:
    assert map_at_k(LIST_LABELS, LIST_SCORES, 1) == 0.0  # no hit in the top 1
    assert map_at_k(LIST_LABELS, LIST_SCORES, 3) == pytest.approx(1 / 2)  # P@2 over 1 hit
    assert map_at_k(LIST_LABELS, LIST_SCORES, 5) == pytest.approx((1 / 2 + 2 / 4 + 3 / 5) / 3)
    # K beyond the list length means the whole list
    assert map_at_k(LIST_LABELS, LIST_SCORES, 7) == map_at_k(LIST_LABELS, LIST_SCORES, 5)


def test_map_at_k_ranks_by_score_not_by_input_order() -> None:
    # reversing the scores puts the hits at positions 1, 2, 4
    reversed_scores = LIST_SCORES[:, ::-1].copy()
    expected = (1 / 1 + 2 / 2 + 3 / 4) / 3
    assert map_at_k(LIST_LABELS, reversed_scores, 5) == pytest.approx(expected)


def test_ndcg_at_k_with_binary_relevance() -> None:
    # DCG@3 = 1/log2(3); ideal order [1, 1, 1]: 1 + 1/log2(3) + 1/log2(4)
    expected = (1 / math.log2(3)) / (1 + 1 / math.log2(3) + 1 / 2)
    assert ndcg_at_k(LIST_LABELS, LIST_SCORES, 3) == pytest.approx(expected)
    assert ndcg_at_k(LIST_LABELS, LIST_SCORES, 1) == 0.0


def test_ndcg_at_k_uses_exponential_gain_unlike_sklearn() -> None:
    labels = np.array([[2, 0, 1]])
    scores = np.array([[0.1, 0.9, 0.5]])  # ranked relevances: 0, 1, 2
    dcg = (2**1 - 1) / math.log2(3) + (2**2 - 1) / math.log2(4)
    ideal = (2**2 - 1) / math.log2(2) + (2**1 - 1) / math.log2(3)
    value = ndcg_at_k(labels, scores, 3)
    assert value == pytest.approx(dcg / ideal)
    # sklearn's linear gain gives another number: the reason for our own implementation
    assert ndcg_score(labels, scores, k=3) != pytest.approx(value)


def test_rerank_metrics_average_over_lists_and_score_empty_lists_zero() -> None:
    labels = np.array([[0, 1, 0, 1, 1], [0, 0, 0, 0, 0]])
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5], [0.5, 0.4, 0.3, 0.2, 0.1]])
    metrics = rerank_metrics(labels, scores, ks=(3, 5))
    assert set(metrics) == {"map@3", "ndcg@3", "map@5", "ndcg@5"}
    assert metrics["map@5"] == pytest.approx((1 / 2 + 2 / 4 + 3 / 5) / 3 / 2)
    assert metrics["ndcg@3"] == pytest.approx(ndcg_at_k(labels[:1], scores[:1], 3) / 2)


def test_tied_scores_keep_the_original_list_order() -> None:
    labels = np.array([[0, 1]])
    scores = np.array([[0.5, 0.5]])
    assert map_at_k(labels, scores, 1) == 0.0
    assert ndcg_at_k(labels, scores, 1) == 0.0


def _reference_map_ndcg(labels: list[int], scores: list[float], k: int) -> tuple[float, float]:
    """The definitions written as plain loops over one list."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable
    ideal = sorted(labels, reverse=True)
    hits, precision_sum, dcg, ideal_dcg = 0, 0.0, 0.0, 0.0
    for position in range(1, min(k, len(labels)) + 1):
        rel = labels[order[position - 1]]
        dcg += (2**rel - 1) / math.log2(position + 1)
        ideal_dcg += (2 ** ideal[position - 1] - 1) / math.log2(position + 1)
        if rel >= 1:
            hits += 1
            precision_sum += hits / position
    return (precision_sum / hits if hits else 0.0), (dcg / ideal_dcg if ideal_dcg else 0.0)


@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_vectorised_rerank_metrics_match_the_loop_definition(k: int) -> None:
    rng = np.random.default_rng(k)
    labels = rng.integers(0, 3, size=(50, 10))
    scores = rng.normal(size=(50, 10)).round(1)  # rounding creates ties
    expected = np.array(
        [
            _reference_map_ndcg(list(lab), list(sc), k)
            for lab, sc in zip(labels, scores, strict=True)
        ]
    ).mean(axis=0)
    assert map_at_k(labels, scores, k) == pytest.approx(expected[0])
    assert ndcg_at_k(labels, scores, k) == pytest.approx(expected[1])


def test_rerank_metrics_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="n_lists, list_len"):
        map_at_k(np.zeros((2, 5)), np.zeros((2, 4)), 3)
    with pytest.raises(ValueError, match="k must be"):
        ndcg_at_k(np.zeros((2, 5)), np.zeros((2, 5)), 0)
