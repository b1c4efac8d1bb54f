"""Kernels as torch.library custom ops (mrcnn_fast::*), drop-in compatible with torchvision.ops."""
from .boxes import box_iou

__all__ = ["box_iou"]
