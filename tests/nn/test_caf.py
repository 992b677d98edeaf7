"""Tests for the Continual Attentive Fusion module."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from torch import Tensor, nn

from incseg.nn.caf import ContinualAttentiveFusion
from incseg.nn.structured_attention import AttentionMaps

SIZES = [(1, 7, 5), (2, 7, 5), (1, 8, 12), (2, 8, 12)]
C = 8


def _perturb_zero_init(module: nn.Module) -> None:
    """Give every all-zero parameter random values (what a few optimizer steps would do)."""
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.normal_(0.0, 0.5)


def _trained_caf(**kwargs: object) -> ContinualAttentiveFusion:
    caf = ContinualAttentiveFusion(C, **kwargs)  # type: ignore[arg-type]
    _perturb_zero_init(caf)
    with torch.no_grad():
        caf.fusion.conv.weight.normal_(0.0, 0.3)
    return caf


def _random_loss(out: Tensor) -> Tensor:
    return (out * torch.randn_like(out)).sum()


def _features(batch: int = 2, height: int = 7, width: int = 5) -> tuple[Tensor, Tensor]:
    return torch.randn(batch, C, height, width), torch.randn(batch, C, height, width)


@pytest.mark.parametrize(("batch", "height", "width"), SIZES)
@pytest.mark.parametrize("subsample", [True, False])
def test_training_composition(batch: int, height: int, width: int, subsample: bool) -> None:
    caf = _trained_caf(subsample=subsample).train()
    z_new, z_old = _features(batch, height, width)
    z_bar, maps = caf(z_new, z_old, return_maps=True)
    assert z_bar.shape == (batch, C, height, width)
    assert isinstance(maps, AttentionMaps)
    assert maps.channel.shape == (batch, C, 1, 1) and maps.spatial.shape == (batch, 1, height, width)
    fused = caf.fusion(caf.projection_old(z_old), caf.projection_new(z_new))
    expected, expected_maps = caf.attention(fused, return_maps=True)
    torch.testing.assert_close(z_bar, expected, rtol=0, atol=0)
    torch.testing.assert_close(maps.spatial, expected_maps.spatial, rtol=0, atol=0)


@pytest.mark.parametrize(("batch", "height", "width"), SIZES)
def test_starts_as_identity(batch: int, height: int, width: int) -> None:
    """At init every sub-block is identity/average: the teacher's features pass unchanged at a step start."""
    caf = ContinualAttentiveFusion(C)
    z_new, z_old = _features(batch, height, width)
    torch.testing.assert_close(caf(z_new, z_new), z_new, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(caf(z_new, z_old), (z_new + z_old) / 2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(caf.eval()(z_new), z_new, rtol=0, atol=0)


def test_skip_ignores_old_features_in_eval() -> None:
    caf = _trained_caf().eval()
    z_new, z_old = _features()
    out = caf(z_new)
    torch.testing.assert_close(caf(z_new, z_old), out, rtol=0, atol=0)
    torch.testing.assert_close(caf(z_new, torch.randn_like(z_old)), out, rtol=0, atol=0)
    torch.testing.assert_close(out, caf.attention(caf.projection_new(z_new)), rtol=0, atol=0)


def test_skip_when_no_old_features_in_training() -> None:
    caf = _trained_caf().train()
    z_new, _ = _features()
    torch.testing.assert_close(caf(z_new), caf.attention(caf.projection_new(z_new)), rtol=0, atol=0)


@pytest.mark.parametrize("train", [True, False])
def test_zero_pad_equals_fusion_with_zeros(train: bool) -> None:
    caf = _trained_caf(test_strategy="zero_pad").train(train)
    z_new, z_old = _features()
    v_new = caf.projection_new(z_new)
    expected = caf.attention(caf.fusion(torch.zeros_like(v_new), v_new))
    torch.testing.assert_close(caf(z_new), expected, rtol=0, atol=0)
    if not train:  # in eval mode z_old is ignored
        torch.testing.assert_close(caf(z_new, z_old), expected, rtol=0, atol=0)


def test_concat_uses_old_features_in_eval() -> None:
    caf = _trained_caf(test_strategy="concat").eval()
    z_new, z_old = _features()
    expected = caf.attention(caf.fusion(caf.projection_old(z_old), caf.projection_new(z_new)))
    torch.testing.assert_close(caf(z_new, z_old), expected, rtol=0, atol=0)


@pytest.mark.parametrize("train", [True, False])
def test_concat_without_old_features_raises(train: bool) -> None:
    caf = ContinualAttentiveFusion(C, test_strategy="concat").train(train)
    with pytest.raises(ValueError, match=r"concat.*z_old"):
        caf(torch.randn(2, C, 7, 5))


def test_strategy_is_settable_and_validated() -> None:
    caf = ContinualAttentiveFusion(C)
    assert caf.test_strategy == "skip"
    caf.test_strategy = "zero_pad"
    assert caf.test_strategy == "zero_pad" and "zero_pad" in repr(caf)
    with pytest.raises(ValueError, match=r"\['skip', 'zero_pad', 'concat'\].*'mean'"):
        caf.test_strategy = "mean"  # type: ignore[assignment]
    assert caf.test_strategy == "zero_pad"
    with pytest.raises(ValueError, match="test_strategy"):
        ContinualAttentiveFusion(C, test_strategy="avg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gate"):
        ContinualAttentiveFusion(C, gate="tanh")  # type: ignore[arg-type]


def test_rejects_mismatched_shapes() -> None:
    caf = ContinualAttentiveFusion(C)
    with pytest.raises(ValueError, match=r"z_old and z_new.*\(2, 8, 5, 7\) and \(2, 8, 7, 5\)"):
        caf(torch.randn(2, C, 7, 5), torch.randn(2, C, 5, 7))
    with pytest.raises(ValueError, match=r"z_old and z_new.*\(1, 8, 7, 5\) and \(2, 8, 7, 5\)"):
        caf(torch.randn(2, C, 7, 5), torch.randn(1, C, 7, 5))
    with pytest.raises(ValueError, match="z_new must have 8 channels"):
        caf(torch.randn(2, 4, 7, 5))
    with pytest.raises(TypeError, match="z_old"):
        caf(torch.randn(2, C, 7, 5), torch.ones(2, C, 7, 5, dtype=torch.long))


@pytest.mark.parametrize(("batch", "height", "width"), SIZES)
def test_every_parameter_gets_gradient(batch: int, height: int, width: int) -> None:
    caf = ContinualAttentiveFusion(C).train()
    z_new, z_old = _features(batch, height, width)
    _random_loss(caf(z_new, z_old)).backward()
    for name, p in caf.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # From the first step the zero-initialised parameters and everything after them learn.
    for name in (
        "projection_new.norm.weight",
        "projection_old.norm.weight",
        "fusion.conv.weight",
        "attention.conv_ch.weight",
    ):
        grad = caf.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    # Once they moved away from zero, every parameter receives a non-zero gradient.
    caf.zero_grad()
    _perturb_zero_init(caf)
    _random_loss(caf(z_new, z_old)).backward()
    for name, p in caf.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_old_features_are_not_detached_by_caf() -> None:
    caf = _trained_caf().train()
    z_new, z_old = _features()
    z_old.requires_grad_(True)
    _random_loss(caf(z_new, z_old)).backward()
    assert z_old.grad is not None and z_old.grad.abs().sum() > 0


@pytest.mark.parametrize("strategy", ["skip", "zero_pad", "concat"])
def test_bf16_autocast_finite(strategy: str) -> None:
    caf = _trained_caf(test_strategy=strategy, gate=None)
    z_new, z_old = _features()
    for train in (True, False):
        caf.train(train)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z_bar, maps = caf(z_new, z_old, return_maps=True)
        assert z_bar.shape == z_new.shape and torch.isfinite(z_bar).all()
        assert torch.isfinite(maps.channel).all() and torch.isfinite(maps.spatial).all()


def test_torch_compile_training_smoke() -> None:
    """Full graph capture (dynamo + AOT autograd) of the training forward and backward; fast on CPU."""
    caf = _trained_caf().train()
    z_new, z_old = _features()
    z_new.requires_grad_(True)
    compiled = torch.compile(caf, fullgraph=True, backend="aot_eager")
    out = compiled(z_new, z_old)
    assert out.shape == z_new.shape and torch.isfinite(out).all()
    _random_loss(out).backward()
    assert z_new.grad is not None and torch.isfinite(z_new.grad).all()


@pytest.mark.slow
@pytest.mark.skipif(
    not any(shutil.which(cxx) for cxx in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")),
    reason="inductor needs a C++ compiler on CPU",
)
def test_torch_compile_inductor_eval() -> None:
    """Inductor (C++ codegen on CPU) on the inference path; about 10-20 s cold, mostly compiler time."""
    caf = _trained_caf().eval()
    z_new, _ = _features()
    compiled = torch.compile(caf, fullgraph=True)
    with torch.no_grad():
        out = compiled(z_new)
        torch.testing.assert_close(out, caf(z_new), rtol=1e-5, atol=1e-5)


def test_fusion_dropout_trains_the_skip_path() -> None:
    """fusion_dropout=1 trains exactly what ``skip`` computes at test time; 0 is the paper; 0.5 mixes per image."""
    z_new, z_old = torch.randn(16, C, 5, 4), torch.randn(16, C, 5, 4)
    caf = _trained_caf(fusion_dropout=1.0)
    skip = caf.train()(z_new)  # no old features: the skip path, with the same (batch) statistics
    torch.testing.assert_close(caf.train()(z_new, z_old), skip)
    caf.fusion_dropout = 0.0
    fused = caf.train()(z_new, z_old)
    assert not torch.allclose(fused, skip)
    caf.fusion_dropout = 0.5
    torch.manual_seed(0)
    mixed = caf.train()(z_new, z_old)
    from_skip = [torch.allclose(mixed[i], skip[i]) for i in range(16)]
    from_fused = [torch.allclose(mixed[i], fused[i]) for i in range(16)]
    assert all(a != b for a, b in zip(from_skip, from_fused))  # each image is one or the other
    assert 0 < sum(from_skip) < 16
    assert "fusion_dropout=0.5" in repr(caf)


@pytest.mark.parametrize(("bad", "error"), [(-0.1, ValueError), (1.01, ValueError), ("0.5", TypeError)])
def test_fusion_dropout_is_validated(bad: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="fusion_dropout"):
        ContinualAttentiveFusion(C, fusion_dropout=bad)  # type: ignore[arg-type]
