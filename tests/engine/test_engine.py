from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import tiny_config, tiny_datasets, tiny_learner, tiny_run, tiny_scenario

from incseg._progress import Eta
from incseg.engine import (
    NonFiniteLossError,
    TrainConfig,
    config_differences,
    evaluate,
    planned_iterations,
    train_scenario,
)
from incseg.learner import CheckpointError, IncrementalLearner
from incseg.losses import LossOutput
from incseg.models import small_segmenter
from incseg.scenarios import Scenario


def _weights(learner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in learner.model.state_dict().items()}


def test_run_produces_history_for_every_step(tmp_path: Path) -> None:
    learner, history = tiny_run(tmp_path)
    assert list(history.steps) == [0, 1]
    assert learner.step == 1
    assert (tmp_path / "step0.pt").exists() and (tmp_path / "step1.pt").exists()
    result = history[1]
    assert result.num_classes == tiny_scenario().num_classes_at(1)
    assert 0.0 <= result.pixel_accuracy <= 1.0


def test_kill_and_resume_gives_identical_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, reference = tiny_run(tmp_path / "a")
    ref_learner, _ = tiny_run(tmp_path / "a")  # resumes from the finished run: nothing left to do
    assert ref_learner.step == 1

    # Kill the second run in the middle of step 1 (second epoch), then resume from the last checkpoint.
    scenario = tiny_scenario()
    victim = tiny_learner(scenario)
    calls = {"n": 0}
    original = type(victim).training_step

    def dying_step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if self.step == 1 and calls["n"] > 6 + 4:  # step 0: 6 iterations; die in step 1's second epoch
            raise KeyboardInterrupt("simulated kill")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(victim), "training_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        tiny_run(tmp_path / "b", learner=victim)
    monkeypatch.undo()

    resumed_learner, resumed = tiny_run(tmp_path / "b", learner=tiny_learner(scenario))
    final_ref = torch.load(tmp_path / "a" / "step1.pt", weights_only=True)["model"]
    for key, value in resumed_learner.model.state_dict().items():
        torch.testing.assert_close(value, final_ref[key], rtol=0, atol=0, msg=key)
    for step in (0, 1):
        torch.testing.assert_close(resumed[step].confusion, reference[step].confusion, rtol=0, atol=0)


def _nan_step(self, images, labels, *, module=None, guard=True):  # type: ignore[no-untyped-def]
    loss = torch.full((), float("nan"), requires_grad=True)
    return LossOutput(loss, {"seg": loss.detach(), "total": loss.detach()})


def test_nan_loss_stops_with_step_and_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    learner = tiny_learner(tiny_scenario())
    monkeypatch.setattr(type(learner), "training_step", _nan_step)
    with pytest.raises(NonFiniteLossError, match=r"step 0, epoch 0, batch 0"):
        tiny_run(None, learner=learner)


def test_nan_loss_skip_leaves_weights_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    learner = tiny_learner(tiny_scenario())
    before = _weights(learner)  # begin_step(0) does not change the weights
    monkeypatch.setattr(type(learner), "training_step", _nan_step)
    logs: list[str] = []
    train_scenario(
        learner,
        tiny_datasets(tiny_scenario()),
        tiny_config(nan_policy="skip", epochs=1),
        device=torch.device("cpu"),
        steps=range(0, 1),
        log=logs.append,
    )
    after = learner.model.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)
    assert sum("batch skipped" in line for line in logs) == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"epochs": 0}, "epochs"), ({"batch_size": 0}, "batch_size"), ({"amp": "fp8"}, "amp"), ({"lr": -1.0}, "lr")],
)
def test_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_run_trains_with_float32_losses(amp: str) -> None:
    learner, history = tiny_run(None, amp=amp, epochs=1)
    assert list(history.steps) == [0, 1]
    for name, param in learner.model.named_parameters():
        assert param.dtype == torch.float32, name
        assert torch.isfinite(param).all(), name
    scenario = tiny_scenario()
    _, test_set = tiny_datasets(scenario)(1)
    images = torch.stack([test_set[i][0] for i in range(2)])
    with torch.autocast("cpu", dtype=torch.bfloat16 if amp == "bf16" else torch.float16):
        out = learner.training_step(images, torch.zeros(2, *images.shape[-2:], dtype=torch.long))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def test_epochs_next_sets_the_later_steps_only() -> None:
    assert [TrainConfig(epochs=4, epochs_next=2).epochs_at(s) for s in (0, 1, 2)] == [4, 2, 2]
    assert [TrainConfig(epochs=4).epochs_at(s) for s in (0, 3)] == [4, 4]
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs_next=0)


def test_later_steps_run_epochs_next(tmp_path: Path) -> None:
    tiny_run(tmp_path, epochs=2, epochs_next=1)
    assert torch.load(tmp_path / "step0.pt", weights_only=True)["extra"]["epoch"] == 2
    assert torch.load(tmp_path / "step1.pt", weights_only=True)["extra"]["epoch"] == 1


def test_poly_schedule_is_polynomial_lr_and_equals_the_closed_form() -> None:
    """PyTorch's chained ``PolynomialLR`` equals ``lr * (1 - it / T) ** 0.9`` to 1e-12 over a paper-length step."""
    from incseg.engine import _poly_factor

    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in (0.01, 0.1)]
    optimizer = torch.optim.SGD(groups, lr=0.01)
    total = 13_230  # VOC 15-5 step 0: 30 epochs of 441 batches of 24
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total, power=0.9)
    worst = 0.0
    for it in range(total):
        for group, base in zip(optimizer.param_groups, (0.01, 0.1)):
            expected = base * _poly_factor(it, total, 0.9)
            worst = max(worst, abs(group["lr"] - expected) / expected)
        optimizer.step()
        scheduler.step()
    assert worst < 1e-12


def test_run_learning_rates_follow_the_old_closed_form(tmp_path: Path) -> None:
    from incseg.engine import _poly_factor

    records: list[dict] = []
    tiny_run(tmp_path, epochs=3, epochs_next=2, on_iteration=records.append)
    for record in records:
        base, total = (0.02, 9) if record["step"] == 0 else (0.005, 6)
        expected = base * _poly_factor(record["iteration"], total, 0.9)
        assert abs(record["lr"] - expected) <= 1e-12, record
    assert [r["iteration"] for r in records] == [*range(9), *range(6)]


def test_resume_without_scheduler_state_continues_the_closed_form(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``last.pt`` of the hand-written schedule (no scheduler state) resumes on the same learning rates."""
    import incseg.engine as engine
    from incseg.engine import _poly_factor

    original_save = engine._save
    monkeypatch.setattr(engine, "_save", lambda *a, **k: original_save(*a, **{**k, "scheduler": None}))
    victim = tiny_learner(tiny_scenario())
    original = type(victim).training_step
    calls = {"n": 0}

    def dying_step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 6 + 4:  # die in step 1's second epoch
            raise KeyboardInterrupt("simulated kill")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(victim), "training_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        tiny_run(tmp_path, learner=victim)
    monkeypatch.undo()
    data = torch.load(tmp_path / "last.pt", weights_only=True)
    assert "scheduler" not in data["extra"]
    with pytest.raises(CheckpointError, match="in the middle of step 1 but holds no learning-rate schedule"):
        tiny_run(tmp_path, learner=tiny_learner(tiny_scenario()))  # format 2 always holds it: damaged
    data.pop("checksum")
    torch.save({**data, "format_version": 1}, tmp_path / "last.pt")  # as the loop of incseg 0.1 wrote it
    records: list[dict] = []
    tiny_run(tmp_path, learner=tiny_learner(tiny_scenario()), on_iteration=records.append)
    assert [(r["step"], r["iteration"]) for r in records] == [(1, 3), (1, 4), (1, 5)]
    for record in records:
        assert abs(record["lr"] - 0.005 * _poly_factor(record["iteration"], 6, 0.9)) <= 1e-12


def _records(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_log_has_every_iteration_with_lr_and_terms(tmp_path: Path) -> None:
    from incseg.engine import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    tiny_run(tmp_path / "ckpt", epochs=2, on_iteration=log)
    log.close()
    records = _records(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["iteration"]) for r in records] == [(s, i) for s in (0, 1) for i in range(6)]
    assert records[0]["lr"] == pytest.approx(0.02) and records[6]["lr"] == pytest.approx(0.005)
    assert all(r["lr"] > s["lr"] for r, s in itertools.pairwise(records[:6]))  # poly decay within a step
    assert {"seg", "kd", "ad", "total"} <= set(records[-1])  # CAF's terms at step 1
    for r in records:
        assert r["loss"] == pytest.approx(r["total"], rel=1e-6)


def test_metrics_log_resumes_without_duplicates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from incseg.engine import MetricsLog

    scenario = tiny_scenario()
    victim = tiny_learner(scenario)
    original = type(victim).training_step
    calls = {"n": 0}

    def dying_step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 6 + 4:  # die in step 1's second epoch: its first epoch is logged twice
            raise KeyboardInterrupt("simulated kill")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(victim), "training_step", dying_step)
    log = MetricsLog(tmp_path / "metrics.jsonl")
    with pytest.raises(KeyboardInterrupt):
        tiny_run(tmp_path / "ckpt", learner=victim, on_iteration=log)
    log.close()
    monkeypatch.undo()
    assert len(_records(tmp_path / "metrics.jsonl")) == 10
    log = MetricsLog(tmp_path / "metrics.jsonl")
    tiny_run(tmp_path / "ckpt", learner=tiny_learner(scenario), on_iteration=log)
    log.close()
    keys = [(r["step"], r["iteration"]) for r in _records(tmp_path / "metrics.jsonl")]
    assert keys == [(s, i) for s in (0, 1) for i in range(6)]


class _Recording(torch.utils.data.Dataset):
    """Wraps a dataset and records which indices were loaded."""

    def __init__(self, base) -> None:  # type: ignore[no-untyped-def]
        self.base, self.loaded = base, []

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        self.loaded.append(i)
        return self.base[i]


def test_single_process_training_shuffles_every_epoch_and_loads_no_extra_batch() -> None:
    scenario = tiny_scenario()
    base = tiny_datasets(scenario)
    recorded = {}

    def datasets(step: int):  # type: ignore[no-untyped-def]
        train, test = base(step)
        recorded[step] = _Recording(train)
        return recorded[step], test

    config = tiny_config(epochs=3, max_iters_per_epoch=2, batch_size=4)
    train_scenario(tiny_learner(scenario, "ft"), datasets, config, device=torch.device("cpu"), steps=range(0, 1))
    loaded = recorded[0].loaded
    assert len(loaded) == 3 * 2 * 4  # exactly the batches trained on, none thrown away
    epochs = [loaded[i * 8 : (i + 1) * 8] for i in range(3)]
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2], epochs  # a new order every epoch


def test_evaluate_old_means_classes_of_step_0_at_every_step() -> None:
    # VOC 15-1 style: after the last of several steps, "old" is still the classes of step 0 (the field's
    # convention); split="step" gives the per-step split (old = everything learnt before the last step).
    scenario = Scenario([[1, 2], [3], [4]])
    learner = IncrementalLearner(small_segmenter(3, width=8), scenario, "ft")
    for step in range(3):
        learner.begin_step(step)
        learner.end_step()
    data = torch.utils.data.TensorDataset(torch.randn(2, 3, 16, 16), torch.randint(0, 5, (2, 16, 16)))
    base = evaluate(learner, data, device=torch.device("cpu"))
    per_step = evaluate(learner, data, device=torch.device("cpu"), split="step")
    assert base.num_old_classes == 3 and per_step.num_old_classes == 4
    assert base.groups["new"] == pytest.approx(float(base.iou[3:].nanmean()))
    torch.testing.assert_close(base.confusion, per_step.confusion, rtol=0, atol=0)
    with pytest.raises(ValueError, match="split"):
        evaluate(learner, data, device=torch.device("cpu"), split="last")  # type: ignore[arg-type]


def test_resume_refuses_settings_that_change_results(tmp_path: Path) -> None:
    tiny_run(tmp_path, epochs=1)
    with pytest.raises(ValueError, match=r"cannot resume .*epochs: 1 -> 3.*lr: 0.02 -> 0.5.*seed: 0 -> 7"):
        tiny_run(tmp_path, epochs=3, lr=0.5, seed=7)
    tiny_run(tmp_path, epochs=1, progress=False, nan_policy="skip")  # settings that do not change results
    learner, history = tiny_run(tmp_path, epochs=3, allow_config_change=True)
    assert list(history.steps) == [0, 1] and learner.step == 1


def test_a_learner_save_file_as_last_pt_is_a_clear_error(tmp_path: Path) -> None:
    learner = tiny_learner(tiny_scenario())
    learner.begin_step(0)
    learner.save(tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match=r"not written by train_scenario .*learner.save"):
        tiny_run(tmp_path)


def test_config_differences_compares_json_values() -> None:
    assert config_differences({"a": (1, 2), "b": Path("x")}, {"a": [1, 2], "b": "x"}) == {}
    assert config_differences({"a": 1}, {"a": 1, "c": None}) == {"c": (None, None)}
    assert config_differences({"a": 1, "p": True}, {"a": 2, "p": False}, ignore={"p"}) == {"a": (1, 2)}


def test_run_checkpoints_carry_a_checksum_and_a_damaged_last_pt_is_refused(tmp_path: Path) -> None:
    tiny_run(tmp_path, epochs=1)
    data = torch.load(tmp_path / "last.pt", weights_only=True)
    assert data["checksum"].startswith("sha256:")
    data["model"] = {k: v.clone() for k, v in data["model"].items()}
    key = next(k for k, v in data["model"].items() if v.is_floating_point() and v.numel() > 10)
    data["model"][key].view(-1)[3] += 1e-3  # as a flipped bit in the stored tensor
    torch.save(data, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="is damaged"):
        tiny_run(tmp_path, epochs=1)


def test_stale_save_temporaries_are_removed_when_a_run_resumes(tmp_path: Path) -> None:
    tiny_run(tmp_path, epochs=1)
    stale = [tmp_path / ".last.pt.1a2b3c.tmp", tmp_path / ".step1.pt.ffeedd.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 4096)  # what a save killed before its rename leaves
    tiny_run(tmp_path, epochs=1)
    assert not any(p.exists() for p in stale)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_distillation_note_names_the_maps_or_the_pull_on_the_weights() -> None:
    from incseg.engine import _distillation_note

    assert _distillation_note({"lambda_ad": 3.0}) == ""
    note = _distillation_note({"ad_opposition_z": 0.1, "ad_opposition_h": 0.012})
    assert "10.0% on z" in note and "1.2% on h" in note
    note = _distillation_note({"ad_pull": 0.1, "ad_cancel": 0.014, "lambda_ad": 0.2})
    assert "0.10x the new classes' labels" in note and "1.4% of their descent" in note


# ----------------------------------------------------------------------------- issue 23: the second red team


@pytest.fixture
def mid_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run killed in the second epoch of step 1: ``last.pt`` is after epoch 1 of step 1, with optimizer state."""
    victim = tiny_learner(tiny_scenario())
    original = type(victim).training_step
    calls = {"n": 0}

    def dying_step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 6 + 4:
            raise KeyboardInterrupt("simulated kill")
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(type(victim), "training_step", dying_step)
        with pytest.raises(KeyboardInterrupt):
            tiny_run(tmp_path, learner=victim)
    return tmp_path


def _edit_last(folder: Path, edit) -> None:  # type: ignore[no-untyped-def]
    """Edit ``last.pt`` and store a recomputed checksum: only the loop's own checks can refuse it."""
    from incseg.learner.checkpoint import content_checksum

    data = torch.load(folder / "last.pt", weights_only=True)
    data.pop("checksum")
    edit(data)
    torch.save({**data, "checksum": content_checksum(data)}, folder / "last.pt")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d["extra"].__setitem__("epoch", 99), r"after epoch 99 of step 1, which has 2 epochs"),
        (lambda d: d["extra"].__setitem__("epoch", 0), r"after epoch 0 of step 1"),
        (lambda d: d.__setitem__("optimizer", None), r"holds no optimizer state \(its momentum would restart"),
        (lambda d: d["extra"].__setitem__("step_finished", True), r"says both step_finished=False and.*True"),
        (lambda d: d.__setitem__("step_finished", True), r"says both step_finished=True and.*False"),
        (
            lambda d: d["extra"]["scheduler"].__setitem__("last_epoch", 4),
            r"learning-rate schedule at .*'last_epoch': 4",
        ),
        (
            lambda d: d["optimizer"]["state"][0].__setitem__("momentum_buffer", torch.zeros(1)),
            r"cannot resume .*'momentum_buffer' of parameter 0 has shape \(1,\)",
        ),
        (lambda d: d["extra"]["history"]["steps"].append(d["extra"]["history"]["steps"][0]), "result history"),
    ],
)
def test_b3_c9_impossible_resume_states_are_refused(mid_step: Path, edit, match: str) -> None:  # type: ignore[no-untyped-def]
    _edit_last(mid_step, edit)
    with pytest.raises(CheckpointError, match=match):
        tiny_run(mid_step)


def test_b5_a_training_set_smaller_than_one_batch_is_an_error() -> None:
    scenario = tiny_scenario()
    with pytest.raises(ValueError, match=r"step 0 has \d+ training images, fewer than one batch of 100"):
        train_scenario(
            tiny_learner(scenario),
            tiny_datasets(scenario),
            tiny_config(batch_size=100),
            device=torch.device("cpu"),
            log=lambda _m: None,
        )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_iters_per_epoch": 0}, ValueError, "max_iters_per_epoch must be >= 1"),  # b7
        ({"epochs": 1.5}, TypeError, r"epochs must be an int, got 1\.5"),  # c8
        ({"poly_power": -1.0}, ValueError, "poly_power must be a finite number >= 0"),  # c8
        ({"lr": float("nan")}, ValueError, r"lr must be a finite number > 0, got nan"),
        ({"lr_next": float("inf")}, ValueError, "lr_next must be a finite number > 0"),
        ({"num_workers": -1}, ValueError, "num_workers must be >= 0"),
        ({"seed": True}, TypeError, "seed must be an int"),
        ({"extra": {"crop": torch.float32}}, TypeError, "TrainConfig.extra"),
    ],
)
def test_b7_c8_train_config_refuses_values_that_cannot_train(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        TrainConfig(**kwargs)


class _NanFirst(torch.utils.data.Dataset):
    """The tiny training set with NaN pixels in its first image."""

    def __init__(self, base) -> None:  # type: ignore[no-untyped-def]
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        image, label = self.base[i]
        if i == 0:
            image = image.clone()
            image[:, :2, :2] = float("nan")
        return image, label


def _nan_image_run(nan_policy: str, logs: list[str]) -> IncrementalLearner:
    scenario = tiny_scenario()
    make = tiny_datasets(scenario)
    learner = tiny_learner(scenario, "ft")
    train_scenario(
        learner,
        lambda step: (_NanFirst(make(step)[0]), make(step)[1]),
        tiny_config(epochs=1, max_iters_per_epoch=None, batch_size=16, nan_policy=nan_policy),
        device=torch.device("cpu"),
        steps=range(0, 1),
        log=logs.append,
    )
    return learner


def test_a_nan_image_is_named_and_skip_restores_the_batch_norm_statistics() -> None:
    logs: list[str] = []
    with pytest.raises(NonFiniteLossError, match=r"non-finite input at step 0, epoch 0, batch \d: 12 NaN/Inf values"):
        _nan_image_run("stop", logs)
    learner = _nan_image_run("skip", logs)
    skipped = [line for line in logs if "batch skipped" in line]
    assert len(skipped) == 1 and "in images" in skipped[0] and "previous optimizer step" not in skipped[0]
    for name, buffer in learner.model.named_buffers():
        assert torch.isfinite(buffer.float()).all(), name


def test_one_time_estimate_counts_every_iteration_of_the_run_and_none_a_resume_repeats(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = tiny_scenario()
    datasets = tiny_datasets(scenario)
    config = tiny_config(progress=True, max_iters_per_epoch=None, epochs=2, epochs_next=1)
    plan = planned_iterations(datasets, config, range(scenario.num_steps))
    assert plan[0] == 2 * (len(datasets(0)[0]) // 4) and plan[1] == len(datasets(1)[0]) // 4

    eta = Eta(sum(plan.values()))
    run = {"device": torch.device("cpu"), "checkpoint_dir": tmp_path, "log": lambda _m: None}
    train_scenario(tiny_learner(scenario), datasets, config, steps=range(0, 1), eta=eta, **run)
    assert eta.done == plan[0]
    resumed = Eta(sum(plan.values()))  # a new process resumes after step 0: step 1 only is left
    train_scenario(tiny_learner(scenario), datasets, config, eta=resumed, **run)
    assert resumed.done == resumed.total == plan[1]
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("  eval step 1") and all(", run " in line for line in lines if "epoch" in line)

    # Without one given, train_scenario makes its own for all its steps (incseg train).
    run["checkpoint_dir"] = tmp_path / "own"
    train_scenario(tiny_learner(scenario), datasets, config, **run)
    lines = [line for line in capsys.readouterr().err.splitlines() if " epoch " in line]
    assert len(lines) == 3 and all(", run " in line for line in lines) and "run 0:00 left" in lines[-1]
