"""Evaluation against ground truth the loader accepts but pycocotools cannot read, category mapping by name,
and the up-front checks of `eval`, `train --val-json` and `demo` (all before any inference or training)."""
import json

import pytest
import torch

from mrcnn_fast import cli
from mrcnn_fast.config import get_config, merge, to_dict
from mrcnn_fast.data import CocoDetection, make_shapes
from mrcnn_fast.engine.checkpoint import save_config
from mrcnn_fast.engine.trainer import adapt_config_to_dataset, train
from mrcnn_fast.evaluation import COCOEvaluator, label_category_ids, prepare_ground_truth

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A tiny shapes set (3 categories triangle/rectangle/ellipse, ids 1..3, 4 keypoints) and its JSON dict."""
    paths = make_shapes(tmp_path_factory.mktemp("shapes"), n_train=3, n_val=4, seed=3, image_size=(96, 96))
    with open(paths["val_json"]) as f:
        return paths, json.load(f)


def _variant(tmp_path, shapes, edit, name="a.json"):
    paths, data = shapes
    data = json.loads(json.dumps(data))
    edit(data)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path), paths["val_images"]


def _perfect(ds, truth=None):
    """Detections equal to what the loader reads from `truth` (default ds), labels in truth's label space."""
    truth = truth or ds
    ids, outs = [], []
    for i in range(len(truth)):
        _, t = truth[i]
        n = len(t["boxes"])
        ids.append(t["image_id"])
        outs.append({"boxes": t["boxes"], "labels": t["labels"], "scores": torch.linspace(1.0, 0.5, n),
                     "masks": t["masks"][:, None].float()})
    return ids, outs


# --------------------------------------------------------------------------------------------- 1. ground truth
SEGMENTATIONS = {
    "poly_2pts": [[10, 10, 20, 20]],                    # loader: polygon skipped, instance dropped
    "poly_2pts_plus_good": None,                        # a 2-point polygon beside the instance's own
    "poly_empty_list": [],                              # loader: the box is the mask
    "poly_empty_inner": [[]],                           # loader: instance dropped
    "seg_missing": "missing",                           # loader: the box is the mask
    "seg_null": "null",
}


@pytest.mark.parametrize("case", list(SEGMENTATIONS))
def test_gt_segmentations_the_loader_accepts_evaluate(tmp_path, shapes, case):
    def edit(data):
        ann = data["annotations"][0]
        seg = SEGMENTATIONS[case]
        if case == "poly_2pts_plus_good":
            ann["segmentation"] = [[10, 10, 20, 20]] + ann["segmentation"]
        elif seg == "missing":
            del ann["segmentation"]
        elif seg == "null":
            ann["segmentation"] = None
        else:
            ann["segmentation"] = seg

    ds = CocoDetection(*_variant(tmp_path, shapes, edit), use_keypoints=False)
    ev = COCOEvaluator(ds.coco, ds.cat_ids, ("bbox", "segm"))
    ev.process(*_perfect(ds))
    m = ev.evaluate()   # crashed in COCOeval before ("Argument 'bb'", IndexError, KeyError 'segmentation')
    for t in ("bbox", "segm"):
        assert m[t]["AP"] == pytest.approx(1.0), (t, m[t])
    # the data set's own COCO (shared with the loader) is left as it was
    if case == "seg_missing":
        assert "segmentation" not in ds.coco.anns[1]


def test_prepare_ground_truth_reports_and_rejects(tmp_path, shapes):
    def edit(data):
        data["annotations"][0]["segmentation"] = [[10, 10, 20, 20]]
        data["annotations"][1]["segmentation"] = []
        data["annotations"][2].pop("keypoints")
        data["annotations"][2].pop("num_keypoints")

    ds = CocoDetection(*_variant(tmp_path, shapes, edit))
    notes = []
    gt = prepare_ground_truth(ds.coco, keypoints=True, source="val.json", log=notes.append)
    assert len(notes) == 1 and "1 instance(s) without a valid polygon dropped" in notes[0] \
        and "box as the mask" in notes[0] and "without keypoints" in notes[0]
    assert 1 not in gt.anns and gt.anns[2]["segmentation"][0][:2] == ds.coco.anns[2]["bbox"][:2]
    assert gt.anns[3]["num_keypoints"] == 0 and gt.anns[3]["keypoints"] == [0] * 12
    for seg, msg in (([[1, 2, 3, 4, 5]], "odd number"), ("abc", "segmentation must be"),
                     ({"size": [5, 5], "counts": "xx"}, "RLE size")):
        ds.coco.anns[4]["segmentation"] = seg
        with pytest.raises(ValueError, match=f"val.json: annotation id 4.*{msg}"):
            prepare_ground_truth(ds.coco, source="val.json", log=notes.append)


# --------------------------------------------------------------------------------------------- 2. categories
def _swap_ids(data):
    """Rectangle and triangle swap ids (1 <-> 2): the same categories, numbered differently."""
    swap = {1: 2, 2: 1, 3: 3}
    for c in data["categories"]:
        c["id"] = swap[c["id"]]
    for a in data["annotations"]:
        a["category_id"] = swap[a["category_id"]]


def test_labels_map_to_categories_by_name(tmp_path, shapes):
    paths, _ = shapes
    base = CocoDetection(paths["val_json"], paths["val_images"], use_keypoints=False)
    swapped = CocoDetection(*_variant(tmp_path, shapes, _swap_ids), use_keypoints=False)
    ids = label_category_ids(swapped.coco, base.class_names, 3, log=pytest.fail)
    assert ids == [2, 1, 3]
    # an exact detector in the training label space is perfect once labels map by name
    ev = COCOEvaluator(swapped.coco, ids, ("bbox",))
    ev.process(*_perfect(swapped, base))
    assert ev.evaluate()["bbox"]["AP"] == pytest.approx(1.0)
    assert {r["category_id"] for r in ev.results} <= set(swapped.coco.cats)
    # the old mapping (sorted ids) scored it wrong
    ev = COCOEvaluator(swapped.coco, swapped.cat_ids, ("bbox",))
    ev.process(*_perfect(swapped, base))
    assert ev.evaluate()["bbox"]["AP"] < 0.5


def test_category_name_mismatches_raise(tmp_path, shapes):
    def rename(data):
        data["categories"][2]["name"] = "hexagon"

    other = CocoDetection(*_variant(tmp_path, shapes, rename), use_keypoints=False)
    with pytest.raises(ValueError, match=r"lacks \['ellipse'\].*\['hexagon'\] the model was not trained on"):
        label_category_ids(other.coco, ["triangle", "rectangle", "ellipse"], 3, source="v.json")

    def extra(data):
        data["categories"].append({"id": 9, "name": "hexagon"})

    other = CocoDetection(*_variant(tmp_path, shapes, extra, "b.json"), use_keypoints=False)
    with pytest.raises(ValueError, match=r"\['hexagon'\] the model was not trained on"):
        label_category_ids(other.coco, ["triangle", "rectangle", "ellipse"], 3)
    with pytest.raises(ValueError, match="inconsistent"):
        label_category_ids(other.coco, ["triangle", "rectangle"], 3)


def test_no_recorded_names_keeps_id_order_with_a_warning(tmp_path, shapes):
    swapped = CocoDetection(*_variant(tmp_path, shapes, _swap_ids), use_keypoints=False)
    notes = []
    assert label_category_ids(swapped.coco, (), 3, log=notes.append) == [1, 2, 3]
    assert len(notes) == 1 and "records no category names" in notes[0]
    with pytest.raises(ValueError, match="has 2 classes but .* has 3 categories"):
        label_category_ids(swapped.coco, (), 2)


def test_training_records_class_names_and_old_configs_load(tmp_path, shapes):
    paths, _ = shapes
    ds = CocoDetection(paths["train_json"], paths["train_images"], train=True, flip_pairs=((1, 3),))
    cfg = adapt_config_to_dataset(get_config("small_cpu"), ds, log=lambda m: None)
    assert cfg.data.class_names == ("triangle", "rectangle", "ellipse") and cfg.data.category_ids == (1, 2, 3)
    save_config(tmp_path, to_dict(cfg))
    back = get_config(str(tmp_path / "config.json"))
    assert back.data.class_names == cfg.data.class_names and back.data.category_ids == (1, 2, 3)
    old = to_dict(get_config("small_cpu"))
    old.pop("data")                                    # a config.json written before the field existed
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert get_config(str(tmp_path / "old.json")).data.class_names == ()


# --------------------------------------------------------------------------------------------- CLI, before inference
def _eval_run(tmp_path, cfg, json_path, images, *extra):
    """`eval` with a stored config and EMPTY weights: anything but a weights error was found up front."""
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    save_config(run, to_dict(cfg))
    (run / "model_final.safetensors").write_bytes(b"")
    return cli.main(["eval", "--weights", str(run / "model_final.safetensors"), "--json", json_path,
                     "--images", images, "--num-workers", "0", "--device", "cpu", *extra])


def _named_cfg():
    return merge(get_config("small_cpu"), {"data": {"class_names": ["triangle", "rectangle", "ellipse"],
                                                    "category_ids": [1, 2, 3]}})


def test_eval_checks_categories_keypoints_gt_and_output_first(tmp_path, shapes, capsys):
    paths, _ = shapes

    def rename(data):
        data["categories"][0]["name"] = "square"

    code = _eval_run(tmp_path, _named_cfg(), *_variant(tmp_path, shapes, rename))
    err = capsys.readouterr().err
    assert code == 2 and "lacks ['triangle']" in err and "['square']" in err, err

    def five_keypoints(data):
        for c in data["categories"]:
            c["keypoints"] = c["keypoints"] + ["centre"]
        for a in data["annotations"]:
            a["keypoints"] = a["keypoints"] + [0, 0, 0]

    code = _eval_run(tmp_path, _named_cfg(), *_variant(tmp_path, shapes, five_keypoints, "kp5.json"))
    err = capsys.readouterr().err
    assert code == 2 and "has 4 keypoints but" in err and "kp5.json has 5" in err, err

    def bad_polygon(data):
        data["annotations"][-1]["segmentation"] = [[1, 2, 3, 4, 5, 6, 7]]

    last_id = shapes[1]["annotations"][-1]["id"]
    code = _eval_run(tmp_path, _named_cfg(), *_variant(tmp_path, shapes, bad_polygon, "odd.json"))
    err = capsys.readouterr().err
    assert code == 2 and f"annotation id {last_id}" in err and "odd number" in err, err

    for out, needle in ((tmp_path, "is a directory"), (tmp_path / "odd.json" / "m.json", "not a directory")):
        code = _eval_run(tmp_path, _named_cfg(), paths["val_json"], paths["val_images"], "--output", str(out))
        err = capsys.readouterr().err
        assert code == 2 and needle in err and str(out) in err, err

    # all of it right: now the (empty) weights are what fails
    code = _eval_run(tmp_path, _named_cfg(), *_variant(tmp_path, shapes, _swap_ids, "swapped.json"),
                     "--output", str(tmp_path / "new" / "m.json"))
    err = capsys.readouterr().err
    assert code == 2 and "safetensors" in err, err


def test_train_checks_the_val_set_before_training(tmp_path, shapes):
    paths, _ = shapes
    cfg = merge(get_config("small_cpu"), {"train": {"device": "cpu", "num_workers": 0}, "solver": {"max_iter": 1}})

    def rename(data):
        data["categories"][1]["name"] = "square"

    def odd_polygon(data):
        data["annotations"][0]["segmentation"] = [[1, 2, 3]]

    for edit, msg in ((rename, r"lacks \['rectangle'\]"), (odd_polygon, "odd number")):
        val_json, val_images = _variant(tmp_path, shapes, edit)
        with pytest.raises(ValueError, match=msg):
            train(cfg, train_json=paths["train_json"], train_images=paths["train_images"],
                  output_dir=tmp_path / "out", val_json=val_json, val_images=val_images, log=lambda m: None)
        assert not (tmp_path / "out" / "model_final.safetensors").exists()


def test_demo_rejects_empty_sets_up_front(tmp_path, capsys):
    for flag in ("--val", "--train"):
        code = cli.main(["demo", "--output", str(tmp_path / "d"), flag, "0", "--max-iter", "1"])
        err = capsys.readouterr().err
        assert code == 2 and f"{flag} must be positive" in err, err
    assert not (tmp_path / "d").exists()


def test_keypoint_flip_pairs_follow_the_sets_keypoint_names():
    """The config's COCO-person flip pairs are not applied by index to a set whose keypoints are others: the
    left/right pairs of its keypoint names are flipped instead (detectron2 takes a name-based flip map)."""
    from types import SimpleNamespace

    from mrcnn_fast.data.keypoints import COCO_PERSON_FLIP_PAIRS as COCO_FLIP_PAIRS
    from mrcnn_fast.data.keypoints import flip_pairs_from_names

    coco = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
            "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
            "right_knee", "left_ankle", "right_ankle"]
    assert flip_pairs_from_names(coco) == COCO_FLIP_PAIRS
    assert flip_pairs_from_names(["top", "right", "bottom", "left"]) == ((1, 3),)
    assert flip_pairs_from_names(["Right Hand", "head", "Left Hand", "leftover"]) == ((0, 2),)
    assert flip_pairs_from_names(["a", "b"]) == () and flip_pairs_from_names(["x", "X"]) is None

    def adapt(names, **kp):
        ds = SimpleNamespace(class_names=["hand"], cat_ids=[1], num_classes=1, num_keypoints=len(names),
                             keypoint_names=names)
        cfg = get_config("r50_fpn", {"model": {"keypoint": dict(enabled=True, **kp)}})
        notes = []
        return adapt_config_to_dataset(cfg, ds, log=notes.append).model.keypoint, notes

    hand = [f"{side}_{part}{i}" for side in ("left", "right") for part in ("finger",) for i in range(10)] + ["wrist"]
    kp, notes = adapt(hand)   # 21 keypoints: COCO's index pairs would fit, and be wrong
    assert kp.num_keypoints == 21 and kp.flip_pairs == tuple((i, i + 10) for i in range(10))
    assert any("left/right pairs" in n for n in notes)
    kp, notes = adapt([f"p{i}" for i in range(21)])   # nothing mirrored by name: nothing swapped
    assert kp.flip_pairs == () and any("-> []" in n for n in notes)
    kp, notes = adapt([f"p{i}" for i in range(17)])   # 17 unnamed: still taken as COCO persons, with a note
    assert kp.flip_pairs == COCO_FLIP_PAIRS and any("keeping the COCO person flip pairs" in n for n in notes)
    kp, _ = adapt(coco)
    assert kp.flip_pairs == COCO_FLIP_PAIRS
    kp, notes = adapt(hand, flip_pairs=((0, 20),))     # names that pair keypoints win over the config's pairs
    assert kp.flip_pairs == tuple((i, i + 10) for i in range(10)) and any("-> [(0, 10)" in n for n in notes)
    kp, notes = adapt([f"p{i}" for i in range(21)], flip_pairs=((0, 20),))   # names say nothing: the config's
    assert kp.flip_pairs == ((0, 20),) and not any("flip_pairs" in n for n in notes)


def test_training_flips_the_pairs_its_keypoint_names_give(tmp_path, shapes, monkeypatch):
    """train(): the training set flips with the fitted pairs, which config.json records for test-time flips."""
    names = ["left_top", "right_top", "bottom", "tip"]

    def rename(d):
        for c in d["categories"]:
            c["keypoints"] = names
    js, images = _variant(tmp_path, shapes, rename)
    seen = []
    real = CocoDetection.set_flip_pairs
    monkeypatch.setattr(CocoDetection, "set_flip_pairs", lambda self, p: (seen.append(p), real(self, p))[1])
    cfg = get_config("small_cpu", {"solver": {"ims_per_batch": 1}, "train": {"num_workers": 0},
                                   "input": {"min_size_train": [64], "max_size_train": 96}})
    notes = []
    train(cfg, output_dir=tmp_path / "out", train_json=js, train_images=images, max_iter=1, log=notes.append)
    assert seen[-1] == ((0, 1),)            # the preset's (1, 3) are the shapes' right/left vertices
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model"]["keypoint"]["flip_pairs"] == [[0, 1]]
    assert any("left/right pairs" in n for n in notes)
