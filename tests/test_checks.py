"""``incseg._checks``: the finiteness check of a tensor runs once while the tensor is unchanged."""

from __future__ import annotations

import pytest
import torch

import incseg._checks as checks
from incseg._checks import NonFiniteError, check_finite


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = checks._all_finite

    def counted(x: torch.Tensor) -> bool:
        calls.append(x.numel())
        return real(x)

    monkeypatch.setattr(checks, "_all_finite", counted)
    return calls


def test_an_unchanged_tensor_is_checked_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting(monkeypatch)
    x, y = torch.randn(4, 3), torch.randn(5)
    assert check_finite(x, "x") is x and check_finite(x, "x") is x
    assert calls == [12]
    check_finite(y, "y")  # another tensor: checked, and now the one remembered
    check_finite(x, "x")
    assert calls == [12, 5, 12]


def test_an_in_place_change_is_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting(monkeypatch)
    x = torch.randn(4, 3)
    check_finite(x, "x")
    x[1, 2] = float("nan")  # bumps the version counter
    with pytest.raises(NonFiniteError, match="1 NaN"):
        check_finite(x, "x")
    with torch.no_grad():
        z = torch.randn(3)
        check_finite(z, "z")
        z.mul_(float("inf"))
        with pytest.raises(NonFiniteError, match="Inf"):
            check_finite(z, "z")
    assert len(calls) == 4


def test_inference_tensors_are_checked_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting(monkeypatch)
    with torch.inference_mode():
        x = torch.randn(3)
        check_finite(x, "x")
        check_finite(x, "x")
    assert calls == [3, 3]  # no version counter: nothing remembered
