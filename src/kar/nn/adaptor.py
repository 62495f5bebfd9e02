"""Knowledge adaptors: encoder vectors (user reasoning, item facts) -> augmented vectors.

`HybridExpertAdaptor` is KAR's hybrid-expert adaptor (HEA). `NoAdaptor` is the "none" option:
a registered marker that makes `kar.models.build_model` build the bare backbone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kar.nn.layers import MLP
from kar.registry import ADAPTORS, ConfigError

KNOWLEDGE_TYPES = ("user", "item")


@ADAPTORS.register("hea")
class HybridExpertAdaptor(nn.Module):
    """Hybrid-expert adaptor (KAR paper, Section 3.3).

    Shared experts transform both knowledge types with the same weights; each type also has
    dedicated experts and its own softmax gate over [shared..., dedicated...]. An expert is
    MLP [m -> expert_hidden... -> out] with activation and dropout after every layer, the last
    one included, as in the official code.
    """

    def __init__(
        self,
        user_dim: int,
        item_dim: int,
        out_dim: int,
        *,
        n_shared: int = 2,
        n_dedicated: int = 3,
        expert_hidden: tuple[int, ...] = (128,),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if n_shared < 0 or n_dedicated < 0 or n_shared + n_dedicated < 1:
            raise ConfigError(
                f"adaptor needs at least one expert and no negative counts; got "
                f"n_shared={n_shared}, n_dedicated={n_dedicated}"
            )
        if n_shared > 0 and user_dim != item_dim:
            raise ConfigError(
                f"shared experts need user and item knowledge vectors of one size; got "
                f"user_dim={user_dim}, item_dim={item_dim}. Encode both with the same encoder "
                f"or set adaptor.n_shared=0"
            )
        self.out_dim = out_dim
        self.n_experts = n_shared + n_dedicated
        hidden = [*expert_hidden, out_dim]

        def expert(in_dim: int) -> MLP:
            return MLP(in_dim, hidden, activation="relu", dropout=dropout)

        self.shared = nn.ModuleList(expert(user_dim) for _ in range(n_shared))
        in_dims = {"user": user_dim, "item": item_dim}
        self.dedicated = nn.ModuleDict(
            {
                t: nn.ModuleList(expert(in_dims[t]) for _ in range(n_dedicated))
                for t in KNOWLEDGE_TYPES
            }
        )
        self.gate = nn.ModuleDict(
            {t: nn.Linear(in_dims[t], self.n_experts) for t in KNOWLEDGE_TYPES}
        )

    def _gate(self, kind: str, x: Tensor) -> Tensor:
        return self.gate[kind](x).softmax(dim=-1)  # (B, n_experts)

    def gates(self, user_vec: Tensor, item_vec: Tensor) -> dict[str, Tensor]:
        """Gate weights per knowledge type: {"user": (B, n_experts), "item": (B, n_experts)}.

        Expert order is [shared..., dedicated...].
        """
        return {"user": self._gate("user", user_vec), "item": self._gate("item", item_vec)}

    def forward(self, user_vec: Tensor, item_vec: Tensor) -> Tensor:
        """(B, m_user), (B, m_item) -> augmented vectors (B, 2, out): [user, item]."""
        assert user_vec.shape[0] == item_vec.shape[0], (user_vec.shape, item_vec.shape)
        augmented = []
        for kind, x in (("user", user_vec), ("item", item_vec)):
            experts = [*self.shared, *self.dedicated[kind]]
            outputs = torch.stack([e(x) for e in experts], dim=1)  # (B, n_experts, out)
            weights = self._gate(kind, x)  # (B, n_experts)
            augmented.append(torch.bmm(weights.unsqueeze(1), outputs).squeeze(1))  # (B, out)
        return torch.stack(augmented, dim=1)  # (B, 2, out)


@ADAPTORS.register("none")
class NoAdaptor:
    """Marker for "no knowledge": `build_model` builds the bare backbone for this name."""

    def __init__(self) -> None:
        raise TypeError(
            "NoAdaptor only marks adaptor=none; build the model with kar.models.build_model, "
            "which leaves the adaptor out"
        )
