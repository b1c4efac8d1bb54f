"""detectron2's inference conventions as switches of the model, each against an independent reimplementation of
detectron2's formulas written here (detectron2 itself cannot be installed in CI):

- anchors: unrounded cells (anchors.rounded false), size-major order (anchors.order "size_ratio"), grids spaced
  by the nominal stride (anchors.grid_strides "detectron2"): DefaultAnchorGenerator with offset 0;
- FPN level of a RoI (roi_heads.pooler_level_mapping "detectron2"): assign_boxes_to_levels;
- RPN min_size 0: only empty proposals removed (find_top_rpn_proposals with Boxes.nonempty(0));
- roi_heads.test_min_box_side 0: no small-box filter (fast_rcnn_inference_single_image);
- keypoint.score "prob": the 4th column of heatmaps_to_keypoints;
- mask.threshold_inclusive (with mask.paste "aligned"): paste_masks_in_image thresholded with >= 0.5;
- roi_heads.test_output_clip: detector_postprocess (scale, clip to the output size, drop empty boxes).
And the C++ inference graph equals the torch stages with every switch on.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from _model_utils import mask_iou, shapes_batch, tiny_cfg
from mrcnn_fast import ops
from mrcnn_fast.graph import InferenceGraph
from mrcnn_fast.modeling import build_model
from mrcnn_fast.modeling import postprocess as pp
from mrcnn_fast.modeling.refine import clip_or_keep
from mrcnn_fast.modeling.rpn import RPN
from mrcnn_fast.ops.anchors import AnchorGenerator

torchvision = pytest.importorskip("torchvision")


# ---- detectron2's formulas, written from its source -------------------------------------------------------


def d2_cell_anchors(sizes, aspect_ratios):
    """DefaultAnchorGenerator.generate_cell_anchors: size outer, ratio inner, Python floats, then float32."""
    out = []
    for size in sizes:
        area = size ** 2.0
        for ar in aspect_ratios:
            w = math.sqrt(area / ar)
            h = ar * w
            out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(out).float()


def d2_grid_anchors(sizes, aspect_ratios, stride, grid_hw, offset=0.0):
    """DefaultAnchorGenerator._grid_anchors for one level."""
    base = d2_cell_anchors(sizes, aspect_ratios)
    gh, gw = grid_hw
    sx = torch.arange(offset * stride, gw * stride, step=stride, dtype=torch.float32)
    sy = torch.arange(offset * stride, gh * stride, step=stride, dtype=torch.float32)
    shift_y, shift_x = torch.meshgrid(sy, sx, indexing="ij")
    shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
    shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
    return (shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4)


def d2_levels(boxes, min_level, max_level, canonical_box_size=224, canonical_level=4):
    """poolers.assign_boxes_to_levels (0-based)."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    lv = torch.floor(canonical_level + torch.log2(torch.sqrt(area) / canonical_box_size + 1e-8))
    return torch.clamp(lv, min=min_level, max=max_level).to(torch.int64) - min_level


D2_SCALE_CLAMP = math.log(1000.0 / 16)


def d2_apply_deltas(deltas, boxes, weights=(1.0, 1.0, 1.0, 1.0), clamp=D2_SCALE_CLAMP):
    """Box2BoxTransform.apply_deltas."""
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ctr_x, ctr_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw, dh = (deltas[:, 2::4] / ww).clamp(max=clamp), (deltas[:, 3::4] / wh).clamp(max=clamp)
    px, py = dx * widths[:, None] + ctr_x[:, None], dy * heights[:, None] + ctr_y[:, None]
    pw, ph = torch.exp(dw) * widths[:, None], torch.exp(dh) * heights[:, None]
    x1, y1, x2, y2 = px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph
    return torch.stack((x1, y1, x2, y2), dim=-1).view(deltas.shape)


def d2_clip(boxes, hw):
    h, w = hw
    return torch.stack([boxes[:, 0].clamp(min=0, max=w), boxes[:, 1].clamp(min=0, max=h),
                        boxes[:, 2].clamp(min=0, max=w), boxes[:, 3].clamp(min=0, max=h)], -1)


def d2_nonempty(boxes, threshold=0.0):
    return ((boxes[:, 2] - boxes[:, 0]) > threshold) & ((boxes[:, 3] - boxes[:, 1]) > threshold)


def d2_rpn_proposals(objectness, deltas, anchors, image_hw, nms_thresh, pre, post, min_box_size=0.0):
    """find_top_rpn_proposals for one image at test time (ranked and NMSed by logit)."""
    scores, props, lvls = [], [], []
    for lvl, (o, d, a) in enumerate(zip(objectness, deltas, anchors)):
        k = min(o.shape[0], pre)
        s, idx = o.topk(k)
        scores.append(s)
        props.append(d2_apply_deltas(d[idx], a[idx]))
        lvls.append(torch.full((k,), lvl, dtype=torch.int64))
    s, b, lv = torch.cat(scores), torch.cat(props), torch.cat(lvls)
    b = d2_clip(b, image_hw)
    keep = d2_nonempty(b, min_box_size)
    b, s, lv = b[keep], s[keep], lv[keep]
    keep = torchvision.ops.batched_nms(b, s, lv, nms_thresh)[:post]
    return b[keep], s[keep]


def d2_fast_rcnn_inference(boxes, scores, image_hw, score_thresh, nms_thresh, topk):
    """fast_rcnn_inference_single_image; boxes [R, K * 4] (foreground classes), scores [R, K + 1] background last."""
    scores = scores[:, :-1]
    k = boxes.shape[1] // 4
    boxes = d2_clip(boxes.reshape(-1, 4), image_hw).view(-1, k, 4)
    mask = scores > score_thresh
    inds = mask.nonzero()
    boxes, scores = boxes[mask], scores[mask]
    keep = torchvision.ops.batched_nms(boxes, scores, inds[:, 1], nms_thresh)[:topk]
    return boxes[keep], scores[keep], inds[keep, 1]


def d2_heatmaps_to_keypoints(maps, rois):
    """structures.keypoints.heatmaps_to_keypoints: (x, y, logit, prob) per keypoint."""
    offset_x, offset_y = rois[:, 0], rois[:, 1]
    widths = (rois[:, 2] - rois[:, 0]).clamp(min=1)
    heights = (rois[:, 3] - rois[:, 1]).clamp(min=1)
    wc, hc = widths.ceil(), heights.ceil()
    n, k = maps.shape[:2]
    out = maps.new_zeros(n, k, 4)
    idx = torch.arange(k)
    for i in range(n):
        roi_map = F.interpolate(maps[[i]], size=(int(hc[i]), int(wc[i])), mode="bicubic", align_corners=False)[0]
        max_score = roi_map.view(k, -1).max(1)[0].view(k, 1, 1)
        full = (roi_map - max_score).exp_()
        pool = (maps[i] - max_score).exp_()
        probs = full / pool.sum((1, 2), keepdim=True)
        w = roi_map.shape[2]
        pos = roi_map.view(k, -1).argmax(1)
        x_int = pos % w
        y_int = (pos - x_int) // w
        out[i, :, 0] = (x_int.float() + 0.5) * (widths[i] / wc[i]) + offset_x[i]
        out[i, :, 1] = (y_int.float() + 0.5) * (heights[i] / hc[i]) + offset_y[i]
        out[i, :, 2] = roi_map[idx, y_int, x_int]
        out[i, :, 3] = probs[idx, y_int, x_int]
    return out


def d2_paste_masks(masks, boxes, image_hw, threshold=0.5):
    """layers.mask_ops.paste_masks_in_image on the CPU (one box at a time, skip_empty): the float values of each
    pasted mask (zero outside its region) and the thresholded bool masks."""
    img_h, img_w = image_hw
    n = masks.shape[0]
    values = torch.zeros(n, img_h, img_w)
    for i in range(n):
        b = boxes[i:i + 1]
        x0_int, y0_int = torch.clamp(b.min(dim=0).values.floor()[:2] - 1, min=0).to(torch.int32)
        x1_int = torch.clamp(b[:, 2].max().ceil() + 1, max=img_w).to(torch.int32)
        y1_int = torch.clamp(b[:, 3].max().ceil() + 1, max=img_h).to(torch.int32)
        x0, y0, x1, y1 = torch.split(b, 1, dim=1)
        img_y = torch.arange(y0_int, y1_int, dtype=torch.float32) + 0.5
        img_x = torch.arange(x0_int, x1_int, dtype=torch.float32) + 0.5
        img_y = (img_y - y0) / (y1 - y0) * 2 - 1
        img_x = (img_x - x0) / (x1 - x0) * 2 - 1
        gx = img_x[:, None, :].expand(1, img_y.size(1), img_x.size(1))
        gy = img_y[:, :, None].expand(1, img_y.size(1), img_x.size(1))
        grid = torch.stack([gx, gy], dim=3)
        v = F.grid_sample(masks[i:i + 1, None].float(), grid, align_corners=False)[0, 0]
        values[i, y0_int:y1_int, x0_int:x1_int] = v
    return values, values >= threshold


def d2_detector_postprocess(boxes, image_hw, output_hw):
    """detector_postprocess's boxes: scaled, clipped to the output size, empty ones dropped -> (boxes, keep)."""
    (h, w), (oh, ow) = image_hw, output_hw
    sx, sy = ow / w, oh / h
    b = boxes.clone()
    b[:, 0::2] *= sx
    b[:, 1::2] *= sy
    b = d2_clip(b, (oh, ow))
    keep = d2_nonempty(b)
    return b[keep], keep


# ---- 1. anchors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes,ratios", [((32,), (0.5, 1.0, 2.0)), ((32, 64, 128, 256, 512), (0.5, 1.0, 2.0)),
                                          ((24.0, 24 * 2 ** (1 / 3), 24 * 2 ** (2 / 3)), (0.5, 1.0, 2.0, 3.0))])
def test_anchors_equal_detectron2_default_generator(sizes, ratios):
    strides = (4, 8, 16, 32, 64)
    ag = AnchorGenerator((sizes,) * 5, (ratios,) * 5, rounded=False, order="size_ratio", strides=strides)
    grids = [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)]   # an 800 x 1216 batch; P6 is ceil(P5 / 2)
    ours = ag.levels((800, 1216), grids)
    for lvl, (a, s, g) in enumerate(zip(ours, strides, grids)):
        assert torch.equal(a, d2_grid_anchors(sizes, ratios, s, g)), lvl
    # cached: the same tensors again
    assert all(x is y for x, y in zip(ours, ag.levels((800, 1216), grids)))
    assert ag.levels((800, 1216), grids, dtype=torch.float64)[0].dtype == torch.float64


def test_anchor_order_switch_alone_reorders_torchvision_cells():
    """order "size_ratio" with rounded cells: torchvision's anchors, size-major at each location."""
    sizes, ratios = (32.0, 64.0, 128.0), (0.5, 1.0, 2.0)
    scales, ar = torch.tensor(sizes), torch.tensor(ratios)
    h_ratios = torch.sqrt(ar)
    ws = ((1 / h_ratios)[:, None] * scales[None, :]).view(-1)
    hs = (h_ratios[:, None] * scales[None, :]).view(-1)
    cells = (torch.stack([-ws, -hs, ws, hs], 1) / 2).round()          # torchvision: ratio outer, size inner
    cells = cells.view(len(ratios), len(sizes), 4).transpose(0, 1).reshape(-1, 4)   # size outer
    stride = 16
    ys, xs = torch.meshgrid(torch.arange(5) * stride, torch.arange(7) * stride, indexing="ij")
    shifts = torch.stack([xs.reshape(-1), ys.reshape(-1), xs.reshape(-1), ys.reshape(-1)], 1)
    want = (shifts[:, None, :] + cells[None]).reshape(-1, 4).float()
    got = AnchorGenerator((sizes,), (ratios,), order="size_ratio").levels((80, 112), [(5, 7)])[0]
    assert torch.equal(got, want)
    default = AnchorGenerator((sizes,), (ratios,)).levels((80, 112), [(5, 7)])[0]
    assert not torch.equal(got, default) and torch.equal(got.sort(0).values, default.sort(0).values)


def test_anchor_rounding_switch_alone():
    """rounded false in torchvision's order: detectron2's exact cells, ratio-major."""
    sizes, ratios = (32.0, 45.25), (0.5, 1.0, 2.0)
    cells = d2_cell_anchors(sizes, ratios).view(len(sizes), len(ratios), 4).transpose(0, 1).reshape(-1, 4)
    got = AnchorGenerator((sizes,), (ratios,), rounded=False).levels((64, 64), [(1, 1)])[0]
    assert torch.equal(got, cells)
    rounded = AnchorGenerator((sizes,), (ratios,)).levels((64, 64), [(1, 1)])[0]
    assert not torch.equal(got, rounded) and torch.equal(got.round(), rounded)


def test_anchor_grid_strides_switch_alone():
    """torchvision spaces P6 of an 800-row batch (13 rows) by 800 // 13 = 61; detectron2 by its stride, 64."""
    grids = [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)]
    tv = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((1.0,),) * 5)
    d2 = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((1.0,),) * 5, strides=(4, 8, 16, 32, 64))
    a_tv, a_d2 = tv.levels((800, 1216), grids), d2.levels((800, 1216), grids)
    for lvl in range(4):
        assert torch.equal(a_tv[lvl], a_d2[lvl])
    step = lambda a: (a.view(13, 19, 4)[1, 0] - a.view(13, 19, 4)[0, 0]).tolist()  # noqa: E731
    assert step(a_tv[4]) == [0, 61, 0, 61] and step(a_d2[4]) == [0, 64, 0, 64]
    assert torch.equal(a_d2[4], d2_grid_anchors((512,), (1.0,), 64, (13, 19)).round())


def test_anchor_switches_from_config_and_bad_values():
    cfg = tiny_cfg({"anchors": {"rounded": False, "order": "size_ratio", "grid_strides": "detectron2"}})
    rpn = RPN.from_config(cfg, 32, (4, 8, 16, 32, 64))
    ag = rpn.anchor_generator
    assert (ag.rounded, ag.order, ag.strides) == (False, "size_ratio", (4, 8, 16, 32, 64))
    with pytest.raises(ValueError, match="grid_strides"):
        RPN.from_config(cfg, 32)
    with pytest.raises(ValueError, match="grid_strides"):
        RPN.from_config(tiny_cfg({"anchors": {"grid_strides": "nominal"}}), 32, (4, 8, 16, 32, 64))
    with pytest.raises(ValueError, match="order"):
        AnchorGenerator(order="size")
    with pytest.raises(ValueError, match="strides"):
        AnchorGenerator(strides=(4, 8))
    with pytest.raises(TypeError, match="rounded"):
        AnchorGenerator(rounded=0)
    model = build_model(cfg)
    assert model.rpn.anchor_generator.strides == tuple(model.backbone.strides)


# ---- 2. FPN level mapping ---------------------------------------------------------------------------------


def _level_boxes():
    g = torch.Generator().manual_seed(0)
    sides = torch.cat([torch.rand(400, generator=g) * 900 + 0.01,
                       torch.tensor([224.0, 112.0, 448.0, 56.0, 28.0, 14.0, 7.0, 3.5, 1.0, 0.02]),
                       torch.tensor([112.0, 224.0, 448.0, 56.0])[:, None].mul(
                           1 + torch.linspace(-3e-7, 3e-7, 25)[None]).reshape(-1)])
    aspect = torch.rand(sides.shape[0], generator=g) + 0.5
    w, h = sides * aspect.sqrt(), sides / aspect.sqrt()
    xy = torch.rand(sides.shape[0], 2, generator=g) * 100
    boxes = torch.cat([xy, xy + torch.stack([w, h], 1)], 1)
    return torch.cat([boxes, torch.tensor([[5.0, 5.0, 5.0, 9.0]])])    # and an empty box


def test_level_mapping_equals_detectron2():
    boxes = _level_boxes()
    want = d2_levels(boxes, 2, 5)
    assert torch.equal(ops.fpn_level_assign(boxes, 2, 5, level_mapping="detectron2"), want)
    rois = torch.cat([torch.zeros(boxes.shape[0], 1), boxes], 1)
    assert torch.equal(ops.fpn_level_assign(rois, 2, 5, level_mapping="detectron2"), want)
    # the eps sits inside the log in detectron2, outside in torchvision: some boxes change level
    tv = ops.fpn_level_assign(boxes, 2, 5)
    assert (tv != want).any()
    with pytest.raises(ValueError, match="level_mapping"):
        ops.fpn_level_assign(boxes, 2, 5, level_mapping="fpn")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_multilevel_roi_align_pools_from_detectron2_levels(dtype):
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, 4, 256 // 2 ** k, 256 // 2 ** k, generator=g, dtype=dtype) for k in range(4)]
    boxes = _level_boxes().to(dtype)[::4].clamp(max=1000) * 0.25
    rois = torch.cat([torch.randint(0, 2, (boxes.shape[0], 1), generator=g).to(dtype), boxes], 1)
    out = ops.multilevel_roi_align(feats, rois, 7, [1 / 4, 1 / 8, 1 / 16, 1 / 32], 0, True,
                                   level_mapping="detectron2")
    levels = d2_levels(boxes, 2, 5)     # in the boxes' dtype, as detectron2 computes it
    want = torch.zeros_like(out)
    for lvl in range(4):
        idx = torch.where(levels == lvl)[0]
        want[idx] = ops.roi_align(feats[lvl], rois[idx], 7, 1 / 2 ** (lvl + 2), 0, True)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    # the RoIPooler of the config switch
    model_cfg = tiny_cfg({"roi_heads": {"pooler_level_mapping": "detectron2", "pooler_sampling_ratio": 0}})
    pooler = build_model(model_cfg).roi_heads.box_pooler
    assert pooler.level_mapping == "detectron2"
    pooler = type(pooler)(7, [4, 8, 16, 32], sampling_ratio=0, aligned=True, level_mapping="detectron2")
    torch.testing.assert_close(pooler(feats, rois), want, rtol=0, atol=0)


# ---- 3. RPN min_size 0 ------------------------------------------------------------------------------------


def _rpn_case(seed=0, image=(60, 72)):
    """Random RPN outputs on a 3-level grid whose anchors hang out of the image: many proposals clip to empty."""
    g = torch.Generator().manual_seed(seed)
    obj, dts, anc = [], [], []
    for n in (300, 120, 40):
        obj.append(torch.randn(n, generator=g) * 2)
        dts.append(torch.randn(n, 4, generator=g) * 0.2)
        ctr = torch.rand(n, 2, generator=g) * 140 - 30
        size = torch.rand(n, 2, generator=g) * 20 + 1
        anc.append(torch.cat([ctr - size / 2, ctr + size / 2], 1))
    # sides of 1e-4 px survive min_size 0 but not torchvision's 1e-3
    anc[0][:5] = torch.tensor([10.0, 10.0, 10.0001, 30.0]) + torch.arange(5.0)[:, None] * 8
    dts[0][:5] = 0
    obj[0][:5] = 6.0 + torch.arange(5.0) * 0.37
    return obj, dts, anc, image


@pytest.mark.parametrize("seed", [0, 1])
def test_rpn_min_size_zero_equals_detectron2(seed):
    obj, dts, anc, hw = _rpn_case(seed)
    boxes, scores, counts = ops.generate_proposals([o[None] for o in obj], [d[None] for d in dts], anc, [hw],
                                                   pre_nms_top_n=200, post_nms_top_n=150, nms_thresh=0.7,
                                                   min_size=0.0)
    k = int(counts[0])
    want_b, want_logit = d2_rpn_proposals(obj, dts, anc, hw, 0.7, 200, 150)
    assert k == want_b.shape[0]
    torch.testing.assert_close(boxes[0, :k], want_b, rtol=0, atol=1e-5)
    torch.testing.assert_close(scores[0, :k], want_logit.sigmoid(), rtol=2e-7, atol=0)   # the core's own sigmoid
    # the 1e-4 px slivers are kept; torchvision's min_size 1e-3 drops them, and both drop the empty boxes
    sliver = ((boxes[0, :k, 2] - boxes[0, :k, 0]) < 1e-3).sum()
    assert sliver > 0
    _, _, c_tv = ops.generate_proposals([o[None] for o in obj], [d[None] for d in dts], anc, [hw],
                                        pre_nms_top_n=200, post_nms_top_n=150, nms_thresh=0.7, min_size=1e-3)
    assert int(c_tv[0]) < k
    assert ((boxes[0, :k, 2] > boxes[0, :k, 0]) & (boxes[0, :k, 3] > boxes[0, :k, 1])).all()
    with pytest.raises(ValueError, match="min_size"):
        ops.generate_proposals([o[None] for o in obj], [d[None] for d in dts], anc, [hw], pre_nms_top_n=10,
                               post_nms_top_n=10, nms_thresh=0.7, min_size=-1.0)


# ---- 4. roi_heads.test_min_box_side -----------------------------------------------------------------------


def _box_outputs(seed=0, r=60, c=4, image=(50, 64)):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(r, 2, generator=g) * 90 - 10
    props = torch.cat([xy, xy + torch.rand(r, 2, generator=g) * 30 + 0.5], 1)
    props[:6] = torch.tensor([70.0, 5.0, 80.0, 20.0])     # right of the image: clipped to an empty box
    logits = torch.randn(r, c + 1, generator=g) * 2
    logits[:6, 2] = 6.0
    deltas = torch.randn(r, 4 * (c + 1), generator=g) * 0.3
    return logits, deltas, props, image


def test_min_box_side_zero_equals_detectron2_fast_rcnn_inference():
    logits, deltas, props, hw = _box_outputs()
    probs, boxes = pp.class_probs_and_boxes(logits, deltas, props, (10.0, 10.0, 5.0, 5.0))
    dets = pp.select_detections(probs, boxes, torch.tensor([props.shape[0]]), [hw], score_thresh=0.05,
                                nms_thresh=0.5, detections_per_image=30, min_box_side=0.0)
    # detectron2's layout: foreground classes first, background last, boxes without the background row
    d2_scores = torch.cat([probs[:, 1:], probs[:, :1]], 1)
    d2_boxes = boxes[:, 1:].reshape(boxes.shape[0], -1)
    wb, ws, wl = d2_fast_rcnn_inference(d2_boxes, d2_scores, hw, 0.05, 0.5, 30)
    k = int(dets.counts[0])
    assert k == wb.shape[0]
    assert torch.equal(dets.labels[0, :k], wl + 1)
    torch.testing.assert_close(dets.boxes[0, :k], wb, rtol=0, atol=0)
    torch.testing.assert_close(dets.scores[0, :k], ws, rtol=0, atol=0)
    empty = (dets.boxes[0, :k, 2] <= dets.boxes[0, :k, 0]).sum()
    assert empty > 0                                   # kept by detectron2, dropped by the default
    default = pp.select_detections(probs, boxes, torch.tensor([props.shape[0]]), [hw], score_thresh=0.05,
                                   nms_thresh=0.5, detections_per_image=30)
    n = int(default.counts[0])
    assert n < k or (default.boxes[0, :, 2] > default.boxes[0, :, 0])[:n].all()


def test_min_box_side_from_config_graph_and_refiners():
    cfg = tiny_cfg({"roi_heads": {"test_min_box_side": 0.0}})
    model = build_model(cfg).eval()
    assert model.roi_heads.min_box_side == 0.0
    assert InferenceGraph.from_model(model).config["min_box_side"] == 0.0
    with pytest.raises(ValueError, match="test_min_box_side"):
        build_model(tiny_cfg({"roi_heads": {"test_min_box_side": -1.0}}))
    # graph stage 2 with min_box_side 0 equals the reference (empty boxes kept)
    logits, deltas, props, hw = _box_outputs(seed=3)
    proposals, counts = props[None], torch.tensor([props.shape[0]])
    feats = [torch.randn(1, 8, 64 // 2 ** k, 64 // 2 ** k) for k in range(4)]
    gcfg = InferenceGraph.from_model(model).config
    gcfg.update(score_thresh=0.05, nms_thresh=0.5, detections_per_image=30, box_weights=[10.0, 10.0, 5.0, 5.0])
    graph = InferenceGraph(gcfg)
    ref = pp.detections_from_box_outputs(logits, deltas, proposals, counts, [hw], weights=(10.0, 10.0, 5.0, 5.0),
                                         score_thresh=0.05, nms_thresh=0.5, detections_per_image=30, min_box_side=0.0)
    out, _, _ = graph.detection_stage(logits, deltas, proposals, counts, feats, [hw])
    assert torch.equal(out.counts, ref.counts) and torch.equal(out.labels, ref.labels)
    assert torch.equal(out.boxes, ref.boxes)
    assert (ref.boxes[0, :int(ref.counts[0]), 2] <= ref.boxes[0, :int(ref.counts[0]), 0]).any()
    # refiners: a box the clip collapses keeps its old one; with min side 0 only an empty side counts
    old = torch.tensor([[10.0, 10.0, 20.0, 20.0]] * 3)
    new = torch.tensor([[70.0, 12.0, 90.0, 18.0], [63.999, 12.0, 90.0, 18.0], [0.0, 0.0, 1e-3, 5.0]])
    assert torch.equal(clip_or_keep(new, old, (50, 64), 0.0)[:, 0], torch.tensor([10.0, 63.999, 0.0]))
    assert torch.equal(clip_or_keep(new, old, (50, 64))[:, 0], torch.tensor([10.0, 10.0, 10.0]))   # 1e-2 default


# ---- 5. keypoint scores -----------------------------------------------------------------------------------


def test_keypoint_prob_scores_equal_detectron2():
    from mrcnn_fast._lib import _C, dl
    g = torch.Generator().manual_seed(2)
    maps = torch.randn(12, 5, 28, 28, generator=g) * 3
    xy0 = torch.rand(12, 2, generator=g) * 100
    boxes = torch.cat([xy0, xy0 + torch.rand(12, 2, generator=g) * 120 + 0.3], 1)
    want = d2_heatmaps_to_keypoints(maps, boxes)
    xy, s = pp.heatmaps_to_keypoints(maps, boxes, score="prob")
    assert torch.equal(xy[..., :2], want[..., :2])
    torch.testing.assert_close(s, want[..., 3], rtol=1e-5, atol=0)
    _, logit = pp.heatmaps_to_keypoints(maps, boxes)
    assert torch.equal(logit, want[..., 2])
    c_xy, c_s = torch.empty_like(xy), torch.empty_like(s)
    _C.InferenceGraph.heatmaps_to_keypoints(dl(maps), dl(boxes), dl(c_xy), dl(c_s), True)
    assert torch.equal(c_xy, xy)
    torch.testing.assert_close(c_s, want[..., 3], rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="keypoint score"):
        pp.heatmaps_to_keypoints(maps, boxes, score="softmax")
    with pytest.raises(ValueError, match="keypoint.score"):
        build_model(tiny_cfg({"keypoint": {"enabled": True, "score": "probability"}}))


# ---- 6. masks and detector_postprocess --------------------------------------------------------------------


def test_mask_paste_detectron2_equals_paste_masks_in_image():
    g = torch.Generator().manual_seed(5)
    n, hw = 16, (70, 90)
    probs = torch.rand(n, 28, 28, generator=g)
    probs = F.avg_pool2d(probs[:, None], 5, 1, 2)[:, 0]          # smooth masks with a mix of values around 0.5
    xy = torch.rand(n, 2, generator=g) * 80 - 5
    boxes = d2_clip(torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 60 + 0.5], 1), hw)   # as detectron2 pastes
    boxes = boxes[d2_nonempty(boxes)]
    n = boxes.shape[0]
    probs = probs[:n]
    boxes[0] = torch.tensor([3.0, 4.0, 81.0, 66.0])              # large box: wide bilinear tails
    boxes[1] = torch.tensor([2.0, 2.0, 30.0, 30.0])              # mask pixels on image pixels
    probs[1] = 0.5                                               # exactly at the threshold: in (>=)
    values, want = d2_paste_masks(probs, boxes, hw)
    got = pp.paste_masks(probs[:, None], boxes, hw, mask_format="bool", aligned=True, inclusive=True)
    near = (values - 0.5).abs() < 1e-5                           # float32 grid vs our float64 coordinates
    assert ((got != want) & ~near).sum() == 0
    # detectron2's float32 grid puts some border samples a rounding error off the pixel centres (those are `near`)
    assert got[1, 2:30, 2:30].all() and want[1, 2:30, 2:30].float().mean() > 0.9
    strict = pp.paste_masks(probs[:, None], boxes, hw, mask_format="bool", aligned=True)
    assert not strict[1].any()                                   # > 0.5 (the default) leaves it out
    rle = pp.paste_masks(probs[:, None], boxes, hw, mask_format="rle", aligned=True, inclusive=True)
    from mrcnn_fast.ops import rle_encode
    assert rle == rle_encode(got)
    # the float values agree to float32 rounding inside detectron2's paste region
    prob = pp.paste_masks(probs[:, None], boxes, hw, mask_format="prob", aligned=True)[:, 0]
    region = values != 0
    torch.testing.assert_close(prob[region], values[region], rtol=0, atol=2e-6)


def test_output_clip_equals_detector_postprocess():
    boxes = torch.tensor([[0.0, 0.0, 63.9, 47.5], [10.0, 5.0, 64.0, 50.0], [64.0, 3.0, 64.0, 9.0],
                          [1.25, 2.5, 33.3, 40.1], [20.0, 50.0, 30.0, 50.0]])
    scores, labels = torch.linspace(0.9, 0.5, 5), torch.tensor([1, 2, 3, 1, 2])
    probs = torch.rand(5, 1, 14, 14)
    kp, kps = torch.rand(5, 3, 3) * 40, torch.rand(5, 3)
    for image, output in (((50, 64), (75, 96)), ((50, 64), (33, 41)), ((48, 64), (427, 640))):
        want_b, keep = d2_detector_postprocess(boxes, image, output)
        out = pp.detector_postprocess(boxes, scores, labels, image, output, mask_probs=probs, keypoints=kp,
                                      keypoint_scores=kps, mask_format="bool", aligned=True, inclusive=True,
                                      clip=True)
        assert torch.equal(out["boxes"], want_b)
        assert torch.equal(out["scores"], scores[keep]) and torch.equal(out["labels"], labels[keep])
        assert out["masks"].shape == (int(keep.sum()),) + output
        _, want_m = d2_paste_masks(probs[keep, 0], want_b, output)
        assert all(mask_iou(a, b) >= 0.99 for a, b in zip(out["masks"], want_m))
        assert torch.equal(out["keypoints_scores"], kps[keep]) and out["keypoints"].shape[0] == int(keep.sum())
        assert keep.sum() < 5
        plain = pp.detector_postprocess(boxes, scores, labels, image, output)
        assert plain["boxes"].shape[0] == 5


# ---- the graph with every switch on -----------------------------------------------------------------------


D2_SWITCHES = {"anchors": {"rounded": False, "order": "size_ratio", "grid_strides": "detectron2"},
               "rpn": {"min_size": 0.0},
               "roi_heads": {"pooler_level_mapping": "detectron2", "pooler_sampling_ratio": 0,
                             "test_min_box_side": 0.0, "test_output_clip": True},
               "keypoint": {"enabled": True, "score": "prob"},
               "mask": {"paste": "aligned", "threshold_inclusive": True}}


def _assert_results_close(ref, out, fmt):
    assert len(ref) == len(out)
    for a, b in zip(ref, out):
        assert list(a) == list(b)
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(b["boxes"], a["boxes"], rtol=0, atol=0)
        torch.testing.assert_close(b["scores"], a["scores"], rtol=2e-6, atol=1e-7)
        if "masks" in a:
            if fmt == "prob":
                torch.testing.assert_close(b["masks"], a["masks"], rtol=0, atol=1e-6)
            else:
                assert all(mask_iou(x, y) >= 0.999 for x, y in zip(a["masks"], b["masks"]))
        if "masks_rle" in a:
            assert sum(x == y for x, y in zip(a["masks_rle"], b["masks_rle"])) >= len(a["masks_rle"]) - 1
        if "keypoints" in a:
            torch.testing.assert_close(b["keypoints"], a["keypoints"], rtol=0, atol=0)
            torch.testing.assert_close(b["keypoints_scores"], a["keypoints_scores"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("c4", [False, True])
def test_graph_equals_torch_stages_with_detectron2_switches(c4):
    over = {k: dict(v) for k, v in D2_SWITCHES.items()}
    if c4:
        over.update(fpn={"enabled": False}, anchors=dict(over["anchors"], sizes=[[16, 32, 64]]),
                    keypoint={"enabled": False})
    torch.manual_seed(0)
    model = build_model(tiny_cfg(over, size=96)).eval()
    model.roi_heads.score_thresh = 0.0
    assert model.mask_paste == "aligned" and model.mask_threshold_inclusive and model.clip_output
    graph = InferenceGraph.from_model(model, fallback=False)
    assert graph.config["mask_threshold_inclusive"] and graph.config["clip_output"]
    assert graph.config["box_pooler"]["level_mapping"] == "detectron2" and graph.config["rpn_min_size"] == 0.0
    images, _ = shapes_batch(3, size=(96, 128), seed=2)
    images[1] = images[1][:, :80, :100]
    batch, image_sizes, _, input_sizes = model.preprocess(images)
    for fmt in ("prob", "bool", "rle"):
        ref = model.inference(batch, image_sizes, input_sizes, mask_format=fmt)
        out = model.inference(batch, image_sizes, input_sizes, mask_format=fmt, stages=graph)
        assert sum(len(r["boxes"]) for r in ref) > 0
        _assert_results_close(ref, out, fmt)


def test_graph_drops_detections_the_output_clip_empties():
    cfg = InferenceGraph.from_model(build_model(tiny_cfg(D2_SWITCHES)).eval()).config
    graph = InferenceGraph(cfg)
    boxes = torch.zeros(2, 4, 4)
    boxes[0, :3] = torch.tensor([[64.0, 3.0, 64.0, 9.0], [1.0, 2.0, 30.0, 40.0], [5.0, 49.0, 20.0, 50.0]])
    boxes[1, :2] = torch.tensor([[10.0, 10.0, 10.0, 20.0], [3.0, 3.0, 9.0, 9.0]])
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.0], [0.6, 0.5, 0.0, 0.0]])
    labels = torch.tensor([[1, 2, 3, 0], [2, 1, 0, 0]])
    dets = pp.Detections(boxes, scores, labels, torch.tensor([3, 2]))
    ml, kl = torch.randn(5, 4, 28, 28), torch.randn(5, 4, 24, 24)
    sizes, sizes0 = [(50, 64), (40, 40)], [(75, 96), (20, 20)]
    lab = pp.pack(dets.labels, dets.counts, 5)
    for fmt in ("prob", "bool", "rle"):
        ref = pp.detector_results(dets, sizes, sizes0, mask_probs=pp.mask_probs(ml, lab), keypoint_heatmaps=kl,
                                  mask_format=fmt, aligned=True, keypoint_score="prob", inclusive=True, clip=True)
        out = graph.result_stage(dets, ml, kl, sizes, sizes0, mask_format=fmt)
        assert [len(r["boxes"]) for r in ref] == [2, 1]
        _assert_results_close(ref, out, fmt)
