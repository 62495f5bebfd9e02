"""DeepFM (Guo et al., IJCAI 2017): first-order + FM over fields + a DNN, summed into a logit.

KAR injects knowledge densely: the augmented vectors join the DNN input and the first-order
linear term (the FM term pairs equal-width fields only, so it stays over the fields).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from kar.backbones.base import Backbone, SequenceInput
from kar.nn.layers import MLP, FMInteraction
from kar.registry import BACKBONES


@BACKBONES.register("deepfm")
class DeepFM(Backbone):
    """logit = w·[fields, dense] + FM(fields) + DNN([fields, dense])."""

    injection: ClassVar[str] = "dense"

    def __init__(
        self,
        num_fields: int,
        embed_dim: int,
        dense_dim: int,
        *,
        mlp_hidden: tuple[int, ...] = (200, 80),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__(num_fields, embed_dim, dense_dim)
        input_dim = num_fields * embed_dim + dense_dim
        # Fields are embeddings, not raw ids, so the first-order term is linear in them; on an
        # id field that acts as a learned per-id bias.
        self.first_order = nn.Linear(input_dim, 1)
        self.fm = FMInteraction()
        self.dnn = MLP(
            input_dim,
            mlp_hidden,
            output_dim=1,
            activation=activation,
            dropout=dropout,
            batch_norm=batch_norm,
        )

    def forward(
        self, fields: Tensor, dense: Tensor | None, sequence: SequenceInput | None
    ) -> Tensor:
        x = self.flat_input(fields, dense)  # (B, F*D + dense_dim)
        linear = self.first_order(x).squeeze(1)  # (B,)
        deep = self.dnn(x).squeeze(1)  # (B,)
        return linear + self.fm(fields) + deep  # (B,)
