"""Kernels as torch.library custom ops (mrcnn_fast::*), drop-in compatible with torchvision.ops."""
from .boxes import box_iou
from .mask_paste import paste_masks_binary, paste_masks_in_image, paste_masks_rle, rle_encode

__all__ = ["box_iou", "paste_masks_binary", "paste_masks_in_image", "paste_masks_rle", "rle_encode"]
