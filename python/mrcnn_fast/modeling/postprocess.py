"""Inference post-processing: the torch reference of everything between the networks, in the paper's order.

1. Box-head outputs -> detections: softmax, class-specific decode (`class_probs_and_boxes`), then clip, score
   threshold, small-box removal, class-aware NMS and top-K per image (`select_detections`).
2. Mask-head outputs -> the labelled class's mask probabilities (`mask_probs`).
3. Keypoint-head outputs -> keypoints (`heatmaps_to_keypoints`).
4. Detector post-processing: rescale to the input image and paste the masks as float probabilities, bool masks
   or COCO RLE (`detector_postprocess`, `detector_results`).

Between the stages a batch travels as padded tensors plus per-image counts (`Detections`, proposals
Tensor[N, P, 4] + Tensor[N]); the networks run on the valid rows only, packed image after image (`pack`,
`rois_from_padded`), as Tensor[R, ...] with R = counts.sum().
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops

MIN_BOX_SIDE = 1e-2    # default roi_heads.test_min_box_side: detections with a side below this (px) are dropped
MASK_FORMATS = ("prob", "bool", "rle")


class Detections(NamedTuple):
    """Fixed-size detections of a batch of N images, at most D each (D = detections_per_image).

    Rows of image i at or past counts[i] are padding: zero boxes, scores and labels. Valid rows are sorted by
    descending score.
    """
    boxes: Tensor     # Tensor[N, D, 4] (x1, y1, x2, y2)
    scores: Tensor    # Tensor[N, D]
    labels: Tensor    # Tensor[N, D] int64, 1..C (0 in padding)
    counts: Tensor    # Tensor[N] int64


def check_mask_format(mask_format) -> str:
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")
    return mask_format


# ---- padded <-> packed ---------------------------------------------------------------------------


def packed_rows(counts: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """(image Tensor[R], position Tensor[R]) of the R = total valid rows of a padded batch, image after image.

    total must equal counts.sum(); passing it in (e.g. from the shape of a network output) avoids reading the
    counts on the host.
    """
    n = counts.shape[0]
    image = torch.repeat_interleave(torch.arange(n, device=counts.device), counts, output_size=total)
    starts = torch.cumsum(counts, 0) - counts
    return image, torch.arange(total, device=counts.device) - starts[image]


def pack(padded: Tensor, counts: Tensor, total: int) -> Tensor:
    """padded (Tensor[N, P, ...]) -> Tensor[R, ...]: the valid rows of each image, image after image."""
    image, position = packed_rows(counts, total)
    return padded[image, position]


def rois_from_padded(boxes: Tensor, counts: Tensor, total: int) -> Tensor:
    """boxes (Tensor[N, P, 4]) -> Tensor[R, 5] (batch index, x1, y1, x2, y2) of the valid rows."""
    image, position = packed_rows(counts, total)
    return torch.cat([image.to(boxes.dtype)[:, None], boxes[image, position]], 1)


# ---- box head -> detections ----------------------------------------------------------------------


def class_probs_and_boxes(class_logits: Tensor, box_regression: Tensor, proposals: Tensor,
                          weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Softmax over the classes and the class-specific decode of each RoI's box.

    Args:
        class_logits (Tensor[R, C + 1]), box_regression (Tensor[R, 4 (C + 1)]): box-head outputs (any float
            dtype; computed in proposals' dtype).
        proposals (Tensor[R, 4]): the RoIs the box head saw.
        weights: (wx, wy, ww, wh) of the box encoding.
    Returns: (probs Tensor[R, C + 1], boxes Tensor[R, C + 1, 4]).
    """
    probs = F.softmax(class_logits.to(proposals.dtype), -1)
    # the class count from the logits: with no RoIs at all a -1 in the reshape would be ambiguous
    boxes = ops.decode_boxes(box_regression.to(proposals.dtype), proposals, weights).reshape(
        proposals.shape[0], class_logits.shape[1], 4)
    return probs, boxes


def big_enough(boxes: Tensor, min_side: float) -> Tensor:
    """Tensor[K] bool: both sides of boxes (Tensor[K, 4]) are >= min_side (torchvision's remove_small_boxes),
    or, for min_side <= 0, neither side is empty (> 0: a clipped box can only collapse to zero)."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    if min_side > 0:
        return (w >= min_side) & (h >= min_side)
    return (w > 0) & (h > 0)


@torch.no_grad()
def select_detections(probs: Tensor, boxes: Tensor, counts: Tensor, image_sizes, *, score_thresh: float,
                      nms_thresh: float, detections_per_image: int, min_box_side: float = MIN_BOX_SIDE) -> Detections:
    """Per image: every (RoI, foreground class) pair clipped to the image, kept if its probability is above
    score_thresh and both sides are >= min_box_side, class-aware NMS, the best detections_per_image.
    min_box_side 0: no size filter at all (detectron2's fast_rcnn_inference keeps even empty boxes).

    Args:
        probs (Tensor[R, C + 1]), boxes (Tensor[R, C + 1, 4]): see class_probs_and_boxes; rows image after image.
        counts (Tensor[N]): RoIs per image (sum R).
        image_sizes: (h, w) per image (the resized image, before padding).
    Returns: Detections with D = detections_per_image.
    """
    n, d, c1 = counts.shape[0], detections_per_image, probs.shape[1]
    out_boxes = boxes.new_zeros((n, d, 4))
    out_scores = probs.new_zeros((n, d))
    out_labels = torch.zeros((n, d), dtype=torch.int64, device=probs.device)
    kept, rows = [], counts.tolist()   # host sync: thresholding and NMS keep a data-dependent number per image
    for i, (b, s, hw) in enumerate(zip(boxes.split(rows), probs.split(rows), image_sizes)):
        b = ops.clip_boxes(b[:, 1:].reshape(-1, 4), hw)
        lab = torch.arange(1, c1, device=b.device).repeat(s.shape[0])
        s = s[:, 1:].reshape(-1)
        keep = torch.where(s > score_thresh)[0]
        b, s, lab = b[keep], s[keep], lab[keep]
        if min_box_side > 0:
            keep = ops.remove_small_boxes(b, min_box_side)
            b, s, lab = b[keep], s[keep], lab[keep]
        keep = ops.batched_nms(b, s, lab, nms_thresh)[:d]
        k = keep.shape[0]
        out_boxes[i, :k], out_scores[i, :k], out_labels[i, :k] = b[keep], s[keep], lab[keep]
        kept.append(k)
    return Detections(out_boxes, out_scores, out_labels, torch.tensor(kept, dtype=torch.int64, device=probs.device))


def detections_from_box_outputs(class_logits: Tensor, box_regression: Tensor, proposals: Tensor, counts: Tensor,
                                image_sizes, *, weights: Sequence[float], score_thresh: float, nms_thresh: float,
                                detections_per_image: int, min_box_side: float = MIN_BOX_SIDE) -> Detections:
    """The paper's detections from the box head's outputs on a padded batch of proposals.

    Args:
        class_logits (Tensor[R, C + 1]), box_regression (Tensor[R, 4 (C + 1)]): the box head on the valid
            proposals, image after image (R = counts.sum()).
        proposals (Tensor[N, P, 4]), counts (Tensor[N]): padded proposals.
        image_sizes, weights, score_thresh, nms_thresh, detections_per_image, min_box_side: see
            class_probs_and_boxes and select_detections.
    """
    rois = pack(proposals, counts, class_logits.shape[0])
    probs, boxes = class_probs_and_boxes(class_logits, box_regression, rois, weights)
    return select_detections(probs, boxes, counts, image_sizes, score_thresh=score_thresh, nms_thresh=nms_thresh,
                             detections_per_image=detections_per_image, min_box_side=min_box_side)


# ---- masks ---------------------------------------------------------------------------------------


def mask_probs(mask_logits: Tensor, labels: Tensor, loss_type: str = "sigmoid") -> Tensor:
    """Mask probabilities of each detection's class: Tensor[D, 1, M, M].

    mask_logits (Tensor[D, C', M, M]): C' = C + 1 (class-specific) or 1 / 2 (class-agnostic sigmoid / softmax);
    labels (Tensor[D]) the detected classes.

    softmax: a pixel belongs to the mask when the detection's class wins the per-pixel argmax over all
    channels (the FCN decision the multinomial loss trains for). As a score that the paste thresholds at 0.5:
    p_k / (p_k + max_{j != k} p_j), which is > 0.5 exactly where channel k is the argmax (p_k itself can win
    the argmax below 0.5 when several channels share the rest).
    """
    d = mask_logits.shape[0]
    agnostic = mask_logits.shape[1] <= (1 if loss_type == "sigmoid" else 2)
    if loss_type == "softmax":
        probs = mask_logits.softmax(dim=1)
        chan = torch.ones_like(labels) if agnostic else labels
        idx = torch.arange(d, device=labels.device)
        own = probs[idx, chan]
        others = probs.clone()
        others[idx, chan] = -1.0
        best_other = others.max(dim=1).values
        return (own / (own + best_other).clamp_min(torch.finfo(own.dtype).tiny))[:, None]
    chan = torch.zeros_like(labels) if agnostic else labels
    return mask_logits[torch.arange(d, device=labels.device), chan][:, None].sigmoid()


# ---- keypoints -----------------------------------------------------------------------------------


KEYPOINT_SCORES = ("logit", "prob")


def heatmaps_to_keypoints(maps: Tensor, boxes: Tensor, *, score: str = "logit") -> tuple[Tensor, Tensor]:
    """Keypoint locations from heatmaps, torchvision's conventions: each heatmap is resized (bicubic) to the
    box's ceil'd size, the argmax cell (+0.5) is mapped back to image coordinates.

    maps (Tensor[D, K, M, M]), boxes (Tensor[D, 4]) -> (Tensor[D, K, 3] (x, y, 1), Tensor[D, K] scores).
    score: "logit": the resized heatmap's value at the peak (torchvision); "prob": detectron2's spatial softmax
    probability of the peak, exp(0) / sum(exp(maps - peak)) normalised over the M x M heatmap, not the resized
    one (so that boxes of different sizes get comparable scores).
    """
    if score not in KEYPOINT_SCORES:
        raise ValueError(f"keypoint score must be one of {KEYPOINT_SCORES}, got {score!r}")
    d, k = maps.shape[:2]
    xy = maps.new_zeros((d, k, 3))
    scores = maps.new_zeros((d, k))
    if d == 0:
        return xy, scores
    widths = (boxes[:, 2] - boxes[:, 0]).clamp(min=1)
    heights = (boxes[:, 3] - boxes[:, 1]).clamp(min=1)
    wc, hc = widths.ceil(), heights.ceil()
    # host sync: each heatmap is resized to its own box's size
    for i, (w_i, h_i) in enumerate(zip(wc.tolist(), hc.tolist())):
        w_i, h_i = int(w_i), int(h_i)
        roi = F.interpolate(maps[i][:, None], size=(h_i, w_i), mode="bicubic", align_corners=False)[:, 0]
        pos = roi.reshape(k, -1).argmax(dim=1)
        xi, yi = pos % w_i, pos // w_i
        xy[i, :, 0] = (xi.to(maps.dtype) + 0.5) * (widths[i] / w_i) + boxes[i, 0]
        xy[i, :, 1] = (yi.to(maps.dtype) + 0.5) * (heights[i] / h_i) + boxes[i, 1]
        peak = roi[torch.arange(k, device=maps.device), yi, xi]
        if score == "prob":
            peak = 1 / (maps[i] - peak[:, None, None]).exp().sum((1, 2))
        scores[i] = peak
    xy[..., 2] = 1
    return xy, scores


# ---- detector post-processing --------------------------------------------------------------------


def mask_threshold(dtype: torch.dtype, inclusive: bool = False) -> float:
    """The strict threshold t of ops.paste_masks_binary (probability > t) for 0.5: 0.5, or with inclusive
    (probability >= 0.5, detectron2's test) the largest value of dtype below 0.5."""
    if not inclusive:
        return 0.5
    half = torch.tensor(0.5, dtype=dtype)
    return float(torch.nextafter(half, torch.zeros_like(half)))


def paste_masks(probs: Tensor, boxes: Tensor, image_hw, *, mask_format: str = "prob", aligned: bool = True,
                inclusive: bool = False):
    """Masks pasted into an image of size image_hw (H, W).

    Args:
        probs (Tensor[D, 1, M, M]): mask probabilities over boxes (Tensor[D, 4], image pixels).
        mask_format: "prob" -> Tensor[D, 1, H, W] float probabilities (ops.paste_masks_in_image); "bool" ->
            Tensor[D, H, W] bool, probability > 0.5 (ops.paste_masks_binary); "rle" -> list of D COCO RLE dicts
            of the bool masks (ops.paste_masks_rle), never building image-sized masks.
        aligned: see ops.paste_masks_in_image (False: torchvision's paste, bit for bit).
        inclusive: bool / RLE masks are probability >= 0.5 (detectron2's paste_masks_in_image) instead of > 0.5.
    """
    check_mask_format(mask_format)
    h, w = image_hw
    if probs.shape[0] == 0:
        if mask_format == "rle":
            return []
        return probs.new_zeros((0, 1, h, w)) if mask_format == "prob" else \
            torch.zeros((0, h, w), dtype=torch.bool, device=probs.device)
    thr = mask_threshold(probs.dtype, inclusive)
    if mask_format == "rle":
        return ops.paste_masks_rle(probs, boxes, (h, w), thr, aligned=aligned)
    if mask_format == "bool":
        return ops.paste_masks_binary(probs, boxes, (h, w), thr, aligned=aligned)
    return ops.paste_masks_in_image(probs, boxes, (h, w), aligned=aligned)


def detector_postprocess(boxes: Tensor, scores: Tensor, labels: Tensor, image_size, input_size, *,
                         mask_probs: Tensor | None = None, keypoints: Tensor | None = None,
                         keypoint_scores: Tensor | None = None, mask_format: str = "prob",
                         aligned: bool = True, inclusive: bool = False, clip: bool = False) -> dict:
    """One image's detections mapped from the resized image (image_size (h, w)) to the input image (input_size
    (h0, w0)): boxes and keypoints rescaled, masks pasted.

    Args:
        boxes (Tensor[D, 4]), scores (Tensor[D]), labels (Tensor[D]): in the resized image.
        mask_probs (Tensor[D, 1, M, M]), keypoints (Tensor[D, K, 3]), keypoint_scores (Tensor[D, K]): optional.
        mask_format, aligned, inclusive: see paste_masks.
        clip: detectron2's detector_postprocess: the rescaled boxes are clipped to the input image and the
            detections whose box that leaves empty (a side <= 0) are dropped; the masks are pasted into the
            clipped boxes. False: rescaled only (torchvision).
    Returns: {"boxes", "labels", "scores"} and, when given, "masks" ("prob": Tensor[D, 1, H0, W0] float;
    "bool": Tensor[D, H0, W0] bool) or "masks_rle" ("rle": list of D dicts), "keypoints" Tensor[D, K, 3],
    "keypoints_scores" Tensor[D, K].
    """
    (h, w), (h0, w0) = image_size, input_size
    rx, ry = w0 / w, h0 / h
    boxes = boxes * boxes.new_tensor([rx, ry, rx, ry])
    if clip:
        boxes = ops.clip_boxes(boxes, (h0, w0))
        keep = big_enough(boxes, 0.0)
        if not bool(keep.all()):    # host sync, as detectron2's results[nonempty]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            mask_probs = None if mask_probs is None else mask_probs[keep]
            keypoints = None if keypoints is None else keypoints[keep]
            keypoint_scores = None if keypoint_scores is None else keypoint_scores[keep]
    out = {"boxes": boxes, "labels": labels, "scores": scores}
    if mask_probs is not None:
        masks = paste_masks(mask_probs, boxes, (h0, w0), mask_format=mask_format, aligned=aligned,
                            inclusive=inclusive)
        out["masks_rle" if mask_format == "rle" else "masks"] = masks
    if keypoints is not None:
        kp = keypoints.clone()
        kp[..., 0] *= rx
        kp[..., 1] *= ry
        out["keypoints"] = kp
        out["keypoints_scores"] = keypoint_scores
    return out


def detector_results(dets: Detections, image_sizes, input_sizes, *, mask_probs: Tensor | None = None,
                     keypoint_heatmaps: Tensor | None = None, mask_format: str = "prob",
                     aligned: bool = True, keypoint_score: str = "logit", inclusive: bool = False,
                     clip: bool = False) -> list[dict]:
    """Per-image results of a batch of detections.

    Args:
        dets: in the resized images (image_sizes (h, w) each); input_sizes: (h0, w0) of each input image.
        mask_probs (Tensor[R, 1, M, M]), keypoint_heatmaps (Tensor[R, K, S, S]): of the valid detections,
            image after image (R = dets.counts.sum()); None: that branch is off.
        mask_format, aligned, inclusive: see paste_masks; keypoint_score: see heatmaps_to_keypoints; clip: see
            detector_postprocess.
    Returns: one dict per image, see detector_postprocess.
    """
    check_mask_format(mask_format)
    out, start = [], 0
    # host sync: one result per image with its own number of detections
    for i, (k, hw, hw0) in enumerate(zip(dets.counts.tolist(), image_sizes, input_sizes)):
        boxes = dets.boxes[i, :k]
        kp = kps = None
        if keypoint_heatmaps is not None:
            kp, kps = heatmaps_to_keypoints(keypoint_heatmaps[start:start + k], boxes, score=keypoint_score)
        out.append(detector_postprocess(
            boxes, dets.scores[i, :k].clone(), dets.labels[i, :k].clone(), hw, hw0,
            mask_probs=None if mask_probs is None else mask_probs[start:start + k], keypoints=kp,
            keypoint_scores=kps, mask_format=mask_format, aligned=aligned, inclusive=inclusive, clip=clip))
        start += k
    return out
