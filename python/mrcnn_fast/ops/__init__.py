"""Kernels as torch.library custom ops (mrcnn_fast::*), drop-in compatible with torchvision.ops."""
from .boxes import box_iou
from .nms import batched_nms, batched_nms_fixed, nms, nms_fixed
from .box_coder import BoxCoder, clip_boxes, decode_boxes, encode_boxes, remove_small_boxes
from .proposals import generate_proposals, generate_proposals_list

__all__ = ["box_iou", "nms", "batched_nms", "nms_fixed", "batched_nms_fixed", "BoxCoder", "encode_boxes",
           "decode_boxes", "clip_boxes", "remove_small_boxes", "generate_proposals", "generate_proposals_list"]
