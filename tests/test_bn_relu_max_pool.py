"""ops.batch_norm_relu_max_pool against torch's batch_norm -> max_pool2d -> relu, and the ResNet stem that uses it."""
import copy

import pytest
import torch
import torch.nn.functional as F

import mrcnn_fast
from conftest import DEVICES, cuda_only
from mrcnn_fast import ops
from mrcnn_fast.modeling.backbone import FrozenBatchNorm2d, ResNet
from mrcnn_fast.ops import bn_relu_max_pool as brmp

GEOMETRIES = [(3, 2, 1), (2, 2, 0), (3, 1, 1), ((3, 2), (2, 1), (1, 0)), (1, 1, 0), (5, 3, 2)]


def reference(x, w, b, rm, rv, training, momentum, eps, k, s, p):
    return F.relu(F.max_pool2d(F.batch_norm(x, rm, rv, w, b, training, momentum, eps), k, s, p))


def run_both(x, w, b, rm, rv, training, k, s, p, momentum=0.1, eps=1e-5, seed=0):
    """Forward + backward with the same upstream gradient through both; returns (ours, reference) tuples of
    (out, grad_x, grad_w, grad_b, running_mean, running_var)."""
    results = []
    for fn in (lambda *a: ops.batch_norm_relu_max_pool(*a[:5], training=a[5], momentum=a[6], eps=a[7],
                                                        kernel_size=a[8], stride=a[9], padding=a[10]),
               reference):
        xi, wi, bi = (t.detach().clone().requires_grad_() for t in (x, w, b))
        rmi, rvi = (None if t is None else t.clone() for t in (rm, rv))
        out = fn(xi, wi, bi, rmi, rvi, training, momentum, eps, k, s, p)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype).to(out.device)
        out.backward(g)
        results.append((out.detach(), xi.grad, wi.grad, bi.grad, rmi, rvi))
    return results


def inputs(shape, dtype, device="cpu", channels_last=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=gen, dtype=dtype) * 3 + 1).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, generator=gen, dtype=dtype).to(device)
    w[0] = -w[0].abs() - 0.1   # a negative gamma flips which cell is the window max
    b = torch.randn(c, generator=gen, dtype=dtype).to(device)
    rm = torch.randn(c, generator=gen, dtype=dtype).to(device)
    rv = (torch.rand(c, generator=gen, dtype=dtype) + 0.5).to(device)
    return x, w, b, rm, rv


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_matches_torch(device, dtype, channels_last, training, geometry):
    k, s, p = geometry
    x, w, b, rm, rv = inputs((3, 5, 17, 14), dtype, device, channels_last, seed=hash((k, s, p)) % 1000)
    ours, ref = run_both(x, w, b, rm, rv, training, k, s, p)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    for name, a, r in zip(("out", "grad_x", "grad_weight", "grad_bias", "running_mean", "running_var"), ours, ref):
        torch.testing.assert_close(a, r, **tol, msg=lambda m, n=name: f"{n}: {m}")
    # the output keeps the input's memory layout
    assert ours[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert ours[1].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_large_mean_variance_is_accurate():
    # |mean| / std = 1e4: a naive float32 sum of squares would lose the variance entirely.
    x = torch.randn(2, 3, 40, 40, dtype=torch.float32) + 1e4
    mean, var = ops.channel_moments(x)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean, ref_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(var, ref_var, rtol=1e-6, atol=1e-9)


def test_no_affine_and_no_running_stats():
    x, *_ = inputs((2, 4, 9, 9), torch.float64)
    out = ops.batch_norm_relu_max_pool(x, None, None, None, None, training=True)
    torch.testing.assert_close(out, reference(x, None, None, None, None, True, 0.1, 1e-5, 3, 2, 1))
    xg = x.clone().requires_grad_()
    ops.batch_norm_relu_max_pool(xg, None, None, None, None, training=True).sum().backward()
    xr = x.clone().requires_grad_()
    reference(xr, None, None, None, None, True, 0.1, 1e-5, 3, 2, 1).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad)


def test_ties_and_nan_follow_torch():
    # Tied window maxima: the first in row-major order takes the gradient, as in torch.max_pool2d.
    x = torch.zeros(1, 2, 6, 6, dtype=torch.float64)
    x[:, :, ::2, ::2] = 1.0
    ours, ref = run_both(x, torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                         torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), False, 3, 2, 1)
    for a, r in zip(ours[:4], ref[:4]):
        torch.testing.assert_close(a, r)
    # NaN in eval mode: the windows that see it are NaN and pass no gradient, as in torch.
    x, w, b, rm, rv = inputs((2, 3, 10, 10), torch.float64)
    x[0, 1, 4, 5] = float("nan")
    ours, ref = run_both(x, w, b, rm, rv, False, 3, 2, 1)
    for a, r in zip(ours[:4], ref[:4]):
        torch.testing.assert_close(a, r, equal_nan=True)
    assert torch.isnan(ours[0]).any()


def test_deterministic_across_thread_counts():
    x, w, b, rm, rv = inputs((4, 16, 33, 31), torch.float32, channels_last=True, seed=3)
    saved = mrcnn_fast.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            mrcnn_fast.set_num_threads(n)
            outs.append(run_both(x, w, b, rm, rv, True, 3, 2, 1)[0])
    finally:
        mrcnn_fast.set_num_threads(saved)
    for other in outs[1:]:
        for a, r in zip(outs[0], other):
            assert torch.equal(a, r)


def test_argmax_marks_relu_cut_cells():
    x, w, b, rm, rv = inputs((2, 3, 8, 8), torch.float64)
    scale = torch.ones(3, dtype=torch.float64)
    out, argmax = brmp._forward(x, scale, -scale * 1.5, [3, 3], [2, 2], [1, 1])
    assert argmax.dtype == torch.int32
    assert torch.equal(argmax == -1, out <= 0)
    # every kept arg-max is a cell of its window holding the window's maximum
    n, c, oh, ow = torch.nonzero(argmax >= 0, as_tuple=True)
    a = argmax[n, c, oh, ow].long()
    h, w_ = a // 8, a % 8
    assert ((h - oh * 2).abs() <= 1).all() and ((w_ - ow * 2).abs() <= 1).all()
    torch.testing.assert_close(x[n, c, h, w_] - 1.5, out[n, c, oh, ow])


def test_opcheck():
    x, w, b, rm, rv = inputs((2, 3, 9, 8), torch.float32, channels_last=True)
    scale, shift = w.abs(), b
    torch.library.opcheck(brmp._channel_moments, (x,))
    torch.library.opcheck(brmp._forward, (x, scale, shift, [3, 3], [2, 2], [1, 1]))
    out, argmax = brmp._forward(x, scale, shift, [3, 3], [2, 2], [1, 1])
    g = torch.randn_like(out)
    torch.library.opcheck(brmp._backward_reduce, (g, argmax, x, [3, 3], [2, 2], [1, 1]))
    torch.library.opcheck(brmp._backward_input, (g, argmax, x, scale, shift, b, [3, 3], [2, 2], [1, 1]))


def test_bad_inputs():
    x, w, b, rm, rv = inputs((2, 3, 8, 8), torch.float32)
    f = ops.batch_norm_relu_max_pool
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        f(x.numpy(), w, b, rm, rv, training=True)
    with pytest.raises(TypeError, match="float32 or float64"):
        f(x.long(), w, b, rm, rv, training=True)
    with pytest.raises(TypeError, match="float32 or float64"):
        f(x.half(), w.half(), b.half(), rm, rv, training=True)
    with pytest.raises(ValueError, match=r"Tensor\[N, C, H, W\]"):
        f(x[0], w, b, rm, rv, training=True)
    with pytest.raises(ValueError, match=r"weight must have shape \[3\]"):
        f(x, w[:2], b, rm, rv, training=True)
    with pytest.raises(ValueError, match=r"running_var must have shape \[3\]"):
        f(x, w, b, rm, rv[None], training=False)
    with pytest.raises(ValueError, match="padding must be between 0 and half"):
        f(x, w, b, rm, rv, training=True, kernel_size=3, padding=2)
    with pytest.raises(ValueError, match="positive"):
        f(x, w, b, rm, rv, training=True, stride=0)
    with pytest.raises(TypeError, match="padding must be an int"):
        f(x, w, b, rm, rv, training=True, padding="1")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        f(x[:1, :, :1, :1], w, b, rm, rv, training=True, kernel_size=1, stride=1, padding=0)
    with pytest.raises(ValueError, match="no values per channel"):
        f(x[:0], w, b, rm, rv, training=True)
    with pytest.raises(ValueError, match="running_mean and running_var are required"):
        f(x, w, b, None, None, training=False)
    with pytest.raises(ValueError, match="kernel larger"):
        f(x[:, :, :2, :2], w, b, rm, rv, training=False, kernel_size=5, padding=0)


def test_core_rejects_mismatched_buffers():
    x, w, b, rm, rv = inputs((2, 3, 8, 8), torch.float32)
    out, argmax = brmp._forward(x, w, b, [3, 3], [2, 2], [1, 1])
    with pytest.raises(ValueError, match="argmax must have x's memory layout"):
        brmp._backward_reduce(out, argmax.contiguous(memory_format=torch.channels_last), x, [3, 3], [2, 2], [1, 1])
    with pytest.raises(ValueError, match="grad_out must have shape"):
        brmp._backward_input(out[:, :, :2].contiguous(), argmax, x, w, b, b, [3, 3], [2, 2], [1, 1])
    with pytest.raises(TypeError, match="scale must have dtype float32"):
        brmp._forward(x, w.double(), b, [3, 3], [2, 2], [1, 1])


def _stem_reference(self, x):
    return self.relu(self.maxpool(self.bn1(x)))


@pytest.mark.parametrize("norm", ["BN", "FrozenBN"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_resnet_stem_matches_unfused(monkeypatch, norm, momentum):
    torch.manual_seed(0)
    net = ResNet("resnet18", norm=norm, freeze_at=0, out_features=("res2", "res3"))
    if norm == "BN":
        net.bn1.momentum = momentum
        net.bn1.weight.data.uniform_(-1, 1)
    elif momentum is None:
        pytest.skip("momentum does not apply to FrozenBatchNorm2d")
    assert type(net.bn1) is (torch.nn.BatchNorm2d if norm == "BN" else FrozenBatchNorm2d)
    ref = copy.deepcopy(net)
    x = torch.randn(2, 3, 64, 72).contiguous(memory_format=torch.channels_last)
    for mode in ("train", "eval", "train"):
        getattr(net, mode)()
        getattr(ref, mode)()
        out = net(x)
        with monkeypatch.context() as m:
            m.setattr(ResNet, "_stem", _stem_reference)
            out_ref = ref(x)
        loss, loss_ref = sum(o.square().mean() for o in out.values()), sum(o.square().mean() for o in out_ref.values())
        torch.testing.assert_close(out["res3"], out_ref["res3"], atol=1e-4, rtol=1e-4)
        if mode == "train":
            loss.backward()
            loss_ref.backward()
            for (n, p), (_, q) in zip(net.named_parameters(), ref.named_parameters()):
                if p.grad is not None or q.grad is not None:
                    torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3, msg=lambda msg, n=n: f"{n}: {msg}")
            net.zero_grad()
            ref.zero_grad()
        for (n, b1), (_, b2) in zip(net.named_buffers(), ref.named_buffers()):
            torch.testing.assert_close(b1, b2, msg=lambda msg, n=n: f"{n}: {msg}")


@cuda_only
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_matches_cpu(channels_last):
    x, w, b, rm, rv = inputs((3, 8, 33, 29), torch.float32, channels_last=channels_last, seed=5)
    cpu = run_both(x, w, b, rm, rv, True, 3, 2, 1)[0]
    gpu = run_both(*(t.cuda() for t in (x, w, b, rm, rv)), True, 3, 2, 1)[0]
    for a, r in zip(gpu, cpu):
        torch.testing.assert_close(a.cpu(), r, atol=1e-4, rtol=1e-4)


def test_double_backward_is_refused():
    x, w, b, rm, rv = inputs((2, 3, 8, 8), torch.float64)
    x.requires_grad_()
    out = ops.batch_norm_relu_max_pool(x, w, b, rm, rv, training=True)
    (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()
