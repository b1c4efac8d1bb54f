"""Geometric transforms on (image, target) pairs and batching.

A target is the dict CocoDetection returns: "boxes" Tensor[N, 4] xyxy pixels, "masks" uint8 Tensor[N, H, W],
"keypoints" Tensor[N, K, 3] (x, y, visibility), "area" Tensor[N]; other keys pass through untouched. Every
key is optional, and the input target is never modified (a new dict is returned).

Coordinates are continuous pixel coordinates: pixel (row r, col c) covers [c, c+1) x [r, r+1), so a
horizontal flip maps x to W - x and a resize by s maps x to x * s.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..ops._checks import check_int
from .keypoints import flip_permutation

__all__ = ["RESIZE_MODES", "resized_size", "resize_shortest_edge", "hflip", "hflip_boxes", "batch_images"]

# how an image is resized to (min_size, max_size): see resize_shortest_edge
RESIZE_MODES = ("mrcnn_fast", "torchvision", "detectron2")


def _check_image(image, name: str = "image") -> None:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(image).__name__}")
    if image.dim() != 3:
        raise ValueError(f"{name} must be Tensor[C, H, W], got shape {tuple(image.shape)}")


def resized_size(h: int, w: int, min_size: int, max_size: int, mode: str = "mrcnn_fast") -> tuple[int, int]:
    """(height, width) of an h x w image resized so that its shorter side is min_size unless that makes the longer
    side exceed max_size, with the scale and the rounding of `mode`:

    - "mrcnn_fast": scale min_size / short side, or max_size / long side where the long side would exceed it;
      sides rounded to the nearest integer.
    - "torchvision": scale min(min_size / short side, max_size / long side), sides floored (what
      F.interpolate(scale_factor=..., recompute_scale_factor=True) makes of it in GeneralizedRCNNTransform).
    - "detectron2": the short side set to min_size and the long side scaled, both scaled down together when the
      long side exceeds max_size, then int(x + 0.5) (ResizeShortestEdge.get_output_shape).
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    if mode == "torchvision":
        scale = min(min_size / min(h, w), max_size / max(h, w))
        return max(1, math.floor(float(h) * scale)), max(1, math.floor(float(w) * scale))
    if mode == "detectron2":
        size = min_size * 1.0
        scale = size / min(h, w)
        nh, nw = (size, scale * w) if h < w else (scale * h, size)
        if max(nh, nw) > max_size:
            scale = max_size * 1.0 / max(nh, nw)
            nh, nw = nh * scale, nw * scale
        return max(1, int(nh + 0.5)), max(1, int(nw + 0.5))
    scale = min_size / min(h, w)
    if max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def quantize_image(image: torch.Tensor) -> torch.Tensor:
    """A float image in [0, 1] -> uint8 round(x * 255) (exact for images that came from uint8); uint8 unchanged."""
    if image.dtype == torch.uint8:
        return image
    if not image.is_floating_point():
        raise TypeError(f"image must be a float tensor in [0, 1] or uint8, got {image.dtype}")
    return (image * 255).round_().clamp_(0, 255).to(torch.uint8)


def _pil_resize(image: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
    """uint8 Tensor[C, H, W] resized with PIL's bilinear filter (detectron2's ResizeTransform on uint8 images)."""
    import numpy as np
    from PIL import Image

    arr = image.permute(1, 2, 0).cpu().numpy()
    if arr.shape[2] == 1:
        pil = Image.fromarray(arr[:, :, 0], mode="L")
    else:
        pil = Image.fromarray(np.ascontiguousarray(arr))
    out = np.asarray(pil.resize((nw, nh), Image.BILINEAR))
    if out.ndim == 2:
        out = out[:, :, None]
    return torch.from_numpy(out.copy()).permute(2, 0, 1).to(image.device)


def resize_shortest_edge(image: torch.Tensor, target: dict | None, min_size: int, max_size: int, *,
                         mode: str = "mrcnn_fast"):
    """Resizes so the shorter side is ``min_size`` unless that makes the longer side exceed ``max_size``.

    Args:
        image (Tensor[C, H, W]): float image. "mrcnn_fast" and "torchvision" resize it with float bilinear
            interpolation (no antialiasing, like the paper's setup); "detectron2" takes a float image in [0, 1]
            (quantised to uint8: round(x * 255)) or a uint8 one, resizes it with PIL's bilinear filter and
            returns a uint8 image (0..255).
        target (dict | None): boxes/keypoints are scaled by the actual per-axis ratios, masks use nearest.
        min_size (int): target length of the shorter side.
        max_size (int): cap on the longer side.
        mode: "mrcnn_fast" | "torchvision" | "detectron2": the output size (see resized_size) and the resampling.
    Returns:
        (Tensor[C, h, w], dict | None)
    """
    _check_image(image)
    min_size = check_int(min_size, "min_size", minimum=1)
    max_size = check_int(max_size, "max_size", minimum=1)
    h, w = image.shape[-2:]
    if h == 0 or w == 0:
        raise ValueError(f"image must not be empty, got shape {tuple(image.shape)}")
    nh, nw = resized_size(h, w, min_size, max_size, mode)
    if mode == "detectron2":
        image = quantize_image(image)
    if (nh, nw) == (h, w):
        return image, (dict(target) if target is not None else None)
    if mode == "detectron2":
        out = _pil_resize(image, nh, nw)
    else:
        if not image.is_floating_point():
            raise TypeError(f"image must be a floating point tensor, got {image.dtype}")
        out = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    if target is None:
        return out, None
    sx, sy = nw / w, nh / h
    t = dict(target)
    if "boxes" in t:
        boxes = t["boxes"]
        t["boxes"] = boxes * boxes.new_tensor([sx, sy, sx, sy])
    if "keypoints" in t:
        kp = t["keypoints"].clone()
        kp[..., 0] *= sx
        kp[..., 1] *= sy
        t["keypoints"] = kp
    if "masks" in t:
        m = t["masks"]
        if m.shape[0] == 0:
            t["masks"] = m.new_zeros((0, nh, nw))
        elif m.dtype == torch.uint8:
            # uint8 nearest (CPU and CUDA) keeps masks binary without a 4x larger float copy.
            t["masks"] = F.interpolate(m[None], size=(nh, nw), mode="nearest")[0]
        else:
            t["masks"] = F.interpolate(m[None].to(torch.uint8), size=(nh, nw), mode="nearest")[0].to(m.dtype)
    if "area" in t:
        t["area"] = t["area"] * (sx * sy)
    return out, t


def hflip_boxes(boxes: torch.Tensor, width) -> torch.Tensor:
    """Tensor[..., 4] xyxy boxes mirrored in an image of the given width (a number or a Tensor broadcasting to
    boxes[..., 0]): x -> width - x, so a box keeps x1 <= x2."""
    return torch.stack([width - boxes[..., 2], boxes[..., 1], width - boxes[..., 0], boxes[..., 3]], -1)


def hflip(image: torch.Tensor, target: dict | None, flip_pairs: Sequence[Sequence[int]] = ()):
    """Mirrors the image left-right; boxes, masks and keypoints follow.

    Keypoint x becomes W - x for labelled keypoints (visibility > 0; unlabelled ones keep their zeros) and
    the indices in each of ``flip_pairs`` (0-based) are swapped, so a left eye stays a left eye.
    Flipping twice gives back the input.
    """
    _check_image(image)
    w = image.shape[-1]
    out = image.flip(-1)
    if target is None:
        return out, None
    t = dict(target)
    if "boxes" in t:
        t["boxes"] = hflip_boxes(t["boxes"], w)
    if "masks" in t:
        t["masks"] = t["masks"].flip(-1)
    if "keypoints" in t:
        kp = t["keypoints"]
        perm = flip_permutation(kp.shape[1], flip_pairs)
        kp = kp[:, perm].clone()
        labelled = kp[..., 2] > 0
        kp[..., 0] = torch.where(labelled, w - kp[..., 0], kp[..., 0])
        t["keypoints"] = kp
    return out, t


def batch_images(images: Sequence[torch.Tensor], size_divisible: int = 32):
    """Zero-pads images at the bottom/right into one batch whose H and W are multiples of ``size_divisible``.

    Args:
        images (list[Tensor[C, H_i, W_i]]): same C, dtype and device.
        size_divisible (int): 0 or 1 disables the rounding (FPN needs 32: the coarsest stride).
    Returns:
        (Tensor[B, C, Hp, Wp], list[(H_i, W_i)])
    """
    if isinstance(images, torch.Tensor):
        images = list(images.unbind(0)) if images.dim() == 4 else [images]
    if len(images) == 0:
        raise ValueError("images must not be empty")
    size_divisible = check_int(size_divisible, "size_divisible", minimum=0)
    first = images[0]
    for i, img in enumerate(images):
        _check_image(img, f"images[{i}]")
        if img.shape[0] != first.shape[0] or img.dtype != first.dtype or img.device != first.device:
            raise ValueError(
                f"images[{i}] has (channels, dtype, device) = ({img.shape[0]}, {img.dtype}, {img.device}), "
                f"images[0] has ({first.shape[0]}, {first.dtype}, {first.device})")
    hp = max(int(img.shape[1]) for img in images)
    wp = max(int(img.shape[2]) for img in images)
    if size_divisible > 1:
        hp = int(math.ceil(hp / size_divisible) * size_divisible)
        wp = int(math.ceil(wp / size_divisible) * size_divisible)
    batch = first.new_zeros((len(images), first.shape[0], hp, wp))
    sizes = []
    for i, img in enumerate(images):
        h, w = int(img.shape[1]), int(img.shape[2])
        batch[i, :, :h, :w].copy_(img)
        sizes.append((h, w))
    return batch, sizes
