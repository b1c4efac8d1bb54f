"""Region proposal network: anchors, the shared conv head, proposals and losses (Ren et al.)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops._rois import roi_dtype
from ..ops.anchors import AnchorGenerator
from .layers import conv1x1
from .sampling import BalancedSampler, Matcher

RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)


class RPNHead(nn.Module):
    """Shared 3x3 conv + ReLU (num_convs of them), then 1x1 objectness (A) and box deltas (4A) per level.

    The first conv is `conv` (the paper's head, one conv), the others `extra_convs.k` (torchvision's v2 models
    have two).
    """

    def __init__(self, in_channels: int, num_anchors: int, num_convs: int = 1):
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"the RPN head needs at least one conv, got num_convs={num_convs}")
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.extra_convs = nn.ModuleList(nn.Conv2d(in_channels, in_channels, 3, padding=1)
                                         for _ in range(num_convs - 1))
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for m in (self.conv, *self.extra_convs, self.cls_logits, self.bbox_pred):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """-> (objectness [N, H*W*A] per level, deltas [N, H*W*A, 4] per level)."""
        logits, deltas = [], []
        a = self.cls_logits.out_channels
        # both 1x1 predictors as one convolution: one pass over t per level instead of two
        weight = torch.cat([self.cls_logits.weight, self.bbox_pred.weight])
        bias = torch.cat([self.cls_logits.bias, self.bbox_pred.bias])
        for f in feats:
            t = F.relu(self.conv(f))
            for conv in self.extra_convs:
                t = F.relu(conv(t))
            y = conv1x1(t, weight, bias)
            n, _, h, w = y.shape
            # -> [N, H, W, 5A]: objectness then deltas, each anchor-minor (index (y * W + x) * A + a)
            y = y.permute(0, 2, 3, 1)
            logits.append(y[..., :a].reshape(n, h * w * a))
            deltas.append(y[..., a:].reshape(n, h, w, a, 4).reshape(n, h * w * a, 4))
        return logits, deltas


def rpn_loss(objectness: Tensor, deltas: Tensor, labels: Tensor, reg_targets: Tensor, sampled_pos: Tensor,
             sampled: Tensor, beta: float = 1.0 / 9) -> tuple[Tensor, Tensor]:
    """RPN losses over the flattened batch (torchvision's normalisation).

    Args:
        objectness (Tensor[T]), deltas (Tensor[T, 4]): predictions of all anchors of all images.
        labels (Tensor[T]): 1 / 0 targets (only `sampled` entries are read).
        reg_targets (Tensor[p, 4]): encoded GT for the anchors `sampled_pos`.
        sampled_pos (Tensor[p]), sampled (Tensor[s]): indices into T.
    Returns: (BCE mean over sampled, smooth-L1 sum over positives / number sampled).
    """
    n = max(sampled.numel(), 1)
    box = F.smooth_l1_loss(deltas[sampled_pos], reg_targets, beta=beta, reduction="sum") / n
    if sampled.numel() == 0:
        return objectness.sum() * 0, box
    obj = F.binary_cross_entropy_with_logits(objectness[sampled], labels[sampled].to(objectness.dtype))
    return obj, box


class RPN(nn.Module):
    """Proposals from anchors + head; losses in training.

    Args:
        anchor_generator, head: see AnchorGenerator, RPNHead.
        fg_iou_thresh / bg_iou_thresh: anchor labelling (positive >= fg, negative < bg, else ignored).
        batch_size_per_image, positive_fraction: anchor sampling.
        pre_nms_top_n / post_nms_top_n: dicts {"train": int, "test": int} (pre is per level, post per image).
    """

    def __init__(self, anchor_generator: AnchorGenerator, head: RPNHead, *, fg_iou_thresh=0.7, bg_iou_thresh=0.3,
                 batch_size_per_image=256, positive_fraction=0.5, pre_nms_top_n=None, post_nms_top_n=None,
                 nms_thresh=0.7, score_thresh=0.0, min_size=1e-3, smooth_l1_beta=1.0 / 9):
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.sampler = BalancedSampler(batch_size_per_image, positive_fraction)
        self.pre_nms_top_n = pre_nms_top_n or {"train": 2000, "test": 1000}
        self.post_nms_top_n = post_nms_top_n or {"train": 2000, "test": 1000}
        self.nms_thresh = nms_thresh
        self.score_thresh = score_thresh
        self.min_size = min_size
        self.smooth_l1_beta = smooth_l1_beta

    @classmethod
    def from_config(cls, cfg, in_channels: int, strides=None) -> RPN:
        """strides: the nominal stride of each feature map (the backbone's); needed for anchors.grid_strides
        "detectron2"."""
        m = cfg.model
        a = m.anchors
        if a.grid_strides not in ("torchvision", "detectron2"):
            raise ValueError(f"model.anchors.grid_strides must be 'torchvision' or 'detectron2', got "
                             f"{a.grid_strides!r}")
        if a.grid_strides == "detectron2" and strides is None:
            raise ValueError("model.anchors.grid_strides 'detectron2' needs the feature strides (RPN.from_config("
                             "cfg, in_channels, strides))")
        ag = AnchorGenerator(a.sizes, a.aspect_ratios, rounded=a.rounded, order=a.order,
                             strides=strides if a.grid_strides == "detectron2" else None)
        nums = set(ag.num_anchors_per_location())
        if len(nums) != 1:
            raise ValueError("every level must have the same number of anchors per location (shared RPN head)")
        r = m.rpn
        head = RPNHead(in_channels, nums.pop(), r.head_convs)
        return cls(ag, head, fg_iou_thresh=r.fg_iou_thresh, bg_iou_thresh=r.bg_iou_thresh,
                   batch_size_per_image=r.batch_size_per_image, positive_fraction=r.positive_fraction,
                   pre_nms_top_n={"train": r.pre_nms_topk_train, "test": r.pre_nms_topk_test},
                   post_nms_top_n={"train": r.post_nms_topk_train, "test": r.post_nms_topk_test},
                   nms_thresh=r.nms_thresh, score_thresh=r.score_thresh, min_size=r.min_size)

    def predict(self, image_hw, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """The RPN head and the anchors: (objectness [N, H*W*A] per level, deltas [N, H*W*A, 4] per level, anchors
        [H*W*A, 4] per level) for the padded batch size image_hw (H, W)."""
        logits, deltas = self.head(feats)
        # box arithmetic in float32 also under mixed precision (float16 anchors would be off by pixels)
        dtype = roi_dtype(feats[0].dtype)
        logits = [o.to(dtype) for o in logits]
        deltas = [d.to(dtype) for d in deltas]
        anchors = self.anchor_generator.levels(image_hw, [f.shape[-2:] for f in feats], dtype, feats[0].device)
        return logits, deltas, anchors

    @torch.no_grad()
    def generate_proposals(self, objectness: list[Tensor], deltas: list[Tensor], anchors: list[Tensor],
                           image_sizes) -> tuple[Tensor, Tensor]:
        """ops.generate_proposals with this RPN's settings (train or test top-n by mode) -> (proposals
        Tensor[N, P, 4], counts Tensor[N]); rows of image i at or past counts[i] are zero."""
        mode = "train" if self.training else "test"
        boxes, _, counts = ops.generate_proposals(
            [o.detach() for o in objectness], [d.detach() for d in deltas], anchors, image_sizes,
            self.pre_nms_top_n[mode], self.post_nms_top_n[mode], self.nms_thresh, self.score_thresh, self.min_size)
        return boxes, counts

    def forward(self, image_hw, feats: list[Tensor], image_sizes, gt_boxes: list[Tensor] | None = None):
        """Returns (proposals Tensor[N, P, 4], counts Tensor[N], losses dict (empty at inference))."""
        logits, deltas, anchors = self.predict(image_hw, feats)
        proposals, counts = self.generate_proposals(logits, deltas, anchors, image_sizes)
        losses = {}
        if self.training:
            if gt_boxes is None:
                raise ValueError("targets are required in training")
            losses = self.losses(logits, deltas, anchors, gt_boxes)
        return proposals, counts, losses

    @torch.no_grad()
    def assign_targets(self, anchors: Tensor, gt_boxes: list[Tensor]):
        """anchors (Tensor[T, 4]) -> per image (labels Tensor[T] in {1, 0, -1}, matched GT index Tensor[T])."""
        out = []
        for gt in gt_boxes:
            if gt.numel() == 0:
                out.append((torch.zeros(anchors.shape[0], dtype=torch.int64, device=anchors.device),
                            torch.zeros(anchors.shape[0], dtype=torch.int64, device=anchors.device)))
                continue
            matched = self.matcher(ops.box_iou(gt.to(anchors.dtype), anchors))
            labels = (matched >= 0).to(torch.int64)
            labels[matched == Matcher.BETWEEN] = -1
            out.append((labels, matched.clamp(min=0)))
        return out

    def losses(self, logits, deltas, anchors, gt_boxes):
        n = logits[0].shape[0]
        all_anchors = torch.cat(anchors)
        t = all_anchors.shape[0]
        objectness = torch.cat(logits, 1).reshape(-1)
        box_deltas = torch.cat(deltas, 1).reshape(-1, 4)
        labels, pos_idx, samp_idx, targets = [], [], [], []
        with torch.no_grad():
            for i, (lab, matched) in enumerate(self.assign_targets(all_anchors, gt_boxes)):
                pos, neg = self.sampler(lab)
                labels.append(lab)
                if pos.numel():
                    targets.append(ops.encode_boxes(gt_boxes[i][matched[pos]].to(all_anchors.dtype),
                                                    all_anchors[pos], RPN_BOX_WEIGHTS))
                pos_idx.append(pos + i * t)
                samp_idx.append(torch.cat([pos, neg]) + i * t)
            labels = torch.cat(labels)
            pos_idx, samp_idx = torch.cat(pos_idx), torch.cat(samp_idx)
            targets = torch.cat(targets) if targets else box_deltas.new_zeros((0, 4))
        assert objectness.shape[0] == n * t
        obj, box = rpn_loss(objectness, box_deltas, labels, targets.to(box_deltas.dtype), pos_idx, samp_idx,
                            self.smooth_l1_beta)
        return {"loss_objectness": obj, "loss_rpn_box_reg": box}
