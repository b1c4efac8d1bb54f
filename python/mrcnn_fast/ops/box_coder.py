"""Box coding (torchvision BoxCoder conventions), clipping and small-box removal.

encode_boxes / decode_boxes / clip_boxes are differentiable (backward formulas in torch ops).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .._lib import _C, dl, stream
from ._checks import check_tensor, real_number

# log(1000/16): keeps exp() of a wild dw/dh from overflowing (torchvision's bbox_xform_clip).
DEFAULT_CLAMP = math.log(1000.0 / 16)


# ---- encode -------------------------------------------------------------------------------------
@torch.library.custom_op("mrcnn_fast::encode_boxes", mutates_args=())
def _encode_boxes(reference_boxes: Tensor, proposals: Tensor, weights: list[float]) -> Tensor:
    reference_boxes, proposals = reference_boxes.contiguous(), proposals.contiguous()
    out = torch.empty_like(reference_boxes)
    _C.encode_boxes(dl(reference_boxes), dl(proposals), list(weights), dl(out), stream(reference_boxes))
    return out


@_encode_boxes.register_fake
def _(reference_boxes, proposals, weights):
    return torch.empty_like(reference_boxes)


def _encode_setup(ctx, inputs, output):
    reference_boxes, proposals, weights = inputs
    ctx.save_for_backward(reference_boxes, proposals)
    ctx.weights = tuple(weights)


def _encode_backward(ctx, grad):
    ref, prop = ctx.saved_tensors
    wx, wy, ww, wh = ctx.weights
    gdx, gdy, gdw, gdh = grad.unbind(1)
    ew, eh = prop[:, 2] - prop[:, 0], prop[:, 3] - prop[:, 1]
    gw, gh = ref[:, 2] - ref[:, 0], ref[:, 3] - ref[:, 1]
    dx = wx * ((ref[:, 0] + ref[:, 2]) - (prop[:, 0] + prop[:, 2])) * 0.5 / ew
    dy = wy * ((ref[:, 1] + ref[:, 3]) - (prop[:, 1] + prop[:, 3])) * 0.5 / eh
    g_ref = torch.stack([0.5 * wx * gdx / ew - ww * gdw / gw, 0.5 * wy * gdy / eh - wh * gdh / gh,
                         0.5 * wx * gdx / ew + ww * gdw / gw, 0.5 * wy * gdy / eh + wh * gdh / gh], 1)
    g_prop = torch.stack([(gdx * (dx - 0.5 * wx) + ww * gdw) / ew, (gdy * (dy - 0.5 * wy) + wh * gdh) / eh,
                          (-gdx * (dx + 0.5 * wx) - ww * gdw) / ew, (-gdy * (dy + 0.5 * wy) - wh * gdh) / eh], 1)
    return g_ref, g_prop, None


_encode_boxes.register_autograd(_encode_backward, setup_context=_encode_setup)


# ---- decode -------------------------------------------------------------------------------------
@torch.library.custom_op("mrcnn_fast::decode_boxes", mutates_args=())
def _decode_boxes(deltas: Tensor, boxes: Tensor, weights: list[float], clamp: float) -> Tensor:
    deltas, boxes = deltas.contiguous(), boxes.contiguous()
    out = deltas.new_empty((deltas.shape[0], deltas.shape[1] // 4, 4))
    _C.decode_boxes(dl(deltas), dl(boxes), list(weights), clamp, dl(out), stream(deltas))
    return out


@_decode_boxes.register_fake
def _(deltas, boxes, weights, clamp):
    return deltas.new_empty((deltas.shape[0], deltas.shape[1] // 4, 4))


def _decode_setup(ctx, inputs, output):
    deltas, boxes, weights, clamp = inputs
    ctx.save_for_backward(deltas, boxes)
    ctx.weights, ctx.clamp = tuple(weights), clamp


def _decode_backward(ctx, grad):
    deltas, boxes = ctx.saved_tensors
    wx, wy, ww, wh = ctx.weights
    n = boxes.shape[0]
    d = deltas.reshape(n, -1, 4)
    w = (boxes[:, 2] - boxes[:, 0])[:, None]
    h = (boxes[:, 3] - boxes[:, 1])[:, None]
    dx, dy, dw, dh = d[..., 0] / wx, d[..., 1] / wy, d[..., 2] / ww, d[..., 3] / wh
    ew, eh = torch.exp(dw.clamp(max=ctx.clamp)), torch.exp(dh.clamp(max=ctx.clamp))
    g_cx, g_cy = grad[..., 0] + grad[..., 2], grad[..., 1] + grad[..., 3]  # d/d(predicted centre)
    g_hw, g_hh = 0.5 * (grad[..., 2] - grad[..., 0]), 0.5 * (grad[..., 3] - grad[..., 1])  # d/d(pred size)
    # torch.clamp passes the gradient where the input is <= the bound.
    g_d = torch.stack([g_cx * w / wx, g_cy * h / wy, g_hw * ew * w * (dw <= ctx.clamp) / ww,
                       g_hh * eh * h * (dh <= ctx.clamp) / wh], -1).reshape(deltas.shape)
    g_w, g_h = (g_cx * dx + g_hw * ew).sum(1), (g_cy * dy + g_hh * eh).sum(1)
    g_x, g_y = g_cx.sum(1), g_cy.sum(1)
    g_boxes = torch.stack([0.5 * g_x - g_w, 0.5 * g_y - g_h, 0.5 * g_x + g_w, 0.5 * g_y + g_h], 1)
    return g_d, g_boxes, None, None


_decode_boxes.register_autograd(_decode_backward, setup_context=_decode_setup)


# ---- clip ---------------------------------------------------------------------------------------
@torch.library.custom_op("mrcnn_fast::clip_boxes", mutates_args=())
def _clip_boxes(boxes: Tensor, height: float, width: float) -> Tensor:
    boxes = boxes.contiguous()
    out = torch.empty_like(boxes)
    _C.clip_boxes(dl(boxes), height, width, dl(out), stream(boxes))
    return out


@_clip_boxes.register_fake
def _(boxes, height, width):
    return torch.empty_like(boxes)


def _clip_setup(ctx, inputs, output):
    boxes, height, width = inputs
    ctx.save_for_backward(boxes)
    ctx.hw = (height, width)


def _clip_backward(ctx, grad):
    (boxes,) = ctx.saved_tensors
    h, w = ctx.hw
    hi = boxes.new_full((4,), w)
    hi[1::2] = h  # a fill, not a host-to-device copy
    return grad * ((boxes >= 0) & (boxes <= hi)), None, None


_clip_boxes.register_autograd(_clip_backward, setup_context=_clip_setup)


# ---- remove small -------------------------------------------------------------------------------
@torch.library.custom_op("mrcnn_fast::remove_small_boxes", mutates_args=())
def _remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    boxes = boxes.contiguous()
    mask = torch.empty(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    _C.box_size_mask(dl(boxes), min_size, dl(mask), stream(boxes))
    return torch.where(mask)[0]


@_remove_small_boxes.register_fake
def _(boxes, min_size):
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int64)


# ---- public API ---------------------------------------------------------------------------------


def _weights(weights) -> list[float]:
    try:
        w = [float(x) for x in weights]
    except (TypeError, ValueError):
        raise TypeError(f"weights must be a sequence of 4 numbers, got {weights!r}") from None
    if len(w) != 4:
        raise ValueError(f"weights must have 4 entries (wx, wy, ww, wh), got {len(w)}")
    return w


def encode_boxes(reference_boxes: Tensor, proposals: Tensor,
                 weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Regression targets mapping each proposal onto its reference box (torchvision BoxCoder.encode_single).

    Args:
        reference_boxes (Tensor[N, 4]): e.g. the matched ground-truth boxes.
        proposals (Tensor[N, 4]): the boxes the deltas are relative to (anchors / proposals).
        weights: (wx, wy, ww, wh); (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the box head.
    Returns:
        Tensor[N, 4]: (dx, dy, dw, dh). Differentiable w.r.t. both inputs.
    """
    check_tensor(reference_boxes, "reference_boxes")
    check_tensor(proposals, "proposals")
    return _encode_boxes(reference_boxes, proposals, _weights(weights))


def decode_boxes(deltas: Tensor, boxes: Tensor, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 clamp: float = DEFAULT_CLAMP) -> Tensor:
    """Applies deltas to boxes (torchvision BoxCoder.decode).

    Args:
        deltas (Tensor[N, 4 * K]): K sets of (dx, dy, dw, dh) per box (e.g. one per class).
        boxes (Tensor[N, 4]): reference boxes, same dtype as deltas.
        weights: (wx, wy, ww, wh).
        clamp (float): dw / ww and dh / wh are clamped from above at this value before exp().
    Returns:
        Tensor[N, K, 4]: always three-dimensional, also for K = 1 (as BoxCoder.decode).
        Differentiable w.r.t. deltas and boxes.
    """
    check_tensor(deltas, "deltas")
    check_tensor(boxes, "boxes")
    if deltas.dim() != 2:   # the output is allocated from deltas' shape
        raise ValueError(f"deltas must have shape [N, 4 * K], got {list(deltas.shape)}")
    if deltas.dtype != boxes.dtype:   # the core's message names deltas only
        raise TypeError(f"boxes must have the dtype of deltas ({deltas.dtype}), got {boxes.dtype}")
    return _decode_boxes(deltas, boxes, _weights(weights), real_number(clamp, "clamp"))


def clip_boxes(boxes: Tensor, image_hw) -> Tensor:
    """Clamps x to [0, width] and y to [0, height] (torchvision.ops.clip_boxes_to_image).

    Args:
        boxes (Tensor[..., 4])
        image_hw: (height, width) numbers.
    Returns:
        Tensor[..., 4]. Differentiable (the gradient passes where a coordinate was not clamped).
    """
    check_tensor(boxes, "boxes")
    try:
        h, w = image_hw
    except (TypeError, ValueError):
        raise TypeError(f"image_hw must be a (height, width) pair, got {image_hw!r}") from None
    h, w = real_number(h, "image_hw[0]"), real_number(w, "image_hw[1]")
    if not (math.isfinite(h) and math.isfinite(w) and h >= 0 and w >= 0):   # the core calls it "image size"
        raise ValueError(f"image_hw must be finite and non-negative, got {(h, w)}")
    return _clip_boxes(boxes, h, w)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices of the boxes whose both sides are >= min_size (torchvision.ops.remove_small_boxes).

    Args:
        boxes (Tensor[N, 4])
        min_size (float)
    Returns:
        Tensor[K] int64, ascending.
    """
    check_tensor(boxes, "boxes")
    return _remove_small_boxes(boxes, real_number(min_size, "min_size"))


class BoxCoder:
    """torchvision's BoxCoder on these kernels: encode(reference, proposals) / decode(deltas, boxes)."""

    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), bbox_xform_clip: float = DEFAULT_CLAMP):
        self.weights = tuple(_weights(weights))
        self.bbox_xform_clip = real_number(bbox_xform_clip, "bbox_xform_clip")

    def encode(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        """Tensor[N, 4] deltas; see encode_boxes."""
        return encode_boxes(reference_boxes, proposals, self.weights)

    def decode(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """Tensor[N, K, 4] boxes; see decode_boxes."""
        return decode_boxes(deltas, boxes, self.weights, self.bbox_xform_clip)
