"""Data: COCO-format datasets, transforms, deterministic loaders and the synthetic shapes set."""
from . import transforms
from .coco import COCO_PERSON_FLIP_PAIRS, CocoDetection
from .loader import build_loader, collate
from .shapes import SHAPE_FLIP_PAIRS, SHAPE_KEYPOINT_NAMES, make_shapes

__all__ = ["CocoDetection", "collate", "build_loader", "make_shapes", "transforms",
           "COCO_PERSON_FLIP_PAIRS", "SHAPE_FLIP_PAIRS", "SHAPE_KEYPOINT_NAMES"]
