"""Backbones: torchvision ResNet state-dict compatibility, FrozenBN, freezing, FPN."""
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import misc as tv_misc
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork as TVFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool as TVLastLevelMaxPool

from _model_utils import tiny_cfg
from mrcnn_fast.config import get_config
from mrcnn_fast.modeling import Backbone, FeaturePyramidNetwork, FrozenBatchNorm2d, LastLevelMaxPool, ResNet
from mrcnn_fast.modeling.backbone import resnet_state_dict_to_c4

RETURN = {"layer1": "res2", "layer2": "res3", "layer3": "res4", "layer4": "res5"}


def _randomise_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, tv_misc.FrozenBatchNorm2d)):
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.1
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


@pytest.mark.parametrize("name,norm", [("resnet18", "BN"), ("resnet50", "FrozenBN")])
def test_torchvision_state_dict_loads_and_matches(name, norm):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)(weights=None).eval()
    _randomise_bn(tv)
    ours = ResNet(name, norm=norm, freeze_at=0).eval()
    sd = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    missing, unexpected = ours.load_state_dict(sd, strict=True) or ([], [])
    assert not missing and not unexpected
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    expect = IntermediateLayerGetter(tv.double(), RETURN)(x)
    got = ours.double()(x)
    assert list(got) == ["res2", "res3", "res4", "res5"]
    for k in got:
        torch.testing.assert_close(got[k], expect[k], rtol=1e-9, atol=1e-9)
    assert got["res5"].shape[-2:] == (2, 3)


def test_training_gradients_match_torchvision():
    """Training mode (batch-statistics BN): every parameter's and the input's gradient equals torchvision's
    ResNet-18 with the same weights (the stem applies its ReLU after the max-pool, which must not change
    them). A negative stem BN bias makes whole 3x3 windows <= 0, where the two orders must agree."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None).train()
    _randomise_bn(tv)
    tv.bn1.bias.data -= 1.5
    tv.double()
    ours = ResNet("resnet18", norm="BN", freeze_at=0).double().train()
    ours.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    expect = IntermediateLayerGetter(tv, RETURN)(xa)
    got = ours(xb)
    up = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in expect.items()}
    sum((expect[k] * up[k]).sum() for k in up).backward()
    sum((got[k] * up[k]).sum() for k in up).backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-9, atol=1e-12)
    tv_params = dict(tv.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, tv_params[name].grad, rtol=1e-9, atol=1e-12, msg=name)
    stem = torch.relu(tv.bn1(tv.conv1(x)))
    assert (torch.nn.functional.max_pool2d(stem, 3, 2, 1) == 0).float().mean() > 0.05  # windows all <= 0 occur


@pytest.mark.parametrize("name", ["resnet34", "resnet101", "resnext101_32x8d"])
def test_parameter_names_and_shapes_match_torchvision(name):
    tv = getattr(torchvision.models, name)(weights=None).state_dict()
    ours = ResNet(name, norm="FrozenBN", freeze_at=2).state_dict()
    tv = {k: v.shape for k, v in tv.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert {k: v.shape for k, v in ours.items()} == tv


def test_frozen_bn_equals_eval_batchnorm_and_loads_bn_state():
    bn = nn.BatchNorm2d(8).eval()
    _randomise_bn(bn)
    fbn = FrozenBatchNorm2d(8)
    fbn.load_state_dict(bn.state_dict())      # num_batches_tracked is accepted and dropped
    assert set(fbn.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    assert not list(fbn.parameters())
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(fbn(x), bn(x))
    conv = FrozenBatchNorm2d.convert(nn.Sequential(nn.Conv2d(3, 8, 1), bn))
    assert isinstance(conv[1], FrozenBatchNorm2d)
    torch.testing.assert_close(conv[1](x), bn(x))


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 5])
def test_freeze_at(freeze_at):
    r = ResNet("resnet18", norm="BN", freeze_at=freeze_at, width=16)
    parts = ["conv1", "layer1", "layer2", "layer3", "layer4"]
    for i, part in enumerate(parts):
        frozen = i < freeze_at
        mods = [r.conv1, r.bn1] if part == "conv1" else [getattr(r, part)]
        assert all(p.requires_grad != frozen for mod in mods for p in mod.parameters())
        bns = [m for mod in mods for m in mod.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
        assert bns and all(isinstance(m, FrozenBatchNorm2d) == frozen for m in bns)
    with pytest.raises(ValueError, match="freeze_at"):
        ResNet("resnet18", freeze_at=6)
    with pytest.raises(ValueError, match="unknown backbone"):
        ResNet("resnet7")
    with pytest.raises(ValueError, match="norm"):
        ResNet("resnet18", norm="LN")


def test_fpn_matches_torchvision_and_shapes():
    torch.manual_seed(0)
    chans = [16, 32, 64, 128]
    tv = TVFPN(chans, 24, extra_blocks=TVLastLevelMaxPool())
    ours = FeaturePyramidNetwork(chans, 24, LastLevelMaxPool())
    ours.load_state_dict(tv.state_dict())   # same names: inner_blocks.i.0.*, layer_blocks.i.0.*
    feats = [torch.randn(2, c, 40 // 2 ** i, 56 // 2 ** i) for i, c in enumerate(chans)]
    feats[-1] = torch.randn(2, 128, 5, 7)
    expect = list(tv({str(i): f for i, f in enumerate(feats)}).values())
    got = ours(feats)
    assert len(got) == 5
    for a, b in zip(got, expect):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert got[-1].shape[-2:] == (3, 4)


def test_backbone_from_config_fpn_and_c4():
    cfg = tiny_cfg()
    b = Backbone.from_config(cfg)
    x = torch.randn(1, 3, 128, 160)
    outs = b(x)
    assert b.strides == [4, 8, 16, 32, 64]
    assert [tuple(o.shape) for o in outs] == [(1, 32, 128 // s, 160 // s) for s in (4, 8, 16, 32)] + [(1, 32, 2, 3)]
    c4 = get_config("r50_c4", {"model": {"backbone": {"name": "resnet18", "width": 16}}})
    b4 = Backbone.from_config(c4)
    assert not hasattr(b4.body, "layer4") and b4.strides == [16] and b4.out_channels == 64
    (o,) = b4(x)
    assert o.shape == (1, 64, 8, 10)


def test_c4_state_dict_split():
    tv = torchvision.models.resnet18(weights=None).state_dict()
    trunk, res5 = resnet_state_dict_to_c4(tv)
    r = ResNet("resnet18", norm="BN", freeze_at=0, with_res5=False)
    r.load_state_dict(trunk)
    layer4 = ResNet("resnet18", norm="BN", freeze_at=0).layer4
    layer4.load_state_dict(res5)


@pytest.mark.parametrize("fpn", [True, False])
def test_model_loads_imagenet_style_backbone_weights(fpn):
    from mrcnn_fast.modeling import build_model

    cfg = get_config("small_cpu" if fpn else "r50_c4", {"model": {"backbone": {"name": "resnet18", "norm": "FrozenBN"},
                                                                  "roi_heads": {"num_classes": 3}}})
    model = build_model(cfg)
    tv = torchvision.models.resnet18(weights=None)
    _randomise_bn(tv)
    model.load_backbone_state_dict(tv.state_dict())
    res5 = model.backbone.body.layer4 if fpn else model.roi_heads.box_head.res5
    torch.testing.assert_close(res5[1].conv2.weight, tv.layer4[1].conv2.weight)
    torch.testing.assert_close(model.backbone.body.bn1.running_var, tv.bn1.running_var)
    with pytest.raises(RuntimeError):
        model.load_backbone_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("layer2.")})
