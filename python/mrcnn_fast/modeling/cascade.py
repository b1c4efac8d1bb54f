"""Extra box stages after the box head (Cascade R-CNN's idea, not in the paper; FPN only)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from .heads import FastRCNNPredictor, Res5Head, TwoMLPHead, fast_rcnn_loss
from .poolers import boxes_to_rois
from .postprocess import Detections
from .refine import refine_boxes
from .roi_heads import RoIHeads, RoIPredictor
from .sampling import Matcher


class CascadeRoIHeads(RoIHeads):
    """RoIHeads with extra box stages (roi_heads.cascade_iou_thresholds).

    Stage k (k >= 1; stage 0 is the box head) is trained on stage k-1's regressed boxes (each sampled RoI moved
    by the regression of its GT class, or of its best foreground class for negatives; GT boxes appended),
    labelled at cascade_iou_thresholds[k-1], with regression weights box_reg_weights x (k + 1); the gradient
    each stage sends into the features is scaled by 1 / (number of stages). At inference each stage refines the
    detections once (CascadeRefinement among the refiners, after any test_box_refine passes).

    Args:
        cascade_heads, cascade_predictors, cascade_iou_thresholds: one TwoMLPHead, FastRCNNPredictor and IoU
            threshold in (0, 1) per extra stage.
        **kwargs: see RoIHeads.
    """

    def __init__(self, *, cascade_heads, cascade_predictors, cascade_iou_thresholds, **kwargs):
        cascade_heads, cascade_predictors = list(cascade_heads), list(cascade_predictors)
        if not isinstance(cascade_iou_thresholds, (list, tuple)) or any(
                isinstance(t, bool) or not isinstance(t, (int, float)) for t in cascade_iou_thresholds):
            raise ValueError(f"cascade_iou_thresholds must be a list of numbers in (0, 1), got "
                             f"{cascade_iou_thresholds!r}")
        thresholds = [float(t) for t in cascade_iou_thresholds]
        if not len(cascade_heads) == len(cascade_predictors) == len(thresholds):
            raise ValueError(f"cascade_heads ({len(cascade_heads)}), cascade_predictors ({len(cascade_predictors)}) "
                             f"and cascade_iou_thresholds ({len(thresholds)}) must have the same length")
        if any(not 0.0 < t < 1.0 for t in thresholds):
            raise ValueError(f"cascade_iou_thresholds must be in (0, 1), got {tuple(cascade_iou_thresholds)!r}")
        if isinstance(kwargs.get("box_head"), Res5Head):
            raise ValueError("cascade box stages are supported with FPN box heads only (not C4)")
        super().__init__(**kwargs)
        self.cascade_heads = nn.ModuleList(cascade_heads)
        self.cascade_predictors = nn.ModuleList(cascade_predictors)
        self.cascade_iou_thresholds = tuple(thresholds)
        self.cascade_matchers = [Matcher(t, t, allow_low_quality_matches=False) for t in thresholds]

    @classmethod
    def from_config(cls, cfg, in_channels: int, strides, res5=None, *, refiners=()) -> CascadeRoIHeads:
        if res5 is not None:
            raise ValueError("roi_heads.cascade_iou_thresholds needs the FPN box head (fpn.enabled = true)")
        r = cfg.model.roi_heads
        kw = cls.box_branch_kwargs(cfg, in_channels, strides, res5)
        thresholds = tuple(r.cascade_iou_thresholds)
        kw["cascade_heads"] = [TwoMLPHead(in_channels * r.box_pooler_resolution ** 2, r.box_head_fc_dim)
                               for _ in thresholds]
        kw["cascade_predictors"] = [FastRCNNPredictor(r.box_head_fc_dim, r.num_classes) for _ in thresholds]
        kw["cascade_iou_thresholds"] = thresholds
        kw.update(cls.mask_keypoint_kwargs(cfg, in_channels, strides, res5))
        return cls(**kw, refiners=refiners)

    @property
    def num_box_stages(self) -> int:
        return 1 + len(self.cascade_heads)

    def box_stage_weights(self, stage: int = 0) -> tuple[float, ...]:
        self._check_stage(stage)
        return tuple(w * (stage + 1) for w in self.box_reg_weights)

    def box_head_outputs(self, box_features: Tensor, stage: int = 0) -> tuple[Tensor, Tensor]:
        if stage == 0:
            return super().box_head_outputs(box_features, 0)
        self._check_stage(stage)
        return self.cascade_predictors[stage - 1](self.cascade_heads[stage - 1](box_features))

    # ---- training ---------------------------------------------------------------------------------

    def _train_box_features(self, feats, rois: Tensor) -> Tensor:
        x = self.box_pooler(feats, rois)
        # each stage's gradient into the shared features scaled by 1/stages (forward unchanged)
        s = 1.0 / self.num_box_stages
        return x * s + x.detach() * (1.0 - s)

    def _later_box_stage_losses(self, feats, samples, labels, class_logits, box_regression, targets,
                                image_sizes) -> dict:
        losses = {}
        for k in range(1, self.num_box_stages):
            with torch.no_grad():
                n = labels.shape[0]
                # the box each RoI becomes at inference: the regression of its class (GT class for positives,
                # best foreground class for the rest)
                cls = torch.where(labels > 0, labels, class_logits[:, 1:].argmax(dim=1) + 1)
                rows = torch.arange(n, device=cls.device)
                deltas = box_regression.detach().to(torch.float32).reshape(n, -1, 4)[rows, cls]
                prev = torch.cat([s[0] for s in samples]).to(torch.float32)
                moved = ops.decode_boxes(deltas.contiguous(), prev, self.box_stage_weights(k - 1)).reshape(n, 4)
                moved = [ops.clip_boxes(b, hw).to(s[0].dtype)
                         for b, hw, s in zip(moved.split([s[0].shape[0] for s in samples]), image_sizes, samples)]
                samples = self.sample_proposals(moved, targets, self.cascade_matchers[k - 1])
                labels = torch.cat([s[1] for s in samples])
                rois = boxes_to_rois([s[0] for s in samples])
                reg_targets, _ = self._regression_targets(samples, targets, rois, self.box_stage_weights(k))
            x = self.cascade_heads[k - 1](self._train_box_features(feats, rois))
            class_logits, box_regression = self.cascade_predictors[k - 1](x)
            lc, lb = fast_rcnn_loss(class_logits.to(reg_targets.dtype), box_regression.to(reg_targets.dtype), labels,
                                    reg_targets, self.smooth_l1_beta)
            losses[f"loss_classifier_stage{k + 1}"] = lc
            losses[f"loss_box_reg_stage{k + 1}"] = lb
        return losses


class CascadeRefinement:
    """One refinement pass of each cascade stage over the detections at inference, in stage order (see
    refine.refine_boxes)."""

    def __init__(self, num_stages: int):
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")
        self.num_stages = num_stages

    def __call__(self, predictor: RoIPredictor, dets: Detections, image_sizes) -> Detections:
        for stage in range(1, self.num_stages + 1):
            dets = refine_boxes(predictor, dets, image_sizes, stage)
        return dets

    def __repr__(self) -> str:
        return f"CascadeRefinement(num_stages={self.num_stages})"
