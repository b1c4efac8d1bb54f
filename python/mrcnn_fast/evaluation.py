"""COCO evaluation (pycocotools COCOeval) of model outputs: box AP, mask AP, keypoint AP.

    ev = COCOEvaluator(dataset.coco, dataset.cat_ids, iou_types=("bbox", "segm", "keypoints"))
    for images, targets in loader:
        ev.process([t["image_id"] for t in targets], model(images))
    print(format_table(ev.evaluate()))

Results are kept in the COCO results format (one dict per detection: image_id, category_id, bbox [x, y, w, h],
score, segmentation as RLE with counts str, keypoints [x1, y1, s1, ...]), plain Python data that pickles and
gathers across ranks. Which images are scored: the ones given to process() by default; with an explicit
``results`` list (e.g. gathered from all ranks) every image of the ground truth unless ``image_ids`` says
otherwise, so images without any detection still count as misses.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .data.coco import _flat_numbers, parse_keypoints

__all__ = ["COCOEvaluator", "format_table", "prepare_ground_truth", "label_category_ids", "METRIC_NAMES",
           "COCO_PERSON_SIGMAS", "DEFAULT_SIGMA"]

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm", "keypoints")
# Per-keypoint OKS sigmas of the 17 COCO person keypoints (COCO keypoint evaluation).
COCO_PERSON_SIGMAS = (np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87,
                                .89, .89]) / 10.0)
# For other keypoint sets: a uniform sigma in the middle of COCO's range (0.025 eyes .. 0.107 hips).
DEFAULT_SIGMA = 0.05
_FIELD = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}


def _numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _box_polygon(bbox) -> list[list[float]]:
    x, y, w, h = (float(v) for v in bbox)
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


# Marks a COCO made by prepare_ground_truth (value: whether keypoints were prepared too), so that the
# evaluators built from it do not redo the work.
_PREPARED = "_mrcnn_fast_eval_gt"


def prepare_ground_truth(coco_gt: COCO, *, keypoints: bool = False, source: str = "the ground truth",
                         log=None) -> COCO:
    """The ground truth COCOeval scores against: every annotation as the data loader (data.CocoDetection)
    reads it for training, checked before any inference runs.

    pycocotools reads segmentations the loader accepts but treats differently (a 2-point polygon as a box,
    ``[]`` or a missing key not at all) and crashes in COCOeval after the whole inference pass. Here, as in the
    loader: polygons with fewer than 3 points are skipped; an instance left with no polygon is dropped; an
    empty list, null or missing segmentation is replaced by the box. Segmentations or keypoints the loader
    rejects raise ValueError naming the annotation. With ``keypoints``, instances of keypoint categories
    without keypoints count as unlabelled (all zero, as the loader reads them) and num_keypoints is derived
    where missing (COCOeval reads it to ignore unlabelled instances).

    Returns a new COCO over shallow copies of the annotations (coco_gt, shared with the data set, is left
    as it is). ``log(message)`` gets one line summarising the changes (default: warnings.warn).
    """
    if not isinstance(coco_gt, COCO):
        raise TypeError(f"coco_gt must be a pycocotools COCO, got {type(coco_gt).__name__}")
    dataset = coco_gt.dataset
    kpt_len = {c["id"]: len(c["keypoints"]) for c in dataset.get("categories", []) if c.get("keypoints")}
    counts = {"short": 0, "dropped": 0, "boxed": 0, "no_kp": 0}
    annotations = []
    for ann in dataset.get("annotations", []):
        ann = dict(ann)
        where = f"{source}: annotation id {ann.get('id')}"
        info = coco_gt.imgs.get(ann.get("image_id"))
        if info is None:
            raise ValueError(f"{where} refers to unknown image id {ann.get('image_id')!r}")
        if _prepare_segmentation(ann, info["height"], info["width"], where, counts):
            continue
        k = kpt_len.get(ann.get("category_id"))
        if keypoints and k:
            kp = parse_keypoints(ann.get("keypoints"), k, where)
            if kp is None:
                ann["keypoints"], ann["num_keypoints"] = [0] * (3 * k), 0
                counts["no_kp"] += 1
            elif "num_keypoints" not in ann:
                ann["num_keypoints"] = int((kp[:, 2] > 0).sum())
        annotations.append(ann)
    notes = []
    if counts["short"]:
        notes.append(f"{counts['short']} polygon(s) with fewer than 3 points skipped")
    if counts["dropped"]:
        notes.append(f"{counts['dropped']} instance(s) without a valid polygon dropped")
    if counts["boxed"]:
        notes.append(f"{counts['boxed']} instance(s) without a segmentation scored with their box as the mask")
    if counts["no_kp"]:
        notes.append(f"{counts['no_kp']} instance(s) of keypoint categories without keypoints count as unlabelled")
    if notes:
        msg = f"evaluation ground truth of {source}, as the data loader reads it: " + "; ".join(notes)
        if log is None:
            import warnings

            warnings.warn(msg, stacklevel=2)
        else:
            log(msg)
    prepared = COCO()
    prepared.dataset = dict(dataset, annotations=annotations)
    with contextlib.redirect_stdout(io.StringIO()):
        prepared.createIndex()
    setattr(prepared, _PREPARED, bool(keypoints))
    return prepared


def _prepare_segmentation(ann: dict, h: int, w: int, where: str, counts: dict) -> bool:
    """Puts the loader's reading of ann's segmentation into ann; True when the loader drops the instance."""
    segm = ann.get("segmentation")
    if isinstance(segm, list):
        polys = []
        for part in segm:
            arr = _flat_numbers(part)
            if arr is None:
                raise ValueError(f"{where}: polygon segmentation must be a list of flat [x1, y1, x2, y2, ...] lists")
            if not np.isfinite(arr).all():
                raise ValueError(f"{where}: polygon has non-finite coordinates")
            if arr.size % 2:
                raise ValueError(f"{where}: polygon has an odd number of coordinates ({arr.size})")
            if arr.size < 6:
                counts["short"] += 1
                continue
            polys.append(part)
        if polys:
            ann["segmentation"] = polys
            return False
        if segm:   # only degenerate polygons: the loader drops the instance
            counts["dropped"] += 1
            return True
        segm = None   # [] is box-only data, as a missing segmentation
    if segm is None:
        bbox = ann.get("bbox")
        if _flat_numbers(bbox) is None or len(bbox) != 4:
            raise ValueError(f"{where} has no segmentation and no 'bbox' = [x, y, w, h] to stand in for it")
        ann["segmentation"] = _box_polygon(bbox)
        counts["boxed"] += 1
        return False
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if not isinstance(segm["size"], list) or list(segm["size"]) != [h, w]:
            raise ValueError(f"{where}: RLE size {segm['size']} does not match the image's [height, width] = "
                             f"{[h, w]}")
        rle_counts = segm["counts"]
        if isinstance(rle_counts, list):
            if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in rle_counts) \
                    or sum(rle_counts) != h * w:
                raise ValueError(f"{where}: uncompressed RLE counts must be non-negative ints summing to "
                                 f"height * width = {h * w}")
            return False
        if not isinstance(rle_counts, (str, bytes)):
            raise ValueError(f"{where}: RLE counts must be a list (uncompressed) or a string (compressed)")
        try:
            m = mask_util.decode({"size": [h, w], "counts": rle_counts.encode("ascii")
                                  if isinstance(rle_counts, str) else rle_counts})
        except Exception as e:  # pycocotools raises assorted types on malformed strings
            raise ValueError(f"{where}: cannot decode RLE segmentation: {e}") from e
        if m.shape[:2] != (h, w):
            raise ValueError(f"{where}: decoded mask has shape {m.shape[:2]}, expected {(h, w)}")
        return False
    raise ValueError(f"{where}: segmentation must be a list of polygons or an RLE dict, got {type(segm).__name__}")


def label_category_ids(coco_gt: COCO, class_names: Sequence[str], num_classes: int, *,
                       source: str = "the evaluation JSON", model: str = "the model", log=None) -> list[int]:
    """cat_ids for COCOEvaluator: the category id in coco_gt of each model label 1..num_classes.

    With class_names (the training set's category names in label order, config data.class_names) the labels
    map by name, so a JSON that numbers the same categories differently is scored right; categories missing
    on either side raise ValueError naming them. Without names (older checkpoints, presets), or when the
    names are not unique, label i + 1 maps to the i-th category in sorted-id order (only the count is
    checked) and ``log`` (default warnings.warn) says so.
    """
    cats = sorted(coco_gt.dataset.get("categories", []), key=lambda c: c["id"])
    json_names = [str(c.get("name", c["id"])) for c in cats]   # as data.CocoDetection names them
    class_names = [str(n) for n in class_names or ()]

    def by_id_order(why: str) -> list[int]:
        if len(cats) != num_classes:
            raise ValueError(f"{model} has {num_classes} classes but {source} has {len(cats)} categories")
        msg = (f"{why}: labels 1..{num_classes} are taken as {source}'s categories in id order "
               f"({', '.join(json_names)}), unchecked")
        if log is None:
            import warnings

            warnings.warn(msg, stacklevel=3)
        else:
            log(msg)
        return [c["id"] for c in cats]

    if not class_names:
        return by_id_order(f"{model} records no category names (config data.class_names)")
    if len(class_names) != num_classes:
        raise ValueError(f"{model}'s config is inconsistent: data.class_names has {len(class_names)} names but "
                         f"model.roi_heads.num_classes is {num_classes}")
    if len(set(class_names)) != len(class_names):
        return by_id_order(f"{model}'s category names are not unique ({', '.join(class_names)})")
    dup = sorted({n for n in json_names if json_names.count(n) > 1})
    if dup:
        raise ValueError(f"{source} has several categories named {dup}: the model's labels cannot be matched "
                         f"to its categories by name")
    missing = [n for n in class_names if n not in json_names]
    unknown = [n for n in json_names if n not in class_names]
    if missing or unknown:
        parts = ([f"{source} lacks {missing}"] if missing else []) + \
                ([f"{source} has categories {unknown} the model was not trained on"] if unknown else [])
        raise ValueError(f"the categories of {source} are not {model}'s ({', '.join(class_names)}): "
                         + "; ".join(parts))
    id_of = {n: c["id"] for n, c in zip(json_names, cats)}
    return [id_of[n] for n in class_names]


class COCOEvaluator:
    """Accumulates detections for COCO-style AP (see the module docstring).

    Args:
        coco_gt (pycocotools COCO): ground truth (e.g. CocoDetection.coco).
        cat_ids (Sequence[int]): cat_ids[i] is the COCO category id of model label i + 1.
        iou_types: any of "bbox", "segm", "keypoints".
        kpt_oks_sigmas: per-keypoint OKS sigmas; default: COCO's for 17 keypoints, else DEFAULT_SIGMA each.
    """

    def __init__(self, coco_gt: COCO, cat_ids: Sequence[int], iou_types: Sequence[str] = ("bbox", "segm"), *,
                 kpt_oks_sigmas: Sequence[float] | None = None):
        if not isinstance(coco_gt, COCO):
            raise TypeError(f"coco_gt must be a pycocotools COCO, got {type(coco_gt).__name__}")
        if isinstance(iou_types, str):
            iou_types = (iou_types,)
        bad = [t for t in iou_types if t not in IOU_TYPES]
        if bad or not iou_types:
            raise ValueError(f"iou_types must be a non-empty subset of {IOU_TYPES}, got {tuple(iou_types)}")
        self.iou_types = tuple(dict.fromkeys(iou_types))
        prepared = getattr(coco_gt, _PREPARED, None)
        if prepared is None or ("keypoints" in self.iou_types and not prepared):
            coco_gt = prepare_ground_truth(coco_gt, keypoints="keypoints" in self.iou_types)
        self.coco_gt = coco_gt
        self.cat_ids = [int(c) for c in cat_ids]
        unknown = [c for c in self.cat_ids if c not in coco_gt.cats]
        if unknown:
            raise ValueError(f"cat_ids {unknown} are not categories of coco_gt")
        self.kpt_cat_ids = [c for c in sorted(coco_gt.cats) if coco_gt.cats[c].get("keypoints")]
        self.num_keypoints = len(coco_gt.cats[self.kpt_cat_ids[0]]["keypoints"]) if self.kpt_cat_ids else 0
        self.kpt_oks_sigmas = None
        if "keypoints" in self.iou_types:
            if not self.kpt_cat_ids:
                raise ValueError("iou_types has 'keypoints' but no category of coco_gt declares keypoints")
            if kpt_oks_sigmas is None:
                sig = COCO_PERSON_SIGMAS if self.num_keypoints == 17 else np.full(self.num_keypoints, DEFAULT_SIGMA)
            else:
                sig = np.asarray(kpt_oks_sigmas, dtype=np.float64).reshape(-1)
                if sig.size != self.num_keypoints or not (np.isfinite(sig).all() and (sig > 0).all()):
                    raise ValueError(f"kpt_oks_sigmas must be {self.num_keypoints} positive numbers, "
                                     f"got {sig.tolist()}")
            self.kpt_oks_sigmas = sig
        self.coco_evals: dict[str, COCOeval] = {}
        self.reset()

    def reset(self) -> None:
        self.results: list[dict] = []
        self.image_ids: list[int] = []
        self._seen: set[int] = set()

    def process(self, image_ids: Sequence[int], outputs: Sequence[dict]) -> None:
        """Adds the detections of a batch.

        outputs[i] (for image image_ids[i], at the ground truth's image size): "boxes" [D, 4] xyxy, "scores" [D],
        "labels" [D] in 1..len(cat_ids); for "segm" "masks" [D, 1, H, W] probabilities (> 0.5 is foreground) or
        "masks_rle" (list of D RLE dicts); for "keypoints" "keypoints" [D, K, 3] and optionally
        "keypoints_scores" [D, K].
        """
        image_ids = [int(i) for i in image_ids]
        if len(image_ids) != len(outputs):
            raise ValueError(f"got {len(image_ids)} image_ids but {len(outputs)} outputs")
        for img_id, out in zip(image_ids, outputs):
            self.results.extend(self._convert(img_id, out))
            if img_id not in self._seen:
                self._seen.add(img_id)
                self.image_ids.append(img_id)

    def _convert(self, img_id: int, out: dict) -> list[dict]:
        info = self.coco_gt.imgs.get(img_id)
        if info is None:
            raise ValueError(f"image id {img_id} is not in the ground truth")
        for k in ("boxes", "scores", "labels"):
            if k not in out:
                raise ValueError(f"outputs for image {img_id} lack {k!r}")
        boxes = _numpy(out["boxes"], "boxes").astype(np.float64).reshape(-1, 4)
        scores = _numpy(out["scores"], "scores").astype(np.float64).reshape(-1)
        labels = _numpy(out["labels"], "labels").astype(np.int64).reshape(-1)
        d = boxes.shape[0]
        if scores.shape[0] != d or labels.shape[0] != d:
            raise ValueError(f"image {img_id}: boxes, scores and labels disagree on the detection count "
                             f"({d}, {scores.shape[0]}, {labels.shape[0]})")
        if d and (labels.min() < 1 or labels.max() > len(self.cat_ids)):
            raise ValueError(f"image {img_id}: labels must be in 1..{len(self.cat_ids)}, got {labels.min()}.."
                             f"{labels.max()}")
        if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            raise ValueError(f"image {img_id}: non-finite boxes or scores")
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
        res = [{"image_id": img_id, "category_id": self.cat_ids[int(lab) - 1],
                "bbox": [round(float(v), 3) for v in b], "score": float(s)}
               for b, s, lab in zip(xywh, scores, labels)]
        if "segm" in self.iou_types:
            for r, rle in zip(res, self._rles(img_id, info, out, d)):
                r["segmentation"] = rle
        if "keypoints" in self.iou_types:
            if "keypoints" not in out:
                raise ValueError(f"outputs for image {img_id} lack 'keypoints' (needed for keypoint evaluation)")
            kp = _numpy(out["keypoints"], "keypoints").astype(np.float64)
            if kp.ndim != 3 or kp.shape[0] != d or kp.shape[2] < 2 or kp.shape[1] != self.num_keypoints:
                raise ValueError(f"image {img_id}: keypoints must be [{d}, {self.num_keypoints}, 3], "
                                 f"got {list(kp.shape)}")
            if "keypoints_scores" in out:
                ks = _numpy(out["keypoints_scores"], "keypoints_scores").astype(np.float64)
                if ks.shape != kp.shape[:2]:
                    raise ValueError(f"image {img_id}: keypoints_scores must be {list(kp.shape[:2])}, "
                                     f"got {list(ks.shape)}")
            else:
                ks = kp[..., 2] if kp.shape[2] > 2 else np.ones(kp.shape[:2])
            flat = np.stack([kp[..., 0], kp[..., 1], ks], -1).reshape(d, 3 * self.num_keypoints)
            for r, k in zip(res, flat):
                r["keypoints"] = [round(float(v), 3) for v in k]
        return res

    def _rles(self, img_id: int, info: dict, out: dict, d: int) -> list[dict]:
        h, w = info["height"], info["width"]
        if "masks_rle" in out:
            rles = list(out["masks_rle"])
            if len(rles) != d:
                raise ValueError(f"image {img_id}: {len(rles)} masks_rle for {d} detections")
            result = []
            for rle in rles:
                if list(rle["size"]) != [h, w]:
                    raise ValueError(f"image {img_id}: RLE size {list(rle['size'])} != image size {[h, w]}")
                counts = rle["counts"]
                result.append({"size": [h, w], "counts": counts.decode("ascii") if isinstance(counts, bytes)
                               else counts})
            return result
        if "masks" not in out:
            raise ValueError(f"outputs for image {img_id} need 'masks' or 'masks_rle' for segm evaluation")
        m = out["masks"]
        if d == 0 and len(m) == 0:
            return []
        if isinstance(m, torch.Tensor):
            if m.dtype == torch.bool:
                m = m.to(torch.uint8)
            m = (m > 0.5).to(torch.uint8).cpu().numpy()   # threshold on the device: 4x less to copy
        else:
            m = (np.asarray(m) > 0.5).astype(np.uint8)
        if m.ndim == 4 and m.shape[1] == 1:
            m = m[:, 0]
        if m.ndim != 3 or m.shape[0] != d or m.shape[1:] != (h, w):
            raise ValueError(f"image {img_id}: masks must be [{d}, 1, {h}, {w}] (the image size), "
                             f"got {list(np.shape(out['masks']))}")
        rles = mask_util.encode(np.asfortranarray(m.transpose(1, 2, 0)))
        return [{"size": [h, w], "counts": r["counts"].decode("ascii")} for r in rles]

    def evaluate(self, results: list[dict] | None = None, image_ids: Sequence[int] | None = None) -> dict:
        """Runs COCOeval per iou type -> {iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl"}} in [0, 1].

        A metric COCO leaves undefined (no ground truth in that area range; APs for keypoints, which COCO
        does not define) is NaN. No detections at all give 0.
        """
        if results is None:
            results = self.results
            img_ids = self.image_ids if image_ids is None else image_ids
        else:
            img_ids = self.coco_gt.getImgIds() if image_ids is None else image_ids
        img_ids = sorted({int(i) for i in img_ids})
        if not img_ids:
            raise ValueError("nothing to evaluate: no image was processed and no image_ids were given")
        unknown = [i for i in img_ids if i not in self.coco_gt.imgs]
        if unknown:
            raise ValueError(f"image ids {unknown[:10]} are not in the ground truth")
        foreign = {r.get("image_id") for r in results} - set(self.coco_gt.imgs)
        if foreign:
            raise ValueError(f"results refer to image ids {sorted(foreign, key=str)[:10]} that are not in the "
                             f"ground truth")
        metrics = {}
        for t in self.iou_types:
            metrics[t] = self._evaluate_type(t, results, img_ids)
        return metrics

    def _evaluate_type(self, iou_type: str, results: list[dict], img_ids: list[int]) -> dict:
        field = _FIELD[iou_type]
        keep = {"image_id", "category_id", "score", field}
        if iou_type == "keypoints":
            keep.add("bbox")
        # Without "bbox", loadRes takes a detection's area from its mask, as COCO's mask AP defines it.
        dets = [{k: r[k] for k in keep if k in r} for r in results if field in r]
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink):
            if dets:
                coco_dt = self.coco_gt.loadRes(dets)
            else:
                coco_dt = COCO()
                coco_dt.dataset = {"images": list(self.coco_gt.dataset["images"]),
                                   "categories": list(self.coco_gt.dataset["categories"]), "annotations": []}
                coco_dt.createIndex()
            ev = COCOeval(self.coco_gt, coco_dt, iou_type)
            ev.params.imgIds = img_ids
            if iou_type == "keypoints":
                ev.params.kpt_oks_sigmas = self.kpt_oks_sigmas
                ev.params.catIds = self.kpt_cat_ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        self.coco_evals[iou_type] = ev

        def val(i):
            v = float(ev.stats[i])
            return v if v >= 0 else math.nan

        if iou_type == "keypoints":   # stats: AP, AP50, AP75, APm, APl, AR...
            return {"AP": val(0), "AP50": val(1), "AP75": val(2), "APs": math.nan, "APm": val(3), "APl": val(4)}
        return {name: val(i) for i, name in enumerate(METRIC_NAMES)}

    def write_json(self, path) -> None:
        """Writes the results (COCO results format) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.results, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def format_table(metrics: dict) -> str:
    """A text table of metrics (as from COCOEvaluator.evaluate), in percent; '-' where undefined."""
    width = max([len("iou type")] + [len(str(t)) for t in metrics])
    lines = [f"{'iou type':<{width}} | " + " | ".join(f"{n:>5}" for n in METRIC_NAMES)]
    lines.append("-" * width + "-+-" + "-+-".join("-" * 5 for _ in METRIC_NAMES))
    for t, m in metrics.items():
        cells = []
        for n in METRIC_NAMES:
            v = m.get(n) if isinstance(m, dict) else None
            cells.append(f"{100 * v:5.1f}" if isinstance(v, (int, float)) and math.isfinite(v) else f"{'-':>5}")
        lines.append(f"{str(t):<{width}} | " + " | ".join(cells))
    return "\n".join(lines)
