"""MovieLens-100K reader: the GroupLens files as published -> RawData."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from kar.data.download import ensure_files
from kar.data.raw import RawData
from kar.errors import DataError
from kar.registry import DATASETS

ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
ML100K_MD5 = "0e33842e24a9c977be4e0107933c0723"
# The GroupLens files are latin-1 (a few titles carry accented letters).
ENCODING = "latin-1"


def read_delimited(
    path: Path, sep: str, n_columns: int, *, encoding: str = ENCODING
) -> list[list[str]]:
    """Split every non-empty line of `path` on `sep`, insisting on exactly `n_columns` fields.

    Field text is kept exactly (no stripping), so titles stay as published.
    """
    rows: list[list[str]] = []
    with open(path, encoding=encoding, newline="") as lines:
        for line_no, line in enumerate(lines, start=1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            fields = line.split(sep)
            if len(fields) != n_columns:
                raise DataError(
                    f"{path}, line {line_no}: expected {n_columns} {sep!r}-separated fields, "
                    f"found {len(fields)} ({line[:80]!r}); the file is corrupt — re-download it"
                )
            rows.append(fields)
    return rows


def line_numbers(path: Path, *, encoding: str = ENCODING) -> list[int]:
    """1-based numbers of the non-empty lines of `path`, aligned with `read_delimited` rows."""
    with open(path, encoding=encoding, newline="") as lines:
        return [no for no, line in enumerate(lines, start=1) if line.rstrip("\r\n")]


def parse_ints(
    values: list[str], path: Path, column: str, *, encoding: str = ENCODING
) -> np.ndarray:
    """`values` as int64; a non-integer names the file, line and column."""
    try:
        return np.array(values, dtype=np.int64)
    except ValueError:
        pass
    # Slow path only on failure: find the first offender to point at its line.
    for row, value in enumerate(values):
        try:
            int(value)
        except ValueError:
            line_no = line_numbers(path, encoding=encoding)[row]
            raise DataError(
                f"{path}, line {line_no}: {column} {value!r} is not an integer; the file is "
                f"corrupt — re-download it"
            ) from None
    raise AssertionError("unreachable: numpy rejected values that int() accepts")


@DATASETS.register("ml-100k")
class MovieLens100K:
    """The 100,000 ratings (1-5 stars) of 943 users on 1,682 movies, with user profiles.

    `root` is the folder holding ``u.data``, ``u.user``, ``u.item`` and ``u.genre``; missing
    files are fetched from `download_url` (None: never download) and checked against
    `download_md5`.
    """

    FILES: ClassVar[list[str]] = ["u.data", "u.user", "u.item", "u.genre"]

    def __init__(
        self,
        root: str,
        *,
        download_url: str | None = ML100K_URL,
        download_md5: str | None = ML100K_MD5,
    ) -> None:
        self.root = Path(root)
        self.download_url = download_url
        self.download_md5 = download_md5

    def load(self) -> RawData:
        ensure_files(
            self.root,
            self.FILES,
            url=self.download_url,
            md5=self.download_md5,
            archive_subdir="ml-100k",
        )
        genres = self._read_genres()
        return RawData(
            users=self._read_users(),
            items=self._read_items(genres),
            ratings=self._read_ratings(),
            sources={
                "users": str(self.root / "u.user"),
                "items": str(self.root / "u.item"),
                "ratings": str(self.root / "u.data"),
            },
        )

    def _read_genres(self) -> list[str]:
        """Genre names in flag order: u.genre lines are ``name|position``."""
        path = self.root / "u.genre"
        rows = read_delimited(path, "|", 2)
        positions = parse_ints([r[1] for r in rows], path, "genre position")
        if sorted(positions.tolist()) != list(range(len(rows))):
            raise DataError(
                f"{path}: genre positions {positions.tolist()} are not 0..{len(rows) - 1}; "
                f"the file is corrupt — re-download it"
            )
        names = [""] * len(rows)
        for (name, _), position in zip(rows, positions.tolist(), strict=True):
            names[position] = name
        return names

    def _read_users(self) -> pd.DataFrame:
        # u.user: user id | age | gender | occupation | zip code
        path = self.root / "u.user"
        rows = read_delimited(path, "|", 5)
        parse_ints([r[0] for r in rows], path, "user id")  # ids stay text; checked for corruption
        return pd.DataFrame(
            {
                "user_id": [r[0] for r in rows],
                "gender": [r[2] for r in rows],
                "age": parse_ints([r[1] for r in rows], path, "age"),
                "occupation": [r[3] for r in rows],
            }
        )

    def _read_items(self, genres: list[str]) -> pd.DataFrame:
        # u.item: id | title | release date | video release date | IMDb URL | one 0/1 flag per genre
        path = self.root / "u.item"
        n_fixed = 5
        rows = read_delimited(path, "|", n_fixed + len(genres))
        parse_ints([r[0] for r in rows], path, "item id")  # ids stay text; checked for corruption
        flags = np.array([r[n_fixed:] for r in rows])  # (n_items, n_genres) of '0'/'1'
        bad = ~np.isin(flags, ["0", "1"])
        if bad.any():
            row, col = np.argwhere(bad)[0]
            line_no = line_numbers(path)[row]
            raise DataError(
                f"{path}, line {line_no}: genre flag for {genres[col]!r} is {flags[row, col]!r}, "
                f"expected 0 or 1; the file is corrupt — re-download it"
            )
        names = np.array(genres)
        return pd.DataFrame(
            {
                "item_id": [r[0] for r in rows],
                "title": [r[1] for r in rows],
                "genres": [names[f == "1"].tolist() for f in flags],
            }
        )

    def _read_ratings(self) -> pd.DataFrame:
        # u.data: user id \t item id \t rating \t unix timestamp, in the file's own order
        path = self.root / "u.data"
        rows = read_delimited(path, "\t", 4)
        columns = list(zip(*rows, strict=True)) if rows else [(), (), (), ()]
        parse_ints(list(columns[0]), path, "user id")  # ids stay text; checked for corruption
        parse_ints(list(columns[1]), path, "item id")
        return pd.DataFrame(
            {
                "user_id": list(columns[0]),
                "item_id": list(columns[1]),
                "rating": parse_ints(list(columns[2]), path, "rating"),
                "timestamp": parse_ints(list(columns[3]), path, "timestamp"),
            }
        )
