import math

import pytest
import torch
import torchvision

import mrcnn_fast
from conftest import cuda_only
from mrcnn_fast import ops

# ---- float64 reference (plain loops, torchvision's rules) -------------------------------------------


def ref_bilinear(f, y, x):
    """f: Tensor[C, H, W] float64; returns Tensor[C] or None for a sample off the map."""
    _, H, W = f.shape
    if y < -1.0 or y > H or x < -1.0 or x > W:
        return None
    y, x = max(y, 0.0), max(x, 0.0)
    yl, xl = int(y), int(x)
    if yl >= H - 1:
        yl = yh = H - 1
        y = float(yl)
    else:
        yh = yl + 1
    if xl >= W - 1:
        xl = xh = W - 1
        x = float(xl)
    else:
        xh = xl + 1
    ly, lx = y - yl, x - xl
    hy, hx = 1.0 - ly, 1.0 - lx
    return hy * hx * f[:, yl, xl] + hy * lx * f[:, yl, xh] + ly * hx * f[:, yh, xl] + ly * lx * f[:, yh, xh]


def round_half_away(v):
    return math.floor(v + 0.5) if v >= 0 else -math.floor(-v + 0.5)


def ref_roi_align(x, rois, oh, ow, scale, sr, aligned, mode="avg", quantize=False):
    """x: Tensor[N, C, H, W]; rois: Tensor[K, 5]. Returns Tensor[K, C, oh, ow] float64."""
    x = x.double()
    K, C = rois.shape[0], x.shape[1]
    out = torch.zeros(K, C, oh, ow, dtype=torch.float64)
    for k in range(K):
        n, x1, y1, x2, y2 = (float(v) for v in rois[k])
        f = x[int(n)]
        if quantize:
            sx, sy = round_half_away(x1 * scale), round_half_away(y1 * scale)
            rw = max(round_half_away(x2 * scale) - sx, 1.0)
            rh = max(round_half_away(y2 * scale) - sy, 1.0)
        else:
            off = 0.5 if aligned else 0.0
            sx, sy = x1 * scale - off, y1 * scale - off
            rw, rh = x2 * scale - off - sx, y2 * scale - off - sy
            if not aligned:
                rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / oh, rw / ow
        gh = sr if sr > 0 else max(math.ceil(bh), 0)
        gw = sr if sr > 0 else max(math.ceil(bw), 0)
        count = max(gh * gw, 1)
        for ph in range(oh):
            for pw in range(ow):
                vals, off_map = [], False
                for iy in range(gh):
                    yy = sy + ph * bh + (iy + 0.5) * bh / gh
                    for ix in range(gw):
                        xx = sx + pw * bw + (ix + 0.5) * bw / gw
                        v = ref_bilinear(f, yy, xx)
                        if v is None:
                            off_map = True
                        else:
                            vals.append(v)
                if mode == "avg":
                    if vals:
                        out[k, :, ph, pw] = torch.stack(vals).sum(0) / count
                elif vals:
                    best = torch.stack(vals).max(0).values
                    out[k, :, ph, pw] = best.clamp(min=0) if off_map else best
    return out


def ref_levels(boxes, k_min, k_max, k0=4, s0=224.0):
    lv = []
    for x1, y1, x2, y2 in boxes.double().tolist():
        area = (x2 - x1) * (y2 - y1)
        k = math.floor(k0 + math.log2(math.sqrt(area) / s0) + 1e-6) if area > 0 else k_min
        lv.append(min(max(k, k_min), k_max) - k_min)
    return torch.tensor(lv, dtype=torch.int64)


# ---- inputs -------------------------------------------------------------------------------------------


def make_rois(g, n_images, K, size, *, dtype=torch.float64, outside=True):
    """Tensor[K, 5]: a mix of ordinary, tiny (< 1 px), huge, partly and wholly outside boxes."""
    H, W = size
    xy = torch.rand(K, 2, generator=g, dtype=torch.float64) * torch.tensor([W, H]) * 1.2 - 0.1 * torch.tensor([W, H])
    wh = torch.rand(K, 2, generator=g, dtype=torch.float64) * torch.tensor([W, H]) * 0.6 + 0.3
    boxes = torch.cat([xy, xy + wh], 1)
    if K >= 6 and outside:
        boxes[0] = torch.tensor([W + 5.0, H + 3.0, W + 20.0, H + 9.0])  # wholly outside
        boxes[1] = torch.tensor([-8.0, -6.0, 3.0, 2.5])                  # partly outside
        boxes[2] = torch.tensor([2.2, 3.1, 2.6, 3.3])                    # tiny
        boxes[3] = torch.tensor([-3.0 * W, -2.0 * H, 4.0 * W, 3.0 * H])  # huge
        boxes[4] = torch.tensor([1.0, 1.0, 1.0, 1.0])                    # empty
        boxes[5] = torch.tensor([5.0, 4.0, 2.0, 1.0])                    # inverted
    idx = torch.randint(0, n_images, (K, 1), generator=g).double()
    return torch.cat([idx, boxes], 1).to(dtype)


def feats(g, shape, dtype=torch.float64):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def roi_warp_kind(t, rois, output_size, scale, kind):
    """ops.roi_warp with 2 samples per bin side; kind "warp" (average) or "warp_max"."""
    return ops.roi_warp(t, rois, output_size, scale, 2, mode="max" if kind == "warp_max" else "avg")


# ---- forward correctness --------------------------------------------------------------------------------


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sr", [-1, 2])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_matches_reference(aligned, sr, mode):
    g = torch.Generator().manual_seed(1)
    x = feats(g, (2, 3, 9, 11))
    rois = make_rois(g, 2, 10, (9, 11))
    got = ops.roi_align(x, rois, (3, 4), 0.75, sr, aligned, mode=mode)
    want = ref_roi_align(x, rois, 3, 4, 0.75, sr, aligned, mode)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got32 = ops.roi_align(x.float(), rois.float(), (3, 4), 0.75, 2, aligned, mode=mode)
    want32 = ref_roi_align(x.float(), rois.float(), 3, 4, 0.75, 2, aligned, mode)
    torch.testing.assert_close(got32.double(), want32, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sr", [-1, 2])
def test_roi_warp_matches_reference(sr):
    g = torch.Generator().manual_seed(2)
    x = feats(g, (2, 2, 10, 8))
    rois = make_rois(g, 2, 9, (20, 16))
    got = ops.roi_warp(x, rois, 3, 0.5, sr)
    torch.testing.assert_close(got, ref_roi_align(x, rois, 3, 3, 0.5, sr, False, quantize=True), rtol=1e-10, atol=1e-12)
    # Rounding changes the result: it is not RoIAlign.
    assert not torch.allclose(got, ops.roi_align(x, rois, 3, 0.5, sr, False))
    got_max = ops.roi_warp(x, rois, 3, 0.5, sr, mode="max")
    torch.testing.assert_close(got_max, ref_roi_align(x, rois, 3, 3, 0.5, sr, False, "max", quantize=True),
                               rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got_max, got)
    assert not torch.allclose(got_max, ops.roi_align(x, rois, 3, 0.5, sr, False, mode="max"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [False, True])
def test_torchvision_parity(device, dtype, aligned):
    g = torch.Generator().manual_seed(3)
    for trial, (N, C, H, W, oh, ow, scale, sr) in enumerate([
        (2, 5, 17, 23, 7, 7, 0.5, 2), (1, 3, 8, 30, 2, 5, 1.0, -1), (3, 4, 25, 12, 5, 3, 0.25, 3),
        (2, 2, 6, 6, 4, 4, 2.0, -1), (1, 1, 1, 7, 3, 3, 1.0, 0),
    ]):
        x = feats(g, (N, C, H, W), dtype).to(device)
        rois = make_rois(g, N, 13, (int(H / scale), int(W / scale)), dtype=dtype).to(device)
        got = ops.roi_align(x, rois, (oh, ow), scale, sr, aligned)
        want = torchvision.ops.roi_align(x, rois, (oh, ow), scale, sr, aligned)
        torch.testing.assert_close(got, want, msg=f"case {trial}")


def test_huge_adaptive_boxes_match_torchvision():
    # Adaptive grids of ~100 samples per bin and axis, most of them off the map.
    g = torch.Generator().manual_seed(4)
    x = feats(g, (1, 2, 12, 10))
    rois = torch.tensor([[0, -300.0, -250.0, 400.0, 350.0], [0, -1000.0, 4.0, 1000.0, 6.0], [0, 3.0, -900.0, 5.0, 2.0]],
                        dtype=torch.float64)
    for aligned in (False, True):
        got = ops.roi_align(x, rois, 3, 1.0, -1, aligned)
        torch.testing.assert_close(got, torchvision.ops.roi_align(x, rois, 3, 1.0, -1, aligned), rtol=1e-10, atol=1e-12)


def test_list_of_boxes_form(device):
    g = torch.Generator().manual_seed(5)
    x = feats(g, (3, 4, 10, 12), torch.float32).to(device)
    boxes = [make_rois(g, 1, n, (20, 24), dtype=torch.float32)[:, 1:].to(device) for n in (4, 0, 6)]
    got = ops.roi_align(x, boxes, 3, 0.5, 2, True)
    torch.testing.assert_close(got, torchvision.ops.roi_align(x, boxes, 3, 0.5, 2, True))
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i), device=device), b], 1) for i, b in enumerate(boxes)])
    assert torch.equal(got, ops.roi_align(x, rois, 3, 0.5, 2, True))


def test_empty_rois(device):
    x = torch.randn(2, 3, 5, 5, device=device, requires_grad=True)
    for boxes in (torch.zeros(0, 5, device=device), [torch.zeros(0, 4, device=device)] * 2, []):
        for mode in ("avg", "max"):
            out = ops.roi_align(x, boxes, (2, 3), 1.0, 2, mode=mode)
            assert out.shape == (0, 3, 2, 3)
            out.sum().backward()
            assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))
            x.grad = None
    out = ops.multilevel_roi_align([x, x[:, :, :3, :3]], torch.zeros(0, 5, device=device), 2, [1.0, 0.5])
    assert out.shape == (0, 3, 2, 2)
    # A 0-pixel map: every sample is off the map (torchvision would read out of bounds here).
    z = torch.zeros(1, 2, 0, 4, device=device, requires_grad=True)
    out = ops.roi_align(z, torch.tensor([[0, 0.0, 0.0, 3.0, 3.0]], device=device), 2, mode="max")
    assert torch.equal(out, torch.zeros(1, 2, 2, 2, device=device))
    out.sum().backward()
    assert z.grad.shape == z.shape


# ---- layouts, determinism -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["avg", "max", "warp", "warp_max"])
def test_channels_last_equals_nchw(mode):
    g = torch.Generator().manual_seed(6)
    x = feats(g, (2, 22, 13, 17), torch.float32)  # 22: blocks of 4 planes and a remainder
    rois = make_rois(g, 2, 12, (26, 34), dtype=torch.float32)
    go = torch.randn(12, 22, 4, 3, generator=g)

    def run(t):
        t = t.detach().requires_grad_()
        if mode.startswith("warp"):
            out = roi_warp_kind(t, rois, (4, 3), 0.5, mode)
        else:
            out = ops.roi_align(t, rois, (4, 3), 0.5, -1, True, mode=mode)
        out.backward(go)
        return out, t.grad

    xc = x.contiguous(memory_format=torch.channels_last)
    out, grad = run(x)
    out_cl, grad_cl = run(xc)
    assert out_cl.is_contiguous(memory_format=torch.channels_last) and out.is_contiguous()
    assert grad_cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, out_cl)  # same operations in the same order per element
    assert torch.equal(grad, grad_cl)
    # A non-dense input (a channel slice) is made contiguous and gives the same answer.
    wide = torch.cat([x, x], 1)[:, 22:]
    torch.testing.assert_close(run(wide)[0], out, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["avg", "max", "warp", "warp_max"])
def test_backward_any_grad_layout(mode):
    """The backward reads grad_out through its strides (NCHW from a flatten, channels-last, a strided view):
    every layout of the same gradient gives the same input gradient, bit for bit, on both feature layouts."""
    g = torch.Generator().manual_seed(16)
    x = feats(g, (2, 37, 15, 19), torch.float32)  # 37 channels: several channel blocks and a remainder
    rois = make_rois(g, 2, 30, (30, 38), dtype=torch.float32)
    go = torch.randn(30, 37, 5, 4, generator=g)
    layouts = {"nchw": go, "channels_last": go.contiguous(memory_format=torch.channels_last),
               "strided": torch.randn(30, 37, 5, 8, generator=g)[..., ::2].copy_(go)}
    assert not layouts["strided"].is_contiguous()

    def grad(t, gout):
        t = t.detach().requires_grad_()
        if mode.startswith("warp"):
            out = roi_warp_kind(t, rois, (5, 4), 0.5, mode)
        else:
            out = ops.roi_align(t, rois, (5, 4), 0.5, 2, True, mode=mode)
        out.backward(gout)
        return t.grad

    ref = grad(x, go)
    for fmt in (torch.contiguous_format, torch.channels_last):
        for name, gout in layouts.items():
            assert torch.equal(grad(x.contiguous(memory_format=fmt), gout), ref), (fmt, name)


def test_backward_deterministic_across_threads():
    g = torch.Generator().manual_seed(7)
    x = feats(g, (2, 18, 30, 40), torch.float32)
    rois = make_rois(g, 2, 200, (60, 80), dtype=torch.float32)
    go = torch.randn(200, 18, 7, 7, generator=g)
    before = mrcnn_fast.get_num_threads()

    def grads(mode, layout):
        t = x.contiguous(memory_format=layout).detach().requires_grad_()
        ops.roi_align(t, rois, 7, 0.5, 2, True, mode=mode).backward(go)
        return t.grad

    try:
        for mode in ("avg", "max"):
            for layout in (torch.contiguous_format, torch.channels_last):
                mrcnn_fast.set_num_threads(2)
                a, b = grads(mode, layout), grads(mode, layout)
                mrcnn_fast.set_num_threads(1)
                c = grads(mode, layout)
                assert torch.equal(a, b) and torch.equal(a, c), (mode, layout)
    finally:
        mrcnn_fast.set_num_threads(before)


# ---- gradients -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["avg", "avg_aligned", "max", "warp", "warp_max"])
def test_gradcheck(kind):
    g = torch.Generator().manual_seed(8)
    x = feats(g, (2, 2, 6, 7)).requires_grad_()
    rois = make_rois(g, 2, 7, (12, 14))
    if kind.startswith("warp"):
        fn = lambda t: roi_warp_kind(t, rois, (2, 3), 0.5, kind)  # noqa: E731
    else:
        fn = lambda t: ops.roi_align(t, rois, (2, 3), 0.5, -1, kind == "avg_aligned", mode=kind[:3])  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))


def test_max_gradient_goes_to_argmax_neighbours():
    # f(y, x) = 10 y + x is reproduced exactly by bilinear sampling. One bin, samples at y in {0.25, 1.25},
    # x in {1.5, 2.5}: the max is at (1.25, 2.5), neighbour weights 0.375, 0.375, 0.125, 0.125.
    i, j = torch.meshgrid(torch.arange(4.0), torch.arange(5.0), indexing="ij")
    x = (10 * i + j).double()[None, None].requires_grad_()
    rois = torch.tensor([[0, 1.5, 0.25, 3.5, 2.25]], dtype=torch.float64)
    out = ops.roi_align(x, rois, 1, 1.0, 2, True, mode="max")
    assert out.item() == 15.0
    out.sum().backward()
    want = torch.zeros(4, 5, dtype=torch.float64)
    want[1, 2], want[1, 3], want[2, 2], want[2, 3] = 0.375, 0.375, 0.125, 0.125
    assert torch.equal(x.grad[0, 0], want)


def test_avg_backward_matches_torchvision():
    g = torch.Generator().manual_seed(9)
    x = feats(g, (2, 3, 11, 13))
    rois = make_rois(g, 2, 15, (22, 26))
    go = torch.randn(15, 3, 5, 4, generator=g, dtype=torch.float64)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ops.roi_align(a, rois, (5, 4), 0.5, -1, True).backward(go)
    torchvision.ops.roi_align(b, rois, (5, 4), 0.5, -1, True).backward(go)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


# ---- multi-level ------------------------------------------------------------------------------------------


def fpn_inputs(g, dtype=torch.float32, image=(96, 128), N=2, C=3, K=30):
    H, W = image
    xs = {str(i): feats(g, (N, C, math.ceil(H / 2 ** (i + 2)), math.ceil(W / 2 ** (i + 2))), dtype) for i in range(4)}
    boxes = []
    for _ in range(N):
        wh = torch.exp(torch.rand(K // N, 2, generator=g, dtype=torch.float64) * math.log(200.0)) + 1
        xy = torch.rand(K // N, 2, generator=g, dtype=torch.float64) * torch.tensor([W, H])
        boxes.append(torch.cat([xy, xy + wh], 1).to(dtype))
    boxes[0][0] = torch.tensor([10.0, 10.0, 10.0, 40.0])  # zero area: lowest level
    return xs, boxes, [(H, W), (H - 10, W - 30)][:N]


@pytest.mark.parametrize("sr", [2, -1])
def test_multiscale_roi_align_matches_torchvision(device, sr):
    g = torch.Generator().manual_seed(10)
    xs, boxes, shapes = fpn_inputs(g)
    xs = {k: v.to(device) for k, v in xs.items()}
    boxes = [b.to(device) for b in boxes]
    for names in (["0", "1", "2", "3"], ["1", "3"], ["2"]):
        ours = ops.MultiScaleRoIAlign(names, 7, sr)
        theirs = torchvision.ops.MultiScaleRoIAlign(names, 7, sr)
        torch.testing.assert_close(ours(xs, boxes, shapes), theirs(xs, boxes, shapes), msg=str(names))
        assert ours.scales == theirs.scales


def test_fpn_level_assign_matches_torchvision():
    g = torch.Generator().manual_seed(11)
    _, boxes, _ = fpn_inputs(g, K=200)
    b = torch.cat(boxes)
    mapper = torchvision.ops.poolers.LevelMapper(2, 5)
    want = mapper([b])
    assert torch.equal(ops.fpn_level_assign(b, 2, 5), want)
    rois = torch.cat([torch.zeros(len(b), 1), b], 1)
    assert torch.equal(ops.fpn_level_assign(rois, 2, 5), want)
    assert torch.equal(ops.fpn_level_assign(b.double(), 2, 5), ref_levels(b, 2, 5))
    assert torch.equal(ops.fpn_level_assign(b, 3, 6, canonical_level=5, canonical_scale=112),
                       torchvision.ops.poolers.LevelMapper(3, 6, 112, 5)([b]))
    assert ops.fpn_level_assign(torch.zeros(0, 4), 2, 5).shape == (0,)


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_multilevel_equals_per_level_roi_align(mode):
    g = torch.Generator().manual_seed(12)
    xs, boxes, _ = fpn_inputs(g, torch.float64)
    feats_ = list(xs.values())
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i), dtype=b.dtype), b], 1) for i, b in enumerate(boxes)])
    levels = ops.fpn_level_assign(rois, 2, 5, canonical_scale=32)
    assert len(levels.unique()) == 4  # the test covers every level
    kw = dict(mode=mode, canonical_scale=32)
    got = ops.multilevel_roi_align(feats_, boxes, (3, 2), scales, 2, True, **kw)
    want = torch.zeros_like(got)
    for lv in range(4):
        m = levels == lv
        want[m] = ops.roi_align(feats_[lv], rois[m], (3, 2), scales[lv], 2, True, mode=mode)
    assert torch.equal(got, want)
    # Levels past the given features pool nothing (torchvision's mapper indexes beyond them too).
    got_short = ops.multilevel_roi_align(feats_[:2], rois, (3, 2), [1 / 4, 1 / 32], 2, True, **kw)
    m = levels == 1
    assert torch.equal(got_short[levels == 0], want[levels == 0])
    assert torch.equal(got_short[m], ops.roi_align(feats_[1], rois[m], (3, 2), 1 / 32, 2, True, mode=mode))
    assert torch.equal(got_short[levels >= 2], torch.zeros_like(got_short[levels >= 2]))


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_multilevel_gradcheck(mode):
    g = torch.Generator().manual_seed(13)
    xs, boxes, _ = fpn_inputs(g, torch.float64, image=(32, 48), N=2, C=2, K=8)
    f = [v.requires_grad_() for v in list(xs.values())[:3]]
    boxes = [b / 2 for b in boxes]
    fn = lambda *t: ops.multilevel_roi_align(list(t), boxes, 2, [1 / 4, 1 / 8, 1 / 16], 2, mode=mode,  # noqa: E731
                                             canonical_scale=28)
    assert torch.autograd.gradcheck(fn, tuple(f))


def test_multilevel_channels_last_and_determinism():
    g = torch.Generator().manual_seed(14)
    xs, boxes, _ = fpn_inputs(g, K=60, C=20)
    f = list(xs.values())
    go = torch.randn(60, 20, 7, 7, generator=g)
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    results = []
    for layout in (torch.contiguous_format, torch.channels_last, torch.contiguous_format):
        t = [v.contiguous(memory_format=layout).detach().requires_grad_() for v in f]
        out = ops.multilevel_roi_align(t, boxes, 7, scales, 2)
        out.backward(go)
        results.append((out, [v.grad for v in t]))
    for out, grads in results[1:]:
        assert torch.equal(out, results[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][1]))


# ---- custom-op plumbing ---------------------------------------------------------------------------------


def test_opcheck():
    g = torch.Generator().manual_seed(15)
    x = feats(g, (2, 3, 8, 9), torch.float32)
    rois = make_rois(g, 2, 6, (16, 18), dtype=torch.float32)
    xr = x.clone().requires_grad_()
    xc = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    for t in (xr, xc):
        for max_mode, quantize in ((False, False), (True, False), (False, True)):
            args = (t, rois, 0.5, 3, 2, 2, True, max_mode, quantize)
            torch.library.opcheck(torch.ops.mrcnn_fast.roi_align.default, args)
            go = torch.randn(6, 3, 3, 2, generator=g)
            torch.library.opcheck(torch.ops.mrcnn_fast.roi_align_backward.default, (go, t.detach()) + args[1:])
    f = [feats(g, (2, 3, 8, 9), torch.float32).requires_grad_(), feats(g, (2, 3, 4, 5), torch.float32).requires_grad_()]
    margs = (f, rois, [0.5, 0.25], 1, 2, 4, 224.0, 3, 2, 2, False, False)
    torch.library.opcheck(torch.ops.mrcnn_fast.multilevel_roi_align.default, margs)
    go = torch.randn(6, 3, 3, 2, generator=g)
    torch.library.opcheck(torch.ops.mrcnn_fast.multilevel_roi_align_backward.default,
                          (go, [v.detach() for v in f]) + margs[1:])
    torch.library.opcheck(torch.ops.mrcnn_fast.fpn_level_assign.default, (rois[:, 1:], 2, 5, 4, 224.0))


def test_torch_compile_fullgraph():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x, small, rois):
            a = ops.roi_align(self.conv(x), rois, 3, 0.5, 2, True)
            b = ops.multilevel_roi_align([x, small], rois, 3, [0.5, 0.25], 2, mode="max")
            return a.sum() + b.sum()

    g = torch.Generator().manual_seed(16)
    m = Head()
    x, small = feats(g, (2, 3, 12, 12), torch.float32), feats(g, (2, 3, 6, 6), torch.float32)
    rois = make_rois(g, 2, 5, (24, 24), dtype=torch.float32)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(x, small, rois)
    out.backward()
    torch.testing.assert_close(out, m(x, small, rois))
    assert m.conv.weight.grad is not None


# ---- bad input --------------------------------------------------------------------------------------------


def test_bad_input():
    x = torch.randn(2, 3, 8, 8)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0], [1, 2.0, 2.0, 6.0, 7.0]])
    with pytest.raises(ValueError, match="input"):
        ops.roi_align(x[0], rois, 2)
    with pytest.raises(TypeError, match="input"):
        ops.roi_align(x.long(), rois, 2)
    with pytest.raises(TypeError, match="input"):
        ops.roi_align(x.half(), rois, 2)  # no half on the CPU
    with pytest.raises(ValueError, match="input"):
        ops.roi_align(torch.randn(2, 3, 8, 8, device="meta"), rois, 2)
    with pytest.raises(ValueError, match="boxes"):
        ops.roi_align(x, rois[:, 1:], 2)
    with pytest.raises(ValueError, match="boxes"):
        ops.roi_align(x, rois.to("meta"), 2)
    with pytest.raises(TypeError, match="boxes"):
        ops.roi_align(x, rois.long(), 2)
    with pytest.raises(TypeError, match="boxes"):
        ops.roi_align(x, "boxes", 2)
    with pytest.raises(ValueError, match=r"boxes\[1\]"):
        ops.roi_align(x, [rois[:, 1:], rois], 2)
    for bad_index in (2.0, -1.0, 0.5):
        r = rois.clone()
        r[1, 0] = bad_index
        with pytest.raises(ValueError, match="boxes.*batch"):
            ops.roi_align(x, r, 2)
    with pytest.raises(ValueError, match="boxes"):
        ops.roi_align(x, [rois[:, 1:]] * 3, 2)  # three images' boxes, two images
    for bad in (float("nan"), float("inf")):
        r = rois.clone()
        r[0, 3] = bad
        with pytest.raises(ValueError, match="boxes.*NaN"):
            ops.roi_align(x, r, 2)
        with pytest.raises(ValueError, match="boxes.*NaN"):
            ops.multilevel_roi_align([x], r, 2, [1.0])
        with pytest.raises(ValueError, match="boxes.*NaN"):
            ops.fpn_level_assign(r, 2, 5)
    for size in (0, (2, 0), (-1, 3)):
        with pytest.raises(ValueError, match="output_size"):
            ops.roi_align(x, rois, size)
    with pytest.raises(TypeError, match="output_size"):
        ops.roi_align(x, rois, "7")
    with pytest.raises(ValueError, match="spatial_scale"):
        ops.roi_align(x, rois, 2, 0.0)
    with pytest.raises(TypeError, match="sampling_ratio"):
        ops.roi_align(x, rois, 2, 1.0, 2.0)
    with pytest.raises(ValueError, match="mode"):
        ops.roi_align(x, rois, 2, mode="sum")
    # The kernels check again, for callers of the raw op (and compiled graphs).
    bad = rois.clone()
    bad[0, 0] = 5
    with pytest.raises(ValueError, match="rois"):
        torch.ops.mrcnn_fast.roi_align(x, bad, 1.0, 2, 2, 2, False, False, False)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="rois"):
        torch.ops.mrcnn_fast.roi_align(x, bad, 1.0, 2, 2, 2, False, False, False)
    with pytest.raises(ValueError, match="output_size"):
        torch.ops.mrcnn_fast.roi_align(x, rois, 1.0, 0, 2, 2, False, False, False)


def test_bad_multilevel_input():
    f = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)]
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]])
    with pytest.raises(ValueError, match="spatial_scales"):
        ops.multilevel_roi_align(f, rois, 2, [1.0])
    with pytest.raises(ValueError, match=r"spatial_scales\[1\]"):
        ops.multilevel_roi_align(f, rois, 2, [1.0, -0.5])
    with pytest.raises(ValueError, match="features"):
        ops.multilevel_roi_align([f[0], torch.randn(2, 4, 4, 4)], rois, 2, [1.0, 0.5])
    with pytest.raises(ValueError, match="features"):
        ops.multilevel_roi_align([f[0], torch.randn(1, 3, 4, 4)], rois, 2, [1.0, 0.5])
    with pytest.raises(TypeError, match="features"):
        ops.multilevel_roi_align([f[0], f[1].double()], rois, 2, [1.0, 0.5])
    with pytest.raises(ValueError, match="features"):
        ops.multilevel_roi_align([f[0], f[1][0]], rois, 2, [1.0, 0.5])
    with pytest.raises(TypeError, match="features"):
        ops.multilevel_roi_align([], rois, 2, [])
    with pytest.raises(ValueError, match="features"):
        ops.multilevel_roi_align([f[1]] * 9, rois, 2, [0.5] * 9)
    with pytest.raises(ValueError, match="output_size"):
        ops.multilevel_roi_align(f, rois, 0, [1.0, 0.5])
    with pytest.raises(ValueError, match="boxes"):
        ops.fpn_level_assign(rois[:, :3], 2, 5)
    with pytest.raises(ValueError, match="k_max"):
        ops.fpn_level_assign(rois, 5, 2)
    with pytest.raises(ValueError, match="image_shapes"):
        ops.MultiScaleRoIAlign(["a"], 7, 2)({"a": f[0]}, [rois[:, 1:]], [])


# ---- CUDA vs CPU -------------------------------------------------------------------------------------------


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_cuda_matches_cpu(dtype, layout):
    g = torch.Generator().manual_seed(17)
    x = feats(g, (2, 6, 20, 25), dtype)
    rois = make_rois(g, 2, 40, (40, 50), dtype=torch.float32)
    go = torch.randn(40, 6, 5, 4, generator=g).to(dtype)
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-5)
    modes = ["avg", "max", "warp", "warp_max"] if dtype in (torch.float32, torch.float64) else ["avg", "warp"]
    for mode in modes:
        res = []
        for dev in ("cpu", "cuda"):
            t = x.to(dev).contiguous(memory_format=layout)
            t = (t.float() if dev == "cpu" and dtype in (torch.float16, torch.bfloat16) else t).requires_grad_()
            if mode.startswith("warp"):
                out = roi_warp_kind(t, rois.to(dev), (5, 4), 0.5, mode)
            else:
                out = ops.roi_align(t, rois.to(dev), (5, 4), 0.5, -1, True, mode=mode)
            out.backward(go.to(dev).to(out.dtype))
            assert out.dtype == t.dtype and t.grad.dtype == t.dtype
            res.append((out.float().cpu(), t.grad.float().cpu()))
        torch.testing.assert_close(res[1][0], res[0][0], rtol=tol, atol=tol, msg=mode)
        torch.testing.assert_close(res[1][1], res[0][1], rtol=tol, atol=tol, msg=mode)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_multilevel_matches_cpu(dtype):
    g = torch.Generator().manual_seed(18)
    xs, boxes, shapes = fpn_inputs(g, torch.float32, K=40, C=4)
    go = torch.randn(40, 4, 7, 7, generator=g)
    res = []
    for dev in ("cpu", "cuda"):
        f = [v.to(dev).to(dtype if dev == "cuda" else torch.float32).requires_grad_() for v in xs.values()]
        out = ops.multilevel_roi_align(f, [b.to(dev) for b in boxes], 7, [1 / 4, 1 / 8, 1 / 16, 1 / 32], 2)
        out.backward(go.to(dev).to(out.dtype))
        res.append((out.float().cpu(), [v.grad.float().cpu() for v in f]))
        lv = ops.fpn_level_assign(torch.cat(boxes).to(dev), 2, 5)
        assert torch.equal(lv.cpu(), ops.fpn_level_assign(torch.cat(boxes), 2, 5))
    tol = 1e-2 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(res[1][0], res[0][0], rtol=tol, atol=tol)
    for a, b in zip(res[1][1], res[0][1]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    ours = ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    theirs = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    xc = {k: v.cuda() for k, v in xs.items()}
    bc = [b.cuda() for b in boxes]
    torch.testing.assert_close(ours(xc, bc, shapes), theirs(xc, bc, shapes))
