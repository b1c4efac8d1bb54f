"""Kernels as torch.library custom ops (mrcnn_fast::*), drop-in compatible with torchvision.ops."""
from .anchors import AnchorGenerator, anchors_for_level, grid_anchors
from .boxes import box_iou
from .roi_pool import RoIPool, roi_pool

__all__ = ["box_iou", "roi_pool", "RoIPool", "AnchorGenerator", "anchors_for_level", "grid_anchors"]
