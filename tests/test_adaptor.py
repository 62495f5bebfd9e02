"""Hybrid-expert adaptor: shapes, gates, shared weights, configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kar.nn.adaptor import ExpertBank, HybridExpertAdaptor, NoAdaptor
from kar.registry import ADAPTORS, ConfigError, hyperparameters, schema_for

CONF = Path(__file__).resolve().parents[1] / "conf"
M, OUT, B = 12, 8, 5


def _vectors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, M, generator=g), torch.randn(B, M, generator=g)


@pytest.mark.parametrize(("n_shared", "n_dedicated"), [(2, 3), (1, 2), (0, 2), (3, 0)])
def test_output_shape_and_gates_are_distributions(n_shared: int, n_dedicated: int) -> None:
    adaptor = HybridExpertAdaptor(M, M, OUT, n_shared=n_shared, n_dedicated=n_dedicated)
    user, item = _vectors()
    assert adaptor(user, item).shape == (B, 2, OUT)
    gates = adaptor.gates(user, item)
    assert set(gates) == {"user", "item"}
    for weights in gates.values():
        assert weights.shape == (B, n_shared + n_dedicated)
        assert (weights >= 0).all()
        torch.testing.assert_close(weights.sum(dim=1), torch.ones(B))


def test_output_is_the_gate_weighted_sum_of_experts() -> None:
    adaptor = HybridExpertAdaptor(M, M, OUT, n_shared=2, n_dedicated=3)
    user, item = _vectors()
    out = adaptor(user, item)
    for index, (kind, x) in enumerate((("user", user), ("item", item))):
        # Each expert rebuilt as a standalone Linear/ReLU stack from the bank's weights.
        experts = [adaptor.shared.expert(e) for e in range(2)]
        experts += [adaptor.dedicated[kind].expert(e) for e in range(3)]
        weights = adaptor.gates(user, item)[kind]  # (B, 5)
        expected = sum(weights[:, e : e + 1] * expert(x) for e, expert in enumerate(experts))
        torch.testing.assert_close(out[:, index], expected)


def test_shared_experts_are_trained_by_both_types_dedicated_by_one() -> None:
    adaptor = HybridExpertAdaptor(M, M, OUT, n_shared=1, n_dedicated=1)
    user, item = _vectors()
    adaptor(user, item)[:, 0].sum().backward()  # loss from the user output only
    grad = {n: p.grad for n, p in adaptor.named_parameters()}
    assert grad["shared.weights.0"].abs().sum() > 0
    assert grad["dedicated.user.weights.0"].abs().sum() > 0
    assert grad["dedicated.item.weights.0"] is None or grad["dedicated.item.weights.0"].eq(0).all()
    adaptor.zero_grad()
    adaptor(user, item)[:, 1].sum().backward()  # item output uses the same shared expert
    assert adaptor.shared.weights[0].grad.abs().sum() > 0


def test_expert_ends_with_activation_and_dropout() -> None:
    adaptor = HybridExpertAdaptor(M, M, OUT, n_shared=1, n_dedicated=1, dropout=0.5)
    assert [w.shape[-1] for w in adaptor.shared.weights] == [128, OUT]
    bank = ExpertBank(1, M, [OUT], dropout=0.5).train()  # one layer: its dropout is the last
    x = torch.randn(400, M)
    out = bank(x)  # (400, 1, OUT)
    assert (out >= 0).all()  # ReLU after the last layer too
    # Dropout after the last layer: some outputs zeroed, survivors scaled by 1 / (1 - p).
    bank.eval()
    clean = bank(x)
    kept = out != 0
    assert (~kept & (clean > 0)).any()
    torch.testing.assert_close(out[kept], 2 * clean[kept])


def test_expert_bank_equals_separate_mlps_also_in_gradients() -> None:
    bank = ExpertBank(4, M, [16, 8, OUT])
    x = torch.randn(B, M, requires_grad=True)
    out = bank(x)  # (B, 4, OUT)
    assert out.shape == (B, 4, OUT)
    separate = torch.stack([bank.expert(e)(x) for e in range(4)], dim=1)
    torch.testing.assert_close(out, separate)
    (grad_bank,) = torch.autograd.grad(out.square().sum(), x)
    (grad_separate,) = torch.autograd.grad(separate.square().sum(), x)
    torch.testing.assert_close(grad_bank, grad_separate)


def test_eval_is_deterministic_and_dropout_acts_in_training() -> None:
    user, item = _vectors()
    plain = HybridExpertAdaptor(M, M, OUT).eval()
    torch.testing.assert_close(plain(user, item), plain(user, item))
    noisy = HybridExpertAdaptor(M, M, OUT, dropout=0.5).train()
    assert not torch.equal(noisy(user, item), noisy(user, item))
    noisy.eval()
    torch.testing.assert_close(noisy(user, item), noisy(user, item))


def test_different_dims_need_no_shared_experts() -> None:
    with pytest.raises(ConfigError, match="n_shared=0"):
        HybridExpertAdaptor(M, M + 1, OUT)
    adaptor = HybridExpertAdaptor(M, M + 1, OUT, n_shared=0, n_dedicated=2)
    assert adaptor(torch.randn(B, M), torch.randn(B, M + 1)).shape == (B, 2, OUT)
    with pytest.raises(ConfigError, match="at least one expert"):
        HybridExpertAdaptor(M, M, OUT, n_shared=0, n_dedicated=0)


def test_none_is_a_marker_that_cannot_be_built() -> None:
    assert ADAPTORS.get("none") is NoAdaptor
    with pytest.raises(TypeError, match="build_model"):
        NoAdaptor()


@pytest.mark.parametrize("path", sorted((CONF / "adaptor").glob("*.yaml")), ids=lambda p: p.stem)
def test_adaptor_yaml_validates_against_its_class(path: Path) -> None:
    node = OmegaConf.load(path)
    cls = ADAPTORS.get(node.name)
    extra = {"name": (str, ""), "out_dim": (int, 0)} if cls is HybridExpertAdaptor else {}
    schema = OmegaConf.structured(schema_for(cls, extra or {"name": (str, "")}))
    OmegaConf.merge(schema, node)  # raises on an unknown key or a wrong type
    assert set(node) == {"name", *extra, *hyperparameters(cls)}
    if cls is HybridExpertAdaptor:
        # out_dim follows the backbone's embedding size through interpolation.
        root = OmegaConf.create({"backbone": {"embed_dim": 24}, "adaptor": node})
        assert root.adaptor.out_dim == 24
        resolved = OmegaConf.to_container(root.adaptor, resolve=True)
        kwargs = {k: resolved[k] for k in hyperparameters(cls)}
        assert HybridExpertAdaptor(M, M, root.adaptor.out_dim, **kwargs)(*_vectors()).shape == (
            B,
            2,
            24,
        )


def test_adaptor_yamls_cover_every_registered_adaptor() -> None:
    used = {OmegaConf.load(p).name for p in (CONF / "adaptor").glob("*.yaml")}
    assert used == set(ADAPTORS.names())
    base = OmegaConf.load(CONF / "adaptor" / "base.yaml")
    for key, param in hyperparameters(HybridExpertAdaptor).items():
        default = list(param.default) if isinstance(param.default, tuple) else param.default
        assert OmegaConf.to_container(base)[key] == default, key
