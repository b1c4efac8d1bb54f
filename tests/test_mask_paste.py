import math
import platform

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste

from conftest import cuda_only
from mrcnn_fast import _lib, ops

H, W = 40, 52


# ---- float64 reference: plain loops over torchvision's formulas ------------------------------------
def _taps(o, n_in, n_out):
    """F.interpolate(bilinear, align_corners=False) source taps of output index o (torch's clamping)."""
    if n_in == n_out:
        return o, o, 1.0, 0.0
    s = max(n_in / n_out * (o + 0.5) - 0.5, 0.0)
    i0 = min(math.floor(s), n_in - 1)
    l1 = min(max(s - i0, 0.0), 1.0)
    return i0, i0 + (1 if i0 < n_in - 1 else 0), 1.0 - l1, l1


def ref_paste(masks, boxes, img_h, img_w, padding):
    """Tensor[N, 1, H, W] float64. The box expansion runs in the boxes' dtype (as torchvision's tensor ops)."""
    masks = masks.reshape(masks.shape[0], masks.shape[-2], masks.shape[-1]).double().numpy()
    bt = np.float32 if boxes.dtype == torch.float32 else np.float64
    bnp = boxes.numpy().astype(bt)
    out = np.zeros((len(masks), 1, img_h, img_w))
    mw = masks.shape[-1]
    scale = bt((mw + 2 * padding) / mw)
    for n in range(len(masks)):
        x1, y1, x2, y2 = bnp[n]
        wh, hh = (x2 - x1) * bt(0.5) * scale, (y2 - y1) * bt(0.5) * scale
        xc, yc = (x2 + x1) * bt(0.5), (y2 + y1) * bt(0.5)
        bx0, bx1, by0, by1 = int(xc - wh), int(xc + wh), int(yc - hh), int(yc + hh)  # int(): truncation
        w, h = max(bx1 - bx0 + 1, 1), max(by1 - by0 + 1, 1)
        pm = np.pad(masks[n], padding)
        for y in range(max(by0, 0), min(by1 + 1, img_h)):
            i0, i1, ly0, ly1 = _taps(y - by0, pm.shape[0], h)
            for x in range(max(bx0, 0), min(bx1 + 1, img_w)):
                j0, j1, lx0, lx1 = _taps(x - bx0, pm.shape[1], w)
                out[n, 0, y, x] = (ly0 * (lx0 * pm[i0, j0] + lx1 * pm[i0, j1])
                                   + ly1 * (lx0 * pm[i1, j0] + lx1 * pm[i1, j1]))
    return torch.from_numpy(out)


def rand_boxes(n, g, *, kind="mixed", dtype=torch.float32):
    """Boxes of an H x W image: normal, tiny (< 1 px), huge (larger than the image), partly outside."""
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([W + 10.0, H + 10.0]) - 5
    size = {"normal": 25.0, "tiny": 1.0, "huge": 300.0}
    if kind == "mixed":
        kinds = [["normal", "tiny", "huge"][i % 3] for i in range(n)]
    else:
        kinds = [kind] * n
    wh = torch.stack([torch.rand(2, generator=g, dtype=torch.float64) * size[k] for k in kinds])
    huge = torch.tensor([k == "huge" for k in kinds])
    xy[huge] -= wh[huge] / 2  # huge boxes straddle the image
    return torch.cat([xy, xy + wh], 1).to(dtype)


def rand_masks(n, m, g, dtype=torch.float32, mh=None):
    return torch.rand(n, 1, mh or m, m, generator=g, dtype=torch.float64).to(dtype)


def tv_accepts(boxes, m, padding):
    """torchvision raises a shape error when a box lies wholly outside the image: keep boxes it accepts."""
    keep = []
    for b in boxes:
        try:
            tv_paste(torch.zeros(1, 1, m, m), b[None].float(), (H, W), padding)
            keep.append(True)
        except RuntimeError:
            keep.append(False)
    return torch.tensor(keep, dtype=torch.bool)


def fma_cpu():
    """torch's CPU kernels use fused multiply-adds (so ours match them bit for bit)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " fma" in flags and " avx2" in flags and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


# ---- float paste ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,padding", [(28, 1), (14, 0), (7, 2), (33, 1)])
def test_paste_matches_reference(dtype, m, padding):
    g = torch.Generator().manual_seed(m * 10 + padding)
    masks, boxes = rand_masks(9, m, g, dtype), rand_boxes(9, g, dtype=dtype)
    got = ops.paste_masks_in_image(masks, boxes, (H, W), padding=padding)
    assert got.shape == (9, 1, H, W) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got.double(), ref_paste(masks, boxes, H, W, padding), rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["mixed", "tiny", "huge", "normal"])
@pytest.mark.parametrize("m,padding", [(28, 1), (20, 0), (28, 2), (9, 1)])
def test_paste_matches_torchvision(dtype, kind, m, padding):
    g = torch.Generator().manual_seed(sum(map(ord, kind)) + 7 * m + padding)
    masks, boxes = rand_masks(24, m, g, dtype), rand_boxes(24, g, kind=kind, dtype=dtype)
    keep = tv_accepts(boxes, m, padding)
    masks, boxes = masks[keep], boxes[keep]
    assert len(boxes) > 0
    ref = tv_paste(masks, boxes, (H, W), padding)
    got = ops.paste_masks_in_image(masks, boxes, (H, W), padding=padding)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, ref, rtol=0, atol=tol)
    if fma_cpu():  # same fused multiply-adds as torch's kernels: identical bits
        assert torch.equal(got, ref)


def test_paste_many_sizes_bitwise_torchvision():
    """Box sizes either side of torch's small-output kernel switch (h + w <= 128), non-square masks."""
    if not fma_cpu():
        pytest.skip("torch's CPU kernels do not use FMA here: only float rounding agreement is expected")
    g = torch.Generator().manual_seed(3)
    for side in [1, 5, 30, 60, 63, 64, 65, 66, 120, 200]:
        xy = torch.rand(6, 2, generator=g) * 30  # intersecting the image: torchvision accepts them
        wh = torch.rand(6, 2, generator=g) * 4 + side - 2
        boxes = torch.cat([xy, xy + wh], 1)
        masks = torch.rand(6, 1, 21, 28, generator=g)
        for dt in (torch.float32, torch.float64):
            ref = tv_paste(masks.to(dt), boxes.to(dt), (H, W), 1)
            assert torch.equal(ops.paste_masks_in_image(masks.to(dt), boxes.to(dt), (H, W)), ref), (side, dt)


def test_paste_3d_masks_and_nonsquare():
    g = torch.Generator().manual_seed(1)
    masks, boxes = rand_masks(6, 28, g, mh=17), rand_boxes(6, g, kind="normal")
    keep = tv_accepts(boxes, 28, 1)
    masks, boxes = masks[keep], boxes[keep]
    four = ops.paste_masks_in_image(masks, boxes, (H, W))
    three = ops.paste_masks_in_image(masks[:, 0], boxes, (H, W))
    assert torch.equal(four, three)
    torch.testing.assert_close(four, tv_paste(masks, boxes, (H, W), 1), rtol=0, atol=1e-6)


def test_paste_wholly_outside_is_zero():
    # torchvision raises a shape error for these; a zero mask is the natural result.
    boxes = torch.tensor([[10.0, -60, 40, -30], [10, H + 30, 40, H + 60], [-60, 10, -30, 40], [W + 30, 10, W + 60, 40],
                          [30.0, 30, 20, 20]])
    masks = torch.rand(len(boxes), 1, 28, 28) + 0.5
    got = ops.paste_masks_in_image(masks, boxes, (H, W))
    assert got.abs().sum() == 0
    assert not ops.paste_masks_binary(masks, boxes, (H, W)).any()
    torch.testing.assert_close(got.double(), ref_paste(masks, boxes, H, W, 1))


def test_paste_empty():
    masks, boxes = torch.zeros(0, 1, 28, 28), torch.zeros(0, 4)
    assert ops.paste_masks_in_image(masks, boxes, (H, W)).shape == (0, 1, H, W)
    assert ops.paste_masks_binary(masks, boxes, (H, W)).shape == (0, H, W)
    assert ops.paste_masks_rle(masks, boxes, (H, W)) == []
    assert ops.rle_encode(torch.zeros(0, H, W, dtype=torch.bool)) == []
    assert tv_paste(masks, boxes, (H, W)).shape == (0, 1, H, W)


def test_paste_image_smaller_than_boxes():
    g = torch.Generator().manual_seed(5)
    masks = rand_masks(4, 28, g)
    boxes = torch.tensor([[0.0, 0, 0.5, 0.5], [-3, -3, 2, 2], [0, 0, 1, 1], [-9, -9, 9, 9]])
    for shape in [(1, 1), (1, 7), (5, 1)]:
        torch.testing.assert_close(ops.paste_masks_in_image(masks, boxes, shape), tv_paste(masks, boxes, shape),
                                   rtol=0, atol=1e-6)


def test_paste_no_autograd():
    masks = torch.rand(2, 1, 28, 28, requires_grad=True)
    out = ops.paste_masks_in_image(masks, torch.tensor([[1.0, 2, 30, 30], [5, 5, 20, 20]]), (H, W))
    with pytest.raises(RuntimeError, match="autograd"):
        out.sum().backward()


# ---- bool paste -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.0, 0.9, -1.0, 1.0])
def test_binary_matches_torchvision(dtype, threshold):
    g = torch.Generator().manual_seed(int(threshold * 10) + 20)
    masks, boxes = rand_masks(30, 28, g, dtype), rand_boxes(30, g, dtype=dtype)
    keep = tv_accepts(boxes, 28, 1)
    masks, boxes = masks[keep], boxes[keep]
    ref_float = tv_paste(masks, boxes, (H, W))[:, 0]
    got = ops.paste_masks_binary(masks, boxes, (H, W), threshold)
    assert got.dtype == torch.bool and got.shape == ref_float.shape
    # Identical to our float image thresholded, and to torchvision's except (at most) within rounding of it.
    assert torch.equal(got, ops.paste_masks_in_image(masks, boxes, (H, W))[:, 0] > threshold)
    differ = got != (ref_float > threshold)
    assert not differ[(ref_float - threshold).abs() > 1e-6].any()
    if fma_cpu():
        assert not differ.any()
    if 0 <= threshold < 1:
        assert got.any()


# ---- RLE ------------------------------------------------------------------------------------------
def coco_encode(bool_masks):
    return mask_util.encode(np.asfortranarray(bool_masks.numpy().transpose(1, 2, 0).astype(np.uint8)))


@pytest.mark.parametrize("threshold,padding,m", [(0.5, 1, 28), (0.2, 0, 14), (0.8, 2, 28), (0.5, 1, 5), (-0.1, 1, 28),
                                                 (1.0, 1, 28)])
def test_rle_matches_pycocotools(threshold, padding, m):
    g = torch.Generator().manual_seed(m + padding)
    masks, boxes = rand_masks(40, m, g), rand_boxes(40, g)
    binary = ops.paste_masks_binary(masks, boxes, (H, W), threshold, padding)
    rles = ops.paste_masks_rle(masks, boxes, (H, W), threshold, padding)
    ref = coco_encode(binary)
    assert len(rles) == len(ref) == 40
    for r, c in zip(rles, ref):
        assert r["size"] == [H, W] and isinstance(r["counts"], bytes)
        assert r["counts"] == c["counts"]
    decoded = mask_util.decode(rles)  # [H, W, N]
    assert np.array_equal(decoded.transpose(2, 0, 1).astype(bool), binary.numpy())


def test_rle_large_image_against_torchvision_pipeline():
    g = torch.Generator().manual_seed(11)
    img = (120, 150)
    xy = torch.rand(12, 2, generator=g) * torch.tensor([140.0, 110.0])
    boxes = torch.cat([xy, xy + torch.rand(12, 2, generator=g) * 80 + 1], 1)
    masks = torch.rand(12, 1, 28, 28, generator=g)
    binary = tv_paste(masks, boxes, img)[:, 0] > 0.5
    ours = ops.paste_masks_rle(masks, boxes, img)
    assert np.array_equal(mask_util.decode(ours).transpose(2, 0, 1).astype(bool), binary.numpy())


def _rand_bool_masks(g):
    out = [torch.rand(H, W, generator=g) > 0.5, torch.zeros(H, W, dtype=torch.bool), torch.ones(H, W, dtype=torch.bool)]
    for y, x in [(0, 0), (H - 1, W - 1), (0, W - 1), (H - 1, 0), (7, 9)]:
        m = torch.zeros(H, W, dtype=torch.bool)
        m[y, x] = True
        out.append(m)
    blob = torch.zeros(H, W, dtype=torch.bool)
    blob[5:30, 3:17] = True
    blob[10:12, 8:40] = True
    out.append(blob)
    return torch.stack(out)


def test_rle_encode_matches_pycocotools():
    g = torch.Generator().manual_seed(2)
    masks = _rand_bool_masks(g)
    ours, ref = ops.rle_encode(masks), coco_encode(masks)
    assert [r["counts"] for r in ours] == [r["counts"] for r in ref]
    assert all(r["size"] == [H, W] for r in ours)
    u8 = masks.to(torch.uint8) * torch.randint(1, 255, masks.shape, generator=g, dtype=torch.uint8)
    assert [r["counts"] for r in ops.rle_encode(u8)] == [r["counts"] for r in ref]
    for shape in [(3, 1, 9), (3, 9, 1), (2, 1, 1)]:
        m = torch.rand(shape, generator=g) > 0.5
        assert [r["counts"] for r in ops.rle_encode(m)] == [r["counts"] for r in coco_encode(m)]


def test_rle_counts_string_matches_pycocotools():
    rng = np.random.default_rng(0)
    for n in [1, 2, 3, 4, 7, 50]:
        counts = rng.integers(0, 3000, n).tolist()
        counts[0] = int(rng.integers(0, 2)) * counts[0]
        if n > 1:
            counts[1:] = [max(c, 1) for c in counts[1:]]  # only the first run may be empty
        counts[-1] += 1
        h = sum(counts)
        ref = mask_util.frPyObjects({"size": [h, 1], "counts": counts}, h, 1)
        assert _lib._C.rle_counts_string(counts) == ref["counts"], counts
    big = [5, 1 << 20, 3, 1 << 28, 1, 17]  # multi-group values and large negative deltas
    ref = mask_util.frPyObjects({"size": [sum(big), 1], "counts": big}, sum(big), 1)
    assert _lib._C.rle_counts_string(big) == ref["counts"]


def _window_crops(binary, windows):
    """binary's pixels inside each window (y0, x0, h, w, offset), column-major and packed, checking that the
    offsets are the packed positions and that each window holds every set pixel of its mask."""
    parts = []
    for n, (y0, x0, h, w, off) in enumerate(windows.tolist()):
        assert off == sum(p.numel() for p in parts)
        outside = binary[n].clone()
        outside[y0:y0 + h, x0:x0 + w] = False
        assert not outside.any()  # the window holds every set pixel
        parts.append(binary[n, y0:y0 + h, x0:x0 + w].t().reshape(-1))  # column-major
    return torch.cat(parts)


def test_rle_device_path_host_half():
    """The host half of the CUDA RLE path (windows + column-major crops -> strings), driven from CPU pastes."""
    g = torch.Generator().manual_seed(4)
    masks, boxes = rand_masks(15, 28, g), rand_boxes(15, g)
    boxes[3] = torch.tensor([10.0, -60, 40, -30])  # wholly outside: an empty window
    binary = ops.paste_masks_binary(masks, boxes, (H, W))
    windows = torch.empty(15, 5, dtype=torch.int64)
    total = _lib._C.paste_masks_windows(_lib.dl(boxes), 28, 28, 1, False, H, W, _lib.dl(windows))
    crops = _window_crops(binary, windows)
    assert crops.numel() == total
    assert not binary[3].any() and windows[3, 2:4].tolist() == [0, 0]
    strs = _lib._C.rle_from_crops(_lib.dl(crops), _lib.dl(windows), H, W, False)
    assert strs == [r["counts"] for r in ops.paste_masks_rle(masks, boxes, (H, W))]
    # Negative thresholds: the pixels outside the windows are set.
    neg = ops.paste_masks_binary(masks, boxes, (H, W), -0.5)
    crops_neg = torch.cat([neg[n, y0:y0 + h, x0:x0 + w].t().reshape(-1)
                           for n, (y0, x0, h, w, _) in enumerate(windows.tolist())])
    strs = _lib._C.rle_from_crops(_lib.dl(crops_neg), _lib.dl(windows), H, W, True)
    assert strs == [r["counts"] for r in coco_encode(neg)]
    with pytest.raises(ValueError, match="windows"):
        bad = windows.clone()
        bad[0, 2] = H + 1
        _lib._C.rle_from_crops(_lib.dl(crops), _lib.dl(bad), H, W, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_kernel_loop_on_cpu(dtype):
    """The CUDA kernel's loop (window indexing, per-pixel math) run sequentially on the CPU."""
    g = torch.Generator().manual_seed(6)
    masks, boxes = rand_masks(12, 28, g, dtype)[:, 0], rand_boxes(12, g)
    boxes[2] = torch.tensor([W + 30.0, 10, W + 60, 40])
    C, dl = _lib._C, _lib.dl
    check = torch.equal if fma_cpu() else (lambda a, b: torch.allclose(a.double(), b.double(), atol=1e-6))
    img = torch.empty(12, H, W, dtype=dtype)
    C.paste_masks_pixelwise(dl(masks), dl(boxes), None, dl(img), 1, False, 0.5, False, H, W)
    assert check(img, ops.paste_masks_in_image(masks, boxes, (H, W))[:, 0])
    binary = torch.empty(12, H, W, dtype=torch.bool)
    C.paste_masks_pixelwise(dl(masks), dl(boxes), None, dl(binary), 1, False, 0.5, True, H, W)
    ref = ops.paste_masks_binary(masks, boxes, (H, W))
    assert check(binary, ref) if fma_cpu() else (binary != ref).float().mean() < 1e-3
    windows = torch.empty(12, 5, dtype=torch.int64)
    total = C.paste_masks_windows(dl(boxes), 28, 28, 1, False, H, W, dl(windows))
    crops = torch.empty(total, dtype=torch.bool)
    C.paste_masks_pixelwise(dl(masks), dl(boxes), dl(windows), dl(crops), 1, False, 0.5, True, H, W)
    expect = torch.cat([binary[n, y0:y0 + h, x0:x0 + w].t().reshape(-1)
                        for n, (y0, x0, h, w, _) in enumerate(windows.tolist())])
    assert torch.equal(crops, expect)


# ---- custom ops ------------------------------------------------------------------------------------
def test_opcheck():
    g = torch.Generator().manual_seed(0)
    masks, boxes = rand_masks(5, 28, g)[:, 0], rand_boxes(5, g, kind="normal")
    torch.library.opcheck(torch.ops.mrcnn_fast.paste_masks.default, (masks, boxes, H, W, 1))
    torch.library.opcheck(torch.ops.mrcnn_fast.paste_masks_binary.default, (masks, boxes, H, W, 0.5, 1))


def test_torch_compile_smoke():
    class Post(torch.nn.Module):
        def forward(self, masks, boxes):
            probs = ops.paste_masks_in_image(masks.sigmoid(), boxes, (H, W))
            return probs, ops.paste_masks_binary(masks.sigmoid(), boxes, (H, W), 0.5)

    g = torch.Generator().manual_seed(0)
    masks, boxes = torch.randn(4, 1, 28, 28, generator=g), rand_boxes(4, g, kind="normal")
    model = Post()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(masks, boxes), model(masks, boxes)):
        assert torch.equal(a, b)


# ---- bad input ------------------------------------------------------------------------------------
def test_bad_input():
    masks, boxes = torch.rand(3, 1, 28, 28), torch.tensor([[1.0, 2, 10, 12]] * 3)
    fns = [ops.paste_masks_in_image, ops.paste_masks_binary, ops.paste_masks_rle]
    for fn in fns:
        with pytest.raises(ValueError, match="masks"):
            fn(torch.rand(3, 2, 28, 28), boxes, (H, W))
        with pytest.raises(ValueError, match="masks"):
            fn(torch.rand(3, 28), boxes, (H, W))
        with pytest.raises(ValueError, match="masks"):
            fn(torch.rand(3, 1, 0, 0), boxes, (H, W))
        with pytest.raises(TypeError, match="masks"):
            fn(masks.long(), boxes, (H, W))
        with pytest.raises(TypeError, match="masks"):
            fn(masks.half(), boxes, (H, W))
        with pytest.raises(TypeError, match="masks"):
            fn(masks.numpy(), boxes, (H, W))
        with pytest.raises(TypeError, match="boxes"):
            fn(masks, boxes.long(), (H, W))
        with pytest.raises(ValueError, match="boxes"):
            fn(masks, boxes[:, :3], (H, W))
        with pytest.raises(ValueError, match="same length"):
            fn(masks, boxes[:2], (H, W))
        for v in (float("nan"), float("inf"), -float("inf")):
            bad = boxes.clone()
            bad[1, 2] = v
            with pytest.raises(ValueError, match="boxes"):
                fn(masks, bad, (H, W))
        for shape in [(0, W), (H, -1), (0, 0)]:
            with pytest.raises(ValueError, match="img_shape"):
                fn(masks, boxes, shape)
        with pytest.raises(TypeError, match="img_shape"):
            fn(masks, boxes, "big")
        with pytest.raises(ValueError, match="padding"):
            fn(masks, boxes, (H, W), padding=-1)
    with pytest.raises(TypeError, match="threshold"):
        ops.paste_masks_binary(masks, boxes, (H, W), "high")
    with pytest.raises(TypeError, match="masks"):
        ops.rle_encode(torch.rand(2, H, W))
    with pytest.raises(ValueError, match="masks"):
        ops.rle_encode(torch.zeros(H, W, dtype=torch.bool))
    # The core checks too (what a caller bypassing the Python wrapper gets).
    with pytest.raises(ValueError, match="boxes"):
        bad = boxes.clone()
        bad[0, 0] = float("nan")
        torch.ops.mrcnn_fast.paste_masks(masks[:, 0], bad, H, W, 1)
    with pytest.raises(ValueError, match="same length"):
        torch.ops.mrcnn_fast.paste_masks(masks[:, 0], boxes[:2], H, W, 1)


# ---- aligned paste (detectron2's convention) -------------------------------------------------------
def ref_aligned(masks, boxes, img_h, img_w):
    """Tensor[N, H, W] float64: F.grid_sample (bilinear, zero padding, align_corners=False) of each mask on the
    image's pixel centres normalised to its box; degenerate boxes paste nothing."""
    m = masks.reshape(masks.shape[0], masks.shape[-2], masks.shape[-1]).double()
    out = torch.zeros(len(m), img_h, img_w, dtype=torch.float64)
    xs = torch.arange(img_w, dtype=torch.float64) + 0.5
    ys = torch.arange(img_h, dtype=torch.float64) + 0.5
    for n, (x1, y1, x2, y2) in enumerate(boxes.double().tolist()):
        if not (x2 > x1 and y2 > y1):
            continue
        gx = (xs - x1) / (x2 - x1) * 2 - 1
        gy = (ys - y1) / (y2 - y1) * 2 - 1
        grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), -1)[None]  # [1, H, W, (x, y)]
        out[n] = F.grid_sample(m[n][None, None], grid, mode="bilinear", padding_mode="zeros",
                               align_corners=False)[0, 0]
    return out


def aligned_boxes(n, g, dtype=torch.float32):
    """rand_boxes (normal, tiny, huge, partly and wholly outside) plus degenerate and sub-pixel ones."""
    b = rand_boxes(n, g, dtype=torch.float64)
    b[0] = torch.tensor([10.0, 12, 10, 30])      # zero width
    b[1] = torch.tensor([10.0, 12, 20, 11])      # negative height
    b[2] = torch.tensor([5.4, 7.4, 5.7, 7.6])    # 0.3 x 0.2 px around the centre of pixel (7, 5)
    b[3] = torch.tensor([10.0, -60, 40, -30])    # wholly above the image
    b[4] = torch.tensor([W + 0.7, 10, W + 9, 20])  # right of the image: only the bilinear tail may reach in
    b[5] = torch.tensor([10.0, 10, 20, 20])      # integer box: window edges on exact ties
    return b.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mh,mw", [(28, 28), (14, 33), (7, 5), (1, 1)])
def test_aligned_matches_grid_sample(dtype, mh, mw):
    g = torch.Generator().manual_seed(100 * mh + mw)
    masks, boxes = rand_masks(30, mw, g, dtype, mh=mh), aligned_boxes(30, g, dtype)
    got = ops.paste_masks_in_image(masks, boxes, (H, W), aligned=True)
    assert got.shape == (30, 1, H, W) and got.dtype == dtype
    ref = ref_aligned(masks, boxes, H, W)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got[:, 0].double(), ref, rtol=0, atol=tol)
    assert not got[:2].any() and not got[3].any()  # degenerate and outside boxes
    assert torch.nonzero(got[2, 0]).tolist() == [[7, 5]]  # a sub-pixel box paints the pixel whose centre it holds
    # float32 boxes and float64 masks (and the reverse): the coordinates are float64 either way
    other = torch.float64 if dtype == torch.float32 else torch.float32
    torch.testing.assert_close(ops.paste_masks_in_image(masks, boxes.to(other), (H, W), aligned=True)[:, 0].double(),
                               ref_aligned(masks, boxes.to(other), H, W), rtol=0, atol=tol)
    # it is a different function from torchvision's convention
    assert (got - ops.paste_masks_in_image(masks, boxes, (H, W))).abs().max() > 0.1


def test_aligned_window_is_exact():
    """With all-ones masks a pixel is non-zero exactly where -1 < u < Mw and -1 < v < Mh (float64 formula)."""
    g = torch.Generator().manual_seed(21)
    boxes = aligned_boxes(40, g, torch.float64)
    boxes[6] = torch.tensor([0.0, 0, W, H])  # the whole image
    masks = torch.ones(40, 9, 12, dtype=torch.float64)
    nz = ops.paste_masks_in_image(masks, boxes, (H, W), aligned=True)[:, 0] > 0
    xs, ys = torch.arange(W, dtype=torch.float64) + 0.5, torch.arange(H, dtype=torch.float64) + 0.5
    windows = torch.empty(40, 5, dtype=torch.int64)
    _lib._C.paste_masks_windows(_lib.dl(boxes), 9, 12, 1, True, H, W, _lib.dl(windows))
    for n, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        if x2 > x1 and y2 > y1:
            u = (xs - x1) * 12 / (x2 - x1) - 0.5
            v = (ys - y1) * 9 / (y2 - y1) - 0.5
            expect = ((v > -1) & (v < 9))[:, None] & ((u > -1) & (u < 12))[None, :]
        else:
            expect = torch.zeros(H, W, dtype=torch.bool)
        assert torch.equal(nz[n], expect), n
        y0, x0, h, w, _ = windows[n].tolist()
        in_window = torch.zeros(H, W, dtype=torch.bool)
        in_window[y0:y0 + h, x0:x0 + w] = True
        assert torch.equal(in_window, expect), n  # the RLE path's windows are the same
    assert nz[6].all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threshold", [0.5, 0.2, 0.0, 1.0, -0.5])
def test_aligned_binary_and_rle(dtype, threshold):
    g = torch.Generator().manual_seed(int(threshold * 10) + 40)
    masks, boxes = rand_masks(30, 28, g, dtype, mh=20), aligned_boxes(30, g, dtype)
    probs = ops.paste_masks_in_image(masks, boxes, (H, W), aligned=True)[:, 0]
    binary = ops.paste_masks_binary(masks, boxes, (H, W), threshold, aligned=True)
    assert binary.dtype == torch.bool and torch.equal(binary, probs > threshold)
    if 0 <= threshold < 1:
        assert binary.any()
    rles = ops.paste_masks_rle(masks, boxes, (H, W), threshold, aligned=True)
    assert [r["counts"] for r in rles] == [r["counts"] for r in coco_encode(binary)]
    assert all(r["size"] == [H, W] for r in rles)
    assert np.array_equal(mask_util.decode(rles).transpose(2, 0, 1).astype(bool), binary.numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_aligned_cuda_kernel_loop_on_cpu(dtype):
    """The CUDA kernel's loop with aligned plans, run sequentially on the CPU, against the CPU kernels."""
    g = torch.Generator().manual_seed(23)
    masks, boxes = rand_masks(20, 28, g, dtype, mh=13)[:, 0], aligned_boxes(20, g)
    C, dl = _lib._C, _lib.dl
    check = torch.equal if fma_cpu() else (lambda a, b: torch.allclose(a.double(), b.double(), atol=1e-6))
    img = torch.empty(20, H, W, dtype=dtype)
    C.paste_masks_pixelwise(dl(masks), dl(boxes), None, dl(img), 1, True, 0.5, False, H, W)
    assert check(img, ops.paste_masks_in_image(masks, boxes, (H, W), aligned=True)[:, 0])
    assert not check(img, ops.paste_masks_in_image(masks, boxes, (H, W))[:, 0])
    binary = torch.empty(20, H, W, dtype=torch.bool)
    C.paste_masks_pixelwise(dl(masks), dl(boxes), None, dl(binary), 1, True, 0.5, True, H, W)
    ref = ops.paste_masks_binary(masks, boxes, (H, W), aligned=True)
    assert check(binary, ref) if fma_cpu() else (binary != ref).float().mean() < 1e-3
    # the device RLE path: aligned windows, column-major crops, host run-length encoding
    windows = torch.empty(20, 5, dtype=torch.int64)
    total = C.paste_masks_windows(dl(boxes), 13, 28, 1, True, H, W, dl(windows))
    crops = torch.empty(total, dtype=torch.bool)
    C.paste_masks_pixelwise(dl(masks), dl(boxes), dl(windows), dl(crops), 1, True, 0.5, True, H, W)
    assert torch.equal(crops, _window_crops(binary, windows))
    assert windows[0, 2:4].tolist() == [0, 0] and windows[3, 2:4].tolist() == [0, 0]
    strs = C.rle_from_crops(dl(crops), dl(windows), H, W, False)
    assert strs == [r["counts"] for r in ops.paste_masks_rle(masks, boxes, (H, W), aligned=True)]


def _shapes(g, n, img=(96, 112)):
    """n synthetic binary objects (ellipses, rectangles, rings, L shapes) of 8..60 px, one per image."""
    h, w = img
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    out = []
    for i in range(n):
        sy, sx = (torch.rand(2, generator=g) * 52 + 8).tolist()
        cy, cx = (torch.rand(2, generator=g) * torch.tensor([h - sy, w - sx]) + torch.tensor([sy, sx]) / 2).tolist()
        dy, dx = (yy - cy) / (sy / 2), (xx - cx) / (sx / 2)
        kind = i % 4
        if kind == 0:
            m = dy ** 2 + dx ** 2 <= 1
        elif kind == 1:
            m = (dy.abs() <= 1) & (dx.abs() <= 1)
        elif kind == 2:
            r = dy ** 2 + dx ** 2
            m = (r <= 1) & (r >= 0.3)
        else:
            m = (dy.abs() <= 1) & (dx.abs() <= 1) & ((dy > 0.2) | (dx < -0.2))
        out.append(m)
    return torch.stack(out)


def _iou(a, b):
    return ((a & b).sum((1, 2)).double() / (a | b).sum((1, 2)).double())


def test_aligned_roundtrip_oracle():
    """RoIAlign(aligned=True) to 28 x 28 in the exact box, pasted back: the aligned paste recovers the object;
    torchvision's convention (misaligned by up to ~1 px) loses much more on the same input."""
    g = torch.Generator().manual_seed(31)
    objs = _shapes(g, 24)
    boxes = []
    for m in objs:
        ys, xs = torch.nonzero(m, as_tuple=True)
        boxes.append([xs.min().item(), ys.min().item(), xs.max().item() + 1.0, ys.max().item() + 1.0])
    boxes = torch.tensor(boxes)
    assert ((boxes[:, 2:] - boxes[:, :2]) >= 8).all()
    rois = torch.cat([torch.arange(len(boxes), dtype=torch.float32)[:, None], boxes], 1)
    small = ops.roi_align(objs[:, None].float(), rois, (28, 28), 1.0, 0, True)
    img = tuple(objs.shape[-2:])
    aligned = ops.paste_masks_binary(small, boxes, img, 0.5, aligned=True)
    tv = ops.paste_masks_binary(small, boxes, img, 0.5)
    iou_a, iou_tv = _iou(aligned, objs), _iou(tv, objs)
    assert iou_a.min() >= 0.95, iou_a
    assert iou_a.mean() > iou_tv.mean() + 0.03 and iou_a.min() > iou_tv.min() + 0.05, (iou_a, iou_tv)
    assert (iou_a >= iou_tv).float().mean() >= 0.9


def test_aligned_empty_and_errors():
    masks, boxes = torch.rand(3, 1, 28, 28), torch.tensor([[1.0, 2, 10, 12]] * 3)
    assert ops.paste_masks_in_image(masks[:0], boxes[:0], (H, W), aligned=True).shape == (0, 1, H, W)
    assert ops.paste_masks_binary(masks[:0], boxes[:0], (H, W), aligned=True).shape == (0, H, W)
    assert ops.paste_masks_rle(masks[:0], boxes[:0], (H, W), aligned=True) == []
    for fn in [ops.paste_masks_in_image, ops.paste_masks_binary, ops.paste_masks_rle]:
        for bad_flag in (1, "yes", None):
            with pytest.raises(TypeError, match="aligned"):
                fn(masks, boxes, (H, W), aligned=bad_flag)
        with pytest.raises(ValueError, match="padding"):
            fn(masks, boxes, (H, W), padding=2, aligned=True)
        for v in (float("nan"), float("inf")):
            bad = boxes.clone()
            bad[2, 1] = v
            with pytest.raises(ValueError, match="boxes"):
                fn(masks, bad, (H, W), aligned=True)
        with pytest.raises(ValueError, match="same length"):
            fn(masks, boxes[:2], (H, W), aligned=True)
        with pytest.raises(ValueError, match="img_shape"):
            fn(masks, boxes, (0, W), aligned=True)
    bad = boxes.clone()
    bad[0, 3] = float("nan")
    with pytest.raises(ValueError, match="boxes"):  # the core checks without the Python wrapper
        torch.ops.mrcnn_fast.paste_masks(masks[:, 0], bad, H, W, 1, True)
    with pytest.raises(ValueError, match="boxes"):
        torch.ops.mrcnn_fast.paste_masks_binary(masks[:, 0], bad, H, W, 0.5, 1, True)


def test_aligned_opcheck_and_compile():
    g = torch.Generator().manual_seed(0)
    masks, boxes = rand_masks(5, 28, g, mh=14)[:, 0], rand_boxes(5, g, kind="normal")
    torch.library.opcheck(torch.ops.mrcnn_fast.paste_masks.default, (masks, boxes, H, W, 1, True))
    torch.library.opcheck(torch.ops.mrcnn_fast.paste_masks_binary.default, (masks, boxes, H, W, 0.5, 1, True))

    class Post(torch.nn.Module):
        def forward(self, masks, boxes):
            probs = ops.paste_masks_in_image(masks.sigmoid(), boxes, (H, W), aligned=True)
            return probs, ops.paste_masks_binary(masks.sigmoid(), boxes, (H, W), 0.5, aligned=True)

    model = Post()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(masks, boxes), model(masks, boxes)):
        assert torch.equal(a, b)


# ---- CUDA ------------------------------------------------------------------------------------------
@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_cuda_matches_cpu(dtype):
    g = torch.Generator().manual_seed(9)
    masks, boxes = rand_masks(64, 28, g), rand_boxes(64, g)
    boxes[5] = torch.tensor([10.0, -60, 40, -30])
    cpu_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    mq = masks.to(dtype)  # the masks as the device sees them
    ref = ops.paste_masks_in_image(mq.to(cpu_dtype), boxes, (H, W))
    got = ops.paste_masks_in_image(mq.cuda(), boxes.cuda(), (H, W))
    assert got.device.type == "cuda" and got.dtype == dtype
    # Same fused arithmetic in float32 (float64) on both sides, then one rounding to the masks' dtype.
    assert torch.equal(got.cpu(), ref.to(dtype))
    for thr in (0.5, 0.3):
        gb = ops.paste_masks_binary(mq.cuda(), boxes.cuda(), (H, W), thr)
        assert gb.device.type == "cuda"
        assert torch.equal(gb.cpu(), ref[:, 0].to(dtype) > thr)
        rle = ops.paste_masks_rle(mq.cuda(), boxes.cuda(), (H, W), thr)
        assert [r["counts"] for r in rle] == [r["counts"] for r in coco_encode(gb.cpu())]


@cuda_only
def test_cuda_torchvision_close_and_errors():
    g = torch.Generator().manual_seed(10)
    masks, boxes = rand_masks(32, 28, g), rand_boxes(32, g, kind="normal")
    keep = tv_accepts(boxes, 28, 1)
    masks, boxes = masks[keep].cuda(), boxes[keep].cuda()
    torch.testing.assert_close(ops.paste_masks_in_image(masks, boxes, (H, W)), tv_paste(masks, boxes, (H, W)),
                               rtol=0, atol=1e-5)
    bad = boxes.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="boxes"):
        ops.paste_masks_in_image(masks, bad, (H, W))
    with pytest.raises(ValueError, match="same device"):
        ops.paste_masks_in_image(masks, boxes.cpu(), (H, W))
    assert ops.paste_masks_in_image(masks[:0], boxes[:0], (H, W)).shape == (0, 1, H, W)
    assert ops.paste_masks_rle(masks[:0], boxes[:0], (H, W)) == []


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_cuda_aligned_matches_cpu(dtype):
    g = torch.Generator().manual_seed(19)
    masks, boxes = rand_masks(64, 28, g, mh=21), aligned_boxes(64, g)
    cpu_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    mq = masks.to(dtype)
    ref = ops.paste_masks_in_image(mq.to(cpu_dtype), boxes, (H, W), aligned=True)
    got = ops.paste_masks_in_image(mq.cuda(), boxes.cuda(), (H, W), aligned=True)
    assert got.device.type == "cuda" and got.dtype == dtype
    # same float64 coordinates, same fused blend in float32 (float64), then one rounding to the masks' dtype
    assert torch.equal(got.cpu(), ref.to(dtype))
    tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-6, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(got[:, 0].cpu().double(), ref_aligned(mq, boxes, H, W), rtol=0, atol=tol)
    for thr in (0.5, 0.3):
        gb = ops.paste_masks_binary(mq.cuda(), boxes.cuda(), (H, W), thr, aligned=True)
        assert torch.equal(gb.cpu(), ref[:, 0].to(dtype) > thr)
        rle = ops.paste_masks_rle(mq.cuda(), boxes.cuda(), (H, W), thr, aligned=True)
        assert [r["counts"] for r in rle] == [r["counts"] for r in coco_encode(gb.cpu())]
