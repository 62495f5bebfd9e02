"""Knowledge adaptors: encoder vectors (user reasoning, item facts) -> augmented vectors.

`HybridExpertAdaptor` is KAR's hybrid-expert adaptor (HEA). `NoAdaptor` is the "none" option:
a registered marker that makes `kar.models.build_model` build the bare backbone.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kar.registry import ADAPTORS, ConfigError

KNOWLEDGE_TYPES = ("user", "item")


class ExpertBank(nn.Module):
    """`n_experts` MLPs of one shape [in -> hidden... -> out], run as batched matmuls.

    Same function as `n_experts` separate `MLP(in, hidden, activation="relu", dropout=...)`
    (activation and dropout after every layer, the last one included), but one matmul per layer
    for all experts instead of one per expert: on CPU the many small matmuls of separate experts
    cost more than the arithmetic. Weights are initialised as nn.Linear initialises them.
    """

    def __init__(
        self, n_experts: int, in_dim: int, hidden: Sequence[int], *, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.n_experts = n_experts
        widths = [in_dim, *hidden]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in))
            # The first layer is stored (in, E, out): viewed as (in, E * out) it serves all
            # experts in one matmul without copying the weight every step.
            # Drawn expert by expert whatever the layout, so a seed gives the same experts.
            weight = torch.empty(n_experts, fan_in, fan_out).uniform_(-bound, bound)
            if layer == 0:
                weight = weight.permute(1, 0, 2).contiguous()
            self.weights.append(nn.Parameter(weight))
            self.biases.append(nn.Parameter(torch.empty(n_experts, 1, fan_out)))
            nn.init.uniform_(self.biases[-1], -bound, bound)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def out_dim(self) -> int:
        return self.weights[-1].shape[-1]

    def forward(self, x: Tensor) -> Tensor:
        """(N, in) -> (N, n_experts, out)."""
        first_w, first_b = self.weights[0], self.biases[0]
        fan_in, e, fan_out = first_w.shape
        # Layer 1 shares its input across experts: one (N, in) @ (in, E * h) matmul.
        h = x @ first_w.view(fan_in, e * fan_out)  # (N, E * h)
        h = h.view(-1, e, fan_out).transpose(0, 1) + first_b  # (E, N, h)
        h = self.dropout(torch.relu(h))
        for w, b in zip(self.weights[1:], self.biases[1:], strict=True):
            h = self.dropout(torch.relu(torch.baddbmm(b, h, w)))  # (E, N, h')
        return h.transpose(0, 1)  # (N, E, out)

    def expert(self, index: int) -> nn.Sequential:
        """Expert `index` as a standalone nn.Sequential of Linear/ReLU (a copy, for checks)."""
        layers: list[nn.Module] = []
        for layer, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            weight = w[:, index] if layer == 0 else w[index]  # (in, out)
            linear = nn.Linear(*weight.shape)
            with torch.no_grad():
                linear.weight.copy_(weight.T)
                linear.bias.copy_(b[index, 0])
            layers += [linear, nn.ReLU()]
        return nn.Sequential(*layers)


@ADAPTORS.register("hea")
class HybridExpertAdaptor(nn.Module):
    """Hybrid-expert adaptor (KAR paper, Section 3.3).

    Shared experts transform both knowledge types with the same weights; each type also has
    dedicated experts and its own softmax gate over [shared..., dedicated...]. An expert is
    MLP [m -> expert_hidden... -> out] with activation and dropout after every layer, the last
    one included, as in the official code. Experts of one kind run together (`ExpertBank`).
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
        in_dims = {"user": user_dim, "item": item_dim}
        self.shared = ExpertBank(n_shared, user_dim, hidden, dropout=dropout) if n_shared else None
        self.dedicated = nn.ModuleDict(
            {
                t: ExpertBank(n_dedicated, in_dims[t], hidden, dropout=dropout)
                for t in KNOWLEDGE_TYPES
                if n_dedicated
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

    def expert_outputs(self, kind: str, x: Tensor) -> Tensor:
        """(N, m) vectors of one type -> (N, n_experts, out), experts [shared..., dedicated...]."""
        dedicated = self.dedicated[kind] if kind in self.dedicated else None  # noqa: SIM401
        banks = (self.shared, dedicated)  # nn.ModuleDict has no .get
        return torch.cat([bank(x) for bank in banks if bank is not None], dim=1)

    def transform(self, kind: str, x: Tensor) -> Tensor:
        """(N, m) knowledge vectors of type `kind` ("user" | "item") -> augmented (N, out)."""
        weights = self._gate(kind, x)  # (N, n_experts)
        return torch.bmm(weights.unsqueeze(1), self.expert_outputs(kind, x)).squeeze(1)

    def forward(self, user_vec: Tensor, item_vec: Tensor) -> Tensor:
        """(B, m_user), (B, m_item) -> augmented vectors (B, 2, out): [user, item]."""
        assert user_vec.shape[0] == item_vec.shape[0], (user_vec.shape, item_vec.shape)
        return torch.stack(
            [self.transform("user", user_vec), self.transform("item", item_vec)], dim=1
        )


@ADAPTORS.register("none")
class NoAdaptor:
    """Marker for "no knowledge": `build_model` builds the bare backbone for this name."""

    def __init__(self) -> None:
        raise TypeError(
            "NoAdaptor only marks adaptor=none; build the model with kar.models.build_model, "
            "which leaves the adaptor out"
        )
