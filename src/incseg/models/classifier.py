"""The growing 1x1 classifier of incremental segmentation (one head per learning step)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from incseg._checks import check_feature_map

__all__ = ["IncrementalClassifier"]

_HEAD_KEY = re.compile(r"^heads\.(\d+)\.weight$")


def _check_count(n: object, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return n


class IncrementalClassifier(nn.Module):
    """Classifier that grows by one 1x1 convolution (with bias) per incremental learning step.

    The logits are the concatenation of the heads' outputs in step order, so old classes come first and the
    new classes of the latest step last (the incremental index space of incseg, background at index 0 of the
    first head). :meth:`add_classes` appends a head for the classes ``U_l`` of a new step and initialises it
    as MiB does (PROTOCOL.md, "New-class init"): the new rows copy the background row and every new bias,
    and the background bias, become ``b_bg - log(|U_l| + 1)``. At initialisation the probability the old
    model gave to the background is then shared equally between the background and the new classes, and
    every old-class probability is unchanged.

    Args:
        in_channels: channels ``C`` of the refined features ``h``.
        classes_per_step: number of classes learnt at each step so far (step 0 includes the background).

    Shape:
        - Input: ``(B, C, H, W)``.
        - Output: ``(B, K, H, W)`` with ``K = sum(classes_per_step)``.

    Raises:
        TypeError: non-integer ``in_channels`` or class counts.
        ValueError: ``in_channels < 1``, empty ``classes_per_step`` or a count ``< 1``.

    Example:
        >>> import torch
        >>> clf = IncrementalClassifier(8, [16])
        >>> new_params = clf.add_classes(5)
        >>> clf(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 21, 4, 4])
        >>> clf.classes_per_step
        [16, 5]
    """

    def __init__(self, in_channels: int, classes_per_step: Sequence[int]) -> None:
        super().__init__()
        self.in_channels = _check_count(in_channels, "in_channels")
        if isinstance(classes_per_step, (str, bytes)) or not isinstance(classes_per_step, Sequence):
            raise TypeError(f"classes_per_step must be a sequence of ints, got {type(classes_per_step).__name__}")
        if len(classes_per_step) == 0:
            raise ValueError("classes_per_step must list at least one step (step 0 includes the background)")
        counts = [_check_count(n, f"classes_per_step[{i}]") for i, n in enumerate(classes_per_step)]
        self.heads = nn.ModuleList(nn.Conv2d(self.in_channels, n, kernel_size=1, bias=True) for n in counts)

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
        """The 1x1 convolution of learning step ``step`` (``self.heads[step]``, typed).

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
            Logits ``(B, K, H, W)``, old classes first.

        Raises:
            TypeError: ``h`` is not a floating tensor.
            ValueError: ``h`` is not 4-dimensional or has the wrong number of channels.
        """
        check_feature_map(h, "features", channels=self.in_channels)
        return torch.cat([head(h) for head in self.heads], dim=1)

    def add_classes(self, n: int, *, init: Literal["mib", "random"] = "mib") -> list[nn.Parameter]:
        """Append a head for ``n`` new classes (a new learning step).

        With ``init="mib"`` (default) the new weights copy the background row ``w_bg`` and the new biases and
        the background bias are set to ``b_bg - log(n + 1)`` (MiB initialisation, PROTOCOL.md); with
        ``init="random"`` the head keeps PyTorch's default convolution initialisation. The new head is
        created on the device and dtype of the existing heads.

        Args:
            n: number of new classes ``|U_l|``.
            init: ``"mib"`` or ``"random"``.

        Returns:
            The new parameters (weight, bias), to be given to the optimizer. The optimizer must be rebuilt
            (or given a new parameter group) since the model now has more parameters.

        Raises:
            TypeError: ``n`` is not an int.
            ValueError: ``n < 1`` or unknown ``init``.
        """
        n = _check_count(n, "n")
        if init not in ("mib", "random"):
            raise ValueError(f"init must be 'mib' or 'random', got {init!r}")
        bg = self.head(0)
        head = nn.Conv2d(self.in_channels, n, kernel_size=1, bias=True).to(
            device=bg.weight.device, dtype=bg.weight.dtype
        )
        if init == "mib":
            assert bg.bias is not None and head.bias is not None
            with torch.no_grad():
                new_bias = bg.bias[0] - math.log(n + 1)
                head.weight.copy_(bg.weight[0:1].expand_as(head.weight))
                head.bias.copy_(new_bias.expand_as(head.bias))
                bg.bias[0] = new_bias
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

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, classes_per_step={self.classes_per_step}"
