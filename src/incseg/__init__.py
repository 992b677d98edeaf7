"""incseg: class-incremental semantic segmentation for PyTorch (Continual Attentive Fusion and friends)."""

from incseg._version import __version__

__all__ = ["__version__"]
