"""Divergence is never silent: one guard over the loss terms and the weights, one host sync per iteration.

:class:`DivergenceGuard` is what :meth:`IncrementalLearner.training_step
<incseg.learner.IncrementalLearner.training_step>` (on by default) and the reference loop
(:func:`incseg.engine.train_scenario`) use. At every check it reads, in one device-to-host transfer, every loss
term, the loss and the largest absolute value of the weights (after the previous optimizer step), and raises
:class:`DivergenceError` naming the term, its recent values and the likely fix when

- an input (the batch's images) holds NaN or Inf: a :class:`NonFiniteLossError` that names the inputs, checked
  before the weights, whose batch-norm statistics such a batch has just poisoned,
- a term or the loss is NaN or infinite (:class:`NonFiniteLossError`, a :class:`DivergenceError`),
- a weight or a floating buffer is NaN or infinite (the previous optimizer step broke the network), or
- a term *explodes*: its value exceeds ``growth`` (100) times the larger of ``floor`` (10) and the smallest of
  its last ``window`` (5) values. The floor keeps small terms that start at 0 (attentive distillation between
  identical teacher and student at the start of a step) from triggering it: a term must pass
  ``growth * floor = 1000`` to count as exploded (a weighted AD term of a foreign network at ``lambda_ad =
  1000`` was measured at 140 one iteration into a step that then trained normally).

Example:
    >>> guard = DivergenceGuard()
    >>> for value in (0.5, 0.25, 0.75):
    ...     _ = guard.check({"ad": torch.tensor(value)})
    >>> try:
    ...     guard.check({"ad": torch.tensor(2000.0)})
    ... except DivergenceError as err:
    ...     print(err.term, err.values)
    ad [0.5, 0.25, 0.75, 2000.0]
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from incseg import distributed as D
from incseg._checks import NonFiniteError

__all__ = ["DivergenceError", "DivergenceGuard", "GuardReport", "NonFiniteLossError", "check_finite_module"]

_MAX_TERMS = 16
_WEIGHTS = "weights"
_INPUTS = "inputs"
_HEAD = 3  # row: number of terms, largest |weight|, non-finite input values, then the terms


class DivergenceError(RuntimeError):
    """Training diverged: a loss term or the weights went non-finite, or a term exploded.

    Attributes:
        term: the loss term (``"weights"`` for the network's weights).
        values: its values over the last iterations, the offending one last.
        rank: the process that saw it (``None`` outside ``torch.distributed``).
    """

    def __init__(self, message: str, *, term: str = "", values: list[float] | None = None, rank: int | None = None):
        super().__init__(message)
        self.term = term
        self.values = list(values or [])
        self.rank = rank


class NonFiniteLossError(DivergenceError):
    """A loss term is NaN or infinite (the batch can be skipped: the weights are still finite)."""


@dataclass(frozen=True)
class GuardReport:
    """What one :meth:`DivergenceGuard.check` read.

    Attributes:
        values: every term's value (the mean over processes when reduced; NaN when non-finite somewhere).
        finite: whether every term was finite on every process (``False`` only with ``skip_nonfinite=True``).
        message: the explanation of a non-finite loss (empty when finite).
    """

    values: dict[str, float]
    finite: bool
    message: str = ""


def _max_abs(tensors: list[Tensor]) -> Tensor | None:
    """The largest absolute value over ``tensors`` (NaN if any holds a NaN), a float32 scalar."""
    if not tensors:
        return None
    detached = [t.detach() for t in tensors]
    if any(t.device.type != "cpu" for t in detached):  # one fused foreach kernel per device
        return torch.nn.utils.get_total_norm(detached, norm_type=math.inf)
    # On the CPU the infinity norm runs a slow generic reduction (about 5x amax + amin on DeepLabV3-ResNet101's
    # weights, 0.2 s per check on one thread); max(amax, -amin) is the same number and propagates NaN.
    with torch.no_grad():
        maxima = [torch.maximum(t.amax(), t.amin().neg()).float() for t in detached if t.numel()]
    return torch.stack(maxima).amax() if maxima else torch.zeros(())


def _fmt(values: Iterable[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


class DivergenceGuard:
    """Stop training when a loss term or the weights go non-finite or a term explodes (see the module docs).

    Args:
        growth: explosion factor (default 100).
        floor: absolute floor of the explosion test (default 10): a term explodes when it exceeds
            ``growth * max(floor, min(last window values))``.
        window: number of recent values kept per term (default 5); also shown in the error.
        check_weights: also check the weights given to :meth:`check` (default ``True``).

    Raises:
        ValueError: ``growth <= 1``, ``floor <= 0`` or ``window < 1``.
    """

    def __init__(self, *, growth: float = 100.0, floor: float = 10.0, window: int = 5, check_weights: bool = True):
        if not growth > 1 or not floor > 0 or window < 1:
            raise ValueError(f"need growth > 1, floor > 0 and window >= 1, got {growth}, {floor}, {window}")
        self.growth = float(growth)
        self.floor = float(floor)
        self.window = int(window)
        self.check_weights = bool(check_weights)
        self._history: dict[str, deque[float]] = {}

    def reset(self) -> None:
        """Forget the recent values (e.g. at the start of a step, whose loss terms change)."""
        self._history.clear()

    def recent(self, term: str) -> list[float]:
        """The recent finite values of ``term``, oldest first."""
        return list(self._history.get(term, ()))

    def check(
        self,
        terms: Mapping[str, Tensor],
        *,
        tensors: Iterable[Tensor] = (),
        where: str = "",
        hints: Mapping[str, str] | None = None,
        reduce: bool = False,
        skip_nonfinite: bool = False,
        inputs: Mapping[str, Tensor] | None = None,
    ) -> GuardReport:
        """Read ``terms`` and the largest weight in one host transfer, then check them.

        Args:
            terms: scalar tensors by name (e.g. ``{"loss": out.loss, **out.terms}``).
            tensors: weights (and floating buffers) to check for NaN/Inf, e.g. after the previous optimizer step.
            where: context for the messages (e.g. ``"step 1, epoch 0, batch 7"``).
            hints: likely fix by term name (``"*"`` for any term); shown in the message.
            reduce: under ``torch.distributed``, gather every process's values (one ``all_reduce``, all ranks
                must call it): every process then takes the same decision and the message names the rank.
            skip_nonfinite: report a non-finite loss (or input) in the returned :class:`GuardReport` instead of
                raising, so the caller can skip the batch. Non-finite weights and explosions always raise.
            inputs: the batch's input tensors by name (e.g. ``{"images": images}``), counted for NaN/Inf in the
                same transfer. A non-finite input is reported as such, before the weights: the forward pass has
                written it into the batch-norm statistics, which are buffers among ``tensors``.

        Returns:
            The :class:`GuardReport` (values are averaged over processes when reduced).

        Raises:
            NonFiniteLossError: an input or a term is NaN/Inf (unless ``skip_nonfinite``).
            DivergenceError: a weight is NaN/Inf, or a term exploded.
        """
        names = [str(k) for k in terms][:_MAX_TERMS]
        scalars = [terms[k].detach().float().reshape(()) for k in names]
        device = scalars[0].device if scalars else torch.device("cpu")
        weights = _max_abs(list(tensors)) if self.check_weights else None
        row = torch.zeros(_HEAD + _MAX_TERMS, device=device)
        if scalars:
            row[_HEAD : _HEAD + len(scalars)] = torch.stack(scalars).to(device)
        if weights is not None:
            row[1] = weights.to(device=device, dtype=row.dtype)
        for x in (inputs or {}).values():
            if x.is_floating_point() or x.is_complex():
                row[2] += (~torch.isfinite(x.detach())).sum().to(device=device, dtype=row.dtype)
        row[0] = len(names)
        distributed = reduce and D.is_distributed()
        rank = D.get_rank() if D.is_distributed() else None
        if distributed:
            table = torch.zeros(D.get_world_size(), row.numel(), device=device)
            table[D.get_rank()] = row
            torch.distributed.all_reduce(table, op=torch.distributed.ReduceOp.SUM)
            rows = table.tolist()  # the one host sync
        else:
            rows = [row.tolist()]  # the one host sync
        per_rank = [dict(zip(names, r[_HEAD : _HEAD + int(r[0])])) for r in rows]
        ranks = list(range(len(rows))) if distributed else [rank]
        hints = hints or {}

        def hint(term: str) -> str:
            text = hints.get(term) or hints.get("*")
            return f". Likely fix: {text}" if text else ""

        def at(r: int | None) -> str:
            place = f" at {where}" if where else ""
            return place + (f" on rank {r}" if r is not None else "")

        for r, values in zip(ranks, rows):
            if values[2] > 0:  # before the weights: this batch's forward pass put the NaN into the BN statistics
                shown = ", ".join(inputs or {})
                message = (
                    f"non-finite input{at(r)}: {int(values[2])} NaN/Inf values in {shown}; the data holds NaN/Inf "
                    "(check the image files, the dataset and its transforms), not the training"
                )
                if skip_nonfinite:
                    return GuardReport({k: math.nan for k in names}, False, message)
                raise NonFiniteLossError(message, term=_INPUTS, values=[values[2]], rank=r)
        if weights is not None:
            for r, values in zip(ranks, rows):
                if not math.isfinite(values[1]):
                    raise DivergenceError(
                        f"the weights are non-finite{at(r)} (largest |weight| {values[1]}): the previous optimizer "
                        f"step diverged; recent loss values {self._recent_text()}{hint(_WEIGHTS)}",
                        term=_WEIGHTS,
                        values=[values[1]],
                        rank=r,
                    )
        mean = {k: sum(v.get(k, math.nan) for v in per_rank) / len(per_rank) for k in names}
        for r, values in zip(ranks, per_rank):
            bad = {k: v for k, v in values.items() if not math.isfinite(v)}
            if bad or len(values) != len(names):
                term = next(iter(bad), names[0] if names else "loss")
                shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items()) or "no loss computed"
                message = (
                    f"non-finite loss{at(r)}: {shown}; last finite values of {term!r}: "
                    f"{_fmt(self.recent(term))}{hint(term)}"
                )
                if skip_nonfinite:
                    return GuardReport({k: math.nan for k in names}, False, message)
                raise NonFiniteLossError(
                    message, term=term, values=[*self.recent(term), bad.get(term, math.nan)], rank=r
                )
        for k in sorted(names, key=lambda name: name == names[0]):  # the named terms first: they say why
            value = mean[k]
            past = self._history.setdefault(k, deque(maxlen=self.window))
            if past and abs(value) > self.growth * max(self.floor, min(abs(v) for v in past)):
                values = [*past, value]
                raise DivergenceError(
                    f"loss term {k!r} exploded{at(rank if not distributed else None)}: {_fmt(values)} over the last "
                    f"{len(values)} iterations (more than {self.growth:g}x its recent minimum, above "
                    f"{self.growth * self.floor:g}){hint(k)}",
                    term=k,
                    values=values,
                    rank=rank if not distributed else None,
                )
        for k in names:
            self._history[k].append(mean[k])
        return GuardReport(mean, True)

    def _recent_text(self) -> str:
        return "; ".join(f"{k} {_fmt(v)}" for k, v in self._history.items()) or "(none yet)"


def check_finite_module(module: nn.Module, what: str) -> None:
    """Raise :class:`~incseg._checks.NonFiniteError` naming the first parameters or buffers holding NaN/Inf.

    One host sync when everything is finite (a reduction over all tensors), more only to name the culprits.

    Args:
        module: the network to check.
        what: its name in the message (e.g. ``"model"``).

    Raises:
        NonFiniteError: some weights are NaN or infinite.
    """
    named = [(n, t) for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_floating_point()]
    check_finite_tensors(dict(named), what)


def check_finite_tensors(tensors: Mapping[str, Tensor], what: str) -> None:
    """:func:`check_finite_module` for a ``{name: tensor}`` mapping (e.g. a state dict); non-floats are skipped."""
    floats = {n: t for n, t in tensors.items() if isinstance(t, Tensor) and t.is_floating_point() and t.numel()}
    total = _max_abs(list(floats.values()))
    if total is None or math.isfinite(float(total)):
        return
    bad = [n for n, t in floats.items() if not bool(torch.isfinite(t).all())]
    raise NonFiniteError(
        f"{what} holds non-finite (NaN/Inf) weights in {len(bad)} tensors, e.g. {bad[:5]}: the run diverged; "
        "retrain from the last good checkpoint with a lower learning rate or loss weight"
    )
