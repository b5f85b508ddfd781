"""Hinton et al., "Distilling the Knowledge in a Neural Network" (2015): the KD term."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unikd.losses._common import LossModule, check_logits, check_positive, full_precision, soft_cross_entropy


@full_precision
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 4.0) -> torch.Tensor:
    """Hinton KD term, cross-entropy form: ``-T^2 * mean_n sum_i q_i log p_i`` with q = softmax(teacher / T),
    p = softmax(student / T).

    The KL form ``T^2 * KL(q || p)`` differs by the teacher's entropy, a constant: same gradient, and the reference
    vectors of the authors' released code use this cross-entropy form. No plain CE term is included.

    Args:
        student_logits: (N, C).
        teacher_logits: (N, C); detached here, no gradient reaches the teacher.
        temperature: T > 0.

    Returns:
        Scalar, mean over the batch.
    """
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits, like=student_logits)
    check_positive("temperature", temperature)
    teacher_probs = F.softmax(teacher_logits.detach() / temperature, dim=1)
    return soft_cross_entropy(student_logits / temperature, teacher_probs) * temperature**2


class KDLoss(LossModule):
    """Module form of :func:`kd_loss`: ``KDLoss(temperature=4.0)(student_logits, teacher_logits)``."""

    loss_fn = staticmethod(kd_loss)
