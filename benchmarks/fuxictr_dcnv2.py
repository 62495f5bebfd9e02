"""Reference run: FuxiCTR's DCNv2 on our cached ML-100K KAR-protocol split.

Lets our bare DCNv2 (`python -m kar adaptor=none`) be compared with a well-kept CTR library on
exactly the same samples and features. FuxiCTR is not a project dependency: run this with a
separate interpreter that has it, e.g.

    python3 -m venv /work/venv-fuxi
    /work/venv-fuxi/bin/pip install torch==2.13.0 fuxictr==2.3.10
    /work/venv-fuxi/bin/python benchmarks/fuxictr_dcnv2.py --seeds 1 2 3

Pipeline (all FuxiCTR API): our splits -> parquet ('^'-joined sequences) -> FeatureProcessor
(preprocess, fit on train, transform) -> npz -> RankDataLoader -> BaseModel.fit/evaluate.
FuxiCTR's Ray-based `build_dataset` writer is skipped (the same processor calls, minus a
Ray cluster on a 2-core machine). The pip package ships no model zoo, so DCNv2 is assembled
from FuxiCTR's own layers (FeatureEmbedding, CrossNetV2, MLP_Block) as its model zoo does.
"""

from __future__ import annotations

import argparse
import glob
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "valid", "test")
SEP = "^"
CATEGORICAL = ("item", "gender", "age", "occupation")
DATASET_ID = "ml100k_kar"

# FuxiCTR model-zoo DCNv2 settings (model_zoo/DCNv2/config/model_config.yaml, "Base" +
# "DCNv2_default"), with the sizes of our DCNv2 (embed 32, MLP [200, 80], batch 1024).
FUXI_PARAMS: dict[str, Any] = {
    "model": "DCNv2",
    "task": "binary_classification",
    "loss": "binary_crossentropy",
    "metrics": ["logloss", "AUC"],
    "optimizer": "adam",
    "learning_rate": 1.0e-3,
    "embedding_regularizer": 0,
    "net_regularizer": 0,
    "batch_size": 1024,
    "embedding_dim": 32,
    "model_structure": "parallel",
    "parallel_dnn_hidden_units": [200, 80],
    "stacked_dnn_hidden_units": [200, 80],
    "dnn_activations": "relu",
    "num_cross_layers": 3,
    "net_dropout": 0,
    "batch_norm": False,
    "epochs": 20,
    "shuffle": True,
    "monitor": "AUC",
    "monitor_mode": "max",
    "early_stop_patience": 2,
    "save_best_only": True,
    "reduce_lr_on_plateau": True,
    "max_gradient_norm": 10.0,
    "verbose": 0,
    "data_format": "npz",
    # FuxiCTR's config uses 3 loader workers; 0 keeps the run inside the 2-thread budget.
    "num_workers": 0,
    "gpu": -1,
}


def _require_fuxictr() -> None:
    try:
        import fuxictr  # noqa: F401
    except ImportError as error:
        raise SystemExit(
            "fuxictr is not installed in this interpreter. Create a separate venv: "
            "python3 -m venv /work/venv-fuxi && /work/venv-fuxi/bin/pip install "
            "torch==2.13.0 fuxictr==2.3.10, then run this script with /work/venv-fuxi/bin/python"
        ) from error


def find_cache(cache: Path | None) -> Path:
    """The processed ML-100K split: `cache` if given, else the one file in cache/data."""
    if cache is not None:
        if not cache.is_file():
            raise FileNotFoundError(f"--cache {cache} does not exist; pass a cached split .pt")
        return cache
    found = sorted(glob.glob(str(REPO / "cache" / "data" / "ml-100k-*.pt")))
    if len(found) != 1:
        raise FileNotFoundError(
            f"expected exactly one cache/data/ml-100k-*.pt, found {found}; run "
            "`python -m kar stage=data` first or pick one with --cache"
        )
    return Path(found[0])


def _join_rows(rows: list[list[int]]) -> list[str]:
    return [SEP.join(str(v) for v in row if v != 0) for row in rows]


def split_to_frame(split: dict[str, torch.Tensor]) -> pd.DataFrame:
    """One row per sample for FuxiCTR's reader; sequences keep only the first `hist_len` positions.

    hist_genres (N, L, G) becomes one flat sequence of the history's genre ids, so its masked
    mean weights each genre occurrence (ours: mean over positions of per-item genre means).
    """
    hist_len = split["hist_len"].tolist()
    hist_items = split["hist_items"].tolist()  # (N, L)
    hist_ratings = split["hist_ratings"].tolist()  # (N, L)
    hist_genres = split["hist_genres"].tolist()  # (N, L, G)
    flat_hist_genres = [
        [g for position in genres[:n] for g in position]
        for genres, n in zip(hist_genres, hist_len, strict=True)
    ]
    return pd.DataFrame(
        {
            "label": split["label"].numpy().astype(np.float32),
            # Categorical ids as strings: the feature_cols declare dtype "str".
            **{name: [str(v) for v in split[name].tolist()] for name in CATEGORICAL},
            "item_genres": _join_rows(split["item_genres"].tolist()),
            "hist_items": _join_rows(
                [row[:n] for row, n in zip(hist_items, hist_len, strict=True)]
            ),
            "hist_genres": _join_rows(flat_hist_genres),
            "hist_ratings": _join_rows(
                [row[:n] for row, n in zip(hist_ratings, hist_len, strict=True)]
            ),
        }
    )


def feature_columns(split: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """FuxiCTR feature_cols mirroring kar's FeatureEmbedding fields (user id not embedded).

    max_len is the tensors' full width: FuxiCTR would otherwise take the longest train
    sequence and truncate longer valid/test ones.
    """
    length, genres = split["hist_genres"].shape[1:]  # L, G
    pooled = {
        "active": True,
        "type": "sequence",
        "dtype": "str",
        "splitter": SEP,
        "feature_encoder": "layers.MaskedAveragePooling()",
    }
    return [
        {"name": list(CATEGORICAL), "active": True, "type": "categorical", "dtype": "str"},
        {"name": "item_genres", **pooled, "max_len": genres},
        {"name": "hist_items", **pooled, "max_len": length, "share_embedding": "item"},
        {
            "name": "hist_genres",
            **pooled,
            "max_len": length * genres,
            "share_embedding": "item_genres",
        },
        {"name": "hist_ratings", **pooled, "max_len": length},
    ]


def build_npz(splits: dict[str, dict[str, torch.Tensor]], work_dir: Path) -> Any:
    """Parquet per split -> FuxiCTR FeatureProcessor (fit on train) -> `<split>.npz`.

    Parquet, not CSV: FuxiCTR 2.3.10's CSV reader passes `dtypes=` to polars, which polars 2
    removed; its parquet reader works unchanged.
    """
    from fuxictr.features import FeatureMap
    from fuxictr.preprocess import FeatureProcessor

    raw_dir = work_dir / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        split_to_frame(splits[name]).to_parquet(raw_dir / f"{name}.parquet", index=False)
    processor = FeatureProcessor(
        feature_cols=feature_columns(splits["train"]),
        label_col={"name": "label", "dtype": "float"},
        dataset_id=DATASET_ID,
        data_root=str(work_dir / "data"),
    )
    frames = {
        name: processor.preprocess(
            processor.read_data(str(raw_dir / f"{name}.parquet"), data_format="parquet")
        )
        for name in SPLITS
    }
    processor.fit(frames["train"], min_categr_count=1)
    data_dir = Path(processor.data_dir)
    for name, frame in frames.items():
        columns = {col: series.to_numpy() for col, series in frame.collect().to_dict().items()}
        encoded = processor.transform(columns)
        np.savez(data_dir / f"{name}.npz", **{k: np.asarray(v) for k, v in encoded.items()})
    feature_map = FeatureMap(DATASET_ID, str(data_dir))
    feature_map.load(str(data_dir / "feature_map.json"), dict(FUXI_PARAMS))
    return feature_map


def dcnv2_class() -> type:
    """DCNv2 assembled from FuxiCTR layers on its BaseModel (fit, early stop, best checkpoint).

    Also records the best validation epoch and the seconds spent on validation, for reporting.
    """
    from fuxictr.pytorch.layers import CrossNetV2, FeatureEmbedding, MLP_Block
    from fuxictr.pytorch.models import BaseModel

    class FuxiDCNv2(BaseModel):
        def __init__(
            self,
            feature_map: Any,
            *,
            model_structure: str,
            embedding_dim: int,
            num_cross_layers: int,
            parallel_dnn_hidden_units: list[int],
            stacked_dnn_hidden_units: list[int],
            dnn_activations: str,
            net_dropout: float,
            batch_norm: bool,
            learning_rate: float,
            optimizer: str,
            loss: str,
            base_kwargs: dict[str, Any],
        ) -> None:
            super().__init__(feature_map, model_id="DCNv2", **base_kwargs)
            if model_structure not in ("parallel", "stacked"):
                raise ValueError(f"model_structure={model_structure!r}: use parallel | stacked")
            self.model_structure = model_structure
            self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
            input_dim = feature_map.sum_emb_out_dim()
            self.crossnet = CrossNetV2(input_dim, num_cross_layers)
            hidden = (
                parallel_dnn_hidden_units
                if model_structure == "parallel"
                else stacked_dnn_hidden_units
            )
            self.dnn = MLP_Block(
                input_dim=input_dim,
                output_dim=None,
                hidden_units=hidden,
                hidden_activations=dnn_activations,
                output_activation=None,
                dropout_rates=net_dropout,
                batch_norm=batch_norm,
            )
            head_dim = hidden[-1] + (input_dim if model_structure == "parallel" else 0)
            self.fc = torch.nn.Linear(head_dim, 1)
            self.compile(optimizer, loss, learning_rate)
            self.reset_parameters()
            self.model_to_device()
            self.best_epoch = 0
            self.eval_seconds = 0.0

        def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            x0 = self.embedding_layer(self.get_inputs(inputs), flatten_emb=True)  # (B, F*D)
            crossed = self.crossnet(x0)  # (B, F*D)
            if self.model_structure == "parallel":
                hidden = torch.cat([crossed, self.dnn(x0)], dim=-1)  # (B, F*D + h)
            else:
                hidden = self.dnn(crossed)  # (B, h)
            return {"y_pred": self.output_activation(self.fc(hidden))}  # (B, 1)

        def eval_step(self) -> None:
            start = time.perf_counter()
            super().eval_step()
            self.eval_seconds += time.perf_counter() - start

        def checkpoint_and_earlystop(self, logs: dict[str, float], min_delta: float = 1e-6):
            previous = self._best_metric
            super().checkpoint_and_earlystop(logs, min_delta=min_delta)
            if self._best_metric != previous:
                self.best_epoch = self._epoch_index + 1

    return FuxiDCNv2


def run_seed(feature_map: Any, data_dir: Path, seed: int, work_dir: Path) -> dict[str, float]:
    """Train one seed to early stop, then evaluate valid and test at the best checkpoint."""
    from fuxictr.pytorch.dataloaders import RankDataLoader
    from fuxictr.pytorch.torch_utils import seed_everything

    seed_everything(seed=seed)
    p = FUXI_PARAMS
    model = dcnv2_class()(
        feature_map,
        model_structure=p["model_structure"],
        embedding_dim=p["embedding_dim"],
        num_cross_layers=p["num_cross_layers"],
        parallel_dnn_hidden_units=p["parallel_dnn_hidden_units"],
        stacked_dnn_hidden_units=p["stacked_dnn_hidden_units"],
        dnn_activations=p["dnn_activations"],
        net_dropout=p["net_dropout"],
        batch_norm=p["batch_norm"],
        learning_rate=p["learning_rate"],
        optimizer=p["optimizer"],
        loss=p["loss"],
        base_kwargs={
            "task": p["task"],
            "gpu": p["gpu"],
            "monitor": p["monitor"],
            "monitor_mode": p["monitor_mode"],
            "early_stop_patience": p["early_stop_patience"],
            "save_best_only": p["save_best_only"],
            "embedding_regularizer": p["embedding_regularizer"],
            "net_regularizer": p["net_regularizer"],
            "reduce_lr_on_plateau": p["reduce_lr_on_plateau"],
            "verbose": p["verbose"],
            "metrics": p["metrics"],
            "model_root": str(work_dir / f"checkpoints_seed{seed}"),
        },
    )
    Path(model.model_dir).mkdir(parents=True, exist_ok=True)  # FuxiCTR's set_logger makes it
    train_gen, valid_gen, test_gen = RankDataLoader(
        feature_map,
        stage="both",
        train_data=str(data_dir / "train.npz"),
        valid_data=str(data_dir / "valid.npz"),
        test_data=str(data_dir / "test.npz"),
        batch_size=p["batch_size"],
        shuffle=p["shuffle"],
        data_format=p["data_format"],
        num_workers=p["num_workers"],
    )
    start = time.perf_counter()
    model.fit(
        train_gen,
        epochs=p["epochs"],
        validation_data=valid_gen,
        max_gradient_norm=p["max_gradient_norm"],
    )
    train_seconds = time.perf_counter() - start - model.eval_seconds
    epochs_run = model._epoch_index + 1
    valid = model.evaluate(valid_gen)
    test = model.evaluate(test_gen)
    return {
        "seed": seed,
        "valid_auc": valid["AUC"],
        "valid_logloss": valid["logloss"],
        "test_auc": test["AUC"],
        "test_logloss": test["logloss"],
        "best_epoch": model.best_epoch,
        "epochs_run": epochs_run,
        "train_samples_per_s": epochs_run * train_gen.num_samples / train_seconds,
    }


def print_table(results: list[dict[str, float]]) -> None:
    keys = ("valid_auc", "valid_logloss", "test_auc", "test_logloss")
    print("| seed | valid AUC | valid logloss | test AUC | test logloss | best epoch | samples/s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['seed']} | {r['valid_auc']:.4f} | {r['valid_logloss']:.4f} | "
            f"{r['test_auc']:.4f} | {r['test_logloss']:.4f} | {r['best_epoch']} "
            f"(of {r['epochs_run']}) | {r['train_samples_per_s']:.0f} |"
        )
    if len(results) > 1:
        cells = [
            f"{statistics.mean(r[k] for r in results):.4f}"
            f"±{statistics.stdev(r[k] for r in results):.4f}"
            for k in keys
        ]
        speed = statistics.mean(r["train_samples_per_s"] for r in results)
        print(f"| mean±std | {' | '.join(cells)} | | {speed:.0f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None, help="cached split .pt")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--log-level", default="WARNING", help="FuxiCTR logging level")
    args = parser.parse_args(argv)
    _require_fuxictr()
    logging.basicConfig(level=args.log_level, stream=sys.stderr)
    torch.set_num_threads(args.threads)

    cache = find_cache(args.cache)
    splits = torch.load(cache, weights_only=True)["splits"]
    print(f"cache: {cache}  sizes: " + ", ".join(f"{s}={len(splits[s]['label'])}" for s in SPLITS))
    with tempfile.TemporaryDirectory(prefix="fuxictr_dcnv2_") as tmp:
        work_dir = args.work_dir or Path(tmp)
        feature_map = build_npz(splits, work_dir)
        data_dir = Path(feature_map.data_dir)
        results = []
        for seed in args.seeds:
            results.append(run_seed(feature_map, data_dir, seed, work_dir))
            print(f"seed {seed} done: {results[-1]}", flush=True)
    print_table(results)


if __name__ == "__main__":
    main()
