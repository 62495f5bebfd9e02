"""FiGNN (Li et al., CIKM 2019): a graph neural network over the fields.

Fields are nodes of a fully connected graph; gated state propagation models their
interactions, and an attentional scoring layer sums one score per field. KAR injects knowledge
as two extra fields, i.e. two more nodes.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from kar.backbones.base import Backbone, SequenceInput
from kar.nn.layers import FieldGraph
from kar.registry import BACKBONES, ConfigError


@BACKBONES.register("fignn")
class FiGNN(Backbone):
    """h = graph(fields); logit = sum_i sigmoid(w_a · h_i) * (w_s · h_i + b)."""

    injection: ClassVar[str] = "field"

    def __init__(
        self,
        num_fields: int,
        embed_dim: int,
        dense_dim: int,
        *,
        gnn_layers: int = 3,
        use_residual: bool = True,
    ) -> None:
        super().__init__(num_fields, embed_dim, dense_dim)
        if gnn_layers < 1 or num_fields < 2:
            raise ConfigError(
                f"fignn needs gnn_layers >= 1 and >= 2 fields, got {gnn_layers}, {num_fields}"
            )
        self.graph = FieldGraph(num_fields, embed_dim, gnn_layers, use_residual=use_residual)
        # Attentional scoring: each final node state gives a score and its weight.
        self.score = nn.Linear(embed_dim, 1)
        self.weight = nn.Linear(embed_dim, 1, bias=False)

    def forward(
        self, fields: Tensor, dense: Tensor | None, sequence: SequenceInput | None
    ) -> Tensor:
        self.check_inputs(fields, dense)
        states = self.graph(fields)  # (B, F, D)
        scores = self.score(states).squeeze(2)  # (B, F)
        weights = torch.sigmoid(self.weight(states)).squeeze(2)  # (B, F)
        return (weights * scores).sum(dim=1)  # (B,)
