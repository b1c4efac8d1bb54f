"""Configs as plain data: nested dataclasses, named presets, YAML/JSON files with overrides.

    cfg = get_config("small_cpu")                  # a named preset
    cfg = get_config("my.yaml")                    # a file: {"base": "r50_fpn", "model": {...}, ...}
    cfg = merge(cfg, {"solver": {"base_lr": 0.01}})  # nested overrides; unknown keys raise

Every field is documented where it is declared. Modules take explicit keyword arguments; their
`from_config(cfg)` classmethods read these fields, so every module is usable without the config system.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .data.keypoints import COCO_PERSON_FLIP_PAIRS
from .data.shapes import SHAPE_FLIP_PAIRS


@dataclass
class BackboneConfig:
    name: str = "resnet50"              # resnet18/34/50/101, resnext101_32x8d
    freeze_at: int = 2                  # 0: train all; 1: freeze stem; k: stem + first k-1 res stages
    norm: str = "FrozenBN"              # "FrozenBN" (paper) | "BN" (trainable, small batches beware) | "GN" (32 groups)
    norm_eps: float = 1e-5              # eps of every backbone norm (torchvision's COCO_V1 files run with 0.0)
    width: int = 64                     # stem/stage-1 width (64 for the standard ResNets)
    stride_in_1x1: bool = False         # torchvision/ResNet v1.5 puts stride in the 3x3 conv


@dataclass
class FPNConfig:
    enabled: bool = True                # False: the C4 head (RoIs pooled from C4, res5 as box head)
    out_channels: int = 256
    in_features: tuple = ("res2", "res3", "res4", "res5")
    norm: str = ""                      # after each lateral / output conv (then without bias): "" | BN | FrozenBN | GN


@dataclass
class AnchorConfig:
    sizes: tuple = ((32,), (64,), (128,), (256,), (512,))   # one tuple per level (FPN) or one level (C4)
    aspect_ratios: tuple = (0.5, 1.0, 2.0)
    # Base anchors rounded to integer coordinates (torchvision) or exact (detectron2); the order of the anchors at
    # one location with several sizes: "ratio_size" (torchvision: ratio outer, size inner) | "size_ratio"
    # (detectron2). The RPN head's output channels follow this order.
    rounded: bool = True
    order: str = "ratio_size"
    # Spacing of each level's anchor grid: "torchvision" (padded image size // feature size per axis: a P6 of 13
    # rows on an 800-px side gives 61) | "detectron2" (the feature's nominal stride, 4 .. 64; offset 0)
    grid_strides: str = "torchvision"


@dataclass
class RPNConfig:
    pre_nms_topk_train: int = 2000      # per level
    pre_nms_topk_test: int = 1000       # per level
    post_nms_topk_train: int = 2000     # per image
    post_nms_topk_test: int = 1000      # per image
    nms_thresh: float = 0.7
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    min_size: float = 1e-3              # proposals smaller than this (either side) are removed; 0: only empty ones
    head_convs: int = 1                 # 3x3 conv + ReLU layers shared by the objectness / delta predictors
    score_thresh: float = 0.0


@dataclass
class RoIHeadsConfig:
    num_classes: int = 80               # foreground classes (background is extra, label 0)
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    pooler: str = "roi_align"           # roi_align | roi_align_max | roi_warp | roi_warp_max | roi_pool (Table 2c)
    pooler_sampling_ratio: int = 2      # 0 or -1: adaptive (ceil(roi size / output size))
    pooler_aligned: bool = True         # half-pixel offset (the paper's RoIAlign)
    # FPN level of a RoI: "torchvision" floor(4 + log2(sqrt(area) / 224) + 1e-6) | "detectron2"
    # floor(4 + log2(sqrt(area) / 224 + 1e-8)), clamped to the levels
    pooler_level_mapping: str = "torchvision"
    box_pooler_resolution: int = 7
    box_head_fc_dim: int = 1024
    # FPN box head: box_head_num_conv x (3x3 conv [+ norm] + ReLU) of box_head_conv_dim channels, then
    # box_head_num_fc x (fc + ReLU). The paper / torchvision v1: 0 conv, 2 fc; torchvision v2 and detectron2's GN
    # configs: 4 conv with norm, 1 fc. box_head_norm: "" | BN | FrozenBN | GN (convs then without bias).
    box_head_num_conv: int = 0
    box_head_conv_dim: int = 256
    box_head_num_fc: int = 2
    box_head_norm: str = ""
    box_reg_weights: tuple = (10.0, 10.0, 5.0, 5.0)
    score_thresh_test: float = 0.05
    nms_thresh_test: float = 0.5
    detections_per_image: int = 100
    test_min_box_side: float = 1e-2     # detections with a side below this (px) are dropped; 0: none (detectron2)
    # Results: the boxes rescaled to the input image are clipped to it and the detections left empty dropped, the
    # masks pasted into the clipped boxes (detectron2's detector_postprocess); false: rescaled only (torchvision)
    test_output_clip: bool = False
    # Inference refinements of the detections (not in the paper; modeling/refine.py, applied in this order between
    # detection selection and the mask / keypoint heads). test_box_refine: extra box-head passes (iterative box
    # regression; 0 keeps torchvision / detectron2 parity).
    test_box_refine: int = 0
    # Extra box stages (Cascade R-CNN's idea, not in the paper; FPN only; modeling/cascade.py), one per IoU
    # threshold: stage k is trained on stage k-1's regressed boxes labelled at this IoU, with regression weights
    # box_reg_weights x (k + 1), and refines the detections once at inference (after the test_box_refine passes).
    # () = none (the paper).
    cascade_iou_thresholds: tuple = ()
    # Inference: weight in [0, 1] of the mask-derived box sides (0 = off, the paper). The mask head runs on each
    # detection's box enlarged test_mask_box_expand times; sides where the mask ends inside that box move to
    # (1 - w) x regressed + w x mask edge (sub-cell, where the mask crosses 0.5).
    test_mask_box: float = 0.0
    test_mask_box_expand: float = 1.25
    # Inference: horizontal-flip test-time augmentation (not in the paper; ~2x the inference cost;
    # modeling/tta.py FlipTTA, which modeling.inference_model(model, cfg) wraps around the model). The backbone
    # and RPN also run on the mirrored images; boxes, class scores, masks and keypoint heatmaps are the mean of
    # both views (keypoint.flip_pairs swapped in the mirror). false = the paper.
    test_flip: bool = False


@dataclass
class MaskHeadConfig:
    enabled: bool = True
    head: str = "fcn"                   # fcn (4 conv + deconv, paper) | mlp (Table 2e MLP variant)
    conv_dim: int = 256
    num_convs: int = 4
    pooler_resolution: int = 14
    resolution: int = 28                # predicted mask size of the mlp head (fcn: 2 x pooler_resolution; C4: 14)
    mlp_dim: int = 1024                 # hidden fc width of the mlp head
    loss: str = "sigmoid"               # sigmoid (per-class binary, paper) | softmax (multinomial, Table 2b)
    class_agnostic: bool = False
    norm: str = ""                      # after each FCN conv (then without bias): "" | BN | FrozenBN | GN
    # inference paste of the masks into the image: "aligned" (detectron2's convention, matches the RoIAlign mask
    # targets) | "torchvision" (bit-exact with torchvision's paste_masks_in_image, used for output parity)
    paste: str = "aligned"
    # bool / RLE masks: probability >= 0.5 (detectron2's paste_masks_in_image) instead of > 0.5 (torchvision)
    threshold_inclusive: bool = False


@dataclass
class KeypointHeadConfig:
    enabled: bool = False
    num_keypoints: int = 17
    conv_dim: int = 512
    num_convs: int = 8
    pooler_resolution: int = 14
    heatmap_size: int = 56
    # keypoints_scores: "logit" (the heatmap's value at the peak, torchvision) | "prob" (detectron2: the peak's
    # spatial softmax probability)
    score: str = "logit"
    loss_weight: float = 1.0
    # index pairs swapped by a horizontal flip (COCO person: left/right eyes, ears, shoulders, ...): training
    # augmentation and roi_heads.test_flip
    flip_pairs: tuple = COCO_PERSON_FLIP_PAIRS


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)
    mask: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    keypoint: KeypointHeadConfig = field(default_factory=KeypointHeadConfig)
    # The network's input: the image's channels in input_format order ("RGB" | "BGR": detectron2), scaled to
    # [0, pixel_scale] (1: torchvision; 255: detectron2), then (x - pixel_mean) / pixel_std per channel (in the
    # network's channel order and scale).
    input_format: str = "RGB"
    pixel_scale: float = 1.0
    pixel_mean: tuple = (0.485, 0.456, 0.406)
    pixel_std: tuple = (0.229, 0.224, 0.225)
    channels_last: bool = True          # NHWC convolutions (faster oneDNN/cuDNN kernels; checkpoints stay NCHW)


@dataclass
class InputConfig:
    min_size_train: tuple = (800,)      # shortest side, chosen at random per image in training
    max_size_train: int = 1333
    min_size_test: int = 800
    max_size_test: int = 1333
    size_divisibility: int = 32         # batches are padded to a multiple of this
    # How an image is resized to min/max size: "mrcnn_fast" (float bilinear, sides rounded, then normalised) |
    # "torchvision" (normalised, then float bilinear, sides floored) | "detectron2" (the uint8 image resized with
    # PIL bilinear, sides int(x + 0.5), then normalised)
    resize: str = "mrcnn_fast"
    hflip_prob: float = 0.5


@dataclass
class SolverConfig:
    ims_per_batch: int = 16
    base_lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0
    max_iter: int = 90000
    schedule: str = "step"              # step | cosine
    steps: tuple = (60000, 80000)       # step schedule: multiply lr by gamma at these iterations
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 1e-3
    clip_grad_norm: float = 0.0         # 0: off
    amp: bool = True                    # mixed precision on CUDA: float16 autocast + gradient scaling
    # mixed precision on CPU: "none" | "bfloat16" (bfloat16 autocast; weights, gradients and losses stay
    # float32) | "auto" (bfloat16 where the CPU has native bfloat16 dot products, avx512_bf16 / amx_bf16:
    # emulated bfloat16 is slower than float32)
    cpu_autocast: str = "none"


@dataclass
class TrainConfig:
    seed: int = 0
    num_workers: int = 2
    checkpoint_period: int = 5000
    eval_period: int = 0                # 0: only at the end
    log_period: int = 20
    device: str = "auto"                # auto | cpu | cuda
    # CPU training, Linux/glibc: freed host memory stays with the process instead of being returned to the OS
    # and page-faulted back every iteration (engine/host_memory.py; ~6% faster small_cpu steps). Process-wide,
    # for the rest of the process, which then keeps its peak host memory.
    keep_freed_memory: bool = True


@dataclass
class DataConfig:
    # The training set's categories in label order (label i + 1 is entry i), recorded by `train` in the run's
    # config.json: evaluation maps the model's labels to an annotation file's category ids by these names, so a
    # JSON that numbers the same categories differently is scored correctly (and one with other categories is
    # rejected). () = not recorded (presets, config.json files from before this field): labels then map to the
    # evaluation JSON's categories in sorted-id order, unchecked.
    class_names: tuple = ()
    category_ids: tuple = ()            # the training JSON's ids of those categories (for reference)
    # The label results give the first foreground class: 1 (ours, torchvision: background is 0) or 0 (detectron2:
    # contiguous 0..K-1). Internally the model always numbers them from 1.
    first_label: int = 1


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


def _preset_r50_fpn() -> Config:
    return Config()


def _preset_r101_fpn() -> Config:
    cfg = Config()
    cfg.model.backbone.name = "resnet101"
    return cfg


def _preset_x101_fpn() -> Config:
    cfg = Config()
    cfg.model.backbone.name = "resnext101_32x8d"
    return cfg


def _preset_r50_c4() -> Config:
    cfg = Config()
    cfg.model.fpn.enabled = False
    cfg.model.anchors.sizes = ((32, 64, 128, 256, 512),)
    cfg.model.rpn.pre_nms_topk_test = 6000
    cfg.model.rpn.pre_nms_topk_train = 12000
    cfg.model.roi_heads.box_pooler_resolution = 14   # pooled 14x14 from C4, res5 strides it to 7x7
    cfg.model.mask.pooler_resolution = 14
    return cfg


def _preset_small_cpu() -> Config:
    """A small R18-FPN for CPU training on the synthetic shapes set (~minutes on 2 cores)."""
    cfg = Config()
    m = cfg.model
    m.backbone.name = "resnet18"
    m.backbone.freeze_at = 0
    m.backbone.norm = "BN"
    m.fpn.out_channels = 64
    m.anchors.sizes = ((16,), (32,), (64,), (128,), (256,))
    m.rpn.pre_nms_topk_train, m.rpn.post_nms_topk_train = 600, 300
    m.rpn.pre_nms_topk_test, m.rpn.post_nms_topk_test = 300, 100
    m.rpn.batch_size_per_image = 128
    m.roi_heads.num_classes = 3
    m.roi_heads.batch_size_per_image = 128
    m.roi_heads.box_head_fc_dim = 256
    m.roi_heads.detections_per_image = 30
    m.mask.conv_dim = 64
    m.keypoint.enabled = True           # the synthetic shapes carry 4 keypoints: top, right, bottom, left
    m.keypoint.num_keypoints = 4
    m.keypoint.flip_pairs = SHAPE_FLIP_PAIRS
    m.keypoint.conv_dim = 64
    m.keypoint.num_convs = 4
    cfg.input.min_size_train = (192, 224, 256)
    cfg.input.max_size_train = 320
    cfg.input.min_size_test = 256
    cfg.input.max_size_test = 320
    s = cfg.solver
    s.ims_per_batch, s.base_lr, s.max_iter = 4, 0.02, 1500
    s.schedule, s.warmup_iters = "cosine", 100
    s.amp = False
    cfg.train.checkpoint_period, cfg.train.num_workers = 500, 2
    return cfg


def _preset_shapes() -> Config:
    """small_cpu made cheaper for minutes-long CPU runs on the synthetic shapes set (the 30-min recipe; the demo
    drops its cascade stages, see demo.DEMO_ROI_HEADS): half-width ResNet-18 (4x fewer backbone FLOPs), single-scale
    training at the test size, gradient clipping against early spikes of the keypoint loss, and a step schedule
    (cosine decay lowers the lr long before a from-scratch model has learnt the shapes). The lr drops 10x at 5/6
    of max_iter; `mrcnn-fast train --time-budget` keeps that fraction. Measurements: bench/results/accuracy_30min.md."""
    cfg = _preset_small_cpu()
    cfg.model.backbone.width = 32
    # Box AP at high IoU is what this preset lacked: two cascade stages and mask-derived box sides at inference
    # raise it more than the iterations they cost (bench/results/accuracy_30min.md).
    r = cfg.model.roi_heads
    r.cascade_iou_thresholds = (0.6, 0.7)
    r.test_box_refine = 0
    r.test_mask_box = 0.35
    cfg.input.min_size_train = (256,)
    s = cfg.solver
    s.max_iter, s.warmup_iters, s.base_lr, s.clip_grad_norm = 3000, 100, 0.02, 10.0
    s.schedule, s.steps, s.gamma = "step", (2500,), 0.1
    cfg.train.checkpoint_period, cfg.train.eval_period, cfg.train.log_period = 0, 0, 50
    return cfg


PRESETS = {
    "r50_fpn": _preset_r50_fpn,
    "r101_fpn": _preset_r101_fpn,
    "x101_fpn": _preset_x101_fpn,
    "r50_c4": _preset_r50_c4,
    "small_cpu": _preset_small_cpu,
    "shapes": _preset_shapes,
}


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def merge(cfg: Config, overrides: dict, _path: str = "") -> Config:
    """Returns a copy of cfg with nested overrides applied; unknown keys and wrong types raise ValueError."""
    cfg = copy.deepcopy(cfg)
    _merge_into(cfg, overrides, _path)
    return cfg


def _merge_into(obj, overrides: dict, path: str) -> None:
    if not isinstance(overrides, dict):
        raise ValueError(f"config section {path or '<root>'} must be a mapping, got {type(overrides).__name__}")
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in overrides.items():
        where = f"{path}.{key}" if path else key
        if key not in names:
            raise ValueError(f"unknown config key {where!r} (known: {', '.join(sorted(names))})")
        cur = getattr(obj, key)
        if dataclasses.is_dataclass(cur):
            _merge_into(cur, value, where)
            continue
        if isinstance(cur, tuple):
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"config key {where!r} expects a list, got {value!r}")
            value = _to_tuple(value)
        elif isinstance(cur, bool):
            if not isinstance(value, bool):
                raise ValueError(f"config key {where!r} expects true/false, got {value!r}")
        elif isinstance(cur, (int, float)) and not isinstance(cur, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"config key {where!r} expects a number, got {value!r}")
            value = type(cur)(value) if isinstance(cur, float) or float(value).is_integer() else value
        elif isinstance(cur, str) and not isinstance(value, str):
            raise ValueError(f"config key {where!r} expects a string, got {value!r}")
        setattr(obj, key, value)


def _to_tuple(v):
    return tuple(_to_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v


def load_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"cannot read config file {path}: {e}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise ValueError(f"malformed config file {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must contain a mapping at the top level")
    return data


def scale_schedule(cfg: Config, max_iter: int) -> Config:
    """cfg with max_iter iterations; a step schedule's steps keep their fractions of the run."""
    s = cfg.solver
    over: dict = {"max_iter": int(max_iter)}
    if s.schedule == "step" and s.steps:
        over["steps"] = [max(1, round(x * max_iter / s.max_iter)) for x in s.steps]
    return merge(cfg, {"solver": over})


def get_config(name_or_path: str = "r50_fpn", overrides: dict | None = None) -> Config:
    """A preset by name (see PRESETS) or a YAML/JSON file whose optional `base` names a preset."""
    if name_or_path in PRESETS:
        cfg = PRESETS[name_or_path]()
    elif Path(name_or_path).suffix.lower() in (".yaml", ".yml", ".json"):
        data = load_file(name_or_path)
        base = data.pop("base", "r50_fpn")
        if base not in PRESETS:
            raise ValueError(f"config file {name_or_path}: unknown base preset {base!r} (known: {', '.join(PRESETS)})")
        cfg = merge(PRESETS[base](), data)
    else:
        raise ValueError(f"unknown config {name_or_path!r}: not a preset ({', '.join(PRESETS)}) nor a .yaml/.json file")
    return merge(cfg, overrides) if overrides else cfg
