"""torchvision detection checkpoints -> an mrcnn_fast Config and state dict.

    cfg, state_dict, report = load_torchvision("maskrcnn_resnet50_fpn_coco.pth")
    model = build_model(cfg); model.load_state_dict(state_dict)

A torchvision file is a bare state dict or {"model": state_dict, ...} (references/detection/train.py), read with
torch.load(weights_only=True): no code in it runs. The architecture is read from the tensors: the ResNet / ResNeXt
trunk (blocks per stage, grouped 3x3 convs), the FPN (and its norm), the RPN head's depth, the box head (fc6 / fc7
or convs + fcs), the class count, the mask head and the keypoint head (and keypoint count). Both key spellings are
read: the current one and the one before torchvision 0.13 (rpn.head.conv, fpn.inner_blocks.i, mask_head.mask_fcnK).

The config follows torchvision's conventions (its resize, RoIAlign aligned=False with sampling ratio 2, its mask
paste, rounded anchors, background label 0 and its 91-id COCO label space, its builders' thresholds); what the
tensors cannot tell can be overridden (e.g. {"input": {"min_size_test": 640}}). Every batch norm becomes a
FrozenBatchNorm2d (inference; BatchNorm2d's num_batches_tracked counters are dropped) with eps 0 for files in the
pre-0.13 spelling (the COCO_V1 weights, which torchvision runs with eps 0) and 1e-5 otherwise.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..modeling.backbone import _ARCHS
from .torchvision_names import from_torchvision_state_dict

# our backbone names -> (block kind, blocks per stage, groups, width per group)
_TRUNKS = _ARCHS
_LEGACY = (
    (re.compile(r"rpn\.head\.conv\.(weight|bias)"), r"rpn.head.conv.0.0.\1"),
    (re.compile(r"backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)\.(weight|bias)"), r"backbone.fpn.\1.\2.0.\3"),
)
_LEGACY_MASK = re.compile(r"roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)")
# torchvision's builders: maskrcnn / fasterrcnn train at (800,), keypointrcnn at 640..800; all test at 800 / 1333
_KEYPOINT_TRAIN_SIZES = (640, 672, 704, 736, 768, 800)


def read_torchvision_file(path) -> dict[str, Tensor]:
    """The state dict in a torchvision checkpoint file (a bare state dict or {"model": state_dict, ...}), loaded
    with torch.load(weights_only=True, map_location="cpu"). Raises ValueError naming the file when it is missing,
    unreadable, truncated or corrupt, or holds no state dict."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"torchvision checkpoint {path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # truncated zip, garbage, a pickle with code in it: all refused the same way
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"torchvision checkpoint {path}: not a readable torch.save file ({first})") from None
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"torchvision checkpoint {path}: not a state dict (found {type(obj).__name__})")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise ValueError(f"torchvision checkpoint {path}: not a state dict (entry {k!r} is a "
                             f"{type(v).__name__}, not a tensor)")
    return dict(obj)


def current_spelling(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], bool]:
    """(the state dict in torchvision's current key spelling, whether any key was in the pre-0.13 spelling)."""
    out, legacy = {}, False
    for k, v in state_dict.items():
        new = k
        for pattern, repl in _LEGACY:
            if pattern.fullmatch(k):
                new = pattern.sub(repl, k)
        m = _LEGACY_MASK.fullmatch(k)
        if m:
            new = f"roi_heads.mask_head.{int(m.group(1)) - 1}.0.{m.group(2)}"
        legacy |= new != k
        if new in out:
            raise ValueError(f"the state dict has both spellings of {new!r}")
        out[new] = v
    return out, legacy


def _indices(sd, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for m in map(rx.fullmatch, sd) if m is not None})


def _shape(sd, name: str, where: str) -> tuple[int, ...]:
    if name not in sd:
        raise ValueError(f"{where}: not a torchvision detection model of a known architecture: tensor {name!r} "
                         f"is missing")
    return tuple(sd[name].shape)


def _norm_kind(sd, prefix: str) -> str:
    """"" (no norm at prefix), "FrozenBN" (a batch norm: frozen for inference) or "GN" (affine only)."""
    if prefix + "weight" not in sd:
        return ""
    return "FrozenBN" if prefix + "running_mean" in sd else "GN"


def _detect_trunk(sd, where: str) -> tuple[str, int]:
    """(backbone name, stem width) from the trunk's tensors."""
    width = _shape(sd, "backbone.body.conv1.weight", where)[0]
    blocks = tuple(len(_indices(sd, rf"backbone\.body\.layer{i}\.(\d+)\.conv1\.weight")) for i in (1, 2, 3, 4))
    kind = "bottleneck" if "backbone.body.layer1.0.conv3.weight" in sd else "basic"
    groups, per_group = 1, 64
    if kind == "bottleneck":
        c2 = _shape(sd, "backbone.body.layer1.0.conv2.weight", where)   # [width, width / groups, 3, 3]
        groups = c2[0] // c2[1]
        per_group = c2[0] // groups * 64 // width
    for name, arch in _TRUNKS.items():
        if arch == (kind, blocks, groups, per_group):
            return name, width
    raise ValueError(f"{where}: unknown ResNet trunk ({kind} blocks, {blocks} per stage, {groups} groups of "
                     f"{per_group}); known: {', '.join(_TRUNKS)}")


def detect_architecture(sd: Mapping[str, Tensor], where: str = "state dict") -> dict:
    """The architecture of a torchvision detection state dict in the current spelling, as config overrides
    ({"model": ..., "input": ...}) plus a "summary" list of report lines. Raises ValueError where it is not one."""
    model: dict = {}
    lines = []
    name, width = _detect_trunk(sd, where)
    model["backbone"] = {"name": name, "width": width, "norm": "FrozenBN", "stride_in_1x1": False}
    levels = _indices(sd, r"backbone\.fpn\.inner_blocks\.(\d+)\.0\.weight")
    if len(levels) != 4:
        raise ValueError(f"{where}: expected an FPN over the 4 ResNet stages (backbone.fpn.inner_blocks.0..3), "
                         f"found {len(levels)} inner blocks")
    fpn_channels = _shape(sd, "backbone.fpn.inner_blocks.0.0.weight", where)[0]
    fpn_norm = _norm_kind(sd, "backbone.fpn.inner_blocks.0.1.")
    model["fpn"] = {"enabled": True, "out_channels": fpn_channels, "norm": fpn_norm,
                    "in_features": ["res2", "res3", "res4", "res5"]}
    lines.append(f"backbone: {name} (stem width {width}) + FPN ({fpn_channels} channels, "
                 f"{'no norm' if not fpn_norm else fpn_norm + ' norm'}), P6 by max-pool")

    head_convs = len(_indices(sd, r"rpn\.head\.conv\.(\d+)\.0\.weight"))
    anchors = _shape(sd, "rpn.head.cls_logits.weight", where)[0]
    model["rpn"] = {"head_convs": max(head_convs, 1)}
    lines.append(f"RPN head: {head_convs} conv(s), {anchors} anchors per location")

    rh: dict = {}
    if "roi_heads.box_head.fc6.weight" in sd:
        fc_dim, flat = _shape(sd, "roi_heads.box_head.fc6.weight", where)
        rh.update(box_head_num_conv=0, box_head_num_fc=2, box_head_fc_dim=fc_dim, box_head_norm="")
        res = math.isqrt(flat // fpn_channels)
        lines.append(f"box head: fc6 / fc7 ({fc_dim})")
    else:
        convs = _indices(sd, r"roi_heads\.box_head\.(\d+)\.0\.weight")
        fcs = [i for i in _indices(sd, r"roi_heads\.box_head\.(\d+)\.weight") if i > len(convs)]
        if not convs and not fcs:
            _shape(sd, "roi_heads.box_head.fc6.weight", where)   # raises: neither head
        conv_dim = _shape(sd, f"roi_heads.box_head.{convs[-1]}.0.weight", where)[0] if convs else fpn_channels
        norm = _norm_kind(sd, "roi_heads.box_head.0.1.") if convs else ""
        fc_dim, flat = _shape(sd, f"roi_heads.box_head.{fcs[0]}.weight", where) if fcs else (1024, 0)
        res = math.isqrt(flat // conv_dim) if fcs else 7
        rh.update(box_head_num_conv=len(convs), box_head_conv_dim=conv_dim, box_head_num_fc=len(fcs),
                  box_head_fc_dim=fc_dim, box_head_norm=norm)
        lines.append(f"box head: {len(convs)} conv(s) ({conv_dim}, {norm or 'no norm'}) + {len(fcs)} fc ({fc_dim})")
    rh["box_pooler_resolution"] = res
    rows = _shape(sd, "roi_heads.box_predictor.cls_score.weight", where)[0]
    if rows < 2:
        raise ValueError(f"{where}: roi_heads.box_predictor.cls_score.weight has {rows} row(s); a detector needs "
                         f"background and at least one class")
    rh["num_classes"] = rows - 1
    model["roi_heads"] = rh
    lines.append(f"classes: {rows - 1} + background (labels as torchvision numbers them, background 0)")

    has_mask = "roi_heads.mask_predictor.mask_fcn_logits.weight" in sd
    mask: dict = {"enabled": has_mask}
    if has_mask:
        convs = _indices(sd, r"roi_heads\.mask_head\.(\d+)\.0\.weight")
        conv_dim = _shape(sd, "roi_heads.mask_predictor.conv5_mask.weight", where)[1]
        norm = _norm_kind(sd, "roi_heads.mask_head.0.1.") if convs else ""
        mask.update(num_convs=len(convs), conv_dim=conv_dim, norm=norm)
        lines.append(f"mask head: {len(convs)} conv(s) ({conv_dim}, {norm or 'no norm'}) + deconv")
    model["mask"] = mask

    has_kp = "roi_heads.keypoint_predictor.kps_score_lowres.weight" in sd
    kp: dict = {"enabled": has_kp}
    if has_kp:
        conv_dim, k = _shape(sd, "roi_heads.keypoint_predictor.kps_score_lowres.weight", where)[:2]
        convs = _indices(sd, r"roi_heads\.keypoint_head\.(\d+)\.weight")
        kp.update(num_keypoints=k, conv_dim=conv_dim, num_convs=len(convs))
        if k != 17:    # COCO's left / right pairs mean nothing for another keypoint set
            kp["flip_pairs"] = []
        lines.append(f"keypoint head: {len(convs)} conv(s) ({conv_dim}), {k} keypoints")
    model["keypoint"] = kp
    kind = "keypointrcnn" if has_kp else "maskrcnn" if has_mask else "fasterrcnn"
    v2 = head_convs > 1 or rh["box_head_num_conv"] > 0
    return {"model": model, "summary": lines, "builder": f"{kind}_{name}_fpn{'_v2' if v2 else ''}",
            "keypoint": has_kp}


def torchvision_conventions(*, keypoints: bool, eps: float) -> dict:
    """Config overrides with torchvision's inference conventions and its detection builders' defaults."""
    return {
        "model": {
            "backbone": {"norm_eps": eps},
            "anchors": {"sizes": [[32], [64], [128], [256], [512]], "aspect_ratios": [0.5, 1.0, 2.0],
                        "rounded": True, "order": "ratio_size"},
            "rpn": {"pre_nms_topk_train": 2000, "pre_nms_topk_test": 1000, "post_nms_topk_train": 2000,
                    "post_nms_topk_test": 1000, "nms_thresh": 0.7, "fg_iou_thresh": 0.7, "bg_iou_thresh": 0.3,
                    "batch_size_per_image": 256, "positive_fraction": 0.5, "min_size": 1e-3, "score_thresh": 0.0},
            "roi_heads": {"pooler": "roi_align", "pooler_sampling_ratio": 2, "pooler_aligned": False,
                          "pooler_level_mapping": "torchvision", "box_reg_weights": [10.0, 10.0, 5.0, 5.0],
                          "score_thresh_test": 0.05, "nms_thresh_test": 0.5, "detections_per_image": 100,
                          "test_min_box_side": 1e-2, "fg_iou_thresh": 0.5, "bg_iou_thresh": 0.5,
                          "batch_size_per_image": 512, "positive_fraction": 0.25, "test_box_refine": 0,
                          "cascade_iou_thresholds": [], "test_mask_box": 0.0, "test_flip": False},
            "mask": {"head": "fcn", "loss": "sigmoid", "class_agnostic": False, "pooler_resolution": 14,
                     "paste": "torchvision"},
            "keypoint": {"pooler_resolution": 14, "heatmap_size": 56, "score": "logit"},
            "input_format": "RGB", "pixel_scale": 1.0,
            "pixel_mean": [0.485, 0.456, 0.406], "pixel_std": [0.229, 0.224, 0.225],
        },
        "input": {"min_size_train": list(_KEYPOINT_TRAIN_SIZES if keypoints else (800,)), "max_size_train": 1333,
                  "min_size_test": 800, "max_size_test": 1333, "size_divisibility": 32, "resize": "torchvision"},
        "data": {"first_label": 1},
    }


def _deep_update(base: dict, over: dict) -> dict:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the state dict of build_model(cfg), built without allocating weights."""
    from ..modeling import build_model

    try:
        with torch.device("meta"):
            model = build_model(cfg)
    except (NotImplementedError, RuntimeError):    # an op without a meta kernel: build it for real
        model = build_model(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state_dict(state_dict: Mapping[str, Tensor], expected: Mapping[str, tuple], where: str,
                     source_names: Mapping[str, str] | None = None) -> None:
    """Raises ValueError naming `where` and the first tensor (in the model's order) that is missing, has another
    shape or is not the model's: (name, expected shape, found shape). source_names maps our names to the file's."""
    src = source_names or {}
    for k, shape in expected.items():
        name = src.get(k, k)
        if k not in state_dict:
            raise ValueError(f"{where}: weights of another architecture: tensor {name!r} (expected shape "
                             f"{list(shape)}) is missing")
        found = tuple(state_dict[k].shape)
        if found != tuple(shape):
            raise ValueError(f"{where}: weights of another architecture: tensor {name!r} has shape {list(found)}, "
                             f"expected {list(shape)}")
    extra = [k for k in state_dict if k not in expected]
    if extra:
        raise ValueError(f"{where}: weights of another architecture: tensor {src.get(extra[0], extra[0])!r} (shape "
                         f"{list(state_dict[extra[0]].shape)}) has no place in the model "
                         f"({len(extra)} such tensor(s))")


def load_torchvision(path, overrides: dict | None = None):
    """A torchvision detection checkpoint as (Config, our state dict, report).

    Args:
        path: a .pth file of maskrcnn_resnet50_fpn (either key spelling), maskrcnn_resnet50_fpn_v2,
            keypointrcnn_resnet50_fpn, fasterrcnn_resnet50_fpn or fasterrcnn_resnet50_fpn_v2 (or the same heads
            on another ResNet / ResNeXt trunk): a bare state dict or {"model": state_dict, ...}.
        overrides: nested config overrides applied last (what the tensors cannot tell: input sizes, thresholds,
            class names, ...).
    Returns: (Config, dict name -> Tensor for build_model(cfg).load_state_dict, report: str, several lines).
    Raises: ValueError naming the file (and the first mismatching tensor) for a missing, corrupt or truncated
        file, a file without a state dict, or the weights of another architecture.
    """
    from ..config import Config, merge

    where = f"torchvision checkpoint {path}"
    raw = read_torchvision_file(path)
    sd, legacy = current_spelling(raw)
    dropped = [k for k in sd if k.endswith(".num_batches_tracked")]
    sd = {k: v for k, v in sd.items() if not k.endswith(".num_batches_tracked")}
    arch = detect_architecture(sd, where)
    eps = 0.0 if legacy else 1e-5
    conf = _deep_update(torchvision_conventions(keypoints=arch["keypoint"], eps=eps), {"model": arch["model"]})
    cfg = merge(merge(Config(), conf), overrides or {})

    ours = from_torchvision_state_dict(sd)
    # our name -> the file's name, for the messages: the renames applied to a dict of the names themselves
    cur_to_raw = current_spelling({k: k for k in raw})[0]
    back = {o: cur_to_raw[c] for o, c in from_torchvision_state_dict({k: k for k in sd}).items()}
    expected = expected_shapes(cfg)
    for k in expected:   # a BatchNorm2d chosen by the overrides: its step counter starts at 0
        if k.endswith(".num_batches_tracked") and k not in ours:
            ours[k] = torch.zeros((), dtype=torch.int64)
    check_state_dict(ours, expected, where, back)
    ours = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in ours.items()}

    b = cfg.model.backbone
    lines = [f"{where}: torchvision {arch['builder']}"
             f" ({'pre-0.13' if legacy else 'current'} key spelling, {len(raw)} tensors)"]
    lines += [f"  {s}" for s in arch["summary"]]
    lines.append(f"  norms: every batch norm frozen (FrozenBatchNorm2d), backbone eps {b.norm_eps:g}"
                 + (" (pre-0.13 spelling: torchvision's COCO_V1 files, which it runs with eps 0)" if legacy else ""))
    if dropped:
        lines.append(f"  dropped: {len(dropped)} BatchNorm2d num_batches_tracked counters (not used at inference)")
    lines.append(f"  conventions: torchvision's (resize '{cfg.input.resize}' to {cfg.input.min_size_test}/"
                 f"{cfg.input.max_size_test}, RoIAlign aligned={cfg.model.roi_heads.pooler_aligned} sampling "
                 f"{cfg.model.roi_heads.pooler_sampling_ratio}, mask paste '{cfg.model.mask.paste}', rounded anchors, "
                 f"labels 1..{cfg.model.roi_heads.num_classes}, background 0)")
    if overrides:
        lines.append(f"  overrides: {overrides}")
    return cfg, ours, "\n".join(lines)
