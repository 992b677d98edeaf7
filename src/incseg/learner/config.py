"""Compatibility module: the method configuration lives in :mod:`incseg.methods.config`."""

from incseg.methods.config import METHOD_DESCRIPTIONS, METHODS, MethodConfig

__all__ = ["METHODS", "METHOD_DESCRIPTIONS", "MethodConfig"]
