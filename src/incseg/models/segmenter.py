"""The encoder-refiner-classifier segmentation network every incseg method works on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeAlias

from torch import Tensor, nn

from incseg.models.classifier import IncrementalClassifier

__all__ = ["IncrementalSegmenter", "Level"]

Level: TypeAlias = int | str
"""A level of a multi-scale encoder's output: an index into its list/tuple or a key of its dict."""

CafLevels: TypeAlias = Level | Sequence[Level] | Literal["all"] | None


def _check_channels(value: object, name: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _level_channels(z_channels: object) -> dict[Level, int | None] | None:
    """Channels per level of a multi-scale ``z_channels`` (``None`` for a single-tensor encoder)."""
    if isinstance(z_channels, Mapping):
        levels: list[tuple[Level, object]] = []
        for key, value in z_channels.items():
            if not isinstance(key, str):
                raise TypeError(f"z_channels keys must be str (the keys of the encoder's dict), got {key!r}")
            levels.append((key, value))
    elif isinstance(z_channels, Sequence) and not isinstance(z_channels, (str, bytes)):
        levels = list(enumerate(z_channels))
    else:
        return None
    if not levels:
        raise ValueError("z_channels must describe at least one level")
    return {
        level: None if value is None else _check_channels(value, f"z_channels[{level!r}]", minimum=0)
        for level, value in levels
    }


def _resolve_caf_levels(caf_levels: object, channels: dict[Level, int | None]) -> tuple[Level, ...]:
    usable = [level for level, c in channels.items() if c]  # feature maps with at least one channel
    if not usable:
        raise ValueError(f"no encoder level has feature maps with channels > 0: z_channels={channels}")
    if caf_levels is None:
        return (usable[-1],)
    if caf_levels == "all":
        return tuple(usable)
    requested = [caf_levels] if isinstance(caf_levels, (int, str)) else caf_levels
    if not isinstance(requested, Sequence) or isinstance(requested, bytes) or not requested:
        raise TypeError(f'caf_levels must be None, "all", a level or a non-empty list of levels, got {caf_levels!r}')
    resolved: list[Level] = []
    for level in requested:
        key = level
        if isinstance(level, int) and not isinstance(level, bool) and isinstance(next(iter(channels)), int):
            key = level + len(channels) if level < 0 else level
        if key not in channels or not channels[key]:
            raise ValueError(
                f"caf_levels entry {level!r} is not a level with feature maps; the levels with channels are {usable} "
                f"(z_channels={channels})"
            )
        if key not in resolved:
            resolved.append(key)
    return tuple(resolved)


def _map_tensors(obj: Any, fn: Any) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        items = [(k, _map_tensors(v, fn)) for k, v in obj.items()]
        return type(obj)(items) if isinstance(obj, dict) else dict(items)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


class IncrementalSegmenter(nn.Module):
    """Segmentation network split as in the paper (Sec. III, Fig. 2): encoder, refiner and classifier.

    ``z = encoder(x)`` are the convolutional features, ``z_bar = fusion(z, z_old)`` the features after the
    continual attentive fusion (eq. 1-4; ``z_bar = z`` while :attr:`fusion` is ``None``), ``h = refiner(z_bar)``
    the refined features and ``logits = classifier(h)``. The attentive distillation (eq. 5-8) uses ``z_bar``
    and ``h``; the output losses use the logits. Logits are returned at the classifier's resolution (feature
    resolution, times the classifier's ``upsampling``): losses and metrics upsample them to the label size.

    **Multi-scale encoders.** The encoder may also return a list/tuple or a dict of feature maps (U-Net, FPN,
    DeepLabV3+, SegFormer, ... : the smp contract, features from fine to coarse); ``z_channels`` then gives the
    channels of every level in the same structure (``None`` for an entry that is not a feature map, e.g. a
    token tensor, passed through unchecked; ``0`` for an empty level). ``caf_levels`` chooses the levels the
    fusion and the attentive distillation see: the deepest level with channels (default), a level or a list
    of levels (indices, negative ones allowed, or dict keys), or ``"all"`` (every level with channels). The
    refiner receives the encoder's structure (same type, same levels) with the chosen levels replaced by
    their fused ``z_bar``; the other levels reach it unchanged.

    Args:
        encoder: module mapping images ``(B, C_in, H, W)`` to ``z``: a ``(B, z_channels, h, w)`` tensor, or a
            list/tuple/dict of feature maps.
        refiner: module mapping ``z_bar`` (same structure as the encoder's output) to ``h``
            ``(B, h_channels, h, w)`` (e.g. ASPP, a U-Net/FPN decoder).
        classifier: the growing :class:`IncrementalClassifier` on ``h``.
        z_channels: channels of ``z``: an int for a tensor encoder, a sequence of ints (list/tuple encoder)
            or a mapping key -> int (dict encoder) for a multi-scale one.
        h_channels: channels of ``h``; must equal ``classifier.in_channels``.
        in_channels: channels of the input images; when given, inputs are checked against it.
        caf_levels: multi-scale encoders only: ``None`` (deepest level), a level, a list of levels or ``"all"``.

    Attributes:
        fusion: ``None`` or the fusion between encoder and refiner (the learner inserts
            :class:`~incseg.nn.ContinualAttentiveFusion` here from step 1 on): a module called as
            ``fusion(z, z_old)`` for a tensor encoder, an ``nn.ModuleDict`` mapping ``str(level)`` to such a
            module for a multi-scale one.
        levels: the levels of a multi-scale encoder's output (``None`` for a tensor encoder).
        caf_levels: the resolved levels CAF and attentive distillation see (``None`` for a tensor encoder).

    Shape:
        - Input: ``(B, C_in, H, W)`` or an unbatched ``(C_in, H, W)`` (then outputs are unbatched too).
        - Output: ``(B, K, h, w)`` logits at the classifier's resolution.

    Raises:
        TypeError: the parts are not modules, the classifier is not an :class:`IncrementalClassifier`, or a
            channel count is not an int.
        ValueError: a channel count is ``< 1`` (``< 0`` for a level of a multi-scale encoder),
            ``h_channels != classifier.in_channels``, or ``caf_levels`` names no level with channels.

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

        A two-level encoder returning a list, CAF on both levels:

        >>> class TwoLevels(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fine, self.coarse = nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(4, 8, 3, 2, 1)
        ...     def forward(self, x):
        ...         fine = self.fine(x)
        ...         return [fine, self.coarse(fine)]
        >>> class Decoder(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv = nn.Conv2d(12, 4, 1)
        ...     def forward(self, feats):
        ...         up = nn.functional.interpolate(feats[1], size=feats[0].shape[-2:])
        ...         return self.conv(torch.cat([feats[0], up], 1))
        >>> model = IncrementalSegmenter(TwoLevels(), Decoder(), IncrementalClassifier(4, [3]),
        ...                              z_channels=[4, 8], h_channels=4, caf_levels="all")
        >>> out = model.forward_features(torch.randn(2, 3, 16, 16))
        >>> model.caf_levels, {level: tuple(z.shape) for level, z in out["z"].items()}
        ((0, 1), {0: (2, 4, 8, 8), 1: (2, 8, 4, 4)})
        >>> type(out["features"]).__name__, out["logits"].shape
        ('list', torch.Size([2, 3, 8, 8]))
    """

    fusion: nn.Module | None

    def __init__(
        self,
        encoder: nn.Module,
        refiner: nn.Module,
        classifier: IncrementalClassifier,
        *,
        z_channels: int | Sequence[int | None] | Mapping[str, int | None],
        h_channels: int,
        in_channels: int | None = None,
        caf_levels: CafLevels = None,
    ) -> None:
        super().__init__()
        for name, part in (("encoder", encoder), ("refiner", refiner)):
            if not isinstance(part, nn.Module):
                raise TypeError(f"{name} must be an nn.Module, got {type(part).__name__}")
        if not isinstance(classifier, IncrementalClassifier):
            raise TypeError(
                "classifier must be an IncrementalClassifier (use incseg.models.classifier_from_conv to convert "
                f"a nn.Conv2d), got {type(classifier).__name__}"
            )
        channels = _level_channels(z_channels)
        self.levels: tuple[Level, ...] | None
        self.caf_levels: tuple[Level, ...] | None
        self.z_channels: Any
        if channels is None:
            if caf_levels is not None:
                raise ValueError(
                    f"caf_levels={caf_levels!r} needs a multi-scale encoder (z_channels a list or dict of channel "
                    f"counts), got z_channels={z_channels!r}"
                )
            self.z_channels = _check_channels(z_channels, "z_channels")
            self.levels = self.caf_levels = None
        else:
            self.levels = tuple(channels)
            self.caf_levels = _resolve_caf_levels(caf_levels, channels)
            is_dict = isinstance(z_channels, Mapping)
            self.z_channels = dict(channels) if is_dict else tuple(channels.values())
        self._level_channels = channels
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

    @property
    def caf_channels(self) -> int | dict[str, int]:
        """Channels of the features CAF and attentive distillation see.

        ``z_channels`` for a tensor encoder; ``{str(level): channels}`` over :attr:`caf_levels` for a
        multi-scale one (the keys of a fusion ``nn.ModuleDict``).
        """
        if self._level_channels is None or self.caf_levels is None:
            return int(self.z_channels)
        return {str(level): int(self._level_channels[level] or 0) for level in self.caf_levels}

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
            hint = (
                " (for an encoder returning a list, tuple or dict of feature maps, pass z_channels as a list or dict "
                "of channel counts)"
                if part == "encoder" and isinstance(t, (list, tuple, Mapping))
                else ""
            )
            raise ValueError(f"the {part} must return a (B, C, h, w) tensor, got {shape}{hint}")
        if t.shape[1] != channels:
            raise ValueError(
                f"the {part} returned {t.shape[1]} channels (shape {tuple(t.shape)}) but {name}={channels}"
            )
        return t

    def _check_levels(self, feats: Any) -> Any:
        channels = self._level_channels
        assert channels is not None
        if isinstance(next(iter(channels)), str):
            if not isinstance(feats, Mapping) or set(feats) != set(channels):
                got = list(feats) if isinstance(feats, Mapping) else type(feats).__name__
                raise ValueError(f"the encoder must return a dict with the keys {list(channels)}, got {got}")
        elif not isinstance(feats, (list, tuple)) or len(feats) != len(channels):
            got = f"{len(feats)} levels" if isinstance(feats, (list, tuple)) else type(feats).__name__
            raise ValueError(f"the encoder must return a list or tuple of {len(channels)} feature maps, got {got}")
        for level, c in channels.items():
            if c is not None:
                self._check_output(feats[level], "encoder", f"z_channels[{level!r}]", c)
        return feats

    def _fuse(self, z: dict[Level, Tensor], z_old: object) -> dict[Level, Tensor]:
        fusion = self.fusion
        if fusion is None:
            return dict(z)
        if not isinstance(fusion, nn.ModuleDict):
            raise TypeError(
                "for a multi-scale encoder, fusion must be an nn.ModuleDict mapping str(level) to a fusion module "
                f"for each of caf_levels={self.caf_levels}, got {type(fusion).__name__}"
            )
        if z_old is not None and not isinstance(z_old, Mapping):
            raise TypeError(
                f"z_old must be a dict level -> tensor (the old model's forward_features()['z']) for a multi-scale "
                f"encoder, got {type(z_old).__name__}"
            )
        out = {}
        for level, feature in z.items():
            key = str(level)
            if key not in fusion:
                raise ValueError(f"fusion has no module for level {level!r}; its keys are {list(fusion.keys())}")
            out[level] = fusion[key](feature, None if z_old is None else z_old[level])
        return out

    def forward_features(self, x: Tensor, z_old: Tensor | Mapping[Level, Tensor] | None = None) -> dict[str, Any]:
        """Run the network and return every intermediate feature the losses need.

        Args:
            x: images ``(B, C_in, H, W)`` (or ``(C_in, H, W)``).
            z_old: encoder features of the old model (its ``forward_features(x)["z"]``), passed to
                :attr:`fusion` (ignored when :attr:`fusion` is ``None``): a ``(B, z_channels, h, w)`` tensor, or
                for a multi-scale encoder a dict level -> tensor over :attr:`caf_levels`.

        Returns:
            ``{"z": z, "z_bar": z_bar, "h": h, "logits": logits}``; ``z_bar`` is ``z`` itself when there is
            no fusion module. For a multi-scale encoder ``z`` and ``z_bar`` are dicts level -> tensor over
            :attr:`caf_levels`, and ``"features"`` holds what the refiner received: the encoder's structure
            with the ``z_bar`` levels in place.

        Raises:
            TypeError: ``x`` is not a floating tensor.
            ValueError: wrong rank or channel count of ``x``, or a part returns features whose structure or
                channel count disagrees with ``z_channels`` / ``h_channels``.
        """
        x, unbatched = self._check_input(x)
        if unbatched and z_old is not None:
            z_old = _map_tensors(z_old, lambda t: t.unsqueeze(0) if t.ndim == 3 else t)
        out: dict[str, Any]
        if self.caf_levels is None:
            z = self._check_output(self.encoder(x), "encoder", "z_channels", self.z_channels)
            z_bar = z if self.fusion is None else self.fusion(z, z_old)
            h = self._check_output(self.refiner(z_bar), "refiner", "h_channels", self.h_channels)
            out = {"z": z, "z_bar": z_bar, "h": h, "logits": self.classifier(h)}
        else:
            feats = self._check_levels(self.encoder(x))
            zs = {level: feats[level] for level in self.caf_levels}
            if self.fusion is None:
                fused = zs
                refiner_input = feats
            else:
                fused = self._fuse(zs, z_old)
                refiner_input = _replace_levels(feats, fused)
            h = self._check_output(self.refiner(refiner_input), "refiner", "h_channels", self.h_channels)
            out = {"z": zs, "z_bar": fused, "h": h, "logits": self.classifier(h), "features": refiner_input}
        if unbatched:
            out = _map_tensors(out, lambda t: t.squeeze(0))
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Compute logits ``(B, K, h, w)`` at the classifier's resolution (see :meth:`forward_features`)."""
        logits: Tensor = self.forward_features(x)["logits"]
        return logits

    def extra_repr(self) -> str:
        levels = "" if self.caf_levels is None else f", caf_levels={self.caf_levels}"
        return f"z_channels={self.z_channels}, h_channels={self.h_channels}, num_classes={self.num_classes}{levels}"


def _replace_levels(feats: Any, fused: Mapping[Level, Tensor]) -> Any:
    """``feats`` (list, tuple or dict, same type) with the levels of ``fused`` replaced."""
    if isinstance(feats, Mapping):
        merged = {**feats, **fused}
        return type(feats)(merged.items()) if isinstance(feats, dict) else merged
    items = list(feats)
    for level, value in fused.items():
        items[int(level)] = value
    return items if isinstance(feats, list) else type(feats)(items)
