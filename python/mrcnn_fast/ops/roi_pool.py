"""RoIPool (Fast R-CNN), drop-in compatible with torchvision.ops.roi_pool."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .._lib import _C, dl, stream
from ._checks import autocast_input, check_float, check_int_pair, real_number
from ._layout import is_channels_last, map_layout
from ._rois import Boxes, check_batch_indices, convert_boxes_to_rois


@torch.library.custom_op("mrcnn_fast::roi_pool", mutates_args=())
def _roi_pool(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
              pooled_width: int) -> tuple[Tensor, Tensor]:
    input = map_layout(input)
    rois = rois.contiguous()
    shape = (rois.shape[0], input.shape[1], pooled_height, pooled_width)
    out = input.new_empty(shape)
    argmax = torch.empty(shape, dtype=torch.int32, device=input.device)
    _C.roi_pool_forward(dl(input), dl(rois), float(spatial_scale), dl(out), dl(argmax), stream(input))
    return out, argmax


@_roi_pool.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width):
    shape = (rois.shape[0], input.shape[1], pooled_height, pooled_width)
    return input.new_empty(shape), torch.empty(shape, dtype=torch.int32, device=input.device)


@torch.library.custom_op("mrcnn_fast::roi_pool_backward", mutates_args=())
def _roi_pool_backward(grad: Tensor, rois: Tensor, argmax: Tensor, batch_size: int, channels: int, height: int,
                       width: int, channels_last: bool) -> Tensor:
    """Tensor[N, C, H, W] gradient of roi_pool's input (channels-last when ``channels_last``)."""
    grad, rois, argmax = grad.contiguous(), rois.contiguous(), argmax.contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    shape = (batch_size, channels, height, width)
    grad_input = torch.empty(shape, dtype=grad.dtype, device=grad.device, memory_format=fmt)
    workspace = None
    if grad.device.type == "cuda" and grad.dtype in (torch.float16, torch.bfloat16):
        workspace = torch.empty(shape, dtype=torch.float32, device=grad.device, memory_format=fmt)
    _C.roi_pool_backward(dl(grad), dl(rois), dl(argmax), dl(grad_input),
                         None if workspace is None else dl(workspace), stream(grad))
    return grad_input


@_roi_pool_backward.register_fake
def _(grad, rois, argmax, batch_size, channels, height, width, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((batch_size, channels, height, width), dtype=grad.dtype, device=grad.device,
                       memory_format=fmt)


def _setup_context(ctx, inputs, output):
    input, rois = inputs[0], inputs[1]
    ctx.save_for_backward(rois, output[1])
    ctx.input_shape = tuple(input.shape)
    ctx.channels_last = is_channels_last(input)


def _backward(ctx, grad_out, grad_argmax):
    rois, argmax = ctx.saved_tensors
    n, c, h, w = ctx.input_shape
    grad_input = None
    if ctx.needs_input_grad[0]:
        grad_input = _roi_pool_backward(grad_out, rois, argmax, n, c, h, w, ctx.channels_last)
    return grad_input, None, None, None, None


_roi_pool.register_autograd(_backward, setup_context=_setup_context)


def roi_pool(input: Tensor, boxes: Boxes, output_size, spatial_scale: float = 1.0) -> Tensor:
    """RoI max pooling, torchvision.ops.roi_pool semantics.

    Corners are scaled by ``spatial_scale`` and rounded; each RoI spans ``end - start + 1`` cells per axis
    (at least 1), split into bins [floor(p * len / n), ceil((p + 1) * len / n)) clamped to the map; an
    empty bin gives 0. The one deliberate difference: a bin whose values are all <= -FLT_MAX (or NaN) gives
    its true max (e.g. -inf) where torchvision gives -FLT_MAX.

    Args:
        input (Tensor[N, C, H, W]): NCHW-contiguous or channels-last (read in place). float32/float64 on
            CPU; also float16/bfloat16 on CUDA.
        boxes (Tensor[K, 5] or list of Tensor[L, 4]): (batch_index, x1, y1, x2, y2) in image coordinates, or
            one (x1, y1, x2, y2) tensor per image; input's dtype and device.
        output_size (int or (int, int)): (oh, ow).
        spatial_scale (float): image-to-feature scale, e.g. 1/16.
    Returns:
        Tensor[K, C, oh, ow] (contiguous). Differentiable w.r.t. ``input``.
    """
    input = autocast_input(input)
    check_float(input, "input")
    if input.dim() != 4:
        raise ValueError(f"input must be a Tensor[N, C, H, W], got shape {list(input.shape)}")
    oh, ow = check_int_pair(output_size, "output_size", minimum=1)
    rois = convert_boxes_to_rois(boxes, "boxes")
    if rois.dtype != input.dtype:   # the core's message calls them "rois"
        raise TypeError(f"boxes must have input's dtype {input.dtype}, got {rois.dtype}")
    scale = real_number(spatial_scale, "spatial_scale")   # the core checks the value
    check_batch_indices(rois, input.shape[0], "boxes")
    return _roi_pool(input, rois, scale, oh, ow)[0]


class RoIPool(nn.Module):
    """Module form of :func:`roi_pool` (as torchvision.ops.RoIPool)."""

    def __init__(self, output_size, spatial_scale: float):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale

    def forward(self, input: Tensor, rois: Boxes) -> Tensor:
        return roi_pool(input, rois, self.output_size, self.spatial_scale)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale})"
