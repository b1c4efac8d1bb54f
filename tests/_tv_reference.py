"""torchvision's MaskRCNN built with the same architecture as an mrcnn_fast FPN config. Used by the parity tests
and bench/bench_train_step.py; the weight-name map between the two is mrcnn_fast.convert.torchvision_names."""
from __future__ import annotations

from torch import nn
from torchvision.models.detection import MaskRCNN as TVMaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

# what our config must say to follow torchvision's conventions at inference (on top of the same architecture)
TORCHVISION_CONVENTIONS = {"roi_heads": {"pooler_aligned": False},   # torchvision's RoIAlign: aligned=False
                           "mask": {"paste": "torchvision"}}          # torchvision's paste_masks_in_image


def torchvision_config(preset: str = "r50_fpn", num_classes: int = 90):
    """The preset with torchvision's conventions and class count (maskrcnn_resnet50_fpn: 90 + background): the
    config of our model that loads torchvision's MaskRCNN weights (convert.copy_weights_from_torchvision) and
    gives its detections."""
    from mrcnn_fast.config import get_config

    conv = TORCHVISION_CONVENTIONS
    return get_config(preset, {"model": {"roi_heads": {**conv["roi_heads"], "num_classes": num_classes},
                                         "mask": dict(conv["mask"])}})


def build_torchvision_model(cfg) -> TVMaskRCNN:
    """Same channels, anchors, sampling sizes and thresholds as build_model(cfg) (FPN configs only)."""
    import torchvision

    m = cfg.model
    if not m.fpn.enabled or m.backbone.width != 64:
        raise ValueError("the torchvision reference covers FPN configs with the standard ResNet width only")
    norm = nn.BatchNorm2d if m.backbone.norm == "BN" else misc_nn_ops.FrozenBatchNorm2d
    trunk = getattr(torchvision.models, m.backbone.name)(weights=None, norm_layer=norm)
    width = 64 * (4 if m.backbone.name not in ("resnet18", "resnet34") else 1)
    backbone = BackboneWithFPN(trunk, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                               [width, width * 2, width * 4, width * 8], m.fpn.out_channels,
                               extra_blocks=LastLevelMaxPool(), norm_layer=None)
    c = m.fpn.out_channels
    r = m.roi_heads
    nc = r.num_classes + 1
    ar = (tuple(m.anchors.aspect_ratios),) * len(m.anchors.sizes)
    res = r.box_pooler_resolution
    names = ["0", "1", "2", "3"]
    model = TVMaskRCNN(
        backbone, num_classes=None, min_size=cfg.input.min_size_train, max_size=cfg.input.max_size_train,
        image_mean=list(m.pixel_mean), image_std=list(m.pixel_std),
        rpn_anchor_generator=TVAnchorGenerator(m.anchors.sizes, ar),
        rpn_pre_nms_top_n_train=m.rpn.pre_nms_topk_train, rpn_pre_nms_top_n_test=m.rpn.pre_nms_topk_test,
        rpn_post_nms_top_n_train=m.rpn.post_nms_topk_train, rpn_post_nms_top_n_test=m.rpn.post_nms_topk_test,
        rpn_nms_thresh=m.rpn.nms_thresh, rpn_fg_iou_thresh=m.rpn.fg_iou_thresh, rpn_bg_iou_thresh=m.rpn.bg_iou_thresh,
        rpn_batch_size_per_image=m.rpn.batch_size_per_image, rpn_positive_fraction=m.rpn.positive_fraction,
        box_roi_pool=MultiScaleRoIAlign(names, res, r.pooler_sampling_ratio),
        box_head=TwoMLPHead(c * res * res, r.box_head_fc_dim),
        box_predictor=FastRCNNPredictor(r.box_head_fc_dim, nc),
        box_score_thresh=r.score_thresh_test, box_nms_thresh=r.nms_thresh_test,
        box_detections_per_img=r.detections_per_image, box_fg_iou_thresh=r.fg_iou_thresh,
        box_bg_iou_thresh=r.bg_iou_thresh, box_batch_size_per_image=r.batch_size_per_image,
        box_positive_fraction=r.positive_fraction, bbox_reg_weights=r.box_reg_weights,
        mask_roi_pool=MultiScaleRoIAlign(names, m.mask.pooler_resolution, r.pooler_sampling_ratio),
        mask_head=MaskRCNNHeads(c, [m.mask.conv_dim] * m.mask.num_convs, 1),
        mask_predictor=MaskRCNNPredictor(m.mask.conv_dim, m.mask.conv_dim, nc))
    model.transform.size_divisible = cfg.input.size_divisibility
    if m.keypoint.enabled:
        kp = m.keypoint
        model.roi_heads.keypoint_roi_pool = MultiScaleRoIAlign(names, kp.pooler_resolution, r.pooler_sampling_ratio)
        model.roi_heads.keypoint_head = KeypointRCNNHeads(c, [kp.conv_dim] * kp.num_convs)
        model.roi_heads.keypoint_predictor = KeypointRCNNPredictor(kp.conv_dim, kp.num_keypoints)
    return model
