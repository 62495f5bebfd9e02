"""The KAR data protocol: raw ratings -> CTR samples, knowledge prefixes and user-disjoint splits.

Per user, ratings are put in time order (ties keep file order, as the released knowledge files
do). The first k ratings are the *knowledge prefix*: the LLM sees them in the user prompt, so they
never become samples (that would leak the prompt into training and test). Every later rating is
one sample whose behaviour history is the ratings just before it — prefix ratings included, since
the model may know what the LLM knew. Users, not ratings, are split, so test users are unseen.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kar.data.raw import RawData
from kar.errors import DataError
from kar.registry import ConfigError

SPLITS = ("train", "valid", "test")
PROFILE_FIELDS = ("gender", "age", "occupation")
FEATURE_SPEC_KEYS = ("user", "item", "genre", "gender", "age", "occupation", "rating")


@dataclass
class CTRData:
    """Tensors of the three splits plus what is needed to tie them back to raw ids.

    - ``splits[name][feature]``: the batch format of the project contract, N samples per split,
      ordered by user then time.
    - ``feature_spec``: vocabulary size (padding 0 included) per categorical feature.
    - ``user_ids[i - 1]`` / ``item_ids[i - 1]``: raw id of internal index i.
    - ``prefixes[raw_user_id]``: the knowledge prefix, [(raw item id, rating)] oldest first.
    - ``rows[name]``: for each sample, its row in ``RawData.ratings`` (file order), to trace a
      sample back to its rating (user, item, timestamp).
    """

    splits: dict[str, dict[str, torch.Tensor]]
    feature_spec: dict[str, int]
    user_ids: list[str]
    item_ids: list[str]
    prefixes: dict[str, list[tuple[str, int]]]
    rows: dict[str, torch.Tensor] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        """Write to `path` atomically (a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "splits": self.splits,
            "feature_spec": self.feature_spec,
            "user_ids": self.user_ids,
            "item_ids": self.item_ids,
            "prefixes": self.prefixes,
            "rows": self.rows,
        }
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as sink:
                torch.save(payload, sink)
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> CTRData:
        # weights_only: the file holds only tensors and plain containers, so no code can run.
        payload = torch.load(Path(path), weights_only=True)
        expected = {"splits", "feature_spec", "user_ids", "item_ids", "prefixes", "rows"}
        if not isinstance(payload, dict) or set(payload) != expected:
            found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
            raise ValueError(
                f"{path} is not a saved CTRData (found {found}); delete it so that it is rebuilt"
            )
        return cls(**payload)

    def summary(self) -> str:
        lines = []
        for name, split in self.splits.items():
            n = len(split["label"])
            positive = float(split["label"].mean()) if n else float("nan")
            users = len(torch.unique(split["user"]))
            lines.append(f"{name}: {n:,} samples, {positive:.1%} positive, {users:,} users")
        spec = ", ".join(f"{k}={v}" for k, v in self.feature_spec.items())
        lines.append(f"vocabulary sizes (incl. padding 0): {spec}")
        n_prefix = sum(len(p) for p in self.prefixes.values())
        lines.append(f"knowledge prefixes: {n_prefix:,} ratings of {len(self.prefixes):,} users")
        return "\n".join(lines)


def build_ctr_data(
    raw: RawData,
    *,
    label_threshold: int = 3,
    history_len: int = 10,
    prefix_max: int = 30,
    test_ratio: float = 0.1,
    valid_ratio: float = 0.1,
    seed: int = 42,
    prefix_lengths: Mapping[str, int] | None = None,
) -> CTRData:
    """Apply the KAR protocol to `raw` (see module doc).

    Prefix length per user is ``min((n + 1) // 2, prefix_max)`` unless `prefix_lengths` (raw user
    id -> k, e.g. a knowledge file's ``begin_index.json``) fixes it. `test_ratio` of the users
    (seeded permutation of the sorted raw ids) form the test split, `valid_ratio` of the rest the
    validation split.
    """
    _check_settings(history_len, prefix_max, test_ratio, valid_ratio)
    user_ids = raw.users["user_id"].astype(str).tolist()
    item_ids = raw.items["item_id"].astype(str).tolist()
    item_genres, genre_vocab = _item_genre_table(raw.items["genres"])  # (n_items + 1, G)
    profile, profile_sizes = _profile_table(raw.users)  # field -> (n_users + 1,)

    # Ratings as internal indices, then ordered by user, time, and file position for ties.
    user = pd.Index(user_ids).get_indexer(raw.ratings["user_id"].astype(str)) + 1  # (R,)
    item = pd.Index(item_ids).get_indexer(raw.ratings["item_id"].astype(str)) + 1  # (R,)
    rating = raw.ratings["rating"].to_numpy(np.int64)
    timestamp = raw.ratings["timestamp"].to_numpy(np.int64)
    if len(rating) and rating.min() < 1:
        raise ValueError(
            f"ratings must be >= 1 (0 pads the history), found {rating.min()}; fix the reader"
        )
    file_position = np.arange(len(rating))
    order = np.lexsort((file_position, timestamp, user))  # (R,) last key is the primary one
    user, item, rating = user[order], item[order], rating[order]

    counts = np.bincount(user, minlength=len(user_ids) + 1)  # (n_users + 1,)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])  # first sorted row of each user
    position = np.arange(len(user)) - starts[user]  # (R,) index in the user's time line
    k = _prefix_length_per_user(user_ids, counts, prefix_max, prefix_lengths)  # (n_users + 1,)

    samples = np.flatnonzero(position >= k[user])  # (S,) sorted rows that become samples
    # Group samples by split so that every split is one slice of each feature array; the sort
    # is stable, so inside a split samples stay in user-then-time order.
    split_code = _split_users(user_ids, test_ratio, valid_ratio, seed)[user[samples]]  # (S,)
    samples = samples[np.argsort(split_code, kind="stable")]
    bounds = np.concatenate([[0], np.cumsum(np.bincount(split_code, minlength=len(SPLITS)))])

    s_user, s_item = user[samples], item[samples]
    hist_len = np.minimum(position[samples], history_len)  # (S,)
    # History of sorted row j = rows j - hist_len .. j - 1, oldest first, right-padded.
    slot = np.arange(history_len)  # (L,)
    valid_slot = slot[None, :] < hist_len[:, None]  # (S, L)
    hist_rows = np.where(valid_slot, samples[:, None] - hist_len[:, None] + slot, 0)  # (S, L)
    hist_items = np.where(valid_slot, item[hist_rows], 0)  # (S, L)

    features = {
        "label": (rating[samples] > label_threshold).astype(np.float32),
        "user": s_user,
        "item": s_item,
        "item_genres": item_genres[s_item],  # (S, G)
        **{name: table[s_user] for name, table in profile.items()},
        "hist_items": hist_items,
        "hist_genres": item_genres[hist_items],  # (S, L, G); row 0 of the table is all padding
        "hist_ratings": np.where(valid_slot, rating[hist_rows], 0),  # (S, L)
        "hist_len": hist_len,
    }
    splits = {
        name: {key: torch.from_numpy(values[lo:hi]) for key, values in features.items()}
        for name, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:], strict=True)
    }
    rows = {
        name: torch.from_numpy(order[samples[lo:hi]])
        for name, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:], strict=True)
    }

    prefixes = {
        raw_id: list(
            zip(
                [item_ids[i - 1] for i in item[starts[u] : starts[u] + k[u]]],
                rating[starts[u] : starts[u] + k[u]].tolist(),
                strict=True,
            )
        )
        for u, raw_id in enumerate(user_ids, start=1)
    }
    feature_spec = {
        "user": len(user_ids) + 1,
        "item": len(item_ids) + 1,
        "genre": len(genre_vocab) + 1,
        **profile_sizes,
        "rating": int(rating.max()) + 1 if len(rating) else 1,
    }
    return CTRData(
        splits=splits,
        feature_spec={key: feature_spec[key] for key in FEATURE_SPEC_KEYS},
        user_ids=user_ids,
        item_ids=item_ids,
        prefixes=prefixes,
        rows=rows,
    )


def _check_settings(
    history_len: int, prefix_max: int, test_ratio: float, valid_ratio: float
) -> None:
    if history_len < 1:
        raise ConfigError(f"history_len must be >= 1, got {history_len}")
    if prefix_max < 0:
        raise ConfigError(f"prefix_max must be >= 0, got {prefix_max}")
    for name, ratio in (("test_ratio", test_ratio), ("valid_ratio", valid_ratio)):
        if not 0.0 <= ratio < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {ratio}")


def _item_genre_table(genres: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Genre indices per internal item (row 0 = padding item) and the genre vocabulary.

    Genres are numbered in order of first appearance in the item table.
    """
    vocab: dict[str, int] = {}
    for item_genres in genres:
        for genre in item_genres:
            vocab.setdefault(genre, len(vocab) + 1)
    width = max((len(g) for g in genres), default=0) or 1
    table = np.zeros((len(genres) + 1, width), dtype=np.int64)  # (n_items + 1, G)
    for row, item_genres in enumerate(genres, start=1):
        table[row, : len(item_genres)] = [vocab[g] for g in item_genres]
    return table, list(vocab)


def _profile_table(users: pd.DataFrame) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Per profile field: category index per internal user (row 0 = padding), and vocab size.

    Categories are numbered in sorted order (ages numerically), from 1.
    """
    tables, sizes = {}, {}
    for name in PROFILE_FIELDS:
        categories, inverse = np.unique(users[name].to_numpy(), return_inverse=True)
        tables[name] = np.concatenate([[0], inverse.reshape(-1) + 1]).astype(np.int64)
        sizes[name] = len(categories) + 1
    return tables, sizes


def _prefix_length_per_user(
    user_ids: list[str],
    counts: np.ndarray,
    prefix_max: int,
    prefix_lengths: Mapping[str, int] | None,
) -> np.ndarray:
    """k per internal user (index 0 unused): the formula, or `prefix_lengths` where given."""
    k = np.minimum((counts + 1) // 2, prefix_max)  # (n_users + 1,)
    if prefix_lengths is None:
        return k
    index = {raw_id: i for i, raw_id in enumerate(user_ids, start=1)}
    for raw_id, given in prefix_lengths.items():
        if str(raw_id) not in index:
            raise DataError(
                f"prefix_lengths names user {raw_id!r}, who is not in the data; the knowledge "
                f"file (begin_index.json) belongs to another dataset or version"
            )
        u = index[str(raw_id)]
        if isinstance(given, bool) or not isinstance(given, int | np.integer):
            raise DataError(f"prefix_lengths[{raw_id!r}] = {given!r} is not an integer")
        if not 0 <= given <= counts[u]:
            raise DataError(
                f"prefix_lengths[{raw_id!r}] = {given}, but user {raw_id!r} has {counts[u]} "
                f"ratings (need 0 <= k <= {counts[u]}); the knowledge file does not match the "
                f"ratings — regenerate it or drop prefix_lengths"
            )
        k[u] = given
    return k


def _split_users(
    user_ids: list[str], test_ratio: float, valid_ratio: float, seed: int
) -> np.ndarray:
    """Split code per internal user (0 train, 1 valid, 2 test; index 0 unused).

    The test users depend only on the seed and `test_ratio`, not on `valid_ratio`.
    """
    n = len(user_ids)
    n_test = int(test_ratio * n + 0.5)
    n_valid = int(valid_ratio * (n - n_test) + 0.5)
    by_id = sorted(range(1, n + 1), key=lambda i: user_ids[i - 1])
    shuffled = np.asarray(by_id, dtype=np.int64)[np.random.default_rng(seed).permutation(n)]
    code = np.zeros(n + 1, dtype=np.int64)
    code[shuffled[:n_test]] = SPLITS.index("test")
    code[shuffled[n_test : n_test + n_valid]] = SPLITS.index("valid")
    return code
