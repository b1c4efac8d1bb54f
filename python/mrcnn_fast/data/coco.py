"""COCO-format detection / instance segmentation / keypoint datasets (read with pycocotools).

Validation happens in two places, so that a bad file fails with a message that names it:
  * at construction (whole JSON, cheap checks): the file exists and parses, has "images", "annotations" and
    "categories", ids are unique, every annotation points at a known image and category, bboxes are four
    finite numbers, no NaN/Infinity anywhere in the annotations;
  * at __getitem__ (per image, so a 118k-image set does not stat every file up front): the image file exists
    (FileNotFoundError), decodes (ValueError for corrupt/truncated files and for float images) and, in its EXIF
    orientation, has the JSON's width/height (ValueError); 16-bit grey images are scaled to 8 bits;
    segmentations and keypoints are well formed (ValueError).
Polygons with fewer than 3 points cannot be rasterised (pycocotools would even read a 2-point polygon as a
box); they are skipped with a warning, and an instance left with no polygon at all is dropped (warning).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import operator
import random
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from .keypoints import COCO_PERSON_FLIP_PAIRS, flip_permutation
from .transforms import hflip

__all__ = ["CocoDetection", "load_coco_json", "coco_from_dict"]

REQUIRED_KEYS = ("images", "annotations", "categories")


def _rgb_uint8(im: Image.Image, path) -> np.ndarray:
    """H x W x 3 uint8 RGB of a decoded image. 16-bit grey (PNG/TIFF "I;16*", "I") is scaled by 255/65535:
    PIL's own convert("RGB") clips it at 255, which turns almost every 16-bit image white. Alpha is dropped
    (as detectron2 and torchvision do); float images have no defined range and are refused."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im)
        if a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise ValueError(f"image file {path}: {mode} pixel values outside 0..65535 "
                             f"({int(a.min())}..{int(a.max())}); only 8- and 16-bit images are supported")
        g = np.rint(a.astype(np.float32) * np.float32(255.0 / 65535.0)).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "F":
        raise ValueError(f"image file {path}: 32-bit float images are not supported (no defined value range); "
                         f"save it as 8- or 16-bit")
    try:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as e:
        raise ValueError(f"image file {path}: cannot convert its {mode} pixels to RGB: {e}") from e


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _non_finite_field(obj, path: str = "") -> str | None:
    """The path of the first NaN/Infinity inside obj (nested lists/dicts), or None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (path or "<value>")
    if isinstance(obj, dict):
        for k, v in obj.items():
            found = _non_finite_field(v, f"{path}.{k}" if path else str(k))
            if found:
                return found
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found = _non_finite_field(v, f"{path}[{i}]")
            if found:
                return found
    return None


def _flat_numbers(values) -> np.ndarray | None:
    """float64 [n] from a flat list of numbers, or None when it is not one."""
    if not isinstance(values, list) or not all(_is_number(v) for v in values):
        return None
    return np.asarray(values, dtype=np.float64)


def parse_keypoints(kp, K: int, where: str) -> np.ndarray | None:
    """float64 [K, 3] (x, y, v) from an annotation's "keypoints" list, None when it has none; a list of the
    wrong length, non-numbers or non-finite values raise ValueError starting with `where`."""
    if kp is None:
        return None
    arr = _flat_numbers(kp)
    if arr is None or arr.size != 3 * K:
        raise ValueError(f"{where} needs 'keypoints' as a flat list of {3 * K} numbers (x, y, v for {K} keypoints)")
    if not np.isfinite(arr).all():
        raise ValueError(f"{where} has non-finite keypoints")
    return arr.reshape(K, 3)


def load_coco_json(json_path: str | Path) -> dict:
    """Reads and validates a COCO JSON file; every problem raises with the file name in the message."""
    path = Path(json_path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    non_finite = []

    def parse_constant(name):
        non_finite.append(name)
        return float("nan") if name == "NaN" else float(name.replace("Infinity", "inf"))

    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(), parse_constant=parse_constant)
    except UnicodeDecodeError as e:
        raise ValueError(f"malformed COCO JSON {path}: not UTF-8 text ({e})") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed COCO JSON {path}: {e}") from e
    validate_coco_dict(data, str(path), check_non_finite=bool(non_finite))
    return data


def validate_coco_dict(data, source: str = "<dict>", *, check_non_finite: bool = True) -> None:
    """Structural checks of a COCO dataset dict (see the module docstring); raises ValueError."""
    if not isinstance(data, dict):
        raise ValueError(f"COCO JSON {source} must be an object at the top level, got {type(data).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"COCO JSON {source} is missing required key(s) {missing} (needs {list(REQUIRED_KEYS)})")
    for k in REQUIRED_KEYS:
        if not isinstance(data[k], list):
            raise ValueError(f"COCO JSON {source}: {k!r} must be a list, got {type(data[k]).__name__}")

    image_ids, cat_ids, ann_ids = set(), set(), set()
    for img in _with_unique_ids(data["images"], "image", image_ids, source):
        iid = img["id"]
        if not isinstance(img.get("file_name"), str):
            raise ValueError(f"COCO JSON {source}: image id {iid} has no 'file_name' string")
        for k in ("width", "height"):
            if not _is_int(img.get(k)) or img[k] <= 0:
                raise ValueError(f"COCO JSON {source}: image id {iid} needs a positive integer {k!r}, "
                                 f"got {img.get(k)!r}")

    for cat in _with_unique_ids(data["categories"], "category", cat_ids, source):
        kps = cat.get("keypoints")
        if kps is not None and not isinstance(kps, list):
            raise ValueError(f"COCO JSON {source}: category id {cat['id']} 'keypoints' must be a list of names")

    for ann in _with_unique_ids(data["annotations"], "annotation", ann_ids, source):
        aid = ann["id"]
        if ann.get("image_id") not in image_ids:
            raise ValueError(f"COCO JSON {source}: annotation id {aid} refers to unknown image id "
                             f"{ann.get('image_id')!r}")
        if ann.get("category_id") not in cat_ids:
            raise ValueError(f"COCO JSON {source}: annotation id {aid} refers to unknown category id "
                             f"{ann.get('category_id')!r}")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise ValueError(f"COCO JSON {source}: annotation id {aid} needs 'bbox' = [x, y, w, h], got {bbox!r}")
        if not all(math.isfinite(v) for v in bbox):
            raise ValueError(f"COCO JSON {source}: annotation id {aid} has a non-finite bbox {bbox!r}")
    if check_non_finite:
        for section in REQUIRED_KEYS:
            for entry in data[section]:
                where = _non_finite_field(entry)
                if where:
                    raise ValueError(f"COCO JSON {source}: {section[:-1]} id {entry.get('id')} has a non-finite "
                                     f"value (NaN/Infinity) in {where!r}")


def _with_unique_ids(entries: list, what: str, seen: set, source) -> Iterator[dict]:
    """The entries of one section, each checked to be an object with an integer 'id' not seen before (ids are
    added to ``seen``)."""
    for e in entries:
        if not isinstance(e, dict) or not _is_int(e.get("id")):
            raise ValueError(f"COCO JSON {source}: {what} entry without an integer 'id': {str(e)[:200]}")
        if e["id"] in seen:
            raise ValueError(f"COCO JSON {source}: duplicate {what} id {e['id']}")
        seen.add(e["id"])
        yield e


def coco_from_dict(data: dict) -> COCO:
    """A pycocotools COCO over an in-memory dataset dict (without its progress prints)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format dataset: item i -> (image Tensor[3, H, W] float32 RGB in [0, 1], target dict).

    target: "boxes" Tensor[N, 4] float32 xyxy pixels (clamped to the image; boxes under 1 pixel wide or high
    dropped), "labels" int64 [N] in 1..num_classes, "masks" uint8 [N, H, W], "keypoints" float32 [N, K, 3]
    (x, y, visibility; only when keypoints are used), "iscrowd" int64 [N], "area" float32 [N], "image_id" int,
    "orig_size" (H, W).

    Args:
        json_path: COCO annotation JSON.
        image_dir: folder holding the images' file_name paths.
        train: training mode: crowd instances dropped (unless drop_crowd=False), random horizontal flips.
        use_keypoints: None: when any category declares keypoints.
        flip_prob: probability of a horizontal flip in training.
        flip_pairs: 0-based keypoint index pairs swapped by a flip (default: the 17 COCO person keypoints).
        drop_crowd: None: same as train.

    Attributes: num_classes, cat_ids (cat_ids[i] is the COCO category id of label i + 1), class_names, coco
    (pycocotools COCO), ids (image ids, sorted), num_keypoints (0 when keypoints are not used),
    keypoint_names.

    Images without annotations are kept (empty targets). An index may also be a tuple (index, seed): the
    flip is then drawn from ``seed`` instead of torch's global RNG, which build_loader uses so that resumed
    runs see identical augmentations.
    """

    accepts_seeded_index = True

    def __init__(self, json_path, image_dir, *, train: bool = False, use_keypoints: bool | None = None,
                 flip_prob: float = 0.5, flip_pairs: Sequence[Sequence[int]] = COCO_PERSON_FLIP_PAIRS,
                 drop_crowd: bool | None = None):
        self.json_path = Path(json_path)
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image directory not found: {self.image_dir}")
        if not _is_number(flip_prob) or not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be a number in [0, 1], got {flip_prob!r}")
        data = load_coco_json(self.json_path)
        self.coco = coco_from_dict(data)
        self.train = bool(train)
        self.flip_prob = float(flip_prob)
        self.drop_crowd = self.train if drop_crowd is None else bool(drop_crowd)

        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_ids = [c["id"] for c in cats]
        self.class_names = [str(c.get("name", c["id"])) for c in cats]
        self.num_classes = len(cats)
        self._label_of = {cid: i + 1 for i, cid in enumerate(self.cat_ids)}

        kp_cats = [c for c in cats if c.get("keypoints")]
        lengths = {len(c["keypoints"]) for c in kp_cats}
        if len(lengths) > 1:
            raise ValueError(f"COCO JSON {self.json_path}: categories declare different keypoint counts {lengths}")
        if use_keypoints is None:
            use_keypoints = bool(kp_cats)
        if use_keypoints and not kp_cats:
            raise ValueError(f"use_keypoints=True but no category in {self.json_path} declares 'keypoints'")
        self.use_keypoints = bool(use_keypoints)
        self.num_keypoints = lengths.pop() if self.use_keypoints else 0
        self.keypoint_names = [str(n) for n in kp_cats[0]["keypoints"]] if self.use_keypoints else []
        self.flip_pairs = ()
        self.set_flip_pairs(flip_pairs)

        self.ids = sorted(self.coco.imgs.keys())

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (f"CocoDetection({str(self.json_path)!r}, images={len(self)}, classes={self.num_classes}, "
                f"keypoints={self.num_keypoints}, train={self.train})")

    def set_flip_pairs(self, flip_pairs: Sequence[Sequence[int]] | None) -> None:
        """The 0-based keypoint index pairs a horizontal flip swaps; checked against the set's keypoints."""
        pairs = tuple(tuple(int(i) for i in p) for p in flip_pairs) if flip_pairs else ()
        if self.use_keypoints and self.train:
            flip_permutation(self.num_keypoints, pairs)   # raises on pairs that do not fit K
        self.flip_pairs = pairs

    def __getitem__(self, index):
        seed = None
        if isinstance(index, tuple):
            index, seed = index
        index = operator.index(index)
        n = len(self.ids)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        img_id = self.ids[index]
        info = self.coco.imgs[img_id]
        image = self.load_image(info)
        target = self.load_target(img_id)
        if self.train and self.flip_prob > 0:
            u = random.Random(seed).random() if seed is not None else float(torch.rand(()))
            if u < self.flip_prob:
                image, target = hflip(image, target, self.flip_pairs)
        return image, target

    def load_image(self, info: dict) -> torch.Tensor:
        """Tensor[3, H, W] float32 RGB in [0, 1] for an image entry of the JSON."""
        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path} (image id {info['id']} in {self.json_path})")
        try:
            with Image.open(path) as im:
                im.load()
                raw_size = im.size
                # detectron2 reads images in their EXIF orientation (as viewers show them), and so do we
                if im.getexif().get(0x0112, 1) != 1:
                    im = ImageOps.exif_transpose(im)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"corrupt or truncated image file {path} (image id {info['id']}): {e}") from e
        arr = _rgb_uint8(im, path)
        h, w = arr.shape[:2]
        if (h, w) != (info["height"], info["width"]):
            rotated = (" after applying its EXIF orientation (the file itself is "
                       f"{raw_size[0]}x{raw_size[1]})" if raw_size != (w, h) else "")
            raise ValueError(f"image file {path} is {w}x{h} (WxH){rotated} but {self.json_path} says "
                             f"{info['width']}x{info['height']} for image id {info['id']}")
        # One numpy pass (HWC uint8 -> CHW float32): much cheaper than torch's permuted-float-div chain.
        out = np.empty((3, h, w), dtype=np.float32)
        np.divide(arr.transpose(2, 0, 1), np.float32(255.0), out=out, dtype=np.float32)
        return torch.from_numpy(out)

    def load_target(self, img_id: int) -> dict:
        """The target dict of an image (before any flip)."""
        info = self.coco.imgs[img_id]
        h, w = info["height"], info["width"]
        K = self.num_keypoints
        boxes, labels, masks, keypoints, crowd, areas = [], [], [], [], [], []
        for ann in self.coco.imgToAnns.get(img_id, []):
            is_crowd = int(ann.get("iscrowd", 0) or 0)
            if is_crowd and self.drop_crowd:
                continue
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            x1, y1 = min(max(x, 0.0), w), min(max(y, 0.0), h)
            x2, y2 = min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)
            if x2 - x1 < 1.0 or y2 - y1 < 1.0:
                continue
            mask = self._ann_mask(ann, h, w)
            if mask is None:
                continue
            area = ann.get("area")
            if area is None:
                area = float(mask.sum())
            elif not _is_number(area) or not math.isfinite(area):
                raise ValueError(f"{self.json_path}: annotation id {ann['id']} has an invalid area {area!r}")
            if K:
                keypoints.append(self._ann_keypoints(ann, K))
            boxes.append((x1, y1, x2, y2))
            labels.append(self._label_of[ann["category_id"]])
            masks.append(mask)
            crowd.append(is_crowd)
            areas.append(float(area))
        n = len(boxes)
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks)) if n else torch.zeros((0, h, w), dtype=torch.uint8),
        }
        if K:
            target["keypoints"] = (torch.from_numpy(np.stack(keypoints)) if n
                                   else torch.zeros((0, K, 3), dtype=torch.float32))
        target["iscrowd"] = torch.tensor(crowd, dtype=torch.int64)
        target["area"] = torch.tensor(areas, dtype=torch.float32)
        target["image_id"] = int(img_id)
        target["orig_size"] = (int(h), int(w))
        return target

    def _ann_keypoints(self, ann: dict, K: int) -> np.ndarray:
        kp = parse_keypoints(ann.get("keypoints"), K, f"{self.json_path}: annotation id {ann['id']}")
        # None: an instance of a category without keypoints, all unlabelled
        return np.zeros((K, 3), dtype=np.float32) if kp is None else kp.astype(np.float32)

    def _ann_mask(self, ann: dict, h: int, w: int) -> np.ndarray | None:
        """uint8 [h, w] mask of an annotation (polygons, uncompressed or compressed RLE)."""
        segm = ann.get("segmentation")
        aid = ann["id"]
        where = f"{self.json_path}: annotation id {aid}"
        if isinstance(segm, list):
            polys = []
            for part in segm:
                arr = _flat_numbers(part)
                if arr is None:
                    raise ValueError(f"{where}: polygon segmentation must be a list of flat [x1, y1, x2, y2, ...] "
                                     f"lists")
                if not np.isfinite(arr).all():
                    raise ValueError(f"{where}: polygon has non-finite coordinates")
                if arr.size % 2:
                    raise ValueError(f"{where}: polygon has an odd number of coordinates ({arr.size})")
                if arr.size < 6:
                    warnings.warn(f"{where}: skipping a polygon with {arr.size // 2} point(s) (needs >= 3)",
                                  stacklevel=2)
                    continue
                polys.append(arr.tolist())
            if not polys:
                if segm:
                    warnings.warn(f"{where}: no valid polygon left, instance dropped", stacklevel=2)
                    return None
                # No segmentation at all (box-only data): the box stands in for the mask.
                warnings.warn(f"{where}: empty segmentation, using the box as its mask", stacklevel=2)
                x, y, bw, bh = ann["bbox"]
                rle = mask_util.frPyObjects([[x, y, x + bw, y, x + bw, y + bh, x, y + bh]], h, w)[0]
            else:
                rle = mask_util.merge(mask_util.frPyObjects(polys, h, w))
        elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
            size = segm["size"]
            if list(size) != [h, w]:
                raise ValueError(f"{where}: RLE size {size} does not match the image's [height, width] = {[h, w]}")
            counts = segm["counts"]
            if isinstance(counts, list):
                if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != h * w:
                    raise ValueError(f"{where}: uncompressed RLE counts must be non-negative ints summing to "
                                     f"height * width = {h * w}")
                rle = mask_util.frPyObjects(segm, h, w)
            elif isinstance(counts, (str, bytes)):
                rle = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
            else:
                raise ValueError(f"{where}: RLE counts must be a list (uncompressed) or a string (compressed)")
        elif segm is None:
            warnings.warn(f"{where}: no segmentation, using the box as its mask", stacklevel=2)
            x, y, bw, bh = ann["bbox"]
            rle = mask_util.frPyObjects([[x, y, x + bw, y, x + bw, y + bh, x, y + bh]], h, w)[0]
        else:
            raise ValueError(f"{where}: segmentation must be a list of polygons or an RLE dict, "
                             f"got {type(segm).__name__}")
        try:
            with warnings.catch_warnings():
                # pycocotools' decode trips numpy 2's __array__(copy=...) DeprecationWarning on every call.
                warnings.simplefilter("ignore", DeprecationWarning)
                m = mask_util.decode(rle)
        except Exception as e:  # pycocotools raises assorted types on malformed strings
            raise ValueError(f"{where}: cannot decode RLE segmentation: {e}") from e
        if m.ndim == 3:
            m = m[..., 0]
        if m.shape != (h, w):
            raise ValueError(f"{where}: decoded mask has shape {m.shape}, expected {(h, w)}")
        return np.ascontiguousarray(m, dtype=np.uint8)
