"""Kernels as torch.library custom ops (mrcnn_fast::*), drop-in compatible with torchvision.ops."""
from .boxes import box_iou
from .roi_align import MultiScaleRoIAlign, fpn_level_assign, multilevel_roi_align, roi_align, roi_warp

__all__ = ["box_iou", "roi_align", "roi_warp", "multilevel_roi_align", "fpn_level_assign", "MultiScaleRoIAlign"]
