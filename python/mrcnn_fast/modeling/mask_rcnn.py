"""The whole Mask R-CNN: preprocessing, backbone, RPN, RoI heads, post-processing to the input size."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..data.transforms import batch_images, resize_shortest_edge
from .backbone import Backbone, build_res5_head
from .roi_heads import RoIHeads, hflip_per_image
from .rpn import RPN

MASK_FORMATS = ("prob", "rle")
MASK_PASTES = ("aligned", "torchvision")


class MaskRCNN(nn.Module):
    """Mask R-CNN (He et al. 2017) with an FPN or C4 head.

    forward(images, targets=None):
        images: list of Tensor[3, H, W] float RGB in [0, 1] (sizes may differ).
        targets (training): list of dicts with "boxes" Tensor[G, 4] xyxy pixels, "labels" Tensor[G] int64 in 1..C,
            "masks" Tensor[G, H, W] (when the mask head is on), "keypoints" Tensor[G, K, 3] (keypoint head),
            optionally "iscrowd" Tensor[G] (crowd instances are dropped).
        Training returns a dict of scalar losses; inference a list of dicts per image in the input image's
        coordinates: boxes [D, 4], labels [D], scores [D], masks [D, 1, H, W] float probabilities (or
        "masks_rle" when mask_format == "rle"), keypoints [D, K, 3] and keypoints_scores [D, K].

    Args:
        backbone, rpn, roi_heads: the parts.
        pixel_mean, pixel_std: per-channel normalisation of the [0, 1] RGB input.
        min_size_train (tuple): shortest side, one chosen at random per image in training.
        max_size_train, min_size_test, max_size_test: see resize_shortest_edge.
        size_divisibility: the batch is zero-padded to a multiple of this.
        mask_format: "prob" or "rle" (inference output of the masks, also settable as an attribute).
        mask_paste: how the predicted masks are pasted into the image (also settable as an attribute):
            "aligned" (detectron2's convention: the mask covers its box exactly, as the RoIAlign(aligned=True)
            mask targets do) or "torchvision" (torchvision's paste_masks_in_image bit for bit, for output parity;
            misaligned with the targets by up to ~1 px). See ops.paste_masks_in_image.
        channels_last: NHWC activations and conv weights (oneDNN / cuDNN run NHWC convolutions, pooling and
            batch norm without layout reorders). state_dict() still returns contiguous (NCHW) tensors.
    """

    def __init__(self, backbone: Backbone, rpn: RPN, roi_heads: RoIHeads, *, pixel_mean=(0.485, 0.456, 0.406),
                 pixel_std=(0.229, 0.224, 0.225), min_size_train=(800,), max_size_train: int = 1333,
                 min_size_test: int = 800, max_size_test: int = 1333, size_divisibility: int = 32,
                 mask_format: str = "prob", mask_paste: str = "aligned", channels_last: bool = False):
        super().__init__()
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
        self.mask_format = mask_format
        self.mask_paste = mask_paste
        self._channels_last = False
        self.channels_last = channels_last
        # checkpoints (safetensors) need contiguous tensors whatever the layout used for speed
        self.register_state_dict_post_hook(_contiguous_state_dict)

    @classmethod
    def from_config(cls, cfg) -> "MaskRCNN":
        m = cfg.model
        backbone = Backbone.from_config(cfg)
        rpn = RPN.from_config(cfg, backbone.out_channels)
        if len(backbone.strides) != len(m.anchors.sizes):
            raise ValueError(f"model.anchors.sizes has {len(m.anchors.sizes)} levels but the backbone produces "
                             f"{len(backbone.strides)} feature maps")
        paste = getattr(m.mask, "paste", "aligned")
        if paste not in MASK_PASTES:
            raise ValueError(f"model.mask.paste must be one of {MASK_PASTES}, got {paste!r}")
        res5 = None if m.fpn.enabled else build_res5_head(cfg)
        roi_heads = RoIHeads.from_config(cfg, backbone.out_channels, backbone.strides, res5)
        i = cfg.input
        return cls(backbone, rpn, roi_heads, pixel_mean=m.pixel_mean, pixel_std=m.pixel_std,
                   min_size_train=i.min_size_train, max_size_train=i.max_size_train, min_size_test=i.min_size_test,
                   max_size_test=i.max_size_test, size_divisibility=i.size_divisibility, mask_paste=paste,
                   channels_last=getattr(m, "channels_last", False))

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
    def mask_format(self) -> str:
        return self._mask_format

    @mask_format.setter
    def mask_format(self, value: str) -> None:
        if value not in MASK_FORMATS:
            raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {value!r}")
        self._mask_format = value

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

    def _check_inputs(self, images, targets):
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

    def preprocess(self, images: list[Tensor], targets: list[dict] | None = None):
        """Resize, normalise, pad. Returns (batch Tensor[N, 3, Hp, Wp], image sizes [(h, w)], targets in the
        resized coordinates; masks stay at the input resolution with "mask_scale" (input / resized, x and y))."""
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
            im, small = resize_shortest_edge(im, small, min_size, max_size)
            h, w = im.shape[-2:]
            sizes.append((h0, w0))
            if targets is not None:
                small["labels"] = t["labels"].to(im.device, torch.int64)[keep]
                if "masks" in t:
                    small["masks"] = t["masks"].to(im.device)[keep]
                    small["mask_scale"] = (w0 / w, h0 / h)
                out_t.append(small)
            processed.append((im - self.pixel_mean.to(im)) / self.pixel_std.to(im))
        batch, image_sizes = batch_images(processed, self.size_divisibility)
        return batch, image_sizes, (out_t if targets is not None else None), sizes

    # ---- forward ----------------------------------------------------------------------------------

    def forward(self, images: list[Tensor], targets: list[dict] | None = None):
        self._check_inputs(images, targets)
        batch, image_sizes, targets, orig_sizes = self.preprocess(list(images), targets)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        feats = self.backbone(batch)
        gt_boxes = [t["boxes"] for t in targets] if targets is not None else None
        proposals, losses = self.rpn(batch.shape[-2:], feats, image_sizes, gt_boxes)
        if self.training:
            losses.update(self.roi_heads(feats, proposals, image_sizes, targets))
            return losses
        flipped = None
        if self.roi_heads.test_flip:
            flipped, proposals = self._flip_view(batch, image_sizes, proposals)
        results = self.roi_heads(feats, proposals, image_sizes, flipped_feats=flipped)
        return self.postprocess(results, image_sizes, orig_sizes)

    @torch.no_grad()
    def _flip_view(self, batch: Tensor, image_sizes, proposals: list[Tensor]):
        """Test-time flip: the features of the batch with every image mirrored within its own width (the padding
        stays on the right, where the backbone saw it), and each image's proposals joined by the mirror's
        proposals mapped back, so that both views nominate boxes and the result is symmetric in the two."""
        mirrored = batch.clone()
        for i, (h, w) in enumerate(image_sizes):
            mirrored[i, :, :h, :w] = batch[i, :, :h, :w].flip(-1)
        feats = self.backbone(mirrored)
        props, _ = self.rpn(batch.shape[-2:], feats, image_sizes, None)
        joined = [torch.cat([p, q]) for p, q in zip(proposals, hflip_per_image(props, image_sizes))]
        return feats, joined

    @torch.no_grad()
    def postprocess(self, results: list[dict], image_sizes, orig_sizes) -> list[dict]:
        out = []
        for r, (h, w), (h0, w0) in zip(results, image_sizes, orig_sizes):
            rx, ry = w0 / w, h0 / h
            boxes = r["boxes"] * r["boxes"].new_tensor([rx, ry, rx, ry])
            o = {"boxes": boxes, "labels": r["labels"], "scores": r["scores"]}
            if "mask_probs" in r:
                mp = r["mask_probs"]
                aligned = self.mask_paste == "aligned"
                if self.mask_format == "rle":
                    o["masks_rle"] = ops.paste_masks_rle(mp, boxes, (h0, w0), aligned=aligned) if mp.shape[0] else []
                elif mp.shape[0]:
                    o["masks"] = ops.paste_masks_in_image(mp, boxes, (h0, w0), aligned=aligned)
                else:
                    o["masks"] = mp.new_zeros((0, 1, h0, w0))
            if "keypoints" in r:
                kp = r["keypoints"].clone()
                kp[..., 0] *= rx
                kp[..., 1] *= ry
                o["keypoints"] = kp
                o["keypoints_scores"] = r["keypoints_scores"]
            out.append(o)
        return out


def _contiguous_state_dict(module, state_dict, prefix, local_metadata):
    for k, v in state_dict.items():
        if isinstance(v, Tensor) and not v.is_contiguous():
            state_dict[k] = v.contiguous()


def build_model(cfg) -> MaskRCNN:
    """The model described by a Config (see mrcnn_fast.config)."""
    return MaskRCNN.from_config(cfg)
