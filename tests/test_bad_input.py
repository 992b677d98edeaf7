"""Bad input at every public entry point gets a clear error naming the problem (issue 6, reliability)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from incseg import functional as F
from incseg.data import ADE20K, PascalVOC
from incseg.learner import CheckpointError, IncrementalLearner
from incseg.losses import BalancedKDLoss, CAFLoss, UnbiasedCrossEntropyLoss
from incseg.metrics import MeanIoU
from incseg.models import small_segmenter
from incseg.nn import ContinualAttentiveFusion, NonLocalProjection
from incseg.scenarios import Scenario, get_scenario

NAN, INF = float("nan"), float("inf")


def _logits(k: int = 5) -> torch.Tensor:
    return torch.randn(2, k, 6, 7)


def _labels(k: int = 5) -> torch.Tensor:
    return torch.randint(0, k, (2, 6, 7))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: F.unbiased_cross_entropy(torch.randn(5, 6, 7), _labels(), 2), ValueError, "B, C, H, W"),
        (lambda: F.unbiased_cross_entropy(_logits(), torch.randint(0, 5, (2, 6)), 2), ValueError, "B, H, W"),
        (lambda: F.unbiased_cross_entropy(_logits(), _labels().float(), 2), TypeError, "integer"),
        (lambda: F.unbiased_cross_entropy(_logits(), _labels(), 5), ValueError, "num_old_classes"),
        (lambda: F.unbiased_cross_entropy(_logits(), torch.full((2, 6, 7), 7), 2), ValueError, r"\[7\]"),
        (lambda: F.unbiased_cross_entropy(_logits().int(), _labels(), 2), TypeError, "floating"),
        (lambda: F.unbiased_kd_loss(_logits(), torch.randn(2, 9, 6, 7)), ValueError, "old_logits"),
        (lambda: F.balanced_kd_loss(_logits(), torch.randn(3, 3, 6, 7)), ValueError, "batch"),
        (lambda: UnbiasedCrossEntropyLoss(num_old_classes=2)(_logits(), _labels()[:1]), ValueError, "batch"),
        (lambda: CAFLoss(4, 4)(_logits(), _labels(), num_old_classes=3), ValueError, "old_logits"),
        (lambda: NonLocalProjection(4)(torch.randn(2, 3, 5, 5)), ValueError, "channels"),
        (lambda: ContinualAttentiveFusion(4)(torch.randn(1, 4, 5, 5), torch.randn(1, 4, 6, 5)), ValueError, "shape"),
        (lambda: ContinualAttentiveFusion(4, test_strategy="average"), ValueError, "skip"),  # type: ignore[arg-type]
        (
            lambda: MeanIoU(3).update(torch.randint(0, 3, (2, 4, 4)), torch.randint(0, 3, (2, 5, 4))),
            ValueError,
            "shape",
        ),
        (lambda: MeanIoU(3).update(torch.full((1, 4, 4), 9), torch.zeros(1, 4, 4, dtype=torch.long)), ValueError, "9"),
    ],
)
def test_wrong_shapes_dtypes_and_ranges(call, error: type[Exception], match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_logits_are_named(bad: float) -> None:
    logits = _logits()
    logits[1, 2, 3, 4] = bad
    with pytest.raises(ValueError, match="logits contains non-finite"):
        F.unbiased_cross_entropy(logits, _labels(), 2)
    with pytest.raises(ValueError, match="old_logits contains non-finite"):
        BalancedKDLoss()(_logits(), logits[:, :3])
    with pytest.raises(ValueError, match="preds contains non-finite"):
        MeanIoU(5).update(logits, _labels())


@pytest.mark.parametrize(
    ("groups", "match"),
    [([], "empty"), ([[1, 2], []], "empty"), ([[1, 2], [2, 3]], "more than once|overlap|twice"), ([[0, 1]], "0")],
)
def test_bad_class_groups(groups: list[list[int]], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Scenario(groups)


@pytest.mark.parametrize(("dataset", "task"), [("voc", "15-6"), ("voc", "nope"), ("cityscapes", "15-5")])
def test_unknown_tasks_list_the_known_ones(dataset: str, task: str) -> None:
    with pytest.raises(ValueError, match=r"15-5|voc"):
        get_scenario(dataset, task)


def test_dataset_roots_with_missing_files(tmp_path: Path) -> None:
    (tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="SegmentationClass"):
        PascalVOC(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match=r"ADEChallengeData2016|annotations"):
        ADE20K(tmp_path, "validation")


def _learner(scenario: Scenario) -> IncrementalLearner:
    torch.manual_seed(0)
    learner = IncrementalLearner(small_segmenter(scenario.num_classes_at(0), width=8), scenario, "caf")
    learner.begin_step(0)
    return learner


def test_checkpoints_from_elsewhere_truncated_or_pickled_are_refused(tmp_path: Path) -> None:
    a = _learner(Scenario([[1, 2], [3]]))
    a.save(tmp_path / "a.pt")
    other = _learner(Scenario([[1, 3], [2]]))
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(CheckpointError, match="scenario"):
        other.load(tmp_path / "a.pt")

    data = (tmp_path / "a.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        other.load(tmp_path / "truncated.pt")

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("pwned",))

    payload = torch.load(tmp_path / "a.pt", weights_only=True)
    payload["extra"] = {"x": Evil()}
    with open(tmp_path / "evil.pt", "wb") as f:
        torch.save(payload, f, pickle_module=pickle)
    with pytest.raises(CheckpointError, match=r"weights_only|pickle|unsupported|global"):
        other.load(tmp_path / "evil.pt")

    for key, value in other.model.state_dict().items():  # nothing was half-loaded
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_failed_save_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    learner = _learner(Scenario([[1, 2], [3]]))

    def broken_save(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        learner.save(tmp_path / "ckpt.pt")
    assert list(tmp_path.iterdir()) == []


def test_wrong_dtypes_are_both_type_and_value_errors() -> None:
    for call in (
        lambda: F.unbiased_cross_entropy(_logits(), _labels().float(), 2),
        lambda: F.unbiased_cross_entropy(_logits().long(), _labels(), 2),
    ):
        with pytest.raises(ValueError, match=r"integer|floating"):
            call()
        with pytest.raises(TypeError, match=r"integer|floating"):
            call()
