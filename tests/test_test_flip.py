"""Horizontal-flip test-time augmentation (roi_heads.test_flip: modeling.tta.FlipTTA via inference_model)."""
import pytest
import torch

from _model_utils import shapes_batch, tiny_cfg
from mrcnn_fast.data.transforms import hflip_boxes
from mrcnn_fast.modeling import build_model, inference_model
from mrcnn_fast.modeling.poolers import boxes_to_rois
from mrcnn_fast.modeling.roi_heads import RoIHeads
from mrcnn_fast.modeling.tta import FlipTTA, mirror_batch


def _model(overrides=None, seed=0):
    torch.manual_seed(seed)
    ov = {"roi_heads": {"test_flip": True, "num_classes": 3, "score_thresh_test": 0.2}}
    if overrides:
        for k, v in overrides.items():
            ov.setdefault(k, {}).update(v)
    cfg = tiny_cfg(ov)
    return inference_model(build_model(cfg), cfg).double().eval()


def _images():
    # two widths in one batch: the mirror of each image is taken within its own width
    a, _ = shapes_batch(1, (96, 128), seed=5, per_image=3)
    b, _ = shapes_batch(1, (128, 112), seed=6, per_image=3)
    return [a[0].double(), b[0].double()]


def _match(ref: dict, got: dict, width: float, perm) -> int:
    """Every detection of `got` (the model on the mirrored image) is the mirror of one of `ref`'s."""
    n = ref["boxes"].shape[0]
    assert got["boxes"].shape[0] == n
    mirrored = hflip_boxes(ref["boxes"], width)
    for i in range(n):
        d = (got["boxes"][:, None] - mirrored[None, i]).abs().amax(-1)[:, 0]
        j = int(d.argmin())
        assert d[j] < 1e-6 and got["labels"][j] == ref["labels"][i]
        assert got["scores"][j].item() == pytest.approx(ref["scores"][i].item(), abs=1e-9)
        torch.testing.assert_close(got["masks"][j], ref["masks"][i].flip(-1), atol=1e-6, rtol=0)
        kp = ref["keypoints"][i][perm].clone()
        kp[:, 0] = width - kp[:, 0]
        torch.testing.assert_close(got["keypoints"][j], kp, atol=1e-6, rtol=0)
        torch.testing.assert_close(got["keypoints_scores"][j], ref["keypoints_scores"][i][perm], atol=1e-6, rtol=0)
    return n


@pytest.mark.parametrize("overrides", [None, {"roi_heads": {"cascade_iou_thresholds": [0.6], "test_box_refine": 1,
                                                             "test_mask_box": 0.5}}],
                         ids=["plain", "cascade-refine-maskbox"])
def test_flip_tta_is_mirror_symmetric(overrides):
    """With both views averaged (and both views' proposals), the model on a mirrored image gives exactly the
    mirrored detections, masks and keypoints (left / right keypoints swapped): a check of every coordinate
    flip, of the per-image widths and of the keypoint permutation."""
    model = _model(overrides)
    images = _images()
    with torch.no_grad():
        ref = model(images)
        got = model([im.flip(-1) for im in images])
    perm = model.keypoint_flip_perm
    assert perm == [0, 3, 2, 1]           # small_cpu: keypoints top, right, bottom, left; right <-> left
    total = sum(_match(r, g, im.shape[-1], perm) for r, g, im in zip(ref, got, images))
    assert total >= 4                     # the check saw detections (untrained model, low score threshold)


def test_flip_tta_off_is_not_symmetric_and_differs_from_on():
    """The symmetry above comes from the augmentation: one view alone is not mirror symmetric (stride-2
    convolutions with padding are not), and the averaged boxes differ from the single view's."""
    model = _model()
    images = _images()
    with torch.no_grad():
        on = model(images)
        off = model.model(images)                  # the wrapped model alone: no flip
        off_m = model.model([im.flip(-1) for im in images])
    mirrored = hflip_boxes(off[0]["boxes"], images[0].shape[-1])
    assert off[0]["boxes"].shape[0] > 0
    assert not (off_m[0]["boxes"].shape == mirrored.shape and torch.allclose(off_m[0]["boxes"], mirrored, atol=1e-6))
    assert not (on[0]["boxes"].shape == off[0]["boxes"].shape and torch.allclose(on[0]["boxes"], off[0]["boxes"]))


def test_box_predictions_average_both_views_by_hand():
    tta = _model()
    model = tta.model
    rh = model.roi_heads
    images = _images()
    batch, sizes, _, _ = model.preprocess(images)
    with torch.no_grad():
        feats = model.backbone(batch)
        flipped = model.backbone(mirror_batch(batch, sizes))
        boxes = [torch.tensor([[10.0, 12.0, 50.0, 40.0], [60.0, 5.0, 90.0, 70.0]], dtype=batch.dtype),
                 torch.tensor([[3.0, 30.0, 100.0, 90.0]], dtype=batch.dtype)]
        probs, decoded = tta.predictor(feats, flipped, sizes, batch.dtype).boxes(boxes_to_rois(boxes), 0)
        p0, d0 = rh.box_predictions(feats, boxes_to_rois(boxes), 0)
        mirrored = [hflip_boxes(b, float(w)) for b, (_, w) in zip(boxes, sizes)]
        p1, d1 = rh.box_predictions(flipped, boxes_to_rois(mirrored), 0)
    widths = torch.tensor([128.0, 128.0, 112.0], dtype=batch.dtype)[:, None]
    assert [tuple(s) for s in sizes] == [(96, 128), (128, 112)]
    torch.testing.assert_close(probs, (p0 + p1) / 2)
    torch.testing.assert_close(decoded, (d0 + hflip_boxes(d1, widths)) / 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, dtype=batch.dtype))


def test_flip_tta_c4_and_no_detections():
    torch.manual_seed(0)
    cfg = tiny_cfg({"fpn": {"enabled": False}, "anchors": {"sizes": [[16, 32, 64]]}, "keypoint": {"enabled": False},
                    "roi_heads": {"test_flip": True, "num_classes": 3}})
    model = inference_model(build_model(cfg), cfg).eval()
    images = [im.float() for im in _images()]
    with torch.no_grad():
        out = model(images)
        model.model.roi_heads.score_thresh = 1.0    # nothing passes: empty outputs of the right shapes
        empty = model(images)
    assert len(out) == 2 and all(o["masks"].shape[1:] == (1,) + tuple(im.shape[1:]) for o, im in zip(out, images))
    assert all(e["boxes"].shape == (0, 4) and e["masks"].shape == (0, 1) + tuple(im.shape[1:])
               for e, im in zip(empty, images))


def test_flip_tta_bad_values():
    with pytest.raises(ValueError, match="test_flip"):
        build_model(tiny_cfg({"roi_heads": {"test_flip": 1}}))
    with pytest.raises(ValueError, match="keypoint_flip_pairs"):
        build_model(tiny_cfg({"roi_heads": {"test_flip": True}, "keypoint": {"flip_pairs": [[1, 4]]}}))
    # the flip pairs only matter to the flip: a model without it builds with pairs that do not fit
    build_model(tiny_cfg({"keypoint": {"flip_pairs": [[1, 4]]}}))
    # the flip lives in the wrapper: the heads know nothing of a mirrored view, the wrapper only infers
    model = _model()
    assert isinstance(model, FlipTTA) and not hasattr(model.model.roi_heads, "test_flip")
    images = _images()
    with torch.no_grad():
        with pytest.raises(ValueError, match="FlipTTA is for inference"):
            model.train()(images)
        with pytest.raises(ValueError, match="mask_format"):
            model.eval()(images, mask_format="png")
    assert isinstance(inference_model(model.model, tiny_cfg()), type(model.model))    # test_flip off: no wrapper
    assert isinstance(model.model.roi_heads, RoIHeads)


def test_hflip_boxes():
    b = torch.tensor([[1.0, 2.0, 5.0, 9.0], [0.0, 0.0, 10.0, 4.0]])
    torch.testing.assert_close(hflip_boxes(b, 10.0), torch.tensor([[5.0, 2.0, 9.0, 9.0], [0.0, 0.0, 10.0, 4.0]]))
    torch.testing.assert_close(hflip_boxes(hflip_boxes(b, 10.0), 10.0), b)
    w = torch.tensor([10.0, 20.0])[:, None]
    torch.testing.assert_close(hflip_boxes(b[:, None], w)[:, 0], torch.tensor([[5.0, 2.0, 9.0, 9.0],
                                                                              [10.0, 0.0, 20.0, 4.0]]))
