"""Box, mask and keypoint heads with their losses and target builders."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .backbone import make_optional_norm
from .layers import Conv1x1

# ---- box head ------------------------------------------------------------------------------------


def fc_over_map(x: Tensor, fc: nn.Linear) -> Tensor:
    """fc(x.flatten(1)) for x: Tensor[N, C, H, W] -> Tensor[N, fc.out_features].

    On the CPU it runs as one C x H x W convolution over the map, with the fc's weight viewed as
    [out, C, H, W] (the same products, summed in another order): torch's F.linear goes to a BLAS GEMM that on
    AMD EPYC uses no AVX-512, while oneDNN's convolution does (fc6 of the small_cpu box head, 512 RoIs, forward
    + backward: ~2x faster; bench/results/train_step.md), and it reads channels-last RoI features in place
    instead of copying them to NCHW order for the flatten. The parameters stay nn.Linear's, so checkpoints
    are unchanged. CUDA keeps the GEMM (cuBLAS)."""
    if x.dim() == 4 and x.device.type == "cpu" and x.shape[0] > 0 and fc.in_features == x[0].numel():
        return F.conv2d(x, fc.weight.reshape(fc.out_features, *x.shape[1:]), fc.bias).flatten(1)
    return fc(x.flatten(1))


class TwoMLPHead(nn.Module):
    """FPN box head: flatten -> fc6 -> ReLU -> fc7 -> ReLU (torchvision's names)."""

    def __init__(self, in_features: int, fc_dim: int = 1024):
        super().__init__()
        self.fc6 = nn.Linear(in_features, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.out_features = fc_dim
        for fc in (self.fc6, self.fc7):
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(fc_over_map(x, self.fc6))))


class ConvFCHead(nn.Module):
    """FPN box head with convolutions: num_conv x (3x3 conv [+ norm] + ReLU), flatten, num_fc x (fc + ReLU)
    (torchvision's v2 and detectron2's GN configs: 4 convs with a norm, 1 fc).

    Names: convs.i (without bias when normed), norms.i, fcs.j.

    Args:
        in_channels, resolution: the pooled features, Tensor[K, in_channels, resolution, resolution].
        conv_dim, num_conv: the convolutions; fc_dim, num_fc: the fully connected layers.
        norm: "" | "BN" | "FrozenBN" | "GN" after each convolution.
    forward: Tensor[K, C, S, S] -> Tensor[K, out_features] (fc_dim; the flattened map when num_fc is 0).
    """

    def __init__(self, in_channels: int, resolution: int, *, conv_dim: int = 256, num_conv: int = 4,
                 fc_dim: int = 1024, num_fc: int = 1, norm: str = ""):
        super().__init__()
        if num_conv < 0 or num_fc < 0 or num_conv + num_fc == 0:
            raise ValueError(f"the box head needs convs or fcs, got num_conv={num_conv}, num_fc={num_fc}")
        convs, norms = [], []
        c = in_channels
        for _ in range(num_conv):
            convs.append(nn.Conv2d(c, conv_dim, 3, padding=1, bias=norm == ""))
            n = make_optional_norm(norm, conv_dim)
            norms.append(n if n is not None else nn.Identity())
            c = conv_dim
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList(norms)
        f = c * resolution * resolution
        fcs = []
        for _ in range(num_fc):
            fcs.append(nn.Linear(f, fc_dim))
            f = fc_dim
        self.fcs = nn.ModuleList(fcs)
        self.out_features = f
        for m in self.convs:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        for fc in self.fcs:
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(norm(conv(x)))
        if not len(self.fcs):
            return x.flatten(1)
        x = F.relu(fc_over_map(x, self.fcs[0]))
        for fc in self.fcs[1:]:
            x = F.relu(fc(x))
        return x


def build_box_head(in_channels: int, resolution: int, *, conv_dim: int = 256, num_conv: int = 0,
                   fc_dim: int = 1024, num_fc: int = 2, norm: str = "") -> nn.Module:
    """The FPN box head: TwoMLPHead (fc6 / fc7, the paper's and torchvision v1's) for 0 convs and 2 fcs, else a
    ConvFCHead."""
    if num_conv == 0 and num_fc == 2:
        return TwoMLPHead(in_channels * resolution ** 2, fc_dim)
    return ConvFCHead(in_channels, resolution, conv_dim=conv_dim, num_conv=num_conv, fc_dim=fc_dim, num_fc=num_fc,
                      norm=norm)


class Res5Head(nn.Module):
    """C4 box head: res5 (ResNet layer4) on 14x14 pooled C4 features -> 7x7, then average pooling.

    forward returns (pooled Tensor[K, C], res5 output Tensor[K, C, 7, 7]); the mask head reuses the latter.
    """

    def __init__(self, res5: nn.Module, out_channels: int):
        super().__init__()
        self.res5 = res5
        self.out_features = out_channels

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = self.res5(x)
        return y.mean(dim=(2, 3)), y


class FastRCNNPredictor(nn.Module):
    """Class scores (C + 1, background 0) and class-specific box deltas (4 (C + 1))."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, 4 * (num_classes + 1))
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


def fast_rcnn_loss(class_logits: Tensor, box_regression: Tensor, labels: Tensor, reg_targets: Tensor,
                   beta: float = 1.0 / 9) -> tuple[Tensor, Tensor]:
    """Cross-entropy over all sampled RoIs; smooth-L1 on the GT class deltas of the positives, summed and
    divided by the number of sampled RoIs (torchvision's normalisation).

    Args:
        class_logits (Tensor[K, C+1]), box_regression (Tensor[K, 4 (C+1)]), labels (Tensor[K] int64),
        reg_targets (Tensor[K, 4]) (rows of negatives are ignored).
    """
    loss_cls = F.cross_entropy(class_logits, labels)
    pos = torch.where(labels > 0)[0]
    deltas = box_regression.reshape(box_regression.shape[0], -1, 4)[pos, labels[pos]]
    loss_box = F.smooth_l1_loss(deltas, reg_targets[pos], beta=beta, reduction="sum") / max(labels.numel(), 1)
    return loss_cls, loss_box


# ---- mask head -----------------------------------------------------------------------------------


class MaskFCNHead(nn.Module):
    """The paper's FCN mask head: num_convs x (3x3 conv [+ norm] + ReLU), 2x2 stride-2 deconv + ReLU, 1x1 conv to
    one mask per output channel. Output Tensor[K, num_outputs, 2R, 2R] for input Tensor[K, C, R, R].

    norm: "" | "BN" | "FrozenBN" | "GN" after each conv (torchvision's v2: BN), which then has no bias; the
    norms are `norms.i` (no parameters, nothing in the state dict, without a norm)."""

    def __init__(self, in_channels: int, conv_dim: int = 256, num_convs: int = 4, num_outputs: int = 81, *,
                 norm: str = ""):
        super().__init__()
        convs, norms = [], []
        c = in_channels
        for _ in range(num_convs):
            convs.append(nn.Conv2d(c, conv_dim, 3, padding=1, bias=norm == ""))
            n = make_optional_norm(norm, conv_dim)
            norms.append(n if n is not None else nn.Identity())
            c = conv_dim
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList(norms)
        self.deconv = nn.ConvTranspose2d(c, conv_dim, 2, stride=2)
        self.predictor = Conv1x1(conv_dim, num_outputs)
        for m in [*self.convs, self.deconv]:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, x: Tensor) -> Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(norm(conv(x)))
        return self.predictor(F.relu(self.deconv(x)))


class MaskMLPHead(nn.Module):
    """Table 2e's MLP mask head: flatten -> fc -> ReLU -> fc -> ReLU -> fc to num_outputs R x R masks."""

    def __init__(self, in_channels: int, pooler_resolution: int, hidden_dim: int = 1024, resolution: int = 28,
                 num_outputs: int = 81):
        super().__init__()
        self.resolution = resolution
        self.num_outputs = num_outputs
        self.fc1 = nn.Linear(in_channels * pooler_resolution ** 2, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.predictor = nn.Linear(hidden_dim, num_outputs * resolution ** 2)
        for fc in (self.fc1, self.fc2):
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.fc2(F.relu(fc_over_map(x, self.fc1))))
        return self.predictor(x).reshape(-1, self.num_outputs, self.resolution, self.resolution)


@torch.no_grad()
def mask_targets(gt_masks: Tensor, boxes: Tensor, matched: Tensor, size: int) -> Tensor:
    """Each GT mask cropped to its RoI and resampled to size x size (RoIAlign, aligned), thresholded at 0.5.

    Args:
        gt_masks (Tensor[G, H, W]): binary masks, any dtype.
        boxes (Tensor[P, 4]): RoIs in the masks' pixel coordinates.
        matched (Tensor[P]): GT index of each RoI.
    Returns: Tensor[P, size, size] bool.
    """
    if boxes.shape[0] == 0:
        return torch.zeros((0, size, size), dtype=torch.bool, device=boxes.device)
    bitmaps = gt_masks[:, None].to(torch.float32)
    rois = torch.cat([matched[:, None].to(torch.float32), boxes.to(torch.float32)], 1)
    return ops.roi_align(bitmaps, rois, (size, size), 1.0, 0, True)[:, 0] >= 0.5


def mask_loss(mask_logits: Tensor, labels: Tensor, targets: Tensor, loss_type: str = "sigmoid") -> Tensor:
    """Mask loss over positive RoIs.

    sigmoid (the paper): per-pixel binary cross-entropy on the channel of the RoI's GT class only.
    softmax (Table 2b): per-pixel multinomial cross-entropy over the channels, channel 0 being background:
    target = GT class on mask pixels, 0 elsewhere.

    Args:
        mask_logits (Tensor[P, C', M, M]): C' = C + 1 (class-specific) or 1 / 2 (class-agnostic sigmoid / softmax).
        labels (Tensor[P]) GT classes, targets (Tensor[P, M, M]) bool.
    """
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0
    p = mask_logits.shape[0]
    agnostic = mask_logits.shape[1] <= (1 if loss_type == "sigmoid" else 2)
    if loss_type == "sigmoid":
        chan = torch.zeros_like(labels) if agnostic else labels
        logits = mask_logits[torch.arange(p, device=labels.device), chan]
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))
    if loss_type == "softmax":
        cls = torch.ones_like(labels) if agnostic else labels
        t = torch.where(targets, cls[:, None, None], torch.zeros_like(cls)[:, None, None])
        return F.cross_entropy(mask_logits, t)
    raise ValueError(f"loss_type must be 'sigmoid' or 'softmax', got {loss_type!r}")


# ---- keypoint head -------------------------------------------------------------------------------


class KeypointHead(nn.Module):
    """num_convs x (3x3 conv + ReLU), a 4x4 stride-2 deconv to one heatmap per keypoint, then bilinear 2x
    upsampling (the paper's 56x56 from 14x14 pooled features). Output Tensor[K, num_keypoints, 4R, 4R]."""

    def __init__(self, in_channels: int, conv_dim: int = 512, num_convs: int = 8, num_keypoints: int = 17):
        super().__init__()
        convs = []
        c = in_channels
        for _ in range(num_convs):
            convs.append(nn.Conv2d(c, conv_dim, 3, padding=1))
            c = conv_dim
        self.convs = nn.ModuleList(convs)
        self.kps_score_lowres = nn.ConvTranspose2d(c, num_keypoints, 4, stride=2, padding=1)
        for m in [*self.convs, self.kps_score_lowres]:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = F.relu(conv(x))
        x = self.kps_score_lowres(x)
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


@torch.no_grad()
def keypoint_targets(keypoints: Tensor, boxes: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """One-hot heatmap targets as linear indices into the size x size RoI grid (torchvision's quantisation:
    floor((x - x1) * size / (x2 - x1)); a keypoint exactly on the right/bottom edge goes to the last cell).

    Args:
        keypoints (Tensor[P, K, 3]) (x, y, visibility) in image coordinates; boxes (Tensor[P, 4]).
    Returns: (Tensor[P, K] int64 y * size + x, Tensor[P, K] bool valid: visible and inside the RoI).
    """
    x1, y1, x2, y2 = (boxes[:, i:i + 1] for i in range(4))
    kx, ky = keypoints[..., 0], keypoints[..., 1]
    x = ((kx - x1) * (size / (x2 - x1))).floor().to(torch.int64)
    y = ((ky - y1) * (size / (y2 - y1))).floor().to(torch.int64)
    x = torch.where(kx == x2, size - 1, x)
    y = torch.where(ky == y2, size - 1, y)
    valid = (x >= 0) & (y >= 0) & (x < size) & (y < size) & (keypoints[..., 2] > 0)
    return torch.where(valid, y * size + x, 0), valid


def keypoint_loss(keypoint_logits: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
    """Softmax cross-entropy over the M*M heatmap of each visible keypoint, averaged over them.

    keypoint_logits (Tensor[P, K, M, M]), targets / valid (Tensor[P, K]).
    """
    p, k, h, w = keypoint_logits.shape
    valid = valid.reshape(-1)
    if p == 0 or not bool(valid.any()):
        return keypoint_logits.sum() * 0
    logits = keypoint_logits.reshape(p * k, h * w)[valid]
    return F.cross_entropy(logits, targets.reshape(-1)[valid])
