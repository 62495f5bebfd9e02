"""DIN (Zhou et al., KDD 2018): target attention over the behaviour sequence.

The candidate [item, genres] attends over the history [item, genres]; the pooled interest
joins the flattened fields. KAR injects knowledge densely, after the attention: the augmented
vectors are concatenated to the final MLP input.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from kar.backbones.base import Backbone, SequenceInput
from kar.nn.layers import MLP, TargetAttention
from kar.registry import BACKBONES


@BACKBONES.register("din")
class DIN(Backbone):
    """MLP([fields, attention(target, behaviours), dense]) -> logit.

    Target and behaviour vectors are [item, genre mean]: width 2 * embed_dim.
    """

    injection: ClassVar[str] = "dense"

    def __init__(
        self,
        num_fields: int,
        embed_dim: int,
        dense_dim: int,
        *,
        attention_hidden: tuple[int, ...] = (64,),
        attention_activation: str = "dice",
        attention_dropout: float = 0.0,
        use_softmax: bool = False,
        mlp_hidden: tuple[int, ...] = (200, 80),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__(num_fields, embed_dim, dense_dim)
        self.sequence_dim = 2 * embed_dim
        self.attention = TargetAttention(
            self.sequence_dim,
            attention_hidden,
            activation=attention_activation,
            dropout=attention_dropout,
            use_softmax=use_softmax,
        )
        self.mlp = MLP(
            num_fields * embed_dim + self.sequence_dim + dense_dim,
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
        assert sequence is not None, "DIN needs the behaviour sequence"
        assert sequence.target.shape == (fields.shape[0], self.sequence_dim), sequence.target.shape
        interest = self.attention(sequence.target, sequence.behaviours, sequence.mask)  # (B, 2D)
        parts = [fields.flatten(1), interest] + ([dense] if dense is not None else [])
        return self.mlp(torch.cat(parts, dim=1)).squeeze(1)  # (B,)
