"""STAR's losses (Chen et al., NeurIPS 2023): prototype replay, background re-weighting, feature maintaining.

STAR classifies with one sigmoid per class (no background logit: a pixel is background where no class
probability exceeds 1/2) and keeps, per old class ``c``, only a prototype ``p_c`` (the L2-normalised mean of
the L2-normalised features ``h`` the classifier sees, over the class's pixels), a per-channel spread
``sigma_c`` of the normalised features around it, the mean ``mu_c`` and standard deviation ``s_c`` of the
feature norms ``||h||``, and the class's pixel count. At a later step:

- **Prototype replay**: features ``(p_c + eps * sigma_c) * r`` with ``eps ~ N(0, I)``, ``r ~ N(mu_c, s_c)``
  are classified as negatives of every new class (:func:`replay_features`), as many per iteration as the old
  training set held pixels of ``c`` minus those the old model still finds in the current data.
- **Background re-weighting**: the features of pixels the current labels and the old model both call
  background are classified again as negatives of the new classes, with a weight that restores the old
  steps' share of background.
- **Classification** (:func:`star_classification_loss`): per new class, the binary cross-entropy of the
  current pixels (positive weight ``w+``), of the replayed features and of the re-weighted background,
  ``(L_cur + a L_rep + b L_bg) / (1 + a + b)``, summed over the new classes.
- **Old-class features maintaining**, OCFM (:func:`ocfm_loss`): the squared error between the
  student's and the old model's ``h`` where the old model predicts an old class on a background pixel.
- **Similarity-aware discrimination**, SAD (:func:`sad_loss`): the mean over new classes of the inverse
  distance between the class's normalised feature centre in the batch and the nearest old prototype.

Equations, and where incseg follows the authors' release: docs/concepts.md ("STAR"), docs/protocol.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from incseg._checks import check_feature_map, check_labels, check_logits
from incseg.functional._common import check_batch, resize_to, upcast

__all__ = [
    "FeatureStatistics",
    "class_feature_statistics",
    "negative_bce",
    "ocfm_loss",
    "prototypes_from_statistics",
    "replay_features",
    "sad_loss",
    "sample_labels",
    "sigmoid_predictions",
    "star_classification_loss",
]


def sample_labels(labels: Tensor, size: Sequence[int]) -> Tensor:
    """Labels at the centres of the cells of a ``size`` grid (nearest-centre subsampling).

    Row ``i`` of the output takes row ``floor((i + 1/2) H / h)`` of the labels (likewise for columns): for a
    label map 16 times larger than the features this is the authors' ``label[:, 8::16, 8::16]``.

    Args:
        labels: integer labels ``(B, H, W)``.
        size: the grid ``(h, w)`` (usually the feature map's), ``h <= H``, ``w <= W``.

    Returns:
        ``(B, h, w)`` labels.

    Raises:
        ValueError: labels not 3-dimensional or a grid larger than the labels.

    Example:
        >>> labels = torch.arange(32).view(1, 1, 32).expand(1, 32, 32)
        >>> sample_labels(labels, (2, 2))[0].tolist()
        [[8, 24], [8, 24]]
    """
    if not isinstance(labels, Tensor) or labels.ndim != 3:
        raise ValueError(f"labels must be a (B, H, W) tensor, got {getattr(labels, 'shape', type(labels).__name__)}")
    h, w = int(size[0]), int(size[1])
    height, width = labels.shape[-2:]
    if not (1 <= h <= height and 1 <= w <= width):
        raise ValueError(f"the grid {(h, w)} must be within the labels' size {(height, width)}")
    rows = (torch.arange(h, device=labels.device) * 2 + 1) * height // (2 * h)
    cols = (torch.arange(w, device=labels.device) * 2 + 1) * width // (2 * w)
    return labels[:, rows][:, :, cols]


def sigmoid_predictions(logits: Tensor, *, threshold: float = 0.0) -> Tensor:
    """Per-pixel prediction of a sigmoid classifier whose channel 0 (background) has no logit of its own.

    A pixel is class ``argmax_{c >= 1} x_c`` where that logit exceeds ``threshold`` (strictly), background
    (0) elsewhere. ``threshold = 0`` is the test rule of STAR (a class probability above 1/2); the old model's
    pseudo-labels in training use ``threshold = 0.5`` on the logits, as the release does.

    Args:
        logits: ``(B, K, H, W)`` logits, ``K >= 2``; channel 0 is not read.
        threshold: the logit a class must exceed.

    Returns:
        int64 predictions ``(B, H, W)`` in ``[0, K)``.

    Example:
        >>> x = torch.tensor([0.0, -1.0, 2.0, 0.3]).view(1, 4, 1, 1)
        >>> sigmoid_predictions(x).item(), sigmoid_predictions(x, threshold=3.0).item()
        (2, 0)
    """
    logits = check_logits(logits, "logits", min_classes=2)
    best, index = logits[:, 1:].max(dim=1)
    return torch.where(best > threshold, index + 1, torch.zeros_like(index))


def negative_bce(logits: Tensor) -> Tensor:
    """Binary cross-entropy of every entry against the target 0, ``log(1 + e^x)``, averaged per class.

    Args:
        logits: ``(N, C)`` logits of ``N`` samples that belong to none of the ``C`` classes.

    Returns:
        ``(C,)`` mean losses (zeros, connected to the graph, when ``N = 0``).

    Example:
        >>> negative_bce(torch.zeros(3, 2))
        tensor([0.6931, 0.6931])
    """
    if not isinstance(logits, Tensor) or logits.ndim != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating (N, C) tensor, got {getattr(logits, 'shape', type(logits))}")
    x = upcast(logits)
    return F.softplus(x).sum(dim=0) / max(x.shape[0], 1)


def star_classification_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    num_old_classes: int,
    replay_logits: Tensor | None = None,
    background_logits: Tensor | None = None,
    replay_weight: float | Tensor = 0.0,
    background_weight: float | Tensor = 0.0,
    pos_weight: float = 1.0,
    ignore_index: int | None = 255,
) -> Tensor:
    r"""STAR's classification loss of the classes of the current step.

    For each new class ``c`` (channels ``max(num_old_classes, 1)`` to ``K - 1``; channel 0 has no logit)

    ``L_c = (BCE_{w+}(x_c, [y = c]) + a · mean_n softplus(x^rep_{n,c}) + b · mean_m softplus(x^bg_{m,c}))
    / (1 + a + b)``

    and the loss is ``sum_c L_c``. ``BCE_{w+}(x, t) = -(w+ t log σ(x) + (1 - t) log(1 - σ(x)))`` is averaged
    over **all** pixels: ignored pixels (``ignore_index``) and pixels of other classes are negatives of every
    new class, as in the release (``models/loss.py:75-84``). ``a`` (``replay_weight``) and ``b``
    (``background_weight``) are the weights of the replayed prototypes and of the re-weighted background.

    Args:
        logits: ``(B, K, h, w)`` logits (bilinearly upsampled to the labels' size when smaller).
        labels: ``(B, H, W)`` labels in incremental indices.
        num_old_classes: ``|S_{t-1}|`` (background included; 0 at step 0).
        replay_logits: ``(N, K)`` or ``(N, |C_t|)`` logits of replayed old-class features, or ``None``.
        background_logits: ``(M, K)`` or ``(M, |C_t|)`` logits of re-weighted background features, or ``None``.
        replay_weight: ``a >= 0`` (a float or a 0-dim tensor).
        background_weight: ``b >= 0``.
        pos_weight: ``w+``, the weight of the positive term.
        ignore_index: label of ignored pixels (``None``: none).

    Returns:
        The scalar loss (float32 for half inputs).

    Raises:
        ValueError: shapes that disagree or ``num_old_classes`` leaving no new class.

    Example:
        >>> logits = torch.zeros(1, 3, 2, 2)
        >>> labels = torch.tensor([[[0, 2], [255, 1]]])
        >>> round(float(star_classification_loss(logits, labels, num_old_classes=2)), 4)
        0.6931
    """
    logits = check_logits(logits, "logits", min_classes=2)
    num_classes = logits.shape[1]
    first = max(int(num_old_classes), 1)
    if isinstance(num_old_classes, bool) or not isinstance(num_old_classes, int) or not first < num_classes:
        raise ValueError(
            f"num_old_classes must be an int leaving at least one new class among the {num_classes} logits, "
            f"got {num_old_classes!r}"
        )
    check_labels(labels, num_classes, ignore_index=ignore_index, batch_shape=(logits.shape[0],))
    x = resize_to(upcast(logits), labels.shape[-2:])[:, first:]
    classes = torch.arange(first, num_classes, device=labels.device)
    target = (labels[:, None] == classes[None, :, None, None]).to(x.dtype)
    per_pixel = float(pos_weight) * target * F.softplus(-x) + (1 - target) * F.softplus(x)
    current = per_pixel.mean(dim=(0, 2, 3))
    total = current
    weights: float | Tensor = 1.0
    for extra, weight, name in (
        (replay_logits, replay_weight, "replay_logits"),
        (background_logits, background_weight, "background_logits"),
    ):
        if extra is None:
            continue
        if extra.ndim != 2 or extra.shape[1] not in (num_classes, num_classes - first):
            raise ValueError(
                f"{name} must be (N, {num_classes}) or (N, {num_classes - first}), got {tuple(extra.shape)}"
            )
        new = extra[:, first:] if extra.shape[1] == num_classes else extra
        total = total + weight * negative_bce(new)
        weights = weights + weight
    return (total / weights).sum()


def ocfm_loss(features: Tensor, old_features: Tensor, mask: Tensor) -> Tensor:
    r"""STAR's old-class features maintaining (OCFM) loss: the squared feature error inside a pixel mask.

    ``L = sum_{b,x} m_{b,x} ||h_{b,x} - h^{old}_{b,x}||^2 / (C sum_{b,x} m_{b,x})``, where ``m`` is the mask
    bilinearly resized (``align_corners=False``) to the features' size. An empty mask gives 0 (connected to
    the graph).

    Args:
        features: student features ``(B, C, h, w)``.
        old_features: old model's features, same shape (no gradient flows to them).
        mask: ``(B, H, W)`` bool or float mask at any resolution.

    Returns:
        The scalar loss.

    Example:
        >>> f = torch.ones(1, 2, 2, 2)
        >>> mask = torch.tensor([[[True, False], [False, False]]])
        >>> float(ocfm_loss(f, torch.zeros_like(f), mask))
        1.0
    """
    features = check_feature_map(features, "features")
    old_features = check_feature_map(old_features, "old_features", channels=features.shape[1])
    if features.shape != old_features.shape:
        raise ValueError(f"features {tuple(features.shape)} and old_features {tuple(old_features.shape)} differ")
    if not isinstance(mask, Tensor) or mask.ndim != 3:
        raise ValueError(f"mask must be a (B, H, W) tensor, got {getattr(mask, 'shape', type(mask).__name__)}")
    check_batch(features, mask, "features", "mask")
    f = upcast(features)
    m = resize_to(mask.to(f.dtype)[:, None], f.shape[-2:])
    squared = (f - upcast(old_features).detach().to(f.dtype)) ** 2
    return (squared * m).sum() / (m.sum() * f.shape[1]).clamp_min(1e-12)


def sad_loss(
    features: Tensor,
    labels: Tensor,
    prototypes: Tensor,
    *,
    num_old_classes: int,
    num_classes: int,
    valid: Tensor | None = None,
) -> Tensor:
    r"""STAR's similarity-aware discriminative (SAD) loss: the mean inverse distance between the new classes'
    feature centres and their nearest old prototype.

    For each new class ``c`` (``num_old_classes <= c < num_classes``) the mask ``[y = c]`` is bilinearly
    resized to the features' size, ``u_c = N(sum_{b,x} m_{c,b,x} N(h_{b,x}))`` with ``N`` the L2
    normalisation (``N(0) = 0``), and ``L = mean_c 1 / min_j ||u_c - p_j||_2`` over the old prototypes ``p_j``.
    A class absent from the batch has ``u_c = 0`` and contributes the constant ``1 / min_j ||p_j||`` (1 for
    unit prototypes), as in the release (``models/loss.py:119-135``).

    Args:
        features: ``(B, C, h, w)`` features.
        labels: ``(B, H, W)`` labels.
        prototypes: ``(J, C)`` old-class prototypes.
        num_old_classes: first new class.
        num_classes: ``K``, one past the last new class.
        valid: optional ``(J,)`` bool, the prototypes to use (others are never the nearest).

    Returns:
        The scalar loss (0 when no prototype is valid).

    Example:
        >>> features = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
        >>> labels = torch.ones(1, 1, 1, dtype=torch.long)
        >>> float(sad_loss(features, labels, torch.tensor([[0.0, 1.0]]),
        ...                                num_old_classes=1, num_classes=2))
        0.7071067690849304
    """
    features = check_feature_map(features, "features")
    first = int(num_old_classes)
    if not 1 <= first < num_classes:
        raise ValueError(f"need 1 <= num_old_classes < num_classes, got {num_old_classes} and {num_classes}")
    if not isinstance(prototypes, Tensor) or prototypes.ndim != 2 or prototypes.shape[1] != features.shape[1]:
        raise ValueError(
            f"prototypes must be (J, {features.shape[1]}), got {getattr(prototypes, 'shape', type(prototypes))}"
        )
    check_labels(labels, num_classes, ignore_index=255, batch_shape=(features.shape[0],))
    f = F.normalize(upcast(features), p=2, dim=1)
    classes = torch.arange(first, num_classes, device=labels.device)
    target = (labels[:, None] == classes[None, :, None, None]).to(f.dtype)
    masks = resize_to(target, f.shape[-2:])
    centres = F.normalize(torch.einsum("bkhw,bchw->kc", masks, f), p=2, dim=1)
    dist = torch.cdist(centres[None], prototypes.to(f.dtype)[None])[0]
    if valid is not None:
        if prototypes.shape[0] == 0 or not bool(valid.any()):
            return f.sum() * 0
        dist = torch.where(valid[None, :], dist, torch.full_like(dist, float("inf")))
    elif prototypes.shape[0] == 0:
        return f.sum() * 0
    return (1 / dist.min(dim=1).values).mean()


def replay_features(
    prototypes: Tensor,
    noise: Tensor,
    norm_mean: Tensor,
    norm_std: Tensor,
    counts: Tensor,
    *,
    total: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Features sampled around stored prototypes (STAR's prototype replay).

    For class ``j``, ``counts[j]`` samples ``(p_j + eps ⊙ sigma_j) · r`` with ``eps ~ N(0, I_C)`` and a
    scalar ``r ~ N(mu_j, s_j)`` per sample (``trainer/trainer_voc.py:406-420`` of the release).

    Args:
        prototypes: ``(J, C)`` prototypes ``p``.
        noise: ``(J, C)`` per-channel spreads ``sigma``.
        norm_mean: ``(J,)`` mean feature norms ``mu``.
        norm_std: ``(J,)`` standard deviations ``s`` of the norms.
        counts: ``(J,)`` int64 number of samples per class.
        total: ``counts.sum()`` when known (saves a host synchronisation).
        generator: random generator (default: the global one).

    Returns:
        ``(features, classes)``: ``(N, C)`` features and the ``(N,)`` row index ``j`` of each.

    Example:
        >>> p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> feats, rows = replay_features(p, torch.zeros(2, 2), torch.tensor([2.0, 3.0]), torch.zeros(2),
        ...                               torch.tensor([1, 2]))
        >>> feats.tolist(), rows.tolist()
        ([[2.0, 0.0], [0.0, 3.0], [0.0, 3.0]], [0, 1, 1])
    """
    if prototypes.ndim != 2 or noise.shape != prototypes.shape:
        raise ValueError(f"prototypes and noise must be (J, C), got {tuple(prototypes.shape)}, {tuple(noise.shape)}")
    j = prototypes.shape[0]
    for name, t in (("norm_mean", norm_mean), ("norm_std", norm_std), ("counts", counts)):
        if tuple(t.shape) != (j,):
            raise ValueError(f"{name} must have shape ({j},), got {tuple(t.shape)}")
    rows = torch.repeat_interleave(
        torch.arange(j, device=prototypes.device), counts.to(prototypes.device), output_size=total
    )
    n, c = rows.shape[0], prototypes.shape[1]
    eps = torch.randn(n, c, generator=generator, dtype=prototypes.dtype, device=prototypes.device)
    r = torch.randn(n, generator=generator, dtype=prototypes.dtype, device=prototypes.device)
    r = r * norm_std[rows].to(prototypes.dtype) + norm_mean[rows].to(prototypes.dtype)
    return (prototypes[rows] + eps * noise[rows]) * r[:, None], rows


class FeatureStatistics(NamedTuple):
    """Per-class sums over pixels of features ``h`` (see :func:`class_feature_statistics`), all float64.

    Attributes:
        pixels: ``(K,)`` number of pixels.
        unit_sum: ``(K, C)`` sum of the normalised features ``N(h)``.
        unit_square_sum: ``(K, C)`` sum of ``N(h)^2`` (element-wise).
        norm_sum: ``(K,)`` sum of ``||h||``.
        norm_square_sum: ``(K,)`` sum of ``||h||^2``.
    """

    pixels: Tensor
    unit_sum: Tensor
    unit_square_sum: Tensor
    norm_sum: Tensor
    norm_square_sum: Tensor

    def __add__(self, other: object) -> FeatureStatistics:  # type: ignore[override]
        if not isinstance(other, FeatureStatistics):
            return NotImplemented
        return FeatureStatistics(*(a + b for a, b in zip(self, other)))


def class_feature_statistics(features: Tensor, labels: Tensor, num_classes: int) -> FeatureStatistics:
    """Per-class sums of one batch for the prototypes, spreads and norm statistics.

    The labels are sampled at the feature grid (:func:`sample_labels`); pixels labelled ``>= num_classes``
    (``255``) are left out. Sums run in float64, so batches add up exactly enough for any dataset.

    Args:
        features: ``(B, C, h, w)`` features.
        labels: ``(B, H, W)`` labels, ``H >= h``, ``W >= w``.
        num_classes: ``K``.

    Returns:
        A :class:`FeatureStatistics` (add the batches' with ``+``).

    Example:
        >>> stats = class_feature_statistics(torch.ones(1, 2, 1, 1), torch.ones(1, 1, 1, dtype=torch.long), 2)
        >>> stats.pixels.tolist(), stats.norm_sum.tolist()
        ([0.0, 1.0], [0.0, 1.4142135623730951])
    """
    features = check_feature_map(features, "features")
    small = sample_labels(labels, features.shape[-2:]).reshape(-1)
    f = features.detach().to(torch.float64).permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    keep = (small >= 0) & (small < num_classes)
    small, f = small[keep], f[keep]
    norm = f.norm(dim=1)
    unit = f / norm.clamp_min(1e-12)[:, None]
    k = num_classes

    def per_class(values: Tensor) -> Tensor:
        out = values.new_zeros((k, *values.shape[1:]))
        return out.index_add_(0, small, values)

    return FeatureStatistics(
        per_class(torch.ones_like(norm)), per_class(unit), per_class(unit**2), per_class(norm), per_class(norm**2)
    )


def prototypes_from_statistics(stats: FeatureStatistics) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Prototypes, spreads and norm statistics from summed :class:`FeatureStatistics`.

    ``p = N(sum N(h))``; ``sigma = sqrt(mean (N(h) - p)^2)`` per channel (``E[u^2] - 2 p E[u] + p^2``);
    ``mu`` and ``s`` the mean and the unbiased standard deviation of ``||h||`` (``s = 0`` for one pixel).
    Classes without pixels get zeros everywhere.

    Returns:
        ``(prototypes (K, C), noise (K, C), norm_mean (K,), norm_std (K,))`` in float64.

    Example:
        >>> stats = class_feature_statistics(torch.tensor([[[[3.0]], [[4.0]]]]), torch.ones(1, 1, 1).long(), 2)
        >>> [t[1].tolist() for t in prototypes_from_statistics(stats)]
        [[0.6, 0.8], [0.0, 0.0], 5.0, 0.0]
    """
    n = stats.pixels
    safe = n.clamp_min(1)
    proto = F.normalize(stats.unit_sum, p=2, dim=1)
    mean_u = stats.unit_sum / safe[:, None]
    var = stats.unit_square_sum / safe[:, None] - 2 * proto * mean_u + proto**2
    noise = torch.where(n[:, None] > 0, var.clamp_min(0).sqrt(), torch.zeros_like(var))
    norm_mean = stats.norm_sum / safe
    norm_var = (stats.norm_square_sum - n * norm_mean**2) / (n - 1).clamp_min(1)
    norm_std = torch.where(n > 1, norm_var.clamp_min(0).sqrt(), torch.zeros_like(norm_var))
    return proto, noise, norm_mean, norm_std
