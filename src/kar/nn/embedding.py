"""Field embeddings of a batch (CONTRACT batch format) for the CTR backbones.

Fields, in order: item, item_genres, [gender, age, occupation], hist_items, hist_genres,
hist_ratings. Profile fields appear only when `feature_spec` has them (Amazon-Books has no
profile). The user id is never embedded: test users are unseen, so an id row would be
untrained noise at test time.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kar.backbones.base import SequenceInput

PROFILE_FIELDS = ("gender", "age", "occupation")
REQUIRED_SPEC_KEYS = ("item", "genre", "rating")
# FuxiCTR's initialisation; PyTorch's N(0, 1) default costs ~0.025 AUC here (DESIGN.md §1).
EMBEDDING_INIT_STD = 1e-4


def _table(vocab_size: int, embed_dim: int) -> nn.Embedding:
    table = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
    nn.init.normal_(table.weight, std=EMBEDDING_INIT_STD)
    with torch.no_grad():
        table.weight[0].zero_()  # index 0 = padding / unknown
    return table


class FeatureEmbedding(nn.Module):
    """Batch dict -> field embeddings (B, F, D) and the behaviour-sequence view for DIN.

    item and hist_items share the item table; item_genres and hist_genres share the genre table.
    Multi-valued fields are masked means: genres over non-zero ids, history over the first
    `hist_len` positions.
    """

    def __init__(self, feature_spec: dict[str, int], embed_dim: int) -> None:
        super().__init__()
        missing = [k for k in REQUIRED_SPEC_KEYS if k not in feature_spec]
        if missing:
            raise ValueError(
                f"feature_spec lacks {missing}; it needs vocabulary sizes (padding 0 included) "
                f"for {list(REQUIRED_SPEC_KEYS)} plus any of {list(PROFILE_FIELDS)}"
            )
        self.embed_dim = embed_dim
        self.item = _table(feature_spec["item"], embed_dim)
        self.genre = _table(feature_spec["genre"], embed_dim)
        self.rating = _table(feature_spec["rating"], embed_dim)
        self.profile = nn.ModuleDict(
            {
                name: _table(feature_spec[name], embed_dim)
                for name in PROFILE_FIELDS
                if name in feature_spec
            }
        )
        self.field_names: tuple[str, ...] = (
            "item",
            "item_genres",
            *self.profile.keys(),
            "hist_items",
            "hist_genres",
            "hist_ratings",
        )

    @property
    def num_fields(self) -> int:
        return len(self.field_names)

    @property
    def sequence_dim(self) -> int:
        """Width of the target / behaviour vectors: [item, genre mean]."""
        return 2 * self.embed_dim

    def _genre_mean(self, genres: Tensor) -> Tensor:
        """Mean genre embedding of each genre list (..., G) -> (..., D); zeros for an empty list.

        One embedding_bag over all lists: it skips the padding id inside the reduction, so the
        (..., G, D) gather and its masked product are never materialised.
        """
        flat = genres.reshape(-1, genres.shape[-1])  # (N, G)
        pooled = F.embedding_bag(flat, self.genre.weight, mode="mean", padding_idx=0)  # (N, D)
        return pooled.view(*genres.shape[:-1], self.embed_dim)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, SequenceInput]:
        """Return fields (B, F, D) and the sequence view (target (B, 2D), behaviours (B, L, 2D))."""
        b, length = batch["hist_items"].shape
        positions = torch.arange(length, device=batch["hist_items"].device)  # (L,)
        valid = positions.unsqueeze(0) < batch["hist_len"].unsqueeze(1)  # (B, L)
        # Ids past hist_len become the padding id 0, whose embedding (and genre mean) is the
        # zero vector: the history means are then plain sums over positions / hist_len, and
        # masking costs an integer product instead of one over (B, L, D) floats.
        hist_items = batch["hist_items"] * valid  # (B, L)
        hist_genres = batch["hist_genres"] * valid.unsqueeze(-1)  # (B, L, G)
        hist_ratings = batch["hist_ratings"] * valid  # (B, L)

        item = self.item(batch["item"])  # (B, D)
        item_genres = self._genre_mean(batch["item_genres"])  # (B, D)
        hist_item_vecs = self.item(hist_items)  # (B, L, D)
        hist_genre_vecs = self._genre_mean(hist_genres)  # (B, L, D)
        hist_rating_vecs = self.rating(hist_ratings)  # (B, L, D)

        count = batch["hist_len"].clamp_min(1).unsqueeze(1).to(item.dtype)  # (B, 1)
        fields = [
            item,
            item_genres,
            *(table(batch[name]) for name, table in self.profile.items()),
            hist_item_vecs.sum(dim=1) / count,
            hist_genre_vecs.sum(dim=1) / count,
            hist_rating_vecs.sum(dim=1) / count,
        ]
        stacked = torch.stack(fields, dim=1)  # (B, F, D)
        sequence = SequenceInput(
            target=torch.cat([item, item_genres], dim=-1),  # (B, 2D)
            behaviours=torch.cat([hist_item_vecs, hist_genre_vecs], dim=-1),  # (B, L, 2D)
            mask=valid,
        )
        assert stacked.shape == (b, self.num_fields, self.embed_dim), stacked.shape
        return stacked, sequence
