"""The KAR protocol, checked against a plain-Python reading of its rules.

The reference below walks each user's ratings one by one (Python's sort is stable, so time ties
keep file order) and says, for every rating row, whether it is in the knowledge prefix and which
rows form its history. build_ctr_data must agree with it on hand-made and on real data.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kar.data.movielens import MovieLens100K
from kar.data.protocol import CTRData, build_ctr_data
from kar.data.raw import RawData
from kar.registry import ConfigError

CONTRACT_FEATURES = {
    "label",
    "user",
    "item",
    "item_genres",
    "gender",
    "age",
    "occupation",
    "hist_items",
    "hist_genres",
    "hist_ratings",
    "hist_len",
}


# ------------------------------------------------------------------------------- reference
def reference(raw: RawData, *, prefix_lengths=None, prefix_max=30, history_len=10):
    """(prefix rows per user, {sample row: its history rows}) by the protocol's words."""
    timeline: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for row, rating in enumerate(raw.ratings.itertuples(index=False)):
        timeline[rating.user_id].append((rating.timestamp, row))
    prefix, history = {}, {}
    for user, events in timeline.items():
        rows = [row for _, row in sorted(events, key=lambda e: e[0])]
        k = min((len(rows) + 1) // 2, prefix_max)
        if prefix_lengths is not None and user in prefix_lengths:
            k = prefix_lengths[user]
        prefix[user] = rows[:k]
        for position in range(k, len(rows)):
            history[rows[position]] = rows[max(0, position - history_len) : position]
    return prefix, history


def genre_table(raw: RawData) -> np.ndarray:
    """Genre indices per internal item, genres numbered by first appearance."""
    vocab: dict[str, int] = {}
    for genres in raw.items["genres"]:
        for g in genres:
            vocab.setdefault(g, len(vocab) + 1)
    width = max(1, *(len(g) for g in raw.items["genres"]))
    table = np.zeros((len(raw.items) + 1, width), dtype=np.int64)
    for i, genres in enumerate(raw.items["genres"], start=1):
        table[i, : len(genres)] = [vocab[g] for g in genres]
    return table


def assert_follows_reference(data: CTRData, raw: RawData, *, threshold=3, history_len=10, **ref):
    prefix, history = reference(raw, history_len=history_len, **ref)
    users = raw.ratings["user_id"].to_numpy(dtype=object)
    items = raw.ratings["item_id"].to_numpy(dtype=object)
    stars = raw.ratings["rating"].to_numpy()
    stamps = raw.ratings["timestamp"].to_numpy()
    item_index = {item_id: i for i, item_id in enumerate(data.item_ids, start=1)}
    genres = genre_table(raw)

    # Every non-prefix rating is exactly one sample; no prefix rating is a sample.
    sample_rows = [r for name in data.splits for r in data.rows[name].tolist()]
    assert sorted(sample_rows) == sorted(history)
    in_prefix = {(users[r], items[r], stamps[r]) for rows in prefix.values() for r in rows}
    as_samples = {(users[r], items[r], stamps[r]) for r in sample_rows}
    assert not in_prefix & as_samples
    for user, rows in prefix.items():
        assert data.prefixes[user] == [(items[r], int(stars[r])) for r in rows]

    for name, split in data.splits.items():
        assert set(split) == CONTRACT_FEATURES, name
        rows = data.rows[name].numpy()
        # Each sample is the rating it claims to come from.
        assert [data.user_ids[u - 1] for u in split["user"].tolist()] == users[rows].tolist()
        assert [data.item_ids[i - 1] for i in split["item"].tolist()] == items[rows].tolist()
        assert split["label"].dtype == torch.float32
        np.testing.assert_array_equal(split["label"].numpy(), stars[rows] > threshold)
        np.testing.assert_array_equal(split["item_genres"].numpy(), genres[split["item"].numpy()])

        expected_items = np.zeros((len(rows), history_len), dtype=np.int64)
        expected_stars = np.zeros((len(rows), history_len), dtype=np.int64)
        for j, row in enumerate(rows.tolist()):
            past = history[row]
            expected_items[j, : len(past)] = [item_index[items[r]] for r in past]
            expected_stars[j, : len(past)] = stars[past]
        np.testing.assert_array_equal(split["hist_items"].numpy(), expected_items)
        np.testing.assert_array_equal(split["hist_ratings"].numpy(), expected_stars)
        np.testing.assert_array_equal(split["hist_len"].numpy(), (expected_items > 0).sum(1))
        np.testing.assert_array_equal(split["hist_genres"].numpy(), genres[expected_items])


def split_users(data: CTRData) -> dict[str, set[str]]:
    return {
        name: {data.user_ids[u - 1] for u in split["user"].unique().tolist()}
        for name, split in data.splits.items()
    }


# ------------------------------------------------------------------------------ hand-made data
def toy_raw(seed: int = 0) -> RawData:
    """u1 is written out by hand; u2..u9 get random ratings with many time ties."""
    users = pd.DataFrame(
        {
            "user_id": [f"u{i}" for i in range(1, 11)],
            "gender": list("MFMFMFMFMF"),
            "age": [25, 18, 35, 25, 50, 18, 45, 56, 1, 35],
            "occupation": ["writer", "student", "artist", "writer", "doctor"] * 2,
        }
    )
    items = pd.DataFrame(
        {
            "item_id": ["10", "20", "30", "40", "50", "60"],
            "title": ["A (1990)", "B (1991)", "C (1992)", "D (1993)", "E (1994)", "F (1995)"],
            "genres": [["Drama"], ["Comedy", "Drama"], [], ["Horror"], ["Comedy"], ["War"]],
        }
    )
    # u1 in file order; ties at t=100 and t=300 are listed against id order on purpose.
    u1 = [("20", 2, 100), ("30", 4, 200), ("10", 5, 100), ("50", 5, 300), ("40", 1, 300)]
    u1 += [("10", 3, 400)]  # a second rating of item 10: only the timestamp tells them apart
    rng = np.random.default_rng(seed)
    rows = [
        (user, str(rng.choice(items["item_id"])), int(rng.integers(1, 6)), int(rng.integers(0, 8)))
        for user in [f"u{i}" for i in range(2, 10)]
        for _ in range(rng.integers(1, 25))
    ]  # few distinct timestamps: many ties
    # One rating per (user, item, timestamp), so that triple identifies a rating.
    rows = list({(u, i, t): (u, i, r, t) for u, i, r, t in rows}.values())
    rng.shuffle(rows)
    for j, (item, rating, timestamp) in enumerate(u1):  # interleave u1 with the others
        rows.insert(3 * j + 1, ("u1", item, rating, timestamp))
    ratings = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    return RawData(users=users, items=items, ratings=ratings)


TOY_SPLIT = {"test_ratio": 0.2, "valid_ratio": 0.25}


def test_toy_data_follows_the_protocol():
    raw = toy_raw()
    data = build_ctr_data(raw, **TOY_SPLIT)
    assert_follows_reference(data, raw)


def test_time_ties_keep_file_order():
    data = build_ctr_data(toy_raw(), **TOY_SPLIT)
    # u1 in time order: 20@100, 10@100 (file order), 30@200, 50@300, 40@300, 10@400; k = 3.
    assert data.prefixes["u1"] == [("20", 2), ("10", 5), ("30", 4)]
    name = next(n for n, users in split_users(data).items() if "u1" in users)
    split = data.splits[name]
    u1 = data.user_ids.index("u1") + 1
    mine = split["user"] == u1
    to_raw = [None, *data.item_ids]
    assert [to_raw[i] for i in split["item"][mine].tolist()] == ["50", "40", "10"]
    last_history = split["hist_items"][mine][-1].tolist()
    assert [to_raw[i] for i in last_history] == [
        "20",
        "10",
        "30",
        "50",
        "40",
        None,
        None,
        None,
        None,
        None,
    ]
    assert split["hist_ratings"][mine][-1, :5].tolist() == [2, 5, 4, 5, 1]
    assert split["label"][mine].tolist() == [1.0, 0.0, 0.0]


def test_history_length_and_threshold_are_honoured():
    raw = toy_raw(seed=3)
    data = build_ctr_data(raw, label_threshold=4, history_len=3, prefix_max=2, **TOY_SPLIT)
    assert data.splits["train"]["hist_items"].shape[1] == 3
    assert_follows_reference(data, raw, threshold=4, history_len=3, prefix_max=2)


def test_prefix_lengths_are_used_exactly():
    raw = toy_raw()
    n_u2 = int((raw.ratings["user_id"] == "u2").sum())
    given = {"u1": 0, "u2": n_u2}
    data = build_ctr_data(raw, prefix_lengths=given, **TOY_SPLIT)
    assert data.prefixes["u1"] == [] and len(data.prefixes["u2"]) == n_u2
    assert_follows_reference(data, raw, prefix_lengths=given)
    u2 = data.user_ids.index("u2") + 1
    assert all(int((s["user"] == u2).sum()) == 0 for s in data.splits.values())


@pytest.mark.parametrize(("given", "named"), [({"u1": 7}, "'u1'"), ({"nobody": 1}, "'nobody'")])
def test_impossible_prefix_lengths_name_the_user(given, named):
    with pytest.raises(ValueError, match=named):
        build_ctr_data(toy_raw(), prefix_lengths=given)


def test_users_without_samples_and_profile_vocabularies():
    raw = toy_raw()
    data = build_ctr_data(raw, **TOY_SPLIT)
    assert data.prefixes["u10"] == []  # no ratings at all
    spec = data.feature_spec
    assert list(spec) == ["user", "item", "genre", "gender", "age", "occupation", "rating"]
    assert (spec["user"], spec["item"], spec["genre"]) == (11, 7, 5)
    assert (spec["gender"], spec["age"], spec["occupation"]) == (3, 8, 5)
    for split in data.splits.values():
        for key in ("user", "item", "gender", "age", "occupation"):
            assert split[key].min() >= 1 and split[key].max() < spec[key]
        assert split["hist_genres"].max() < spec["genre"]
        assert split["hist_ratings"].max() < spec["rating"]
    # Categories are numbered in sorted order (ages numerically), from 1.
    profile = raw.users.set_index("user_id")
    for split in data.splits.values():
        for key in ("gender", "age", "occupation"):
            values = sorted(set(profile[key]))
            raw_values = profile.loc[[data.user_ids[u - 1] for u in split["user"].tolist()], key]
            expected = [values.index(v) + 1 for v in raw_values]
            assert split[key].tolist() == expected, key


def test_bad_settings_and_ratings_are_rejected():
    raw = toy_raw()
    with pytest.raises(ConfigError, match="test_ratio"):
        build_ctr_data(raw, test_ratio=1.0)
    with pytest.raises(ConfigError, match="history_len"):
        build_ctr_data(raw, history_len=0)
    raw.ratings.loc[0, "rating"] = 0
    with pytest.raises(ValueError, match=">= 1"):
        build_ctr_data(raw)


def test_unknown_ids_in_ratings_are_rejected():
    raw = toy_raw()
    ratings = raw.ratings.copy()
    ratings.loc[3, "item_id"] = "999"
    with pytest.raises(ValueError, match="'999'"):
        RawData(users=raw.users, items=raw.items, ratings=ratings, sources={"ratings": "r.csv"})


# ----------------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def ml100k(data_dir: Path):
    raw = MovieLens100K(str(data_dir / "ml-100k"), download_url=None).load()
    knowledge = data_dir / "ml-100k" / "knowledge"
    begin = json.loads((knowledge / "begin_index.json").read_text())
    return raw, begin, knowledge


@pytest.fixture(scope="module")
def ml100k_data(ml100k):
    raw, begin, _ = ml100k
    started = time.perf_counter()
    data = build_ctr_data(raw, prefix_lengths=begin)
    return data, time.perf_counter() - started


def test_real_data_follows_the_protocol(ml100k, ml100k_data):
    raw, begin, _ = ml100k
    data, seconds = ml100k_data
    assert seconds < 5.0
    assert_follows_reference(data, raw, prefix_lengths=begin)
    # ML-100K has one rating per (user, item): samples and prefix are disjoint as pairs too.
    pairs = {(u, i) for u, p in data.prefixes.items() for i, _ in p}
    for split in data.splits.values():
        sample_pairs = zip(split["user"].tolist(), split["item"].tolist(), strict=True)
        assert not pairs & {(data.user_ids[u - 1], data.item_ids[i - 1]) for u, i in sample_pairs}


def test_begin_index_matches_the_prefix_formula(ml100k, ml100k_data):
    raw, begin, _ = ml100k
    counts = raw.ratings["user_id"].value_counts()
    assert begin == {u: min((int(n) + 1) // 2, 30) for u, n in counts.items()}
    from_formula = build_ctr_data(raw)
    data, _ = ml100k_data
    for name in data.splits:
        assert torch.equal(data.rows[name], from_formula.rows[name])


def _title_key(title: str) -> str:
    """'Godfather, The (1972)' and 'The Godfather (1972)' -> one key (the .klg moves articles)."""
    moved = re.match(r"^(.*), (The|A|An|Il|La|Le|Les|L'|Das|Der|Die|El|Lo) (\(.*)$", title)
    if moved:
        title = f"{moved.group(2)} {moved.group(1)} {moved.group(3)}"
    return title.strip().lower()


def test_prefixes_are_what_the_released_user_prompts_show(ml100k, ml100k_data):
    """The released prompts list the prefix with time ties in file order; so must we."""
    raw, _, knowledge = ml100k
    data, _ = ml100k_data
    prompts = json.loads((knowledge / "user.klg").read_text())
    titles = dict(zip(raw.items["item_id"], raw.items["title"], strict=True))
    for user, prefix in data.prefixes.items():
        shown = re.findall(r'"(.*?)", (\d) stars?', prompts[user]["prompt"])
        assert [(_title_key(t), int(r)) for t, r in shown] == [
            (_title_key(titles[i]), r) for i, r in prefix
        ], user


def test_split_is_by_user_and_seeded(ml100k, ml100k_data):
    raw, begin, _ = ml100k
    data, _ = ml100k_data
    users = split_users(data)
    assert not users["train"] & users["valid"]
    assert not users["train"] & users["test"]
    assert not users["valid"] & users["test"]
    assert len(users["train"] | users["valid"] | users["test"]) == len(raw.users)
    assert abs(len(users["test"]) - 0.1 * len(raw.users)) <= 1
    assert abs(len(users["valid"]) - 0.1 * (len(raw.users) - len(users["test"]))) <= 1

    again = build_ctr_data(raw, prefix_lengths=begin)
    for name, split in data.splits.items():
        assert all(torch.equal(split[k], again.splits[name][k]) for k in split)
    other_seed = split_users(build_ctr_data(raw, prefix_lengths=begin, seed=7))
    assert other_seed["test"] != users["test"]
    # Test users depend on the seed only, not on how much validation is held out.
    more_valid = split_users(build_ctr_data(raw, prefix_lengths=begin, valid_ratio=0.3))
    assert more_valid["test"] == users["test"]


def test_save_load_roundtrip(ml100k_data, tmp_path):
    data, _ = ml100k_data
    path = tmp_path / "cache" / "ml-100k.pt"
    data.save(path)
    loaded = CTRData.load(path)
    assert loaded.feature_spec == data.feature_spec
    assert (loaded.user_ids, loaded.item_ids) == (data.user_ids, data.item_ids)
    assert loaded.prefixes == data.prefixes
    for name, split in data.splits.items():
        assert split.keys() == loaded.splits[name].keys()
        assert all(torch.equal(split[k], loaded.splits[name][k]) for k in split)
        assert torch.equal(loaded.rows[name], data.rows[name])
    assert [p.name for p in path.parent.iterdir()] == ["ml-100k.pt"]  # no temp file left
    assert "test:" in loaded.summary()


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a saved CTRData"):
        CTRData.load(path)
