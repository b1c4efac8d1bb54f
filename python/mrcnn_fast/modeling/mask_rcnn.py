"""The whole Mask R-CNN: preprocessing, backbone, RPN, RoI heads, post-processing to the input size."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..data.transforms import RESIZE_MODES, batch_images, resize_shortest_edge
from .backbone import Backbone, build_res5_head
from .cascade import CascadeRefinement, CascadeRoIHeads
from .postprocess import Detections, check_mask_format, detector_results, mask_probs, pack, rois_from_padded
from .refine import IterativeBoxRefinement, MaskBoxRefinement
from .roi_heads import RoIHeads, RoIPredictor
from .rpn import RPN
from .tta import FlipTTA

MASK_PASTES = ("aligned", "torchvision")
INPUT_FORMATS = ("RGB", "BGR")


class MaskRCNN(nn.Module):
    """Mask R-CNN (He et al. 2017) with an FPN or C4 head.

    forward(images, targets=None, *, mask_format="prob"):
        images: list of Tensor[3, H, W] float RGB in [0, 1] (sizes may differ).
        targets (training): list of dicts with "boxes" Tensor[G, 4] xyxy pixels, "labels" Tensor[G] int64 in 1..C,
            "masks" Tensor[G, H, W] (when the mask head is on), "keypoints" Tensor[G, K, 3] (keypoint head),
            optionally "iscrowd" Tensor[G] (crowd instances are dropped).
        mask_format (inference): "prob" -> "masks" Tensor[D, 1, H, W] float probabilities; "bool" -> "masks"
            Tensor[D, H, W] bool (probability > 0.5); "rle" -> "masks_rle", a list of D COCO RLE dicts (never
            builds image-sized masks).
        Training returns a dict of scalar losses; inference a list of dicts per image in the input image's
        coordinates: boxes [D, 4], labels [D], scores [D], the masks as mask_format says, keypoints [D, K, 3]
        and keypoints_scores [D, K].

    Inference runs three stages with the networks between them (see `inference`); between stages a batch is
    padded tensors plus per-image counts, the networks see the valid rows only.

    Args:
        backbone, rpn, roi_heads: the parts.
        pixel_mean, pixel_std: per-channel normalisation (x - mean) / std of the network's input, in its channel
            order and scale (input_format, pixel_scale).
        input_format: the network's channel order, "RGB" or "BGR" (detectron2's models); the input images are RGB.
        pixel_scale: the network sees the images on a [0, pixel_scale] scale (1; detectron2: 255).
        min_size_train (tuple): shortest side, one chosen at random per image in training.
        max_size_train, min_size_test, max_size_test: see resize_shortest_edge.
        resize: "mrcnn_fast" (float bilinear, sides rounded, then normalised) | "torchvision" (normalised, then
            float bilinear with sides floored: GeneralizedRCNNTransform) | "detectron2" (the image quantised to
            uint8, resized with PIL's bilinear filter to int(x + 0.5) sides, then scaled and normalised).
        size_divisibility: the batch is zero-padded to a multiple of this.
        mask_paste: how the predicted masks are pasted into the image (also settable as an attribute):
            "aligned" (detectron2's convention: the mask covers its box exactly, as the RoIAlign(aligned=True)
            mask targets do) or "torchvision" (torchvision's paste_masks_in_image bit for bit, for output parity;
            misaligned with the targets by up to ~1 px). See ops.paste_masks_in_image.
        mask_threshold_inclusive: bool / RLE masks are probability >= 0.5 (detectron2's paste_masks_in_image)
            instead of > 0.5 (also settable as an attribute).
        clip_output: results' boxes rescaled to the input image are clipped to it and the detections left empty
            dropped (detectron2's detector_postprocess; also settable as an attribute). False: torchvision's.
        channels_last: NHWC activations and conv weights (oneDNN / cuDNN run NHWC convolutions, pooling and
            batch norm without layout reorders). state_dict() still returns contiguous (NCHW) tensors.
    """

    def __init__(self, backbone: Backbone, rpn: RPN, roi_heads: RoIHeads, *, pixel_mean=(0.485, 0.456, 0.406),
                 pixel_std=(0.229, 0.224, 0.225), min_size_train=(800,), max_size_train: int = 1333,
                 min_size_test: int = 800, max_size_test: int = 1333, size_divisibility: int = 32,
                 mask_paste: str = "aligned", channels_last: bool = False, clip_output: bool = False,
                 mask_threshold_inclusive: bool = False, input_format: str = "RGB", pixel_scale: float = 1.0,
                 resize: str = "mrcnn_fast"):
        super().__init__()
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        if not float(pixel_scale) > 0:
            raise ValueError(f"pixel_scale must be positive, got {pixel_scale!r}")
        self.input_format = input_format
        self.pixel_scale = float(pixel_scale)
        self.resize = resize
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).reshape(3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).reshape(3, 1, 1), False)
        self.min_size_train = tuple(int(s) for s in min_size_train)
        if not self.min_size_train:
            raise ValueError("min_size_train must not be empty")
        self.max_size_train = int(max_size_train)
        self.min_size_test = int(min_size_test)
        self.max_size_test = int(max_size_test)
        self.size_divisibility = int(size_divisibility)
        self.mask_paste = mask_paste
        if not isinstance(clip_output, bool):
            raise TypeError(f"clip_output must be True or False, got {clip_output!r}")
        self.clip_output = clip_output
        if not isinstance(mask_threshold_inclusive, bool):
            raise TypeError(f"mask_threshold_inclusive must be True or False, got {mask_threshold_inclusive!r}")
        self.mask_threshold_inclusive = mask_threshold_inclusive
        self._channels_last = False
        self.channels_last = channels_last
        # checkpoints (safetensors) need contiguous tensors whatever the layout used for speed
        self.register_state_dict_post_hook(_contiguous_state_dict)

    @classmethod
    def from_config(cls, cfg) -> MaskRCNN:
        m = cfg.model
        backbone = Backbone.from_config(cfg)
        rpn = RPN.from_config(cfg, backbone.out_channels, backbone.strides)
        if len(backbone.strides) != len(m.anchors.sizes):
            raise ValueError(f"model.anchors.sizes has {len(m.anchors.sizes)} levels but the backbone produces "
                             f"{len(backbone.strides)} feature maps")
        paste = m.mask.paste
        if paste not in MASK_PASTES:
            raise ValueError(f"model.mask.paste must be one of {MASK_PASTES}, got {paste!r}")
        res5 = None if m.fpn.enabled else build_res5_head(cfg)
        roi_heads = build_roi_heads(cfg, backbone.out_channels, backbone.strides, res5)
        i = cfg.input
        return cls(backbone, rpn, roi_heads, pixel_mean=m.pixel_mean, pixel_std=m.pixel_std,
                   min_size_train=i.min_size_train, max_size_train=i.max_size_train, min_size_test=i.min_size_test,
                   max_size_test=i.max_size_test, size_divisibility=i.size_divisibility, mask_paste=paste,
                   channels_last=m.channels_last, clip_output=m.roi_heads.test_output_clip,
                   mask_threshold_inclusive=m.mask.threshold_inclusive, input_format=m.input_format,
                   pixel_scale=m.pixel_scale, resize=i.resize)

    @property
    def channels_last(self) -> bool:
        return self._channels_last

    @channels_last.setter
    def channels_last(self, value: bool) -> None:
        fmt = torch.channels_last if value else torch.contiguous_format
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                m.weight.data = m.weight.data.contiguous(memory_format=fmt)
        self._channels_last = bool(value)

    @property
    def mask_paste(self) -> str:
        return self._mask_paste

    @mask_paste.setter
    def mask_paste(self, value: str) -> None:
        if value not in MASK_PASTES:
            raise ValueError(f"mask_paste must be one of {MASK_PASTES}, got {value!r}")
        self._mask_paste = value

    def load_backbone_state_dict(self, state_dict: dict) -> None:
        """Loads ImageNet-style ResNet weights (torchvision names: conv1, bn1, layer1..4; fc.* ignored) into
        the trunk, and layer4 into the C4 box head's res5. Strict: every trunk tensor must be present."""
        from .backbone import resnet_state_dict_to_c4

        trunk, res5 = resnet_state_dict_to_c4(state_dict)
        if self.roi_heads.c4:
            self.roi_heads.box_head.res5.load_state_dict(res5)
        else:
            trunk.update({f"layer4.{k}": v for k, v in res5.items()})
        self.backbone.body.load_state_dict(trunk)

    # ---- preprocessing ----------------------------------------------------------------------------

    def check_inputs(self, images, targets=None):
        """Raises on images / targets the model cannot take (see the class doc)."""
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError("images must be a non-empty list of Tensor[3, H, W]")
        for i, im in enumerate(images):
            if not isinstance(im, Tensor):
                raise TypeError(f"images[{i}] must be a torch.Tensor, got {type(im).__name__}")
            if im.dim() != 3 or im.shape[0] != 3 or im.shape[1] == 0 or im.shape[2] == 0:
                raise ValueError(f"images[{i}] must have shape [3, H, W], got {list(im.shape)}")
            if not im.is_floating_point():
                raise TypeError(f"images[{i}] must be a float tensor in [0, 1], got {im.dtype}")
        if targets is None:
            if self.training:
                raise ValueError("targets are required in training mode")
            return
        if len(targets) != len(images):
            raise ValueError(f"got {len(images)} images but {len(targets)} targets")
        for i, t in enumerate(targets):
            b = t.get("boxes")
            if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
                raise ValueError(f"targets[{i}]['boxes'] must be a Tensor[G, 4]")
            lab = t.get("labels")
            if not isinstance(lab, Tensor) or lab.shape != b.shape[:1]:
                raise ValueError(f"targets[{i}]['labels'] must be a Tensor[G] matching boxes")
            if lab.numel() and (int(lab.min()) < 1 or int(lab.max()) > self.roi_heads.num_classes):
                raise ValueError(f"targets[{i}]['labels'] must be in 1..{self.roi_heads.num_classes}")
            if self.roi_heads.mask_head is not None:
                mk = t.get("masks")
                if not isinstance(mk, Tensor) or mk.dim() != 3 or mk.shape[0] != b.shape[0] \
                        or tuple(mk.shape[1:]) != tuple(images[i].shape[1:]):
                    raise ValueError(f"targets[{i}]['masks'] must be a Tensor[G, H, W] matching boxes and the image")
            if self.roi_heads.keypoint_head is not None and "keypoints" in t:
                kp = t["keypoints"]
                k = self.roi_heads.keypoint_head.kps_score_lowres.out_channels
                if kp.dim() != 3 or kp.shape[0] != b.shape[0] or kp.shape[1:] != (k, 3):
                    raise ValueError(f"targets[{i}]['keypoints'] must be a Tensor[G, {k}, 3]")

    def normalize(self, image: Tensor, input_scale: float = 1.0) -> Tensor:
        """An RGB image Tensor[3, H, W] on a [0, input_scale] scale -> the network's channel order and scale
        (input_format, pixel_scale), then (x - pixel_mean) / pixel_std."""
        if self.input_format == "BGR":
            image = image.flip(0)
        if self.pixel_scale != input_scale:
            image = image * (self.pixel_scale / input_scale)
        return (image - self.pixel_mean.to(image)) / self.pixel_std.to(image)

    def preprocess(self, images: list[Tensor], targets: list[dict] | None = None):
        """Resize, normalise (in the order and with the resampling of self.resize), pad. Returns (batch
        Tensor[N, 3, Hp, Wp], image sizes [(h, w)], targets in the resized coordinates; masks stay at the input
        resolution with "mask_scale" (input / resized, x and y))."""
        sizes, out_t, processed = [], [], []
        for i, im in enumerate(images):
            if self.training:
                j = int(torch.randint(len(self.min_size_train), (1,)).item()) if len(self.min_size_train) > 1 else 0
                min_size, max_size = self.min_size_train[j], self.max_size_train
            else:
                min_size, max_size = self.min_size_test, self.max_size_test
            small = None
            if targets is not None:
                t = targets[i]
                boxes = t["boxes"].to(im.device, torch.float32)
                keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
                if "iscrowd" in t:
                    keep &= t["iscrowd"].to(im.device) == 0
                keep = torch.where(keep)[0]
                small = {"boxes": boxes[keep]}
                if "keypoints" in t:
                    small["keypoints"] = t["keypoints"].to(im.device, torch.float32)[keep]
            h0, w0 = im.shape[-2:]
            dtype = im.dtype
            if self.resize == "torchvision":    # torchvision normalises first, then resizes
                im, small = resize_shortest_edge(self.normalize(im), small, min_size, max_size, mode="torchvision")
            elif self.resize == "detectron2":   # uint8 out of PIL, 0..255
                im, small = resize_shortest_edge(im, small, min_size, max_size, mode="detectron2")
                im = self.normalize(im.to(dtype), 255.0)
            else:
                im, small = resize_shortest_edge(im, small, min_size, max_size)
                im = self.normalize(im)
            h, w = im.shape[-2:]
            sizes.append((h0, w0))
            if targets is not None:
                small["labels"] = t["labels"].to(im.device, torch.int64)[keep]
                if "masks" in t:
                    small["masks"] = t["masks"].to(im.device)[keep]
                    small["mask_scale"] = (w0 / w, h0 / h)
                out_t.append(small)
            processed.append(im)
        batch, image_sizes = batch_images(processed, self.size_divisibility)
        return batch, image_sizes, (out_t if targets is not None else None), sizes

    # ---- forward ----------------------------------------------------------------------------------

    def to_model_layout(self, batch: Tensor) -> Tensor:
        """The padded batch in the memory layout of the convolutions (see channels_last)."""
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch

    def forward(self, images: list[Tensor], targets: list[dict] | None = None, *, mask_format: str = "prob"):
        check_mask_format(mask_format)
        self.check_inputs(images, targets)
        batch, image_sizes, targets, input_sizes = self.preprocess(list(images), targets)
        batch = self.to_model_layout(batch)
        if not self.training:
            return self.inference(batch, image_sizes, input_sizes, mask_format=mask_format)
        feats = self.backbone(batch)
        proposals, counts, losses = self.rpn(batch.shape[-2:], feats, image_sizes, [t["boxes"] for t in targets])
        proposals = [p[:c] for p, c in zip(proposals, counts.tolist())]
        losses.update(self.roi_heads(feats, proposals, image_sizes, targets))
        return losses

    # ---- inference --------------------------------------------------------------------------------

    @torch.no_grad()
    def inference(self, batch: Tensor, image_sizes, input_sizes, *, mask_format: str = "prob",
                  stages=None) -> list[dict]:
        """The eval path on a preprocessed batch: the networks, and between them the three stages.

        Args:
            batch (Tensor[N, 3, Hp, Wp]): normalised, padded, in the model's layout (see preprocess).
            image_sizes: (h, w) of each resized image in the batch; input_sizes: (h0, w0) of each input image.
            mask_format: see the class doc.
            stages: what runs the three stages: an object with proposal_stage, detection_stage and result_stage
                taking this model's arguments (e.g. the C++ inference graph); None: this model's torch reference.
        """
        rh = self.roi_heads
        st = self if stages is None else stages
        feats = self.backbone(batch)
        objectness, deltas, anchors = self.rpn.predict(batch.shape[-2:], feats)
        proposals, counts, box_features = st.proposal_stage(objectness, deltas, anchors, feats, image_sizes)
        class_logits, box_regression = rh.box_head_outputs(box_features)
        dets, mask_features, keypoint_features = st.detection_stage(class_logits, box_regression, proposals,
                                                                    counts, feats, image_sizes)
        mask_logits = None if mask_features is None else rh.mask_logits(mask_features)
        keypoint_logits = None if keypoint_features is None else rh.keypoint_logits(keypoint_features)
        return st.result_stage(dets, mask_logits, keypoint_logits, image_sizes, input_sizes, mask_format=mask_format)

    @torch.no_grad()
    def proposal_stage(self, objectness: list[Tensor], deltas: list[Tensor], anchors: list[Tensor],
                       feats: list[Tensor], image_sizes) -> tuple[Tensor, Tensor, Tensor]:
        """Stage 1: RPN outputs -> proposals and their pooled box features.

        Args:
            objectness (list of Tensor[N, R_l]), deltas (list of Tensor[N, R_l, 4]), anchors (list of
                Tensor[R_l, 4]): RPN.predict per feature level.
            feats: the backbone's feature maps; image_sizes: (h, w) of each resized image.
        Returns: proposals Tensor[N, P, 4] (P = rpn post_nms_top_n, rows at or past counts[i] zero), counts
            Tensor[N], box_features Tensor[R, C, S, S] of the valid proposals image after image (R = counts.sum()).
        """
        proposals, counts = self.rpn.generate_proposals(objectness, deltas, anchors, image_sizes)
        total = int(counts.sum())    # host sync: the box head runs on the valid proposals only
        box_features = self.roi_heads.box_pooler(feats, rois_from_padded(proposals, counts, total))
        return proposals, counts, box_features

    @torch.no_grad()
    def detection_stage(self, class_logits: Tensor, box_regression: Tensor, proposals: Tensor, counts: Tensor,
                        feats: list[Tensor], image_sizes) -> tuple[Detections, Tensor | None, Tensor | None]:
        """Stage 2: box-head outputs -> detections and the pooled features of the mask and keypoint heads.

        Args:
            class_logits (Tensor[R, C + 1]), box_regression (Tensor[R, 4 (C + 1)]): the box head on stage 1's
                box_features.
            proposals (Tensor[N, P, 4]), counts (Tensor[N]): stage 1's.
            feats, image_sizes: as for stage 1.
        Returns: Detections (boxes Tensor[N, D, 4], scores / labels Tensor[N, D], counts Tensor[N]; D =
            detections_per_image) in the resized images, then mask_features Tensor[R', C, S, S] and
            keypoint_features Tensor[R', C, S', S'] of the valid detections image after image (None for a
            branch that is off). The roi_heads' refiners (none in the paper) run before the pooling.
        """
        rh = self.roi_heads
        dets = rh.detections_from_box_outputs(class_logits, box_regression, proposals, counts, image_sizes)
        dets = rh.refine_detections(RoIPredictor(rh, feats), dets, image_sizes)
        mask_features, keypoint_features = rh.detection_features(feats, dets)
        return dets, mask_features, keypoint_features

    @torch.no_grad()
    def result_stage(self, dets: Detections, mask_logits: Tensor | None, keypoint_logits: Tensor | None,
                     image_sizes, input_sizes, *, mask_format: str = "prob") -> list[dict]:
        """Stage 3: head outputs -> per-image results in the input images' coordinates.

        Args:
            dets: stage 2's.
            mask_logits (Tensor[R', C', M, M]), keypoint_logits (Tensor[R', K, S, S]): the mask / keypoint heads
                on stage 2's features (None for a branch that is off).
            image_sizes: (h, w) of each resized image; input_sizes: (h0, w0) of each input image.
            mask_format: see the class doc.
        Returns: one dict per image (see the class doc).
        """
        dtype = dets.boxes.dtype
        probs = heatmaps = None
        if mask_logits is not None:
            labels = pack(dets.labels, dets.counts, mask_logits.shape[0])
            probs = mask_probs(mask_logits.to(dtype), labels, self.roi_heads.mask_loss_type)
        if keypoint_logits is not None:
            heatmaps = keypoint_logits.to(dtype)
        return self.postprocess(dets, image_sizes, input_sizes, mask_probs=probs, keypoint_heatmaps=heatmaps,
                                mask_format=mask_format)

    def postprocess(self, dets: Detections, image_sizes, input_sizes, *, mask_probs: Tensor | None = None,
                    keypoint_heatmaps: Tensor | None = None, mask_format: str = "prob") -> list[dict]:
        """postprocess.detector_results with this model's mask paste, keypoint score and output clipping."""
        return detector_results(dets, image_sizes, input_sizes, mask_probs=mask_probs,
                                keypoint_heatmaps=keypoint_heatmaps, mask_format=mask_format,
                                aligned=self.mask_paste == "aligned", keypoint_score=self.roi_heads.keypoint_score,
                                inclusive=self.mask_threshold_inclusive, clip=self.clip_output)


def _contiguous_state_dict(module, state_dict, prefix, local_metadata):
    for k, v in state_dict.items():
        if isinstance(v, Tensor) and not v.is_contiguous():
            state_dict[k] = v.contiguous()


def build_roi_heads(cfg, in_channels: int, strides, res5: tuple[nn.Module, int] | None = None) -> RoIHeads:
    """The RoI heads a Config describes: RoIHeads (the paper), or CascadeRoIHeads with
    roi_heads.cascade_iou_thresholds; with the refinements of the detections at inference in the order they
    apply: test_box_refine passes of the box head, one pass of each cascade stage, mask-derived box sides."""
    r = cfg.model.roi_heads
    thresholds = tuple(r.cascade_iou_thresholds)
    box_refine = IterativeBoxRefinement(r.test_box_refine)
    mask_box = MaskBoxRefinement(r.test_mask_box, r.test_mask_box_expand)
    if mask_box.weight > 0 and not cfg.model.mask.enabled:
        raise ValueError("test_mask_box > 0 needs the mask head")
    refiners = [box_refine] if box_refine.passes else []
    if thresholds:
        refiners.append(CascadeRefinement(len(thresholds)))
    if mask_box.weight > 0:
        refiners.append(mask_box)
    cls = CascadeRoIHeads if thresholds else RoIHeads
    return cls.from_config(cfg, in_channels, strides, res5, refiners=refiners)


def build_model(cfg) -> MaskRCNN:
    """The trainable model a Config describes (see mrcnn_fast.config). Evaluate it through
    inference_model(model, cfg), which adds the config's test-time augmentation."""
    model = MaskRCNN.from_config(cfg)
    inference_model(model, cfg)    # the inference-only settings fail here, not at the first evaluation
    return model


def inference_model(model: MaskRCNN, cfg) -> nn.Module:
    """The model to run a config's MaskRCNN with at inference: FlipTTA(model) when roi_heads.test_flip is set,
    else model itself. The wrapper shares the model's modules (load weights into the model, wrap, evaluate) and
    takes the same call: wrapper(images, mask_format=...)."""
    flip = cfg.model.roi_heads.test_flip
    if not isinstance(flip, bool):
        raise ValueError(f"test_flip must be true or false, got {flip!r}")
    return FlipTTA.from_config(cfg, model) if flip else model
