"""`mrcnn-fast predict` on the real photos with torchvision and detectron2 weights, and `mrcnn-fast convert`
round trips: the converted folder gives the same detections as the original file, without pickle."""
import json

import pytest
import torch

import mrcnn_fast
from data_helpers import require_shared
from mrcnn_fast.cli import main
from test_import_detectron2 import d2_state_dict, random_state_dict, small_cfg, to_numpy, write_pickle

tvd = pytest.importorskip("torchvision.models.detection")

SMALL_INPUT = {"input": {"min_size_test": 384, "max_size_test": 640}}


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _photos(n=2):
    return sorted((require_shared("coco_samples") / "images").glob("*.jpg"))[:n]


@pytest.fixture(scope="module")
def tv_file(tmp_path_factory):
    from mrcnn_fast.predictor import read_image, to_image_tensor
    from test_import_torchvision import _spread

    torch.manual_seed(0)
    tv = tvd.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    _spread(tv, [to_image_tensor(read_image(p)) for p in _photos(2)], seed=3)
    path = tmp_path_factory.mktemp("tv") / "maskrcnn_resnet50_fpn.pth"
    torch.save(tv.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def d2_file(tmp_path_factory):
    cfg = small_cfg()
    sd = random_state_dict(cfg, seed=4)
    path = tmp_path_factory.mktemp("d2") / "model_final.pkl"
    write_pickle({"model": to_numpy(d2_state_dict(sd, fpn=True)), "__author__": "test"}, path)
    return path


def _overrides(tmp_path):
    p = tmp_path / "overrides.json"
    p.write_text(json.dumps(SMALL_INPUT))
    return p


def test_predict_torchvision_weights_on_photos(capsys, tmp_path, tv_file):
    out = tmp_path / "preds"
    code, _, err = _run(capsys, "predict", *_photos(2), "--weights", tv_file, "--config", _overrides(tmp_path),
                        "--class-names", "coco", "--precision", "fp32", "--output", out)
    assert code == 0, err
    assert "weights: format torchvision (auto" in err and "maskrcnn_resnet50_fpn" in err
    results = json.loads((out / "results.json").read_text())
    assert results and {r["file_name"] for r in results} == {str(p) for p in _photos(2)}
    # torchvision's COCO models number the classes by COCO's category ids
    assert all(1 <= r["category_id"] <= 90 and "segmentation" in r for r in results)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{p.stem}.png" for p in _photos(2))


def test_predict_detectron2_weights_on_photos(capsys, tmp_path, d2_file):
    names = tmp_path / "names.txt"
    names.write_text("triangle\nrectangle\nellipse\n")
    out = tmp_path / "preds"
    code, _, err = _run(capsys, "predict", *_photos(2), "--weights", d2_file, "--weights-format", "detectron2",
                        "--class-names", names, "--precision", "fp32", "--output", out)
    assert code == 0, err
    assert "weights: format detectron2 (requested)" in err
    results = json.loads((out / "results.json").read_text())
    assert results, "the random model should detect something on the photos"
    assert {r["category_id"] for r in results} <= {0, 1, 2}     # detectron2's contiguous ids, no dataset ids given


def test_convert_round_trip_torchvision(capsys, tmp_path, tv_file):
    out = tmp_path / "converted"
    code, _, err = _run(capsys, "convert", tv_file, out, "--class-names", "coco", "--config", _overrides(tmp_path))
    assert code == 0, err
    assert (out / "model_final.safetensors").is_file() and (out / "config.json").is_file()
    a = mrcnn_fast.Predictor(tv_file, class_names="coco", config=SMALL_INPUT, precision="fp32")
    b = mrcnn_fast.Predictor(out, precision="fp32")
    assert b.weights_format == "ours" and b.class_names == a.class_names and b.first_label == 1
    photo = _photos(1)[0]
    ra, rb = a(photo), b(photo)
    assert ra["labels"].numel() > 0
    for k in ("boxes", "labels", "scores", "masks"):
        assert torch.equal(ra[k], rb[k]), k
    assert ra["class_names"] == rb["class_names"]


def test_convert_round_trip_detectron2(capsys, tmp_path, d2_file):
    out = tmp_path / "d2.safetensors"      # a .safetensors OUT: config.json beside it
    code, _, err = _run(capsys, "convert", d2_file, out, "--from", "detectron2")
    assert code == 0, err
    assert out.is_file() and (tmp_path / "config.json").is_file()
    a = mrcnn_fast.Predictor(d2_file, precision="fp32")
    b = mrcnn_fast.Predictor(out, precision="fp32")
    assert a.weights_format == "detectron2" and b.weights_format == "ours"
    assert b.first_label == 0 and b.cfg.input.resize == "detectron2" and b.cfg.model.input_format == "BGR"
    photo = _photos(1)[0]
    ra, rb = a(photo), b(photo)
    assert ra["labels"].numel() > 0 and int(ra["labels"].min()) >= 0
    for k in ("boxes", "labels", "scores", "masks"):
        assert torch.equal(ra[k], rb[k]), k


def test_convert_errors(capsys, tmp_path, d2_file):
    code, _, err = _run(capsys, "convert", tmp_path / "none.pth", tmp_path / "out")
    assert code == 2 and "IN not found" in err
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"")
    code, _, err = _run(capsys, "convert", run / "model.safetensors", tmp_path / "out")
    assert code == 2 and "already in our format" in err
    (tmp_path / "afile").write_text("x")
    code, _, err = _run(capsys, "convert", d2_file, tmp_path / "afile")
    assert code == 2 and "neither a folder nor a .safetensors" in err
    (tmp_path / "junk.pkl").write_bytes(b"\x80\x02cos\nsystem\nq\x00.")
    code, _, err = _run(capsys, "convert", tmp_path / "junk.pkl", tmp_path / "out2")
    assert code == 2 and "junk.pkl" in err and "os.system" in err
    assert not (tmp_path / "out2" / "model_final.safetensors").exists()
