"""DKD through the learner: the whole loss against a float64 reference, the auxiliary classifier and its
initialisation of new classes, the prediction rule, checkpoints, the command line and the configuration."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from incseg.cli import main
from incseg.learner import METHODS, IncrementalLearner, MethodConfig
from incseg.learner.checkpoint import read_checkpoint
from incseg.losses import DKDLoss
from incseg.methods import DKDMethod, get_family
from incseg.models import small_segmenter
from incseg.scenarios import Scenario


def _batch(scenario: Scenario, step: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(10 * seed + step)
    images = torch.randn(2, 3, 32, 32, generator=g)
    labels = torch.randint(0, scenario.num_classes_at(step), (2, 32, 32), generator=g)
    labels[labels < scenario.num_old_classes(step)] = 0  # old classes are background in the current labels
    labels[0, :2] = 255
    return images, labels


def _train(learner: IncrementalLearner, steps: int) -> list[dict[str, float]]:
    terms = []
    for step in range(steps):
        learner.begin_step(step)
        opt = torch.optim.SGD(learner.param_groups(0.01), lr=0.01)
        out = learner.training_step(*_batch(learner.scenario, step))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        terms.append({k: float(v) for k, v in out.terms.items()})
        learner.end_step()
    return terms


def test_dkd_trains_two_steps_through_the_learner_and_checkpoints(tmp_path: Path) -> None:
    torch.manual_seed(0)
    scenario = Scenario([[1, 2], [3, 4]])
    learner = IncrementalLearner(small_segmenter(3, width=8), scenario, "dkd")
    assert learner.config.family == "dkd" and learner.config.init == "prior" and learner.config.bn == "frozen"
    terms = _train(learner, 2)
    assert sorted(terms[0]) == ["ac", "mbce", "total"]
    assert sorted(terms[1]) == ["ac", "dkd_neg", "dkd_pos", "kd", "mbce", "total"]
    for t in terms:
        assert t["total"] == pytest.approx(sum(v for k, v in t.items() if k != "total"), rel=1e-6)
        assert all(math.isfinite(v) for v in t.values())
    assert isinstance(learner.criterion, DKDLoss) and learner.criterion.kd_weight == 5.0

    path = tmp_path / "dkd.pt"
    learner.save(path)
    restored = IncrementalLearner.from_checkpoint(path, small_segmenter(3, width=8))
    assert restored.config == learner.config and restored.step == 1
    images = _batch(scenario, 1, seed=3)[0]
    torch.testing.assert_close(restored.predict(images), learner.predict(images))
    with torch.no_grad():
        a = restored.teacher_forward(images)
        b = learner.teacher_forward(images)
    assert a is not None and b is not None
    torch.testing.assert_close(a["pos_logits"], b["pos_logits"])


@pytest.mark.filterwarnings("ignore:bn='frozen'")
@pytest.mark.parametrize("new_pixels", ["distil", "free"])
def test_dkd_loss_matches_a_float64_reference(new_pixels: str) -> None:
    """The step-1 loss of a float64 network, every term written from the equations with the release's weights
    (``new_pixels="distil"``) or with the pixels of new classes left out of the distillation (``"free"``); the
    auxiliary classifier reads detached features."""
    torch.manual_seed(0)
    scenario = Scenario([[1, 2], [3, 4]])
    learner = IncrementalLearner(small_segmenter(3, width=4).double(), scenario, "dkd", new_pixels=new_pixels)
    learner.begin_step(0)
    learner.end_step()
    learner.begin_step(1)
    images, labels = _batch(scenario, 1)
    images = images.double()
    out = learner.training_step(images, labels)
    teacher, student = learner.teacher, learner.model
    assert teacher is not None
    with torch.no_grad():
        t = teacher.forward_features(images)
    s = student.forward_features(images)
    w = torch.cat([student.classifier.head(i).weight for i in range(2)])[:, :, 0, 0]
    w_old = teacher.classifier.head(0).weight[:, :, 0, 0]

    def bce(x: Tensor, y: Tensor, p: float = 1.0) -> Tensor:  # -[p y log σ(x) + (1 - y) log(1 - σ(x))]
        return -(p * y * torch.log(torch.sigmoid(x)) + (1 - y) * torch.log(1 - torch.sigmoid(x)))

    def up(x: Tensor) -> Tensor:
        return F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)

    def proj(h: Tensor, m: Tensor) -> Tensor:  # Σ_c h_c m_kc
        return torch.einsum("bchw,kc->bkhw", h, m)

    x, x_old = up(s["logits"]), up(t["logits"])
    mbce = sum(bce(x[:, c], (labels == c).double()).mean() for c in (3, 4))  # 255 pixels are negatives
    keep = torch.ones_like(labels, dtype=torch.float64)
    if new_pixels == "free":
        keep = ((labels != 3) & (labels != 4)).double()
    h_size = s["h"].shape[-2:]
    # the weight of a feature position: the share of its label pixels (2 x 2 ... blocks) not of a new class
    cell = keep.reshape(2, h_size[0], 32 // h_size[0], h_size[1], 32 // h_size[1]).mean(dim=(2, 4))
    kd = sum((keep * bce(x[:, c], torch.sigmoid(x_old[:, c]))).mean() for c in (1, 2))
    pos, pos_old = proj(s["h"], w.clamp(min=0)), proj(t["h"], w_old.clamp(min=0))
    neg, neg_old = proj(s["h"], w.clamp(max=0)), proj(t["h"], w_old.clamp(max=0))
    dkd_pos = sum((cell * bce(pos[:, c], torch.sigmoid(pos_old[:, c]))).mean() for c in (1, 2))
    dkd_neg = sum((cell * bce(neg[:, c], torch.sigmoid(neg_old[:, c]))).mean() for c in (1, 2))
    ac = bce(up(s["logits"][:, :1]), torch.zeros(())).mean()
    expected = {"mbce": mbce, "kd": 5 * kd, "dkd_pos": 5 * dkd_pos, "dkd_neg": 5 * dkd_neg, "ac": ac}
    for name, value in expected.items():
        assert float(out.terms[name]) == pytest.approx(float(value.detach()), rel=1e-10), name

    # Only L_ac trains the auxiliary (background) row, and it does not reach the features.
    student.zero_grad()
    out.loss.backward()
    bg = student.classifier.head(0).weight.grad
    assert bg is not None and float(bg[0].abs().sum()) > 0
    only_ac = IncrementalLearner(
        small_segmenter(3, width=4).double(),
        scenario,
        "dkd",
        mbce_weight=0.0,
        kd_weight=0.0,
        dkd_pos_weight=0.0,
        dkd_neg_weight=0.0,
    )
    only_ac.begin_step(0)
    only_ac.training_step(images, labels).loss.backward()
    encoder_grads = [p.grad for p in only_ac.model.encoder.parameters() if p.grad is not None]
    assert all(float(g.abs().max()) == 0 for g in encoder_grads)
    assert float(only_ac.model.classifier.head(0).weight.grad[0].abs().sum()) > 0  # type: ignore[union-attr]


def test_new_classes_start_as_copies_of_the_auxiliary_classifier() -> None:
    scenario = Scenario([[1, 2], [3, 4]])
    learner = IncrementalLearner(small_segmenter(3, width=8), scenario, "dkd", init="aux")
    _train(learner, 1)
    head0 = learner.model.classifier.head(0)
    before = (head0.weight[0].clone(), head0.bias[0].clone())  # type: ignore[index]
    learner.begin_step(1)
    head1 = learner.model.classifier.head(1)
    for row in range(2):
        assert torch.equal(head1.weight[row], before[0]) and torch.equal(head1.bias[row], before[1])  # type: ignore[index]
    assert torch.equal(head0.bias[0], before[1])  # type: ignore[index]  # unlike MiB's, the background is unchanged


def test_prediction_is_the_release_rule() -> None:
    """argmax of the predicted logits = the class of highest sigmoid, background where none exceeds 0.5."""
    scenario = Scenario([[1, 2], [3]])
    learner = IncrementalLearner(small_segmenter(3, width=8), scenario, "dkd")
    _train(learner, 2)
    images = _batch(scenario, 1, seed=5)[0]
    learner.model.eval()
    with torch.no_grad():
        logits = F.interpolate(learner.model(images), size=(32, 32), mode="bilinear", align_corners=False)
    prob = torch.sigmoid(logits)
    release = prob[:, 1:].argmax(1) + 1
    release[(prob[:, 1:] > 0.5).sum(1) == 0] = 0
    assert torch.equal(learner.predict(images).argmax(1), release)
    strict = IncrementalLearner(small_segmenter(3, width=8), scenario, "dkd", threshold=0.99)
    strict.begin_step(0)
    assert int(strict.predict(images).argmax(1).max()) <= 2
    with pytest.raises(ValueError, match="no test strategies"):
        learner.predict(images, strategy="concat")


def test_train_dkd_from_the_command_line(tmp_path: Path) -> None:
    args = [
        "train", "--dataset", "synthetic", "--task", "15-5", "--mode", "overlapped", "--model", "small",
        "--method", "dkd", "--epochs", "1", "--max-iters-per-epoch", "1", "--batch-size", "4",
        "--device", "cpu", "--out", str(tmp_path), "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    saved = read_checkpoint(tmp_path / "checkpoints" / "step1.pt")
    assert saved["method"]["family"] == "dkd" and saved["method"]["kd_weight"] == 5.0
    terms = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "dkd_pos" in terms[-1] and "dkd_pos" not in terms[0]


def test_dkd_configuration_and_errors() -> None:
    cfg = METHODS["dkd"]
    assert get_family("dkd") is DKDMethod
    assert cfg.options == {
        "mbce_weight": 1.0,
        "kd_weight": 5.0,
        "dkd_pos_weight": 5.0,
        "dkd_neg_weight": 5.0,
        "ac_weight": 1.0,
        "pos_weight": 1.0,
        "base_pos_weight": 2.0,
        "threshold": 0.5,
        "loss_scale": 1.0,
        "new_pixels": "free",
        "base_prior": 0.01,
        "base_encoder_lr_factor": 1.0,
        "encoder_lr_factor": 0.1,
        "refiner_lr_factor": 0.1,
        "release_weight_decay": True,
    }
    assert (cfg.init, cfg.bn, cfg.dropout) == ("prior", "frozen", "frozen")
    assert MethodConfig.from_dict(cfg.to_dict()) == cfg
    assert MethodConfig.preset("dkd", kd_weight=1).options["kd_weight"] == 1.0
    with pytest.raises(ValueError, match="kd_weight must be >= 0"):
        MethodConfig.preset("dkd", kd_weight=-1.0)
    with pytest.raises(ValueError, match="pos_weight must be > 0"):
        MethodConfig.preset("dkd", pos_weight=0.0)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\)"):
        MethodConfig.preset("dkd", threshold=1.5)
    with pytest.raises(TypeError, match="ac_weight must be a float"):
        MethodConfig.preset("dkd", ac_weight="1")
    with pytest.raises(ValueError, match=r"init='aux' copies the auxiliary classifier.*init='random'"):
        MethodConfig.preset("dkd", ac_weight=0.0, init="aux")
    with pytest.raises(ValueError, match="new_pixels must be"):
        MethodConfig.preset("dkd", new_pixels="mask")
    with pytest.raises(ValueError, match="encoder_lr_factor must be in"):
        MethodConfig.preset("dkd", encoder_lr_factor=0.0)
    assert MethodConfig.preset("dkd", ac_weight=0.0, init="random").options["ac_weight"] == 0.0
    with pytest.raises(ValueError, match=r"\['lambda_ad'\] are not settings of method family 'dkd'.*kd_weight"):
        MethodConfig.preset("dkd", lambda_ad=1.0)
    with pytest.raises(ValueError, match="unknown method configuration fields"):
        MethodConfig.preset("mib", kd_weight=1.0)
    with pytest.raises(ValueError, match="init must be one of"):
        MethodConfig.preset("dkd", init="zeros")


def test_new_classes_start_at_the_prior() -> None:
    """``init="prior"`` (the preset): new rows have weights 0 and bias logit(0.01), so they predict 0.01
    everywhere and send no gradient to the features at the first update."""
    scenario = Scenario([[1, 2], [3, 4]])
    learner = IncrementalLearner(small_segmenter(3, width=8), scenario, "dkd")
    _train(learner, 1)
    learner.begin_step(1)
    head1 = learner.model.classifier.head(1)
    assert float(head1.weight.detach().abs().max()) == 0.0
    torch.testing.assert_close(torch.sigmoid(head1.bias.detach()), torch.full((2,), 0.01))  # type: ignore[union-attr]


@pytest.mark.filterwarnings("ignore:bn=.frozen.")
def test_parameter_groups_follow_the_release_ratios() -> None:
    """At steps > 0 the encoder and the refiner at 0.1 times the learning rate and no weight decay but on the
    new classifier (train_voc.py:127-143, the refiner's factor is incseg's); step 0 at the learner's rates,
    or with ``base_encoder_lr_factor=0.1`` the release's."""
    scenario = Scenario([[1, 2], [3, 4]])
    learner = IncrementalLearner(small_segmenter(3, width=8), scenario, "dkd")
    learner.begin_step(0)
    groups = {g["name"]: g for g in learner.param_groups(0.01, weight_decay=1e-4, head_lr=0.02)}
    assert {k: (g["lr"], g["weight_decay"]) for k, g in groups.items()} == {
        "backbone": (0.01, 1e-4),
        "head": (0.02, 1e-4),
    }
    learner.end_step()
    learner.begin_step(1)
    groups = {g["name"]: g for g in learner.param_groups(0.01, weight_decay=1e-4)}
    assert {k: (g["lr"], g["weight_decay"]) for k, g in groups.items()} == {
        "encoder": (pytest.approx(0.001), 0.0),
        "refiner": (pytest.approx(0.001), 0.0),
        "old_classifier": (0.01, 0.0),
        "head": (0.01, 1e-4),
    }
    assert groups["head"]["params"] == list(learner.model.classifier.head(1).parameters())
    n = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n == sum(p.numel() for p in learner.module.parameters() if p.requires_grad)
    release = IncrementalLearner(small_segmenter(3, width=8), scenario, "dkd", base_encoder_lr_factor=0.1)
    release.begin_step(0)
    assert {g["name"]: g["lr"] for g in release.param_groups(0.01)} == {
        "backbone": 0.01,
        "head": 0.01,
        "encoder": pytest.approx(0.001),
    }


def test_step_zero_classifiers_start_at_the_base_prior() -> None:
    """``base_prior``: at step 0 every bias of the classifier (the auxiliary row's too) is logit(0.01); the
    weights are the model's. ``base_prior=0`` keeps the model's biases (the release)."""
    scenario = Scenario([[1, 2], [3, 4]])
    torch.manual_seed(0)
    model = small_segmenter(3, width=8)
    weight = model.classifier.head(0).weight.detach().clone()
    learner = IncrementalLearner(model, scenario, "dkd")
    learner.begin_step(0)
    head = learner.model.classifier.head(0)
    torch.testing.assert_close(torch.sigmoid(head.bias.detach()), torch.full((3,), 0.01))  # type: ignore[union-attr]
    assert torch.equal(head.weight.detach(), weight)
    torch.manual_seed(0)
    kept = small_segmenter(3, width=8)
    bias = kept.classifier.head(0).bias.detach().clone()  # type: ignore[union-attr]
    off = IncrementalLearner(kept, scenario, "dkd", base_prior=0.0)
    off.begin_step(0)
    assert torch.equal(off.model.classifier.head(0).bias.detach(), bias)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match=r"base_prior must be in \[0, 1\)"):
        MethodConfig.preset("dkd", base_prior=1.0)
