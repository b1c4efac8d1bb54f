"""A synthetic COCO-format set of coloured shapes (triangles, rectangles, ellipses) for fast CPU training.

Each image has 2-6 shapes (a few images have none) of small (< 32^2 px), medium and large size, in random
colours on a textured, noisy background. Shapes are painted in order, so later shapes occlude earlier ones;
the masks of earlier shapes lose the occluded pixels, and a new shape that would leave an earlier one with too
little visible area is rejected (dropped) and redrawn elsewhere, so every annotated instance stays
recognisable and no unannotated fragment is painted.

Annotations: "segmentation" is the shape's polygon when the shape is fully visible, else a compressed RLE of
its visible mask (possibly several parts); "area" is the visible pixel count and "bbox" the visible mask's box,
both exactly as pycocotools decodes the segmentation (masks are rasterised by pycocotools from the polygon
itself, so polygon and pixels agree). Four keypoints per shape, "top", "right", "bottom", "left": the extreme
pixels of the full (unoccluded) shape, at pixel centres (x = col + 0.5), visibility 2 when that pixel is
visible; a horizontal flip swaps right and left: flip pairs ((1, 3),). A keypoint hidden by a later shape is
not labelled by default (occluded_keypoints="omit": [0, 0, 0], COCO's "not labelled"): it is an extreme point of
the hidden full shape, which the image does not determine (on a 30-min model its median error was 0.55
sqrt(area) against 0.03 for visible ones), so it would train and score noise. occluded_keypoints="label" keeps
it with visibility 1 (the set's earlier definition).

Everything is a function of (seed, split, image index): the same seed gives byte-identical JSON and PNGs, and
a larger n_train only appends images.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from ..ops._checks import check_int

__all__ = ["make_shapes", "SHAPE_CATEGORIES", "SHAPE_KEYPOINT_NAMES", "SHAPE_FLIP_PAIRS"]

SHAPE_KEYPOINT_NAMES = ["top", "right", "bottom", "left"]
SHAPE_FLIP_PAIRS = ((1, 3),)
_SKELETON = [[1, 2], [2, 3], [3, 4], [4, 1]]
SHAPE_CATEGORIES = [
    {"id": i + 1, "name": name, "supercategory": "shape", "keypoints": SHAPE_KEYPOINT_NAMES, "skeleton": _SKELETON}
    for i, name in enumerate(["triangle", "rectangle", "ellipse"])
]

_MIN_VISIBLE_FRACTION = 0.35   # an earlier shape must keep this much of its area visible
_MIN_VISIBLE_PIXELS = 24
_EMPTY_EVERY = 16              # one image in 16 (counted from the last) has no shapes


def _rasterize(poly: list[float], h: int, w: int) -> np.ndarray:
    rle = mask_util.frPyObjects([poly], h, w)
    with warnings.catch_warnings():
        # pycocotools' decode trips numpy 2's __array__(copy=...) DeprecationWarning on every call.
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_util.decode(rle)[..., 0].astype(bool)


def _shape_polygon(rng: np.random.Generator, cat: int, area: float) -> np.ndarray:
    """Vertices [P, 2] of a shape of roughly `area` px^2 centred at the origin."""
    aspect = math.exp(rng.uniform(-0.6, 0.6))
    theta = rng.uniform(0, math.pi) if (cat != 2 or rng.random() < 0.5) else 0.0
    if cat == 1:    # triangle: three jittered directions, scaled to the area
        ang = rng.uniform(0, 2 * math.pi) + np.array([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
        ang += rng.uniform(-0.45, 0.45, 3)
        rad = rng.uniform(0.8, 1.15, 3)
        pts = np.stack([rad * np.cos(ang) * aspect, rad * np.sin(ang)], 1)
        x, y = pts[:, 0], pts[:, 1]
        a0 = 0.5 * abs(x[0] * (y[1] - y[2]) + x[1] * (y[2] - y[0]) + x[2] * (y[0] - y[1]))
        pts *= math.sqrt(area / max(a0, 1e-6))
        pts -= pts.mean(0)
    elif cat == 2:  # rectangle
        hw, hh = math.sqrt(area * aspect) / 2, math.sqrt(area / aspect) / 2
        pts = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]])
    else:           # ellipse as a fine polygon
        a, b = math.sqrt(area * aspect / math.pi), math.sqrt(area / (aspect * math.pi))
        n = int(np.clip(2 * math.pi * max(a, b) / 2.5, 16, 72))
        t = np.arange(n) * (2 * math.pi / n)
        pts = np.stack([a * np.cos(t), b * np.sin(t)], 1)
    c, s = math.cos(theta), math.sin(theta)
    return pts @ np.array([[c, s], [-s, c]])


def _extreme_points(full: np.ndarray) -> list[tuple[int, int]]:
    """(row, col) of the top, right, bottom and left extreme pixels (middle one where a side is flat)."""
    rows = np.flatnonzero(full.any(1))
    cols = np.flatnonzero(full.any(0))
    top, bottom, left, right = rows[0], rows[-1], cols[0], cols[-1]

    def mid(a):
        return int(a[len(a) // 2])

    return [(int(top), mid(np.flatnonzero(full[top]))),
            (mid(np.flatnonzero(full[:, right])), int(right)),
            (int(bottom), mid(np.flatnonzero(full[bottom]))),
            (mid(np.flatnonzero(full[:, left])), int(left))]


def _background(rng: np.random.Generator, h: int, w: int) -> tuple[Image.Image, np.ndarray]:
    base = rng.uniform(40, 215, 3)
    grid = np.clip(base + rng.normal(0, 28, (5, 5, 3)), 0, 255).astype(np.uint8)
    field = np.asarray(Image.fromarray(grid).resize((w, h), Image.BILINEAR), dtype=np.float64)
    # Faint stripes: texture the detector must learn to ignore.
    freq, phase, ang = rng.uniform(0.05, 0.35), rng.uniform(0, 2 * math.pi), rng.uniform(0, math.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    stripes = np.sin(freq * (xx * math.cos(ang) + yy * math.sin(ang)) + phase)
    field += rng.uniform(4, 14) * stripes[..., None]
    img = np.clip(field, 0, 255).astype(np.uint8)
    return Image.fromarray(img, "RGB"), field.reshape(-1, 3).mean(0)


def _pick_colour(rng: np.random.Generator, avoid: list[np.ndarray], bg: np.ndarray) -> np.ndarray:
    best, best_d = None, -1.0
    for _ in range(24):
        c = rng.uniform(0, 255, 3)
        d = min([np.linalg.norm(c - bg) / 90.0] + [np.linalg.norm(c - a) / 60.0 for a in avoid])
        if d >= 1.0:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def _make_image(rng: np.random.Generator, h: int, w: int, empty: bool, label_occluded: bool):
    canvas, bg_mean = _background(rng, h, w)
    shapes: list[dict] = []
    if not empty:
        wanted = int(rng.integers(2, 7))
        max_area = 0.3 * h * w
        buckets = [(60.0, 900.0), (1200.0, 8500.0), (10000.0, 26000.0)]
        for _ in range(wanted * 12):
            if len(shapes) == wanted:
                break
            lo, hi = buckets[int(rng.choice(3, p=[0.3, 0.4, 0.3]))]
            hi = min(hi, max_area)
            if lo >= hi:
                lo, hi = 60.0, max(61.0, max_area)
            cat = int(rng.integers(1, 4))
            pts = _shape_polygon(rng, cat, math.exp(rng.uniform(math.log(lo), math.log(hi))))
            ext = pts.max(0) - pts.min(0)
            room = np.array([w - 2.0, h - 2.0])
            if (ext > room).any():
                pts *= float((room / ext).min()) * 0.98
            lo_c, hi_c = 1.0 - pts.min(0), room + 1.0 - pts.max(0)
            if shapes and rng.random() < 0.4:   # push for overlaps: near an existing shape
                other = shapes[int(rng.integers(len(shapes)))]["centre"]
                centre = other + rng.normal(0, 0.5, 2) * ext
            else:
                centre = rng.uniform(0, 1, 2) * (hi_c - lo_c) + lo_c
            centre = np.clip(centre, lo_c, hi_c)
            poly = [round(float(v), 2) for v in (pts + centre).reshape(-1)]
            full = _rasterize(poly, h, w)
            area = int(full.sum())
            if area < _MIN_VISIBLE_PIXELS:
                continue
            ok = all((s["visible"] & ~full).sum() >= max(_MIN_VISIBLE_FRACTION * s["full_area"], _MIN_VISIBLE_PIXELS)
                     for s in shapes)
            if not ok:
                continue    # this shape would bury an earlier one: drop it, try another
            for s in shapes:
                s["visible"] &= ~full
            colour = _pick_colour(rng, [s["colour"] for s in shapes], bg_mean)
            shapes.append({"cat": cat, "poly": poly, "full": full, "full_area": area, "visible": full.copy(),
                           "colour": colour, "centre": centre})
    for s in shapes:
        fill = tuple(int(v) for v in np.round(s["colour"]))
        canvas.paste(fill, mask=Image.fromarray(s["full"].astype(np.uint8) * 255, "L"))
    pixels = np.asarray(canvas, dtype=np.float64) + rng.normal(0, 7.0, (h, w, 3))
    image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "RGB")

    anns = []
    for s in shapes:
        vis = s["visible"]
        rle = mask_util.encode(np.asfortranarray(vis.astype(np.uint8)))
        if np.array_equal(vis, s["full"]):
            segmentation = [s["poly"]]
        else:
            segmentation = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
        keypoints = []
        for r, c in _extreme_points(s["full"]):
            if vis[r, c]:
                keypoints += [c + 0.5, r + 0.5, 2]
            elif label_occluded:
                keypoints += [c + 0.5, r + 0.5, 1]
            else:
                keypoints += [0, 0, 0]
        anns.append({
            "category_id": s["cat"],
            "segmentation": segmentation,
            "area": int(mask_util.area(rle)),
            "bbox": [float(v) for v in mask_util.toBbox(rle)],
            "iscrowd": 0,
            "keypoints": keypoints,
            "num_keypoints": sum(1 for v in keypoints[2::3] if v > 0),
        })
    return image, anns


def _make_split(out_dir: Path, split: str, split_index: int, n: int, seed: int, h: int, w: int,
                label_occluded: bool):
    image_dir = out_dir / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, split_index, i])))
        empty = n >= 4 and (n - 1 - i) % _EMPTY_EVERY == 0
        image, anns = _make_image(rng, h, w, empty, label_occluded)
        file_name = f"{i + 1:06d}.png"
        image.save(image_dir / file_name, format="PNG")
        images.append({"id": i + 1, "file_name": file_name, "width": w, "height": h})
        for a in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, **a})
    data = {
        "info": {"description": f"mrcnn_fast synthetic shapes ({split}, seed {seed})", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": SHAPE_CATEGORIES,
    }
    json_path = out_dir / f"{split}.json"
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(json_path)
    return json_path, image_dir


def make_shapes(out_dir, n_train: int = 256, n_val: int = 64, seed: int = 0, image_size=(256, 256),
                occluded_keypoints: str = "omit") -> dict:
    """Writes the synthetic set under out_dir: train.json + train/*.png, val.json + val/*.png.

    Args:
        out_dir: output folder (created; existing files of the same names are overwritten).
        n_train, n_val: number of images per split.
        seed: everything is a function of the seed.
        image_size: (height, width), each >= 32.
        occluded_keypoints: "omit" (hidden keypoints not labelled, v = 0) | "label" (v = 1 at the hidden
            extreme point of the full shape). The images and masks do not depend on it.
    Returns:
        dict(train_json=, train_images=, val_json=, val_images=) of path strings.
    """
    n_train, n_val, seed = (check_int(v, name, minimum=0) for name, v in
                            (("n_train", n_train), ("n_val", n_val), ("seed", seed)))
    try:
        h, w = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (height, width), got {image_size!r}") from None
    if h < 32 or w < 32:
        raise ValueError(f"image_size must be at least (32, 32), got {image_size!r}")
    if occluded_keypoints not in ("omit", "label"):
        raise ValueError(f"occluded_keypoints must be 'omit' or 'label', got {occluded_keypoints!r}")
    label = occluded_keypoints == "label"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_json, train_images = _make_split(out, "train", 0, n_train, seed, h, w, label)
    val_json, val_images = _make_split(out, "val", 1, n_val, seed, h, w, label)
    return {"train_json": str(train_json), "train_images": str(train_images),
            "val_json": str(val_json), "val_images": str(val_images)}
