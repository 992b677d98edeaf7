"""Tests of the background aggregation (eq. 10, 15) and of the balance γ (eq. 11)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from incseg.functional import gamma_balance, new_background_log_probs, old_background_log_probs


def _softmax_ref(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities written out: exp / sum of exp, in float64."""
    e = logits.double().exp()
    return e / e.sum(dim=1, keepdim=True)


def _old_background_ref(logits: torch.Tensor, n_old: int) -> torch.Tensor:
    """Eq. 10 with probabilities: φ̂_0 = p_0 + sum of the new classes, φ̂_s = p_s for the old classes."""
    p = _softmax_ref(logits)
    k = p.shape[1]
    channels = [p[:, 0] + sum((p[:, s] for s in range(n_old, k)), torch.zeros_like(p[:, 0]))]
    channels += [p[:, s] for s in range(1, n_old)]
    return torch.stack(channels, dim=1).log()


def _new_background_ref(logits: torch.Tensor, n_old: int) -> torch.Tensor:
    """Eq. 15 with probabilities: φ̃_0 = sum of the background and the old classes, φ̃_s = p_s for new classes."""
    p = _softmax_ref(logits)
    k = p.shape[1]
    n_bg = max(n_old, 1)
    channels = [sum((p[:, s] for s in range(n_bg)), torch.zeros_like(p[:, 0]))]
    channels += [p[:, s] for s in range(n_bg, k)]
    return torch.stack(channels, dim=1).log()


def _gamma_ref(old_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 11: softmax of the spatially averaged logits, then (sum of the foreground) / background."""
    q_bar = _softmax_ref(old_logits.double().mean(dim=(2, 3), keepdim=True))[:, :, 0, 0]
    return q_bar[:, 1:].sum(dim=1) / q_bar[:, 0]


@pytest.mark.parametrize(("k", "n_old"), [(5, 1), (5, 3), (6, 5), (4, 4), (21, 16)])
def test_old_background_matches_reference(k: int, n_old: int) -> None:
    logits = torch.randn(2, k, 5, 7) * 3
    out = old_background_log_probs(logits, n_old)
    assert out.shape == (2, n_old, 5, 7)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _old_background_ref(logits, n_old), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("k", "n_old"), [(5, 0), (5, 1), (5, 3), (6, 5), (21, 16)])
def test_new_background_matches_reference(k: int, n_old: int) -> None:
    logits = torch.randn(2, k, 5, 7) * 3
    out = new_background_log_probs(logits, n_old)
    assert out.shape == (2, 1 + k - max(n_old, 1), 5, 7)
    torch.testing.assert_close(out.double(), _new_background_ref(logits, n_old), rtol=1e-5, atol=1e-6)


def test_degenerate_cases_are_log_softmax() -> None:
    logits = torch.randn(2, 5, 3, 4)
    expected = F.log_softmax(logits, dim=1)
    torch.testing.assert_close(old_background_log_probs(logits, 5), expected)  # no new class
    torch.testing.assert_close(new_background_log_probs(logits, 0), expected)  # first step
    torch.testing.assert_close(new_background_log_probs(logits, 1), expected)  # only the background is old


@pytest.mark.parametrize(
    ("fn", "n_old"),
    [(old_background_log_probs, n) for n in (1, 2, 3, 5)] + [(new_background_log_probs, n) for n in (0, 1, 3, 4)],
)
def test_gradcheck(fn, n_old: int) -> None:
    logits = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: fn(x, n_old), (logits,))


def test_channels_last_logits() -> None:
    logits = torch.randn(2, 6, 5, 7)
    grads = []
    for x in (logits.clone(), logits.clone().contiguous(memory_format=torch.channels_last)):
        x.requires_grad_(True)
        out = old_background_log_probs(x, 3)
        (out * torch.linspace(0, 1, 3).view(1, 3, 1, 1)).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])


@given(
    k=st.integers(2, 8),
    data=st.data(),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([0.1, 1.0, 10.0, 100.0]),
)
def test_aggregated_probabilities_sum_to_one(k: int, data: st.DataObject, seed: int, scale: float) -> None:
    n_old_eq10 = data.draw(st.integers(1, k), label="n_old eq. 10")
    n_old_eq15 = data.draw(st.integers(0, k - 1), label="n_old eq. 15")
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, k, 3, 5, generator=gen) * scale
    for log_probs in (old_background_log_probs(logits, n_old_eq10), new_background_log_probs(logits, n_old_eq15)):
        assert torch.isfinite(log_probs).all()
        assert (log_probs <= 1e-6).all()
        torch.testing.assert_close(log_probs.exp().sum(dim=1), torch.ones(2, 3, 5), rtol=0, atol=1e-5)


def test_extreme_logits_finite() -> None:
    logits = torch.full((1, 4, 2, 2), -100.0)
    logits[:, 1] = 100.0
    for out in (old_background_log_probs(logits, 2), new_background_log_probs(logits, 2)):
        assert torch.isfinite(out).all()


def test_half_inputs_are_upcast() -> None:
    logits = torch.randn(1, 4, 3, 3).bfloat16()
    assert old_background_log_probs(logits, 2).dtype == torch.float32
    assert new_background_log_probs(logits, 2).dtype == torch.float32


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: old_background_log_probs(torch.randn(2, 5, 3), 2), ValueError, "4 dims"),
        (lambda: old_background_log_probs(torch.randn(2, 5, 3, 3), 0), ValueError, "num_old_classes"),
        (lambda: old_background_log_probs(torch.randn(2, 5, 3, 3), 6), ValueError, "num_old_classes"),
        (lambda: new_background_log_probs(torch.randn(2, 5, 3, 3), 5), ValueError, "num_old_classes"),
        (lambda: new_background_log_probs(torch.randn(2, 5, 3, 3), -1), ValueError, "num_old_classes"),
        (lambda: new_background_log_probs(torch.randn(2, 5, 3, 3), 2.0), TypeError, "num_old_classes"),
        (lambda: old_background_log_probs(torch.zeros(2, 5, 3, 3, dtype=torch.long), 2), TypeError, "floating"),
        (lambda: gamma_balance(torch.randn(2, 5)), ValueError, "old_logits"),
    ],
)
def test_bad_inputs_raise(call, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_gamma_matches_reference() -> None:
    old_logits = torch.randn(3, 6, 7, 5) * 2
    gamma = gamma_balance(old_logits)
    assert gamma.shape == (3,)
    torch.testing.assert_close(gamma.double(), _gamma_ref(old_logits), rtol=1e-5, atol=0)


def test_gamma_is_detached_and_simple_cases() -> None:
    old_logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    assert not gamma_balance(old_logits).requires_grad
    torch.testing.assert_close(gamma_balance(torch.zeros(2, 4, 3, 3)), torch.full((2,), 3.0))  # uniform: (1-1/4)/(1/4)
    torch.testing.assert_close(gamma_balance(torch.randn(2, 1, 3, 3)), torch.zeros(2))  # background only


def test_gamma_extreme_logits_finite() -> None:
    old_logits = torch.full((2, 3, 4, 4), 100.0)
    old_logits[:, 0] = -100.0  # q̄_0 ≈ e^-200: γ clamped to stay finite
    gamma = gamma_balance(old_logits)
    assert torch.isfinite(gamma).all()
    assert (gamma > 1e16).all()
    assert torch.isfinite(gamma_balance(old_logits.bfloat16())).all()


def test_logaddexp_matches_torch_at_every_scale() -> None:
    """The folds of the class groups use max + log(1 + exp(min - max)): torch.logaddexp's value."""
    from incseg.functional.background import _logaddexp

    gen = torch.Generator().manual_seed(0)
    for scale in (1e-3, 1.0, 30.0, 1e4):
        a = torch.randn(1000, generator=gen, dtype=torch.float64) * scale
        b = torch.randn(1000, generator=gen, dtype=torch.float64) * scale
        for x, y in ((a, b), (a, a), (a, a - 800.0)):
            torch.testing.assert_close(_logaddexp(x, y), torch.logaddexp(x, y), rtol=1e-15, atol=1e-15)
            torch.testing.assert_close(_logaddexp(x.float(), y.float()), torch.logaddexp(x, y).float())
