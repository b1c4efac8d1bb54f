import math

import numpy as np
import pytest
import torch
import torchvision

import mrcnn_fast
from conftest import cuda_only
from mrcnn_fast import ops
from mrcnn_fast.ops._rois import check_batch_indices, convert_boxes_to_rois

roi_pool_op = torch.ops.mrcnn_fast.roi_pool.default
roi_pool_backward_op = torch.ops.mrcnn_fast.roi_pool_backward.default


def ref_roi_pool(x, rois, oh, ow, scale):
    """Plain-loop RoIPool with torchvision's geometry, in the rois' dtype where torchvision rounds.

    Returns (Tensor[K, C, oh, ow] float64, Tensor[K, C, oh, ow] int64 arg-max, -1 for empty bins)."""
    T = np.float32 if rois.dtype == torch.float32 else np.float64
    x = x.detach().double().cpu()
    r = rois.detach().cpu().numpy().astype(T)
    N, C, H, W = x.shape
    out = torch.zeros(len(r), C, oh, ow, dtype=torch.float64)
    arg = torch.full((len(r), C, oh, ow), -1, dtype=torch.int64)

    def rnd(v):  # std::round: half away from zero
        return int(math.copysign(math.floor(abs(float(v)) + 0.5), float(v)))

    for k in range(len(r)):
        b = int(r[k, 0])
        x0, y0, x1, y1 = (rnd(r[k, i] * T(scale)) for i in range(1, 5))
        rw, rh = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        bh, bw = T(rh) / T(oh), T(rw) / T(ow)
        for ph in range(oh):
            hs = min(max(math.floor(T(ph) * bh) + y0, 0), H)
            he = min(max(math.ceil(T(ph + 1) * bh) + y0, 0), H)
            for pw in range(ow):
                ws = min(max(math.floor(T(pw) * bw) + x0, 0), W)
                we = min(max(math.ceil(T(pw + 1) * bw) + x0, 0), W)
                if he <= hs or we <= ws:
                    continue
                for c in range(C):
                    win = x[b, c, hs:he, ws:we]
                    i = int(torch.argmax(win.reshape(-1)))  # first maximum, row-major
                    out[k, c, ph, pw] = win.reshape(-1)[i]
                    arg[k, c, ph, pw] = (hs + i // (we - ws)) * W + ws + i % (we - ws)
    return out, arg


def distinct(shape, *, dtype=torch.float64, device="cpu", seed=0):
    """Random values that are all distinct (and 0.01 apart), so the max of every bin is unique."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    return (torch.randperm(n, generator=g).to(torch.float64) * 0.01 - n * 0.005).view(shape).to(dtype=dtype,
                                                                                            device=device)


def rand_rois(k, n, size, *, dtype=torch.float64, device="cpu", seed=0, spread=0.3):
    """Tensor[k, 5] with boxes inside, partly outside and wholly outside a size x size map, plus tiny,
    malformed (x2 < x1) and huge ones."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(k, 2, generator=g, dtype=torch.float64) * size * (1 + 2 * spread) - size * spread
    wh = torch.rand(k, 2, generator=g, dtype=torch.float64) * size * 0.8
    boxes = torch.cat([xy, xy + wh], 1)
    if k >= 6:
        boxes[0] = torch.tensor([-3.0 * size, -3.0 * size, -2.0 * size, -2.0 * size])  # wholly outside
        boxes[1] = torch.tensor([0.4, 0.6, 0.4, 0.6]) * size  # a point
        boxes[2] = torch.tensor([0.7, 0.7, 0.2, 0.3]) * size  # malformed
        boxes[3] = torch.tensor([-1e5, -1e5, 1e5, 1e5])  # huge
        boxes[4] = torch.tensor([0.5, 0.5, 1.5, 1.5])  # tiny, rounds at the .5 boundary
        boxes[5] = torch.tensor([2.0 * size, 0, 3.0 * size, size])  # beyond the right edge
    idx = torch.randint(0, n, (k, 1), generator=g).to(torch.float64)
    return torch.cat([idx, boxes], 1).to(dtype=dtype, device=device)


LAYOUTS = ["nchw", "channels_last"]


def layout(x, name):
    return x.contiguous(memory_format=torch.channels_last) if name == "channels_last" else x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fmt", LAYOUTS)
def test_matches_reference(device, dtype, fmt):
    x = layout(distinct((2, 3, 13, 17), dtype=dtype, device=device), fmt)
    rois = rand_rois(24, 2, 40, dtype=dtype, device=device)
    out, arg = roi_pool_op(x, rois, 0.4, 3, 4)
    ref, ref_arg = ref_roi_pool(x, rois, 3, 4, 0.4)
    assert out.shape == (24, 3, 3, 4) and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.cpu().double(), ref, rtol=0, atol=0)
    torch.testing.assert_close(arg.cpu().long(), ref_arg, rtol=0, atol=0)
    assert (ref == 0).any() and (ref != 0).any()  # the boxes exercise empty bins and real ones


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("scale,out_size", [(1.0, 7), (0.25, (3, 5)), (1 / 16, (2, 2))])
def test_matches_torchvision_forward_and_backward(device, dtype, fmt, scale, out_size):
    x = layout(distinct((2, 5, 21, 18), dtype=dtype, device=device, seed=1), fmt).requires_grad_()
    x_tv = x.detach().clone().contiguous().requires_grad_()
    rois = rand_rois(40, 2, 21 / scale, dtype=dtype, device=device, seed=2)
    out = ops.roi_pool(x, rois, out_size, scale)
    ref = torchvision.ops.roi_pool(x_tv, rois, out_size, scale)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(3)).to(device)
    out.backward(g)
    ref.backward(g)
    memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    assert x.grad.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(x.grad, x_tv.grad, rtol=1e-6, atol=1e-6)


def test_list_of_boxes_form(device):
    x = distinct((3, 4, 16, 16), dtype=torch.float32, device=device, seed=4)
    boxes = [rand_rois(n, 1, 32, dtype=torch.float32, device=device, seed=10 + n)[:, 1:] for n in (5, 0, 7)]
    got = ops.roi_pool(x, boxes, 4, 0.5)
    rois = convert_boxes_to_rois(boxes)
    assert rois.shape == (12, 5) and rois[:5, 0].eq(0).all() and rois[5:, 0].eq(2).all()
    torch.testing.assert_close(got, ops.roi_pool(x, rois, 4, 0.5), rtol=0, atol=0)
    torch.testing.assert_close(got, torchvision.ops.roi_pool(x, boxes, 4, 0.5), rtol=0, atol=0)
    assert convert_boxes_to_rois(rois) is rois  # the Tensor[K, 5] form is passed through, no copy


@pytest.mark.parametrize("fmt", LAYOUTS)
def test_gradcheck(fmt):
    x = layout(distinct((2, 2, 7, 6), seed=5), fmt).requires_grad_()
    rois = rand_rois(6, 2, 14, seed=6, spread=0.1)
    assert torch.autograd.gradcheck(lambda t: ops.roi_pool(t, rois, (2, 3), 0.5), (x,))


def test_empty_rois(device):
    x = torch.randn(2, 3, 8, 8, device=device, requires_grad=True)
    rois = torch.zeros(0, 5, device=device)
    out = ops.roi_pool(x, rois, 3)
    assert out.shape == (0, 3, 3, 3)
    out.sum().backward()
    assert x.grad.shape == x.shape and not x.grad.any()


def test_wholly_outside_and_bad_index_pool_to_zero(device):
    x = torch.randn(1, 2, 6, 6, device=device) + 5  # all positive: a zero can only come from an empty bin
    rois = torch.tensor([[0, -50, -50, -20, -20], [0, 10, 10, 30, 30]], dtype=torch.float32, device=device)
    out, arg = roi_pool_op(x, rois, 1.0, 2, 2)
    assert not out.any() and arg.eq(-1).all()
    # The raw op (bypassing the Python validation) must not read out of bounds on garbage RoIs.
    bad = torch.tensor([[5, 0, 0, 3, 3], [-1, 0, 0, 3, 3], [float("nan"), 0, 0, 3, 3],
                        [0, float("nan"), 0, float("inf"), 1e30], [0, -1e30, -1e30, 1e30, 1e30]], device=device)
    out, arg = roi_pool_op(x, bad, 1.0, 2, 2)
    assert not out[:3].any() and arg[:3].eq(-1).all()
    assert torch.isfinite(out).all() and (arg < 36).all()
    gin = roi_pool_backward_op(torch.ones_like(out), bad, arg, 1, 2, 6, 6, False)
    assert torch.isfinite(gin).all()


def test_negative_infinity_values():
    # The documented difference from torchvision: the true max, not -FLT_MAX.
    x = torch.full((1, 1, 4, 4), -math.inf)
    out, arg = roi_pool_op(x, torch.tensor([[0.0, 0, 0, 3, 3]]), 1.0, 1, 1)
    assert out.item() == -math.inf and arg.item() == 0
    x = x.double()
    x[0, 0, 2, 1] = -1e300
    out, arg = roi_pool_op(x, torch.tensor([[0.0, 0, 0, 3, 3]], dtype=torch.float64), 1.0, 1, 1)
    assert out.item() == -1e300 and arg.item() == 9


def test_cpu_backward_deterministic():
    x = torch.randn(2, 32, 40, 40, requires_grad=True)
    rois = rand_rois(300, 2, 40, dtype=torch.float32, seed=7)
    g = torch.randn(300, 32, 7, 7)
    before = mrcnn_fast.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 1):
            mrcnn_fast.set_num_threads(n)
            x.grad = None
            ops.roi_pool(x, rois, 7).backward(g)
            grads.append(x.grad.clone())
    finally:
        mrcnn_fast.set_num_threads(before)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


def test_opcheck():
    x = distinct((2, 3, 9, 8), dtype=torch.float32, seed=8)
    rois = rand_rois(7, 2, 9, dtype=torch.float32, seed=9)
    torch.library.opcheck(roi_pool_op, (x.requires_grad_(), rois, 1.0, 3, 2))
    torch.library.opcheck(roi_pool_op, (x.detach().to(memory_format=torch.channels_last), rois, 0.5, 2, 2))
    _, arg = roi_pool_op(x, rois, 1.0, 3, 2)
    g = torch.randn(7, 3, 3, 2)
    torch.library.opcheck(roi_pool_backward_op, (g, rois, arg, 2, 3, 9, 8, False))
    torch.library.opcheck(roi_pool_backward_op, (g, rois, arg, 2, 3, 9, 8, True))


def test_torch_compile_fullgraph():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = ops.RoIPool((2, 2), 0.5)
            self.fc = torch.nn.Linear(4 * 2 * 2, 3)

        def forward(self, x, rois):
            return self.fc(self.pool(x, rois).flatten(1))

    head = Head()
    x = torch.randn(2, 4, 10, 10, requires_grad=True)
    rois = rand_rois(5, 2, 20, dtype=torch.float32, seed=11)
    ref = head(x, rois)
    got = torch.compile(head, fullgraph=True, backend="aot_eager")(x, rois)
    torch.testing.assert_close(got, ref)
    got.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bad_inputs():
    x = torch.randn(2, 3, 8, 8)
    rois = torch.tensor([[0.0, 1, 1, 5, 5]])
    with pytest.raises(ValueError, match="input"):
        ops.roi_pool(x[0], rois, 2)
    with pytest.raises(TypeError, match="input"):
        ops.roi_pool(x.long(), rois, 2)
    with pytest.raises(TypeError, match="input"):
        ops.roi_pool(x.half(), rois, 2)  # no CPU half kernel
    with pytest.raises(ValueError, match="boxes"):
        ops.roi_pool(x, rois[:, 1:], 2)  # Tensor form must be [K, 5]
    with pytest.raises(ValueError, match="boxes"):
        ops.roi_pool(x, rois[0], 2)
    with pytest.raises(ValueError, match=r"boxes\[0\]"):
        ops.roi_pool(x, [rois], 2)  # list form must be [L, 4]
    with pytest.raises(ValueError, match="boxes"):
        ops.roi_pool(x, [], 2)
    with pytest.raises(TypeError, match="boxes"):
        ops.roi_pool(x, rois.int(), 2)
    with pytest.raises(TypeError, match="boxes"):
        ops.roi_pool(x, rois.double(), 2)  # dtype differs from input's
    with pytest.raises(TypeError, match=r"boxes\[1\]"):
        ops.roi_pool(x, [rois[:, 1:], rois[:, 1:].double()], 2)
    with pytest.raises(TypeError, match="boxes"):
        ops.roi_pool(x, "boxes", 2)
    for v in (float("nan"), float("inf"), -float("inf")):
        bad = rois.clone()
        bad[0, 3] = v
        with pytest.raises(ValueError, match="boxes.*NaN or infinite"):
            ops.roi_pool(x, bad, 2)
        with pytest.raises(ValueError, match=r"boxes.*NaN or infinite"):
            ops.roi_pool(x, [bad[:, 1:]], 2)
    for b in (2.0, -1.0, 0.5):
        bad = rois.clone()
        bad[0, 0] = b
        with pytest.raises(ValueError, match="boxes: batch index"):
            ops.roi_pool(x, bad, 2)
    with pytest.raises(ValueError, match="boxes: batch index"):
        ops.roi_pool(x, [rois[:, 1:]] * 3, 2)  # three images' boxes for a batch of two
    for size in (0, -1, (2, 0)):
        with pytest.raises(ValueError, match="output_size"):
            ops.roi_pool(x, rois, size)
    with pytest.raises(TypeError, match="output_size"):
        ops.roi_pool(x, rois, "7")
    for s in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="spatial_scale"):
            ops.roi_pool(x, rois, 2, s)
    # The core's own checks, reached through the raw op.
    with pytest.raises(ValueError, match="rois"):
        roi_pool_op(x, rois[:, :4].contiguous(), 1.0, 2, 2)
    with pytest.raises(ValueError, match="spatial_scale"):
        roi_pool_op(x, rois, 0.0, 2, 2)
    with pytest.raises(ValueError, match="out"):
        roi_pool_op(x, rois, 1.0, 0, 2)


def test_other_strides_are_copied():
    # A map that is neither NCHW nor channels-last is copied by the op, never misread by the kernel.
    x = distinct((2, 3, 8, 9), dtype=torch.float32, seed=12)
    t = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not t.is_contiguous() and not t.is_contiguous(memory_format=torch.channels_last)
    rois = rand_rois(6, 2, 9, dtype=torch.float32, seed=13)
    assert torch.equal(ops.roi_pool(t, rois, 3), ops.roi_pool(x, rois, 3))


def test_check_batch_indices_and_convert_helpers():
    rois = torch.tensor([[0.0, 1, 1, 5, 5], [1.0, 1, 1, 5, 5]])
    check_batch_indices(rois, 2)
    with pytest.raises(ValueError, match="feats: batch index 1.0 of RoI 1"):
        check_batch_indices(rois, 1, "feats")
    check_batch_indices(torch.zeros(0, 5), 0)
    with pytest.raises(ValueError, match="rois"):
        convert_boxes_to_rois(torch.zeros(3, 4), "rois")
    with pytest.raises(TypeError, match="rois"):
        convert_boxes_to_rois(torch.zeros(3, 5, dtype=torch.int64), "rois")
    assert convert_boxes_to_rois([torch.zeros(0, 4)]).shape == (0, 5)


@cuda_only
def test_cuda_matches_cpu_and_torchvision():
    for fmt in LAYOUTS:
        x = layout(distinct((2, 6, 25, 19), dtype=torch.float32, seed=14), fmt)
        rois = rand_rois(64, 2, 50, dtype=torch.float32, seed=15)
        out_cpu, arg_cpu = roi_pool_op(x, rois, 0.5, 7, 7)
        out_gpu, arg_gpu = roi_pool_op(x.cuda(), rois.cuda(), 0.5, 7, 7)
        assert torch.equal(out_gpu.cpu(), out_cpu) and torch.equal(arg_gpu.cpu(), arg_cpu)
        assert torch.equal(out_gpu, torchvision.ops.roi_pool(x.cuda(), rois.cuda(), 7, 0.5))
        g = torch.randn(out_cpu.shape)
        gin_cpu = roi_pool_backward_op(g, rois, arg_cpu, 2, 6, 25, 19, fmt == "channels_last")
        gin_gpu = roi_pool_backward_op(g.cuda(), rois.cuda(), arg_gpu, 2, 6, 25, 19, fmt == "channels_last")
        assert gin_gpu.stride() == gin_cpu.stride()
        torch.testing.assert_close(gin_gpu.cpu(), gin_cpu, rtol=1e-5, atol=1e-5)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", LAYOUTS)
def test_cuda_half_types(dtype, fmt):
    x = layout(torch.randn(2, 8, 30, 30, generator=torch.Generator().manual_seed(16)), fmt).to(dtype).cuda()
    rois = rand_rois(50, 2, 60, dtype=torch.float32, seed=17).to(dtype).cuda()
    x.requires_grad_()
    out = ops.roi_pool(x, rois, 5, 0.5)
    # The half-type kernel computes in float32: identical to the float32 kernel on the same values.
    x32 = x.detach().float().requires_grad_()
    ref = ops.roi_pool(x32, rois.float(), 5, 0.5)
    assert out.dtype == dtype and torch.equal(out.float(), ref)
    g = torch.randn(out.shape, device="cuda").to(dtype)
    out.backward(g)
    ref.backward(g.float())
    assert x.grad.dtype == dtype
    # float32 accumulation then one rounding: within the dtype's rounding of the float32 result (the CUDA
    # atomics' order is free, so not bit-exact).
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    torch.testing.assert_close(x.grad.float(), x32.grad, rtol=tol, atol=tol)


@cuda_only
def test_cuda_opcheck_and_bad_device():
    x = distinct((2, 3, 9, 8), dtype=torch.float32, device="cuda", seed=18)
    rois = rand_rois(7, 2, 9, dtype=torch.float32, device="cuda", seed=19)
    torch.library.opcheck(roi_pool_op, (x, rois, 1.0, 3, 2))
    with pytest.raises(ValueError, match="same device"):
        ops.roi_pool(x, rois.cpu(), 2)
    bad = rois.clone()
    bad[0, 0] = 9
    with pytest.raises(ValueError, match="boxes: batch index"):
        ops.roi_pool(x, bad, 2)
