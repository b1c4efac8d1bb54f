"""Anchors for a 5-level FPN (sizes 32..512, ratios 0.5/1/2) on an 800x1333 image padded to 800x1344,
batch of 2: torchvision's AnchorGenerator.forward vs ours, uncached (every call computes) and cached.

MRCNN_BENCH_DEVICE containing "cuda" runs on the GPU (timings include a synchronize)."""
import os

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from mrcnn_fast import ops

DEVICE = torch.device("cuda" if "cuda" in os.environ.get("MRCNN_BENCH_DEVICE", "").lower() else "cpu")
SIZES = ((32,), (64,), (128,), (256,), (512,))
RATIOS = ((0.5, 1.0, 2.0),) * 5
IMAGES = ImageList(torch.zeros(2, 3, 800, 1344, device=DEVICE), [(800, 1333), (790, 1300)])
FEATS = [torch.zeros(2, 1, -(-800 // s), 1344 // s, device=DEVICE) for s in (4, 8, 16, 32, 64)]
GROUP = "anchors: FPN 5 levels, 800x1333 (pad 800x1344), batch 2"


def _timed(gen):
    def run():
        out = gen(IMAGES, FEATS)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out
    return run


def _check(gen):
    ref = TVAnchorGenerator(SIZES, RATIOS)(IMAGES, FEATS)
    assert all(torch.equal(a, b) for a, b in zip(gen(IMAGES, FEATS), ref))


@pytest.mark.benchmark(group=GROUP)
def test_anchors_mrcnn_fast(bench):
    gen = ops.AnchorGenerator(SIZES, RATIOS, cache_size=0)
    _check(gen)
    bench(_timed(gen))


@pytest.mark.benchmark(group=GROUP)
def test_anchors_torchvision(bench):
    bench(_timed(TVAnchorGenerator(SIZES, RATIOS)))


@pytest.mark.benchmark(group=GROUP + " (ours cached)")
def test_anchors_cached_mrcnn_fast(bench):
    gen = ops.AnchorGenerator(SIZES, RATIOS)
    _check(gen)
    bench(_timed(gen))


@pytest.mark.benchmark(group=GROUP + " (ours cached)")
def test_anchors_cached_torchvision(bench):
    bench(_timed(TVAnchorGenerator(SIZES, RATIOS)))
