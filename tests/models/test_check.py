"""incseg.models.check_equivalent: the adapted logits against the original's, after its final resizing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from incseg.models import check_equivalent, from_named_submodules


class _Net(nn.Module):
    """A network written as users do: its last step resizes the logits to the input size."""

    def __init__(self, align_corners: bool) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, stride=8, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.refiner = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Dropout2d(0.5))
        self.classifier = nn.Conv2d(8, 4, 1)
        self.align_corners = align_corners

    def forward(self, x: Tensor) -> Tensor:
        logits = self.classifier(self.refiner(self.encoder(x)))
        return F.interpolate(logits, scale_factor=8, mode="bilinear", align_corners=self.align_corners)


def _glue(net: nn.Module) -> nn.Module:
    return from_named_submodules(net, z_channels=8, h_channels=8)


def _example() -> Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_equal_logits_after_the_originals_resizing() -> None:
    net = _Net(align_corners=False)
    net.encoder[1].running_var.fill_(4.0)  # eval-mode statistics that differ from the batch's
    model = _glue(net)
    assert check_equivalent(model, net, _example()) < 1e-5


def test_a_resizing_the_learner_does_not_reproduce_is_caught() -> None:
    net = _Net(align_corners=True)  # the learner resizes with align_corners=False
    with pytest.raises(ValueError, match=r"differ from the original's by up to 0\.\d+ .*resized to the original's"):
        check_equivalent(_glue(net), net, _example())


def test_modes_are_restored_and_nothing_is_learnt() -> None:
    net = _Net(align_corners=False).train()
    model = _glue(net)
    model.refiner.eval()  # a mixed state, restored as it was
    modes = {name: m.training for name, m in [*net.named_modules(), *model.named_modules()]}
    stats = net.encoder[1].running_mean.clone()
    check_equivalent(model, net, _example())
    assert {name: m.training for name, m in [*net.named_modules(), *model.named_modules()]} == modes
    torch.testing.assert_close(net.encoder[1].running_mean, stats, rtol=0, atol=0)


def test_outputs_of_every_kind() -> None:
    conv = nn.Conv2d(3, 4, 1)

    class Dict(nn.Module):
        def forward(self, x: Tensor) -> dict[str, Tensor]:
            return {"out": conv(x), "aux": conv(x) + 1}

    class Tuple(nn.Module):
        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return conv(x), conv(x) + 1

    x = _example()
    assert check_equivalent(conv, Dict(), x) == 0.0
    assert check_equivalent(conv, Tuple(), x) == 0.0


def test_errors() -> None:
    x = _example()
    with pytest.raises(ValueError, match="number of classes differ"):
        check_equivalent(nn.Conv2d(3, 5, 1), nn.Conv2d(3, 4, 1), x)
    with pytest.raises(ValueError, match="larger than the original's"):
        check_equivalent(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Upsample(scale_factor=2)), nn.Conv2d(3, 4, 1), x)
    with pytest.raises(TypeError, match="cannot find"):
        check_equivalent(nn.Conv2d(3, 4, 1), nn.Flatten(), x)
    with pytest.raises(TypeError, match="example must be"):
        check_equivalent(nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), [x])  # type: ignore[arg-type]
    nan = nn.Conv2d(3, 4, 1)
    with torch.no_grad():
        nan.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="differ"):
        check_equivalent(nan, nn.Conv2d(3, 4, 1), x)
