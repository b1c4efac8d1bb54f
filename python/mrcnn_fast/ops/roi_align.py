"""RoIAlign (avg / max), RoIWarp and multi-level (FPN) RoIAlign, drop-in compatible with torchvision.ops.

Layouts: features may be NCHW-contiguous or channels-last (torch.channels_last); both are read in place.
The output follows the input: NCHW-contiguous for NCHW input, channels-last for channels-last input (for
multi-level pooling: channels-last only if every level is). Other strides are made contiguous first.

Argument checks that need the data (finite boxes, valid batch indices) run in eager mode; under
torch.compile they are skipped here, the CPU kernels still reject bad RoIs (ValueError) and the CUDA
kernels output zeros for them instead of reading out of bounds.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._lib import _C, dl, stream
from ._checks import autocast_input, check_float, check_int, check_int_pair, check_tensor, positive_float, real_number
from ._layout import is_channels_last, map_layout
from ._rois import check_batch_indices, convert_boxes_to_rois, roi_dtype

_MODES = ("avg", "max")


# ---- layout helpers --------------------------------------------------------------------------------

def _layouts(ts: list[Tensor]) -> list[Tensor]:
    """All levels in one layout: channels-last if every level is, else NCHW-contiguous."""
    if all(t.is_contiguous(memory_format=torch.channels_last) for t in ts) and any(is_channels_last(t) for t in ts):
        return list(ts)
    return [t.contiguous() for t in ts]


def _pooled(like: Tensor, k: int, h: int, w: int) -> Tensor:
    fmt = torch.channels_last if is_channels_last(like) else torch.contiguous_format
    return torch.empty((k, like.shape[1], h, w), dtype=like.dtype, device=like.device, memory_format=fmt)


def _grad_dtype(t: Tensor) -> torch.dtype:
    # Half-precision gradients accumulate in float32 (float atomics on CUDA), cast once at the end.
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


# ---- single-level custom ops -----------------------------------------------------------------------

@torch.library.custom_op("mrcnn_fast::roi_align", mutates_args=())
def _roi_align(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
               sampling_ratio: int, aligned: bool, max_mode: bool, quantize: bool) -> Tensor:
    input = map_layout(input)
    rois = rois.to(roi_dtype(input.dtype)).contiguous()
    out = _pooled(input, rois.shape[0], pooled_height, pooled_width)
    _C.roi_align_forward(dl(input), dl(rois), spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned,
                         max_mode, quantize, dl(out), stream(input))
    return out


@_roi_align.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, max_mode, quantize):
    return _pooled(map_layout(input), rois.shape[0], pooled_height, pooled_width)


@torch.library.custom_op("mrcnn_fast::roi_align_backward", mutates_args=())
def _roi_align_backward(grad: Tensor, input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                        pooled_width: int, sampling_ratio: int, aligned: bool, max_mode: bool,
                        quantize: bool) -> Tensor:
    input = map_layout(input)
    rois = rois.to(roi_dtype(input.dtype)).contiguous()
    grad_input = torch.empty_like(input, dtype=_grad_dtype(input))  # keeps input's strides; the core fills it
    _C.roi_align_backward(dl(grad), dl(input), dl(rois), spatial_scale, pooled_height, pooled_width,
                          sampling_ratio, aligned, max_mode, quantize, dl(grad_input), stream(input))
    return grad_input.to(input.dtype)


@_roi_align_backward.register_fake
def _(grad, input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, max_mode, quantize):
    return torch.empty_like(map_layout(input))


def _roi_align_setup(ctx, inputs, output):
    input, rois, *params = inputs
    ctx.save_for_backward(input, rois)
    ctx.params = params


def _roi_align_bwd(ctx, grad):
    input, rois = ctx.saved_tensors
    grad_input = _roi_align_backward(grad, input, rois, *ctx.params) if ctx.needs_input_grad[0] else None
    return (grad_input,) + (None,) * 8


_roi_align.register_autograd(_roi_align_bwd, setup_context=_roi_align_setup)


# ---- multi-level custom ops ------------------------------------------------------------------------

@torch.library.custom_op("mrcnn_fast::multilevel_roi_align", mutates_args=())
def _multilevel_roi_align(features: list[Tensor], rois: Tensor, spatial_scales: list[float], k_min: int,
                          k_max: int, canonical_level: int, canonical_scale: float, pooled_height: int,
                          pooled_width: int, sampling_ratio: int, aligned: bool, max_mode: bool,
                          detectron2_levels: bool = False) -> Tensor:
    features = _layouts(features)
    rois = rois.to(roi_dtype(features[0].dtype)).contiguous()
    out = _pooled(features[0], rois.shape[0], pooled_height, pooled_width)
    _C.multilevel_roi_align_forward([dl(f) for f in features], list(spatial_scales), dl(rois), k_min, k_max,
                                    canonical_level, canonical_scale, detectron2_levels, pooled_height,
                                    pooled_width, sampling_ratio, aligned, max_mode, dl(out), stream(features[0]))
    return out


@_multilevel_roi_align.register_fake
def _(features, rois, spatial_scales, k_min, k_max, canonical_level, canonical_scale, pooled_height, pooled_width,
      sampling_ratio, aligned, max_mode, detectron2_levels=False):
    return _pooled(_layouts(features)[0], rois.shape[0], pooled_height, pooled_width)


@torch.library.custom_op("mrcnn_fast::multilevel_roi_align_backward", mutates_args=())
def _multilevel_roi_align_backward(grad: Tensor, features: list[Tensor], rois: Tensor, spatial_scales: list[float],
                                   k_min: int, k_max: int, canonical_level: int, canonical_scale: float,
                                   pooled_height: int, pooled_width: int, sampling_ratio: int, aligned: bool,
                                   max_mode: bool, detectron2_levels: bool = False) -> list[Tensor]:
    features = _layouts(features)
    rois = rois.to(roi_dtype(features[0].dtype)).contiguous()
    grads = [torch.empty_like(f, dtype=_grad_dtype(f)) for f in features]
    _C.multilevel_roi_align_backward(dl(grad), [dl(f) for f in features], [dl(g) for g in grads],
                                     list(spatial_scales), dl(rois), k_min, k_max, canonical_level, canonical_scale,
                                     detectron2_levels, pooled_height, pooled_width, sampling_ratio, aligned,
                                     max_mode, stream(features[0]))
    return [g.to(f.dtype) for g, f in zip(grads, features)]


@_multilevel_roi_align_backward.register_fake
def _(grad, features, rois, spatial_scales, k_min, k_max, canonical_level, canonical_scale, pooled_height,
      pooled_width, sampling_ratio, aligned, max_mode, detectron2_levels=False):
    return [torch.empty_like(f) for f in _layouts(features)]


def _multilevel_setup(ctx, inputs, output):
    features, rois, *params = inputs
    ctx.save_for_backward(rois, *features)
    ctx.params = params


def _multilevel_bwd(ctx, grad):
    rois, *features = ctx.saved_tensors
    grads = None
    if ctx.needs_input_grad[0]:
        grads = _multilevel_roi_align_backward(grad, features, rois, *ctx.params)
    return (grads,) + (None,) * 12


_multilevel_roi_align.register_autograd(_multilevel_bwd, setup_context=_multilevel_setup)


@torch.library.custom_op("mrcnn_fast::fpn_level_assign", mutates_args=())
def _fpn_level_assign(boxes: Tensor, k_min: int, k_max: int, canonical_level: int, canonical_scale: float,
                      detectron2_levels: bool = False) -> Tensor:
    boxes = boxes.to(roi_dtype(boxes.dtype)).contiguous()
    levels = torch.empty(boxes.shape[0], dtype=torch.int64, device=boxes.device)
    _C.fpn_level_assign(dl(boxes), k_min, k_max, canonical_level, canonical_scale, detectron2_levels, dl(levels),
                        stream(boxes))
    return levels


@_fpn_level_assign.register_fake
def _(boxes, k_min, k_max, canonical_level, canonical_scale, detectron2_levels=False):
    return boxes.new_empty((boxes.shape[0],), dtype=torch.int64)


# ---- argument checks -------------------------------------------------------------------------------

def _eager() -> bool:
    return not torch.compiler.is_compiling()


def _check_features(t, name: str) -> Tensor:
    """t as Tensor[N, C, H, W]; under CPU autocast in float32 (see autocast_input). The rank is checked here because
    the outputs are allocated from it; the core checks the dtype."""
    t = autocast_input(t)
    check_tensor(t, name)
    if t.dim() != 4:
        raise ValueError(f"{name} must be a 4-D tensor [N, C, H, W], got shape {list(t.shape)}")
    return t


LEVEL_MAPPINGS = ("torchvision", "detectron2")


def _check_level_mapping(v) -> bool:
    """True for detectron2's formula."""
    if v not in LEVEL_MAPPINGS:
        raise ValueError(f"level_mapping must be one of {LEVEL_MAPPINGS}, got {v!r}")
    return v == "detectron2"


def _check_mode(mode) -> str:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    return mode


def _check_sampling_ratio(v) -> int:
    v = check_int(v, "sampling_ratio")
    if v > 1 << 20:
        raise ValueError(f"sampling_ratio must be <= {1 << 20}, got {v}")
    return v


def _as_rois(boxes, like: Tensor, name: str = "boxes") -> Tensor:
    """Tensor[K, 5] (batch_index, x1, y1, x2, y2) in the kernels' coordinate dtype, validated."""
    rois = convert_boxes_to_rois(boxes, name, like)
    check_batch_indices(rois, like.shape[0], name)
    return rois.to(roi_dtype(like.dtype))


def _level_of_scale(scale: float) -> int:
    # torchvision: int(-log2(float32(scale))); the snap absorbs float32-vs-float64 rounding of log2.
    k = -math.log2(scale)
    return int(round(k)) if abs(k - round(k)) < 1e-6 else int(k)


def _single_level(input, boxes, output_size, spatial_scale, sampling_ratio, aligned: bool, mode, quantize: bool):
    """roi_align (quantize=False) or roi_warp (quantize=True) after the argument checks."""
    input = _check_features(input, "input")
    oh, ow = check_int_pair(output_size, "output_size", minimum=1)
    mode = _check_mode(mode)
    sr = _check_sampling_ratio(sampling_ratio)
    scale = real_number(spatial_scale, "spatial_scale")   # the core checks the value
    rois = _as_rois(boxes, input)
    return _roi_align(input, rois, scale, oh, ow, sr, aligned, mode == "max", quantize)


# ---- public API ------------------------------------------------------------------------------------

def roi_align(input: Tensor, boxes, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1,
              aligned: bool = False, *, mode: str = "avg") -> Tensor:
    """RoIAlign, torchvision.ops.roi_align semantics; ``mode="max"`` takes the max over a bin's samples.

    Args:
        input (Tensor[N, C, H, W]): features, NCHW-contiguous or channels-last.
        boxes (Tensor[K, 5] or list of Tensor[L, 4]): (batch_index, x1, y1, x2, y2) rows, or one
            (x1, y1, x2, y2) tensor per image, in image coordinates.
        output_size (int or (int, int)): (oh, ow).
        spatial_scale (float): feature size / image size.
        sampling_ratio (int): samples per bin and axis; <= 0: ceil(roi size / output size).
        aligned (bool): half-pixel offset (Detectron2's RoIAlign).
        mode (str): "avg" (RoIAlign) or "max" (max over the bilinear samples; its gradient goes to the four
            neighbours of the arg-max sample; samples off the map count as 0).
    Returns:
        Tensor[K, C, oh, ow], in input's memory format.
    """
    return _single_level(input, boxes, output_size, spatial_scale, sampling_ratio, bool(aligned), mode, False)


def roi_warp(input: Tensor, boxes, output_size, spatial_scale: float = 1.0, sampling_ratio: int = 2, *,
             mode: str = "avg") -> Tensor:
    """RoIWarp (the Mask R-CNN paper's Table 2c baseline): RoI corners rounded on the feature grid
    (round(x * spatial_scale), sizes forced >= 1), then RoIAlign's bilinear samples, averaged per bin
    (``mode="avg"``) or max-pooled (``mode="max"``; the paper lists both, 27.1 / 27.2 mask AP).

    Args and returns as roi_align (no half-pixel offset). With ``mode="max"`` RoIWarp differs from RoIPool only
    in the bins: RoIPool also rounds every bin edge and takes the max over whole feature cells.
    """
    return _single_level(input, boxes, output_size, spatial_scale, sampling_ratio, False, mode, True)


def _check_level_list(features, spatial_scales) -> tuple[list[Tensor], list[float]]:
    if not isinstance(features, (list, tuple)) or len(features) == 0:
        raise TypeError("features must be a non-empty list of Tensor[N, C, H, W]")
    features = [_check_features(f, f"features[{i}]") for i, f in enumerate(features)]
    for i, f in enumerate(features[1:], 1):   # the core's message does not say which level
        if f.device != features[0].device:
            raise ValueError(f"features[{i}] is on {f.device}, features[0] on {features[0].device}")
    if not isinstance(spatial_scales, (list, tuple)):
        raise TypeError(f"spatial_scales must be a list of floats, got {type(spatial_scales).__name__}")
    if len(spatial_scales) != len(features):
        raise ValueError(f"spatial_scales has {len(spatial_scales)} entries for {len(features)} feature levels")
    scales = [positive_float(s, f"spatial_scales[{i}]") for i, s in enumerate(spatial_scales)]
    return list(features), scales


def multilevel_roi_align(features: list[Tensor], boxes, output_size, spatial_scales: list[float],
                         sampling_ratio: int = -1, aligned: bool = False, *, canonical_level: int = 4,
                         canonical_scale: float = 224, mode: str = "avg",
                         level_mapping: str = "torchvision") -> Tensor:
    """FPN RoIAlign: each RoI pooled from one level, all levels in one kernel call.

    The level is torchvision's LevelMapper: k = floor(canonical_level + log2(sqrt(w * h) / canonical_scale)
    + 1e-6) clamped to [k_min, k_max], k_min = -log2(spatial_scales[0]), k_max = -log2(spatial_scales[-1]);
    the RoI is pooled from features[k - k_min] (zeros if there is no such level). level_mapping "detectron2":
    k = floor(canonical_level + log2(sqrt(w * h) / canonical_scale + 1e-8)) instead (its assign_boxes_to_levels).

    Args:
        features (list of Tensor[N, C, H_l, W_l]): same N, C, dtype and device.
        boxes (Tensor[K, 5] or list of Tensor[L, 4]): as roi_align.
        output_size (int or (int, int)), sampling_ratio, aligned, mode: as roi_align.
        spatial_scales (list of float): one per level, e.g. [1/4, 1/8, 1/16, 1/32].
    Returns:
        Tensor[K, C, oh, ow]
    """
    features, scales = _check_level_list(features, spatial_scales)
    oh, ow = check_int_pair(output_size, "output_size", minimum=1)
    mode = _check_mode(mode)
    sr = _check_sampling_ratio(sampling_ratio)
    canonical_level = check_int(canonical_level, "canonical_level")
    canonical_scale = positive_float(canonical_scale, "canonical_scale")
    d2 = _check_level_mapping(level_mapping)
    rois = _as_rois(boxes, features[0])
    k_min, k_max = _level_of_scale(scales[0]), _level_of_scale(scales[-1])
    return _multilevel_roi_align(features, rois, scales, k_min, k_max, canonical_level, canonical_scale, oh, ow, sr,
                                 bool(aligned), mode == "max", d2)


def fpn_level_assign(boxes: Tensor, k_min: int, k_max: int, canonical_level: int = 4,
                     canonical_scale: float = 224, *, level_mapping: str = "torchvision") -> Tensor:
    """FPN level index (0-based: level - k_min) of every box, torchvision's LevelMapper (level_mapping
    "detectron2": its assign_boxes_to_levels, see multilevel_roi_align).

    Args:
        boxes (Tensor[K, 4] or Tensor[K, 5]): (x1, y1, x2, y2), optionally after a batch-index column.
    Returns:
        Tensor[K] int64 in [0, k_max - k_min].
    """
    check_float(boxes, "boxes")   # before the op converts half boxes to float32
    if boxes.dim() == 0:   # the output is sized from len(boxes); the core checks the shape
        raise ValueError("boxes must have shape [K, 4] or [K, 5], got []")
    k_min, k_max = check_int(k_min, "k_min"), check_int(k_max, "k_max")
    if k_max < k_min:
        raise ValueError(f"k_max must be >= k_min, got k_min={k_min}, k_max={k_max}")
    canonical_level = check_int(canonical_level, "canonical_level")
    canonical_scale = positive_float(canonical_scale, "canonical_scale")
    d2 = _check_level_mapping(level_mapping)
    if _eager() and boxes.numel() and not bool(torch.isfinite(boxes).all()):
        raise ValueError("boxes contains NaN or infinite values")
    return _fpn_level_assign(boxes, k_min, k_max, canonical_level, canonical_scale, d2)


def _infer_scale(size: tuple[int, int], image_size: tuple[int, int]) -> float:
    # torchvision: 2 ** round(log2(feature size / image size)), from the height.
    return 2.0 ** round(math.log2(float(size[0]) / float(image_size[0])))


class MultiScaleRoIAlign(nn.Module):
    """torchvision.ops.MultiScaleRoIAlign on the one-call multi-level kernel (same outputs).

    Scales are inferred on the first forward from the feature sizes vs the largest image size
    (powers of two), as torchvision does, and cached.

    Args:
        featmap_names (list of str): keys of the feature dict to pool from (taken in the dict's order).
        output_size (int or (int, int)), sampling_ratio (int): as roi_align.
        canonical_scale, canonical_level: LevelMapper's s0 and k0.
        aligned (bool), mode (str): as roi_align (torchvision: aligned=False, "avg").
    """

    def __init__(self, featmap_names: list[str], output_size, sampling_ratio: int, *, canonical_scale: int = 224,
                 canonical_level: int = 4, aligned: bool = False, mode: str = "avg"):
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.output_size = check_int_pair(output_size, "output_size", minimum=1)
        self.sampling_ratio = _check_sampling_ratio(sampling_ratio)
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.aligned = bool(aligned)
        self.mode = _check_mode(mode)
        self.scales: list[float] | None = None

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """
        Args:
            x (dict of Tensor[N, C, H_l, W_l]): feature maps.
            boxes (list of Tensor[L, 4]): per image, (x1, y1, x2, y2) in image coordinates.
            image_shapes (list of (height, width)): image sizes before the backbone.
        Returns:
            Tensor[K, C, oh, ow], K = total number of boxes.
        """
        features = [v for k, v in x.items() if k in self.featmap_names]
        if self.scales is None:
            if not image_shapes:
                raise ValueError("image_shapes should not be empty")
            image_size = (max(s[0] for s in image_shapes), max(s[1] for s in image_shapes))
            self.scales = [_infer_scale(tuple(f.shape[-2:]), image_size) for f in features]
        return multilevel_roi_align(features, boxes, self.output_size, self.scales, self.sampling_ratio,
                                    self.aligned, canonical_level=self.canonical_level,
                                    canonical_scale=self.canonical_scale, mode=self.mode)

    def extra_repr(self) -> str:
        return (f"featmap_names={self.featmap_names}, output_size={self.output_size}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, mode={self.mode!r}")
