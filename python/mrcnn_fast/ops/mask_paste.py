"""Pasting per-box masks into the image, and COCO run-length encoding.

Two conventions, chosen by ``aligned``:

* ``aligned=False`` (default): the same pixels as torchvision.models.detection.roi_heads.paste_masks_in_image
  (expand_masks, expand_boxes, int64 truncation, bilinear resize with align_corners=False, clipped placement),
  computed per output pixel without materialising the resized masks. On CPUs with FMA the float results equal
  torchvision's bit for bit (same fused multiply-adds as torch's upsample kernels); elsewhere they agree to
  float rounding. Differences from torchvision: a box wholly outside the image pastes an all-zero mask
  (torchvision raises a shape error there); box coordinates beyond +-2**40 are clamped.
* ``aligned=True``: detectron2's convention. The mask M[Mh, Mw] covers the continuous box (x1, y1, x2, y2)
  exactly (pixel i covers [i, i + 1)), which inverts the RoIAlign(aligned=True) that makes Mask R-CNN's mask
  targets; torchvision's convention is misaligned with those targets by up to ~1 px (an oracle pasting
  RoIAligned ground-truth masks back scores clearly lower with it: bench/results/overfit_coco.md). Image pixel
  (y, x) is the bilinear sample of M at ``u = (x + 0.5 - x1) * Mw / (x2 - x1) - 0.5``,
  ``v = (y + 0.5 - y1) * Mh / (y2 - y1) - 0.5`` with zero padding outside the mask, i.e.
  ``F.grid_sample(M, grid, mode="bilinear", padding_mode="zeros", align_corners=False)`` on the grid normalised
  to the box (agreeing to float rounding, not bit for bit). Only pixels with -1 < u < Mw and -1 < v < Mh are
  evaluated; the rest are 0. Degenerate boxes (x2 <= x1 or y2 <= y1) paste nothing. ``padding`` has no meaning
  here and must be left at its default. Coordinates and weights are computed in float64, the blend in the
  masks' dtype (float32 for float16/bfloat16 on CUDA).

Pasting is not differentiable (no autograd).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._lib import _C, dl, stream
from ._checks import check_int, check_int_pair, check_tensor, real_number


@torch.library.custom_op("mrcnn_fast::paste_masks", mutates_args=())
def _paste_masks(masks: Tensor, boxes: Tensor, img_h: int, img_w: int, padding: int,
                 aligned: bool = False) -> Tensor:
    masks, boxes = masks.contiguous(), boxes.contiguous()
    out = masks.new_empty((masks.shape[0], 1, img_h, img_w))
    _C.paste_masks(dl(masks), dl(boxes), dl(out.view(masks.shape[0], img_h, img_w)), padding, aligned,
                   stream(masks))
    return out


@_paste_masks.register_fake
def _(masks, boxes, img_h, img_w, padding, aligned=False):
    return masks.new_empty((masks.shape[0], 1, img_h, img_w))


@torch.library.custom_op("mrcnn_fast::paste_masks_binary", mutates_args=())
def _paste_masks_binary(masks: Tensor, boxes: Tensor, img_h: int, img_w: int, threshold: float,
                        padding: int, aligned: bool = False) -> Tensor:
    masks, boxes = masks.contiguous(), boxes.contiguous()
    out = masks.new_empty((masks.shape[0], img_h, img_w), dtype=torch.bool)
    _C.paste_masks_binary(dl(masks), dl(boxes), dl(out), padding, aligned, threshold, stream(masks))
    return out


@_paste_masks_binary.register_fake
def _(masks, boxes, img_h, img_w, threshold, padding, aligned=False):
    return masks.new_empty((masks.shape[0], img_h, img_w), dtype=torch.bool)


def _prepare(masks, boxes, img_shape, padding, aligned):
    """(masks Tensor[N, Mh, Mw], boxes Tensor[N, 4] float32/float64, (H, W), padding), checked as far as the
    core does not: the masks' rank (reshaped here), and what the CUDA RLE path (windows computed on the host from
    the boxes alone) needs; the core checks dtypes, the boxes' shape and devices."""
    check_tensor(masks, "masks")
    if not (masks.dim() == 3 or (masks.dim() == 4 and masks.shape[1] == 1)):
        raise ValueError(f"masks must have shape [N, 1, M, M] or [N, M, M], got {list(masks.shape)}")
    if masks.shape[-1] == 0 or masks.shape[-2] == 0:
        raise ValueError(f"masks must have non-empty spatial dims, got {list(masks.shape)}")
    check_tensor(boxes, "boxes")
    if not boxes.is_floating_point():
        raise TypeError(f"boxes must have a floating dtype, got {boxes.dtype}")
    if boxes.dim() and boxes.shape[0] != masks.shape[0]:
        raise ValueError(f"boxes and masks must have the same length, got {boxes.shape[0]} boxes and "
                         f"{masks.shape[0]} masks")
    if boxes.dtype not in (torch.float32, torch.float64):
        boxes = boxes.float()  # half boxes: the expansion runs in float32
    # CPU boxes are checked by the kernel; CUDA boxes here (one sync), except while tracing.
    if boxes.device.type == "cuda" and not torch.compiler.is_compiling() and boxes.numel():
        if not bool(torch.isfinite(boxes).all()):
            raise ValueError("boxes contains NaN or infinite values")
    h, w = check_int_pair(img_shape, "img_shape", minimum=1)
    padding = check_int(padding, "padding", minimum=0)
    if not isinstance(aligned, bool):
        raise TypeError(f"aligned must be a bool, got {type(aligned).__name__}")
    if aligned and padding != 1:
        raise ValueError(f"padding has no meaning with aligned=True (the mask covers the box exactly): leave it at "
                         f"its default, got {padding}")
    return masks.reshape(masks.shape[0], masks.shape[-2], masks.shape[-1]), boxes, (h, w), padding


def paste_masks_in_image(masks: Tensor, boxes: Tensor, img_shape, padding: int = 1, *,
                         aligned: bool = False) -> Tensor:
    """Each mask resampled into its box of the image: torchvision's paste_masks_in_image, or (aligned=True)
    detectron2's aligned paste (see the module docstring).

    Args:
        masks (Tensor[N, 1, Mh, Mw] or Tensor[N, Mh, Mw]): mask probabilities (CPU: float32/float64; CUDA: also
            float16/bfloat16). Any size; torchvision's convention scales both axes of non-square masks by the
            width (as torchvision), the aligned one each axis by its own size.
        boxes (Tensor[N, 4]): (x1, y1, x2, y2) in image pixels, same device, finite.
        img_shape ((int, int)): (H, W), positive.
        padding (int): torchvision's convention: zero border added to the masks (the box grows by
            (Mw + 2 * padding) / Mw). Must stay 1 with aligned=True.
        aligned (bool): the mask covers the box exactly (matches the RoIAlign(aligned=True) mask targets).
    Returns:
        Tensor[N, 1, H, W] of the masks' dtype (not differentiable).
    """
    m, b, (h, w), padding = _prepare(masks, boxes, img_shape, padding, aligned)
    return _paste_masks(m, b, h, w, padding, aligned)


def paste_masks_binary(masks: Tensor, boxes: Tensor, img_shape, threshold: float = 0.5,
                       padding: int = 1, *, aligned: bool = False) -> Tensor:
    """``paste_masks_in_image(...)[:, 0] > threshold`` without the float images.

    Args: as paste_masks_in_image; threshold is compared in the masks' dtype (as torch compares).
    Returns:
        Tensor[N, H, W] bool, on the masks' device.
    """
    m, b, (h, w), padding = _prepare(masks, boxes, img_shape, padding, aligned)
    return _paste_masks_binary(m, b, h, w, real_number(threshold, "threshold"), padding, aligned)


def _rle_dicts(counts, h: int, w: int) -> list[dict]:
    return [{"size": [h, w], "counts": c} for c in counts]


def paste_masks_rle(masks: Tensor, boxes: Tensor, img_shape, threshold: float = 0.5,
                    padding: int = 1, *, aligned: bool = False) -> list[dict]:
    """COCO RLEs of ``paste_masks_binary(...)``, never building the image-sized masks.

    Only the pixels inside each box are evaluated; the runs outside it are computed. On CUDA the pixels
    inside the boxes are evaluated on the device (packed, column-major crops) and run-length encoded on the
    host, which needs the boxes on the host (one sync).

    Args: as paste_masks_binary.
    Returns:
        list of N dicts ``{"size": [H, W], "counts": bytes}`` (pycocotools' compressed RLE, column-major),
        decodable with pycocotools.mask.decode.
    """
    m, b, (h, w), padding = _prepare(masks, boxes, img_shape, padding, aligned)
    thr = real_number(threshold, "threshold")
    if m.device.type == "cuda":
        m, b = m.contiguous(), b.contiguous()
        boxes_cpu = b.cpu()
        windows = torch.empty((m.shape[0], 5), dtype=torch.int64)
        total = _C.paste_masks_windows(dl(boxes_cpu), m.shape[-2], m.shape[-1], padding, aligned, h, w, dl(windows))
        crops = torch.empty(total, dtype=torch.bool, device=m.device)
        _C.paste_masks_crops(dl(m), dl(b), dl(windows.to(m.device)), dl(crops), padding, aligned, thr, h, w,
                             stream(m))
        outside = bool(torch.zeros((), dtype=m.dtype) > thr)  # pixels outside every box, thresholded
        counts = _C.rle_from_crops(dl(crops.cpu()), dl(windows), h, w, outside)
    else:
        counts = _C.paste_masks_rle(dl(m.contiguous()), dl(b.contiguous()), h, w, padding, aligned, thr)
    return _rle_dicts(counts, h, w)


def rle_encode(masks: Tensor) -> list[dict]:
    """COCO compressed RLE of binary masks, like ``pycocotools.mask.encode(np.asfortranarray(m))``.

    Args:
        masks (Tensor[N, H, W]): bool or uint8 (non-zero = set); CUDA tensors are copied to the host.
    Returns:
        list of N dicts ``{"size": [H, W], "counts": bytes}``.
    """
    check_tensor(masks, "masks")
    if masks.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"masks must be bool or uint8, got {masks.dtype}")
    if masks.dim() != 3:
        raise ValueError(f"masks must have shape [N, H, W], got {list(masks.shape)}")
    h, w = int(masks.shape[1]), int(masks.shape[2])
    return _rle_dicts(_C.rle_encode(dl(masks.detach().cpu().contiguous())), h, w)
