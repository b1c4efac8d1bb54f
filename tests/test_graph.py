"""The C++ inference graph (mrcnn_fast.graph): each stage equals the torch reference stages of MaskRCNN /
modeling/postprocess.py, on random and edge inputs, and the whole model gives the same results with it."""
import threading

import pytest
import torch

from _model_utils import mask_iou, shapes_batch, tiny_cfg
from mrcnn_fast import ops
from mrcnn_fast.graph import InferenceGraph, _detection_op, _proposal_op
from mrcnn_fast.modeling import build_model
from mrcnn_fast.modeling import postprocess as pp
from mrcnn_fast.modeling.poolers import RoIPooler

F64 = torch.float64


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(tiny_cfg({"keypoint": {"enabled": True}})).eval()
    m.roi_heads.score_thresh = 0.0   # random weights: keep plenty of detections
    return m


@pytest.fixture(scope="module")
def graph(model):
    return InferenceGraph.from_model(model, fallback=False)


def _rpn_inputs(n, levels=((16, 16), (8, 8), (4, 4), (2, 2), (1, 1)), a=3, c=32, dtype=torch.float32, seed=0,
                image=64):
    """Random RPN outputs and anchors of a 5-level FPN, and the box pooler's 4 feature maps."""
    g = torch.Generator().manual_seed(seed)
    obj, dl, anc, feats = [], [], [], []
    for (h, w) in levels:
        r = h * w * a
        obj.append(torch.randn(n, r, generator=g, dtype=dtype))
        dl.append(torch.randn(n, r, 4, generator=g, dtype=dtype) * 0.3)
        ctr = torch.rand(r, 2, generator=g, dtype=dtype) * image
        size = torch.rand(r, 2, generator=g, dtype=dtype) * image / 2 + 2
        anc.append(torch.cat([ctr - size / 2, ctr + size / 2], 1))
        feats.append(torch.randn(n, c, h, w, generator=g, dtype=dtype))
    return obj, dl, anc, feats


def _assert_dets_equal(a: pp.Detections, b: pp.Detections):
    assert torch.equal(a.counts, b.counts)
    assert torch.equal(a.labels, b.labels)
    torch.testing.assert_close(a.boxes, b.boxes, rtol=0, atol=0)
    torch.testing.assert_close(a.scores, b.scores, rtol=2e-6 if a.scores.dtype == torch.float32 else 1e-12, atol=1e-7)


# ---- stage 1 ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True])
def test_proposal_stage_equals_reference(model, graph, channels_last):
    sizes = [(64, 60), (50, 64), (33, 20)]
    obj, dl, anc, feats = _rpn_inputs(3, seed=1)
    if channels_last:
        feats = [f.contiguous(memory_format=torch.channels_last) for f in feats]
    ref = model.proposal_stage(obj, dl, anc, feats, sizes)
    out = graph.proposal_stage(obj, dl, anc, feats, sizes)
    assert torch.equal(ref[0], out[0]) and torch.equal(ref[1], out[1])
    assert out[2].shape == ref[2].shape and ref[2].shape[0] == int(ref[1].sum()) > 0
    torch.testing.assert_close(out[2], ref[2], rtol=0, atol=0)


def test_proposal_stage_no_proposals_and_float64(model):
    obj, dl, anc, feats = _rpn_inputs(2, seed=2, dtype=F64)
    anc = [a + 1000 for a in anc]   # every anchor far outside the images: clipped to nothing, removed
    graph = InferenceGraph.from_model(model, fallback=False)
    ref = model.proposal_stage(obj, dl, anc, feats, [(64, 64), (48, 32)])
    out = graph.proposal_stage(obj, dl, anc, feats, [(64, 64), (48, 32)])
    assert out[1].tolist() == ref[1].tolist() == [0, 0]
    assert out[2].shape == ref[2].shape == (0, 32, 7, 7) and out[0].dtype == F64
    obj, dl, anc, feats = _rpn_inputs(2, seed=3, dtype=F64)
    ref = model.proposal_stage(obj, dl, anc, feats, [(64, 64), (48, 32)])
    out = graph.proposal_stage(obj, dl, anc, feats, [(64, 64), (48, 32)])
    assert torch.equal(ref[0], out[0]) and torch.equal(ref[2], out[2])


# ---- stage 2 ------------------------------------------------------------------------------------------------


def _config(num_levels=4, score=0.05, nms=0.5, d=100, mask=True, keypoint=True):
    pooler = lambda s: {"output_size": s, "scales": [1 / 2 ** (k + 2) for k in range(num_levels)],  # noqa: E731
                        "sampling_ratio": 2, "aligned": True, "canonical_level": 4, "canonical_scale": 224.0}
    return {"rpn_pre_nms_top_n": 100, "rpn_post_nms_top_n": 50, "rpn_nms_thresh": 0.7, "rpn_score_thresh": 0.0,
            "rpn_min_size": 1e-3, "rpn_weights": [1.0] * 4, "box_weights": [10.0, 10.0, 5.0, 5.0],
            "bbox_xform_clip": ops.box_coder.DEFAULT_CLAMP, "box_pooler": pooler(7), "score_thresh": score,
            "nms_thresh": nms, "detections_per_image": d, "min_box_side": pp.MIN_BOX_SIDE,
            "mask_pooler": pooler(14) if mask else None, "mask_loss": "sigmoid", "mask_threshold": 0.5,
            "paste_aligned": True, "keypoint_pooler": pooler(6) if keypoint else None}


def _reference_stage2(cfg, class_logits, box_regression, proposals, counts, feats, sizes):
    dets = pp.detections_from_box_outputs(class_logits.to(proposals.dtype), box_regression.to(proposals.dtype),
                                          proposals, counts, sizes, weights=cfg["box_weights"],
                                          score_thresh=cfg["score_thresh"], nms_thresh=cfg["nms_thresh"],
                                          detections_per_image=cfg["detections_per_image"])
    rois = pp.rois_from_padded(dets.boxes, dets.counts, int(dets.counts.sum()))
    strides = [round(1 / s) for s in cfg["box_pooler"]["scales"]]
    mf = RoIPooler(14, strides, sampling_ratio=2, aligned=True)(feats, rois) if cfg["mask_pooler"] else None
    kf = RoIPooler(6, strides, sampling_ratio=2, aligned=True)(feats, rois) if cfg["keypoint_pooler"] else None
    return dets, mf, kf


def _stage2_inputs(n=3, p=40, c=5, dtype=torch.float32, seed=0, image=64, counts=None):
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor(counts if counts is not None else [p - 3 * i for i in range(n)], dtype=torch.int64)
    proposals = torch.zeros(n, p, 4, dtype=dtype)
    for i, k in enumerate(counts.tolist()):
        xy = torch.rand(k, 2, generator=g, dtype=dtype) * image * 0.8
        wh = torch.rand(k, 2, generator=g, dtype=dtype) * image * 0.5 + 1
        proposals[i, :k] = torch.cat([xy, xy + wh], 1)
    r = int(counts.sum())
    logits = torch.randn(r, c + 1, generator=g, dtype=dtype) * 2
    deltas = torch.randn(r, 4 * (c + 1), generator=g, dtype=dtype) * 0.5
    feats = [torch.randn(n, 16, image // 2 ** (k + 2), image // 2 ** (k + 2), generator=g, dtype=dtype)
             for k in range(4)]
    return logits, deltas, proposals, counts, feats


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("score,nms,d", [(0.05, 0.5, 100), (0.0, 0.3, 7), (0.2, 0.9, 3)])
def test_detection_stage_equals_reference(dtype, score, nms, d):
    cfg = _config(score=score, nms=nms, d=d)
    graph = InferenceGraph(cfg)
    logits, deltas, proposals, counts, feats = _stage2_inputs(dtype=dtype, seed=int(score * 10 + d))
    sizes = [(64, 64), (40, 64), (64, 30)]
    ref = _reference_stage2(cfg, logits, deltas, proposals, counts, feats, sizes)
    out = graph.detection_stage(logits, deltas, proposals, counts, feats, sizes)
    _assert_dets_equal(ref[0], out[0])
    assert int(out[0].counts.sum()) > 0
    torch.testing.assert_close(out[1], ref[1], rtol=0, atol=0)
    torch.testing.assert_close(out[2], ref[2], rtol=0, atol=0)


def test_detection_stage_edge_cases():
    cfg = _config()
    graph = InferenceGraph(cfg)
    sizes = [(64, 64), (40, 64)]
    # one image without proposals
    inputs = _stage2_inputs(n=2, p=12, counts=[0, 12], seed=5)
    ref = _reference_stage2(cfg, *inputs, sizes)
    out = graph.detection_stage(*inputs[:4], inputs[4], sizes)
    _assert_dets_equal(ref[0], out[0])
    assert out[1].shape == ref[1].shape
    # no proposals at all
    inputs = _stage2_inputs(n=2, p=12, counts=[0, 0], seed=5)
    dets, mf, kf = graph.detection_stage(*inputs[:4], inputs[4], sizes)
    _assert_dets_equal(_reference_stage2(cfg, *inputs, sizes)[0], dets)
    assert dets.counts.tolist() == [0, 0] and not dets.boxes.any() and not dets.labels.any()
    assert mf.shape == (0, 16, 14, 14) and kf.shape == (0, 16, 6, 6)
    # every box outside the image: clipped to zero width, removed
    logits, deltas, proposals, counts, feats = _stage2_inputs(n=2, p=12, seed=6)
    proposals = proposals + 500
    out = graph.detection_stage(logits, deltas, proposals, counts, feats, sizes)
    ref = _reference_stage2(cfg, logits, deltas, proposals, counts, feats, sizes)
    assert out[0].counts.tolist() == ref[0].counts.tolist() == [0, 0] and out[1].shape[0] == 0
    # nothing above the score threshold
    graph1 = InferenceGraph(_config(score=1.0))
    logits, deltas, proposals, counts, feats = _stage2_inputs(n=2, p=12, seed=7)
    assert graph1.detection_stage(logits, deltas, proposals, counts, feats, sizes)[0].counts.tolist() == [0, 0]


def test_detection_stage_one_class_and_ties():
    cfg = _config(score=0.0, d=50)
    graph = InferenceGraph(cfg)
    sizes = [(64, 64)]
    # one foreground class
    logits, deltas, proposals, counts, feats = _stage2_inputs(n=1, p=30, c=1, seed=8, counts=[30])
    _assert_dets_equal(_reference_stage2(cfg, logits, deltas, proposals, counts, feats, sizes)[0],
                       graph.detection_stage(logits, deltas, proposals, counts, feats, sizes)[0])
    # ties: repeated RoIs (same box, logits, deltas) and classes with equal logits
    logits, deltas, proposals, counts, feats = _stage2_inputs(n=1, p=20, c=4, seed=9, counts=[20])
    logits[:, 1:] = logits[:, 1:2]                  # every class of a RoI scores the same
    proposals[0, 10:] = proposals[0, :10]
    logits[10:], deltas[10:] = logits[:10], deltas[:10]
    deltas[:, 4:] = 0.0                             # far apart boxes per RoI: NMS keeps one of each duplicate pair
    ref = _reference_stage2(cfg, logits, deltas, proposals, counts, feats, sizes)[0]
    out = graph.detection_stage(logits, deltas, proposals, counts, feats, sizes)[0]
    _assert_dets_equal(ref, out)
    assert len(set(out.scores[0, :int(out.counts[0])].tolist())) < int(out.counts[0])   # there were ties


# ---- stage 3 ------------------------------------------------------------------------------------------------


def _dets(n=3, d=6, dtype=torch.float32, counts=(6, 0, 3), seed=0, image=(64, 80)):
    g = torch.Generator().manual_seed(seed)
    boxes = torch.zeros(n, d, 4, dtype=dtype)
    scores = torch.zeros(n, d, dtype=dtype)
    labels = torch.zeros(n, d, dtype=torch.int64)
    for i, k in enumerate(counts):
        xy = torch.rand(k, 2, generator=g, dtype=dtype) * torch.tensor(image[::-1], dtype=dtype) * 0.7
        wh = torch.rand(k, 2, generator=g, dtype=dtype) * 30 + 0.4
        boxes[i, :k] = torch.cat([xy, xy + wh], 1)
        scores[i, :k] = torch.rand(k, generator=g, dtype=dtype).sort(descending=True).values
        labels[i, :k] = torch.randint(1, 4, (k,), generator=g)
    return pp.Detections(boxes, scores, labels, torch.tensor(counts, dtype=torch.int64))


def _assert_results_equal(ref: list, out: list, mask_format: str):
    assert len(ref) == len(out)
    for a, b in zip(ref, out):
        assert list(a) == list(b)
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(b["boxes"], a["boxes"], rtol=0, atol=0)
        torch.testing.assert_close(b["scores"], a["scores"], rtol=2e-6, atol=1e-7)   # softmax to float rounding
        if "masks" in a:
            assert a["masks"].shape == b["masks"].shape and a["masks"].dtype == b["masks"].dtype
            if mask_format == "prob":
                torch.testing.assert_close(b["masks"], a["masks"], rtol=0, atol=1e-6)
            else:
                for x, y in zip(a["masks"], b["masks"]):
                    assert mask_iou(x, y) >= 0.999
        if "masks_rle" in a:
            assert len(a["masks_rle"]) == len(b["masks_rle"])
            same = sum(x == y for x, y in zip(a["masks_rle"], b["masks_rle"]))
            assert same >= len(a["masks_rle"]) - 1   # a sigmoid rounded differently may move one pixel
        if "keypoints" in a:
            torch.testing.assert_close(b["keypoints"], a["keypoints"], rtol=0, atol=0)
            torch.testing.assert_close(b["keypoints_scores"], a["keypoints_scores"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_format", ["prob", "bool", "rle"])
@pytest.mark.parametrize("loss,channels", [("sigmoid", 4), ("softmax", 4), ("sigmoid", 1), ("softmax", 2)])
@pytest.mark.parametrize("aligned", [True, False])
def test_result_stage_equals_reference(mask_format, loss, channels, aligned):
    cfg = _config()
    cfg.update(mask_loss=loss, paste_aligned=aligned)
    graph = InferenceGraph(cfg)
    dets = _dets(seed=channels)
    r = int(dets.counts.sum())
    g = torch.Generator().manual_seed(1)
    ml = torch.randn(r, channels, 28, 28, generator=g) * 3
    kl = torch.randn(r, 5, 24, 24, generator=g)
    sizes, sizes0 = [(64, 80), (64, 64), (50, 80)], [(128, 160), (32, 30), (75, 120)]
    labels = pp.pack(dets.labels, dets.counts, r)
    ref = pp.detector_results(dets, sizes, sizes0, mask_probs=pp.mask_probs(ml, labels, loss), keypoint_heatmaps=kl,
                              mask_format=mask_format, aligned=aligned)
    out = graph.result_stage(dets, ml, kl, sizes, sizes0, mask_format=mask_format)
    _assert_results_equal(ref, out, mask_format)


def test_result_stage_float64_and_no_detections():
    cfg = _config()
    graph = InferenceGraph(cfg)
    for counts in ((4, 2), (0, 0)):
        dets = _dets(n=2, d=4, dtype=F64, counts=counts, seed=3)
        r = int(dets.counts.sum())
        ml, kl = torch.randn(r, 4, 14, 14, dtype=F64), torch.randn(r, 3, 12, 12, dtype=F64)
        sizes, sizes0 = [(64, 80), (64, 64)], [(64, 80), (100, 90)]
        labels = pp.pack(dets.labels, dets.counts, r)
        for fmt in ("prob", "bool", "rle"):
            ref = pp.detector_results(dets, sizes, sizes0, mask_probs=pp.mask_probs(ml, labels), keypoint_heatmaps=kl,
                                      mask_format=fmt)
            _assert_results_equal(ref, graph.result_stage(dets, ml, kl, sizes, sizes0, mask_format=fmt), fmt)


def test_heatmaps_to_keypoints_locations_equal_reference():
    from mrcnn_fast._lib import _C, dl
    g = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, F64):
        maps = torch.randn(20, 17, 56, 56, generator=g, dtype=dtype)
        xy0 = torch.rand(20, 2, generator=g, dtype=dtype) * 200
        boxes = torch.cat([xy0, xy0 + torch.rand(20, 2, generator=g, dtype=dtype) * 150 + 0.3], 1)
        ref_xy, ref_s = pp.heatmaps_to_keypoints(maps, boxes)
        xy, s = torch.empty_like(ref_xy), torch.empty_like(ref_s)
        _C.InferenceGraph.heatmaps_to_keypoints(dl(maps), dl(boxes), dl(xy), dl(s))
        assert torch.equal(xy, ref_xy)
        torch.testing.assert_close(s, ref_s)


# ---- the whole model ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{"keypoint": {"enabled": True}},
                                       {"fpn": {"enabled": False}, "anchors": {"sizes": [[16, 32, 64]]}},
                                       {"mask": {"loss": "softmax"}}])
def test_model_inference_with_graph_equals_reference(overrides):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(overrides, size=96)).eval()
    model.roi_heads.score_thresh = 0.0
    graph = InferenceGraph.from_model(model, fallback=False)
    images, _ = shapes_batch(3, size=(96, 128), seed=2)
    images[1] = images[1][:, :80, :100]
    batch, image_sizes, _, input_sizes = model.preprocess(images)
    for fmt in ("prob", "bool", "rle") if "keypoint" in overrides else ("rle",):
        ref = model.inference(batch, image_sizes, input_sizes, mask_format=fmt)
        out = model.inference(batch, image_sizes, input_sizes, mask_format=fmt, stages=graph)
        assert sum(len(r["boxes"]) for r in ref) > 0
        _assert_results_equal(ref, out, fmt)
    with torch.no_grad():
        ref, out = model([images[0]]), model.inference(*_pre(model, [images[0]]), stages=graph)
    _assert_results_equal(ref, out, "prob")


def _pre(model, images):
    batch, image_sizes, _, input_sizes = model.preprocess(images)
    return batch, image_sizes, input_sizes


def test_from_model_rejects_what_it_does_not_support():
    model = build_model(tiny_cfg({"roi_heads": {"test_box_refine": 1}}))
    with pytest.raises(ValueError, match="refiners"):
        InferenceGraph.from_model(model)
    model = build_model(tiny_cfg({"roi_heads": {"pooler": "roi_pool"}}))
    with pytest.raises(ValueError, match="RoIAlign"):
        InferenceGraph.from_model(model)


# ---- errors, threads, workspaces, tracing -------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(graph):
    logits, deltas, proposals, counts, feats = _stage2_inputs(n=2, p=12, seed=10, c=3)
    sizes = [(64, 64), (64, 64)]
    g = InferenceGraph(_config())
    with pytest.raises(ValueError, match="box_regression must have shape"):
        g.detection_stage(logits, deltas[:, :8], proposals, counts, feats, sizes)
    with pytest.raises(ValueError, match="class_logits must have shape"):
        g.detection_stage(logits[:3], deltas, proposals, counts, feats, sizes)
    with pytest.raises(ValueError, match="counts"):
        g.detection_stage(logits, deltas, proposals, counts + 100, feats, sizes)
    with pytest.raises(TypeError, match="counts must be int64"):
        g.detection_stage(logits, deltas, proposals, counts.int(), feats, sizes)
    with pytest.raises(ValueError, match="image_sizes"):
        g.detection_stage(logits, deltas, proposals, counts, feats, sizes[:1])
    with pytest.raises(ValueError, match="one dtype"):
        g.detection_stage(logits, deltas, proposals, counts, [f.double() for f in feats], sizes)
    with pytest.raises(ValueError, match="feature maps"):
        g.detection_stage(logits, deltas, proposals, counts, feats[:2], sizes)
    with pytest.raises(ValueError, match="CPU float32 / float64"):
        g.detection_stage(logits, deltas, proposals.half(), counts, feats, sizes)
    obj, dl, anc, feats = _rpn_inputs(2)
    obj[0][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        graph.proposal_stage(obj, dl, anc, feats, sizes)
    with pytest.raises(ValueError, match="mask_format"):
        g.result_stage(_dets(), None, None, sizes, sizes, mask_format="png")
    with pytest.raises(ValueError, match="config is missing"):
        InferenceGraph({"rpn_pre_nms_top_n": 1})
    bad = _config()
    bad["box_weights"] = [0.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="weights"):
        InferenceGraph(bad)


def test_threads_share_one_graph_and_workspaces_only_grow():
    cfg = _config(score=0.0)
    graph = InferenceGraph(cfg)
    sizes = [(64, 64), (40, 64), (64, 30)]
    inputs = [_stage2_inputs(seed=s) for s in range(8)]
    expected = [graph.detection_stage(*x[:4], x[4], sizes) for x in inputs]
    grown = graph.workspace_bytes()
    assert grown > 0
    results = [None] * len(inputs)

    def work(k):
        for _ in range(3):
            results[k] = graph.detection_stage(*inputs[k][:4], inputs[k][4], sizes)
    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e, r in zip(expected, results):
        _assert_dets_equal(e[0], r[0])
        assert torch.equal(e[1], r[1])
    assert graph.workspace_bytes() == grown   # same sizes: nothing reallocated


def test_stages_trace_under_torch_compile():
    cfg = _config()
    graph = InferenceGraph(cfg)
    logits, deltas, proposals, counts, feats = _stage2_inputs(n=2, p=12, seed=11)
    sizes = torch.tensor([[64.0, 64.0], [40.0, 64.0]], dtype=F64)

    def f(logits, deltas, proposals, counts, f0, f1, f2, f3):
        boxes, scores, labels, dc, mf, kf = _detection_op(graph.graph_id, logits, deltas, proposals, counts,
                                                          [f0, f1, f2, f3], sizes)
        return boxes * 2, scores, mf.sum(dim=(1, 2, 3)), kf.shape[0]

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    got, want = compiled(logits, deltas, proposals, counts, *feats), f(logits, deltas, proposals, counts, *feats)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[2], want[2])
    obj, dl, anc, feats = _rpn_inputs(2)
    img = torch.tensor([[64.0, 64.0], [64.0, 48.0]], dtype=F64)
    torch.library.opcheck(_proposal_op, (graph.graph_id, obj, dl, anc, feats, img),
                          test_utils=("test_schema", "test_faketensor"))


def test_result_op_traces_and_zero_detections_per_image():
    from mrcnn_fast.graph import _result_op
    graph = InferenceGraph(_config())
    dets = _dets()
    r = int(dets.counts.sum())
    ml, kl = torch.randn(r, 4, 14, 14), torch.randn(r, 5, 12, 12)
    sizes = torch.tensor([[64.0, 80.0], [64.0, 64.0], [50.0, 80.0]], dtype=F64)
    for fmt in (0, 1):
        torch.library.opcheck(_result_op, (graph.graph_id, *dets, ml, kl, sizes, sizes * 2, fmt),
                              test_utils=("test_schema", "test_faketensor"))
    none = InferenceGraph(_config(d=0))
    logits, deltas, proposals, counts, feats = _stage2_inputs(n=2, p=12, seed=12)
    dets, mf, kf = none.detection_stage(logits, deltas, proposals, counts, feats, [(64, 64), (64, 64)])
    assert dets.boxes.shape == (2, 0, 4) and dets.counts.tolist() == [0, 0] and mf.shape[0] == 0
    out = none.result_stage(dets, mf.new_zeros((0, 4, 28, 28)), kf.new_zeros((0, 5, 24, 24)), [(64, 64)] * 2,
                            [(32, 32)] * 2, mask_format="bool")
    assert [o["masks"].shape for o in out] == [(0, 32, 32)] * 2 and out[0]["keypoints"].shape == (0, 5, 3)


def test_inputs_the_graph_does_not_take_go_to_the_fallback():
    calls = []

    class Fallback:
        def detection_stage(self, *args):
            calls.append("detection_stage")
            return "torch stage"
    graph = InferenceGraph(_config(), fallback=Fallback())
    logits, deltas, proposals, counts, feats = _stage2_inputs(n=1, p=12, counts=[12], seed=13)
    feats = [f.bfloat16() for f in feats]   # e.g. features under CPU autocast
    assert graph.detection_stage(logits, deltas, proposals, counts, feats, [(64, 64)]) == "torch stage"
    assert calls == ["detection_stage"]
