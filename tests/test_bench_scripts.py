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
    assert not any(r["reused"] for r in payload["results"])
    # a second call finds the finished runs and only re-evaluates them, with the same numbers
    assert ablations.main(args) == 0
    again = json.loads((tmp_path / "out" / "ablations.json").read_text())
    assert all(r["reused"] for r in again["results"])
    assert [r["metrics"] for r in again["results"]] == [r["metrics"] for r in payload["results"]]


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
    assert not holds and "does NOT hold" in t


@pytest.mark.parametrize("bad", [["--seeds", "0"], ["--override", "{not json"], ["--only", "zz"]])
def test_ablations_bad_arguments(bad, tmp_path):
    with pytest.raises(SystemExit) as e:
        ablations.main(["--out", str(tmp_path)] + bad)
    assert e.value.code != 0
