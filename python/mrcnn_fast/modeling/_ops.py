"""TEMPORARY shim: the ops the model uses, routed to mrcnn_fast.ops where they have landed and to
torchvision or plain torch otherwise. Every name here follows the signature in CONTRACTS_ISSUE3.md so
that switching to mrcnn_fast.ops is a one-line change; by the end this module only re-exports
mrcnn_fast.ops (the package must not import torchvision at runtime).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import ops as _ops

box_iou = _ops.box_iou


def _tv():
    import torchvision  # TEMPORARY: fallback until the kernel lands in mrcnn_fast.ops

    return torchvision


def _have(name):
    return getattr(_ops, name, None)


# ---- boxes ---------------------------------------------------------------------------------------

_BBOX_CLAMP = math.log(1000.0 / 16)


def encode_boxes(reference_boxes: Tensor, proposals: Tensor, weights) -> Tensor:
    if _have("encode_boxes"):
        return _ops.encode_boxes(reference_boxes, proposals, weights)
    wx, wy, ww, wh = weights
    pw = proposals[:, 2] - proposals[:, 0]
    ph = proposals[:, 3] - proposals[:, 1]
    px = proposals[:, 0] + 0.5 * pw
    py = proposals[:, 1] + 0.5 * ph
    gw = reference_boxes[:, 2] - reference_boxes[:, 0]
    gh = reference_boxes[:, 3] - reference_boxes[:, 1]
    gx = reference_boxes[:, 0] + 0.5 * gw
    gy = reference_boxes[:, 1] + 0.5 * gh
    return torch.stack([wx * (gx - px) / pw, wy * (gy - py) / ph, ww * torch.log(gw / pw), wh * torch.log(gh / ph)], 1)


def decode_boxes(deltas: Tensor, boxes: Tensor, weights, clamp: float = _BBOX_CLAMP) -> Tensor:
    """deltas [N, 4k], boxes [N, 4] -> [N, 4k]."""
    if _have("decode_boxes"):
        return _ops.decode_boxes(deltas, boxes, weights, clamp)
    wx, wy, ww, wh = weights
    boxes = boxes.to(deltas.dtype)
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    cx = (boxes[:, 0] + 0.5 * w)[:, None]
    cy = (boxes[:, 1] + 0.5 * h)[:, None]
    w, h = w[:, None], h[:, None]
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw = (deltas[:, 2::4] / ww).clamp(max=clamp)
    dh = (deltas[:, 3::4] / wh).clamp(max=clamp)
    pcx, pcy = dx * w + cx, dy * h + cy
    pw, ph = torch.exp(dw) * w, torch.exp(dh) * h
    out = torch.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], 2)
    return out.reshape(deltas.shape)


def clip_boxes(boxes: Tensor, image_hw) -> Tensor:
    if _have("clip_boxes"):
        return _ops.clip_boxes(boxes, image_hw)
    h, w = image_hw
    x = boxes[..., 0::2].clamp(0, w)
    y = boxes[..., 1::2].clamp(0, h)
    return torch.stack([x, y], -1).reshape(boxes.shape)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    if _have("remove_small_boxes"):
        return _ops.remove_small_boxes(boxes, min_size)
    ws, hs = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return torch.where((ws >= min_size) & (hs >= min_size))[0]


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    if _have("nms"):
        return _ops.nms(boxes, scores, iou_threshold)
    return _tv().ops.nms(boxes, scores, iou_threshold)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    if _have("batched_nms"):
        return _ops.batched_nms(boxes, scores, idxs, iou_threshold)
    return _tv().ops.batched_nms(boxes, scores, idxs, iou_threshold)


# ---- anchors / proposals -------------------------------------------------------------------------

def cell_anchors(sizes, aspect_ratios, dtype=torch.float32, device="cpu") -> Tensor:
    """Tensor[len(ratios) * len(sizes), 4] zero-centred anchors, ratio-major (torchvision's order)."""
    scales = torch.as_tensor(sizes, dtype=dtype, device=device)
    ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
    hr = torch.sqrt(ratios)
    ws = (scales[None, :] / hr[:, None]).reshape(-1)
    hs = (scales[None, :] * hr[:, None]).reshape(-1)
    return (torch.stack([-ws, -hs, ws, hs], 1) / 2).round()


def grid_anchors(cell: Tensor, grid_hw, stride_hw) -> Tensor:
    """Tensor[H * W * A, 4]: index (y * W + x) * A + a, matching a head output permuted to [N, H, W, A]."""
    h, w = grid_hw
    sy, sx = stride_hw
    xs = torch.arange(w, dtype=torch.int32, device=cell.device) * sx
    ys = torch.arange(h, dtype=torch.int32, device=cell.device) * sy
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    xx, yy = xx.reshape(-1), yy.reshape(-1)
    shifts = torch.stack([xx, yy, xx, yy], 1).to(cell.dtype)
    return (shifts[:, None, :] + cell[None, :, :]).reshape(-1, 4)


def generate_proposals(objectness, deltas, anchors, image_sizes, pre_nms_top_n, post_nms_top_n, nms_thresh,
                       score_thresh=0.0, min_size=1e-3):
    """torchvision RPN.filter_proposals semantics; returns (boxes [N, post, 4], scores [N, post], counts [N])."""
    if _have("generate_proposals"):
        return _ops.generate_proposals(objectness, deltas, anchors, image_sizes, pre_nms_top_n, post_nms_top_n,
                                       nms_thresh, score_thresh, min_size)
    n = objectness[0].shape[0]
    per_level_boxes, per_level_scores, per_level_ids = [], [], []
    for lvl, (obj, dlt, anc) in enumerate(zip(objectness, deltas, anchors)):
        k = min(pre_nms_top_n, obj.shape[1])
        top, idx = obj.topk(k, dim=1)
        d = torch.gather(dlt, 1, idx[:, :, None].expand(n, k, 4))
        a = anc[idx.reshape(-1)]
        b = decode_boxes(d.reshape(-1, 4), a, (1.0, 1.0, 1.0, 1.0)).reshape(n, k, 4)
        per_level_boxes.append(b)
        per_level_scores.append(top)
        per_level_ids.append(torch.full((k,), lvl, dtype=torch.int64, device=obj.device))
    boxes = torch.cat(per_level_boxes, 1)
    logits = torch.cat(per_level_scores, 1)
    lvl_ids = torch.cat(per_level_ids)
    out_b = boxes.new_zeros((n, post_nms_top_n, 4))
    out_s = logits.new_zeros((n, post_nms_top_n))
    counts = torch.zeros(n, dtype=torch.int64)
    for i in range(n):
        b = clip_boxes(boxes[i], image_sizes[i])
        s = torch.sigmoid(logits[i])
        ids = lvl_ids
        keep = remove_small_boxes(b, min_size)
        b, s, ids = b[keep], s[keep], ids[keep]
        keep = torch.where(s >= score_thresh)[0]
        b, s, ids = b[keep], s[keep], ids[keep]
        keep = batched_nms(b, s, ids, nms_thresh)[:post_nms_top_n]
        c = keep.numel()
        out_b[i, :c] = b[keep]
        out_s[i, :c] = s[keep]
        counts[i] = c
    return out_b, out_s, counts.to(objectness[0].device)


# ---- RoI pooling ---------------------------------------------------------------------------------

def roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False, *, mode="avg"):
    if _have("roi_align"):
        return _ops.roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, mode=mode)
    if mode != "avg":
        raise NotImplementedError("roi_align mode='max' needs mrcnn_fast.ops.roi_align")
    return _tv().ops.roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)


def roi_pool(input, boxes, output_size, spatial_scale=1.0):
    if _have("roi_pool"):
        return _ops.roi_pool(input, boxes, output_size, spatial_scale)
    return _tv().ops.roi_pool(input, boxes, output_size, spatial_scale)


def roi_warp(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=2):
    if _have("roi_warp"):
        return _ops.roi_warp(input, boxes, output_size, spatial_scale, sampling_ratio)
    # Approximation until the op lands: box corners quantised to the feature grid, then bilinear sampling.
    q = boxes.clone()
    q[:, 1:] = torch.round(q[:, 1:] * spatial_scale) / spatial_scale
    return _tv().ops.roi_align(input, q, output_size, spatial_scale, sampling_ratio, False)


def fpn_level_assign(boxes, k_min, k_max, canonical_level=4, canonical_scale=224):
    if _have("fpn_level_assign"):
        return _ops.fpn_level_assign(boxes, k_min, k_max, canonical_level, canonical_scale)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    lvl = torch.floor(canonical_level + torch.log2(torch.sqrt(area) / canonical_scale + 1e-6))
    return (lvl.clamp(k_min, k_max) - k_min).to(torch.int64)


def multilevel_roi_align(features, boxes, output_size, spatial_scales, sampling_ratio=-1, aligned=False, *,
                         canonical_level=4, canonical_scale=224, mode="avg"):
    if _have("multilevel_roi_align"):
        return _ops.multilevel_roi_align(features, boxes, output_size, spatial_scales, sampling_ratio, aligned,
                                         canonical_level=canonical_level, canonical_scale=canonical_scale, mode=mode)
    k_min = int(round(-math.log2(spatial_scales[0])))
    k_max = int(round(-math.log2(spatial_scales[-1])))
    levels = fpn_level_assign(boxes[:, 1:], k_min, k_max, canonical_level, canonical_scale)
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    out = features[0].new_zeros((boxes.shape[0], features[0].shape[1], oh, ow))
    for lvl, (f, s) in enumerate(zip(features, spatial_scales)):
        idx = torch.where(levels == lvl)[0]
        if idx.numel():
            out[idx] = roi_align(f, boxes[idx], (oh, ow), s, sampling_ratio, aligned, mode=mode)
    return out


# ---- masks ---------------------------------------------------------------------------------------

def paste_masks_in_image(masks, boxes, img_shape, padding=1):
    if _have("paste_masks_in_image"):
        return _ops.paste_masks_in_image(masks, boxes, img_shape, padding)
    from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste

    return tv_paste(masks, boxes, tuple(img_shape), padding)


def paste_masks_rle(masks, boxes, img_shape, threshold=0.5, padding=1):
    if _have("paste_masks_rle"):
        return _ops.paste_masks_rle(masks, boxes, img_shape, threshold, padding)
    import numpy as np
    from pycocotools import mask as mask_util

    full = paste_masks_in_image(masks, boxes, img_shape, padding)[:, 0] >= threshold
    rles = []
    for m in full:
        r = mask_util.encode(np.asfortranarray(m.cpu().numpy().astype(np.uint8)))
        rles.append({"size": [int(img_shape[0]), int(img_shape[1])], "counts": r["counts"]})
    return rles
