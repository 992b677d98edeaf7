# mypy: disable-error-code="index,operator,union-attr"
# (dynamic nn.Module attribute access, e.g. model.refiner[0], is typed Tensor | Module by torch)
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from incseg.models import IncrementalClassifier


def _randomise(clf: IncrementalClassifier) -> None:
    with torch.no_grad():
        for p in clf.parameters():
            p.normal_()


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(("height", "width"), [(4, 4), (5, 3)])
def test_shapes_and_concatenation_order(batch: int, height: int, width: int) -> None:
    clf = IncrementalClassifier(6, [3, 2])
    x = torch.randn(batch, 6, height, width)
    out = clf(x)
    assert out.shape == (batch, 5, height, width)
    torch.testing.assert_close(out[:, :3], clf.head(0)(x))
    torch.testing.assert_close(out[:, 3:], clf.head(1)(x))
    assert clf.num_classes == 5
    assert clf.classes_per_step == [3, 2]
    assert clf.num_steps == 2


def test_mib_init_float64_reference() -> None:
    clf = IncrementalClassifier(5, [4]).double()
    _randomise(clf)
    w_bg = clf.head(0).weight[0].detach().clone()
    b_bg = float(clf.head(0).bias[0].detach())
    old_rows = clf.head(0).weight[1:].detach().clone()
    old_bias = clf.head(0).bias[1:].detach().clone()

    params = clf.add_classes(3)

    expected = b_bg - math.log(3 + 1)
    head = clf.head(1)
    assert head.weight.dtype == torch.float64
    for k in range(3):
        torch.testing.assert_close(head.weight[k], w_bg, rtol=0, atol=0)
        assert float(head.bias[k].detach()) == pytest.approx(expected, abs=1e-15)
    assert float(clf.head(0).bias[0].detach()) == pytest.approx(expected, abs=1e-15)
    torch.testing.assert_close(clf.head(0).weight[0], w_bg, rtol=0, atol=0)
    torch.testing.assert_close(clf.head(0).weight[1:], old_rows, rtol=0, atol=0)
    torch.testing.assert_close(clf.head(0).bias[1:], old_bias, rtol=0, atol=0)
    assert [p.shape for p in params] == [torch.Size([3, 5, 1, 1]), torch.Size([3])]
    assert all(p is q for p, q in zip(params, head.parameters()))


@given(
    old=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    n=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_mib_init_preserves_old_probabilities(old: list[int], n: int, seed: int) -> None:
    """At init: old-class probabilities unchanged, p_bg + sum p_new == old p_bg, shared equally."""
    torch.manual_seed(seed)
    clf = IncrementalClassifier(3, old).double()
    _randomise(clf)
    x = torch.randn(2, 3, 3, 2, dtype=torch.float64)
    with torch.no_grad():
        before = torch.softmax(clf(x), dim=1)
        clf.add_classes(n)
        after = torch.softmax(clf(x), dim=1)
    k_old = sum(old)
    torch.testing.assert_close(after[:, 1:k_old], before[:, 1:k_old])
    bg_and_new = torch.cat([after[:, :1], after[:, k_old:]], dim=1)
    torch.testing.assert_close(bg_and_new.sum(1), before[:, 0])
    torch.testing.assert_close(bg_and_new, before[:, :1].expand_as(bg_and_new) / (n + 1))


def test_random_init_keeps_background() -> None:
    clf = IncrementalClassifier(4, [3])
    b_bg = clf.head(0).bias[0].detach().clone()
    clf.add_classes(2, init="random")
    assert torch.equal(clf.head(0).bias[0], b_bg)
    assert not torch.equal(clf.head(1).weight[0], clf.head(0).weight[0])


def test_every_parameter_gets_gradient() -> None:
    clf = IncrementalClassifier(4, [3])
    clf.add_classes(2)
    clf(torch.randn(2, 4, 3, 3)).square().sum().backward()
    for name, p in clf.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_freeze_old() -> None:
    clf = IncrementalClassifier(4, [3, 1])
    clf.add_classes(2)
    clf.freeze_old()
    assert [p.requires_grad for p in clf.parameters()] == [False, False, False, False, True, True]


def test_state_dict_roundtrip_and_structure_mismatch() -> None:
    src = IncrementalClassifier(4, [3])
    src.add_classes(2)
    sd = src.state_dict()
    assert IncrementalClassifier.classes_per_step_from_state_dict(sd) == [3, 2]
    dst = IncrementalClassifier(4, IncrementalClassifier.classes_per_step_from_state_dict(sd))
    dst.load_state_dict(sd)
    x = torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(dst(x), src(x))
    with pytest.raises(RuntimeError, match=r"classes_per_step=\[3, 2\].*add_classes"):
        IncrementalClassifier(4, [3]).load_state_dict(sd)
    with pytest.raises(RuntimeError, match=r"classes_per_step=\[3, 2\]"):
        IncrementalClassifier(4, [3, 1]).load_state_dict(sd)


def test_classes_per_step_from_state_dict_prefix_and_errors() -> None:
    model = nn.Module()
    model.classifier = IncrementalClassifier(2, [2, 1, 4])
    sd = model.state_dict()
    assert IncrementalClassifier.classes_per_step_from_state_dict(sd, prefix="classifier.") == [2, 1, 4]
    with pytest.raises(ValueError, match="no classifier heads"):
        IncrementalClassifier.classes_per_step_from_state_dict(sd, prefix="other.")
    del sd["classifier.heads.1.weight"]
    with pytest.raises(ValueError, match="not contiguous"):
        IncrementalClassifier.classes_per_step_from_state_dict(sd, prefix="classifier.")


def test_add_classes_follows_dtype() -> None:
    clf = IncrementalClassifier(4, [2]).to(torch.bfloat16)
    clf.add_classes(1)
    assert clf.head(1).weight.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((0, [2]), ValueError, "in_channels"),
        ((2.0, [2]), TypeError, "in_channels"),
        ((2, []), ValueError, "at least one step"),
        ((2, [2, 0]), ValueError, r"classes_per_step\[1\]"),
        ((2, 3), TypeError, "sequence"),
        ((2, [True]), TypeError, r"classes_per_step\[0\]"),
    ],
)
def test_constructor_errors(args: tuple[object, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        IncrementalClassifier(*args)  # type: ignore[arg-type]


def test_add_classes_and_forward_errors() -> None:
    clf = IncrementalClassifier(4, [2])
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        clf.add_classes(0)
    with pytest.raises(TypeError, match="n must be an int"):
        clf.add_classes(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="init"):
        clf.add_classes(1, init="zeros")  # type: ignore[arg-type]
    assert clf.num_steps == 1
    with pytest.raises(ValueError, match="4 channels"):
        clf(torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="4 dims"):
        clf(torch.randn(4, 2, 2))


@pytest.mark.parametrize("kernel", [3, 5])
def test_mib_init_of_kxk_heads_preserves_old_probabilities(kernel: int) -> None:
    torch.manual_seed(0)
    clf = IncrementalClassifier(3, [3], kernel_size=kernel).double()
    _randomise(clf)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    with torch.no_grad():
        before = torch.softmax(clf(x), dim=1)
        clf.add_classes(2)
        after = torch.softmax(clf(x), dim=1)
    assert clf.head(1).weight.shape == (2, 3, kernel, kernel) and clf.head(1).padding == (kernel // 2,) * 2
    torch.testing.assert_close(clf.head(1).weight[1], clf.head(0).weight[0], rtol=0, atol=0)
    torch.testing.assert_close(after[:, 1:3], before[:, 1:3])
    torch.testing.assert_close(after[:, 3:], before[:, :1].expand(-1, 2, -1, -1) / 3)


def test_upsampling_of_the_logits() -> None:
    clf = IncrementalClassifier(4, [3], upsampling=4, align_corners=True)
    h = torch.randn(2, 4, 5, 6)
    logits = clf(h)
    expected = nn.functional.interpolate(
        torch.cat([head(h) for head in clf.heads], 1), scale_factor=4, mode="bilinear", align_corners=True
    )
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    grown = clf.with_steps([3, 2])
    assert (grown.kernel_size, grown.upsampling, grown.align_corners) == (1, 4, True)
    assert grown(h).shape == (2, 5, 20, 24)
    with pytest.raises(ValueError, match="odd"):
        IncrementalClassifier(4, [3], kernel_size=2)
    with pytest.raises(ValueError, match="upsampling"):
        IncrementalClassifier(4, [3], upsampling=0.5)


def test_prior_init_starts_every_new_sigmoid_at_the_prior() -> None:
    clf = IncrementalClassifier(4, [3])
    clf.add_classes(2, init="prior", prior=0.05)
    with torch.no_grad():
        prob = torch.sigmoid(clf(torch.randn(2, 4, 3, 3))[:, 3:])
    torch.testing.assert_close(prob, torch.full_like(prob, 0.05))
    assert float(clf.head(1).weight.detach().abs().max()) == 0.0
    for prior in (0.0, 1.0, True):
        with pytest.raises(ValueError, match=r"prior must be a probability in \(0, 1\)"):
            clf.add_classes(1, init="prior", prior=prior)
