"""RPN proposal generation for a whole batch in one call.

Step for step torchvision's RegionProposalNetwork.filter_proposals applied to BoxCoder.decode's
output, but only the pre-NMS top-k anchors of each level are decoded:
  per image and level: the pre_nms_top_n anchors with the largest objectness logits -> decode their
  deltas -> clip to the image -> drop boxes with a side < min_size -> drop sigmoid(logit) <
  score_thresh -> NMS within the level -> the post_nms_top_n best of all levels by descending score.
Ties: equal logits rank by anchor index, equal final scores by level and then logit rank (torchvision
leaves both unspecified).

The outputs have a fixed size and the CUDA path never waits for the device.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._lib import _C, dl, stream
from ._checks import autocast_input, check_float, check_int, check_tensor, real_number
from .box_coder import DEFAULT_CLAMP, _weights


@torch.library.custom_op("mrcnn_fast::generate_proposals", mutates_args=())
def _generate_proposals(objectness: list[Tensor], deltas: list[Tensor], anchors: list[Tensor], image_sizes: Tensor,
                        pre_nms_top_n: int, post_nms_top_n: int, nms_thresh: float, score_thresh: float,
                        min_size: float, weights: list[float], bbox_xform_clip: float) -> tuple[Tensor, Tensor, Tensor]:
    ref = objectness[0]
    n = ref.shape[0]
    objectness = [o.contiguous() for o in objectness]
    deltas = [d.contiguous() for d in deltas]
    anchors = [a.contiguous() for a in anchors]
    image_sizes = image_sizes.contiguous()
    boxes = ref.new_empty((n, post_nms_top_n, 4))
    scores = ref.new_empty((n, post_nms_top_n))
    counts = torch.empty(n, dtype=torch.int64, device=ref.device)
    if ref.device.type == "cuda":
        nbytes = _C.proposals_workspace_bytes([o.shape[1] for o in objectness], n, str(ref.dtype).replace("torch.", ""),
                                              True, pre_nms_top_n, post_nms_top_n)
        ws = torch.empty(nbytes, dtype=torch.uint8, device=ref.device)
    else:
        ws = torch.empty(0, dtype=torch.uint8)
    _C.generate_proposals([dl(o) for o in objectness], [dl(d) for d in deltas], [dl(a) for a in anchors],
                          dl(image_sizes), pre_nms_top_n, post_nms_top_n, nms_thresh, score_thresh, min_size,
                          list(weights), bbox_xform_clip, dl(boxes), dl(scores), dl(counts), dl(ws), stream(ref))
    return boxes, scores, counts


@_generate_proposals.register_fake
def _(objectness, deltas, anchors, image_sizes, pre_nms_top_n, post_nms_top_n, nms_thresh, score_thresh, min_size,
      weights, bbox_xform_clip):
    ref = objectness[0]
    n = ref.shape[0]
    return (ref.new_empty((n, post_nms_top_n, 4)), ref.new_empty((n, post_nms_top_n)),
            torch.empty(n, dtype=torch.int64, device=ref.device))


def _levels(v, name: str) -> list[Tensor]:
    if isinstance(v, Tensor) or not isinstance(v, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors (one per level), got {type(v).__name__}")
    for i, t in enumerate(v):
        check_tensor(t, f"{name}[{i}]")
    return list(v)


def _check(objectness, deltas, anchors, image_sizes):
    objectness, deltas, anchors = (_levels(objectness, "objectness"), _levels(deltas, "deltas"),
                                   _levels(anchors, "anchors"))
    objectness, deltas = [autocast_input(o) for o in objectness], [autocast_input(d) for d in deltas]
    if not objectness:
        raise ValueError("objectness must hold at least one level")
    ref = objectness[0]
    check_float(ref, "objectness[0]")   # before the per-level dtype checks below, which compare with it
    n = ref.shape[0] if ref.dim() == 2 else -1
    for lvl, o in enumerate(objectness):   # the outputs (and the CUDA workspace) are sized from these shapes
        if o.dim() != 2 or o.shape[0] != n:
            raise ValueError(f"objectness[{lvl}] must have shape [N, R] (N = {n} images), got {list(o.shape)}")
    for name, ts in (("deltas", deltas), ("anchors", anchors)):   # the core's dtype messages name no level
        for lvl, t in enumerate(ts):
            if t.dtype != ref.dtype:
                raise TypeError(f"{name}[{lvl}] must have dtype {ref.dtype}, got {t.dtype}")
    if isinstance(image_sizes, Tensor):
        if image_sizes.dtype.is_complex or image_sizes.dtype == torch.bool:
            raise TypeError(f"image_sizes must be real, got {image_sizes.dtype}")
        sizes = image_sizes.to(device=ref.device, dtype=torch.float64)
    else:
        try:
            sizes = torch.tensor([[float(h), float(w)] for h, w in image_sizes], dtype=torch.float64,
                                 device=ref.device).reshape(-1, 2)
        except (TypeError, ValueError):
            raise TypeError("image_sizes must be a Tensor[N, 2] or a list of (height, width) pairs") from None
    if sizes.dim() != 2 or sizes.shape != (n, 2):
        raise ValueError(f"image_sizes must have shape [{n}, 2] (height, width), got {list(sizes.shape)}")
    return objectness, deltas, anchors, sizes


def generate_proposals(objectness: Sequence[Tensor], deltas: Sequence[Tensor], anchors: Sequence[Tensor],
                       image_sizes, pre_nms_top_n: int, post_nms_top_n: int, nms_thresh: float,
                       score_thresh: float = 0.0, min_size: float = 1e-3,
                       weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                       bbox_xform_clip: float = DEFAULT_CLAMP) -> tuple[Tensor, Tensor, Tensor]:
    """RPN proposals for a batch (see the module docstring for the exact steps).

    Args:
        objectness (list[Tensor[N, R_l]]): logits per level, R_l = H_l * W_l * A_l in torchvision's
            order (the head output [N, A, H, W] permuted to [N, H, W, A] and flattened).
        deltas (list[Tensor[N, R_l, 4]]): box regression per level, same order.
        anchors (list[Tensor[R_l, 4]]): anchors per level (location-major, anchor-minor), shared by
            the images.
        image_sizes (Tensor[N, 2] or list of (height, width)): boxes are clipped to [0, w] x [0, h].
            A CUDA tensor avoids a host-to-device copy.
        pre_nms_top_n (int): anchors kept per level and image before NMS.
        post_nms_top_n (int): proposals kept per image.
        nms_thresh (float): IoU threshold of the per-level NMS.
        score_thresh (float): proposals with sigmoid(logit) < score_thresh are dropped.
        min_size (float): proposals with a side < min_size are dropped (torchvision); 0: only empty ones, a
            side <= 0 (detectron2's test-time nonempty()). Must be >= 0.
        weights, bbox_xform_clip: the BoxCoder parameters (RPN: (1, 1, 1, 1), log(1000/16)).
    All tensors share one dtype and device. On CPU, NaN/inf in objectness (or in a selected anchor)
    raise ValueError; CUDA does not inspect values.
    Returns:
        boxes (Tensor[N, post_nms_top_n, 4]), scores (Tensor[N, post_nms_top_n]) (sigmoid of the
        logits, descending), counts (Tensor[N] int64): rows at or past counts[i] are zero.
        Not differentiable (the inputs are detached, as in torchvision).
    """
    objectness, deltas, anchors, sizes = _check(objectness, deltas, anchors, image_sizes)
    pre = check_int(pre_nms_top_n, "pre_nms_top_n", minimum=0)
    post = check_int(post_nms_top_n, "post_nms_top_n", minimum=0)
    min_size = real_number(min_size, "min_size")
    if not min_size >= 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    return _generate_proposals([o.detach() for o in objectness], [d.detach() for d in deltas],
                               [a.detach() for a in anchors], sizes, pre, post, real_number(nms_thresh, "nms_thresh"),
                               real_number(score_thresh, "score_thresh"), min_size,
                               _weights(weights), real_number(bbox_xform_clip, "bbox_xform_clip"))


def generate_proposals_list(*args, **kwargs) -> tuple[list[Tensor], list[Tensor]]:
    """generate_proposals() returning torchvision's form: per image Tensor[K_i, 4] boxes and
    Tensor[K_i] scores (reads the counts on the host)."""
    boxes, scores, counts = generate_proposals(*args, **kwargs)
    ks = counts.tolist()
    return [b[:k] for b, k in zip(boxes, ks)], [s[:k] for s, k in zip(scores, ks)]
