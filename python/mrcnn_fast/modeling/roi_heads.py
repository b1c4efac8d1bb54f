"""RoI heads: proposal sampling, box / mask / keypoint branches, training losses and inference."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .heads import (FastRCNNPredictor, KeypointHead, MaskFCNHead, MaskMLPHead, Res5Head, TwoMLPHead,
                    fast_rcnn_loss, heatmaps_to_keypoints, keypoint_loss, keypoint_targets, mask_box_edges, mask_loss,
                    mask_probs, mask_targets)
from .poolers import RoIPooler, boxes_to_rois
from ..data.transforms import flip_permutation, hflip_boxes
from .sampling import BalancedSampler, Matcher

_MIN_BOX_SIDE = 1e-2    # detections with a side below this (px) are dropped, refined ones keep their old box


def hflip_per_image(boxes: list[Tensor], image_sizes) -> list[Tensor]:
    """Each image's Tensor[..., 4] boxes mirrored within that image's width (image_sizes: (h, w) per image)."""
    return [hflip_boxes(b, float(w)) for b, (_, w) in zip(boxes, image_sizes)]


def _clip_or_keep(new: Tensor, old: Tensor, image_hw) -> Tensor:
    """new (Tensor[K, 4]) clipped to the image; rows that the clip collapses (a side < _MIN_BOX_SIDE) keep old."""
    new = ops.clip_boxes(new, image_hw)
    ok = torch.zeros(new.shape[0], dtype=torch.bool, device=new.device)
    ok[ops.remove_small_boxes(new, _MIN_BOX_SIDE)] = True
    return torch.where(ok[:, None], new, old)


class RoIHeads(nn.Module):
    """The second stage. Box branch always; mask and keypoint branches optional.

    Args:
        box_pooler, box_head, box_predictor: box branch. If box_head is a Res5Head (C4), its 7x7 res5 output is
            reused by the mask head in training and the mask head must expect it (MaskFCNHead without convs).
        mask_pooler / mask_head: None disables masks. With a Res5Head box head, mask_pooler is the C4 pooler
            feeding res5 at inference.
        mask_loss_type: "sigmoid" | "softmax".
        keypoint_pooler / keypoint_head: None disables keypoints.
        num_classes: foreground classes (labels 1..C).
        fg_iou_thresh, bg_iou_thresh: RoI labelling; batch_size_per_image, positive_fraction: RoI sampling.
        box_reg_weights: (wx, wy, ww, wh) of the box encoding.
        score_thresh, nms_thresh, detections_per_image: inference.
        test_box_refine: extra passes of the box head over the detections at inference (iterative bounding-box
            regression; 0 = the paper's single pass). Each pass pools the detected boxes again, applies the
            regression of the detected class and replaces the score by the geometric mean of the score and the
            pass's probability of that class; masks and keypoints are then predicted on the refined boxes.
        cascade_heads, cascade_predictors, cascade_iou_thresholds: extra box stages (Cascade R-CNN's idea, not in
            the paper; FPN only). Stage k is trained on stage k-1's regressed boxes (each sampled RoI moved by the
            regression of its GT class, or of its best foreground class for negatives; GT boxes appended),
            labelled at cascade_iou_thresholds[k-1], with regression weights box_reg_weights x (k + 1); when
            stages exist the gradient each stage sends into the features is scaled by 1 / (number of stages).
            At inference each stage refines the detections once, after the test_box_refine passes, as above.
        test_mask_box: weight in [0, 1] of the mask-derived box sides at inference (0: off, not in the paper).
            The mask head is run on each detected box enlarged test_mask_box_expand times about its centre, and
            every side where the mask's edge lies inside that box is moved to (1 - w) x regressed + w x mask edge.
            The mask head's targets come from boxes of IoU >= 0.5 around the object, so it segments the whole
            object in a loose box; its edge is a second, independent estimate of the box.
        test_flip: horizontal-flip test-time augmentation (not in the paper). MaskRCNN then also runs the
            backbone and RPN on the mirrored images and passes the union of both views' proposals together with
            the mirrored features (`flipped_feats`); every box, mask and keypoint prediction is the mean of the
            two views (class probabilities, decoded boxes, mask probabilities, keypoint heatmap logits with the
            keypoints of each of keypoint_flip_pairs swapped).
        keypoint_flip_pairs: 0-based (left, right) keypoint index pairs a mirror image swaps (test_flip only).
    """

    def __init__(self, *, box_pooler: RoIPooler, box_head: nn.Module, box_predictor: FastRCNNPredictor,
                 num_classes: int, mask_pooler: RoIPooler | None = None, mask_head: nn.Module | None = None,
                 mask_loss_type: str = "sigmoid", keypoint_pooler: RoIPooler | None = None,
                 keypoint_head: KeypointHead | None = None, keypoint_loss_weight: float = 1.0,
                 fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.5, batch_size_per_image: int = 512,
                 positive_fraction: float = 0.25, box_reg_weights=(10.0, 10.0, 5.0, 5.0),
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_image: int = 100,
                 smooth_l1_beta: float = 1.0 / 9, test_box_refine: int = 0, cascade_heads=(),
                 cascade_predictors=(), cascade_iou_thresholds=(), test_mask_box: float = 0.0,
                 test_mask_box_expand: float = 1.25, test_flip: bool = False, keypoint_flip_pairs=()):
        super().__init__()
        if not isinstance(test_flip, bool):
            raise ValueError(f"test_flip must be true or false, got {test_flip!r}")
        if isinstance(test_box_refine, bool) or not isinstance(test_box_refine, int) or test_box_refine < 0:
            raise ValueError(f"test_box_refine must be an int >= 0, got {test_box_refine!r}")
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
        if cascade_heads and isinstance(box_head, Res5Head):
            raise ValueError("cascade box stages are supported with FPN box heads only (not C4)")
        if isinstance(test_mask_box, bool) or not isinstance(test_mask_box, (int, float)) \
                or not 0.0 <= test_mask_box <= 1.0:
            raise ValueError(f"test_mask_box must be a number in [0, 1], got {test_mask_box!r}")
        if isinstance(test_mask_box_expand, bool) or not isinstance(test_mask_box_expand, (int, float)) \
                or not 1.0 <= test_mask_box_expand <= 4.0:
            raise ValueError(f"test_mask_box_expand must be a number in [1, 4], got {test_mask_box_expand!r}")
        if test_mask_box > 0 and mask_head is None:
            raise ValueError("test_mask_box > 0 needs the mask head")
        if mask_loss_type not in ("sigmoid", "softmax"):
            raise ValueError(f"mask_loss_type must be 'sigmoid' or 'softmax', got {mask_loss_type!r}")
        if (mask_head is None) != (mask_pooler is None) and not isinstance(box_head, Res5Head):
            raise ValueError("mask_pooler and mask_head must be given together")
        self.box_pooler = box_pooler
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.mask_pooler = mask_pooler
        self.mask_head = mask_head
        self.mask_loss_type = mask_loss_type
        self.keypoint_pooler = keypoint_pooler
        self.keypoint_head = keypoint_head
        self.keypoint_loss_weight = keypoint_loss_weight
        self.num_classes = num_classes
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.sampler = BalancedSampler(batch_size_per_image, positive_fraction)
        self.box_reg_weights = tuple(float(w) for w in box_reg_weights)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_image = detections_per_image
        self.smooth_l1_beta = smooth_l1_beta
        self.test_box_refine = test_box_refine
        self.cascade_heads = nn.ModuleList(cascade_heads)
        self.cascade_predictors = nn.ModuleList(cascade_predictors)
        self.cascade_iou_thresholds = tuple(thresholds)
        self.cascade_matchers = [Matcher(t, t, allow_low_quality_matches=False) for t in thresholds]
        self.test_mask_box = float(test_mask_box)
        self.test_mask_box_expand = float(test_mask_box_expand)
        self.test_flip = test_flip
        self.keypoint_flip_perm = None
        if keypoint_head is not None:
            k = keypoint_head.kps_score_lowres.out_channels
            try:
                self.keypoint_flip_perm = flip_permutation(k, keypoint_flip_pairs)
            except (TypeError, ValueError) as e:
                if test_flip:    # only the flip needs them (training checks its own flip_pairs against the data)
                    raise ValueError(f"keypoint_flip_pairs do not fit the {k} keypoints: {e}") from None

    @property
    def c4(self) -> bool:
        return isinstance(self.box_head, Res5Head)

    @classmethod
    def from_config(cls, cfg, in_channels: int, strides, res5: tuple[nn.Module, int] | None = None) -> "RoIHeads":
        """strides: of the feature maps the RoIs are pooled from; res5: (layer4, channels) for the C4 model."""
        m = cfg.model
        r = m.roi_heads
        nc = r.num_classes
        if nc <= 0:
            raise ValueError(f"roi_heads.num_classes must be positive, got {nc}")
        pool_strides = strides[:4] if len(strides) > 4 else strides    # P6 only feeds the RPN

        def pooler(res):
            return RoIPooler(res, pool_strides, r.pooler, r.pooler_sampling_ratio, r.pooler_aligned)

        if res5 is not None:
            box_head = Res5Head(*res5)
        else:
            box_head = TwoMLPHead(in_channels * r.box_pooler_resolution ** 2, r.box_head_fc_dim)
        kw = dict(box_pooler=pooler(r.box_pooler_resolution), box_head=box_head,
                  box_predictor=FastRCNNPredictor(box_head.out_features, nc), num_classes=nc,
                  fg_iou_thresh=r.fg_iou_thresh, bg_iou_thresh=r.bg_iou_thresh,
                  batch_size_per_image=r.batch_size_per_image, positive_fraction=r.positive_fraction,
                  box_reg_weights=r.box_reg_weights, score_thresh=r.score_thresh_test, nms_thresh=r.nms_thresh_test,
                  detections_per_image=r.detections_per_image, test_box_refine=r.test_box_refine,
                  test_mask_box=r.test_mask_box, test_mask_box_expand=r.test_mask_box_expand,
                  test_flip=r.test_flip)
        thresholds = tuple(r.cascade_iou_thresholds)
        if thresholds:
            if res5 is not None:
                raise ValueError("roi_heads.cascade_iou_thresholds needs the FPN box head (fpn.enabled = true)")
            kw["cascade_heads"] = [TwoMLPHead(in_channels * r.box_pooler_resolution ** 2, r.box_head_fc_dim)
                                   for _ in thresholds]
            kw["cascade_predictors"] = [FastRCNNPredictor(r.box_head_fc_dim, nc) for _ in thresholds]
            kw["cascade_iou_thresholds"] = thresholds
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
                kw["mask_pooler"] = pooler(r.box_pooler_resolution)
                kw["mask_head"] = MaskFCNHead(res5[1], mk.conv_dim, 0, outs)
            elif mk.head == "fcn":
                kw["mask_pooler"] = pooler(mk.pooler_resolution)
                kw["mask_head"] = MaskFCNHead(in_channels, mk.conv_dim, mk.num_convs, outs)
            else:
                kw["mask_pooler"] = pooler(mk.pooler_resolution)
                kw["mask_head"] = MaskMLPHead(in_channels, mk.pooler_resolution, getattr(mk, "mlp_dim", 1024),
                                              mk.resolution, outs)
            kw["mask_loss_type"] = mk.loss
        kp = m.keypoint
        if kp.enabled:
            if kp.heatmap_size != 4 * kp.pooler_resolution:
                raise ValueError(f"keypoint.heatmap_size ({kp.heatmap_size}) must be 4 x pooler_resolution "
                                 f"({kp.pooler_resolution}): deconv x2 then bilinear x2")
            kw["keypoint_pooler"] = pooler(kp.pooler_resolution)
            kw["keypoint_head"] = KeypointHead(in_channels, kp.conv_dim, kp.num_convs, kp.num_keypoints)
            kw["keypoint_loss_weight"] = kp.loss_weight
            kw["keypoint_flip_pairs"] = tuple(tuple(p) for p in kp.flip_pairs)
        return cls(**kw)

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

    def _stage_weights(self, stage: int) -> tuple[float, ...]:
        """Box regression weights of stage 0 (the box head) or cascade stage k >= 1."""
        return tuple(w * (stage + 1) for w in self.box_reg_weights)

    def _pooled_for_box(self, feats, rois: Tensor) -> Tensor:
        x = self.box_pooler(feats, rois)
        if self.cascade_heads:
            # each stage's gradient into the shared features scaled by 1/stages (forward unchanged)
            s = 1.0 / (1 + len(self.cascade_heads))
            x = x * s + x.detach() * (1.0 - s)
        return x

    def _cascade_losses(self, feats, samples, labels, class_logits, box_regression, targets, image_sizes) -> dict:
        losses = {}
        for k in range(1, len(self.cascade_heads) + 1):
            with torch.no_grad():
                n = labels.shape[0]
                # the box each RoI becomes at inference: the regression of its class (GT class for positives,
                # best foreground class for the rest)
                cls = torch.where(labels > 0, labels, class_logits[:, 1:].argmax(dim=1) + 1)
                deltas = box_regression.detach().to(torch.float32).reshape(n, -1, 4)[torch.arange(n, device=cls.device), cls]
                prev = torch.cat([s[0] for s in samples]).to(torch.float32)
                moved = ops.decode_boxes(deltas.contiguous(), prev, self._stage_weights(k - 1)).reshape(n, 4)
                moved = [ops.clip_boxes(b, hw).to(s[0].dtype)
                         for b, hw, s in zip(moved.split([s[0].shape[0] for s in samples]), image_sizes, samples)]
                samples = self.sample_proposals(moved, targets, self.cascade_matchers[k - 1])
                labels = torch.cat([s[1] for s in samples])
                rois = boxes_to_rois([s[0] for s in samples])
                reg_targets, _ = self._regression_targets(samples, targets, rois, self._stage_weights(k))
            x = self.cascade_heads[k - 1](self._pooled_for_box(feats, rois))
            class_logits, box_regression = self.cascade_predictors[k - 1](x)
            lc, lb = fast_rcnn_loss(class_logits.to(reg_targets.dtype), box_regression.to(reg_targets.dtype), labels,
                                    reg_targets, self.smooth_l1_beta)
            losses[f"loss_classifier_stage{k + 1}"] = lc
            losses[f"loss_box_reg_stage{k + 1}"] = lb
        return losses

    def _forward_train(self, feats, proposals, targets, image_sizes):
        samples = self.sample_proposals(proposals, targets)
        boxes = [s[0] for s in samples]
        labels = torch.cat([s[1] for s in samples])
        rois = boxes_to_rois(boxes)
        reg_targets, pos_rows = self._regression_targets(samples, targets, rois, self.box_reg_weights)
        x = self.box_head(self._pooled_for_box(feats, rois))
        res5_out = None
        if self.c4:
            x, res5_out = x
        class_logits, box_regression = self.box_predictor(x)
        loss_cls, loss_box = fast_rcnn_loss(class_logits.to(reg_targets.dtype), box_regression.to(reg_targets.dtype),
                                            labels, reg_targets, self.smooth_l1_beta)
        losses = {"loss_classifier": loss_cls, "loss_box_reg": loss_box}
        if self.cascade_heads:
            losses.update(self._cascade_losses(feats, samples, labels, class_logits, box_regression, targets,
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
    def select_detections(self, scores: Tensor, boxes: Tensor, counts, image_sizes):
        """Per-class score threshold, clipping, small-box removal and class-aware NMS.

        scores: Tensor[N, C + 1] class probabilities; boxes: Tensor[N, C + 1, 4] the box of each class; counts:
        RoIs per image. -> per image (boxes Tensor[D, 4], scores Tensor[D], labels Tensor[D])."""
        c1 = scores.shape[1]
        results = []
        for b, s, hw in zip(boxes.split(counts), scores.split(counts), image_sizes):
            b = ops.clip_boxes(b[:, 1:].reshape(-1, 4), hw)
            lab = torch.arange(1, c1, device=b.device).repeat(s.shape[0])
            s = s[:, 1:].reshape(-1)
            keep = torch.where(s > self.score_thresh)[0]
            b, s, lab = b[keep], s[keep], lab[keep]
            keep = ops.remove_small_boxes(b, _MIN_BOX_SIDE)
            b, s, lab = b[keep], s[keep], lab[keep]
            keep = ops.batched_nms(b, s, lab, self.nms_thresh)[:self.detections_per_image]
            results.append((b[keep], s[keep], lab[keep]))
        return results

    def _box_outputs(self, feats, boxes: list[Tensor], stage: int = 0) -> tuple[Tensor, Tensor]:
        x = self.box_pooler(feats, boxes_to_rois(boxes))
        if stage:
            return self.cascade_predictors[stage - 1](self.cascade_heads[stage - 1](x))
        x = self.box_head(x)
        return self.box_predictor(x[0] if self.c4 else x)

    @torch.no_grad()
    def box_predictions(self, feats, boxes: list[Tensor], image_sizes, stage: int = 0, flipped_feats=None):
        """(Tensor[N, C + 1] class probabilities, Tensor[N, C + 1, 4] decoded boxes) of the box head (stage 0) or
        of cascade stage `stage` for the N boxes; with flipped_feats the mean over the image and its mirror."""
        cat = torch.cat(boxes)
        weights = self._stage_weights(stage)
        logits, reg = self._box_outputs(feats, boxes, stage)
        probs = F.softmax(logits.to(cat.dtype), -1)
        decoded = ops.decode_boxes(reg.to(cat.dtype), cat, weights).reshape(cat.shape[0], -1, 4)
        if flipped_feats is not None:
            mirrored = hflip_per_image(boxes, image_sizes)
            logits, reg = self._box_outputs(flipped_feats, mirrored, stage)
            probs = (probs + F.softmax(logits.to(cat.dtype), -1)) / 2
            dec = ops.decode_boxes(reg.to(cat.dtype), torch.cat(mirrored), weights).reshape(cat.shape[0], -1, 4)
            dec = torch.cat(hflip_per_image(dec.split([b.shape[0] for b in boxes]), image_sizes))
            decoded = (decoded + dec) / 2
        return probs, decoded

    @torch.no_grad()
    def refine_detections(self, feats, dets, image_sizes, stage: int = 0, flipped_feats=None):
        """One pass of iterative box regression over the detections [(boxes Tensor[D, 4], scores Tensor[D],
        labels Tensor[D]) per image]: the box head (stage 0) or cascade stage `stage` sees each detected box as a
        proposal, its regression for the detected class gives the new box (clipped to the image; a box that would
        collapse keeps its old one) and the score becomes sqrt(score * p(class | new pass)). Detections are
        re-sorted by the new score. flipped_feats: see test_flip."""
        if not 0 <= stage <= len(self.cascade_heads):
            raise ValueError(f"stage must be in 0..{len(self.cascade_heads)}, got {stage}")
        boxes = [b for b, _, _ in dets]
        n = sum(b.shape[0] for b in boxes)
        if n == 0:
            return dets
        probs, decoded = self.box_predictions(feats, boxes, image_sizes, stage, flipped_feats)
        labels = torch.cat([lab for _, _, lab in dets])
        rows = torch.arange(n, device=labels.device)
        new, prob = decoded[rows, labels], probs[rows, labels]
        out, start = [], 0
        for (b, s, lab), hw in zip(dets, image_sizes):
            k = b.shape[0]
            nb = _clip_or_keep(new[start:start + k], b, hw)
            ns = (s * prob[start:start + k]).sqrt()
            order = ns.argsort(descending=True, stable=True)
            out.append((nb[order], ns[order], lab[order]))
            start += k
        return out

    def _mask_logits(self, feats, rois: Tensor) -> Tensor:
        if self.c4:
            return self.mask_head(self.box_head.res5(self.mask_pooler(feats, rois)))
        return self.mask_head(self.mask_pooler(feats, rois))

    @torch.no_grad()
    def _mask_probs(self, feats, boxes: list[Tensor], labels: Tensor, image_sizes, flipped_feats=None) -> Tensor:
        """Tensor[N, 1, M, M] mask probabilities of the labelled class in each box (mean over both views with
        flipped_feats; the mirror's masks are mirrored back)."""
        cat = torch.cat(boxes)
        if cat.shape[0] == 0:
            s = self._mask_size()
            return cat.new_zeros((0, 1, s, s))
        probs = mask_probs(self._mask_logits(feats, boxes_to_rois(boxes)).to(cat.dtype), labels, self.mask_loss_type)
        if flipped_feats is not None:
            logits = self._mask_logits(flipped_feats, boxes_to_rois(hflip_per_image(boxes, image_sizes))).to(cat.dtype)
            probs = (probs + mask_probs(logits, labels, self.mask_loss_type).flip(-1)) / 2
        return probs

    @torch.no_grad()
    def _keypoint_maps(self, feats, boxes: list[Tensor], image_sizes, flipped_feats=None) -> Tensor:
        """Tensor[N, K, S, S] keypoint heatmap logits (mean over both views with flipped_feats: the mirror's maps
        are mirrored back and its left / right keypoints swapped)."""
        cat = torch.cat(boxes)
        k = self.keypoint_head.kps_score_lowres.out_channels
        if cat.shape[0] == 0:
            return cat.new_zeros((0, k, 1, 1))
        maps = self.keypoint_head(self.keypoint_pooler(feats, boxes_to_rois(boxes))).to(cat.dtype)
        if flipped_feats is not None:
            rois = boxes_to_rois(hflip_per_image(boxes, image_sizes))
            fmaps = self.keypoint_head(self.keypoint_pooler(flipped_feats, rois))
            maps = (maps + fmaps.to(cat.dtype)[:, self.keypoint_flip_perm].flip(-1)) / 2
        return maps

    @torch.no_grad()
    def mask_box_detections(self, feats, dets, image_sizes, flipped_feats=None):
        """Moves each detected box's sides towards the edges of its mask (see test_mask_box in the class doc).
        Scores, labels and order are unchanged; a box that would collapse keeps its old one."""
        boxes = [b for b, _, _ in dets]
        n = sum(b.shape[0] for b in boxes)
        if n == 0:
            return dets
        b = torch.cat(boxes)
        labels = torch.cat([lab for _, _, lab in dets])
        centre, half = (b[:, :2] + b[:, 2:]) / 2, (b[:, 2:] - b[:, :2]) / 2 * self.test_mask_box_expand
        loose = torch.cat([centre - half, centre + half], 1)
        probs = self._mask_probs(feats, list(loose.split([x.shape[0] for x in boxes])), labels, image_sizes,
                                 flipped_feats)[:, 0]
        edges, valid = mask_box_edges(probs, loose)
        w = self.test_mask_box
        fused = torch.where(valid, (1 - w) * b + w * edges, b)
        out, start = [], 0
        for (bi, s, lab), hw in zip(dets, image_sizes):
            k = bi.shape[0]
            out.append((_clip_or_keep(fused[start:start + k], bi, hw), s, lab))
            start += k
        return out

    def _forward_test(self, feats, proposals, image_sizes, flipped_feats=None):
        if flipped_feats is not None and not self.test_flip:
            raise ValueError("flipped_feats given but test_flip is off")
        if self.test_flip and flipped_feats is None:
            raise ValueError("test_flip needs the mirrored images' features (flipped_feats); MaskRCNN passes them")
        probs, decoded = self.box_predictions(feats, proposals, image_sizes, 0, flipped_feats)
        dets = self.select_detections(probs, decoded, [p.shape[0] for p in proposals], image_sizes)
        for _ in range(self.test_box_refine):
            dets = self.refine_detections(feats, dets, image_sizes, 0, flipped_feats)
        for stage in range(1, len(self.cascade_heads) + 1):
            dets = self.refine_detections(feats, dets, image_sizes, stage, flipped_feats)
        if self.test_mask_box > 0:
            dets = self.mask_box_detections(feats, dets, image_sizes, flipped_feats)
        results = [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in dets]
        det_boxes = [r["boxes"] for r in results]
        counts = [b.shape[0] for b in det_boxes]
        labels = torch.cat([r["labels"] for r in results])
        if self.mask_head is not None:
            probs = self._mask_probs(feats, det_boxes, labels, image_sizes, flipped_feats)
            for r, p in zip(results, probs.split(counts)):
                r["mask_probs"] = p
        if self.keypoint_head is not None:
            maps = self._keypoint_maps(feats, det_boxes, image_sizes, flipped_feats)
            for r, mp, b in zip(results, maps.split(counts), det_boxes):
                r["keypoints"], r["keypoints_scores"] = heatmaps_to_keypoints(mp, b)
        return results

    def forward(self, feats: list[Tensor], proposals: list[Tensor], image_sizes, targets: list[dict] | None = None,
                *, flipped_feats: list[Tensor] | None = None):
        """Training: dict of losses. Inference: list of per-image dicts (boxes, scores, labels[, mask_probs
        Tensor[D, 1, M, M]][, keypoints, keypoints_scores]) in the resized image's coordinates.
        flipped_feats (inference with test_flip): the features of the batch with each image mirrored in place."""
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training")
            return self._forward_train(feats, proposals, targets, image_sizes)
        return self._forward_test(feats, proposals, image_sizes, flipped_feats)
