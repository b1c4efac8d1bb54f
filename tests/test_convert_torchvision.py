"""The weight-name map between our FPN model and torchvision's MaskRCNN (mrcnn_fast.convert)."""
import importlib
import sys

import pytest
import torch

from _model_utils import tiny_cfg
from _tv_reference import build_torchvision_model
from mrcnn_fast.convert import (
    copy_weights_from_torchvision,
    copy_weights_to_torchvision,
    from_torchvision_name,
    from_torchvision_state_dict,
    to_torchvision_name,
    to_torchvision_state_dict,
    torchvision_names,
)
from mrcnn_fast.modeling import build_model


@pytest.fixture(scope="module")
def models():
    cfg = tiny_cfg({"backbone": {"width": 64}})   # keypoints on: every rule of the map is used
    assert cfg.model.keypoint.enabled
    torch.manual_seed(0)
    return build_model(cfg), build_torchvision_model(cfg)


def test_names():
    pairs = [("rpn.head.conv.weight", "rpn.head.conv.0.0.weight"),
             ("roi_heads.mask_head.convs.3.bias", "roi_heads.mask_head.3.0.bias"),
             ("roi_heads.mask_head.deconv.weight", "roi_heads.mask_predictor.conv5_mask.weight"),
             ("roi_heads.mask_head.predictor.bias", "roi_heads.mask_predictor.mask_fcn_logits.bias"),
             ("roi_heads.keypoint_head.convs.5.weight", "roi_heads.keypoint_head.10.weight"),
             ("roi_heads.keypoint_head.kps_score_lowres.bias", "roi_heads.keypoint_predictor.kps_score_lowres.bias"),
             ("backbone.body.layer1.0.bn1.running_var", "backbone.body.layer1.0.bn1.running_var"),
             ("backbone.fpn.inner_blocks.2.0.weight", "backbone.fpn.inner_blocks.2.0.weight")]
    for ours, tv in pairs:
        assert to_torchvision_name(ours) == tv
        assert from_torchvision_name(tv) == ours
    assert from_torchvision_name("roi_heads.keypoint_head.3.weight") == "roi_heads.keypoint_head.3.weight"  # a ReLU
    with pytest.raises(ValueError, match="rpn.head.conv.0.0.weight"):
        to_torchvision_state_dict({"rpn.head.conv.weight": torch.zeros(1), "rpn.head.conv.0.0.weight": torch.zeros(1)})


def test_state_dict_round_trip_is_exact(models):
    ours, _ = models
    sd = ours.state_dict()
    back = from_torchvision_state_dict(to_torchvision_state_dict(sd))
    assert list(back) == list(sd)
    assert all(back[k] is sd[k] for k in sd)


def test_weights_copy_both_ways(models):
    ours, tv = models
    copy_weights_to_torchvision(ours, tv)                   # strict: every name on both sides matched
    tv_sd = tv.state_dict()
    for k, v in to_torchvision_state_dict(ours.state_dict()).items():
        assert torch.equal(tv_sd[k], v), k
    fresh = build_model(tiny_cfg({"backbone": {"width": 64}}))
    copy_weights_from_torchvision(tv, fresh)
    for k, v in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    with pytest.raises(RuntimeError, match="missing"):
        copy_weights_from_torchvision(torch.nn.Linear(1, 1), fresh)


def test_package_does_not_import_torchvision(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)   # any import of torchvision now raises ImportError
    importlib.reload(torchvision_names)
