"""The bench scripts that produce the README's accuracy tables run end to end (tiny settings)."""
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import ablations  # noqa: E402

TINY = ["--max-iter", "2", "--train", "3", "--val", "2", "--image-size", "64", "--seeds", "2", "--jobs", "1",
        "--override", json.dumps({"solver": {"ims_per_batch": 1, "warmup_iters": 1},
                                  "model": {"mask": {"num_convs": 1, "conv_dim": 8}}})]


def test_ablations_report_and_reuse(tmp_path, capsys):
    args = TINY + ["--only", "b", "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "w")]
    assert ablations.main(args) == 0
    md = (tmp_path / "out" / "ablations.md").read_text()
    payload = json.loads((tmp_path / "out" / "ablations.json").read_text())
    assert sorted(r["key"] for r in payload["results"]) == ["baseline@seed0", "baseline@seed1", "softmax@seed0",
                                                             "softmax@seed1"]
    assert "| sigmoid / RoIAlign / FCN (baseline) | 2 |" in md and "| softmax mask loss | 2 |" in md
    assert "(b) sigmoid / RoIAlign / FCN (baseline) > softmax mask loss on mask AP" in md
    assert "(b) sigmoid / RoIAlign / FCN (baseline) > softmax mask loss on mask-on-GT-boxes AP" in md
    assert all("segm_gt_boxes" in r["metrics"] for r in payload["results"])
    # the report names the arguments this run was given (not the calling process's sys.argv)
    assert "Command: `python bench/ablations.py --max-iter 2" in md and "--only b --out" in md
    assert payload["argv"][1:] == args
    assert not any(r["reused"] for r in payload["results"])
    # a second call finds the finished runs and only re-evaluates them, with the same numbers
    assert ablations.main(args) == 0
    again = json.loads((tmp_path / "out" / "ablations.json").read_text())
    assert all(r["reused"] for r in again["results"])
    assert [r["metrics"] for r in again["results"]] == [r["metrics"] for r in payload["results"]]


@pytest.mark.slow
def test_ablations_c4_head(tmp_path, capsys):
    """--head c4: the paper's Table 2c head (RoIs from C4, res5 box head); the GT-box mask metric goes through the
    shared res5 too, and every run's command names the head so it can be rerun alone."""
    args = TINY + ["--only", "roi_pool,roi_warp_max", "--seeds", "1", "--head", "c4", "--out", str(tmp_path / "out"),
                   "--workdir", str(tmp_path / "w")]
    assert ablations.main(args) == 0
    md = (tmp_path / "out" / "ablations.md").read_text()
    payload = json.loads((tmp_path / "out" / "ablations.json").read_text())
    assert payload["config_baseline"]["model"]["fpn"]["enabled"] is False
    assert payload["config_baseline"]["model"]["roi_heads"]["box_pooler_resolution"] == 14
    assert sorted(r["key"] for r in payload["results"]) == ["roi_pool@seed0", "roi_warp_max@seed0"]
    for r in payload["results"]:
        assert 0.0 <= r["metrics"]["segm_gt_boxes"]["AP"] <= 1.0
        assert r["command"].endswith("--head c4 --override " + ablations.shlex.quote(TINY[-1]))
        assert json.loads((tmp_path / "w" / "runs" / r["key"] / "config.json").read_text())["model"]["fpn"][
            "enabled"] is False
    assert "with the C4 head" in md and "RoIWarp (max) > RoIPool on mask AP75" in md

    # --include: runs of another session (seed 0 here) join this run's seeds in one table
    first = tmp_path / "seed0.json"
    first.write_text((tmp_path / "out" / "ablations.json").read_text())
    more = [a if a != "1" or i == 0 or args[i - 1] != "--seeds" else "1" for i, a in enumerate(args)]
    more[more.index("--workdir") + 1] = str(tmp_path / "w2")
    assert ablations.main(more + ["--first-train-seed", "1", "--include", str(first)]) == 0
    merged = json.loads((tmp_path / "out" / "ablations.json").read_text())
    assert [r["key"] for r in merged["results"]] == ["roi_pool@seed0", "roi_warp_max@seed0", "roi_pool@seed1",
                                                      "roi_warp_max@seed1"]
    assert [bool(r.get("included_from")) for r in merged["results"]] == [True, True, False, False]
    assert [r["metrics"] for r in merged["results"][:2]] == [
        next(r for r in payload["results"] if r["key"] == k)["metrics"]
        for k in ("roi_pool@seed0", "roi_warp_max@seed0")]
    md = (tmp_path / "out" / "ablations.md").read_text()
    assert "| RoIPool | 2 |" in md and "(from seed0.json (commit" in md

    # an included file must exist, parse, be an ablations.json and share the settings
    bad = tmp_path / "bad.json"
    for content, match in (("{", "not readable JSON"), ('{"args": {}}', "not an ablations.json"),
                           (first.read_text().replace('"max_iter": 2', '"max_iter": 3'), "--max-iter 3")):
        bad.write_text(content)
        with pytest.raises(SystemExit):
            ablations.main(more + ["--include", str(bad)])
        assert match in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ablations.main(more + ["--include", str(tmp_path / "nope.json")])
    assert "nope.json does not exist" in capsys.readouterr().err


def test_ablations_directions_logic():
    def run(variant, seed, ap, ap75):
        segm = {"AP": ap, "AP50": ap, "AP75": ap75}
        return {"variant": variant, "train_seed": seed, "metrics": {"segm": segm, "bbox": {"AP": ap},
                                                                    "segm_gt_boxes": dict(segm)}}
    rows = [run("baseline", 0, 0.50, 0.52), run("baseline", 1, 0.54, 0.56), run("softmax", 0, 0.30, 0.2),
            run("softmax", 1, 0.35, 0.25), run("roi_warp", 0, 0.53, 0.57), run("roi_warp", 1, 0.55, 0.58)]
    text = dict((t.split(":")[0], (t, h)) for t, h in ablations.directions(ablations.summarize(rows)))
    t, holds = text["- (b) sigmoid / RoIAlign / FCN (baseline) > softmax mask loss on mask AP"]
    assert holds and "every seed" in t
    t, holds = text["- (c) sigmoid / RoIAlign / FCN (baseline) > RoIWarp on mask AP75 (both average bilinear samples"]
    assert not holds and "does NOT hold" in t and "ahead in 0 of 2 (gap -3.5 +- 2.1 sd)" in t


def test_ablations_paired_by_seed():
    """Seeds move both variants together: the unpaired test sees overlap, the paired one a win per seed."""
    def run(variant, seed, ap):
        m = {"AP": ap, "AP50": ap, "AP75": ap}
        return {"variant": variant, "train_seed": seed, "metrics": {"segm": m, "bbox": m, "segm_gt_boxes": m}}
    rows = [run("baseline", 0, 0.40), run("baseline", 1, 0.60), run("baseline", 2, 0.50),
            run("mlp", 0, 0.38), run("mlp", 1, 0.57), run("mlp", 2, 0.49)]
    text = [t for t, _ in ablations.directions(ablations.summarize(rows)) if t.startswith("- (e)")][0]
    assert "within the seed spread" in text and "ahead in 3 of 3 (gap +2.0 +- 1.0 sd)" in text
    assert ablations.paired(ablations.summarize(rows[:1] + rows[3:4]), "baseline", "mlp", ("segm", "AP")) == ""


def test_ablations_reuse_is_default_aware(tmp_path):
    """A run saved before a config field existed is reused (the field takes its default); a changed value is not."""
    from mrcnn_fast.config import to_dict

    args = ablations.main.__globals__["argparse"].Namespace(seed=0, image_size=64, max_iter=10, override=None)
    cfg = ablations.build_config(args, "baseline")
    saved = json.loads(json.dumps(to_dict(cfg)))
    path = tmp_path / "config.json"
    del saved["model"]["roi_heads"]["test_box_refine"], saved["solver"]["cpu_autocast"]
    for field in ("cascade_iou_thresholds", "test_mask_box", "test_mask_box_expand"):
        del saved["model"]["roi_heads"][field]
    path.write_text(json.dumps(saved))
    assert ablations.same_config(path, cfg)
    saved["model"]["roi_heads"]["pooler"] = "roi_pool"
    path.write_text(json.dumps(saved))
    assert not ablations.same_config(path, cfg)
    path.write_text("{not json")
    assert not ablations.same_config(path, cfg)
    assert not ablations.same_config(tmp_path / "missing.json", cfg)


@pytest.mark.parametrize("bad", [["--seeds", "0"], ["--override", "{not json"], ["--only", "zz"], ["--head", "c5"]])
def test_ablations_bad_arguments(bad, tmp_path):
    with pytest.raises(SystemExit) as e:
        ablations.main(["--out", str(tmp_path)] + bad)
    assert e.value.code != 0


def test_error_analysis_match_greedy_by_score_same_class():
    import torch

    import error_analysis

    m = torch.zeros(3, 8, 8, dtype=torch.bool)
    m[0, :4, :4] = True     # gt 0 (class 1)
    m[1, 4:, 4:] = True     # gt 1 (class 2)
    m[2, :4, 4:] = True     # gt 2: crowd, never matched
    t = {"boxes": torch.tensor([[0, 0, 4, 4], [4, 4, 8, 8], [4, 0, 8, 4]], dtype=torch.float32),
         "labels": torch.tensor([1, 2, 1]), "masks": m, "iscrowd": torch.tensor([0, 0, 1])}
    d = torch.zeros(4, 1, 8, 8)
    d[0, 0, :4, :4] = 1     # perfect on gt 0 but class 2: skipped
    d[1, 0, :4, :3] = 1     # IoU 0.75 with gt 0, class 1
    d[2, 0, :4, :4] = 1     # IoU 1 with gt 0, class 1, lower score than det 1 but the better mask
    d[3, 0, 4:, 4:] = 1     # gt 1, class 2
    o = {"boxes": torch.zeros(4, 4), "labels": torch.tensor([2, 1, 1, 2]), "scores": torch.tensor([.9, .8, .7, .6]),
         "masks": d}
    assert error_analysis.match(t, o) == [(0, 2), (1, 3)]


def test_error_analysis_runs_on_a_trained_model(tmp_path, capsys):
    import error_analysis
    from mrcnn_fast import cli
    from mrcnn_fast.config import get_config, merge
    from mrcnn_fast.data import make_shapes
    from mrcnn_fast.engine import train

    s = make_shapes(tmp_path / "shapes", n_train=2, n_val=2, seed=3, image_size=(64, 64))
    opts = ["input.min_size_train=[64]", "input.max_size_train=64", "input.min_size_test=64", "input.max_size_test=64",
            "solver.ims_per_batch=1", "solver.warmup_iters=1", "train.num_workers=0", "train.checkpoint_period=0",
            "model.keypoint.num_convs=1", "model.keypoint.conv_dim=8", "model.mask.num_convs=1",
            "model.mask.conv_dim=8"]
    cfg = merge(get_config("shapes"), cli.parse_opts(opts))
    train(cfg, train_json=s["train_json"], train_images=s["train_images"], output_dir=tmp_path / "run", max_iter=2,
          log=lambda m: None)
    assert error_analysis.main(["--weights", str(tmp_path / "run" / "model_final.safetensors"),
                                "--json", str(s["val_json"]), "--images", str(s["val_images"])]) == 0
    out = capsys.readouterr().out
    assert "non-crowd instances matched" in out and "box IoU, predicted box" in out
