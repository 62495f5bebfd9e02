"""Shared neural layers for CTR backbones and the knowledge adaptor.

Sections: activations · pooling · MLP · explicit feature crossing (cross net, FM) · attention.
A new backbone adds its building block to the matching section (e.g. CIN next to the cross net,
AUGRU next to target attention) so that every model file stays a thin composition.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------


class Dice(nn.Module):
    """Data-adaptive PReLU from DIN: a sigmoid gate on the batch-normalised input."""

    def __init__(self, num_features: int, eps: float = 1e-9) -> None:
        super().__init__()
        # DIN's gate only rescales, so the normalisation has no affine part of its own.
        self.bn = nn.BatchNorm1d(num_features, affine=False, eps=eps, momentum=0.01)
        self.alpha = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, C); callers flatten sequence dims first.
        p = torch.sigmoid(self.bn(x))  # (N, C)
        return p * x + (1 - p) * self.alpha * x


_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "prelu": nn.PReLU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}


def activation_layer(name: str, num_features: int) -> nn.Module:
    """An activation module by name; `num_features` is used by the adaptive ones (Dice)."""
    key = name.lower()
    if key == "dice":
        return Dice(num_features)
    if key not in _ACTIVATIONS:
        raise ValueError(
            f"unknown activation {name!r}; use one of: dice, {', '.join(sorted(_ACTIVATIONS))}"
        )
    return _ACTIVATIONS[key]()


# ---------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` (..., L, D) over the positions where `mask` (..., L) is true.

    Rows with no valid position give zeros (not NaN), e.g. a user with an empty history.
    """
    assert values.shape[:-1] == mask.shape, (values.shape, mask.shape)
    weights = mask.to(values.dtype).unsqueeze(-1)  # (..., L, 1)
    total = (values * weights).sum(dim=-2)  # (..., D)
    count = weights.sum(dim=-2).clamp_min(1.0)  # (..., 1)
    return total / count


# ---------------------------------------------------------------------------------------------
# MLP
# ---------------------------------------------------------------------------------------------


class MLP(nn.Sequential):
    """Stack of Linear -> [BatchNorm] -> activation -> [Dropout] blocks, one per hidden size.

    With `output_dim` a final plain Linear follows (e.g. 1 for a logit); without it the output
    is the last hidden layer, activation and dropout included.
    """

    def __init__(
        self,
        input_dim: int,
        hidden: Sequence[int],
        *,
        output_dim: int | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        layers: list[nn.Module] = []
        width = input_dim
        for size in hidden:
            layers.append(nn.Linear(width, size))
            if batch_norm:
                layers.append(nn.BatchNorm1d(size))
            layers.append(activation_layer(activation, size))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        if output_dim is not None:
            layers.append(nn.Linear(width, output_dim))
            width = output_dim
        super().__init__(*layers)
        self.input_dim = input_dim
        self.output_dim = width


# ---------------------------------------------------------------------------------------------
# Explicit feature crossing
# ---------------------------------------------------------------------------------------------


class CrossNetV2(nn.Module):
    """DCNv2 cross network, full-rank ("matrix") form: x_{l+1} = x0 * (W_l x_l + b_l) + x_l."""

    def __init__(self, input_dim: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(input_dim, input_dim) for _ in range(num_layers))

    def forward(self, x0: Tensor) -> Tensor:
        x = x0  # (B, d)
        for layer in self.layers:
            x = x0 * layer(x) + x  # (B, d)
        return x


class FMInteraction(nn.Module):
    """Second-order factorisation-machine term over field embeddings (B, F, D) -> (B,)."""

    def forward(self, fields: Tensor) -> Tensor:
        square_of_sum = fields.sum(dim=1).pow(2)  # (B, D)
        sum_of_square = fields.pow(2).sum(dim=1)  # (B, D)
        return 0.5 * (square_of_sum - sum_of_square).sum(dim=1)  # (B,)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


class MultiHeadSelfAttention(nn.Module):
    """AutoInt interacting layer: multi-head self-attention across fields with a residual.

    AutoInt does not scale the dot products (`use_scale=False` keeps that); the residual is a
    linear projection of the input so input and attention widths may differ.
    """

    def __init__(
        self,
        input_dim: int,
        attention_dim: int,
        num_heads: int,
        *,
        dropout: float = 0.0,
        use_residual: bool = True,
        use_scale: bool = False,
        layer_norm: bool = False,
    ) -> None:
        super().__init__()
        if attention_dim % num_heads != 0:
            raise ValueError(
                f"attention_dim={attention_dim} must be divisible by num_heads={num_heads}"
            )
        self.num_heads = num_heads
        self.head_dim = attention_dim // num_heads
        self.dropout = dropout
        self.use_scale = use_scale
        self.query = nn.Linear(input_dim, attention_dim, bias=False)
        self.key = nn.Linear(input_dim, attention_dim, bias=False)
        self.value = nn.Linear(input_dim, attention_dim, bias=False)
        self.residual = nn.Linear(input_dim, attention_dim, bias=False) if use_residual else None
        self.norm = nn.LayerNorm(attention_dim) if layer_norm else None

    def _split_heads(self, x: Tensor) -> Tensor:
        b, f, _ = x.shape
        return x.view(b, f, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, F, d_h)

    def forward(self, x: Tensor) -> Tensor:
        b, f, _ = x.shape  # (B, F, d_in)
        q, k, v = (self._split_heads(proj(x)) for proj in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=self.dropout if self.training else 0.0,
            scale=None if self.use_scale else 1.0,
        )  # (B, H, F, d_h)
        out = out.transpose(1, 2).reshape(b, f, -1)  # (B, F, attention_dim)
        if self.residual is not None:
            out = out + self.residual(x)
        if self.norm is not None:
            out = self.norm(out)
        return torch.relu(out)


class TargetAttention(nn.Module):
    """DIN activation unit: weights each behaviour by an MLP over [q, k, q-k, q*k].

    DIN leaves the weights unnormalised (sum pooling keeps the intensity of interest);
    `use_softmax=True` normalises them over the valid positions instead.
    """

    def __init__(
        self,
        embed_dim: int,
        hidden: Sequence[int],
        *,
        activation: str = "dice",
        dropout: float = 0.0,
        use_softmax: bool = False,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.use_softmax = use_softmax
        self.score = MLP(
            4 * embed_dim, hidden, output_dim=1, activation=activation, dropout=dropout
        )

    def forward(self, query: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        b, length, d = keys.shape  # (B, L, E)
        assert query.shape == (b, d) and mask.shape == (b, length), (query.shape, mask.shape)
        q = query.unsqueeze(1).expand(-1, length, -1)  # (B, L, E)
        unit_input = torch.cat([q, keys, q - keys, q * keys], dim=-1)  # (B, L, 4E)
        # Flattened so that batch-normalising activations (Dice) see a 2-D input.
        scores = self.score(unit_input.reshape(b * length, 4 * d)).view(b, length)  # (B, L)
        if self.use_softmax:
            # A finite fill keeps rows without any behaviour NaN-free; the mask zeroes them.
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min).softmax(dim=1)
        scores = scores * mask.to(scores.dtype)  # (B, L)
        return torch.bmm(scores.unsqueeze(1), keys).squeeze(1)  # (B, E)
