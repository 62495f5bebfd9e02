"""Training throughput side by side: FuxiCTR 2.3.10, kar bare and kar + KAR, per backbone.

For every backbone, each round trains one model per system through that framework's own public
training path and data loader, on the same ML-100K training split, batch 1024, with the same
torch thread count:

- kar bare: `kar.models.build_model(adaptor="none")` + `kar.engine.fit`; samples/s from the
  per-epoch `history` (train_seconds: the training loop with data loading, no validation);
- kar + KAR: the same with adaptor=base and the real knowledge vectors, read from the knowledge
  store through `kar.pipeline.generate_knowledge` / `encode_knowledge` (nothing is encoded);
- FuxiCTR: the zoo model of `fuxictr_models.py` trained by `BaseModel.fit` on FuxiCTR's
  RankDataLoader (npz); samples/s from the time spent in `train_epoch` minus its validation.

Validation and test are cut to their first `--eval-rows` samples in both frameworks: they run
after each epoch but are outside the timed part anyway. The order of the three systems rotates
from round to round, so that CPU throttling on small machines hits all of them alike: compare the
per-round ratios (reported as medians), not absolute speeds across runs.

Needs one interpreter with both kar and fuxictr, e.g.

    /work/venv-fuxi/bin/pip install -c constraints.txt -e .    # kar next to fuxictr
    KAR_DATA_DIR=../shared/data /work/venv-fuxi/bin/python benchmarks/throughput.py --rounds 3

and the knowledge store filled once (`python -m kar stage=encode`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

try:
    import fuxictr_models as fx
except ImportError as error:
    raise SystemExit(f"throughput: {error}") from None
try:
    from accelerate.utils import set_seed
    from hydra import compose, initialize_config_dir
    from omegaconf import DictConfig, OmegaConf

    from kar.config import register_schema, validate
    from kar.data.protocol import CTRData
    from kar.engine import TrainConfig, fit
    from kar.models import KARModel, KnowledgeTables, build_model
    from kar.pipeline import encode_knowledge, generate_knowledge, load_raw, prepare_data
    from kar.registry import ADAPTORS, BACKBONES, ENCODERS, LLMS, init_kwargs
except ImportError as error:
    raise SystemExit(
        f"throughput: kar is not importable here ({error}); install it next to fuxictr: "
        "/work/venv-fuxi/bin/pip install -c constraints.txt -e ."
    ) from None

log = logging.getLogger("throughput")
REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("fuxictr", "kar", "kar+KAR")
BARE, KAR_ADAPTOR = "none", "base"


@dataclass
class Measurement:
    """One training run of one system: its speed and model size."""

    backbone: str
    system: str
    round: int
    samples_per_s: float
    parameters: int


# ---------------------------------------------------------------------------------- kar side
def kar_source_fingerprint() -> str:
    """A hash of the kar sources this process imported: which code the speeds belong to."""
    import kar

    digest = hashlib.sha256()
    for path in sorted(Path(kar.__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def default_data_dir() -> Path:
    """$KAR_DATA_DIR, else ../shared/data (as the nox sessions), else ./data."""
    if os.environ.get("KAR_DATA_DIR"):
        return Path(os.environ["KAR_DATA_DIR"])
    shared = REPO.parent / "shared" / "data"
    return shared if shared.is_dir() else REPO / "data"


def kar_config(backbone: str, adaptor: str, args: argparse.Namespace) -> DictConfig:
    """The composed, validated kar config of `python -m kar backbone=... adaptor=...`."""
    overrides = [
        f"backbone={backbone}",
        f"adaptor={adaptor}",
        "logger=none",
        f"paths.data_dir={args.data_dir.resolve()}",
        f"paths.cache_dir={(REPO / 'cache').resolve()}",
        f"train.max_epochs={args.epochs}",
        f"train.batch_size={fx.BATCH_SIZE}",
        f"train.num_threads={args.threads}",
        f"seed={args.seed}",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return validate(cfg)


def kar_data_and_knowledge(cfg: DictConfig) -> tuple[CTRData, KnowledgeTables]:
    """The processed split and knowledge vectors, as `python -m kar` gets them (all cached)."""
    store = Path(cfg.paths.store)
    if not store.exists():
        raise SystemExit(
            f"throughput: knowledge store {store} is missing; fill it once with "
            "`python -m kar stage=encode`"
        )
    provider_cls = LLMS.get(cfg.llm.name)
    provider = provider_cls(**init_kwargs(cfg.llm, provider_cls))
    encoder_cls = ENCODERS.get(cfg.encoder.name)
    encoder = encoder_cls(**init_kwargs(cfg.encoder, encoder_cls))
    data = prepare_data(cfg, provider.prefix_lengths())
    knowledge = generate_knowledge(cfg, provider, load_raw(cfg), data, store)
    if knowledge is None:
        raise SystemExit("throughput: the generate stage stopped early; check the llm config")
    return data, encode_knowledge(cfg, encoder, knowledge, data, store)


def build_kar_model(cfg: DictConfig, data: CTRData, tables: KnowledgeTables | None) -> KARModel:
    """What kar.pipeline.train builds, seeded the same way."""
    adaptor_kwargs = init_kwargs(cfg.adaptor, ADAPTORS.get(cfg.adaptor.name))
    if cfg.adaptor.name != BARE:
        adaptor_kwargs["out_dim"] = cfg.adaptor.out_dim
    set_seed(cfg.seed)
    return build_model(
        backbone=cfg.backbone.name,
        backbone_kwargs=init_kwargs(cfg.backbone, BACKBONES.get(cfg.backbone.name)),
        embed_dim=cfg.backbone.embed_dim,
        feature_spec=data.feature_spec,
        adaptor=cfg.adaptor.name,
        adaptor_kwargs=adaptor_kwargs,
        knowledge=tables if cfg.adaptor.name != BARE else None,
    )


def head(split: dict[str, torch.Tensor], n_rows: int) -> dict[str, torch.Tensor]:
    return {key: tensor[:n_rows] for key, tensor in split.items()}


def measure_kar(
    cfg: DictConfig,
    data: CTRData,
    splits: dict[str, dict[str, torch.Tensor]],
    tables: KnowledgeTables | None,
    work_dir: Path,
) -> tuple[float, int]:
    """(train samples/s over all epochs, trainable parameters) of one kar.engine.fit run."""
    model = build_kar_model(cfg, data, tables)
    train_cfg = OmegaConf.to_object(cfg.train)
    assert isinstance(train_cfg, TrainConfig)
    result = fit(
        model, splits, train_cfg, seed=cfg.seed, checkpoint_path=work_dir / "kar_checkpoint.pt"
    )
    seconds = sum(epoch["train_seconds"] for epoch in result.history)
    samples = len(result.history) * len(splits["train"]["label"])
    return samples / seconds, fx.count_parameters(model)


# ------------------------------------------------------------------------------ FuxiCTR side
@dataclass
class FuxiSetup:
    """A backbone's FuxiCTR feature map and loaders (train in full, untimed eval cut short)."""

    feature_map: Any
    loaders: tuple[Any, Any, Any]


def fuxi_setup(name: str, data_dir: Path, valid: str, test: str) -> FuxiSetup:
    feature_map = fx.load_feature_map(data_dir, sequence_model=fx.ZOO[name].sequence_model)
    return FuxiSetup(feature_map, fx.make_loaders(feature_map, data_dir, valid=valid, test=test))


def measure_fuxictr(
    name: str, setup: FuxiSetup, args: argparse.Namespace, work_dir: Path
) -> tuple[float, int]:
    """(train samples/s, trainable parameters) of one FuxiCTR BaseModel.fit run."""
    train_gen, valid_gen, _ = setup.loaders
    model = fx.build_model(name, setup.feature_map, seed=args.seed, model_root=work_dir / "fuxi")
    with torch_threads(args.threads):
        model.fit(
            train_gen,
            epochs=args.epochs,
            validation_data=valid_gen,
            max_gradient_norm=fx.MAX_GRADIENT_NORM,
        )
    epochs_run = model._epoch_index + 1
    return epochs_run * train_gen.num_samples / model.train_seconds, fx.count_parameters(model)


@contextmanager
def torch_threads(n_threads: int) -> Iterator[None]:
    """Same thread handling as kar.engine.fit: set for the run, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------------- the rounds
def round_order(round_index: int) -> tuple[str, ...]:
    """The systems rotated by one per round: each is first, second and third in turn."""
    shift = round_index % len(SYSTEMS)
    return SYSTEMS[shift:] + SYSTEMS[:shift]


def run_backbone(
    name: str,
    data: CTRData,
    tables: KnowledgeTables,
    data_dir: Path,
    eval_names: tuple[str, str],
    args: argparse.Namespace,
    work_dir: Path,
) -> list[Measurement]:
    configs = {"kar": kar_config(name, BARE, args), "kar+KAR": kar_config(name, KAR_ADAPTOR, args)}
    kar_splits = {
        "train": data.splits["train"],
        "valid": head(data.splits["valid"], args.eval_rows),
        "test": head(data.splits["test"], args.eval_rows),
    }
    setup = fuxi_setup(name, data_dir, *eval_names)
    measurements = []
    for round_index in range(args.rounds):
        for system in round_order(round_index):
            if system == "fuxictr":
                speed, parameters = measure_fuxictr(name, setup, args, work_dir)
            else:
                knowledge = tables if system == "kar+KAR" else None
                speed, parameters = measure_kar(
                    configs[system], data, kar_splits, knowledge, work_dir
                )
            measurements.append(Measurement(name, system, round_index, speed, parameters))
            log.warning("%s round %d %s: %.0f samples/s", name, round_index, system, speed)
    return measurements


# -------------------------------------------------------------------------------- reporting
def summarise(name: str, measurements: list[Measurement]) -> dict[str, Any]:
    """Median speeds, and medians of the per-round (side-by-side) ratios."""
    speed = {
        system: {m.round: m.samples_per_s for m in measurements if m.system == system}
        for system in SYSTEMS
    }
    rounds = sorted(speed["kar"])
    # Step time is the inverse of samples/s at a fixed batch size.
    return {
        "backbone": name,
        **{system: statistics.median(speed[system].values()) for system in SYSTEMS},
        "kar_vs_fuxictr": statistics.median(speed["kar"][r] / speed["fuxictr"][r] for r in rounds),
        "kar_step_ratio": statistics.median(speed["kar"][r] / speed["kar+KAR"][r] for r in rounds),
        "parameters": {
            system: next(m.parameters for m in measurements if m.system == system)
            for system in SYSTEMS
        },
    }


def print_table(rows: list[dict[str, Any]], command: str, args: argparse.Namespace) -> None:
    print(
        f"\n## Training throughput, ML-100K train split ({args.epochs} epoch(s) per run, "
        f"batch {fx.BATCH_SIZE}, {args.threads} torch thread(s), median of {args.rounds} "
        "rounds)\n"
    )
    print(
        "| backbone | FuxiCTR samples/s | kar bare samples/s | kar+KAR samples/s "
        "| kar bare / FuxiCTR (goal ≥ 1.5) | kar+KAR / kar bare step time (goal ≤ 1.5) "
        "| parameters FuxiCTR / kar / kar+KAR |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["parameters"]
        ok_speed = "✓" if r["kar_vs_fuxictr"] >= 1.5 else "✗"
        ok_step = "✓" if r["kar_step_ratio"] <= 1.5 else "✗"
        print(
            f"| {r['backbone']} | {r['fuxictr']:.0f} | {r['kar']:.0f} | {r['kar+KAR']:.0f} "
            f"| {r['kar_vs_fuxictr']:.2f} {ok_speed} | {r['kar_step_ratio']:.2f} {ok_step} "
            f"| {p['fuxictr']:,} / {p['kar']:,} / {p['kar+KAR']:,} |"
        )
    print(
        f"\nRatios are medians of per-round ratios (systems alternated). Command:\n\n    {command}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=list(fx.ZOO), choices=list(fx.ZOO))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1, help="training epochs per run")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, both frameworks")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--eval-rows", type=int, default=1024, help="valid/test rows (untimed)")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir(), help="KAR_DATA_DIR")
    parser.add_argument("--json", type=Path, default=None, help="also write every measurement")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    if min(args.rounds, args.epochs, args.threads, args.eval_rows) < 1:
        parser.error("--rounds, --epochs, --threads and --eval-rows must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(name)s: %(message)s")
    logging.getLogger("kar").setLevel(logging.INFO)  # shows the cache and store hits
    command = " ".join([sys.executable, *sys.argv])
    print(f"command: {command}")
    print(f"kar sources: {kar_source_fingerprint()} (sha256 of src/kar/**/*.py at import)")
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f} at start",
        flush=True,
    )
    register_schema()
    data, tables = kar_data_and_knowledge(kar_config(args.backbones[0], KAR_ADAPTOR, args))
    logging.getLogger("kar").setLevel(args.log_level)
    measurements: list[Measurement] = []
    rows = []
    with tempfile.TemporaryDirectory(prefix="kar_throughput_") as tmp:
        work_dir = Path(tmp)
        data_dir = fx.build_dataset(data.splits, work_dir)
        eval_names = (
            fx.write_head(data_dir, "valid", args.eval_rows),
            fx.write_head(data_dir, "test", args.eval_rows),
        )
        for name in args.backbones:
            found = run_backbone(name, data, tables, data_dir, eval_names, args, work_dir)
            measurements += found
            rows.append(summarise(name, found))
            if args.json is not None:
                args.json.write_text(json.dumps([asdict(m) for m in measurements], indent=2))
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    print_table(rows, command, args)


if __name__ == "__main__":
    main()
