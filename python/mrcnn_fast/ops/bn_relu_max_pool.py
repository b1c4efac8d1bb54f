"""Batch norm + ReLU + max pooling in one pass (the ResNet stem after conv1).

``batch_norm_relu_max_pool(x, ...)`` equals ``F.relu(F.max_pool2d(F.batch_norm(x, ...), k, s, p))`` (which equals
torchvision's ``maxpool(relu(bn(x)))``), values and gradients, but never writes the normalised full-resolution
map nor zero-fills and scatters its gradient: the forward reads x twice (batch statistics, then the pooled
output) and the backward gathers each input cell's gradient from the windows whose maximum it is.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._lib import _C, dl, stream
from ._checks import check_int_pair, check_tensor
from ._layout import map_layout, memory_format

_FLOATS = (torch.float32, torch.float64)


def _pooled_shape(x: Tensor, kernel, stride, padding):
    n, c, h, w = x.shape
    return (n, c, (h + 2 * padding[0] - kernel[0]) // stride[0] + 1, (w + 2 * padding[1] - kernel[1]) // stride[1] + 1)


@torch.library.custom_op("mrcnn_fast::channel_moments", mutates_args=())
def _channel_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    mean = torch.empty(x.shape[1], dtype=torch.float64, device=x.device)
    var = torch.empty_like(mean)
    _C.channel_moments(dl(x), dl(mean), dl(var), stream(x))
    return mean, var


@_channel_moments.register_fake
def _(x):
    return x.new_empty(x.shape[1], dtype=torch.float64), x.new_empty(x.shape[1], dtype=torch.float64)


@torch.library.custom_op("mrcnn_fast::bn_relu_max_pool", mutates_args=())
def _forward(x: Tensor, scale: Tensor, shift: Tensor, kernel: list[int], stride: list[int],
             padding: list[int]) -> tuple[Tensor, Tensor]:
    shape = _pooled_shape(x, kernel, stride, padding)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    argmax = torch.empty(shape, dtype=torch.int32, device=x.device, memory_format=memory_format(x))
    _C.bn_relu_max_pool_forward(dl(x), dl(scale.contiguous()), dl(shift.contiguous()), *kernel, *stride, *padding,
                                dl(out), dl(argmax), stream(x))
    return out, argmax


@_forward.register_fake
def _(x, scale, shift, kernel, stride, padding):
    shape = _pooled_shape(x, kernel, stride, padding)
    return (torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x)),
            torch.empty(shape, dtype=torch.int32, device=x.device, memory_format=memory_format(x)))


@torch.library.custom_op("mrcnn_fast::bn_relu_max_pool_backward_reduce", mutates_args=())
def _backward_reduce(grad: Tensor, argmax: Tensor, x: Tensor, kernel: list[int], stride: list[int],
                     padding: list[int]) -> tuple[Tensor, Tensor]:
    sum_g = torch.empty(x.shape[1], dtype=torch.float64, device=x.device)
    sum_gx = torch.empty_like(sum_g)
    _C.bn_relu_max_pool_backward_reduce(dl(grad), dl(argmax), dl(x), *kernel, *stride, *padding, dl(sum_g),
                                        dl(sum_gx), stream(x))
    return sum_g, sum_gx


@_backward_reduce.register_fake
def _(grad, argmax, x, kernel, stride, padding):
    return x.new_empty(x.shape[1], dtype=torch.float64), x.new_empty(x.shape[1], dtype=torch.float64)


@torch.library.custom_op("mrcnn_fast::bn_relu_max_pool_backward_input", mutates_args=())
def _backward_input(grad: Tensor, argmax: Tensor, x: Tensor, a: Tensor, b: Tensor, d: Tensor, kernel: list[int],
                    stride: list[int], padding: list[int]) -> Tensor:
    grad_x = torch.empty_like(x, memory_format=memory_format(x))
    _C.bn_relu_max_pool_backward_input(dl(grad), dl(argmax), dl(x), dl(a), dl(b), dl(d), *kernel, *stride, *padding,
                                       dl(grad_x), stream(x))
    return grad_x


@_backward_input.register_fake
def _(grad, argmax, x, a, b, d, kernel, stride, padding):
    return torch.empty_like(x, memory_format=memory_format(x))


class _BatchNormReluMaxPool(torch.autograd.Function):
    """mean, var: float64 [C] statistics the forward normalises with; batch_stats says whether they are x's own
    (training-mode batch norm: the backward then includes their dependence on x) or constants."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, batch_stats, eps, kernel, stride, padding):
        invstd = (var + eps).rsqrt()
        w = weight.detach().double() if weight is not None else torch.ones_like(invstd)
        b = bias.detach().double() if bias is not None else torch.zeros_like(invstd)
        scale = w * invstd
        shift = b - mean * scale
        out, argmax = _forward(x, scale.to(x.dtype), shift.to(x.dtype), kernel, stride, padding)
        ctx.save_for_backward(x, argmax, mean, invstd, w)
        ctx.geometry = (kernel, stride, padding)
        ctx.batch_stats = batch_stats
        ctx.param_dtype = weight.dtype if weight is not None else (bias.dtype if bias is not None else x.dtype)
        ctx.mark_non_differentiable(argmax)
        return out, argmax

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_argmax):
        x, argmax, mean, invstd, w = ctx.saved_tensors
        kernel, stride, padding = ctx.geometry
        grad_out = grad_out.contiguous(memory_format=memory_format(x))
        sum_g, sum_gx = _backward_reduce(grad_out, argmax, x, kernel, stride, padding)
        s = invstd * (sum_gx - mean * sum_g)  # sum of g' * x_hat over the map
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            a = w * invstd
            if ctx.batch_stats:
                m = float(x.shape[0] * x.shape[2] * x.shape[3])
                b = -a * invstd * s / m
                d = -a * sum_g / m - b * mean
            else:
                b = torch.zeros_like(a)
                d = torch.zeros_like(a)
            dt = x.dtype
            grad_x = _backward_input(grad_out, argmax, x, a.to(dt), b.to(dt), d.to(dt), kernel, stride, padding)
        if ctx.needs_input_grad[1]:
            grad_w = s.to(ctx.param_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = sum_g.to(ctx.param_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


def channel_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of x: Tensor[N, C, H, W] over (N, H, W), as float64 Tensor[C] each."""
    _check_x(x)
    return _channel_moments(map_layout(x).detach())


def _check_x(x) -> None:
    check_tensor(x, "x")
    if x.dim() != 4:
        raise ValueError(f"x must be a Tensor[N, C, H, W], got shape {list(x.shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must be float32 or float64, got {x.dtype}")
    if x.shape[0] * x.shape[2] * x.shape[3] == 0:
        raise ValueError(f"x has no values per channel (shape {list(x.shape)})")


def batch_norm_relu_max_pool(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                             running_mean: Tensor | None, running_var: Tensor | None, *, training: bool,
                             momentum: float = 0.1, eps: float = 1e-5, kernel_size=3, stride=2,
                             padding=1) -> Tensor:
    """F.relu(F.max_pool2d(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps),
    kernel_size, stride, padding)) in one pass.

    Args:
        x (Tensor[N, C, H, W]): float32/float64, NCHW or channels-last (the output keeps the layout).
        weight, bias (Tensor[C] or None): batch norm's affine parameters (differentiable).
        running_mean, running_var (Tensor[C] or None): updated in place when training (momentum as in
            F.batch_norm; the variance is stored unbiased); used instead of batch statistics when not training.
        kernel_size, stride, padding: int or (int, int); dilation 1, floor mode; 0 <= padding <= kernel / 2.
    Returns:
        Tensor[N, C, OH, OW]. Differentiable w.r.t. x, weight and bias (first order).
    """
    _check_x(x)
    kernel = check_int_pair(kernel_size, "kernel_size", minimum=1)
    strides = check_int_pair(stride, "stride", minimum=1)
    pads = check_int_pair(padding, "padding")
    if min(pads) < 0 or 2 * pads[0] > kernel[0] or 2 * pads[1] > kernel[1]:
        raise ValueError(f"padding must be between 0 and half the kernel size, got {pads} for kernel {kernel}")
    if min(_pooled_shape(x, kernel, strides, pads)[2:]) < 1:
        raise ValueError(f"kernel larger than the padded input: kernel {kernel}, padding {pads}, "
                         f"x of shape {list(x.shape)}")
    c = x.shape[1]
    for t, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"), (running_var, "running_var")):
        if t is None:
            continue
        check_tensor(t, name)
        if t.shape != (c,):
            raise ValueError(f"{name} must have shape [{c}] (x's channels), got {list(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} and x must be on the same device, got {t.device} and {x.device}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("running_mean and running_var are required when training=False")
    x = map_layout(x)
    if training:
        n = x.shape[0] * x.shape[2] * x.shape[3]
        if n < 2:
            raise ValueError(f"batch norm needs more than 1 value per channel when training, got x of shape "
                             f"{list(x.shape)}")
        mean, var = _channel_moments(x.detach())
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_((var * (n / (n - 1))).to(running_var.dtype), alpha=momentum)
    else:
        mean, var = running_mean.detach().double(), running_var.detach().double()
    return _BatchNormReluMaxPool.apply(x, weight, bias, mean, var, training, float(eps), list(kernel),
                                       list(strides), list(pads))[0]
