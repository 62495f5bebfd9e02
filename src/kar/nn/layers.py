"""Shared neural layers for CTR backbones and the knowledge adaptor.

Sections: activations · pooling · MLP · explicit feature crossing (cross nets, FM, CIN,
SENET, bilinear) · attention (self, target, field graph, AUGRU).
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


class CrossNetV1(nn.Module):
    """DCN (v1) cross network, vector weights: x_{l+1} = x0 * (x_l · w_l) + b_l + x_l.

    Each layer adds only 2d parameters; the scalar x_l · w_l rescales x0.
    """

    def __init__(self, input_dim: int, num_layers: int) -> None:
        super().__init__()
        bound = input_dim**-0.5  # nn.Linear(input_dim, 1)'s initialisation range
        self.weights = nn.Parameter(torch.empty(num_layers, input_dim).uniform_(-bound, bound))
        self.biases = nn.Parameter(torch.zeros(num_layers, input_dim))

    def forward(self, x0: Tensor) -> Tensor:
        x = x0  # (B, d)
        for w, b in zip(self.weights, self.biases, strict=True):
            x = x0 * (x @ w).unsqueeze(1) + b + x  # (B, d)
        return x


class CIN(nn.Module):
    """xDeepFM compressed interaction network over fields (B, m, D) -> (B, output_dim).

    Layer k: Z = outer product of X_{k-1} (B, H_{k-1}, D) and X_0 (B, m, D) along fields, per
    embedding dimension; X_k = W_k Z, H_k feature maps, each a weighted sum of the H_{k-1}*m
    products (the paper's 1x1 convolution; no activation, as in its formula). Each layer's maps
    are sum-pooled over D and concatenated. With `split_half`, every layer but the last sends
    half its maps to the next layer and half to the output (a common default, e.g. DeepCTR's;
    it halves the cost of the deeper layers).
    """

    def __init__(self, num_fields: int, layer_sizes: Sequence[int], *, split_half: bool = True):
        super().__init__()
        if not layer_sizes or min(layer_sizes) < 1:
            raise ValueError(f"CIN needs positive layer sizes, got {list(layer_sizes)}")
        if split_half and any(size % 2 for size in layer_sizes[:-1]):
            raise ValueError(
                f"CIN with split_half needs even sizes for all but the last layer, "
                f"got {list(layer_sizes)}; make them even or set split_half=false"
            )
        self.num_fields = num_fields
        self.split_half = split_half
        self.layers = nn.ModuleList()
        hidden, output_dim = num_fields, 0
        for k, size in enumerate(layer_sizes):
            self.layers.append(nn.Linear(hidden * num_fields, size))
            last = k == len(layer_sizes) - 1
            hidden = size // 2 if split_half and not last else size
            output_dim += size - hidden if split_half and not last else size
        self.output_dim = output_dim

    def forward(self, x0: Tensor) -> Tensor:
        b, m, d = x0.shape  # (B, m, D)
        assert m == self.num_fields, (x0.shape, self.num_fields)
        x, pooled = x0, []
        for k, layer in enumerate(self.layers):
            z = torch.einsum("bhd,bmd->bhmd", x, x0).reshape(b, -1, d)  # (B, H_{k-1}*m, D)
            # A matmul over the channel axis: the 1x1 convolution, ~20% faster than Conv1d on CPU.
            maps = torch.matmul(layer.weight, z) + layer.bias.unsqueeze(1)  # (B, H_k, D)
            if self.split_half and k < len(self.layers) - 1:
                x, out = maps.split(maps.shape[1] // 2, dim=1)  # (B, H_k/2, D) each
            else:
                x, out = maps, maps
            pooled.append(out.sum(dim=2))  # (B, H_out_k)
        return torch.cat(pooled, dim=1)  # (B, output_dim)


class SqueezeExcitation(nn.Module):
    """FiBiNet SENET layer: reweights each field by a gate computed from all fields' means.

    A = relu(W2 relu(W1 mean_D(E))), output E * A, as in the paper (both activations ReLU, no
    biases), so the weights are >= 0 and a field can be switched off.
    """

    def __init__(self, num_fields: int, reduction_ratio: float = 3.0) -> None:
        super().__init__()
        reduced = max(1, int(num_fields / reduction_ratio))
        self.excitation = nn.Sequential(
            nn.Linear(num_fields, reduced, bias=False),
            nn.ReLU(),
            nn.Linear(reduced, num_fields, bias=False),
            nn.ReLU(),
        )

    def field_weights(self, fields: Tensor) -> Tensor:
        return self.excitation(fields.mean(dim=2))  # (B, F)

    def forward(self, fields: Tensor) -> Tensor:
        return fields * self.field_weights(fields).unsqueeze(2)  # (B, F, D)


BILINEAR_TYPES = ("field_all", "field_each", "field_interaction")


class BilinearInteraction(nn.Module):
    """FiBiNet bilinear interaction: p_ij = (v_i W) * v_j for every field pair i < j.

    W is one matrix for all pairs ("field_all"), one per first field i ("field_each") or one per
    pair ("field_interaction"). (B, F, D) -> (B, F(F-1)/2, D).
    """

    def __init__(self, num_fields: int, embed_dim: int, bilinear_type: str) -> None:
        super().__init__()
        if bilinear_type not in BILINEAR_TYPES:
            raise ValueError(f"bilinear_type={bilinear_type!r} is not one of {BILINEAR_TYPES}")
        if num_fields < 2:
            raise ValueError(f"bilinear interaction needs >= 2 fields, got {num_fields}")
        self.bilinear_type = bilinear_type
        first, second = torch.triu_indices(num_fields, num_fields, offset=1)
        self.register_buffer("first", first, persistent=False)
        self.register_buffer("second", second, persistent=False)
        count = {"field_all": 1, "field_each": num_fields, "field_interaction": len(first)}
        bound = embed_dim**-0.5  # nn.Linear(embed_dim, embed_dim)'s initialisation range
        self.weight = nn.Parameter(
            torch.empty(count[bilinear_type], embed_dim, embed_dim).uniform_(-bound, bound)
        )

    def forward(self, fields: Tensor) -> Tensor:
        left, right = fields[:, self.first], fields[:, self.second]  # (B, P, D) each
        if self.bilinear_type == "field_all":
            projected = left @ self.weight[0]  # (B, P, D)
        elif self.bilinear_type == "field_each":
            projected = torch.einsum("bpd,pde->bpe", left, self.weight[self.first])  # (B, P, D)
        else:
            projected = torch.einsum("bpd,pde->bpe", left, self.weight)  # (B, P, D)
        return projected * right  # (B, P, D)


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


class FieldGraph(nn.Module):
    """FiGNN graph over fields: attentional edge weights, gated (GRU) node updates, residual.

    The graph is fully connected without self-loops; the weight of edge j -> i is a softmax over
    j of LeakyReLU(w · [e_i, e_j]) on the initial embeddings. Each step a node aggregates its
    neighbours' states through per-field output and input transformations, a GRU cell (shared
    by all nodes and steps) updates its state, and the initial embedding is added back.
    """

    def __init__(
        self, num_fields: int, embed_dim: int, num_steps: int, *, use_residual: bool = True
    ) -> None:
        super().__init__()
        if num_fields < 2 or num_steps < 1:
            raise ValueError(
                f"FieldGraph needs >= 2 fields and >= 1 step, got {num_fields}, {num_steps}"
            )
        self.num_steps = num_steps
        self.use_residual = use_residual
        self.edge_attention = nn.Linear(2 * embed_dim, 1, bias=False)
        bound = embed_dim**-0.5  # nn.Linear(embed_dim, embed_dim)'s initialisation range
        self.w_out = nn.Parameter(
            torch.empty(num_fields, embed_dim, embed_dim).uniform_(-bound, bound)
        )
        self.w_in = nn.Parameter(
            torch.empty(num_fields, embed_dim, embed_dim).uniform_(-bound, bound)
        )
        self.bias = nn.Parameter(torch.zeros(embed_dim))
        self.gru = nn.GRUCell(embed_dim, embed_dim)
        self.register_buffer("self_loop", torch.eye(num_fields, dtype=torch.bool), persistent=False)

    def edge_weights(self, fields: Tensor) -> Tensor:
        """(B, F, D) -> row-stochastic adjacency (B, F, F), zero diagonal."""
        # w · [e_i, e_j] = w_i · e_i + w_j · e_j: no (B, F, F, 2D) pair tensor needed.
        w_row, w_column = self.edge_attention.weight.view(2, -1)  # (D,) each
        pair_scores = (fields @ w_row).unsqueeze(2) + (fields @ w_column).unsqueeze(1)  # (B, F, F)
        scores = F.leaky_relu(pair_scores)  # (B, F, F)
        return scores.masked_fill(self.self_loop, float("-inf")).softmax(dim=-1)

    def forward(self, fields: Tensor) -> Tensor:
        b, f, d = fields.shape  # (B, F, D)
        adjacency = self.edge_weights(fields)  # (B, F, F)
        h = fields
        for _ in range(self.num_steps):
            sent = torch.einsum("bfd,fde->bfe", h, self.w_out)  # (B, F, D)
            gathered = torch.bmm(adjacency, sent)  # (B, F, D)
            message = torch.einsum("bfd,fde->bfe", gathered, self.w_in) + self.bias  # (B, F, D)
            h = self.gru(message.reshape(b * f, d), h.reshape(b * f, d)).view(b, f, d)
            if self.use_residual:
                h = h + fields
        return h  # (B, F, D)


class AUGRU(nn.Module):
    """DIEN interest evolution: a GRU whose update gate is scaled by an attention score.

    u'_t = a_t * u_t and h_t = (1 - u'_t) * h_{t-1} + u'_t * h~_t, so behaviours unrelated to
    the target barely move the state. Positions where `mask` is false leave the state unchanged:
    the result is the state after the last valid behaviour, zeros when there is none.
    """

    def __init__(self, input_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        # [reset, update, candidate] projections, as in nn.GRUCell
        self.input_proj = nn.Linear(input_dim, 3 * hidden_dim)
        self.hidden_proj = nn.Linear(hidden_dim, 3 * hidden_dim)

    def forward(self, inputs: Tensor, attention: Tensor, mask: Tensor) -> Tensor:
        b, length, _ = inputs.shape  # (B, L, E)
        assert attention.shape == (b, length) and mask.shape == (b, length)
        projected = self.input_proj(inputs)  # (B, L, 3H)
        h = inputs.new_zeros(b, self.hidden_dim)  # (B, H)
        for t in range(length):
            x_r, x_u, x_n = projected[:, t].chunk(3, dim=1)  # (B, H) each
            h_r, h_u, h_n = self.hidden_proj(h).chunk(3, dim=1)  # (B, H) each
            reset = torch.sigmoid(x_r + h_r)
            update = attention[:, t : t + 1] * torch.sigmoid(x_u + h_u)  # (B, H)
            candidate = torch.tanh(x_n + reset * h_n)
            evolved = (1 - update) * h + update * candidate  # (B, H)
            h = torch.where(mask[:, t : t + 1], evolved, h)
        return h
