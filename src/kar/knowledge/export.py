"""Export stored LLM answers as .klg knowledge files (the paper's released format), to share them.

    python -m kar.knowledge.export --out DIR [--store FILE] [Hydra overrides...]
    python -m kar.knowledge.export --out knowledge/gpt35 llm=gpt35

The overrides compose the same config as ``python -m kar``: the dataset and its protocol say which
prompt belongs to which user and item, and the llm group says whose answers to take (its key in
the store). Nothing is sent to any LLM; prompts without a stored answer are left out and counted.
DIR receives ``user.klg`` and ``item.klg`` (``{raw_id: {"prompt": ..., "ans": ...}}``) and
``begin_index.json`` (``{raw_user_id: k}``, the history prefix each user prompt showed). They
import back as the same knowledge with ``llm=klg llm.user_file=DIR/user.klg
llm.item_file=DIR/item.klg llm.begin_index=DIR/begin_index.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from kar.errors import DataError, KarError
from kar.knowledge.prompts import PromptRequest
from kar.knowledge.store import KnowledgeStore

log = logging.getLogger("kar.knowledge")


def _write_json(path: Path, data: object) -> None:
    """Write atomically: a reader never sees half a file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(partial, path)


def export_klg(
    store: KnowledgeStore,
    llm_key: str,
    requests: Sequence[PromptRequest],
    out_dir: str | os.PathLike,
    prefix_lengths: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Write user.klg and item.klg (and begin_index.json when `prefix_lengths` is given).

    Returns how many users and items were exported and how many requests had no answer;
    raises `DataError` when the store has none of them (the wrong llm setup, most likely).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    answers = store.get_answers(llm_key, list(dict.fromkeys(r.prompt for r in requests)))
    files: dict[str, dict[str, dict[str, str]]] = {"user": {}, "item": {}}
    missing = 0
    for request in requests:
        if request.kind not in files:
            raise ValueError(f"prompt request kind must be 'user' or 'item', got {request!r}")
        answer = answers.get(request.prompt)
        if answer is None:
            missing += 1
            continue
        files[request.kind][request.raw_id] = {"prompt": request.prompt, "ans": answer}
    if not files["user"] and not files["item"]:
        raise DataError(
            f"knowledge store {store.path} has no answers of {llm_key!r} for these "
            f"{len(requests)} prompts; the llm overrides must be those of the run that "
            "generated them (provider, model, base_url, temperature, max_tokens)"
        )
    for kind, entries in files.items():
        _write_json(out / f"{kind}.klg", entries)
    if prefix_lengths is not None:
        exported = {uid: int(prefix_lengths[uid]) for uid in files["user"]}
        _write_json(out / "begin_index.json", exported)
    counts = {"user": len(files["user"]), "item": len(files["item"]), "missing": missing}
    log.info(
        "%s: exported %d user and %d item answers to %s (%d requests had no stored answer)",
        llm_key, counts["user"], counts["item"], out, missing,
    )  # fmt: skip
    return counts


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m kar.knowledge.export",
        description="Export stored LLM answers as .klg files (user.klg, item.klg, "
        "begin_index.json) for the dataset and llm the overrides select.",
    )
    parser.add_argument("--out", required=True, help="folder to write the files into")
    parser.add_argument("--store", help="knowledge store file (default: the config's paths.store)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. llm=gpt35")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    """The command line; returns the counts `export_klg` reported."""
    # Imported here: kar.components imports every module of this package at start-up, and the
    # pipeline imports kar.components.
    from hydra import compose, initialize_config_dir

    from kar.config import config_dir, register_schema, validate
    from kar.pipeline import build_requests, load_raw, prepare_data
    from kar.registry import LLMS, init_kwargs

    args = _parse_args(argv)
    register_schema()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = validate(compose(config_name="config", overrides=list(args.overrides)))
    provider_cls = LLMS.get(cfg.llm.name)
    provider = provider_cls(**init_kwargs(cfg.llm, provider_cls))
    data = prepare_data(cfg, provider.prefix_lengths())
    requests = build_requests(cfg, load_raw(cfg), data)
    prefix_lengths = {uid: len(data.prefixes.get(uid, [])) for uid in data.user_ids}
    with KnowledgeStore(args.store or cfg.paths.store, read_only=True) as store:
        return export_klg(store, provider.key, requests, args.out, prefix_lengths)


if __name__ == "__main__":
    from hydra.errors import HydraException

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        counts = main()
    except (KarError, FileNotFoundError, HydraException) as err:
        print(f"kar: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"kar: exported {counts['user']} users and {counts['item']} items")
