"""The KAR pipeline: data -> generate -> encode -> train, each stage cached and idempotent.

Processed tensors are cached under ``paths.cache_dir``; LLM answers and encoder vectors live in
the DuckDB knowledge store (``paths.store``), keyed by provider/encoder identity and text, so a
rerun generates and encodes nothing. Training reads the knowledge once, as tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf

from kar.config import STAGE_ORDER, Stage
from kar.data.protocol import CTRData, build_ctr_data
from kar.data.raw import RawData
from kar.engine import TrainConfig, fit
from kar.knowledge.encoder import TextEncoder, encode_with_store
from kar.knowledge.llm.base import Knowledge
from kar.knowledge.prompts import (
    PromptRequest,
    PromptTemplates,
    render_item_prompt,
    render_user_prompt,
    user_history_text,
)
from kar.knowledge.store import KnowledgeStore, StoreReadOnlyError
from kar.metrics import ctr_metrics
from kar.models import KnowledgeTables, build_model
from kar.registry import ADAPTORS, BACKBONES, DATASETS, ENCODERS, LLMS, init_kwargs
from kar.slices import SliceConfig, slice_masks, slice_metrics
from kar.tracking import LoggerConfig, Tracker, redact, tracking_run

log = logging.getLogger("kar")

# Bump when the protocol's output changes, so stale cached tensors are not reused.
PROTOCOL_VERSION = 1

T = TypeVar("T")


@dataclass
class RunOutcome:
    """What a finished run reports: metrics per split and where its files are."""

    metrics: dict[str, Any]
    run_dir: Path

    @property
    def summary_line(self) -> str:
        v, t = self.metrics["valid"], self.metrics["test"]
        return (
            f"kar: test AUC {t['auc']:.4f} LogLoss {t['logloss']:.4f} "
            f"(valid AUC {v['auc']:.4f} LogLoss {v['logloss']:.4f}, "
            f"best epoch {self.metrics['best_epoch']}) -> {self.run_dir}"
        )


@dataclass(frozen=True)
class Stopped:
    """A run that ended after `stage` without training; `reason` says why when not asked to."""

    stage: Stage
    reason: str | None = None

    def line(self, run_dir: Path) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return f"kar: stopped after stage={self.stage.value}{why} -> {run_dir}"


def _reaches(cfg: DictConfig, stage: Stage) -> bool:
    return STAGE_ORDER.index(Stage(cfg.stage)) >= STAGE_ORDER.index(stage)


def uses_knowledge(cfg: DictConfig) -> bool:
    return cfg.adaptor.name != "none"


def run(cfg: DictConfig, run_dir: Path, *, sweep_name: str | None = None) -> RunOutcome | Stopped:
    """Run the pipeline up to ``cfg.stage``; returns the outcome when training ran.

    `sweep_name` (the multirun's sweep folder, when this run is one of its jobs) groups the
    jobs' tracked runs unless ``logger.group`` is set.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(redact(resolved))))
    logger_cfg = tracked_run_settings(cfg, sweep_name)
    with tracking_run(logger_cfg, resolved, run_dir, name=run_dir.name) as tracker:
        return _run_stages(cfg, run_dir, tracker)


def tracked_run_settings(cfg: DictConfig, sweep_name: str | None) -> LoggerConfig:
    """``cfg.logger`` with the run's group and tags, so runs can be filtered and compared."""
    logger_cfg = OmegaConf.to_object(cfg.logger)
    assert isinstance(logger_cfg, LoggerConfig)
    tags = [
        cfg.backbone.name,
        cfg.adaptor.name,
        cfg.dataset.name,
        cfg.llm.name,
        cfg.encoder.name,
        f"knowledge={cfg.knowledge}",
        *logger_cfg.tags,
    ]
    return dataclasses.replace(
        logger_cfg,
        group=logger_cfg.group if logger_cfg.group is not None else sweep_name,
        tags=list(dict.fromkeys(str(tag) for tag in tags)),
    )


def _run_stages(cfg: DictConfig, run_dir: Path, tracker: Tracker) -> RunOutcome | Stopped:
    provider = _instantiate(LLMS, cfg.llm)
    needs_knowledge = uses_knowledge(cfg) or Stage(cfg.stage) in (Stage.generate, Stage.encode)
    # Built before any stage runs (it loads only config and tokenizer, not the weights), so a
    # bad encoder setting stops the run before data processing and paid LLM calls, not after.
    encoder = (
        _instantiate(ENCODERS, cfg.encoder)
        if needs_knowledge and _reaches(cfg, Stage.encode)
        else None
    )
    data = prepare_data(cfg, provider.prefix_lengths())
    log.info("data: %s", data.summary())
    if not _reaches(cfg, Stage.generate):
        return Stopped(Stage.data)

    tables = None
    if needs_knowledge:
        raw = load_raw(cfg)
        store_path = Path(cfg.paths.store)
        knowledge = generate_knowledge(cfg, provider, raw, data, store_path, tracker)
        if isinstance(knowledge, Stopped):  # llm.dry_run, or llm.max_cost_usd reached
            return knowledge
        if not _reaches(cfg, Stage.encode):
            return Stopped(Stage.generate)
        assert encoder is not None  # built above whenever the encode stage is reached
        tables = encode_knowledge(cfg, encoder, knowledge, data, store_path)
        if not _reaches(cfg, Stage.train):
            return Stopped(Stage.encode)
        tracker.summary(_coverage(tables))
    else:
        log.info("adaptor=none: the bare backbone needs no knowledge; skipping generate/encode")

    return train(cfg, data, tables if uses_knowledge(cfg) else None, run_dir, tracker)


def _instantiate(registry: Any, node: DictConfig, *args: Any) -> Any:
    cls = registry.get(node.name)
    return cls(*args, **init_kwargs(node, cls))


# ----------------------------------------------------------------------------------- data stage
def load_raw(cfg: DictConfig) -> RawData:
    return _instantiate(DATASETS, cfg.dataset, cfg.dataset.root).load()


def prepare_data(cfg: DictConfig, prefix_lengths: Mapping[str, int] | None) -> CTRData:
    """The KAR protocol's tensors, from the cache when the same inputs were processed before."""
    ds = cfg.dataset
    protocol = {
        k: ds[k]
        for k in ("label_threshold", "history_len", "prefix_max", "test_ratio", "valid_ratio")
    }
    fingerprint = _fingerprint(
        {
            "version": PROTOCOL_VERSION,
            "dataset": ds.name,
            "root": str(Path(ds.root).resolve()),
            "split_seed": ds.split_seed,
            "protocol": protocol,
            "prefix_lengths": dict(sorted((prefix_lengths or {}).items())),
        }
    )
    path = Path(cfg.paths.cache_dir) / "data" / f"{ds.name}-{fingerprint}.pt"
    if path.exists():
        log.info("data: processed tensors from cache %s", path)
        return CTRData.load(path)
    raw = load_raw(cfg)
    data = build_ctr_data(raw, seed=ds.split_seed, prefix_lengths=prefix_lengths, **protocol)
    path.parent.mkdir(parents=True, exist_ok=True)
    data.save(path)  # atomic rename inside: parallel jobs never read half a file
    log.info("data: processed and cached at %s", path)
    return data


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ knowledge store
def with_store(path: Path, work: Callable[[KnowledgeStore], T]) -> T:
    """`work(store)` on the knowledge store at `path`, opened read-only whenever that suffices.

    DuckDB lets many processes read a file but only one write it, and a writer shuts out every
    reader; so parallel jobs (a multirun) whose knowledge is all stored never wait on each other.
    Only when `work` needs to write (it raises `StoreReadOnlyError` before any costly step) is
    the store reopened for writing and `work` run again; the read-only connection is closed
    first, as DuckDB refuses one file in both modes in one process. The store is closed when
    this returns.
    """
    if path.exists():
        with KnowledgeStore(path, read_only=True) as store:
            try:
                return work(store)
            except StoreReadOnlyError:
                log.info("knowledge store %s lacks entries: reopening it to add them", path)
    with KnowledgeStore(path) as store:
        return work(store)


# ------------------------------------------------------------------------------- generate stage
def build_requests(cfg: DictConfig, raw: RawData, data: CTRData) -> list[PromptRequest]:
    """Factorization prompts: one preference-reasoning prompt per user, one factual per item."""
    p = cfg.dataset.prompts
    templates = PromptTemplates(
        user=p.user,
        item=p.item,
        user_factors=list(p.user_factors),
        item_factors=list(p.item_factors),
    )
    titles = dict(zip(raw.items.item_id, raw.items.title, strict=True))
    profiles = raw.users.set_index("user_id").to_dict("index")
    requests = []
    for uid in data.user_ids:
        history = [(titles[iid], rating) for iid, rating in data.prefixes.get(uid, [])]
        prompt = render_user_prompt(templates, profiles[uid], history)
        requests.append(PromptRequest(kind="user", raw_id=uid, prompt=prompt))
    for iid in data.item_ids:
        requests.append(
            PromptRequest(
                kind="item", raw_id=iid, prompt=render_item_prompt(templates, titles[iid])
            )
        )
    return requests


def generate_knowledge(
    cfg: DictConfig,
    provider: Any,
    raw: RawData,
    data: CTRData,
    store_path: Path,
    tracker: Tracker | None = None,
) -> dict[tuple[str, str], Knowledge] | Stopped:
    """Every user's and item's knowledge, keyed by (kind, raw id); `Stopped` when the stage
    ended before answering everything on purpose (``llm.dry_run``, ``llm.max_cost_usd``).

    The provider's report (cached, sent, failed, spent) goes to the tracker, also when the
    stage fails.
    """
    requests = build_requests(cfg, raw, data)
    try:
        knowledge = with_store(store_path, lambda store: provider.generate(requests, store))
    finally:
        report = getattr(provider, "last_report", None)
        if report is not None and tracker is not None:
            tracker.summary(report.metrics())
    if report is not None and report.stopped == "dry_run":
        log.info("generate: llm.dry_run=true, so the run ends after the plan (nothing sent)")
        return Stopped(Stage.generate, "llm.dry_run=true: the plan only, nothing sent")
    if report is not None and report.stopped == "budget":
        log.warning(
            "generate: llm.max_cost_usd reached with %d prompts unsent; the run ends here, as "
            "the later stages need every answer (raise the limit and rerun to continue)",
            report.unsent,
        )
        return Stopped(Stage.generate, f"llm.max_cost_usd reached, {report.unsent} prompts unsent")
    for kind, ids in (("user", data.user_ids), ("item", data.item_ids)):
        have = sum((kind, i) in knowledge for i in ids)
        log.info("knowledge (%s): %d/%d %ss have an answer", provider.key, have, len(ids), kind)
    return knowledge


# --------------------------------------------------------------------------------- encode stage
def encode_knowledge(
    cfg: DictConfig,
    encoder: TextEncoder,
    knowledge: Mapping[tuple[str, str], Knowledge],
    data: CTRData,
    store_path: Path,
) -> KnowledgeTables:
    """Encoder vectors of every user's and item's knowledge text, as index-aligned tables."""

    def text(kind: str, k: Knowledge) -> str:
        if kind == "user" and cfg.encoder.user_text == "history+answer":
            return f"{user_history_text(k.prompt)}. {k.answer}"
        return k.answer

    ids_of = {"user": data.user_ids, "item": data.item_ids}
    rows_of = {
        kind: [i + 1 for i, raw_id in enumerate(ids) if (kind, raw_id) in knowledge]
        for kind, ids in ids_of.items()
    }
    texts_of = {
        kind: [text(kind, knowledge[(kind, ids_of[kind][r - 1])]) for r in rows]
        for kind, rows in rows_of.items()
    }
    encoded = with_store(
        store_path,
        lambda store: {
            kind: encode_with_store(encoder, store, texts) for kind, texts in texts_of.items()
        },
    )
    tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for kind, ids in ids_of.items():
        rows = rows_of[kind]
        vectors, n_stored, n_encoded = encoded[kind]
        log.info(
            "encode (%s): %d %s vectors from the store, %d encoded",
            encoder.key,
            n_stored,
            kind,
            n_encoded,
        )
        table = torch.zeros(len(ids) + 1, encoder.dim)
        has = torch.zeros(len(ids) + 1, dtype=torch.bool)
        if rows:
            table[rows] = torch.from_numpy(np.asarray(vectors, dtype=np.float32))
            has[rows] = True
        missing = len(ids) - len(rows)
        if missing:
            log.warning(
                "%d of %d %ss have no knowledge: they get a learned default vector",
                missing,
                len(ids),
                kind,
            )
        tables[kind] = (table, has)

    if cfg.knowledge != "both":
        # Ablation: the other type's vectors are withheld; every row takes its default vector.
        dropped = "item" if cfg.knowledge == "user" else "user"
        table, has = tables[dropped]
        tables[dropped] = (torch.zeros_like(table), torch.zeros_like(has))
        log.info("knowledge=%s: %s knowledge withheld", cfg.knowledge, dropped)
    return KnowledgeTables(
        user_vectors=tables["user"][0],
        item_vectors=tables["item"][0],
        user_has=tables["user"][1],
        item_has=tables["item"][1],
    )


def _coverage(tables: KnowledgeTables) -> dict[str, int]:
    return {
        "knowledge/users": int(tables.user_has.sum()),
        "knowledge/items": int(tables.item_has.sum()),
    }


# ---------------------------------------------------------------------------------- train stage
def train(
    cfg: DictConfig,
    data: CTRData,
    tables: KnowledgeTables | None,
    run_dir: Path,
    tracker: Tracker,
) -> RunOutcome:
    bb_cls = BACKBONES.get(cfg.backbone.name)
    ad_cls = ADAPTORS.get(cfg.adaptor.name)
    adaptor_kwargs = init_kwargs(cfg.adaptor, ad_cls)
    if cfg.adaptor.name != "none":
        adaptor_kwargs["out_dim"] = cfg.adaptor.out_dim
    # `fit` seeds shuffling and dropout; the initial weights are drawn here, before it.
    set_seed(cfg.seed)
    model = build_model(
        backbone=cfg.backbone.name,
        backbone_kwargs=init_kwargs(cfg.backbone, bb_cls),
        embed_dim=cfg.backbone.embed_dim,
        feature_spec=data.feature_spec,
        adaptor=cfg.adaptor.name,
        adaptor_kwargs=adaptor_kwargs,
        knowledge=tables,
    )
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(
        "model: %s + adaptor %s, %d trainable parameters",
        cfg.backbone.name,
        cfg.adaptor.name,
        n_params,
    )
    train_cfg = OmegaConf.to_object(cfg.train)
    assert isinstance(train_cfg, TrainConfig)
    result = fit(
        model,
        data.splits,
        train_cfg,
        seed=cfg.seed,
        checkpoint_path=run_dir / "checkpoint.pt",
        tracker=tracker,
        monitor=cfg.task.monitor,
    )
    slice_cfg = OmegaConf.to_object(cfg.task.slices)
    assert isinstance(slice_cfg, SliceConfig)
    slices = {
        split: slice_metrics(
            *result.predictions[split], slice_masks(data, split, slice_cfg), ctr_metrics
        )
        for split in ("valid", "test")
    }
    metrics = {
        "valid": result.valid,
        "test": result.test,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "trainable_parameters": n_params,
        "backbone": cfg.backbone.name,
        "adaptor": cfg.adaptor.name,
        "llm": cfg.llm.name,
        "knowledge": cfg.knowledge,
        "encoder": cfg.encoder.name,
        "dataset": cfg.dataset.name,
        "seed": cfg.seed,
        "slices": slices,
        "history": result.history,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    tracker.summary(
        {f"{split}/{k}": v for split in ("valid", "test") for k, v in metrics[split].items()}
        | {
            f"{split}/{name}/{k}": v
            for split, by_name in slices.items()
            for name, values in by_name.items()
            for k, v in values.items()
            if v is not None
        }
    )
    return RunOutcome(metrics=metrics, run_dir=run_dir)
