"""Cascade box stages (roi_heads.cascade_iou_thresholds) and mask-derived box sides (roi_heads.test_mask_box)."""
import pytest
import torch

from _model_utils import assert_refined, shapes_batch, tiny_cfg
from mrcnn_fast import ops
from mrcnn_fast.engine import load_weights, save_weights
from mrcnn_fast.modeling import CascadeRoIHeads, FlipTTA, MaskBoxRefinement, build_model, inference_model
from mrcnn_fast.modeling.refine import mask_box_edges
from mrcnn_fast.modeling.roi_heads import RoIHeads

STAGE_LOSSES = {"loss_classifier_stage2", "loss_box_reg_stage2", "loss_classifier_stage3", "loss_box_reg_stage3"}


@pytest.fixture(scope="module")
def batch():
    return shapes_batch(2, (96, 128), seed=3)


# ---- mask_box_edges ------------------------------------------------------------------------------


def test_mask_box_edges_hand_computed():
    probs = torch.zeros(4, 8, 8, dtype=torch.float64)
    probs[0, 1:7, 2:6] = 1.0                      # a block: edges half-way between cell centres
    probs[1, 2:5, :] = torch.tensor([0.0, 0.0, 0.2, 0.8, 1.0, 1.0, 0.9, 0.35], dtype=torch.float64)
    probs[2, 0:3, 0:4] = 0.9                      # touches the top and left sides of its box
    boxes = torch.tensor([[10.0, 20.0, 26.0, 36.0]] * 4, dtype=torch.float64)   # 2 px per cell
    edges, valid = mask_box_edges(probs, boxes)
    # block columns 2..5, rows 1..6: crossings at cell boundaries 2, 6 (x) and 1, 7 (y)
    torch.testing.assert_close(edges[0], torch.tensor([10 + 2 * 2.0, 20 + 2 * 1.0, 10 + 2 * 6.0, 20 + 2 * 7.0],
                                                      dtype=torch.float64))
    assert valid[0].all()
    # x profile 0.2 -> 0.8 between cells 2 and 3: crossing at the middle, cell coordinate 3.0;
    # 0.9 -> 0.35 between cells 6 and 7: (0.9 - 0.5) / 0.55 of the way, cell coordinate 6.5 + 0.4 / 0.55
    assert edges[1, 0].item() == pytest.approx(10 + 2 * 3.0)
    assert edges[1, 2].item() == pytest.approx(10 + 2 * (6.5 + 0.4 / 0.55))
    assert edges[1, 1].item() == pytest.approx(20 + 2 * 2.0) and edges[1, 3].item() == pytest.approx(20 + 2 * 5.0)
    assert valid[1].all()
    # a mask reaching the box's side says nothing about where the object ends on that side
    assert valid[2].tolist() == [False, False, True, True]
    # 0.9 -> 0 after cell 3 (x) and cell 2 (y): 0.4 / 0.9 of the way between cell centres
    assert edges[2, 2].item() == pytest.approx(10 + 2 * (3.5 + 0.4 / 0.9))
    assert edges[2, 3].item() == pytest.approx(20 + 2 * (2.5 + 0.4 / 0.9))
    assert not valid[3].any()                     # empty mask
    e, v = mask_box_edges(probs[:0], boxes[:0])
    assert e.shape == (0, 4) and v.shape == (0, 4)


def test_mask_box_edges_agree_with_the_aligned_paste():
    """The edges are where the aligned paste's thresholded mask ends, for random smooth blobs in random boxes:
    within half a pixel of rounding to the pixel grid plus the bilinear field's dip between cell centres
    (the edges use the column / row maxima at cell centres)."""
    g = torch.Generator().manual_seed(0)
    m = 28
    yy, xx = torch.meshgrid(torch.arange(m, dtype=torch.float64), torch.arange(m, dtype=torch.float64),
                            indexing="ij")
    for _ in range(20):
        c = 8 + 12 * torch.rand(2, generator=g, dtype=torch.float64)
        r = 2 + 3 * torch.rand(2, generator=g, dtype=torch.float64)
        probs = torch.exp(-(((xx - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2))[None]
        x1, y1 = (5 + 20 * torch.rand(2, generator=g, dtype=torch.float64)).tolist()
        w, h = (20 + 60 * torch.rand(2, generator=g, dtype=torch.float64)).tolist()
        box = torch.tensor([[x1, y1, x1 + w, y1 + h]], dtype=torch.float64)
        edges, valid = mask_box_edges(probs, box)
        assert valid.all()
        pasted = ops.paste_masks_in_image(probs[:, None], box, (120, 120), aligned=True)[0, 0] >= 0.5
        ys, xs = torch.nonzero(pasted, as_tuple=True)
        tight = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float64)
        assert (edges[0] - tight).abs().max().item() <= 0.75, (edges, tight)


# ---- test_mask_box in the model ------------------------------------------------------------------


def test_mask_box_moves_sides_to_the_mask_edges(batch, monkeypatch):
    """test_mask_box = w: each side goes to (1 - w) x box + w x the edge of the mask predicted on the box enlarged
    test_mask_box_expand times; checked with a mask head whose output does not depend on the features."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg({"roi_heads": {"score_thresh_test": 0.0}})).eval()
    images = [batch[0][0], batch[0][1]]
    with torch.no_grad():
        base = model(images)
    seen = []
    rh = model.roi_heads
    pool = rh.pool_mask_features

    def recording_pool(feats, rois):
        seen.append(rois.clone())
        return pool(feats, rois)

    def fixed_mask_logits(features):
        logits = torch.full((features.shape[0], 4, 28, 28), -10.0)
        logits[:, :, 5:21, 3:26] = 10.0           # cells 5..20 (y) and 3..25 (x): edges at 5, 21 and 3, 26
        return logits

    monkeypatch.setattr(rh, "pool_mask_features", recording_pool)
    monkeypatch.setattr(rh, "mask_logits", fixed_mask_logits)
    rh.refiners = (MaskBoxRefinement(0.5, 1.25),)
    with torch.no_grad():
        out = model(images)
    for b, o, im in zip(base, out, images):
        assert b["boxes"].shape[0] > 0
        assert torch.equal(b["labels"], o["labels"]) and torch.equal(b["scores"], o["scores"])
        box = b["boxes"].to(torch.float64)
        centre, half = (box[:, :2] + box[:, 2:]) / 2, (box[:, 2:] - box[:, :2]) / 2 * 1.25
        lo = centre - half
        size = 2 * half / 28
        edges = torch.stack([lo[:, 0] + 3 * size[:, 0], lo[:, 1] + 5 * size[:, 1],
                             lo[:, 0] + 26 * size[:, 0], lo[:, 1] + 21 * size[:, 1]], 1)
        want = ops.clip_boxes(0.5 * box + 0.5 * edges, tuple(im.shape[1:]))
        torch.testing.assert_close(o["boxes"].to(torch.float64), want, rtol=0, atol=1e-3)
    # the enlarged boxes were pooled first, then the final masks on the fused boxes
    n = sum(b["boxes"].shape[0] for b in base)
    assert seen[0].shape[0] == n and seen[1].shape[0] == n
    torch.testing.assert_close(seen[1][:, 1:], torch.cat([o["boxes"] for o in out]))


def test_mask_box_with_no_detections_and_c4(batch):
    torch.manual_seed(0)
    model = build_model(tiny_cfg({"roi_heads": {"score_thresh_test": 1.1, "test_mask_box": 0.5}})).eval()
    with torch.no_grad():
        out = model(batch[0][:1])[0]
    assert out["boxes"].shape == (0, 4)
    cfg = tiny_cfg({"fpn": {"enabled": False}, "anchors": {"sizes": [[16, 32, 64]]},
                    "roi_heads": {"box_pooler_resolution": 14, "score_thresh_test": 0.0, "test_mask_box": 0.5},
                    "keypoint": {"enabled": False}})
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model(batch[0][:1])[0]
    assert out["boxes"].shape[0] > 0 and torch.isfinite(out["boxes"]).all()
    assert (out["boxes"][:, 2:] > out["boxes"][:, :2]).all()


@pytest.mark.parametrize("value", [-0.1, 1.5, True, "0.5", float("nan")])
def test_bad_test_mask_box(value):
    with pytest.raises(ValueError, match="test_mask_box"):
        build_model(tiny_cfg({"roi_heads": {"test_mask_box": value}}))


def test_bad_test_mask_box_expand_and_no_mask_head():
    with pytest.raises(ValueError, match="test_mask_box_expand"):
        build_model(tiny_cfg({"roi_heads": {"test_mask_box": 0.5, "test_mask_box_expand": 0.9}}))
    with pytest.raises(ValueError, match="needs the mask head"):
        build_model(tiny_cfg({"roi_heads": {"test_mask_box": 0.5}, "mask": {"enabled": False}}))


# ---- cascade stages ------------------------------------------------------------------------------


def test_cascade_trains_every_stage(batch):
    torch.manual_seed(0)
    model = build_model(tiny_cfg({"roi_heads": {"cascade_iou_thresholds": [0.6, 0.7]}}))
    model.train()
    losses = model(*batch)
    assert STAGE_LOSSES <= set(losses)
    for k, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v), k
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    for name in ("cascade_heads.0.fc6.weight", "cascade_heads.1.fc7.weight", "cascade_predictors.1.bbox_pred.weight"):
        assert dict(model.roi_heads.named_parameters())[name].grad.abs().sum() > 0, name


def test_cascade_trains_on_images_without_annotations(batch):
    """No GT anywhere: every stage has only negatives, box losses are 0 and every parameter still gets a gradient
    (DDP without find_unused_parameters)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg({"roi_heads": {"cascade_iou_thresholds": [0.6, 0.7]}})).train()
    images, targets = batch
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "masks": torch.zeros(0, *im.shape[1:], dtype=torch.uint8), "keypoints": torch.zeros(0, 4, 3)}
             for im in images]
    for tg in (empty, [targets[0], empty[1]]):
        model.zero_grad()
        losses = model(images, tg)
        sum(losses.values()).backward()
        assert all(torch.isfinite(v) for v in losses.values())
        if tg is empty:
            assert losses["loss_box_reg_stage2"].item() == 0 and losses["loss_box_reg_stage3"].item() == 0
            assert losses["loss_classifier_stage3"].item() > 0
        assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def test_cascade_stage_inputs_are_the_regressed_boxes(batch, monkeypatch):
    """Stage 2 is sampled from stage 1's sampled RoIs moved by the regression of their GT class (positives) or
    their best foreground class (negatives), clipped, matched at its own IoU threshold."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg({"roi_heads": {"cascade_iou_thresholds": [0.6]}})).train()
    rh = model.roi_heads
    pred = rh.box_predictor
    with torch.no_grad():
        pred.cls_score.weight.zero_()
        pred.cls_score.bias.copy_(torch.tensor([3.0, 0.0, 2.0, 1.0]))     # best foreground class: 2
        pred.bbox_pred.weight.zero_()
        pred.bbox_pred.bias.copy_(torch.tensor([[0.3 * c, -0.2, 0.1 * c, 0.2] for c in range(4)]).reshape(-1))
    calls = []
    real = RoIHeads.sample_proposals

    def spy(self, proposals, targets, matcher=None):
        out = real(self, proposals, targets, matcher)
        calls.append(([p.clone() for p in proposals], matcher, out))
        return out

    monkeypatch.setattr(RoIHeads, "sample_proposals", spy)
    images, targets = batch
    model(images, targets)
    assert len(calls) == 2
    assert calls[0][1] is None and calls[1][1].high_thresh == 0.6 and calls[1][1].low_thresh == 0.6
    first = calls[0][2]
    for (b, lab, _, _), moved in zip(first, calls[1][0]):
        cls = torch.where(lab > 0, lab, torch.full_like(lab, 2))
        deltas = pred.bbox_pred.bias.detach().reshape(4, 4)[cls]
        # clipped to the image the model saw: tiny_cfg keeps 96 x 128 inputs (max size 128)
        want = ops.clip_boxes(ops.decode_boxes(deltas, b, (10.0, 10.0, 5.0, 5.0)).reshape(-1, 4), (96, 128))
        torch.testing.assert_close(moved, want, rtol=1e-5, atol=1e-4)


def test_cascade_refines_detections_with_each_stage(batch):
    """At inference each stage moves the detections by its regression for the detected class, with its own
    box weights (x2 for stage 2), and the score becomes sqrt(score * p(class))."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg({"roi_heads": {"score_thresh_test": 0.0, "cascade_iou_thresholds": [0.6]}})).eval()
    rh = model.roi_heads
    pred = rh.cascade_predictors[0]
    with torch.no_grad():
        pred.cls_score.weight.zero_()
        pred.cls_score.bias.copy_(torch.tensor([0.0, 1.0, 0.5, 1.5]))
        pred.bbox_pred.weight.zero_()
        pred.bbox_pred.bias.copy_(torch.tensor([[0.4 * c, 0.2, -0.5 * c, 0.3] for c in range(4)]).reshape(-1))
    images = [batch[0][0], batch[0][1]]
    refiners = rh.refiners
    with torch.no_grad():
        rh.refiners = ()                          # the cascade stages' refinement off: the box head's detections
        base = model(images)
        rh.refiners = refiners
        out = model(images)
    assert_refined(base, out, images, pred, (20.0, 20.0, 10.0, 10.0))


def test_cascade_checkpoint_round_trip(batch, tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg({"roi_heads": {"cascade_iou_thresholds": [0.6, 0.7]}})
    model = build_model(cfg).eval()
    path = save_weights(model, tmp_path / "m.safetensors")
    torch.manual_seed(1)
    other = build_model(cfg).eval()
    load_weights(other, path)
    with torch.no_grad():
        a, b = model(batch[0][:1])[0], other(batch[0][:1])[0]
    torch.testing.assert_close(a["boxes"], b["boxes"])
    with pytest.raises(Exception, match="cascade_heads"):
        load_weights(build_model(tiny_cfg()), path)


@pytest.mark.parametrize("thresholds", [[0.0], [1.0], [0.6, 1.2], 0.6, "0.6", ["0.6"], [True], [float("nan")]])
def test_bad_cascade_thresholds(thresholds):
    with pytest.raises(ValueError, match="cascade_iou_thresholds"):
        build_model(tiny_cfg({"roi_heads": {"cascade_iou_thresholds": thresholds}}))


def test_cascade_needs_fpn():
    cfg = tiny_cfg({"fpn": {"enabled": False}, "anchors": {"sizes": [[16, 32, 64]]},
                    "roi_heads": {"box_pooler_resolution": 14, "cascade_iou_thresholds": [0.6]}})
    with pytest.raises(ValueError, match="FPN"):
        build_model(cfg)


def test_demo_keeps_one_box_stage():
    """The 4-minute demo drops the preset's cascade stages (they cost it ~15% of its iterations)."""
    from mrcnn_fast.config import get_config
    from mrcnn_fast.demo import demo_config

    assert get_config("shapes").model.roi_heads.cascade_iou_thresholds == (0.6, 0.7)
    r = demo_config(100).model.roi_heads
    assert tuple(r.cascade_iou_thresholds) == () and r.test_box_refine == 1 and r.test_mask_box == 0.35
    assert not isinstance(build_model(demo_config(100)).roi_heads, CascadeRoIHeads)
    # the demo's other choices (demo.DEMO_ROI_HEADS): 64 RoIs per image, flip TTA, quarter keypoint loss
    cfg = demo_config(100)
    assert r.batch_size_per_image == 64 and r.test_flip is True and cfg.model.keypoint.loss_weight == 0.25
    assert get_config("shapes").model.roi_heads.test_flip is False
    assert isinstance(inference_model(build_model(cfg), cfg), FlipTTA)
