"""Target assignment: matcher, sampler, RPN anchor labels, RoI sampling, mask and keypoint targets."""
import pytest
import torch

from _model_utils import tiny_cfg
from mrcnn_fast.modeling import RPN, BalancedSampler, Matcher, RoIHeads, keypoint_targets, mask_targets

B, X = Matcher.BELOW_LOW, Matcher.BETWEEN


def test_matcher_thresholds():
    iou = torch.tensor([[0.9, 0.4, 0.1, 0.6, 0.0],
                        [0.2, 0.5, 0.35, 0.8, 0.29]])
    got = Matcher(0.7, 0.3)(iou)
    assert got.tolist() == [0, X, X, 1, B]
    # equal thresholds (RoI heads): no "between" band
    assert Matcher(0.5, 0.5)(iou).tolist() == [0, 1, B, 1, B]


def test_matcher_low_quality_matches():
    iou = torch.tensor([[0.5, 0.2, 0.5, 0.0],
                        [0.1, 0.25, 0.0, 0.05]])
    assert Matcher(0.7, 0.3)(iou).tolist() == [X, B, X, B]
    # each GT keeps its best predictions (ties included) even below the high threshold
    assert Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou).tolist() == [0, 1, 0, B]
    # a GT that overlaps nothing claims nothing (its "best" IoU 0 would otherwise promote column 1)
    iou = torch.tensor([[0.0, 0.0], [0.8, 0.1]])
    assert Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou).tolist() == [1, B]


def test_matcher_no_gt_and_bad_thresholds():
    assert Matcher(0.7, 0.3, True)(torch.zeros(0, 3)).tolist() == [B, B, B]
    with pytest.raises(ValueError):
        Matcher(0.3, 0.7)


def test_sampler_counts_and_sets():
    torch.manual_seed(0)
    labels = torch.full((200,), -1)
    labels[:10] = 2
    labels[10:110] = 0
    pos, neg = BalancedSampler(20, 0.25)(labels)
    assert pos.numel() == 5 and neg.numel() == 15
    assert bool((labels[pos] > 0).all()) and bool((labels[neg] == 0).all())
    assert len(set(pos.tolist())) == 5 and len(set(neg.tolist())) == 15
    # few positives: negatives fill the batch
    labels[2:10] = -1
    pos, neg = BalancedSampler(20, 0.25)(labels)
    assert pos.tolist() == [0, 1] and neg.numel() == 18
    # no positives (an image without annotations): all negatives
    pos, neg = BalancedSampler(20, 0.25)(torch.zeros(50, dtype=torch.int64))
    assert pos.numel() == 0 and neg.numel() == 20
    # fewer candidates than the batch: all of them
    pos, neg = BalancedSampler(512, 0.25)(torch.tensor([1, 0, -1, 0]))
    assert pos.tolist() == [0] and sorted(neg.tolist()) == [1, 3]
    with pytest.raises(ValueError):
        BalancedSampler(0, 0.5)
    with pytest.raises(ValueError):
        BalancedSampler(10, 1.5)


def test_rpn_anchor_labels():
    rpn = RPN.from_config(tiny_cfg(), 32)
    anchors = torch.tensor([[0, 0, 10, 10], [0, 0, 9, 10], [20, 20, 30, 30], [50, 50, 60, 60], [1, 1, 11, 11.]])
    gt = torch.tensor([[0, 0, 10, 10], [52, 52, 70, 70.]])
    (labels, matched), (l0, _) = rpn.assign_targets(anchors, [gt, torch.zeros(0, 4)])
    # anchor 0: IoU 1; anchor 1: 0.9; anchor 4: IoU 81/119 = 0.68 -> ignored; anchor 3 is GT 1's best (0.22): positive
    assert labels.tolist() == [1, 1, 0, 1, -1]
    assert matched[[0, 1, 3]].tolist() == [0, 0, 1]
    assert l0.tolist() == [0, 0, 0, 0, 0]


def test_roi_sampling_appends_gt_and_puts_positives_first():
    torch.manual_seed(0)
    heads = RoIHeads.from_config(tiny_cfg(), 32, [4, 8, 16, 32, 64])
    props = torch.tensor([[0, 0, 20, 20], [60, 60, 90, 90], [2, 2, 20, 21], [100, 0, 120, 10.]])
    gt = {"boxes": torch.tensor([[0, 0, 20, 20], [58, 60, 90, 92.]]), "labels": torch.tensor([3, 1])}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    (boxes, labels, matched, npos), (b2, l2, m2, n2) = heads.sample_proposals([props, props[:3]], [gt, empty])
    assert npos == 5 and boxes.shape[0] == 6    # 3 positive proposals + 2 GT boxes, 1 negative
    assert bool((labels[:npos] > 0).all()) and bool((labels[npos:] == 0).all())
    pos = {tuple(b.tolist()): (int(lab), int(m)) for b, lab, m in zip(boxes[:npos], labels[:npos], matched[:npos])}
    assert pos[(0.0, 0.0, 20.0, 20.0)] == (3, 0)
    assert pos[(58.0, 60.0, 90.0, 92.0)] == (1, 1)
    assert pos[(60.0, 60.0, 90.0, 90.0)] == (1, 1)
    assert pos[(2.0, 2.0, 20.0, 21.0)] == (3, 0)
    assert n2 == 0 and l2.tolist() == [0, 0, 0]


def test_mask_targets_square():
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[1, 20:40, 20:40] = 1
    boxes = torch.tensor([[10, 10, 50, 50.], [20, 20, 40, 40.], [10, 10, 50, 50.]])
    t = mask_targets(masks, boxes, torch.tensor([1, 1, 0]), 28)
    assert t.shape == (3, 28, 28) and t.dtype == torch.bool
    # the square covers [20, 40) of the RoI [10, 50): bins whose centre (10 + (i + 0.5) * 40 / 28) is inside
    expect = torch.zeros(28, 28, dtype=torch.bool)
    expect[7:21, 7:21] = True
    assert torch.equal(t[0], expect)
    assert bool(t[1].all())
    assert not bool(t[2].any())      # matched to the empty mask 0
    assert mask_targets(masks, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), 28).shape == (0, 28, 28)


def test_keypoint_target_quantisation():
    boxes = torch.tensor([[10, 20, 66, 76.], [0, 0, 28, 28.]])
    kps = torch.tensor([
        [[10, 20, 2], [65.9, 20, 2], [66, 76, 1], [9.9, 30, 2]],
        [[5.2, 3.7, 2], [5.2, 3.7, 0], [28.5, 3, 2], [27.99, 27.99, 2]]])
    idx, valid = keypoint_targets(kps, boxes, 56)
    assert valid.tolist() == [[True, True, True, False], [True, False, False, True]]
    assert idx[0, :3].tolist() == [0, 55, 55 * 56 + 55]
    # scale 2: (5.2, 3.7) -> cell (10, 7); (27.99, 27.99) -> (55, 55)
    assert idx[1, 0].item() == 7 * 56 + 10 and idx[1, 3].item() == 55 * 56 + 55
    assert idx[~valid].eq(0).all()
