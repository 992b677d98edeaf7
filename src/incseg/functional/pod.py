"""PLOP's losses (Douillard et al., CVPR 2021): Local POD distillation and entropy-based pseudo-labels.

Local POD (eq. 2-4 of PLOP): every feature map ``f`` (``B x C x H x W``) is squared element-wise and cut, at
each scale ``s`` of a spatial pyramid (``1, 2, 4``), into ``s x s`` regions; each region ``r`` gives its
width-pooled and height-pooled slices ``mean_w f_r^2`` (``C x H_r``) and ``mean_h f_r^2`` (``C x W_r``). The
embedding ``Φ(f)`` concatenates all slices of all regions and scales. The distillation of one map is the L2
distance ``||Φ(f) - Φ(f_old)||_2`` per image, averaged over the batch.

Pseudo-labels (Sec. 3.2): background pixels of the current labels get the old model's prediction ``argmax p``
when its normalised entropy ``H(p) / log C`` is below the threshold of the predicted class, and are ignored
otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from incseg._checks import check_feature_map, check_logits
from incseg.functional._common import check_batch, resize_to, upcast

__all__ = [
    "collapse_new_classes",
    "entropy_pseudo_labels",
    "local_pod",
    "local_pod_distance",
    "normalized_entropy",
]


def _check_scales(scales: Sequence[int]) -> tuple[int, ...]:
    out = tuple(scales)
    if not out or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in out):
        raise ValueError(f"scales must be a non-empty sequence of ints >= 1, got {scales!r}")
    return out


def local_pod(x: Tensor, scales: Sequence[int] = (1, 2, 4)) -> Tensor:
    """Local POD embedding ``Φ(x)`` of a feature map (squared first, as PLOP's ``pow`` pre-processing).

    At scale ``s`` the map is cut into ``s x s`` regions with row bounds ``floor(i H / s)`` and column bounds
    ``floor(j W / s)`` (PLOP's ``W // s`` regions when ``s`` divides a square map); each region contributes
    its width pooling (mean over columns, ``C x H_r`` values) then its height pooling (mean over rows,
    ``C x W_r`` values). Regions are visited scale by scale, row-major.

    Args:
        x: feature map ``(B, C, H, W)``, ``H, W >= max(scales)``.
        scales: the pyramid's scales.

    Returns:
        ``(B, D)`` with ``D = sum_s C (H + W) s`` (for ``s`` dividing ``H`` and ``W``), in float32 for half
        inputs.

    Raises:
        ValueError: a map smaller than the largest scale, or invalid scales.

    Example:
        >>> local_pod(torch.ones(2, 3, 4, 4), scales=(1, 2)).shape
        torch.Size([2, 72])
    """
    check_feature_map(x, "x")
    scales = _check_scales(scales)
    height, width = x.shape[-2:]
    if height < max(scales) or width < max(scales):
        raise ValueError(f"feature map {tuple(x.shape)} is smaller than the largest POD scale {max(scales)}")
    sq = upcast(x).pow(2)
    parts: list[Tensor] = []
    for s in scales:
        rows = [i * height // s for i in range(s + 1)]
        cols = [j * width // s for j in range(s + 1)]
        for i in range(s):
            for j in range(s):
                region = sq[:, :, rows[i] : rows[i + 1], cols[j] : cols[j + 1]]
                parts.append(region.mean(dim=3).flatten(1))
                parts.append(region.mean(dim=2).flatten(1))
    return torch.cat(parts, dim=1)


def local_pod_distance(
    x: Tensor, x_old: Tensor, scales: Sequence[int] = (1, 2, 4), *, normalize: bool = False
) -> Tensor:
    """Local POD distillation of one feature map: ``mean_b ||Φ(x_b) - Φ(x_old_b)||_2``.

    Args:
        x: student features ``(B, C, H, W)``.
        x_old: teacher features, same shape.
        scales: the pyramid's scales.
        normalize: L2-normalise each embedding before the distance (PODNet's variant; PLOP's released code
            does not, and its published weights are for unnormalised embeddings).

    Returns:
        A scalar ``>= 0`` (float32 for half inputs).

    Raises:
        ValueError: different shapes, maps smaller than the largest scale.

    Example:
        >>> x = torch.randn(2, 4, 8, 8)
        >>> float(local_pod_distance(x, x))
        0.0
    """
    check_feature_map(x, "x")
    check_feature_map(x_old, "x_old")
    if x.shape != x_old.shape:
        raise ValueError(f"x and x_old must have the same shape, got {tuple(x.shape)} and {tuple(x_old.shape)}")
    a, b = local_pod(x, scales), local_pod(x_old, scales)
    if normalize:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    return torch.linalg.vector_norm(a - b, dim=1).mean()


def collapse_new_classes(logits: Tensor, num_old_classes: int) -> Tensor:
    """Student logits ``(B, K, h, w)`` on the teacher's ``num_old_classes`` channels: the new classes' logits
    are added to the background's (PLOP's ``extra_channels="sum"``), the old classes' kept.

    Example:
        >>> collapse_new_classes(torch.arange(4.0).view(1, 4, 1, 1), 2).flatten().tolist()
        [5.0, 1.0]
    """
    check_logits(logits, "logits")
    k = logits.shape[1]
    if not 1 <= num_old_classes <= k:
        raise ValueError(f"num_old_classes must be in [1, {k}], got {num_old_classes}")
    background = logits[:, :1] + logits[:, num_old_classes:].sum(dim=1, keepdim=True)
    return torch.cat([background, logits[:, 1:num_old_classes]], dim=1)


def normalized_entropy(probs: Tensor) -> Tensor:
    """Entropy of class probabilities ``(B, C, H, W)`` over ``C``, divided by ``log C``: ``(B, H, W)`` in
    ``[0, 1]`` (0 where ``C == 1``).

    Example:
        >>> float(normalized_entropy(torch.full((1, 4, 1, 1), 0.25)))
        1.0
    """
    c = probs.shape[1]
    entropy = -torch.special.xlogy(probs, probs).sum(dim=1)
    if c < 2:
        return torch.zeros_like(entropy)
    return entropy / torch.log(torch.tensor(float(c), dtype=entropy.dtype, device=entropy.device))


def entropy_pseudo_labels(
    labels: Tensor, old_logits: Tensor, thresholds: Tensor, *, ignore_index: int = 255
) -> tuple[Tensor, Tensor]:
    """PLOP's pseudo-labels of the background pixels and its per-image loss factor.

    With ``p = softmax(old_logits)`` (upsampled bilinearly to the labels), ``ĉ = argmax p`` and the
    normalised entropy ``u = H(p) / log C_old``: a pixel labelled background (0) becomes ``ĉ`` where
    ``u < thresholds[ĉ]`` and ``ignore_index`` otherwise; other pixels keep their label (new classes, and the
    old-class labels of replayed images). The factor of an image is the share of its background pixels that
    got a pseudo-label (1 for an image without background).

    Args:
        labels: ``(B, H, W)`` int64 labels of the current step.
        old_logits: teacher logits ``(B, C_old, h, w)``.
        thresholds: ``(C_old,)`` (or longer) entropy thresholds per old class.
        ignore_index: label of ignored pixels.

    Returns:
        ``(pseudo_labels (B, H, W), factor (B,))``.

    Example:
        >>> labels = torch.zeros(1, 2, 2, dtype=torch.long)
        >>> old = torch.tensor([[[[0.0, 0.0]], [[9.0, 0.0]]]]).expand(1, 2, 2, 2)
        >>> pseudo, factor = entropy_pseudo_labels(labels, old, torch.tensor([0.5, 0.5]))
        >>> pseudo.tolist(), factor.tolist()
        ([[[1, 255], [1, 255]]], [0.5])
    """
    check_logits(old_logits, "old_logits")
    check_batch(old_logits, labels, "old_logits", "labels")
    if thresholds.ndim != 1 or thresholds.shape[0] < old_logits.shape[1]:
        raise ValueError(
            f"thresholds must be 1-D with at least {old_logits.shape[1]} entries, got shape {tuple(thresholds.shape)}"
        )
    probs = torch.softmax(resize_to(upcast(old_logits), labels.shape[-2:]), dim=1)
    uncertainty = normalized_entropy(probs)
    predicted = probs.argmax(dim=1)
    background = labels == 0
    confident = uncertainty < thresholds.to(uncertainty.dtype)[predicted]
    pseudo = torch.where(background & confident, predicted, labels)
    pseudo = torch.where(background & ~confident, torch.full_like(labels, ignore_index), pseudo)
    num = (background & confident).flatten(1).sum(dim=1).to(uncertainty.dtype)
    den = background.flatten(1).sum(dim=1).to(uncertainty.dtype)
    factor = torch.where(den > 0, num / den.clamp(min=1), torch.ones_like(den))
    return pseudo, factor
