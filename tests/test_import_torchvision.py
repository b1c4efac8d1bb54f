"""torchvision checkpoints through convert.load_torchvision: each supported builder, seeded and randomly
initialised (nothing can be downloaded), saved with torch.save, imported, and run beside torchvision on real photos:
the same detections (count, labels, boxes within 0.05 px, scores within 1e-3, mask IoU >= 0.99, keypoints within
0.5 px). Plus the files the importer must refuse."""
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from data_helpers import require_shared
from mrcnn_fast import Predictor
from mrcnn_fast.convert import load_torchvision
from mrcnn_fast.modeling import build_model

tvd = pytest.importorskip("torchvision.models.detection")

# min_size, max_size of both models (one case keeps torchvision's 800 / 1333): CPU time
SMALL, SMALLER = (512, 853), (448, 747)


def _photos(which: str, n: int) -> list[torch.Tensor]:
    files = sorted((require_shared(which) / "images").glob("*.jpg"))[:n]
    return [torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
            .contiguous() for f in files]


@torch.no_grad()
def _spread(tv: nn.Module, images: list[torch.Tensor], seed: int) -> None:
    """Makes a random torchvision detector produce many detections of several classes, well apart in score.

    The trunk's batch norms get the statistics of the images (a random ResNet's activations otherwise grow
    block after block); every other batch norm random statistics (so that folding them is tested); the RPN
    convs a ReLU-preserving scale. Then, measured on one small image, the objectness and class logits are
    scaled to a standard deviation of about 2.5 and 1.5: near-equal objectness would leave the top-n to ties, saturated
    probabilities (1.0 in float32) too, and near-equal class scores the NMS order."""
    g = torch.Generator().manual_seed(seed)
    body = tv.backbone.body
    for m in body.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None          # a cumulative average: one batch sets the statistics
            m.reset_running_stats()
    body.train()
    x = torch.stack([nn.functional.interpolate(im[None], size=(192, 256), mode="bilinear")[0] for im in images])
    body(tv.transform.normalize(x))
    body.eval()
    for m in body.modules():   # channels the batch left (nearly) constant: no 300x gain on float noise
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.clamp_(min=0.05 * float(m.running_var.mean()))
    for name, m in tv.named_modules():
        if isinstance(m, nn.BatchNorm2d) and not name.startswith("backbone.body"):
            c = m.num_features
            m.weight.copy_(torch.rand(c, generator=g) * 0.4 + 0.8)
            m.bias.copy_(torch.randn(c, generator=g) * 0.05)
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.05)
            m.running_var.copy_(torch.rand(c, generator=g) * 0.4 + 0.8)
    head = tv.rpn.head
    for m in head.conv.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)

    seen = {}

    def keep(key):
        def hook(module, args, out):
            seen.setdefault(key, out)    # the RPN head's first (finest) level
        return hook

    hooks = [head.conv.register_forward_hook(keep("rpn")), tv.roi_heads.box_head.register_forward_hook(keep("box"))]
    sizes = tv.transform.min_size, tv.transform.max_size
    tv.transform.min_size, tv.transform.max_size = (160,), 267
    tv.eval()
    tv(images[:1])
    tv.transform.min_size, tv.transform.max_size = sizes
    for h in hooks:
        h.remove()

    def spread(layer: nn.Module, feats: torch.Tensor, std: float) -> None:
        # centred on the mean feature: the features share a large common part (ReLU outputs, similar RoIs) that
        # would otherwise favour one output everywhere
        w = torch.randn(layer.weight.shape, generator=g)
        out = feats.movedim(1, -1).reshape(-1, w.shape[1]) @ w.flatten(1).T
        scale = std / (out - out.mean(0)).std()
        layer.weight.copy_(w * scale)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.5 - out.mean(0) * scale)

    spread(head.cls_logits, seen["rpn"], 2.5)
    spread(tv.roi_heads.box_predictor.cls_score, seen["box"], 1.5)
    predictor = getattr(tv.roi_heads, "mask_predictor", None)
    if predictor is not None:
        # mask logits far from 0: a random mask head's are all near 0, where float noise flips whole masks
        seen.clear()
        hook = predictor.relu.register_forward_hook(keep("mask"))
        tv.transform.min_size, tv.transform.max_size = (160,), 267
        tv(images[:1])
        tv.transform.min_size, tv.transform.max_size = sizes
        hook.remove()
        spread(predictor.mask_fcn_logits, seen["mask"], 4.0)


def _legacy(sd: dict) -> dict:
    """A current-spelling state dict in torchvision's pre-0.13 spelling (the COCO_V1 files): FrozenBN buffers
    only, rpn.head.conv, fpn.inner_blocks.i / layer_blocks.i, mask_head.mask_fcnK."""
    out = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        k = re.sub(r"^rpn\.head\.conv\.0\.0\.", "rpn.head.conv.", k)
        k = re.sub(r"^backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.0\.", r"backbone.fpn.\1_blocks.\2.", k)
        k = re.sub(r"^roi_heads\.mask_head\.(\d+)\.0\.", lambda m: f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.", k)
        out[k] = v
    return out


def _paste_box(box: torch.Tensor, m: int = 28) -> torch.Tensor:
    """The integer box torchvision's paste_masks_in_image resamples an m x m mask into: the box grown by one mask
    cell on each side, truncated to integers. Two boxes within 0.05 px can truncate to pixels 1 apart."""
    scale = (m + 2) / m
    half = (box[2:] - box[:2]) * 0.5 * scale
    centre = (box[2:] + box[:2]) * 0.5
    return torch.cat([centre - half, centre + half]).to(torch.int64)


def _mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def _assert_parity(ours: list[dict], ref: list[dict], *, masks: bool, keypoints: bool, classes: int) -> None:
    """Same detections per image: each of torchvision's is matched, in score order, to one of ours of the same label,
    score within 1e-3 and box within 0.05 px (the order of two detections whose scores differ by less than the
    float noise of two implementations is not asserted); then masks and keypoints of the matched pairs."""
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        n = b["labels"].shape[0]
        assert n >= 20 and b["labels"].unique().numel() >= min(3, classes), "the reference must give many detections"
        assert a["labels"].shape[0] == n
        # which detections make the cut (the top 100, or the score threshold) is decided by near-ties there too:
        # those within the score tolerance of the cut may differ
        cut = (float(b["scores"][-1]) if n == 100 else 0.05) + 1e-3
        sure = int((b["scores"] >= cut).sum())
        assert abs(int((a["scores"] >= cut).sum()) - sure) <= n // 20
        used = torch.zeros(n, dtype=torch.bool)
        order = []
        for i in range(sure):
            box_diff = (a["boxes"] - b["boxes"][i]).abs().amax(1)
            ok = (~used & (a["labels"] == b["labels"][i]) & ((a["scores"] - b["scores"][i]).abs() <= 1e-3)
                  & (box_diff <= 0.05))
            assert ok.any(), (f"torchvision's detection {i} (label {int(b['labels'][i])}, score "
                              f"{float(b['scores'][i]):.5f}, box {b['boxes'][i].tolist()}) has no match in ours")
            j = int(torch.where(ok, box_diff, torch.inf).argmin())
            used[j] = True
            order.append(j)
        n = sure
        # the order needs no check of its own: both lists are sorted by score and each pair's scores are within
        # 1e-3, so two detections can only come in the other order where their scores are within 2e-3
        if masks:
            assert a["masks"].dtype == torch.bool
            straddling = 0
            for i, j in enumerate(order):
                m, r = a["masks"][j], b["masks"][i, 0] > 0.5
                assert m.shape == r.shape
                if not (r.any() or m.any()):
                    continue
                if torch.equal(_paste_box(a["boxes"][j]), _paste_box(b["boxes"][i])):
                    # IoU >= 0.99; a mask under 100 px may differ by the one pixel whose probability is ~0.5
                    assert _mask_iou(m, r) >= 0.99 or int((m ^ r).sum()) <= 1, i
                else:   # the boxes (within 0.05 px) round to other pixels: a 1 px larger or shifted paste
                    straddling += 1
                    assert _mask_iou(m, r) >= 0.5, i
            assert straddling <= max(2, n // 20)
        else:
            assert "masks" not in a
        if keypoints:
            # a keypoint is the maximum of its upsampled heatmap; where a random head's heatmap has two near-equal
            # maxima one upsampled pixel apart (at most 1% of them), float noise picks either
            dist = (a["keypoints"][order][..., :2] - b["keypoints"][:n, :, :2]).abs().amax(-1)
            assert float((dist > 0.5).float().mean()) <= 0.01
        else:
            assert "keypoints" not in a


CASES = {
    # builder, spelling, sizes (min, max), photos set, how many photos in the one batch call
    "maskrcnn_v1_legacy": ("maskrcnn_resnet50_fpn", "legacy", (800, 1333), "coco_samples", 2),
    "maskrcnn_v1": ("maskrcnn_resnet50_fpn", "current", SMALL, "coco_samples", 2),
    "maskrcnn_v2": ("maskrcnn_resnet50_fpn_v2", "current", SMALL, "coco_samples", 2),
    "keypointrcnn": ("keypointrcnn_resnet50_fpn", "current", SMALLER, "coco_persons", 2),
    "fasterrcnn_v1": ("fasterrcnn_resnet50_fpn", "current", SMALLER, "coco_samples", 2),
    "fasterrcnn_v2": ("fasterrcnn_resnet50_fpn_v2", "current", SMALLER, "coco_samples", 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_torchvision(case, tmp_path):
    builder, spelling, (min_size, max_size), photos, n = CASES[case]
    images = _photos(photos, n)
    torch.manual_seed(0)
    tv = getattr(tvd, builder)(weights=None, weights_backbone=None, min_size=min_size, max_size=max_size)
    tv.eval()
    _spread(tv, images, seed=1)
    sd = tv.state_dict()
    if spelling == "legacy":
        sd = _legacy(sd)
        # torchvision itself still reads the old spelling (all but the FrozenBN-less counters)
        missing, unexpected = getattr(tvd, builder)(weights=None, weights_backbone=None).load_state_dict(sd, False)
        assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
        for m in tv.modules():   # what torchvision does to the COCO_V1 weights it loads
            if isinstance(m, nn.BatchNorm2d) and m in set(tv.backbone.body.modules()):
                m.eps = 0.0
    path = tmp_path / f"{builder}.pth"
    torch.save({"model": sd, "epoch": 3} if case == "maskrcnn_v1" else sd, path)

    cfg, state_dict, report = load_torchvision(path, {"input": {"min_size_test": min_size,
                                                                "max_size_test": max_size}})
    assert builder in report
    assert cfg.model.backbone.norm_eps == (0.0 if spelling == "legacy" else 1e-5)
    assert ("eps 0" in report) == (spelling == "legacy")
    build_model(cfg).load_state_dict(state_dict)
    masks, keypoints = cfg.model.mask.enabled, cfg.model.keypoint.enabled
    assert masks == builder.startswith("mask") and keypoints == builder.startswith("keypoint")
    # the user's path: the Predictor (BN folded, channels-last, the C++ graph between the networks), all images in
    # one batch
    predictor = Predictor(path, weights_format="auto", precision="fp32",
                          config={"input": {"min_size_test": min_size, "max_size_test": max_size}})
    assert predictor.weights_format == "torchvision" and predictor.graph is not None
    with torch.no_grad():
        ref = tv(images)
    got = predictor(images, batch_size=len(images))
    _assert_parity(got, ref, masks=masks, keypoints=keypoints, classes=cfg.model.roi_heads.num_classes)


def test_torchvision_file_wrapped_and_overrides(tmp_path):
    torch.manual_seed(0)
    tv = tvd.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=7)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": tv.state_dict(), "optimizer": {"lr": 0.01}, "epoch": 12}, path)
    cfg, sd, report = load_torchvision(path, {"model": {"roi_heads": {"score_thresh_test": 0.3}}})
    assert cfg.model.roi_heads.num_classes == 6 and cfg.model.roi_heads.score_thresh_test == 0.3
    assert not cfg.model.mask.enabled and not cfg.model.keypoint.enabled
    assert cfg.input.resize == "torchvision" and not cfg.model.roi_heads.pooler_aligned
    assert not any(k.endswith("num_batches_tracked") for k in sd)
    assert "fasterrcnn_resnet50_fpn" in report and "6 + background" in report
    with pytest.raises(ValueError, match="unknown config key"):
        load_torchvision(path, {"model": {"no_such_key": 1}})


def test_architecture_detection_from_tensors(tmp_path):
    """ResNet depth from the stage-3 block count, ResNeXt from grouped conv2, keypoint count from the tensors."""
    from torchvision.models import resnet101, resnext101_32x8d
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    for trunk, name in ((resnet101, "resnet101"), (resnext101_32x8d, "resnext101_32x8d")):
        backbone = _resnet_fpn_extractor(trunk(weights=None), 5)
        tv = tvd.KeypointRCNN(backbone, num_classes=3, num_keypoints=5)
        path = tmp_path / f"{name}.pth"
        torch.save(tv.state_dict(), path)
        cfg, sd, report = load_torchvision(path)
        assert cfg.model.backbone.name == name and name in report
        assert cfg.model.keypoint.enabled and cfg.model.keypoint.num_keypoints == 5
        assert cfg.model.keypoint.flip_pairs == () and cfg.model.roi_heads.num_classes == 2
        build_model(cfg).load_state_dict(sd)


def test_bad_files_are_refused_with_the_file_and_tensor_named(tmp_path):
    torch.manual_seed(0)
    tv = tvd.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5)
    sd = tv.state_dict()
    good = tmp_path / "good.pth"
    torch.save(sd, good)
    data = good.read_bytes()

    with pytest.raises(ValueError, match=r"missing\.pth.*no such file"):
        load_torchvision(tmp_path / "missing.pth")
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated\.pth"):
        load_torchvision(tmp_path / "truncated.pth")
    (tmp_path / "corrupt.pth").write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match=r"corrupt\.pth"):
        load_torchvision(tmp_path / "corrupt.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list\.pth: not a state dict"):
        load_torchvision(tmp_path / "list.pth")
    torch.save({"model": {"a": 1}}, tmp_path / "nostate.pth")
    with pytest.raises(ValueError, match=r"nostate\.pth: not a state dict"):
        load_torchvision(tmp_path / "nostate.pth")

    # another architecture: an ImageNet classifier, a head of another size, a tensor the model has no place for
    from torchvision.models import resnet50

    torch.save(resnet50(weights=None).state_dict(), tmp_path / "classifier.pth")
    with pytest.raises(ValueError, match=r"classifier\.pth.*'backbone\.body\.conv1\.weight' is missing"):
        load_torchvision(tmp_path / "classifier.pth")
    bad = dict(sd)
    bad["roi_heads.box_predictor.bbox_pred.weight"] = torch.zeros(7, 1024)
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=re.escape("shape.pth: weights of another architecture: tensor "
                                                   "'roi_heads.box_predictor.bbox_pred.weight' has shape [7, 1024], "
                                                   "expected [20, 1024]")):
        load_torchvision(tmp_path / "shape.pth")
    extra = dict(sd, **{"roi_heads.extra.weight": torch.zeros(3)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"extra\.pth.*'roi_heads\.extra\.weight'.*no place"):
        load_torchvision(tmp_path / "extra.pth")
    legacy = _legacy(sd)
    legacy["backbone.fpn.layer_blocks.2.weight"] = torch.zeros(256, 256, 1, 1)
    torch.save(legacy, tmp_path / "legacy_shape.pth")
    with pytest.raises(ValueError, match=re.escape("tensor 'backbone.fpn.layer_blocks.2.weight' has shape "
                                                   "[256, 256, 1, 1], expected [256, 256, 3, 3]")):
        load_torchvision(tmp_path / "legacy_shape.pth")


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_with_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": _Payload(marker)}}, path)
    with pytest.raises(ValueError, match=r"evil\.pth: not a readable"):
        load_torchvision(path)
    assert not marker.exists()
