"""RoI feature extraction over one level (C4) or the FPN levels, with the paper's Table 2c variants."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import ops
from ..ops._rois import roi_dtype, stack_with_batch_index

POOLER_TYPES = ("roi_align", "roi_align_max", "roi_warp", "roi_warp_max", "roi_pool")


def boxes_to_rois(boxes: list[Tensor]) -> Tensor:
    """list of Tensor[Ki, 4] -> Tensor[sum Ki, 5] (batch index, x1, y1, x2, y2)."""
    if not boxes:
        raise ValueError("boxes must be a non-empty list (one tensor per image)")
    return stack_with_batch_index(boxes)


class RoIPooler(nn.Module):
    """Pools RoIs to Tensor[K, C, R, R] from feature maps of the given strides.

    Args:
        output_size: R.
        strides: stride of each feature level (one level for C4; P2..P5 for FPN, levels assigned by the FPN
            paper's rule k = floor(4 + log2(sqrt(area) / 224)) clamped to the levels).
        pooler_type: roi_align (bilinear, average; the paper) | roi_align_max (bilinear, max) |
            roi_warp (quantised box, bilinear, average) | roi_warp_max (quantised box, bilinear, max) |
            roi_pool (quantised box and bins, max).
        sampling_ratio: bilinear samples per bin side (<= 0: adaptive); RoIAlign / RoIWarp only.
        aligned: half-pixel offset for RoIAlign.
        level_mapping: the FPN level of a RoI: "torchvision" floor(k0 + log2(sqrt(area) / s0) + 1e-6) |
            "detectron2" floor(k0 + log2(sqrt(area) / s0 + 1e-8)) (k0 = canonical_level, s0 = canonical_scale).
    """

    def __init__(self, output_size: int, strides, pooler_type: str = "roi_align", sampling_ratio: int = 2,
                 aligned: bool = True, canonical_level: int = 4, canonical_scale: int = 224,
                 level_mapping: str = "torchvision"):
        super().__init__()
        if pooler_type not in POOLER_TYPES:
            raise ValueError(f"pooler_type must be one of {POOLER_TYPES}, got {pooler_type!r}")
        self.output_size = int(output_size)
        self.strides = [int(s) for s in strides]
        self.scales = [1.0 / s for s in self.strides]
        self.pooler_type = pooler_type
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.canonical_level = canonical_level
        self.canonical_scale = canonical_scale
        if level_mapping not in ops.LEVEL_MAPPINGS:
            raise ValueError(f"level_mapping must be one of {ops.LEVEL_MAPPINGS}, got {level_mapping!r}")
        self.level_mapping = level_mapping
        levels = [math.log2(s) for s in self.strides]
        if any(abs(lv - round(lv)) > 1e-6 for lv in levels):
            raise ValueError(f"strides must be powers of two, got {self.strides}")
        self.k_min, self.k_max = int(round(levels[0])), int(round(levels[-1]))

    def _single(self, f: Tensor, rois: Tensor, scale: float) -> Tensor:
        r = (self.output_size, self.output_size)
        t = self.pooler_type
        if t == "roi_align":
            return ops.roi_align(f, rois, r, scale, self.sampling_ratio, self.aligned)
        if t == "roi_align_max":
            return ops.roi_align(f, rois, r, scale, self.sampling_ratio, self.aligned, mode="max")
        if t in ("roi_warp", "roi_warp_max"):
            return ops.roi_warp(f, rois, r, scale, max(self.sampling_ratio, 1),
                                mode="max" if t == "roi_warp_max" else "avg")
        return ops.roi_pool(f, rois, r, scale)

    def forward(self, feats: list[Tensor], rois: Tensor) -> Tensor:
        """feats: Tensor[N, C, Hi, Wi] per stride, finest first (extra coarser levels, e.g. P6, are ignored);
        rois (Tensor[K, 5]) -> Tensor[K, C, R, R]."""
        if len(feats) < len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature levels, got {len(feats)}")
        feats = feats[:len(self.strides)]
        rois = rois.to(roi_dtype(feats[0].dtype))
        if rois.shape[0] == 0:   # no RoIs: an empty batch keeps the heads in the graph without calling a kernel
            return feats[0].new_zeros((0, feats[0].shape[1], self.output_size, self.output_size))
        if len(feats) == 1:
            return self._single(feats[0], rois, self.scales[0])
        if self.pooler_type in ("roi_align", "roi_align_max"):
            return ops.multilevel_roi_align(
                feats, rois, (self.output_size, self.output_size), self.scales, self.sampling_ratio, self.aligned,
                canonical_level=self.canonical_level, canonical_scale=self.canonical_scale,
                mode="max" if self.pooler_type == "roi_align_max" else "avg", level_mapping=self.level_mapping)
        levels = ops.fpn_level_assign(rois[:, 1:], self.k_min, self.k_max, self.canonical_level,
                                      self.canonical_scale, level_mapping=self.level_mapping)
        out = feats[0].new_zeros((rois.shape[0], feats[0].shape[1], self.output_size, self.output_size))
        for lvl, (f, s) in enumerate(zip(feats, self.scales)):
            idx = torch.where(levels == lvl)[0]
            if idx.numel():
                out = out.index_copy(0, idx, self._single(f, rois[idx], s))
        return out
