"""The encoder-refiner-classifier segmentation network every incseg method works on."""

from __future__ import annotations

from torch import Tensor, nn

from incseg.models.classifier import IncrementalClassifier

__all__ = ["IncrementalSegmenter"]


def _check_channels(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class IncrementalSegmenter(nn.Module):
    """Segmentation network split as in the paper (Sec. III, Fig. 2): encoder, refiner and classifier.

    ``z = encoder(x)`` are the convolutional features, ``z_bar = fusion(z, z_old)`` the features after the
    continual attentive fusion (eq. 1-4; ``z_bar = z`` while :attr:`fusion` is ``None``), ``h = refiner(z_bar)``
    the refined features and ``logits = classifier(h)``. The attentive distillation (eq. 5-8) uses ``z_bar``
    and ``h``; the output losses use the logits. Logits are returned at feature resolution: losses and
    metrics upsample them to the label size.

    Args:
        encoder: module mapping images ``(B, C_in, H, W)`` to ``z`` ``(B, z_channels, h, w)``.
        refiner: module mapping ``z_bar`` to ``h`` ``(B, h_channels, h, w)`` (e.g. ASPP).
        classifier: the growing :class:`IncrementalClassifier` on ``h``.
        z_channels: channels of ``z``.
        h_channels: channels of ``h``; must equal ``classifier.in_channels``.
        in_channels: channels of the input images; when given, inputs are checked against it.

    Attributes:
        fusion: ``None`` or a module called as ``fusion(z, z_old)`` between encoder and refiner (the
            learner inserts :class:`~incseg.nn.ContinualAttentiveFusion` here from step 1 on).

    Shape:
        - Input: ``(B, C_in, H, W)`` or an unbatched ``(C_in, H, W)`` (then outputs are unbatched too).
        - Output: ``(B, K, h, w)`` logits at the resolution of the encoder features.

    Raises:
        TypeError: the parts are not modules, the classifier is not an :class:`IncrementalClassifier`, or a
            channel count is not an int.
        ValueError: a channel count is ``< 1`` or ``h_channels != classifier.in_channels``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> enc = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        >>> ref = nn.Conv2d(8, 4, 1)
        >>> model = IncrementalSegmenter(enc, ref, IncrementalClassifier(4, [3]), z_channels=8, h_channels=4)
        >>> model(torch.randn(2, 3, 9, 11)).shape
        torch.Size([2, 3, 5, 6])
        >>> sorted(model.forward_features(torch.randn(1, 3, 8, 8)))
        ['h', 'logits', 'z', 'z_bar']
    """

    fusion: nn.Module | None

    def __init__(
        self,
        encoder: nn.Module,
        refiner: nn.Module,
        classifier: IncrementalClassifier,
        *,
        z_channels: int,
        h_channels: int,
        in_channels: int | None = None,
    ) -> None:
        super().__init__()
        for name, part in (("encoder", encoder), ("refiner", refiner)):
            if not isinstance(part, nn.Module):
                raise TypeError(f"{name} must be an nn.Module, got {type(part).__name__}")
        if not isinstance(classifier, IncrementalClassifier):
            raise TypeError(
                "classifier must be an IncrementalClassifier (use incseg.models.from_named_submodules to convert "
                f"a 1x1 nn.Conv2d), got {type(classifier).__name__}"
            )
        self.z_channels = _check_channels(z_channels, "z_channels")
        self.h_channels = _check_channels(h_channels, "h_channels")
        self.in_channels = None if in_channels is None else _check_channels(in_channels, "in_channels")
        if classifier.in_channels != self.h_channels:
            raise ValueError(
                f"classifier.in_channels ({classifier.in_channels}) must equal h_channels ({self.h_channels})"
            )
        self.encoder = encoder
        self.register_module("fusion", None)
        self.refiner = refiner
        self.classifier = classifier

    @property
    def num_classes(self) -> int:
        """Number of classes ``K`` the classifier currently predicts (background included)."""
        return self.classifier.num_classes

    def _check_input(self, x: object) -> tuple[Tensor, bool]:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
        if x.ndim not in (3, 4):
            raise ValueError(
                f"x must have shape (B, C, H, W) or (C, H, W), got {x.ndim} dims with shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor (normalised images), got dtype {x.dtype}")
        unbatched = x.ndim == 3
        if unbatched:
            x = x.unsqueeze(0)
        if self.in_channels is not None and x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have {self.in_channels} channels, got shape {tuple(x.shape)} with {x.shape[1]} channels"
            )
        return x, unbatched

    def _check_output(self, t: object, part: str, name: str, channels: int) -> Tensor:
        if not isinstance(t, Tensor) or t.ndim != 4:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"the {part} must return a (B, C, h, w) tensor, got {shape}")
        if t.shape[1] != channels:
            raise ValueError(
                f"the {part} returned {t.shape[1]} channels (shape {tuple(t.shape)}) but {name}={channels}"
            )
        return t

    def forward_features(self, x: Tensor, z_old: Tensor | None = None) -> dict[str, Tensor]:
        """Run the network and return every intermediate feature the losses need.

        Args:
            x: images ``(B, C_in, H, W)`` (or ``(C_in, H, W)``).
            z_old: encoder features of the old model ``(B, z_channels, h, w)``, passed to :attr:`fusion`
                (ignored when :attr:`fusion` is ``None``).

        Returns:
            ``{"z": z, "z_bar": z_bar, "h": h, "logits": logits}``; ``z_bar`` is ``z`` itself when there is
            no fusion module.

        Raises:
            TypeError: ``x`` is not a floating tensor.
            ValueError: wrong rank or channel count of ``x``, or a part returns features whose channel count
                disagrees with ``z_channels`` / ``h_channels``.
        """
        x, unbatched = self._check_input(x)
        if unbatched and z_old is not None and z_old.ndim == 3:
            z_old = z_old.unsqueeze(0)
        z = self._check_output(self.encoder(x), "encoder", "z_channels", self.z_channels)
        z_bar = z if self.fusion is None else self.fusion(z, z_old)
        h = self._check_output(self.refiner(z_bar), "refiner", "h_channels", self.h_channels)
        logits = self.classifier(h)
        out = {"z": z, "z_bar": z_bar, "h": h, "logits": logits}
        if unbatched:
            out = {k: v.squeeze(0) for k, v in out.items()}
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Compute logits ``(B, K, h, w)`` at feature resolution (see :meth:`forward_features`)."""
        return self.forward_features(x)["logits"]

    def extra_repr(self) -> str:
        return f"z_channels={self.z_channels}, h_channels={self.h_channels}, num_classes={self.num_classes}"
