"""Mask R-CNN in torch on the mrcnn_fast ops: backbones, FPN / C4 heads, RPN, RoI heads, post-processing."""
from .backbone import (
    Backbone,
    FeaturePyramidNetwork,
    FrozenBatchNorm2d,
    LastLevelMaxPool,
    ResNet,
    resnet_state_dict_to_c4,
)
from .cascade import CascadeRefinement, CascadeRoIHeads
from .heads import (
    FastRCNNPredictor,
    KeypointHead,
    MaskFCNHead,
    MaskMLPHead,
    Res5Head,
    TwoMLPHead,
    fast_rcnn_loss,
    keypoint_loss,
    keypoint_targets,
    mask_loss,
    mask_targets,
)
from .mask_rcnn import MaskRCNN, build_model, build_roi_heads, inference_model
from .poolers import RoIPooler
from .postprocess import Detections, heatmaps_to_keypoints, mask_probs
from .refine import IterativeBoxRefinement, MaskBoxRefinement
from .roi_heads import RoIHeads, RoIPredictor
from .rpn import RPN, AnchorGenerator, RPNHead, rpn_loss
from .sampling import BalancedSampler, Matcher
from .tta import FlipTTA

__all__ = [
    "AnchorGenerator", "Backbone", "BalancedSampler", "CascadeRefinement", "CascadeRoIHeads", "Detections",
    "FastRCNNPredictor", "FeaturePyramidNetwork", "FlipTTA", "FrozenBatchNorm2d", "IterativeBoxRefinement",
    "KeypointHead", "LastLevelMaxPool", "MaskBoxRefinement", "MaskFCNHead", "MaskMLPHead", "MaskRCNN", "Matcher",
    "RPN", "RPNHead", "Res5Head", "ResNet", "RoIHeads", "RoIPooler", "RoIPredictor", "TwoMLPHead", "build_model",
    "build_roi_heads", "fast_rcnn_loss", "heatmaps_to_keypoints", "inference_model", "keypoint_loss",
    "keypoint_targets", "mask_loss", "mask_probs", "mask_targets", "resnet_state_dict_to_c4", "rpn_loss",
]
