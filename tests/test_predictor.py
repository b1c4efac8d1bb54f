"""mrcnn_fast.Predictor: weights loading, every input kind, mask formats, thresholds, bad inputs, precision choice,
threads. A tiny random-weight model saved as a `train` run folder; real photos from ../shared/data/coco_samples."""
import logging
import threading
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

import mrcnn_fast
from _model_utils import tiny_cfg
from data_helpers import require_shared
from mrcnn_fast import predictor as pred_mod
from mrcnn_fast.config import merge, to_dict
from mrcnn_fast.engine import save_weights
from mrcnn_fast.engine.checkpoint import FINAL_WEIGHTS, save_config
from mrcnn_fast.modeling import build_model

CLASS_NAMES = ("triangle", "rectangle", "ellipse")
CATEGORY_IDS = (11, 12, 17)


def make_run_folder(path, *, seed: int = 0, **model_overrides):
    """A `mrcnn-fast train`-style run folder (model_final.safetensors + config.json) of a tiny random model."""
    cfg = merge(tiny_cfg(model_overrides or None), {"data": {"class_names": list(CLASS_NAMES),
                                                             "category_ids": list(CATEGORY_IDS)}})
    torch.manual_seed(seed)
    model = build_model(cfg)
    path.mkdir(parents=True, exist_ok=True)
    save_weights(model, path / FINAL_WEIGHTS)
    save_config(path, to_dict(cfg))
    return path


def photos(n=None):
    root = require_shared("coco_samples")
    files = sorted((root / "images").glob("*.jpg"))
    return files if n is None else files[:n]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_folder(tmp_path_factory.mktemp("run") / "train")


@pytest.fixture(scope="module")
def predictor(run_dir):
    return mrcnn_fast.Predictor(run_dir)


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    assert torch.equal(a["labels"], b["labels"]) and a["class_names"] == b["class_names"]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
    assert torch.equal(a["masks"], b["masks"])
    assert torch.equal(a["keypoints"], b["keypoints"])


# ---- loading ---------------------------------------------------------------------------------------------------


def test_loads_run_folder_file_and_demo_folder(run_dir, predictor):
    assert predictor.weights == run_dir / FINAL_WEIGHTS and predictor.precision in ("fp32", "bf16")
    assert predictor.graph is not None   # a plain Mask R-CNN: the C++ graph runs between the networks
    assert predictor.class_names == CLASS_NAMES and predictor.category_ids == CATEGORY_IDS
    assert predictor.category_id(2) == 12 and predictor.class_name(3) == "ellipse"
    assert mrcnn_fast.Predictor(run_dir / FINAL_WEIGHTS, precision="fp32").weights == run_dir / FINAL_WEIGHTS
    # the demo's output folder holds the run in train/
    assert mrcnn_fast.Predictor(run_dir.parent, precision="fp32").weights == run_dir / FINAL_WEIGHTS


def test_weights_errors(tmp_path, run_dir):
    with pytest.raises(FileNotFoundError, match="weights not found"):
        mrcnn_fast.Predictor(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        mrcnn_fast.Predictor(tmp_path)
    lone = tmp_path / "w.safetensors"
    lone.write_bytes((run_dir / FINAL_WEIGHTS).read_bytes())
    with pytest.raises(FileNotFoundError, match="config.json"):
        mrcnn_fast.Predictor(lone)
    # an explicit config replaces the missing one; the preset's 80 classes do not fit the 3-class weights
    with pytest.raises(mrcnn_fast.engine.CheckpointError, match="shape mismatch"):
        mrcnn_fast.Predictor(lone, config="small_cpu")
    p = mrcnn_fast.Predictor(lone, config=tiny_cfg(), precision="fp32")
    assert p.class_names == ("1", "2", "3") and p.category_ids == (1, 2, 3)   # no names recorded in that config


def test_cuda_without_gpu_is_a_clear_error(run_dir):
    if torch.cuda.is_available() and mrcnn_fast.has_cuda():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match="cuda.*(no CUDA device|no CUDA kernels)"):
        mrcnn_fast.Predictor(run_dir, device="cuda")
    with pytest.raises(ValueError, match="device must be"):
        mrcnn_fast.Predictor(run_dir, device="tpu")


def test_bad_options(run_dir):
    for kw, msg in [({"precision": "fp8"}, "precision must be one of"), ({"mask_format": "png"}, "mask_format"),
                    ({"score_threshold": 1.5}, "score_threshold"), ({"score_threshold": "high"}, "score_threshold")]:
        with pytest.raises(ValueError, match=msg):
            mrcnn_fast.Predictor(run_dir, **kw)


# ---- precision ---------------------------------------------------------------------------------------------------


def test_precision_auto_and_explicit(run_dir, monkeypatch, caplog):
    from mrcnn_fast.engine import trainer

    cpu = torch.device("cpu")
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: False)
    assert pred_mod.choose_precision("auto", cpu)[0] == "fp32"
    with pytest.raises(ValueError, match="no native bfloat16"):
        pred_mod.choose_precision("bf16", cpu)
    with pytest.raises(ValueError, match="fp16.*cuda"):
        pred_mod.choose_precision("fp16", cpu)
    with caplog.at_level(logging.INFO, logger="mrcnn_fast"):
        p = mrcnn_fast.Predictor(run_dir)
    assert p.precision == "fp32"
    lines = [r.getMessage() for r in caplog.records if r.name == "mrcnn_fast" and "precision" in r.getMessage()]
    assert len(lines) == 1 and "precision fp32" in lines[0] and "no native bfloat16" in lines[0]

    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(pred_mod, "BF16_AP_COST_POINTS", None)
    assert pred_mod.choose_precision("auto", cpu) == ("fp32", "auto: the AP cost of bfloat16 has not been measured")
    monkeypatch.setattr(pred_mod, "BF16_AP_COST_POINTS", 0.8)
    assert pred_mod.choose_precision("auto", cpu)[0] == "fp32"
    monkeypatch.setattr(pred_mod, "BF16_AP_COST_POINTS", 0.3)
    assert pred_mod.choose_precision("auto", cpu)[0] == "bf16"
    assert pred_mod.choose_precision("bf16", cpu)[0] == "bf16"
    assert pred_mod.choose_precision("fp32", cpu)[0] == "fp32"


@pytest.mark.skipif(not pred_mod._bf16_native(torch.device("cpu")), reason="the CPU has no native bfloat16")
def test_bf16_networks_float32_results(run_dir, monkeypatch):
    monkeypatch.setattr(pred_mod, "BF16_AP_COST_POINTS", 0.2)
    p = mrcnn_fast.Predictor(run_dir)   # auto: native and a measured cost under the limit
    assert p.precision == "bf16"
    assert p.model.backbone.body.conv1.weight.dtype == torch.bfloat16
    r = p(photos(1)[0])
    assert r["boxes"].dtype == r["scores"].dtype == torch.float32 and r["boxes"].shape[0] > 0
    assert mrcnn_fast.Predictor(run_dir, precision="bf16").precision == "bf16"


# ---- inputs ------------------------------------------------------------------------------------------------------


def test_every_input_kind_gives_the_same_detections(predictor):
    path = photos(1)[0]
    rgb = np.array(Image.open(path).convert("RGB"))
    ref = predictor(path)
    assert ref["boxes"].shape[0] > 0 and ref["masks"].shape[1:] == rgb.shape[:2]
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    for other in (str(path), Image.open(path), rgb, tensor):
        assert_same(ref, predictor(other))
    assert_same(ref, predictor(np.ascontiguousarray(rgb[..., ::-1]), bgr=True))
    assert_same(ref, predictor(tensor.flip(0), bgr=True))
    assert_same(ref, predictor(Image.open(path).convert("RGBA")))   # any PIL mode -> RGB
    assert_same(ref, predictor([rgb])[0])


def test_fp32_gives_the_eval_models_detections(run_dir):
    """precision fp32: the detections of the model in eval mode (boxes within 0.05 px, scores within 1e-3, mask
    IoU >= 0.99: BatchNorm folded into the convolutions rounds differently)."""
    from mrcnn_fast.config import get_config
    from mrcnn_fast.engine import load_weights
    from mrcnn_fast.modeling import inference_model

    p = mrcnn_fast.Predictor(run_dir, precision="fp32")
    cfg = get_config(str(run_dir / "config.json"))
    model = build_model(cfg)
    load_weights(model, run_dir / FINAL_WEIGHTS)
    model = inference_model(model, cfg).eval()
    for path in photos(2):
        image = pred_mod.to_image_tensor(path)
        want = model([image], mask_format="bool")[0]
        got = p(path)
        assert want["boxes"].shape[0] > 0
        assert torch.equal(got["labels"], want["labels"])
        torch.testing.assert_close(got["boxes"], want["boxes"], atol=0.05, rtol=0)
        torch.testing.assert_close(got["scores"], want["scores"], atol=1e-3, rtol=0)
        inter = (got["masks"] & want["masks"]).flatten(1).sum(1)
        union = (got["masks"] | want["masks"]).flatten(1).sum(1)
        assert bool((inter >= 0.99 * union).all())


def test_result_layout_and_mask_formats(predictor):
    path = photos(1)[0]
    h, w = np.asarray(Image.open(path)).shape[:2]
    r = predictor(path)
    d = r["boxes"].shape[0]
    assert r["boxes"].dtype == torch.float32 and r["labels"].dtype == torch.int64 and r["scores"].shape == (d,)
    assert r["masks"].dtype == torch.bool and r["masks"].shape == (d, h, w)
    assert r["keypoints"].shape == (d, 4, 3) and r["keypoints_scores"].shape == (d, 4)
    assert r["class_names"] == [CLASS_NAMES[i - 1] for i in r["labels"].tolist()]
    assert bool((r["scores"][:-1] >= r["scores"][1:]).all())
    prob = predictor(path, mask_format="prob")
    assert prob["masks"].shape == (d, 1, h, w) and prob["masks"].is_floating_point()
    assert torch.equal(prob["masks"][:, 0] > 0.5, r["masks"])
    rle = predictor(path, mask_format="rle")
    assert len(rle["masks"]) == d and rle["masks"][0]["size"] == [h, w]
    with warnings.catch_warnings():   # pycocotools' numpy-2 __array__ deprecation noise
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = np.stack([mask_util.decode(m) for m in rle["masks"]]).astype(bool)
    assert np.array_equal(decoded, r["masks"].numpy())
    with pytest.raises(ValueError, match="mask_format"):
        predictor(path, mask_format="bitmap")


def test_score_threshold_filters(run_dir, predictor):
    path = photos(1)[0]
    low = predictor(path)
    thr = float(low["scores"].median())
    high = mrcnn_fast.Predictor(run_dir, score_threshold=thr, precision="fp32")
    assert high.score_threshold == thr
    r = high(path)
    assert 0 < r["scores"].shape[0] < low["scores"].shape[0] and bool((r["scores"] >= thr).all())
    assert r["masks"].shape[0] == r["keypoints"].shape[0] == len(r["class_names"]) == r["scores"].shape[0]


def test_batches_equal_single_images(predictor):
    same_size = [p for p in photos() if Image.open(p).size == (640, 480)][:2]
    assert len(same_size) == 2
    single = [predictor(p) for p in same_size]
    batched = predictor(same_size, batch_size=2)
    assert len(batched) == 2
    for a, b in zip(single, batched):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(a["scores"], b["scores"], atol=1e-4, rtol=0)
    assert predictor([]) == []
    with pytest.raises(ValueError, match="batch_size"):
        predictor(same_size, batch_size=0)


@pytest.mark.parametrize("kind", ["text", "empty", "missing", "truncated", "folder"])
def test_bad_files_name_the_file_and_the_predictor_goes_on(predictor, tmp_path, kind):
    good = photos(1)[0]
    bad = tmp_path / f"bad_{kind}.jpg"
    if kind == "text":
        bad.write_text("not an image\n")
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "truncated":
        bad.write_bytes(good.read_bytes()[:2000])
    elif kind == "folder":
        bad.mkdir()
    with pytest.raises(pred_mod.ImageReadError, match=str(bad)) as e:
        predictor(bad)
    assert e.value.path == str(bad)
    with pytest.raises(pred_mod.ImageReadError, match=str(bad)):
        predictor([good, bad])
    assert predictor(good)["boxes"].shape[0] > 0


@pytest.mark.parametrize("image, error, msg", [
    (np.zeros((32, 32, 3), np.float32), TypeError, "uint8"),
    (np.zeros((32, 32), np.uint8), ValueError, "H x W x 3"),
    (np.zeros((32, 32, 4), np.uint8), ValueError, "alpha"),
    (np.zeros((0, 32, 3), np.uint8), ValueError, "no pixels"),
    (torch.zeros(3, 32, 32, dtype=torch.uint8), TypeError, "float"),
    (torch.zeros(1, 3, 32, 32), ValueError, "list of images"),
    (torch.zeros(32, 32, 3), ValueError, r"Tensor\[3, H, W\]"),
    (torch.full((3, 32, 32), float("nan")), ValueError, "NaN"),
    (torch.full((3, 32, 32), 200.0), ValueError, "divide by 255"),
    (12, TypeError, "expected a path"),
])
def test_bad_arrays_and_tensors(predictor, image, error, msg):
    with pytest.raises(error, match=msg):
        predictor(image)


# ---- threads -----------------------------------------------------------------------------------------------------


def test_four_threads_get_their_own_images_results(predictor):
    files = photos(4)
    expected = [predictor(f) for f in files]
    got: dict = {}
    errors = []
    start = threading.Barrier(4)

    def work(i):
        try:
            start.wait()
            for _ in range(2):
                got.setdefault(i, []).append(predictor(files[i]))
        except BaseException as e:   # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for i in range(4):
        assert len(got[i]) == 2
        for r in got[i]:
            assert_same(expected[i], r)


def test_flip_tta_config_runs(tmp_path):
    p = mrcnn_fast.Predictor(make_run_folder(tmp_path / "flip", roi_heads={"test_flip": True}), precision="fp32")
    assert p.test_flip
    r = p(photos(1)[0])
    assert r["boxes"].shape[0] == r["masks"].shape[0] == len(r["class_names"])
