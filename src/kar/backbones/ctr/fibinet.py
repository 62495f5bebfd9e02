"""FiBiNet (Huang et al., RecSys 2019): SENET field reweighting + bilinear interactions + DNN.

The bilinear layer runs on the original and on the SENET-reweighted embeddings; both sets of
pair vectors feed the DNN. KAR injects knowledge as two extra fields, so they are reweighted
and paired with every other field.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from kar.backbones.base import Backbone, SequenceInput
from kar.nn.layers import BILINEAR_TYPES, MLP, BilinearInteraction, SqueezeExcitation
from kar.registry import BACKBONES, ConfigError


@BACKBONES.register("fibinet")
class FiBiNet(Backbone):
    """logit = w·fields + DNN([bilinear(fields), bilinear(senet(fields))])."""

    injection: ClassVar[str] = "field"

    def __init__(
        self,
        num_fields: int,
        embed_dim: int,
        dense_dim: int,
        *,
        bilinear_type: str = "field_interaction",
        reduction_ratio: float = 3.0,
        mlp_hidden: tuple[int, ...] = (200, 80),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__(num_fields, embed_dim, dense_dim)
        if bilinear_type not in BILINEAR_TYPES:
            raise ConfigError(
                f"backbone.bilinear_type={bilinear_type!r} is not one of {BILINEAR_TYPES}"
            )
        if num_fields < 2 or reduction_ratio <= 0:
            raise ConfigError(
                f"fibinet needs >= 2 fields and reduction_ratio > 0, got {num_fields}, "
                f"{reduction_ratio}"
            )
        self.senet = SqueezeExcitation(num_fields, reduction_ratio)
        # Separate bilinear weights for the two views, as in the paper.
        self.bilinear = BilinearInteraction(num_fields, embed_dim, bilinear_type)
        self.bilinear_senet = BilinearInteraction(num_fields, embed_dim, bilinear_type)
        num_pairs = num_fields * (num_fields - 1) // 2
        # Fields are embeddings, not raw ids, so the first-order term is linear in them.
        self.first_order = nn.Linear(num_fields * embed_dim, 1)
        self.dnn = MLP(
            2 * num_pairs * embed_dim,
            mlp_hidden,
            output_dim=1,
            activation=activation,
            dropout=dropout,
            batch_norm=batch_norm,
        )

    def forward(
        self, fields: Tensor, dense: Tensor | None, sequence: SequenceInput | None
    ) -> Tensor:
        self.check_inputs(fields, dense)
        pairs = self.bilinear(fields)  # (B, P, D)
        pairs_senet = self.bilinear_senet(self.senet(fields))  # (B, P, D)
        combined = torch.cat([pairs.flatten(1), pairs_senet.flatten(1)], dim=1)  # (B, 2*P*D)
        linear = self.first_order(fields.flatten(1)).squeeze(1)  # (B,)
        return linear + self.dnn(combined).squeeze(1)  # (B,)
