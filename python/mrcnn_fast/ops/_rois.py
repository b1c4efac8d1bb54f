"""RoI box formats shared by the RoI ops (roi_pool, roi_align, ...).

Every RoI op takes ``boxes`` either as one Tensor[K, 5] of (batch_index, x1, y1, x2, y2) or as a list of
per-image Tensor[L, 4] (x1, y1, x2, y2), like torchvision.ops; :func:`convert_boxes_to_rois` turns both into
the Tensor[K, 5] form after validating them, and :func:`check_batch_indices` checks the batch column
against the feature batch size.

The value checks (finite coordinates, batch indices) read tensor data, which synchronises a CUDA stream
and cannot be traced, so they are skipped while torch.compile traces; the kernels never read out of bounds
on bad indices regardless (such RoIs pool to zeros).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor

from ._checks import check_float

Boxes = Union[Tensor, Sequence[Tensor]]


def roi_dtype(feature_dtype: torch.dtype) -> torch.dtype:
    """The dtype of RoI coordinates for features of ``feature_dtype``: float64 for float64 features, else float32
    (half precision cannot hold image coordinates: float16 rounds 1333.5 to 1334). roi_pool is the exception:
    like torchvision's, it takes RoIs in the input's dtype."""
    return torch.float64 if feature_dtype == torch.float64 else torch.float32


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def stack_with_batch_index(boxes) -> Tensor:
    """list of Tensor[Li, 4] (one per image, same dtype and device) -> Tensor[sum Li, 5] with batch index i."""
    ids = torch.cat([torch.full((b.shape[0], 1), i, dtype=b.dtype, device=b.device) for i, b in enumerate(boxes)])
    return torch.cat([ids, torch.cat(list(boxes))], dim=1)


def convert_boxes_to_rois(boxes: Boxes, name: str = "boxes", like: Tensor | None = None) -> Tensor:
    """Validates ``boxes`` and returns them as RoIs.

    Args:
        boxes (Tensor[K, 5] or list of Tensor[L, 4]): (batch_index, x1, y1, x2, y2) rows, or one
            (x1, y1, x2, y2) tensor per image (entry i gets batch index i). Floating dtype, one device,
            finite values.
        name: the argument name used in error messages.
        like: features the RoIs are for; an empty list then gives Tensor[0, 5] of like's dtype and device.
    Returns:
        Tensor[K, 5]: the same tensor for the Tensor[K, 5] form (no copy), a new one for the list form.
    Raises:
        TypeError: not a tensor or list of tensors, non-floating dtype, mixed dtypes.
        ValueError: wrong ndim or width, mixed devices, empty list, NaN or infinite values.
    """
    if isinstance(boxes, Tensor):
        check_float(boxes, name)
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(f"{name} must be a Tensor[K, 5] or a list of Tensor[L, 4], got shape {list(boxes.shape)}")
        rois = boxes
    elif isinstance(boxes, (list, tuple)):
        if len(boxes) == 0 and like is not None:
            return torch.zeros((0, 5), dtype=like.dtype, device=like.device)
        if len(boxes) == 0:
            raise ValueError(f"{name} must not be an empty list (give one Tensor[L, 4] per image)")
        for i, b in enumerate(boxes):
            check_float(b, f"{name}[{i}]")
            if b.dim() != 2 or b.shape[1] != 4:
                raise ValueError(f"{name}[{i}] must be a Tensor[L, 4], got shape {list(b.shape)}")
            if b.dtype != boxes[0].dtype:
                raise TypeError(f"{name}[{i}] has dtype {b.dtype}, but {name}[0] has {boxes[0].dtype}")
            if b.device != boxes[0].device:
                raise ValueError(f"{name}[{i}] is on {b.device}, but {name}[0] is on {boxes[0].device}")
        rois = stack_with_batch_index(boxes)
    else:
        raise TypeError(f"{name} must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes).__name__}")
    if rois.numel() and not _tracing() and not bool(torch.isfinite(rois).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return rois


def check_batch_indices(rois: Tensor, batch_size: int, name: str = "boxes") -> None:
    """Raises ValueError unless every rois[:, 0] is an integer in [0, batch_size).

    Args:
        rois (Tensor[K, 5]): as returned by :func:`convert_boxes_to_rois`.
        batch_size: the feature map's batch dimension N.
    """
    if rois.shape[0] == 0 or _tracing():
        return
    idx = rois[:, 0]
    # NaN fails idx == floor(idx), so it is reported here too.
    bad = (idx != torch.floor(idx)) | (idx < 0) | (idx >= batch_size)
    if bool(bad.any()):
        k = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}: batch index {idx[k].item()} of RoI {k} is not an integer in [0, {batch_size}) "
                         f"(the feature batch size)")
