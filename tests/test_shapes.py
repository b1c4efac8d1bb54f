import collections
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from mrcnn_fast.config import get_config
from mrcnn_fast.data import CocoDetection, make_shapes, transforms

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), n_train=40, n_val=8, seed=0, image_size=(192, 224))


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_by_seed(tmp_path):
    a = make_shapes(tmp_path / "a", n_train=6, n_val=2, seed=3, image_size=(96, 96))
    make_shapes(tmp_path / "b", n_train=6, n_val=2, seed=3, image_size=(96, 96))
    make_shapes(tmp_path / "c", n_train=6, n_val=2, seed=4, image_size=(96, 96))
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(fa) == 6 + 2 + 2 and fa == fb
    assert fa.keys() == fc.keys()
    assert fa["train.json"] != fc["train.json"] and fa["train/000001.png"] != fc["train/000001.png"]
    assert Path(a["train_json"]).name == "train.json" and Path(a["val_images"]).is_dir()
    # a longer set starts with the same images
    make_shapes(tmp_path / "d", n_train=8, n_val=2, seed=3, image_size=(96, 96))
    assert _files(tmp_path / "d")["train/000003.png"] == fa["train/000003.png"]
    assert fa["train/000001.png"] != fa["val/000001.png"]


def test_annotations_consistent(shapes):
    data = json.loads(Path(shapes["train_json"]).read_text())
    assert [c["name"] for c in data["categories"]] == ["triangle", "rectangle", "ellipse"]
    assert all(c["keypoints"] == ["top", "right", "bottom", "left"] for c in data["categories"])
    h, w = 192, 224
    assert all((im["height"], im["width"]) == (h, w) for im in data["images"])
    kinds, sizes, vis = collections.Counter(), collections.Counter(), collections.Counter()
    for a in data["annotations"]:
        seg = a["segmentation"]
        rle = mask_util.merge(mask_util.frPyObjects(seg, h, w)) if isinstance(seg, list) else seg
        m = mask_util.decode(rle)
        kinds["polygon" if isinstance(seg, list) else "rle"] += 1
        assert m.sum() == a["area"] > 0
        ys, xs = np.nonzero(m)
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        sizes["small" if a["area"] < 32 ** 2 else "medium" if a["area"] < 96 ** 2 else "large"] += 1
        kp = np.array(a["keypoints"]).reshape(4, 3)
        assert a["num_keypoints"] == (kp[:, 2] > 0).sum() and a["iscrowd"] == 0
        for x, y, v in kp:
            vis[int(v)] += 1
            if v == 0:      # hidden by a later shape: not labelled
                assert x == y == 0 and isinstance(seg, dict)
                continue
            assert 0 < x < w and 0 < y < h and v == 2
            assert m[int(y), int(x)]    # labelled keypoints lie on the visible mask
        if isinstance(seg, list):    # an unoccluded shape: the keypoints are its extreme pixels
            assert kp[0, 1] == ys.min() + 0.5 and kp[2, 1] == ys.max() + 0.5
            assert kp[3, 0] == xs.min() + 0.5 and kp[1, 0] == xs.max() + 0.5
            assert (kp[:, 2] == 2).all()
    assert kinds["polygon"] > 0 and kinds["rle"] > 0            # occlusions happen
    assert min(sizes["small"], sizes["medium"], sizes["large"]) > 0 and vis[0] > 0 and vis[1] == 0
    per_image = collections.Counter(a["image_id"] for a in data["annotations"])
    assert set(per_image.values()) <= set(range(2, 7)) and len(set(per_image.values())) >= 3
    empty = [im["id"] for im in data["images"] if im["id"] not in per_image]
    assert 1 <= len(empty) <= 4


def test_occluded_keypoints_label(tmp_path, shapes):
    """occluded_keypoints="label" changes only the hidden keypoints: v = 1 at the full shape's extreme pixel."""
    paths = make_shapes(tmp_path, n_train=40, n_val=8, seed=0, image_size=(192, 224), occluded_keypoints="label")
    omit = json.loads(Path(shapes["train_json"]).read_text())["annotations"]
    label = json.loads(Path(paths["train_json"]).read_text())["annotations"]
    assert len(omit) == len(label)
    assert _files(Path(paths["train_images"])) == _files(Path(shapes["train_images"]))
    n_hidden = 0
    for a, b in zip(omit, label):
        assert {k: v for k, v in a.items() if k not in ("keypoints", "num_keypoints")} == \
            {k: v for k, v in b.items() if k not in ("keypoints", "num_keypoints")}
        ka, kb = np.array(a["keypoints"]).reshape(4, 3), np.array(b["keypoints"]).reshape(4, 3)
        assert b["num_keypoints"] == 4
        h = ka[:, 2] == 0
        n_hidden += int(h.sum())
        np.testing.assert_array_equal(ka[~h], kb[~h])
        m = mask_util.decode(b["segmentation"]) if isinstance(b["segmentation"], dict) else None
        for x, y, v in kb[h]:
            assert v == 1 and 0 < x < 224 and 0 < y < 192 and not m[int(y), int(x)]
    assert n_hidden > 0
    with pytest.raises(ValueError, match="occluded_keypoints"):
        make_shapes(tmp_path / "bad", n_train=1, n_val=1, occluded_keypoints="hide")


def test_rle_instances_are_occluded(shapes):
    """RLE instances are earlier shapes partly hidden by later ones: the visible masks never overlap."""
    ds = CocoDetection(shapes["train_json"], shapes["train_images"])
    checked = 0
    for i in range(len(ds)):
        anns = ds.coco.imgToAnns[ds.ids[i]]
        if not any(isinstance(a["segmentation"], dict) for a in anns):
            continue
        _, t = ds[i]
        masks = t["masks"].bool()
        assert not (masks.sum(0) > 1).any()   # visible masks never overlap
        checked += 1
        if checked == 6:
            break
    assert checked > 0


def test_loads_and_flips_with_small_cpu_pairs(shapes):
    cfg = get_config("small_cpu")
    ds = CocoDetection(shapes["val_json"], shapes["val_images"], train=True, flip_prob=1.0,
                       flip_pairs=cfg.model.keypoint.flip_pairs)
    assert ds.num_classes == cfg.model.roi_heads.num_classes and ds.num_keypoints == cfg.model.keypoint.num_keypoints
    ev = CocoDetection(shapes["val_json"], shapes["val_images"])
    for i in range(len(ds)):
        img, t = ds[i]
        img0, t0 = ev[i]
        assert torch.equal(img, img0.flip(-1))
        kp = t["keypoints"]
        if len(kp):
            # still semantically right: "right" is the rightmost, "left" the leftmost point
            lr = (kp[:, 1, 2] > 0) & (kp[:, 3, 2] > 0)
            tb = (kp[:, 0, 2] > 0) & (kp[:, 2, 2] > 0)
            assert lr.any() and tb.any()
            assert (kp[lr, 1, 0] >= kp[lr, 3, 0]).all() and (kp[tb, 0, 1] <= kp[tb, 2, 1]).all()
            flipped = transforms.hflip(img0, t0, cfg.model.keypoint.flip_pairs)[1]
            torch.testing.assert_close(flipped["keypoints"], kp)
            for m, (x, y, v) in zip(t["masks"], kp[:, 1]):
                assert v in (0, 2) and (v == 0 or m[int(y), int(x)])


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_train"):
        make_shapes(tmp_path, n_train=-1)
    with pytest.raises(ValueError, match="image_size"):
        make_shapes(tmp_path, image_size=(16, 16))
    with pytest.raises(ValueError, match="image_size"):
        make_shapes(tmp_path, image_size=256)
