"""Loss library: parity with the authors' released code, the paper's equations, invariances and bad input."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import unikd.losses as L

REFERENCE = np.load(Path(__file__).parent / "data" / "official_losses.npz")
CASES = sorted({re.match(r"([a-z]+_\d+)_", key).group(1) for key in REFERENCE.files})
RTOL = 1e-8


def _case(name: str) -> dict[str, np.ndarray]:
    return {key[len(name) + 1 :]: REFERENCE[key] for key in REFERENCE.files if key.startswith(name + "_")}


def _assert_close(actual: torch.Tensor, expected: np.ndarray, what: str) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    scale = expected.abs().max().clamp_min(1e-12)
    error = ((actual.detach() - expected).abs().max() / scale).item()
    assert error < RTOL, f"{what}: relative error {error:.2e}"


def test_reference_covers_every_loss():
    assert {name.split("_")[0] for name in CASES} == {"nkd", "dkd", "kd", "wsld", "uskd"}


@pytest.mark.parametrize("case", CASES)
def test_matches_released_code(case):
    arrays = _case(case)
    kind = case.split("_")[0]
    student = torch.tensor(arrays["logit_s"], requires_grad=True)
    teacher = torch.tensor(arrays["logit_t"]) if "logit_t" in arrays else None
    label = torch.tensor(arrays["label"]) if "label" in arrays else None
    extra = {}
    if kind == "nkd":
        loss = L.nkd_loss(student, teacher, label, temperature=float(arrays["temp"]), gamma=float(arrays["gamma"]))
    elif kind == "kd":
        loss = L.kd_loss(student, teacher, temperature=float(arrays["temp"]))
    elif kind == "dkd":
        hp = {k: float(arrays[k]) for k in ("alpha", "beta")}
        loss = L.dkd_loss(student, teacher, label, temperature=float(arrays["temp"]), **hp)
    elif kind == "wsld":
        loss = L.wsld_loss(student, teacher, label, temperature=float(arrays["temp"]))
    else:
        feature = torch.tensor(arrays["feat"], requires_grad=True)
        fc_weight = torch.tensor(arrays["fc_weight"], requires_grad=True)
        weak_logits = feature @ fc_weight.T + torch.tensor(arrays["fc_bias"])
        hp = {k: float(arrays[k]) for k in ("alpha", "beta", "mu")}
        loss = L.uskd_loss(student, weak_logits, label, rank="released", **hp)
        extra = {"grad_feat": feature, "grad_fc_weight": fc_weight}
    loss.backward()
    _assert_close(loss, arrays["loss"], "loss")
    _assert_close(student.grad, arrays["grad_s"], "grad_s")
    for key, tensor in extra.items():
        _assert_close(tensor.grad, arrays[key], key)


# ---------------------------------------------------------------------------------------------------------------
# USKD paper mode, written from the equations with plain loops (independent of the vectorised implementation).


def _uskd_paper_reference(student, weak, label, alpha, beta, mu):
    """Eq. 6-13 for hard labels, numpy float64, one sample at a time (the batch mean of S_t^2 excepted)."""
    n, c = student.shape
    softmax = lambda x: np.exp(x - x.max()) / np.exp(x - x.max()).sum()  # noqa: E731
    s_probs = np.stack([softmax(row) for row in student])
    w_probs = np.stack([softmax(row) for row in weak])
    s_target = s_probs[np.arange(n), label]
    soft_target = s_target**2 + 1 - np.mean(s_target**2)
    total = 0.0
    for i in range(n):
        t = label[i]
        loss_target = -soft_target[i] * np.log(s_probs[i, t])
        score = w_probs[i] / (1 - w_probs[i, t] + 1e-6) + s_probs[i] / (1 - s_probs[i, t] + 1e-6)
        order = sorted(range(c), key=lambda j: -score[j])
        zipf = np.zeros(c)
        for position, j in enumerate(order):
            zipf[j] = 1.0 / (position + 1)
        zipf[t] = 0.0
        zipf /= zipf.sum()
        non_target = [j for j in range(c) if j != t]
        log_norm = (
            np.log(np.exp(student[i, non_target] - student[i, non_target].max()).sum()) + student[i, non_target].max()
        )
        loss_non = -sum(zipf[j] * (student[i, j] - log_norm) for j in non_target)
        smoothed = np.full(c, 0.1 / c)
        smoothed[t] += 0.9
        loss_weak = -mu * (smoothed * np.log(w_probs[i])).sum()
        total += alpha * loss_target + beta * loss_non + loss_weak
    return total / n


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("num_classes", [2, 7, 100])
def test_uskd_paper_mode_matches_equations(seed, num_classes):
    generator = np.random.default_rng(seed)
    student = generator.normal(size=(6, num_classes)) * 3
    weak = generator.normal(size=(6, num_classes)) * 2
    label = generator.integers(0, num_classes, size=6)
    expected = _uskd_paper_reference(student, weak, label, alpha=0.7, beta=0.3, mu=0.05)
    actual = L.uskd_loss(
        torch.tensor(student), torch.tensor(weak), torch.tensor(label), alpha=0.7, beta=0.3, mu=0.05, rank="paper"
    )
    assert actual.item() == pytest.approx(expected, rel=1e-10)


def test_uskd_rank_modes_differ_where_paper_says():
    # The released rank is dominated by log S (its magnitude), the paper's mixes both probabilities.
    student = torch.tensor([[4.0, 3.0, 0.0, -1.0, -2.0]])
    weak = torch.tensor([[0.0, 0.0, 0.0, 8.0, 0.0]])  # the weak head strongly prefers class 3
    target = torch.tensor([0])
    paper = L.uskd_soft_labels(student, weak, target, rank="paper").non_target
    released = L.uskd_soft_labels(student, weak, target, rank="released").non_target
    assert paper[0].argmax().item() == 3
    assert released[0].argmax().item() == 1


def test_uskd_soft_labels_shapes_and_values():
    torch.manual_seed(0)
    student, weak = torch.randn(8, 10), torch.randn(8, 10)
    target = torch.randint(0, 10, (8,))
    soft = L.uskd_soft_labels(student, weak, target)
    assert soft.target_classes.shape == (8, 1) and soft.target_values.shape == (8, 1)
    assert torch.equal(soft.target_classes[:, 0], target)
    s_target = student.softmax(1).gather(1, target[:, None])
    torch.testing.assert_close(soft.target_values, s_target**2 + 1 - (s_target**2).mean())
    assert torch.all(soft.non_target.gather(1, target[:, None]) == 0)
    torch.testing.assert_close(soft.non_target.sum(1), torch.ones(8))
    # Zipf: sorted non-zero values are 1/rank renormalised, so their ratios are (r+1)/r.
    values = soft.non_target[0][soft.non_target[0] > 0].sort(descending=True).values
    assert values[0] / values[-1] > 1


def test_uskd_probability_targets_use_two_targets():
    torch.manual_seed(1)
    student, weak = torch.randn(4, 6), torch.randn(4, 6)
    target = torch.zeros(4, 6)
    target[:, 1], target[:, 4] = 0.7, 0.3
    soft = L.uskd_soft_labels(student, weak, target)
    assert soft.target_classes.tolist() == [[1, 4]] * 4
    assert torch.all(soft.non_target[:, [1, 4]] == 0)


# ---------------------------------------------------------------------------------------------------------------
# Semantics of the self-KD baselines and of probability targets.


def test_label_smoothing_is_torch_label_smoothing():
    logits, target = torch.randn(5, 7), torch.randint(0, 7, (5,))
    expected = F.cross_entropy(logits, target, label_smoothing=0.2)
    assert L.label_smoothing_loss(logits, target, smoothing=0.2).item() == pytest.approx(expected.item())


def test_tfkd_matches_released_formula():
    # Released: nn.KLDivLoss()(log_softmax(out), softmax(teacher_soft / T)) * multiplier, with multiplier = C.
    torch.manual_seed(2)
    logits, target = torch.randn(6, 100, dtype=torch.float64), torch.randint(0, 100, (6,))
    teacher_soft = torch.full((6, 100), 0.01 / 99, dtype=torch.float64)
    teacher_soft[torch.arange(6), target] = 0.99
    released = (
        torch.nn.KLDivLoss(reduction="sum")(F.log_softmax(logits, 1), F.softmax(teacher_soft / 20, 1)) / (6 * 100) * 100
    )
    assert L.tfkd_loss(logits, target).item() == pytest.approx(released.item(), rel=1e-10)


def test_zipf_ls_ranks_by_votes_with_min_ties():
    # 4 locations vote: class 2 twice, class 0 once, class 3 once; classes 1, 4 have no vote. Target is class 0.
    dense = torch.full((1, 4, 5), -5.0)
    for location, cls in enumerate([2, 2, 0, 3]):
        dense[0, location, cls] = 5.0
    distribution = L.zipf_ls_distribution(dense, torch.tensor([[0]]), power=1.0)
    # scipy rankdata(-votes, "min"): votes [1, 0, 2, 1, 0] -> ranks [2, 4, 1, 2, 4]; target 0 removed.
    expected = torch.tensor([0.0, 1 / 4, 1 / 1, 0.0, 1 / 4])
    expected[3] = 1 / 2
    torch.testing.assert_close(distribution[0], expected / expected.sum())


def test_zipf_ls_is_kl_to_the_distribution():
    torch.manual_seed(3)
    logits, dense, target = torch.randn(3, 6), torch.randn(3, 9, 6), torch.tensor([0, 5, 2])
    distribution = L.zipf_ls_distribution(dense, target[:, None], power=1.0)
    expected = 0.0
    for i in range(3):
        keep = [j for j in range(6) if j != target[i]]
        log_q = F.log_softmax(logits[i, keep], 0)
        p = distribution[i, keep]
        expected += (p * (p.log() - log_q)).sum() / 3
    assert L.zipf_ls_loss(logits, dense, target).item() == pytest.approx(expected.item(), rel=1e-5)


def test_dkd_probability_targets_are_the_mixture_of_hard_targets():
    torch.manual_seed(4)
    student, teacher = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    first, second = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([7, 6, 5, 0, 1])
    lam = torch.tensor([0.9, 0.8, 0.6, 0.7, 0.55], dtype=torch.float64)
    probs = lam[:, None] * F.one_hot(first, 8) + (1 - lam[:, None]) * F.one_hot(second, 8)

    def per_sample(target):
        return torch.stack([L.dkd_loss(student[i : i + 1], teacher[i : i + 1], target[i : i + 1]) for i in range(5)])

    expected = (lam * per_sample(first) + (1 - lam) * per_sample(second)).mean()
    assert L.dkd_loss(student, teacher, probs).item() == pytest.approx(expected.item(), rel=1e-10)


def test_nkd_equals_kd_decomposition():
    # Paper Sec. 3: KD (T=1, CE form) = -T_t log S_t - (1 - T_t) log(1 - S_t) + (1 - T_t) * CE(N(T), N(S)),
    # and NKD's non-target term is CE(N(T), N(S)) weighted by gamma; so for one sample KD = NKD(gamma = 1 - T_t)
    # - (1 - T_t) log(1 - S_t).
    torch.manual_seed(5)
    for _ in range(5):
        student, teacher = torch.randn(1, 10, dtype=torch.float64), torch.randn(1, 10, dtype=torch.float64)
        target = torch.randint(0, 10, (1,))
        teacher_target = teacher.softmax(1)[0, target].item()
        student_target = student.softmax(1)[0, target].item()
        nkd = L.nkd_loss(student, teacher, target, temperature=1.0, gamma=1 - teacher_target)
        kd = L.kd_loss(student, teacher, temperature=1.0)
        expected = nkd.item() - (1 - teacher_target) * math.log(1 - student_target)
        assert kd.item() == pytest.approx(expected, rel=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# Properties over every loss.


def _all_losses(student, teacher, target, weak, dense):
    return {
        "ce": L.cross_entropy(student, target),
        "ls": L.label_smoothing_loss(student, target),
        "kd": L.kd_loss(student, teacher),
        "nkd": L.nkd_loss(student, teacher, target, temperature=2.0),
        "dkd": L.dkd_loss(student, teacher, target),
        "wsld": L.wsld_loss(student, teacher, target),
        "uskd": L.uskd_loss(student, weak, target),
        "uskd_released": L.uskd_loss(student, weak, target, rank="released"),
        "nkd_binary_kd_terms": L.nkd_loss(student, teacher, target, target_loss="t1+t2", non_target_loss="kd"),
        "uskd_variants": L.uskd_loss(
            student, weak, target, rank="sum", target_soft_label="softmax", target_loss="t1+t2", batch_mean_group=2
        ),
        "zipf_ls_bilinear": L.zipf_ls_loss(student, dense, target, upsample="bilinear"),
        "tfkd": L.tfkd_loss(student, target),
        "zipf_ls": L.zipf_ls_loss(student, dense, target),
    }


def _inputs(seed, n, c, scale=3.0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=generator, dtype=dtype) * scale  # noqa: E731
    target = torch.randint(0, c, (n,), generator=generator)
    return randn(n, c), randn(n, c), target, randn(n, c), randn(n, 4, c)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 6), c=st.integers(2, 12), shift=st.floats(-50, 50))
def test_adding_a_constant_to_all_logits_changes_nothing(seed, n, c, shift):
    student, teacher, target, weak, dense = _inputs(seed, n, c)
    base = _all_losses(student, teacher, target, weak, dense)
    shifted = _all_losses(student + shift, teacher + shift, target, weak + shift, dense + shift)
    for name in base:
        assert shifted[name].item() == pytest.approx(base[name].item(), rel=1e-9, abs=1e-9), name


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 5), c=st.integers(2, 9))
def test_one_hot_probabilities_equal_indices(seed, n, c):
    student, teacher, target, weak, dense = _inputs(seed, n, c)
    one_hot = F.one_hot(target, c).to(student.dtype)
    by_index = _all_losses(student, teacher, target, weak, dense)
    by_probs = _all_losses(student, teacher, one_hot, weak, dense)
    for name in by_index:
        assert by_probs[name].item() == pytest.approx(by_index[name].item(), rel=1e-9), name


@pytest.mark.parametrize(("n", "c"), [(1, 2), (1, 10), (3, 2), (4, 1000)])
@pytest.mark.parametrize("scale", [1.0, 1e4])
@pytest.mark.parametrize("mixed", [False, True])
def test_finite_values_and_gradients(n, c, scale, mixed):
    student, teacher, target, weak, dense = _inputs(n * c, n, c, scale=scale, dtype=torch.float32)
    if mixed:
        other = (target + 1) % c
        target = 0.6 * F.one_hot(target, c) + 0.4 * F.one_hot(other, c)
    student.requires_grad_(True)
    weak.requires_grad_(True)
    for name, loss in _all_losses(student, teacher, target, weak, dense).items():
        assert loss.dim() == 0 and torch.isfinite(loss), name
        (grad_student,) = torch.autograd.grad(loss, student, retain_graph=True)
        assert torch.isfinite(grad_student).all(), name


def test_no_gradient_reaches_teacher_or_soft_labels():
    student, teacher, target, weak, dense = _inputs(0, 4, 6)
    teacher.requires_grad_(True)
    dense.requires_grad_(True)
    weak.requires_grad_(True)
    for loss in (
        L.kd_loss(student, teacher),
        L.nkd_loss(student, teacher, target),
        L.dkd_loss(student, teacher, target),
    ):
        assert not loss.requires_grad  # only the (non-trainable here) student could carry a graph
    student.requires_grad_(True)
    total = sum(_all_losses(student, teacher, target, weak, dense).values())
    total.backward()
    assert teacher.grad is None and dense.grad is None
    soft = L.uskd_soft_labels(student, weak, target)
    assert not any(t.requires_grad for t in soft)
    # The weak logits get gradient only from L_weak: mu * (softmax(weak) - smoothed label) / N.
    weak.grad = None
    L.uskd_loss(student, weak, target, mu=0.5).backward()
    smoothed = 0.9 * F.one_hot(target, 6) + 0.1 / 6
    torch.testing.assert_close(weak.grad, 0.5 * (weak.softmax(1) - smoothed) / 4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_under_autocast(dtype):
    student, teacher, target, weak, dense = _inputs(7, 8, 100, scale=4.0, dtype=torch.float32)
    reference = _all_losses(student, teacher, target, weak, dense)
    half = [t.to(dtype) for t in (student, teacher, weak, dense)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        results = _all_losses(half[0], half[1], target, half[2], half[3])
    for name, loss in results.items():
        assert loss.dtype == torch.float32 and torch.isfinite(loss), name
        # Inputs were rounded to half precision; the arithmetic itself is float32.
        assert loss.item() == pytest.approx(reference[name].item(), rel=0.05, abs=0.05), name


def test_modules_wrap_functions():
    student, teacher, target, weak, dense = _inputs(8, 4, 5)
    assert L.NKDLoss(gamma=2.0)(student, teacher, target).item() == L.nkd_loss(student, teacher, target, gamma=2.0)
    assert L.USKDLoss(rank="released")(student, weak, target).item() == L.uskd_loss(
        student, weak, target, rank="released"
    )
    assert L.ZipfLSLoss()(student, dense, target).item() == L.zipf_ls_loss(student, dense, target).item()
    assert "temperature=3.0" in repr(L.KDLoss(temperature=3.0))
    with pytest.raises(TypeError, match=r"NKDLoss: unknown hyper-parameter 'gama' \(did you mean 'gamma'\?\)"):
        L.NKDLoss(gama=1.0)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a ValueError naming the argument, what was seen and what was expected.


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s, t, y: L.nkd_loss(s[0], t, y), "student_logits: expected shape (N, C) with C >= 2 classes, got (5,)"),
        (
            lambda s, t, y: L.nkd_loss(s, t[:, :4], y),
            "teacher_logits: shape (4, 4) does not match student_logits (4, 5); both must be (N, C)",
        ),
        (
            lambda s, t, y: L.dkd_loss(s, t, y[:3]),
            "target: expected class indices (4,) or probabilities (4, 5) for logits of shape (4, 5), got shape (3,)",
        ),
        (lambda s, t, y: L.wsld_loss(s, t, y + 5), "target: class indices must be in [0, 5), got values from"),
        (
            lambda s, t, y: L.kd_loss(s.long(), t),
            "student_logits: expected floating-point logits, got dtype torch.int64",
        ),
        (lambda s, t, y: L.uskd_loss(s, t, y, rank="paperr"), "rank: 'paperr' is not one of 'paper', 'released'"),
        (lambda s, t, y: L.nkd_loss(s, t, y.float()), "target: class indices (N,) must be an integer tensor"),
        (
            lambda s, t, y: L.cross_entropy(s, t[:, :3]),
            "target: expected class indices (4,) or probabilities (4, 5) for logits of shape (4, 5), got shape (4, 3)",
        ),
        (lambda s, t, y: L.cross_entropy(s, t), "target: probability rows must be non-negative and sum to 1"),
        (lambda s, t, y: L.kd_loss(s, t, temperature=0), "temperature: must be > 0, got 0"),
        (lambda s, t, y: L.zipf_ls_loss(s, t, y), "dense_logits: Zipf's LS needs per-location logits"),
        (
            lambda s, t, y: L.cross_entropy(s, y[None]),
            "target: expected class indices (4,) or probabilities (4, 5) for logits of shape (4, 5), got shape (1, 4)",
        ),
    ],
)
def test_bad_input_is_a_clear_value_error(call, message):
    student, teacher = torch.randn(4, 5), torch.randn(4, 5)
    target = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=re.escape(message)):
        call(student, teacher, target)


def test_validate_switch_skips_value_checks():
    student = torch.randn(2, 3)
    # Shape checks always run, value checks only when asked (here off): an out-of-range index reaches torch.
    with pytest.raises(ValueError, match="got shape"):
        L.cross_entropy(student, torch.tensor([0, 1, 2]), validate=False)
    with pytest.raises(IndexError):
        L.cross_entropy(student, torch.tensor([0, 7]), validate=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uskd_rank_order_breaks_ties_by_lower_index(dtype):
    from unikd.losses._uskd import _descending_order

    generator = torch.Generator().manual_seed(0)
    scores = (torch.randn(64, 300, generator=generator) * 4).round().to(dtype)  # many ties, both signs
    scores[0] = 1.5  # a row of equal scores
    order = _descending_order(scores)
    assert torch.equal(order, scores.argsort(dim=1, descending=True, stable=True))
    assert order[0].tolist() == list(range(300))


def test_saturated_teacher_or_student_stays_finite():
    # A target probability of exactly 1.0 in float32 (log(1 - p) = -inf if formed naively).
    saturated = torch.tensor([[0.0, -200, -300, -400, -500]] * 4)
    target = torch.zeros(4, dtype=torch.long)
    for student, teacher in ((torch.randn(4, 5), saturated), (saturated.clone(), torch.randn(4, 5))):
        student.requires_grad_(True)
        for loss in (L.dkd_loss(student, teacher, target), L.nkd_loss(student, teacher, target)):
            (grad,) = torch.autograd.grad(loss, student)
            assert torch.isfinite(loss) and torch.isfinite(grad).all()
