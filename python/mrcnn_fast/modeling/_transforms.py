"""TEMPORARY: resize/batch used by the model until mrcnn_fast.data.transforms lands on main (same contract:
resize_shortest_edge(image, target, min_size, max_size), batch_images(images, size_divisible)). Deleted at merge.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:  # pragma: no cover - exercised once the data package is on main
    from ..data.transforms import batch_images, resize_shortest_edge  # noqa: F401
except ImportError:
    def resize_shortest_edge(image, target, min_size: int, max_size: int):
        h, w = image.shape[-2:]
        scale = min(min_size / min(h, w), max_size / max(h, w))
        image = F.interpolate(image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                              align_corners=False)[0]
        if target is None:
            return image, None
        nh, nw = image.shape[-2:]
        rh, rw = nh / h, nw / w
        target = dict(target)
        if "boxes" in target:
            target["boxes"] = target["boxes"] * torch.tensor([rw, rh, rw, rh], dtype=target["boxes"].dtype)
        if "keypoints" in target:
            kp = target["keypoints"].clone()
            kp[..., 0] *= rw
            kp[..., 1] *= rh
            target["keypoints"] = kp
        if "masks" in target:
            target["masks"] = F.interpolate(target["masks"][:, None].float(), size=(nh, nw))[:, 0].to(
                target["masks"].dtype)
        return image, target

    def batch_images(images, size_divisible: int = 32):
        hs = [im.shape[-2] for im in images]
        ws = [im.shape[-1] for im in images]
        d = max(int(size_divisible), 1)
        hp, wp = int(math.ceil(max(hs) / d) * d), int(math.ceil(max(ws) / d) * d)
        out = images[0].new_zeros((len(images), images[0].shape[0], hp, wp))
        for i, im in enumerate(images):
            out[i, :, :im.shape[-2], :im.shape[-1]].copy_(im)
        return out, [(h, w) for h, w in zip(hs, ws)]
