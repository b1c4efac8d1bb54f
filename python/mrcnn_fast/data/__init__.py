"""Data: COCO-format datasets, transforms, deterministic loaders and the synthetic shapes set."""
from . import transforms
from .coco import CocoDetection
from .keypoints import COCO_PERSON_FLIP_PAIRS, flip_pairs_from_names, flip_permutation
from .loader import build_loader, collate
from .shapes import SHAPE_FLIP_PAIRS, SHAPE_KEYPOINT_NAMES, make_shapes

__all__ = ["CocoDetection", "collate", "build_loader", "make_shapes", "transforms",
           "COCO_PERSON_FLIP_PAIRS", "flip_pairs_from_names", "flip_permutation", "SHAPE_FLIP_PAIRS",
           "SHAPE_KEYPOINT_NAMES"]
