"""Mask R-CNN memorises real COCO photos: trained and evaluated on the same few images (../shared/data).

masks: coco_samples (6 photos, 80 COCO categories), segm AP >= 0.9; keypoints: coco_persons (4 photos,
17 keypoints), keypoint AP >= 0.8. Training is the engine's train() with the configs of bench/overfit_coco.py
(small_cpu from scratch, flips off). Each case takes a few minutes on 2 CPU cores.
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


def _data_dir(folder: str) -> Path:
    # ../shared/data beside the repository first, then the fallbacks of data_helpers (ancestors, $MRCNN_SHARED_DATA)
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
    assert r["value"] >= r["target"], (f"{case}: {r['metric']} {r['value']:.3f} < target {r['target']} "
                                       f"(all metrics: {r['metrics']})")
