"""The checks of :meth:`IncrementalLearner.begin_step <incseg.learner.IncrementalLearner.begin_step>`."""

from __future__ import annotations

from incseg.models import IncrementalSegmenter
from incseg.scenarios import Scenario

__all__ = ["check_classifier", "check_next_step"]


def check_next_step(step: object, current: int, finished: bool, num_steps: int) -> None:
    """``step`` must be the step after ``current`` (``-1`` before the first), which must be ``finished``.

    Raises:
        TypeError: ``step`` is not an int.
        ValueError: ``step`` out of ``[0, num_steps)`` or out of order.
        RuntimeError: the current step is not finished.
    """
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    if not 0 <= step < num_steps:
        raise ValueError(f"step must be in [0, {num_steps}) for this scenario, got {step}")
    if step != current + 1:
        where = "before the first step" if current < 0 else f"at step {current}"
        raise ValueError(
            f"steps must be begun in order: the learner is {where}, so the next is begin_step({current + 1}), "
            f"got begin_step({step}) (use load() to resume from a checkpoint)"
        )
    if current >= 0 and not finished:
        raise RuntimeError(f"step {current} is not finished: call end_step() before begin_step({step})")


def check_classifier(model: IncrementalSegmenter, scenario: Scenario, step: int) -> None:
    """Before ``step`` begins, the model's classifier has the classes of the steps before it (at step 0: those of
    step 0, and no fusion module yet).

    Raises:
        ValueError: at step 0, a classifier of another size or a model that already has a fusion module.
        RuntimeError: at a later step, a classifier changed outside the learner.
    """
    got = model.classifier.classes_per_step
    if step == 0:
        k0 = scenario.num_classes_at(0)
        if got != [k0]:
            raise ValueError(
                f"at step 0 the model's classifier must have scenario.num_classes_at(0)={k0} outputs in one "
                f"head, got classes_per_step={got}; build the model for {k0} classes (background included)"
            )
        if model.fusion is not None:
            raise ValueError("the model already has a fusion module at step 0; the learner inserts the method's itself")
        return
    expected = list(scenario.classes_per_step[:step])
    if got != expected:
        raise RuntimeError(
            f"the model's classifier has classes_per_step={got} but step {step - 1} of the scenario "
            f"needs {expected}: it was changed outside the learner"
        )
