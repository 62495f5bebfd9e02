"""DCNv1, xDeepFM, FiBiNet, FiGNN, DIEN: whole models on batches and their layers vs formulas.

The generic checks of tests/test_backbones.py and tests/test_models.py (shapes, determinism,
YAML keys) already run over every registered backbone; these add what is specific to them.
"""

from __future__ import annotations

import pytest
import torch

from kar.backbones.base import SequenceInput
from kar.models import KARModel, build_model
from kar.nn.layers import (
    AUGRU,
    CIN,
    BilinearInteraction,
    CrossNetV1,
    FieldGraph,
    SqueezeExcitation,
)
from kar.registry import BACKBONES, ConfigError
from test_models import SPEC, knowledge_tables, random_batch

NEW_BACKBONES = ["dcnv1", "xdeepfm", "fibinet", "fignn", "dien"]
D = 8


def _model(backbone: str, adaptor: str, **backbone_kwargs: object) -> KARModel:
    torch.manual_seed(0)
    return build_model(
        backbone=backbone,
        backbone_kwargs=backbone_kwargs,
        embed_dim=D,
        feature_spec=SPEC,
        adaptor=adaptor,
        adaptor_kwargs={},
        knowledge=knowledge_tables(),
    )


def test_the_new_backbones_are_registered_with_their_injection() -> None:
    injections = {name: BACKBONES.get(name).injection for name in NEW_BACKBONES}
    assert injections == {
        "dcnv1": "dense",
        "xdeepfm": "field",
        "fibinet": "field",
        "fignn": "field",
        "dien": "dense",
    }


@pytest.mark.parametrize("adaptor", ["none", "hea"])
@pytest.mark.parametrize("backbone", NEW_BACKBONES)
def test_every_parameter_gets_a_gradient(backbone: str, adaptor: str) -> None:
    model = _model(backbone, adaptor)
    batch = random_batch()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch["label"])
    assert torch.isfinite(loss)
    loss.backward()
    no_gradient = [
        name
        for name, param in model.named_parameters()
        if param.grad is None or not param.grad.abs().sum() > 0
    ]
    assert no_gradient == [], no_gradient


@pytest.mark.parametrize("backbone", NEW_BACKBONES)
def test_eval_is_deterministic_and_train_steps_lower_the_loss(backbone: str) -> None:
    model = _model(backbone, "hea")
    batch = random_batch()
    model.eval()
    torch.testing.assert_close(model(batch), model(batch))
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        optimiser.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch["label"])
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses  # it can fit 7 samples


@pytest.mark.parametrize("backbone", ["fibinet", "xdeepfm"])
def test_config_errors_for_bad_layer_options(backbone: str) -> None:
    bad = {"fibinet": {"bilinear_type": "field_some"}, "xdeepfm": {"cin_layers": (5, 4)}}
    with pytest.raises(ConfigError, match=next(iter(bad[backbone]))):
        _model(backbone, "none", **bad[backbone])


@pytest.mark.parametrize("bilinear_type", ["field_all", "field_each", "field_interaction"])
def test_fibinet_bilinear_types_run(bilinear_type: str) -> None:
    model = _model("fibinet", "hea", bilinear_type=bilinear_type)
    assert torch.isfinite(model(random_batch())).all()


# --- DIEN and the behaviour sequence -----------------------------------------------------------


def _sequence(lengths: list[int], length: int = 4, seed: int = 0) -> SequenceInput:
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    return SequenceInput(
        target=torch.randn(b, 2 * D, generator=g),
        behaviours=torch.randn(b, length, 2 * D, generator=g),
        mask=torch.arange(length).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1),
    )


def test_dien_ignores_padding_and_handles_empty_histories() -> None:
    torch.manual_seed(0)
    dien = BACKBONES.get("dien")(5, D, 0).eval()
    sequence = _sequence([0, 1, 3, 4, 0])
    fields = torch.randn(5, 5, D)
    out = dien(fields, None, sequence)
    assert torch.isfinite(out).all()
    changed = sequence.behaviours.clone()
    changed[~sequence.mask] = 77.0
    moved = SequenceInput(sequence.target, changed, sequence.mask)
    torch.testing.assert_close(dien(fields, None, moved), out)
    # With no history the target no longer matters through the sequence part.
    other_target = SequenceInput(torch.randn(5, 2 * D), sequence.behaviours, sequence.mask)
    torch.testing.assert_close(dien(fields, None, other_target)[[0, 4]], out[[0, 4]])
    assert not torch.allclose(dien(fields, None, other_target)[1:4], out[1:4])


def test_dien_all_empty_histories_train_without_nan() -> None:
    model = _model("dien", "hea")
    batch = random_batch()
    batch["hist_len"] = torch.zeros_like(batch["hist_len"])
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch["label"])
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_augru_follows_its_recurrence_and_stops_at_the_mask() -> None:
    torch.manual_seed(0)
    cell = AUGRU(3, 2)
    inputs, attention = torch.randn(2, 3, 3), torch.rand(2, 3)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    h = torch.zeros(2)
    for t in range(2):  # row 0 by hand
        x_r, x_u, x_n = cell.input_proj(inputs[0, t]).chunk(3)
        h_r, h_u, h_n = cell.hidden_proj(h).chunk(3)
        update = attention[0, t] * torch.sigmoid(x_u + h_u)
        candidate = torch.tanh(x_n + torch.sigmoid(x_r + h_r) * h_n)
        h = (1 - update) * h + update * candidate
    out = cell(inputs, attention, mask)
    torch.testing.assert_close(out[0], h)
    torch.testing.assert_close(out[1], torch.zeros(2))
    # Zero attention keeps the state where it was: the behaviour is ignored.
    quiet = attention.clone()
    quiet[0, 1] = 0.0
    first_only = cell(inputs, quiet, mask)[0]
    torch.testing.assert_close(first_only, cell(inputs, attention, mask & (torch.arange(3) < 1))[0])


# --- layers vs direct formulas -----------------------------------------------------------------


def test_cross_net_v1_follows_its_recurrence() -> None:
    net = CrossNetV1(5, 2)
    with torch.no_grad():
        net.biases.normal_()
    x0 = torch.randn(3, 5)
    w, b = net.weights, net.biases
    x1 = x0 * (x0 @ w[0]).unsqueeze(1) + b[0] + x0
    torch.testing.assert_close(net(x0), x0 * (x1 @ w[1]).unsqueeze(1) + b[1] + x1)
    assert sum(p.numel() for p in net.parameters()) == 2 * 2 * 5  # vectors, not matrices


def test_cin_hand_computed_case() -> None:
    cin = CIN(2, [1], split_half=False)
    with torch.no_grad():
        cin.layers[0].weight.fill_(1.0)
        cin.layers[0].bias.zero_()
    x0 = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # 2 fields, D = 2
    # sum_ij x_i x_j per dimension = (sum_i x_i)^2: (1+3)^2 + (2+4)^2 = 16 + 36, pooled over D.
    torch.testing.assert_close(cin(x0), torch.tensor([[52.0]]))


@pytest.mark.parametrize("split_half", [True, False])
def test_cin_matches_the_xdeepfm_formula(split_half: bool) -> None:
    torch.manual_seed(0)
    m, d = 3, 4
    cin = CIN(m, [4, 2], split_half=split_half)
    assert cin.output_dim == (2 + 2 if split_half else 4 + 2)
    x0 = torch.randn(5, m, d)
    outputs, x = [], x0
    for k, layer in enumerate(cin.layers):
        weight = layer.weight.view(layer.out_features, x.shape[1], m)  # W^k_{h,i,j}
        maps = torch.einsum("hij,bid,bjd->bhd", weight, x, x0) + layer.bias.view(1, -1, 1)
        if split_half and k == 0:
            x, out = maps[:, :2], maps[:, 2:]
        else:
            x, out = maps, maps
        outputs.append(out.sum(2))
    torch.testing.assert_close(cin(x0), torch.cat(outputs, 1))
    with pytest.raises(ValueError, match="even"):
        CIN(m, [3, 2], split_half=True)


def test_senet_weights_follow_the_formula_and_are_non_negative() -> None:
    torch.manual_seed(0)
    senet = SqueezeExcitation(6, reduction_ratio=3.0)
    first, second = senet.excitation[0].weight, senet.excitation[2].weight
    assert first.shape == (2, 6) and second.shape == (6, 2)
    fields = torch.randn(4, 6, 5)
    expected = torch.relu(torch.relu(fields.mean(2) @ first.T) @ second.T)  # (B, F)
    torch.testing.assert_close(senet.field_weights(fields), expected)
    assert (expected >= 0).all()
    torch.testing.assert_close(senet(fields), fields * expected.unsqueeze(2))


@pytest.mark.parametrize("bilinear_type", ["field_all", "field_each", "field_interaction"])
def test_bilinear_interaction_matches_pairwise_formula(bilinear_type: str) -> None:
    torch.manual_seed(0)
    f, d = 4, 3
    layer = BilinearInteraction(f, d, bilinear_type)
    fields = torch.randn(2, f, d)
    pairs = [(i, j) for i in range(f) for j in range(i + 1, f)]
    expected = []
    for p, (i, j) in enumerate(pairs):
        w = {"field_all": 0, "field_each": i, "field_interaction": p}[bilinear_type]
        expected.append((fields[:, i] @ layer.weight[w]) * fields[:, j])
    torch.testing.assert_close(layer(fields), torch.stack(expected, 1))
    assert (
        layer.weight.shape[0]
        == {"field_all": 1, "field_each": f, "field_interaction": 6}[bilinear_type]
    )


def test_field_graph_edges_and_one_step_by_hand() -> None:
    torch.manual_seed(0)
    f, d = 3, 4
    graph = FieldGraph(f, d, 1, use_residual=True)
    fields = torch.randn(2, f, d)
    adjacency = graph.edge_weights(fields)
    torch.testing.assert_close(adjacency.sum(-1), torch.ones(2, f))
    assert adjacency.diagonal(dim1=1, dim2=2).eq(0).all()
    w = graph.edge_attention.weight.view(2, d)
    i, j, k = 0, 1, 2
    score = torch.nn.functional.leaky_relu
    e = fields[0]
    edge = (score(w[0] @ e[i] + w[1] @ e[j]) - score(w[0] @ e[i] + w[1] @ e[k])).exp()
    torch.testing.assert_close(adjacency[0, i, j] / adjacency[0, i, k], edge)
    # One step for node 0 of sample 0.
    sent = [e[n] @ graph.w_out[n] for n in range(f)]
    message = sum(adjacency[0, 0, n] * sent[n] for n in range(f)) @ graph.w_in[0] + graph.bias
    expected = graph.gru(message.unsqueeze(0), e[0].unsqueeze(0))[0] + e[0]
    torch.testing.assert_close(graph(fields)[0, 0], expected)
