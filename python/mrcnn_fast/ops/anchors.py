"""Anchor grids, bit-identical to torchvision.models.detection.anchor_utils.AnchorGenerator, or to detectron2's
DefaultAnchorGenerator (offset 0) with AnchorGenerator(rounded=False, order="size_ratio", strides=...)."""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._lib import _C, dl, stream
from ._checks import _CPU_FLOATS, _CUDA_FLOATS, check_int_pair

MAX_ANCHORS_PER_LOCATION = 128  # detail::kMaxCellAnchors in the core
ANCHOR_ORDERS = ("ratio_size", "size_ratio")


@torch.library.custom_op("mrcnn_fast::grid_anchors", mutates_args=())
def _grid_anchors(sizes: list[float], aspect_ratios: list[float], stride_h: int, stride_w: int, height: int,
                  width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    a = len(sizes) * len(aspect_ratios)
    out = torch.empty((height * width * a, 4), dtype=dtype, device=device)
    _C.grid_anchors(list(sizes), list(aspect_ratios), stride_h, stride_w, dl(out.view(height, width, a, 4)),
                    stream(out))
    return out


@_grid_anchors.register_fake
def _(sizes, aspect_ratios, stride_h, stride_w, height, width, dtype, device):
    return torch.empty((height * width * len(sizes) * len(aspect_ratios), 4), dtype=dtype, device=device)


def _floats(v, name: str) -> list[float]:
    if isinstance(v, (int, float)) or not isinstance(v, (Sequence, Tensor)):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(v).__name__}")
    try:
        return [float(x) for x in v]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of numbers, got {v!r}") from None


def _positive_floats(v, name: str) -> list[float]:
    """For AnchorGenerator's arguments, checked when it is built (the core checks them again per call)."""
    out = _floats(v, name)
    if not out:
        raise ValueError(f"{name} must not be empty")
    if not all(math.isfinite(x) and x > 0 for x in out):
        raise ValueError(f"{name} must be positive and finite, got {out}")
    return out


def _check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    allowed = _CUDA_FLOATS if device.type == "cuda" else _CPU_FLOATS
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device}")
    if dtype not in allowed:
        raise TypeError(f"dtype must be one of {[str(d) for d in allowed]} on {device.type}, got {dtype}")


def anchors_for_level(sizes: Sequence[float], aspect_ratios: Sequence[float], stride_hw, feature_hw, *,
                      dtype: torch.dtype = torch.float32, device="cpu") -> Tensor:
    """Anchors of one feature level, as torchvision's AnchorGenerator.

    A = len(sizes) * len(aspect_ratios) cell anchors (ratio-major; aspect ratio = h / w), each
    round(-w/2, -h/2, w/2, h/2), placed at every (x * stride_w, y * stride_h).

    Args:
        sizes: anchor sizes (sqrt of the area), positive.
        aspect_ratios: h / w ratios, positive.
        stride_hw ((int, int)): pixels between grid cells, positive.
        feature_hw ((int, int)): grid size (Hf, Wf), >= 0.
        dtype, device: of the result (CPU: float32/float64; CUDA: also float16/bfloat16).
    Returns:
        Tensor[Hf * Wf * A, 4]: (x1, y1, x2, y2), location-major (row by row), anchor-minor.
    """
    s, r = _floats(sizes, "sizes"), _floats(aspect_ratios, "aspect_ratios")   # values: checked by the core
    # checked here although the core checks the strides too: its message does not name stride_hw
    sh, sw = check_int_pair(stride_hw, "stride_hw", minimum=1, scalar=False)
    fh, fw = check_int_pair(feature_hw, "feature_hw", minimum=0, scalar=False)
    device = torch.device(device)
    _check_dtype(dtype, device)
    return _grid_anchors(s, r, sh, sw, fh, fw, dtype, device)


def exact_cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float], order: str = "size_ratio") -> Tensor:
    """Unrounded cell anchors, detectron2's values: per (size, ratio) w = sqrt(size ** 2 / ratio), h = ratio * w,
    (-w / 2, -h / 2, w / 2, h / 2) in Python floats (float64), then float32.

    order: "size_ratio" (size outer, ratio inner: detectron2) | "ratio_size" (torchvision's order).
    Returns: Tensor[len(sizes) * len(aspect_ratios), 4] float32.
    """
    s, r = _positive_floats(sizes, "sizes"), _positive_floats(aspect_ratios, "aspect_ratios")
    pairs = [(a, b) for a in s for b in r] if order == "size_ratio" else [(a, b) for b in r for a in s]
    cells = []
    for size, ratio in pairs:
        w = math.sqrt(size ** 2.0 / ratio)
        h = ratio * w
        cells.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(cells, dtype=torch.float64).to(torch.float32)


def shifted_cells(cells: Tensor, stride_hw, feature_hw) -> Tensor:
    """cells (Tensor[A, 4] float32) at every grid location (x * stride_w, y * stride_h), added in float32 as
    detectron2 does (its shifts: arange(0, W * stride, stride) in float32, exact integers) -> Tensor[Hf * Wf * A, 4]
    float32, location-major (row by row), anchor-minor."""
    (sh, sw), (fh, fw) = stride_hw, feature_hw
    xs = torch.arange(fw, dtype=torch.int64) * sw
    ys = torch.arange(fh, dtype=torch.int64) * sh
    y, x = torch.meshgrid(ys.to(torch.float32), xs.to(torch.float32), indexing="ij")
    shifts = torch.stack([x.reshape(-1), y.reshape(-1), x.reshape(-1), y.reshape(-1)], 1)
    return (shifts[:, None, :] + cells[None, :, :]).reshape(-1, 4)


def grid_anchors(sizes_per_level, aspect_ratios_per_level, strides, feature_shapes, *,
                 dtype: torch.dtype = torch.float32, device="cpu") -> list[Tensor]:
    """:func:`anchors_for_level` for every level.

    Args:
        sizes_per_level, aspect_ratios_per_level: one sequence per level.
        strides: one (stride_h, stride_w) per level.
        feature_shapes: one (Hf, Wf) per level.
    Returns:
        list of Tensor[Hf_l * Wf_l * A_l, 4], one per level.
    """
    n = len(sizes_per_level)
    for name, v in (("aspect_ratios_per_level", aspect_ratios_per_level), ("strides", strides),
                    ("feature_shapes", feature_shapes)):
        if len(v) != n:
            raise ValueError(f"{name} has {len(v)} levels, sizes_per_level has {n}")
    return [anchors_for_level(s, r, st, f, dtype=dtype, device=device)
            for s, r, st, f in zip(sizes_per_level, aspect_ratios_per_level, strides, feature_shapes)]


class AnchorGenerator(nn.Module):
    """Drop-in for torchvision's AnchorGenerator (same arguments, forward and results, bit for bit); the keyword
    switches give detectron2's DefaultAnchorGenerator (offset 0) instead.

    Args:
        sizes: one tuple of sizes per feature level (a flat tuple means one size per level).
        aspect_ratios: one tuple of h / w ratios per level (a flat tuple is used for every level).
        cache_size: grids kept per (feature shapes, strides, dtype, device); 0 disables the cache.
        rounded: cell anchors rounded to integers in float32 (torchvision, the core's grid_anchors) or exact
            (detectron2: exact_cell_anchors; the grid is then built in float32 and cast to the dtype asked for).
        order: anchors at one location, "ratio_size" (torchvision: ratio outer, size inner) | "size_ratio"
            (detectron2). Only matters with several sizes per level (C4); the RPN head's channels follow it.
        strides: one (int) stride per level, the spacing of the grid (detectron2: the feature's nominal stride);
            None: padded image size // feature size per axis (torchvision: e.g. 800 // 13 = 61 on a P6 of 13 rows).

    forward(image_list, feature_maps) takes an ImageList-like object (``.tensors``: the padded batch
    Tensor[B, 3, H, W], ``.image_sizes``: B sizes) and the feature maps (list of Tensor[B, C, Hf, Wf]);
    strides are H // Hf and W // Wf. Returns a list of B Tensor[sum_l Hf_l * Wf_l * A_l, 4]. All images share
    one (cached) tensor: do not modify it in place. Feature dtypes the core lacks on a device (float16 and
    bfloat16 on the CPU) are computed in float32 and cast. :meth:`levels` gives the same anchors per level
    from sizes alone (what the RPN uses).
    """

    def __init__(self, sizes=((32,), (64,), (128,), (256,), (512,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5,
                 cache_size: int = 8, *, rounded: bool = True, order: str = "ratio_size", strides=None):
        super().__init__()
        if not isinstance(sizes[0], (list, tuple)):
            sizes = tuple((s,) for s in sizes)
        if not isinstance(aspect_ratios[0], (list, tuple)):
            aspect_ratios = (aspect_ratios,) * len(sizes)
        if len(sizes) != len(aspect_ratios):
            raise ValueError(f"sizes has {len(sizes)} levels but aspect_ratios has {len(aspect_ratios)}")
        for i, (s, r) in enumerate(zip(sizes, aspect_ratios)):
            n = len(_positive_floats(s, f"sizes[{i}]")) * len(_positive_floats(r, f"aspect_ratios[{i}]"))
            if n > MAX_ANCHORS_PER_LOCATION:
                raise ValueError(f"level {i}: at most {MAX_ANCHORS_PER_LOCATION} anchors per location, got {n}")
        self.sizes = tuple(tuple(s) for s in sizes)
        self.aspect_ratios = tuple(tuple(r) for r in aspect_ratios)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict = OrderedDict()
        if not isinstance(rounded, bool):
            raise TypeError(f"rounded must be True or False, got {rounded!r}")
        if order not in ANCHOR_ORDERS:
            raise ValueError(f"order must be one of {ANCHOR_ORDERS}, got {order!r}")
        self.rounded, self.order = rounded, order
        if strides is not None:
            strides = tuple(int(st) for st in strides)
            if len(strides) != len(self.sizes) or any(st < 1 for st in strides):
                raise ValueError(f"strides must hold one positive stride per level ({len(self.sizes)}), got "
                                 f"{strides}")
        self.strides = strides
        # exact cells, built once (float32, CPU)
        self._cells = None if rounded else [exact_cell_anchors(sz, r, order)
                                            for sz, r in zip(self.sizes, self.aspect_ratios)]

    def num_anchors_per_location(self) -> list[int]:
        return [len(s) * len(a) for s, a in zip(self.sizes, self.aspect_ratios)]

    def _grids_and_strides(self, image_hw, feature_hws):
        if len(feature_hws) != len(self.sizes):
            raise ValueError(f"got {len(feature_hws)} feature maps for {len(self.sizes)} anchor levels")
        ih, iw = int(image_hw[0]), int(image_hw[1])
        grids = tuple((int(h), int(w)) for h, w in feature_hws)
        for g in grids:
            if g[0] <= 0 or g[1] <= 0:
                raise ValueError(f"feature maps must be non-empty, got grid sizes {list(grids)}")
        if self.strides is not None:
            return grids, tuple((st, st) for st in self.strides)
        strides = tuple((ih // g[0], iw // g[1]) for g in grids)
        if any(s[0] < 1 or s[1] < 1 for s in strides):
            raise ValueError(f"feature maps {list(grids)} larger than the images ({ih}, {iw}) give strides "
                             f"{list(strides)} below 1")
        return grids, strides

    def _anchors(self, kind: str, image_hw, feature_hws, dtype: torch.dtype, device) -> list[Tensor] | Tensor:
        """The anchors of every level ("levels") or all levels concatenated ("concat"), cached."""
        grids, strides = self._grids_and_strides(image_hw, feature_hws)
        device = torch.device(device)
        key = (kind, grids, strides, dtype, device)
        anchors = self._cache.get(key)
        if anchors is not None:
            self._cache.move_to_end(key)
            return anchors
        levels = self._levels(strides, grids, dtype, device)
        anchors = torch.cat(levels).to(dtype) if kind == "concat" else [t.to(dtype) for t in levels]
        if self.cache_size > 0:
            self._cache[key] = anchors
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return anchors

    def _levels(self, strides, grids, dtype: torch.dtype, device: torch.device) -> list[Tensor]:
        if self._cells is not None:
            return [shifted_cells(c, st, g).to(device) for c, st, g in zip(self._cells, strides, grids)]
        allowed = _CUDA_FLOATS if device.type == "cuda" else _CPU_FLOATS
        work = dtype if dtype in allowed else torch.float32
        levels = grid_anchors(self.sizes, self.aspect_ratios, strides, grids, dtype=work, device=device)
        if self.order == "size_ratio":    # the core's ratio-major cells, reordered size-major
            levels = [t.view(-1, len(r), len(s), 4).transpose(1, 2).reshape(-1, 4)
                      for t, s, r in zip(levels, self.sizes, self.aspect_ratios)]
        return levels

    def levels(self, image_hw, feature_hws, dtype: torch.dtype = torch.float32, device="cpu") -> list[Tensor]:
        """Anchors per level for a padded batch of size image_hw = (H, W) and feature grids feature_hws =
        [(Hf_l, Wf_l), ...] -> list of Tensor[Hf_l * Wf_l * A_l, 4] (cached: do not modify in place)."""
        return self._anchors("levels", image_hw, feature_hws, dtype, device)

    def forward(self, image_list, feature_maps: list[Tensor]) -> list[Tensor]:
        try:
            batch, image_sizes = image_list.tensors, image_list.image_sizes
        except AttributeError:
            raise TypeError("image_list must have .tensors and .image_sizes (an ImageList)") from None
        f0 = feature_maps[0] if len(feature_maps) else batch
        anchors = self._anchors("concat", batch.shape[-2:], [f.shape[-2:] for f in feature_maps], f0.dtype,
                                f0.device)
        return [anchors for _ in range(len(image_sizes))]
