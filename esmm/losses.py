"""The training loss of every variant of the paper's comparison.

Ma et al., "Entire Space Multi-Task Model", SIGIR 2018 (arXiv 1804.07931):

- Eq. (1): pCTCVR = pCTR × pCVR, i.e. p(y=1, z=1 | x) = p(y=1 | x) · p(z=1 | y=1, x);
- Eq. (2)–(3): the ESMM loss over ALL N impressions,
  ``L(θ_ctr, θ_cvr) = Σ_i l(y_i, f(x_i; θ_ctr)) + Σ_i l(y_i & z_i, f(x_i; θ_ctr) × f(x_i; θ_cvr))``
  with ``l`` the cross-entropy, y the click label and z the conversion label.

Here each sum is a mean over the batch (so the learning rate does not depend on the batch
size), and :class:`LossConfig` turns the paper's fixed choices into settings: task weights
(CTR, CVR, CTCVR) = (1, 0, 1) is Eq. (3); a CVR term on clicked impressions and stop-gradient
on the CTCVR product are the design notes' open questions 1 and 2.

Wang et al., "ESCM²: Entire Space Counterfactual Multi-Task Model for Post-Click Conversion
Rate Estimation", SIGIR 2022 (arXiv 2204.05125), show that ESMM's pCVR is biased upwards
(Inherent Estimation Bias) and that its CTCVR task can ignore click → conversion causality
(Potential Independence Priority), and add a counterfactual CVR risk as a regulariser:
``L = L_CTR + λ_c · R_CVR + λ_g · L_CTCVR``, with ``R_CVR`` the paper's IPS estimator
(``escm2_ips``, :func:`escm2_ips_risk`) or DR estimator (``escm2_dr``,
:func:`escm2_dr_risk`, plus the imputation loss :func:`escm2_imputation_loss`).

Every part is returned for logging: ``loss_ctr``, ``loss_cvr`` (on clicked impressions, the
variant's weighting) and ``loss_ctcvr`` (all impressions); ``escm2_dr`` adds
``loss_imputation``. A part that a variant does not train on is still computed, without
gradient, so the same curves exist for every variant.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat
from torch import Tensor

from contract.config import StrictModel
from esmm.model import ESCM2_VARIANTS, ESMM_VARIANTS, SEPARATE_CVR_VARIANTS, Variant

__all__ = [
    "LossConfig",
    "TaskWeights",
    "bce_with_logits",
    "compute_loss",
    "cvr_sample_weights",
    "escm2_dr_risk",
    "escm2_imputation_loss",
    "escm2_ips_risk",
    "escm2_propensity",
    "product_bce_with_logits",
]

# Clamp for a BCE on a probability that is not available as a logit (DIVISION's pCVR,
# a diagnostic only): keeps log(0) out of the logged value.
PROBABILITY_EPS = 1e-7


class TaskWeights(StrictModel):
    """Weights of the ESMM loss's three terms (``esmm`` and ``esmm_ns`` only).

    Attributes:
        ctr: weight of BCE(click, pCTR) over all impressions.
        cvr: weight of BCE(conversion, pCVR) over clicked impressions; 0 in the paper, where
            pCVR is only an intermediate variable.
        ctcvr: weight of BCE(click ∧ conversion, pCTR × pCVR) over all impressions.
    """

    ctr: NonNegativeFloat = 1.0
    cvr: NonNegativeFloat = 0.0
    ctcvr: NonNegativeFloat = 1.0


class LossConfig(StrictModel):
    """The ``loss:`` section of the training config. Defaults are the paper's ESMM loss.

    Attributes:
        task_weights: see :class:`TaskWeights` (ESMM variants; the baselines train their CTR
            and CVR models independently, so a weight there would only rescale one model's
            learning rate).
        ctcvr_grad_into: which tower the CTCVR loss trains: ``both`` (the paper), ``cvr``
            (pCTR is detached inside pCTR × pCVR, so only the CVR tower learns from it) or
            ``ctr`` (pCVR detached). Shared embeddings still receive the gradient that flows
            through the tower that is not detached.
        aman_negative_rate: AMAN's share of unclicked impressions sampled as extra CVR
            negatives (the paper searches 10%, 20%, 50%, 100%).
        oversampling_factor: OVERSAMPLING's k: each conversion counts k times in the CVR
            loss (the paper searches 2, 3, 5, 10).
        unbias_min_propensity: UNBIAS clips pCTR from below at this value before taking
            1 / pCTR as a clicked impression's weight, so one badly predicted impression
            cannot dominate the loss (the variance of inverse-propensity weights).
        escm2_cvr_weight: ESCM²'s λ_c, the weight of the counterfactual CVR risk (IPS or
            DR). A default to tune: the authors' PaddleRec configs use 0.5.
        escm2_ctcvr_weight: ESCM²'s λ_g, the weight of the CTCVR ("global") risk; 1.0 keeps
            ESMM's loss as the part λ_c is added to.
        escm2_min_propensity: the propensity ô = pCTR is clipped from below at this value,
            so no clicked impression weighs more than 1 / escm2_min_propensity (20 at the
            default 0.05; the authors' code caps 1 / pCTR at 15).
        escm2_propensity_grad: let the counterfactual CVR risk's gradient flow into the CTR
            tower through 1 / ô. Off by default: minimising Σ o·e / ô over ô only pushes the
            clicked impressions' pCTR up in proportion to their CVR error, a signal with no
            meaning for the click task (the CTR loss already fits pCTR); the authors' IPS code
            stops this gradient too. The imputation loss always uses a detached ô.
        escm2_imputation_weight: weight of the DR imputation loss (``escm2_dr`` only); it
            trains only the imputation tower (and the shared embeddings below it).
    """

    task_weights: TaskWeights = Field(default_factory=TaskWeights)
    ctcvr_grad_into: Literal["both", "cvr", "ctr"] = "both"
    aman_negative_rate: float = Field(default=0.1, ge=0.0, le=1.0)
    oversampling_factor: int = Field(default=5, ge=1)
    unbias_min_propensity: float = Field(default=0.01, gt=0.0, le=1.0)
    escm2_cvr_weight: NonNegativeFloat = 0.1
    escm2_ctcvr_weight: NonNegativeFloat = 1.0
    escm2_min_propensity: float = Field(default=0.05, gt=0.0, le=1.0)
    escm2_propensity_grad: bool = False
    escm2_imputation_weight: NonNegativeFloat = 1.0


def bce_with_logits(logit: Tensor, label: Tensor) -> Tensor:
    """Per-element binary cross-entropy of ``sigmoid(logit)``, stable for any logit.

    Args:
        logit: Tensor ``[B]``.
        label: Tensor ``[B]`` of 0/1 (float).

    Returns:
        Tensor ``[B]``.
    """
    return F.binary_cross_entropy_with_logits(logit, label, reduction="none")


def product_bce_with_logits(logit_a: Tensor, logit_b: Tensor, label: Tensor) -> Tensor:
    """Per-element BCE of p = σ(a)·σ(b) (pCTCVR = pCTR × pCVR), computed in log space.

    ``log p = logσ(a) + logσ(b)`` and, since ``1 − σ(a)σ(b) = σ(−a) + σ(a)σ(−b)``,
    ``log(1 − p) = logaddexp(logσ(−a), logσ(a) + logσ(−b))``. Both are finite with finite
    gradients for every finite logit, with no clamp: a clamp of p to [ε, 1−ε] would zero the
    gradient of a conversion whose pCTCVR fell below ε, and pCTCVR is routinely tiny
    (Ali-CCP: 18k conversions in 84M impressions).

    Args:
        logit_a: Tensor ``[B]`` (the CTR logit).
        logit_b: Tensor ``[B]`` (the CVR logit).
        label: Tensor ``[B]`` of 0/1 (click ∧ conversion).

    Returns:
        Tensor ``[B]``: −[label·log p + (1 − label)·log(1 − p)].

    Example:
        >>> zero = torch.zeros(1)
        >>> product_bce_with_logits(zero, zero, torch.ones(1))  # -log(0.25)
        tensor([1.3863])
    """
    log_sig_a = F.logsigmoid(logit_a)
    log_p = log_sig_a + F.logsigmoid(logit_b)
    log_not_p = torch.logaddexp(F.logsigmoid(-logit_a), log_sig_a + F.logsigmoid(-logit_b))
    return -(label * log_p + (1.0 - label) * log_not_p)


def _probability_bce(prob: Tensor, label: Tensor) -> Tensor:
    prob = prob.clamp(PROBABILITY_EPS, 1.0 - PROBABILITY_EPS)
    return -(label * torch.log(prob) + (1.0 - label) * torch.log1p(-prob))


def _weighted_mean(values: Tensor, weights: Tensor) -> Tensor:
    # A batch without a selected sample (no click) gives 0, not 0/0: the clamp only matters
    # when every weight is 0, where the numerator is 0 too (and so is its gradient).
    total = weights.sum().clamp(min=torch.finfo(weights.dtype).tiny)
    return (weights * values).sum() / total


def cvr_sample_weights(
    variant: Variant,
    click: Tensor,
    conversion: Tensor,
    ctr_logit: Tensor,
    cfg: LossConfig,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Each impression's weight in a baseline's CVR loss (0 = not a CVR training sample).

    - ``base``: clicked impressions, weight 1 (the space the CVR model is usually trained
      in; the paper's sample selection bias).
    - ``aman``: clicked impressions, plus each unclicked impression with probability
      ``aman_negative_rate`` as a negative (its conversion label is 0 by the table's
      contract). The draw uses ``generator`` so a seeded run is reproducible.
    - ``oversampling``: clicked impressions, a conversion weighs ``oversampling_factor``.
      Replicating a sample k times adds k copies of the same BCE term, so the weighted sum
      equals the replicated loss sum exactly; the weighted mean divides by Σ weights, the
      replicated sample count.
    - ``unbias``: clicked impressions weighted by 1 / max(pCTR, unbias_min_propensity), the
      inverse of the probability of entering the clicked space; pCTR is detached so the
      weights do not train the CTR tower.

    Args:
        variant: one of ``base``, ``aman``, ``oversampling``, ``unbias``.
        click: Tensor ``[B]`` of 0/1.
        conversion: Tensor ``[B]`` of 0/1.
        ctr_logit: Tensor ``[B]`` (only ``unbias`` reads it).
        cfg: the loss config.
        generator: random source of ``aman``'s sampling (on any device); ``None`` uses
            torch's global generator on ``click``'s device.

    Returns:
        Tensor ``[B]`` of non-negative weights.
    """
    if variant == "base":
        return click
    if variant == "aman":
        device = generator.device if generator is not None else click.device
        draw = torch.rand(click.shape, generator=generator, device=device).to(click.device)
        sampled = (draw < cfg.aman_negative_rate).to(click.dtype)
        return click + (1.0 - click) * sampled
    if variant == "oversampling":
        return click * (1.0 + (cfg.oversampling_factor - 1) * conversion)
    if variant == "unbias":
        propensity = torch.sigmoid(ctr_logit.detach()).clamp(min=cfg.unbias_min_propensity)
        return click / propensity
    raise ValueError(
        f"variant '{variant}' has no re-weighted CVR loss; "
        f"expected one of {sorted(SEPARATE_CVR_VARIANTS)}"
    )


def escm2_propensity(ctr_logit: Tensor, min_propensity: float, grad: bool = False) -> Tensor:
    """ESCM²'s propensity ô = max(pCTR, min_propensity), the probability of a click.

    Args:
        ctr_logit: Tensor ``[B]``.
        min_propensity: clip from below; 1 / ô is at most 1 / min_propensity.
        grad: keep the graph to the CTR logit (``escm2_propensity_grad``); detached otherwise.

    Returns:
        Tensor ``[B]`` in [min_propensity, 1].
    """
    logit = ctr_logit if grad else ctr_logit.detach()
    return torch.sigmoid(logit).clamp(min=min_propensity)


def escm2_ips_risk(cvr_error: Tensor, click: Tensor, propensity: Tensor) -> Tensor:
    """ESCM²'s IPS estimator of the entire-space CVR risk: (1/|D|) Σ_{i∈D} o_i e_i / ô_i.

    The mean is over ALL impressions D of the batch, not over the clicked ones: e / ô on a
    click stands for the 1 / ô impressions like it, clicked or not, so the sum estimates the
    error summed over the entire space and |D| makes it a mean (a self-normalised Σ o / ô in
    the denominator would be a different, biased estimator).

    Args:
        cvr_error: e_i = BCE(conversion, pCVR), Tensor ``[B]`` (read where click is 1).
        click: o_i, Tensor ``[B]`` of 0/1.
        propensity: ô_i, Tensor ``[B]`` (see :func:`escm2_propensity`).

    Returns:
        Scalar Tensor.

    Example:
        >>> escm2_ips_risk(torch.tensor([2.0, 5.0]), torch.tensor([1.0, 0.0]),
        ...                torch.tensor([0.5, 0.5]))
        tensor(2.)
    """
    return (click * cvr_error / propensity).mean()


def escm2_dr_risk(
    cvr_error: Tensor, imputed_error: Tensor, click: Tensor, propensity: Tensor
) -> Tensor:
    """ESCM²'s DR estimator: (1/|D|) Σ_{i∈D} [ê_i + o_i (e_i − ê_i) / ô_i].

    The imputation ê is detached here: this risk trains the CVR tower (through e), with ê a
    fixed control variate, as in doubly robust joint learning where the prediction and the
    imputation model take turns. Left attached, the risk is linear in ê with slope
    (1 − o / ô), and minimising it would drive ê to ±∞ instead of towards e.
    With ê ≡ 0 it is exactly :func:`escm2_ips_risk`.

    Args:
        cvr_error: e_i = BCE(conversion, pCVR), Tensor ``[B]``.
        imputed_error: ê_i, the imputation tower's output, Tensor ``[B]``.
        click: o_i, Tensor ``[B]`` of 0/1.
        propensity: ô_i, Tensor ``[B]``.

    Returns:
        Scalar Tensor.
    """
    imputed = imputed_error.detach()
    return (imputed + click * (cvr_error - imputed) / propensity).mean()


def escm2_imputation_loss(
    cvr_error: Tensor, imputed_error: Tensor, click: Tensor, propensity: Tensor
) -> Tensor:
    """ESCM²'s imputation loss: (1/|D|) Σ_{i∈D} o_i (e_i − ê_i)² / ô_i.

    The target e and the propensity ô are detached: this loss fits the imputation tower to
    the CVR tower's current error and must not move the CVR tower towards its own imputation
    (which it could do by making its error worse) nor the CTR tower.

    Args:
        cvr_error: e_i, Tensor ``[B]``.
        imputed_error: ê_i, Tensor ``[B]``.
        click: o_i, Tensor ``[B]`` of 0/1.
        propensity: ô_i, Tensor ``[B]``.

    Returns:
        Scalar Tensor.
    """
    residual = cvr_error.detach() - imputed_error
    return (click * residual.square() / propensity.detach()).mean()


def _ctcvr_loss(ctr_logit: Tensor, cvr_logit: Tensor, label: Tensor, grad_into: str) -> Tensor:
    ctcvr_ctr_logit = ctr_logit.detach() if grad_into == "cvr" else ctr_logit
    ctcvr_cvr_logit = cvr_logit.detach() if grad_into == "ctr" else cvr_logit
    return product_bce_with_logits(ctcvr_ctr_logit, ctcvr_cvr_logit, label).mean()


def compute_loss(
    outputs: Mapping[str, Tensor],
    click: Tensor,
    conversion: Tensor,
    cfg: LossConfig,
    variant: Variant,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The training loss of ``variant`` and its parts for logging.

    - ``esmm``, ``esmm_ns`` (paper Eq. (3), generalised):
      ``w_ctr·BCE(y, pCTR) + w_cvr·BCE_clicked(z, pCVR) + w_ctcvr·BCE(y∧z, pCTR × pCVR)``,
      with ``ctcvr_grad_into`` detaching one factor of the product.
    - ``base``, ``aman``, ``oversampling``, ``unbias``: ``BCE(y, pCTR)`` over all impressions
      (the CTR model) + the CVR model's weighted mean BCE(z, pCVR) with
      :func:`cvr_sample_weights`. The two models share no parameter, so the sum trains each
      one on its own loss.
    - ``division``: ``BCE(y, pCTR) + BCE(y∧z, pCTCVR)``, both over all impressions, both
      from the two towers' logits.
    - ``escm2_ips``: ``BCE(y, pCTR) + λ_c·R_IPS + λ_g·BCE(y∧z, pCTR × pCVR)`` (ESCM²'s
      global loss), ``R_IPS`` = :func:`escm2_ips_risk` with e = BCE(z, pCVR) and
      ô = :func:`escm2_propensity`; ``ctcvr_grad_into`` applies to the CTCVR term.
    - ``escm2_dr``: the same with ``R_DR`` = :func:`escm2_dr_risk`, plus
      ``escm2_imputation_weight`` × :func:`escm2_imputation_loss` (needs the model's
      ``imputed_cvr_error``).

    Means are over the batch (CTR, CTCVR) or over the CVR samples' weights; a batch with no
    clicked impression gives a CVR loss of 0.

    Args:
        outputs: :meth:`esmm.model.ESMMModel.forward`'s dict (``ctr_logit`` and
            ``cvr_logit``, or for ``division`` ``ctr_logit``, ``ctcvr_logit`` and ``pcvr``).
        click: Tensor ``[B]`` of 0/1 (float).
        conversion: Tensor ``[B]`` of 0/1 (float), 0 wherever click is 0.
        cfg: the loss config.
        variant: the model's variant (``ModelConfig.variant``).
        generator: random source for ``aman``'s negative sampling.

    Returns:
        ``(loss, parts)``: the scalar to back-propagate, and detached scalars ``loss_ctr``,
        ``loss_cvr``, ``loss_ctcvr`` (and ``loss_imputation`` for ``escm2_dr``). For the
        ESCM² variants ``loss_cvr`` is the counterfactual risk (IPS or DR).

    Example:
        >>> outputs = {"ctr_logit": torch.zeros(2), "cvr_logit": torch.zeros(2)}
        >>> loss, parts = compute_loss(outputs, torch.tensor([1.0, 0.0]),
        ...                            torch.tensor([1.0, 0.0]), LossConfig(), "esmm")
        >>> sorted(parts)
        ['loss_ctcvr', 'loss_ctr', 'loss_cvr']
    """
    ctr_logit = outputs["ctr_logit"]
    ctcvr_label = click * conversion
    loss_ctr = bce_with_logits(ctr_logit, click).mean()
    extra_parts: dict[str, Tensor] = {}

    if variant == "division":
        loss_ctcvr = bce_with_logits(outputs["ctcvr_logit"], ctcvr_label).mean()
        with torch.no_grad():
            loss_cvr = _weighted_mean(_probability_bce(outputs["pcvr"], conversion), click)
        total = loss_ctr + loss_ctcvr
    elif variant in ESMM_VARIANTS:
        cvr_logit = outputs["cvr_logit"]
        loss_ctcvr = _ctcvr_loss(ctr_logit, cvr_logit, ctcvr_label, cfg.ctcvr_grad_into)
        loss_cvr = _weighted_mean(bce_with_logits(cvr_logit, conversion), click)
        weights = cfg.task_weights
        total = weights.ctr * loss_ctr + weights.cvr * loss_cvr + weights.ctcvr * loss_ctcvr
    elif variant in SEPARATE_CVR_VARIANTS:
        cvr_logit = outputs["cvr_logit"]
        sample_weights = cvr_sample_weights(variant, click, conversion, ctr_logit, cfg, generator)
        loss_cvr = _weighted_mean(bce_with_logits(cvr_logit, conversion), sample_weights)
        with torch.no_grad():
            loss_ctcvr = product_bce_with_logits(ctr_logit, cvr_logit, ctcvr_label).mean()
        total = loss_ctr + loss_cvr
    elif variant in ESCM2_VARIANTS:
        cvr_logit = outputs["cvr_logit"]
        loss_ctcvr = _ctcvr_loss(ctr_logit, cvr_logit, ctcvr_label, cfg.ctcvr_grad_into)
        # e_i is computed for every impression but only read where o_i = 1 (an unclicked
        # impression's conversion label is 0 by the table's contract, not an observation).
        cvr_error = bce_with_logits(cvr_logit, conversion)
        propensity = escm2_propensity(
            ctr_logit, cfg.escm2_min_propensity, grad=cfg.escm2_propensity_grad
        )
        if variant == "escm2_ips":
            loss_cvr = escm2_ips_risk(cvr_error, click, propensity)
            loss_imputation = torch.zeros((), dtype=loss_ctr.dtype, device=loss_ctr.device)
        else:
            if "imputed_cvr_error" not in outputs:
                raise KeyError("escm2_dr needs the model output 'imputed_cvr_error'")
            imputed = outputs["imputed_cvr_error"]
            loss_cvr = escm2_dr_risk(cvr_error, imputed, click, propensity)
            loss_imputation = escm2_imputation_loss(cvr_error, imputed, click, propensity)
            extra_parts["loss_imputation"] = loss_imputation.detach()
        total = (
            loss_ctr
            + cfg.escm2_cvr_weight * loss_cvr
            + cfg.escm2_ctcvr_weight * loss_ctcvr
            + cfg.escm2_imputation_weight * loss_imputation
        )
    else:
        raise ValueError(f"unknown variant '{variant}'")

    parts = {
        "loss_ctr": loss_ctr.detach(),
        "loss_cvr": loss_cvr.detach(),
        "loss_ctcvr": loss_ctcvr.detach(),
        **extra_parts,
    }
    return total, parts
