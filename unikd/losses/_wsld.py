"""Zhou et al., "Rethinking Soft Labels for Knowledge Distillation: A Bias-Variance Tradeoff Perspective"
(ICLR 2021): weighted soft label distillation (WSLD)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unikd.losses._common import LossModule, check_logits, check_positive, check_target, full_precision


@full_precision
def wsld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float = 2.0,
    validate: bool | None = None,
) -> torch.Tensor:
    """WSLD term (paper Eq. 8; weight 1, the caller multiplies by its alpha and adds CE):

        w = 1 - exp(-max(CE(student, y) / CE(teacher, y), 0))
        L = T^2 * mean_n w_n * CE(student / T, softmax(teacher / T))

    The weight uses the temperature-1 cross-entropies of the detached logits to the label (as the released code);
    the 1e-7 guard of the released code is kept. Probability targets plug into those cross-entropies as soft
    labels (-sum_i y_i log p_i), which reduces to the hard-label formula for one-hot rows.

    Args:
        student_logits: (N, C).
        teacher_logits: (N, C); detached here.
        target: class indices (N,) or probabilities (N, C).
        temperature: T (2 on ImageNet in the paper; 4 on CIFAR-100).
        validate: check target values; None: only when on the CPU (no device sync).

    Returns:
        Scalar, mean over the batch.
    """
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits, like=student_logits)
    check_target(target, student_logits, validate)
    check_positive("temperature", temperature)
    teacher_logits = teacher_logits.detach()
    teacher_probs = F.softmax(teacher_logits / temperature, dim=1)
    soft_loss = F.cross_entropy(student_logits / temperature, teacher_probs, reduction="none")  # (N,)
    with torch.no_grad():
        student_ce = F.cross_entropy(student_logits, target, reduction="none")
        teacher_ce = F.cross_entropy(teacher_logits, target, reduction="none")
        weight = 1 - torch.exp(-(student_ce / (teacher_ce + 1e-7)).clamp_min(0))
    return temperature**2 * (weight * soft_loss).mean()


class WSLDLoss(LossModule):
    """Module form of :func:`wsld_loss`: ``WSLDLoss(temperature=2.0)(student, teacher, target)``."""

    loss_fn = staticmethod(wsld_loss)
