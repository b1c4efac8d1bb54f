"""ResNet / ResNeXt backbones and the feature pyramid.

Parameter names follow torchvision's ResNet (conv1, bn1, layer1..layer4, downsample.0/1, ...) and its
FeaturePyramidNetwork (inner_blocks.i.0, layer_blocks.i.0), so torchvision state dicts load with
`load_state_dict` unchanged.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .layers import Conv1x1

# name -> (block, blocks per stage, groups, width per group)
_ARCHS = {
    "resnet18": ("basic", (2, 2, 2, 2), 1, 64),
    "resnet34": ("basic", (3, 4, 6, 3), 1, 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 1, 64),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 1, 64),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": ("bottleneck", (3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": ("bottleneck", (3, 4, 23, 3), 32, 8),
}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (buffers named like torchvision's)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # nn.BatchNorm2d state dicts carry a step counter that has no meaning here.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1).to(x.dtype) + shift.reshape(1, -1, 1, 1).to(x.dtype)

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Returns module with every BatchNorm2d inside replaced by a FrozenBatchNorm2d of the same statistics."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            frozen = cls(module.num_features, module.eps)
            if module.affine:
                frozen.weight.copy_(module.weight.detach())
                frozen.bias.copy_(module.bias.detach())
            if module.track_running_stats:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
            return frozen
        for name, child in module.named_children():
            new = cls.convert(child)
            if new is not child:
                setattr(module, name, new)
        return module

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


NORMS = ("FrozenBN", "BN", "GN")
GN_GROUPS = 32


def make_norm(norm: str, channels: int, eps: float = 1e-5) -> nn.Module:
    """The normalisation layer `norm` names over `channels` channels: "FrozenBN" (FrozenBatchNorm2d), "BN"
    (nn.BatchNorm2d) or "GN" (nn.GroupNorm with 32 groups)."""
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(channels, eps)
    if norm == "BN":
        return nn.BatchNorm2d(channels, eps=eps)
    if norm == "GN":
        if channels % GN_GROUPS:
            raise ValueError(f"norm 'GN' needs channels divisible by {GN_GROUPS}, got {channels}")
        return nn.GroupNorm(GN_GROUPS, channels, eps=eps)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def make_optional_norm(norm: str, channels: int, eps: float = 1e-5) -> nn.Module | None:
    """make_norm, or None for norm "" (no normalisation: the layer before it keeps its bias)."""
    return None if norm == "" else make_norm(norm, channels, eps)


def _conv3x3(cin, cout, stride=1, groups=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def _conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, *, groups=1, base_width=64, norm="BN",
                 stride_in_1x1=False, norm_eps=1e-5):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and base_width=64")
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = make_norm(norm, planes, norm_eps)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = make_norm(norm, planes, norm_eps)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, *, groups=1, base_width=64, norm="BN",
                 stride_in_1x1=False, norm_eps=1e-5):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = _conv1x1(inplanes, width, s1)
        self.bn1 = make_norm(norm, width, norm_eps)
        self.conv2 = _conv3x3(width, width, s3, groups)
        self.bn2 = make_norm(norm, width, norm_eps)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = make_norm(norm, planes * self.expansion, norm_eps)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet/ResNeXt trunk returning C2..C5 (stride 4..32) as res2..res5.

    Args:
        depth_name: one of resnet18/34/50/101/152, resnext50_32x4d, resnext101_32x8d.
        norm: "FrozenBN", "BN" or "GN" (32 groups); norm_eps: the eps of every norm.
        freeze_at: 0 trains everything; 1 freezes the stem; k freezes the stem and the first k-1 stages.
            Frozen parts get FrozenBatchNorm2d (GroupNorm stays) and requires_grad=False.
        width: stem width (64 for the standard nets); stage i has width * 2**i planes.
        out_features: which of res2..res5 forward returns.
        with_res5: False drops layer4 from the trunk (the C4 head owns it).
    """

    def __init__(self, name: str = "resnet50", *, norm: str = "FrozenBN", freeze_at: int = 2, width: int = 64,
                 stride_in_1x1: bool = False, out_features=("res2", "res3", "res4", "res5"), with_res5: bool = True,
                 norm_eps: float = 1e-5):
        super().__init__()
        if name not in _ARCHS:
            raise ValueError(f"unknown backbone {name!r} (known: {', '.join(_ARCHS)})")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"freeze_at must be in 0..5, got {freeze_at}")
        kind, layers, groups, base_width = _ARCHS[name]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.name = name
        self.block = block
        self.norm = norm
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = make_norm(norm, width, norm_eps)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._inplanes = width
        self._opts = dict(groups=groups, base_width=base_width, norm=norm, stride_in_1x1=stride_in_1x1,
                          norm_eps=norm_eps)
        self.layer1 = self._make_layer(width, layers[0], 1)
        self.layer2 = self._make_layer(width * 2, layers[1], 2)
        self.layer3 = self._make_layer(width * 4, layers[2], 2)
        self.layer4 = self._make_layer(width * 8, layers[3], 2)
        self.out_channels = {f"res{i + 2}": width * 2 ** i * block.expansion for i in range(4)}
        self.strides = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
        self._init_weights()
        self.freeze(freeze_at)
        if not with_res5:
            del self.layer4
            out_features = tuple(f for f in out_features if f != "res5")
        self.out_features = tuple(out_features)
        for f in self.out_features:
            if f not in self.strides:
                raise ValueError(f"unknown out feature {f!r}")

    def _make_layer(self, planes, blocks, stride):
        downsample = None
        outp = planes * self.block.expansion
        if stride != 1 or self._inplanes != outp:
            downsample = nn.Sequential(_conv1x1(self._inplanes, outp, stride),
                                       make_norm(self._opts["norm"], outp, self._opts["norm_eps"]))
        mods = [self.block(self._inplanes, planes, stride, downsample, **self._opts)]
        self._inplanes = outp
        mods += [self.block(outp, planes, **self._opts) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def freeze(self, freeze_at: int) -> None:
        stages = [("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",)][:freeze_at]
        for names in stages:
            for n in names:
                mod = getattr(self, n)
                for p in mod.parameters():
                    p.requires_grad_(False)
                if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    setattr(self, n, FrozenBatchNorm2d.convert(mod))
                else:
                    FrozenBatchNorm2d.convert(mod)

    def _stem(self, x: Tensor) -> Tensor:
        """bn1 -> ReLU -> maxpool. relu(maxpool(.)) == maxpool(relu(.)) exactly, values and gradients (ReLU is
        monotonic and its gradient is 0 wherever the window max is <= 0), so the ReLU runs on the 4x smaller
        map; on the CPU all three run as one pass (ops.batch_norm_relu_max_pool: the normalised full-size map
        is never written, its gradient never zero-filled and scattered; bench/results/train_step.md)."""
        bn, pool = self.bn1, self.maxpool
        fusable = (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.dim() == 4
                   and type(pool) is nn.MaxPool2d and pool.dilation in (1, (1, 1)) and not pool.ceil_mode
                   and not pool.return_indices and x.shape[0] * x.shape[2] * x.shape[3] > 1)
        if not fusable or type(bn) not in (nn.BatchNorm2d, FrozenBatchNorm2d):
            return self.relu(pool(bn(x)))
        if type(bn) is nn.BatchNorm2d:
            (running_mean, running_var), kw = _batch_norm_args(bn)
        else:
            (running_mean, running_var), kw = (bn.running_mean, bn.running_var), dict(training=False, eps=bn.eps)
        return ops.batch_norm_relu_max_pool(x, bn.weight, bn.bias, running_mean, running_var, **kw,
                                            kernel_size=pool.kernel_size, stride=pool.stride, padding=pool.padding)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self._stem(self.conv1(x))
        out = {}
        for i, name in enumerate(("layer1", "layer2", "layer3", "layer4")):
            feat = f"res{i + 2}"
            if not hasattr(self, name):
                break
            x = getattr(self, name)(x)
            if feat in self.out_features:
                out[feat] = x
            if len(out) == len(self.out_features):
                break
        return out


def _batch_norm_args(bn: nn.BatchNorm2d):
    """(running_mean, running_var, training=, momentum=, eps=) exactly as nn.BatchNorm2d.forward passes them to
    F.batch_norm, including its step counter and cumulative average (momentum=None)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    training = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats
    return (bn.running_mean if keep else None, bn.running_var if keep else None), dict(
        training=training, momentum=factor, eps=bn.eps)


class LastLevelMaxPool(nn.Module):
    """P6 from P5 by a 1x1 max-pool with stride 2 (a strided slice: same values, no index bookkeeping)."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, ::2, ::2]


class FeaturePyramidNetwork(nn.Module):
    """Top-down pyramid (Lin et al.): lateral 1x1 + output 3x3 per level, nearest 2x upsampling.

    Args:
        in_channels_list: channels of C2..C5.
        out_channels: channels of every output level.
        extra_block: e.g. LastLevelMaxPool() for P6; None for none.
        norm: "" (convolutions with bias) | "BN" | "FrozenBN" | "GN": a norm after every lateral and output
            convolution, which then has no bias. The blocks are (conv[, norm]) sequences, torchvision's
            Conv2dNormActivation layout (inner_blocks.i.0 the conv, inner_blocks.i.1 the norm).
    Returns (forward): list of Tensor[N, out_channels, Hi, Wi], finest first (P2..P5[, P6]).
    """

    def __init__(self, in_channels_list, out_channels: int, extra_block: nn.Module | None = None, *,
                 norm: str = ""):
        super().__init__()
        bias = norm == ""

        def block(conv: nn.Conv2d) -> nn.Sequential:
            n = make_optional_norm(norm, out_channels)
            return nn.Sequential(conv) if n is None else nn.Sequential(conv, n)

        self.inner_blocks = nn.ModuleList(block(Conv1x1(c, out_channels, bias=bias)) for c in in_channels_list)
        self.layer_blocks = nn.ModuleList(
            block(nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias)) for _ in in_channels_list)
        self.extra_block = extra_block
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        last = self.inner_blocks[-1](feats[-1])
        outs = [self.layer_blocks[-1](last)]
        for i in range(len(feats) - 2, -1, -1):
            lateral = self.inner_blocks[i](feats[i])
            top_down = F.interpolate(last, size=lateral.shape[-2:], mode="nearest")
            last = lateral + top_down
            outs.insert(0, self.layer_blocks[i](last))
        if self.extra_block is not None:
            outs.append(self.extra_block(outs[-1]))
        return outs


class Backbone(nn.Module):
    """Trunk (+ FPN): images [N, 3, H, W] -> list of feature maps with their strides.

    With fpn=None the output is the trunk's out_features in order (C4 for the C4 model).
    """

    def __init__(self, body: ResNet, fpn: FeaturePyramidNetwork | None = None):
        super().__init__()
        self.body = body
        self.fpn = fpn
        if fpn is not None:
            self.strides = [body.strides[f] for f in body.out_features]
            if fpn.extra_block is not None:
                self.strides.append(self.strides[-1] * 2)
            self.out_channels = fpn.layer_blocks[0][0].out_channels
        else:
            self.strides = [body.strides[f] for f in body.out_features]
            self.out_channels = body.out_channels[body.out_features[-1]]

    @classmethod
    def from_config(cls, cfg) -> Backbone:
        m = cfg.model
        b = m.backbone
        if m.fpn.enabled:
            body = ResNet(b.name, norm=b.norm, freeze_at=b.freeze_at, width=b.width, stride_in_1x1=b.stride_in_1x1,
                          out_features=tuple(m.fpn.in_features), norm_eps=b.norm_eps)
            fpn = FeaturePyramidNetwork([body.out_channels[f] for f in body.out_features], m.fpn.out_channels,
                                        LastLevelMaxPool(), norm=m.fpn.norm)
            return cls(body, fpn)
        body = ResNet(b.name, norm=b.norm, freeze_at=b.freeze_at, width=b.width, stride_in_1x1=b.stride_in_1x1,
                      out_features=("res4",), with_res5=False, norm_eps=b.norm_eps)
        return cls(body, None)

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = list(self.body(x).values())
        return self.fpn(feats) if self.fpn is not None else feats


def build_res5_head(cfg) -> tuple[nn.Sequential, int]:
    """layer4 of the configured ResNet (for the C4 box head), with the backbone's norm and freezing rules."""
    b = cfg.model.backbone
    r = ResNet(b.name, norm=b.norm, freeze_at=b.freeze_at, width=b.width, stride_in_1x1=b.stride_in_1x1,
               norm_eps=b.norm_eps)
    return r.layer4, r.out_channels["res5"]


def resnet_state_dict_to_c4(state_dict: dict) -> tuple[OrderedDict, OrderedDict]:
    """Splits a torchvision ResNet state dict into (trunk, res5) parts for the C4 model."""
    trunk, res5 = OrderedDict(), OrderedDict()
    for k, v in state_dict.items():
        if k.startswith("fc."):
            continue
        if k.startswith("layer4."):
            res5[k[len("layer4."):]] = v
        else:
            trunk[k] = v
    return trunk, res5
