"""modeling.layers: the 1x1 convolution that runs on oneDNN at one thread."""
import pytest
import torch
import torch.nn.functional as F

from mrcnn_fast.modeling.layers import Conv1x1, conv1x1


@pytest.mark.parametrize("shape", [(4, 16, 12, 10), (1, 8, 5, 5), (1, 64, 60, 60), (2, 3, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_conv2d(shape, dtype, channels_last):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(5, shape[1], 1, 1, generator=g, dtype=dtype)
    b = torch.randn(5, generator=g, dtype=dtype)
    grads = []
    for fn in (conv1x1, F.conv2d):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
        y = fn(xi, wi, bi)
        y.backward(torch.ones_like(y))
        grads.append((y.detach(), xi.grad, wi.grad, bi.grad))
    # float32 weight gradients sum up to 3600 unit-size products in a backend-dependent order: ~1e-5 absolute
    tol = dict(rtol=1e-4, atol=2e-4) if dtype == torch.float32 else {}
    for a, r in zip(*grads):
        torch.testing.assert_close(a, r, **tol)


def test_module_is_a_conv2d_with_the_same_state_dict():
    m, ref = Conv1x1(7, 3), torch.nn.Conv2d(7, 3, 1)
    assert isinstance(m, torch.nn.Conv2d)
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 7, 9, 9)
    torch.testing.assert_close(m(x), ref(x))
    assert Conv1x1(7, 3, bias=False).bias is None


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_one_thread_uses_onednn():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(4, 32, 16, 16).contiguous(memory_format=torch.channels_last)
        w = torch.randn(8, 32, 1, 1)
        with torch.profiler.profile() as prof:
            conv1x1(x, w)
        names = {e.key for e in prof.key_averages()}
    finally:
        torch.set_num_threads(saved)
    assert "aten::mkldnn_convolution" in names, sorted(names)
