"""Controls of id memorisation: id admission, touched-row embedding L2, tower dropout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError

from contract.fields import FieldsConfig, FieldSpec
from esmm.admission import admission_summary, admission_tables, allreduce_counts, count_ids
from esmm.losses import compute_loss
from esmm.model import ModelConfig, build_model
from esmm.steps import OptimConfig, build_optimizers, train_step
from esmm.train import TrainConfig
from tests.feature_fixtures import small_fields, write_feature_day
from tests.helpers import sqlite_store

# Two fields: a single id and a bag of 3 ids (0-padded).
TOY = FieldsConfig(
    fields=[
        FieldSpec(name="user", kind="single", source="users.user", num_buckets=6),
        FieldSpec(name="tags", kind="multi", source="items.tags", num_buckets=5, max_len=3),
    ]
)


def toy_model(variant: str = "esmm", **cfg) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(TOY, ModelConfig(variant=variant, embedding_dim=3, hidden_dims=[8], **cfg))


def toy_batch(users: list[int], tags: list[list[int]]) -> dict[str, torch.Tensor]:
    return {
        "user": torch.tensor(users),
        "tags": torch.tensor(tags),
        "click": torch.tensor([1.0, 0.0, 1.0, 0.0][: len(users)]),
        "conversion": torch.tensor([1.0, 0.0, 0.0, 0.0][: len(users)]),
    }


def write_toy_day(root: Path) -> str:
    """Two row groups; user counts 1:3, 2:1, 4:2 (0 twice); tag counts 1:2, 2:3, 3:1."""
    day = root / "dt=2026-01-01"
    day.mkdir(parents=True)
    table = pa.table(
        {
            "impression_id": [str(i) for i in range(8)],
            "click": pa.array([0] * 8, pa.int32()),
            "conversion": pa.array([0] * 8, pa.int32()),
            "user": pa.array([1, 1, 0, 2, 4, 1, 4, 0], pa.int64()),
            "tags": pa.array(
                [
                    [1, 2, 0],
                    [2, 0, 0],
                    [0, 0, 0],
                    [1, 2, 3],
                    [0, 0, 0],
                    [0, 0, 0],
                    [0] * 3,
                    [0] * 3,
                ],
                pa.list_(pa.int64()),
            ),
        }
    )
    pq.write_table(table, day / "part-0.parquet", row_group_size=4)
    return day.as_uri()


# ---- id admission -------------------------------------------------------------------------


def test_count_ids_counts_single_and_multi_ids_without_padding(tmp_path: Path) -> None:
    url = write_toy_day(tmp_path)
    counts = count_ids([url], TOY)
    assert counts["user"].tolist() == [0, 3, 1, 0, 2, 0]
    assert counts["tags"].tolist() == [0, 2, 3, 1, 0]
    assert all(c.dtype == np.int64 for c in counts.values())
    # The two ranks' shares (one row group each) are different and sum to the whole.
    shares = [count_ids([url], TOY, rank=r, size=2) for r in (0, 1)]
    assert shares[0]["user"].tolist() != shares[1]["user"].tolist()
    for name in counts:
        np.testing.assert_array_equal(shares[0][name] + shares[1][name], counts[name])


def test_count_ids_matches_a_recount_of_a_feature_day(tmp_path: Path) -> None:
    fields = small_fields()
    write_feature_day(tmp_path, "2026-01-01", fields, rows=400, seed=3)
    write_feature_day(tmp_path, "2026-01-02", fields, rows=300, seed=4)
    urls = [(tmp_path / f"dt=2026-01-0{d}").as_uri() for d in (1, 2)]
    counts = count_ids(urls, fields, reader_workers=3)
    tables = [pq.read_table(tmp_path / f"dt=2026-01-0{d}") for d in (1, 2)]
    for spec in fields.fields:
        ids = np.concatenate([np.ravel(np.stack(t.column(spec.name).to_pylist())) for t in tables])
        expected = np.bincount(ids[ids != 0], minlength=spec.num_buckets)
        np.testing.assert_array_equal(counts[spec.name], expected, err_msg=spec.name)


def test_count_ids_rejects_an_id_outside_the_field(tmp_path: Path) -> None:
    url = write_toy_day(tmp_path)
    small = FieldsConfig(
        fields=[TOY.fields[0].model_copy(update={"num_buckets": 4}), TOY.fields[1]]
    )
    with pytest.raises(ValueError, match="user has id 4"):
        count_ids([url], small)


class FakeHorovod:
    """``size()``, ``Sum`` and an ``allreduce`` that acts as if every rank had this one's."""

    Sum = "sum"

    def __init__(self, size: int) -> None:
        self._size = size
        self.calls: list[tuple[str, str]] = []

    def size(self) -> int:
        return self._size

    def allreduce(self, tensor: torch.Tensor, op, name: str) -> torch.Tensor:
        if self._size == 1:
            raise AssertionError("no allreduce expected for one process")
        self.calls.append((op, name))
        return tensor * self._size


def test_allreduce_counts_sums_over_ranks_and_is_a_noop_for_one_process() -> None:
    counts = {"user": np.array([0, 3, 1], dtype=np.int64), "tags": np.array([0, 2])}
    same = allreduce_counts(counts, FakeHorovod(1))
    assert {k: v.tolist() for k, v in same.items()} == {"user": [0, 3, 1], "tags": [0, 2]}
    hvd = FakeHorovod(3)
    summed = allreduce_counts(counts, hvd)
    assert summed["user"].tolist() == [0, 9, 3] and summed["tags"].tolist() == [0, 6]
    assert summed["user"].dtype == np.int64
    assert hvd.calls == [("sum", "id_counts.user"), ("sum", "id_counts.tags")]


def test_admission_tables_send_exactly_the_rare_ids_to_oov() -> None:
    counts = {"user": np.array([0, 3, 1, 0, 2, 0]), "tags": np.array([7, 2, 3, 1, 0])}
    tables = admission_tables(counts, min_count=2)
    assert tables["user"].tolist() == [0, 1, 6, 6, 4, 6]  # OOV = num_buckets = 6
    assert tables["tags"].tolist() == [0, 1, 2, 5, 5]  # id 0 stays 0, whatever its count
    assert all(t.dtype == torch.int64 for t in tables.values())
    assert admission_summary(counts, 2) == {"user": (2, 3), "tags": (2, 3)}
    assert admission_tables(counts, min_count=3)["user"].tolist() == [0, 1, 6, 6, 6, 6]


def admitted_model(variant: str = "esmm") -> torch.nn.Module:
    """A toy model whose user ids 2, 3, 5 and tag ids 3, 4 are rare (min_id_count = 2)."""
    model = toy_model(variant, min_id_count=2)
    counts = {"user": np.array([0, 3, 1, 0, 2, 0]), "tags": np.array([0, 2, 3, 1, 0])}
    model.set_admission(admission_tables(counts, 2))
    return model


@pytest.mark.parametrize("variant", ["esmm", "base"])
def test_model_looks_rare_ids_up_as_the_oov_row(variant: str) -> None:
    model = admitted_model(variant).eval()
    for table in [model.ctr_embedding, model.second_embedding]:
        if table is not None:
            assert table.embeddings["user"].table.weight.shape == (7, 3)
            assert table.embeddings["tags"].table.weight.shape == (6, 3)
    tags = [[1, 0, 0]] * 4
    out = model(toy_batch([2, 3, 1, 4], tags))
    for key in ("pctr", "pcvr"):
        assert out[key][0] == out[key][1], key  # two rare users: both the OOV row
        assert out[key][2] != out[key][3], key  # two admitted users: their own rows
    bags = model(toy_batch([1, 1, 1], [[1, 3, 0], [1, 4, 0], [1, 2, 0]]))
    assert bags["pctr"][0] == bags["pctr"][1] != bags["pctr"][2]


def test_admission_tables_travel_in_the_state_dict_to_the_served_model(tmp_path: Path) -> None:
    from esmm.pyfunc import ESMMPyfunc, StaticContext

    model = admitted_model("esmm").eval()
    state = model.state_dict()
    assert state["admission.remap_user"].tolist() == [0, 1, 6, 6, 4, 6]
    assert state["admission.remap_tags"].tolist() == [0, 1, 2, 5, 5]
    cfg = ModelConfig(embedding_dim=3, hidden_dims=[8], min_id_count=2)
    rebuilt = build_model(TOY, cfg)
    rebuilt.load_state_dict(state)
    rebuilt.eval()
    batch = toy_batch([2, 3, 1, 4], [[1, 3, 0], [4, 0, 0], [1, 2, 0], [0, 0, 0]])
    with torch.no_grad():
        expected = model(batch)
        torch.testing.assert_close(rebuilt(batch), expected, rtol=0, atol=0)
    payload = {
        "fields": TOY.model_dump(mode="json"),
        "model_config": cfg.model_dump(mode="json"),
        "state_dict": state,
    }
    torch.save(payload, tmp_path / "checkpoint.pt")
    served = ESMMPyfunc()
    served.load_context(StaticContext({"checkpoint": str(tmp_path / "checkpoint.pt")}))
    frame = {"user": batch["user"].numpy(), "tags": list(batch["tags"].numpy())}
    predicted = served.predict(None, frame)
    for key in ("pctr", "pcvr", "pctcvr"):
        np.testing.assert_allclose(predicted[key], expected[key].double().numpy(), rtol=1e-6)


TODAY_KEYS = [
    "ctr_embedding.embeddings.user.table.weight",
    "ctr_embedding.embeddings.tags.table.weight",
    "ctr_tower.mlp.layers.0.weight",
    "ctr_tower.mlp.layers.0.bias",
    "ctr_tower.logit.weight",
    "ctr_tower.logit.bias",
    "second_tower.mlp.layers.0.weight",
    "second_tower.mlp.layers.0.bias",
    "second_tower.logit.weight",
    "second_tower.logit.bias",
]


@pytest.mark.parametrize("min_id_count", [0, 1])
def test_without_admission_the_model_is_todays(min_id_count: int) -> None:
    model = toy_model(min_id_count=min_id_count)
    assert list(model.state_dict()) == TODAY_KEYS
    assert list(model.buffers()) == []
    assert model.ctr_embedding.embeddings["user"].table.weight.shape == (6, 3)
    with pytest.raises(ValueError, match="without id admission"):
        model.set_admission(admission_tables({"user": np.ones(6), "tags": np.ones(5)}, 2))


def test_set_admission_rejects_tables_that_do_not_fit() -> None:
    model = toy_model(min_id_count=2)
    good = admission_tables({"user": np.ones(6), "tags": np.ones(5)}, 2)
    with pytest.raises(ValueError, match="expected"):
        model.set_admission({"user": good["user"]})
    with pytest.raises(ValueError, match="must map to itself"):
        model.set_admission({**good, "tags": torch.tensor([5, 1, 2, 3, 4])})
    with pytest.raises(ValueError, match="shape"):
        model.set_admission({**good, "tags": torch.arange(6)})


def test_model_config_bounds() -> None:
    for bad in ({"tower_dropout": 1.0}, {"tower_dropout": -0.1}, {"min_id_count": -1}):
        with pytest.raises(ValidationError):
            ModelConfig(**bad)
    with pytest.raises(ValidationError):
        OptimConfig(embedding_l2=-1e-3)


# ---- touched-row L2 -----------------------------------------------------------------------


def set_known_weights(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for collection in (model.ctr_embedding, model.second_embedding):
            if collection is None:
                continue
            for name, emb in collection.embeddings.items():
                rows = emb.table.weight.shape[0]
                values = torch.arange(rows * 3, dtype=torch.float32).view(rows, 3) / 10
                emb.table.weight.copy_(values + (1.0 if name == "user" else 0.0))
                if name == "tags":
                    emb.table.weight[0].zero_()


def hand_penalty(users: set[int], tags: set[int]) -> float:
    user_rows = {i: [(3 * i + j) / 10 + 1.0 for j in range(3)] for i in users}
    tag_rows = {i: [(3 * i + j) / 10 for j in range(3)] for i in tags}
    return sum(v * v for row in [*user_rows.values(), *tag_rows.values()] for v in row)


BATCH_USERS = [1, 1, 0, 4]  # distinct: 0, 1, 4 (id 0 of a single field is a learned row)
BATCH_TAGS = [[1, 2, 0], [2, 0, 0], [0, 0, 0], [2, 3, 3]]  # distinct non-padding: 1, 2, 3


@pytest.mark.parametrize(("variant", "tables"), [("esmm", 1), ("esmm_ns", 2)])
def test_embedding_l2_is_the_sum_over_touched_rows_per_sample(variant: str, tables: int) -> None:
    model = toy_model(variant)
    set_known_weights(model)
    penalty = model.embedding_l2(toy_batch(BATCH_USERS, BATCH_TAGS))
    expected = tables * hand_penalty({0, 1, 4}, {1, 2, 3}) / 4
    assert penalty.item() == pytest.approx(expected, rel=1e-6)


def test_embedding_l2_gradient_is_sparse_on_the_touched_rows_only() -> None:
    model = toy_model("esmm")
    set_known_weights(model)
    model.embedding_l2(toy_batch(BATCH_USERS, BATCH_TAGS)).backward()
    for name, touched in (("user", [0, 1, 4]), ("tags", [1, 2, 3])):
        weight = model.ctr_embedding.embeddings[name].table.weight
        assert weight.grad.is_sparse, name
        grad = weight.grad.coalesce()
        assert sorted(grad.indices()[0].tolist()) == touched, name
        dense = grad.to_dense()
        torch.testing.assert_close(dense[touched], 2 * weight.detach()[touched] / 4)
        untouched = [i for i in range(weight.shape[0]) if i not in touched]
        assert not dense[untouched].any(), name  # includes the tags' padding row 0


def test_embedding_l2_counts_the_oov_row_once_for_every_rare_id() -> None:
    model = admitted_model("esmm")
    set_known_weights(model)
    # users 2, 3, 5 are rare (→ OOV 6); tags 3 and 4 too (→ OOV 5)
    penalty = model.embedding_l2(toy_batch([2, 3, 5], [[3, 4, 0], [1, 0, 0], [0, 0, 0]]))
    assert penalty.item() == pytest.approx(hand_penalty({6}, {1, 5}) / 3, rel=1e-6)


class OneProcess:
    """Horovod of one process: ``DistributedOptimizer`` returns the optimizer as it is."""

    def size(self) -> int:
        return 1

    def DistributedOptimizer(self, optimizer, named_parameters):
        return optimizer


def step_once(embedding_l2: float) -> tuple[float, dict[str, float], float, torch.Tensor]:
    cfg = TrainConfig(
        model=ModelConfig(embedding_dim=3, hidden_dims=[8]),
        optim=OptimConfig(embedding_l2=embedding_l2),
    )
    model = toy_model()
    batch = toy_batch(BATCH_USERS, BATCH_TAGS)
    with torch.no_grad():
        today, _ = compute_loss(model(batch), batch["click"], batch["conversion"], cfg.loss, "esmm")
        penalty = model.embedding_l2(batch)
    optimizers = build_optimizers(model, cfg.optim, OneProcess())
    loss, parts = train_step(model, optimizers, batch, cfg, torch.Generator().manual_seed(0))
    return loss, parts, float(today + embedding_l2 * penalty), penalty


def test_sparse_eps_is_sparse_adams_alone() -> None:
    model = toy_model()
    optimizers = build_optimizers(model, OptimConfig(sparse_eps=1e-4), OneProcess())
    eps = {type(o).__name__: o.param_groups[0]["eps"] for o in optimizers}
    assert eps == {"Adam": 1e-8, "SparseAdam": 1e-4}
    default = build_optimizers(model, OptimConfig(), OneProcess())
    assert {o.param_groups[0]["eps"] for o in default} == {1e-8}


def test_train_step_without_embedding_l2_gives_todays_loss() -> None:
    loss, parts, today, _ = step_once(0.0)
    assert loss == today
    assert set(parts) == {"loss_ctr", "loss_cvr", "loss_ctcvr"}


def test_train_step_adds_and_logs_the_embedding_l2() -> None:
    loss, parts, expected, penalty = step_once(0.5)
    assert loss == pytest.approx(expected, rel=1e-6)
    assert parts["embedding_l2"] == pytest.approx(float(penalty), rel=1e-6)
    assert loss > step_once(0.0)[0]


# ---- tower dropout ------------------------------------------------------------------------


def dropouts(module: torch.nn.Module) -> list[torch.nn.Dropout]:
    return [m for m in module.modules() if isinstance(m, torch.nn.Dropout)]


def test_tower_dropout_follows_every_hidden_layer_of_every_tower() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(variant="escm2_dr", embedding_dim=3, hidden_dims=[8, 4], tower_dropout=0.3)
    model = build_model(TOY, cfg)
    for tower in (model.ctr_tower, model.second_tower, model.imputation_tower):
        layers = list(tower.mlp.layers)
        kinds = [type(m).__name__ for m in layers]
        assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout"]
        assert all(m.p == 0.3 for m in dropouts(tower))
    assert dropouts(model.ctr_embedding) == []
    assert dropouts(toy_model("escm2_dr")) == []


def test_tower_dropout_is_off_in_eval_and_on_in_train() -> None:
    model = toy_model(tower_dropout=0.5)
    batch = toy_batch([1, 2, 3, 4], [[1, 2, 0], [2, 0, 0], [3, 0, 0], [4, 1, 0]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch), model(batch), rtol=0, atol=0)
        model.train()
        first, second = model(batch)["pctr"], model(batch)["pctr"]
    assert not torch.equal(first, second)


@pytest.mark.integration
def test_the_trainer_admits_ids_by_their_training_counts_and_logs_how_many(tmp_path, monkeypatch):
    """In-process (Horovod with one rank), all three controls on: the run trains, and the
    admission it logs is the recount of the training day's ids."""
    import mlflow
    import yaml

    from esmm import train

    fields = small_fields()
    features = tmp_path / "features"
    for seed, day in enumerate(("2026-01-01", "2026-01-02")):
        write_feature_day(features, day, fields, rows=800, seed=seed)
    fields_file = tmp_path / "fields.yaml"
    fields_file.write_text(yaml.safe_dump(fields.model_dump(mode="json")))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = sqlite_store(tmp_path / "mlflow.db")
    previous_uri = mlflow.get_tracking_uri()
    try:
        code = train.main(
            [
                *("--features", str(features), "--fields", str(fields_file), "--no-progress"),
                *("--train-dates", "2026-01-01", "--eval-date", "2026-01-02"),
                *("--checkpoint-dir", str(tmp_path / "ckpt")),
                *("--set", "model.min_id_count=12", "--set", "optim.embedding_l2=0.0001"),
                *("--set", "model.tower_dropout=0.1", "--set", "data.input_process=false"),
                *("--set", f"tracking.tracking_uri={uri}", "--set", "tracking.log_model=false"),
                *("--set", "tracking.registered_model_name=null"),
            ]
        )
    finally:
        mlflow.set_tracking_uri(previous_uri)
    assert code == 0
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("esmm").experiment_id])
    user_ids = pq.read_table(features / "dt=2026-01-01", columns=["user_id"])["user_id"]
    counts = np.bincount(user_ids.to_numpy(), minlength=64)[1:]  # id 0 never counts
    assert run.data.metrics["ids_seen.user_id"] == (counts > 0).sum()
    assert run.data.metrics["ids_admitted.user_id"] == (counts >= 12).sum()
    assert 0 < (counts >= 12).sum() < (counts > 0).sum()  # some ids kept, some sent to OOV
    assert np.isfinite(run.data.metrics["ctr_auc"])
