"""The ESMM network and its baselines: shapes, pooling, sharing, sparse gradients."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from contract.fields import FieldsConfig, FieldSpec
from esmm.model import (
    EmbeddingCollection,
    ESMMModel,
    FieldEmbedding,
    ModelConfig,
    Tower,
    build_model,
    division_pcvr,
)

VARIANTS = ["esmm", "esmm_ns", "base", "aman", "oversampling", "unbias", "division"]

FIELDS = FieldsConfig(
    fields=[
        FieldSpec(name="user_id", kind="single", source="users.user_id", num_buckets=50),
        FieldSpec(name="item_id", kind="single", source="items.item_id", num_buckets=40),
        FieldSpec(name="recent", kind="multi", source="users.recent", num_buckets=30, max_len=4),
    ]
)


def make_batch(size: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    recent = torch.randint(1, 30, (size, 4), generator=gen)
    recent[:, 2:] = 0  # padding
    return {
        "user_id": torch.randint(0, 50, (size,), generator=gen),
        "item_id": torch.randint(0, 40, (size,), generator=gen),
        "recent": recent,
        "click": torch.ones(size),
        "conversion": torch.zeros(size),
    }


def small_model(variant: str, sparse: bool = True) -> ESMMModel:
    torch.manual_seed(0)
    cfg = ModelConfig(
        variant=variant, embedding_dim=4, hidden_dims=[8, 4], sparse_embeddings=sparse
    )
    return build_model(FIELDS, cfg)


def grads_are_zero(module: torch.nn.Module) -> bool:
    return all(p.grad is None or not p.grad.to_dense().any() for p in module.parameters())


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_returns_probabilities_of_shape_batch(variant: str) -> None:
    outputs = small_model(variant)(make_batch(size=6))
    second_logit = "ctcvr_logit" if variant == "division" else "cvr_logit"
    for key in ("pctr", "pcvr", "pctcvr", "ctr_logit", second_logit):
        assert outputs[key].shape == (6,), key
    for key in ("pctr", "pcvr", "pctcvr"):
        assert ((outputs[key] >= 0) & (outputs[key] <= 1)).all(), key


@pytest.mark.parametrize("variant", ["esmm", "esmm_ns", "base", "unbias"])
def test_pctcvr_is_pctr_times_pcvr(variant: str) -> None:
    outputs = small_model(variant)(make_batch())
    torch.testing.assert_close(outputs["pctcvr"], outputs["pctr"] * outputs["pcvr"])


def test_division_pcvr_is_ratio_clamped_to_unit_interval() -> None:
    ctr_logit = torch.tensor([0.0, 0.0, -200.0, 3.0, -200.0])
    ctcvr_logit = torch.tensor([-1.0, 2.0, -150.0, -3.0, -250.0])
    pcvr = division_pcvr(ctr_logit, ctcvr_logit)
    assert torch.isfinite(pcvr).all()
    # a pCTCVR above pCTR clamps to 1, including where pCTR underflows to 0 in float32
    assert pcvr[1] == 1.0 and pcvr[2] == 1.0
    torch.testing.assert_close(pcvr[0], torch.sigmoid(torch.tensor(-1.0)) / 0.5)
    torch.testing.assert_close(
        pcvr[3], torch.sigmoid(torch.tensor(-3.0)) / torch.sigmoid(torch.tensor(3.0))
    )
    assert 0.0 <= pcvr[4] < 1e-20


def test_division_model_pcvr_in_unit_interval_when_ctcvr_tower_overshoots() -> None:
    model = small_model("division")
    with torch.no_grad():
        model.second_tower.logit.bias.fill_(20.0)  # pCTCVR ≈ 1 > pCTR
    outputs = model(make_batch())
    assert (outputs["pcvr"] <= 1.0).all() and (outputs["pcvr"] >= 0.0).all()
    assert (outputs["pcvr"] == 1.0).all()


def test_multi_valued_field_is_sum_of_non_padding_embeddings() -> None:
    spec = FIELDS.by_name("recent")
    embedding = FieldEmbedding(spec, embedding_dim=3)
    weight = embedding.table.weight.detach()
    ids = torch.tensor([[1, 2, 5, 0], [7, 0, 0, 0], [0, 0, 0, 0]])
    pooled = embedding(ids)
    torch.testing.assert_close(pooled[0], weight[1] + weight[2] + weight[5])
    torch.testing.assert_close(pooled[1], weight[7])
    torch.testing.assert_close(pooled[2], torch.zeros(3))


def test_padding_id_of_multi_valued_field_gets_no_gradient() -> None:
    embedding = FieldEmbedding(FIELDS.by_name("recent"), embedding_dim=3)
    embedding(torch.tensor([[1, 0, 0, 0], [2, 3, 0, 0]])).sum().backward()
    grad = embedding.table.weight.grad
    assert not grad[0].any()
    assert grad[1].any() and grad[2].any() and grad[3].any()


def test_single_valued_missing_id_has_its_own_learned_embedding() -> None:
    embedding = FieldEmbedding(FIELDS.by_name("user_id"), embedding_dim=3)
    assert embedding(torch.tensor([0])).abs().sum() > 0


@pytest.mark.parametrize("std", [0.0, 0.001, 0.5])
def test_every_table_starts_from_the_configured_init_std(std: float) -> None:
    model = build_model(FIELDS, ModelConfig(variant="base", embedding_init_std=std))
    for collection in (model.ctr_embedding, model.second_embedding):
        for name, embedding in collection.embeddings.items():
            rows = embedding.table.weight.detach()
            if embedding.multi:
                assert not rows[0].any(), name  # the padding row stays zero
                rows = rows[1:]
            assert rows.std().item() == pytest.approx(std, rel=0.2, abs=1e-12), name


def test_default_init_std_is_the_small_one() -> None:
    assert ModelConfig().embedding_init_std == 0.01
    with pytest.raises(ValidationError):
        ModelConfig(embedding_init_std=-0.1)


def test_embedding_collection_concatenates_fields_in_list_order() -> None:
    collection = EmbeddingCollection(FIELDS, embedding_dim=2)
    batch = make_batch(size=3)
    out = collection(batch)
    assert out.shape == (3, 3 * 2)
    expected_user = collection.embeddings["user_id"].table.weight[batch["user_id"]]
    torch.testing.assert_close(out[:, :2], expected_user)


def test_sparse_embeddings_produce_sparse_gradients() -> None:
    model = small_model("esmm", sparse=True)
    model(make_batch())["pctcvr"].sum().backward()
    grads = [p.grad for p in model.sparse_parameters()]
    assert len(grads) == len(FIELDS.fields)
    assert all(g is not None and g.is_sparse for g in grads)
    assert not any(p.grad.is_sparse for p in model.dense_parameters())


def test_dense_embeddings_have_no_sparse_parameters() -> None:
    model = small_model("esmm", sparse=False)
    model(make_batch())["pctcvr"].sum().backward()
    assert model.sparse_parameters() == []
    assert not any(p.grad.is_sparse for p in model.parameters())


@pytest.mark.parametrize("variant", VARIANTS)
def test_sparse_and_dense_parameters_split_every_parameter_once(variant: str) -> None:
    model = small_model(variant)
    sparse = {id(p) for p in model.sparse_parameters()}
    dense = {id(p) for p in model.dense_parameters()}
    assert not sparse & dense
    assert sparse | dense == {id(p) for p in model.parameters()}
    tables = 1 if variant == "esmm" else 2
    assert len(sparse) == tables * len(FIELDS.fields)


def test_sparse_adam_and_adam_train_the_split_parameters() -> None:
    model = small_model("esmm")
    sparse_opt = torch.optim.SparseAdam(model.sparse_parameters(), lr=0.05)
    dense_opt = torch.optim.Adam(model.dense_parameters(), lr=0.05)
    batch = make_batch(size=16)
    target = torch.ones(16)
    losses = []
    for _ in range(5):
        sparse_opt.zero_grad()
        dense_opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy(model(batch)["pctr"], target)
        loss.backward()
        sparse_opt.step()
        dense_opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_esmm_cvr_output_trains_the_embeddings_the_ctr_tower_reads() -> None:
    model = small_model("esmm")
    model(make_batch())["cvr_logit"].sum().backward()
    assert model.second_embedding is None
    assert not grads_are_zero(model.ctr_embedding)
    assert grads_are_zero(model.ctr_tower)


@pytest.mark.parametrize("variant", ["esmm_ns", "base", "aman", "oversampling", "unbias"])
def test_cvr_output_of_unshared_variants_leaves_the_ctr_model_untouched(variant: str) -> None:
    model = small_model(variant)
    model(make_batch())["cvr_logit"].sum().backward()
    assert grads_are_zero(model.ctr_embedding) and grads_are_zero(model.ctr_tower)
    assert not grads_are_zero(model.second_embedding)


def test_default_model_config_is_the_papers_network() -> None:
    cfg = ModelConfig()
    assert (cfg.variant, cfg.embedding_dim, cfg.hidden_dims) == ("esmm", 18, [200, 80])
    tower = Tower(20 * cfg.embedding_dim, cfg.hidden_dims)  # the paper's 20 fields: 360×200×80
    linear_shapes = [
        (m.in_features, m.out_features) for m in tower.modules() if isinstance(m, torch.nn.Linear)
    ]
    assert linear_shapes == [(360, 200), (200, 80), (80, 1)]


def test_model_config_rejects_unknown_variant_and_keys() -> None:
    with pytest.raises(ValidationError):
        ModelConfig(variant="mmoe")
    with pytest.raises(ValidationError):
        ModelConfig(embeding_dim=8)
