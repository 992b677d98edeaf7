"""Two loss functionals on the same logits share one class-group pass (issue 27), as ``CAFLoss`` does inside.

``unbiased_cross_entropy(logits, ...) + unbiased_kd_loss(logits, ...)`` (or the modules) exponentiates each class
once and writes the gradient of the logits once. These tests pin that the shared pass gives the values and
gradients of two separate passes (each checked against float64 references in test_cross_entropy.py and
test_distillation.py), that it is taken when it should be and refused when it must not be.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import pytest
import torch
from torch.overrides import TorchFunctionMode

from incseg.functional import background as bg
from incseg.functional import (
    balanced_kd_loss,
    kd_loss,
    new_background_log_probs,
    old_background_log_probs,
    unbiased_cross_entropy,
    unbiased_kd_loss,
)
from incseg.losses import UnbiasedCrossEntropyLoss, UnbiasedKDLoss

K, N_OLD = 9, 6
KD: dict[str, Callable[..., torch.Tensor]] = {
    "unbiased": unbiased_kd_loss,
    "balanced": balanced_kd_loss,
    "plain": kd_loss,
}


@pytest.fixture
def follows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the passes that follow a leader (one entry per follower)."""
    calls: list[int] = []
    apply = bg._GroupFollower.apply

    def counting(*args: object) -> object:
        calls.append(1)
        return apply(*args)

    monkeypatch.setattr(bg._GroupFollower, "apply", counting)
    bg._SLOT.entry = None  # no leader left over from another test
    return calls


def _inputs(dtype: torch.dtype = torch.float64, seed: int = 0, n_old: int = N_OLD):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2, K, 5, 6, generator=gen, dtype=torch.float64) * 3).to(dtype).requires_grad_(True)
    old_logits = (torch.randn(2, n_old, 5, 6, generator=gen, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, K, (2, 5, 6), generator=gen)
    labels[0, 0, :3] = 255
    return logits, old_logits, labels


def _separate(fn: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and gradient with every loss call on its own copy of the logits (nothing to share)."""
    copies: list[torch.Tensor] = []

    def fresh() -> torch.Tensor:
        copies.append(logits.detach().clone().requires_grad_(True))
        return copies[-1]

    loss = fn(fresh)
    grads = torch.autograd.grad(loss, copies)
    return loss.detach(), torch.stack(grads).sum(0)


@pytest.mark.parametrize("kd", list(KD))
@pytest.mark.parametrize("ce_first", [True, False])
@pytest.mark.parametrize("n_old", [1, 2, N_OLD])
def test_pair_matches_separate_passes(follows: list[int], kd: str, ce_first: bool, n_old: int) -> None:
    logits, old_logits, labels = _inputs(n_old=n_old)

    def pair(x: Callable[[], torch.Tensor]) -> torch.Tensor:
        if ce_first:
            ce = unbiased_cross_entropy(x(), labels, n_old)
            return ce + 10.0 * KD[kd](x(), old_logits)
        distill = KD[kd](x(), old_logits)
        return unbiased_cross_entropy(x(), labels, n_old) + 10.0 * distill

    loss = pair(lambda: logits)
    (grad,) = torch.autograd.grad(loss, logits)
    # Plain KD leaves the new classes out, so a cross-entropy cannot follow it (it would need them).
    assert len(follows) == (0 if kd == "plain" and not ce_first else 1)
    ref_loss, ref_grad = _separate(pair, logits)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=0, atol=0)  # the same operations: bit for bit
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-14)


def test_modules_share_as_the_functionals(follows: list[int]) -> None:
    logits, old_logits, labels = _inputs()
    ce, kd = UnbiasedCrossEntropyLoss(N_OLD), UnbiasedKDLoss()
    loss = ce(logits, labels) + 10.0 * kd(logits, old_logits)
    (grad,) = torch.autograd.grad(loss, logits)
    assert follows == [1]
    ref_loss, ref_grad = _separate(lambda x: ce(x(), labels) + 10.0 * kd(x(), old_logits), logits)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kd", ["unbiased", "balanced"])
def test_gradcheck_of_the_shared_pair(follows: list[int], kd: str) -> None:
    _, old_logits, labels = _inputs()
    logits = torch.randn(2, K, 3, 4, dtype=torch.float64, requires_grad=True)

    def pair(x: torch.Tensor) -> torch.Tensor:
        return unbiased_cross_entropy(x, labels[:, :3, :4], N_OLD) + 10.0 * KD[kd](x, old_logits[..., :3, :4])

    assert torch.autograd.gradcheck(pair, (logits,))
    assert follows  # gradcheck's analytical gradients went through the shared pass


def test_backward_of_either_loss_alone(follows: list[int]) -> None:
    logits, old_logits, labels = _inputs()
    ce = unbiased_cross_entropy(logits, labels, N_OLD)
    kd = unbiased_kd_loss(logits, old_logits, reduction="sum")
    assert follows == [1]
    (grad_kd,) = torch.autograd.grad(kd, logits, retain_graph=True)  # the follower and the leader run
    (grad_ce,) = torch.autograd.grad(ce, logits, retain_graph=True)  # the leader alone: no stale share of KD
    (grad_both,) = torch.autograd.grad(ce + kd, logits)
    for loss, grad in ((lambda x: unbiased_kd_loss(x(), old_logits, reduction="sum"), grad_kd),
                       (lambda x: unbiased_cross_entropy(x(), labels, N_OLD), grad_ce)):  # fmt: skip
        torch.testing.assert_close(grad, _separate(loss, logits)[1], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_both, grad_ce + grad_kd, rtol=1e-12, atol=1e-14)


def test_teacher_gradient_alone_leaves_nothing_behind(follows: list[int]) -> None:
    """A backward pass that reaches only the teacher's logits runs the follower but not the leader: the
    follower's share of the student's gradient must not leak into a later backward pass of the leader."""
    logits, old_logits, labels = _inputs()
    old_logits.requires_grad_(True)
    ce = unbiased_cross_entropy(logits, labels, N_OLD)
    kd = unbiased_kd_loss(logits, old_logits)
    assert follows == [1]
    (grad_old,) = torch.autograd.grad(kd, old_logits, retain_graph=True)
    (grad_ce,) = torch.autograd.grad(ce, logits)
    ref_old = torch.autograd.grad(unbiased_kd_loss(logits.detach(), old_logits), old_logits)[0]
    torch.testing.assert_close(grad_old, ref_old, rtol=1e-12, atol=1e-14)
    ref_ce = _separate(lambda x: unbiased_cross_entropy(x(), labels, N_OLD), logits)[1]
    torch.testing.assert_close(grad_ce, ref_ce, rtol=1e-12, atol=1e-14)


def _unshared_case(name: str, logits: torch.Tensor, old_logits: torch.Tensor, labels: torch.Tensor) -> None:
    """A leading pass, then a pass that must not follow it; checks the second pass's value."""
    unbiased_cross_entropy(logits, labels, N_OLD)
    if name == "same loss twice":  # as gradcheck, which changes the values through .data (no new version)
        logits.data[0, 0, 0, 0] += 1.0
        second, expected = (
            unbiased_cross_entropy(logits, labels, N_OLD),
            lambda x: unbiased_cross_entropy(x, labels, N_OLD),
        )
    elif name == "in-place change":
        with torch.no_grad():
            logits.mul_(0.5)
        second, expected = unbiased_kd_loss(logits, old_logits), lambda x: unbiased_kd_loss(x, old_logits)
    elif name == "another split":
        second, expected = unbiased_kd_loss(logits, old_logits[:, :4]), lambda x: unbiased_kd_loss(x, old_logits[:, :4])
    elif name == "another tensor":
        second, expected = unbiased_kd_loss(logits.clone(), old_logits), lambda x: unbiased_kd_loss(x, old_logits)
    else:  # no graph being recorded
        with torch.no_grad():
            second, expected = unbiased_kd_loss(logits, old_logits), lambda x: unbiased_kd_loss(x, old_logits)
    torch.testing.assert_close(second, expected(logits.detach()), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["same loss twice", "in-place change", "another split", "another tensor", "no_grad"])
def test_refused_when_it_must_not_share(follows: list[int], case: str) -> None:
    logits, old_logits, labels = _inputs()
    _unshared_case(case, logits, old_logits, labels)
    assert follows == []


def test_a_pass_after_the_leaders_backward_runs_on_its_own(follows: list[int]) -> None:
    logits, old_logits, labels = _inputs()
    unbiased_cross_entropy(logits, labels, N_OLD).backward()
    grad_ce = logits.grad.clone()
    kd = unbiased_kd_loss(logits, old_logits)
    assert follows == []
    logits.grad = None
    kd.backward()
    torch.testing.assert_close(logits.grad, _separate(lambda x: unbiased_kd_loss(x(), old_logits), logits)[1])
    assert not torch.equal(logits.grad, grad_ce)


def test_half_logits_share_the_float32_copy(follows: list[int]) -> None:
    logits, old_logits, labels = _inputs(torch.bfloat16)

    def pair(x: Callable[[], torch.Tensor]) -> torch.Tensor:
        return unbiased_cross_entropy(x(), labels, N_OLD) + 10.0 * unbiased_kd_loss(x(), old_logits)

    loss = pair(lambda: logits)
    (grad,) = torch.autograd.grad(loss, logits)
    assert follows == [1]
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    ref_loss = _separate(pair, logits)[0]
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=0, atol=0)
    # One float32 gradient rounded once to bfloat16 (two separate passes would round twice): the float64 one.
    wide = logits.detach().double().requires_grad_(True)
    (ref_grad,) = torch.autograd.grad(pair(lambda: wide), wide)
    torch.testing.assert_close(grad, ref_grad.to(torch.bfloat16))


def test_background_log_probs_share(follows: list[int]) -> None:
    logits, _, _ = _inputs()

    def both(x: Callable[[], torch.Tensor]) -> torch.Tensor:
        return old_background_log_probs(x(), N_OLD).sum() + new_background_log_probs(x(), N_OLD).square().sum()

    value = both(lambda: logits)
    (grad,) = torch.autograd.grad(value, logits)
    assert follows == [1]
    ref_value, ref_grad = _separate(both, logits)
    torch.testing.assert_close(value.detach(), ref_value, rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-14)


def test_pair_exponentiates_each_class_once(follows: list[int]) -> None:
    """As in CAFLoss: one exp per student class and pixel for the two losses together."""

    class CountExp(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.channels = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            first = args[0] if args else None
            # Class-sized tensors of the student only (the teacher's softmax has N_OLD channels).
            if func in (torch.exp, torch.Tensor.exp, torch.Tensor.exp_) and isinstance(first, torch.Tensor):
                if first.ndim == 4 and first.shape[-2:] == (5, 6) and first.shape[1] != N_OLD:
                    self.channels += first.shape[1]
            return func(*args, **(kwargs or {}))

    logits, old_logits, labels = _inputs()
    with CountExp() as mode:
        loss = unbiased_cross_entropy(logits, labels, N_OLD) + 10.0 * unbiased_kd_loss(logits, old_logits)
        loss.backward()
    assert follows == [1]
    assert 0 < mode.channels <= K


@pytest.mark.parametrize("with_follower", [True, False])
def test_no_reference_cycle_keeps_the_logits(follows: list[int], with_follower: bool) -> None:
    leaf, old_logits, labels = _inputs()
    logits = leaf * 1.0  # a network's output: its graph goes back to the leaf
    ref = weakref.ref(logits)
    loss = unbiased_cross_entropy(logits, labels, N_OLD)
    if with_follower:
        loss = loss + unbiased_kd_loss(logits, old_logits)
    loss.backward()
    assert len(follows) == int(with_follower)
    del logits, loss
    gc.collect()
    assert ref() is None
