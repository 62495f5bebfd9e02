"""KARModel end to end on tiny random batches in the CONTRACT batch format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from kar.models import KARModel, KnowledgeTables, build_model
from kar.nn.embedding import FeatureEmbedding
from kar.registry import BACKBONES, ConfigError, init_kwargs, validate_group

CONF = Path(__file__).resolve().parents[1] / "conf"
SPEC = {"user": 13, "item": 31, "genre": 7, "gender": 3, "age": 8, "occupation": 22, "rating": 6}
D, M, B, L, G = 8, 12, 7, 5, 3


def _has(n: int, last_with_knowledge: int) -> torch.Tensor:
    """Rows 1..last_with_knowledge have knowledge; row 0 and the rest do not."""
    index = torch.arange(n)
    return (index >= 1) & (index <= last_with_knowledge)


def random_batch(spec: dict[str, int] = SPEC, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def ids(high: int, *shape: int) -> torch.Tensor:
        return torch.randint(1, high, shape, generator=g)

    def right_padded(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        width = values.shape[1]
        keep = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)  # (N, width)
        return values * keep.view(*keep.shape, *([1] * (values.ndim - 2)))

    hist_len = torch.arange(B) % (L + 1)  # 0..L, includes empty and full histories
    genre_counts = ids(G + 1, B)
    batch = {
        "label": torch.randint(0, 2, (B,), generator=g).float(),
        "user": torch.arange(B) * 2 % (spec["user"] - 1) + 1,  # users with and without knowledge
        "item": ids(spec["item"], B),
        "item_genres": right_padded(ids(spec["genre"], B, G), genre_counts),
        "hist_items": right_padded(ids(spec["item"], B, L), hist_len),
        "hist_genres": right_padded(ids(spec["genre"], B, L, G), hist_len),
        "hist_ratings": right_padded(ids(spec["rating"], B, L), hist_len),
        "hist_len": hist_len,
    }
    for name in ("gender", "age", "occupation"):
        if name in spec:
            batch[name] = ids(spec[name], B)
    return batch


def knowledge_tables(seed: int = 0) -> KnowledgeTables:
    g = torch.Generator().manual_seed(seed)
    return KnowledgeTables(
        user_vectors=torch.randn(SPEC["user"], M, generator=g),
        item_vectors=torch.randn(SPEC["item"], M, generator=g),
        user_has=_has(SPEC["user"], 6),
        item_has=_has(SPEC["item"], 15),
    )


def _model(backbone: str, adaptor: str = "hea", **adaptor_kwargs: object) -> KARModel:
    torch.manual_seed(0)
    return build_model(
        backbone=backbone,
        backbone_kwargs={},
        embed_dim=D,
        feature_spec=SPEC,
        adaptor=adaptor,
        adaptor_kwargs=adaptor_kwargs,
        knowledge=knowledge_tables(),
    )


@pytest.mark.parametrize("adaptor", ["none", "hea"])
@pytest.mark.parametrize("backbone", BACKBONES.names())
def test_forward_backward_reaches_embeddings_and_adaptor(backbone: str, adaptor: str) -> None:
    model = _model(backbone, adaptor)
    batch = random_batch()
    logits = model(batch)
    assert logits.shape == (B,) and logits.dtype == torch.float32
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["label"])
    assert torch.isfinite(loss)
    loss.backward()
    for table in (model.embedding.item, model.embedding.genre, model.embedding.rating):
        assert table.weight.grad is not None and table.weight.grad.abs().sum() > 0
        assert table.weight.grad[0].eq(0).all()  # padding row stays zero
    if adaptor == "none":
        assert model.adaptor is None
        return
    for name, param in model.adaptor.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # The batch holds users and items without knowledge: their learned defaults train.
    assert model.user_default.grad.abs().sum() > 0
    assert model.item_default.grad.abs().sum() > 0


@pytest.mark.parametrize("backbone", BACKBONES.names())
def test_default_vector_replaces_rows_without_knowledge(backbone: str) -> None:
    model = _model(backbone).eval()
    batch = random_batch()
    before = model(batch)
    without = ~model.user_has[batch["user"]]
    assert without.any() and (~without).any()
    model.user_vectors[batch["user"][without]] += 5.0  # rows the mask says to ignore
    torch.testing.assert_close(model(batch), before)
    model.user_vectors[batch["user"][~without]] += 5.0  # rows that carry knowledge
    changed = (model(batch) - before).abs() > 1e-6
    assert changed[~without].all() and not changed[without].any()


@pytest.mark.parametrize("backbone", BACKBONES.names())
def test_eval_is_deterministic_with_dropout_zero(backbone: str) -> None:
    model = _model(backbone).eval()
    batch = random_batch()
    torch.testing.assert_close(model(batch), model(batch))


def test_knowledge_injection_styles() -> None:
    field = _model("autoint")
    assert field.backbone.num_fields == field.embedding.num_fields + 2
    assert field.backbone.dense_dim == 0
    dense = _model("dcnv2", out_dim=5)
    assert dense.backbone.num_fields == dense.embedding.num_fields
    assert dense.backbone.dense_dim == 2 * 5
    bare = _model("dcnv2", "none")
    assert bare.adaptor is None and bare.backbone.dense_dim == 0
    assert not hasattr(bare, "user_vectors")


def test_field_injection_needs_out_dim_equal_to_embed_dim() -> None:
    with pytest.raises(ConfigError, match=r"adaptor.out_dim=\$\{backbone.embed_dim\}"):
        _model("autoint", out_dim=D + 1)


def test_adaptor_without_knowledge_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="adaptor=none"):
        build_model(
            backbone="dcnv2",
            backbone_kwargs={},
            embed_dim=D,
            feature_spec=SPEC,
            adaptor="hea",
            adaptor_kwargs={},
            knowledge=None,
        )


def test_unknown_hyperparameters_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="cross_layer"):
        build_model(
            backbone="dcnv2",
            backbone_kwargs={"cross_layer": 2},
            embed_dim=D,
            feature_spec=SPEC,
            adaptor="none",
            adaptor_kwargs={},
            knowledge=None,
        )
    with pytest.raises(ConfigError, match="n_expert"):
        _model("dcnv2", n_expert=4)


def test_knowledge_tables_are_buffers_outside_checkpoints() -> None:
    model = _model("dcnv2")
    assert "user_vectors" in dict(model.named_buffers())
    assert not any("vectors" in k or "_has" in k for k in model.state_dict())
    assert {"user_default", "item_default"} <= set(model.state_dict())
    assert not any(p is model.user_vectors for p in model.parameters())


def test_bad_knowledge_tables_are_rejected() -> None:
    with pytest.raises(ValueError, match="user_has"):
        KnowledgeTables(
            torch.randn(4, 3),
            torch.randn(5, 3),
            torch.ones(3, dtype=torch.bool),
            torch.ones(5, dtype=torch.bool),
        )


def test_feature_embedding_fields_and_sequence_view() -> None:
    torch.manual_seed(0)
    embedding = FeatureEmbedding(SPEC, D)
    batch = random_batch()
    fields, sequence = embedding(batch)
    assert embedding.field_names == (
        "item",
        "item_genres",
        "gender",
        "age",
        "occupation",
        "hist_items",
        "hist_genres",
        "hist_ratings",
    )
    assert fields.shape == (B, 8, D)
    assert sequence.target.shape == (B, 2 * D) and sequence.behaviours.shape == (B, L, 2 * D)
    torch.testing.assert_close(sequence.mask.sum(1), batch["hist_len"])
    weight = embedding.item.weight
    assert weight[0].eq(0).all() and 5e-5 < weight[1:].std() < 2e-4
    # item and hist_items share one table; history is averaged over the valid positions.
    row = int(torch.nonzero(batch["hist_len"] == 2)[0])
    items = batch["hist_items"][row, :2]
    torch.testing.assert_close(fields[row, 5], weight[items].mean(0))
    torch.testing.assert_close(fields[:, 0], weight[batch["item"]])
    # Genre lists are averaged over their non-padding ids; an empty list gives zeros.
    genres = embedding.genre.weight
    for r, ids in enumerate(batch["item_genres"]):
        ids = ids[ids != 0]
        want = genres[ids].mean(0) if len(ids) else torch.zeros(D)
        torch.testing.assert_close(fields[r, 1], want)
    # Values beyond hist_len are ignored even if they are not padding.
    shifted = dict(batch, hist_items=batch["hist_items"].clone())
    shifted["hist_items"][row, 2:] = 1
    torch.testing.assert_close(embedding(shifted)[0], fields)


def test_feature_embedding_without_profile() -> None:
    spec = {k: v for k, v in SPEC.items() if k not in ("gender", "age", "occupation")}
    embedding = FeatureEmbedding(spec, D)
    fields, _ = embedding(random_batch(spec))
    assert fields.shape == (B, 5, D)
    with pytest.raises(ValueError, match="genre"):
        FeatureEmbedding({"item": 3, "rating": 6}, D)


@pytest.mark.parametrize("backbone", BACKBONES.names())
def test_builds_from_the_yaml_configs(backbone: str) -> None:
    backbone_node = validate_group(
        "backbone",
        OmegaConf.load(CONF / "backbone" / f"{backbone}.yaml"),
        BACKBONES.get(backbone),
        {"name": (str, ""), "embed_dim": (int, 32)},
    )
    root = OmegaConf.create(
        {"backbone": backbone_node, "adaptor": OmegaConf.load(CONF / "adaptor" / "small.yaml")}
    )
    model = build_model(
        backbone=backbone,
        backbone_kwargs=init_kwargs(root.backbone, BACKBONES.get(backbone)),
        embed_dim=root.backbone.embed_dim,
        feature_spec=SPEC,
        adaptor=root.adaptor.name,
        adaptor_kwargs={
            k: v
            for k, v in OmegaConf.to_container(root.adaptor, resolve=True).items()
            if k != "name"
        },
        knowledge=knowledge_tables(),
    )
    assert model(random_batch()).shape == (B,)


def test_adaptor_runs_per_distinct_row_with_the_per_sample_result_and_gradients() -> None:
    model = _model("dcnv2").train()
    index = torch.tensor([3, 1, 3, 3, 9, 1, 12, 9])  # repeats, rows with and without knowledge
    per_row = model.augmented("user", index)  # (8, out)
    vectors = torch.where(
        model.user_has[index].unsqueeze(1), model.user_vectors[index], model.user_default
    )
    per_sample = model.adaptor.transform("user", vectors)  # every sample on its own
    torch.testing.assert_close(per_row, per_sample)
    weights = torch.randn_like(per_row)
    params = [model.user_default, *model.adaptor.parameters()]
    grads = torch.autograd.grad((weights * per_row).sum(), params, allow_unused=True)
    expected = torch.autograd.grad((weights * per_sample).sum(), params, allow_unused=True)
    for got, want in zip(grads, expected, strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want)


def test_training_with_knowledge_is_bitwise_reproducible_on_two_threads() -> None:
    """The adaptor's gather of per-row outputs must not accumulate gradients in thread order."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        outputs = []
        for _ in range(2):
            model = _model("dcnv2")
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
            parts = [random_batch(seed=s) for s in range(1200)]  # 8,400 samples
            batch = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
            batch["user"] = torch.arange(len(batch["label"])) % 4 + 1  # many samples per user
            for _ in range(5):
                loss = nn.functional.binary_cross_entropy_with_logits(model(batch), batch["label"])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            outputs.append(model(batch).detach())
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(outputs[0], outputs[1])
