"""Target assignment: IoU matcher and the balanced positive/negative sampler."""
from __future__ import annotations

import torch
from torch import Tensor


class Matcher:
    """Assigns each prediction (column of an IoU matrix) to its best ground truth (row).

    Returns for each prediction the matched GT index, or BELOW_LOW (-1) when the best IoU < low_thresh,
    or BETWEEN (-2) when low_thresh <= best IoU < high_thresh.

    allow_low_quality_matches: every GT also keeps the predictions that reach its own highest IoU (even if
    below high_thresh), so that no GT is left without a positive (Faster R-CNN's RPN rule).
    """

    BELOW_LOW = -1
    BETWEEN = -2

    def __init__(self, high_thresh: float, low_thresh: float, allow_low_quality_matches: bool = False):
        if low_thresh > high_thresh:
            raise ValueError(f"low_thresh ({low_thresh}) must be <= high_thresh ({high_thresh})")
        self.high_thresh = high_thresh
        self.low_thresh = low_thresh
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: Tensor) -> Tensor:
        """iou (Tensor[G, P]) -> Tensor[P] int64."""
        if iou.shape[0] == 0:
            return torch.full((iou.shape[1],), self.BELOW_LOW, dtype=torch.int64, device=iou.device)
        best, matches = iou.max(dim=0)
        out = matches.clone()
        out[best < self.low_thresh] = self.BELOW_LOW
        out[(best >= self.low_thresh) & (best < self.high_thresh)] = self.BETWEEN
        if self.allow_low_quality_matches:
            best_per_gt = iou.max(dim=1, keepdim=True).values
            # a GT with IoU 0 to everything must not claim every prediction
            hit = (iou == best_per_gt) & (best_per_gt > 0)
            cols = hit.any(dim=0)
            out[cols] = matches[cols]
        return out


class BalancedSampler:
    """Samples up to batch_size_per_image labels per image, at most positive_fraction of them positive;
    negatives fill the rest. labels: 1+ positive (any class), 0 negative, -1 ignored."""

    def __init__(self, batch_size_per_image: int, positive_fraction: float):
        if batch_size_per_image <= 0:
            raise ValueError(f"batch_size_per_image must be positive, got {batch_size_per_image}")
        if not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, labels: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """labels (Tensor[P]) -> (pos_idx Tensor[p], neg_idx Tensor[n]) indices into labels."""
        pos = torch.where(labels >= 1)[0]
        neg = torch.where(labels == 0)[0]
        num_pos = min(pos.numel(), int(self.batch_size_per_image * self.positive_fraction))
        num_neg = min(neg.numel(), self.batch_size_per_image - num_pos)
        if num_pos < pos.numel():
            pos = pos[torch.randperm(pos.numel(), device=pos.device, generator=generator)[:num_pos]]
        if num_neg < neg.numel():
            neg = neg[torch.randperm(neg.numel(), device=neg.device, generator=generator)[:num_neg]]
        return pos, neg
