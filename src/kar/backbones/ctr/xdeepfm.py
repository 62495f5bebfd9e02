"""xDeepFM (Lian et al., KDD 2018): linear + compressed interaction network (CIN) + DNN.

KAR injects knowledge as two extra fields, so the CIN crosses them with every other field at
the vector level.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from kar.backbones.base import Backbone, SequenceInput
from kar.nn.layers import CIN, MLP
from kar.registry import BACKBONES, ConfigError


@BACKBONES.register("xdeepfm")
class XDeepFM(Backbone):
    """logit = w·fields + Linear(CIN(fields)) + DNN(fields)."""

    injection: ClassVar[str] = "field"

    def __init__(
        self,
        num_fields: int,
        embed_dim: int,
        dense_dim: int,
        *,
        cin_layers: tuple[int, ...] = (50, 50),
        split_half: bool = True,
        mlp_hidden: tuple[int, ...] = (200, 80),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__(num_fields, embed_dim, dense_dim)
        try:
            self.cin = CIN(num_fields, cin_layers, split_half=split_half)
        except ValueError as err:
            raise ConfigError(f"backbone.cin_layers: {err}") from None
        input_dim = num_fields * embed_dim
        # Fields are embeddings, not raw ids, so the first-order term is linear in them.
        self.first_order = nn.Linear(input_dim, 1)
        self.cin_head = nn.Linear(self.cin.output_dim, 1, bias=False)
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
        flat = self.flat_input(fields, dense)  # (B, F*D)
        linear = self.first_order(flat).squeeze(1)  # (B,)
        crossed = self.cin_head(self.cin(fields)).squeeze(1)  # (B,)
        return linear + crossed + self.dnn(flat).squeeze(1)  # (B,)
