import math

import pytest
import torch
import torchvision

from conftest import cuda_only
from mrcnn_fast import ops


def clustered_boxes(n, seed, *, dtype=torch.float32, device="cpu", clusters=None):
    """Boxes around a few centres, like a detector's raw output: many near-duplicates."""
    g = torch.Generator().manual_seed(seed)
    k = clusters or max(1, n // 20)
    ctr = torch.rand(k, 2, generator=g, dtype=torch.float64) * torch.tensor([600.0, 400.0], dtype=torch.float64)
    wh = torch.rand(k, 2, generator=g, dtype=torch.float64) * 150 + 10
    pick = torch.randint(0, k, (n,), generator=g)
    c = ctr[pick] + torch.randn(n, 2, generator=g, dtype=torch.float64) * wh[pick] * 0.15
    s = wh[pick] * (1 + 0.15 * torch.randn(n, 2, generator=g, dtype=torch.float64)).abs()
    boxes = torch.cat([c - s / 2, c + s / 2], 1)
    scores = torch.rand(n, generator=g, dtype=torch.float64)
    return boxes.to(dtype=dtype, device=device), scores.to(dtype=dtype, device=device)


def ref_nms(boxes, scores, thr, idxs=None):
    """Plain greedy NMS in float64 with Python loops: stable descending order, strict IoU > thr."""
    b = boxes.double().cpu().tolist()
    s = scores.double().cpu().tolist()
    c = idxs.cpu().tolist() if idxs is not None else [0] * len(b)
    order = sorted(range(len(b)), key=lambda i: -s[i])  # sorted() is stable
    removed = [False] * len(b)
    keep = []
    for pi, i in enumerate(order):
        if removed[i]:
            continue
        keep.append(i)
        for j in order[pi + 1:]:
            if removed[j] or c[j] != c[i]:
                continue
            w = max(0.0, min(b[i][2], b[j][2]) - max(b[i][0], b[j][0]))
            h = max(0.0, min(b[i][3], b[j][3]) - max(b[i][1], b[j][1]))
            inter = w * h
            union = (b[i][2] - b[i][0]) * (b[i][3] - b[i][1]) + (b[j][2] - b[j][0]) * (b[j][3] - b[j][1]) - inter
            if union != 0 and inter / union > thr:
                removed[j] = True
    return torch.tensor(keep, dtype=torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.7, 0.95])
def test_nms_matches_torchvision_and_reference(device, dtype, thr):
    boxes, scores = clustered_boxes(400, seed=int(thr * 100), dtype=dtype, device=device)
    got = ops.nms(boxes, scores, thr)
    assert got.dtype == torch.int64 and got.device == boxes.device
    expect = torchvision.ops.nms(boxes.cpu(), scores.cpu(), thr)
    torch.testing.assert_close(got.cpu(), expect, rtol=0, atol=0)
    torch.testing.assert_close(got.cpu(), ref_nms(boxes, scores, thr), rtol=0, atol=0)


def test_nms_large_parallel_sweep_matches_torchvision():
    # Few suppressions: the sweeps after each block are large enough to run on the thread pool.
    boxes, scores = clustered_boxes(6000, seed=3, clusters=3000)
    got = ops.nms(boxes, scores, 0.9)
    expect = torchvision.ops.nms(boxes, scores, 0.9)
    assert len(expect) > 4000
    torch.testing.assert_close(got, expect, rtol=0, atol=0)


def test_nms_random_shapes_partly_outside_tiny_and_huge():
    g = torch.Generator().manual_seed(5)
    for n in (1, 2, 3, 63, 64, 65, 129, 777):
        xy = torch.randn(n, 2, generator=g, dtype=torch.float64) * 200
        scale = torch.exp(torch.randn(n, 1, generator=g, dtype=torch.float64) * 4)  # 1e-4 .. 1e4 sizes
        wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * scale
        boxes = torch.cat([xy, xy + wh], 1).float()
        scores = torch.rand(n, generator=g)
        for thr in (0.1, 0.5):
            torch.testing.assert_close(ops.nms(boxes, scores, thr), torchvision.ops.nms(boxes, scores, thr), rtol=0,
                                       atol=0)


def test_nms_tied_scores_keep_input_order(device):
    boxes, _ = clustered_boxes(300, seed=11, device=device)
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 4, (300,), generator=g).float().to(device)  # heavy ties
    got = ops.nms(boxes, scores, 0.5)
    torch.testing.assert_close(got.cpu(), torchvision.ops.nms(boxes.cpu(), scores.cpu(), 0.5), rtol=0, atol=0)
    torch.testing.assert_close(got.cpu(), ref_nms(boxes, scores, 0.5), rtol=0, atol=0)
    # all scores equal, disjoint boxes: everything kept, in input order
    disjoint = torch.stack([torch.arange(50.0) * 10, torch.zeros(50), torch.arange(50.0) * 10 + 5, torch.ones(50)], 1)
    got = ops.nms(disjoint.to(device), torch.ones(50, device=device), 0.5)
    torch.testing.assert_close(got.cpu(), torch.arange(50), rtol=0, atol=0)
    # +0.0 and -0.0 compare equal in torch: they tie
    got = ops.nms(disjoint[:2].to(device), torch.tensor([-0.0, 0.0], device=device), 0.5)
    torch.testing.assert_close(got.cpu(), torch.tensor([0, 1]), rtol=0, atol=0)


def test_nms_duplicates_and_degenerate_boxes(device):
    dup = torch.tensor([[1.0, 1.0, 5.0, 5.0]] * 4, device=device)
    # identical boxes (IoU 1): only the best survives; with equal scores, the first
    assert ops.nms(dup, torch.tensor([0.1, 0.9, 0.9, 0.5], device=device), 0.99).tolist() == [1]
    # ... but IoU 1 is not > 1
    assert ops.nms(dup, torch.ones(4, device=device), 1.0).tolist() == [0, 1, 2, 3]
    # zero-area boxes: IoU between two of them is 0/0 = NaN, which suppresses nothing; against a real
    # box it is 0
    degen = torch.tensor([[2.0, 2.0, 2.0, 2.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 4.0, 4.0], [3.0, 1.0, 3.0, 5.0]],
                         device=device)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6], device=device)
    got = ops.nms(degen, scores, 0.0)
    assert got.tolist() == torchvision.ops.nms(degen.cpu(), scores.cpu(), 0.0).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nms_iou_exactly_at_threshold(device, dtype):
    # IoU = 70 / 100: exactly 0.7 in float64, 0.699999988 in float32. Suppression needs IoU > thr.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 7.0, 10.0]], dtype=dtype, device=device)
    scores = torch.tensor([1.0, 0.5], dtype=dtype, device=device)
    iou = float(torchvision.ops.box_iou(boxes.cpu(), boxes.cpu())[0, 1])
    for thr in (0.7, iou, math.nextafter(iou, -1.0), 0.69):
        expect = torchvision.ops.nms(boxes.cpu(), scores.cpu(), thr).tolist()
        assert ops.nms(boxes, scores, thr).tolist() == expect, thr
    assert ops.nms(boxes, scores, iou).tolist() == [0, 1]
    assert ops.nms(boxes, scores, math.nextafter(iou, -1.0)).tolist() == [0]


def test_nms_empty_and_single(device):
    e = torch.zeros(0, 4, device=device)
    assert ops.nms(e, torch.zeros(0, device=device), 0.5).shape == (0,)
    assert ops.batched_nms(e, torch.zeros(0, device=device), torch.zeros(0, dtype=torch.int64, device=device),
                           0.5).shape == (0,)
    keep, count = ops.nms_fixed(e, torch.zeros(0, device=device), 0.5, 3)
    assert keep.tolist() == [-1, -1, -1] and int(count) == 0
    one = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=device)
    assert ops.nms(one, torch.tensor([0.3], device=device), 0.5).tolist() == [0]


def test_nms_fixed_pads_and_truncates(device):
    boxes, scores = clustered_boxes(500, seed=2, device=device)
    full = ops.nms(boxes, scores, 0.5)
    keep, count = ops.nms_fixed(boxes, scores, 0.5, 1000)
    assert keep.shape == (1000,) and count.shape == () and count.dtype == torch.int64
    assert int(count) == len(full)
    torch.testing.assert_close(keep[: len(full)], full, rtol=0, atol=0)
    assert (keep[len(full):] == -1).all()
    keep, count = ops.nms_fixed(boxes, scores, 0.5, 7)
    assert int(count) == 7
    torch.testing.assert_close(keep, full[:7], rtol=0, atol=0)
    keep, count = ops.nms_fixed(boxes, scores, 0.5, 0)
    assert keep.shape == (0,) and int(count) == 0
    idxs = torch.arange(500, device=device) % 3
    fullb = ops.batched_nms(boxes, scores, idxs, 0.5)
    keep, count = ops.batched_nms_fixed(boxes, scores, idxs, 0.5, 10)
    assert int(count) == 10
    torch.testing.assert_close(keep, fullb[:10], rtol=0, atol=0)


@pytest.mark.parametrize("n", [300, 1500])  # torchvision: coordinate trick below 1000 boxes, per class above
@pytest.mark.parametrize("classes", [1, 3, 80])
def test_batched_nms_matches_torchvision(device, n, classes):
    boxes, scores = clustered_boxes(n, seed=n + classes, device=device)
    g = torch.Generator().manual_seed(classes)
    idxs = torch.randint(0, classes, (n,), generator=g).to(device)
    got = ops.batched_nms(boxes, scores, idxs, 0.5)
    expect = torchvision.ops.batched_nms(boxes.cpu(), scores.cpu(), idxs.cpu(), 0.5)
    torch.testing.assert_close(got.cpu(), expect, rtol=0, atol=0)
    torch.testing.assert_close(got.cpu(), ref_nms(boxes, scores, 0.5, idxs), rtol=0, atol=0)


def test_batched_nms_odd_class_ids_and_dtypes():
    boxes, scores = clustered_boxes(400, seed=9)
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 4, (400,), generator=g)
    odd = torch.tensor([-(2**62), -1, 7, 2**40])[raw]  # negative and huge category ids
    expect = torchvision.ops.batched_nms(boxes, scores, raw, 0.5)
    torch.testing.assert_close(ops.batched_nms(boxes, scores, odd, 0.5), expect, rtol=0, atol=0)
    torch.testing.assert_close(ops.batched_nms(boxes, scores, raw.int(), 0.5), expect, rtol=0, atol=0)
    # a single category is plain NMS
    torch.testing.assert_close(ops.batched_nms(boxes, scores, torch.zeros(400, dtype=torch.int64), 0.5),
                               ops.nms(boxes, scores, 0.5), rtol=0, atol=0)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nms_cuda_half_matches_cpu_float(dtype):
    boxes, scores = clustered_boxes(1000, seed=4, dtype=dtype, device="cuda")
    idxs = torch.arange(1000, device="cuda") % 5
    # The CUDA path computes the IoU of the (rounded) inputs in float32, like the CPU on float32 copies.
    exp = ops.nms(boxes.float().cpu(), scores.float().cpu(), 0.6)
    torch.testing.assert_close(ops.nms(boxes, scores, 0.6).cpu(), exp, rtol=0, atol=0)
    exp = ops.batched_nms(boxes.float().cpu(), scores.float().cpu(), idxs.cpu(), 0.6)
    torch.testing.assert_close(ops.batched_nms(boxes, scores, idxs, 0.6).cpu(), exp, rtol=0, atol=0)


@cuda_only
def test_nms_cuda_large_matches_cpu():
    boxes, scores = clustered_boxes(20000, seed=8, device="cuda")
    torch.testing.assert_close(ops.nms(boxes, scores, 0.7).cpu(), ops.nms(boxes.cpu(), scores.cpu(), 0.7), rtol=0,
                               atol=0)
    keep, count = ops.nms_fixed(boxes, scores, 0.7, 300)
    torch.testing.assert_close(keep.cpu(), ops.nms(boxes.cpu(), scores.cpu(), 0.7)[:300], rtol=0, atol=0)


def test_nms_bad_inputs():
    b, s = clustered_boxes(5, seed=0)
    with pytest.raises(ValueError, match="boxes"):
        ops.nms(b[:, :3], s, 0.5)
    with pytest.raises(ValueError, match="boxes"):
        ops.nms(b[None], s, 0.5)
    with pytest.raises(TypeError, match="boxes"):
        ops.nms(b.long(), s, 0.5)
    with pytest.raises(TypeError, match="boxes"):
        ops.nms(b.tolist(), s, 0.5)
    with pytest.raises(ValueError, match="scores"):
        ops.nms(b, s[:4], 0.5)
    with pytest.raises(ValueError, match="scores"):
        ops.nms(b, s[:, None], 0.5)
    with pytest.raises(TypeError, match="scores"):
        ops.nms(b, s.double(), 0.5)
    with pytest.raises(ValueError, match="device"):
        ops.nms(b, s.to("meta"), 0.5)
    with pytest.raises(TypeError, match="iou_threshold"):
        ops.nms(b, s, "0.5")
    with pytest.raises(TypeError, match="iou_threshold"):
        ops.nms(b, s, None)
    with pytest.raises(ValueError, match="iou_threshold"):
        ops.nms(b, s, float("nan"))
    for bad in (float("nan"), float("inf"), -float("inf")):
        bb = b.clone()
        bb[2, 1] = bad
        with pytest.raises(ValueError, match="boxes"):
            ops.nms(bb, s, 0.5)
        with pytest.raises(ValueError, match="boxes"):
            ops.batched_nms(bb, s, torch.zeros(5, dtype=torch.int64), 0.5)
        with pytest.raises(ValueError, match="boxes"):
            ops.nms_fixed(bb, s, 0.5, 3)
        ss = s.clone()
        ss[0] = bad
        with pytest.raises(ValueError, match="scores"):
            ops.nms(b, ss, 0.5)
    with pytest.raises(ValueError, match="idxs"):
        ops.batched_nms(b, s, torch.zeros(4, dtype=torch.int64), 0.5)
    with pytest.raises(TypeError, match="idxs"):
        ops.batched_nms(b, s, torch.zeros(5), 0.5)
    with pytest.raises(TypeError, match="idxs"):
        ops.batched_nms(b, s, [0] * 5, 0.5)
    with pytest.raises(ValueError, match="max_out"):
        ops.nms_fixed(b, s, 0.5, -1)
    with pytest.raises(TypeError, match="max_out"):
        ops.nms_fixed(b, s, 0.5, 2.0)


def test_nms_opcheck():
    b, s = clustered_boxes(50, seed=1)
    idxs = torch.arange(50) % 3
    torch.library.opcheck(torch.ops.mrcnn_fast.nms_fixed.default, (b, s, 0.5, 20))
    torch.library.opcheck(torch.ops.mrcnn_fast.batched_nms_fixed.default, (b, s, idxs, 0.5, 20))
    torch.library.opcheck(torch.ops.mrcnn_fast.nms.default, (b, s, 0.5))
    torch.library.opcheck(torch.ops.mrcnn_fast.batched_nms.default, (b, s, idxs, 0.5))


def test_nms_torch_compile_fullgraph():
    class Post(torch.nn.Module):
        def forward(self, boxes, scores, labels):
            keep, count = ops.batched_nms_fixed(boxes, scores, labels, 0.5, 16)
            valid = keep >= 0
            safe = keep.clamp(min=0)
            return boxes[safe] * valid[:, None], scores[safe] * valid, count

    b, s = clustered_boxes(80, seed=6)
    labels = torch.arange(80) % 4
    eager = Post()(b, s, labels)
    compiled = torch.compile(Post(), fullgraph=True, backend="aot_eager")(b, s, labels)
    for x, y in zip(eager, compiled):
        torch.testing.assert_close(x, y)
