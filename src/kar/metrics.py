"""Evaluation metrics: CTR (AUC, logloss) and list reranking (MAP@K, NDCG@K).

CTR metrics come from scikit-learn. The reranking metrics follow the KAR protocol, which
scikit-learn does not offer: `sklearn.metrics.ndcg_score` uses the linear gain `rel`, while KAR
uses the exponential gain `2^rel - 1`, and KAR's MAP@K divides by the number of hits inside the
top K (not by the number of relevant items), so both are written here with numpy.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit
from sklearn.metrics import log_loss, roc_auc_score

PROB_EPS = 1e-7
RERANK_KS: tuple[int, ...] = (1, 3, 5, 7)


def _as_1d(name: str, values: np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{name} is empty; metrics need at least one sample")
    if not np.all(np.isfinite(array)):
        raise ValueError(
            f"{name} contains NaN or inf; the model diverged or the data has missing values"
        )
    return array


def _check_binary(labels: np.ndarray) -> None:
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError(f"labels must be 0/1, got values {np.unique(labels)[:10].tolist()}")


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC: the fraction of (positive, negative) pairs ordered correctly; ties count 1/2."""
    y = _as_1d("labels", labels)
    s = _as_1d("scores", scores)
    _check_binary(y)
    if len(np.unique(y)) < 2:
        raise ValueError(
            "AUC is undefined when the labels hold a single class; "
            "evaluate on a split with both positive and negative samples"
        )
    return float(roc_auc_score(y, s))


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary cross-entropy, probabilities clipped to [1e-7, 1 - 1e-7]."""
    y = _as_1d("labels", labels)
    p = np.clip(_as_1d("probs", probs), PROB_EPS, 1.0 - PROB_EPS)
    _check_binary(y)
    return float(log_loss(y, p, labels=[0.0, 1.0]))


def ctr_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """{"auc", "logloss"} of raw model logits; the only place the sigmoid is applied."""
    logits_1d = _as_1d("logits", logits)
    return {"auc": auc(labels, logits_1d), "logloss": logloss(labels, expit(logits_1d))}


def _ranked_relevance(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Relevance of each list's items sorted by descending score: (n_lists, list_len).

    Ties keep the original list order (stable sort), as the official KAR evaluation does.
    """
    rel = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if rel.ndim != 2 or rel.shape != s.shape:
        raise ValueError(
            f"labels and scores must both be (n_lists, list_len), got {rel.shape} and {s.shape}"
        )
    if rel.shape[0] == 0:
        raise ValueError("no lists to evaluate")
    order = np.argsort(-s, axis=1, kind="stable")  # (n_lists, list_len)
    return np.take_along_axis(rel, order, axis=1)  # (n_lists, list_len)


def _check_k(k: int, list_len: int) -> int:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return min(k, list_len)


def map_at_k(labels: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Mean over lists of AP@K = sum_{hits i <= K} precision@i / (number of hits in the top K).

    `labels`, `scores`: (n_lists, list_len); an item is a hit when its label is >= 1. A list with
    no hit in its top K scores 0.
    """
    ranked = _ranked_relevance(labels, scores)
    k = _check_k(k, ranked.shape[1])
    hits = (ranked[:, :k] >= 1).astype(np.float64)  # (n_lists, k)
    hits_so_far = np.cumsum(hits, axis=1)  # (n_lists, k)
    positions = np.arange(1, k + 1, dtype=np.float64)  # (k,)
    precision_sum = (hits * hits_so_far / positions).sum(axis=1)  # (n_lists,)
    n_hits = hits.sum(axis=1)  # (n_lists,)
    ap = np.divide(precision_sum, n_hits, out=np.zeros_like(n_hits), where=n_hits > 0)
    return float(ap.mean())


def ndcg_at_k(labels: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Mean over lists of DCG@K / ideal DCG@K, gain 2^rel - 1, discount log2(position + 1).

    `labels` are graded (or binary) relevances, `scores` the model's; both (n_lists, list_len).
    A list whose ideal DCG is 0 (no relevant item) scores 0.
    """
    ranked = _ranked_relevance(labels, scores)
    k = _check_k(k, ranked.shape[1])
    ideal = -np.sort(-np.asarray(labels, dtype=np.float64), axis=1)  # (n_lists, list_len)
    discount = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))  # (k,)
    dcg = ((np.exp2(ranked[:, :k]) - 1.0) * discount).sum(axis=1)  # (n_lists,)
    ideal_dcg = ((np.exp2(ideal[:, :k]) - 1.0) * discount).sum(axis=1)  # (n_lists,)
    ndcg = np.divide(dcg, ideal_dcg, out=np.zeros_like(dcg), where=ideal_dcg > 0)
    return float(ndcg.mean())


def rerank_metrics(
    labels: np.ndarray, scores: np.ndarray, ks: tuple[int, ...] = RERANK_KS
) -> dict[str, float]:
    """{"map@K", "ndcg@K"} for every K in `ks`; inputs (n_lists, list_len)."""
    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"map@{k}"] = map_at_k(labels, scores, k)
        metrics[f"ndcg@{k}"] = ndcg_at_k(labels, scores, k)
    return metrics
