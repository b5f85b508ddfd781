"""The paper's ablation variants of NKD and USKD (Tables 5, 6, 8, 9, 12, 14, 15) and Zipf's LS upsampling.

Each vectorised variant is checked against a from-the-equation implementation written here with plain Python loops
over samples and classes (float64; gradients from autograd through the loops, so the closed-form gradients of the
library are checked too), and every option name is validated with an error that lists the valid ones.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

import unikd.losses as L
import unikd.losses._uskd as uskd_module

TOLERANCE = 1e-10


def _softmax(row):
    """Softmax of a list of scalar tensors, one class at a time."""
    top = max(row, key=lambda value: value.item())
    exps = [torch.exp(value - top) for value in row]
    total = sum(exps)
    return [value / total for value in exps]


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = expected.detach().abs().max().clamp_min(1e-12)
    error = ((actual.detach() - expected.detach()).abs().max() / scale).item()
    assert error < TOLERANCE, f"{what}: relative error {error:.2e}"


def _inputs(seed: int, n: int, c: int, scale: float = 3.0):
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64) * scale  # noqa: E731
    return randn(n, c), randn(n, c), randn(n, c), torch.randint(0, c, (n,), generator=generator)


def _mixed(labels: torch.Tensor, c: int) -> torch.Tensor:
    """Mixup-style rows: 0.7 on the label, 0.3 on the next class."""
    return 0.7 * F.one_hot(labels, c).double() + 0.3 * F.one_hot((labels + 1) % c, c).double()


def _check_against(fn, reference, tensors: dict[str, torch.Tensor]) -> None:
    """fn(**leaves) and reference(**leaves): same value, same gradient for each leaf."""
    leaves = {name: tensor.clone().requires_grad_(True) for name, tensor in tensors.items()}
    ours = fn(**leaves)
    our_grads = torch.autograd.grad(ours, list(leaves.values()), allow_unused=True)
    copies = {name: tensor.clone().requires_grad_(True) for name, tensor in tensors.items()}
    theirs = reference(**copies)
    their_grads = torch.autograd.grad(theirs, list(copies.values()), allow_unused=True)
    _assert_close(ours, theirs, "value")
    for (name, leaf), mine, expected in zip(leaves.items(), our_grads, their_grads, strict=True):
        zero = torch.zeros_like(leaf)  # an input that takes no part (the weak logits' L_weak at mu = 0)
        _assert_close(zero if mine is None else mine, zero if expected is None else expected, f"gradient of {name}")


# ---------------------------------------------------------------------------------------------------------------
# NKD, Tables 5 and 14.


def _nkd_reference(student, teacher, label, temperature, gamma, target_loss, non_target_loss):
    """Eq. 4 and its variants, one sample and one class at a time."""
    n, c = student.shape
    teacher = teacher.detach()
    total = 0.0
    for i in range(n):
        t = int(label[i])
        student_probs, teacher_probs = _softmax(list(student[i])), _softmax(list(teacher[i]))
        loss = 0.0
        if target_loss in ("t1", "t1+t2"):
            loss = loss - teacher_probs[t] * torch.log(student_probs[t])
        if target_loss in ("t2", "t1+t2"):
            loss = loss - (1 - teacher_probs[t]) * torch.log(1 - student_probs[t])
        others = [j for j in range(c) if j != t]
        if non_target_loss != "none":
            student_tau = _softmax([student[i, j] / temperature for j in range(c)])
            teacher_tau = _softmax([teacher[i, j] / temperature for j in range(c)])
            if non_target_loss == "normalized":
                student_mass = sum(student_tau[j] for j in others)
                teacher_mass = sum(teacher_tau[j] for j in others)
                term = -sum(teacher_tau[j] / teacher_mass * torch.log(student_tau[j] / student_mass) for j in others)
            else:
                term = -sum(teacher_tau[j] * torch.log(student_tau[j]) for j in others)
            loss = loss + gamma * temperature**2 * term
        total = total + loss
    return total / n


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("non_target_loss", L.NKD_NON_TARGET_LOSSES)
@pytest.mark.parametrize("target_loss", L.NKD_TARGET_LOSSES)
def test_nkd_variants_match_the_equations(target_loss, non_target_loss, temperature):
    student, teacher, _, label = _inputs(hash((target_loss, non_target_loss)) % 1000, 5, 7)
    options = {"temperature": temperature, "gamma": 1.3, "target_loss": target_loss, "non_target_loss": non_target_loss}
    _check_against(
        lambda student: L.nkd_loss(student, teacher, label, **options),
        lambda student: _nkd_reference(student, teacher, label, **options),
        {"student": student},
    )


def test_nkd_kd_non_target_term_is_kd_minus_its_target_terms():
    # Paper Eq. 2: KD = T1 + T2-like binary part + ...; at gamma = tau = 1, t1 + "kd" non-target term is exactly KD.
    student, teacher, _, label = _inputs(3, 6, 9)
    kd = L.kd_loss(student, teacher, temperature=1.0)
    ours = L.nkd_loss(student, teacher, label, gamma=1.0, non_target_loss="kd")
    assert ours.item() == pytest.approx(kd.item(), rel=TOLERANCE)


def test_nkd_variants_stay_finite_when_probabilities_saturate():
    saturated = torch.tensor([[0.0, -200, -300, -400, -500]] * 4)
    label = torch.zeros(4, dtype=torch.long)
    for student, teacher in ((torch.randn(4, 5), saturated), (saturated.clone(), torch.randn(4, 5))):
        student.requires_grad_(True)
        for target_loss in L.NKD_TARGET_LOSSES:
            for non_target_loss in L.NKD_NON_TARGET_LOSSES:
                loss = L.nkd_loss(student, teacher, label, target_loss=target_loss, non_target_loss=non_target_loss)
                (grad,) = torch.autograd.grad(loss, student)
                assert torch.isfinite(loss) and torch.isfinite(grad).all(), (target_loss, non_target_loss)


# ---------------------------------------------------------------------------------------------------------------
# USKD, Tables 6, 8, 9, 12, 15.


def _targets(label):
    """(classes, values) per row as the released code takes them: the index, or the two largest label entries."""
    if label.dim() == 1:
        return [[int(k)] for k in label], [[1.0] for _ in label]
    classes, values = [], []
    for row in label:
        order = sorted(range(len(row)), key=lambda j: -row[j].item())[:2]
        row_values = [row[j].item() for j in order]
        if row_values[1] == 0:
            order[1] = order[0]
        classes.append(order)
        values.append(row_values)
    return classes, values


def _rule(kind, probs, values):
    """Soft target values of one group of rows (lists) for one target column."""
    n = len(probs)
    if kind == "squared":
        mean = sum(p * p for p in probs) / n
        return [p * p + v - mean for p, v in zip(probs, values, strict=True)]
    if kind == "unsquared":
        mean = sum(probs) / n
        return [p + v - mean for p, v in zip(probs, values, strict=True)]
    if kind == "softmax":
        exps = [math.exp(p) for p in probs]
        return [e / sum(exps) * sum(values) for e in exps]
    if kind == "sqrt":
        return [math.sqrt(p - min(probs)) * v for p, v in zip(probs, values, strict=True)]
    if kind == "max":
        return [p / max(probs) * v for p, v in zip(probs, values, strict=True)]
    return [p / (sum(probs) / n) * v for p, v in zip(probs, values, strict=True)]  # mean


def _soft_targets(student, teacher, classes, values, kind, group):
    """P[i][k], from detached probabilities (plain floats)."""
    n = len(classes)
    probs = [[p.item() for p in _softmax(list(student[i].detach()))] for i in range(n)]
    soft = [[0.0] * len(classes[i]) for i in range(n)]
    size = group or n
    for k in range(len(classes[0])):
        for start in range(0, n, size):
            rows = range(start, min(start + size, n))
            if kind in ("teacher", "ema"):
                column = [_softmax(list(teacher[i]))[classes[i][k]].item() * values[i][k] for i in rows]
            else:
                column = _rule(kind, [probs[i][classes[i][k]] for i in rows], [values[i][k] for i in rows])
            for i, value in zip(rows, column, strict=True):
                soft[i][k] = value if values[i][k] > 0 else 0.0
    return soft


def _scores(student_probs, weak_probs, targets, rank):
    """R_j (floats) of one sample."""
    c = len(student_probs)
    if rank == "weak":
        return weak_probs
    if rank == "final":
        return student_probs
    if rank == "sum":
        return [weak_probs[j] + student_probs[j] for j in range(c)]
    student_term = student_probs if rank == "paper" else [math.log(p) for p in student_probs]
    weak_mass = sum(weak_probs[k] for k in targets)
    student_mass = sum(student_term[k] for k in targets)
    return [weak_probs[j] / (1 - weak_mass + 1e-6) + student_term[j] / (1 - student_mass + 1e-6) for j in range(c)]


def _uskd_reference(
    student, weak, label, teacher=None, *, alpha=1.0, beta=0.1, mu=0.005, rank="paper",
    target_soft_label="squared", target_loss="t1", batch_mean_group=0,
):  # fmt: skip
    """Eqs. 7-13 and the variants, one sample and one class at a time (soft labels as plain floats: detached)."""
    n, c = student.shape
    classes, values = _targets(label)
    soft = _soft_targets(student, teacher, classes, values, target_soft_label, batch_mean_group)
    total = 0.0
    for i in range(n):
        probs = _softmax(list(student[i]))
        weak_probs = _softmax(list(weak[i]))
        targets = {classes[i][k] for k in range(len(classes[i])) if values[i][k] > 0}
        loss = 0.0
        for k, t in enumerate(classes[i]):
            if target_loss in ("t1", "t1+t2"):
                loss = loss - alpha * soft[i][k] * torch.log(probs[t])
            if target_loss in ("t2", "t1+t2") and values[i][k] > 0:
                loss = loss - alpha * (1 - soft[i][k]) * torch.log(1 - probs[t])
        scores = _scores([p.item() for p in probs], [p.item() for p in weak_probs], targets, rank)
        order = sorted(range(c), key=lambda j: (-scores[j], j))
        zipf = [0.0] * c
        for position, j in enumerate(order):
            zipf[j] = 0.0 if j in set(classes[i]) else 1.0 / (position + 1)
        others = [j for j in range(c) if j not in set(classes[i])]
        if others:
            non_target = _softmax([student[i, j] for j in others])
            loss = loss - beta * sum(
                zipf[j] / sum(zipf) * torch.log(p) for j, p in zip(others, non_target, strict=True)
            )
        one_hot = [0.0] * c
        for k, t in enumerate(classes[i]):
            one_hot[t] += values[i][k] if label.dim() == 2 else 1.0
        smoothed = [0.9 * y + 0.1 / c for y in one_hot]
        loss = loss - mu * sum(smoothed[j] * torch.log(weak_probs[j]) for j in range(c))
        total = total + loss
    return total / n


def _check_uskd(label_kind: str, seed: int = 0, n: int = 7, c: int = 6, **options) -> None:
    student, weak, teacher, label = _inputs(seed, n, c)
    target = label if label_kind == "index" else _mixed(label, c)
    needs_teacher = options.get("target_soft_label") in ("teacher", "ema")
    extra = (teacher,) if needs_teacher else ()
    weights = {"alpha": 0.7, "beta": 0.4, "mu": 0.05}
    _check_against(
        lambda student, weak: L.uskd_loss(student, weak, target, *extra, **weights, **options),
        lambda student, weak: _uskd_reference(student, weak, target, *extra, **weights, **options),
        {"student": student, "weak": weak},
    )


@pytest.mark.parametrize("label_kind", ["index", "mixup"])
@pytest.mark.parametrize("rank", L.USKD_RANKS)
def test_uskd_ranks_match_the_equations(rank, label_kind):
    _check_uskd(label_kind, seed=1, rank=rank)


@pytest.mark.parametrize("label_kind", ["index", "mixup"])
@pytest.mark.parametrize("target_soft_label", L.USKD_TARGET_SOFT_LABELS)
def test_uskd_target_soft_labels_match_the_equations(target_soft_label, label_kind):
    _check_uskd(label_kind, seed=2, target_soft_label=target_soft_label)


@pytest.mark.parametrize("label_kind", ["index", "mixup"])
@pytest.mark.parametrize("target_loss", L.USKD_TARGET_LOSSES)
def test_uskd_target_losses_match_the_equations(target_loss, label_kind):
    _check_uskd(label_kind, seed=3, target_loss=target_loss, target_soft_label="unsquared")
    _check_uskd(label_kind, seed=4, target_loss=target_loss, target_soft_label="ema")


@pytest.mark.parametrize("target_soft_label", ["squared", "softmax", "sqrt"])
@pytest.mark.parametrize("group", [3, 4, 7, 50])
def test_uskd_batch_mean_groups_match_the_equations(group, target_soft_label):
    _check_uskd("index", seed=5, n=7, batch_mean_group=group, target_soft_label=target_soft_label)


@pytest.mark.parametrize(
    "weights", [{"alpha": 0.0}, {"beta": 0.0}, {"mu": 0.0}, {"alpha": 0.0, "beta": 0.0}, {"beta": 0.0, "mu": 0.0}]
)
def test_uskd_with_zero_weights_matches_the_equations(weights):
    student, weak, _, label = _inputs(6, 6, 8)
    options = {"alpha": 0.7, "beta": 0.4, "mu": 0.05, **weights}
    _check_against(
        lambda student, weak: L.uskd_loss(student, weak, label, **options),
        lambda student, weak: _uskd_reference(student, weak, label, **options),
        {"student": student, "weak": weak},
    )


def test_batch_mean_groups_equal_separate_batches():
    # One device with batch 32 and groups of 16 sees what two devices with 16 each see (per-process batch mean).
    student, weak, _, label = _inputs(7, 32, 10)
    student.requires_grad_(True)
    grouped = L.uskd_loss(student, weak, label, batch_mean_group=16)
    halves = [L.uskd_loss(student[i : i + 16], weak[i : i + 16], label[i : i + 16]) for i in (0, 16)]
    assert grouped.item() == pytest.approx(sum(halves).item() / 2, rel=TOLERANCE)
    (grad_grouped,) = torch.autograd.grad(grouped, student)
    (grad_halves,) = torch.autograd.grad(sum(halves) / 2, student)
    _assert_close(grad_grouped, grad_halves, "gradient")
    whole = L.uskd_loss(student, weak, label)
    assert whole.item() != pytest.approx(grouped.item(), rel=1e-6)


def _forbid(monkeypatch, *names):
    for name in names:

        def refuse(*args, _name=name, **kwargs):
            raise AssertionError(f"{_name} ran although its part of USKD has weight 0")

        monkeypatch.setattr(uskd_module, name, refuse)


def test_target_only_uskd_never_builds_the_non_target_soft_labels(monkeypatch):
    # Table 6, target only (beta = 0): no rank, no sort, no non-target softmax; no weak logits needed at all with mu=0.
    student, weak, _, label = _inputs(8, 6, 9)
    expected = L.uskd_loss(student, weak, label, beta=0.0, mu=0.0)
    _forbid(monkeypatch, "_zipf_soft_labels", "_rank_scores", "_descending_order", "non_target_softmax")
    assert L.uskd_loss(student, weak, label, beta=0.0, mu=0.0).item() == expected.item()
    assert L.uskd_loss(student, None, label, beta=0.0, mu=0.0).item() == expected.item()
    reference = _uskd_reference(student, weak, label, beta=0.0, mu=0.0)
    assert expected.item() == pytest.approx(reference.item(), rel=TOLERANCE)


def test_non_target_only_uskd_never_builds_the_soft_target_values(monkeypatch):
    # Table 6, non-target only (alpha = 0): no soft target value, no target term.
    student, weak, _, label = _inputs(9, 6, 9)
    expected = L.uskd_loss(student, weak, label, alpha=0.0)
    _forbid(monkeypatch, "_soft_target_values", "_smoothed", "_target_term")
    assert L.uskd_loss(student, weak, label, alpha=0.0).item() == expected.item()


def test_final_logit_rank_without_weak_loss_needs_no_weak_logits():
    student, weak, _, label = _inputs(10, 5, 6)
    with_weak = L.uskd_loss(student, weak, label, rank="final", mu=0.0)
    assert L.uskd_loss(student, None, label, rank="final", mu=0.0).item() == with_weak.item()


def test_uskd_soft_labels_expose_the_variants():
    student, weak, teacher, label = _inputs(11, 8, 5)
    soft = L.uskd_soft_labels(student, weak, label, target_soft_label="max")
    target_probs = student.softmax(1).gather(1, label[:, None])
    torch.testing.assert_close(soft.target_values, target_probs / target_probs.max())
    soft = L.uskd_soft_labels(student, weak, label, teacher, target_soft_label="teacher")
    torch.testing.assert_close(soft.target_values, teacher.softmax(1).gather(1, label[:, None]))
    final = L.uskd_soft_labels(student, None, label, rank="final").non_target
    # Ranked by the student alone: the most probable non-target class gets the largest Zipf value.
    masked = student.scatter(1, label[:, None], -math.inf)
    assert torch.equal(final.argmax(1), masked.argmax(1))


@pytest.mark.parametrize("target_loss", L.USKD_TARGET_LOSSES)
def test_uskd_variants_stay_finite_when_probabilities_saturate(target_loss):
    student = torch.tensor([[0.0, -200, -300, -400, -500]] * 4, requires_grad=True)
    weak = torch.randn(4, 5, requires_grad=True)
    label = torch.zeros(4, dtype=torch.long)
    for soft_label in L.USKD_TARGET_SOFT_LABELS:
        extra = (torch.randn(4, 5),) if soft_label in ("teacher", "ema") else ()
        loss = L.uskd_loss(student, weak, label, *extra, target_soft_label=soft_label, target_loss=target_loss)
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), soft_label


# ---------------------------------------------------------------------------------------------------------------
# Zipf's LS, --upsample bilinear.


def test_bilinear_upsampled_dense_logits_equal_the_classifier_on_the_upsampled_feature_map():
    # The released code upsamples the feature map (F.upsample, align_corners=False), then applies the classifier.
    generator = torch.Generator().manual_seed(12)
    features = torch.randn(3, 8, 4, 4, generator=generator, dtype=torch.float64)
    head = torch.nn.Linear(8, 10).double()
    released = F.interpolate(features, scale_factor=2.0, mode="bilinear", align_corners=False)
    released = head(released.permute(0, 2, 3, 1).reshape(3, 64, 8))
    dense = head(features.permute(0, 2, 3, 1))  # (N, H, W, C)
    torch.testing.assert_close(L.upsample_dense_logits(dense), released, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(L.upsample_dense_logits(dense.reshape(3, 16, 10)), released, rtol=1e-12, atol=1e-12)

    logits, target = torch.randn(3, 10, generator=generator, dtype=torch.float64), torch.tensor([0, 4, 9])
    expected_zipf = L.zipf_ls_distribution(released, target[:, None], power=1.0)
    log_non_target = F.log_softmax(logits.scatter(1, target[:, None], -math.inf), dim=1)
    keep = expected_zipf > 0
    expected = (expected_zipf[keep] * (expected_zipf[keep].log() - log_non_target[keep])).sum() / 3
    for layout in (dense, dense.reshape(3, 16, 10)):
        ours = L.zipf_ls_loss(logits, layout, target, upsample="bilinear")
        assert ours.item() == pytest.approx(expected.item(), rel=TOLERANCE)
    assert L.zipf_ls_loss(logits, dense, target).item() == L.zipf_ls_loss(logits, dense.flatten(1, 2), target).item()


def test_bilinear_upsampling_of_a_non_square_location_list_is_refused():
    with pytest.raises(ValueError, match=re.escape("12 locations are not a square map, so pass the dense logits as")):
        L.zipf_ls_loss(torch.randn(2, 5), torch.randn(2, 12, 5), torch.tensor([0, 1]), upsample="bilinear")


# ---------------------------------------------------------------------------------------------------------------
# Bad option values: one error naming the option, the valid values and the closest one.


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda s, w, y: L.nkd_loss(s, w, y, target_loss="t3"),
            "target_loss: 't3' is not one of 't1', 't2', 't1+t2'",
        ),
        (
            lambda s, w, y: L.nkd_loss(s, w, y, non_target_loss="normalised"),
            "non_target_loss: 'normalised' is not one of 'normalized', 'kd', 'none' (did you mean 'normalized'?)",
        ),
        (
            lambda s, w, y: L.uskd_loss(s, w, y, rank="weakk"),
            "rank: 'weakk' is not one of 'paper', 'released', 'weak', 'final', 'sum' (did you mean 'weak'?)",
        ),
        (
            lambda s, w, y: L.uskd_loss(s, w, y, target_soft_label="square"),
            "target_soft_label: 'square' is not one of 'squared', 'unsquared', 'softmax', 'sqrt', 'max', 'mean', "
            "'teacher', 'ema' (did you mean 'squared'?)",
        ),
        (
            lambda s, w, y: L.uskd_loss(s, w, y, target_loss="binary"),
            "target_loss: 'binary' is not one of 't1', 't2', 't1+t2'",
        ),
        (
            lambda s, w, y: L.zipf_ls_loss(s, w[:, None], y, upsample="nearest"),
            "upsample: 'nearest' is not one of 'none', 'bilinear'",
        ),
        (
            lambda s, w, y: L.uskd_loss(s, w, y, target_soft_label="teacher"),
            "teacher_logits: target_soft_label='teacher' reads the target probability of another model; pass its "
            "logits (N, C)",
        ),
        (
            lambda s, w, y: L.uskd_loss(s, w, y, w),
            "teacher_logits: only used with target_soft_label 'teacher' or 'ema', not 'squared'",
        ),
        (lambda s, w, y: L.uskd_loss(s, None, y), "weak_logits: needed for the rank (beta > 0 with rank other than"),
        (
            lambda s, w, y: L.uskd_loss(s, w, y, batch_mean_group=-2),
            "batch_mean_group: must be an integer >= 0 (0: the whole batch), got -2",
        ),
        (
            lambda s, w, y: L.uskd_loss(s, w, y, batch_mean_group=1.5),
            "batch_mean_group: must be an integer >= 0 (0: the whole batch), got 1.5",
        ),
    ],
)
def test_bad_variant_options_name_the_valid_ones(call, message):
    student, weak = torch.randn(4, 5), torch.randn(4, 5)
    with pytest.raises(ValueError, match=re.escape(message)):
        call(student, weak, torch.tensor([0, 1, 2, 3]))
