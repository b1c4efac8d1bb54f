"""Non-maximum suppression with torchvision's semantics, plus fixed-capacity forms for the GPU.

Semantics (identical to torchvision.ops.nms / batched_nms on CPU): boxes are (x1, y1, x2, y2) without
+1; candidates are visited in a stable descending sort of the scores (ties keep input order); a kept
box suppresses a later one when their IoU > iou_threshold (strict; the NaN IoU of two zero-area boxes
suppresses nothing); kept indices are returned by descending score. batched_nms lets only boxes with
equal idxs suppress each other.

nms_fixed / batched_nms_fixed never wait for the device: they return keep (Tensor[max_out] int64,
padded with -1) and count (Tensor[] int64). nms / batched_nms are those plus a slice on the host.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._lib import _C, dl, stream
from ._checks import check_finite, check_int, check_tensor, real_number


def _workspace(boxes: Tensor, batched: bool) -> Tensor:
    if boxes.device.type != "cuda":
        return torch.empty(0, dtype=torch.uint8)
    nbytes = _C.nms_workspace_bytes(boxes.shape[0], str(boxes.dtype).replace("torch.", ""), True, batched)
    return torch.empty(nbytes, dtype=torch.uint8, device=boxes.device)


def _run(boxes: Tensor, scores: Tensor, idxs: Tensor | None, iou_threshold: float, max_out: int):
    boxes, scores = boxes.contiguous(), scores.contiguous()
    keep = torch.empty(max_out, dtype=torch.int64, device=boxes.device)
    count = torch.empty((), dtype=torch.int64, device=boxes.device)
    ws = _workspace(boxes, idxs is not None)
    if idxs is None:
        _C.nms(dl(boxes), dl(scores), iou_threshold, dl(keep), dl(count), dl(ws), stream(boxes))
    else:
        _C.batched_nms(dl(boxes), dl(scores), dl(idxs.contiguous()), iou_threshold, dl(keep), dl(count), dl(ws),
                       stream(boxes))
    return keep, count


@torch.library.custom_op("mrcnn_fast::nms_fixed", mutates_args=())
def _nms_fixed(boxes: Tensor, scores: Tensor, iou_threshold: float, max_out: int) -> tuple[Tensor, Tensor]:
    return _run(boxes, scores, None, iou_threshold, max_out)


@_nms_fixed.register_fake
def _(boxes, scores, iou_threshold, max_out):
    return boxes.new_empty((max_out,), dtype=torch.int64), boxes.new_empty((), dtype=torch.int64)


@torch.library.custom_op("mrcnn_fast::batched_nms_fixed", mutates_args=())
def _batched_nms_fixed(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float,
                       max_out: int) -> tuple[Tensor, Tensor]:
    return _run(boxes, scores, idxs, iou_threshold, max_out)


@_batched_nms_fixed.register_fake
def _(boxes, scores, idxs, iou_threshold, max_out):
    return boxes.new_empty((max_out,), dtype=torch.int64), boxes.new_empty((), dtype=torch.int64)


@torch.library.custom_op("mrcnn_fast::nms", mutates_args=())
def _nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    keep, count = _run(boxes, scores, None, iou_threshold, boxes.shape[0])
    return keep[: int(count)].clone()


@_nms.register_fake
def _(boxes, scores, iou_threshold):
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int64)


@torch.library.custom_op("mrcnn_fast::batched_nms", mutates_args=())
def _batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    keep, count = _run(boxes, scores, idxs, iou_threshold, boxes.shape[0])
    return keep[: int(count)].clone()


@_batched_nms.register_fake
def _(boxes, scores, idxs, iou_threshold):
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int64)




def _check(boxes, scores, idxs, iou_threshold, *, values: bool) -> tuple[Tensor | None, float]:
    check_tensor(boxes, "boxes")
    check_tensor(scores, "scores")
    if boxes.dim() == 0:   # the kernel's output is sized from len(boxes)
        raise ValueError("boxes must have shape [N, 4], got []")
    if idxs is not None:
        check_tensor(idxs, "idxs")
        if not (idxs.dtype.is_floating_point or idxs.dtype.is_complex or idxs.dtype == torch.bool):
            idxs = idxs.to(torch.int64)   # any integer categories; the core takes int64
    thr = real_number(iou_threshold, "iou_threshold")
    # The CPU kernel rejects NaN/inf itself (for free, while it reads the boxes); on CUDA this check
    # costs a device sync, which nms() pays anyway and nms_fixed() must not.
    if values and boxes.device.type == "cuda":
        check_finite(boxes, "boxes")
        check_finite(scores, "scores")
    return idxs, thr


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS, torchvision.ops.nms semantics (see the module docstring).

    Args:
        boxes (Tensor[N, 4]): (x1, y1, x2, y2); NaN/inf raise ValueError.
        scores (Tensor[N]): same dtype as boxes; NaN/inf raise ValueError.
        iou_threshold (float): boxes with IoU > iou_threshold with a kept box are discarded.
    Returns:
        Tensor[K] int64: indices of the kept boxes by descending score.
    """
    _, thr = _check(boxes, scores, None, iou_threshold, values=True)
    return _nms(boxes, scores, thr)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each category, torchvision.ops.batched_nms semantics.

    Args:
        boxes (Tensor[N, 4]), scores (Tensor[N]): as for nms().
        idxs (Tensor[N]): integer category of every box; boxes of different categories never
            suppress each other.
        iou_threshold (float)
    Returns:
        Tensor[K] int64: indices of the kept boxes by descending score.
    """
    idxs, thr = _check(boxes, scores, idxs, iou_threshold, values=True)
    return _batched_nms(boxes, scores, idxs, thr)


def nms_fixed(boxes: Tensor, scores: Tensor, iou_threshold: float, max_out: int) -> tuple[Tensor, Tensor]:
    """nms() with a fixed-size result and no host synchronisation (on CUDA).

    Returns:
        keep (Tensor[max_out] int64): the first count entries are the kept indices by descending score
            (the best max_out if more survive), the rest are -1.
        count (Tensor[] int64): number of valid entries in keep.
    On CUDA, box and score values are not checked (that would need a sync): NaN/inf give an
    unspecified (but memory-safe) result.
    """
    _, thr = _check(boxes, scores, None, iou_threshold, values=False)
    return _nms_fixed(boxes, scores, thr, check_int(max_out, "max_out", minimum=0))


def batched_nms_fixed(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float,
                      max_out: int) -> tuple[Tensor, Tensor]:
    """batched_nms() with a fixed-size result (see nms_fixed)."""
    idxs, thr = _check(boxes, scores, idxs, iou_threshold, values=False)
    return _batched_nms_fixed(boxes, scores, idxs, thr, check_int(max_out, "max_out", minimum=0))
