"""Developer sessions: `nox -s demo` (main job), `nox -s tests`, `nox -s lint`."""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

ROOT = Path(__file__).parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def _install(session: nox.Session) -> None:
    session.install("-c", "constraints.txt", "-e", ".[dev,tune]")


def _env() -> dict[str, str]:
    env = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    if "KAR_DATA_DIR" not in os.environ and SHARED_DATA.is_dir():
        env["KAR_DATA_DIR"] = str(SHARED_DATA)
    return env


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (unit + one short end-to-end run on real ML-100K)."""
    _install(session)
    env = _env() | {"WANDB_MODE": "disabled"}
    session.run("pytest", *(session.posargs or ["-q"]), env=env)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff==0.17.6")
    paths = [p for p in ("src", "tests", "benchmarks", "noxfile.py") if (ROOT / p).exists()]
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: KAR (DCNv2 + MiniLM-encoded .klg knowledge) on MovieLens-100K, offline."""
    _install(session)
    session.run("python", "-m", "kar", *session.posargs, env=_env())
