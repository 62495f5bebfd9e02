"""The raw tables a dataset reader produces, before the KAR protocol turns them into samples."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from kar.errors import DataError

USER_COLUMNS = ("user_id", "gender", "age", "occupation")
ITEM_COLUMNS = ("item_id", "title", "genres")
RATING_COLUMNS = ("user_id", "item_id", "rating", "timestamp")


@dataclass
class RawData:
    """Users, items and ratings of one dataset as published.

    - ``users``: user_id (str), gender (str, 'M'/'F'), age (int), occupation (str); file order.
    - ``items``: item_id (str), title (str, exactly as in the file), genres (list[str]).
    - ``ratings``: user_id (str), item_id (str), rating (int), timestamp (int); FILE ORDER, which
      the protocol uses to break timestamp ties.
    - ``sources``: table name ("users", "items", "ratings") -> file it was read from, so that
      errors can name the file to fix.
    """

    users: pd.DataFrame
    items: pd.DataFrame
    ratings: pd.DataFrame
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for table, columns in (
            ("users", USER_COLUMNS),
            ("items", ITEM_COLUMNS),
            ("ratings", RATING_COLUMNS),
        ):
            frame = getattr(self, table)
            missing = [c for c in columns if c not in frame.columns]
            if missing:
                raise DataError(
                    f"{self._source(table)} lacks column(s) {missing}; a dataset reader must "
                    f"provide {list(columns)}"
                )
        self._check_unique("users", "user_id")
        self._check_unique("items", "item_id")
        self._check_references("user_id", "users")
        self._check_references("item_id", "items")

    def _source(self, table: str) -> str:
        return self.sources.get(table, f"the {table} table")

    def _check_unique(self, table: str, column: str) -> None:
        ids = getattr(self, table)[column]
        duplicated = ids[ids.duplicated()]
        if len(duplicated):
            raise DataError(
                f"{self._source(table)}: {column} {duplicated.iloc[0]!r} appears more than once; "
                f"ids must be unique (is the file corrupt or concatenated twice?)"
            )

    def _check_references(self, column: str, table: str) -> None:
        known = getattr(self, table)[column]
        unknown = self.ratings[column][~self.ratings[column].isin(known)]
        if len(unknown):
            row = unknown.index[0]
            raise DataError(
                f"{self._source('ratings')}: rating row {row} (0-based, file order) refers to "
                f"{column} {unknown.iloc[0]!r}, which is not in {self._source(table)} "
                f"({len(unknown)} such ratings); the files do not belong together or one is "
                f"truncated — re-download the dataset"
            )

    def __repr__(self) -> str:
        return (
            f"RawData({len(self.users)} users, {len(self.items)} items, "
            f"{len(self.ratings)} ratings)"
        )
