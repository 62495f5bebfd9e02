"""DCN (Wang et al., ADKDD 2017): a cross network with vector weights beside a deep MLP.

KAR injects knowledge densely: the augmented vectors are concatenated to x0, the input of
both the cross and the deep part.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from kar.backbones.base import Backbone, SequenceInput
from kar.nn.layers import MLP, CrossNetV1
from kar.registry import BACKBONES, ConfigError


@BACKBONES.register("dcnv1")
class DCNv1(Backbone):
    """x0 = [fields, dense]; [cross_v1(x0), mlp(x0)] -> Linear -> logit."""

    injection: ClassVar[str] = "dense"

    def __init__(
        self,
        num_fields: int,
        embed_dim: int,
        dense_dim: int,
        *,
        cross_layers: int = 3,
        mlp_hidden: tuple[int, ...] = (200, 80),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__(num_fields, embed_dim, dense_dim)
        if cross_layers < 1 or not mlp_hidden:
            raise ConfigError(
                "dcnv1 needs cross_layers >= 1 and a non-empty mlp_hidden "
                f"(got {cross_layers}, {list(mlp_hidden)})"
            )
        input_dim = num_fields * embed_dim + dense_dim
        self.cross = CrossNetV1(input_dim, cross_layers)
        self.deep = MLP(
            input_dim, mlp_hidden, activation=activation, dropout=dropout, batch_norm=batch_norm
        )
        self.head = nn.Linear(input_dim + self.deep.output_dim, 1)

    def forward(
        self, fields: Tensor, dense: Tensor | None, sequence: SequenceInput | None
    ) -> Tensor:
        x0 = self.flat_input(fields, dense)  # (B, d)
        hidden = torch.cat([self.cross(x0), self.deep(x0)], dim=1)  # (B, d + h)
        return self.head(hidden).squeeze(1)  # (B,)
