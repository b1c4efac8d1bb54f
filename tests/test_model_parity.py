"""With the same weights, our model and torchvision's MaskRCNN (same architecture) agree: inference outputs
(boxes, scores, labels, masks, keypoints) and the training losses (sampling made deterministic)."""
import pytest
import torch

from _model_utils import shapes_batch, tiny_cfg
from _tv_reference import build_torchvision_model
from mrcnn_fast.convert import copy_weights_to_torchvision
from mrcnn_fast.modeling import build_model


def _pair(overrides=None, **input_overrides):
    overrides = {"roi_heads": {"pooler_aligned": False}, **(overrides or {})}      # torchvision: aligned=False
    overrides["backbone"] = {"width": 64, **overrides.get("backbone", {})}         # torchvision's ResNet width
    overrides["mask"] = {"paste": "torchvision", **overrides.get("mask", {})}      # torchvision's mask paste
    cfg = tiny_cfg(overrides)
    torch.manual_seed(0)
    ours = build_model(cfg)
    with torch.no_grad():  # spread the scores so that no near-ties decide the NMS order
        for p in [*ours.roi_heads.box_predictor.parameters(), *ours.rpn.head.cls_logits.parameters()]:
            p.normal_(0, 0.3)
    tv = build_torchvision_model(cfg)
    copy_weights_to_torchvision(ours, tv)
    return ours, tv


def test_inference_matches_torchvision():
    ours, tv = _pair()
    ours.eval(), tv.eval()
    g = torch.Generator().manual_seed(0)
    # 128x128: no resize; 96x120 -> 128x160 capped at 128 -> 102x128 (same size in both resizers)
    images = [torch.rand(3, 128, 128, generator=g), torch.rand(3, 96, 120, generator=g)]
    with torch.no_grad():
        a, b = ours(images), tv(images)
    for x, y in zip(a, b):
        assert x["boxes"].shape[0] > 0 and x["boxes"].shape == y["boxes"].shape
        torch.testing.assert_close(x["boxes"], y["boxes"], rtol=0, atol=2e-3)
        torch.testing.assert_close(x["scores"], y["scores"], rtol=0, atol=1e-4)
        assert torch.equal(x["labels"], y["labels"])
        torch.testing.assert_close(x["masks"], y["masks"], rtol=0, atol=2e-3)
        torch.testing.assert_close(x["keypoints"], y["keypoints"], rtol=0, atol=2e-2)
        torch.testing.assert_close(x["keypoints_scores"], y["keypoints_scores"], rtol=0, atol=2e-3)


def test_training_losses_match_torchvision():
    # samplers take everything (their random order does not change the losses); frozen BN: no batch statistics
    ours, tv = _pair({"rpn": {"batch_size_per_image": 10 ** 6}, "roi_heads": {"batch_size_per_image": 10 ** 6,
                                                                               "pooler_aligned": False},
                      "backbone": {"norm": "FrozenBN"}})
    ours.train(), tv.train()
    images, targets = shapes_batch(2, 128, seed=5)
    a, b = ours(images, targets), tv(images, targets)
    for k in ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_keypoint"):
        assert a[k].item() == pytest.approx(b[k].item(), rel=1e-4, abs=1e-6), k
    # mask targets differ on purpose (ours: aligned RoIAlign on the input-resolution masks, thresholded at 0.5)
    assert a["loss_mask"].item() == pytest.approx(b["loss_mask"].item(), rel=0.05)
