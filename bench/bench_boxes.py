import os

import pytest
import torch
import torchvision

from mrcnn_fast import ops

DEVICE = torch.device("cuda" if "cuda" in os.environ.get("MRCNN_BENCH_DEVICE", "").lower() else "cpu")


def _boxes(n, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 1000
    return torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 200 + 1], 1).to(DEVICE)


def _sync(fn):
    if DEVICE.type != "cuda":
        return fn

    def run(*args):
        out = fn(*args)
        torch.cuda.synchronize()
        return out

    return run


A, B = _boxes(1000, 0), _boxes(1000, 1)


@pytest.mark.benchmark(group="box_iou: 1000x1000")
def test_box_iou_mrcnn_fast(bench):
    torch.testing.assert_close(ops.box_iou(A, B), torchvision.ops.box_iou(A, B))
    bench(_sync(ops.box_iou), A, B)


@pytest.mark.benchmark(group="box_iou: 1000x1000")
def test_box_iou_torchvision(bench):
    bench(_sync(torchvision.ops.box_iou), A, B)
