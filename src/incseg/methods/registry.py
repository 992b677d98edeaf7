"""The registry of method families (plugin classes) and of named presets (method configurations).

A *family* is a :class:`~incseg.methods.Method` subclass (``"caf"`` covers fine-tuning, LwF, MiB, CAF and its
ablations; ``"plop"`` is PLOP); a *preset* is a named :class:`~incseg.methods.MethodConfig` of a family
(``"mib"``, ``"caf"``, ``"plop"``, ...). The built-in families register themselves when :mod:`incseg.methods`
is imported; :data:`incseg.methods.METHODS` is a read-only view of the presets.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from incseg.methods.base import Method
    from incseg.methods.components import Component
    from incseg.methods.config import MethodConfig

__all__ = [
    "PresetView",
    "get_component",
    "get_family",
    "register_component",
    "register_method",
    "register_preset",
    "unregister_preset",
]

_FAMILIES: dict[str, type[Method]] = {}
_COMPONENTS: dict[str, type[Component]] = {}
_PRESETS: dict[str, MethodConfig] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Register a method family (usable as a class decorator); its :attr:`~Method.family` is the key.

    Raises:
        TypeError: ``cls`` is not a :class:`~incseg.methods.Method` subclass.
        ValueError: the family name is empty or already taken by a class of another name.
    """
    from incseg.methods.base import Method

    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register_method expects a subclass of incseg.methods.Method, got {cls!r}")
    name = cls.family
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__}.family must be a non-empty str, got {name!r}")
    previous = _FAMILIES.get(name)
    # Re-running the code that defines a class (a notebook cell, a documentation page) registers it again: fine.
    rerun = previous is not None and previous.__qualname__ == cls.__qualname__
    if previous is not None and previous is not cls and not rerun:
        raise ValueError(f"method family {name!r} is already registered by {previous.__name__}")
    _FAMILIES[name] = cls
    return cls


def get_family(name: str) -> type[Method]:
    """The method family registered under ``name``.

    Raises:
        ValueError: no such family (the message lists the registered ones).
    """
    if not isinstance(name, str) or name not in _FAMILIES:
        raise ValueError(f"family must be one of {sorted(_FAMILIES)}, got {name!r}")
    return _FAMILIES[name]


def register_component(cls: type[Component]) -> type[Component]:
    """Register a component class (usable as a decorator); its :attr:`~Component.name` is the key that
    ``MethodConfig(components=[...])`` names.

    Raises:
        TypeError: ``cls`` is not a :class:`Component` subclass.
        ValueError: empty name, or the name is taken by a class of another name.
    """
    from incseg.methods.components import Component

    if not (isinstance(cls, type) and issubclass(cls, Component)):
        raise TypeError(f"register_component expects a subclass of incseg.methods.Component, got {cls!r}")
    name = cls.name
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__}.name must be a non-empty str, got {name!r}")
    previous = _COMPONENTS.get(name)
    if previous is not None and previous is not cls and previous.__qualname__ != cls.__qualname__:
        raise ValueError(f"component {name!r} is already registered by {previous.__name__}")
    _COMPONENTS[name] = cls
    return cls


def get_component(name: str) -> type[Component]:
    """The component class registered under ``name``.

    Raises:
        ValueError: no such component (the message lists the registered ones).
    """
    if not isinstance(name, str) or name not in _COMPONENTS:
        raise ValueError(f"component must be one of {sorted(_COMPONENTS)}, got {name!r}")
    return _COMPONENTS[name]


def register_preset(config: MethodConfig, *, replace: bool = False) -> MethodConfig:
    """Register ``config`` as the named method ``config.name`` (then ``IncrementalLearner(model, scenario,
    config.name)`` and ``MethodConfig.preset(config.name)`` find it).

    Raises:
        TypeError: ``config`` is not a :class:`~incseg.methods.MethodConfig`.
        ValueError: the name is taken (pass ``replace=True`` to replace a preset registered by you).
    """
    from incseg.methods.config import MethodConfig

    if not isinstance(config, MethodConfig):
        raise TypeError(f"register_preset expects a MethodConfig, got {type(config).__name__}")
    if config.name in _PRESETS and not replace:
        raise ValueError(f"a method named {config.name!r} is already registered; pass replace=True to replace it")
    _PRESETS[config.name] = config
    return config


def unregister_preset(name: str) -> None:
    """Remove a preset registered with :func:`register_preset` (e.g. at the end of a test).

    Raises:
        ValueError: no preset of that name.
    """
    if name not in _PRESETS:
        raise ValueError(f"no method named {name!r} is registered")
    del _PRESETS[name]


class PresetView(Mapping[str, "MethodConfig"]):
    """Read-only mapping name -> :class:`~incseg.methods.MethodConfig` over the registered presets."""

    def __getitem__(self, name: str) -> MethodConfig:
        return _PRESETS[name]

    def __iter__(self) -> Iterator[str]:
        return iter(list(_PRESETS))

    def __len__(self) -> int:
        return len(_PRESETS)

    def __contains__(self, name: Any) -> bool:
        return name in _PRESETS

    def __repr__(self) -> str:
        return f"PresetView({list(self)})"
