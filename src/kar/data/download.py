"""Fetch a dataset archive once, check it, and extract only the files a reader needs.

Files appear in the data folder complete or not at all: the archive goes to a temporary file and
every extracted file is written to a temporary name and renamed, so an interrupted run never
leaves a truncated file that a later run would trust.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO

import requests
from tqdm.auto import tqdm

from kar.errors import KarError

CHUNK_BYTES = 1 << 16
# (connect, read) seconds: fail fast on a dead host, tolerate a slow one.
TIMEOUT_S = (10, 60)


class DownloadError(KarError, RuntimeError):
    """The archive was fetched but is not the expected one (checksum, missing members)."""


def ensure_files(
    root: Path,
    required: list[str],
    *,
    url: str | None,
    md5: str | None,
    archive_subdir: str,
) -> None:
    """Make sure every name in `required` exists in `root`, downloading `url` if some do not.

    `url` is a zip archive that holds the files under `archive_subdir` (e.g. ``ml-100k/u.data``);
    `md5` is its published checksum (None skips the check). With `url` None, missing files are an
    error telling where to put them.
    """
    root = Path(root)
    missing = [name for name in required if not (root / name).is_file()]
    if not missing:
        return
    if url is None:
        raise FileNotFoundError(_missing_message(root, missing, "no download URL is configured"))

    root.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=root, prefix=".download-", suffix=".zip.part")
    archive = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as sink:
                actual_md5 = _download(url, sink)
        except requests.RequestException as err:
            reason = f"downloading {url} failed: {err}"
            raise FileNotFoundError(_missing_message(root, missing, reason)) from err
        if md5 is not None and actual_md5 != md5.lower():
            raise DownloadError(
                f"checksum mismatch for {url}: expected md5 {md5}, got {actual_md5}. The "
                f"download was corrupted or the archive changed; nothing was kept — retry, and "
                f"if it persists, download it by hand and put {', '.join(missing)} into {root}"
            )
        _extract(archive, url, missing, root, archive_subdir)
    finally:
        archive.unlink(missing_ok=True)


def _download(url: str, sink: BinaryIO) -> str:
    """Stream `url` into `sink`; return the md5 hex digest of what was written."""
    digest = hashlib.md5()
    with requests.get(url, stream=True, timeout=TIMEOUT_S) as response:
        response.raise_for_status()
        total = int(response.headers.get("content-length", 0)) or None
        name = url.rsplit("/", 1)[-1]
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}") as bar:
            for chunk in response.iter_content(chunk_size=CHUNK_BYTES):
                sink.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    return digest.hexdigest()


def _extract(archive: Path, url: str, names: list[str], root: Path, archive_subdir: str) -> None:
    try:
        bundle = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as err:
        raise DownloadError(
            f"{url} did not deliver a zip archive ({err}); check the URL, or put the files into "
            f"{root} by hand"
        ) from err
    with bundle:
        members = set(bundle.namelist())
        for name in names:
            member = f"{archive_subdir.strip('/')}/{name}" if archive_subdir else name
            if member not in members:
                raise DownloadError(
                    f"{url} has no member {member!r} (it holds e.g. {sorted(members)[:5]}); "
                    f"check the configured URL / archive folder, or put {name} into {root} by hand"
                )
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
            try:
                with bundle.open(member) as source, os.fdopen(fd, "wb") as sink:
                    shutil.copyfileobj(source, sink)
                os.replace(tmp_name, target)
            except BaseException:
                Path(tmp_name).unlink(missing_ok=True)
                raise


def _missing_message(root: Path, missing: list[str], reason: str) -> str:
    return (
        f"missing data file(s) {', '.join(missing)} in {root} ({reason}). Put them into {root}, "
        f"or point the project at a data folder that has them with the KAR_DATA_DIR environment "
        f"variable."
    )
