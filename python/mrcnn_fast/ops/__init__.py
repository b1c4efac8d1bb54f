"""Kernels as torch.library custom ops (mrcnn_fast::*), drop-in compatible with torchvision.ops."""
from .anchors import AnchorGenerator, anchors_for_level, grid_anchors
from .bn_relu_max_pool import batch_norm_relu_max_pool, channel_moments
from .box_coder import BoxCoder, clip_boxes, decode_boxes, encode_boxes, remove_small_boxes
from .boxes import box_iou
from .mask_paste import paste_masks_binary, paste_masks_in_image, paste_masks_rle, rle_encode
from .nms import batched_nms, batched_nms_fixed, nms, nms_fixed
from .proposals import generate_proposals, generate_proposals_list
from .roi_align import LEVEL_MAPPINGS, MultiScaleRoIAlign, fpn_level_assign, multilevel_roi_align, roi_align, roi_warp
from .roi_pool import RoIPool, roi_pool

__all__ = [
    "box_iou", "nms", "batched_nms", "nms_fixed", "batched_nms_fixed",
    "BoxCoder", "encode_boxes", "decode_boxes", "clip_boxes", "remove_small_boxes",
    "generate_proposals", "generate_proposals_list",
    "AnchorGenerator", "anchors_for_level", "grid_anchors",
    "roi_align", "roi_warp", "multilevel_roi_align", "fpn_level_assign", "MultiScaleRoIAlign", "LEVEL_MAPPINGS",
    "roi_pool", "RoIPool",
    "batch_norm_relu_max_pool", "channel_moments",
    "paste_masks_in_image", "paste_masks_binary", "paste_masks_rle", "rle_encode",
]
