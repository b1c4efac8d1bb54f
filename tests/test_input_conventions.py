"""The model's input conventions, one switch at a time: input.resize "torchvision" (GeneralizedRCNNTransform) and
"detectron2" (uint8 + PIL bilinear, ResizeShortestEdge sizes), model.input_format "BGR", model.pixel_scale; and the
architecture options of checkpoint import (GroupNorm, normed FPN / heads, RPN head depth, conv box head)."""
import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image

from _model_utils import shapes_batch, tiny_cfg
from mrcnn_fast.config import merge
from mrcnn_fast.data.transforms import resize_shortest_edge, resized_size
from mrcnn_fast.modeling import build_model
from mrcnn_fast.modeling.fuse import fold_frozen_batchnorm
from mrcnn_fast.modeling.heads import ConvFCHead, TwoMLPHead


def _model(model=None, inp=None):
    cfg = tiny_cfg(model)
    if inp:
        cfg = merge(cfg, {"input": inp})
    torch.manual_seed(0)
    return build_model(cfg).eval()


def _uint8_image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


def test_torchvision_resize_equals_generalized_rcnn_transform():
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    model = _model(inp={"resize": "torchvision", "min_size_test": 50, "max_size_test": 90})
    # sides where floor and round differ: 97 x 131 -> 49.99999 x 67.5 (floor 49 x 67), and the max-size cap
    # 61 x 207 -> 26.52 x 90
    sizes = [(97, 131), (61, 207), (131, 97)]
    for h, w in sizes[:2]:
        s = min(50 / min(h, w), 90 / max(h, w))
        assert any(math.floor(x * s) != round(x * s) for x in (h, w))
    images = [_uint8_image(h, w, i).float() / 255 for i, (h, w) in enumerate(sizes)]
    ref = GeneralizedRCNNTransform(50, 90, list(model.pixel_mean.flatten().tolist()),
                                   list(model.pixel_std.flatten().tolist()), size_divisible=32).eval()
    expected, _ = ref(images)
    batch, image_sizes, _, input_sizes = model.preprocess(images)
    assert [tuple(s) for s in expected.image_sizes] == image_sizes
    assert torch.equal(batch, expected.tensors)
    assert input_sizes == sizes
    # the mrcnn_fast resize rounds instead (the first image: 68 columns)
    model.resize = "mrcnn_fast"
    assert model.preprocess(images)[1][0] == (50, 68)


def _d2_output_shape(h, w, short, max_size):
    """detectron2's ResizeShortestEdge.get_output_shape, restated from its documentation for the test."""
    scale = short / min(h, w)
    nh, nw = (short, scale * w) if h < w else (scale * h, short)
    if max(nh, nw) > max_size:
        f = max_size / max(nh, nw)
        nh, nw = nh * f, nw * f
    return int(nh + 0.5), int(nw + 0.5)


def test_detectron2_resize_is_pil_bilinear_of_the_uint8_image_then_bgr_255_normalised():
    mean, std = (103.53, 116.28, 123.675), (57.375, 57.12, 58.395)
    model = _model({"input_format": "BGR", "pixel_scale": 255.0, "pixel_mean": mean, "pixel_std": std},
                   {"resize": "detectron2", "min_size_test": 50, "max_size_test": 90})
    sizes = [(97, 131), (61, 203), (75, 40)]
    images_u8 = [_uint8_image(h, w, i) for i, (h, w) in enumerate(sizes)]
    images = [im.float() / 255 for im in images_u8]
    batch, image_sizes, _, _ = model.preprocess(images)
    for k, ((h, w), im) in enumerate(zip(sizes, images_u8)):
        nh, nw = _d2_output_shape(h, w, 50, 90)
        assert image_sizes[k] == (nh, nw) == resized_size(h, w, 50, 90, "detectron2")
        pil = Image.fromarray(im.permute(1, 2, 0).numpy()).resize((nw, nh), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float().flip(0)     # BGR, 0..255
        expected = (x - torch.tensor(mean).reshape(3, 1, 1)) / torch.tensor(std).reshape(3, 1, 1)
        assert torch.equal(batch[k, :, :nh, :nw], expected)
        assert batch[k, :, nh:].abs().sum() == 0 and batch[k, :, :, nw:].abs().sum() == 0
    # int(x + 0.5): 97 x 131 -> 50 x 67.53 -> 68 columns, where torchvision floors to 67
    assert image_sizes[0] == (50, 68) and resized_size(97, 131, 50, 90, "torchvision") == (49, 67)


def test_detectron2_resize_keeps_targets_in_the_resized_frame():
    im = _uint8_image(40, 60).float() / 255
    target = {"boxes": torch.tensor([[6.0, 4.0, 30.0, 20.0]]), "keypoints": torch.tensor([[[12.0, 8.0, 2.0]]])}
    out, t = resize_shortest_edge(im, target, 25, 1000, mode="detectron2")
    assert out.dtype == torch.uint8 and out.shape[-2:] == (25, 38)
    torch.testing.assert_close(t["boxes"], torch.tensor([[6.0 * 38 / 60, 4.0 * 25 / 40, 30.0 * 38 / 60, 12.5]]))
    torch.testing.assert_close(t["keypoints"][0, 0, :2], torch.tensor([12.0 * 38 / 60, 5.0]))
    with pytest.raises(ValueError, match="resize mode"):
        resize_shortest_edge(im, None, 25, 1000, mode="opencv")


def test_bgr_and_pixel_scale_are_the_same_network_input():
    """BGR with flipped mean / std, and a 0..255 scale with 255x mean / std, feed the network the same numbers."""
    images, _ = shapes_batch(2, (64, 80), seed=1)
    rgb = _model()
    mean, std = rgb.pixel_mean.flatten().tolist(), rgb.pixel_std.flatten().tolist()
    bgr = _model({"input_format": "BGR", "pixel_mean": mean[::-1], "pixel_std": std[::-1]})
    scaled = _model({"pixel_scale": 255.0, "pixel_mean": [m * 255 for m in mean], "pixel_std": [s * 255 for s in std]})
    a = rgb.preprocess(images)[0]
    torch.testing.assert_close(bgr.preprocess(images)[0], a.flip(1), rtol=0, atol=0)
    torch.testing.assert_close(scaled.preprocess(images)[0], a, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="input_format"):
        _model({"input_format": "YUV"})


NORMED = {"backbone": {"norm": "GN", "width": 32}, "fpn": {"norm": "GN"}, "rpn": {"head_convs": 2},
          "roi_heads": {"box_head_num_conv": 2, "box_head_conv_dim": 32, "box_head_num_fc": 1, "box_head_norm": "BN"},
          "mask": {"norm": "BN"}}


def test_architecture_options_names_and_training():
    model = _model(NORMED)
    sd = model.state_dict()
    assert "rpn.head.conv.weight" in sd and "rpn.head.extra_convs.0.weight" in sd
    assert "backbone.fpn.inner_blocks.0.0.weight" in sd and "backbone.fpn.inner_blocks.0.1.weight" in sd
    assert "backbone.fpn.inner_blocks.0.0.bias" not in sd and "backbone.fpn.layer_blocks.3.1.bias" in sd
    assert isinstance(model.roi_heads.box_head, ConvFCHead)
    for k in ("roi_heads.box_head.convs.1.weight", "roi_heads.box_head.norms.1.running_var",
              "roi_heads.box_head.fcs.0.weight", "roi_heads.mask_head.norms.0.running_mean"):
        assert k in sd, k
    assert "roi_heads.box_head.convs.0.bias" not in sd and "roi_heads.mask_head.convs.0.bias" not in sd
    assert isinstance(model.backbone.body.layer1[0].bn1, torch.nn.GroupNorm)
    assert isinstance(_model().roi_heads.box_head, TwoMLPHead)     # 0 conv, 2 fc: the old names
    model.train()
    images, targets = shapes_batch(2, 128, seed=3)
    losses = model(images, targets)
    sum(losses.values()).backward()
    for name in ("backbone.fpn.inner_blocks.0.1.weight", "roi_heads.box_head.norms.0.weight",
                 "roi_heads.mask_head.norms.0.weight", "rpn.head.extra_convs.0.weight"):
        p = dict(model.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_fold_covers_normed_fpn_and_heads_and_box_only_model_runs_through_the_graph():
    from mrcnn_fast.graph import InferenceGraph

    over = copy.deepcopy(NORMED)
    over["backbone"]["norm"] = "FrozenBN"
    over["fpn"]["norm"] = "FrozenBN"
    over["mask"]["enabled"] = False
    over["keypoint"] = {"enabled": False}
    model = _model(over)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "running_var"):
                c = m.running_var.shape[0]
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
        for p in model.roi_heads.box_predictor.parameters():
            p.normal_(0, 0.3, generator=g)
    images, _ = shapes_batch(2, 128, seed=4)
    with torch.no_grad():
        ref = model(images)
    assert ref[0]["boxes"].shape[0] > 0 and "masks" not in ref[0] and "keypoints" not in ref[0]
    fold_frozen_batchnorm(model)
    assert all(isinstance(n, torch.nn.Identity) for n in model.roi_heads.box_head.norms)
    assert isinstance(model.backbone.fpn.layer_blocks[0][1], torch.nn.Identity)
    graph = InferenceGraph.from_model(model)
    with torch.no_grad():
        batch, image_sizes, _, input_sizes = model.preprocess(images)
        out = model.inference(model.to_model_layout(batch), image_sizes, input_sizes, stages=graph)
    for a, b in zip(ref, out):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(b["boxes"], a["boxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(b["scores"], a["scores"], rtol=0, atol=1e-4)
