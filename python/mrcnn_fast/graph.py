"""The C++ inference graph: the three stages of MaskRCNN's eval path in the compiled core.

``InferenceGraph.from_model(model)`` reads a MaskRCNN's inference settings (RPN test top-n and thresholds, box
coder weights, score / NMS thresholds, detections per image, the RoIAlign poolers, the mask loss and paste
convention) and exposes ``proposal_stage``, ``detection_stage`` and ``result_stage`` with the signatures and
return structures of MaskRCNN's methods, so that::

    graph = InferenceGraph.from_model(model)
    model.inference(batch, image_sizes, input_sizes, mask_format="bool", stages=graph)

gives the detections of ``stages=None`` (the torch reference of modeling/postprocess.py) with every step
between the networks run in C++ for the whole batch (no per-image Python loop), multi-threaded on the core's
pool (``mrcnn_fast.set_num_threads``).

- Workspaces (packed RoIs, per-(RoI, class) candidates, NMS scratch, mask probabilities) belong to the C++
  graph: allocated on first use, grown when a batch needs more, reused afterwards. Outputs are fresh tensors.
- Threads: one graph may be called from several Python threads at once; the C++ graph holds a mutex around
  its workspaces (calls on one graph run one at a time, the GIL is released while they run).
- torch.compile: each stage's tensor part is a custom op (``mrcnn_fast::graph_proposal_stage``,
  ``graph_detection_stage``, ``graph_result_stage``) with a fake kernel (data-dependent sizes through
  ``ctx.new_dynamic_size()``). The per-image split of stage 3 reads the counts on the host, and RLE masks are
  Python bytes, so those parts are not traced.
- Devices and dtypes: the C++ graph runs CPU float32 / float64 tensors. On CUDA tensors (no CUDA graph path
  yet) and on other dtypes (e.g. bfloat16 features) each stage falls back to the model's torch stage.
"""
from __future__ import annotations

import itertools
import threading
import weakref

import torch
from torch import Tensor

from ._lib import _C, dl
from .modeling.postprocess import Detections, check_mask_format
from .ops._layout import is_channels_last
from .ops.box_coder import DEFAULT_CLAMP
from .ops.proposals import _check as _check_rpn

_FORMATS = {"prob": 0, "bool": 1, "rle": 2}
_GRAPHS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_IDS = itertools.count()
_IDS_LOCK = threading.Lock()


def _graph(graph_id: int) -> InferenceGraph:
    g = _GRAPHS.get(graph_id)
    if g is None:
        raise RuntimeError(f"InferenceGraph {graph_id} no longer exists")
    return g


def _levels(feats: list[Tensor], n: int) -> list[Tensor]:
    """The first n feature maps in one layout: channels-last if every one is, else NCHW-contiguous."""
    feats = list(feats[:n])
    if all(f.is_contiguous(memory_format=torch.channels_last) for f in feats) and any(map(is_channels_last, feats)):
        return feats
    return [f.contiguous() for f in feats]


def _pooled(like: Tensor, rows, size: int) -> Tensor:
    fmt = torch.channels_last if is_channels_last(like) else torch.contiguous_format
    return torch.empty((rows, like.shape[1], size, size), dtype=like.dtype, device=like.device, memory_format=fmt)


def _sizes(sizes, n: int, name: str) -> Tensor:
    try:
        t = torch.tensor([[float(h), float(w)] for h, w in sizes], dtype=torch.float64).reshape(-1, 2)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a list of (height, width) pairs") from None
    if t.shape[0] != n:
        raise ValueError(f"{name} must hold one (height, width) pair per image ({n}), got {t.shape[0]}")
    return t


# ---- custom ops -----------------------------------------------------------------------------------------


@torch.library.custom_op("mrcnn_fast::graph_proposal_stage", mutates_args=())
def _proposal_op(graph_id: int, objectness: list[Tensor], deltas: list[Tensor], anchors: list[Tensor],
                 features: list[Tensor], image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    g = _graph(graph_id)
    ref = objectness[0]
    n, post = ref.shape[0], g.config["rpn_post_nms_top_n"]
    feats = _levels(features, g.box_levels)
    proposals = ref.new_empty((n, post, 4))
    counts = torch.empty(n, dtype=torch.int64)
    out = _pooled(feats[0], n * post, g.config["box_pooler"]["output_size"])
    r = g._c.proposal_stage([dl(o.contiguous()) for o in objectness], [dl(d.contiguous()) for d in deltas],
                            [dl(a.contiguous()) for a in anchors], dl(image_sizes), [dl(f) for f in feats],
                            dl(proposals), dl(counts), dl(out))
    return proposals, counts, out[:r]


@_proposal_op.register_fake
def _(graph_id, objectness, deltas, anchors, features, image_sizes):
    g = _graph(graph_id)
    ref = objectness[0]
    n, post = ref.shape[0], g.config["rpn_post_nms_top_n"]
    r = torch.library.get_ctx().new_dynamic_size()
    feats = _levels(features, g.box_levels)
    return (ref.new_empty((n, post, 4)), torch.empty(n, dtype=torch.int64, device=ref.device),
            _pooled(feats[0], r, g.config["box_pooler"]["output_size"]))


@torch.library.custom_op("mrcnn_fast::graph_detection_stage", mutates_args=())
def _detection_op(graph_id: int, class_logits: Tensor, box_regression: Tensor, proposals: Tensor, counts: Tensor,
                  features: list[Tensor], image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    g = _graph(graph_id)
    n, d = proposals.shape[0], g.config["detections_per_image"]
    boxes, scores = proposals.new_empty((n, d, 4)), proposals.new_empty((n, d))
    labels, det_counts = torch.empty((n, d), dtype=torch.int64), torch.empty(n, dtype=torch.int64)
    mf = kf = None
    feats = _levels(features, max(g.mask_levels, g.keypoint_levels, 1))
    if g.mask_levels:
        mf = _pooled(feats[0], n * d, g.config["mask_pooler"]["output_size"])
    if g.keypoint_levels:
        kf = _pooled(feats[0], n * d, g.config["keypoint_pooler"]["output_size"])
    r = g._c.detection_stage(dl(class_logits.contiguous()), dl(box_regression.contiguous()), dl(proposals.contiguous()),
                             dl(counts.contiguous()), dl(image_sizes), [dl(f) for f in feats], dl(boxes), dl(scores),
                             dl(labels), dl(det_counts), None if mf is None else dl(mf),
                             None if kf is None else dl(kf))
    empty = proposals.new_empty((0,))
    return (boxes, scores, labels, det_counts, empty if mf is None else mf[:r], empty.clone() if kf is None else kf[:r])


@_detection_op.register_fake
def _(graph_id, class_logits, box_regression, proposals, counts, features, image_sizes):
    g = _graph(graph_id)
    n, d = proposals.shape[0], g.config["detections_per_image"]
    r = torch.library.get_ctx().new_dynamic_size()
    feats = _levels(features, max(g.mask_levels, g.keypoint_levels, 1))
    empty = proposals.new_empty((0,))
    mf = _pooled(feats[0], r, g.config["mask_pooler"]["output_size"]) if g.mask_levels else empty
    kf = _pooled(feats[0], r, g.config["keypoint_pooler"]["output_size"]) if g.keypoint_levels else empty.clone()
    i64 = dict(dtype=torch.int64, device=proposals.device)
    return (proposals.new_empty((n, d, 4)), proposals.new_empty((n, d)), torch.empty((n, d), **i64),
            torch.empty(n, **i64), mf, kf)


def _result_buffers(boxes: Tensor, counts: Tensor, mask_format: int, with_masks: bool, keypoint_logits,
                    input_sizes: Tensor):
    """Outputs of stage 3: packed boxes, one flat mask buffer (views per image), keypoints."""
    r = int(counts.sum())
    out_boxes = boxes.new_empty((r, 4))
    masks, flat = [], boxes.new_empty((0,))
    if with_masks and mask_format != 2:
        sizes = [int(k) * int(h) * int(w) for k, (h, w) in zip(counts.tolist(), input_sizes.tolist())]
        flat = torch.empty(sum(sizes), dtype=torch.bool if mask_format == 1 else boxes.dtype)
        hw = input_sizes.to(torch.int64).tolist()
        masks = [m.view(int(k), h, w) for m, k, (h, w) in zip(flat.split(sizes), counts.tolist(), hw)]
    kp = kps = None
    if keypoint_logits is not None:
        k = keypoint_logits.shape[1]
        kp, kps = boxes.new_empty((r, k, 3)), boxes.new_empty((r, k))
    return out_boxes, flat, masks, kp, kps


@torch.library.custom_op("mrcnn_fast::graph_result_stage", mutates_args=())
def _result_op(graph_id: int, boxes: Tensor, scores: Tensor, labels: Tensor, counts: Tensor,
               mask_logits: Tensor | None, keypoint_logits: Tensor | None, image_sizes: Tensor, input_sizes: Tensor,
               mask_format: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = _graph(graph_id)
    out_boxes, flat, masks, kp, kps = _result_buffers(boxes, counts, mask_format, mask_logits is not None,
                                                      keypoint_logits, input_sizes)
    g._c.result_stage(dl(boxes.contiguous()), dl(scores.contiguous()), dl(labels.contiguous()),
                      dl(counts.contiguous()), None if mask_logits is None else dl(mask_logits.contiguous()),
                      None if keypoint_logits is None else dl(keypoint_logits.contiguous()), dl(image_sizes),
                      dl(input_sizes), mask_format, dl(out_boxes), [dl(m) for m in masks],
                      None if kp is None else dl(kp), None if kps is None else dl(kps))
    if kp is None:
        kp, kps = boxes.new_empty((0,)), boxes.new_empty((0,))
    return out_boxes, flat, kp, kps


@_result_op.register_fake
def _(graph_id, boxes, scores, labels, counts, mask_logits, keypoint_logits, image_sizes, input_sizes, mask_format):
    ctx = torch.library.get_ctx()
    given = mask_logits if mask_logits is not None else keypoint_logits
    r = given.shape[0] if given is not None else ctx.new_dynamic_size()
    flat = boxes.new_empty((0,))
    if mask_logits is not None and mask_format != 2:
        flat = torch.empty(ctx.new_dynamic_size(), dtype=torch.bool if mask_format == 1 else boxes.dtype,
                           device=boxes.device)
    if keypoint_logits is None:
        kp, kps = boxes.new_empty((0,)), boxes.new_empty((0,))
    else:
        k = keypoint_logits.shape[1]
        kp, kps = boxes.new_empty((r, k, 3)), boxes.new_empty((r, k))
    return boxes.new_empty((r, 4)), flat, kp, kps


def _drop_empty_outputs(dets: Detections, ml: Tensor | None, kl: Tensor | None, sizes: Tensor, sizes0: Tensor):
    """The detections whose box, rescaled to the input image as the C++ stage 3 does (ratio rounded to the boxes'
    dtype) and clipped to it, is empty are dropped (detectron2's detector_postprocess), with their packed rows of
    the mask / keypoint logits. Returns (dets, mask_logits, keypoint_logits), unchanged when nothing is empty."""
    boxes = dets.boxes
    n, d = boxes.shape[:2]
    ratio = (sizes0 / sizes).flip(1).repeat(1, 2).to(boxes.dtype)       # (rx, ry, rx, ry) per image
    scaled = boxes * ratio[:, None, :]
    hi = sizes0.flip(1).repeat(1, 2).to(boxes.dtype)[:, None, :]
    scaled = torch.minimum(scaled.clamp(min=0), hi)
    valid = torch.arange(d)[None, :] < dets.counts[:, None]
    keep = valid & (scaled[..., 2] > scaled[..., 0]) & (scaled[..., 3] > scaled[..., 1])
    if bool((keep == valid).all()):
        return dets, ml, kl
    rows = keep[valid]     # packed order: image after image
    counts = keep.sum(1)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)   # kept rows first, in their order
    pad = torch.arange(d)[None, :] >= counts[:, None]
    out_boxes = boxes.gather(1, order[..., None].expand(n, d, 4)).masked_fill(pad[..., None], 0)
    out_scores = dets.scores.gather(1, order).masked_fill(pad, 0)
    out_labels = dets.labels.gather(1, order).masked_fill(pad, 0)
    return (Detections(out_boxes, out_scores, out_labels, counts), None if ml is None else ml[rows],
            None if kl is None else kl[rows])


# ---- the graph --------------------------------------------------------------------------------------------


def _pooler_config(pooler) -> dict:
    return {"output_size": int(pooler.output_size), "scales": [float(s) for s in pooler.scales],
            "sampling_ratio": int(pooler.sampling_ratio), "aligned": bool(pooler.aligned),
            "canonical_level": int(pooler.canonical_level), "canonical_scale": float(pooler.canonical_scale),
            "level_mapping": pooler.level_mapping}


class InferenceGraph:
    """The three stages of the eval path in the C++ graph (see the module doc).

    Args:
        config (dict): rpn_pre_nms_top_n, rpn_post_nms_top_n, rpn_nms_thresh, rpn_score_thresh, rpn_min_size,
            rpn_weights (4), box_weights (4), bbox_xform_clip, box_pooler (dict: output_size, scales (1 / stride
            per level, finest first), sampling_ratio, aligned, canonical_level, canonical_scale), score_thresh,
            nms_thresh, detections_per_image, min_box_side, mask_pooler (dict or None: mask branch off),
            mask_loss ("sigmoid" | "softmax"), mask_threshold, paste_aligned, keypoint_pooler (dict or None);
            optional (default): keypoint_score ("logit" | "prob"; "logit"), mask_threshold_inclusive (bool / RLE
            masks are probability >= mask_threshold; False), clip_output (boxes clipped to the input image, the
            detections left empty dropped: detectron2's detector_postprocess; False); the poolers' level_mapping
            ("torchvision" | "detectron2"; "torchvision").
        fallback: an object with the torch stages (e.g. the MaskRCNN) run on inputs the C++ graph does not take
            (CUDA tensors, dtypes other than float32 / float64); None: such inputs raise.
    """

    def __init__(self, config: dict, *, fallback=None):
        self.config = dict(config)
        self._c = _C.InferenceGraph(self.config)
        self.fallback = fallback
        self.box_levels = len(self.config["box_pooler"]["scales"])
        mp, kp = self.config.get("mask_pooler"), self.config.get("keypoint_pooler")
        self.mask_levels = len(mp["scales"]) if mp else 0
        self.keypoint_levels = len(kp["scales"]) if kp else 0
        with _IDS_LOCK:
            self.graph_id = next(_IDS)
        _GRAPHS[self.graph_id] = self

    @classmethod
    def from_model(cls, model, *, fallback: bool = True) -> InferenceGraph:
        """The graph of a MaskRCNN's inference settings, read once (build a new graph after changing them, e.g.
        model.mask_paste or roi_heads.score_thresh); fallback: run the model's torch stages on inputs the graph
        does not take. Raises ValueError naming what the graph does not support (refiners, cascade heads,
        poolers other than RoIAlign), so callers can keep the torch stages."""
        from .modeling.cascade import CascadeRoIHeads
        from .modeling.rpn import RPN_BOX_WEIGHTS

        rh, rpn = model.roi_heads, model.rpn
        if isinstance(rh, CascadeRoIHeads):
            raise ValueError("InferenceGraph does not support cascade RoI heads (CascadeRoIHeads)")
        if rh.refiners:
            names = ", ".join(type(r).__name__ for r in rh.refiners)
            raise ValueError(f"InferenceGraph does not support refiners of the detections ({names})")
        poolers = {"box": rh.box_pooler, "mask": rh.mask_pooler if rh.mask_head is not None else None,
                   "keypoint": rh.keypoint_pooler if rh.keypoint_head is not None else None}
        for name, p in poolers.items():
            if p is not None and p.pooler_type != "roi_align":
                raise ValueError(f"InferenceGraph supports RoIAlign poolers only; the {name} pooler is "
                                 f"{p.pooler_type!r}")
        config = {
            "rpn_pre_nms_top_n": int(rpn.pre_nms_top_n["test"]), "rpn_post_nms_top_n": int(rpn.post_nms_top_n["test"]),
            "rpn_nms_thresh": float(rpn.nms_thresh), "rpn_score_thresh": float(rpn.score_thresh),
            "rpn_min_size": float(rpn.min_size), "rpn_weights": list(RPN_BOX_WEIGHTS),
            "box_weights": [float(w) for w in rh.box_stage_weights(0)], "bbox_xform_clip": DEFAULT_CLAMP,
            "box_pooler": _pooler_config(rh.box_pooler), "score_thresh": float(rh.score_thresh),
            "nms_thresh": float(rh.nms_thresh), "detections_per_image": int(rh.detections_per_image),
            "min_box_side": float(rh.min_box_side),
            "mask_pooler": None if poolers["mask"] is None else _pooler_config(poolers["mask"]),
            "mask_loss": rh.mask_loss_type, "mask_threshold": 0.5, "paste_aligned": model.mask_paste == "aligned",
            "mask_threshold_inclusive": bool(model.mask_threshold_inclusive), "clip_output": bool(model.clip_output),
            "keypoint_pooler": None if poolers["keypoint"] is None else _pooler_config(poolers["keypoint"]),
            "keypoint_score": rh.keypoint_score,
        }
        return cls(config, fallback=model if fallback else None)

    def workspace_bytes(self) -> int:
        """Bytes held by the C++ graph's workspaces now."""
        return self._c.workspace_bytes()

    def _runs(self, stage: str, tensors) -> bool:
        """True when the C++ graph takes these tensors; else the fallback's stage runs (or this raises)."""
        ok = all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors)
        ok = ok and len({t.dtype for t in tensors}) == 1
        if ok or self.fallback is not None:
            return ok
        kinds = sorted({f"{t.device.type} {t.dtype}" for t in tensors})
        raise ValueError(f"InferenceGraph.{stage}: the C++ graph takes CPU float32 / float64 tensors of one dtype, "
                         f"got {', '.join(kinds)} (and no fallback)")

    @torch.no_grad()
    def proposal_stage(self, objectness: list[Tensor], deltas: list[Tensor], anchors: list[Tensor],
                       feats: list[Tensor], image_sizes) -> tuple[Tensor, Tensor, Tensor]:
        """Stage 1, as MaskRCNN.proposal_stage: -> (proposals Tensor[N, P, 4], counts Tensor[N], box_features
        Tensor[R, C, S, S])."""
        objectness, deltas, anchors, sizes = _check_rpn(objectness, deltas, anchors, image_sizes)
        if len(feats) < self.box_levels:
            raise ValueError(f"feats must hold at least {self.box_levels} feature maps, got {len(feats)}")
        if not self._runs("proposal_stage", [objectness[0], *feats[:self.box_levels]]):
            return self.fallback.proposal_stage(objectness, deltas, anchors, feats, image_sizes)
        return _proposal_op(self.graph_id, [o.detach() for o in objectness], [d.detach() for d in deltas],
                            [a.detach() for a in anchors], list(feats), sizes.cpu())

    @torch.no_grad()
    def detection_stage(self, class_logits: Tensor, box_regression: Tensor, proposals: Tensor, counts: Tensor,
                        feats: list[Tensor], image_sizes) -> tuple[Detections, Tensor | None, Tensor | None]:
        """Stage 2, as MaskRCNN.detection_stage: -> (Detections, mask_features Tensor[R', C, S, S] or None,
        keypoint_features Tensor[R', C, S', S'] or None)."""
        for name, t in (("class_logits", class_logits), ("box_regression", box_regression), ("proposals", proposals),
                        ("counts", counts)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        levels = max(self.mask_levels, self.keypoint_levels)
        if len(feats) < levels:
            raise ValueError(f"feats must hold at least {levels} feature maps, got {len(feats)}")
        if not self._runs("detection_stage", [proposals, *feats[:levels]]) or counts.device.type != "cpu":
            return self.fallback.detection_stage(class_logits, box_regression, proposals, counts, feats, image_sizes)
        if counts.dtype != torch.int64:
            raise TypeError(f"counts must be int64, got {counts.dtype}")
        sizes = _sizes(image_sizes, proposals.shape[0] if proposals.dim() else -1, "image_sizes")
        boxes, scores, labels, det_counts, mf, kf = _detection_op(
            self.graph_id, class_logits.detach().to(proposals.dtype), box_regression.detach().to(proposals.dtype),
            proposals, counts, list(feats), sizes)
        return (Detections(boxes, scores, labels, det_counts), mf if self.mask_levels else None,
                kf if self.keypoint_levels else None)

    @torch.no_grad()
    def result_stage(self, dets: Detections, mask_logits: Tensor | None, keypoint_logits: Tensor | None, image_sizes,
                     input_sizes, *, mask_format: str = "prob") -> list[dict]:
        """Stage 3, as MaskRCNN.result_stage: one dict per image in the input images' coordinates."""
        check_mask_format(mask_format)
        if not isinstance(dets, Detections):
            dets = Detections(*dets)
        if not self._runs("result_stage", [dets.boxes]) or dets.counts.device.type != "cpu":
            return self.fallback.result_stage(dets, mask_logits, keypoint_logits, image_sizes, input_sizes,
                                              mask_format=mask_format)
        if (mask_logits is not None) != bool(self.mask_levels):
            raise ValueError("mask_logits must be given exactly when the graph's mask branch is on")
        if (keypoint_logits is not None) != bool(self.keypoint_levels):
            raise ValueError("keypoint_logits must be given exactly when the graph's keypoint branch is on")
        dtype, n = dets.boxes.dtype, dets.boxes.shape[0]
        sizes, sizes0 = _sizes(image_sizes, n, "image_sizes"), _sizes(input_sizes, n, "input_sizes")
        ml = None if mask_logits is None else mask_logits.detach().to(dtype)
        kl = None if keypoint_logits is None else keypoint_logits.detach().to(dtype)
        if self.config.get("clip_output", False):
            dets, ml, kl = _drop_empty_outputs(dets, ml, kl, sizes, sizes0)
        fmt = _FORMATS[mask_format]
        rles = None
        if fmt == 2 and ml is not None:   # Python bytes: the core's call, outside the custom op
            boxes, _, _, kp, kps = _result_buffers(dets.boxes, dets.counts, fmt, True, kl, sizes0)
            rles = self._c.result_stage(
                dl(dets.boxes.contiguous()), dl(dets.scores.contiguous()), dl(dets.labels.contiguous()),
                dl(dets.counts.contiguous()), dl(ml.contiguous()), None if kl is None else dl(kl.contiguous()),
                dl(sizes), dl(sizes0), fmt, dl(boxes), [], None if kp is None else dl(kp),
                None if kps is None else dl(kps))
        else:
            boxes, flat, kp, kps = _result_op(self.graph_id, dets.boxes, dets.scores, dets.labels, dets.counts, ml, kl,
                                              sizes, sizes0, fmt)
        return self._split(dets, boxes, flat if rles is None else None, rles, kp if kl is not None else None, kps,
                           sizes0, mask_format, ml is not None)

    @staticmethod
    def _split(dets, boxes, flat, rles, kp, kps, sizes0, mask_format, with_masks) -> list[dict]:
        out, start, off = [], 0, 0
        # host sync: one result per image with its own number of detections
        for i, (k, (h0, w0)) in enumerate(zip(dets.counts.tolist(), sizes0.to(torch.int64).tolist())):
            res = {"boxes": boxes[start:start + k], "labels": dets.labels[i, :k].clone(),
                   "scores": dets.scores[i, :k].clone()}
            if with_masks:
                if mask_format == "rle":
                    res["masks_rle"] = [{"size": [h0, w0], "counts": c} for c in rles[start:start + k]]
                else:
                    size = k * h0 * w0
                    m = flat[off:off + size]
                    res["masks"] = m.view(k, 1, h0, w0) if mask_format == "prob" else m.view(k, h0, w0)
                    off += size
            if kp is not None:
                res["keypoints"] = kp[start:start + k]
                res["keypoints_scores"] = kps[start:start + k]
            out.append(res)
            start += k
        return out
