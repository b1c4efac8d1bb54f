import math

import pytest
import torch
import torchvision
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers

from conftest import cuda_only
from mrcnn_fast import ops


def make_inputs(seed, *, n=2, hw=(96, 128), image_sizes=((96, 128), (80, 100)), strides=(8, 16, 32), a=3,
                dtype=torch.float32):
    """Random RPN head outputs in torchvision's layout and ours (same numbers)."""
    g = torch.Generator().manual_seed(seed)
    feats = [torch.zeros(n, 1, math.ceil(hw[0] / s), math.ceil(hw[1] / s)) for s in strides]
    sizes = tuple((4 * s,) for s in strides)
    ratios = ((0.5, 1.0, 2.0)[:a],) * len(strides)
    images = ImageList(torch.zeros(n, 3, *hw), [tuple(x) for x in image_sizes])
    anchors = AnchorGenerator(sizes, ratios)(images, feats)
    objs = [torch.randn(n, a, f.shape[2], f.shape[3], generator=g, dtype=torch.float64).to(dtype) for f in feats]
    dels = [(torch.randn(n, 4 * a, f.shape[2], f.shape[3], generator=g, dtype=torch.float64) * 0.3).to(dtype)
            for f in feats]
    per_level = [o[0].numel() for o in objs]
    ours = dict(
        objectness=[o.permute(0, 2, 3, 1).reshape(n, -1) for o in objs],
        deltas=[d.view(n, a, 4, d.shape[2], d.shape[3]).permute(0, 3, 4, 1, 2).reshape(n, -1, 4) for d in dels],
        anchors=list(anchors[0].to(dtype).split(per_level)),
        image_sizes=torch.tensor(image_sizes),
    )
    return ours, (objs, dels, anchors, images, per_level)


def torchvision_proposals(tv, pre, post, thr, score_thresh=0.0, min_size=1e-3):
    objs, dels, anchors, images, per_level = tv
    rpn = RegionProposalNetwork(AnchorGenerator(), RPNHead(1, 3), 0.7, 0.3, 256, 0.5,
                                dict(training=pre, testing=pre), dict(training=post, testing=post), thr,
                                score_thresh=score_thresh).eval()
    rpn.min_size = min_size
    obj, deltas = concat_box_prediction_layers(objs, dels)
    props = rpn.box_coder.decode(deltas, [x.to(deltas.dtype) for x in anchors]).view(len(anchors), -1, 4)
    return rpn.filter_proposals(props, obj, images.image_sizes, per_level)


def assert_same_proposals(boxes, scores, tv_boxes, tv_scores):
    """Same scores in the same order; boxes equal, where equal scores may come in either order
    (torchvision's final sort is not stable)."""
    assert len(boxes) == len(tv_boxes)
    torch.testing.assert_close(scores, tv_scores, rtol=1e-6, atol=1e-7)
    i = 0
    while i < len(scores):
        j = i + 1
        while j < len(scores) and tv_scores[j] == tv_scores[i]:
            j += 1
        a, b = boxes[i:j].double(), tv_boxes[i:j].double()
        if j - i > 1:  # a tie: compare as sets
            a = a[torch.argsort(a[:, 0] * 1e6 + a[:, 1])]
            b = b[torch.argsort(b[:, 0] * 1e6 + b[:, 1])]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-3)
        i = j


@pytest.mark.parametrize("pre,post,thr,score_thresh,min_size",
                         [(100, 60, 0.7, 0.0, 1e-3), (50, 200, 0.5, 0.4, 1e-3), (1000, 30, 0.7, 0.0, 8.0),
                          (20, 20, 0.3, 0.0, 1e-3)])
def test_proposals_match_torchvision(device, pre, post, thr, score_thresh, min_size):
    ours, tv = make_inputs(pre + post)
    moved = {k: ([t.to(device) for t in v] if isinstance(v, list) else v.to(device)) for k, v in ours.items()}
    boxes, scores, counts = ops.generate_proposals(**moved, pre_nms_top_n=pre, post_nms_top_n=post, nms_thresh=thr,
                                                   score_thresh=score_thresh, min_size=min_size)
    assert boxes.shape == (2, post, 4) and scores.shape == (2, post) and counts.shape == (2,)
    assert counts.dtype == torch.int64
    tv_boxes, tv_scores = torchvision_proposals(tv, pre, post, thr, score_thresh, min_size)
    for i in range(2):
        k = int(counts[i])
        assert k == len(tv_boxes[i])
        assert_same_proposals(boxes[i, :k].cpu(), scores[i, :k].cpu(), tv_boxes[i], tv_scores[i])
        assert (boxes[i, k:] == 0).all() and (scores[i, k:] == 0).all()


def test_proposals_match_torchvision_fpn_per_level_path():
    # > 1000 candidates per image: torchvision's batched_nms runs one NMS per level here.
    ours, tv = make_inputs(11, hw=(256, 320), image_sizes=((256, 320), (250, 300)), strides=(4, 8, 16, 32, 64))
    boxes, scores, counts = ops.generate_proposals(**ours, pre_nms_top_n=300, post_nms_top_n=400, nms_thresh=0.7)
    tv_boxes, tv_scores = torchvision_proposals(tv, 300, 400, 0.7)
    for i in range(2):
        k = int(counts[i])
        assert k == len(tv_boxes[i]) == 400
        assert_same_proposals(boxes[i, :k], scores[i, :k], tv_boxes[i], tv_scores[i])


def test_proposals_float64_and_list_form():
    ours, tv = make_inputs(7, dtype=torch.float64, image_sizes=((90, 120), (96, 128)))
    sizes = [(90, 120), (96, 128)]
    boxes, scores = ops.generate_proposals_list(ours["objectness"], ours["deltas"], ours["anchors"], sizes, 80, 50,
                                                0.6)
    tv_boxes, tv_scores = torchvision_proposals(tv, 80, 50, 0.6)
    for i in range(2):
        assert boxes[i].dtype == torch.float64
        assert_same_proposals(boxes[i], scores[i], tv_boxes[i], tv_scores[i])


def ref_proposals(objectness, deltas, anchors, hw, pre, post, thr, min_size=1e-3):
    """One image, written out with Python loops in float64."""
    cands = []
    for lvl, (o, d, a) in enumerate(zip(objectness, deltas, anchors)):
        o, d, a = o.double().tolist(), d.double().tolist(), a.double().tolist()
        order = sorted(range(len(o)), key=lambda i: -o[i])[:pre]
        level = []
        for i in order:
            w, h = a[i][2] - a[i][0], a[i][3] - a[i][1]
            cx, cy = a[i][0] + w / 2, a[i][1] + h / 2
            dw, dh = min(d[i][2], math.log(1000 / 16)), min(d[i][3], math.log(1000 / 16))
            px, py, pw, ph = d[i][0] * w + cx, d[i][1] * h + cy, math.exp(dw) * w, math.exp(dh) * h
            b = [px - pw / 2, py - ph / 2, px + pw / 2, py + ph / 2]
            b = [min(max(b[0], 0), hw[1]), min(max(b[1], 0), hw[0]), min(max(b[2], 0), hw[1]), min(max(b[3], 0), hw[0])]
            if b[2] - b[0] >= min_size and b[3] - b[1] >= min_size:
                level.append((1 / (1 + math.exp(-o[i])), b))
        kept = []
        for s, b in level:  # already by descending score
            ok = True
            for _, k in kept:
                iw = max(0.0, min(b[2], k[2]) - max(b[0], k[0]))
                ih = max(0.0, min(b[3], k[3]) - max(b[1], k[1]))
                inter = iw * ih
                union = (b[2] - b[0]) * (b[3] - b[1]) + (k[2] - k[0]) * (k[3] - k[1]) - inter
                if inter / union > thr:
                    ok = False
                    break
            if ok:
                kept.append((s, b))
        cands += [(s, lvl, r, b) for r, (s, b) in enumerate(kept)]
    cands.sort(key=lambda c: (-c[0], c[1], c[2]))
    cands = cands[:post]
    return (torch.tensor([c[3] for c in cands], dtype=torch.float64).reshape(-1, 4),
            torch.tensor([c[0] for c in cands], dtype=torch.float64))


def test_proposals_match_python_reference():
    ours, _ = make_inputs(3, n=1, image_sizes=((96, 128),))
    ours = {k: ([t.double() for t in v] if isinstance(v, list) else v) for k, v in ours.items()}
    boxes, scores, counts = ops.generate_proposals(**ours, pre_nms_top_n=40, post_nms_top_n=70, nms_thresh=0.6)
    rb, rs = ref_proposals([o[0] for o in ours["objectness"]], [d[0] for d in ours["deltas"]], ours["anchors"],
                           (96, 128), 40, 70, 0.6)
    k = int(counts[0])
    assert k == len(rb)
    torch.testing.assert_close(boxes[0, :k], rb, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(scores[0, :k], rs, rtol=1e-12, atol=1e-12)


def test_proposals_edge_cases(device):
    ours, _ = make_inputs(5)
    ours = {k: ([t.to(device) for t in v] if isinstance(v, list) else v.to(device)) for k, v in ours.items()}
    # Everything filtered by the score threshold: zero counts, zero rows.
    b, s, c = ops.generate_proposals(**ours, pre_nms_top_n=10, post_nms_top_n=5, nms_thresh=0.7, score_thresh=1.1)
    assert c.tolist() == [0, 0] and (b == 0).all() and (s == 0).all()
    # post_nms_top_n = 0 and pre_nms_top_n = 0
    b, s, c = ops.generate_proposals(**ours, pre_nms_top_n=10, post_nms_top_n=0, nms_thresh=0.7)
    assert b.shape == (2, 0, 4) and c.tolist() == [0, 0]
    b, s, c = ops.generate_proposals(**ours, pre_nms_top_n=0, post_nms_top_n=4, nms_thresh=0.7)
    assert c.tolist() == [0, 0] and (b == 0).all()
    # A level without anchors.
    empty = dict(objectness=[torch.zeros(2, 0, device=device)] + ours["objectness"],
                 deltas=[torch.zeros(2, 0, 4, device=device)] + ours["deltas"],
                 anchors=[torch.zeros(0, 4, device=device)] + ours["anchors"], image_sizes=ours["image_sizes"])
    b1, s1, c1 = ops.generate_proposals(**empty, pre_nms_top_n=30, post_nms_top_n=20, nms_thresh=0.7)
    b2, s2, c2 = ops.generate_proposals(**ours, pre_nms_top_n=30, post_nms_top_n=20, nms_thresh=0.7)
    torch.testing.assert_close(b1, b2)
    torch.testing.assert_close(c1, c2)
    # No images.
    none = dict(objectness=[o[:0] for o in ours["objectness"]], deltas=[d[:0] for d in ours["deltas"]],
                anchors=ours["anchors"], image_sizes=ours["image_sizes"][:0])
    b, s, c = ops.generate_proposals(**none, pre_nms_top_n=30, post_nms_top_n=20, nms_thresh=0.7)
    assert b.shape == (0, 20, 4) and c.shape == (0,)


def test_proposals_tied_logits_rank_by_anchor_index():
    # All logits equal: the pre-NMS top-k are the first anchors, and the output keeps that order.
    ours, _ = make_inputs(6, n=1, image_sizes=((96, 128),), strides=(16,))
    ours["objectness"] = [torch.zeros_like(o) for o in ours["objectness"]]
    ours["deltas"] = [torch.zeros_like(d) for d in ours["deltas"]]
    b, s, c = ops.generate_proposals(**ours, pre_nms_top_n=5, post_nms_top_n=5, nms_thresh=1.0)
    expect = torchvision.ops.clip_boxes_to_image(ours["anchors"][0][:5], (96, 128))
    torch.testing.assert_close(b[0], expect)
    assert (s == 0.5).all()


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_proposals_cuda_matches_cpu_fpn(dtype):
    ours, _ = make_inputs(9, hw=(320, 448), image_sizes=((320, 448), (300, 400)), strides=(4, 8, 16, 32, 64),
                          dtype=dtype)
    cuda_in = {k: ([t.cuda() for t in v] if isinstance(v, list) else v.cuda()) for k, v in ours.items()}
    cpu_in = {k: ([t.float() for t in v] if isinstance(v, list) else v) for k, v in ours.items()}
    b, s, c = ops.generate_proposals(**cuda_in, pre_nms_top_n=500, post_nms_top_n=300, nms_thresh=0.7)
    rb, rs, rc = ops.generate_proposals(**cpu_in, pre_nms_top_n=500, post_nms_top_n=300, nms_thresh=0.7)
    torch.testing.assert_close(c.cpu(), rc)
    tol = dict(rtol=1e-5, atol=1e-3) if dtype == torch.float32 else dict(rtol=2e-3, atol=0.5)
    for i in range(2):
        k = int(rc[i])
        if dtype == torch.float32:
            assert_same_proposals(b[i, :k].cpu(), s[i, :k].cpu(), rb[i, :k], rs[i, :k])
        else:
            torch.testing.assert_close(s[i, :k].float().cpu(), rs[i, :k], **tol)


def test_proposals_bad_inputs():
    ours, _ = make_inputs(1)
    args = dict(pre_nms_top_n=10, post_nms_top_n=5, nms_thresh=0.7)

    def call(**kw):
        return ops.generate_proposals(**{**ours, **kw}, **args)

    with pytest.raises(ValueError, match="levels|one entry per level"):
        call(deltas=ours["deltas"][:2])
    with pytest.raises(TypeError, match="objectness"):
        call(objectness=ours["objectness"][0])
    with pytest.raises(ValueError, match=r"deltas\[1\]"):
        call(deltas=[ours["deltas"][0], ours["deltas"][1][:, :-1], ours["deltas"][2]])
    with pytest.raises(ValueError, match=r"anchors\[0\]"):
        call(anchors=[ours["anchors"][0][:-3]] + ours["anchors"][1:])
    with pytest.raises(ValueError, match=r"objectness\[2\]"):
        call(objectness=ours["objectness"][:2] + [ours["objectness"][2][:1]])
    with pytest.raises(TypeError, match=r"deltas\[0\]"):
        call(deltas=[ours["deltas"][0].double()] + ours["deltas"][1:])
    with pytest.raises(TypeError, match="objectness"):
        call(objectness=[o.long() for o in ours["objectness"]])
    with pytest.raises(ValueError, match="image_sizes"):
        call(image_sizes=torch.tensor([[96, 128]]))
    with pytest.raises(TypeError, match="image_sizes"):
        call(image_sizes=[96, 128])
    bad = [o.clone() for o in ours["objectness"]]
    bad[1][0, 3] = float("nan")
    with pytest.raises(ValueError, match="objectness"):
        call(objectness=bad)
    bad[1][0, 3] = float("inf")
    with pytest.raises(ValueError, match="objectness"):
        call(objectness=bad)
    with pytest.raises(ValueError, match="anchors"):
        call(anchors=[torch.full_like(ours["anchors"][0], float("nan"))] + ours["anchors"][1:])
    with pytest.raises(ValueError, match="pre_nms_top_n"):
        ops.generate_proposals(**ours, pre_nms_top_n=-1, post_nms_top_n=5, nms_thresh=0.7)
    with pytest.raises(TypeError, match="post_nms_top_n"):
        ops.generate_proposals(**ours, pre_nms_top_n=10, post_nms_top_n=5.0, nms_thresh=0.7)
    with pytest.raises(ValueError, match="nms_thresh"):
        ops.generate_proposals(**ours, pre_nms_top_n=10, post_nms_top_n=5, nms_thresh=float("nan"))
    with pytest.raises(ValueError, match="device"):
        call(anchors=[a.to("meta") for a in ours["anchors"]])


def test_proposals_opcheck():
    ours, _ = make_inputs(2)
    torch.library.opcheck(torch.ops.mrcnn_fast.generate_proposals.default,
                          (ours["objectness"], ours["deltas"], ours["anchors"], ours["image_sizes"].double(), 30,
                           20, 0.7, 0.0, 1e-3, [1.0, 1.0, 1.0, 1.0], math.log(1000 / 16)))


def test_proposals_torch_compile_fullgraph():
    ours, _ = make_inputs(4)

    def rpn_post(objectness, deltas, anchors, sizes):
        boxes, scores, counts = ops.generate_proposals(objectness, deltas, anchors, sizes, 40, 25, 0.7)
        return boxes * (scores[..., None] > 0.5), counts

    sizes = ours["image_sizes"].double()
    eager = rpn_post(ours["objectness"], ours["deltas"], ours["anchors"], sizes)
    compiled = torch.compile(rpn_post, fullgraph=True, backend="aot_eager")(ours["objectness"], ours["deltas"],
                                                                            ours["anchors"], sizes)
    for x, y in zip(eager, compiled):
        torch.testing.assert_close(x, y)
