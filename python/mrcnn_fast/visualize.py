"""Drawing detections (masks, boxes, labels, scores, keypoints) on images with PIL.

    img = draw_instances(image, output, class_names=dataset.class_names, score_thresh=0.5)
    img.save("out.png")
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# Distinct, saturated colours (RGB); instance i gets PALETTE[i % len(PALETTE)].
PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128),
)
# Keypoint k gets KEYPOINT_COLORS[k % len]: the same joint has the same colour on every instance.
KEYPOINT_COLORS = ((255, 255, 0), (0, 255, 255), (255, 0, 255), (255, 255, 255), (255, 128, 0), (0, 255, 0))


def to_pil(image) -> Image.Image:
    """A PIL RGB image from Tensor[3, H, W] float in [0, 1] (or uint8), an HxWx3 uint8 array, or a PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if torch.is_tensor(image):
        t = image.detach().cpu()
        if t.dim() != 3 or t.shape[0] != 3:
            raise ValueError(f"image must be Tensor[3, H, W], got shape {list(t.shape)}")
        if t.is_floating_point():
            t = (t.clamp(0, 1) * 255).round()
        return Image.fromarray(t.to(torch.uint8).permute(1, 2, 0).contiguous().numpy(), "RGB")
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image array must be H x W x 3, got shape {arr.shape}")
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def _masks(output: dict, keep: np.ndarray, h: int, w: int, thresh: float) -> list[np.ndarray] | None:
    if "masks" in output:
        m = output["masks"]
        m = m.detach().cpu().numpy() if torch.is_tensor(m) else np.asarray(m)
        if m.ndim == 4:
            m = m[:, 0]
        return [m[i] > thresh for i in keep]
    if "masks_rle" in output:
        from pycocotools import mask as mask_util

        out = []
        for i in keep:
            rle = dict(output["masks_rle"][i])
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode("ascii")
            with warnings.catch_warnings():   # pycocotools' numpy-2 __array__ deprecation noise
                warnings.simplefilter("ignore", DeprecationWarning)
                out.append(mask_util.decode(rle).astype(bool))
        return out
    return None


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:   # Pillow < 10.1: a fixed-size bitmap font
        return ImageFont.load_default()


def draw_instances(image, output: dict, *, class_names: Sequence[str] | None = None, score_thresh: float = 0.5,
                   mask_thresh: float = 0.5, alpha: float = 0.45, skeleton: Sequence[Sequence[int]] = (),
                   keypoint_thresh: float | None = None) -> Image.Image:
    """The image with the detections of output drawn on it (a new PIL RGB image).

    Args:
        image: Tensor[3, H, W] (float in [0, 1] or uint8), an H x W x 3 uint8 array, or a PIL image.
        output: one image's model output: "boxes" [D, 4] xyxy pixels, "labels" [D] (1..C), "scores" [D], and
            optionally "masks" [D, 1, H, W] probabilities or "masks_rle" (D RLE dicts), "keypoints" [D, K, 3],
            "keypoints_scores" [D, K].
        class_names: class_names[label - 1] is drawn with the score (default: the label number).
        score_thresh: detections scoring below it are not drawn.
        skeleton: 0-based keypoint index pairs joined by lines.
        keypoint_thresh: keypoints whose score is below it are not drawn (default: all of a drawn instance).
    """
    img = to_pil(image)
    w, h = img.size
    scores = output["scores"]
    scores = scores.detach().cpu().numpy() if torch.is_tensor(scores) else np.asarray(scores)
    keep = np.nonzero(scores >= score_thresh)[0]
    keep = keep[np.argsort(-scores[keep], kind="stable")][::-1]   # best drawn last, on top
    boxes = np.asarray(output["boxes"].detach().cpu() if torch.is_tensor(output["boxes"]) else output["boxes"])
    labels = np.asarray(output["labels"].detach().cpu() if torch.is_tensor(output["labels"]) else output["labels"])
    colors = {int(i): PALETTE[rank % len(PALETTE)] for rank, i in enumerate(sorted(keep))}

    masks = _masks(output, keep, h, w, mask_thresh)
    if masks:
        arr = np.asarray(img, dtype=np.float32)
        for i, m in zip(keep, masks):
            if m.shape != (h, w):
                raise ValueError(f"mask of detection {int(i)} is {m.shape}, the image {(h, w)}")
            arr[m] = arr[m] * (1 - alpha) + np.asarray(colors[int(i)], np.float32) * alpha
        img = Image.fromarray(arr.round().clip(0, 255).astype(np.uint8), "RGB")

    draw = ImageDraw.Draw(img)
    font = _font(max(10, min(h, w) // 24))
    line = max(1, min(h, w) // 160)
    for i in keep:
        c = colors[int(i)]
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        draw.rectangle([x1, y1, x2, y2], outline=c, width=line)
        lab = int(labels[i])
        name = class_names[lab - 1] if class_names is not None and 1 <= lab <= len(class_names) else str(lab)
        text = f"{name} {scores[i]:.2f}"
        tx, ty = x1, max(0.0, y1 - font.size - 3 if hasattr(font, "size") else y1 - 12)
        bbox = draw.textbbox((tx, ty), text, font=font)
        draw.rectangle([bbox[0] - 1, bbox[1] - 1, bbox[2] + 1, bbox[3] + 1], fill=c)
        draw.text((tx, ty), text, fill=(255, 255, 255), font=font)

    if "keypoints" in output:
        kps = output["keypoints"]
        kps = kps.detach().cpu().numpy() if torch.is_tensor(kps) else np.asarray(kps)
        ks = output.get("keypoints_scores")
        ks = ks.detach().cpu().numpy() if torch.is_tensor(ks) else (np.asarray(ks) if ks is not None else None)
        r = max(2, min(h, w) // 100)
        for i in keep:
            pts = kps[i]
            ok = np.ones(len(pts), bool) if keypoint_thresh is None or ks is None else ks[i] >= keypoint_thresh
            for a, b in skeleton:
                if a < len(pts) and b < len(pts) and ok[a] and ok[b]:
                    draw.line([tuple(pts[a, :2]), tuple(pts[b, :2])], fill=colors[int(i)], width=line)
            for k, (x, y) in enumerate(pts[:, :2]):
                if ok[k]:
                    draw.ellipse([x - r, y - r, x + r, y + r], fill=KEYPOINT_COLORS[k % len(KEYPOINT_COLORS)],
                                 outline=(0, 0, 0))
    return img


def skeleton_of(dataset) -> list[tuple[int, int]]:
    """0-based keypoint pairs from the COCO categories' (1-based) "skeleton", if the data set declares one."""
    coco = getattr(dataset, "coco", None)
    if coco is None:
        return []
    for cat in coco.cats.values():
        if cat.get("skeleton"):
            return [(int(a) - 1, int(b) - 1) for a, b in cat["skeleton"]]
    return []


def save_predictions(model: torch.nn.Module, dataset, out_dir, *, num_images: int = 8, score_thresh: float = 0.5,
                     prefix: str = "") -> list[Path]:
    """Runs model on the first num_images of dataset and writes <image_id>.png with the detections drawn.

    model: a detector such as MaskRCNN; for a config's model pass modeling.inference_model(model, cfg), which
    applies its test-time augmentation."""
    from .engine.inference import inference, takes_mask_format

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = getattr(dataset, "class_names", None)
    skel = skeleton_of(dataset)
    paths = []
    n = min(num_images, len(dataset))
    inner = getattr(model, "module", model)
    mask_format = "prob" if takes_mask_format(inner) else None
    for idx, (targets, outputs) in zip(range(n), inference(inner, dataset, indices=range(n), mask_format=mask_format)):
        image, _ = dataset[idx]
        img = draw_instances(image, outputs[0], class_names=names, score_thresh=score_thresh, skeleton=skel)
        p = out_dir / f"{prefix}{int(targets[0]['image_id']):06d}.png"
        img.save(p)
        paths.append(p)
    return paths
