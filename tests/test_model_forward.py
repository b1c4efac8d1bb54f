"""Whole-model behaviour: training losses, eval output format, C4, ablation switches, empty images, bad input."""
import numpy as np
import pytest
import torch

from _model_utils import assert_refined, shapes_batch, tiny_cfg
from mrcnn_fast.config import get_config
from mrcnn_fast.modeling import IterativeBoxRefinement, MaskRCNN, build_model

LOSSES = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask", "loss_keypoint"}


@pytest.fixture(scope="module")
def batch():
    return shapes_batch(2, (96, 128), seed=3)


def _train_once(model, images, targets):
    model.train()
    losses = model(images, targets)
    sum(losses.values()).backward()
    return losses


def _all_params_have_grads(model):
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def test_train_losses_and_every_parameter_gets_a_gradient(batch):
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    losses = _train_once(model, *batch)
    assert set(losses) == LOSSES
    for k, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v), k
    assert not _all_params_have_grads(model)


def test_images_without_annotations_train(batch):
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    images, _ = batch
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "masks": torch.zeros(0, *im.shape[1:], dtype=torch.uint8), "keypoints": torch.zeros(0, 4, 3)}
             for im in images]
    losses = _train_once(model, images, empty)
    assert set(losses) == LOSSES
    for k in ("loss_rpn_box_reg", "loss_box_reg", "loss_mask", "loss_keypoint"):
        assert losses[k].item() == 0, k
    assert losses["loss_objectness"].item() > 0 and losses["loss_classifier"].item() > 0
    # the graph still reaches every parameter (DDP without find_unused_parameters)
    assert not _all_params_have_grads(model)


def test_crowd_instances_are_ignored(batch):
    images, targets = batch
    crowd = []
    for t in targets:
        c = {k: torch.cat([v, v[:1]]) for k, v in t.items()}
        c["boxes"][-1] = torch.tensor([0.0, 0.0, 60.0, 60.0])
        c["iscrowd"] = torch.tensor([0] * len(t["labels"]) + [1])
        crowd.append(c)
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).train()
    torch.manual_seed(1)
    a = model(images, targets)
    torch.manual_seed(1)
    b = model(images, crowd)
    for k in a:
        assert a[k].item() == pytest.approx(b[k].item(), rel=1e-5, abs=1e-7), k


def test_eval_output_format_in_input_coordinates(batch):
    torch.manual_seed(0)
    cfg = tiny_cfg({"roi_heads": {"score_thresh_test": 0.0}})
    model = build_model(cfg).eval()
    images = [batch[0][0], torch.rand(3, 70, 150)]      # resized to 128 / 60x128 inside, outputs at input size
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for o, im in zip(out, images):
        h, w = im.shape[1:]
        d = o["boxes"].shape[0]
        assert 0 < d <= cfg.model.roi_heads.detections_per_image
        assert set(o) == {"boxes", "labels", "scores", "masks", "keypoints", "keypoints_scores"}
        assert o["boxes"].dtype == torch.float32 and o["labels"].dtype == torch.int64
        assert o["masks"].shape == (d, 1, h, w) and o["masks"].dtype == torch.float32
        assert float(o["masks"].min()) >= 0 and float(o["masks"].max()) <= 1
        assert o["keypoints"].shape == (d, 4, 3) and o["keypoints_scores"].shape == (d, 4)
        assert bool((o["boxes"][:, 0::2] <= w + 1e-3).all()) and bool((o["boxes"][:, 1::2] <= h + 1e-3).all())
        assert bool((o["boxes"] >= 0).all())
        assert bool((o["labels"] >= 1).all()) and bool((o["labels"] <= 3).all())
        assert bool((o["scores"][:-1] >= o["scores"][1:]).all())


def test_rle_mask_format_matches_probabilities(batch):
    from pycocotools import mask as mask_util

    torch.manual_seed(0)
    model = build_model(tiny_cfg({"roi_heads": {"score_thresh_test": 0.0}})).eval()
    with torch.no_grad():
        prob = model(batch[0][:1])[0]
        rle = model(batch[0][:1], mask_format="rle")[0]
    assert "masks" not in rle and len(rle["masks_rle"]) == prob["boxes"].shape[0]
    r = rle["masks_rle"][0]
    assert r["size"] == [96, 128]
    dec = mask_util.decode({"size": r["size"], "counts": r["counts"]})
    assert np.array_equal(dec.astype(bool), (prob["masks"][0, 0] >= 0.5).numpy())
    with pytest.raises(ValueError, match="mask_format"):
        model(batch[0][:1], mask_format="png")


def test_mask_paste_modes(batch, monkeypatch):
    from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste

    from mrcnn_fast import ops

    torch.manual_seed(0)
    cfg = tiny_cfg({"roi_heads": {"score_thresh_test": 0.0}})
    assert cfg.model.mask.paste == "aligned"
    model = build_model(cfg).eval()
    assert model.mask_paste == "aligned"
    calls, real = [], ops.paste_masks_in_image

    def spy(masks, boxes, img_shape, **kw):
        calls.append((masks, boxes, img_shape, kw))
        return real(masks, boxes, img_shape, **kw)

    monkeypatch.setattr(ops, "paste_masks_in_image", spy)
    with torch.no_grad():
        aligned = model(batch[0][:1])[0]
        model.mask_paste = "torchvision"
        tv = model(batch[0][:1])[0]
    assert [c[3] for c in calls] == [{"aligned": True}, {"aligned": False}]
    masks, boxes, img_shape, _ = calls[1]
    assert aligned["masks"].shape[0] > 0 and torch.equal(aligned["boxes"], tv["boxes"])
    torch.testing.assert_close(tv["masks"], tv_paste(masks, boxes, img_shape), rtol=0, atol=1e-6)
    assert torch.equal(aligned["masks"], real(masks, boxes, img_shape, aligned=True))
    assert not torch.equal(aligned["masks"], tv["masks"])
    with pytest.raises(ValueError, match="mask_paste"):
        model.mask_paste = "detectron2"
    with pytest.raises(ValueError, match="model.mask.paste"):
        build_model(tiny_cfg({"mask": {"paste": "detectron2"}}))
    assert build_model(tiny_cfg({"mask": {"paste": "torchvision"}})).mask_paste == "torchvision"


def test_c4_model_trains_and_predicts(batch):
    torch.manual_seed(0)
    cfg = get_config("r50_c4", {
        "model": {"backbone": {"name": "resnet18", "width": 16, "freeze_at": 0}, "anchors": {"sizes": [[16, 32, 64]]},
                  "rpn": {"pre_nms_topk_train": 200, "post_nms_topk_train": 50, "pre_nms_topk_test": 100,
                          "post_nms_topk_test": 20},
                  "roi_heads": {"num_classes": 3, "batch_size_per_image": 32, "score_thresh_test": 0.0},
                  "mask": {"conv_dim": 32}},
        "input": {"min_size_train": [96], "max_size_train": 128, "min_size_test": 96, "max_size_test": 128}})
    model = build_model(cfg)
    assert model.roi_heads.c4 and not hasattr(model.backbone.body, "layer4")
    assert model.roi_heads.box_head.res5[0].conv1.in_channels == 64
    images, targets = batch
    targets = [{k: v for k, v in t.items() if k != "keypoints"} for t in targets]
    losses = _train_once(model, images, targets)
    assert set(losses) == LOSSES - {"loss_keypoint"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert not _all_params_have_grads(model)
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert out[0]["masks"].shape[1:] == (1, 96, 128) and out[0]["boxes"].shape[0] > 0
    assert model.roi_heads._mask_size() == 14
    model.roi_heads.refiners = (IterativeBoxRefinement(1),)     # the refinement pass goes through res5 too
    with torch.no_grad():
        ref = model(images)
    assert [o["boxes"].shape for o in ref] == [o["boxes"].shape for o in out]
    assert not torch.equal(ref[0]["boxes"], out[0]["boxes"]) and ref[0]["masks"].shape == out[0]["masks"].shape


def test_box_refine_pass(batch):
    """test_box_refine=1: each detection gets the detected class's regression applied once more (clipped) and the
    score sqrt(score * p(class)); checked with a predictor whose outputs do not depend on the features."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg({"roi_heads": {"score_thresh_test": 0.0}})).eval()
    pred = model.roi_heads.box_predictor
    with torch.no_grad():
        pred.cls_score.weight.zero_()
        pred.cls_score.bias.copy_(torch.tensor([0.0, 1.0, 0.5, 1.5]))
        pred.bbox_pred.weight.zero_()
        # class c: dx = 0.4 c (x 1/10 by the box weights), dw = -0.5 c (x 1/5): a shift right, a shrink
        pred.bbox_pred.bias.copy_(torch.tensor([[0.4 * c, 0.2, -0.5 * c, 0.3] for c in range(4)]).reshape(-1))
    images = [batch[0][0], batch[0][1]]
    with torch.no_grad():
        base = model(images)
        model.roi_heads.refiners = (IterativeBoxRefinement(1),)
        ref = model(images)
    assert_refined(base, ref, images, pred, (10.0, 10.0, 5.0, 5.0))
    with pytest.raises(ValueError, match="test_box_refine"):
        build_model(tiny_cfg({"roi_heads": {"test_box_refine": -1}}))


ABLATIONS = [
    {"mask": {"loss": "softmax"}},
    {"mask": {"head": "mlp", "mlp_dim": 64}},
    {"mask": {"class_agnostic": True}},
    {"mask": {"class_agnostic": True, "loss": "softmax"}},
    {"roi_heads": {"pooler": "roi_warp"}},
    {"roi_heads": {"pooler": "roi_warp_max"}},
    {"roi_heads": {"pooler": "roi_pool"}},
    {"roi_heads": {"pooler": "roi_align_max"}},
    {"keypoint": {"enabled": False}, "mask": {"enabled": False}},
]


@pytest.mark.parametrize("overrides", ABLATIONS)
def test_ablation_switches_build_and_run(overrides, batch):
    torch.manual_seed(0)
    cfg = tiny_cfg(overrides)
    model = build_model(cfg)
    losses = _train_once(model, *batch)
    assert all(torch.isfinite(v) for v in losses.values())
    assert ("loss_mask" in losses) == cfg.model.mask.enabled
    assert not _all_params_have_grads(model)
    model.eval()
    with torch.no_grad():
        out = model(batch[0][:1])[0]
    if cfg.model.mask.enabled:
        assert out["masks"].shape[1:] == (1, 96, 128)
    else:
        assert "masks" not in out and "keypoints" not in out


def test_bad_input_raises(batch):
    model = build_model(tiny_cfg())
    images, targets = batch
    with pytest.raises(ValueError, match="targets are required"):
        model.train()(images)
    model.eval()
    with pytest.raises(ValueError, match="non-empty list"):
        model([])
    with pytest.raises(ValueError, match=r"images\[0\]"):
        model([torch.rand(1, 32, 32)])
    with pytest.raises(TypeError, match=r"images\[0\]"):
        model([torch.zeros(3, 32, 32, dtype=torch.uint8)])
    model.train()
    with pytest.raises(ValueError, match="targets"):
        model(images, targets[:1])
    bad = [dict(t, labels=t["labels"] + 5) for t in targets]
    with pytest.raises(ValueError, match="labels"):
        model(images, bad)
    bad = [dict(t, masks=t["masks"][:, :10]) for t in targets]
    with pytest.raises(ValueError, match="masks"):
        model(images, bad)
    bad = [dict(t, boxes=t["boxes"][:, :3]) for t in targets]
    with pytest.raises(ValueError, match="boxes"):
        model(images, bad)
    with pytest.raises(ValueError, match="mask.loss"):
        build_model(tiny_cfg({"mask": {"loss": "dice"}}))
    with pytest.raises(ValueError, match="pooler"):
        build_model(tiny_cfg({"roi_heads": {"pooler": "psroi"}}))
    with pytest.raises(ValueError, match="heatmap_size"):
        build_model(tiny_cfg({"keypoint": {"heatmap_size": 28}}))
    assert isinstance(model, MaskRCNN)


def test_channels_last_same_outputs_and_contiguous_state_dict(batch):
    torch.manual_seed(0)
    model = build_model(tiny_cfg({"channels_last": True, "roi_heads": {"score_thresh_test": 0.0}})).eval()
    assert model.roi_heads.mask_head.convs[0].weight.is_contiguous(memory_format=torch.channels_last)
    sd = model.state_dict()
    assert all(v.is_contiguous() for v in sd.values())
    ref = build_model(tiny_cfg({"channels_last": False, "roi_heads": {"score_thresh_test": 0.0}})).eval()
    ref.load_state_dict(sd)
    with torch.no_grad():
        a, b = model(batch[0][:1])[0], ref(batch[0][:1])[0]
    torch.testing.assert_close(a["boxes"], b["boxes"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(a["masks"], b["masks"], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("mask_format", ["prob", "rle"])
def test_eval_with_no_detections(batch, mask_format):
    model = build_model(tiny_cfg({"roi_heads": {"score_thresh_test": 1.0}})).eval()
    with torch.no_grad():
        out = model(batch[0], mask_format=mask_format)
    for o in out:
        assert o["boxes"].shape == (0, 4) and o["scores"].shape == (0,) and o["labels"].shape == (0,)
        assert o["keypoints"].shape == (0, 4, 3) and o["keypoints_scores"].shape == (0, 4)
        if mask_format == "prob":
            assert o["masks"].shape == (0, 1, 96, 128)
        else:
            assert o["masks_rle"] == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("n", [0, 1, 37])
def test_fc_over_map_is_the_flattened_linear(dtype, layout, n):
    """The box head's fc6 (and the MLP mask head's fc1) run as a C x H x W convolution on the CPU: same values
    and gradients as nn.Linear on the flattened map, for any input layout, and empty batches."""
    from mrcnn_fast.modeling.heads import fc_over_map

    torch.manual_seed(n)
    fc = torch.nn.Linear(8 * 5 * 5, 16).to(dtype)
    x = torch.randn(n, 8, 5, 5, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(n, 8, 5, 10, dtype=dtype)[..., ::2]
    a = x.detach().clone().requires_grad_()
    b = x.detach().clone().requires_grad_()
    g = torch.randn(n, 16, dtype=dtype)
    ya = fc_over_map(a, fc)
    ya.backward(g)
    grads_a = [a.grad] + [p.grad.clone() for p in fc.parameters()]
    fc.zero_grad()
    yb = fc(b.flatten(1))
    yb.backward(g)
    grads_b = [b.grad] + [p.grad for p in fc.parameters()]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert ya.shape == (n, 16)
    torch.testing.assert_close(ya, yb, **tol)
    for ga, gb in zip(grads_a, grads_b):
        assert ga.shape == gb.shape
        torch.testing.assert_close(ga, gb, **tol)
    with pytest.raises(RuntimeError):   # a map that does not flatten to in_features fails as nn.Linear would
        fc_over_map(torch.randn(2, 8, 4, 4, dtype=dtype), fc)


def test_fc_over_map_under_cpu_bfloat16_autocast():
    from mrcnn_fast.modeling.heads import fc_over_map

    torch.manual_seed(0)
    fc = torch.nn.Linear(4 * 3 * 3, 6)
    x = torch.randn(5, 4, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fc_over_map(x, fc)
    assert y.dtype == torch.bfloat16 and y.shape == (5, 6)
    torch.testing.assert_close(y.float(), fc(x.flatten(1)), rtol=0.05, atol=0.05)
