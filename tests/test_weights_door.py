"""The one door for weights of any project (convert.checkpoints): format detection, config overrides, class
names ("coco" in torchvision's and detectron2's numberings, lists, files) and the labels results carry."""
import json

import pytest
import torch

import mrcnn_fast
from mrcnn_fast.config import get_config, merge
from mrcnn_fast.convert.checkpoints import _overrides, detect_weights_format, load_checkpoint
from mrcnn_fast.data.coco_names import COCO_CATEGORIES, coco_contiguous, coco_names_by_id
from mrcnn_fast.predictor import with_class_names
from test_predictor import make_run_folder, photos


def _save(path, names):
    torch.save({n: torch.zeros(2) for n in names}, path)
    return path


def test_detect_weights_format(tmp_path):
    run = make_run_folder(tmp_path / "run")
    assert detect_weights_format(run)[0] == "ours"
    assert detect_weights_format(run / "model_final.safetensors")[0] == "ours"
    (tmp_path / "zoo.pkl").write_bytes(b"\x80\x02}q\x00.")
    assert detect_weights_format(tmp_path / "zoo.pkl")[0] == "detectron2"
    d2 = _save(tmp_path / "d2.pth", ["backbone.bottom_up.stem.conv1.weight", "proposal_generator.rpn_head.conv.weight"])
    fmt, why = detect_weights_format(d2)
    assert fmt == "detectron2" and "detectron2" in why
    # detectron2's Checkpointer wraps the state dict; torchvision's references save {"model": ...} too
    torch.save({"model": torch.load(d2), "iteration": 7}, tmp_path / "d2_ckpt.pth")
    assert detect_weights_format(tmp_path / "d2_ckpt.pth")[0] == "detectron2"
    tv = _save(tmp_path / "tv.pth", ["backbone.body.conv1.weight", "rpn.head.conv.0.0.weight"])
    assert detect_weights_format(tv)[0] == "torchvision"
    (tmp_path / "ours").mkdir()
    own = _save(tmp_path / "ours" / "w.pt", ["backbone.body.conv1.weight"])
    (tmp_path / "ours" / "config.json").write_text("{}")
    assert detect_weights_format(own)[0] == "ours"


def test_detect_weights_format_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        detect_weights_format(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="junk.pth.*cannot tell its format"):
        detect_weights_format(tmp_path / "junk.pth")
    other = _save(tmp_path / "other.pth", ["encoder.layer0.weight"])
    with pytest.raises(ValueError, match="other.pth.*neither torchvision's nor detectron2's.*encoder.layer0"):
        detect_weights_format(other)
    with pytest.raises(ValueError, match="weights_format must be one of"):
        load_checkpoint(other, weights_format="caffe")
    with pytest.raises(ValueError, match="is a folder; torchvision weights are a single file"):
        load_checkpoint(tmp_path, weights_format="torchvision")


def test_overrides_for_imported_weights(tmp_path):
    assert _overrides(None) is None and _overrides({"data": {}}) == {"data": {}}
    (tmp_path / "o.json").write_text(json.dumps({"model": {"rpn": {"pre_nms_topk_test": 6000}}}))
    assert _overrides(tmp_path / "o.json") == {"model": {"rpn": {"pre_nms_topk_test": 6000}}}
    (tmp_path / "b.json").write_text(json.dumps({"base": "r50_fpn"}))
    with pytest.raises(ValueError, match="'base' makes no sense"):
        _overrides(tmp_path / "b.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="malformed config file"):
        _overrides(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="overrides what the tensors cannot tell"):
        _overrides("r50_fpn")
    with pytest.raises(FileNotFoundError):
        _overrides(tmp_path / "missing.yaml")
    with pytest.raises(TypeError):
        _overrides(3)


def test_coco_names():
    names, ids = coco_contiguous()
    assert len(names) == 80 and len(set(ids)) == 80 and ids[0] == 1 and ids[-1] == 90 and names[0] == "person"
    by_id = coco_names_by_id(90)
    assert len(by_id) == 90 and by_id[0] == "person" and by_id[11] == "N/A" and by_id[89] == "toothbrush"
    assert sum(n != "N/A" for n in by_id) == 80


def test_coco_names_match_real_annotations():
    from data_helpers import require_shared

    ann = json.loads((require_shared("coco_samples") / "annotations.json").read_text())
    assert sorted((c["id"], c["name"]) for c in ann["categories"]) == sorted(COCO_CATEGORIES)


def test_with_class_names(tmp_path):
    tv = get_config("r50_fpn", {"model": {"roi_heads": {"num_classes": 90}}})
    cfg = with_class_names(tv, "coco")
    assert cfg.data.class_names[0] == "person" and cfg.data.class_names[11] == "N/A"
    assert cfg.data.category_ids == tuple(range(1, 91))
    d2 = with_class_names(get_config("r50_fpn"), "coco")   # 80 contiguous classes -> COCO's ids by name
    assert d2.data.category_ids[:3] == (1, 2, 3) and d2.data.category_ids[-1] == 90
    small = get_config("small_cpu")
    with pytest.raises(ValueError, match="needs a model with 80 classes.*has 3"):
        with_class_names(small, "coco")
    assert with_class_names(small, ["a", "b", "c"]).data.class_names == ("a", "b", "c")
    with pytest.raises(ValueError, match="2 names but the model has 3 classes"):
        with_class_names(small, ["a", "b"])
    (tmp_path / "n.txt").write_text("a\nb\n\nc\n")
    assert with_class_names(small, tmp_path / "n.txt").data.class_names == ("a", "b", "c")
    (tmp_path / "n.json").write_text('["x", "y", "z"]')
    assert with_class_names(small, str(tmp_path / "n.json")).data.class_names == ("x", "y", "z")
    (tmp_path / "bad.json").write_text('{"x": 1}')
    with pytest.raises(ValueError, match="expected a JSON list of strings"):
        with_class_names(small, tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        with_class_names(small, tmp_path / "none.txt")
    with pytest.raises(TypeError):
        with_class_names(small, 5)


def test_first_label_zero_numbers_results_from_zero(tmp_path):
    """A detectron2-numbered model: labels 0..C-1 in results, names and category ids follow them."""
    import mrcnn_fast.engine.checkpoint as ck
    from mrcnn_fast.config import to_dict

    run = make_run_folder(tmp_path / "run")
    base = mrcnn_fast.Predictor(run, precision="fp32")
    cfg = merge(base.cfg, {"data": {"first_label": 0}})
    ck.save_config(run, to_dict(cfg))
    p = mrcnn_fast.Predictor(run, precision="fp32")
    img = photos(1)[0]
    a, b = base(img), p(img)
    assert a["labels"].numel() > 0
    assert torch.equal(b["labels"], a["labels"] - 1) and b["class_names"] == a["class_names"]
    lab = int(b["labels"][0])
    assert p.class_name(lab) == base.class_name(lab + 1)
    assert p.category_id(lab) == base.category_id(lab + 1)
    assert p.weights_format == "ours" and "format ours" in p.import_report
