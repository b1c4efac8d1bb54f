"""The C++ inference graph's three stages at R50-FPN / COCO sizes: an 800x1344 padded batch of one image (resized
800x1333 from a 480x800 photo), RPN on P2..P6 (3 anchors a location, 1000 pre / post NMS), 1000 proposals,
81 classes, 100 detections, 256-channel features, 28x28 masks, 17 keypoints on 56x56 heatmaps.

Each stage is timed three ways: the graph ("mrcnn_fast" in the "graph ..." groups), the model's torch reference
stages (modeling/postprocess.py on our ops; "mrcnn_fast" in the "graph-reference ..." groups) and torchvision's
equivalents as its Mask R-CNN runs them ("torchvision", in both groups):
  stage 1: BoxCoder.decode of every anchor + RegionProposalNetwork.filter_proposals + MultiScaleRoIAlign (7x7);
  stage 2: RoIHeads.postprocess_detections + MultiScaleRoIAlign (14x14) of the detections (and the detections
           alone, without the RoIAlign);
  stage 3: maskrcnn_inference + GeneralizedRCNNTransform.postprocess (box rescale, paste_masks_in_image, the
           bool masks: > 0.5), keypointrcnn_inference + keypoint rescale.
"""
import pytest
import torch
from torchvision.models.detection import _utils as tv_utils
from torchvision.models.detection.roi_heads import (
    RoIHeads,
    keypointrcnn_inference,
    maskrcnn_inference,
    paste_masks_in_image,
)
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import resize_boxes, resize_keypoints
from torchvision.ops import MultiScaleRoIAlign

from mrcnn_fast import ops
from mrcnn_fast.graph import InferenceGraph
from mrcnn_fast.modeling import postprocess as pp
from mrcnn_fast.modeling.poolers import RoIPooler

HP, WP = 800, 1344
IMAGE, INPUT = (800, 1333), (480, 800)
STRIDES = (4, 8, 16, 32, 64)
A, C, CH, D, K = 3, 81, 256, 100, 17
SIZE = "R50-FPN 800x1333, 1000 proposals, 81 classes, 100 dets"


def _pooler(s):
    return {"output_size": s, "scales": [1 / t for t in STRIDES[:4]], "sampling_ratio": 2, "aligned": False,
            "canonical_level": 4, "canonical_scale": 224.0}


CFG = {"rpn_pre_nms_top_n": 1000, "rpn_post_nms_top_n": 1000, "rpn_nms_thresh": 0.7, "rpn_score_thresh": 0.0,
       "rpn_min_size": 1e-3, "rpn_weights": [1.0] * 4, "box_weights": [10.0, 10.0, 5.0, 5.0],
       "bbox_xform_clip": ops.box_coder.DEFAULT_CLAMP, "box_pooler": _pooler(7), "score_thresh": 0.05,
       "nms_thresh": 0.5, "detections_per_image": D, "min_box_side": pp.MIN_BOX_SIDE, "mask_pooler": _pooler(14),
       "mask_loss": "sigmoid", "mask_threshold": 0.5, "paste_aligned": False, "keypoint_pooler": None}
GRAPH = InferenceGraph(CFG)
KP_GRAPH = InferenceGraph({**CFG, "mask_pooler": None, "keypoint_pooler": _pooler(14)})
DET_GRAPH = InferenceGraph({**CFG, "mask_pooler": None})   # stage 2 without the mask RoIAlign


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [((HP + s - 1) // s, (WP + s - 1) // s) for s in STRIDES]
    feats = [torch.randn(1, CH, h, w, generator=g) for h, w in shapes[:4]]
    obj = [torch.randn(1, h * w * A, generator=g) for h, w in shapes]
    deltas = [torch.randn(1, h * w * A, 4, generator=g) * 0.2 for h, w in shapes]
    anchors = []
    for (h, w), s in zip(shapes, STRIDES):
        ys, xs = torch.meshgrid(torch.arange(h) * s + s / 2, torch.arange(w) * s + s / 2, indexing="ij")
        ctr = torch.stack([xs, ys], -1).reshape(-1, 1, 2).float()
        half = torch.tensor([[8.0 * s / 1.41, 8.0 * s * 1.41], [8.0 * s, 8.0 * s], [8.0 * s * 1.41, 8.0 * s / 1.41]])
        anchors.append(torch.cat([ctr - half, ctr + half], -1).reshape(-1, 4))
    return obj, deltas, anchors, feats


OBJ, DELTAS, ANCHORS, FEATS = _inputs()
PROPOSALS, COUNTS, BOX_FEATS = GRAPH.proposal_stage(OBJ, DELTAS, ANCHORS, FEATS, [IMAGE])
R = int(COUNTS.sum())
_g = torch.Generator().manual_seed(1)
CLASS_LOGITS = torch.randn(R, C, generator=_g)
# two likely classes per RoI, as a trained head gives: about 2000 candidates above 0.05 before NMS
CLASS_LOGITS.scatter_add_(1, torch.randint(1, C, (R, 2), generator=_g), torch.full((R, 2), 5.0))
BOX_REG = torch.randn(R, 4 * C, generator=_g) * 0.5
DETS, MASK_FEATS, _ = GRAPH.detection_stage(CLASS_LOGITS, BOX_REG, PROPOSALS, COUNTS, FEATS, [IMAGE])
RD = int(DETS.counts.sum())
MASK_LOGITS = torch.randn(RD, C, 28, 28, generator=_g) * 4
KP_LOGITS = torch.randn(RD, K, 56, 56, generator=_g)

TV_RPN = RegionProposalNetwork(None, None, 0.7, 0.3, 256, 0.5, {"training": 1000, "testing": 1000},
                               {"training": 1000, "testing": 1000}, 0.7).eval()
TV_BOX_POOL = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
TV_MASK_POOL = MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2)
TV_HEADS = RoIHeads(TV_BOX_POOL, None, None, 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, D).eval()
TV_CODER = tv_utils.BoxCoder((1.0, 1.0, 1.0, 1.0))
FEAT_DICT = {str(i): f for i, f in enumerate(FEATS)}


# ---- stage 1 ------------------------------------------------------------------------------------------------


def _graph_stage1():
    return GRAPH.proposal_stage(OBJ, DELTAS, ANCHORS, FEATS, [IMAGE])


def _reference_stage1():
    boxes, _, counts = ops.generate_proposals(OBJ, DELTAS, ANCHORS, [IMAGE], 1000, 1000, 0.7)
    rois = pp.rois_from_padded(boxes, counts, int(counts.sum()))
    return boxes, counts, RoIPooler(7, STRIDES[:4], sampling_ratio=2, aligned=False)(FEATS, rois)


def _tv_stage1():
    obj = torch.cat(OBJ, 1).reshape(-1, 1)
    deltas = torch.cat(DELTAS, 1).reshape(-1, 4)
    proposals = TV_CODER.decode(deltas, [torch.cat(ANCHORS)]).view(1, -1, 4)
    boxes, _ = TV_RPN.filter_proposals(proposals, obj, [IMAGE], [o.shape[1] for o in OBJ])
    return boxes, TV_BOX_POOL(FEAT_DICT, boxes, [IMAGE])


@pytest.mark.benchmark(group=f"graph stage 1 (proposals + box RoIAlign): {SIZE}")
def test_stage1_graph_mrcnn_fast(bench):
    got, ref = _graph_stage1(), _reference_stage1()
    assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2])
    bench(_graph_stage1)


@pytest.mark.benchmark(group=f"graph stage 1 (proposals + box RoIAlign): {SIZE}")
def test_stage1_torchvision(bench):
    bench(_tv_stage1)


@pytest.mark.benchmark(group=f"graph-reference stage 1 (proposals + box RoIAlign): {SIZE}")
def test_stage1_reference_mrcnn_fast(bench):
    bench(_reference_stage1)


@pytest.mark.benchmark(group=f"graph-reference stage 1 (proposals + box RoIAlign): {SIZE}")
def test_stage1_reference_torchvision(bench):
    bench(_tv_stage1)


# ---- stage 2 ------------------------------------------------------------------------------------------------


def _graph_stage2():
    return GRAPH.detection_stage(CLASS_LOGITS, BOX_REG, PROPOSALS, COUNTS, FEATS, [IMAGE])


def _reference_stage2():
    dets = pp.detections_from_box_outputs(CLASS_LOGITS, BOX_REG, PROPOSALS, COUNTS, [IMAGE],
                                          weights=(10.0, 10.0, 5.0, 5.0), score_thresh=0.05, nms_thresh=0.5,
                                          detections_per_image=D)
    rois = pp.rois_from_padded(dets.boxes, dets.counts, int(dets.counts.sum()))
    return dets, RoIPooler(14, STRIDES[:4], sampling_ratio=2, aligned=False)(FEATS, rois)


def _tv_stage2():
    boxes, scores, labels = TV_HEADS.postprocess_detections(CLASS_LOGITS, BOX_REG, [PROPOSALS[0, :R]], [IMAGE])
    return boxes, scores, labels, TV_MASK_POOL(FEAT_DICT, boxes, [IMAGE])


@pytest.mark.benchmark(group=f"graph stage 2 (detections + mask RoIAlign): {SIZE}")
def test_stage2_graph_mrcnn_fast(bench):
    got, ref = _graph_stage2(), _reference_stage2()
    assert torch.equal(got[0].labels, ref[0].labels) and torch.equal(got[0].boxes, ref[0].boxes)
    assert RD == D
    bench(_graph_stage2)


@pytest.mark.benchmark(group=f"graph stage 2 (detections + mask RoIAlign): {SIZE}")
def test_stage2_torchvision(bench):
    bench(_tv_stage2)


@pytest.mark.benchmark(group=f"graph-reference stage 2 (detections + mask RoIAlign): {SIZE}")
def test_stage2_reference_mrcnn_fast(bench):
    bench(_reference_stage2)


@pytest.mark.benchmark(group=f"graph-reference stage 2 (detections + mask RoIAlign): {SIZE}")
def test_stage2_reference_torchvision(bench):
    bench(_tv_stage2)


def _graph_detections():
    return DET_GRAPH.detection_stage(CLASS_LOGITS, BOX_REG, PROPOSALS, COUNTS, FEATS, [IMAGE])[0]


def _reference_detections():
    return pp.detections_from_box_outputs(CLASS_LOGITS, BOX_REG, PROPOSALS, COUNTS, [IMAGE],
                                          weights=(10.0, 10.0, 5.0, 5.0), score_thresh=0.05, nms_thresh=0.5,
                                          detections_per_image=D)


def _tv_detections():
    return TV_HEADS.postprocess_detections(CLASS_LOGITS, BOX_REG, [PROPOSALS[0, :R]], [IMAGE])


@pytest.mark.benchmark(group=f"graph stage 2 detections only (no RoIAlign): {SIZE}")
def test_detections_graph_mrcnn_fast(bench):
    assert torch.equal(_graph_detections().boxes, _reference_detections().boxes)
    bench(_graph_detections)


@pytest.mark.benchmark(group=f"graph stage 2 detections only (no RoIAlign): {SIZE}")
def test_detections_torchvision(bench):
    bench(_tv_detections)


@pytest.mark.benchmark(group=f"graph-reference stage 2 detections only (no RoIAlign): {SIZE}")
def test_detections_reference_mrcnn_fast(bench):
    bench(_reference_detections)


@pytest.mark.benchmark(group=f"graph-reference stage 2 detections only (no RoIAlign): {SIZE}")
def test_detections_reference_torchvision(bench):
    bench(_tv_detections)


# ---- stage 3 ------------------------------------------------------------------------------------------------


def _graph_stage3(fmt):
    return GRAPH.result_stage(DETS, MASK_LOGITS, None, [IMAGE], [INPUT], mask_format=fmt)


def _reference_stage3(fmt):
    labels = pp.pack(DETS.labels, DETS.counts, RD)
    return pp.detector_results(DETS, [IMAGE], [INPUT], mask_probs=pp.mask_probs(MASK_LOGITS, labels),
                               mask_format=fmt, aligned=False)


def _tv_stage3(fmt):
    probs = maskrcnn_inference(MASK_LOGITS, [DETS.labels[0, :RD]])[0]
    boxes = resize_boxes(DETS.boxes[0, :RD], IMAGE, INPUT)
    masks = paste_masks_in_image(probs, boxes, INPUT)
    return boxes, (masks[:, 0] > 0.5) if fmt == "bool" else masks


def _graph_keypoints():
    return KP_GRAPH.result_stage(DETS, None, KP_LOGITS, [IMAGE], [INPUT])


def _reference_keypoints():
    return pp.detector_results(DETS, [IMAGE], [INPUT], keypoint_heatmaps=KP_LOGITS)


def _tv_keypoints():
    kp, scores = keypointrcnn_inference(KP_LOGITS, [DETS.boxes[0, :RD]])
    return resize_keypoints(kp[0], IMAGE, INPUT), scores


@pytest.mark.parametrize("fmt", ["prob", "bool"])
def test_stage3_graph_mrcnn_fast(bench, fmt):
    bench.group = f"graph stage 3 (masks {fmt}): {SIZE}"
    got, ref = _graph_stage3(fmt)[0], _reference_stage3(fmt)[0]
    torch.testing.assert_close(got["masks"].float(), ref["masks"].float(), rtol=0, atol=1e-6)
    bench(_graph_stage3, fmt)


@pytest.mark.parametrize("fmt", ["prob", "bool"])
def test_stage3_torchvision(bench, fmt):
    bench.group = f"graph stage 3 (masks {fmt}): {SIZE}"
    bench(_tv_stage3, fmt)


@pytest.mark.parametrize("fmt", ["prob", "bool"])
def test_stage3_reference_mrcnn_fast(bench, fmt):
    bench.group = f"graph-reference stage 3 (masks {fmt}): {SIZE}"
    bench(_reference_stage3, fmt)


@pytest.mark.parametrize("fmt", ["prob", "bool"])
def test_stage3_reference_torchvision(bench, fmt):
    bench.group = f"graph-reference stage 3 (masks {fmt}): {SIZE}"
    bench(_tv_stage3, fmt)


@pytest.mark.benchmark(group=f"graph stage 3 (keypoints): {SIZE}")
def test_stage3_keypoints_graph_mrcnn_fast(bench):
    torch.testing.assert_close(_graph_keypoints()[0]["keypoints"], _reference_keypoints()[0]["keypoints"])
    bench(_graph_keypoints)


@pytest.mark.benchmark(group=f"graph stage 3 (keypoints): {SIZE}")
def test_stage3_keypoints_torchvision(bench):
    bench(_tv_keypoints)


@pytest.mark.benchmark(group=f"graph-reference stage 3 (keypoints): {SIZE}")
def test_stage3_keypoints_reference_mrcnn_fast(bench):
    bench(_reference_keypoints)


@pytest.mark.benchmark(group=f"graph-reference stage 3 (keypoints): {SIZE}")
def test_stage3_keypoints_reference_torchvision(bench):
    bench(_tv_keypoints)
