"""Reference networks for incremental segmentation: the encoder-refiner-classifier segmenter and its parts."""

from incseg.models.classifier import IncrementalClassifier
from incseg.models.segmenter import IncrementalSegmenter
from incseg.models.small import small_segmenter

__all__ = [
    "IncrementalClassifier",
    "IncrementalSegmenter",
    "small_segmenter",
]
