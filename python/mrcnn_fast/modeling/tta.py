"""Horizontal-flip test-time augmentation around a whole MaskRCNN (roi_heads.test_flip; not in the paper)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..data.keypoints import flip_permutation
from ..data.transforms import hflip_boxes
from .postprocess import check_mask_format, pack, rois_from_padded
from .roi_heads import RoIHeads, RoIPredictor

if TYPE_CHECKING:
    from .mask_rcnn import MaskRCNN


def mirror_batch(batch: Tensor, image_sizes) -> Tensor:
    """Every image of a padded batch (Tensor[N, C, H, W]) mirrored within its own width (h, w per image): the
    padding stays on the right, where the backbone saw it."""
    mirrored = batch.clone()
    for i, (h, w) in enumerate(image_sizes):
        mirrored[i, :, :h, :w] = batch[i, :, :h, :w].flip(-1)
    return mirrored


def join_padded(a: Tensor, count_a: Tensor, b: Tensor, count_b: Tensor) -> tuple[Tensor, Tensor]:
    """Per image, the valid rows of a then those of b.

    Args:
        a (Tensor[N, Pa, ...]), count_a (Tensor[N]), b (Tensor[N, Pb, ...]), count_b (Tensor[N]): padded batches.
    Returns: (Tensor[N, Pa + Pb, ...], counts Tensor[N]); rows at or past the joint count are zero.
    """
    n, pa, pb = a.shape[0], a.shape[1], b.shape[1]
    tail = (slice(None), slice(None)) + (None,) * (a.dim() - 2)
    keep_a = (torch.arange(pa, device=a.device) < count_a[:, None])[tail]
    keep_b = (torch.arange(pb, device=b.device) < count_b[:, None])[tail]
    out = torch.cat([torch.where(keep_a, a, 0), a.new_zeros((n, pb) + a.shape[2:])], 1)
    rows = torch.arange(n, device=a.device)[:, None].expand(n, pb)
    out[rows, count_a[:, None] + torch.arange(pb, device=a.device)] = torch.where(keep_b, b, 0)
    return out, count_a + count_b


class FlipPredictor(RoIPredictor):
    """The mean of the heads' predictions on the images and on their mirrors: class probabilities and decoded
    boxes (mirrored back), mask probabilities (the mirror's masks mirrored back) and keypoint heatmap logits (the
    mirror's maps mirrored back with the keypoints of each flip pair swapped).

    Args:
        heads: the RoI heads; feats / mirror_feats: the backbone's features of the batch and of mirror_batch(batch).
        widths (Tensor[N]): each resized image's width, in the boxes' dtype.
        keypoint_flip_perm: the keypoint permutation a mirror applies (None without a keypoint head).
    """

    def __init__(self, heads: RoIHeads, feats: list[Tensor], mirror_feats: list[Tensor], widths: Tensor,
                 keypoint_flip_perm: list[int] | None = None):
        super().__init__(heads, feats)
        self.mirror_feats, self.widths, self.keypoint_flip_perm = mirror_feats, widths, keypoint_flip_perm

    def _row_widths(self, rois: Tensor) -> Tensor:
        return self.widths[rois[:, 0].to(torch.int64)]

    def _mirror(self, rois: Tensor) -> Tensor:
        return torch.cat([rois[:, :1], hflip_boxes(rois[:, 1:], self._row_widths(rois))], 1)

    def boxes(self, rois: Tensor, stage: int = 0) -> tuple[Tensor, Tensor]:
        probs, decoded = self.heads.box_predictions(self.feats, rois, stage)
        m_probs, m_decoded = self.heads.box_predictions(self.mirror_feats, self._mirror(rois), stage)
        return (probs + m_probs) / 2, (decoded + hflip_boxes(m_decoded, self._row_widths(rois)[:, None])) / 2

    def mask_probs(self, rois: Tensor, labels: Tensor) -> Tensor:
        probs = self.heads.mask_probabilities(self.feats, rois, labels)
        if rois.shape[0] == 0:
            return probs
        return (probs + self.heads.mask_probabilities(self.mirror_feats, self._mirror(rois), labels).flip(-1)) / 2

    def keypoint_heatmaps(self, rois: Tensor) -> Tensor:
        maps = self.heads.keypoint_heatmaps(self.feats, rois)
        if rois.shape[0] == 0:
            return maps
        mirrored = self.heads.keypoint_heatmaps(self.mirror_feats, self._mirror(rois))
        return (maps + mirrored[:, self.keypoint_flip_perm].flip(-1)) / 2


class FlipTTA(nn.Module):
    """Horizontal-flip test-time augmentation of a MaskRCNN, in the spirit of detectron2's
    GeneralizedRCNNWithTTA: the backbone and RPN also run on the mirrored images, the union of both views'
    proposals goes to the RoI heads, and every box, mask and keypoint prediction (also those of the refiners:
    test_box_refine, cascade stages, test_mask_box) is the mean of the two views (see FlipPredictor). About 2x
    the inference cost. Inference only; the wrapped model (`model`, shared, not copied) is what trains.

    forward(images, *, mask_format="prob"): as MaskRCNN's inference.

    Args:
        model: the MaskRCNN.
        keypoint_flip_pairs: 0-based (left, right) keypoint index pairs a mirror image swaps (config
            keypoint.flip_pairs); used when the model has a keypoint head.
    """

    def __init__(self, model: MaskRCNN, keypoint_flip_pairs=()):
        super().__init__()
        self.model = model
        self.keypoint_flip_perm = None
        kh = model.roi_heads.keypoint_head
        if kh is not None:
            k = kh.kps_score_lowres.out_channels
            try:
                self.keypoint_flip_perm = flip_permutation(k, keypoint_flip_pairs)
            except (TypeError, ValueError) as e:
                raise ValueError(f"keypoint_flip_pairs do not fit the {k} keypoints: {e}") from None

    @classmethod
    def from_config(cls, cfg, model: MaskRCNN) -> FlipTTA:
        return cls(model, keypoint_flip_pairs=tuple(tuple(p) for p in cfg.model.keypoint.flip_pairs))

    def predictor(self, feats: list[Tensor], mirror_feats: list[Tensor], image_sizes,
                  dtype: torch.dtype = torch.float32) -> FlipPredictor:
        """The two-view predictor of a batch with features feats and of its mirror (mirror_batch), for boxes of
        the given dtype."""
        widths = torch.tensor([float(w) for _, w in image_sizes], dtype=dtype, device=feats[0].device)
        return FlipPredictor(self.model.roi_heads, feats, mirror_feats, widths, self.keypoint_flip_perm)

    @torch.no_grad()
    def forward(self, images: list[Tensor], *, mask_format: str = "prob") -> list[dict]:
        check_mask_format(mask_format)
        if self.training:
            raise ValueError("FlipTTA is for inference: call .eval() first (train the wrapped model, FlipTTA.model)")
        m = self.model
        m.check_inputs(images)
        batch, image_sizes, _, input_sizes = m.preprocess(list(images))
        batch = m.to_model_layout(batch)
        image_hw = batch.shape[-2:]
        feats = m.backbone(batch)
        mirror_feats = m.backbone(mirror_batch(batch, image_sizes))
        proposals, counts, _ = m.rpn(image_hw, feats, image_sizes)
        m_proposals, m_counts, _ = m.rpn(image_hw, mirror_feats, image_sizes)
        predictor = self.predictor(feats, mirror_feats, image_sizes, proposals.dtype)
        # both views nominate boxes, so that the result is symmetric in the two
        proposals, counts = join_padded(proposals, counts, hflip_boxes(m_proposals, predictor.widths[:, None]),
                                        m_counts)
        rh = m.roi_heads
        total = int(counts.sum())    # host sync: the box head runs on the valid proposals only
        probs, boxes = predictor.boxes(rois_from_padded(proposals, counts, total))
        dets = rh.refine_detections(predictor, rh.detect(probs, boxes, counts, image_sizes), image_sizes)
        total = int(dets.counts.sum())    # host sync: the mask and keypoint heads run on the detections only
        rois = rois_from_padded(dets.boxes, dets.counts, total)
        mask_probs = heatmaps = None
        if rh.mask_head is not None:
            mask_probs = predictor.mask_probs(rois, pack(dets.labels, dets.counts, total))
        if rh.keypoint_head is not None:
            heatmaps = predictor.keypoint_heatmaps(rois)
        return m.postprocess(dets, image_sizes, input_sizes, mask_probs=mask_probs, keypoint_heatmaps=heatmaps,
                             mask_format=mask_format)
