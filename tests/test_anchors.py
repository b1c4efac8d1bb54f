import numpy as np
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from conftest import cuda_only
from mrcnn_fast import ops

grid_anchors_op = torch.ops.mrcnn_fast.grid_anchors.default

FPN_SIZES = ((32,), (64,), (128,), (256,), (512,))
FPN_RATIOS = ((0.5, 1.0, 2.0),) * 5


def ref_anchors(sizes, ratios, stride_hw, feature_hw, dtype):
    """Loops: float32 cell anchors (sqrt, reciprocal, round half to even), shifted in the output dtype."""
    f32 = np.float32
    cells = []
    for r in ratios:
        h = np.sqrt(f32(r))
        w = f32(1) / h
        for s in sizes:
            ws, hs = w * f32(s), h * f32(s)
            cells.append([np.rint(-ws / f32(2)), np.rint(-hs / f32(2)), np.rint(ws / f32(2)), np.rint(hs / f32(2))])
    T = np.float32 if dtype == torch.float32 else np.float64
    out = []
    for y in range(feature_hw[0]):
        for x in range(feature_hw[1]):
            sx, sy = T(x * stride_hw[1]), T(y * stride_hw[0])
            for c in cells:
                out.append([sx + T(c[0]), sy + T(c[1]), sx + T(c[2]), sy + T(c[3])])
    return torch.tensor(np.array(out, dtype=T).reshape(-1, 4))


def images(batch, h, w, device="cpu", dtype=torch.float32):
    return ImageList(torch.zeros(batch, 3, h, w, device=device, dtype=dtype), [(h, w)] * batch)


def features(batch, h, w, strides, device="cpu", dtype=torch.float32):
    return [torch.zeros(batch, 2, -(-h // s), -(-w // s), device=device, dtype=dtype) for s in strides]


CASES = [
    ((32,), (0.5, 1.0, 2.0), (4, 4), (5, 7)),
    ((45.25, 17.3, 1.0, 3.0), (0.3, 1 / 3, 3.7, 1.0), (8, 16), (3, 4)),
    ((128, 256, 512), (0.5, 1.0, 2.0), (16, 16), (6, 9)),
    ((0.5, 7.0), (0.01, 100.0, 0.77), (1, 3), (4, 2)),
    ((1.0,), (1.0,), (32, 32), (1, 1)),  # half extent 0.5 rounds to 0 (half to even)
    ((33.0,), (1.0,), (2, 2), (0, 5)),  # empty grid
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_anchors_for_level_matches_reference(device, dtype, case):
    sizes, ratios, stride, feat = case
    got = ops.anchors_for_level(sizes, ratios, stride, feat, dtype=dtype, device=device)
    assert got.shape == (feat[0] * feat[1] * len(sizes) * len(ratios), 4) and got.dtype == dtype
    assert got.device.type == device.type
    assert torch.equal(got.cpu(), ref_anchors(sizes, ratios, stride, feat, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES[:5])
def test_grid_matches_torchvision_bitwise(device, dtype, case):
    sizes, ratios, stride, feat = case
    tv = TVAnchorGenerator((sizes,), (ratios,))
    il = images(1, feat[0] * stride[0], feat[1] * stride[1], device, dtype)
    ref = tv(il, [torch.zeros(1, 1, *feat, device=device, dtype=dtype)])[0]
    got = ops.anchors_for_level(sizes, ratios, stride, feat, dtype=dtype, device=device)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("hw", [(800, 1344), (512, 672), (37, 61)])
def test_generator_matches_torchvision_fpn(device, hw):
    il = images(2, *hw, device)
    feats = features(2, *hw, (4, 8, 16, 32, 64), device)
    ref = TVAnchorGenerator(FPN_SIZES, FPN_RATIOS)(il, feats)
    gen = ops.AnchorGenerator()
    got = gen(il, feats)
    assert len(got) == 2 and all(torch.equal(g, r) for g, r in zip(got, ref))
    assert gen.num_anchors_per_location() == [3] * 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_generator_levels_match_torchvision(dtype):
    hw = (100, 136)
    il = images(2, *hw, dtype=dtype)
    feats = features(2, *hw, (4, 8, 16, 32, 64), dtype=dtype)
    gen = ops.AnchorGenerator(FPN_SIZES, FPN_RATIOS[0])
    levels = gen.levels(hw, [f.shape[-2:] for f in feats], dtype)
    assert [t.shape[0] for t in levels] == [f.shape[-2] * f.shape[-1] * 3 for f in feats]
    assert all(t.dtype == dtype for t in levels)
    assert torch.equal(torch.cat(levels), TVAnchorGenerator(FPN_SIZES, FPN_RATIOS)(il, feats)[0])
    assert gen.levels(hw, [f.shape[-2:] for f in feats], dtype)[0] is levels[0]  # cached
    with pytest.raises(ValueError, match="feature maps"):
        gen.levels(hw, [(25, 34)], dtype)


def test_generator_flat_arguments_and_cache():
    tv = TVAnchorGenerator((32, 64), (0.5, 1.0))
    gen = ops.AnchorGenerator((32, 64), (0.5, 1.0), cache_size=2)
    il = images(3, 64, 96)
    feats = features(3, 64, 96, (8, 16))
    first = gen(il, feats)
    assert all(torch.equal(g, r) for g, r in zip(first, tv(il, feats)))
    assert gen(il, feats)[0] is first[0]  # cached
    as_double = gen(il, [f.double() for f in feats])
    assert as_double[0].dtype == torch.float64 and torch.equal(as_double[0], tv(il, [f.double() for f in feats])[0])
    gen(images(1, 32, 32), features(1, 32, 32, (8, 16)))  # evicts the float32 entry (cache_size=2)
    again = gen(il, feats)
    assert again[0] is not first[0] and torch.equal(again[0], first[0])
    # A CPU half feature map: computed in float32 and cast, like torchvision's result.
    half = gen(il, [f.half() for f in feats])[0]
    assert half.dtype == torch.float16
    torch.testing.assert_close(half, tv(il, [f.half() for f in feats])[0], rtol=0, atol=0)


def test_grid_anchors_levels():
    got = ops.grid_anchors(((16,), (32, 48)), ((1.0,), (0.5, 2.0)), ((4, 4), (8, 8)), ((3, 3), (2, 2)))
    assert [t.shape for t in got] == [(9, 4), (16, 4)]
    assert torch.equal(got[1], ref_anchors((32, 48), (0.5, 2.0), (8, 8), (2, 2), torch.float32))
    with pytest.raises(ValueError, match="strides"):
        ops.grid_anchors(((16,),), ((1.0,),), ((4, 4), (8, 8)), ((3, 3),))


def test_bad_inputs():
    good = dict(sizes=(32,), aspect_ratios=(1.0,), stride_hw=(4, 4), feature_hw=(2, 2))

    def call(**kw):
        return ops.anchors_for_level(**{**good, **kw})

    for bad in ((), (0,), (-32,), (float("nan"),), (float("inf"),)):
        with pytest.raises(ValueError, match="sizes"):
            call(sizes=bad)
        with pytest.raises(ValueError, match="aspect_ratios"):
            call(aspect_ratios=bad)
    with pytest.raises(TypeError, match="sizes"):
        call(sizes=32)
    with pytest.raises(TypeError, match="aspect_ratios"):
        call(aspect_ratios=("wide",))
    with pytest.raises(ValueError, match="at most 128"):
        call(sizes=tuple(range(1, 13)), aspect_ratios=tuple(0.1 * i for i in range(1, 12)))
    for bad in ((0, 4), (4, -1)):
        with pytest.raises(ValueError, match="stride_hw"):
            call(stride_hw=bad)
    for bad in ((4.5, 4), 4, (4, 4, 4)):
        with pytest.raises(TypeError, match="stride_hw"):
            call(stride_hw=bad)
    with pytest.raises(ValueError, match="feature_hw"):
        call(feature_hw=(-1, 2))
    with pytest.raises(TypeError, match="dtype"):
        call(dtype=torch.int64)
    with pytest.raises(TypeError, match="dtype"):
        call(dtype=torch.float16)  # no CPU half kernel (the module falls back to float32)
    # The core checks its own arguments too (reached through the raw op).
    with pytest.raises(ValueError, match="strides"):
        grid_anchors_op([32.0], [1.0], 0, 4, 2, 2, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="sizes"):
        grid_anchors_op([-1.0], [1.0], 4, 4, 2, 2, torch.float32, torch.device("cpu"))
    # Module arguments.
    with pytest.raises(ValueError, match="levels"):
        ops.AnchorGenerator(((32,), (64,)), ((1.0,),) * 3)
    with pytest.raises(ValueError, match=r"sizes\[1\]"):
        ops.AnchorGenerator(((32,), (-64,)), ((1.0,),) * 2)
    gen = ops.AnchorGenerator()
    with pytest.raises(ValueError, match="feature maps"):
        gen(images(1, 64, 64), features(1, 64, 64, (4, 8)))
    with pytest.raises(TypeError, match="image_list"):
        gen(torch.zeros(1, 3, 64, 64), features(1, 64, 64, (4, 8, 16, 32, 64)))
    with pytest.raises(ValueError, match="strides"):  # feature map larger than the image: stride 0
        gen(images(1, 8, 8), features(1, 64, 64, (4, 8, 16, 32, 64)))


def test_opcheck():
    torch.library.opcheck(grid_anchors_op, ([32.0, 64.0], [0.5, 1.0, 2.0], 8, 4, 3, 5, torch.float32,
                                            torch.device("cpu")))
    torch.library.opcheck(grid_anchors_op, ([16.0], [1.0], 4, 4, 0, 3, torch.float64, torch.device("cpu")))


def test_torch_compile_fullgraph():
    def fn(feat):
        h, w = feat.shape[-2:]
        anchors = ops.anchors_for_level((32, 64), (0.5, 1.0, 2.0), (8, 8), (h, w), dtype=feat.dtype,
                                        device=feat.device)
        return anchors.view(h, w, -1) + feat.sum()

    feat = torch.ones(1, 1, 4, 6)
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(feat), fn(feat))


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_cuda_matches_torchvision(dtype):
    il = images(2, 800, 1344, "cuda", dtype)
    feats = features(2, 800, 1344, (4, 8, 16, 32, 64), "cuda", dtype)
    ref = TVAnchorGenerator(FPN_SIZES, FPN_RATIOS)(il, feats)
    got = ops.AnchorGenerator()(il, feats)
    assert got[0].dtype == dtype and got[0].is_cuda
    assert all(torch.equal(g, r) for g, r in zip(got, ref))
    cpu = ops.anchors_for_level((45.25, 17.3), (0.3, 3.7), (8, 16), (9, 11))
    assert torch.equal(ops.anchors_for_level((45.25, 17.3), (0.3, 3.7), (8, 16), (9, 11), device="cuda").cpu(), cpu)


@cuda_only
def test_cuda_opcheck():
    torch.library.opcheck(grid_anchors_op, ([32.0], [0.5, 2.0], 8, 8, 3, 4, torch.float16, torch.device("cuda")))
