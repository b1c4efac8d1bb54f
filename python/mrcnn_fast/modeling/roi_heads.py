"""RoI heads, the paper's second stage: proposal sampling, the box / mask / keypoint branches, their training
losses, and the pieces of inference (on the networks' outputs, the functions of postprocess.py).

Not in the paper, each in its own module: extra box stages (cascade.CascadeRoIHeads), refinements of the
detections at inference (refine.py, run through `refiners`) and flip test-time augmentation (tta.FlipTTA).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable

import torch
from torch import Tensor, nn

from .. import ops
from .heads import (
    FastRCNNPredictor,
    KeypointHead,
    MaskFCNHead,
    MaskMLPHead,
    Res5Head,
    build_box_head,
    fast_rcnn_loss,
    keypoint_loss,
    keypoint_targets,
    mask_loss,
    mask_targets,
)
from .poolers import RoIPooler, boxes_to_rois
from .postprocess import (
    KEYPOINT_SCORES,
    MIN_BOX_SIDE,
    Detections,
    class_probs_and_boxes,
    detections_from_box_outputs,
    mask_probs,
    rois_from_padded,
    select_detections,
)
from .sampling import BalancedSampler, Matcher

# (predictor, dets, image_sizes) -> Detections, see refine.py
Refiner = Callable[["RoIPredictor", Detections, Sequence], Detections]


class RoIPredictor:
    """The RoI heads' inference predictions for given RoIs on one view's features: what the refinements of the
    detections call (refine.py). tta.FlipPredictor gives the mean over an image and its mirror instead.

    rois: Tensor[R, 5] (batch index, x1, y1, x2, y2) in the resized images' coordinates.
    """

    def __init__(self, heads: RoIHeads, feats: list[Tensor]):
        self.heads, self.feats = heads, feats

    def boxes(self, rois: Tensor, stage: int = 0) -> tuple[Tensor, Tensor]:
        """(Tensor[R, C + 1] class probabilities, Tensor[R, C + 1, 4] decoded boxes) of box stage `stage`."""
        return self.heads.box_predictions(self.feats, rois, stage)

    def mask_probs(self, rois: Tensor, labels: Tensor) -> Tensor:
        """Tensor[R, 1, M, M] mask probabilities of class labels (Tensor[R]) in each RoI."""
        return self.heads.mask_probabilities(self.feats, rois, labels)

    def keypoint_heatmaps(self, rois: Tensor) -> Tensor:
        """Tensor[R, K, S, S] keypoint heatmap logits in each RoI."""
        return self.heads.keypoint_heatmaps(self.feats, rois)


class RoIHeads(nn.Module):
    """The second stage. Box branch always; mask and keypoint branches optional.

    Args:
        box_pooler, box_head, box_predictor: box branch. If box_head is a Res5Head (C4), its 7x7 res5 output is
            reused by the mask head in training and the mask head must expect it (MaskFCNHead without convs).
        mask_pooler / mask_head: None disables masks. With a Res5Head box head, mask_pooler is the C4 pooler
            feeding res5 at inference.
        mask_loss_type: "sigmoid" | "softmax".
        keypoint_pooler / keypoint_head: None disables keypoints.
        keypoint_score: keypoints_scores at inference, "logit" | "prob" (postprocess.heatmaps_to_keypoints).
        num_classes: foreground classes (labels 1..C).
        fg_iou_thresh, bg_iou_thresh: RoI labelling; batch_size_per_image, positive_fraction: RoI sampling.
        box_reg_weights: (wx, wy, ww, wh) of the box encoding.
        score_thresh, nms_thresh, detections_per_image: inference (postprocess.select_detections).
        min_box_side: detections with a side below this (px) are dropped (0: none, detectron2); the refiners'
            boxes that the clip collapses below it (0: to an empty side) keep their old box.
        refiners: callables (predictor, dets, image_sizes) -> Detections applied in order to the detections at
            inference, before the mask and keypoint heads (refine.py; none in the paper).
    """

    def __init__(self, *, box_pooler: RoIPooler, box_head: nn.Module, box_predictor: FastRCNNPredictor,
                 num_classes: int, mask_pooler: RoIPooler | None = None, mask_head: nn.Module | None = None,
                 mask_loss_type: str = "sigmoid", keypoint_pooler: RoIPooler | None = None,
                 keypoint_head: KeypointHead | None = None, keypoint_loss_weight: float = 1.0,
                 keypoint_score: str = "logit",
                 fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.5, batch_size_per_image: int = 512,
                 positive_fraction: float = 0.25, box_reg_weights=(10.0, 10.0, 5.0, 5.0),
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_image: int = 100,
                 min_box_side: float = MIN_BOX_SIDE, smooth_l1_beta: float = 1.0 / 9, refiners: Sequence[Refiner] = ()):
        super().__init__()
        if mask_loss_type not in ("sigmoid", "softmax"):
            raise ValueError(f"mask_loss_type must be 'sigmoid' or 'softmax', got {mask_loss_type!r}")
        if (mask_head is None) != (mask_pooler is None) and not isinstance(box_head, Res5Head):
            raise ValueError("mask_pooler and mask_head must be given together")
        if any(not callable(r) for r in refiners):
            raise ValueError(f"refiners must be callables (predictor, dets, image_sizes) -> Detections, got "
                             f"{refiners!r}")
        self.box_pooler = box_pooler
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.mask_pooler = mask_pooler
        self.mask_head = mask_head
        self.mask_loss_type = mask_loss_type
        self.keypoint_pooler = keypoint_pooler
        self.keypoint_head = keypoint_head
        self.keypoint_loss_weight = keypoint_loss_weight
        if keypoint_score not in KEYPOINT_SCORES:
            raise ValueError(f"keypoint_score (keypoint.score) must be one of {KEYPOINT_SCORES}, got "
                             f"{keypoint_score!r}")
        self.keypoint_score = keypoint_score
        self.num_classes = num_classes
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.sampler = BalancedSampler(batch_size_per_image, positive_fraction)
        self.box_reg_weights = tuple(float(w) for w in box_reg_weights)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_image = detections_per_image
        if not (math.isfinite(min_box_side) and min_box_side >= 0):
            raise ValueError(f"min_box_side (roi_heads.test_min_box_side) must be finite and >= 0, got {min_box_side}")
        self.min_box_side = float(min_box_side)
        self.smooth_l1_beta = smooth_l1_beta
        self.refiners = tuple(refiners)

    @property
    def c4(self) -> bool:
        return isinstance(self.box_head, Res5Head)

    @classmethod
    def from_config(cls, cfg, in_channels: int, strides, res5: tuple[nn.Module, int] | None = None, *,
                    refiners: Sequence[Refiner] = ()) -> RoIHeads:
        """strides: of the feature maps the RoIs are pooled from; res5: (layer4, channels) for the C4 model;
        refiners: see the class (mask_rcnn.build_roi_heads builds them from the config)."""
        kw = cls.box_branch_kwargs(cfg, in_channels, strides, res5)
        kw.update(cls.mask_keypoint_kwargs(cfg, in_channels, strides, res5))
        return cls(**kw, refiners=refiners)

    @staticmethod
    def _pooler_factory(cfg, strides):
        r = cfg.model.roi_heads
        pool_strides = strides[:4] if len(strides) > 4 else strides    # P6 only feeds the RPN

        def pooler(res):
            return RoIPooler(res, pool_strides, r.pooler, r.pooler_sampling_ratio, r.pooler_aligned,
                             level_mapping=r.pooler_level_mapping)
        return pooler

    @classmethod
    def box_branch_kwargs(cls, cfg, in_channels: int, strides, res5=None) -> dict:
        """Constructor arguments of the box branch, sampling and inference thresholds (modules built in this
        order: box head, box predictor)."""
        r = cfg.model.roi_heads
        nc = r.num_classes
        if nc <= 0:
            raise ValueError(f"roi_heads.num_classes must be positive, got {nc}")
        pooler = cls._pooler_factory(cfg, strides)
        if res5 is not None:
            box_head = Res5Head(*res5)
        else:
            box_head = build_box_head(in_channels, r.box_pooler_resolution, conv_dim=r.box_head_conv_dim,
                                      num_conv=r.box_head_num_conv, fc_dim=r.box_head_fc_dim,
                                      num_fc=r.box_head_num_fc, norm=r.box_head_norm)
        return dict(box_pooler=pooler(r.box_pooler_resolution), box_head=box_head,
                    box_predictor=FastRCNNPredictor(box_head.out_features, nc), num_classes=nc,
                    fg_iou_thresh=r.fg_iou_thresh, bg_iou_thresh=r.bg_iou_thresh,
                    batch_size_per_image=r.batch_size_per_image, positive_fraction=r.positive_fraction,
                    box_reg_weights=r.box_reg_weights, score_thresh=r.score_thresh_test,
                    nms_thresh=r.nms_thresh_test, detections_per_image=r.detections_per_image,
                    min_box_side=r.test_min_box_side)

    @classmethod
    def mask_keypoint_kwargs(cls, cfg, in_channels: int, strides, res5=None) -> dict:
        """Constructor arguments of the mask and keypoint branches (modules built in this order)."""
        m = cfg.model
        nc = m.roi_heads.num_classes
        pooler = cls._pooler_factory(cfg, strides)
        kw = {}
        mk = m.mask
        if mk.enabled:
            if mk.loss not in ("sigmoid", "softmax"):
                raise ValueError(f"mask.loss must be 'sigmoid' or 'softmax', got {mk.loss!r}")
            if mk.head not in ("fcn", "mlp"):
                raise ValueError(f"mask.head must be 'fcn' or 'mlp', got {mk.head!r}")
            outs = (1 if mk.loss == "sigmoid" else 2) if mk.class_agnostic else nc + 1
            if res5 is not None:
                if mk.head != "fcn":
                    raise ValueError("mask.head='mlp' is supported with FPN only")
                # the paper's C4 mask head: res5 (shared with the box head), deconv, 1x1 conv
                kw["mask_pooler"] = pooler(m.roi_heads.box_pooler_resolution)
                kw["mask_head"] = MaskFCNHead(res5[1], mk.conv_dim, 0, outs)
            elif mk.head == "fcn":
                kw["mask_pooler"] = pooler(mk.pooler_resolution)
                kw["mask_head"] = MaskFCNHead(in_channels, mk.conv_dim, mk.num_convs, outs, norm=mk.norm)
            else:
                kw["mask_pooler"] = pooler(mk.pooler_resolution)
                kw["mask_head"] = MaskMLPHead(in_channels, mk.pooler_resolution, mk.mlp_dim, mk.resolution, outs)
            kw["mask_loss_type"] = mk.loss
        kp = m.keypoint
        if kp.enabled:
            if kp.heatmap_size != 4 * kp.pooler_resolution:
                raise ValueError(f"keypoint.heatmap_size ({kp.heatmap_size}) must be 4 x pooler_resolution "
                                 f"({kp.pooler_resolution}): deconv x2 then bilinear x2")
            kw["keypoint_pooler"] = pooler(kp.pooler_resolution)
            kw["keypoint_head"] = KeypointHead(in_channels, kp.conv_dim, kp.num_convs, kp.num_keypoints)
            kw["keypoint_loss_weight"] = kp.loss_weight
            kw["keypoint_score"] = kp.score
        return kw

    # ---- box stages -------------------------------------------------------------------------------

    @property
    def num_box_stages(self) -> int:
        """Box heads run in sequence: 1 (the paper); cascade.CascadeRoIHeads adds more."""
        return 1

    def _check_stage(self, stage: int) -> None:
        if not 0 <= stage < self.num_box_stages:
            raise ValueError(f"stage must be in 0..{self.num_box_stages - 1}, got {stage}")

    def box_stage_weights(self, stage: int = 0) -> tuple[float, ...]:
        """(wx, wy, ww, wh) of box stage `stage`'s box encoding."""
        self._check_stage(stage)
        return self.box_reg_weights

    def box_head_outputs(self, box_features: Tensor, stage: int = 0) -> tuple[Tensor, Tensor]:
        """Box stage `stage` on pooled box features Tensor[R, C, S, S] -> (class_logits Tensor[R, C + 1],
        box_regression Tensor[R, 4 (C + 1)])."""
        self._check_stage(stage)
        x = self.box_head(box_features)
        return self.box_predictor(x[0] if self.c4 else x)

    # ---- training ---------------------------------------------------------------------------------

    @torch.no_grad()
    def sample_proposals(self, proposals: list[Tensor], targets: list[dict], matcher: Matcher | None = None):
        """GT boxes appended to the proposals, matched (by self.matcher unless given) and sampled (positives first
        in each image).

        Returns per image: boxes Tensor[S, 4], labels Tensor[S], matched GT index Tensor[S], number of positives.
        """
        out = []
        for props, t in zip(proposals, targets):
            gt, gl = t["boxes"], t["labels"]
            props = torch.cat([props, gt.to(props.dtype)])
            if gt.shape[0] == 0:
                labels = torch.zeros(props.shape[0], dtype=torch.int64, device=props.device)
                matched = torch.zeros_like(labels)
            else:
                matched = (matcher or self.matcher)(ops.box_iou(gt.to(props.dtype), props))
                labels = gl[matched.clamp(min=0)].to(torch.int64)
                labels[matched == Matcher.BELOW_LOW] = 0
                labels[matched == Matcher.BETWEEN] = -1
                matched = matched.clamp(min=0)
            pos, neg = self.sampler(labels)
            idx = torch.cat([pos, neg])
            out.append((props[idx], labels[idx], matched[idx], pos.numel()))
        return out

    @staticmethod
    @torch.no_grad()
    def _regression_targets(samples, targets, rois: Tensor, weights) -> tuple[Tensor, Tensor]:
        """-> (Tensor[S, 4] encoded GT boxes of the positives (zeros elsewhere), Tensor[P] rows of the positives)."""
        reg_targets = torch.zeros_like(rois[:, 1:])
        pos_rows, start = [], 0
        for (b, _, m, npos), t in zip(samples, targets):
            if npos:
                reg_targets[start:start + npos] = ops.encode_boxes(t["boxes"][m[:npos]].to(b.dtype), b[:npos], weights)
            pos_rows.append(torch.arange(start, start + npos, device=rois.device))
            start += b.shape[0]
        return reg_targets, torch.cat(pos_rows)

    def _train_box_features(self, feats, rois: Tensor) -> Tensor:
        """Pooled box features of the sampled RoIs in training."""
        return self.box_pooler(feats, rois)

    def _later_box_stage_losses(self, feats, samples, labels, class_logits, box_regression, targets,
                                image_sizes) -> dict:
        """Losses of the box stages after the first: none here (see cascade.CascadeRoIHeads)."""
        return {}

    def _forward_train(self, feats, proposals, targets, image_sizes):
        samples = self.sample_proposals(proposals, targets)
        boxes = [s[0] for s in samples]
        labels = torch.cat([s[1] for s in samples])
        rois = boxes_to_rois(boxes)
        reg_targets, pos_rows = self._regression_targets(samples, targets, rois, self.box_reg_weights)
        x = self.box_head(self._train_box_features(feats, rois))
        res5_out = None
        if self.c4:
            x, res5_out = x
        class_logits, box_regression = self.box_predictor(x)
        loss_cls, loss_box = fast_rcnn_loss(class_logits.to(reg_targets.dtype), box_regression.to(reg_targets.dtype),
                                            labels, reg_targets, self.smooth_l1_beta)
        losses = {"loss_classifier": loss_cls, "loss_box_reg": loss_box}
        losses.update(self._later_box_stage_losses(feats, samples, labels, class_logits, box_regression, targets,
                                                   image_sizes))

        if self.mask_head is not None:
            with torch.no_grad():
                tgts = []
                for (b, _, m, npos), t in zip(samples, targets):
                    size = self._mask_size()
                    tb = b[:npos]
                    scale = t.get("mask_scale")
                    if scale is not None:   # masks kept at the original resolution: map RoIs back to it
                        tb = tb * tb.new_tensor([scale[0], scale[1], scale[0], scale[1]])
                    tgts.append(mask_targets(t["masks"], tb, m[:npos], size) if npos else
                                torch.zeros((0, size, size), dtype=torch.bool, device=rois.device))
                tgts = torch.cat(tgts)
            if self.c4:   # the box head's res5 output of the positives (the mask head has no convs of its own)
                mask_logits = self.mask_head(res5_out[pos_rows])
            else:
                mask_logits = self.mask_head(self.mask_pooler(feats, rois[pos_rows]))
            losses["loss_mask"] = mask_loss(mask_logits, labels[pos_rows], tgts, self.mask_loss_type)

        if self.keypoint_head is not None:
            with torch.no_grad():
                rows, kt, kv, start = [], [], [], 0
                size = self.keypoint_heatmap_size()
                for (b, _, m, npos), t in zip(samples, targets):
                    kps = t.get("keypoints")
                    if kps is not None and npos and kps.shape[0]:
                        kp = kps[m[:npos]]
                        # only RoIs of instances that carry keypoints (categories with keypoints)
                        has = (kp[..., 2] > 0).any(dim=1)
                        sel = torch.where(has)[0]
                        tg, vd = keypoint_targets(kp[sel], b[:npos][sel], size)
                        rows.append(sel + start)
                        kt.append(tg)
                        kv.append(vd)
                    start += b.shape[0]
                rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64, device=rois.device)
                kt = torch.cat(kt) if kt else torch.zeros((0, 1), dtype=torch.int64, device=rois.device)
                kv = torch.cat(kv) if kv else torch.zeros((0, 1), dtype=torch.bool, device=rois.device)
            logits = self.keypoint_head(self.keypoint_pooler(feats, rois[rows]))
            losses["loss_keypoint"] = keypoint_loss(logits, kt, kv) * self.keypoint_loss_weight
        return losses

    def _mask_size(self) -> int:
        h = self.mask_head
        if isinstance(h, MaskMLPHead):
            return h.resolution
        return 2 * (self.box_pooler.output_size // 2 if self.c4 else self.mask_pooler.output_size)

    def keypoint_heatmap_size(self) -> int:
        return 4 * self.keypoint_pooler.output_size

    # ---- inference --------------------------------------------------------------------------------

    @torch.no_grad()
    def box_predictions(self, feats: list[Tensor], rois: Tensor, stage: int = 0) -> tuple[Tensor, Tensor]:
        """Box stage `stage` on rois (Tensor[R, 5]) -> (Tensor[R, C + 1] class probabilities,
        Tensor[R, C + 1, 4] decoded boxes); see postprocess.class_probs_and_boxes."""
        logits, reg = self.box_head_outputs(self.box_pooler(feats, rois), stage)
        return class_probs_and_boxes(logits, reg, rois[:, 1:], self.box_stage_weights(stage))

    def detections_from_box_outputs(self, class_logits: Tensor, box_regression: Tensor, proposals: Tensor,
                                    counts: Tensor, image_sizes) -> Detections:
        """postprocess.detections_from_box_outputs with these heads' box weights and thresholds."""
        return detections_from_box_outputs(class_logits, box_regression, proposals, counts, image_sizes,
                                           weights=self.box_stage_weights(0), score_thresh=self.score_thresh,
                                           nms_thresh=self.nms_thresh, detections_per_image=self.detections_per_image,
                                           min_box_side=self.min_box_side)

    def detect(self, probs: Tensor, boxes: Tensor, counts: Tensor, image_sizes) -> Detections:
        """postprocess.select_detections with these heads' thresholds."""
        return select_detections(probs, boxes, counts, image_sizes, score_thresh=self.score_thresh,
                                 nms_thresh=self.nms_thresh, detections_per_image=self.detections_per_image,
                                 min_box_side=self.min_box_side)

    @torch.no_grad()
    def refine_detections(self, predictor: RoIPredictor, dets: Detections, image_sizes) -> Detections:
        """The refiners in order (none in the paper: dets unchanged)."""
        for refine in self.refiners:
            dets = refine(predictor, dets, image_sizes)
        return dets

    def pool_mask_features(self, feats: list[Tensor], rois: Tensor) -> Tensor:
        """Tensor[R, C, S, S] the mask head's input for rois (Tensor[R, 5])."""
        return self.mask_pooler(feats, rois)

    def mask_logits(self, mask_features: Tensor) -> Tensor:
        """The mask head (C4: after the box head's res5) -> Tensor[R, C', M, M]."""
        if self.c4:
            return self.mask_head(self.box_head.res5(mask_features))
        return self.mask_head(mask_features)

    def keypoint_logits(self, keypoint_features: Tensor) -> Tensor:
        """The keypoint head -> Tensor[R, K, S, S] heatmap logits."""
        return self.keypoint_head(keypoint_features)

    @torch.no_grad()
    def detection_features(self, feats: list[Tensor], dets: Detections) -> tuple[Tensor | None, Tensor | None]:
        """Pooled mask and keypoint features of the valid detections, image after image (None for a branch that
        is off)."""
        total = int(dets.counts.sum())    # host sync: the heads run on the valid detections only
        rois = rois_from_padded(dets.boxes, dets.counts, total)
        mask_features = self.pool_mask_features(feats, rois) if self.mask_head is not None else None
        keypoint_features = self.keypoint_pooler(feats, rois) if self.keypoint_head is not None else None
        return mask_features, keypoint_features

    @torch.no_grad()
    def mask_probabilities(self, feats: list[Tensor], rois: Tensor, labels: Tensor) -> Tensor:
        """Tensor[R, 1, M, M] mask probabilities of class labels (Tensor[R]) in rois (Tensor[R, 5])."""
        if rois.shape[0] == 0:
            s = self._mask_size()
            return rois.new_zeros((0, 1, s, s))
        logits = self.mask_logits(self.pool_mask_features(feats, rois))
        return mask_probs(logits.to(rois.dtype), labels, self.mask_loss_type)

    @torch.no_grad()
    def keypoint_heatmaps(self, feats: list[Tensor], rois: Tensor) -> Tensor:
        """Tensor[R, K, S, S] keypoint heatmap logits in rois (Tensor[R, 5])."""
        if rois.shape[0] == 0:
            return rois.new_zeros((0, self.keypoint_head.kps_score_lowres.out_channels, 1, 1))
        return self.keypoint_logits(self.keypoint_pooler(feats, rois)).to(rois.dtype)

    def forward(self, feats: list[Tensor], proposals: list[Tensor], image_sizes, targets: list[dict]) -> dict:
        """Training losses of the sampled proposals (list of Tensor[P_i, 4] per image). Inference runs through
        MaskRCNN's stages (proposal_stage, detection_stage, result_stage) and the methods above."""
        if not self.training:
            raise ValueError("RoIHeads.forward computes the training losses; at inference use MaskRCNN's stages "
                             "(proposal_stage, detection_stage, result_stage)")
        if targets is None:
            raise ValueError("targets are required in training")
        return self._forward_train(feats, proposals, targets, image_sizes)
