"""TEMPORARY shim: the ops the model uses, routed to mrcnn_fast.ops where they have landed and to
torchvision or plain torch otherwise. Every name here follows the signature in CONTRACTS_ISSUE3.md so
that switching to mrcnn_fast.ops is a one-line change; by the end this module only re-exports
mrcnn_fast.ops (the package must not import torchvision at runtime).
"""
from __future__ import annotations

import math

import torch

from .. import ops as _ops

box_iou = _ops.box_iou


def _tv():
    import torchvision  # TEMPORARY: fallback until the kernel lands in mrcnn_fast.ops

    return torchvision


def _have(name):
    return getattr(_ops, name, None)


# ---- landed in mrcnn_fast.ops -------------------------------------------------------------------

encode_boxes = _ops.encode_boxes
decode_boxes = _ops.decode_boxes            # [N, 4k], [N, 4] -> [N, k, 4]
clip_boxes = _ops.clip_boxes
remove_small_boxes = _ops.remove_small_boxes
nms = _ops.nms
batched_nms = _ops.batched_nms
anchors_for_level = _ops.anchors_for_level
generate_proposals = _ops.generate_proposals
roi_pool = _ops.roi_pool
paste_masks_in_image = _ops.paste_masks_in_image
paste_masks_rle = _ops.paste_masks_rle


# ---- RoI pooling ---------------------------------------------------------------------------------

def roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False, *, mode="avg"):
    if _have("roi_align"):
        return _ops.roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, mode=mode)
    if mode != "avg":
        raise NotImplementedError("roi_align mode='max' needs mrcnn_fast.ops.roi_align")
    return _tv().ops.roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)


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
