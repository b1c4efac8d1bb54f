"""The post-processing layer (modeling/postprocess.py), the three padded inference stages, mask_format, the lean
RoIHeads and where the extras live."""
import inspect

import numpy as np
import pytest
import torch

from _model_utils import shapes_batch, tiny_cfg
from mrcnn_fast.modeling import (
    CascadeRefinement,
    CascadeRoIHeads,
    FlipTTA,
    IterativeBoxRefinement,
    MaskBoxRefinement,
    RoIHeads,
    build_model,
    inference_model,
)
from mrcnn_fast.modeling import postprocess as pp
from mrcnn_fast.modeling.tta import join_padded

F64 = torch.float64


def _decode(deltas, boxes, weights):
    """BoxCoder.decode written out (no clamp reached here)."""
    wx, wy, ww, wh = weights
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    dx, dy, dw, dh = (deltas[..., i] for i in range(4))
    pcx, pcy = dx / wx * w[:, None] + cx[:, None], dy / wy * h[:, None] + cy[:, None]
    pw, ph = torch.exp(dw / ww) * w[:, None], torch.exp(dh / wh) * h[:, None]
    return torch.stack([pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2], -1)


# ---- padded <-> packed ---------------------------------------------------------------------------


def test_pack_and_rois_from_padded():
    boxes = torch.arange(3 * 4 * 4, dtype=F64).reshape(3, 4, 4)
    counts = torch.tensor([2, 0, 3])
    image, pos = pp.packed_rows(counts, 5)
    assert image.tolist() == [0, 0, 2, 2, 2] and pos.tolist() == [0, 1, 0, 1, 2]
    torch.testing.assert_close(pp.pack(boxes, counts, 5), torch.cat([boxes[0, :2], boxes[2, :3]]))
    rois = pp.rois_from_padded(boxes, counts, 5)
    assert rois.dtype == F64 and rois[:, 0].tolist() == [0, 0, 2, 2, 2]
    torch.testing.assert_close(rois[:, 1:], pp.pack(boxes, counts, 5))
    assert pp.rois_from_padded(boxes, torch.zeros(3, dtype=torch.int64), 0).shape == (0, 5)


def test_join_padded_keeps_each_views_valid_rows():
    a = torch.arange(1, 2 * 3 * 4 + 1, dtype=F64).reshape(2, 3, 4)
    b = -torch.arange(1, 2 * 2 * 4 + 1, dtype=F64).reshape(2, 2, 4)
    joined, counts = join_padded(a, torch.tensor([2, 0]), b, torch.tensor([1, 2]))
    assert joined.shape == (2, 5, 4) and counts.tolist() == [3, 2]
    torch.testing.assert_close(joined[0, :3], torch.cat([a[0, :2], b[0, :1]]))
    torch.testing.assert_close(joined[1, :2], b[1])
    assert not joined[0, 3:].any() and not joined[1, 2:].any()     # padding (even a's) is zero


# ---- box head -> detections ----------------------------------------------------------------------


def test_class_probs_and_boxes_by_hand():
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, -1.0, 0.5]], dtype=torch.float32)
    props = torch.tensor([[10.0, 20.0, 50.0, 40.0], [0.0, 0.0, 8.0, 16.0]], dtype=F64)
    reg = torch.tensor([[0.0] * 4 + [1.0, -2.0, 0.5, 0.3] + [0.0, 0.0, -0.4, 0.2],
                        [0.5] * 12], dtype=torch.float32)
    probs, boxes = pp.class_probs_and_boxes(logits, reg, props, (10.0, 10.0, 5.0, 5.0))
    assert probs.dtype == F64 and boxes.shape == (2, 3, 4)
    torch.testing.assert_close(probs, torch.softmax(logits.to(F64), -1))
    torch.testing.assert_close(boxes, _decode(reg.to(F64).reshape(2, 3, 4), props, (10.0, 10.0, 5.0, 5.0)))
    torch.testing.assert_close(boxes[0, 0], props[0])       # zero deltas: the proposal itself


def test_class_probs_and_boxes_no_rois():
    probs, boxes = pp.class_probs_and_boxes(torch.zeros((0, 3)), torch.zeros((0, 12)), torch.zeros((0, 4)),
                                            (10.0, 10.0, 5.0, 5.0))
    assert probs.shape == (0, 3) and boxes.shape == (0, 3, 4)


def _select(probs, boxes, counts, sizes, thresh=0.05, nms=0.5, d=100):
    return pp.select_detections(probs, boxes, torch.tensor(counts), sizes, score_thresh=thresh, nms_thresh=nms,
                                detections_per_image=d)


def test_select_detections_no_proposals():
    dets = _select(torch.zeros(0, 4, dtype=F64), torch.zeros(0, 4, 4, dtype=F64), [0, 0], [(50, 60), (40, 40)], d=7)
    assert dets.boxes.shape == (2, 7, 4) and dets.scores.shape == (2, 7) and dets.labels.shape == (2, 7)
    assert dets.counts.tolist() == [0, 0] and not dets.boxes.any() and dets.labels.dtype == torch.int64


def test_select_detections_threshold_clip_small_boxes_nms_topk():
    # 1 foreground class; RoI 0 scores 0.9, RoI 1 0.05 (not above the threshold), RoI 2 0.8 overlaps RoI 0,
    # RoI 3 0.7 lies outside the image, RoI 4 0.6 is separate
    probs = torch.tensor([[0.1, 0.9], [0.95, 0.05], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6]], dtype=F64)
    boxes = torch.tensor([[0, 0, 0, 0, 10, 10, 30, 30], [0, 0, 0, 0, 40, 40, 45, 45],
                          [0, 0, 0, 0, 11, 11, 31, 31], [0, 0, 0, 0, 70, 5, 90, 20],
                          [0, 0, 0, 0, 35, 0, 80, 30]], dtype=F64).reshape(5, 2, 4)
    dets = _select(probs, boxes, [5], [(40, 60)])
    assert dets.counts.tolist() == [2]
    torch.testing.assert_close(dets.boxes[0, :2], torch.tensor([[10, 10, 30, 30], [35, 0, 60, 30]], dtype=F64))
    assert dets.scores[0, :2].tolist() == [0.9, 0.6] and dets.labels[0, :2].tolist() == [1, 1]
    assert not dets.boxes[0, 2:].any() and not dets.scores[0, 2:].any() and not dets.labels[0, 2:].any()
    # top-K: the best detections_per_image
    dets = _select(probs, boxes, [5], [(40, 60)], d=1)
    assert dets.counts.tolist() == [1] and dets.scores[0].tolist() == [0.9]


def test_select_detections_all_boxes_outside_the_image():
    probs = torch.tensor([[0.1, 0.5, 0.4]] * 3, dtype=F64)
    boxes = torch.tensor([[100.0, 100.0, 120.0, 130.0], [-30.0, 5.0, -10.0, 20.0], [10.0, 60.0, 20.0, 80.0]],
                         dtype=F64)[:, None].expand(3, 3, 4)
    dets = _select(probs, boxes, [3], [(50, 50)])
    assert dets.counts.tolist() == [0] and not dets.boxes.any()


def test_select_detections_ties_and_classes():
    """Equal scores: NMS keeps the first of two overlapping boxes of one class; other classes never suppress."""
    probs = torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.5, 0.5]], dtype=F64)
    box = torch.tensor([10.0, 10.0, 30.0, 30.0], dtype=F64)
    boxes = torch.stack([torch.stack([box, box, box]), torch.stack([box, box + 1, box + 1])])
    dets = _select(probs, boxes, [2], [(64, 64)])
    # pairs in order (RoI 0, class 1), (RoI 0, class 2), (RoI 1, class 1), (RoI 1, class 2): one per class survives
    assert dets.counts.tolist() == [2] and dets.labels[0, :2].tolist() == [1, 2]
    torch.testing.assert_close(dets.boxes[0, :2], torch.stack([box, box]))


def test_select_detections_batch_of_two_equals_each_image_alone():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(9, 4, generator=g, dtype=F64) * 3, -1)
    xy = torch.rand(9, 4, 2, generator=g, dtype=F64) * 40
    boxes = torch.cat([xy, xy + 5 + torch.rand(9, 4, 2, generator=g, dtype=F64) * 30], -1)
    sizes = [(60, 70), (50, 40)]
    both = _select(probs, boxes, [5, 4], sizes, thresh=0.2, d=6)
    for i, (sl, hw) in enumerate([(slice(0, 5), sizes[0]), (slice(5, 9), sizes[1])]):
        one = _select(probs[sl], boxes[sl], [sl.stop - sl.start], [hw], thresh=0.2, d=6)
        k = int(one.counts[0])
        assert int(both.counts[i]) == k
        for a, b in zip(both[:3], one[:3]):
            assert torch.equal(a[i], b[0])
    assert both.counts.tolist() != [0, 0]


def test_detections_from_box_outputs_is_decode_then_select():
    g = torch.Generator().manual_seed(1)
    proposals = torch.zeros(2, 4, 4)
    proposals[0, :3] = torch.tensor([[5.0, 5.0, 30.0, 40.0], [20.0, 10.0, 60.0, 30.0], [0.0, 0.0, 10.0, 10.0]])
    proposals[1, :1] = torch.tensor([[8.0, 2.0, 50.0, 44.0]])
    counts = torch.tensor([3, 1])
    logits, reg = torch.randn(4, 3, generator=g), torch.randn(4, 12, generator=g) * 0.1
    kw = dict(score_thresh=0.05, nms_thresh=0.5, detections_per_image=5)
    got = pp.detections_from_box_outputs(logits, reg, proposals, counts, [(48, 64), (48, 64)],
                                         weights=(10.0, 10.0, 5.0, 5.0), **kw)
    probs, boxes = pp.class_probs_and_boxes(logits, reg, pp.pack(proposals, counts, 4), (10.0, 10.0, 5.0, 5.0))
    want = pp.select_detections(probs, boxes, counts, [(48, 64), (48, 64)], **kw)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# ---- masks and keypoints -------------------------------------------------------------------------


def test_mask_probs_sigmoid_softmax_and_class_agnostic():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, 5, 5, generator=g, dtype=F64)
    labels = torch.tensor([2, 1, 3])
    got = pp.mask_probs(logits, labels, "sigmoid")
    assert got.shape == (3, 1, 5, 5)
    torch.testing.assert_close(got[:, 0], torch.sigmoid(logits[torch.arange(3), labels]))
    torch.testing.assert_close(pp.mask_probs(logits[:, :1], labels, "sigmoid")[:, 0], torch.sigmoid(logits[:, 0]))
    p = torch.softmax(logits, 1)
    own = p[torch.arange(3), labels]
    other = torch.stack([torch.cat([p[i, :c], p[i, c + 1:]]).amax(0) for i, c in enumerate(labels.tolist())])
    torch.testing.assert_close(pp.mask_probs(logits, labels, "softmax")[:, 0], own / (own + other))
    two = torch.softmax(logits[:, :2], 1)      # class-agnostic softmax: channel 1 against background
    torch.testing.assert_close(pp.mask_probs(logits[:, :2], labels, "softmax")[:, 0],
                               two[:, 1] / (two[:, 1] + two[:, 0]))
    assert pp.mask_probs(logits[:0], labels[:0], "softmax").shape == (0, 1, 5, 5)
    assert pp.mask_probs(logits[:0], labels[:0]).shape == (0, 1, 5, 5)


def test_heatmaps_to_keypoints_by_hand():
    maps = torch.zeros(2, 3, 8, 8, dtype=F64)
    maps[0, 0, 2, 3] = 5.0          # box 8 x 8 px: the heatmap is resized to its own size (identity)
    maps[0, 1, 7, 0] = 4.0
    maps[0, 2, 0, 7] = 3.0
    maps[1, :, 4, 4] = 2.0
    boxes = torch.tensor([[10.0, 20.0, 18.0, 28.0], [0.0, 0.0, 16.0, 16.0]], dtype=F64)
    xy, scores = pp.heatmaps_to_keypoints(maps, boxes)
    torch.testing.assert_close(xy[0], torch.tensor([[13.5, 22.5, 1.0], [10.5, 27.5, 1.0], [17.5, 20.5, 1.0]],
                                                   dtype=F64))
    torch.testing.assert_close(scores[0], torch.tensor([5.0, 4.0, 3.0], dtype=F64))
    assert xy.shape == (2, 3, 3) and (xy[1, :, 2] == 1).all()
    assert ((xy[1, :, :2] >= 8) & (xy[1, :, :2] <= 10)).all()   # the peak of cell 4 of 8, upsampled 2x
    e_xy, e_s = pp.heatmaps_to_keypoints(maps[:0], boxes[:0])
    assert e_xy.shape == (0, 3, 3) and e_s.shape == (0, 3)


# ---- detector post-processing --------------------------------------------------------------------


def test_paste_masks_formats_agree():
    from pycocotools import mask as mask_util

    g = torch.Generator().manual_seed(3)
    probs = torch.rand(3, 1, 14, 14, generator=g)
    boxes = torch.tensor([[2.0, 3.0, 30.0, 20.0], [10.0, 0.0, 12.0, 40.0], [-5.0, -5.0, 60.0, 45.0]])
    for aligned in (True, False):
        prob = pp.paste_masks(probs, boxes, (40, 50), mask_format="prob", aligned=aligned)
        binary = pp.paste_masks(probs, boxes, (40, 50), mask_format="bool", aligned=aligned)
        rle = pp.paste_masks(probs, boxes, (40, 50), mask_format="rle", aligned=aligned)
        assert prob.shape == (3, 1, 40, 50) and binary.shape == (3, 40, 50) and binary.dtype == torch.bool
        assert torch.equal(binary, prob[:, 0] > 0.5) and binary.any()
        dec = np.stack([mask_util.decode(r) for r in rle])
        assert np.array_equal(dec.astype(bool), binary.numpy())
    assert pp.paste_masks(probs[:0], boxes[:0], (40, 50), mask_format="prob").shape == (0, 1, 40, 50)
    e = pp.paste_masks(probs[:0], boxes[:0], (40, 50), mask_format="bool")
    assert e.shape == (0, 40, 50) and e.dtype == torch.bool
    assert pp.paste_masks(probs[:0], boxes[:0], (40, 50), mask_format="rle") == []
    with pytest.raises(ValueError, match="mask_format"):
        pp.paste_masks(probs, boxes, (40, 50), mask_format="png")


def test_detector_postprocess_rescales_to_the_input_image():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    kp = torch.tensor([[[12.0, 22.0, 1.0], [30.0, 40.0, 1.0]]])
    probs = torch.ones(1, 1, 4, 4)
    out = pp.detector_postprocess(boxes, torch.tensor([0.9]), torch.tensor([2]), (50, 100), (100, 150),
                                  mask_probs=probs, keypoints=kp, keypoint_scores=torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(out["boxes"], torch.tensor([[15.0, 40.0, 45.0, 80.0]]))
    torch.testing.assert_close(out["keypoints"], torch.tensor([[[18.0, 44.0, 1.0], [45.0, 80.0, 1.0]]]))
    assert out["masks"].shape == (1, 1, 100, 150)
    assert out["masks"][0, 0, 40:80, 15:45].all() and out["masks"].sum() == 30 * 40   # aligned: the box exactly
    assert torch.equal(kp, torch.tensor([[[12.0, 22.0, 1.0], [30.0, 40.0, 1.0]]]))      # input left alone
    assert set(pp.detector_postprocess(boxes, torch.tensor([0.9]), torch.tensor([2]), (50, 100), (50, 100))) == \
        {"boxes", "labels", "scores"}


def test_detector_results_splits_the_padded_batch():
    dets = pp.Detections(torch.tensor([[[1.0, 1.0, 5.0, 5.0], [2.0, 2.0, 8.0, 9.0]], [[0.0] * 4] * 2]),
                         torch.tensor([[0.9, 0.5], [0.0, 0.0]]), torch.tensor([[1, 2], [0, 0]]), torch.tensor([2, 0]))
    probs = torch.rand(2, 1, 6, 6)
    maps = torch.rand(2, 3, 8, 8)
    out = pp.detector_results(dets, [(10, 10), (10, 12)], [(20, 20), (10, 12)], mask_probs=probs,
                              keypoint_heatmaps=maps, mask_format="bool")
    assert [o["boxes"].shape[0] for o in out] == [2, 0]
    torch.testing.assert_close(out[0]["boxes"], dets.boxes[0] * 2)
    assert out[0]["masks"].shape == (2, 20, 20) and out[1]["masks"].shape == (0, 10, 12)
    assert out[0]["keypoints"].shape == (2, 3, 3) and out[1]["keypoints"].shape == (0, 3, 3)
    assert out[1]["labels"].shape == (0,) and out[1]["scores"].shape == (0,)


# ---- the three stages ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_cfg({"roi_heads": {"score_thresh_test": 0.3, "detections_per_image": 40}})).eval()


def _two_images():
    images, _ = shapes_batch(1, (96, 128), seed=3, per_image=3)
    return [images[0], torch.full((3, 70, 150), 0.1)]    # a busy image and a blank one: different counts


def test_stages_padded_contract_and_whole_model(model):
    images = _two_images()
    batch, sizes, _, input_sizes = model.preprocess(images)
    batch = model.to_model_layout(batch)
    rh = model.roi_heads
    with torch.no_grad():
        feats = model.backbone(batch)
        objectness, deltas, anchors = model.rpn.predict(batch.shape[-2:], feats)
        proposals, counts, box_features = model.proposal_stage(objectness, deltas, anchors, feats, sizes)
        p = model.rpn.post_nms_top_n["test"]
        assert proposals.shape == (2, p, 4) and counts.shape == (2,) and counts.dtype == torch.int64
        assert box_features.shape[0] == int(counts.sum()) and box_features.shape[2:] == (7, 7)
        for i, c in enumerate(counts.tolist()):
            assert not proposals[i, c:].any()
        logits, reg = rh.box_head_outputs(box_features)
        dets, mask_features, kp_features = model.detection_stage(logits, reg, proposals, counts, feats, sizes)
        assert isinstance(dets, pp.Detections)
        assert dets.boxes.shape == (2, 40, 4) and dets.scores.shape == dets.labels.shape == (2, 40)
        k = dets.counts.tolist()
        assert k[0] != k[1] and k[0] > 0, k
        for i, c in enumerate(k):
            assert not dets.boxes[i, c:].any() and not dets.labels[i, c:].any()
            assert bool((dets.scores[i, :c][:-1] >= dets.scores[i, :c][1:]).all())
            assert bool((dets.labels[i, :c] >= 1).all())
        assert mask_features.shape[0] == kp_features.shape[0] == sum(k)
        out = model.result_stage(dets, rh.mask_logits(mask_features), rh.keypoint_logits(kp_features), sizes,
                                 input_sizes)
        whole = model(images)
    assert [o["boxes"].shape[0] for o in out] == k
    for a, b in zip(out, whole):
        assert set(a) == set(b)
        for key in a:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("flip", [False, True])
def test_mask_formats_agree(flip):
    from pycocotools import mask as mask_util

    torch.manual_seed(0)
    cfg = tiny_cfg({"roi_heads": {"score_thresh_test": 0.0, "test_flip": flip}})
    m = inference_model(build_model(cfg), cfg).eval()
    assert isinstance(m, FlipTTA) == flip
    images = _two_images()
    with torch.no_grad():
        prob, binary, rle = (m(images, mask_format=f) for f in ("prob", "bool", "rle"))
        with pytest.raises(ValueError, match="mask_format"):
            m(images, mask_format="binary")
    for p, b, r, im in zip(prob, binary, rle, images):
        h, w = im.shape[1:]
        assert p["masks"].shape[1:] == (1, h, w) and p["masks"].dtype == torch.float32
        assert b["masks"].shape[1:] == (h, w) and b["masks"].dtype == torch.bool and "masks" not in r
        assert torch.equal(b["masks"], p["masks"][:, 0] > 0.5)
        dec = np.stack([mask_util.decode(x) for x in r["masks_rle"]]) if r["masks_rle"] else np.zeros((0, h, w))
        assert np.array_equal(dec.astype(bool), b["masks"].numpy())
        for key in ("boxes", "scores", "labels", "keypoints"):
            assert torch.equal(p[key], b[key]) and torch.equal(p[key], r[key])
    assert sum(p["masks"].shape[0] for p in prob) > 0


def test_bad_mask_format_in_training_too():
    images, targets = shapes_batch(1, (96, 128), seed=3)
    with pytest.raises(ValueError, match="mask_format"):
        build_model(tiny_cfg()).train()(images, targets, mask_format=None)


def test_c4_stages_with_no_detections():
    cfg = tiny_cfg({"fpn": {"enabled": False}, "anchors": {"sizes": [[16, 32, 64]]}, "keypoint": {"enabled": False},
                    "roi_heads": {"box_pooler_resolution": 14, "score_thresh_test": 1.0}})
    m = build_model(cfg).eval()
    with torch.no_grad():
        out = m(_two_images(), mask_format="bool")
    assert [o["boxes"].shape for o in out] == [(0, 4), (0, 4)]
    assert out[0]["masks"].shape == (0, 96, 128) and out[1]["masks"].shape == (0, 70, 150)


# ---- the lean RoIHeads and where the extras live -------------------------------------------------


EXTRAS = ("test_box_refine", "test_mask_box", "test_mask_box_expand", "test_flip", "keypoint_flip_perm",
          "cascade_heads", "cascade_predictors", "cascade_iou_thresholds", "cascade_matchers")


def test_base_roi_heads_have_no_extras():
    rh = build_model(tiny_cfg()).roi_heads
    assert type(rh) is RoIHeads and rh.refiners == () and rh.num_box_stages == 1
    for name in EXTRAS:
        assert not hasattr(rh, name), name
    for name, fn in inspect.getmembers(RoIHeads, inspect.isfunction):
        params = inspect.signature(fn).parameters
        assert not any("flip" in p for p in params), name
    with pytest.raises(ValueError, match="training losses"):
        rh.eval()([], [], [], None)


def test_extras_come_from_the_config_in_order():
    cfg = tiny_cfg({"roi_heads": {"cascade_iou_thresholds": [0.6, 0.7], "test_box_refine": 2, "test_mask_box": 0.3,
                                  "test_mask_box_expand": 1.5, "test_flip": True}})
    model = build_model(cfg)
    rh = model.roi_heads
    assert isinstance(rh, CascadeRoIHeads) and rh.num_box_stages == 3
    assert [type(r) for r in rh.refiners] == [IterativeBoxRefinement, CascadeRefinement, MaskBoxRefinement]
    assert rh.refiners[0].passes == 2 and rh.refiners[1].num_stages == 2
    assert (rh.refiners[2].weight, rh.refiners[2].expand) == (0.3, 1.5)
    assert rh.box_stage_weights(2) == (30.0, 30.0, 15.0, 15.0)
    with pytest.raises(ValueError, match="stage"):
        rh.box_stage_weights(3)
    tta = inference_model(model, cfg)
    assert isinstance(tta, FlipTTA) and tta.model is model and tta.keypoint_flip_perm == [0, 3, 2, 1]
    # one box stage, refinement passes only
    rh = build_model(tiny_cfg({"roi_heads": {"test_box_refine": 1}})).roi_heads
    assert type(rh) is RoIHeads and [type(r) for r in rh.refiners] == [IterativeBoxRefinement]
    with pytest.raises(ValueError, match="stage"):
        rh.box_stage_weights(1)
