"""DCNv2 (Wang et al., WWW 2021): full-rank cross network plus a deep MLP.

KAR injects knowledge densely: the augmented vectors are concatenated to x0, the input of
both the cross and the deep part.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from kar.backbones.base import Backbone, SequenceInput
from kar.nn.layers import MLP, CrossNetV2
from kar.registry import BACKBONES, ConfigError

STRUCTURES = ("parallel", "stacked")


@BACKBONES.register("dcnv2")
class DCNv2(Backbone):
    """x0 = [fields, dense]; "parallel": [cross(x0), mlp(x0)] -> logit;
    "stacked": mlp(cross(x0)) -> logit."""

    injection: ClassVar[str] = "dense"

    def __init__(
        self,
        num_fields: int,
        embed_dim: int,
        dense_dim: int,
        *,
        cross_layers: int = 3,
        mlp_hidden: tuple[int, ...] = (200, 80),
        structure: str = "parallel",
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__(num_fields, embed_dim, dense_dim)
        if structure not in STRUCTURES:
            raise ConfigError(f"backbone.structure={structure!r} is not one of {STRUCTURES}")
        if cross_layers < 1 or not mlp_hidden:
            raise ConfigError(
                "dcnv2 needs cross_layers >= 1 and a non-empty mlp_hidden "
                f"(got {cross_layers}, {list(mlp_hidden)})"
            )
        self.structure = structure
        input_dim = num_fields * embed_dim + dense_dim
        self.cross = CrossNetV2(input_dim, cross_layers)
        self.deep = MLP(
            input_dim, mlp_hidden, activation=activation, dropout=dropout, batch_norm=batch_norm
        )
        head_dim = self.deep.output_dim + (input_dim if structure == "parallel" else 0)
        self.head = nn.Linear(head_dim, 1)

    def forward(
        self, fields: Tensor, dense: Tensor | None, sequence: SequenceInput | None
    ) -> Tensor:
        x0 = self.flat_input(fields, dense)  # (B, d)
        crossed = self.cross(x0)  # (B, d)
        if self.structure == "stacked":
            hidden = self.deep(crossed)  # (B, h)
        else:
            hidden = torch.cat([crossed, self.deep(x0)], dim=1)  # (B, d + h)
        return self.head(hidden).squeeze(1)  # (B,)
