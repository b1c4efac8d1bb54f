"""Pairwise box IoU."""
from __future__ import annotations

import torch
from torch import Tensor

from .._lib import _C, dl, stream
from ._checks import check_tensor


@torch.library.custom_op("mrcnn_fast::box_iou", mutates_args=())
def _box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    boxes1, boxes2 = boxes1.contiguous(), boxes2.contiguous()
    out = boxes1.new_empty(boxes1.shape[:1] + boxes2.shape[:1])   # [N, M]; the core checks the shapes
    _C.box_iou(dl(boxes1), dl(boxes2), dl(out), stream(boxes1))
    return out


@_box_iou.register_fake
def _(boxes1, boxes2):
    return boxes1.new_empty(boxes1.shape[:1] + boxes2.shape[:1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of every pair, torchvision.ops.box_iou semantics (no +1; 0/0 gives NaN).

    Args:
        boxes1 (Tensor[N, 4]), boxes2 (Tensor[M, 4]): (x1, y1, x2, y2), same dtype and device.
    Returns:
        Tensor[N, M]
    """
    check_tensor(boxes1, "boxes1")
    check_tensor(boxes2, "boxes2")
    if boxes1.dtype != boxes2.dtype:   # the core's message names boxes2 only
        raise TypeError(f"boxes1 and boxes2 must have the same dtype, got {boxes1.dtype} and {boxes2.dtype}")
    return _box_iou(boxes1, boxes2)
