"""Losses against hand computations (plain float64 formulas written out here)."""
import math

import pytest
import torch

from mrcnn_fast.modeling import fast_rcnn_loss, keypoint_loss, mask_loss, rpn_loss
from mrcnn_fast.modeling.postprocess import mask_probs


def _bce(x, t):
    s = 1 / (1 + math.exp(-x))
    return -(t * math.log(s) + (1 - t) * math.log(1 - s))


def _smooth_l1(d, beta):
    d = abs(d)
    return 0.5 * d * d / beta if d < beta else d - 0.5 * beta


def test_mask_loss_sigmoid_uses_gt_class_channel():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([3, 1])
    targets = torch.rand(2, 3, 3, generator=g) > 0.5
    expect = sum(_bce(float(logits[i, labels[i], y, x]), float(targets[i, y, x]))
                 for i in range(2) for y in range(3) for x in range(3)) / 18
    got = mask_loss(logits, labels, targets, "sigmoid")
    assert got.item() == pytest.approx(expect, rel=1e-12)
    other = logits.clone()
    other[0, 1] += 5.0      # not the GT channel of RoI 0
    other[1, 2] -= 3.0
    assert mask_loss(other, labels, targets, "sigmoid").item() == pytest.approx(expect, rel=1e-12)
    other[0, 3, 0, 0] += 1.0
    assert mask_loss(other, labels, targets, "sigmoid").item() != pytest.approx(expect, rel=1e-6)
    # class-agnostic: the single channel
    agn = mask_loss(logits[:, 3:], labels, targets, "sigmoid")
    expect0 = sum(_bce(float(logits[i, 3, y, x]), float(targets[i, y, x]))
                  for i in range(2) for y in range(3) for x in range(3)) / 18
    assert agn.item() == pytest.approx(expect0, rel=1e-12)


def test_mask_loss_softmax_multinomial():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 2, 2, generator=g, dtype=torch.float64)
    labels = torch.tensor([2, 3])
    targets = torch.tensor([[[1, 0], [1, 1]], [[0, 0], [1, 0]]], dtype=torch.bool)
    total = 0.0
    for i in range(2):
        for y in range(2):
            for x in range(2):
                c = int(labels[i]) if targets[i, y, x] else 0      # background channel 0 off the mask
                z = logits[i, :, y, x]
                total += -(float(z[c]) - math.log(float(torch.exp(z).sum())))
    got = mask_loss(logits, labels, targets, "softmax")
    assert got.item() == pytest.approx(total / 8, rel=1e-12)
    probs = mask_probs(logits, labels, "softmax")
    sm = logits.softmax(1)
    for i, k in enumerate([2, 3]):
        rest = torch.cat([sm[i, :k], sm[i, k + 1:]]).max(0).values
        torch.testing.assert_close(probs[i, 0], sm[i, k] / (sm[i, k] + rest))
        # above 0.5 exactly where the detection's class wins the per-pixel argmax
        assert torch.equal(probs[i, 0] > 0.5, sm[i].argmax(0) == k)
    # a pixel won by the class at p = 0.4 (the other 0.6 split over three channels) is in the mask
    z = torch.log(torch.tensor([0.2, 0.2, 0.4, 0.2], dtype=torch.float64))[None, :, None, None]
    assert mask_probs(z, torch.tensor([2]), "softmax").item() == pytest.approx(0.4 / 0.6)
    torch.testing.assert_close(mask_probs(logits, labels, "sigmoid")[:, 0], logits[[0, 1], [2, 3]].sigmoid())


def test_keypoint_loss_cross_entropy_over_heatmap():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    targets = torch.tensor([[5, 0, 15], [3, 9, 0]])
    valid = torch.tensor([[True, False, True], [True, True, False]])
    total, n = 0.0, 0
    for i in range(2):
        for k in range(3):
            if valid[i, k]:
                z = logits[i, k].reshape(-1)
                total += -(float(z[targets[i, k]]) - math.log(float(torch.exp(z).sum())))
                n += 1
    assert keypoint_loss(logits, targets, valid).item() == pytest.approx(total / n, rel=1e-12)


def test_fast_rcnn_loss_by_hand():
    g = torch.Generator().manual_seed(3)
    cls = torch.randn(3, 4, generator=g, dtype=torch.float64)
    reg = torch.randn(3, 16, generator=g, dtype=torch.float64) * 0.2
    labels = torch.tensor([2, 0, 1])
    tgt = torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.2
    ce = sum(-(float(cls[i, labels[i]]) - math.log(float(torch.exp(cls[i]).sum()))) for i in range(3)) / 3
    beta = 1 / 9
    box = sum(_smooth_l1(float(reg[i, 4 * labels[i] + j] - tgt[i, j]), beta) for i in (0, 2) for j in range(4)) / 3
    lc, lb = fast_rcnn_loss(cls, reg, labels, tgt, beta)
    assert lc.item() == pytest.approx(ce, rel=1e-12)
    assert lb.item() == pytest.approx(box, rel=1e-12)


def test_rpn_loss_by_hand():
    obj = torch.tensor([0.3, -1.2, 2.0, 0.1, -0.4], dtype=torch.float64)
    deltas = torch.tensor([[0.1, 0.0, -0.05, 0.2]] * 5, dtype=torch.float64)
    labels = torch.tensor([1, 0, 1, -1, 0])
    pos, sampled = torch.tensor([0, 2]), torch.tensor([0, 2, 1, 4])
    targets = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.15, 0.01, 0.0, 0.2]], dtype=torch.float64)
    lo, lb = rpn_loss(obj, deltas, labels, targets, pos, sampled)
    expect_o = sum(_bce(float(obj[i]), float(labels[i])) for i in (0, 2, 1, 4)) / 4
    expect_b = sum(_smooth_l1(float(deltas[p, j] - targets[k, j]), 1 / 9) for k, p in enumerate((0, 2))
                   for j in range(4)) / 4
    assert lo.item() == pytest.approx(expect_o, rel=1e-12)
    assert lb.item() == pytest.approx(expect_b, rel=1e-12)


def test_empty_losses_are_zero_and_differentiable():
    logits = torch.randn(0, 4, 28, 28, requires_grad=True)
    loss = mask_loss(logits, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 28, 28, dtype=torch.bool))
    assert loss.item() == 0 and loss.requires_grad
    kl = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss = keypoint_loss(kl, torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0
    loss.backward()
    assert kl.grad is not None and kl.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="loss_type"):
        mask_loss(torch.randn(1, 2, 2, 2), torch.tensor([1]), torch.ones(1, 2, 2, dtype=torch.bool), "focal")
