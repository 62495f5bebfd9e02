"""Backbones and the shared layers: shapes, maths against direct formulas, configs vs classes."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import kar.models  # noqa: F401  (imports every backbone so that it registers)
from kar.backbones.base import Backbone, SequenceInput
from kar.nn.layers import MLP, CrossNetV2, FMInteraction, TargetAttention
from kar.registry import BACKBONES, ConfigError, hyperparameters, schema_for

CONF = Path(__file__).resolve().parents[1] / "conf"
B, F, D, L = 6, 5, 8, 4


def _inputs(
    backbone: Backbone, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None, SequenceInput]:
    g = torch.Generator().manual_seed(seed)
    fields = torch.randn(B, backbone.num_fields, D, generator=g, requires_grad=True)
    dense = (
        torch.randn(B, backbone.dense_dim, generator=g, requires_grad=True)
        if backbone.dense_dim
        else None
    )
    lengths = torch.tensor([0, 1, 2, 3, 4, 4])
    sequence = SequenceInput(
        target=torch.randn(B, 2 * D, generator=g),
        behaviours=torch.randn(B, L, 2 * D, generator=g),
        mask=torch.arange(L).unsqueeze(0) < lengths.unsqueeze(1),
    )
    return fields, dense, sequence


def _build(name: str, with_knowledge: bool, **hyper: object) -> Backbone:
    cls = BACKBONES.get(name)
    knowledge_fields = 2 if with_knowledge and cls.injection == "field" else 0
    dense_dim = 2 * D if with_knowledge and cls.injection == "dense" else 0
    return cls(F + knowledge_fields, D, dense_dim, **hyper)


@pytest.mark.parametrize("with_knowledge", [False, True], ids=["bare", "knowledge"])
@pytest.mark.parametrize("name", BACKBONES.names())
def test_forward_backward(name: str, with_knowledge: bool) -> None:
    torch.manual_seed(0)
    backbone = _build(name, with_knowledge)
    fields, dense, sequence = _inputs(backbone)
    logits = backbone(fields, dense, sequence)
    assert logits.shape == (B,)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.ones(B))
    loss.backward()
    assert torch.isfinite(loss)
    assert fields.grad is not None and fields.grad.abs().sum() > 0
    if dense is not None:
        assert dense.grad is not None and dense.grad.abs().sum() > 0
    assert all(p.grad is not None for p in backbone.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", BACKBONES.names())
def test_eval_is_deterministic_and_shapes_are_checked(name: str) -> None:
    backbone = _build(name, with_knowledge=True).eval()
    fields, dense, sequence = _inputs(backbone)
    torch.testing.assert_close(backbone(fields, dense, sequence), backbone(fields, dense, sequence))
    with pytest.raises(AssertionError):
        backbone(fields[:, :-1], dense, sequence)  # one field short


@pytest.mark.parametrize("structure", ["parallel", "stacked"])
def test_dcnv2_structures_run_and_bad_structure_fails(structure: str) -> None:
    backbone = _build("dcnv2", with_knowledge=True, structure=structure)
    assert backbone(*_inputs(backbone)).shape == (B,)
    with pytest.raises(ConfigError, match="structure"):
        _build("dcnv2", with_knowledge=False, structure="sideways")


def test_autoint_dnn_is_optional_and_heads_must_divide() -> None:
    plus = _build("autoint", with_knowledge=False, mlp_hidden=(16,))
    assert plus.dnn is not None and plus(*_inputs(plus)).shape == (B,)
    with pytest.raises(ConfigError, match="divisible"):
        _build("autoint", with_knowledge=False, attention_dim=9, num_heads=2)


def test_field_backbone_rejects_dense_input() -> None:
    with pytest.raises(ValueError, match="dense_dim must be 0"):
        BACKBONES.get("autoint")(F, D, 4)


def test_din_ignores_padded_behaviours() -> None:
    backbone = _build("din", with_knowledge=False).eval()
    fields, dense, sequence = _inputs(backbone)
    changed = sequence.behaviours.clone()
    changed[~sequence.mask] = 123.0
    moved = SequenceInput(sequence.target, changed, sequence.mask)
    torch.testing.assert_close(backbone(fields, dense, sequence), backbone(fields, dense, moved))


# --- shared layers -----------------------------------------------------------------------------


def test_fm_matches_sum_over_field_pairs() -> None:
    x = torch.randn(3, 4, 5)
    expected = sum((x[:, i] * x[:, j]).sum(1) for i in range(4) for j in range(i + 1, 4))
    torch.testing.assert_close(FMInteraction()(x), expected)


def test_cross_net_v2_follows_its_recurrence() -> None:
    net = CrossNetV2(6, 2)
    x0 = torch.randn(3, 6)
    x1 = x0 * net.layers[0](x0) + x0
    torch.testing.assert_close(net(x0), x0 * net.layers[1](x1) + x1)


@pytest.mark.parametrize("use_softmax", [False, True])
def test_target_attention_weights_only_valid_positions(use_softmax: bool) -> None:
    attention = TargetAttention(4, (8,), activation="relu", use_softmax=use_softmax)
    query, keys = torch.randn(2, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[True, False, False], [False, False, False]])
    out = attention(query, keys, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], torch.zeros(4))  # no behaviour -> no interest
    moved = keys.clone()
    moved[~mask] = 50.0  # padded positions must not matter
    torch.testing.assert_close(attention(query, moved, mask), out)
    if use_softmax:  # one valid key carries all the weight
        torch.testing.assert_close(out[0], keys[0, 0])


def test_mlp_output_layer_and_dropout_only_when_asked() -> None:
    mlp = MLP(4, (8, 3), output_dim=1, dropout=0.0, batch_norm=True)
    assert mlp.output_dim == 1
    assert not any(isinstance(m, torch.nn.Dropout) for m in mlp)
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in mlp) == 2
    with pytest.raises(ValueError, match="unknown activation"):
        MLP(4, (8,), activation="swishy")


# --- configs -------------------------------------------------------------------------------------


def test_backbone_registry_matches_yaml_stems() -> None:
    stems = sorted(p.stem for p in (CONF / "backbone").glob("*.yaml"))
    assert stems == BACKBONES.names()


@pytest.mark.parametrize("path", sorted((CONF / "backbone").glob("*.yaml")), ids=lambda p: p.stem)
def test_backbone_yaml_lists_exactly_the_hyperparameters_at_their_defaults(path: Path) -> None:
    node = OmegaConf.load(path)
    assert node.name == path.stem
    cls = BACKBONES.get(node.name)
    schema = OmegaConf.structured(schema_for(cls, {"name": (str, ""), "embed_dim": (int, 32)}))
    merged = OmegaConf.merge(schema, node)  # raises on an unknown key or a wrong type
    params = hyperparameters(cls)
    assert set(node) == {"name", "embed_dim", *params}
    for key, param in params.items():
        default = list(param.default) if isinstance(param.default, tuple) else param.default
        assert OmegaConf.to_container(merged)[key] == default, key
    assert inspect.signature(cls.__init__).parameters["dense_dim"].default is inspect._empty
