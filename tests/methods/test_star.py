"""STAR through the learner and the engine: calibration and consolidation in the lifecycle, the loss against
a composition of float64 references, the release's freezing and prediction, checkpoints, and clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from incseg.data import IncrementalSegmentation, SyntheticScenes, TestTransform
from incseg.engine import TrainConfig, train_scenario
from incseg.functional import sigmoid_predictions
from incseg.learner import METHODS, IncrementalLearner, MethodConfig
from incseg.methods import STARMethod
from incseg.methods.base import Batch
from incseg.methods.star import STARLoss
from incseg.models import small_segmenter
from incseg.scenarios import Scenario


def _scenario(mode: str = "overlapped") -> Scenario:
    return Scenario([[1, 2], [3], [4, 5]], mode=mode)


def _data(scenario: Scenario, step: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """Two batches whose labels hold the step's classes, background elsewhere (old classes too)."""
    g = torch.Generator().manual_seed(seed)
    k, first = scenario.num_classes_at(step), scenario.num_old_classes(step)
    out = []
    for _ in range(2):
        images = torch.randn(3, 3, 24, 24, generator=g)
        labels = torch.randint(0, k, (3, 24, 24), generator=g)
        labels = torch.where(labels >= max(first, 1), labels, torch.zeros_like(labels))
        labels[0, :2] = 255
        out.append((images, labels))
    return out


def _run(learner: IncrementalLearner, scenario: Scenario, steps: int, iters: int = 2) -> list[dict[str, float]]:
    terms = []
    for step in range(steps):
        data = _data(scenario, step, step)
        learner.begin_step(step, data=data)
        optimizer = torch.optim.SGD(learner.param_groups(0.01), lr=0.01)
        for i in range(iters):
            out = learner.training_step(*data[i % 2])
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
        terms.append({k: float(v) for k, v in out.terms.items()})
        learner.end_step(data=data)
    return terms


def _learner(scenario: Scenario, **kw: Any) -> IncrementalLearner:
    torch.manual_seed(0)
    return IncrementalLearner(small_segmenter(scenario.num_classes_at(0), width=8), scenario, "star", **kw)


def test_preset_follows_the_release() -> None:
    cfg = METHODS["star"]
    assert (cfg.family, cfg.init, cfg.bn, cfg.dropout) == ("star", "random", "frozen", "frozen")
    assert cfg.options == dict(STARMethod.options)
    assert STARMethod.options["pos_weight"] == 4.0 and STARMethod.options["ocfm_factor"] == 5.0
    assert STARMethod.options["sad_factor"] == 0.05


@pytest.mark.parametrize("mode", ["overlapped", "disjoint"])
def test_three_steps_through_the_learner(mode: str) -> None:
    scenario = _scenario(mode)
    learner = _learner(scenario)
    terms = _run(learner, scenario, 3)
    assert sorted(terms[0]) == ["bce", "total"] and sorted(terms[2]) == ["bce", "ocfm", "sad", "total"]
    assert all(torch.isfinite(torch.tensor(v)) for t in terms for v in t.values())
    crit = learner.criterion
    assert isinstance(crit, STARLoss)
    assert int(crit.consolidated_for) == 6 and int(crit.calibrated_for) == 4
    norms = crit.prototypes.norm(dim=1)
    torch.testing.assert_close(norms[1:], torch.ones(5))  # every class was seen and consolidated
    assert float(norms[0]) == 0.0
    assert (
        (crit.counts[1:] > 0).all() and (crit.replay_counts[1:4] > 0).all() and int(crit.replay_counts[4:].sum()) == 0
    )
    logits = learner.predict(torch.randn(2, 3, 24, 24))
    assert logits.shape == (2, 6, 24, 24) and (logits[:, 0] == 0).all()


def test_release_counts_of_consolidation_and_calibration() -> None:
    """Counts on the feature grid; per-iteration replay = (old count - old-model finds) / batches (overlapped);
    background ratio = old background (1 - 0.01 |C_t|) / current background - 1/2 (trainer_voc.py:327-388)."""
    scenario = _scenario("overlapped")
    learner = _learner(scenario)
    data0 = _data(scenario, 0, 0)
    learner.begin_step(0, data=data0)
    learner.end_step(data=data0)
    crit = learner.criterion
    assert isinstance(crit, STARLoss)
    grid = learner.model.forward_features(data0[0][0])["h"].shape[-2:]
    from incseg.functional import sample_labels

    small = torch.cat([sample_labels(y, grid) for _, y in data0])
    expected = torch.bincount(small[small < 3], minlength=3)
    assert crit.counts[:3].tolist() == expected.tolist()
    data1 = _data(scenario, 1, 1)
    learner.begin_step(1, data=data1)
    pred = torch.zeros(3, dtype=torch.long)
    for x, y in data1:
        teacher = learner.teacher_forward(x)
        assert teacher is not None
        up = F.interpolate(teacher["logits"], size=y.shape[-2:], mode="bilinear", align_corners=False)
        p = sample_labels(sigmoid_predictions(up, threshold=0.5), grid)
        lab = sample_labels(y, grid)
        pred += torch.bincount(p[lab == 0], minlength=3)
    assert crit.pred_counts[:3].tolist() == pred.tolist()
    replay = ((expected[1:] - pred[1:]).double() / 2).trunc().clamp_min(0).long()
    assert crit.replay_counts[1:3].tolist() == replay.tolist()
    ratio = max(float(expected[0]) * (1 - 0.01) / float(pred[0]) - 0.5, 0.0)
    assert abs(float(crit.background_ratio) - ratio) < 1e-5
    learner.end_step(data=data1)
    assert int(crit.counts[0]) == int(float(pred[0]) * 0.5 + float(expected[0]) * 0.99)
    assert crit.counts[1:3].tolist() == expected[1:].tolist()  # overlapped: old counts kept


def _loss_reference(learner: IncrementalLearner, images: Tensor, labels: Tensor) -> Tensor:
    """The loss of a step > 0 composed from the equations in float64 (replay off: no randomness)."""
    model, crit = learner.model, learner.criterion
    assert isinstance(crit, STARLoss)
    n_old = learner.num_old_classes
    out = model.forward_features(images)
    teacher = learner.teacher_forward(images)
    assert teacher is not None
    h, h_old = out["h"].double(), teacher["h"].double()
    logits = out["logits"].double()
    k = logits.shape[1]
    up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    old_up = F.interpolate(teacher["logits"].double(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    best, idx = old_up[:, 1:].max(dim=1)
    pred = torch.where(best > 0.5, idx + 1, 0)
    bg = labels == 0
    # background repetition on the stride grid
    rows = [(2 * i + 1) * labels.shape[1] // (2 * h.shape[2]) for i in range(h.shape[2])]
    cols = [(2 * j + 1) * labels.shape[2] // (2 * h.shape[3]) for j in range(h.shape[3])]
    region = (bg & (pred == 0))[:, rows][:, :, cols]
    cells = h.shape[0] * h.shape[2] * h.shape[3]
    b = float(crit.background_ratio) * float(region.sum()) / cells
    bce = torch.zeros((), dtype=torch.float64)
    for c in range(n_old, k):
        t = (labels == c).double()
        x = up[:, c]
        cur = -(4.0 * t * F.logsigmoid(x) + (1 - t) * F.logsigmoid(-x)).mean()
        rep = -F.logsigmoid(-logits[:, c].permute(0, 1, 2)[region]).mean() if region.any() else 0.0
        bce = bce + (cur + b * rep) / (1 + b)
    m = F.interpolate((bg & (pred > 0)).double()[:, None], size=h.shape[-2:], mode="bilinear", align_corners=False)
    ocfm = ((h - h_old) ** 2 * m).sum() / (m.sum() * h.shape[1])
    unit = h / h.norm(dim=1, keepdim=True)
    protos = crit.prototypes[1:n_old].double()
    inv = []
    for c in range(n_old, k):
        mc = F.interpolate((labels == c).double()[:, None], size=h.shape[-2:], mode="bilinear", align_corners=False)
        s = (unit * mc).sum(dim=(0, 2, 3))
        centre = s / s.norm() if float(s.norm().detach()) > 1e-12 else s * 0
        inv.append(1 / min((centre - p).norm() for p in protos))
    sad = sum(inv) / len(inv)
    return bce + 5.0 * ocfm + 0.05 * sad


def test_loss_matches_the_reference_composition() -> None:
    scenario = _scenario("disjoint")
    learner = _learner(scenario, replay=False)
    _run(learner, scenario, 1)
    data = _data(scenario, 1, 1)
    learner.begin_step(1, data=data)
    learner.model.double()
    learner.teacher.double()  # type: ignore[union-attr]
    learner.criterion.double()
    images, labels = data[0][0].double(), data[0][1]
    learner.model.train()
    learner.module.train()
    expected = _loss_reference(learner, images, labels)
    got = learner.training_step(images, labels, guard=False)
    torch.testing.assert_close(got.loss.detach(), expected.detach(), rtol=1e-9, atol=1e-12)


def test_replay_adds_classified_prototypes() -> None:
    scenario = _scenario()
    learner = _learner(scenario)
    _run(learner, scenario, 1)
    data = _data(scenario, 1, 1)
    learner.begin_step(1, data=data)
    out = learner.training_step(*data[0])
    crit = learner.criterion
    assert isinstance(crit, STARLoss)
    grid = learner.model.forward_features(data[0][0])["h"].shape[-2:]
    cells = 3 * grid[0] * grid[1]
    assert abs(float(out.stats["replay_weight"]) - int(crit.replay_counts.sum()) / cells) < 1e-6


def test_steps_after_the_first_freeze_old_heads_and_batch_norm() -> None:
    scenario = _scenario()
    learner = _learner(scenario)
    _run(learner, scenario, 1)
    learner.begin_step(1, data=_data(scenario, 1, 1))
    heads = learner.model.classifier.heads
    assert not any(p.requires_grad for p in heads[0].parameters())
    assert all(p.requires_grad for p in heads[1].parameters())
    bn = [m for m in learner.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and not any(p.requires_grad for m in bn for p in m.parameters())
    trained = {id(p) for g in learner.param_groups(0.01) for p in g["params"]}
    assert all(id(p) not in trained for p in heads[0].parameters())
    free = _learner(scenario, freeze_bn_affine=False)
    _run(free, scenario, 1)
    free.begin_step(1, data=_data(scenario, 1, 1))
    assert all(
        p.requires_grad for m in free.model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()
    )


def test_prediction_is_the_release_rule() -> None:
    scenario = _scenario()
    learner = _learner(scenario)
    _run(learner, scenario, 1)
    images = torch.randn(2, 3, 24, 24)
    predicted = learner.predict(images).argmax(dim=1)
    learner.model.eval()
    with torch.no_grad():
        raw = F.interpolate(learner.model(images), size=(24, 24), mode="bilinear", align_corners=False)
    prob = torch.sigmoid(raw[:, 1:])
    expected = torch.where((prob > 0.5).any(dim=1), prob.argmax(dim=1) + 1, 0)
    assert torch.equal(predicted, expected)


def test_checkpoint_round_trip_keeps_the_prototypes(tmp_path: Path) -> None:
    scenario = _scenario()
    learner = _learner(scenario)
    _run(learner, scenario, 2)
    path = tmp_path / "star.pt"
    learner.save(path)
    loaded = IncrementalLearner.from_checkpoint(path, small_segmenter(3, width=8))
    for name, buf in learner.criterion.named_buffers():
        assert torch.equal(buf, dict(loaded.criterion.named_buffers())[name]), name
    assert not any(p.requires_grad for p in loaded.model.classifier.heads[0].parameters())
    data = _data(scenario, 2, 2)
    loaded.begin_step(2, data=data)
    out = loaded.training_step(*data[0])
    assert torch.isfinite(out.loss)


def test_end_step_without_data_says_what_to_pass() -> None:
    scenario = _scenario()
    learner = _learner(scenario)
    learner.begin_step(0)
    assert learner.needs_consolidation
    with pytest.raises(RuntimeError, match=r"end_step\(data=loader\)"):
        learner.end_step()
    learner.consolidate(_data(scenario, 0, 0))
    assert not learner.needs_consolidation
    learner.end_step()
    assert not learner.needs_consolidation


def test_training_without_calibration_says_what_to_pass() -> None:
    scenario = _scenario()
    learner = _learner(scenario)
    _run(learner, scenario, 1)
    learner.begin_step(1)
    assert learner.needs_calibration
    with pytest.raises(RuntimeError, match=r"begin_step\(step, data=loader\)"):
        learner.training_step(*_data(scenario, 1, 1)[0])
    with pytest.raises(RuntimeError, match="not calibrated"):
        learner.consolidate(_data(scenario, 1, 1))


def test_empty_passes_and_bad_options_are_refused() -> None:
    scenario = _scenario()
    learner = _learner(scenario)
    learner.begin_step(0)
    with pytest.raises(ValueError, match="at least one batch"):
        learner.consolidate([])
    with pytest.raises(TypeError, match="replay must be a bool"):
        MethodConfig.preset("star", replay=1)
    with pytest.raises(ValueError, match="ocfm_factor must be >= 0"):
        MethodConfig.preset("star", ocfm_factor=-1.0)
    with pytest.raises(ValueError, match="not settings of method family"):
        MethodConfig.preset("star", lambda_ad=1.0)


def test_forward_keeps_the_contract_keys_and_passes_z_old_with_fusion() -> None:
    scenario = _scenario()
    model = small_segmenter(3, width=8)
    method = STARMethod(METHODS["star"], model, scenario)
    images = torch.randn(1, 3, 24, 24)
    out = method.forward(model, Batch(images, torch.zeros(1, 24, 24, dtype=torch.long), None, 0))
    assert {"z", "z_bar", "h", "logits", "classifier"} <= set(out)
    seen: list[Any] = []

    class Fusion(torch.nn.Module):
        def forward(self, z: Tensor, z_old: Tensor | None) -> Tensor:
            seen.append(z_old)
            return z

    model.fusion = Fusion()
    z_old = torch.randn_like(out["z"])
    method.forward(model, Batch(images, torch.zeros(1, 24, 24, dtype=torch.long), {"z": z_old}, 3))
    assert seen and seen[0] is z_old


def test_three_steps_through_the_engine() -> None:
    scenario = Scenario([list(range(1, 14)), [14, 15, 16], [17, 18, 19, 20]], mode="overlapped")
    torch.manual_seed(0)
    learner = IncrementalLearner(small_segmenter(scenario.num_classes_at(0), width=8), scenario, "star")
    train_src = SyntheticScenes("train", num_images=32, size=48, seed=1)
    val_src = SyntheticScenes("val", num_images=8, size=48, seed=1)

    def datasets(step: int) -> tuple[IncrementalSegmentation, IncrementalSegmentation]:
        return (
            IncrementalSegmentation(train_src, scenario, step, train=True, transform=TestTransform(size=None)),
            IncrementalSegmentation(val_src, scenario, step, train=False, transform=TestTransform(size=None)),
        )

    config = TrainConfig(epochs=1, batch_size=4, lr=0.02, lr_next=0.005, max_iters_per_epoch=2, progress=False)
    history = train_scenario(learner, datasets, config, device=torch.device("cpu"), log=lambda _m: None)
    assert list(history.steps) == [0, 1, 2]
    crit = learner.criterion
    assert isinstance(crit, STARLoss)
    assert int(crit.consolidated_for) == 21 and int(crit.calibrated_for) == 17


def test_learning_rates_follow_the_release_ratios() -> None:
    scenario = _scenario()
    learner = _learner(scenario)
    lrs = {g["name"]: g["lr"] for g in learner.param_groups(0.01)}
    assert lrs == pytest.approx({"encoder": 0.001, "refiner": 0.001, "head": 0.01})
    _run(learner, scenario, 1)
    learner.begin_step(1, data=_data(scenario, 1, 1))
    groups = {g["name"]: g for g in learner.param_groups(0.01, head_lr=0.02)}
    assert groups["new_classifier"]["lr"] == pytest.approx(0.2) and groups["encoder"]["lr"] == pytest.approx(0.001)
    assert "head" not in groups  # the old heads are frozen: the new one is the only classifier part trained
    new_head = {id(p) for p in learner.model.classifier.heads[1].parameters()}
    assert {id(p) for p in groups["new_classifier"]["params"]} == new_head
    with pytest.raises(ValueError, match="head_lr_scale must be > 0"):
        MethodConfig.preset("star", head_lr_scale=0.0)
