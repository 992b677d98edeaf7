"""Presets that compose a family with components (:attr:`MethodConfig.components`).

- ``plop+caf`` / ``dkd+caf``: PLOP / DKD with CAF's fusion module and attentive distillation (the ``caf``
  recipe's settings);
- ``mib+ewf`` / ``plop+ewf``: MiB / PLOP with endpoints weight fusion after every step;
- ``mib-m`` / ``plop-m`` / ``dkd-m``: MiB / PLOP / DKD with class-balanced replay of 100 images (the "-M"
  protocol of SSUL-M and DKD-M).
"""

from __future__ import annotations

from typing import Any

from incseg.methods.config import METHODS
from incseg.methods.registry import get_component, register_preset

CAF_BLOCKS = ("caf-fusion", "attentive-distillation")
"""The components that put CAF (its fusion module and attentive distillation) on another family."""

for _base in ("mib", "plop"):  # EWF's release applies it to MiB and PLOP
    register_preset(METHODS[_base].replace(name=f"{_base}+ewf", components=("ewf",)))
    register_preset(METHODS[_base].replace(name=f"{_base}-m", components=("replay",)))


def caf_blocks_settings() -> dict[str, Any]:
    """The settings of :data:`CAF_BLOCKS` in the ``caf`` recipe (attention, λ_AD and its gradient balance, fusion
    dropout, test strategy, ...), to give another family CAF's blocks as the recipe configures them."""
    recipe = METHODS["caf"]
    names = sorted(set().union(*(get_component(c).fields for c in CAF_BLOCKS)))
    return {"components": CAF_BLOCKS, "dropout": recipe.dropout, **{k: getattr(recipe, k) for k in names}}


register_preset(METHODS["plop"].replace(name="plop+caf", **caf_blocks_settings()))
register_preset(METHODS["dkd"].replace(name="dkd+caf", **caf_blocks_settings()))
register_preset(METHODS["dkd"].replace(name="dkd-m", components=("replay",)))  # DKD-M: 100 images on VOC
