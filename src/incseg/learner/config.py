"""Method configuration: which losses and modules an incremental method uses, and the named presets."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from incseg._catalog import METHOD_DESCRIPTIONS

__all__ = ["METHODS", "METHOD_DESCRIPTIONS", "ADMode", "CEMode", "InitMode", "KDMode", "MethodConfig", "TestStrategy"]

CEMode = Literal["plain", "unbiased"]
KDMode = Literal["plain", "unbiased", "balanced"]
ADMode = Literal["plain", "spatial", "channel", "both"]
InitMode = Literal["mib", "random"]
TestStrategy = Literal["skip", "zero_pad", "concat"]

_CHOICES: dict[str, tuple[Any, ...]] = {
    "ce": ("plain", "unbiased"),
    "kd": (None, "plain", "unbiased", "balanced"),
    "ad": (None, "plain", "spatial", "channel", "both"),
    "init": ("mib", "random"),
    "class_reduction": ("mean", "sum"),
    "test_strategy": ("skip", "zero_pad", "concat"),
}


@dataclass(frozen=True)
class MethodConfig:
    """What an incremental method is made of: supervised loss, distillations, CAF module, new-class init.

    The overall loss is eq. 13 of the paper, ``L = L_SEG + lambda_AD L_AD + lambda_D L_D``, with each term
    selectable: ``ce`` picks ``L_SEG`` (plain cross-entropy, or the unbiased one of eq. 14-15), ``kd`` the
    output distillation ``L_D`` (plain LwF KD, the unbiased KD of eq. 9-10 or the balanced KD of eq. 11-12),
    ``ad`` the feature distillation ``L_AD`` (plain feature distillation, or the attentive one of eq. 5-8
    with spatial, channel or both attentions) and ``caf`` whether the continual attentive fusion (eq. 1-4)
    sits between encoder and refiner from step 1 on. Use :meth:`preset` for the named methods of
    :data:`METHODS` ("ft", "lwf", "mib", "caf", "joint" and the ablations of the paper's Table III).

    Only plain python types are stored, so a config round-trips through :meth:`to_dict` / :meth:`from_dict`
    (and through checkpoints loaded with ``weights_only=True``).

    Args:
        name: a label for logs and checkpoints.
        ce: ``"plain"`` or ``"unbiased"`` segmentation loss.
        kd: ``None``, ``"plain"``, ``"unbiased"`` or ``"balanced"`` output distillation.
        ad: ``None``, ``"plain"``, ``"spatial"``, ``"channel"`` or ``"both"`` feature distillation.
        caf: insert :class:`~incseg.nn.caf.ContinualAttentiveFusion` at step 1 (kept in later steps).
        init: initialisation of new classifier rows, ``"mib"`` (PROTOCOL.md) or ``"random"``.
        lambda_d: weight of ``L_D`` (paper: 10).
        lambda_ad: weight of ``L_AD`` (paper: 1000, with the mean reduction of PROTOCOL.md).
        class_reduction: ``"mean"`` (MiB normalisation, default) or ``"sum"`` (eq. 9 exactly) over old classes.
        test_strategy: CAF test strategy, ``"skip"`` (default), ``"zero_pad"`` or ``"concat"``.
        void_as_background: MiB's labelling of void pixels as background (``incseg train`` passes it to the
            datasets; in your own pipeline give it to :class:`~incseg.data.IncrementalSegmentation`).
        caf_inner_channels: inner channels of CAF's non-local projections (``None``: ``C / 2`` as the paper);
            fewer trade accuracy for speed (the module's cost is mostly these projections, see the results).

    Raises:
        ValueError: a value outside its allowed set (the message lists the valid ones) or a negative or
            non-finite loss weight.
        TypeError: a value of the wrong type.

    Example:
        >>> cfg = MethodConfig.preset("caf", lambda_d=5.0)
        >>> cfg.kd, cfg.ad, cfg.caf, cfg.lambda_d
        ('balanced', 'both', True, 5.0)
        >>> MethodConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    name: str = "custom"
    ce: CEMode = "unbiased"
    kd: KDMode | None = "balanced"
    ad: ADMode | None = "both"
    caf: bool = True
    init: InitMode = "mib"
    lambda_d: float = 10.0
    lambda_ad: float = 1000.0
    class_reduction: Literal["mean", "sum"] = "mean"
    test_strategy: TestStrategy = "skip"
    void_as_background: bool = False
    caf_inner_channels: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"name must be a non-empty str, got {self.name!r}")
        for field_name, allowed in _CHOICES.items():
            value = getattr(self, field_name)
            if value not in allowed:
                raise ValueError(f"{field_name} must be one of {list(allowed)}, got {value!r}")
        for field_name in ("caf", "void_as_background"):
            value = getattr(self, field_name)
            if not isinstance(value, bool):
                raise TypeError(f"{field_name} must be a bool, got {type(value).__name__}")
        inner = self.caf_inner_channels
        if inner is not None and (isinstance(inner, bool) or not isinstance(inner, int) or inner < 1):
            raise ValueError(f"caf_inner_channels must be None or a positive int, got {inner!r}")
        for field_name in ("lambda_d", "lambda_ad"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{field_name} must be a float, got {type(value).__name__}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{field_name} must be a finite number >= 0, got {value}")
            object.__setattr__(self, field_name, float(value))

    @property
    def uses_teacher(self) -> bool:
        """Whether training at steps > 0 runs the old model (for KD, AD or the CAF module)."""
        return self.kd is not None or self.ad is not None or self.caf

    def replace(self, **overrides: Any) -> MethodConfig:
        """Return a copy with some fields changed (validated like the constructor).

        Raises:
            ValueError: an unknown field name (the message lists the valid ones) or an invalid value.
        """
        _check_fields(overrides)
        return dataclasses.replace(self, **overrides)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> MethodConfig:
        """The named method of :data:`METHODS`, optionally with some fields changed.

        Args:
            name: a key of :data:`METHODS` (e.g. ``"ft"``, ``"lwf"``, ``"mib"``, ``"caf"``, ``"joint"``).
            **overrides: fields to change, e.g. ``lambda_ad=100.0`` or ``test_strategy="zero_pad"``.

        Returns:
            The configuration.

        Raises:
            ValueError: unknown method name or field (the message lists the valid ones), invalid value.

        Example:
            >>> MethodConfig.preset("mib").kd
            'unbiased'
        """
        if not isinstance(name, str) or name not in METHODS:
            raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
        return METHODS[name].replace(**overrides) if overrides else METHODS[name]

    def to_dict(self) -> dict[str, Any]:
        """Plain-python view of the configuration (str, bool, float and ``None`` values)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MethodConfig:
        """Build a configuration from :meth:`to_dict` output.

        Raises:
            TypeError: ``data`` is not a mapping.
            ValueError: unknown or missing fields, or invalid values.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"data must be a mapping, got {type(data).__name__}")
        _check_fields(data)
        optional = {"caf_inner_channels"}  # added after format 1 was defined: older checkpoints lack it
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data and f.name not in optional]
        if missing:
            raise ValueError(f"method configuration is missing fields {missing}")
        return cls(**dict(data))


def _check_fields(data: Mapping[str, Any]) -> None:
    valid = [f.name for f in dataclasses.fields(MethodConfig)]
    unknown = [k for k in data if k not in valid]
    if unknown:
        raise ValueError(f"unknown method configuration fields {unknown}; valid fields: {', '.join(valid)}")


def _presets() -> dict[str, MethodConfig]:
    plain = MethodConfig(name="ft", ce="plain", kd=None, ad=None, caf=False, init="random")
    baseline = MethodConfig(name="baseline", ce="unbiased", kd=None, ad=None, caf=False, init="mib")
    presets = {
        "ft": plain,
        "joint": plain.replace(name="joint"),
        "lwf": plain.replace(name="lwf", kd="plain"),
        "mib": baseline.replace(name="mib", kd="unbiased"),
        "caf": MethodConfig(name="caf"),
        # ablations of the paper's Table III (baseline = unbiased CE, MiB init) and Table VI (AD variants)
        "baseline": baseline,
        "baseline+kd": baseline.replace(name="baseline+kd", kd="unbiased"),
        "baseline+bkd": baseline.replace(name="baseline+bkd", kd="balanced"),
        "baseline+ad": baseline.replace(name="baseline+ad", ad="both"),
        "baseline+ad+bkd": baseline.replace(name="baseline+ad+bkd", ad="both", kd="balanced"),
        "baseline+caf": baseline.replace(name="baseline+caf", caf=True),
        "baseline+caf+bkd": baseline.replace(name="baseline+caf+bkd", caf=True, kd="balanced"),
        "baseline+caf+ad": baseline.replace(name="baseline+caf+ad", caf=True, ad="both"),
        "baseline+fd": baseline.replace(name="baseline+fd", ad="plain"),
        "baseline+ad_sp": baseline.replace(name="baseline+ad_sp", ad="spatial"),
        "baseline+ad_ch": baseline.replace(name="baseline+ad_ch", ad="channel"),
    }
    return presets


METHODS: Mapping[str, MethodConfig] = MappingProxyType(_presets())
"""Named method presets (read-only): ``ft``, ``joint``, ``lwf``, ``mib``, ``caf`` and the ablations
``baseline``, ``baseline+kd``, ``baseline+bkd``, ``baseline+ad``, ``baseline+ad+bkd``, ``baseline+caf``,
``baseline+caf+bkd``, ``baseline+caf+ad`` (Table III) and ``baseline+fd``, ``baseline+ad_sp``,
``baseline+ad_ch`` (Table VI). ``joint`` equals ``ft``: train it on ``scenario.joint()``."""
