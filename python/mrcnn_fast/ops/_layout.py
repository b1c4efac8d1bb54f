"""Memory-layout helpers shared by the ops that read [N, C, H, W] maps in place."""
from __future__ import annotations

import torch
from torch import Tensor


def is_channels_last(t: Tensor) -> bool:
    """True for a channels-last tensor that is not also NCHW-contiguous (a 1x1 map or C == 1 is both)."""
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def memory_format(t: Tensor) -> torch.memory_format:
    """The format to allocate outputs like t in: channels-last when t is, else contiguous."""
    return torch.channels_last if is_channels_last(t) else torch.contiguous_format


def map_layout(t: Tensor) -> Tensor:
    """t itself if NCHW-contiguous or channels-last (no copy), else a contiguous copy."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()
