"""The errors worth catching are public at the top level, and the one num_old_classes check serves all."""

from __future__ import annotations

import pytest
import torch

import incseg
from incseg._checks import check_num_old_classes
from incseg.learner import CheckpointError
from incseg.metrics import MeanIoU


def test_errors_are_exported() -> None:
    assert {"NonFiniteError", "InputTypeError", "CheckpointError"} <= set(incseg.__all__)
    assert incseg.CheckpointError is CheckpointError
    assert issubclass(incseg.InputTypeError, TypeError) and issubclass(incseg.InputTypeError, ValueError)
    with pytest.raises(incseg.NonFiniteError):
        incseg.functional.kd_loss(torch.full((1, 3, 2, 2), float("nan")), torch.zeros(1, 2, 2, 2))
    with pytest.raises(incseg.InputTypeError):
        incseg.functional.unbiased_cross_entropy(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2), num_old_classes=1)


def test_one_num_old_classes_check() -> None:
    assert check_num_old_classes(3, 5) == 3 and check_num_old_classes(5, 5) == 5
    assert check_num_old_classes(None, 5, allow_none=True) is None
    with pytest.raises(ValueError, match="< K"):
        check_num_old_classes(5, 5, allow_all=False)
    with pytest.raises(ValueError, match="1 <= num_old_classes"):
        check_num_old_classes(0, 5, minimum=1)
    with pytest.raises(TypeError, match="an int or None"):
        check_num_old_classes(1.0, 5, allow_none=True)
    with pytest.raises(TypeError, match="must be an int,"):
        check_num_old_classes(None, 5)
    with pytest.raises(ValueError, match="num_old_classes"):  # the metrics use the same check
        MeanIoU(3, num_old_classes=4)
