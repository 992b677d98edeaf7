"""freeze(): evaluation mode that survives .train(), no gradients, survives deepcopy."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from incseg.learner import freeze, is_frozen


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Conv2d(4, 2, 1))


def test_freeze_stays_in_eval_and_has_no_grad() -> None:
    net = freeze(_net().train())
    assert not net.training
    for target in (net, net[1], net[2]):
        target.train()
        assert not any(m.training for m in net.modules())
    assert not any(p.requires_grad for p in net.parameters())
    assert all(is_frozen(m) for m in net.modules())


def test_frozen_batchnorm_keeps_running_stats() -> None:
    net = freeze(_net())
    bn = net[1]
    assert isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None
    before = bn.running_mean.clone()
    net.train()
    net(torch.randn(2, 3, 5, 5) * 10 + 3)
    assert torch.equal(bn.running_mean, before)


def test_deepcopy_stays_frozen_and_independent() -> None:
    net = freeze(_net())
    dup = copy.deepcopy(net)
    dup.train()
    assert not any(m.training for m in dup.modules())
    assert dup.train() is dup  # train() still returns the module it was called on
    assert dup[0].weight is not net[0].weight


def test_pickled_frozen_module_stays_frozen() -> None:
    net = freeze(_net())
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    loaded.train()
    assert not any(m.training for m in loaded.modules())
    assert loaded.train() is loaded


def test_not_frozen_module_is_untouched() -> None:
    net = _net()
    assert not is_frozen(net)
    assert net.train().training


def test_freeze_rejects_non_modules() -> None:
    with pytest.raises(TypeError, match=r"nn\.Module"):
        freeze("model")  # type: ignore[type-var]
