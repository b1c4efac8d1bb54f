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
    m = output.get("masks")
    rles = output.get("masks_rle")
    if isinstance(m, (list, tuple)):   # the Predictor's mask_format="rle": RLE dicts under "masks"
        m, rles = None, m
    if m is not None:
        m = m.detach().cpu().numpy() if torch.is_tensor(m) else np.asarray(m)
        if m.ndim == 4:
            m = m[:, 0]
        return [m[i] > thresh for i in keep]
    if rles is not None:
        from pycocotools import mask as mask_util

        out = []
        for i in keep:
            rle = dict(rles[i])
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


def _edge(m: np.ndarray, width: int) -> np.ndarray:
    """The pixels of mask m within `width` pixels of its border (4-neighbour erosion, repeated)."""
    inner = m.copy()
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return m & ~inner


def _numpy_of(v) -> np.ndarray:
    return v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v)


def draw_instances(image, output: dict, *, class_names: Sequence[str] | None = None, score_thresh: float = 0.5,
                   mask_thresh: float = 0.5, alpha: float = 0.45, skeleton: Sequence[Sequence[int]] = (),
                   keypoint_thresh: float | None = None) -> Image.Image:
    """The image with the detections of output drawn on it (a new PIL RGB image).

    Each instance gets its own colour: its mask blended in (alpha) with a solid outline, its box, its keypoints
    joined by the skeleton, and a label "<class> <score>" in white with a dark outline on a box of its colour.
    Line widths and the font scale with the image size; labels are drawn last, so that no mask or box hides
    them, and kept inside the image.

    Args:
        image: Tensor[3, H, W] (float in [0, 1] or uint8), an H x W x 3 uint8 array, or a PIL image.
        output: one image's detections: "boxes" [D, 4] xyxy pixels, "labels" [D] (1..C), "scores" [D], and
            optionally "masks" ([D, 1, H, W] probabilities, [D, H, W] bool, or a list of D RLE dicts as the
            Predictor's mask_format="rle" gives) or "masks_rle" (D RLE dicts), "keypoints" [D, K, 3],
            "keypoints_scores" [D, K], "class_names" (D str, as the Predictor gives; drawn before class_names).
        class_names: class_names[label - 1] is drawn with the score (default: the label number).
        score_thresh: detections scoring below it are not drawn.
        skeleton: 0-based keypoint index pairs joined by lines.
        keypoint_thresh: keypoints whose score is below it are not drawn (default: all of a drawn instance).
    """
    img = to_pil(image)
    w, h = img.size
    scores = _numpy_of(output["scores"]).astype(np.float64).reshape(-1)
    keep = np.nonzero(scores >= score_thresh)[0]
    keep = keep[np.argsort(-scores[keep], kind="stable")][::-1]   # best drawn last, on top
    boxes = _numpy_of(output["boxes"]).reshape(-1, 4)
    labels = _numpy_of(output["labels"]).reshape(-1)
    colors = {int(i): PALETTE[rank % len(PALETTE)] for rank, i in enumerate(sorted(keep))}
    side = min(h, w)
    line = max(1, round(side / 200))

    masks = _masks(output, keep, h, w, mask_thresh)
    if masks:
        arr = np.asarray(img, dtype=np.float32)
        for i, m in zip(keep, masks):
            if m.shape != (h, w):
                raise ValueError(f"mask of detection {int(i)} is {m.shape}, the image {(h, w)}")
            c = np.asarray(colors[int(i)], np.float32)
            arr[m] = arr[m] * (1 - alpha) + c * alpha
            arr[_edge(m, line)] = c
        img = Image.fromarray(arr.round().clip(0, 255).astype(np.uint8), "RGB")

    draw = ImageDraw.Draw(img)
    for i in keep:
        draw.rectangle([float(v) for v in boxes[i]], outline=colors[int(i)], width=line)

    if "keypoints" in output:
        kps = _numpy_of(output["keypoints"])
        ks = output.get("keypoints_scores")
        ks = _numpy_of(ks) if ks is not None else None
        r = max(2, round(side / 120))
        for i in keep:
            pts = kps[i]
            ok = np.ones(len(pts), bool) if keypoint_thresh is None or ks is None else ks[i] >= keypoint_thresh
            for a, b in skeleton:
                if a < len(pts) and b < len(pts) and ok[a] and ok[b]:
                    seg = [tuple(pts[a, :2]), tuple(pts[b, :2])]
                    draw.line(seg, fill=(0, 0, 0), width=line + 2)   # a dark rim: visible on any background
                    draw.line(seg, fill=colors[int(i)], width=line)
            for k, (x, y) in enumerate(pts[:, :2]):
                if ok[k]:
                    draw.ellipse([x - r, y - r, x + r, y + r], fill=KEYPOINT_COLORS[k % len(KEYPOINT_COLORS)],
                                 outline=(0, 0, 0), width=max(1, line // 2))

    font = _font(max(10, round(side / 30)))
    stroke = max(1, round(side / 400))
    pad = max(1, line)
    placed: dict[int, tuple] = {}   # detection -> (x, y, width, height) of its label, text, text offset
    for i in keep[::-1]:   # the best detections choose their label's place first
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        lab = int(labels[i])
        if "class_names" in output:
            name = str(output["class_names"][i])
        else:
            name = class_names[lab - 1] if class_names is not None and 1 <= lab <= len(class_names) else str(lab)
        text = f"{name} {scores[i]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
        tw, th = right - left + 2 * pad, bottom - top + 2 * pad
        tx = min(max(0.0, x1), max(0.0, w - tw))
        # above the box, else just inside its top, else below it: the first spot free of the labels placed so far
        spots = [y for y in (y1 - th, y1, y2) if 0 <= y <= h - th] or [min(max(0.0, y1), max(0.0, h - th))]
        free = [y for y in spots if not any(tx < px + pw and px < tx + tw and y < py + ph and py < y + th
                                            for (px, py, pw, ph), _, _ in placed.values())]
        placed[int(i)] = ((tx, (free or spots)[0], tw, th), text, (pad - left, pad - top))
    for i in keep:   # drawn best last, on top
        (tx, ty, tw, th), text, (ox, oy) = placed[int(i)]
        c = colors[int(i)]
        dark = tuple(int(v * 0.6) for v in c)   # white text reads better on a darkened instance colour
        draw.rectangle([tx, ty, tx + tw - 1, ty + th - 1], fill=dark, outline=c)
        draw.text((tx + ox, ty + oy), text, fill=(255, 255, 255), font=font, stroke_width=stroke, stroke_fill=(0, 0, 0))
    return img


# The COCO person keypoints' skeleton as 0-based index pairs (COCO's category metadata, 1-based there).
COCO_PERSON_SKELETON = ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
                        (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6))
# The synthetic shapes' keypoints (top, right, bottom, left) joined round the shape.
SHAPES_SKELETON = ((0, 1), (1, 2), (2, 3), (3, 0))


def skeleton_of_config(cfg) -> tuple[tuple[int, int], ...]:
    """The skeleton to draw for a config's keypoints, recognised by their count and flip pairs (a config does not
    record one): COCO person, the synthetic shapes, or none."""
    from .data.keypoints import COCO_PERSON_FLIP_PAIRS
    from .data.shapes import SHAPE_FLIP_PAIRS

    kp = cfg.model.keypoint
    if not kp.enabled:
        return ()
    pairs = tuple(tuple(int(v) for v in p) for p in kp.flip_pairs)
    if kp.num_keypoints == 17 and pairs == tuple(tuple(p) for p in COCO_PERSON_FLIP_PAIRS):
        return COCO_PERSON_SKELETON
    if kp.num_keypoints == 4 and pairs == tuple(tuple(p) for p in SHAPE_FLIP_PAIRS):
        return SHAPES_SKELETON
    return ()


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
