"""`mrcnn-fast predict`: inputs (files, folders, globs), overlays, the COCO results JSON, bad images, exit status,
torchrun sharding. A tiny random-weight run folder (test_predictor.make_run_folder) on the real COCO photos."""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from mrcnn_fast import cli
from mrcnn_fast.engine.checkpoint import FINAL_WEIGHTS
from test_predictor import CATEGORY_IDS, CLASS_NAMES, make_run_folder, photos


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_folder(tmp_path_factory.mktemp("run") / "train")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder with 3 of the photos (two named as COCO names them) -> (folder, files)."""
    src = photos(3)
    folder = tmp_path_factory.mktemp("imgs")
    files = []
    for p in src:
        dst = folder / p.name
        dst.write_bytes(p.read_bytes())
        files.append(dst)
    return folder, files


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _coco_gt(results, files):
    """A ground truth COCO object that knows the results' image ids and the weights' categories."""
    ids = sorted({r["image_id"] for r in results} | {int(f.stem) for f in files})
    sizes = {int(f.stem): Image.open(f).size for f in files}
    gt = COCO()
    gt.dataset = {"images": [{"id": i, "width": sizes[i][0], "height": sizes[i][1]} for i in ids],
                  "annotations": [], "categories": [{"id": c, "name": n} for c, n in zip(CATEGORY_IDS, CLASS_NAMES)]}
    gt.createIndex()
    return gt


def test_folder_overlays_and_coco_results(capsys, run_dir, images, tmp_path):
    folder, files = images
    out = tmp_path / "out"
    code, _, err = _run(capsys, "predict", folder, "--weights", run_dir, "--output", out, "--batch-size", "2")
    assert code == 0, err
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{f.stem}.png" for f in files)
    for f in files:   # overlays at the image's size, with something drawn on them
        drawn, orig = Image.open(out / f"{f.stem}.png"), Image.open(f).convert("RGB")
        assert drawn.size == orig.size
    assert "images/s" in err.strip().splitlines()[-2]
    results = json.loads((out / "results.json").read_text())
    assert results and {r["file_name"] for r in results} <= {str(f) for f in files}
    for r in results:
        assert r["image_id"] == int(os.path.basename(r["file_name"]).split(".")[0])   # COCO's numbered names
        assert r["category_id"] in CATEGORY_IDS and len(r["bbox"]) == 4 and 0 <= r["score"] <= 1
        assert isinstance(r["segmentation"]["counts"], str) and len(r["keypoints"]) == 3 * 4
    gt = _coco_gt(results, files)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        dt = gt.loadRes(results)
        assert len(dt.anns) == len(results)
        assert all(dt.annToMask(a).shape == (gt.imgs[a["image_id"]]["height"], gt.imgs[a["image_id"]]["width"])
                   for a in list(dt.anns.values())[:5])


def test_same_detections_as_the_predictor(capsys, run_dir, images, tmp_path):
    import mrcnn_fast

    folder, files = images
    code, out, err = _run(capsys, "predict", files[0], "--weights", run_dir / FINAL_WEIGHTS, "--score-threshold",
                          "0.2", "--mask-format", "bool", "--precision", "fp32")
    assert code == 0, err
    results = json.loads(out)   # no --output: the JSON on stdout
    want = mrcnn_fast.Predictor(run_dir, score_threshold=0.2, precision="fp32")(files[0])
    assert len(results) == want["scores"].shape[0] > 0
    assert [r["category_id"] for r in results] == [CATEGORY_IDS[i - 1] for i in want["labels"].tolist()]
    xywh = [r["bbox"] for r in results]
    b = want["boxes"].double()
    np.testing.assert_allclose(xywh, torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], 1).numpy(), atol=2e-3)


@pytest.mark.slow
def test_compile_gives_the_same_detections(capsys, run_dir, images):
    folder, files = images
    runs = []
    for extra in ([], ["--compile"]):
        code, out, err = _run(capsys, "predict", files[0], "--weights", run_dir, "--precision", "fp32", *extra)
        assert code == 0, err
        runs.append(json.loads(out))
    eager, compiled = runs
    assert len(eager) == len(compiled) > 0
    assert [r["category_id"] for r in eager] == [r["category_id"] for r in compiled]
    np.testing.assert_allclose([r["bbox"] for r in eager], [r["bbox"] for r in compiled], atol=1e-2)
    np.testing.assert_allclose([r["score"] for r in eager], [r["score"] for r in compiled], atol=1e-3)


def test_bad_images_are_reported_and_skipped(capsys, run_dir, images, tmp_path):
    folder, files = images
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(files[0].read_bytes()[:1500])
    (bad / "empty.png").write_bytes(b"")
    (bad / "notes.jpg").write_text("hello")
    out = tmp_path / "out"
    code, _, err = _run(capsys, "predict", bad, str(folder / "*.jpg"), tmp_path / "missing.jpg",
                        "--weights", run_dir, "--output", out)
    assert code == 1
    for name in ("broken.jpg", "empty.png", "notes.jpg", "missing.jpg"):
        assert name in err
    assert "Traceback" not in err and "4 failed" in err
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{f.stem}.png" for f in files)
    assert {r["file_name"] for r in json.loads((out / "results.json").read_text())} <= {str(f) for f in files}


def test_usage_errors(capsys, run_dir, images, tmp_path):
    folder, files = images
    for argv, needle in [
        (["--weights", run_dir, "--weights-format", "torchvision"], "torchvision weights are a single file"),
        (["--weights", run_dir, "--weights-format", "caffe"], "invalid choice"),
        (["--weights", tmp_path / "nope"], "--weights not found"),
        (["--weights", run_dir, "--batch-size", "0"], "--batch-size"),
        (["--weights", run_dir, "--score-threshold", "2"], "--score-threshold"),
        (["--weights", run_dir, "--precision", "fp16"], "fp16"),
    ]:
        code, _, err = _run(capsys, "predict", files[0], *argv)
        assert code == 2 and err.startswith("mrcnn-fast: error: ") and needle in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
    if not torch.cuda.is_available():
        code, _, err = _run(capsys, "predict", files[0], "--weights", run_dir, "--device", "cuda")
        assert code == 2 and "no CUDA device" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = _run(capsys, "predict", tmp_path / "nothing*.jpg", "--weights", run_dir)
    assert code == 2 and "no images" in err
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    code, _, err = _run(capsys, "predict", empty, "--weights", run_dir)
    assert code == 2 and "no images in this folder" in err


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_torchrun_two_processes_write_one_merged_file(run_dir, images, tmp_path, capsys):
    from test_engine_distributed import _torchrun

    folder, files = images
    code, _, err = _run(capsys, "predict", folder, "--weights", run_dir, "--output", tmp_path / "single")
    assert code == 0, err
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = _torchrun() + ["--standalone", "--nproc_per_node=2", "-m", "mrcnn_fast", "predict", str(folder),
                         str(tmp_path / "missing.jpg"), "--weights", str(run_dir), "--output", str(tmp_path / "dist")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr[-4000:]   # the missing file
    assert r.stderr.count("predicted 3 images") == 1 and "missing.jpg" in r.stderr
    single = json.loads((tmp_path / "single" / "results.json").read_text())
    merged = json.loads((tmp_path / "dist" / "results.json").read_text())
    assert len(merged) == len(single)
    # the same detections (the processes run 1 thread each: float sums may differ in the last bits)
    for a, b in zip(sorted(merged, key=lambda r: (r["image_id"], -r["score"])),
                    sorted(single, key=lambda r: (r["image_id"], -r["score"]))):
        assert (a["image_id"], a["category_id"], a["file_name"]) == (b["image_id"], b["category_id"], b["file_name"])
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=0.01)
    assert sorted(p.name for p in (tmp_path / "dist").glob("*.png")) == sorted(f"{f.stem}.png" for f in files)
