"""Each variant's loss against numbers computed by hand, stop-gradients, numerics."""

from __future__ import annotations

import math

import pytest
import torch

from contract.fields import FieldsConfig, FieldSpec
from esmm.losses import (
    LossConfig,
    TaskWeights,
    compute_loss,
    cvr_sample_weights,
    product_bce_with_logits,
)
from esmm.model import ModelConfig, build_model

# A tiny batch: two clicks (one converted), two unclicked impressions.
CLICK = [1.0, 1.0, 0.0, 0.0]
CONVERSION = [1.0, 0.0, 0.0, 0.0]
CTR_LOGIT = [0.5, -1.0, 2.0, -0.3]
CVR_LOGIT = [1.0, 0.2, -0.7, 1.5]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def bce(y: float, p: float) -> float:
    return -(y * math.log(p) + (1.0 - y) * math.log(1.0 - p))


def hand_ctr_loss() -> float:
    return sum(bce(y, sigmoid(a)) for y, a in zip(CLICK, CTR_LOGIT, strict=True)) / 4


def hand_ctcvr_loss() -> float:
    terms = [
        bce(y * z, sigmoid(a) * sigmoid(b))
        for y, z, a, b in zip(CLICK, CONVERSION, CTR_LOGIT, CVR_LOGIT, strict=True)
    ]
    return sum(terms) / 4


def hand_cvr_terms() -> list[float]:
    return [bce(z, sigmoid(b)) for z, b in zip(CONVERSION, CVR_LOGIT, strict=True)]


def run(variant: str, cfg: LossConfig, second_logit: list[float] = CVR_LOGIT, **extra):
    outputs = {"ctr_logit": torch.tensor(CTR_LOGIT, dtype=torch.float64, requires_grad=True)}
    key = "ctcvr_logit" if variant == "division" else "cvr_logit"
    outputs[key] = torch.tensor(second_logit, dtype=torch.float64, requires_grad=True)
    outputs.update(extra)
    click = torch.tensor(CLICK, dtype=torch.float64)
    conversion = torch.tensor(CONVERSION, dtype=torch.float64)
    return compute_loss(outputs, click, conversion, cfg, variant)


@pytest.mark.parametrize("variant", ["esmm", "esmm_ns"])
def test_esmm_loss_is_ctr_plus_ctcvr_over_all_impressions(variant: str) -> None:
    loss, parts = run(variant, LossConfig())
    assert loss.item() == pytest.approx(hand_ctr_loss() + hand_ctcvr_loss(), rel=1e-9)
    assert parts["loss_ctr"].item() == pytest.approx(hand_ctr_loss(), rel=1e-9)
    assert parts["loss_ctcvr"].item() == pytest.approx(hand_ctcvr_loss(), rel=1e-9)


def test_esmm_task_weights_add_a_cvr_term_on_clicked_impressions_only() -> None:
    cfg = LossConfig(task_weights=TaskWeights(ctr=0.5, cvr=2.0, ctcvr=3.0))
    loss, parts = run("esmm", cfg)
    cvr = hand_cvr_terms()
    clicked_cvr = (cvr[0] + cvr[1]) / 2
    expected = 0.5 * hand_ctr_loss() + 2.0 * clicked_cvr + 3.0 * hand_ctcvr_loss()
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert parts["loss_cvr"].item() == pytest.approx(clicked_cvr, rel=1e-9)


def test_base_loss_is_ctr_plus_cvr_on_clicked_impressions() -> None:
    loss, parts = run("base", LossConfig())
    cvr = hand_cvr_terms()
    assert loss.item() == pytest.approx(hand_ctr_loss() + (cvr[0] + cvr[1]) / 2, rel=1e-9)
    # the CTCVR loss is still logged for the baseline
    assert parts["loss_ctcvr"].item() == pytest.approx(hand_ctcvr_loss(), rel=1e-9)


def test_aman_with_full_sampling_uses_every_unclicked_impression_as_negative() -> None:
    loss, _ = run("aman", LossConfig(aman_negative_rate=1.0))
    assert loss.item() == pytest.approx(hand_ctr_loss() + sum(hand_cvr_terms()) / 4, rel=1e-9)


def test_aman_with_zero_sampling_is_base() -> None:
    aman, _ = run("aman", LossConfig(aman_negative_rate=0.0))
    base, _ = run("base", LossConfig())
    assert aman.item() == pytest.approx(base.item(), rel=1e-12)


def test_aman_samples_its_share_of_unclicked_impressions_reproducibly() -> None:
    n = 20_000
    click = torch.cat([torch.ones(100), torch.zeros(n)])
    cfg = LossConfig(aman_negative_rate=0.3)

    def weights(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return cvr_sample_weights("aman", click, torch.zeros_like(click), click, cfg, gen)

    first = weights(7)
    assert (first[:100] == 1).all()
    assert 0.28 < first[100:].mean().item() < 0.32
    assert torch.equal(first, weights(7))
    assert not torch.equal(first, weights(8))


def test_oversampling_weighs_conversions_k_times() -> None:
    loss, parts = run("oversampling", LossConfig(oversampling_factor=3))
    cvr = hand_cvr_terms()
    expected_cvr = (3 * cvr[0] + cvr[1]) / 4
    assert loss.item() == pytest.approx(hand_ctr_loss() + expected_cvr, rel=1e-9)
    assert parts["loss_cvr"].item() == pytest.approx(expected_cvr, rel=1e-9)


def test_oversampling_equals_replicating_conversions() -> None:
    k = 4
    click = torch.tensor([1.0, 1.0, 1.0, 0.0])
    conversion = torch.tensor([1.0, 0.0, 0.0, 0.0])
    cvr_logit = torch.tensor([0.3, -0.2, 1.1, 0.7])
    outputs = {"ctr_logit": torch.zeros(4), "cvr_logit": cvr_logit}
    _, weighted = compute_loss(
        outputs, click, conversion, LossConfig(oversampling_factor=k), "oversampling"
    )
    replicated = torch.cat([torch.zeros(k - 1, dtype=torch.long), torch.arange(4)])
    _, copied = compute_loss(
        {"ctr_logit": torch.zeros(4 + k - 1), "cvr_logit": cvr_logit[replicated]},
        click[replicated],
        conversion[replicated],
        LossConfig(),
        "base",
    )
    torch.testing.assert_close(weighted["loss_cvr"], copied["loss_cvr"])


def test_unbias_weighs_clicks_by_clipped_inverse_pctr() -> None:
    loss, parts = run("unbias", LossConfig(unbias_min_propensity=0.3))
    cvr = hand_cvr_terms()
    # sigmoid(0.5) = 0.62 is kept; sigmoid(-1.0) = 0.27 is clipped to 0.3
    w0, w1 = 1 / sigmoid(0.5), 1 / 0.3
    expected_cvr = (w0 * cvr[0] + w1 * cvr[1]) / (w0 + w1)
    assert loss.item() == pytest.approx(hand_ctr_loss() + expected_cvr, rel=1e-9)
    assert parts["loss_cvr"].item() == pytest.approx(expected_cvr, rel=1e-9)


def test_unbias_weights_do_not_train_the_ctr_logit() -> None:
    ctr_logit = torch.tensor(CTR_LOGIT, dtype=torch.float64, requires_grad=True)
    outputs = {"ctr_logit": ctr_logit, "cvr_logit": torch.tensor(CVR_LOGIT, dtype=torch.float64)}
    click = torch.tensor(CLICK, dtype=torch.float64)
    conversion = torch.tensor(CONVERSION, dtype=torch.float64)
    loss, _ = compute_loss(outputs, click, conversion, LossConfig(), "unbias")
    loss.backward()
    # only the CTR loss's own gradient, (σ(a) − y) / B
    expected = [(sigmoid(a) - y) / 4 for a, y in zip(CTR_LOGIT, CLICK, strict=True)]
    torch.testing.assert_close(ctr_logit.grad, torch.tensor(expected, dtype=torch.float64))


def test_division_loss_is_ctr_plus_ctcvr_from_two_towers() -> None:
    ctcvr_logit = [-0.5, 0.4, -2.0, 0.1]
    pcvr = torch.tensor([0.9, 0.2, 0.5, 0.5], dtype=torch.float64)
    loss, parts = run("division", LossConfig(), second_logit=ctcvr_logit, pcvr=pcvr)
    ctcvr = (
        sum(bce(y * z, sigmoid(c)) for y, z, c in zip(CLICK, CONVERSION, ctcvr_logit, strict=True))
        / 4
    )
    assert loss.item() == pytest.approx(hand_ctr_loss() + ctcvr, rel=1e-9)
    assert parts["loss_ctcvr"].item() == pytest.approx(ctcvr, rel=1e-9)
    assert parts["loss_cvr"].item() == pytest.approx((bce(1, 0.9) + bce(0, 0.2)) / 2, rel=1e-9)


FIELDS = FieldsConfig(
    fields=[
        FieldSpec(name="user_id", kind="single", source="users.user_id", num_buckets=20),
        FieldSpec(name="tags", kind="multi", source="items.tags", num_buckets=20, max_len=3),
    ]
)


def model_batch(variant: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    cfg = ModelConfig(variant=variant, embedding_dim=4, hidden_dims=[8])
    batch = {
        "user_id": torch.tensor([1, 2, 3, 4, 5, 6]),
        "tags": torch.tensor([[1, 2, 0], [3, 0, 0], [4, 5, 6], [0, 0, 0], [7, 0, 0], [8, 9, 0]]),
        "click": torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0]),
        "conversion": torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
    }
    return build_model(FIELDS, cfg), batch


def tower_has_gradient(tower: torch.nn.Module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.parameters())


@pytest.mark.parametrize(
    ("grad_into", "ctr_trained", "cvr_trained"),
    [("both", True, True), ("cvr", False, True), ("ctr", True, False)],
)
def test_ctcvr_stop_gradient_reaches_only_the_chosen_towers(
    grad_into: str, ctr_trained: bool, cvr_trained: bool
) -> None:
    model, batch = model_batch("esmm")
    cfg = LossConfig(
        task_weights=TaskWeights(ctr=0.0, cvr=0.0, ctcvr=1.0), ctcvr_grad_into=grad_into
    )
    loss, _ = compute_loss(model(batch), batch["click"], batch["conversion"], cfg, "esmm")
    loss.backward()
    assert tower_has_gradient(model.ctr_tower) is ctr_trained
    assert tower_has_gradient(model.second_tower) is cvr_trained


@pytest.mark.parametrize(
    "variant", ["esmm", "esmm_ns", "base", "aman", "oversampling", "unbias", "division"]
)
def test_batch_without_clicks_gives_finite_loss_and_zero_cvr_loss(variant: str) -> None:
    model, batch = model_batch(variant)
    no_click = torch.zeros(6)
    # AMAN's negatives sampled from unclicked impressions would be CVR samples too
    cfg = LossConfig(task_weights=TaskWeights(cvr=1.0), aman_negative_rate=0.0)
    gen = torch.Generator().manual_seed(0)
    loss, parts = compute_loss(model(batch), no_click, no_click, cfg, variant, gen)
    loss.backward()
    assert torch.isfinite(loss)
    assert parts["loss_cvr"].item() == 0.0
    assert all(
        torch.isfinite(p.grad.to_dense()).all() for p in model.parameters() if p.grad is not None
    )


def test_product_bce_is_finite_and_keeps_gradients_at_extreme_logits() -> None:
    a = torch.tensor([-15.0, 60.0, -80.0, 0.3], requires_grad=True)
    b = torch.tensor([-15.0, 60.0, 90.0, -0.4], requires_grad=True)
    label = torch.tensor([1.0, 0.0, 0.0, 1.0])
    loss = product_bce_with_logits(a, b, label)
    loss.sum().backward()
    assert (
        torch.isfinite(loss).all() and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    )
    # a conversion with pCTCVR ≈ 1e-13 still pulls both logits up (a clamp at 1e-7 would not)
    assert a.grad[0] < -0.99 and b.grad[0] < -0.99
    # an unclicked impression with pCTCVR ≈ 1 costs about -log(2 e^-60)
    assert loss[1].item() == pytest.approx(60.0 - math.log(2.0), rel=1e-4)
    assert loss[3].item() == pytest.approx(-math.log(sigmoid(0.3) * sigmoid(-0.4)), rel=1e-5)
