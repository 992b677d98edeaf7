"""Checkpoints: atomic writes, safe reads, exact round trips, mid-step resume, and failed loads changing nothing."""

from __future__ import annotations

import copy
import enum
import errno
import io
import math
import os
import pickle
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from incseg.learner import FORMAT_VERSION, CheckpointError, IncrementalLearner
from incseg.learner.checkpoint import atomic_save, check_plain, content_checksum, read_checkpoint
from incseg.models import small_segmenter
from incseg.scenarios import Scenario

MakeLearner = Callable[..., IncrementalLearner]


class _Opaque:
    """A class that weights_only loading refuses."""


def _signed(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its checksum, as every file of the current format holds."""
    data = {k: v for k, v in data.items() if k != "checksum"}
    return {**data, "checksum": content_checksum(data)}


# ----------------------------------------------------------------------------- low level


def test_atomic_save_round_trip(tmp_path: Path) -> None:
    path = atomic_save(_signed({"format_version": FORMAT_VERSION, "w": torch.arange(3)}), tmp_path / "a.pt")
    assert torch.equal(read_checkpoint(path)["w"], torch.arange(3))
    assert sorted(os.listdir(tmp_path)) == ["a.pt"]


def test_atomic_save_failure_leaves_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.pt"
    atomic_save(_signed({"format_version": FORMAT_VERSION, "v": 1}), path)
    before = path.read_bytes()

    def broken_save(obj: Any, f: Any) -> None:
        f.write(b"partial data")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"format_version": FORMAT_VERSION, "v": 2}, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["a.pt"]


def test_atomic_save_needs_existing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_save({}, tmp_path / "missing" / "a.pt")


def test_check_plain() -> None:
    check_plain({"epoch": 3, "rng": torch.get_rng_state(), "hist": [1.0, None, ("a", True)], 4: {}}, "extra")
    with pytest.raises(TypeError, match=r"extra\['obj'\]\[0\] is a _Opaque"):
        check_plain({"obj": [_Opaque()]}, "extra")
    with pytest.raises(TypeError, match="key"):
        check_plain({(1, 2): 3}, "extra")


def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "nope.pt")


def test_read_garbage_truncated_pickled_and_versions(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=r"not a torch\.save file"):
        read_checkpoint(garbage)

    good = atomic_save(_signed({"format_version": FORMAT_VERSION, "w": torch.randn(100)}), tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_checkpoint(truncated)

    pickled = tmp_path / "pickled.pt"
    torch.save({"format_version": FORMAT_VERSION, "obj": _Opaque()}, pickled)
    with pytest.raises(CheckpointError, match=r"python code or objects.*_Opaque.*refused as unsafe"):
        read_checkpoint(pickled)

    for version in (None, FORMAT_VERSION + 1):
        old = tmp_path / f"v{version}.pt"
        torch.save({"format_version": version}, old)
        with pytest.raises(CheckpointError, match="format_version"):
            read_checkpoint(old)

    not_dict = tmp_path / "list.pt"
    torch.save([1, 2], not_dict)
    with pytest.raises(CheckpointError, match="must hold a dict"):
        read_checkpoint(not_dict)


# ----------------------------------------------------------------------------- learner save / load


def _snapshot(learner: IncrementalLearner) -> dict[str, Any]:
    return {
        "step": learner.step,
        "finished": learner.step_finished,
        "classes": learner.model.classifier.classes_per_step,
        "classifier": learner.model.classifier,
        "fusion": learner.model.fusion,
        "teacher": learner.teacher,
        "model": copy.deepcopy(learner.model.state_dict()),
        "teacher_state": None if learner.teacher is None else copy.deepcopy(learner.teacher.state_dict()),
        "criterion": copy.deepcopy(learner.criterion.state_dict()),
        "num_old": learner.num_old_classes,
        "requires_grad": [p.requires_grad for p in learner.module.parameters()],
    }


def _assert_unchanged(learner: IncrementalLearner, snap: dict[str, Any]) -> None:
    now = _snapshot(learner)
    for key in ("step", "finished", "classes", "num_old", "requires_grad"):
        assert now[key] == snap[key], key
    for key in ("classifier", "fusion", "teacher"):
        assert now[key] is snap[key], key
    for key in ("model", "teacher_state", "criterion"):
        if snap[key] is None:
            assert now[key] is None
            continue
        assert now[key].keys() == snap[key].keys(), key
        assert all(torch.equal(now[key][k], snap[key][k]) for k in snap[key]), key


def _predictions(learner: IncrementalLearner, images: Tensor) -> dict[str, Tensor]:
    return {s: learner.predict(images, strategy=s) for s in ("skip", "zero_pad", "concat")}


@pytest.mark.parametrize("method", ["caf", "mib"])
def test_round_trip_reproduces_predictions_exactly(
    tmp_path: Path, make_learner: MakeLearner, advance: Callable[..., Any], images: Tensor, method: str
) -> None:
    learner = make_learner(method)
    advance(learner, images, 2)
    learner.end_step()
    path = tmp_path / "ckpt.pt"
    learner.save(path, extra={"epoch": 7, "rng": torch.get_rng_state()})

    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == FORMAT_VERSION and raw["step"] == 2 and raw["step_finished"]
    assert raw["classes_per_step"] == [3, 1, 1] and raw["has_fusion"] == (method == "caf")
    assert raw["scenario"] == learner.scenario.to_dict() and raw["method"] == learner.config.to_dict()

    torch.manual_seed(123)  # a differently initialised network of the same architecture
    fresh = make_learner(method)
    rng = torch.get_rng_state()
    extra = fresh.load(path)
    assert torch.equal(torch.get_rng_state(), rng)  # rebuilding the structure draws no random numbers
    assert extra["epoch"] == 7 and torch.equal(extra["rng"], raw["extra"]["rng"])
    assert (fresh.step, fresh.step_finished, fresh.num_old_classes) == (2, True, 4)
    assert fresh.model.classifier.classes_per_step == [3, 1, 1]
    assert (fresh.model.fusion is not None) == (method == "caf")
    assert fresh.teacher is not None and fresh.teacher.classifier.classes_per_step == [3, 1]
    fresh.teacher.train()
    assert not any(m.training for m in fresh.teacher.modules())
    expected, got = _predictions(learner, images), _predictions(fresh, images)
    assert all(torch.equal(expected[s], got[s]) for s in expected)
    assert fresh.state_dict()["criterion"].keys() == learner.criterion.state_dict().keys()


def test_from_checkpoint(
    tmp_path: Path, make_learner: MakeLearner, advance: Callable[..., Any], images: Tensor
) -> None:
    learner = make_learner("caf", lambda_ad=10.0)
    advance(learner, images, 1)
    path = tmp_path / "ckpt.pt"
    learner.save(path)
    rebuilt = IncrementalLearner.from_checkpoint(path, small_segmenter(3, width=8))
    assert rebuilt.config == learner.config and rebuilt.scenario == learner.scenario
    assert (rebuilt.step, rebuilt.step_finished) == (1, False)
    assert torch.equal(rebuilt.predict(images), learner.predict(images))


def test_resume_mid_step_matches_uninterrupted_run(
    tmp_path: Path,
    make_learner: MakeLearner,
    advance: Callable[..., Any],
    train_iters: Callable[..., list[float]],
    labels_for: Callable[..., Tensor],
    images: Tensor,
) -> None:
    learner = make_learner("caf")
    optimizer = advance(learner, images, 1, iters=2)  # SGD with momentum: its state matters
    path = tmp_path / "last.pt"
    learner.save(path, optimizer=optimizer, extra={"iteration": 2})
    labels = labels_for(learner.scenario, 1)
    torch.manual_seed(0)  # training draws random numbers (CAF's fusion dropout): same draws in both runs
    train_iters(learner, optimizer, images, labels, 3)

    resumed = IncrementalLearner.from_checkpoint(path, small_segmenter(3, width=8))
    fresh_optimizer = torch.optim.SGD(resumed.param_groups(1e-3), lr=1e-3, momentum=0.9)
    assert resumed.load(path, optimizer=fresh_optimizer) == {"iteration": 2}
    torch.manual_seed(0)
    train_iters(resumed, fresh_optimizer, images, labels, 3)

    expected, got = learner.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert all(torch.equal(a, b) for a, b in zip(learner.criterion.parameters(), resumed.criterion.parameters()))

    # the optimizer state is what makes them equal: without it the weights differ
    again = IncrementalLearner.from_checkpoint(path, small_segmenter(3, width=8))
    train_iters(again, torch.optim.SGD(again.param_groups(1e-3), lr=1e-3, momentum=0.9), images, labels, 3)
    assert not all(torch.equal(expected[k], again.model.state_dict()[k]) for k in expected)


def test_load_in_place_keeps_parameter_identity(
    tmp_path: Path,
    make_learner: MakeLearner,
    advance: Callable[..., Any],
    train_iters: Callable[..., list[float]],
    labels_for: Callable[..., Tensor],
    images: Tensor,
) -> None:
    learner = make_learner("mib")
    optimizer = advance(learner, images, 1)
    path = tmp_path / "ckpt.pt"
    learner.save(path, optimizer=optimizer)
    expected = learner.predict(images)
    params = list(learner.module.parameters())
    train_iters(learner, optimizer, images, labels_for(learner.scenario, 1), 2)
    assert not torch.equal(learner.predict(images), expected)
    learner.load(path, optimizer=optimizer)  # same structure: weights copied into the same parameters
    assert all(a is b for a, b in zip(params, learner.module.parameters(), strict=True))
    assert torch.equal(learner.predict(images), expected)


def test_save_errors(tmp_path: Path, make_learner: MakeLearner) -> None:
    learner = make_learner("ft")
    with pytest.raises(RuntimeError, match="begin_step"):
        learner.save(tmp_path / "a.pt")
    learner.begin_step(0)
    with pytest.raises(TypeError, match="which a checkpoint cannot hold"):
        learner.save(tmp_path / "a.pt", extra={"obj": _Opaque()})
    with pytest.raises(TypeError, match="optimizer"):
        learner.save(tmp_path / "a.pt", optimizer="sgd")  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []


def test_save_failure_leaves_no_partial_file(
    tmp_path: Path, make_learner: MakeLearner, monkeypatch: pytest.MonkeyPatch
) -> None:
    learner = make_learner("caf")
    learner.begin_step(0)
    path = tmp_path / "ckpt.pt"
    learner.save(path)
    before = path.read_bytes()

    def broken_save(obj: Any, f: Any) -> None:
        f.write(b"PK partial")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="interrupted"):
        learner.save(path, extra={"epoch": 1})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]


@pytest.fixture
def saved_step2(tmp_path: Path, make_learner: MakeLearner, advance: Callable[..., Any], images: Tensor) -> Path:
    """A caf checkpoint at step 2 (with optimizer state)."""
    learner = make_learner("caf")
    optimizer = advance(learner, images, 2)
    path = tmp_path / "step2.pt"
    learner.save(path, optimizer=optimizer)
    return path


@pytest.fixture
def victim(make_learner: MakeLearner, advance: Callable[..., Any], images: Tensor) -> IncrementalLearner:
    """A caf learner at step 1 (teacher, CAF module, trained weights) that failed loads must leave alone."""
    torch.manual_seed(7)
    learner = make_learner("caf")
    advance(learner, images, 1)
    return learner


def _tampered(path: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """An edited copy of the checkpoint with a recomputed checksum: only the learner's checks can refuse it."""
    data = torch.load(path, weights_only=True)
    data.pop("checksum")
    edit(data)
    out = tmp_path / "tampered.pt"
    torch.save(_signed(data), out)
    return out


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split("/")
    for key in parents:
        data = data[key]
    data[last] = value


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: _set(d, "format_version", 0), "format_version"),
        (lambda d: d.pop("teacher"), "missing the key 'teacher'"),
        (lambda d: _set(d, "step", "2"), "'step' must be int"),
        (lambda d: _set(d, "step", 5), r"step 5 is outside \[0, 3\)"),
        (lambda d: _set(d, "scenario/groups", [[1], [2, 3], [4]]), "another scenario"),
        (lambda d: _set(d, "scenario/mode", "banana"), "scenario is invalid"),
        (lambda d: _set(d, "method/kd", "balanced"), r"another method configuration.*'kd': \('balanced', 'unbiased'\)"),
        (lambda d: _set(d, "method/ce", "focal"), "method configuration is invalid"),
        (lambda d: _set(d, "classes_per_step", [3, 2, 1]), "classes_per_step"),
        (lambda d: _set(d, "has_fusion", False), "has_fusion"),
        (lambda d: _set(d, "teacher", None), "teacher"),
        (lambda d: _set(d, "model/encoder.stem.0.weight", torch.zeros(1)), r"model weights do not fit.*size mismatch"),
        (lambda d: d["model"].pop(next(k for k in d["model"] if k.startswith("fusion."))), r"do not fit.*Missing"),
        (lambda d: _set(d, "teacher/refiner.project.1.bias", torch.zeros(3)), "teacher weights do not fit"),
        (lambda d: _set(d, "criterion/extra_key", torch.zeros(1)), r"criterion weights do not fit.*Unexpected"),
        (lambda d: _set(d, "model/encoder.stem.0.weight", [1.0]), "must map names to tensors"),
        # found by the fuzz test: accepted before, though save never writes them
        (
            lambda d: _set(d, "scenario/extra_key", 1),
            r"'scenario' has fields that its writer never writes: \['extra_key",
        ),
        (lambda d: _set(d, "method/lambda_d", 10), r"'method' has fields .*\['lambda_d'\]"),
        (
            lambda d: _set(d, "model/encoder.stem.1.num_batches_tracked", torch.ones(1, dtype=torch.long)),
            r"\(\(1,\) -> \(\)\)",
        ),
        (lambda d: _set(d, "unknown", 1), r"unknown keys \['unknown'\]"),
    ],
)
def test_invalid_checkpoint_leaves_learner_unchanged(
    tmp_path: Path, saved_step2: Path, victim: IncrementalLearner, edit: Callable[..., Any], match: str
) -> None:
    bad = _tampered(saved_step2, tmp_path, edit)
    snap = _snapshot(victim)
    with pytest.raises(CheckpointError, match=match):
        victim.load(bad)
    _assert_unchanged(victim, snap)


@pytest.mark.parametrize("kind", ["garbage", "truncated", "pickled"])
def test_unreadable_checkpoint_leaves_learner_unchanged(
    tmp_path: Path, saved_step2: Path, victim: IncrementalLearner, kind: str
) -> None:
    bad = tmp_path / f"{kind}.pt"
    if kind == "garbage":
        bad.write_bytes(os.urandom(2048))
    elif kind == "truncated":
        bad.write_bytes(saved_step2.read_bytes()[:-100])
    else:
        data = torch.load(saved_step2, weights_only=True)
        data["extra"] = {"obj": _Opaque()}
        torch.save(data, bad)
    snap = _snapshot(victim)
    with pytest.raises(CheckpointError):
        victim.load(bad)
    _assert_unchanged(victim, snap)


@pytest.mark.parametrize(
    ("method", "width", "scenario_groups", "match"),
    [
        ("mib", 8, None, "another method"),
        ("caf", 16, None, "do not fit"),
        ("caf", 8, [[1, 2], [3, 4]], "another scenario"),
    ],
)
def test_checkpoint_of_another_learner(
    saved_step2: Path,
    make_learner: MakeLearner,
    advance: Callable[..., Any],
    images: Tensor,
    method: str,
    width: int,
    scenario_groups: list[list[int]] | None,
    match: str,
) -> None:
    scn = None if scenario_groups is None else Scenario(scenario_groups)
    other = make_learner(method, width=width, scn=scn)
    advance(other, images, 1)
    snap = _snapshot(other)
    with pytest.raises(CheckpointError, match=match):
        other.load(saved_step2)
    _assert_unchanged(other, snap)


def test_optimizer_mismatch_leaves_learner_and_optimizer_unchanged(
    tmp_path: Path, saved_step2: Path, make_learner: MakeLearner, advance: Callable[..., Any], images: Tensor
) -> None:
    learner = make_learner("caf")
    optimizer = advance(learner, images, 1)
    opt_state = copy.deepcopy(optimizer.state_dict())
    snap = _snapshot(learner)
    # the structure differs (step 1 -> step 2): the optimizer cannot fit
    with pytest.raises(CheckpointError, match="load without optimizer first"):
        learner.load(saved_step2, optimizer=optimizer)
    _assert_unchanged(learner, snap)

    same_step = tmp_path / "step1.pt"
    learner.save(same_step)  # no optimizer state
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        learner.load(same_step, optimizer=optimizer)
    learner.save(same_step, optimizer=optimizer)
    other = torch.optim.SGD(learner.param_groups(0.1)[:1], lr=0.1)
    with pytest.raises(CheckpointError, match="parameter groups of sizes"):
        learner.load(same_step, optimizer=other)
    foreign = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(CheckpointError, match="not this learner's"):
        learner.load(same_step, optimizer=foreign)
    _assert_unchanged(learner, snap)
    assert optimizer.state_dict()["param_groups"] == opt_state["param_groups"]


def test_load_state_dict_rejects_non_mapping(make_learner: MakeLearner) -> None:
    with pytest.raises(CheckpointError, match="must be a dict"):
        make_learner().load_state_dict([1, 2])  # type: ignore[arg-type]


def test_load_earlier_step_into_later_learner(
    tmp_path: Path, make_learner: MakeLearner, advance: Callable[..., Any], images: Tensor
) -> None:
    learner = make_learner("caf")
    advance(learner, images, 1)
    path = tmp_path / "step1.pt"
    learner.save(path)
    expected = learner.predict(images)
    advance(learner, images, 2)
    learner.load(path)  # back to step 1: one head fewer
    assert learner.step == 1 and learner.model.classifier.classes_per_step == [3, 1]
    assert learner.teacher is not None and learner.teacher.fusion is None
    assert torch.equal(learner.predict(images), expected)


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("echo pwned",))


def test_code_in_a_checkpoint_is_reported_as_unsafe_without_suggesting_the_unsafe_load(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format_version": FORMAT_VERSION, "x": _Evil()}, path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert "refused as unsafe" in message and "system" in message and "corrupt" not in message
    assert "weights_only" not in message.replace("weights_only=True", "")


def test_directory_device_and_unreadable_files_get_their_own_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(CheckpointError, match="is a directory"):
        read_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_checkpoint("/dev/null")
    locked = tmp_path / "locked.pt"
    torch.save({"format_version": FORMAT_VERSION}, locked)

    def denied(*_args: Any, **_kwargs: Any) -> None:  # as open() of a mode-000 file for a non-root user
        raise PermissionError(13, "Permission denied", str(locked))

    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(PermissionError, match="permission denied"):
        read_checkpoint(locked)


@pytest.mark.parametrize("version", [1.0, True, "1"])
def test_format_version_must_be_an_int(tmp_path: Path, version: object) -> None:
    path = tmp_path / "v.pt"
    torch.save({"format_version": version}, path)
    with pytest.raises(CheckpointError, match="format_version"):
        read_checkpoint(path)


# ----------------------------------------------------------------------------- integrity (checksum, dtypes)


def _flip_bit_in_largest_tensor(path: Path) -> None:
    """Flip one bit in the middle of the largest tensor's bytes (torch stores them uncompressed in the zip)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len = int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def test_a_flipped_bit_in_tensor_data_is_refused_as_damaged(
    tmp_path: Path, saved_step2: Path, victim: IncrementalLearner
) -> None:
    assert torch.load(saved_step2, weights_only=True)["checksum"].startswith("sha256:")
    _flip_bit_in_largest_tensor(saved_step2)
    torch.load(saved_step2, weights_only=True)  # torch itself does not notice
    snap = _snapshot(victim)
    with pytest.raises(CheckpointError, match=r"is damaged: its content does not match the checksum"):
        victim.load(saved_step2)
    _assert_unchanged(victim, snap)


def test_a_changed_plain_value_is_refused_as_damaged(tmp_path: Path, saved_step2: Path) -> None:
    data = torch.load(saved_step2, weights_only=True)
    data["step_finished"] = not data["step_finished"]
    torch.save(data, saved_step2)
    with pytest.raises(CheckpointError, match="is damaged"):
        read_checkpoint(saved_step2)


def test_a_file_of_format_1_without_checksum_still_loads(
    tmp_path: Path, saved_step2: Path, make_learner: MakeLearner
) -> None:
    data = torch.load(saved_step2, weights_only=True)
    data.pop("checksum")  # as written by incseg 0.1: format_version 1, no checksum
    data["format_version"] = 1
    old = tmp_path / "old.pt"
    torch.save(data, old)
    fresh = make_learner("caf")
    fresh.load(old)
    assert fresh.step == 2
    assert "checksum" not in read_checkpoint(saved_step2)  # verified and removed


def test_b1_a_file_of_format_2_without_checksum_is_refused(tmp_path: Path, saved_step2: Path) -> None:
    data = torch.load(saved_step2, weights_only=True)
    data.pop("checksum")
    torch.save(data, saved_step2)
    with pytest.raises(CheckpointError, match="has no 'checksum' entry, which format_version 2 requires"):
        read_checkpoint(saved_step2)


def _replace_bytes(path: Path, old: bytes, new: bytes) -> None:
    raw = path.read_bytes()
    assert raw.count(old) == 1
    path.write_bytes(raw.replace(old, new))


@pytest.mark.parametrize("version", [2, 1])
def test_b1_a_flipped_bit_in_the_checksum_key_and_in_a_tensor_is_refused(
    tmp_path: Path, saved_step2: Path, victim: IncrementalLearner, version: int
) -> None:
    """The red team's reproduction: 'checksum' -> 'chdcksum' (one bit) plus one bit in the largest tensor."""
    if version == 1:  # a file of incseg 0.1 written after checksums existed: format 1 with a checksum
        data = torch.load(saved_step2, weights_only=True)
        data.pop("checksum")
        data["format_version"] = 1
        torch.save(_signed(data), saved_step2)
    _replace_bytes(saved_step2, b"checksum", bytes([b"c"[0], b"h"[0], b"e"[0] ^ 0x01]) + b"cksum")
    _flip_bit_in_largest_tensor(saved_step2)
    snap = _snapshot(victim)
    with pytest.raises(CheckpointError, match=r"no 'checksum' entry|unknown keys"):
        victim.load(saved_step2)
    _assert_unchanged(victim, snap)


def test_an_unknown_checksum_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    torch.save({"format_version": FORMAT_VERSION, "checksum": "md5:00"}, path)
    with pytest.raises(CheckpointError, match="not 'sha256:<64 hex digits>'"):
        read_checkpoint(path)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.bool, torch.complex64, torch.float16])
def test_weights_of_another_dtype_are_refused_not_cast(
    tmp_path: Path, saved_step2: Path, victim: IncrementalLearner, dtype: torch.dtype
) -> None:
    def edit(d: dict[str, Any]) -> None:
        key = "encoder.stem.0.weight"
        d["model"][key] = d["model"][key].to(dtype)

    bad = _tampered(saved_step2, tmp_path, edit)
    snap = _snapshot(victim)
    with pytest.raises(CheckpointError, match=rf"other dtypes.*encoder.stem.0.weight \({dtype} -> torch.float32\)"):
        victim.load(bad)
    _assert_unchanged(victim, snap)


def test_content_checksum_sees_dtype_shape_and_values() -> None:
    from incseg.learner.checkpoint import content_checksum

    base = content_checksum({"w": torch.zeros(4), "n": 1})
    assert base == content_checksum({"w": torch.zeros(4), "n": 1})
    changed = [
        {"w": torch.zeros(4, dtype=torch.float64), "n": 1},
        {"w": torch.zeros(2, 2), "n": 1},
        {"w": torch.tensor([0.0, 0.0, 0.0, 1e-45]), "n": 1},
        {"w": torch.zeros(4), "n": 1.0},
        {"w": torch.zeros(4), "n": True},
        {"w": torch.zeros(4), "m": 1},
    ]
    assert len({base, *(content_checksum(c) for c in changed)}) == len(changed) + 1


# ----------------------------------------------------------------------------- temporaries and permissions


def test_stale_temporaries_are_removed_at_the_next_save(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    stale = tmp_path / ".last.pt.k3j2h1.tmp"  # left by a save killed before its rename
    stale.write_bytes(b"x" * 1000)
    other = tmp_path / ".step0.pt.aaaa.tmp"  # another checkpoint's: not this save's business
    other.write_bytes(b"x")
    atomic_save({"format_version": FORMAT_VERSION}, path)
    assert not stale.exists() and other.exists()
    assert sorted(os.listdir(tmp_path)) == [".step0.pt.aaaa.tmp", "last.pt"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_respect_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        path = atomic_save({"format_version": FORMAT_VERSION}, tmp_path / "a.pt")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# ----------------------------------------------------------------------------- issue 23: the second red team


def test_b4_save_never_replaces_a_pipe_or_a_device_node(tmp_path: Path, make_learner: MakeLearner) -> None:
    learner = make_learner("ft")
    learner.begin_step(0)
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    nodes = [pipe]
    if os.geteuid() == 0:  # the red team's case: as root, a rename replaces a device node with a file
        device = tmp_path / "null"
        os.mknod(device, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        nodes.append(device)
    for node in nodes:
        with pytest.raises(ValueError, match="not a regular file; save to a new path or a regular file"):
            learner.save(node)
    with pytest.raises(ValueError, match="it is a directory"):
        learner.save(tmp_path)
    assert stat.S_ISFIFO(pipe.stat().st_mode)
    if len(nodes) > 1:
        assert stat.S_ISCHR(nodes[1].stat().st_mode)
    assert sorted(os.listdir(tmp_path)) == sorted(n.name for n in nodes)


def test_b4_save_through_a_symlink_replaces_its_target(tmp_path: Path, make_learner: MakeLearner) -> None:
    learner = make_learner("ft")
    learner.begin_step(0)
    (tmp_path / "real").mkdir()
    link = tmp_path / "last.pt"
    link.symlink_to(tmp_path / "real" / "ckpt.pt")
    learner.save(link)
    learner.save(link)
    assert link.is_symlink() and (tmp_path / "real" / "ckpt.pt").is_file()
    assert read_checkpoint(link)["step"] == 0


class _Mode(enum.IntEnum):
    FAST = 1


class _Name(str):
    pass


@pytest.mark.parametrize(
    "value", [np.float64(0.5), np.int64(3), _Mode.FAST, _Name("a"), {"nested": [np.float32(1.0)]}, {True: 1}]
)
def test_b6_save_refuses_what_load_would_refuse(tmp_path: Path, make_learner: MakeLearner, value: object) -> None:
    learner = make_learner("ft")
    learner.begin_step(0)
    with pytest.raises(TypeError, match=r"which a checkpoint cannot hold|key"):
        learner.save(tmp_path / "a.pt", extra={"miou": value})
    assert os.listdir(tmp_path) == []


def test_b6_load_refuses_what_save_would_refuse(tmp_path: Path, saved_step2: Path, victim: IncrementalLearner) -> None:
    bad = _tampered(saved_step2, tmp_path, lambda d: _set(d, "extra/sizes", {1, 2}))  # a set: torch loads it
    snap = _snapshot(victim)
    with pytest.raises(CheckpointError, match=r"checkpoint\['extra'\]\['sizes'\] is a set"):
        victim.load(bad)
    _assert_unchanged(victim, snap)


def test_b6_everything_save_accepts_loads(tmp_path: Path, make_learner: MakeLearner) -> None:
    learner = make_learner("ft")
    learner.begin_step(0)
    extra = {"miou": float(np.float64(0.5)), "mode": int(_Mode.FAST), "t": (1, [None, "a"]), 3: torch.ones(2)}
    learner.save(tmp_path / "a.pt", extra=extra)
    loaded = make_learner("ft").load(tmp_path / "a.pt")
    assert loaded.keys() == extra.keys() and loaded["t"] == (1, [None, "a"]) and torch.equal(loaded[3], torch.ones(2))


def test_a_plain_pickle_is_named_without_torchs_unsafe_advice(tmp_path: Path) -> None:
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"format_version": FORMAT_VERSION, "w": [1.0, 2.0]}))
    with pytest.raises(CheckpointError, match=r"is not a torch\.save file") as info:
        read_checkpoint(path)
    message = str(info.value)
    assert "trusted source" not in message and "weights_only" not in message and "\n" not in message


class _ShortWrites(io.RawIOBase):
    """A disk that fills up after ``room`` bytes: short writes, then ENOSPC (what torch reports as
    ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``)."""

    def __init__(self, room: int) -> None:
        self.room = room

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        n = min(len(data), self.room)
        self.room -= n
        if n == 0 and len(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        return n


def test_c3_a_full_disk_is_an_oserror_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.pt"
    atomic_save(_signed({"format_version": FORMAT_VERSION, "v": 1}), path)
    before = path.read_bytes()
    real_save = torch.save
    with pytest.raises(RuntimeError, match="unexpected pos"):  # what torch does on a full disk
        real_save({"w": torch.zeros(1000)}, _ShortWrites(100))
    monkeypatch.setattr(torch, "save", lambda obj, f: real_save(obj, _ShortWrites(100)))
    with pytest.raises(OSError, match=r"cannot write checkpoint .*a\.pt: No space left on device; .* MB free") as info:
        atomic_save(_signed({"format_version": FORMAT_VERSION, "w": torch.zeros(1000)}), path)
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["a.pt"]


def test_c9_an_optimizer_state_of_the_wrong_shape_or_dtype_is_refused(
    tmp_path: Path, make_learner: MakeLearner, advance: Callable[..., Any], images: Tensor
) -> None:
    learner = make_learner("caf")
    optimizer = advance(learner, images, 1)
    path = tmp_path / "mid.pt"
    learner.save(path, optimizer=optimizer)
    for edit, match in [
        (lambda s: s.__setitem__("momentum_buffer", torch.zeros(3)), r"shape \(3,\)"),
        (lambda s: s.__setitem__("momentum_buffer", s["momentum_buffer"].double()), "torch.float64"),
        (lambda s: s.__setitem__("momentum_buffer", s["momentum_buffer"] * math.nan), "NaN/Inf"),
        (lambda s: s.__setitem__("momentum_buffer", "x"), "is a str, which no optimizer state holds"),
    ]:

        def change(d: dict[str, Any], edit: Callable[[dict[str, Any]], None] = edit) -> None:
            edit(d["optimizer"]["state"][0])

        bad = _tampered(path, tmp_path, change)
        before = copy.deepcopy(optimizer.state_dict())
        with pytest.raises(CheckpointError, match=match):
            learner.load(bad, optimizer=optimizer)
        assert torch.equal(optimizer.state_dict()["state"][0]["momentum_buffer"], before["state"][0]["momentum_buffer"])

    def float_index(d: dict[str, Any]) -> None:  # 0.0 == 0: torch would map the state to the wrong parameters
        d["optimizer"]["param_groups"][0]["params"][0] = 0.0

    with pytest.raises(CheckpointError, match="group 0 has parameter indices or settings"):
        learner.load(_tampered(path, tmp_path, float_index), optimizer=optimizer)


def test_a_scenario_with_another_class_order_names_the_difference(
    tmp_path: Path, saved_step2: Path, victim: IncrementalLearner
) -> None:
    bad = _tampered(saved_step2, tmp_path, lambda d: _set(d, "scenario/groups", [[2, 1], [3], [4]]))
    with pytest.raises(CheckpointError, match=r"differing fields .*'groups': \(\[\[2, 1\], \[3\], \[4\]\], \[\[1, 2\]"):
        victim.load(bad)
