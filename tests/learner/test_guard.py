"""The divergence guard: non-finite terms and weights, explosions, one host sync, the learner and the loop."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from incseg._checks import NonFiniteError, set_validate_values
from incseg.learner import CheckpointError, DivergenceError, DivergenceGuard, IncrementalLearner, NonFiniteLossError
from incseg.learner.checkpoint import content_checksum
from incseg.losses import LossOutput
from incseg.models import small_segmenter
from incseg.scenarios import Scenario

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
from _tiny import tiny_config, tiny_datasets, tiny_learner, tiny_scenario

from incseg.engine import evaluate, train_scenario


def feed(guard: DivergenceGuard, values: list[float], term: str = "ad") -> None:
    for v in values:
        guard.check({term: torch.tensor(v)})


def test_issue_9_sequence_is_stopped_with_term_values_and_fix() -> None:
    # Issue 9: the weighted AD term went 0 -> 0.17 -> 3.5 -> 38 -> 155 -> 4e16 in five iterations.
    guard = DivergenceGuard()
    feed(guard, [0.0, 0.17, 3.5, 38.0, 155.0])
    with pytest.raises(DivergenceError, match=r"'ad' exploded at step 1.*4e\+16.*lower lambda_ad") as info:
        guard.check({"ad": torch.tensor(4e16)}, where="step 1", hints={"ad": "lower lambda_ad"})
    assert info.value.term == "ad" and info.value.values == pytest.approx([0.0, 0.17, 3.5, 38.0, 155.0, 4e16])


def test_explosion_from_a_large_start_is_caught() -> None:
    guard = DivergenceGuard()  # fcn_resnet50 in issue 9: AD 1204 -> 139,695 in two iterations
    feed(guard, [1204.0])
    with pytest.raises(DivergenceError, match="exploded"):
        feed(guard, [139_695.0])


def test_small_terms_and_healthy_noise_do_not_trigger() -> None:
    guard = DivergenceGuard()
    feed(guard, [0.0, 1e-6, 0.5, 2.0, 30.0, 3.0, 0.0, 140.8, 999.0])  # below growth * floor = 1000 from 0
    feed(guard, [3.0, 2.5, 2.9, 1.0, 4.0], term="seg")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 100), min_size=1, max_size=20), st.floats(1.0, 1e6))
def test_a_jump_above_growth_times_the_recent_minimum_always_raises(history: list[float], start: float) -> None:
    guard = DivergenceGuard(window=3)
    feed(guard, history)
    reference = max(10.0, min(history[-3:]))
    with pytest.raises(DivergenceError):
        feed(guard, [101.0 * reference])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_term_raises_or_is_reported(bad: float) -> None:
    guard = DivergenceGuard()
    feed(guard, [1.0, 2.0], term="kd")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at batch 3: loss=1, kd=.*\[1, 2\]"):
        guard.check({"loss": torch.tensor(1.0), "kd": torch.tensor(bad)}, where="batch 3")
    report = guard.check({"loss": torch.tensor(1.0), "kd": torch.tensor(bad)}, skip_nonfinite=True)
    assert not report.finite and "kd" in report.message
    assert guard.recent("kd") == [1.0, 2.0]  # a skipped batch is not part of the history


def test_non_finite_weights_always_raise() -> None:
    w = torch.ones(3)
    w[1] = math.nan
    with pytest.raises(DivergenceError, match="weights are non-finite") as info:
        DivergenceGuard().check({"loss": torch.tensor(1.0)}, tensors=[torch.ones(2), w], skip_nonfinite=True)
    assert info.value.term == "weights"
    DivergenceGuard(check_weights=False).check({"loss": torch.tensor(1.0)}, tensors=[w])  # opted out


@pytest.mark.parametrize("special", [None, -7.5, math.inf, -math.inf, math.nan])
def test_max_abs_of_the_weights_is_the_infinity_norm(special: float | None) -> None:
    from incseg.learner.guard import _max_abs

    torch.manual_seed(0)
    tensors = [torch.randn(4, 3), torch.randn(5).bfloat16() * 3, torch.empty(0), torch.randn(2, 2, 2).double()]
    if special is not None:
        tensors[3][1, 0, 1] = special
    got = _max_abs(tensors)
    expected = torch.nn.utils.get_total_norm([t for t in tensors if t.numel()], norm_type=math.inf)
    assert got is not None and got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got, expected.float(), rtol=0, atol=0, equal_nan=True)
    assert _max_abs([]) is None
    assert float(_max_abs([torch.empty(0)])) == 0.0  # type: ignore[arg-type]


def test_check_reads_the_device_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    original = torch.Tensor.tolist

    def counting(self):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    terms = {k: torch.tensor(1.0) for k in ("loss", "seg", "kd", "ad")}
    DivergenceGuard().check(terms, tensors=[torch.ones(4, 4), torch.zeros(3)])
    assert calls["n"] == 1


def _learner() -> tuple[IncrementalLearner, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    learner = IncrementalLearner(small_segmenter(3, width=8), Scenario([[1, 2], [3]]), "caf")
    learner.begin_step(0)
    return learner, torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2, 16, 16))


def test_training_step_guards_the_users_loop_and_can_opt_out() -> None:
    learner, images, labels = _learner()
    learner.training_step(images, labels)  # healthy
    with torch.no_grad():
        next(learner.model.parameters())[0].fill_(math.nan)  # as a diverged optimizer step leaves it
    with pytest.raises(DivergenceError, match="weights are non-finite at step 0"):
        learner.training_step(images, labels)
    set_validate_values(False)  # as on a GPU: the loss does not look at the logits' values
    try:
        with pytest.raises(DivergenceError, match="weights are non-finite at step 0"):
            learner.training_step(images, labels)
        assert math.isnan(learner.training_step(images, labels, guard=False).loss.detach())  # opt-out for speed
        learner.guard = None
        assert math.isnan(learner.training_step(images, labels).loss.detach())
    finally:
        set_validate_values(None)


def test_exploding_ad_in_the_users_loop_names_lambda_ad() -> None:
    learner, images, labels = _learner()
    learner.end_step()
    learner.begin_step(1)
    labels = labels.clamp(max=3)
    out = learner.training_step(images, labels)  # AD of identical teacher/student: ~0
    assert "ad" in out.terms
    guard = learner.guard
    assert guard is not None and guard.recent("ad")
    with pytest.raises(DivergenceError, match=r"'ad' exploded at step 1.*lower lambda_ad \(now"):
        guard.check({"ad": torch.tensor(1e6)}, where="step 1", hints=learner.divergence_hints())


def test_skip_policy_stops_when_the_weights_diverge(monkeypatch: pytest.MonkeyPatch) -> None:
    # Issue 12 item 3: a finite but huge loss made the weights non-finite, then every batch was skipped and the
    # run exited 0 with an invented score. The loop must stop whatever nan_policy says.
    learner = tiny_learner(tiny_scenario(), "ft")
    original = IncrementalLearner.training_step
    calls = {"n": 0}

    def huge(self, images, labels, *, module=None, guard=True):  # type: ignore[no-untyped-def]
        out = original(self, images, labels, module=module, guard=guard)
        calls["n"] += 1
        if calls["n"] == 2:
            scaled = out.loss * 1e30  # finite, and it sends the weights to Inf/NaN
            return LossOutput(scaled, {**out.terms, "total": scaled.detach()})
        return out

    monkeypatch.setattr(IncrementalLearner, "training_step", huge)
    with pytest.raises(DivergenceError, match=r"(weights are non-finite|exploded) at step 0, epoch 0, batch [12]"):
        train_scenario(
            learner,
            tiny_datasets(tiny_scenario()),
            tiny_config(nan_policy="skip", epochs=1),
            device=torch.device("cpu"),
            steps=range(0, 1),
            log=lambda _m: None,
        )


def test_evaluation_save_and_load_refuse_non_finite_weights(tmp_path: Path) -> None:
    learner, _, _ = _learner()
    learner.end_step()
    learner.save(tmp_path / "good.pt")
    _, test_set = tiny_datasets(tiny_scenario(), n_val=2)(0)
    with torch.no_grad():
        learner.model.classifier.heads[0].weight[0, 0] = math.inf  # type: ignore[index]
    with pytest.raises(NonFiniteError, match="non-finite"):
        evaluate(learner, test_set, device=torch.device("cpu"))
    with pytest.raises(NonFiniteError, match="model to save"):
        learner.save(tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()
    state = torch.load(tmp_path / "good.pt", weights_only=True)
    state.pop("checksum")  # an edited file, its checksum recomputed (else it is refused as damaged first)
    key = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][key].view(-1)[0] = math.nan
    torch.save({**state, "checksum": content_checksum(state)}, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="non-finite"):
        learner.load(tmp_path / "nan.pt")


def test_evaluation_refuses_non_finite_logits() -> None:
    learner, _, _ = _learner()
    learner.end_step()
    data = torch.utils.data.TensorDataset(torch.full((2, 3, 16, 16), math.nan), torch.zeros(2, 16, 16).long())
    with pytest.raises(NonFiniteError, match="NaN/Inf logits"):
        evaluate(learner, data, device=torch.device("cpu"))
