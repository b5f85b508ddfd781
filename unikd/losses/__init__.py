"""Distillation losses: pure functions ``(logits..., target, *, hyper-parameters) -> scalar`` and thin modules.

Targets are class indices (N,) or probabilities (N, C) everywhere. No function includes the plain CE term of its
method; the methods in ``unikd.methods`` add it.
"""

from unikd.losses._cross_entropy import CrossEntropyLoss, LabelSmoothingLoss, cross_entropy, label_smoothing_loss
from unikd.losses._dkd import DKDLoss, dkd_loss
from unikd.losses._kd import KDLoss, kd_loss
from unikd.losses._nkd import NKD_NON_TARGET_LOSSES, NKD_TARGET_LOSSES, NKDLoss, nkd_loss
from unikd.losses._tfkd import TfKDLoss, tfkd_loss, tfkd_teacher
from unikd.losses._uskd import (
    USKD_RANKS,
    USKD_TARGET_LOSSES,
    USKD_TARGET_SOFT_LABELS,
    USKDLoss,
    USKDSoftLabels,
    uskd_loss,
    uskd_soft_labels,
)
from unikd.losses._wsld import WSLDLoss, wsld_loss
from unikd.losses._zipf_ls import ZIPF_UPSAMPLES, ZipfLSLoss, upsample_dense_logits, zipf_ls_distribution, zipf_ls_loss

__all__ = [
    "NKD_NON_TARGET_LOSSES",
    "NKD_TARGET_LOSSES",
    "USKD_RANKS",
    "USKD_TARGET_LOSSES",
    "USKD_TARGET_SOFT_LABELS",
    "ZIPF_UPSAMPLES",
    "CrossEntropyLoss",
    "DKDLoss",
    "KDLoss",
    "LabelSmoothingLoss",
    "NKDLoss",
    "TfKDLoss",
    "USKDLoss",
    "USKDSoftLabels",
    "WSLDLoss",
    "ZipfLSLoss",
    "cross_entropy",
    "dkd_loss",
    "kd_loss",
    "label_smoothing_loss",
    "nkd_loss",
    "tfkd_loss",
    "tfkd_teacher",
    "upsample_dense_logits",
    "uskd_loss",
    "uskd_soft_labels",
    "wsld_loss",
    "zipf_ls_distribution",
    "zipf_ls_loss",
]
