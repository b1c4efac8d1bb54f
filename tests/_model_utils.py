"""Helpers for the model tests: a tiny config and synthetic shape images generated with numpy."""
from __future__ import annotations

import numpy as np
import torch

from mrcnn_fast.config import get_config, merge

COLORS = np.array([[0.9, 0.2, 0.2], [0.2, 0.9, 0.2], [0.2, 0.2, 0.9]], dtype=np.float32)


def tiny_cfg(overrides: dict | None = None, size: int = 128):
    """small_cpu shrunk further: R18 at width 16, 32-channel FPN/heads, size x size inputs.
    overrides apply to cfg.model."""
    cfg = get_config("small_cpu", {
        "model": {"backbone": {"width": 16}, "fpn": {"out_channels": 32},
                  "anchors": {"sizes": [[8], [16], [32], [64], [128]]},
                  "rpn": {"pre_nms_topk_train": 200, "post_nms_topk_train": 100, "pre_nms_topk_test": 100,
                          "post_nms_topk_test": 50, "batch_size_per_image": 64},
                  "roi_heads": {"batch_size_per_image": 64, "box_head_fc_dim": 128, "detections_per_image": 10},
                  "mask": {"conv_dim": 32, "num_convs": 2}, "keypoint": {"conv_dim": 32, "num_convs": 2}},
        "input": {"min_size_train": [size], "max_size_train": size, "min_size_test": size, "max_size_test": size}})
    return merge(cfg, {"model": overrides}) if overrides else cfg


def shape_mask(cls: int, x0: int, y0: int, w: int, h: int, size_hw) -> np.ndarray:
    """1 rectangle, 2 ellipse, 3 triangle (apex up) inside the box (x0, y0, w, h)."""
    yy, xx = np.mgrid[:size_hw[0], :size_hw[1]]
    if cls == 1:
        return (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
    if cls == 2:
        return ((xx + 0.5 - x0 - w / 2) / (w / 2)) ** 2 + ((yy + 0.5 - y0 - h / 2) / (h / 2)) ** 2 <= 1
    return (yy >= y0) & (yy < y0 + h) & (np.abs(xx + 0.5 - x0 - w / 2) <= (yy + 1 - y0) * w / (2 * h))


def target_from_masks(masks, labels) -> dict:
    """Boxes, masks and 4 extreme-point keypoints (top, right, bottom, left) of binary masks."""
    boxes, kps = [], []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        kps.append([[xs[ys.argmin()] + 0.5, ys.min(), 2], [xs.max() + 1, ys[xs.argmax()] + 0.5, 2],
                    [xs[ys.argmax()] + 0.5, ys.max() + 1, 2], [xs.min(), ys[xs.argmin()] + 0.5, 2]])
    n = len(masks)
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
            "labels": torch.tensor(labels, dtype=torch.int64).reshape(n),
            "masks": (torch.from_numpy(np.stack(masks).astype(np.uint8)) if n
                      else torch.zeros((0, 1, 1), dtype=torch.uint8)),
            "keypoints": torch.tensor(kps, dtype=torch.float32).reshape(n, 4, 3)}


def shapes_batch(n: int = 4, size=128, seed: int = 0, per_image: int = 2):
    """n images (Tensor[3, H, W] in [0, 1]) of non-overlapping coloured shapes on a dark noisy background."""
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for i in range(n):
        img = rng.uniform(0.0, 0.3, (3, h, w)).astype(np.float32)
        boxes, masks, labels = [], [], []
        for j in range(per_image):
            cls = 1 + (i + j) % 3
            for _ in range(100):
                bw, bh = rng.integers(min(h, w) // 4, min(h, w) // 2, 2)
                x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                if all(not (x0 < b[2] and b[0] < x0 + bw and y0 < b[3] and b[1] < y0 + bh) for b in boxes):
                    break
            boxes.append((x0, y0, x0 + bw, y0 + bh))
            m = shape_mask(cls, x0, y0, int(bw), int(bh), (h, w))
            img[:, m] = COLORS[cls - 1][:, None]
            masks.append(m)
            labels.append(cls)
        images.append(torch.from_numpy(img))
        targets.append(target_from_masks(masks, labels))
    return images, targets


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def assert_refined(base: list[dict], refined: list[dict], images, predictor, weights) -> None:
    """`refined` is `base` after one refinement pass by `predictor` (a FastRCNNPredictor with zero weights, so its
    outputs are its biases): each detection moved by the bias deltas of its class (box weights `weights`), clipped
    to its image, score sqrt(score * p(class)), re-sorted by that score."""
    from mrcnn_fast import ops

    p = torch.softmax(predictor.cls_score.bias, 0)
    for b, r, im in zip(base, refined, images):
        assert b["boxes"].shape[0] > 0
        assert bool((r["scores"][:-1] >= r["scores"][1:]).all())     # re-sorted by the new score
        order = (b["scores"] * p[b["labels"]]).sqrt().argsort(descending=True, stable=True)
        b = {k: v[order] for k, v in b.items()}
        assert torch.equal(b["labels"], r["labels"])
        deltas = predictor.bbox_pred.bias.reshape(-1, 4)[b["labels"]]
        want = ops.clip_boxes(ops.decode_boxes(deltas, b["boxes"], weights).reshape(-1, 4), tuple(im.shape[1:]))
        torch.testing.assert_close(r["boxes"], want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(r["scores"], (b["scores"] * p[b["labels"]]).sqrt())
        assert r["masks"].shape == b["masks"].shape and r["keypoints"].shape == b["keypoints"].shape
