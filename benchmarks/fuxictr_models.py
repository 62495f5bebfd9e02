"""FuxiCTR 2.3.10 reference models for kar's nine CTR backbones, on kar's cached ML-100K split.

The PyPI package ships FuxiCTR's layers and `BaseModel` (training loop, early stopping, best
checkpoint) but not its model zoo (github.com/reczoo/FuxiCTR, ``model_zoo/<Model>/src``). Each
class below re-assembles one zoo model on `BaseModel` from the package's own layers, following
the zoo's ``forward`` step by step (same ops, same order, same initialisation through
`BaseModel.reset_parameters`), so that its accuracy *and* its speed are FuxiCTR's:

    kar backbone  FuxiCTR model  package layers used
    dcnv1         DCN            FeatureEmbedding, CrossNet, MLP_Block
    dcnv2         DCNv2          FeatureEmbedding, CrossNetV2, MLP_Block
    deepfm        DeepFM         FeatureEmbedding, FactorizationMachine, MLP_Block
    xdeepfm       xDeepFM        FeatureEmbedding, CompressedInteractionNet, LogisticRegression,
                                 MLP_Block
    fibinet       FiBiNET        FeatureEmbedding, SqueezeExcitation, BilinearInteractionV2,
                                 LogisticRegression, MLP_Block
    fignn         FiGNN          FeatureEmbedding; graph layer and attentional scoring are
                                 zoo-only, re-implemented here (FieldGraph, AttentionalScoring)
    autoint       AutoInt        FeatureEmbedding, ScaledDotProductAttention, MLP_Block; the
                                 zoo-only self-attention block is re-implemented (SelfAttention)
    din           DIN            FeatureEmbeddingDict, DIN_Attention, MLP_Block
    dien          DIEN           FeatureEmbeddingDict, MLP_Block, MaskedSumPooling; the zoo-only
                                 bilinear interest attention and AUGRU are re-implemented
                                 (InterestAttention, AUGRUCell, DynamicAUGRU)

Hyperparameters: each zoo model's ``<Model>_default`` config (``model_config.yaml``), except the
sizes that the zoo sets per dataset, which take kar's: embedding_dim 32, batch 1024, DNN
[200, 80], lr 1e-3 (see `ZOO`).

Data: kar's processed split (cache/data/ml-100k-*.pt) goes through FuxiCTR's own preprocessing
(FeatureProcessor: parquet -> vocabularies fit on train -> npz) and data loader
(RankDataLoader). Features mirror kar's FeatureEmbedding: item, item_genres, gender, age,
occupation, hist_items, hist_genres, hist_ratings (the user id is not a feature in either).
Multi-valued features are mean-pooled (MaskedAveragePooling), as in kar, except in DIN/DIEN,
where hist_items and hist_genres stay sequences. Behaviours are laid out by position, so that
DIN/DIEN see what kar's din.py/dien.py see: target = [item, mean of its genres], behaviour t =
[hist_items[t], mean of hist_genres[t]] (a behaviour has several genres, and FuxiCTR sequences
are flat, so hist_genres holds history_len x genres_per_item slots, empty ones padded; the
per-behaviour genre mean is `behaviour_genre_mean`).
"""

from __future__ import annotations

import copy
import glob
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

FUXICTR_MISSING = (
    "fuxictr is not installed in this interpreter. Create a separate venv: "
    "python3 -m venv /work/venv-fuxi && /work/venv-fuxi/bin/pip install torch==2.13.0 "
    "fuxictr==2.3.10, then run the benchmark with /work/venv-fuxi/bin/python"
)
try:
    from fuxictr.features import FeatureMap
    from fuxictr.preprocess import FeatureProcessor
    from fuxictr.pytorch.dataloaders import RankDataLoader
    from fuxictr.pytorch.layers import (
        BilinearInteractionV2,
        CompressedInteractionNet,
        CrossNet,
        CrossNetV2,
        DIN_Attention,
        FactorizationMachine,
        FeatureEmbedding,
        FeatureEmbeddingDict,
        LogisticRegression,
        MaskedSumPooling,
        MLP_Block,
        ScaledDotProductAttention,
        SqueezeExcitation,
    )
    from fuxictr.pytorch.models import BaseModel
    from fuxictr.pytorch.torch_utils import seed_everything
except ImportError as error:
    raise ImportError(FUXICTR_MISSING) from error

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "valid", "test")
SEP = "^"
CATEGORICAL = ("item", "gender", "age", "occupation")
DATASET_ID = "ml100k_kar"
# DIN/DIEN: the candidate and each behaviour are [item, genres], as in kar's SequenceInput.
TARGET_FIELDS = ("item", "item_genres")
BEHAVIOUR_FIELDS = ("hist_items", "hist_genres")

EMBEDDING_DIM = 32
LEARNING_RATE = 1.0e-3
BATCH_SIZE = 1024
MAX_EPOCHS = 20
MAX_GRADIENT_NORM = 10.0  # BaseModel.fit's default
DNN = [200, 80]

# FuxiCTR "Base" + "<Model>_default" training settings shared by every zoo model.
TRAINING: dict[str, Any] = {
    "task": "binary_classification",
    "loss": "binary_crossentropy",
    "metrics": ["logloss", "AUC"],
    "optimizer": "adam",
    "embedding_regularizer": 0,
    "net_regularizer": 0,
    # The zoo defaults monitor AUC - logloss; kar early-stops on AUC, so both do here.
    "monitor": "AUC",
    "monitor_mode": "max",
    "early_stop_patience": 2,
    "save_best_only": True,
    "reduce_lr_on_plateau": True,
    "verbose": 0,
    "gpu": -1,
}


# ------------------------------------------------------------------------------------- data
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


def load_splits(cache: Path) -> dict[str, dict[str, Tensor]]:
    """kar's processed splits (tensors only: safe to load with weights_only)."""
    return torch.load(cache, weights_only=True)["splits"]


def _join(tokens: Sequence[int]) -> str:
    """'^'-joined ids; 0 (kar's padding) becomes an empty token, which FuxiCTR pads too."""
    return SEP.join(str(v) if v != 0 else "" for v in tokens)


def split_to_frame(split: dict[str, Tensor]) -> pd.DataFrame:
    """One row per sample for FuxiCTR's reader; histories keep their first `hist_len` positions.

    hist_genres keeps one slot per (position, genre), empty slots included, so that position t
    owns slots [t*G, (t+1)*G): DIN/DIEN pool each behaviour's genres, the other models pool all
    genre occurrences of the history (kar: mean over positions of per-position genre means).
    """
    hist_len = split["hist_len"].tolist()
    columns: dict[str, Any] = {
        "label": split["label"].numpy().astype(np.float32),
        # Categorical ids as strings: the feature_cols declare dtype "str".
        **{name: [str(v) for v in split[name].tolist()] for name in CATEGORICAL},
        "item_genres": [
            SEP.join(str(g) for g in row if g) for row in split["item_genres"].tolist()
        ],
    }
    for name in ("hist_items", "hist_ratings"):
        rows = split[name].tolist()  # (N, L)
        columns[name] = [_join(row[:n]) for row, n in zip(rows, hist_len, strict=True)]
    genre_rows = split["hist_genres"].tolist()  # (N, L, G)
    columns["hist_genres"] = [
        _join([g for position in row[:n] for g in position])
        for row, n in zip(genre_rows, hist_len, strict=True)
    ]
    return pd.DataFrame(columns)


def feature_columns(split: dict[str, Tensor]) -> list[dict[str, Any]]:
    """FuxiCTR feature_cols mirroring kar's FeatureEmbedding fields (user id not embedded).

    max_len is the tensors' full width: FuxiCTR would otherwise take the longest train sequence
    and truncate longer valid/test ones. Sequences are padded at the end ("post", FuxiCTR's
    default), like kar's right-padded histories.
    """
    length, genres = split["hist_genres"].shape[1:]  # L, G
    pooled = {
        "active": True,
        "type": "sequence",
        "dtype": "str",
        "splitter": SEP,
        "padding": "post",
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


def build_dataset(splits: dict[str, dict[str, Tensor]], work_dir: Path) -> Path:
    """Parquet per split -> FeatureProcessor (fit on train) -> `<split>.npz`; the data dir.

    Parquet, not CSV: FuxiCTR 2.3.10's CSV reader passes `dtypes=` to polars, which polars 2
    removed; its parquet reader works unchanged. FuxiCTR's Ray-based `build_dataset` writer is
    skipped (the same processor calls, minus a Ray cluster on a 2-core machine).
    """
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
    return data_dir


def write_head(data_dir: Path, split: str, n_rows: int) -> str:
    """`<split>_head<n>.npz`: the first `n_rows` samples of a split (e.g. an untimed valid)."""
    source = np.load(data_dir / f"{split}.npz")
    target = data_dir / f"{split}_head{n_rows}.npz"
    np.savez(target, **{key: source[key][:n_rows] for key in source.files})
    return target.stem


def load_feature_map(data_dir: Path, *, sequence_model: bool) -> FeatureMap:
    """The saved feature map; sequence models keep the behaviour fields as sequences.

    The override goes through FeatureMap's own `feature_specs` parameter, as a zoo config's
    ``feature_specs`` would.
    """
    params: dict[str, Any] = {"embedding_dim": EMBEDDING_DIM}
    if sequence_model:
        params["feature_specs"] = [{"name": list(BEHAVIOUR_FIELDS), "feature_encoder": None}]
    feature_map = FeatureMap(DATASET_ID, str(data_dir))
    feature_map.load(str(data_dir / "feature_map.json"), params)
    return feature_map


def make_loaders(
    feature_map: FeatureMap,
    data_dir: Path,
    *,
    valid: str = "valid",
    test: str = "test",
    batch_size: int = BATCH_SIZE,
    num_workers: int = 0,
) -> tuple[Any, Any, Any]:
    """FuxiCTR's RankDataLoader over `<name>.npz` files: (train, valid, test) generators.

    num_workers 0: the zoo's Base config uses 3 loader processes, which on a 2-core machine
    would compete with the torch threads (kar's loader also runs in the main process).
    """
    return RankDataLoader(
        feature_map,
        stage="both",
        train_data=str(data_dir / "train.npz"),
        valid_data=str(data_dir / f"{valid}.npz"),
        test_data=str(data_dir / f"{test}.npz"),
        batch_size=batch_size,
        shuffle=True,
        data_format="npz",
        num_workers=num_workers,
    )


# ------------------------------------------------------------------------------- base class
class ZooModel(BaseModel):
    """`BaseModel` plus what the benchmarks report: best epoch and seconds spent validating.

    Subclasses build their layers, then call `finish_init` (what every zoo __init__ ends with).
    """

    def __init__(self, feature_map: FeatureMap, model_id: str, **kwargs: Any) -> None:
        super().__init__(feature_map, model_id=model_id, **kwargs)
        self._optimizer_name = kwargs["optimizer"]
        self._loss_name = kwargs["loss"]
        self.best_epoch = 0
        self.epoch_seconds = 0.0  # inside train_epoch, validation included
        self.eval_seconds = 0.0  # validation (and checkpointing) inside train_epoch

    @property
    def train_seconds(self) -> float:
        """Seconds of training proper: train_epoch (data loading included) minus validation."""
        return self.epoch_seconds - self.eval_seconds

    def finish_init(self, learning_rate: float) -> None:
        self.compile(self._optimizer_name, self._loss_name, learning_rate)
        self.reset_parameters()
        initialise_unshared_copies(self)
        self.model_to_device()

    def train_epoch(self, data_generator: Any) -> None:
        start = time.perf_counter()
        super().train_epoch(data_generator)
        self.epoch_seconds += time.perf_counter() - start

    def eval_step(self) -> None:
        # Validation runs inside train_epoch; timed so that it can be left out of train speed.
        start = time.perf_counter()
        super().eval_step()
        self.eval_seconds += time.perf_counter() - start

    def checkpoint_and_earlystop(self, logs: dict[str, float], min_delta: float = 1e-6) -> None:
        previous = self._best_metric
        super().checkpoint_and_earlystop(logs, min_delta=min_delta)
        if self._best_metric != previous:
            self.best_epoch = self._epoch_index + 1


def initialise_unshared_copies(model: nn.Module) -> None:
    """Give FuxiCTR's embedding initialisation to tables that FuxiCTR 2.3.10 leaves at N(0, 1).

    FeatureEmbeddingDict.init_weights skips every feature declaring `share_embedding`, because
    its table is the owner's. LogisticRegression (in DeepFM's FM, xDeepFM, FiBiNET) builds its
    1-d tables with use_sharing=False, so hist_items / hist_genres get tables of their own that
    nobody initialises: PyTorch's N(0, 1) default, i.e. first-order weights ~1e4 times FuxiCTR's
    N(0, 1e-4), which costs those models several epochs (a FuxiCTR bug, fixed here so that the
    baseline is not weakened by our use of shared embeddings).
    """
    for module in model.modules():
        if not isinstance(module, FeatureEmbeddingDict):
            continue
        features = module._feature_map.features
        for name, table in module.embedding_layers.items():
            owner = features[name].get("share_embedding")
            if owner is None or (
                owner in module.embedding_layers and module.embedding_layers[owner] is table
            ):
                continue  # not shared, or the owner's table (initialised by the owner)
            if isinstance(table, nn.Embedding):
                start = 0 if table.padding_idx is None else 1  # the padding row stays zero
                module.embedding_initializer(table.weight[start:, :])


def _optional_dnn(
    input_dim: int,
    hidden_units: Sequence[int],
    output_dim: int | None,
    activations: str,
    dropout: float,
    batch_norm: bool,
) -> MLP_Block | None:
    """The zoo's `MLP_Block(...) if hidden_units else None`."""
    if not hidden_units:
        return None
    return MLP_Block(
        input_dim=input_dim,
        output_dim=output_dim,
        hidden_units=list(hidden_units),
        hidden_activations=activations,
        output_activation=None,
        dropout_rates=dropout,
        batch_norm=batch_norm,
    )


# ------------------------------------------------------------------------------ DCN, DCNv2
class FuxiDCN(ZooModel):
    """model_zoo/DCN/DCN_torch: [CrossNet(x0), DNN(x0)] -> Linear -> sigmoid."""

    def __init__(
        self,
        feature_map: FeatureMap,
        *,
        learning_rate: float,
        embedding_dim: int,
        dnn_hidden_units: Sequence[int],
        dnn_activations: str = "ReLU",
        num_cross_layers: int = 3,
        net_dropout: float = 0.0,
        batch_norm: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(feature_map, model_id="DCN", **kwargs)
        self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
        input_dim = feature_map.sum_emb_out_dim()
        self.dnn = _optional_dnn(
            input_dim, dnn_hidden_units, None, dnn_activations, net_dropout, batch_norm
        )
        self.crossnet = CrossNet(input_dim, num_cross_layers)
        final_dim = input_dim + (dnn_hidden_units[-1] if dnn_hidden_units else 0)
        self.fc = nn.Linear(final_dim, 1)
        self.finish_init(learning_rate)

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        x0 = self.embedding_layer(self.get_inputs(inputs), flatten_emb=True)  # (B, F*D)
        hidden = self.crossnet(x0)
        if self.dnn is not None:
            hidden = torch.cat([hidden, self.dnn(x0)], dim=-1)  # (B, F*D + h)
        return {"y_pred": self.output_activation(self.fc(hidden))}  # (B, 1)


class FuxiDCNv2(ZooModel):
    """model_zoo/DCNv2: CrossNetV2 with a "parallel" or "stacked" DNN -> Linear -> sigmoid.

    The zoo's low-rank mixture cross net (use_low_rank_mixture, default off) is not built.
    """

    def __init__(
        self,
        feature_map: FeatureMap,
        *,
        learning_rate: float,
        embedding_dim: int,
        model_structure: str = "parallel",
        parallel_dnn_hidden_units: Sequence[int] = (),
        stacked_dnn_hidden_units: Sequence[int] = (),
        dnn_activations: str = "ReLU",
        num_cross_layers: int = 3,
        net_dropout: float = 0.0,
        batch_norm: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(feature_map, model_id="DCNv2", **kwargs)
        if model_structure not in ("parallel", "stacked"):
            raise ValueError(f"model_structure={model_structure!r}: use parallel | stacked")
        self.model_structure = model_structure
        self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
        input_dim = feature_map.sum_emb_out_dim()
        self.crossnet = CrossNetV2(input_dim, num_cross_layers)
        hidden = (
            parallel_dnn_hidden_units if model_structure == "parallel" else stacked_dnn_hidden_units
        )
        self.dnn = MLP_Block(
            input_dim=input_dim,
            output_dim=None,
            hidden_units=list(hidden),
            hidden_activations=dnn_activations,
            output_activation=None,
            dropout_rates=net_dropout,
            batch_norm=batch_norm,
        )
        head_dim = hidden[-1] + (input_dim if model_structure == "parallel" else 0)
        self.fc = nn.Linear(head_dim, 1)
        self.finish_init(learning_rate)

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        x0 = self.embedding_layer(self.get_inputs(inputs), flatten_emb=True)  # (B, F*D)
        crossed = self.crossnet(x0)  # (B, F*D)
        if self.model_structure == "parallel":
            hidden = torch.cat([crossed, self.dnn(x0)], dim=-1)  # (B, F*D + h)
        else:
            hidden = self.dnn(crossed)  # (B, h)
        return {"y_pred": self.output_activation(self.fc(hidden))}  # (B, 1)


# --------------------------------------------------------------------- DeepFM, xDeepFM, FiBiNET
class FuxiDeepFM(ZooModel):
    """model_zoo/DeepFM/DeepFM_torch: FM (first order + pairwise) + DNN -> sigmoid."""

    def __init__(
        self,
        feature_map: FeatureMap,
        *,
        learning_rate: float,
        embedding_dim: int,
        hidden_units: Sequence[int],
        hidden_activations: str = "ReLU",
        net_dropout: float = 0.0,
        batch_norm: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(feature_map, model_id="DeepFM", **kwargs)
        self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
        self.fm = FactorizationMachine(feature_map)
        self.mlp = MLP_Block(
            input_dim=feature_map.sum_emb_out_dim(),
            output_dim=1,
            hidden_units=list(hidden_units),
            hidden_activations=hidden_activations,
            output_activation=None,
            dropout_rates=net_dropout,
            batch_norm=batch_norm,
        )
        self.finish_init(learning_rate)

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        x = self.get_inputs(inputs)
        fields = self.embedding_layer(x)  # (B, F, D)
        logit = self.fm(x, fields) + self.mlp(fields.flatten(start_dim=1))  # (B, 1)
        return {"y_pred": self.output_activation(logit)}


class FuxixDeepFM(ZooModel):
    """model_zoo/xDeepFM: LR + CIN + DNN -> sigmoid (the CIN has no split-half)."""

    def __init__(
        self,
        feature_map: FeatureMap,
        *,
        learning_rate: float,
        embedding_dim: int,
        dnn_hidden_units: Sequence[int],
        dnn_activations: str = "ReLU",
        cin_hidden_units: Sequence[int] = (16, 16, 16),
        net_dropout: float = 0.0,
        batch_norm: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(feature_map, model_id="xDeepFM", **kwargs)
        self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
        self.dnn = _optional_dnn(
            feature_map.sum_emb_out_dim(),
            dnn_hidden_units,
            1,
            dnn_activations,
            net_dropout,
            batch_norm,
        )
        self.lr_layer = LogisticRegression(feature_map, use_bias=False)
        self.cin = CompressedInteractionNet(
            feature_map.num_fields, list(cin_hidden_units), output_dim=1
        )
        self.finish_init(learning_rate)

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        x = self.get_inputs(inputs)
        fields = self.embedding_layer(x)  # (B, F, D)
        logit = self.lr_layer(x) + self.cin(fields)  # (B, 1)
        if self.dnn is not None:
            logit = logit + self.dnn(fields.flatten(start_dim=1))
        return {"y_pred": self.output_activation(logit)}


class FuxiFiBiNET(ZooModel):
    """model_zoo/FiBiNET: LR + DNN([bilinear(E), bilinear(SENET(E))]) -> sigmoid."""

    def __init__(
        self,
        feature_map: FeatureMap,
        *,
        learning_rate: float,
        embedding_dim: int,
        hidden_units: Sequence[int],
        hidden_activations: str = "ReLU",
        excitation_activation: str = "ReLU",
        reduction_ratio: float = 3,
        bilinear_type: str = "field_interaction",
        net_dropout: float = 0.0,
        batch_norm: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(feature_map, model_id="FiBiNET", **kwargs)
        num_fields = feature_map.num_fields
        self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
        self.senet_layer = SqueezeExcitation(num_fields, reduction_ratio, excitation_activation)
        self.bilinear_interaction1 = BilinearInteractionV2(num_fields, embedding_dim, bilinear_type)
        self.bilinear_interaction2 = BilinearInteractionV2(num_fields, embedding_dim, bilinear_type)
        self.lr_layer = LogisticRegression(feature_map, use_bias=False)
        self.dnn = MLP_Block(
            input_dim=num_fields * (num_fields - 1) * embedding_dim,
            output_dim=1,
            hidden_units=list(hidden_units),
            hidden_activations=hidden_activations,
            output_activation=None,
            dropout_rates=net_dropout,
            batch_norm=batch_norm,
        )
        self.finish_init(learning_rate)

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        x = self.get_inputs(inputs)
        fields = self.embedding_layer(x)  # (B, F, D)
        plain = self.bilinear_interaction1(fields)  # (B, P, D)
        reweighted = self.bilinear_interaction2(self.senet_layer(fields))  # (B, P, D)
        pairs = torch.cat([plain, reweighted], dim=1).flatten(start_dim=1)  # (B, 2*P*D)
        logit = self.lr_layer(x) + self.dnn(pairs)  # (B, 1)
        return {"y_pred": self.output_activation(logit)}


# ------------------------------------------------------------------------------------ FiGNN
class GraphLayer(nn.Module):
    """One FiGNN propagation step (zoo-only): per-field out/in transforms around the adjacency."""

    def __init__(self, num_fields: int, embedding_dim: int) -> None:
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(num_fields, embedding_dim, embedding_dim))
        self.W_out = nn.Parameter(torch.empty(num_fields, embedding_dim, embedding_dim))
        nn.init.xavier_normal_(self.W_in)
        nn.init.xavier_normal_(self.W_out)
        self.bias_p = nn.Parameter(torch.zeros(embedding_dim))

    def forward(self, graph: Tensor, h: Tensor) -> Tensor:
        sent = torch.matmul(self.W_out, h.unsqueeze(-1)).squeeze(-1)  # (B, F, D)
        gathered = torch.bmm(graph, sent)  # (B, F, D)
        return torch.matmul(self.W_in, gathered.unsqueeze(-1)).squeeze(-1) + self.bias_p


class FieldGraph(nn.Module):
    """FiGNN_Layer of the zoo: attentional fully connected field graph, GRU state updates.

    Edge j -> i weight: softmax_j LeakyReLU(w · [e_i, e_j]) over the initial embeddings, no
    self-loops; one GraphLayer per step unless `reuse_graph_layer`; a GRU cell shared by all
    nodes and steps; the initial embeddings added back after every step (residual).
    """

    def __init__(
        self,
        num_fields: int,
        embedding_dim: int,
        *,
        gnn_layers: int,
        reuse_graph_layer: bool,
        use_gru: bool,
        use_residual: bool,
    ) -> None:
        super().__init__()
        self.num_fields = num_fields
        self.embedding_dim = embedding_dim
        self.gnn_layers = gnn_layers
        self.use_residual = use_residual
        count = 1 if reuse_graph_layer else gnn_layers
        self.gnn = nn.ModuleList(GraphLayer(num_fields, embedding_dim) for _ in range(count))
        self.gru = nn.GRUCell(embedding_dim, embedding_dim) if use_gru else None
        source, target = zip(*product(range(num_fields), repeat=2), strict=True)
        self.register_buffer("source", torch.tensor(source), persistent=False)
        self.register_buffer("target", torch.tensor(target), persistent=False)
        self.register_buffer("self_loop", torch.eye(num_fields, dtype=torch.bool), persistent=False)
        self.leaky_relu = nn.LeakyReLU(negative_slope=0.01)
        self.W_attn = nn.Linear(embedding_dim * 2, 1, bias=False)

    def adjacency(self, fields: Tensor) -> Tensor:
        """(B, F, D) -> row-stochastic (B, F, F) without self-loops, as the zoo builds it."""
        pairs = torch.cat([fields[:, self.source], fields[:, self.target]], dim=-1)  # (B, F², 2D)
        scores = self.leaky_relu(self.W_attn(pairs)).view(-1, self.num_fields, self.num_fields)
        return scores.masked_fill(self.self_loop, float("-inf")).softmax(dim=-1)

    def forward(self, fields: Tensor) -> Tensor:
        graph = self.adjacency(fields)
        h = fields
        for step in range(self.gnn_layers):
            message = self.gnn[step % len(self.gnn)](graph, h)  # (B, F, D)
            if self.gru is not None:
                flat = self.gru(
                    message.reshape(-1, self.embedding_dim), h.reshape(-1, self.embedding_dim)
                )
                h = flat.view(-1, self.num_fields, self.embedding_dim)
            else:
                h = message + h
            if self.use_residual:
                h = h + fields
        return h  # (B, F, D)


class AttentionalScoring(nn.Module):
    """The zoo's AttentionalPrediction: per-field scores weighted by sigmoid gates."""

    def __init__(self, num_fields: int, embedding_dim: int) -> None:
        super().__init__()
        self.mlp1 = nn.Linear(embedding_dim, 1, bias=False)
        self.mlp2 = nn.Sequential(
            nn.Linear(num_fields * embedding_dim, num_fields, bias=False), nn.Sigmoid()
        )

    def forward(self, h: Tensor) -> Tensor:
        score = self.mlp1(h).squeeze(-1)  # (B, F)
        weight = self.mlp2(h.flatten(start_dim=1))  # (B, F)
        return (weight * score).sum(dim=1, keepdim=True)  # (B, 1)


class FuxiFiGNN(ZooModel):
    """model_zoo/FiGNN: FieldGraph -> AttentionalScoring -> sigmoid."""

    def __init__(
        self,
        feature_map: FeatureMap,
        *,
        learning_rate: float,
        embedding_dim: int,
        gnn_layers: int = 3,
        use_residual: bool = True,
        use_gru: bool = True,
        reuse_graph_layer: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(feature_map, model_id="FiGNN", **kwargs)
        num_fields = feature_map.num_fields
        self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
        self.fignn = FieldGraph(
            num_fields,
            embedding_dim,
            gnn_layers=gnn_layers,
            reuse_graph_layer=reuse_graph_layer,
            use_gru=use_gru,
            use_residual=use_residual,
        )
        self.fc = AttentionalScoring(num_fields, embedding_dim)
        self.finish_init(learning_rate)

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        fields = self.embedding_layer(self.get_inputs(inputs))  # (B, F, D)
        return {"y_pred": self.output_activation(self.fc(self.fignn(fields)))}


# ---------------------------------------------------------------------------------- AutoInt
class SelfAttention(nn.Module):
    """The zoo AutoInt's MultiHeadSelfAttention block over fields, on the package's attention.

    A residual projection exists only when input and attention widths differ (else identity).
    """

    def __init__(
        self,
        input_dim: int,
        attention_dim: int,
        num_heads: int,
        *,
        dropout_rate: float,
        use_residual: bool,
        use_scale: bool,
        layer_norm: bool,
    ) -> None:
        super().__init__()
        if attention_dim % num_heads != 0:
            raise ValueError(f"attention_dim={attention_dim} not divisible by {num_heads} heads")
        self.head_dim = attention_dim // num_heads
        self.num_heads = num_heads
        self.use_residual = use_residual
        self.scale = self.head_dim**0.5 if use_scale else None
        self.W_q = nn.Linear(input_dim, attention_dim, bias=False)
        self.W_k = nn.Linear(input_dim, attention_dim, bias=False)
        self.W_v = nn.Linear(input_dim, attention_dim, bias=False)
        needs_projection = use_residual and input_dim != attention_dim
        self.W_res = nn.Linear(input_dim, attention_dim, bias=False) if needs_projection else None
        self.dot_attention = ScaledDotProductAttention(dropout_rate)
        self.layer_norm = nn.LayerNorm(attention_dim) if layer_norm else None

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(x.size(0), -1, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        b = x.size(0)
        q, k, v = (self._heads(proj(x)) for proj in (self.W_q, self.W_k, self.W_v))
        out, _ = self.dot_attention(q, k, v, scale=self.scale)  # (B, H, F, d_h)
        out = out.transpose(1, 2).contiguous().view(b, -1, self.num_heads * self.head_dim)
        if self.use_residual:
            out = out + (self.W_res(x) if self.W_res is not None else x)
        if self.layer_norm is not None:
            out = self.layer_norm(out)
        return out.relu()


class FuxiAutoInt(ZooModel):
    """model_zoo/AutoInt: self-attention layers -> Linear, + DNN (AutoInt+) [+ LR] -> sigmoid."""

    def __init__(
        self,
        feature_map: FeatureMap,
        *,
        learning_rate: float,
        embedding_dim: int,
        dnn_hidden_units: Sequence[int],
        dnn_activations: str = "ReLU",
        attention_layers: int = 2,
        num_heads: int = 1,
        attention_dim: int = 8,
        net_dropout: float = 0.0,
        batch_norm: bool = False,
        layer_norm: bool = False,
        use_scale: bool = False,
        use_wide: bool = False,
        use_residual: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(feature_map, model_id="AutoInt", **kwargs)
        self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
        self.lr_layer = LogisticRegression(feature_map, use_bias=False) if use_wide else None
        self.dnn = _optional_dnn(
            feature_map.sum_emb_out_dim(),
            dnn_hidden_units,
            1,
            dnn_activations,
            net_dropout,
            batch_norm,
        )
        self.self_attention = nn.Sequential(
            *(
                SelfAttention(
                    embedding_dim if i == 0 else attention_dim,
                    attention_dim,
                    num_heads,
                    dropout_rate=net_dropout,
                    use_residual=use_residual,
                    use_scale=use_scale,
                    layer_norm=layer_norm,
                )
                for i in range(attention_layers)
            )
        )
        self.fc = nn.Linear(feature_map.num_fields * attention_dim, 1)
        self.finish_init(learning_rate)

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        x = self.get_inputs(inputs)
        fields = self.embedding_layer(x)  # (B, F, D)
        logit = self.fc(self.self_attention(fields).flatten(start_dim=1))  # (B, 1)
        if self.dnn is not None:
            logit = logit + self.dnn(fields.flatten(start_dim=1))
        if self.lr_layer is not None:
            logit = logit + self.lr_layer(x)
        return {"y_pred": self.output_activation(logit)}


# ------------------------------------------------------------------------- DIN, DIEN inputs
def behaviour_genre_mean(genre_embeddings: Tensor, genre_ids: Tensor, length: int) -> Tensor:
    """Mean genre embedding per behaviour: (B, L*G, D) slot embeddings -> (B, L, D).

    Our adaptation, not FuxiCTR's: kar's behaviour vector is [item, mean of its genres], and a
    flat FuxiCTR sequence cannot hold a genre set per position. Empty slots (id 0) are skipped;
    a position without genres gives zeros.
    """
    b, slots, d = genre_embeddings.shape
    per_item = slots // length
    grouped = genre_embeddings.view(b, length, per_item, d)
    present = (genre_ids.view(b, length, per_item) != 0).unsqueeze(-1).to(grouped.dtype)
    return (grouped * present).sum(dim=2) / present.sum(dim=2).clamp_min(1.0)


@dataclass
class SequenceView:
    """DIN/DIEN inputs: target (B, 2D), behaviours (B, L, 2D), mask (B, L) of valid positions."""

    target: Tensor
    behaviours: Tensor
    mask: Tensor


def sequence_view(
    x: dict[str, Tensor], embeddings: dict[str, Tensor], history_length: int
) -> SequenceView:
    """Replaces embeddings["hist_genres"] by its per-behaviour mean; returns the target view.

    The mask comes from the first behaviour field's ids, as in the zoo (padding index 0).
    """
    embeddings["hist_genres"] = behaviour_genre_mean(
        embeddings["hist_genres"], x["hist_genres"], history_length
    )
    return SequenceView(
        target=torch.cat([embeddings[f] for f in TARGET_FIELDS], dim=-1),
        behaviours=torch.cat([embeddings[f] for f in BEHAVIOUR_FIELDS], dim=-1),
        mask=x[BEHAVIOUR_FIELDS[0]].long() != 0,
    )


def _history_length(feature_map: FeatureMap) -> int:
    return int(feature_map.features[BEHAVIOUR_FIELDS[0]]["max_len"])


# -------------------------------------------------------------------------------------- DIN
class FuxiDIN(ZooModel):
    """model_zoo/DIN: DIN_Attention of the target over the behaviours; its pooled output takes
    the behaviour fields' place among the flattened fields -> DNN -> sigmoid."""

    def __init__(
        self,
        feature_map: FeatureMap,
        *,
        learning_rate: float,
        embedding_dim: int,
        dnn_hidden_units: Sequence[int],
        dnn_activations: str = "ReLU",
        attention_hidden_units: Sequence[int] = (64,),
        attention_hidden_activations: str = "Dice",
        attention_output_activation: str | None = None,
        attention_dropout: float = 0.0,
        net_dropout: float = 0.0,
        batch_norm: bool = False,
        din_use_softmax: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(feature_map, model_id="DIN", **kwargs)
        self.embedding_dim = embedding_dim
        self.history_length = _history_length(feature_map)
        self.embedding_layer = FeatureEmbeddingDict(feature_map, embedding_dim)
        self.attention = DIN_Attention(
            embedding_dim * len(TARGET_FIELDS),
            attention_units=list(attention_hidden_units),
            hidden_activations=attention_hidden_activations,
            output_activation=attention_output_activation,
            dropout_rate=attention_dropout,
            use_softmax=din_use_softmax,
        )
        self.dnn = MLP_Block(
            input_dim=feature_map.sum_emb_out_dim(),
            output_dim=1,
            hidden_units=list(dnn_hidden_units),
            hidden_activations=dnn_activations,
            output_activation=self.output_activation,
            dropout_rates=net_dropout,
            batch_norm=batch_norm,
        )
        self.finish_init(learning_rate)

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        x = self.get_inputs(inputs)
        embeddings = self.embedding_layer(x)
        view = sequence_view(x, embeddings, self.history_length)
        pooled = self.attention(view.target, view.behaviours, view.mask)  # (B, 2D)
        for name, part in zip(
            BEHAVIOUR_FIELDS, pooled.split(self.embedding_dim, dim=-1), strict=True
        ):
            embeddings[name] = part  # (B, D)
        flat = self.embedding_layer.dict2tensor(embeddings, flatten_emb=True)  # (B, F*D)
        return {"y_pred": self.dnn(flat)}


# ------------------------------------------------------------------------------------- DIEN
class InterestAttention(nn.Module):
    """The zoo DIEN's AttentionLayer (bilinear or dot): scores of interest states vs target."""

    def __init__(self, model_dim: int, attention_type: str, use_softmax: bool) -> None:
        super().__init__()
        if attention_type not in ("bilinear_attention", "dot_attention"):
            raise ValueError(f"attention_type={attention_type!r}: built are bilinear | dot")
        self.use_softmax = use_softmax
        bilinear = attention_type == "bilinear_attention"
        self.W_kernel = nn.Parameter(torch.eye(model_dim)) if bilinear else None

    def forward(self, interests: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        keys = interests @ self.W_kernel if self.W_kernel is not None else interests  # (B, L, H)
        scores = (keys @ target.unsqueeze(-1)).view(-1, interests.size(1))  # (B, L)
        valid = mask.float()
        scores = scores * valid
        if self.use_softmax:
            scores = (scores + -1.0e9 * (1 - valid)).softmax(dim=-1)
        return scores


class AUGRUCell(nn.Module):
    """GRU cell whose update gate is scaled by the attention score (zoo-only AUGRUCell)."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.x2h = nn.Linear(input_size, 3 * hidden_size)
        self.h2h = nn.Linear(hidden_size, 3 * hidden_size)

    def forward(self, x: Tensor, h: Tensor, score: Tensor) -> Tensor:
        x_u, x_r, x_n = self.x2h(x).chunk(3, 1)
        h_u, h_r, h_n = self.h2h(h).chunk(3, 1)
        update = torch.sigmoid(x_u + h_u) * score.unsqueeze(-1)
        reset = torch.sigmoid(x_r + h_r)
        candidate = torch.tanh(x_n + reset * h_n)
        return h + update * (candidate - h)


class DynamicAUGRU(nn.Module):
    """The zoo's DynamicGRU (AUGRU): steps a packed sequence; returns each row's last state."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.gru_cell = AUGRUCell(input_size, hidden_size)

    def forward(self, packed_inputs: PackedSequence, packed_scores: PackedSequence) -> Tensor:
        x, batch_sizes, _, unsorted_indices = packed_inputs
        scores = packed_scores.data
        h = x.new_zeros(int(batch_sizes[0]), self.hidden_size)
        last = x.new_zeros(int(batch_sizes[0]), self.hidden_size)
        start = 0
        # Packed rows are sorted by length, so each step's batch is a prefix of the previous one.
        for size in batch_sizes.tolist():
            h = self.gru_cell(x[start : start + size], h[:size], scores[start : start + size])
            last[:size] = h
            start += size
        return last[unsorted_indices]


class FuxiDIEN(ZooModel):
    """model_zoo/DIEN (2024 version): GRU interest extraction, attention-driven AUGRU
    evolution; the final interest joins the 2-D field embeddings -> DNN -> sigmoid.

    The auxiliary next-behaviour loss needs negative sequences; the zoo default
    (aux_loss_alpha 0) leaves it out, as kar's dien.py does.
    """

    def __init__(
        self,
        feature_map: FeatureMap,
        *,
        learning_rate: float,
        embedding_dim: int,
        dnn_hidden_units: Sequence[int],
        dnn_activations: str = "ReLU",
        net_dropout: float = 0.0,
        batch_norm: bool = True,
        gru_type: str = "AUGRU",
        enable_sum_pooling: bool = False,
        attention_type: str = "bilinear_attention",
        use_attention_softmax: bool = True,
        aux_loss_alpha: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(feature_map, model_id="DIEN", **kwargs)
        if gru_type != "AUGRU" or aux_loss_alpha != 0:
            raise ValueError("built: gru_type AUGRU without auxiliary loss (the zoo default)")
        self.history_length = _history_length(feature_map)
        self.enable_sum_pooling = enable_sum_pooling
        model_dim = embedding_dim * len(TARGET_FIELDS)
        self.embedding_layer = FeatureEmbeddingDict(feature_map, embedding_dim)
        self.sum_pooling = MaskedSumPooling()
        self.extraction = nn.GRU(input_size=model_dim, hidden_size=model_dim, batch_first=True)
        self.evolution = DynamicAUGRU(model_dim, model_dim)
        self.attention = InterestAttention(model_dim, attention_type, use_attention_softmax)
        # As the zoo counts it: every field once, plus the interest (2 behaviour fields' width).
        feature_dim = 2 * model_dim + feature_map.sum_emb_out_dim()
        if not enable_sum_pooling:
            feature_dim -= 2 * model_dim
        self.dnn = MLP_Block(
            input_dim=feature_dim,
            output_dim=1,
            hidden_units=list(dnn_hidden_units),
            hidden_activations=dnn_activations,
            output_activation=self.output_activation,
            dropout_rates=net_dropout,
            batch_norm=batch_norm,
        )
        self.finish_init(learning_rate)

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        x = self.get_inputs(inputs)
        embeddings = self.embedding_layer(x)
        view = sequence_view(x, embeddings, self.history_length)
        has_history = view.mask.sum(dim=1) > 0  # the zoo drops rows without behaviours
        evolved = self._evolved_interest(
            view.behaviours[has_history], view.target[has_history], view.mask[has_history]
        )
        interest = evolved.new_zeros(view.target.shape)  # (B, 2D)
        interest[has_history] = evolved
        parts = [interest]
        if self.enable_sum_pooling:
            pooled = self.sum_pooling(view.behaviours)
            parts += [pooled, view.target * pooled]
        parts += [e for e in embeddings.values() if e.ndim == 2]
        return {"y_pred": self.dnn(torch.cat(parts, dim=-1))}

    def _evolved_interest(self, behaviours: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        lengths = mask.sum(dim=1).cpu()
        packed = pack_padded_sequence(behaviours, lengths, batch_first=True, enforce_sorted=False)
        packed_interests, _ = self.extraction(packed)
        interests, _ = pad_packed_sequence(
            packed_interests, batch_first=True, padding_value=0.0, total_length=mask.size(1)
        )  # (B, L, 2D)
        scores = self.attention(interests, target, mask)  # (B, L)
        packed_scores = pack_padded_sequence(
            scores, lengths, batch_first=True, enforce_sorted=False
        )
        return self.evolution(packed_interests, packed_scores)  # (B, 2D)


# ------------------------------------------------------------------------------------- zoo
@dataclass(frozen=True)
class ZooSpec:
    """A zoo model for a kar backbone: class and hyperparameters (``<Model>_default``)."""

    fuxictr_name: str
    model_class: type[ZooModel]
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    sequence_model: bool = False  # keeps hist_items / hist_genres as sequences (DIN, DIEN)


ZOO: dict[str, ZooSpec] = {
    "dcnv1": ZooSpec(
        "DCN",
        FuxiDCN,
        {
            "dnn_hidden_units": DNN,  # zoo: [1024, 512, 256]
            "dnn_activations": "relu",
            "num_cross_layers": 3,
            "net_dropout": 0,
            "batch_norm": False,
        },
    ),
    "dcnv2": ZooSpec(
        "DCNv2",
        FuxiDCNv2,
        {
            "model_structure": "parallel",
            "parallel_dnn_hidden_units": DNN,  # zoo: [500, 500, 500]
            "stacked_dnn_hidden_units": DNN,
            "dnn_activations": "relu",
            "num_cross_layers": 3,
            "net_dropout": 0,
            "batch_norm": False,
        },
    ),
    "deepfm": ZooSpec(
        "DeepFM",
        FuxiDeepFM,
        {
            "hidden_units": DNN,  # zoo: [300, 300, 300]
            "hidden_activations": "relu",
            "net_dropout": 0,
            "batch_norm": False,
        },
    ),
    "xdeepfm": ZooSpec(
        "xDeepFM",
        FuxixDeepFM,
        {
            "dnn_hidden_units": DNN,  # zoo: [500, 500, 500]
            "dnn_activations": "relu",
            "cin_hidden_units": [32, 32, 32],
            "net_dropout": 0,
            "batch_norm": False,
        },
    ),
    "fibinet": ZooSpec(
        "FiBiNET",
        FuxiFiBiNET,
        {
            "hidden_units": DNN,  # zoo: [500, 500, 500]
            "hidden_activations": "relu",
            "excitation_activation": "ReLU",
            "reduction_ratio": 3,
            "bilinear_type": "field_interaction",
            "net_dropout": 0,
            "batch_norm": False,
        },
    ),
    "fignn": ZooSpec(
        "FiGNN",
        FuxiFiGNN,
        {"gnn_layers": 3, "use_residual": True, "use_gru": True, "reuse_graph_layer": False},
    ),
    "autoint": ZooSpec(
        "AutoInt",
        FuxiAutoInt,
        {
            "dnn_hidden_units": DNN,  # zoo: [400, 400] (AutoInt+)
            "dnn_activations": "relu",
            "attention_layers": 3,
            "num_heads": 2,
            "attention_dim": 64,  # zoo: 40 = its embedding_dim; kar's autoint uses 64
            "net_dropout": 0,
            "batch_norm": False,
            "layer_norm": False,
            "use_scale": False,
            "use_wide": False,
            "use_residual": True,
        },
    ),
    "din": ZooSpec(
        "DIN",
        FuxiDIN,
        {
            "dnn_hidden_units": DNN,  # zoo: [500, 500, 500]
            "dnn_activations": "relu",
            "attention_hidden_units": [64],
            "attention_hidden_activations": "Dice",
            "attention_output_activation": None,
            "attention_dropout": 0,
            "din_use_softmax": False,
            "net_dropout": 0,
            "batch_norm": False,
        },
        sequence_model=True,
    ),
    "dien": ZooSpec(
        "DIEN",
        FuxiDIEN,
        {
            "dnn_hidden_units": DNN,  # zoo: [1024, 512, 256]
            "dnn_activations": "Dice",
            "net_dropout": 0,
            "batch_norm": True,
            "gru_type": "AUGRU",
            "enable_sum_pooling": False,
            "attention_type": "bilinear_attention",
            "use_attention_softmax": True,
            "aux_loss_alpha": 0,
        },
        sequence_model=True,
    ),
}


# Variants beyond the zoo defaults, reported next to them: name -> (backbone, overrides, why).
VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "dien-relu": (
        "dien",
        {"dnn_activations": "relu", "batch_norm": False},
        "the zoo default's Dice + batch norm in the final DNN (running statistics with momentum "
        "0.01 over 60 steps per epoch) leaves DIEN badly calibrated here (LogLoss ~0.65) and "
        "stops it after epoch 1; this is the final DNN of the DIN zoo default",
    ),
}


def zoo_spec(name: str) -> ZooSpec:
    """The ZooSpec of a kar backbone name or of a VARIANTS name."""
    if name in VARIANTS:
        backbone, overrides, _ = VARIANTS[name]
        base = ZOO[backbone]
        return ZooSpec(
            base.fuxictr_name,
            base.model_class,
            {**base.hyperparameters, **overrides},
            base.sequence_model,
        )
    if name not in ZOO:
        known = ", ".join([*ZOO, *VARIANTS])
        raise KeyError(f"no FuxiCTR model for {name!r}; known: {known}")
    return ZOO[name]


def build_model(
    name: str,
    feature_map: FeatureMap,
    *,
    seed: int,
    model_root: Path,
    embedding_dim: int = EMBEDDING_DIM,
    learning_rate: float = LEARNING_RATE,
) -> ZooModel:
    """The zoo model for kar backbone (or variant) `name`, seeded as FuxiCTR's run_expid does."""
    spec = zoo_spec(name)
    seed_everything(seed=seed)
    model = spec.model_class(
        feature_map,
        learning_rate=learning_rate,
        embedding_dim=embedding_dim,
        model_root=str(model_root),
        **copy.deepcopy(spec.hyperparameters),
        **TRAINING,
    )
    Path(model.model_dir).mkdir(parents=True, exist_ok=True)  # FuxiCTR's set_logger makes it
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
