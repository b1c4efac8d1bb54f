"""A tiny Mask R-CNN (masks + keypoints) overfits four synthetic images within a bounded number of SGD steps."""
import math
import time

import pytest
import torch

from _model_utils import mask_iou, shapes_batch, tiny_cfg
from mrcnn_fast.modeling import build_model
from mrcnn_fast.ops import box_iou

ITERS = 250


@pytest.mark.slow
def test_overfit_shapes():
    threads = torch.get_num_threads()
    # one thread: on a shared 2-core machine a second OpenMP thread that gets descheduled stalls every op
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model(tiny_cfg())
        images, targets = shapes_batch(4, 128, seed=0)
        lr = 0.02
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9,
                              weight_decay=1e-4)
        model.train()
        t0 = time.time()
        first = None
        for it in range(ITERS):
            for g in opt.param_groups:
                # linear warm-up, cosine decay: the final iterations settle the boxes
                g["lr"] = lr * min(1.0, (it + 1) / 50) * 0.5 * (1 + math.cos(math.pi * it / ITERS))
            losses = model(images, targets)
            loss = sum(losses.values())
            assert torch.isfinite(loss), losses
            first = first or {k: float(v.detach()) for k, v in losses.items()}
            opt.zero_grad()
            loss.backward()
            opt.step()
        last = {k: float(v.detach()) for k, v in losses.items()}
        for k in ("loss_classifier", "loss_mask", "loss_keypoint", "loss_objectness"):
            assert last[k] < 0.5 * first[k], (k, first[k], last[k])

        model.eval()
        with torch.no_grad():
            outputs = model(images)
        kp_err = []
        for out, tgt in zip(outputs, targets):
            assert out["masks"].shape[1:] == (1, 128, 128)
            for j in range(len(tgt["labels"])):
                same = torch.where((out["labels"] == tgt["labels"][j]) & (out["scores"] > 0.5))[0]
                assert same.numel(), f"object {j} (class {int(tgt['labels'][j])}) not detected"
                ious = box_iou(tgt["boxes"][j:j + 1], out["boxes"][same])[0]
                k = same[ious.argmax()]
                assert float(ious.max()) > 0.8
                assert mask_iou(out["masks"][k, 0] >= 0.5, tgt["masks"][j]) > 0.8
                kp_err.append((out["keypoints"][k, :, :2] - tgt["keypoints"][j, :, :2]).norm(dim=1))
        # extreme points of triangles are ambiguous (two bottom corners), hence the median
        assert float(torch.cat(kp_err).median()) < 6.0
        assert time.time() - t0 < 90
    finally:
        torch.set_num_threads(threads)
