import json
import math
import pickle

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from data_helpers import require_shared
from mrcnn_fast.data import CocoDetection, make_shapes
from mrcnn_fast.evaluation import COCOEvaluator, format_table

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def shapes_val(tmp_path_factory):
    paths = make_shapes(tmp_path_factory.mktemp("shapes"), n_train=0, n_val=12, seed=1, image_size=(160, 160))
    return CocoDetection(paths["val_json"], paths["val_images"])


def perfect_outputs(ds, *, rle=False, box_shift=0.0):
    """Ground truth turned into detections (score 1). Unlabelled keypoints go to the box centre, where a
    person without visible keypoints is matched (and ignored) by COCO's keypoint evaluation."""
    ids, outs = [], []
    for i in range(len(ds)):
        _, t = ds[i]
        n = len(t["boxes"])
        boxes = t["boxes"].clone()
        boxes[:, [0, 2]] += box_shift * (boxes[:, 2:3] - boxes[:, 0:1])
        out = {"boxes": boxes, "labels": t["labels"], "scores": torch.linspace(1.0, 0.5, n)}
        if rle:
            out["masks_rle"] = mask_util.encode(np.asfortranarray(t["masks"].permute(1, 2, 0).numpy()))
        else:
            out["masks"] = t["masks"][:, None].float() * 0.9
        if "keypoints" in t:
            kp = t["keypoints"].clone()
            centre = (t["boxes"][:, None, :2] + t["boxes"][:, None, 2:]) / 2
            unl = kp[..., 2] == 0
            kp[..., :2] = torch.where(unl[..., None], centre.expand_as(kp[..., :2]), kp[..., :2])
            out["keypoints"] = kp
            out["keypoints_scores"] = torch.ones(kp.shape[:2])
        ids.append(t["image_id"])
        outs.append(out)
    return ids, outs


def empty_outputs(ds):
    k = ds.num_keypoints
    return list(ds.ids), [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                           "scores": torch.zeros(0), "masks": torch.zeros(0, 1, 1, 1),
                           "keypoints": torch.zeros(0, k, 3)} for _ in ds.ids]


def _check(metrics, types, value):
    assert set(metrics) == set(types)
    for t in types:
        vals = [v for v in metrics[t].values() if not math.isnan(v)]
        assert set(metrics[t]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"} and len(vals) >= 3
        assert all(abs(v - value) < 1e-9 for v in vals), (t, metrics[t])


@pytest.mark.parametrize("rle", [False, True])
def test_shapes_perfect_and_empty(shapes_val, rle):
    ds = shapes_val
    types = ("bbox", "segm", "keypoints")
    ev = COCOEvaluator(ds.coco, ds.cat_ids, types)
    assert ev.kpt_oks_sigmas.shape == (4,) and np.allclose(ev.kpt_oks_sigmas, 0.05)
    ids, outs = perfect_outputs(ds, rle=rle)
    ev.process(ids[:5], outs[:5])
    ev.process(ids[5:], outs[5:])
    m = ev.evaluate()
    _check(m, types, 1.0)
    assert math.isnan(m["keypoints"]["APs"])
    table = format_table(m)
    assert "keypoints" in table and "100.0" in table and "-" in table.splitlines()[-1]
    assert all(isinstance(r["segmentation"]["counts"], str) for r in ev.results)
    ev0 = COCOEvaluator(ds.coco, ds.cat_ids, types)
    ev0.process(*empty_outputs(ds))
    _check(ev0.evaluate(), types, 0.0)
    assert ev0.results == []


def test_shifted_boxes_lower_ap(shapes_val):
    ds = shapes_val
    ev = COCOEvaluator(ds.coco, ds.cat_ids, ("bbox",))
    ev.process(*perfect_outputs(ds, box_shift=0.25))
    ap = ev.evaluate()["bbox"]
    assert 0.0 < ap["AP"] < 0.9 and ap["AP50"] > ap["AP75"]


def test_explicit_results_score_every_image(shapes_val, tmp_path):
    ds = shapes_val
    ev = COCOEvaluator(ds.coco, ds.cat_ids, ("bbox", "segm"))
    ids, outs = perfect_outputs(ds)
    ev.process(ids[:6], outs[:6])
    assert ev.evaluate()["bbox"]["AP"] == pytest.approx(1.0)          # the processed images only
    gathered = pickle.loads(pickle.dumps(ev.results))                  # as if gathered from ranks
    assert ev.evaluate(gathered)["bbox"]["AP"] < 0.9                   # the rest of the set counts as missed
    assert ev.evaluate(gathered, image_ids=ids[:6])["segm"]["AP"] == pytest.approx(1.0)
    ev.write_json(tmp_path / "out" / "results.json")
    loaded = json.loads((tmp_path / "out" / "results.json").read_text())
    assert loaded == ev.results and set(loaded[0]) == {"image_id", "category_id", "bbox", "score", "segmentation"}
    ds.coco.loadRes(str(tmp_path / "out" / "results.json"))            # pycocotools accepts the file
    with pytest.raises(ValueError, match="image ids \\[999\\]"):
        ev.evaluate(gathered + [dict(gathered[0], image_id=999)])


@pytest.mark.parametrize("which", ["coco_persons/annotations.json", "coco_samples/keypoints_annotations.json"])
def test_shared_keypoint_sets_perfect(which):
    folder, name = which.split("/")
    root = require_shared(folder)
    ds = CocoDetection(root / name, root / "images")
    ev = COCOEvaluator(ds.coco, ds.cat_ids, ("bbox", "segm", "keypoints"))
    assert ev.kpt_oks_sigmas.shape == (17,) and ev.kpt_oks_sigmas[0] == pytest.approx(0.026)
    ev.process(*perfect_outputs(ds))
    _check(ev.evaluate(), ("bbox", "segm", "keypoints"), 1.0)


def test_coco_samples_perfect_with_crowd():
    root = require_shared("coco_samples")
    ds = CocoDetection(root / "annotations.json", root / "images")
    ev = COCOEvaluator(ds.coco, ds.cat_ids, ("bbox", "segm"))
    ev.process(*perfect_outputs(ds))
    _check(ev.evaluate(), ("bbox", "segm"), 1.0)
    # the 80 classes map back to COCO ids
    assert {r["category_id"] for r in ev.results} <= set(ds.coco.cats)


def test_bad_input(shapes_val):
    ds = shapes_val
    with pytest.raises(TypeError, match="coco_gt"):
        COCOEvaluator({}, ds.cat_ids)
    with pytest.raises(ValueError, match="iou_types"):
        COCOEvaluator(ds.coco, ds.cat_ids, ("boxes",))
    with pytest.raises(ValueError, match="cat_ids"):
        COCOEvaluator(ds.coco, [1, 2, 99])
    with pytest.raises(ValueError, match="kpt_oks_sigmas"):
        COCOEvaluator(ds.coco, ds.cat_ids, ("keypoints",), kpt_oks_sigmas=[0.1] * 17)
    ev = COCOEvaluator(ds.coco, ds.cat_ids, ("bbox", "segm", "keypoints"))
    with pytest.raises(ValueError, match="nothing to evaluate"):
        ev.evaluate()
    ids, outs = perfect_outputs(ds)
    i = next(k for k, o in enumerate(outs) if len(o["boxes"]))
    with pytest.raises(ValueError, match="image id 12345"):
        ev.process([12345], [outs[i]])
    with pytest.raises(ValueError, match="2 image_ids but 1"):
        ev.process(ids[:2], outs[:1])
    bad = dict(outs[i], masks=outs[i]["masks"][..., :-1])
    with pytest.raises(ValueError, match="masks must be"):
        ev.process([ids[i]], [bad])
    bad = dict(outs[i], labels=outs[i]["labels"] + 3)
    with pytest.raises(ValueError, match="labels must be in 1..3"):
        ev.process([ids[i]], [bad])
    bad = {k: v for k, v in outs[i].items() if k != "keypoints"}
    with pytest.raises(ValueError, match="keypoints"):
        ev.process([ids[i]], [bad])
    bad = {k: v for k, v in outs[i].items() if k != "masks"}
    with pytest.raises(ValueError, match="masks_rle"):
        ev.process([ids[i]], [bad])
    bad = dict(outs[i], scores=outs[i]["scores"] * float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        ev.process([ids[i]], [bad])
    assert ev.results == [] and ev.image_ids == []     # nothing half-added
