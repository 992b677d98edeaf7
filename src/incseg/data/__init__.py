"""Datasets: raw sources (Pascal VOC, ADE20K, synthetic), one scenario step as a dataset, joint transforms."""

from incseg.data._source import SegmentationSource
from incseg.data.ade20k import ADE20K, ADE20KIncremental
from incseg.data.incremental import CacheCheck, IncrementalSegmentation, JointTransform, image_class_sets
from incseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TestTransform, TrainTransform, normalize
from incseg.data.voc import PascalVOC, PascalVOCIncremental

__all__ = [
    "ADE20K",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ADE20KIncremental",
    "CacheCheck",
    "IncrementalSegmentation",
    "JointTransform",
    "PascalVOC",
    "PascalVOCIncremental",
    "SegmentationSource",
    "TestTransform",
    "TrainTransform",
    "image_class_sets",
    "normalize",
]

try:  # written separately; the package works without it
    from incseg.data.synthetic import SyntheticScenes
except ModuleNotFoundError as _err:  # pragma: no cover - only while synthetic.py does not exist yet
    if _err.name != "incseg.data.synthetic":
        raise
else:
    __all__ += ["SyntheticScenes"]
