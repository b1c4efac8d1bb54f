"""Small layers shared by the backbone and the heads."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv1x1(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.conv2d(x, weight, bias) for a 1x1 kernel, stride 1, no padding: Tensor[N, Cin, H, W] -> [N, Cout, H, W].

    On one CPU thread ATen runs 1x1 convolutions through its im2col + BLAS path ("THNN is faster when
    single-threaded"), which on AMD EPYC is a GEMM without AVX-512 and 2-2.7x slower, forward + backward, than
    oneDNN's convolution for the FPN laterals and the RPN and mask predictors (bench/results/train_step.md).
    A dilation of 2 changes nothing for a 1x1 kernel (output size and products are the same) but makes ATen
    pick oneDNN. Only where ATen would otherwise pick oneDNN too: float32 on the CPU with oneDNN enabled and
    the batch or map large enough (ATen's own size rule); elsewhere a dilated kernel would go to a slower path.
    Not under torch.compile: inductor picks the convolution itself (and the oneDNN query breaks the graph).
    """
    if (not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.shape[-2:] == (1, 1)
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and (x.dim() == 4 and (x.shape[0] > 1 or x.numel() > 20480))):
        return F.conv2d(x, weight, bias, dilation=2)
    return F.conv2d(x, weight, bias)


class Conv1x1(nn.Conv2d):
    """nn.Conv2d(in_channels, out_channels, 1) that runs through conv1x1 (same parameters and state dict)."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return conv1x1(x, self.weight, self.bias)
