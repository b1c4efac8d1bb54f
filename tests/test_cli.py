import json
import os
import subprocess
import sys

import pytest
import torch

from mrcnn_fast import cli
from mrcnn_fast.engine import save_weights


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, out, err, *needles):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mrcnn-fast: error: ") and "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A minimal COCO set (2 images, 1 category) — enough for argument handling."""
    from PIL import Image

    root = tmp_path_factory.mktemp("coco")
    (root / "images").mkdir()
    for i in (1, 2):
        Image.new("RGB", (32, 32), (i * 50, 0, 0)).save(root / "images" / f"{i}.png")
    data = {"images": [{"id": i, "file_name": f"{i}.png", "width": 32, "height": 32} for i in (1, 2)],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [4, 4, 10, 10], "area": 100,
                             "iscrowd": 0, "segmentation": [[4, 4, 14, 4, 14, 14, 4, 14]]}],
            "categories": [{"id": 7, "name": "thing"}]}
    (root / "ann.json").write_text(json.dumps(data))
    return root


def test_no_command(capsys):
    _one_line_error(*_run(capsys), "a command is required")


def test_unknown_command(capsys):
    _one_line_error(*_run(capsys, "fly"), "invalid choice")


def test_missing_required_arguments(capsys):
    _one_line_error(*_run(capsys, "train", "--output", "x"), "--train-json", "--train-images")
    _one_line_error(*_run(capsys, "eval", "--json", "x"), "--weights")


def test_bad_int_argument(capsys):
    _one_line_error(*_run(capsys, "make-shapes", "out", "--train", "many"), "invalid int value")


def test_missing_files(capsys, coco, tmp_path):
    _one_line_error(*_run(capsys, "train", "--train-json", str(tmp_path / "no.json"), "--train-images",
                          str(coco / "images"), "--output", str(tmp_path / "o")), "--train-json not found", "no.json")
    _one_line_error(*_run(capsys, "train", "--train-json", str(coco / "ann.json"), "--train-images",
                          str(tmp_path / "nodir"), "--output", str(tmp_path / "o")), "--train-images not found")
    _one_line_error(*_run(capsys, "eval", "--weights", str(tmp_path / "w.safetensors"), "--json",
                          str(coco / "ann.json"), "--images", str(coco / "images")), "--weights not found")
    assert not (tmp_path / "o").exists()


def test_val_pair_required(capsys, coco, tmp_path):
    _one_line_error(*_run(capsys, "train", "--train-json", str(coco / "ann.json"), "--train-images",
                          str(coco / "images"), "--val-json", str(coco / "ann.json"), "--output", str(tmp_path)),
                    "--val-json and --val-images")


def test_unknown_preset_and_bad_config_files(capsys, coco, tmp_path):
    base = ["train", "--train-json", str(coco / "ann.json"), "--train-images", str(coco / "images"),
            "--output", str(tmp_path / "o")]
    _one_line_error(*_run(capsys, *base, "--config", "r77_fpn"), "unknown config 'r77_fpn'")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    _one_line_error(*_run(capsys, *base, "--config", str(bad)), "malformed config file")
    _one_line_error(*_run(capsys, *base, "--config", str(tmp_path / "absent.yaml")), "config file not found")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("base: small_cpu\nsolver: {base_lr: fast}\n")
    _one_line_error(*_run(capsys, *base, "--config", str(wrong)), "solver.base_lr", "expects a number")
    wrong.write_text("base: nope\n")
    _one_line_error(*_run(capsys, *base, "--config", str(wrong)), "unknown base preset")


def test_bad_opts(capsys, coco, tmp_path):
    base = ["train", "--train-json", str(coco / "ann.json"), "--train-images", str(coco / "images"),
            "--output", str(tmp_path / "o"), "--config", "small_cpu"]
    _one_line_error(*_run(capsys, *base, "--opts", "solver.base_lr"), "key=value")
    _one_line_error(*_run(capsys, *base, "--opts", "solver.nope=1"), "unknown config key 'solver.nope'")
    _one_line_error(*_run(capsys, *base, "--max-iter", "0"), "--max-iter must be positive")


def test_malformed_annotation_json(capsys, coco, tmp_path):
    bad = tmp_path / "ann.json"
    bad.write_text('{"images": [}')
    _one_line_error(*_run(capsys, "train", "--train-json", str(bad), "--train-images", str(coco / "images"),
                          "--output", str(tmp_path / "o"), "--config", "small_cpu"), "ann.json")


def test_eval_corrupt_and_mismatched_weights(capsys, coco, tmp_path):
    w = tmp_path / "w.safetensors"
    w.write_bytes(b"\x00" * 64)
    argv = ["eval", "--weights", str(w), "--json", str(coco / "ann.json"), "--images", str(coco / "images"),
            "--config", "small_cpu", "--num-workers", "0", "--opts", "model.roi_heads.num_classes=1"]
    _one_line_error(*_run(capsys, *argv), "cannot read", "safetensors")
    save_weights({"backbone.nothing": torch.zeros(2)}, w)
    _one_line_error(*_run(capsys, *argv), "does not match the model", "backbone.nothing")


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_eval_bad_image_file_one_line(capsys, coco, tmp_path, workers, damage):
    """A corrupt or missing image fails with the loader's own message on one line, also when it is read in a
    DataLoader worker process (which re-raises with the worker's whole traceback as the message)."""
    import shutil

    from mrcnn_fast.config import get_config
    from mrcnn_fast.modeling import build_model

    images = tmp_path / "images"
    shutil.copytree(coco / "images", images)
    if damage == "corrupt":
        (images / "2.png").write_bytes(b"not a png")
    else:
        (images / "2.png").unlink()
    cfg = get_config("small_cpu", {"model": {"roi_heads": {"num_classes": 1}}})
    torch.manual_seed(0)
    save_weights(build_model(cfg).state_dict(), tmp_path / "w.safetensors")
    code, out, err = _run(capsys, "eval", "--weights", str(tmp_path / "w.safetensors"), "--json",
                          str(coco / "ann.json"), "--images", str(images), "--config", "small_cpu",
                          "--num-workers", str(workers), "--opts", "model.roi_heads.num_classes=1")
    needles = ["2.png"] + (["corrupt or truncated image", "image id 2"] if damage == "corrupt" else [])
    assert code == 2, err
    errors = [line for line in err.splitlines() if "error" in line]   # the progress lines before it are fine
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
    assert errors[0].startswith("mrcnn-fast: error: ") and all(n in errors[0] for n in needles), errors[0]
    assert "Traceback" not in err and "Caught" not in err and "Original" not in err
    assert ("data loader worker" in err) == (workers > 0)


def test_cli_message_of_worker_errors():
    wrapped = ValueError("Caught ValueError in DataLoader worker process 1.\nOriginal Traceback (most recent call "
                         "last):\n  File \"x.py\", line 3, in f\n    raise ValueError(msg)\n"
                         "ValueError: bad image a.png\n")
    assert cli._message(wrapped) == "bad image a.png (in a data loader worker)"
    assert cli._message(ValueError("plain\n  message")) == "plain message"
    assert cli._message(FileNotFoundError(2, "No such file or directory", "/x/y.png")) == \
        "[Errno 2] No such file or directory: '/x/y.png'"
    assert cli._message(ValueError()) == "ValueError"


def test_eval_class_count_mismatch_with_stored_config(capsys, coco, tmp_path):
    from mrcnn_fast.config import get_config, to_dict
    from mrcnn_fast.engine.checkpoint import save_config

    save_config(tmp_path, to_dict(get_config("small_cpu")))   # 3 classes; the set has 1
    (tmp_path / "model_final.safetensors").write_bytes(b"")
    _one_line_error(*_run(capsys, "eval", "--weights", str(tmp_path / "model_final.safetensors"), "--json",
                          str(coco / "ann.json"), "--images", str(coco / "images")), "3 classes", "1 categories")


def test_parse_opts():
    assert cli.parse_opts(["solver.base_lr=0.01", "input.min_size_train=[640, 672]", "train.device=cpu",
                           "solver.amp=false"]) == {
        "solver": {"base_lr": 0.01, "amp": False}, "input": {"min_size_train": [640, 672]}, "train": {"device": "cpu"}}
    with pytest.raises(cli.UsageError):
        cli.parse_opts(["=3"])
    with pytest.raises(cli.UsageError):
        cli.parse_opts(["a..b=3"])


def test_help_and_version(capsys):
    code, out, _ = _run(capsys, "--version")
    assert code == 0 and out.startswith("mrcnn-fast ")
    code, out, _ = _run(capsys, "eval", "--help")
    assert code == 0 and "segm AP" in out


def test_module_entry_point_exit_status(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([sys.executable, "-m", "mrcnn_fast", "eval", "--weights", str(tmp_path / "x.pt"), "--json",
                        "j", "--images", "i"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == f"mrcnn-fast: error: --weights not found: {tmp_path / 'x.pt'}"


def test_make_shapes_command(capsys, tmp_path):
    code, out, err = _run(capsys, "make-shapes", str(tmp_path / "s"), "--train", "2", "--val", "1", "--size", "64")
    assert code == 0, err
    assert f"train_json: {tmp_path / 's' / 'train.json'}" in out
    assert len(json.loads((tmp_path / "s" / "val.json").read_text())["images"]) == 1
    _one_line_error(*_run(capsys, "make-shapes", str(tmp_path / "t"), "--train", "-1"), "--train must be >= 0")
    _one_line_error(*_run(capsys, "make-shapes", str(tmp_path / "t"), "--occluded-keypoints", "guess"),
                    "invalid choice")


def test_make_shapes_occluded_keypoints(capsys, tmp_path):
    vis = {}
    for mode in ("omit", "label"):
        code, _, err = _run(capsys, "make-shapes", str(tmp_path / mode), "--train", "12", "--val", "1", "--size", "128",
                            "--occluded-keypoints", mode)
        assert code == 0, err
        anns = json.loads((tmp_path / mode / "train.json").read_text())["annotations"]
        vis[mode] = sorted({v for a in anns for v in a["keypoints"][2::3]})
    assert vis == {"omit": [0, 2], "label": [1, 2]}
