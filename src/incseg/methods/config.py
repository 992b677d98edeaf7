"""Method configuration: the settings of an incremental method and the named presets.

The contract between the learner and the method families lives in :mod:`incseg.methods`: this module (the
configuration), :mod:`incseg.methods.base` (the hooks) and :mod:`incseg.methods.registry` (families and
presets). :mod:`incseg.learner` only consumes them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from incseg._catalog import METHOD_DESCRIPTIONS
from incseg._checks import check_number
from incseg.functional._common import ClassReduction
from incseg.losses.attentive import AD_BALANCE_ON, check_ad_maps
from incseg.losses.caf import ADMode, CEMode, KDMode
from incseg.methods.registry import PresetView, get_component, get_family
from incseg.nn.caf import FusionStrategy

__all__ = [
    "CAF_FIELDS",
    "COMMON_FIELDS",
    "METHODS",
    "METHOD_DESCRIPTIONS",
    "ADMode",
    "CEMode",
    "InitMode",
    "KDMode",
    "MethodConfig",
    "NormPolicy",
]

InitMode = Literal["mib", "random", "aux", "prior"]
NormPolicy = Literal["train", "frozen"]

COMMON_FIELDS = ("name", "family", "components", "init", "bn", "dropout", "void_as_background")
"""The fields every method family uses (the learner reads them: classifier growth, bn/dropout policy)."""

CAF_FIELDS: Mapping[str, Any] = {
    "ce": "plain",
    "kd": None,
    "ad": None,
    "caf": False,
    "lambda_d": 10.0,
    "lambda_ad": 1000.0,
    "class_reduction": "mean",
    "test_strategy": "skip",
    "caf_inner_channels": None,
    "ad_balance": None,
    "gamma_max": None,
    "gamma_on_new": True,
    "ad_on_new": True,
    "ad_maps": ("z", "h"),
    "ad_balance_on": "weights",
    "ad_balance_every": 10,
    "fusion_dropout": 0.0,
}
"""The fields only the CAF family (:class:`~incseg.methods.CAFMethod` and its subclasses) reads, with the value
each holds in the configuration of a family that does not use it (loss term or module switched off, the paper's
neutral value of a stabiliser). They stay fields of :class:`MethodConfig` so that attribute access and
:meth:`MethodConfig.to_dict` keys are those of incseg 0.2; a family lists the ones it reads in
:attr:`~incseg.methods.Method.fields`."""

# One spelling per choice list: the Literal types above and those of the loss and the CAF module.
_CHOICES: dict[str, tuple[Any, ...]] = {
    "ce": get_args(CEMode),
    "kd": (None, *get_args(KDMode)),
    "ad": (None, *get_args(ADMode)),
    "init": get_args(InitMode),
    "class_reduction": get_args(ClassReduction),
    "test_strategy": get_args(FusionStrategy),
    "bn": get_args(NormPolicy),
    "dropout": get_args(NormPolicy),
    "ad_balance_on": AD_BALANCE_ON,
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
    :data:`METHODS` ("ft", "lwf", "mib", "caf", "joint", "plop" and the ablations of the paper's Table III).
    Which plugin runs it is ``family``; a family's own settings are in ``options``. The fields of
    :data:`CAF_FIELDS` belong to the CAF family: another family (PLOP) refuses them as overrides, and a
    configuration of that family holds their "off" values.

    Only plain python types are stored, so a config round-trips through :meth:`to_dict` / :meth:`from_dict`
    (and through checkpoints loaded with ``weights_only=True``).

    Args:
        name: a label for logs and checkpoints.
        ce: ``"plain"`` or ``"unbiased"`` segmentation loss.
        kd: ``None``, ``"plain"``, ``"unbiased"`` or ``"balanced"`` output distillation. The ``caf`` recipe
            (the default) uses MiB's ``"unbiased"`` KD, as the authors' public release does (why: docs/lab-notebook.md);
            ``caf-paper`` keeps ``"balanced"``.
        ad: ``None``, ``"plain"``, ``"spatial"``, ``"channel"`` or ``"both"`` feature distillation.
        caf: insert :class:`~incseg.nn.caf.ContinualAttentiveFusion` at step 1 (kept in later steps).
        init: initialisation of new classifier rows, ``"mib"`` (PROTOCOL.md), ``"aux"`` (a copy of the
            background row, DKD's auxiliary classifier), ``"prior"`` (weights 0, biases ``logit(0.01)``: sigmoid
            classifiers starting at probability 0.01) or ``"random"``.
        lambda_d: weight of ``L_D`` (paper: 10).
        lambda_ad: weight of ``L_AD`` (paper: 1000, with the mean reduction of PROTOCOL.md).
        class_reduction: ``"mean"`` (MiB normalisation, default) or ``"sum"`` (eq. 9 exactly) over old classes.
        test_strategy: CAF test strategy, ``"skip"`` (default), ``"zero_pad"`` or ``"concat"``.
        void_as_background: MiB's labelling of void pixels as background (``incseg train`` passes it to the
            datasets; in your own pipeline give it to :class:`~incseg.data.IncrementalSegmentation`).
        caf_inner_channels: inner channels of CAF's non-local projections (``None``: ``C / 2`` as the paper);
            fewer trade accuracy for speed (docs/lab-notebook.md, "Speed and memory").
        ad_balance: cap ``κ`` of the attentive distillation's pull, recomputed at every iteration (``None``: the
            fixed ``λ_AD`` of eq. 13, which diverges or freezes the features depending on the network and
            learning rate; see docs/protocol.md). With ``ad_balance_on="weights"`` (default) ``L_AD`` gets the
            weight ``min(λ_AD, κ ||∇_θ L_new|| / ||∇_θ L_AD||)``, ``L_new`` the cross-entropy of the pixels
            labelled new; with ``"features"`` each feature map's term gets
            ``min(λ_AD, κ ||∂L_task/∂m|| / ||∂L_AD/∂m||)``, ``L_task`` the output losses.
        gamma_max: upper bound of the balance ``γ`` of eq. 11 (``None``: the paper's unbounded ``γ``; ``1.0``:
            ``γ`` only ever down-weights the background term, the paper's stated intent).
        gamma_on_new: with ``kd="balanced"``: ``True`` (the paper) applies ``γ`` on every pixel; ``False``
            (default) keeps ``γ = 1`` (MiB's unbiased KD) on pixels labelled with a new class, where ``γ < 1``
            pulls the student towards the old classes against the label (see :class:`~incseg.losses.CAFLoss`
            and docs/lab-notebook.md).
        ad_on_new: ``True`` (the paper) distils the features at every position; ``False`` leaves the positions
            of pixels labelled with a new class out of the attentive distillation, where the old model's features
            work against the label (see :class:`~incseg.losses.CAFLoss` and docs/protocol.md).
        ad_maps: the feature maps the attentive distillation acts on: ``("z", "h")`` (eq. 8: the encoder
            features ``z̄`` and the refined features ``h``), ``("z",)`` or ``("h",)``; a string ``"z"``, ``"h"``
            or ``"z+h"`` is accepted (stored as the tuple; :meth:`to_dict` gives the string).
        ad_balance_on: where ``ad_balance`` compares the pulls: ``"weights"`` (default) on the network's
            parameters, against the segmentation loss of the pixels labelled new only, one weight for both maps:
            the distillation never steers the weights more than ``κ`` times as hard as the new classes' labels,
            on any network (two more backward passes per batch at steps > 0); ``"features"`` on each feature
            map, against all output losses (the 0.2 recipe, cheaper; it let the new classes' pull vary with the
            network). See :class:`~incseg.losses.CAFLoss` and docs/protocol.md.
        ad_balance_every: with ``ad_balance_on="weights"``, the iterations between two refreshes of the
            balanced weight, held in between (10, default: the two backward passes of a refresh cost a tenth as
            much; 1: every iteration; :class:`~incseg.losses.attentive.WeightBalance`).
        bn: ``"train"`` (default) updates the student's batch-norm layers from each batch; ``"frozen"`` keeps
            them in evaluation mode (running statistics of step 0) at steps > 0, as the teacher's, while their
            affine weights still train (MiB's ``--fix_bn``; not the default, see "Large networks: stability" in
            docs/lab-notebook.md). Layers that never saw data (running mean 0 and variance 1, as initialised) keep
            batch statistics under ``"frozen"``, with a warning: evaluation mode would not normalise them.
        dropout: ``"frozen"`` switches the student's dropout layers off at steps > 0, so that the distilled
            features of the student and the teacher are computed the same way; ``"train"`` keeps them on.
        fusion_dropout: probability, per image and training iteration, that CAF's fusion is replaced by its
            ``skip`` path (``v_new`` alone), so that the test-time strategy ``skip`` is trained too (0: the
            paper, which always fuses in training).
        family: the method family (a plugin of :mod:`incseg.methods`) that implements the configuration:
            ``"caf"`` (every method of the CAF paper, :class:`~incseg.methods.CAFMethod`), ``"plop"``
            (:class:`~incseg.methods.PLOPMethod`) or one registered with :func:`~incseg.methods.register_method`.
        components: names of :class:`~incseg.methods.Component` s added to the family, in order (e.g.
            ``("caf-fusion", "attentive-distillation")`` for ``plop+caf``, ``("replay",)`` for a "-M" variant,
            ``("ewf",)`` for weight fusion); each reads the fields it lists and has options of its own. The CAF
            family has the fusion module and the attentive distillation built in (``caf``, ``ad``), so it refuses
            the components that would duplicate them.
        options: the family's and the components' own settings (e.g. PLOP's ``pod_factor``, replay's
            ``memory_size``), validated and completed with their defaults; they are passed like fields
            (``MethodConfig.preset("plop", pod_factor=0.02)``) and appear as entries of their own in
            :meth:`to_dict`.

    Raises:
        ValueError: a value outside its allowed set (the message lists the valid ones), a negative or
            non-finite loss weight, or a field of :data:`CAF_FIELDS` set for a family that does not use it.
        TypeError: a value of the wrong type.

    Example:
        >>> cfg = MethodConfig.preset("caf", lambda_d=5.0)
        >>> cfg.kd, cfg.ad, cfg.caf, cfg.lambda_d
        ('unbiased', 'both', True, 5.0)
        >>> MethodConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    name: str = "custom"
    ce: CEMode = "unbiased"
    kd: KDMode | None = "unbiased"
    ad: ADMode | None = "both"
    caf: bool = True
    init: InitMode = "mib"
    lambda_d: float = 10.0
    lambda_ad: float = 1000.0
    class_reduction: ClassReduction = "mean"
    test_strategy: FusionStrategy = "skip"
    void_as_background: bool = False
    caf_inner_channels: int | None = None
    ad_balance: float | None = 0.1
    gamma_max: float | None = 1.0
    gamma_on_new: bool = False
    ad_on_new: bool = False
    ad_maps: tuple[str, ...] = ("z", "h")
    ad_balance_on: str = "weights"
    ad_balance_every: int = 10
    bn: NormPolicy = "train"
    dropout: NormPolicy = "frozen"
    fusion_dropout: float = 0.5
    family: str = "caf"
    components: tuple[str, ...] = ()
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"name must be a non-empty str, got {self.name!r}")
        if not isinstance(self.family, str):
            raise TypeError(f"family must be a str, got {type(self.family).__name__}")
        if not isinstance(self.options, Mapping):
            raise TypeError(f"options must be a mapping, got {type(self.options).__name__}")
        family = get_family(self.family)
        components = self.components
        if isinstance(components, str) or not isinstance(components, (tuple, list)):
            raise TypeError(f"components must be a list of component names, got {components!r}")
        parts = [get_component(name) for name in components]
        if len(set(components)) != len(components):
            raise ValueError(f"components must not repeat, got {list(components)}")
        object.__setattr__(self, "components", tuple(components))
        owned: dict[str, str] = {k: f"family {self.family!r}" for k in family.fields}
        owners: dict[str, Any] = {k: family for k in family.options}
        for part in parts:
            for key in part.fields:
                if key in owned:
                    raise ValueError(
                        f"component {part.name!r} cannot be added to {owned[key]}: both set {key!r} "
                        "(the CAF family has the fusion module and attentive distillation built in: use caf=True, "
                        "ad=...)"
                    )
                owned[key] = f"component {part.name!r}"
            for key in part.options:
                if key in owners:
                    raise ValueError(f"component {part.name!r} and {owners[key]} both have the option {key!r}")
                owners[key] = part
        known = {k: v for k, v in self.options.items() if k not in owners}
        if known:
            raise ValueError(
                f"unknown options {list(known)} for family {self.family!r} with components {list(components)}; "
                f"valid: {list(owners)}"
            )
        checked = family.check_options({k: v for k, v in self.options.items() if owners[k] is family})
        for part in parts:
            checked.update(part.check_options({k: v for k, v in self.options.items() if owners[k] is part}))
        object.__setattr__(self, "options", checked)
        object.__setattr__(self, "ad_maps", check_ad_maps(self.ad_maps))  # a list (from_dict) or "z+h": the tuple
        for field_name, off in CAF_FIELDS.items():
            if field_name in owned:
                continue
            value = getattr(self, field_name)
            if value != off and value != _DEFAULTS[field_name]:
                raise ValueError(
                    f"{field_name}={value!r} is not a setting of method family {self.family!r}"
                    f"{_with(self.components)}; its settings: {', '.join(_settings(self.family, self.components))}"
                )
            object.__setattr__(self, field_name, off)  # the default of a CAF setting: switched off
        for field_name, allowed in _CHOICES.items():
            value = getattr(self, field_name)
            if value not in allowed:
                raise ValueError(f"{field_name} must be one of {list(allowed)}, got {value!r}")
        for field_name in ("caf", "void_as_background", "gamma_on_new", "ad_on_new"):
            value = getattr(self, field_name)
            if not isinstance(value, bool):
                raise TypeError(f"{field_name} must be a bool, got {type(value).__name__}")
        every = self.ad_balance_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"ad_balance_every must be a positive int, got {every!r}")
        inner = self.caf_inner_channels
        if inner is not None and (isinstance(inner, bool) or not isinstance(inner, int) or inner < 1):
            raise ValueError(f"caf_inner_channels must be None or a positive int, got {inner!r}")
        for field_name in ("lambda_d", "lambda_ad"):
            object.__setattr__(self, field_name, check_number(getattr(self, field_name), field_name, allow_zero=True))
        for field_name in ("ad_balance", "gamma_max"):
            value = getattr(self, field_name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{field_name} must be None or a float, got {type(value).__name__}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{field_name} must be None or a finite number > 0, got {value}")
            object.__setattr__(self, field_name, float(value))
        p = self.fusion_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise TypeError(f"fusion_dropout must be a float, got {type(p).__name__}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"fusion_dropout must be in [0, 1], got {p}")
        object.__setattr__(self, "fusion_dropout", float(p))
        family.check_config(self)

    __hash__ = None  # type: ignore[assignment]  # options is a dict

    @property
    def uses_teacher(self) -> bool:
        """Whether training at steps > 0 runs the old model (the answer of the family or of a component)."""
        return get_family(self.family).uses_teacher(self) or any(
            get_component(name).uses_teacher(self) for name in self.components
        )

    def replace(self, **overrides: Any) -> MethodConfig:
        """Return a copy with some fields, or options of its family, changed (validated like the constructor).

        Raises:
            ValueError: an unknown field name (the message lists the valid ones) or an invalid value.
        """
        family = overrides.get("family", self.family)
        components = overrides.get("components", self.components)
        fields, options = _split(overrides, family, components)
        if isinstance(family, str) and isinstance(components, (tuple, list)):
            foreign = [k for k in fields if k not in _settings(family, components) and k != "options"]
            if foreign:
                raise ValueError(
                    f"{foreign} are not settings of method family {family!r}{_with(components)}; its settings: "
                    f"{', '.join(_settings(family, components))}"
                )
        if "options" not in fields and (options or family != self.family or "components" in fields):
            own = _option_names(family, components) if isinstance(components, (tuple, list)) else set()
            kept = {k: v for k, v in self.options.items() if k in own} if family == self.family else {}
            fields["options"] = {**kept, **options}
        return dataclasses.replace(self, **fields)

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
        """Plain-python view of the configuration (str, bool, float and ``None`` values; the family's
        :attr:`options` appear as entries of their own)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        data["components"] = list(self.components)
        data["ad_maps"] = "+".join(self.ad_maps)  # a str, as every other value
        return {**data, **self.options}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MethodConfig:
        """Build a configuration from :meth:`to_dict` output.

        Raises:
            TypeError: ``data`` is not a mapping.
            ValueError: unknown or missing fields, or invalid values.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"data must be a mapping, got {type(data).__name__}")
        fields, options = _split(data, data.get("family", "caf"), data.get("components", ()))
        # Fields added after format 1 was defined: older checkpoints lack them and get the values they were
        # trained with (the 0.1 behaviour), not today's defaults.
        legacy = {
            "caf_inner_channels": None,
            "ad_balance": None,
            "gamma_max": None,
            "gamma_on_new": True,
            "ad_on_new": True,
            "ad_maps": ("z", "h"),
            "ad_balance_on": "features",
            "ad_balance_every": 1,
            "bn": "train",
            "dropout": "train",
            "fusion_dropout": 0.0,
            "family": "caf",
            "components": (),
        }
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in fields and f.name not in legacy and f.name != "options"
        ]
        if missing:
            raise ValueError(f"method configuration is missing fields {missing}")
        return cls(**{**{k: v for k, v in legacy.items() if k not in fields}, **fields, "options": options})


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(MethodConfig)}


def _settings(family: str, components: Any = ()) -> list[str]:
    """The fields and options a configuration of ``family`` with ``components`` may set."""
    cls = get_family(family)
    parts = [get_component(name) for name in components]
    reads = set(cls.fields).union(*(p.fields for p in parts))
    return [*COMMON_FIELDS, *(k for k in CAF_FIELDS if k in reads), *_option_names(family, components)]


def _option_names(family: str, components: Any) -> list[str]:
    names = list(get_family(family).options)
    for name in components:
        names += [k for k in get_component(name).options if k not in names]
    return names


def _with(components: Any) -> str:
    return f" with components {list(components)}" if components else ""


def _split(data: Mapping[str, Any], family: object, components: object = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """``data`` split into fields of :class:`MethodConfig` and options of ``family`` and ``components``;
    anything else raises."""
    valid = [f.name for f in dataclasses.fields(MethodConfig)]
    ok = isinstance(family, str) and isinstance(components, (tuple, list))
    own = _option_names(family, components) if ok else []  # type: ignore[arg-type]
    unknown = [k for k in data if k not in valid and k not in own]
    if unknown:
        names = ", ".join([*valid, *own])
        raise ValueError(f"unknown method configuration fields {unknown}; valid fields: {names}")
    fields = {k: v for k, v in data.items() if k in valid}
    if isinstance(fields.get("components"), list):
        fields["components"] = tuple(fields["components"])
    return fields, {k: v for k, v in data.items() if k not in valid}


METHODS: Mapping[str, MethodConfig] = PresetView()
"""Named method presets (read-only): ``ft``, ``joint``, ``lwf``, ``mib``, ``caf`` (the default recipe),
``caf-paper`` (eq. 1-13 with the paper's fixed weights), ``caf-release`` (the authors' public code), ``plop``
(PLOP, Douillard et al. 2021) and the ablations ``baseline``, ``baseline+kd``, ``baseline+bkd``, ``baseline+ad``,
``baseline+ad+bkd``, ``baseline+caf``, ``baseline+caf+bkd``, ``baseline+caf+ad`` (Table III) and ``baseline+fd``,
``baseline+ad_sp``, ``baseline+ad_ch`` (Table VI). ``joint`` equals ``ft``: train it on ``scenario.joint()``.
Each method family registers its presets in its own file of :mod:`incseg.methods`; add yours with
:func:`incseg.methods.register_preset`."""
