"""The optimizer parameter groups of `IncrementalLearner.param_groups`."""

from __future__ import annotations

from typing import Any

from torch import nn

from incseg._checks import check_number
from incseg.methods import Method
from incseg.methods.base import check_param_group_factors

__all__ = ["parameter_groups"]


def parameter_groups(
    module: nn.Module, method: Method, step: int, lr: float, weight_decay: float, head_lr: float | None
) -> list[dict[str, Any]]:
    """Every trainable parameter of the training ``module`` (``model.*`` and ``criterion.*``) in exactly one group:
    ``"backbone"``, ``"head"``, ``method.fusion_group`` and ``"criterion"``, except the parts the method gives
    factors to (:meth:`~incseg.methods.Method.param_group_factors`), which get groups of their own.

    Raises:
        TypeError, ValueError: a non-positive or non-finite learning rate, negative weight decay, malformed
            factors.
    """
    lr = check_number(lr, "lr")
    weight_decay = check_number(weight_decay, "weight_decay", allow_zero=True)
    head = lr if head_lr is None else check_number(head_lr, "head_lr")
    fusion = method.fusion_group
    factors = check_param_group_factors(method.param_group_factors(step))
    groups: dict[str, list[nn.Parameter]] = {name: [] for name in ("backbone", "head", fusion, "criterion")}
    base_lr = {"head": head}
    for name, param in module.named_parameters():  # named_parameters yields shared ones once
        if not param.requires_grad:
            continue
        if name.startswith("model.classifier."):
            group, part = "head", _classifier_part(name, step)
        elif name.startswith("model.fusion."):
            group, part = fusion, "fusion"
        elif name.startswith("criterion."):
            group, part = "criterion", "criterion"
        else:
            group = "backbone"
            part = next((p for p in ("encoder", "refiner") if name.startswith(f"model.{p}.")), "backbone")
        if part in factors:
            base_lr.setdefault(part, base_lr.get(group, lr))
            group = part
        groups.setdefault(group, []).append(param)
    out = []
    for name, params in groups.items():
        if not params:
            continue
        lr_factor, wd_factor = factors.get(name, (1.0, 1.0))
        group_lr = base_lr.get(name, lr) * lr_factor
        out.append({"name": name, "params": params, "lr": group_lr, "weight_decay": weight_decay * wd_factor})
    return out


def _classifier_part(name: str, step: int) -> str:
    """``"new_classifier"`` for a parameter of ``step``'s head, else ``"old_classifier"``."""
    parts = name.split(".")
    if len(parts) > 3 and parts[2] == "heads" and parts[3].isdigit():
        return "new_classifier" if int(parts[3]) == step else "old_classifier"
    return "old_classifier"
