"""The growing classifier of incremental segmentation (one head per learning step)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from incseg._checks import check_feature_map, check_int

__all__ = ["IncrementalClassifier"]

_HEAD_KEY = re.compile(r"^heads\.(\d+)\.weight$")


class IncrementalClassifier(nn.Module):
    """Classifier that grows by one convolution (with bias) per incremental learning step.

    The logits are the concatenation of the heads' outputs in step order, so old classes come first and the
    new classes of the latest step last (the incremental index space of incseg, background at index 0 of the
    first head). :meth:`add_classes` appends a head for the classes ``U_l`` of a new step and initialises it
    as MiB does (PROTOCOL.md, "New-class init"): the new rows copy the background row and every new bias,
    and the background bias, become ``b_bg - log(|U_l| + 1)``. At initialisation the probability the old
    model gave to the background is then shared equally between the background and the new classes, and
    every old-class probability is unchanged.

    The heads are 1x1 convolutions by default; ``kernel_size`` gives ``k x k`` heads with ``k // 2`` zero
    padding (the 3x3 heads of segmentation_models_pytorch), for which the MiB initialisation copies the whole
    background kernel. ``upsampling > 1`` bilinearly upsamples the logits by that factor (with
    ``align_corners``), as the network the classifier was taken from did after its last convolution.

    Args:
        in_channels: channels ``C`` of the refined features ``h``.
        classes_per_step: number of classes learnt at each step so far (step 0 includes the background).
        kernel_size: odd kernel size ``k`` of every head (1 by default).
        upsampling: scale factor of the bilinear upsampling of the logits (1: none).
        align_corners: ``align_corners`` of that upsampling.

    Shape:
        - Input: ``(B, C, H, W)``.
        - Output: ``(B, K, H * upsampling, W * upsampling)`` with ``K = sum(classes_per_step)``.

    Raises:
        TypeError: non-integer ``in_channels``, class counts or ``kernel_size``.
        ValueError: ``in_channels < 1``, empty ``classes_per_step``, a count ``< 1``, an even or non-positive
            ``kernel_size``, or ``upsampling < 1``.

    Example:
        >>> import torch
        >>> clf = IncrementalClassifier(8, [16])
        >>> new_params = clf.add_classes(5)
        >>> clf(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 21, 4, 4])
        >>> clf.classes_per_step
        [16, 5]
    """

    def __init__(
        self,
        in_channels: int,
        classes_per_step: Sequence[int],
        *,
        kernel_size: int = 1,
        upsampling: float = 1,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = check_int(in_channels, "in_channels")
        self.kernel_size = check_int(kernel_size, "kernel_size")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (padding kernel_size // 2 keeps the size), got {kernel_size}")
        if isinstance(upsampling, bool) or not isinstance(upsampling, (int, float)) or not upsampling >= 1:
            raise ValueError(f"upsampling must be a number >= 1, got {upsampling!r}")
        self.upsampling = upsampling
        self.align_corners = bool(align_corners)
        if isinstance(classes_per_step, (str, bytes)) or not isinstance(classes_per_step, Sequence):
            raise TypeError(f"classes_per_step must be a sequence of ints, got {type(classes_per_step).__name__}")
        if len(classes_per_step) == 0:
            raise ValueError("classes_per_step must list at least one step (step 0 includes the background)")
        counts = [check_int(n, f"classes_per_step[{i}]") for i, n in enumerate(classes_per_step)]
        self.heads = nn.ModuleList(self._new_head(n) for n in counts)

    def _new_head(self, n: int) -> nn.Conv2d:
        k = self.kernel_size
        return nn.Conv2d(self.in_channels, n, kernel_size=k, padding=k // 2, bias=True)

    @property
    def classes_per_step(self) -> list[int]:
        """Number of classes added at each step (a fresh list)."""
        return [self.head(i).out_channels for i in range(len(self.heads))]

    @property
    def num_classes(self) -> int:
        """Total number of classes ``K`` (background included)."""
        return sum(self.classes_per_step)

    @property
    def num_steps(self) -> int:
        """Number of heads, i.e. learning steps seen so far."""
        return len(self.heads)

    def head(self, step: int) -> nn.Conv2d:
        """The convolution of learning step ``step`` (``self.heads[step]``, typed).

        Args:
            step: index of the step (negative indices count from the last step).

        Returns:
            The head's ``nn.Conv2d``; its output channels are the classes added at that step.

        Raises:
            IndexError: no such step.
        """
        return cast(nn.Conv2d, self.heads[step])

    def forward(self, h: Tensor) -> Tensor:
        """Compute the logits of all classes seen so far.

        Args:
            h: refined features ``(B, C, H, W)``.

        Returns:
            Logits ``(B, K, H, W)`` (times ``upsampling``), old classes first.

        Raises:
            TypeError: ``h`` is not a floating tensor.
            ValueError: ``h`` is not 4-dimensional or has the wrong number of channels.
        """
        check_feature_map(h, "features", channels=self.in_channels)
        logits = torch.cat([head(h) for head in self.heads], dim=1)
        if self.upsampling != 1:
            logits = F.interpolate(
                logits, scale_factor=self.upsampling, mode="bilinear", align_corners=self.align_corners
            )
        return logits

    def add_classes(
        self, n: int, *, init: Literal["mib", "random", "aux", "prior"] = "mib", prior: float = 0.01
    ) -> list[nn.Parameter]:
        """Append a head for ``n`` new classes (a new learning step).

        With ``init="mib"`` (default) the new weights copy the background row ``w_bg`` and the new biases and
        the background bias are set to ``b_bg - log(n + 1)`` (MiB initialisation, PROTOCOL.md); with
        ``init="aux"`` every new row copies the background row's weight and bias unchanged (DKD's
        initialisation from its auxiliary classifier, the background row of sigmoid classifiers); with
        ``init="prior"`` the new weights are 0 and the biases ``log(prior / (1 - prior))``, so that a sigmoid
        classifier starts at probability ``prior`` everywhere and sends no gradient to the features at its first
        update (the prior initialisation of sigmoid detectors); with ``init="random"`` the head keeps
        PyTorch's default convolution initialisation. The new head is created on the device and dtype of the
        existing heads.

        Args:
            n: number of new classes ``|U_l|``.
            init: ``"mib"``, ``"aux"``, ``"prior"`` or ``"random"``.
            prior: the probability of ``init="prior"``, in ``(0, 1)``.

        Returns:
            The new parameters (weight, bias), to be given to the optimizer. The optimizer must be rebuilt
            (or given a new parameter group) since the model now has more parameters.

        Raises:
            TypeError: ``n`` is not an int.
            ValueError: ``n < 1``, unknown ``init`` or ``prior`` outside ``(0, 1)``.
        """
        n = check_int(n, "n")
        if init not in ("mib", "random", "aux", "prior"):
            raise ValueError(f"init must be 'mib', 'aux', 'prior' or 'random', got {init!r}")
        if isinstance(prior, bool) or not isinstance(prior, (int, float)) or not 0 < prior < 1:
            raise ValueError(f"prior must be a probability in (0, 1), got {prior!r}")
        bg = self.head(0)
        head = self._new_head(n).to(device=bg.weight.device, dtype=bg.weight.dtype)
        if init == "mib":
            assert bg.bias is not None and head.bias is not None
            with torch.no_grad():
                new_bias = bg.bias[0] - math.log(n + 1)
                head.weight.copy_(bg.weight[0:1].expand_as(head.weight))
                head.bias.copy_(new_bias.expand_as(head.bias))
                bg.bias[0] = new_bias
        elif init == "aux":
            assert bg.bias is not None and head.bias is not None
            with torch.no_grad():
                head.weight.copy_(bg.weight[0:1].expand_as(head.weight))
                head.bias.copy_(bg.bias[0:1].expand_as(head.bias))
        elif init == "prior":
            assert head.bias is not None
            with torch.no_grad():
                head.weight.zero_()
                head.bias.fill_(math.log(prior / (1 - prior)))
        self.heads.append(head)
        return list(head.parameters())

    def freeze_old(self) -> None:
        """Stop gradients to every head but the latest.

        Note that MiB initialisation also writes the background bias, which lives in the first head; the
        protocol trains all heads, so this is an option, not the default.
        """
        for i in range(len(self.heads) - 1):
            self.heads[i].requires_grad_(False)

    @staticmethod
    def classes_per_step_from_state_dict(state_dict: Mapping[str, Any], prefix: str = "") -> list[int]:
        """Read the per-step class counts stored in a state dict.

        Use it to build a classifier (or to :meth:`add_classes` to one) with the structure of a checkpoint
        before :meth:`load_state_dict`.

        Args:
            state_dict: a state dict holding ``{prefix}heads.{i}.weight`` entries.
            prefix: key prefix of the classifier, e.g. ``"classifier."`` for a whole segmenter.

        Returns:
            The list of class counts per step.

        Raises:
            ValueError: no head found under ``prefix`` or the head indices are not ``0..T-1``.

        Example:
            >>> sd = IncrementalClassifier(4, [3, 2]).state_dict()
            >>> IncrementalClassifier.classes_per_step_from_state_dict(sd)
            [3, 2]
        """
        found: dict[int, int] = {}
        for key, value in state_dict.items():
            if not key.startswith(prefix):
                continue
            match = _HEAD_KEY.match(key[len(prefix) :])
            if match is not None:
                found[int(match.group(1))] = int(value.shape[0])
        if not found:
            raise ValueError(f"no classifier heads ('{prefix}heads.<i>.weight') found in the state dict")
        if sorted(found) != list(range(len(found))):
            raise ValueError(f"classifier head indices in the state dict are not contiguous: {sorted(found)}")
        return [found[i] for i in range(len(found))]

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        try:
            stored = self.classes_per_step_from_state_dict(state_dict, prefix)
        except ValueError:
            stored = None
        if stored is not None and stored != self.classes_per_step:
            error_msgs.append(
                f"IncrementalClassifier structure mismatch: the state dict holds classes_per_step={stored} "
                f"but this classifier has {self.classes_per_step}; build it with "
                f"IncrementalClassifier({self.in_channels}, {stored}) or call add_classes() for each missing "
                "step before loading (see IncrementalClassifier.classes_per_step_from_state_dict)"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def with_steps(self, classes_per_step: Sequence[int]) -> IncrementalClassifier:
        """A new classifier with these class counts and this one's kernel size, upsampling, device and dtype.

        Args:
            classes_per_step: class counts per step of the new classifier.

        Returns:
            A freshly initialised :class:`IncrementalClassifier` (weights not copied).

        Example:
            >>> IncrementalClassifier(8, [3], kernel_size=3).with_steps([3, 2]).head(1).kernel_size
            (3, 3)
        """
        clf = IncrementalClassifier(
            self.in_channels,
            classes_per_step,
            kernel_size=self.kernel_size,
            upsampling=self.upsampling,
            align_corners=self.align_corners,
        )
        weight = self.head(0).weight
        return clf.to(device=weight.device, dtype=weight.dtype)

    def extra_repr(self) -> str:
        text = f"in_channels={self.in_channels}, classes_per_step={self.classes_per_step}"
        if self.kernel_size != 1:
            text += f", kernel_size={self.kernel_size}"
        if self.upsampling != 1:
            text += f", upsampling={self.upsampling}, align_corners={self.align_corners}"
        return text
