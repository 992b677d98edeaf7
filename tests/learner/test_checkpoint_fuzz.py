"""Fuzzing the checkpoint format (issue 23): flipped bits, and edited fields with a recomputed checksum.

Every load either refuses the file with ``CheckpointError`` (leaving the learner and its optimizer as they were)
or restores exactly the state the file holds: for flipped bits the state that was saved, for edits (a valid
checksum: the file was changed on purpose) the edited state, value for value and type for type.
"""

from __future__ import annotations

import copy
import functools
import io
import math
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from incseg.learner import CheckpointError, IncrementalLearner, MethodConfig
from incseg.learner.checkpoint import content_checksum
from incseg.models import small_segmenter
from incseg.scenarios import Scenario

_INFORMATIONAL = ("format_version", "incseg_version")  # not state: the learner writes its own


def _build() -> tuple[IncrementalLearner, torch.optim.Optimizer]:
    """A CAF learner in the middle of step 1 with momentum, the structure every fuzzed file is loaded into."""
    torch.manual_seed(0)
    scenario = Scenario([[1, 2], [3]])
    learner = IncrementalLearner(small_segmenter(3, width=4), scenario, "caf")
    learner.begin_step(0)
    learner.end_step()
    learner.begin_step(1)
    optimizer = torch.optim.SGD(learner.param_groups(1e-3), lr=1e-3, momentum=0.9)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 4, (2, 16, 16), generator=torch.Generator().manual_seed(2))
    out = learner.training_step(images, labels)
    out.loss.backward()
    optimizer.step()
    return learner, optimizer


@functools.cache
def _saved() -> tuple[bytes, dict[str, Any], IncrementalLearner]:
    """The saved file's bytes, its state (without the checksum) and the learner that wrote it."""
    learner, optimizer = _build()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mid.pt"
        learner.save(path, optimizer=optimizer, extra={"epoch": 1, "note": "fuzz", "values": [1.5, None, True]})
        raw = path.read_bytes()
    state = torch.load(io.BytesIO(raw), weights_only=True)
    state.pop("checksum")
    return raw, state, learner


def _same(a: Any, b: Any, where: str = "state", skip: tuple[str, ...] = ()) -> None:
    """Equal values of equal types (tensors: dtype, shape and bits); dict order does not matter."""
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{b.shape}"
        assert torch.equal(a.cpu().reshape(-1).view(torch.uint8), b.cpu().reshape(-1).view(torch.uint8)), where
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(map(str, set(a) ^ set(b)))} differ"
        for key in a:
            if key not in skip:
                _same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), f"{where}: {a!r} vs {b!r}"


def _restored(learner: IncrementalLearner, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> dict[str, Any]:
    state = learner.state_dict(optimizer=optimizer, extra=extra)
    return {k: v for k, v in state.items() if k not in _INFORMATIONAL}


def _load(data: bytes, path: Path, template: IncrementalLearner, expected: dict[str, Any] | None) -> None:
    """Load ``data`` into a copy of ``template``: refused without a change, or exactly ``expected``."""
    learner = copy.deepcopy(template)
    optimizer = torch.optim.SGD(learner.param_groups(1e-3), lr=1e-3, momentum=0.9)
    before = content_checksum(_restored(learner, optimizer, {}))
    path.write_bytes(data)
    try:
        extra = learner.load(path, optimizer=optimizer)
    except CheckpointError as err:
        assert "\n" not in str(err)
        assert content_checksum(_restored(learner, optimizer, {})) == before, "a refused load changed the learner"
        return
    assert expected is not None, "a damaged file loaded"
    restored = _restored(learner, optimizer, extra)
    # The scenario and method are the learner's configuration, not restored state: the file's must describe
    # the same ones (10 and 10.0 are the same weight); everything else must be the file's, type for type.
    assert Scenario.from_dict(expected["scenario"]) == learner.scenario
    assert MethodConfig.from_dict(expected["method"]) == learner.config
    _same(restored, {k: v for k, v in expected.items() if k not in _INFORMATIONAL}, skip=("scenario", "method"))


def _regions(data: bytes) -> list[tuple[int, int]]:
    """Byte ranges of the pickle (keys, plain values, tensor records) and of every tensor's data in the zip."""
    spans = []
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            name_len = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
            extra_len = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
            start = info.header_offset + 30 + name_len + extra_len
            spans.append((start, start + info.file_size))
    return spans


_fuzz = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_fuzz
@given(st.data())
def test_flipped_bits_are_refused_or_change_nothing(tmp_path: Path, data: st.DataObject) -> None:
    raw, state, template = _saved()
    spans = _regions(raw)
    pickle_span = next(s for s in spans if raw[s[0] : s[0] + 1] == b"\x80")  # data.pkl starts with PROTO
    flipped = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 3), label="flips")):
        region = data.draw(st.sampled_from(["pickle", "anywhere"]), label="region")
        low, high = pickle_span if region == "pickle" else (0, len(raw))
        offset = data.draw(st.integers(low, high - 1), label="offset")
        flipped[offset] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    _load(bytes(flipped), tmp_path / "flipped.pt", template, state)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for key, value in obj.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            out += _paths(value, (*prefix, i))
    return out


def _replacements(old: Any) -> list[Any]:
    values: list[Any] = [None, True, False, 0, 1, -1, 2, 99, 1.5, math.nan, "x", [], {}, (1,), torch.zeros(1)]
    if isinstance(old, Tensor) and old.numel():
        values += [
            old.double(),
            old.half() if old.is_floating_point() else old.float(),
            old.flatten(),
            old.clone().fill_(math.nan) if old.is_floating_point() else old + 1,
            old + 1,  # another valid value: must load as it is
            old.reshape(-1)[:1] if old.ndim else old.reshape(1),
        ]
    if isinstance(old, list):
        values += [tuple(old), old[:-1], [*old, old[-1]] if old else [0]]
    if isinstance(old, (int, float)) and not isinstance(old, bool):
        values += [old + 1, float(old), old * -1]
    return values


@_fuzz
@given(st.data())
def test_edited_fields_with_a_new_checksum_are_refused_or_restored_exactly(tmp_path: Path, data: st.DataObject) -> None:
    _, state, template = _saved()
    edited = copy.deepcopy(state)
    path = data.draw(st.sampled_from(_paths(edited)), label="path")
    *parents, last = path
    container = edited
    for key in parents:
        container = container[key]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]), label="action")
    if action == "delete" and isinstance(container, dict):
        del container[last]
    elif action == "add" and isinstance(container, dict):
        container[data.draw(st.sampled_from(["extra_key", 12345, "momentum_buffer", "step"]), label="key")] = (
            torch.zeros(2)
        )
    elif isinstance(container, tuple):
        return  # tuples (none in a learner state) cannot be edited in place
    else:
        container[last] = data.draw(st.sampled_from(_replacements(container[last])), label="value")
    signed = {**edited, "checksum": content_checksum(edited)}
    file = tmp_path / "edited.pt"
    torch.save(signed, file)
    _load(file.read_bytes(), file, template, edited)
