"""Refinements of the detections at inference, applied between detection selection and the mask / keypoint
heads (not in the paper): iterative box regression (roi_heads.test_box_refine) and mask-derived box sides
(roi_heads.test_mask_box). RoIHeads calls them in order through its `refiners` (see build_roi_heads).

Each refiner is a callable (predictor, dets, image_sizes) -> Detections, where predictor is a RoIPredictor (the
heads on one view's features, or FlipTTA's mean of two views) and dets / the result are padded Detections.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .. import ops
from .postprocess import MIN_BOX_SIDE, Detections, big_enough, pack, packed_rows, rois_from_padded

if TYPE_CHECKING:
    from .roi_heads import RoIPredictor


def clip_or_keep(new: Tensor, old: Tensor, image_hw, min_side: float = MIN_BOX_SIDE) -> Tensor:
    """new (Tensor[K, 4]) clipped to the image; rows that the clip collapses (a side < min_side; min_side 0: an
    empty side, see postprocess.big_enough) keep old."""
    new = ops.clip_boxes(new, image_hw)
    return torch.where(big_enough(new, min_side)[:, None], new, old)


def _min_side(predictor) -> float:
    """The heads' roi_heads.test_min_box_side."""
    return getattr(predictor.heads, "min_box_side", MIN_BOX_SIDE)


@torch.no_grad()
def refine_boxes(predictor: RoIPredictor, dets: Detections, image_sizes, stage: int = 0) -> Detections:
    """One pass of iterative box regression: box stage `stage` (0: the box head, k >= 1: cascade stage k) sees
    each detected box as a proposal, its regression for the detected class gives the new box (clipped to the
    image; a box that would collapse keeps its old one) and the score becomes sqrt(score * p(class | new pass)).
    Each image's detections are re-sorted by the new score."""
    counts = dets.counts.tolist()    # host sync: the box head runs on the valid detections only
    n = sum(counts)
    if n == 0:
        return dets
    probs, decoded = predictor.boxes(rois_from_padded(dets.boxes, dets.counts, n), stage)
    labels = pack(dets.labels, dets.counts, n)
    rows = torch.arange(n, device=labels.device)
    new, prob = decoded[rows, labels], probs[rows, labels]
    boxes, scores = torch.zeros_like(dets.boxes), torch.zeros_like(dets.scores)
    out_labels = torch.zeros_like(dets.labels)
    start = 0
    for i, (k, hw) in enumerate(zip(counts, image_sizes)):
        nb = clip_or_keep(new[start:start + k], dets.boxes[i, :k], hw, _min_side(predictor))
        ns = (dets.scores[i, :k] * prob[start:start + k]).sqrt()
        order = ns.argsort(descending=True, stable=True)
        boxes[i, :k], scores[i, :k], out_labels[i, :k] = nb[order], ns[order], dets.labels[i, :k][order]
        start += k
    return Detections(boxes, scores, out_labels, dets.counts)


def mask_box_edges(probs: Tensor, boxes: Tensor, threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    """The box of each predicted mask, to sub-cell precision: where the mask's column / row maxima cross the
    threshold, linearly interpolated between cell centres (the mask is pasted with bilinear interpolation, so
    this is where the pasted mask's edge falls).

    Args:
        probs (Tensor[N, M, M]): mask probabilities over boxes (Tensor[N, 4]), cell (i, j) centred at
            (x1 + (j + 0.5) w / M, y1 + (i + 0.5) h / M).
    Returns: (edges Tensor[N, 4] (x1, y1, x2, y2), valid Tensor[N, 4] bool). A side is invalid when the mask is
    empty or reaches that side of its box (the object may go on beyond it).
    """
    n, m = probs.shape[0], probs.shape[-1]
    if n == 0:
        return boxes.new_zeros((0, 4)), torch.zeros((0, 4), dtype=torch.bool, device=boxes.device)
    probs = probs.to(boxes.dtype)
    rows = torch.arange(n, device=probs.device)
    cells = torch.arange(m, device=probs.device).expand(n, m)

    def crossings(profile: Tensor):
        above = profile >= threshold
        first = torch.where(above, cells, m).min(dim=1).values
        last = torch.where(above, cells, -1).max(dim=1).values
        f, j = first.clamp(1, m - 1), last.clamp(0, m - 2)
        a, b = profile[rows, f - 1], profile[rows, f]
        lo = (f - 1).to(profile.dtype) + ((threshold - a) / (b - a).clamp_min(1e-6)).clamp(0, 1) + 0.5
        a, b = profile[rows, j], profile[rows, j + 1]
        hi = j.to(profile.dtype) + ((a - threshold) / (a - b).clamp_min(1e-6)).clamp(0, 1) + 0.5
        found = last >= 0
        return lo, hi, found & (first > 0), found & (last < m - 1)

    xl, xh, vxl, vxh = crossings(probs.amax(dim=1))
    yl, yh, vyl, vyh = crossings(probs.amax(dim=2))
    sx = (boxes[:, 2] - boxes[:, 0]) / m
    sy = (boxes[:, 3] - boxes[:, 1]) / m
    edges = torch.stack([boxes[:, 0] + xl * sx, boxes[:, 1] + yl * sy, boxes[:, 0] + xh * sx, boxes[:, 1] + yh * sy], 1)
    return edges, torch.stack([vxl, vyl, vxh, vyh], 1)


@torch.no_grad()
def mask_box_sides(predictor: RoIPredictor, dets: Detections, image_sizes, *, weight: float,
                   expand: float) -> Detections:
    """Moves each detected box's sides towards the edges of its mask: the mask head runs on the box enlarged
    `expand` times about its centre, and every side where the mask's edge lies inside that box moves to
    (1 - weight) x regressed + weight x mask edge. Scores, labels and order are unchanged; a box that would
    collapse keeps its old one."""
    counts = dets.counts.tolist()    # host sync: the mask head runs on the valid detections only
    n = sum(counts)
    if n == 0:
        return dets
    b = pack(dets.boxes, dets.counts, n)
    labels = pack(dets.labels, dets.counts, n)
    centre, half = (b[:, :2] + b[:, 2:]) / 2, (b[:, 2:] - b[:, :2]) / 2 * expand
    loose = torch.cat([centre - half, centre + half], 1)
    image, _ = packed_rows(dets.counts, n)
    probs = predictor.mask_probs(torch.cat([image.to(loose.dtype)[:, None], loose], 1), labels)[:, 0]
    edges, valid = mask_box_edges(probs, loose)
    fused = torch.where(valid, (1 - weight) * b + weight * edges, b)
    boxes, start = torch.zeros_like(dets.boxes), 0
    for i, (k, hw) in enumerate(zip(counts, image_sizes)):
        boxes[i, :k] = clip_or_keep(fused[start:start + k], dets.boxes[i, :k], hw, _min_side(predictor))
        start += k
    return Detections(boxes, dets.scores, dets.labels, dets.counts)


class IterativeBoxRefinement:
    """roi_heads.test_box_refine: `passes` extra passes of the box head over the detections (iterative
    bounding-box regression, see refine_boxes; 0 = the paper's single pass)."""

    def __init__(self, passes: int):
        if isinstance(passes, bool) or not isinstance(passes, int) or passes < 0:
            raise ValueError(f"test_box_refine must be an int >= 0, got {passes!r}")
        self.passes = passes

    def __call__(self, predictor: RoIPredictor, dets: Detections, image_sizes) -> Detections:
        for _ in range(self.passes):
            dets = refine_boxes(predictor, dets, image_sizes, 0)
        return dets

    def __repr__(self) -> str:
        return f"IterativeBoxRefinement(passes={self.passes})"


class MaskBoxRefinement:
    """roi_heads.test_mask_box / test_mask_box_expand: mask-derived box sides (see mask_box_sides; weight 0 =
    off, the paper). The mask head's targets come from boxes of IoU >= 0.5 around the object, so it segments
    the whole object in a loose box; its edge is a second, independent estimate of the box."""

    def __init__(self, weight: float, expand: float = 1.25):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
            raise ValueError(f"test_mask_box must be a number in [0, 1], got {weight!r}")
        if isinstance(expand, bool) or not isinstance(expand, (int, float)) or not 1.0 <= expand <= 4.0:
            raise ValueError(f"test_mask_box_expand must be a number in [1, 4], got {expand!r}")
        self.weight, self.expand = float(weight), float(expand)

    def __call__(self, predictor: RoIPredictor, dets: Detections, image_sizes) -> Detections:
        return mask_box_sides(predictor, dets, image_sizes, weight=self.weight, expand=self.expand)

    def __repr__(self) -> str:
        return f"MaskBoxRefinement(weight={self.weight}, expand={self.expand})"
