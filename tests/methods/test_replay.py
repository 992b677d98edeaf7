"""ReplayMemory: class-balanced selection within the budget, labels of memory images, plain checkpoint state,
and replay through the training loop with any method (resume included)."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

from incseg.data import IncrementalSegmentation, SyntheticScenes, TestTransform, image_class_sets
from incseg.engine import TrainConfig, train_scenario
from incseg.learner import IncrementalLearner, MethodConfig
from incseg.learner.checkpoint import read_checkpoint
from incseg.methods import ReplayMemory
from incseg.models import small_segmenter
from incseg.scenarios import get_scenario

SCENARIO = get_scenario("synthetic", "15-1", mode="overlapped")
SOURCE = SyntheticScenes("train", num_images=80, size=48, seed=1)


def _train_set(step: int) -> IncrementalSegmentation:
    return IncrementalSegmentation(SOURCE, SCENARIO, step, train=True, transform=TestTransform(size=None))


def test_selection_is_class_balanced_within_the_budget() -> None:
    memory = ReplayMemory(30, seed=0)
    memory.update(_train_set(0))
    assert len(memory) == 30 and len({src for src, _ in memory.entries}) == 30
    sets = image_class_sets(SOURCE)
    # each of the 15 classes of step 0 got its 2 slots (or all its images when it has fewer)
    available = collections.Counter(c for i in _train_set(0).indices for c in sets[i])
    counts: collections.Counter[int] = collections.Counter()
    for src, step in memory.entries:
        assert step == 0 and int(src) in _train_set(0).indices
        counts.update(c for c in sets[src] if c in SCENARIO.classes_at(0) and c != 0)
    assert all(counts[c] >= min(2, available[c]) for c in SCENARIO.classes_at(0) if c != 0)
    before = list(memory.entries)
    memory.update(_train_set(1))  # 16 classes now: the new class gets its share, old images stay labelled at step 0
    assert len(memory) == 30
    new_class = SCENARIO.classes_at(1)[0]
    assert sum(1 for src, s in memory.entries if s == 1 and new_class in sets[src]) >= 1
    assert all(s == 0 for src, s in memory.entries if (src, s) in before)
    again = ReplayMemory(30, seed=0)
    again.update(_train_set(0))
    assert again.entries == before  # deterministic for a seed


def test_memory_labels_keep_their_step_classes() -> None:
    memory = ReplayMemory(6, seed=1)
    memory.update(_train_set(0))
    replay = memory.dataset(_train_set(3))
    assert len(replay) == 6
    for i, (src, _) in enumerate(memory.entries):
        _image, target = replay[i]
        _, mask = SOURCE.load(src)
        expected = SCENARIO.train_label_map(0)[mask.long()]
        assert torch.equal(target, expected)  # old classes keep their index, not background
        assert int(target[target != 255].max()) >= 1


def test_state_is_plain_and_validated() -> None:
    memory = ReplayMemory(5, seed=3)
    memory.update(_train_set(0))
    state = memory.state_dict()
    assert all(isinstance(v, int) for pair in state["entries"] for v in pair)
    other = ReplayMemory(5)
    other.load_state_dict(state)
    assert other.entries == memory.entries
    with pytest.raises(ValueError, match="pairs of ints"):
        other.load_state_dict({"budget": 5, "entries": [[1.5, 0]]})
    with pytest.raises(ValueError, match="budget"):
        ReplayMemory(4).load_state_dict(state)
    assert other.entries == memory.entries
    with pytest.raises(ValueError, match="budget"):
        ReplayMemory(-1)
    with pytest.raises(TypeError, match="IncrementalSegmentation"):
        memory.update([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        ReplayMemory(3).dataset(_train_set(1))


@pytest.mark.parametrize("method", ["ft", "plop"])
def test_replay_component_replays_and_resumes(tmp_path: Path, method: str) -> None:
    scenario = get_scenario("synthetic", "15-5", mode="overlapped")
    src = SyntheticScenes("train", num_images=48, size=48, seed=1)
    val = SyntheticScenes("val", num_images=8, size=48, seed=1)
    sizes: list[tuple[int, int]] = []
    config = MethodConfig.preset(method).replace(name=f"{method}-m10", components=("replay",), memory_size=10)

    def datasets(step: int) -> tuple[IncrementalSegmentation, IncrementalSegmentation]:
        tf = TestTransform(size=None)
        return (
            IncrementalSegmentation(src, scenario, step, train=True, transform=tf),
            IncrementalSegmentation(val, scenario, step, train=False, transform=tf),
        )

    def log(message: str) -> None:
        if "training on" in message:  # "step 1: training on N images, M of the step"
            words = message.split()
            sizes.append((int(words[4]), int(words[6])))

    def run(out: Path) -> IncrementalLearner:
        torch.manual_seed(0)
        learner = IncrementalLearner(small_segmenter(scenario.num_classes_at(0), width=8), scenario, config)
        train_config = TrainConfig(epochs=1, batch_size=4, lr=0.01, max_iters_per_epoch=2, progress=False)
        train_scenario(learner, datasets, train_config, device=torch.device("cpu"), checkpoint_dir=out, log=log)
        return learner

    learner = run(tmp_path)
    ((total, own),) = sizes
    assert total == own + 10  # step 1 trained on its images plus the 10 of the memory
    memory = learner.method.parts[0].memory  # type: ignore[attr-defined]
    assert len(memory) == 10 and {s for _, s in memory.entries} <= {0, 1}
    saved = read_checkpoint(tmp_path / "step1.pt")
    assert saved["method"]["components"] == ["replay"] and saved["method"]["memory_size"] == 10
    restored = run(tmp_path)  # everything finished: the resume restores the memory and trains nothing
    assert restored.method.parts[0].memory.entries == memory.entries  # type: ignore[attr-defined]
    assert len(sizes) == 1


def test_deprecated_memory_argument_still_replays(tmp_path: Path) -> None:
    scenario = get_scenario("synthetic", "15-5", mode="overlapped")
    src = SyntheticScenes("train", num_images=48, size=48, seed=1)
    val = SyntheticScenes("val", num_images=8, size=48, seed=1)
    seen: list[int] = []

    def datasets(step: int) -> tuple[IncrementalSegmentation, IncrementalSegmentation]:
        tf = TestTransform(size=None)
        return (
            IncrementalSegmentation(src, scenario, step, train=True, transform=tf),
            IncrementalSegmentation(val, scenario, step, train=False, transform=tf),
        )

    def seen_log(message: str) -> None:
        if "replaying" in message:
            seen.append(int(message.split("replaying ")[1].split()[0]))

    memory = ReplayMemory(10)
    torch.manual_seed(0)
    learner = IncrementalLearner(small_segmenter(scenario.num_classes_at(0), width=8), scenario, "ft")
    config = TrainConfig(epochs=1, batch_size=4, lr=0.01, max_iters_per_epoch=2, progress=False)
    with pytest.warns(DeprecationWarning, match="replay"):
        train_scenario(
            learner, datasets, config, device=torch.device("cpu"), checkpoint_dir=tmp_path, log=seen_log, memory=memory
        )
    assert seen == [10]
    assert read_checkpoint(tmp_path / "step1.pt")["extra"]["memory"] == memory.state_dict()
