"""DIEN (Zhou et al., AAAI 2019): interest extraction (GRU) + interest evolution (AUGRU).

A GRU turns the behaviour sequence into interest states; attention of the target on those
states drives an AUGRU whose final state is the evolved interest, which joins the flattened
fields in the final MLP. KAR injects knowledge densely, after the interest evolution: the
augmented vectors are concatenated to the final MLP input.

DIEN's auxiliary loss (next-behaviour prediction from each interest state, against sampled
negatives) is left out: the engine trains every backbone with one BCE loss on the logits, and
the paper reports it as an optional regulariser.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from kar.backbones.base import Backbone, SequenceInput
from kar.nn.layers import AUGRU, MLP
from kar.registry import BACKBONES


@BACKBONES.register("dien")
class DIEN(Backbone):
    """MLP([fields, AUGRU(GRU(behaviours), attention(target)), dense]) -> logit.

    Target and behaviour vectors are [item, genre mean] (width 2 * embed_dim); the interest
    states have that width too. The history must be right-padded (mask true on a prefix).
    """

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
        self.sequence_dim = 2 * embed_dim
        self.extractor = nn.GRU(self.sequence_dim, self.sequence_dim, batch_first=True)
        # Paper's attention: a_t = softmax_t(h_t W e_target).
        self.attention = nn.Linear(self.sequence_dim, self.sequence_dim, bias=False)
        self.evolution = AUGRU(self.sequence_dim, self.sequence_dim)
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
        assert sequence is not None, "DIEN needs the behaviour sequence"
        assert sequence.target.shape == (fields.shape[0], self.sequence_dim), sequence.target.shape
        mask = sequence.mask  # (B, L)
        # Right padding keeps the GRU causal over the valid prefix, so no packing is needed.
        assert not (mask[:, 1:] & ~mask[:, :-1]).any(), "history must be right-padded"
        states, _ = self.extractor(sequence.behaviours)  # (B, L, 2D)
        query = self.attention(sequence.target)  # (B, 2D)
        scores = torch.einsum("bld,bd->bl", states, query)  # (B, L)
        # A finite fill keeps rows without any behaviour NaN-free; the mask zeroes them.
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min).softmax(dim=1)
        scores = scores * mask.to(scores.dtype)  # (B, L)
        interest = self.evolution(states, scores, mask)  # (B, 2D)
        parts = [fields.flatten(1), interest] + ([dense] if dense is not None else [])
        return self.mlp(torch.cat(parts, dim=1)).squeeze(1)  # (B,)
