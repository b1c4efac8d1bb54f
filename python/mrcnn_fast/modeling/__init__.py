"""Mask R-CNN in torch on the mrcnn_fast ops: backbones, FPN / C4 heads, RPN, RoI heads."""
from .backbone import (
    Backbone,
    FeaturePyramidNetwork,
    FrozenBatchNorm2d,
    LastLevelMaxPool,
    ResNet,
    resnet_state_dict_to_c4,
)
from .heads import (
    FastRCNNPredictor,
    KeypointHead,
    MaskFCNHead,
    MaskMLPHead,
    Res5Head,
    TwoMLPHead,
    fast_rcnn_loss,
    heatmaps_to_keypoints,
    keypoint_loss,
    keypoint_targets,
    mask_loss,
    mask_targets,
)
from .mask_rcnn import MaskRCNN, build_model
from .poolers import RoIPooler
from .roi_heads import RoIHeads
from .rpn import RPN, AnchorGenerator, RPNHead, rpn_loss
from .sampling import BalancedSampler, Matcher

__all__ = [
    "AnchorGenerator", "Backbone", "BalancedSampler", "FastRCNNPredictor", "FeaturePyramidNetwork",
    "FrozenBatchNorm2d", "KeypointHead", "LastLevelMaxPool", "MaskFCNHead", "MaskMLPHead", "MaskRCNN", "Matcher",
    "RPN", "RPNHead", "Res5Head", "ResNet", "RoIHeads", "RoIPooler", "TwoMLPHead", "build_model", "fast_rcnn_loss",
    "heatmaps_to_keypoints", "keypoint_loss", "keypoint_targets", "mask_loss", "mask_targets",
    "resnet_state_dict_to_c4", "rpn_loss",
]
