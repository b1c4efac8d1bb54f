"""RPN proposal generation against torchvision's RegionProposalNetwork (CPU).

Setting: 5-level FPN on a batch of 2 images of 800x1333 (padded to 800x1344), strides 4..64, 3 anchors
per location (267k anchors per image), pre_nms_top_n 1000 per level, post_nms_top_n 1000, NMS 0.7,
random logits and deltas.

Timed, torchvision: BoxCoder.decode of all anchors + filter_proposals, starting from the objectness and
deltas already permuted/concatenated by concat_box_prediction_layers (that step is not timed).
Timed, mrcnn_fast: generate_proposals (top-k, decode of the kept anchors, clip, filters, NMS, merge),
starting from the per-level permuted/flattened tensors (also not timed).

Expected before optimising (2 cores): torchvision decodes all 534k anchors with ~20 tensor ops and runs
per-level NMS through Python; ours decodes 10k boxes and does the rest in one C++ call: >= 10x (target
3x).
"""
import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers

from mrcnn_fast import ops

N, H, W, A = 2, 800, 1344, 3
STRIDES = (4, 8, 16, 32, 64)
PRE, POST, THR = 1000, 1000, 0.7


def _setup():
    g = torch.Generator().manual_seed(0)
    feats = [torch.zeros(N, 1, math.ceil(H / s), math.ceil(W / s)) for s in STRIDES]
    anchor_gen = AnchorGenerator(tuple((8 * s,) for s in STRIDES), ((0.5, 1.0, 2.0),) * len(STRIDES))
    images = ImageList(torch.zeros(N, 3, H, W), [(800, 1333)] * N)
    anchors = anchor_gen(images, feats)
    objs = [torch.randn(N, A, f.shape[2], f.shape[3], generator=g) for f in feats]
    dels = [torch.randn(N, 4 * A, f.shape[2], f.shape[3], generator=g) * 0.2 for f in feats]
    per_level = [o[0].numel() for o in objs]
    rpn = RegionProposalNetwork(anchor_gen, RPNHead(1, A), 0.7, 0.3, 256, 0.5, dict(training=PRE, testing=PRE),
                                dict(training=POST, testing=POST), THR).eval()
    obj_flat, del_flat = concat_box_prediction_layers(objs, dels)
    ours = ([o.permute(0, 2, 3, 1).reshape(N, -1) for o in objs],
            [d.view(N, A, 4, d.shape[2], d.shape[3]).permute(0, 3, 4, 1, 2).reshape(N, -1, 4) for d in dels],
            list(anchors[0].split(per_level)), torch.tensor(images.image_sizes))

    def tv():
        props = rpn.box_coder.decode(del_flat, anchors).view(N, -1, 4)
        return rpn.filter_proposals(props, obj_flat, images.image_sizes, per_level)

    def mine():
        return ops.generate_proposals(*ours, PRE, POST, THR)

    return tv, mine


TV, MINE = _setup()
GROUP = "generate_proposals: FPN 5 levels, 2x800x1333, 1000 pre/level, 1000 post"


@pytest.mark.benchmark(group=GROUP)
def test_proposals_mrcnn_fast(bench):
    tb, ts = TV()
    b, s, c = MINE()
    for i in range(N):
        k = int(c[i])
        assert k == len(tb[i])
        # Same scores in the same order (equal scores may be ordered differently: torchvision's final
        # sort is not stable); the boxes as a set.
        torch.testing.assert_close(s[i, :k], ts[i], rtol=1e-6, atol=1e-7)
        ours_sorted = b[i, :k][torch.argsort(b[i, :k, 0] * 1e5 + b[i, :k, 1])]
        tv_sorted = tb[i][torch.argsort(tb[i][:, 0] * 1e5 + tb[i][:, 1])]
        torch.testing.assert_close(ours_sorted, tv_sorted, rtol=1e-5, atol=1e-3)
    bench(MINE)


@pytest.mark.benchmark(group=GROUP)
def test_proposals_torchvision(bench):
    bench(TV)
