"""optimize_for_inference / fold_frozen_batchnorm: the folded, channels-last, reduced-precision model keeps the
eval model's detections (fp32: the same; bf16: close, float32 outputs) and its call signatures."""
import copy

import pytest
import torch
from torch import nn

from _model_utils import mask_iou, shapes_batch, tiny_cfg
from mrcnn_fast.engine.trainer import cpu_has_native_bf16
from mrcnn_fast.modeling import FrozenBatchNorm2d, build_model
from mrcnn_fast.modeling.backbone import ResNet
from mrcnn_fast.modeling.fuse import fold_frozen_batchnorm, network_modules, optimize_for_inference

needs_bf16 = pytest.mark.skipif(not cpu_has_native_bf16(), reason="the CPU has no native bfloat16")


def _randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial statistics in every frozen norm (a fresh one is the identity, which folds trivially)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                c = m.running_mean.shape[0]
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)


def _model(overrides=None, seed=0, randomise_norms=True):
    torch.manual_seed(seed)
    model = build_model(tiny_cfg(overrides)).eval()
    if randomise_norms:
        _randomise_norms(model, seed)
    with torch.no_grad():   # spread the class scores: no near-ties for the NMS order to hinge on
        for p in model.roi_heads.box_predictor.parameters():
            p.normal_(0, 0.3)
    return model


def _assert_same_detections(ref, out, box_atol=1e-3, score_atol=1e-4, mask_atol=1e-3):
    assert len(ref) == len(out)
    for a, b in zip(ref, out):
        assert a["labels"].shape[0] > 0
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(b["boxes"], a["boxes"], rtol=0, atol=box_atol)
        torch.testing.assert_close(b["scores"], a["scores"], rtol=0, atol=score_atol)
        # a fresh mask predictor gives probabilities near 0.5: compare them, not the thresholded masks
        torch.testing.assert_close(b["masks"], a["masks"], rtol=0, atol=mask_atol)


def test_fold_frozen_batchnorm_matches_unfolded_trunk():
    body = ResNet("resnet50", norm="FrozenBN", freeze_at=5, width=16)
    _randomise_norms(body)
    x = torch.randn(2, 3, 64, 96)
    ref = body(x)
    fold_frozen_batchnorm(body)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    assert isinstance(body.bn1, nn.Identity) and isinstance(body.layer1[0].downsample[1], nn.Identity)
    assert body.conv1.bias is not None and body.layer2[0].conv3.bias is not None
    out = body(x)
    for k in ref:
        scale = ref[k].abs().max()
        torch.testing.assert_close(out[k], ref[k], rtol=0, atol=1e-5 * scale)
    # channels-last activations and weights read the same folded parameters
    for m in body.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    out_cl = body(x.contiguous(memory_format=torch.channels_last))
    for k in ref:
        torch.testing.assert_close(out_cl[k], ref[k], rtol=0, atol=1e-5 * ref[k].abs().max())


def test_fold_sequential_conv_norm_pairs_and_eval_batchnorm_only():
    torch.manual_seed(0)
    conv_bias = nn.Conv2d(3, 8, 3, padding=1)
    seq = nn.Sequential(conv_bias, nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4))
    _randomise_norms(seq)
    seq.eval()
    x = torch.randn(2, 3, 10, 12)
    ref = seq(x)
    fold_frozen_batchnorm(seq)
    assert isinstance(seq[1], nn.Identity) and isinstance(seq[4], nn.Identity) and seq[3].bias is not None
    torch.testing.assert_close(seq(x), ref, rtol=1e-5, atol=1e-5)
    # a norm in training mode normalises with the batch's statistics: not a fixed map, not folded
    train = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    fold_frozen_batchnorm(train)
    assert isinstance(train[1], nn.BatchNorm2d)
    # a norm that follows something other than a convolution stays
    relu_bn = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), FrozenBatchNorm2d(4))
    fold_frozen_batchnorm(relu_bn)
    assert isinstance(relu_bn[2], FrozenBatchNorm2d)


# R50-FPN as the torchvision parity tests build it, with its fresh norms (as torchvision initialises them):
# randomised norms through 50 layers move boxes by float32 rounding alone (~3e-3 px at 128 px), folded or not
R50_TV = {"backbone": {"name": "resnet50", "width": 64}, "roi_heads": {"pooler_aligned": False},
          "mask": {"paste": "torchvision"}}


@pytest.mark.parametrize("overrides,randomise", [(None, True), (R50_TV, False)], ids=["tiny", "r50_tv_parity"])
def test_fp32_gives_the_eval_models_detections(overrides, randomise):
    model = _model(overrides, randomise_norms=randomise)
    images, _ = shapes_batch(2, size=(128, 112), seed=1)
    ref = model(images)
    fast = optimize_for_inference(copy.deepcopy(model))
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in fast.modules())
    assert fast.channels_last and fast.inference_precision == "fp32"
    _assert_same_detections(ref, fast(images))
    # the two-call form the Predictor uses
    batch, image_sizes, _, input_sizes = fast.preprocess(images)
    out = fast.inference(fast.to_model_layout(batch), image_sizes, input_sizes, mask_format="prob")
    _assert_same_detections(ref, out)
    # contiguous layout too
    plain = optimize_for_inference(copy.deepcopy(model), channels_last=False)
    assert not plain.channels_last
    _assert_same_detections(ref, plain(images))


def test_fp32_keypoints_and_bool_masks():
    model = _model({"keypoint": {"enabled": True}})
    images, _ = shapes_batch(2, seed=2)
    ref = model(images, mask_format="bool")
    out = optimize_for_inference(copy.deepcopy(model))(images, mask_format="bool")
    for a, b in zip(ref, out):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(b["keypoints"], a["keypoints"], rtol=0, atol=1e-3)
        assert b["masks"].dtype == torch.bool and mask_iou(a["masks"], b["masks"]) >= 0.99


@needs_bf16
def test_bf16_runs_networks_in_bfloat16_with_float32_outputs():
    model = _model(seed=3)
    images, _ = shapes_batch(2, seed=3)
    ref = model(images)
    fast = optimize_for_inference(copy.deepcopy(model), precision="bf16")
    for net in network_modules(fast):
        assert all(p.dtype == torch.bfloat16 for p in net.parameters())
    assert fast.pixel_mean.dtype == torch.float32
    seen = []
    fast.rpn.head.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    out = fast(images)
    # the RPN head gets the backbone's bfloat16 maps themselves (the stages got float32 copies)
    assert seen and all(f.dtype == torch.bfloat16 for f in seen[-1])
    kept = []
    fast.backbone.register_forward_hook(lambda m, args, out: kept.extend(
        [low for _, low in fast.backbone._forward_hooks[next(iter(fast.backbone._forward_hooks))]._local.originals]))
    fast(images)
    assert kept and all(any(f is o for o in kept) for f in seen[-1])
    for a, b in zip(ref, out):
        for k in ("boxes", "scores", "masks"):
            assert b[k].dtype == torch.float32, k
        # each of the best fp32 detections is among the bf16 ones (same label, box within 2 px, score within
        # 0.05); the order may differ: a fresh model scores many boxes at ~1.0
        assert a["labels"].shape[0] > 0
        for i in range(min(5, a["labels"].shape[0])):
            close = ((b["boxes"] - a["boxes"][i]).abs().amax(1) < 2.0) & (b["labels"] == a["labels"][i]) \
                & ((b["scores"] - a["scores"][i]).abs() < 0.05)
            assert bool(close.any()), (i, a["boxes"][i], b["boxes"])


def test_bad_precisions_and_arguments_raise(monkeypatch):
    model = _model()
    with pytest.raises(ValueError, match="precision must be one of"):
        optimize_for_inference(copy.deepcopy(model), precision="float32")
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        optimize_for_inference(copy.deepcopy(model), precision="fp16")
    with pytest.raises(ValueError, match="compile must be"):
        optimize_for_inference(copy.deepcopy(model), compile="fast")
    with pytest.raises(TypeError, match="MaskRCNN"):
        optimize_for_inference(model.backbone)
    import mrcnn_fast.engine.trainer as trainer
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(RuntimeError, match="native bfloat16"):
        optimize_for_inference(copy.deepcopy(model), precision="bf16")
    once = optimize_for_inference(copy.deepcopy(model))
    with pytest.raises(RuntimeError, match="already applied"):
        optimize_for_inference(once)


@pytest.mark.slow
def test_compiled_networks_give_the_same_detections():
    """compile=True: each network through inductor with freezing; the eager model's detections (an image size
    seen before and a new one)."""
    model = _model()
    images, _ = shapes_batch(2, size=(128, 112), seed=1)
    fast = optimize_for_inference(copy.deepcopy(model), compile=True)
    assert all(getattr(m, "_compiled_call_impl", None) is not None for m in network_modules(fast))
    _assert_same_detections(model(images), fast(images))
    _assert_same_detections(model(images), fast(images))
    other, _ = shapes_batch(1, size=(96, 128), seed=4)
    _assert_same_detections(model(other), fast(other))


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=needs_bf16)])
def test_one_optimized_model_serves_several_threads(precision):
    from concurrent.futures import ThreadPoolExecutor

    model = optimize_for_inference(_model(seed=5), precision=precision)
    images = [shapes_batch(1, seed=10 + i)[0] for i in range(4)]
    alone = [model(ims)[0] for ims in images]
    with ThreadPoolExecutor(4) as pool:
        together = [r[0] for r in pool.map(model, images)]
    for a, b in zip(alone, together):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(b["boxes"], a["boxes"], rtol=0, atol=1e-4)
        torch.testing.assert_close(b["scores"], a["scores"], rtol=0, atol=1e-5)
