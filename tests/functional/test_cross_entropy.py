"""Tests of the unbiased cross-entropy (eq. 14-15)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from incseg._checks import set_validate_values
from incseg.functional import unbiased_cross_entropy


def _unbiased_ce_ref(logits: torch.Tensor, labels: torch.Tensor, n_old: int, ignore_index: int | None = 255):
    """Eq. 14-15 pixel by pixel in float64: -log of the probability of the label, old labels -> sum over old."""
    logits = logits.double()
    total, count = torch.zeros((), dtype=torch.float64), 0
    batch, _, height, width = logits.shape
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                y = int(labels[b, i, j])
                if ignore_index is not None and y == ignore_index:
                    continue
                p = logits[b, :, i, j].exp() / logits[b, :, i, j].exp().sum()
                prob = p[: max(n_old, 1)].sum() if y < max(n_old, 1) else p[y]
                total = total - prob.log()
                count += 1
    return total, count


def _labels(k: int, shape: tuple[int, int, int], ignore_fraction: float = 0.2) -> torch.Tensor:
    labels = torch.randint(0, k, shape)
    return labels.masked_fill(torch.rand(shape) < ignore_fraction, 255)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).abs() / b.abs().clamp_min(1e-30))


@pytest.mark.parametrize(("k", "n_old"), [(5, 0), (5, 1), (5, 3), (6, 5), (21, 16)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_reference(k: int, n_old: int, reduction: str) -> None:
    logits = torch.randn(2, k, 5, 7) * 3
    labels = _labels(k, (2, 5, 7))
    total, count = _unbiased_ce_ref(logits, labels, n_old)
    expected = total / count if reduction == "mean" else total
    loss = unbiased_cross_entropy(logits, labels, n_old, reduction=reduction)
    assert loss.dtype == torch.float32
    assert _rel_err(loss, expected) < 1e-5


def test_reduction_none_and_mean_is_sum_over_valid() -> None:
    logits, labels = torch.randn(2, 6, 5, 7), _labels(6, (2, 5, 7), 0.4)
    per_pixel = unbiased_cross_entropy(logits, labels, 3, reduction="none")
    assert per_pixel.shape == (2, 5, 7)
    assert (per_pixel[labels == 255] == 0).all()
    n_valid = (labels != 255).sum()
    torch.testing.assert_close(per_pixel.sum(), unbiased_cross_entropy(logits, labels, 3, reduction="sum"))
    torch.testing.assert_close(
        unbiased_cross_entropy(logits, labels, 3), unbiased_cross_entropy(logits, labels, 3, reduction="sum") / n_valid
    )


@pytest.mark.parametrize("n_old", [0, 1])
@pytest.mark.parametrize("ignore_index", [255, None])
def test_no_old_classes_equals_cross_entropy(n_old: int, ignore_index: int | None) -> None:
    logits = torch.randn(2, 5, 4, 6)
    labels = _labels(5, (2, 4, 6), 0.3 if ignore_index is not None else 0.0)
    expected = F.cross_entropy(logits, labels, ignore_index=-100 if ignore_index is None else ignore_index)
    torch.testing.assert_close(unbiased_cross_entropy(logits, labels, n_old, ignore_index=ignore_index), expected)


def test_old_labels_count_as_background() -> None:
    logits, labels = torch.randn(2, 6, 4, 5), torch.randint(0, 6, (2, 4, 5))
    as_background = torch.where(labels < 4, torch.zeros_like(labels), labels)
    torch.testing.assert_close(
        unbiased_cross_entropy(logits, labels, 4, reduction="none"),
        unbiased_cross_entropy(logits, as_background, 4, reduction="none"),
    )


def test_gradcheck() -> None:
    logits = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    labels = _labels(5, (2, 3, 4))
    assert torch.autograd.gradcheck(lambda x: unbiased_cross_entropy(x, labels, 3), (logits,))


def test_gradcheck_with_upsampling() -> None:
    logits = torch.randn(1, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    labels = _labels(4, (1, 5, 7))
    assert torch.autograd.gradcheck(lambda x: unbiased_cross_entropy(x, labels, 2), (logits,))


def test_upsamples_logits_to_label_size() -> None:
    logits, labels = torch.randn(2, 5, 3, 4), _labels(5, (2, 9, 11))
    upsampled = F.interpolate(logits, size=(9, 11), mode="bilinear", align_corners=False)
    torch.testing.assert_close(unbiased_cross_entropy(logits, labels, 3), unbiased_cross_entropy(upsampled, labels, 3))


def test_ignored_pixels_change_neither_loss_nor_gradient() -> None:
    labels = _labels(5, (2, 4, 6), 0.5)
    logits_a = torch.randn(2, 5, 4, 6)
    logits_b = logits_a.clone()
    ignored = (labels == 255).unsqueeze(1).expand_as(logits_b)
    logits_b[ignored] = torch.randn(int(ignored.sum())) * 50
    logits_a.requires_grad_(True)
    logits_b.requires_grad_(True)
    loss_a = unbiased_cross_entropy(logits_a, labels, 3)
    loss_b = unbiased_cross_entropy(logits_b, labels, 3)
    loss_a.backward()
    loss_b.backward()
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(logits_a.grad, logits_b.grad)
    assert (logits_a.grad[ignored] == 0).all()


def test_all_ignored_gives_connected_zero() -> None:
    logits = torch.randn(2, 5, 3, 3, requires_grad=True)
    labels = torch.full((2, 3, 3), 255)
    loss = unbiased_cross_entropy(logits, labels, 3)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None
    assert (logits.grad == 0).all()


def test_extreme_logits_finite() -> None:
    logits = (torch.randint(0, 2, (2, 6, 4, 5)).float() * 200 - 100).requires_grad_(True)
    loss = unbiased_cross_entropy(logits, _labels(6, (2, 4, 5)), 3)
    loss.backward()
    assert torch.isfinite(loss)
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_bf16_autocast_gives_finite_float32() -> None:
    logits, labels = torch.randn(2, 5, 4, 4), _labels(5, (2, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = unbiased_cross_entropy(logits.bfloat16(), labels, 3)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)


def test_graph_has_no_host_sync_when_value_checks_are_off() -> None:
    logits, labels = torch.randn(2, 5, 4, 4), _labels(5, (2, 8, 8))
    set_validate_values(False)
    try:
        compiled = torch.compile(unbiased_cross_entropy, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(logits, labels, 3), unbiased_cross_entropy(logits, labels, 3))
    finally:
        set_validate_values(None)


@given(
    k=st.integers(2, 7),
    data=st.data(),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([0.01, 1.0, 30.0, 100.0]),
)
def test_fuzz_finite(k: int, data: st.DataObject, seed: int, scale: float) -> None:
    n_old = data.draw(st.integers(0, k - 1), label="n_old")
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2, k, 3, 4, generator=gen) * scale).requires_grad_(True)
    labels = torch.randint(0, k, (2, 3, 4), generator=gen)
    labels = labels.masked_fill(torch.rand(2, 3, 4, generator=gen) < 0.3, 255)
    loss = unbiased_cross_entropy(logits, labels, n_old)
    loss.backward()
    assert torch.isfinite(loss) and loss >= 0
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


LOGITS = torch.randn(2, 5, 4, 4)
LABELS = torch.zeros(2, 4, 4, dtype=torch.long)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"logits": torch.randn(5, 4, 4)}, ValueError, "logits"),
        ({"labels": torch.zeros(2, 4, dtype=torch.long)}, ValueError, "labels"),
        ({"labels": torch.zeros(3, 4, 4, dtype=torch.long)}, ValueError, "batch"),
        ({"num_old_classes": 5}, ValueError, "num_old_classes"),
        ({"labels": torch.full((2, 4, 4), 5)}, ValueError, "outside"),
        ({"labels": torch.full((2, 4, 4), 255), "ignore_index": None}, ValueError, "outside"),
        ({"labels": torch.full((2, 4, 4), -1)}, ValueError, "outside"),
        ({"labels": torch.zeros(2, 4, 4)}, TypeError, "integer"),
        ({"reduction": "avg"}, ValueError, "reduction"),
    ],
)
def test_bad_inputs_raise(kwargs: dict, error: type[Exception], match: str) -> None:
    args = {"logits": LOGITS, "labels": LABELS, "num_old_classes": 1, **kwargs}
    with pytest.raises(error, match=match):
        unbiased_cross_entropy(args.pop("logits"), args.pop("labels"), args.pop("num_old_classes"), **args)


LAYOUTS = {
    "contiguous": lambda x: x,
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
    "permuted": lambda x: x.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2),
    "strided": lambda x: torch.stack([x, torch.zeros_like(x)], dim=-1)[..., 0],  # gaps in memory
    "expanded": lambda x: x[:1].expand(2, -1, -1, -1),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_non_finite_logits_raise_in_every_memory_layout(layout: str, bad: float, dtype: torch.dtype) -> None:
    """The finiteness check (one aminmax pass over the logits' memory) sees every element, whatever the strides."""
    from incseg import NonFiniteError

    labels = _labels(5, (2, 4, 4))
    for position in [(0, 0, 0, 0), (0, 4, 3, 3), (0, 2, 1, 3)]:
        logits = torch.randn(2, 5, 4, 4, dtype=dtype)
        logits[position] = bad
        logits = LAYOUTS[layout](logits)
        assert not torch.isfinite(logits).all()
        with pytest.raises(NonFiniteError, match="non-finite"):
            unbiased_cross_entropy(logits, labels, 3)
    finite = LAYOUTS[layout](torch.randn(2, 5, 4, 4, dtype=dtype))
    assert torch.isfinite(unbiased_cross_entropy(finite, labels, 3))
