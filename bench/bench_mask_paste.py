"""Mask paste: 100 28x28 masks into an 800x1333 image, boxes of COCO-like varied sizes inside the image.

Baselines (torchvision's post-processing as Mask R-CNN runs it, plus the COCO evaluation step):
  float: roi_heads.paste_masks_in_image
  bool:  paste_masks_in_image(...) > 0.5
  rle:   the same, then pycocotools.mask.encode(np.asfortranarray(m)) per mask
  rle_encode: pycocotools.mask.encode per mask of ready bool masks (the name says "torchvision" only so
              that conftest files it as the baseline)

aligned groups: our aligned paste (aligned=True, detectron2's convention) against torchvision's paste (float,
bool) and its pycocotools pipeline (rle). These are NOT the same function (the aligned paste puts each mask
exactly on its box; torchvision's expands and truncates it), so the ratio only says what switching the model's
default paste to "aligned" costs or saves against torchvision's post-processing; ours is checked against an
F.grid_sample reference instead.

Expected gains, written before optimising (2 shared cores): torchvision's float paste allocates and zeroes a
4 MB image per mask and then copies all of them again in torch.stack (~280 ms), while we write the 426 MB
result once (first-touch floor ~90 ms): ~3x. bool: 107 MB written once (~25 ms) against the float paste plus
a 426 MB comparison: ~10x. rle: only the ~4 Mpx inside the boxes are evaluated (a few ms) against the bool
pipeline plus 100 Fortran copies and 1 Mpx scans: >= 100x.
"""
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste

from mrcnn_fast import ops

N, M, IMG = 100, 28, (800, 1333)
GROUP = f"{N}x{M}x{M} -> {IMG[0]}x{IMG[1]}"


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = IMG
    # Box sides log-uniform in [16, 700] px, placed inside the image.
    sides = torch.exp(torch.empty(N, 2).uniform_(np.log(16), np.log(700), generator=g))
    sides = torch.minimum(sides, torch.tensor([w - 1.0, h - 1.0]))
    x1 = torch.rand(N, generator=g) * (w - 1 - sides[:, 0])
    y1 = torch.rand(N, generator=g) * (h - 1 - sides[:, 1])
    boxes = torch.stack([x1, y1, x1 + sides[:, 0], y1 + sides[:, 1]], 1)
    # Mask probabilities shaped like predictions: a soft blob per box, with some noise.
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, M), torch.linspace(-1, 1, M), indexing="ij")
    c = torch.rand(N, 2, 1, 1, generator=g) * 0.6 - 0.3
    r = torch.rand(N, 2, 1, 1, generator=g) * 0.5 + 0.4
    d = ((xx - c[:, 0]) / r[:, 0]) ** 2 + ((yy - c[:, 1]) / r[:, 1]) ** 2
    logits = 6 * (1 - d) + torch.randn(N, M, M, generator=g)
    return torch.sigmoid(logits)[:, None], boxes


MASKS, BOXES = _inputs()


def _check_binary(ours, tv_float):
    """Same pixels as torchvision's float paste > 0.5, except (on CPUs without FMA) within rounding of 0.5."""
    differ = ours != (tv_float > 0.5)
    assert not differ[(tv_float - 0.5).abs() > 1e-6].any()


def _tv_binary(masks, boxes):
    return tv_paste(masks, boxes, IMG)[:, 0] > 0.5


def _coco_encode(binary):
    return [mask_util.encode(np.asfortranarray(m)) for m in binary.to(torch.uint8).numpy()]


def _tv_rle(masks, boxes):
    return _coco_encode(_tv_binary(masks, boxes))


@pytest.mark.benchmark(group=f"paste_masks float: {GROUP}")
def test_paste_float_mrcnn_fast(bench):
    torch.testing.assert_close(ops.paste_masks_in_image(MASKS, BOXES, IMG), tv_paste(MASKS, BOXES, IMG), rtol=0,
                               atol=1e-6)
    bench(ops.paste_masks_in_image, MASKS, BOXES, IMG)


@pytest.mark.benchmark(group=f"paste_masks float: {GROUP}")
def test_paste_float_torchvision(bench):
    bench(tv_paste, MASKS, BOXES, IMG)


@pytest.mark.benchmark(group=f"paste_masks bool: {GROUP}")
def test_paste_bool_mrcnn_fast(bench):
    _check_binary(ops.paste_masks_binary(MASKS, BOXES, IMG), tv_paste(MASKS, BOXES, IMG)[:, 0])
    bench(ops.paste_masks_binary, MASKS, BOXES, IMG)


@pytest.mark.benchmark(group=f"paste_masks bool: {GROUP}")
def test_paste_bool_torchvision(bench):
    bench(_tv_binary, MASKS, BOXES)


@pytest.mark.benchmark(group=f"paste_masks rle: {GROUP}")
def test_paste_rle_mrcnn_fast(bench):
    ours = ops.paste_masks_rle(MASKS, BOXES, IMG)
    _check_binary(torch.from_numpy(mask_util.decode(ours)).permute(2, 0, 1).bool(), tv_paste(MASKS, BOXES, IMG)[:, 0])
    assert [r["counts"] for r in ours] == [r["counts"] for r in _coco_encode(ops.paste_masks_binary(MASKS, BOXES, IMG))]
    bench(ops.paste_masks_rle, MASKS, BOXES, IMG)


@pytest.mark.benchmark(group=f"paste_masks rle: {GROUP}")
def test_paste_rle_torchvision(bench):
    bench(_tv_rle, MASKS, BOXES)


BINARY = _tv_binary(MASKS, BOXES)


@pytest.mark.benchmark(group=f"rle_encode: {N}x{IMG[0]}x{IMG[1]}")
def test_rle_encode_mrcnn_fast(bench):
    assert [r["counts"] for r in ops.rle_encode(BINARY)] == [r["counts"] for r in _coco_encode(BINARY)]
    bench(ops.rle_encode, BINARY)


@pytest.mark.benchmark(group=f"rle_encode: {N}x{IMG[0]}x{IMG[1]}")
def test_rle_encode_torchvision_baseline_is_pycocotools(bench):
    bench(_coco_encode, BINARY)


# ---- aligned paste (a different function from torchvision's: see the module docstring) --------------------
def _grid_sample_aligned(masks, boxes, img):
    """Reference aligned paste (F.grid_sample, bilinear, zero padding, on the box-normalised grid): [N, H, W]."""
    h, w = img
    xs, ys = torch.arange(w) + 0.5, torch.arange(h) + 0.5
    out = []
    for m, (x1, y1, x2, y2) in zip(masks, boxes.tolist()):
        gx, gy = (xs - x1) / (x2 - x1) * 2 - 1, (ys - y1) / (y2 - y1) * 2 - 1
        grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), -1)[None]
        out.append(F.grid_sample(m[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0, 0])
    return torch.stack(out)


def _check_aligned(n=8):
    ours = ops.paste_masks_in_image(MASKS[:n], BOXES[:n], IMG, aligned=True)[:, 0]
    torch.testing.assert_close(ours, _grid_sample_aligned(MASKS[:n], BOXES[:n], IMG), rtol=0, atol=1e-5)
    return ours


@pytest.mark.benchmark(group=f"paste_masks aligned float (vs torchvision's paste): {GROUP}")
def test_paste_aligned_float_mrcnn_fast(bench):
    _check_aligned()
    bench(ops.paste_masks_in_image, MASKS, BOXES, IMG, aligned=True)


@pytest.mark.benchmark(group=f"paste_masks aligned float (vs torchvision's paste): {GROUP}")
def test_paste_aligned_float_torchvision(bench):
    bench(tv_paste, MASKS, BOXES, IMG)


@pytest.mark.benchmark(group=f"paste_masks aligned bool (vs torchvision's paste): {GROUP}")
def test_paste_aligned_bool_mrcnn_fast(bench):
    assert torch.equal(ops.paste_masks_binary(MASKS[:8], BOXES[:8], IMG, aligned=True), _check_aligned() > 0.5)
    bench(ops.paste_masks_binary, MASKS, BOXES, IMG, aligned=True)


@pytest.mark.benchmark(group=f"paste_masks aligned bool (vs torchvision's paste): {GROUP}")
def test_paste_aligned_bool_torchvision(bench):
    bench(_tv_binary, MASKS, BOXES)


@pytest.mark.benchmark(group=f"paste_masks aligned rle (vs torchvision's paste): {GROUP}")
def test_paste_aligned_rle_mrcnn_fast(bench):
    ours = ops.paste_masks_rle(MASKS, BOXES, IMG, aligned=True)
    expect = _coco_encode(ops.paste_masks_binary(MASKS, BOXES, IMG, aligned=True))
    assert [r["counts"] for r in ours] == [r["counts"] for r in expect]
    bench(ops.paste_masks_rle, MASKS, BOXES, IMG, aligned=True)


@pytest.mark.benchmark(group=f"paste_masks aligned rle (vs torchvision's paste): {GROUP}")
def test_paste_aligned_rle_torchvision(bench):
    bench(_tv_rle, MASKS, BOXES)
