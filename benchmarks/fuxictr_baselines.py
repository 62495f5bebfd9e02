"""Accuracy baselines: FuxiCTR 2.3.10's models on kar's cached ML-100K KAR-protocol split.

Lets every bare kar backbone (`python -m kar adaptor=none backbone=X`) be compared with the same
model of a well-kept CTR library, on exactly the same samples and features. FuxiCTR is not a
project dependency: run this with a separate interpreter that has it, e.g.

    python3 -m venv /work/venv-fuxi
    /work/venv-fuxi/bin/pip install torch==2.13.0 fuxictr==2.3.10
    /work/venv-fuxi/bin/python benchmarks/fuxictr_baselines.py --models dcnv2 din --seeds 1 2 3

Each model: FuxiCTR's zoo defaults with kar's sizes (see fuxictr_models.ZOO), FuxiCTR's own
training loop (BaseModel.fit: Adam, early stopping on validation AUC with patience 2,
reduce-LR-on-plateau, best checkpoint restored), then validation and test evaluated once. Prints
one markdown table per model (per seed, then mean ± std) and a summary over all models.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

try:
    import fuxictr_models as fx
except ImportError as error:
    raise SystemExit(f"fuxictr_baselines: {error}") from None

METRIC_KEYS = ("valid_auc", "valid_logloss", "test_auc", "test_logloss")


def run_seed(
    name: str,
    feature_map: Any,
    loaders: tuple[Any, Any, Any],
    seed: int,
    work_dir: Path,
    epochs: int,
) -> dict[str, Any]:
    """Train one seed to early stop, then evaluate valid and test at the best checkpoint."""
    train_gen, valid_gen, test_gen = loaders
    model = fx.build_model(
        name, feature_map, seed=seed, model_root=work_dir / f"ckpt_{name}_{seed}"
    )
    model.fit(
        train_gen,
        epochs=epochs,
        validation_data=valid_gen,
        max_gradient_norm=fx.MAX_GRADIENT_NORM,
    )
    train_seconds = model.train_seconds
    epochs_run = model._epoch_index + 1
    valid = model.evaluate(valid_gen)
    test = model.evaluate(test_gen)
    return {
        "model": name,
        "seed": seed,
        "valid_auc": valid["AUC"],
        "valid_logloss": valid["logloss"],
        "test_auc": test["AUC"],
        "test_logloss": test["logloss"],
        "best_epoch": model.best_epoch,
        "epochs_run": epochs_run,
        "train_seconds": train_seconds,
        "train_samples_per_s": epochs_run * train_gen.num_samples / train_seconds,
        "parameters": fx.count_parameters(model),
    }


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def print_model_table(name: str, results: list[dict[str, Any]]) -> None:
    spec = fx.zoo_spec(name)
    print(f"\n### {name} — FuxiCTR {spec.fuxictr_name} ({results[0]['parameters']:,} parameters)\n")
    if name in fx.VARIANTS:
        backbone, overrides, why = fx.VARIANTS[name]
        print(f"Variant of {backbone}: {overrides}; why: {why}\n")
    print("| seed | valid AUC | valid LogLoss | test AUC | test LogLoss | best epoch | samples/s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['seed']} | {r['valid_auc']:.4f} | {r['valid_logloss']:.4f} | "
            f"{r['test_auc']:.4f} | {r['test_logloss']:.4f} | {r['best_epoch']} "
            f"(of {r['epochs_run']}) | {r['train_samples_per_s']:.0f} |"
        )
    cells = " | ".join(mean_std([r[k] for r in results]) for k in METRIC_KEYS)
    speed = statistics.median(r["train_samples_per_s"] for r in results)
    print(f"| mean ± std | {cells} | | {speed:.0f} (median) |", flush=True)


def print_summary(by_model: dict[str, list[dict[str, Any]]], seeds: list[int]) -> None:
    print(f"\n## Summary (seeds {' '.join(map(str, seeds))}; mean ± std)\n")
    print(
        "| backbone | FuxiCTR model | valid AUC | valid LogLoss | test AUC | test LogLoss "
        "| best epochs | train samples/s (median) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, results in by_model.items():
        cells = " | ".join(mean_std([r[k] for r in results]) for k in METRIC_KEYS)
        best = ", ".join(str(r["best_epoch"]) for r in results)
        speed = statistics.median(r["train_samples_per_s"] for r in results)
        print(f"| {name} | {fx.zoo_spec(name).fuxictr_name} | {cells} | {best} | {speed:.0f} |")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=list(fx.ZOO), choices=[*fx.ZOO, *fx.VARIANTS]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--epochs", type=int, default=fx.MAX_EPOCHS, help="max epochs")
    parser.add_argument("--cache", type=Path, default=None, help="cached split .pt")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--json", type=Path, default=None, help="also write all results here")
    parser.add_argument("--log-level", default="WARNING", help="FuxiCTR logging level")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr)
    torch.set_num_threads(args.threads)
    try:
        cache = fx.find_cache(args.cache)
    except FileNotFoundError as error:
        raise SystemExit(f"fuxictr_baselines: {error}") from None
    splits = fx.load_splits(cache)
    print("command: " + " ".join([sys.executable, *sys.argv]))
    print(
        f"cache: {cache}  sizes: " + ", ".join(f"{s}={len(splits[s]['label'])}" for s in fx.SPLITS)
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    by_model: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="fuxictr_baselines_") as tmp:
        work_dir = args.work_dir or Path(tmp)
        data_dir = fx.build_dataset(splits, work_dir)
        for name in args.models:
            sequence_model = fx.zoo_spec(name).sequence_model
            feature_map = fx.load_feature_map(data_dir, sequence_model=sequence_model)
            loaders = fx.make_loaders(feature_map, data_dir)
            by_model[name] = []
            for seed in args.seeds:
                result = run_seed(name, feature_map, loaders, seed, work_dir, args.epochs)
                by_model[name].append(result)
                print(f"{name} seed {seed}: {json.dumps(result)}", flush=True)
            print_model_table(name, by_model[name])
            if args.json is not None:
                args.json.write_text(json.dumps(by_model, indent=2))
    print_summary(by_model, args.seeds)


if __name__ == "__main__":
    main()
