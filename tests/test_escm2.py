"""ESCM²-IPS and ESCM²-DR: losses against hand-computed numbers, clipping, detaching, network."""

from __future__ import annotations

import math

import pytest
import torch

from contract.fields import FieldsConfig, FieldSpec
from esmm.losses import LossConfig, compute_loss
from esmm.model import ModelConfig, build_model

# Two clicks (one converted), two unclicked impressions; B = 4.
CLICK = [1.0, 1.0, 0.0, 0.0]
CONVERSION = [1.0, 0.0, 0.0, 0.0]
CTR_LOGIT = [0.5, -1.0, 2.0, -0.3]
CVR_LOGIT = [1.0, 0.2, -0.7, 1.5]
IMPUTED = [0.4, -0.2, 0.9, 0.3]
B = 4


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def bce(y: float, p: float) -> float:
    return -(y * math.log(p) + (1.0 - y) * math.log(1.0 - p))


def hand_ctr_loss() -> float:
    return sum(bce(y, sigmoid(a)) for y, a in zip(CLICK, CTR_LOGIT, strict=True)) / B


def hand_ctcvr_loss() -> float:
    return (
        sum(
            bce(y * z, sigmoid(a) * sigmoid(b))
            for y, z, a, b in zip(CLICK, CONVERSION, CTR_LOGIT, CVR_LOGIT, strict=True)
        )
        / B
    )


def hand_errors() -> list[float]:
    return [bce(z, sigmoid(b)) for z, b in zip(CONVERSION, CVR_LOGIT, strict=True)]


def hand_propensities(min_propensity: float) -> list[float]:
    return [max(sigmoid(a), min_propensity) for a in CTR_LOGIT]


def leaf(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def run(variant: str, cfg: LossConfig, ctr_logit: list[float] = CTR_LOGIT, **outputs_extra):
    outputs = {"ctr_logit": leaf(ctr_logit), "cvr_logit": leaf(CVR_LOGIT), **outputs_extra}
    click = torch.tensor(CLICK, dtype=torch.float64)
    conversion = torch.tensor(CONVERSION, dtype=torch.float64)
    loss, parts = compute_loss(outputs, click, conversion, cfg, variant)
    return loss, parts, outputs


def test_escm2_ips_loss_is_ctr_plus_weighted_ips_risk_over_all_impressions_plus_ctcvr() -> None:
    cfg = LossConfig(escm2_cvr_weight=0.3, escm2_ctcvr_weight=0.7, escm2_min_propensity=0.05)
    loss, parts, _ = run("escm2_ips", cfg)
    e = hand_errors()
    # both clicks' pCTR (0.62, 0.27) are above the clip: ô = pCTR
    ips = (e[0] / sigmoid(0.5) + e[1] / sigmoid(-1.0)) / B  # divided by ALL 4 impressions
    expected = hand_ctr_loss() + 0.3 * ips + 0.7 * hand_ctcvr_loss()
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert parts["loss_cvr"].item() == pytest.approx(ips, rel=1e-9)
    assert parts["loss_ctcvr"].item() == pytest.approx(hand_ctcvr_loss(), rel=1e-9)
    assert "loss_imputation" not in parts


def test_escm2_dr_loss_is_doubly_robust_risk_plus_imputation_loss() -> None:
    cfg = LossConfig(
        escm2_cvr_weight=0.3,
        escm2_ctcvr_weight=0.7,
        escm2_min_propensity=0.3,
        escm2_imputation_weight=2.0,
    )
    loss, parts, _ = run("escm2_dr", cfg, imputed_cvr_error=leaf(IMPUTED))
    e, o, ehat = hand_errors(), CLICK, IMPUTED
    # sigmoid(-1.0) = 0.27 is clipped to 0.3
    prop = [sigmoid(0.5), 0.3, sigmoid(2.0), sigmoid(-0.3)]
    dr = sum(ehat[i] + o[i] * (e[i] - ehat[i]) / prop[i] for i in range(B)) / B
    imputation = sum(o[i] * (e[i] - ehat[i]) ** 2 / prop[i] for i in range(B)) / B
    expected = hand_ctr_loss() + 0.3 * dr + 0.7 * hand_ctcvr_loss() + 2.0 * imputation
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert parts["loss_cvr"].item() == pytest.approx(dr, rel=1e-9)
    assert parts["loss_imputation"].item() == pytest.approx(imputation, rel=1e-9)


def test_tiny_pctr_is_clipped_so_a_click_weighs_one_over_min_propensity() -> None:
    ctr_logit = [-12.0, 3.0, 0.0, 0.0]  # pCTR of the converted click ≈ 6e-6
    cfg = LossConfig(escm2_min_propensity=0.05)
    _, parts, _ = run("escm2_ips", cfg, ctr_logit=ctr_logit)
    e = hand_errors()
    expected = (e[0] / 0.05 + e[1] / sigmoid(3.0)) / B
    assert parts["loss_cvr"].item() == pytest.approx(expected, rel=1e-9)
    # the clicked impression's weight is 1 / 0.05 = 20, not 1 / 6e-6: read it off the
    # gradient of the risk alone w.r.t. its CVR logit, (σ(b) − z) · w / B
    risk_only = LossConfig(escm2_cvr_weight=1.0, escm2_ctcvr_weight=0.0, escm2_min_propensity=0.05)
    loss, _, outputs = run("escm2_ips", risk_only, ctr_logit=ctr_logit)
    loss.backward()
    weight = outputs["cvr_logit"].grad[0].item() * B / (sigmoid(CVR_LOGIT[0]) - 1.0)
    assert weight == pytest.approx(20.0, rel=1e-9)


def test_propensity_is_detached_by_default_and_trains_ctr_tower_when_asked() -> None:
    def ctr_grad(propensity_grad: bool) -> torch.Tensor:
        cfg = LossConfig(
            escm2_cvr_weight=0.5,
            escm2_ctcvr_weight=0.0,
            escm2_min_propensity=0.01,
            escm2_propensity_grad=propensity_grad,
        )
        loss, _, outputs = run("escm2_ips", cfg)
        loss.backward()
        return outputs["ctr_logit"].grad

    ctr_only = [(sigmoid(a) - y) / B for a, y in zip(CTR_LOGIT, CLICK, strict=True)]
    torch.testing.assert_close(ctr_grad(False), torch.tensor(ctr_only, dtype=torch.float64))
    # d/da [0.5 · o e / σ(a) / B] = −0.5 · o e (1 − σ(a)) / σ(a) / B
    e = hand_errors()
    through_propensity = [
        -0.5 * o * err * (1 - sigmoid(a)) / sigmoid(a) / B
        for o, err, a in zip(CLICK, e, CTR_LOGIT, strict=True)
    ]
    expected = [c + p for c, p in zip(ctr_only, through_propensity, strict=True)]
    torch.testing.assert_close(ctr_grad(True), torch.tensor(expected, dtype=torch.float64))


def test_dr_risk_trains_only_the_cvr_logit_and_imputation_loss_only_the_imputation() -> None:
    cfg = LossConfig(
        escm2_cvr_weight=0.5,
        escm2_ctcvr_weight=0.0,
        escm2_min_propensity=0.01,
        escm2_imputation_weight=3.0,
    )
    loss, _, outputs = run("escm2_dr", cfg, imputed_cvr_error=leaf(IMPUTED))
    loss.backward()
    e, prop = hand_errors(), hand_propensities(0.01)
    # ê gets only the imputation loss's gradient: 3 · (−2) o (e − ê) / ô / B
    imputed_grad = [-6.0 * CLICK[i] * (e[i] - IMPUTED[i]) / prop[i] / B for i in range(B)]
    torch.testing.assert_close(
        outputs["imputed_cvr_error"].grad, torch.tensor(imputed_grad, dtype=torch.float64)
    )
    # the CVR logit gets only the DR risk's: 0.5 · o (σ(b) − z) / ô / B
    cvr_grad = [
        0.5 * CLICK[i] * (sigmoid(CVR_LOGIT[i]) - CONVERSION[i]) / prop[i] / B for i in range(B)
    ]
    torch.testing.assert_close(
        outputs["cvr_logit"].grad, torch.tensor(cvr_grad, dtype=torch.float64)
    )


FIELDS = FieldsConfig(
    fields=[
        FieldSpec(name="user_id", kind="single", source="users.user_id", num_buckets=20),
        FieldSpec(name="tags", kind="multi", source="items.tags", num_buckets=20, max_len=3),
    ]
)


def model_and_batch(variant: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = build_model(FIELDS, ModelConfig(variant=variant, embedding_dim=4, hidden_dims=[8]))
    batch = {
        "user_id": torch.tensor([1, 2, 3, 4, 5, 6]),
        "tags": torch.tensor([[1, 2, 0], [3, 0, 0], [4, 5, 6], [0, 0, 0], [7, 0, 0], [8, 9, 0]]),
        "click": torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0]),
        "conversion": torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
    }
    return model, batch


def grads(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.to_dense().clone() for p in module.parameters()]


def test_dr_with_zero_imputation_is_ips() -> None:
    model, batch = model_and_batch("escm2_dr")
    with torch.no_grad():
        model.imputation_tower.logit.weight.zero_()
        model.imputation_tower.logit.bias.zero_()
    cfg = LossConfig(escm2_imputation_weight=0.0)

    def loss_and_cvr_grads(variant: str) -> tuple[torch.Tensor, dict, list[torch.Tensor]]:
        model.zero_grad()
        outputs = model(batch)
        loss, parts = compute_loss(outputs, batch["click"], batch["conversion"], cfg, variant)
        loss.backward()
        return loss.detach(), parts, grads(model.second_tower)

    assert not model(batch)["imputed_cvr_error"].any()
    dr_loss, dr_parts, dr_grads = loss_and_cvr_grads("escm2_dr")
    ips_loss, ips_parts, ips_grads = loss_and_cvr_grads("escm2_ips")
    torch.testing.assert_close(dr_parts["loss_cvr"], ips_parts["loss_cvr"])
    torch.testing.assert_close(dr_loss, ips_loss)
    for dr_grad, ips_grad in zip(dr_grads, ips_grads, strict=True):
        torch.testing.assert_close(dr_grad, ips_grad)
    assert dr_parts["loss_cvr"] > 0


def test_dr_with_nonzero_imputation_differs_from_ips() -> None:
    model, batch = model_and_batch("escm2_dr")
    with torch.no_grad():
        model.imputation_tower.logit.bias.fill_(0.5)
    outputs = model(batch)
    _, dr_parts = compute_loss(
        outputs, batch["click"], batch["conversion"], LossConfig(), "escm2_dr"
    )
    _, ips_parts = compute_loss(
        outputs, batch["click"], batch["conversion"], LossConfig(), "escm2_ips"
    )
    assert abs(dr_parts["loss_cvr"].item() - ips_parts["loss_cvr"].item()) > 1e-4


@pytest.mark.parametrize("variant", ["escm2_ips", "escm2_dr"])
def test_escm2_variants_share_embeddings_and_multiply_pctr_by_pcvr(variant: str) -> None:
    model, batch = model_and_batch(variant)
    outputs = model(batch)
    assert model.second_embedding is None
    torch.testing.assert_close(outputs["pctcvr"], outputs["pctr"] * outputs["pcvr"])
    assert ("imputed_cvr_error" in outputs) is (variant == "escm2_dr")
    assert (model.imputation_tower is not None) is (variant == "escm2_dr")
    assert len(model.sparse_parameters()) == len(FIELDS.fields)


def test_escm2_dr_loss_trains_every_tower() -> None:
    model, batch = model_and_batch("escm2_dr")
    loss, parts = compute_loss(
        model(batch), batch["click"], batch["conversion"], LossConfig(), "escm2_dr"
    )
    loss.backward()
    for tower in (model.ctr_tower, model.second_tower, model.imputation_tower):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.parameters())
    assert set(parts) == {"loss_ctr", "loss_cvr", "loss_ctcvr", "loss_imputation"}


@pytest.mark.parametrize("variant", ["escm2_ips", "escm2_dr"])
def test_escm2_batch_without_clicks_gives_finite_loss(variant: str) -> None:
    model, batch = model_and_batch(variant)
    no_click = torch.zeros(6)
    loss, parts = compute_loss(model(batch), no_click, no_click, LossConfig(), variant)
    loss.backward()
    assert torch.isfinite(loss)
    if variant == "escm2_ips":
        assert parts["loss_cvr"].item() == 0.0
    else:  # nothing observed: the DR risk is the mean imputation, the imputation loss 0
        assert parts["loss_imputation"].item() == 0.0
    assert all(
        torch.isfinite(p.grad.to_dense()).all() for p in model.parameters() if p.grad is not None
    )


def test_escm2_dr_without_imputation_output_names_it() -> None:
    with pytest.raises(KeyError, match="imputed_cvr_error"):
        run("escm2_dr", LossConfig())


def test_loss_config_escm2_defaults_and_bounds() -> None:
    cfg = LossConfig()
    assert (cfg.escm2_cvr_weight, cfg.escm2_ctcvr_weight) == (0.1, 1.0)
    assert (cfg.escm2_min_propensity, cfg.escm2_propensity_grad) == (0.05, False)
    assert cfg.escm2_imputation_weight == 1.0
    with pytest.raises(ValueError):
        LossConfig(escm2_min_propensity=0.0)
    with pytest.raises(ValueError):
        LossConfig(escm2_cvr_weight=-1.0)
    assert ModelConfig(variant="escm2_dr").variant == "escm2_dr"
