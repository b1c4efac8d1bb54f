import math

import pytest
import torch
import torchvision
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder

from conftest import rand_boxes
from mrcnn_fast import ops

CLAMP = math.log(1000.0 / 16)


def ref_encode(ref, prop, w):
    out = []
    for r, p in zip(ref.double().tolist(), prop.double().tolist()):
        ew, eh, gw, gh = p[2] - p[0], p[3] - p[1], r[2] - r[0], r[3] - r[1]
        ecx, ecy, gcx, gcy = p[0] + ew / 2, p[1] + eh / 2, r[0] + gw / 2, r[1] + gh / 2
        out.append([w[0] * (gcx - ecx) / ew, w[1] * (gcy - ecy) / eh, w[2] * math.log(gw / ew),
                    w[3] * math.log(gh / eh)])
    return torch.tensor(out, dtype=torch.float64).reshape(-1, 4)


def ref_decode(deltas, boxes, w, clamp=CLAMP):
    out = []
    for d, b in zip(deltas.double().tolist(), boxes.double().tolist()):
        bw, bh = b[2] - b[0], b[3] - b[1]
        cx, cy = b[0] + bw / 2, b[1] + bh / 2
        row = []
        for k in range(len(d) // 4):
            dx, dy, dw, dh = d[4 * k] / w[0], d[4 * k + 1] / w[1], d[4 * k + 2] / w[2], d[4 * k + 3] / w[3]
            dw, dh = min(dw, clamp), min(dh, clamp)
            px, py, pw, ph = dx * bw + cx, dy * bh + cy, math.exp(dw) * bw, math.exp(dh) * bh
            row.append([px - pw / 2, py - ph / 2, px + pw / 2, py + ph / 2])
        out.append(row)
    return torch.tensor(out, dtype=torch.float64).reshape(len(out), -1, 4)


WEIGHTS = [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]


@pytest.mark.parametrize("weights", WEIGHTS)
def test_encode_matches_reference_and_torchvision(device, weights):
    g = torch.Generator().manual_seed(0)
    ref, prop = rand_boxes(64, generator=g), rand_boxes(64, generator=g)
    got = ops.encode_boxes(ref.double().to(device), prop.double().to(device), weights)
    torch.testing.assert_close(got.cpu(), ref_encode(ref, prop, weights), rtol=1e-12, atol=1e-12)
    got32 = ops.encode_boxes(ref.to(device), prop.to(device), weights)
    assert got32.dtype == torch.float32 and got32.shape == (64, 4)
    torch.testing.assert_close(got32.cpu(), TVBoxCoder(weights).encode_single(ref, prop), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("k", [1, 3])
def test_decode_matches_reference_and_torchvision(device, weights, k):
    g = torch.Generator().manual_seed(k)
    boxes = rand_boxes(50, generator=g)
    deltas = torch.randn(50, 4 * k, generator=g) * 2
    deltas[::7, 2::4] = 9.0  # far beyond log(1000/16) * w: the clamp must kick in
    got = ops.decode_boxes(deltas.double().to(device), boxes.double().to(device), weights)
    assert got.shape == (50, k, 4)
    torch.testing.assert_close(got.cpu(), ref_decode(deltas, boxes, weights), rtol=1e-12, atol=1e-9)
    got32 = ops.decode_boxes(deltas.to(device), boxes.to(device), weights)
    expect = TVBoxCoder(weights).decode(deltas, [boxes])
    torch.testing.assert_close(got32.cpu(), expect, rtol=1e-6, atol=1e-4)


def test_decode_custom_clamp_and_box_coder_class():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    deltas = torch.tensor([[0.5, -0.5, 3.0, -1.0]])
    got = ops.decode_boxes(deltas, boxes, (1, 1, 1, 1), clamp=1.0)
    torch.testing.assert_close(got.double(), ref_decode(deltas, boxes, (1, 1, 1, 1), clamp=1.0), rtol=1e-6,
                               atol=1e-5)
    coder = ops.BoxCoder((10.0, 10.0, 5.0, 5.0))
    ref = torch.tensor([[1.0, 2.0, 8.0, 15.0]])
    torch.testing.assert_close(coder.decode(coder.encode(ref, boxes), boxes)[:, 0], ref, rtol=1e-5, atol=1e-5)


def test_box_coder_empty(device):
    e = torch.zeros(0, 4, device=device)
    assert ops.encode_boxes(e, e).shape == (0, 4)
    assert ops.decode_boxes(torch.zeros(0, 8, device=device), e).shape == (0, 2, 4)
    assert ops.clip_boxes(e, (10, 10)).shape == (0, 4)
    assert ops.remove_small_boxes(e, 1.0).shape == (0,)


def test_box_coder_gradcheck():
    g = torch.Generator().manual_seed(3)
    ref = rand_boxes(6, generator=g, dtype=torch.float64).requires_grad_()
    prop = rand_boxes(6, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda r, p: ops.encode_boxes(r, p, (10.0, 10.0, 5.0, 5.0)), (ref, prop))
    deltas = (torch.randn(6, 8, generator=g, dtype=torch.float64) * 0.5)
    deltas[0, 2] = 5.0  # clamped (beyond log(1000/16)): zero gradient there
    deltas.requires_grad_()
    assert torch.autograd.gradcheck(lambda d, b: ops.decode_boxes(d, b, (2.0, 2.0, 1.0, 1.0)), (deltas, prop))
    clip_in = (torch.rand(8, 4, generator=g, dtype=torch.float64) * 30 - 5).requires_grad_()
    assert torch.autograd.gradcheck(lambda b: ops.clip_boxes(b, (20, 25)), (clip_in,))


def test_box_coder_grad_matches_torch_formula():
    # The hand-written backward against autograd through torchvision's tensor formulas.
    g = torch.Generator().manual_seed(4)
    boxes = rand_boxes(10, generator=g, dtype=torch.float64)
    deltas = torch.randn(10, 8, generator=g, dtype=torch.float64)
    deltas[1, 3] = 7.0
    w = (10.0, 10.0, 5.0, 5.0)
    gout = torch.randn(10, 2, 4, generator=g, dtype=torch.float64)
    a = [deltas.clone().requires_grad_(), boxes.clone().requires_grad_()]
    b = [deltas.clone().requires_grad_(), boxes.clone().requires_grad_()]
    (ops.decode_boxes(a[0], a[1], w) * gout).sum().backward()
    (TVBoxCoder(w).decode(b[0], [b[1]]) * gout).sum().backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)


def test_clip_boxes_matches_torchvision(device):
    g = torch.Generator().manual_seed(1)
    boxes = (torch.rand(3, 40, 4, generator=g) * 300 - 50).to(device)
    boxes[0, 0, 0] = float("nan")
    got = ops.clip_boxes(boxes, (120, 200))
    expect = torchvision.ops.clip_boxes_to_image(boxes.cpu(), (120, 200))
    torch.testing.assert_close(got.cpu(), expect, equal_nan=True)
    assert torch.isnan(got[0, 0, 0])


def test_remove_small_boxes_matches_torchvision(device):
    g = torch.Generator().manual_seed(2)
    xy = torch.rand(200, 2, generator=g) * 100
    wh = torch.rand(200, 2, generator=g) * 4
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[:5, 2] = boxes[:5, 0] + 1.5  # exactly at min_size: kept (>=)
    boxes[5, 3] = float("nan")  # NaN side: dropped
    got = ops.remove_small_boxes(boxes.to(device), 1.5)
    torch.testing.assert_close(got.cpu(), torchvision.ops.remove_small_boxes(boxes, 1.5), rtol=0, atol=0)
    assert 5 not in got.tolist()


def test_box_coder_bad_inputs():
    b = rand_boxes(4)
    with pytest.raises(ValueError, match="proposals"):
        ops.encode_boxes(b, b[:3])
    with pytest.raises(TypeError, match="proposals"):
        ops.encode_boxes(b, b.double())
    with pytest.raises(ValueError, match="reference_boxes"):
        ops.encode_boxes(b[:, :2], b)
    with pytest.raises(ValueError, match="weights"):
        ops.encode_boxes(b, b, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="weights"):
        ops.encode_boxes(b, b, (1.0, 0.0, 1.0, 1.0))
    with pytest.raises(TypeError, match="weights"):
        ops.encode_boxes(b, b, "abcd")
    with pytest.raises(ValueError, match="deltas"):
        ops.decode_boxes(torch.zeros(4, 6), b)
    with pytest.raises(ValueError, match="deltas"):
        ops.decode_boxes(torch.zeros(3, 4), b)
    with pytest.raises(TypeError, match="boxes"):
        ops.decode_boxes(torch.zeros(4, 4), b.double())
    with pytest.raises(TypeError, match="deltas"):
        ops.decode_boxes(torch.zeros(4, 4, dtype=torch.int64), b)
    with pytest.raises(ValueError, match="clamp"):
        ops.decode_boxes(torch.zeros(4, 4), b, clamp=float("nan"))
    with pytest.raises(ValueError, match="boxes"):
        ops.clip_boxes(torch.zeros(4, 5), (10, 10))
    with pytest.raises(TypeError, match="image_hw"):
        ops.clip_boxes(b, 10)
    with pytest.raises(ValueError, match="image_hw"):
        ops.clip_boxes(b, (10, -1))
    with pytest.raises(TypeError, match="min_size"):
        ops.remove_small_boxes(b, "1")
    with pytest.raises(ValueError, match="device"):
        ops.decode_boxes(torch.zeros(4, 4, device="meta"), b)


def test_box_coder_opcheck():
    g = torch.Generator().manual_seed(7)
    ref, prop = rand_boxes(5, generator=g), rand_boxes(5, generator=g)
    torch.library.opcheck(torch.ops.mrcnn_fast.encode_boxes.default, (ref, prop, [10.0, 10.0, 5.0, 5.0]))
    torch.library.opcheck(torch.ops.mrcnn_fast.decode_boxes.default,
                          (torch.randn(5, 8, generator=g), prop, [1.0, 1.0, 1.0, 1.0], CLAMP))
    torch.library.opcheck(torch.ops.mrcnn_fast.clip_boxes.default, (ref * 2 - 20, 50.0, 60.0))
    torch.library.opcheck(torch.ops.mrcnn_fast.remove_small_boxes.default, (ref, 30.0))


def test_box_coder_torch_compile_fullgraph():
    class Head(torch.nn.Module):
        def forward(self, deltas, anchors, gt):
            boxes = ops.clip_boxes(ops.decode_boxes(deltas, anchors, (10.0, 10.0, 5.0, 5.0)), (90, 120))
            return boxes, ops.encode_boxes(gt, anchors, (10.0, 10.0, 5.0, 5.0))

    g = torch.Generator().manual_seed(8)
    anchors, gt = rand_boxes(12, generator=g), rand_boxes(12, generator=g)
    deltas = torch.randn(12, 8, generator=g)
    eager = Head()(deltas, anchors, gt)
    compiled = torch.compile(Head(), fullgraph=True, backend="aot_eager")(deltas, anchors, gt)
    for x, y in zip(eager, compiled):
        torch.testing.assert_close(x, y)
