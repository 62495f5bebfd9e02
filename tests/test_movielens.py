"""MovieLens-100K reader on the real GroupLens files, on broken copies, and via a download."""

from __future__ import annotations

import functools
import hashlib
import shutil
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kar.data.movielens import MovieLens100K
from kar.registry import DATASETS

FILES = ["u.data", "u.user", "u.item", "u.genre"]


@pytest.fixture(scope="module")
def ml100k(data_dir: Path) -> Path:
    return data_dir / "ml-100k"


@pytest.fixture(scope="module")
def raw(ml100k: Path):
    return MovieLens100K(str(ml100k), download_url=None).load()


@pytest.fixture
def copy(ml100k: Path, tmp_path: Path) -> Path:
    """A private copy of the four files, to break."""
    for name in FILES:
        shutil.copy(ml100k / name, tmp_path / name)
    return tmp_path


def replace_line(path: Path, line_no: int, edit) -> None:
    lines = path.read_text(encoding="latin-1").split("\n")
    lines[line_no - 1] = edit(lines[line_no - 1])
    path.write_text("\n".join(lines), encoding="latin-1")


def set_field(sep: str, index: int, value: str):
    def edit(line: str) -> str:
        fields = line.split(sep)
        fields[index] = value
        return sep.join(fields)

    return edit


def test_registered_under_its_config_name():
    assert DATASETS.get("ml-100k") is MovieLens100K


def test_counts_match_the_published_dataset(raw):
    assert (len(raw.users), len(raw.items), len(raw.ratings)) == (943, 1682, 100_000)
    assert raw.ratings["user_id"].nunique() == 943
    assert raw.ratings["item_id"].nunique() == 1682
    assert set(raw.ratings["rating"]) == {1, 2, 3, 4, 5}
    assert set(raw.users["gender"]) == {"M", "F"}


def test_items_carry_titles_and_genre_names(raw):
    items = raw.items.set_index("item_id")
    assert items.loc["1", "title"] == "Toy Story (1995)"
    assert items.loc["1", "genres"] == ["Animation", "Children's", "Comedy"]
    assert items.loc["267", "genres"] == ["unknown"]
    assert max(len(g) for g in raw.items["genres"]) == 6  # the published maximum
    # Titles are kept exactly, trailing spaces included.
    assert "Two Friends (1986) " in set(raw.items["title"])


def test_ratings_keep_file_order(raw, ml100k):
    lines = (ml100k / "u.data").read_text().splitlines()
    for row in (0, 1, 54_321, len(lines) - 1):
        user, item, rating, timestamp = lines[row].split("\t")
        got = raw.ratings.iloc[row]
        assert (got.user_id, got.item_id, got.rating, got.timestamp) == (
            user,
            item,
            int(rating),
            int(timestamp),
        )


def test_users_keep_file_order_and_profile(raw, ml100k):
    first = (ml100k / "u.user").read_text().splitlines()[0].split("|")
    got = raw.users.iloc[0]
    assert (got.user_id, got.age, got.gender, got.occupation) == (
        first[0],
        int(first[1]),
        first[2],
        first[3],
    )


@pytest.mark.parametrize(
    ("name", "line_no", "edit", "problem"),
    [
        ("u.data", 5, lambda line: line.rsplit("\t", 1)[0], "expected 4"),
        ("u.data", 7, lambda line: line.replace("\t", "\tx", 1), "item id 'x.*not an integer"),
        ("u.data", 8, set_field("\t", 2, "3.5"), "rating '3.5' is not an integer"),
        ("u.user", 3, lambda line: line.replace("|", "|old", 1), "not an integer"),
        ("u.item", 9, lambda line: line[:-1] + "2", "expected 0 or 1"),
        ("u.item", 11, lambda line: line + "|0", "expected 24"),
    ],
)
def test_corrupt_file_error_names_file_and_line(copy, name, line_no, edit, problem):
    replace_line(copy / name, line_no, edit)
    with pytest.raises(ValueError, match=rf"{name}, line {line_no}: .*{problem}"):
        MovieLens100K(str(copy), download_url=None).load()


def test_rating_of_an_unknown_user_names_the_id_and_file(copy):
    replace_line(copy / "u.data", 1, lambda line: "9999" + line[line.index("\t") :])
    with pytest.raises(ValueError, match=r"u\.data.*'9999'"):
        MovieLens100K(str(copy), download_url=None).load()


def test_missing_file_without_download_names_the_folder(copy):
    (copy / "u.genre").unlink()
    with pytest.raises(FileNotFoundError, match=r"u\.genre"):
        MovieLens100K(str(copy), download_url=None).load()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def test_missing_files_are_downloaded_from_the_configured_url(ml100k, tmp_path, raw):
    served = tmp_path / "served"
    served.mkdir()
    archive = served / "ml-100k.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name in [*FILES, "u.info"]:
            bundle.write(ml100k / name, f"ml-100k/{name}")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(served))
    )
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/ml-100k.zip"
        loaded = MovieLens100K(str(tmp_path / "data"), download_url=url, download_md5=md5).load()
    finally:
        server.shutdown()
        server.server_close()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(FILES)
    assert loaded.ratings.equals(raw.ratings)
    assert loaded.items.equals(raw.items)
