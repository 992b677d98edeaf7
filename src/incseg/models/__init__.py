"""Reference networks for incremental segmentation: the encoder-refiner-classifier segmenter and its parts.

- :class:`IncrementalSegmenter`: ``encoder -> [fusion] -> refiner -> classifier`` with ``forward_features``.
- :class:`IncrementalClassifier`: one 1x1 head per step, MiB initialisation of new classes.
- :func:`small_segmenter`: a small CPU network for the demo and tests.
- :func:`deeplabv3_resnet101` / :func:`deeplabv3_resnet50`: DeepLabV3 of the paper; :class:`ASPP`.
- :func:`adapt`: one call for torchvision, segmentation_models_pytorch and transformers segmentation models.
- Adapters: :func:`from_torchvision_deeplabv3`, :func:`from_named_submodules`, :func:`classifier_from_conv`,
  :func:`without_last_child`; :func:`check_equivalent` compares an adapted network's logits with the original's.
"""

from incseg.models.adapt import adapt
from incseg.models.adapters import (
    classifier_from_conv,
    from_named_submodules,
    from_torchvision_deeplabv3,
    without_last_child,
)
from incseg.models.check import check_equivalent
from incseg.models.classifier import IncrementalClassifier
from incseg.models.deeplab import ASPP, deeplabv3_resnet50, deeplabv3_resnet101
from incseg.models.segmenter import IncrementalSegmenter
from incseg.models.small import small_segmenter

__all__ = [
    "ASPP",
    "IncrementalClassifier",
    "IncrementalSegmenter",
    "adapt",
    "check_equivalent",
    "classifier_from_conv",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "from_named_submodules",
    "from_torchvision_deeplabv3",
    "small_segmenter",
    "without_last_child",
]
