"""The method registry and every method's contract: keys, targets, gradients, defaults, errors, and learning."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unikd import losses
from unikd.methods import METHODS, StudentOutput, create_method, forward_student, method_defaults

NUM_CLASSES = 5
FEATURE_DIM = 6
NUM_LOCATIONS = 4

EXPECTED_KEYS = {
    "baseline": {"loss_ce"},
    "ls": {"loss_ls"},
    "tfkd": {"loss_ce", "loss_tfkd"},
    "zipf_ls": {"loss_ce", "loss_zipf"},
    "uskd": {"loss_ce", "loss_uskd"},
    "kd": {"loss_ce", "loss_kd"},
    "dkd": {"loss_ce", "loss_dkd"},
    "nkd": {"loss_ce", "loss_nkd"},
    "wsld": {"loss_ce", "loss_wsld"},
}
TEACHER_METHODS = {"kd", "dkd", "nkd", "wsld"}


def _outputs(batch: int = 8, seed: int = 0) -> tuple[StudentOutput, torch.Tensor]:
    """Random student outputs (all three fields, leaves that require grad) and teacher logits."""
    gen = torch.Generator().manual_seed(seed)
    student = StudentOutput(
        logits=torch.randn(batch, NUM_CLASSES, generator=gen).requires_grad_(),
        feature=torch.randn(batch, FEATURE_DIM, generator=gen).requires_grad_(),
        dense_logits=torch.randn(batch, NUM_LOCATIONS, NUM_CLASSES, generator=gen).requires_grad_(),
    )
    teacher_logits = (2 * torch.randn(batch, NUM_CLASSES, generator=gen)).requires_grad_()
    return student, teacher_logits


def _targets(batch: int = 8) -> dict[str, torch.Tensor]:
    """Hard indices and mixup-style probabilities (two classes mixed 0.7 / 0.3)."""
    hard = torch.arange(batch) % NUM_CLASSES
    mixed = 0.7 * F.one_hot(hard, NUM_CLASSES).float() + 0.3 * F.one_hot(hard.roll(1), NUM_CLASSES).float()
    return {"index": hard, "mixup": mixed}


def test_registry_lists_the_methods_of_the_trainer_issue():
    assert set(METHODS) == set(EXPECTED_KEYS)
    assert {name for name, cls in METHODS.items() if cls.needs_teacher} == TEACHER_METHODS


@pytest.mark.parametrize("target_kind", ["index", "mixup"])
@pytest.mark.parametrize("name", sorted(EXPECTED_KEYS))
def test_terms_are_finite_scalars_with_the_right_keys(name, target_kind):
    method = create_method(name, NUM_CLASSES, feature_dim=FEATURE_DIM)
    student, teacher_logits = _outputs()
    terms = method(student, _targets()[target_kind], teacher_logits=teacher_logits, progress=30.0)
    assert set(terms) == EXPECTED_KEYS[name]
    for key, value in terms.items():
        assert value.shape == (), key
        assert torch.isfinite(value), key


@pytest.mark.parametrize("name", sorted(EXPECTED_KEYS))
def test_gradients_reach_the_student_and_never_the_teacher(name):
    method = create_method(name, NUM_CLASSES, feature_dim=FEATURE_DIM)
    student, teacher_logits = _outputs()
    terms = method(student, _targets()["index"], teacher_logits=teacher_logits, progress=30.0)
    sum(terms.values()).backward()
    assert student.logits.grad is not None and student.logits.grad.abs().sum() > 0
    assert teacher_logits.grad is None
    if name == "uskd":
        assert student.feature.grad.abs().sum() > 0
        assert method.weak_head.weight.grad.abs().sum() > 0
    if name == "zipf_ls":
        # The Zipf prior is built from the dense votes, not differentiated through them.
        assert student.dense_logits.grad is None


@pytest.mark.parametrize("name", sorted(EXPECTED_KEYS))
def test_distillation_term_changes_the_gradient_beyond_ce(name):
    """Each distillation term contributes: the loss is not just a rescaled CE."""
    method = create_method(name, NUM_CLASSES, feature_dim=FEATURE_DIM)
    student, teacher_logits = _outputs()
    target = _targets()["index"]
    sum(method(student, target, teacher_logits=teacher_logits, progress=30.0).values()).backward()
    ce_grad = torch.autograd.grad(F.cross_entropy(student.logits, target), student.logits)[0]
    cosine = F.cosine_similarity(student.logits.grad.flatten(), ce_grad.flatten(), dim=0)
    if name == "baseline":
        assert cosine == pytest.approx(1.0, abs=1e-6)
    else:
        assert cosine < 0.9999


def test_dkd_warmup_scales_the_dkd_term_linearly_over_20_epochs():
    method = create_method("dkd", NUM_CLASSES)
    student, teacher_logits = _outputs()
    target = _targets()["index"]
    full = method(student, target, teacher_logits, progress=20.0)["loss_dkd"]
    for progress, scale in [(0.0, 0.0), (1.0, 0.05), (5.0, 0.25), (10.5, 0.525), (20.0, 1.0), (200.0, 1.0)]:
        terms = method(student, target, teacher_logits, progress=progress)
        torch.testing.assert_close(terms["loss_dkd"], scale * full)
        torch.testing.assert_close(terms["loss_ce"], F.cross_entropy(student.logits, target))


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss:UserWarning")  # released code's reduction
def test_tfkd_matches_the_released_loss_function():
    """Yuan et al.'s ``loss_kd_regularization``, re-typed here: (1 - alpha) CE + alpha * multiplier * KLDivLoss()."""
    alpha, temperature, multiplier, correct_prob = 0.1, 20.0, 100.0, 0.99
    student, _ = _outputs(batch=16)
    target = torch.arange(16) % NUM_CLASSES
    teacher_soft = torch.full((16, NUM_CLASSES), (1 - correct_prob) / (NUM_CLASSES - 1))
    teacher_soft[torch.arange(16), target] = correct_prob
    kl = nn.KLDivLoss(reduction="mean")(F.log_softmax(student.logits, dim=1), F.softmax(teacher_soft / temperature, 1))
    released = (1 - alpha) * F.cross_entropy(student.logits, target) + alpha * kl * multiplier
    released_grad = torch.autograd.grad(released, student.logits)[0]

    method = create_method("tfkd", NUM_CLASSES)
    ours_grad = torch.autograd.grad(sum(method(student, target).values()), student.logits)[0]
    # Gradients, not values: a cross-entropy form of the KL differs from it by a constant.
    torch.testing.assert_close(ours_grad, released_grad)


def test_defaults_follow_the_papers_and_released_configs():
    assert method_defaults("baseline") == {}
    assert method_defaults("ls") == {"smoothing": 0.1}
    assert method_defaults("tfkd") == {"alpha": 0.1, "multiplier": 100.0, "temperature": 20.0, "correct_prob": 0.99}
    assert method_defaults("zipf_ls") == {"loss_lambda": 0.1, "power": 1.0, "upsample": "none"}
    assert method_defaults("uskd") == {
        "alpha": 1.0,
        "beta": 0.1,
        "mu": 0.005,
        "rank": "paper",
        "target_soft_label": "squared",
        "target_loss": "t1",
        "batch_mean_group": 0,
        "weak_norm": "none",
    }
    assert method_defaults("kd") == {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}
    assert method_defaults("dkd") == {"temperature": 4.0, "alpha": 1.0, "beta": 8.0, "ce_weight": 1.0, "warmup": 20.0}
    assert method_defaults("nkd") == {
        "temperature": 1.0,
        "gamma": 1.5,
        "ce_weight": 1.0,
        "target_loss": "t1",
        "non_target_loss": "normalized",
    }
    assert method_defaults("wsld") == {"temperature": 2.0, "alpha": 2.5, "ce_weight": 1.0}


def test_hyper_parameters_reach_the_method():
    kd = create_method("kd", NUM_CLASSES, temperature=2.0, ce_weight=1.0, kd_weight=0.0)
    student, teacher_logits = _outputs()
    target = _targets()["index"]
    assert kd.temperature == 2.0
    # kd_weight=0 leaves plain CE (the zero-weight term is dropped, not computed).
    terms = kd(student, target, teacher_logits)
    assert set(terms) == {"loss_ce"}
    torch.testing.assert_close(terms["loss_ce"], F.cross_entropy(student.logits, target))


def test_uskd_weak_head_is_a_trained_checkpointed_submodule():
    method = create_method("uskd", NUM_CLASSES, feature_dim=FEATURE_DIM, alpha=0.1, mu=0.1)
    assert method.student_output == "feature"
    assert {"weak_head.weight", "weak_head.bias"} == set(method.state_dict())
    assert method.weak_head.weight.shape == (NUM_CLASSES, FEATURE_DIM)
    assert (method.alpha, method.beta, method.mu) == (0.1, 0.1, 0.1)


def test_unknown_method_names_the_valid_ones():
    valid = "baseline, dkd, kd, ls, nkd, tfkd, uskd, wsld, zipf_ls"
    message = f"method.name: 'uskdd' is not one of {valid} (did you mean 'uskd'?)"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        create_method("uskdd", NUM_CLASSES)
    message = f"method.name: 'xyz' is not one of {valid}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        method_defaults("xyz")


def test_unknown_hyper_parameter_is_rejected_with_a_suggestion():
    message = (
        "method.temprature: unknown hyper-parameter of method 'nkd' (did you mean 'temperature'?); "
        "valid: ce_weight, gamma, non_target_loss, target_loss, temperature"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        create_method("nkd", NUM_CLASSES, temprature=2.0)


@pytest.mark.parametrize("name", sorted(TEACHER_METHODS))
def test_teacher_method_without_teacher_logits_fails_clearly(name):
    method = create_method(name, NUM_CLASSES)
    student, _ = _outputs()
    message = f"method '{name}' needs teacher_logits: set model.teacher"
    with pytest.raises(ValueError, match=re.escape(message)):
        method(student, _targets()["index"])


def test_uskd_without_feature_dim_or_with_a_bad_rank_fails_clearly():
    with pytest.raises(ValueError, match=re.escape("method 'uskd' needs feature_dim")):
        create_method("uskd", NUM_CLASSES)
    message = "method.rank: 'paperr' is not one of final, paper, released, sum, weak (did you mean 'paper'?)"
    with pytest.raises(ValueError, match=re.escape(message)):
        create_method("uskd", NUM_CLASSES, feature_dim=FEATURE_DIM, rank="paperr")
    assert create_method("uskd", NUM_CLASSES, feature_dim=FEATURE_DIM, rank="released").rank == "released"


def test_forward_student_returns_what_the_method_asks_for():
    models = pytest.importorskip("unikd.models")
    model = models.create_model("cifar/smallcnn", num_classes=NUM_CLASSES, in_chans=1)
    images = torch.randn(2, 1, 28, 28)
    plain = forward_student(model, images, None)
    assert plain.logits.shape == (2, NUM_CLASSES) and plain.feature is None and plain.dense_logits is None
    with_feature = forward_student(model, images, "feature")
    assert with_feature.feature.shape == (2, models.feature_dim(model))
    torch.testing.assert_close(with_feature.logits, plain.logits)
    dense = forward_student(model, images, "dense_logits")
    assert dense.dense_logits.shape[0] == 2 and dense.dense_logits.shape[2] == NUM_CLASSES
    feature_map = forward_student(model, images, "feature_map")  # (N, L, D) whose mean over L is the feature
    assert feature_map.feature.dim() == 3 and feature_map.feature.shape[::2] == (2, models.feature_dim(model))
    torch.testing.assert_close(feature_map.feature.mean(1), with_feature.feature)
    message = "student_output must be None, 'feature', 'feature_map' or 'dense_logits', got 'feat'"
    with pytest.raises(ValueError, match=re.escape(message)):
        forward_student(model, images, "feat")


class _TokenStudent(nn.Module):
    """A toy student on (N, L, d) token inputs: a shared MLP embedding per token, mean-pooled, then a classifier.

    Like a CNN it has a pooled feature (for USKD's weak head) and a per-location classifier output (Zipf's LS).
    """

    def __init__(self, in_dim: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, tokens: torch.Tensor) -> StudentOutput:
        hidden = self.embed(tokens)  # (N, L, hidden)
        feature = hidden.mean(dim=1)
        return StudentOutput(logits=self.head(feature), feature=feature, dense_logits=self.head(hidden))


@pytest.mark.parametrize("name", sorted(EXPECTED_KEYS))
def test_every_method_learns_a_separable_toy_problem(name):
    torch.manual_seed(0)
    num_classes, tokens, in_dim, hidden = 4, 4, 8, 16
    centers = 1.5 * torch.randn(num_classes, in_dim)
    labels = torch.arange(512) % num_classes
    inputs = centers[labels].unsqueeze(1) + torch.randn(512, tokens, in_dim)
    # Teacher: half the negative squared distance to each center, averaged over tokens (Bayes-optimal up to a scale).
    teacher_logits = -0.5 * ((inputs.unsqueeze(2) - centers).pow(2).sum(-1)).mean(1)

    student = _TokenStudent(in_dim, hidden, num_classes)
    method = create_method(name, num_classes, feature_dim=hidden)
    optimizer = torch.optim.SGD([*student.parameters(), *method.parameters()], lr=0.05, momentum=0.9)

    # 8 batches per epoch, 10 epochs, with progress in epochs as the trainer passes it: DKD's warm-up matters here,
    # its term at full weight from the first step is unstable at this learning rate.
    steps_per_epoch, epochs = 8, 10

    def evaluate() -> tuple[float, float]:
        with torch.no_grad():
            out = student(inputs)
            loss = sum(method(out, labels, teacher_logits, progress=float(epochs)).values())
            return loss.item(), (out.logits.argmax(1) == labels).float().mean().item()

    loss_before, accuracy_before = evaluate()
    for step in range(steps_per_epoch * epochs):
        batch = torch.arange(64) + 64 * (step % steps_per_epoch)
        progress = step / steps_per_epoch
        terms = method(student(inputs[batch]), labels[batch], teacher_logits[batch], progress=progress)
        optimizer.zero_grad()
        sum(terms.values()).backward()
        optimizer.step()
    loss_after, accuracy_after = evaluate()
    assert loss_after < 0.7 * loss_before
    assert accuracy_before < 0.5
    assert accuracy_after > 0.9


# ---------------------------------------------------------------------------------------------------------------
# The paper's ablation variants as method options (issue 11): they reach the loss, and each instance declares what
# the trainer must give it.

VARIANTS = [
    ("nkd", {"target_loss": "t2"}),
    ("nkd", {"target_loss": "t1+t2", "non_target_loss": "kd", "temperature": 2.0}),
    ("nkd", {"non_target_loss": "none"}),
    ("uskd", {"rank": "weak"}),
    ("uskd", {"rank": "sum", "target_soft_label": "softmax"}),
    ("uskd", {"target_soft_label": "unsquared", "target_loss": "t1+t2"}),
    ("uskd", {"target_soft_label": "teacher"}),
    ("uskd", {"target_soft_label": "ema", "target_loss": "t2"}),
    ("uskd", {"beta": 0.0, "mu": 0.0}),
    ("uskd", {"alpha": 0.0}),
    ("uskd", {"batch_mean_group": 4}),
    ("zipf_ls", {"upsample": "bilinear"}),
]


@pytest.mark.parametrize(("name", "params"), VARIANTS, ids=lambda x: str(x))
def test_variants_reach_the_loss_and_train(name, params):
    method = create_method(name, NUM_CLASSES, feature_dim=FEATURE_DIM, **params)
    student, teacher_logits = _outputs()
    student = StudentOutput(student.logits, student.feature, student.dense_logits.reshape(8, 4, NUM_CLASSES))
    target = _targets()["index"]
    terms = method(student, target, teacher_logits=teacher_logits)
    term = terms[f"loss_{method.term_name}"]
    if name == "nkd":
        expected = losses.nkd_loss(student.logits, teacher_logits, target, **params)
    elif name == "zipf_ls":
        expected = 0.1 * losses.zipf_ls_loss(student.logits, student.dense_logits, target, **params)
    else:
        weak = method.weak_head(student.feature) if method.student_output else None
        given = teacher_logits if params.get("target_soft_label") in ("teacher", "ema") else None
        expected = losses.uskd_loss(student.logits, weak, target, given, **params)
    assert term.item() == pytest.approx(expected.item(), rel=1e-6)
    sum(terms.values()).backward()
    assert student.logits.grad.abs().sum() > 0 and teacher_logits.grad is None


def test_uskd_declares_what_the_trainer_must_provide():
    default = create_method("uskd", NUM_CLASSES, feature_dim=FEATURE_DIM)
    assert (default.student_output, default.teacher_source, default.needs_teacher) == ("feature", None, False)
    teacher = create_method("uskd", NUM_CLASSES, feature_dim=FEATURE_DIM, target_soft_label="teacher")
    assert (teacher.teacher_source, teacher.needs_teacher) == ("checkpoint", True)
    ema = create_method("uskd", NUM_CLASSES, feature_dim=FEATURE_DIM, target_soft_label="ema")
    assert (ema.teacher_source, ema.needs_teacher) == ("ema", False)
    # The class answers before any model exists (what the config needs to validate up front).
    assert METHODS["uskd"].teacher_source_for({"target_soft_label": "teacher"}) == "checkpoint"
    assert METHODS["uskd"].teacher_source_for({}) is None
    # Target-only USKD without L_weak needs no feature and has no weak head at all (Table 6).
    target_only = create_method("uskd", NUM_CLASSES, beta=0.0, mu=0.0)
    assert target_only.student_output is None and dict(target_only.state_dict()) == {}
    final_rank = create_method("uskd", NUM_CLASSES, rank="final", mu=0.0)
    assert final_rank.student_output is None
    assert create_method("uskd", NUM_CLASSES, feature_dim=FEATURE_DIM, beta=0.0).student_output == "feature"


def test_uskd_soft_labels_from_a_teacher_or_ema_need_its_logits():
    student, _ = _outputs()
    target = _targets()["index"]
    teacher = create_method("uskd", NUM_CLASSES, feature_dim=FEATURE_DIM, target_soft_label="teacher")
    with pytest.raises(ValueError, match=re.escape("method 'uskd' needs teacher_logits: set model.teacher")):
        teacher(student, target)
    ema = create_method("uskd", NUM_CLASSES, feature_dim=FEATURE_DIM, target_soft_label="ema")
    message = "method 'uskd' with target_soft_label='ema' needs teacher_logits from an EMA copy of the student"
    with pytest.raises(ValueError, match=re.escape(message)):
        ema(student, target)


def test_uskd_weak_norm_is_a_per_location_layernorm_before_pooling():
    torch.manual_seed(0)
    method = create_method("uskd", NUM_CLASSES, feature_dim=FEATURE_DIM, weak_norm="layernorm")
    assert method.student_output == "feature_map"
    assert {"weak_head_norm.weight", "weak_head_norm.bias", "weak_head.weight", "weak_head.bias"} == set(
        method.state_dict()
    )
    with torch.no_grad():
        method.weak_head_norm.weight.uniform_(0.5, 1.5)
        method.weak_head_norm.bias.uniform_(-0.5, 0.5)
    feature_map = torch.randn(8, 9, FEATURE_DIM, requires_grad=True)  # (N, L = 3x3 locations, D)
    # mmpretrain: out = norm2(stage-3 tokens), then the neck's global average pooling, then the weak head.
    mean = feature_map.mean(-1, keepdim=True)
    variance = feature_map.var(-1, unbiased=False, keepdim=True)
    normalised = (feature_map - mean) / torch.sqrt(variance + 1e-5) * method.weak_head_norm.weight
    expected = method.weak_head((normalised + method.weak_head_norm.bias).mean(1))
    torch.testing.assert_close(method.weak_logits(feature_map), expected)
    student = StudentOutput(logits=torch.randn(8, NUM_CLASSES, requires_grad=True), feature=feature_map)
    sum(method(student, _targets()["index"]).values()).backward()
    assert method.weak_head_norm.weight.grad.abs().sum() > 0 and feature_map.grad.abs().sum() > 0
    message = "method 'uskd' with weak_norm='layernorm' normalises each location before pooling"
    with pytest.raises(ValueError, match=re.escape(message)):
        method.weak_logits(torch.randn(8, FEATURE_DIM))
