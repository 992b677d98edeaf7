"""``torch.compile(fullgraph=True)`` of every loss module: no graph break, forward and backward as in eager.

``aot_eager`` traces the backward pass too (the custom autograd function of the class groups included) without
generating code, so these stay fast on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from incseg.losses import (
    AttentiveDistillationLoss,
    BalancedKDLoss,
    CAFLoss,
    KDLoss,
    UnbiasedCrossEntropyLoss,
    UnbiasedKDLoss,
)

K, N_OLD = 6, 4


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, K, (2, 6, 5), generator=gen)
    labels[0, 0] = 255
    return {
        "logits": torch.randn(2, K, 6, 5, generator=gen) * 3,
        "labels": labels,
        "old_logits": torch.randn(2, N_OLD, 6, 5, generator=gen) * 3,
        "mask": torch.rand(2, 6, 5, generator=gen) < 0.7,
        "z": torch.randn(2, 16, 3, 3, generator=gen),
        "z_old": torch.randn(2, 16, 3, 3, generator=gen),
        "h": torch.randn(2, 8, 3, 3, generator=gen),
        "h_old": torch.randn(2, 8, 3, 3, generator=gen),
    }


def _caf_call(ce: str, kd: str | None) -> Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]:
    def call(module: nn.Module, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return module(
            t["logits"],
            t["labels"],
            num_old_classes=N_OLD,
            old_logits=t["old_logits"],
            features={"z": t["z"], "h": t["h"]},
            old_features={"z": t["z_old"], "h": t["h_old"]},
        ).loss

    return call


class _Pair(nn.Module):
    """MiB's loss from the separate modules: in eager mode the two share one class-group pass (issue 27), under
    torch.compile each runs its own."""

    def __init__(self) -> None:
        super().__init__()
        self.ce, self.kd = UnbiasedCrossEntropyLoss(N_OLD), UnbiasedKDLoss()

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
        return self.ce(logits, labels) + 10.0 * self.kd(logits, old_logits)


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]]] = {
    "unbiased_ce": (
        lambda: UnbiasedCrossEntropyLoss(N_OLD),
        lambda m, t: m(t["logits"], t["labels"]),
    ),
    "unbiased_ce_plus_unbiased_kd": (_Pair, lambda m, t: m(t["logits"], t["labels"], t["old_logits"])),
    "kd": (KDLoss, lambda m, t: m(t["logits"], t["old_logits"], t["mask"])),
    "unbiased_kd": (UnbiasedKDLoss, lambda m, t: m(t["logits"], t["old_logits"], t["mask"])),
    "balanced_kd": (BalancedKDLoss, lambda m, t: m(t["logits"], t["old_logits"])),
    "attentive": (
        lambda: AttentiveDistillationLoss(16, 8, se_reduction=4),
        lambda m, t: m(t["z"], t["z_old"], t["h"], t["h_old"]),
    ),
    "caf_default": (lambda: CAFLoss(16, 8, se_reduction=4), _caf_call("unbiased", "balanced")),
    "caf_mib": (lambda: CAFLoss(None, None, kd="unbiased", ad=None), _caf_call("unbiased", "unbiased")),
    "caf_gamma_on_new": (
        lambda: CAFLoss(None, None, ad=None, gamma_max=1.0, gamma_on_new=False),
        _caf_call("unbiased", "balanced"),
    ),
    "caf_lwf": (lambda: CAFLoss(None, None, ce="plain", kd="plain", ad=None), _caf_call("plain", "plain")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fullgraph_compile_matches_eager(name: str) -> None:
    build, call = CASES[name]
    torch.manual_seed(0)
    module = build()
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (module, compiled):
        inputs = _inputs()
        for key in ("logits", "z", "h"):
            inputs[key].requires_grad_(True)
        loss = call(fn, inputs)
        loss.backward()
        grads = [inputs[key].grad for key in ("logits", "z", "h")]
        results.append((loss.detach(), grads))
    (loss_eager, grads_eager), (loss_compiled, grads_compiled) = results
    torch.testing.assert_close(loss_compiled, loss_eager)
    for eager, compiled_grad in zip(grads_eager, grads_compiled):
        assert (eager is None) == (compiled_grad is None)
        if eager is not None:
            torch.testing.assert_close(compiled_grad, eager)
