"""The CTR model: field embedding + optional knowledge adaptor + backbone.

This is the one place where knowledge is injected into a backbone: the adaptor output
(B, 2, out) becomes two extra fields for "field" backbones or a (B, 2*out) dense input for
"dense" backbones (DESIGN.md §1, "Injection into backbones").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import kar.components  # noqa: F401  (registers every backbone and adaptor)
from kar.backbones.base import Backbone
from kar.nn.adaptor import HybridExpertAdaptor, NoAdaptor
from kar.nn.embedding import FeatureEmbedding
from kar.registry import ADAPTORS, BACKBONES, ConfigError, hyperparameters


@dataclass
class KnowledgeTables:
    """Encoder vectors by internal index (row 0 unused) and which rows have knowledge."""

    user_vectors: Tensor  # (n_users + 1, m_user) float
    item_vectors: Tensor  # (n_items + 1, m_item) float
    user_has: Tensor  # (n_users + 1,) bool
    item_has: Tensor  # (n_items + 1,) bool

    def __post_init__(self) -> None:
        for kind in ("user", "item"):
            vectors, has = getattr(self, f"{kind}_vectors"), getattr(self, f"{kind}_has")
            if vectors.ndim != 2 or not vectors.is_floating_point():
                raise ValueError(
                    f"{kind}_vectors must be a float (n_{kind}s + 1, m) tensor, "
                    f"got {vectors.dtype} {tuple(vectors.shape)}"
                )
            if has.dtype != torch.bool or has.shape != vectors.shape[:1]:
                raise ValueError(
                    f"{kind}_has must be a bool tensor with one entry per row of "
                    f"{kind}_vectors ({vectors.shape[0]}), got {has.dtype} {tuple(has.shape)}"
                )


class KARModel(nn.Module):
    """batch dict -> logits (B,). Without an adaptor it is the bare backbone.

    The knowledge tables are non-trainable, non-persistent buffers (they move with `.to()` but
    stay out of checkpoints: they come from the knowledge store). Rows without knowledge use a
    learned default vector per type (the paper's default for unseen users and items).
    """

    def __init__(
        self,
        embedding: FeatureEmbedding,
        backbone: Backbone,
        adaptor: HybridExpertAdaptor | None = None,
        knowledge: KnowledgeTables | None = None,
    ) -> None:
        super().__init__()
        if (adaptor is None) != (knowledge is None):
            raise ValueError("KARModel needs both an adaptor and knowledge tables, or neither")
        self.embedding = embedding
        self.backbone = backbone
        self.adaptor = adaptor
        if knowledge is not None:
            for kind in ("user", "item"):
                vectors = getattr(knowledge, f"{kind}_vectors").float()
                self.register_buffer(f"{kind}_vectors", vectors, persistent=False)
                self.register_buffer(
                    f"{kind}_has", getattr(knowledge, f"{kind}_has"), persistent=False
                )
            self.user_default = nn.Parameter(torch.zeros(knowledge.user_vectors.shape[1]))
            self.item_default = nn.Parameter(torch.zeros(knowledge.item_vectors.shape[1]))

    def augmented(self, kind: str, index: Tensor) -> Tensor:
        """Adaptor output for the users or items `index` (B,) -> (B, out).

        The adaptor maps each user's (item's) vector independently, so it runs once per distinct
        row of the batch and the result is gathered back: a batch of 1024 samples holds about
        half as many distinct users and items. Rows without knowledge use the default vector.
        """
        assert self.adaptor is not None
        rows, inverse = torch.unique(index, return_inverse=True)  # (U,), (B,)
        vectors: Tensor = getattr(self, f"{kind}_vectors")[rows]  # (U, m)
        has: Tensor = getattr(self, f"{kind}_has")[rows]  # (U,)
        # The stored vectors need no gradient, so the adaptor runs on them as they are and the
        # learned default goes through it on its own: no input gradient for the (U, m) rows.
        out = self.adaptor.transform(kind, vectors)  # (U, out)
        if not bool(has.all()):
            default: Tensor = getattr(self, f"{kind}_default")  # (m,)
            default_out = self.adaptor.transform(kind, default.unsqueeze(0))  # (1, out)
            out = torch.where(has.unsqueeze(1), out, default_out)
        # index_select, not out[inverse]: its backward (index_add) sums the duplicates in a
        # fixed order, while advanced indexing's backward accumulates them in parallel on CPU,
        # which made two identical runs differ in the 7th digit.
        return out.index_select(0, inverse)  # (B, out)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        fields, sequence = self.embedding(batch)  # (B, F, D)
        dense = None
        if self.adaptor is not None:
            augmented = torch.stack(
                [self.augmented(kind, batch[kind]) for kind in ("user", "item")], dim=1
            )  # (B, 2, out)
            if self.backbone.injection == "field":
                fields = torch.cat([fields, augmented], dim=1)  # (B, F + 2, D)
            else:
                dense = augmented.flatten(1)  # (B, 2 * out)
        logits = self.backbone(fields, dense, sequence)  # (B,)
        assert logits.shape == (fields.shape[0],), logits.shape
        return logits


def _check_keys(kind: str, name: str, given: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ConfigError(
            f"{kind} {name!r} has no hyperparameter(s) {unknown}; valid: {sorted(allowed)}. "
            f"Fix the override or conf/{kind}/{name}.yaml"
        )


def build_model(
    *,
    backbone: str,
    backbone_kwargs: dict[str, Any],
    embed_dim: int,
    feature_spec: dict[str, int],
    adaptor: str,
    adaptor_kwargs: dict[str, Any],
    knowledge: KnowledgeTables | None,
) -> KARModel:
    """Assemble a KARModel from registry names and hyperparameters.

    `backbone_kwargs` are the backbone's hyperparameters; `adaptor_kwargs` the adaptor's plus
    `out_dim` (defaults to `embed_dim`). adaptor "none" gives the bare backbone (knowledge, if
    given, is ignored); any other adaptor needs `knowledge`.
    """
    backbone_cls = BACKBONES.get(backbone)
    _check_keys("backbone", backbone, backbone_kwargs, set(hyperparameters(backbone_cls)))
    adaptor_cls = ADAPTORS.get(adaptor)
    embedding = FeatureEmbedding(feature_spec, embed_dim)
    num_fields, dense_dim = embedding.num_fields, 0
    adaptor_module: HybridExpertAdaptor | None = None

    if adaptor_cls is not NoAdaptor:
        if knowledge is None:
            raise ConfigError(
                f"adaptor={adaptor} needs knowledge vectors but none were given; run the "
                f"encode stage first or set adaptor=none for the bare backbone"
            )
        hyper = dict(adaptor_kwargs)
        out_dim = int(hyper.pop("out_dim", embed_dim))
        _check_keys("adaptor", adaptor, hyper, set(hyperparameters(adaptor_cls)))
        if backbone_cls.injection == "field":
            if out_dim != embed_dim:
                raise ConfigError(
                    f"backbone {backbone!r} takes knowledge as extra fields, so adaptor.out_dim "
                    f"({out_dim}) must equal backbone.embed_dim ({embed_dim}); set "
                    f"adaptor.out_dim=${{backbone.embed_dim}} or pick a dense backbone "
                    f"({', '.join(n for n in BACKBONES.names() if _injection(n) == 'dense')})"
                )
            num_fields += 2
        else:
            dense_dim = 2 * out_dim
        adaptor_module = adaptor_cls(
            knowledge.user_vectors.shape[1], knowledge.item_vectors.shape[1], out_dim, **hyper
        )
    else:
        _check_keys("adaptor", adaptor, adaptor_kwargs, set())
        knowledge = None

    backbone_module = backbone_cls(num_fields, embed_dim, dense_dim, **backbone_kwargs)
    return KARModel(embedding, backbone_module, adaptor_module, knowledge)


def _injection(name: str) -> str:
    return BACKBONES.get(name).injection
