"""Class names of the datasets incseg knows, indexed by dataset id (``0`` is the background)."""

from __future__ import annotations

__all__ = ["ADE20K_CLASS_NAMES", "SYNTHETIC_CLASS_NAMES", "VOC_CLASS_NAMES"]

VOC_CLASS_NAMES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
"""Pascal VOC 2012: background and the 20 object classes in the standard (alphabetical) order."""

# ADE20K SceneParsing (ADEChallengeData2016) objectInfo150 order; annotation value i is class i, 0 = "other".
_ADE150 = """
wall|building|sky|floor|tree|ceiling|road|bed|windowpane|grass|cabinet|sidewalk|person|earth|door|table|mountain|
plant|curtain|chair|car|water|painting|sofa|shelf|house|sea|mirror|rug|field|armchair|seat|fence|desk|rock|wardrobe|
lamp|bathtub|railing|cushion|base|box|column|signboard|chest of drawers|counter|sand|sink|skyscraper|fireplace|
refrigerator|grandstand|path|stairs|runway|case|pool table|pillow|screen door|stairway|river|bridge|bookcase|blind|
coffee table|toilet|flower|book|hill|bench|countertop|stove|palm|kitchen island|computer|swivel chair|boat|bar|
arcade machine|hovel|bus|towel|light|truck|tower|chandelier|awning|streetlight|booth|television receiver|airplane|
dirt track|apparel|pole|land|bannister|escalator|ottoman|bottle|buffet|poster|stage|van|ship|fountain|conveyer belt|
canopy|washer|plaything|swimming pool|stool|barrel|basket|waterfall|tent|bag|minibike|cradle|oven|ball|food|step|
tank|trade name|microwave|pot|animal|bicycle|lake|dishwasher|screen|blanket|sculpture|hood|sconce|vase|
traffic light|tray|ashcan|fan|pier|crt screen|plate|monitor|bulletin board|shower|radiator|glass|clock|flag
"""

ADE20K_CLASS_NAMES: tuple[str, ...] = ("background", *(n for n in _ADE150.replace("\n", "").split("|")))
"""ADE20K (150-class benchmark): ``0`` (unlabelled, "other") is the background, then the 150 classes."""

SYNTHETIC_CLASS_NAMES: tuple[str, ...] = (
    "background",
    "red-disc",
    "orange-disc",
    "blue-square",
    "purple-square",
    "green-triangle",
    "yellow-triangle",
    "pink-ring",
    "cyan-ring",
    "white-cross",
    "magenta-cross",
    "blue-diamond",
    "lime-ellipse",
    "striped-disc",
    "striped-square",
    "dotted-disc",
    "dotted-triangle",
    "checkered-triangle",
    "purple-ring",
    "yellow-star",
    "white-hexagon",
)
""":class:`~incseg.data.SyntheticScenes`: background and its 20 classes (shape, colour or texture; the generator
reads its class table in this order)."""
