"""AutoInt (Song et al., CIKM 2019): stacked multi-head self-attention across fields.

KAR injects knowledge as two extra fields, so they take part in every attention layer.
A parallel DNN over the fields (`mlp_hidden`, AutoInt+) is on by default, as in FuxiCTR;
`mlp_hidden=[]` gives the plain AutoInt.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from kar.backbones.base import Backbone, SequenceInput
from kar.nn.layers import MLP, MultiHeadSelfAttention
from kar.registry import BACKBONES, ConfigError


@BACKBONES.register("autoint")
class AutoInt(Backbone):
    """fields -> attention_layers x self-attention -> flatten -> Linear -> logit [+ DNN]."""

    injection: ClassVar[str] = "field"

    def __init__(
        self,
        num_fields: int,
        embed_dim: int,
        dense_dim: int,
        *,
        attention_layers: int = 3,
        num_heads: int = 2,
        attention_dim: int = 64,
        use_residual: bool = True,
        use_scale: bool = False,
        layer_norm: bool = False,
        attention_dropout: float = 0.0,
        mlp_hidden: tuple[int, ...] = (200, 80),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__(num_fields, embed_dim, dense_dim)
        if attention_layers < 1 or attention_dim % num_heads != 0:
            raise ConfigError(
                f"autoint needs attention_layers >= 1 and attention_dim divisible by num_heads; "
                f"got {attention_layers}, {attention_dim}, {num_heads}"
            )
        self.attention = nn.Sequential(
            *(
                MultiHeadSelfAttention(
                    embed_dim if i == 0 else attention_dim,
                    attention_dim,
                    num_heads,
                    dropout=attention_dropout,
                    use_residual=use_residual,
                    use_scale=use_scale,
                    layer_norm=layer_norm,
                )
                for i in range(attention_layers)
            )
        )
        self.attention_head = nn.Linear(num_fields * attention_dim, 1)
        self.dnn = (
            MLP(
                num_fields * embed_dim,
                mlp_hidden,
                output_dim=1,
                activation=activation,
                dropout=dropout,
                batch_norm=batch_norm,
            )
            if mlp_hidden
            else None
        )

    def forward(
        self, fields: Tensor, dense: Tensor | None, sequence: SequenceInput | None
    ) -> Tensor:
        self.check_inputs(fields, dense)
        attended = self.attention(fields)  # (B, F, attention_dim)
        logit = self.attention_head(attended.flatten(1)).squeeze(1)  # (B,)
        if self.dnn is not None:
            logit = logit + self.dnn(fields.flatten(1)).squeeze(1)  # (B,)
        return logit
