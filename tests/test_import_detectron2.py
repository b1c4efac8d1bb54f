"""Importing detectron2 / Caffe2 Detectron checkpoints (mrcnn_fast.convert.load_detectron2), without detectron2.

The files are written here from our own models' weights under detectron2's (or Caffe2's) names, by a table of
this test written independently of the importer's; loading them must give back every tensor.
"""
import io
import json
import os
import pickle
import struct
import subprocess
from collections import OrderedDict

import numpy as np
import pytest
import torch

from mrcnn_fast.config import get_config, merge
from mrcnn_fast.convert import UnsafePickleError, load_detectron2, looks_like_detectron2, safe_load_pickle
from mrcnn_fast.modeling import build_model

# ---- our names -> detectron2's / Caffe2's (the test's own table) -----------------------------------------


def _block_d2(rest):
    """conv1.weight / bn2.running_mean / downsample.1.bias of a residual block -> detectron2's suffix."""
    if rest[0].startswith("conv"):
        return f"{rest[0]}.weight"
    if rest[0].startswith("bn"):
        return f"conv{rest[0][2:]}.norm.{rest[1]}"
    assert rest[0] == "downsample"
    return "shortcut.weight" if rest[1] == "0" else f"shortcut.norm.{rest[2]}"


def d2_name(name, fpn):
    p = name.split(".")
    trunk = "backbone.bottom_up" if fpn else "backbone"
    if name.startswith("backbone.body."):
        r = p[2:]
        if r[0] == "conv1":
            return f"{trunk}.stem.conv1.weight"
        if r[0] == "bn1":
            return f"{trunk}.stem.conv1.norm.{r[1]}"
        return f"{trunk}.res{int(r[0][len('layer'):]) + 1}.{r[1]}.{_block_d2(r[2:])}"
    if name.startswith("roi_heads.box_head.res5."):
        return f"roi_heads.res5.{p[3]}.{_block_d2(p[4:])}"
    if name.startswith("backbone.fpn."):
        kind = {"inner_blocks": "lateral", "layer_blocks": "output"}[p[2]]
        norm = ".norm" if p[4] == "1" else ""
        return f"backbone.fpn_{kind}{int(p[3]) + 2}{norm}.{p[5]}"
    if name.startswith("rpn.head."):
        return "proposal_generator.rpn_head." + {"conv": "conv", "cls_logits": "objectness_logits",
                                                 "bbox_pred": "anchor_deltas"}[p[2]] + "." + p[3]
    if name.startswith("roi_heads.box_head."):
        if p[2] in ("fc6", "fc7"):
            return f"roi_heads.box_head.fc{int(p[2][2:]) - 5}.{p[3]}"
        if p[2] == "convs":
            return f"roi_heads.box_head.conv{int(p[3]) + 1}.{p[4]}"
        if p[2] == "norms":
            return f"roi_heads.box_head.conv{int(p[3]) + 1}.norm.{p[4]}"
        if p[2] == "fcs":
            return f"roi_heads.box_head.fc{int(p[3]) + 1}.{p[4]}"
    if name.startswith("roi_heads.box_predictor."):
        return name
    if name.startswith("roi_heads.mask_head."):
        if p[2] == "convs":
            return f"roi_heads.mask_head.mask_fcn{int(p[3]) + 1}.{p[4]}"
        if p[2] == "norms":
            return f"roi_heads.mask_head.mask_fcn{int(p[3]) + 1}.norm.{p[4]}"
        return name
    if name.startswith("roi_heads.keypoint_head."):
        if p[2] == "convs":
            return f"roi_heads.keypoint_head.conv_fcn{int(p[3]) + 1}.{p[4]}"
        return f"roi_heads.keypoint_head.score_lowres.{p[3]}"
    raise AssertionError(f"no detectron2 name for {name}")


def _block_c2(stage, j, rest):
    branch = {"1": "2a", "2": "2b", "3": "2c"}
    if rest[0].startswith("conv"):
        return f"res{stage}_{j}_branch{branch[rest[0][4:]]}_w"
    if rest[0].startswith("bn"):
        return f"res{stage}_{j}_branch{branch[rest[0][2:]]}_bn_" + {"weight": "s", "bias": "b"}[rest[1]]
    if rest[1] == "0":
        return f"res{stage}_{j}_branch1_w"
    return f"res{stage}_{j}_branch1_bn_" + {"weight": "s", "bias": "b"}[rest[2]]


def c2_name(name, fpn):
    """Caffe2 Detectron blob name (None for running statistics: Detectron1 has affine-channel norms)."""
    p = name.split(".")
    if p[-1] in ("running_mean", "running_var"):
        return None
    wb = {"weight": "w", "bias": "b"}
    if name.startswith("backbone.body."):
        r = p[2:]
        if r[0] == "conv1":
            return "conv1_w"
        if r[0] == "bn1":
            return "res_conv1_bn_" + {"weight": "s", "bias": "b"}[r[1]]
        return _block_c2(int(r[0][len("layer"):]) + 1, r[1], r[2:])
    if name.startswith("roi_heads.box_head.res5."):
        return _block_c2(5, p[3], p[4:])
    if name.startswith("backbone.fpn."):
        s = int(p[3]) + 2
        last = {2: 2, 3: 3, 4: 5, 5: 2}[s]   # the last block of res{s} in Detectron1's names (any index works)
        if p[2] == "inner_blocks":
            return f"fpn_inner_res{s}_{last}_sum" + ("" if s == 5 else "_lateral") + f"_{wb[p[5]]}"
        return f"fpn_res{s}_{last}_sum_{wb[p[5]]}"
    if name.startswith("rpn.head."):
        lvl = "_fpn2" if fpn else ""
        return {"conv": "conv_rpn", "cls_logits": "rpn_cls_logits", "bbox_pred": "rpn_bbox_pred"}[p[2]] + \
            f"{lvl}_{wb[p[3]]}"
    if p[2] in ("fc6", "fc7"):
        return f"{p[2]}_{wb[p[3]]}"
    if name.startswith("roi_heads.box_predictor."):
        return f"{p[2]}_{wb[p[3]]}"
    if name.startswith("roi_heads.mask_head."):
        if p[2] == "convs":
            return f"_[mask]_fcn{int(p[3]) + 1}_{wb[p[4]]}"
        return {"deconv": "conv5_mask", "predictor": "mask_fcn_logits"}[p[2]] + f"_{wb[p[3]]}"
    if name.startswith("roi_heads.keypoint_head."):
        if p[2] == "convs":
            return f"conv_fcn{int(p[3]) + 1}_{wb[p[4]]}"
        return f"kps_score_lowres_{wb[p[3]]}"
    raise AssertionError(f"no Caffe2 name for {name}")


def d2_state_dict(sd, fpn):
    """Our state dict -> detectron2's names and class layout (background last; no background box / mask rows)."""
    out = OrderedDict()
    for k, v in sd.items():
        if k.endswith("cls_score.weight") or k.endswith("cls_score.bias"):
            v = torch.cat([v[1:], v[:1]])
        elif "box_predictor.bbox_pred" in k:
            v = v[4:]
        elif k.startswith("roi_heads.mask_head.predictor"):
            v = v[1:]
        out[d2_name(k, fpn)] = v.clone()
    return out


# ---- writing pickles as detectron2 / Detectron1 / Python 2 did --------------------------------------------

_RECONSTRUCT = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct


class _NumpyPickler(pickle._Pickler):
    """Python's pickler with numpy's array reconstruction named from numpy.core (numpy 1.x files) or numpy._core
    (numpy 2), and optionally Python 2's str opcodes for bytes and text (what cPickle wrote in Detectron1)."""

    def __init__(self, file, protocol, numpy_core, py2=False):
        super().__init__(file, protocol)
        self.numpy_core = numpy_core
        self.py2 = py2

    def save_global(self, obj, name=None):
        if obj is not _RECONSTRUCT:
            return super().save_global(obj, name)
        module, name = f"{self.numpy_core}.multiarray", "_reconstruct"
        if self.proto >= 4:
            self.save(module)
            self.save(name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)

    def _save_py2_str(self, data: bytes):
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)

    def save_bytes(self, obj):
        if not self.py2:
            return super().save_bytes(obj)
        self._save_py2_str(obj)
        self.memoize(obj)

    def save_str(self, obj):
        if not self.py2:
            return super().save_str(obj)
        self._save_py2_str(obj.encode("latin1"))
        self.memoize(obj)

    dispatch = pickle._Pickler.dispatch.copy()
    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def write_pickle(obj, path, protocol=2, numpy_core="numpy.core", py2=False):
    buf = io.BytesIO()
    _NumpyPickler(buf, protocol, numpy_core, py2).dump(obj)
    path.write_bytes(buf.getvalue())
    return path


def to_numpy(sd):
    return {k: v.detach().numpy().copy() for k, v in sd.items()}


# ---- models -------------------------------------------------------------------------------------------


def small_cfg(**kw):
    """A small model in detectron2's conventions (the loader detects every size below from the tensors)."""
    c4 = kw.pop("c4", False)
    over = {"model": {"backbone": {"name": kw.pop("net", "resnet18"), "width": kw.pop("width", 32)},
                      "roi_heads": {"num_classes": kw.pop("num_classes", 3), "box_head_fc_dim": 128},
                      "mask": {"enabled": kw.pop("mask", True), "conv_dim": 64},
                      "keypoint": {"enabled": kw.pop("keypoint", False), "num_keypoints": 5, "conv_dim": 64,
                                   "num_convs": 2, "flip_pairs": ()},
                      "fpn": {"out_channels": 64}}}
    for section, values in kw.items():
        over["model"].setdefault(section, {}).update(values)
    if c4:
        del over["model"]["fpn"]
        del over["model"]["roi_heads"]["box_head_fc_dim"]
    return get_config("r50_c4" if c4 else "r50_fpn", over)


def random_state_dict(cfg, seed=0):
    """The model's state dict with every float tensor redrawn (norm variances positive)."""
    torch.manual_seed(seed)
    sd = build_model(cfg).state_dict()
    out = OrderedDict()
    for k, v in sd.items():
        if not v.is_floating_point():
            out[k] = v.clone()
        elif k.endswith("running_var"):
            out[k] = torch.rand(v.shape) + 0.5
        else:
            out[k] = torch.randn(v.shape) * 0.1
    return out


def assert_loads_back(cfg_src, path, src_sd, *, bg_rows_zero=True, overrides=None):
    """load_detectron2(path) builds the source's architecture; the loaded tensors equal the source's."""
    cfg, sd, report = load_detectron2(path, overrides)
    model = build_model(cfg)
    model.load_state_dict(sd)   # strict
    got = model.state_dict()
    assert list(got) == list(src_sd)
    for k, v in src_sd.items():
        g = got[k]
        assert g.shape == v.shape, k
        if bg_rows_zero and "box_predictor.bbox_pred" in k:
            assert torch.equal(g[4:], v[4:]) and not g[:4].any(), k
        elif bg_rows_zero and k.startswith("roi_heads.mask_head.predictor"):
            assert torch.equal(g[1:], v[1:]) and not g[:1].any(), k
        else:
            assert torch.equal(g, v), k
    for f in ("name", "width", "stride_in_1x1"):
        assert getattr(cfg.model.backbone, f) == getattr(cfg_src.model.backbone, f) or f == "stride_in_1x1"
    assert cfg.model.roi_heads.num_classes == cfg_src.model.roi_heads.num_classes
    assert cfg.model.mask.enabled == cfg_src.model.mask.enabled
    assert cfg.model.keypoint.enabled == cfg_src.model.keypoint.enabled
    assert cfg.model.fpn.enabled == cfg_src.model.fpn.enabled
    return cfg, sd, report


@pytest.fixture(scope="module")
def fpn_mask():
    cfg = small_cfg()
    return cfg, random_state_dict(cfg)


# ---- formats ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol,numpy_core,py2", [
    (2, "numpy.core", True),      # Detectron1 / Python 2 cPickle: str opcodes, numpy 1.x names
    (2, "numpy.core", False),     # Python 3, protocol 2: bytes through _codecs.encode
    (2, "numpy._core", False),    # numpy 2
    (4, "numpy.core", False),
    (4, "numpy._core", False),
    (5, "numpy._core", False),    # numpy's protocol-5 path (_frombuffer)
])
def test_model_zoo_pickle(tmp_path, fpn_mask, protocol, numpy_core, py2):
    cfg_src, sd = fpn_mask
    zoo = {"model": to_numpy(d2_state_dict(sd, fpn=True)), "__author__": "Detectron2 Model Zoo"}
    if protocol == 5:
        path = tmp_path / "model_final.pkl"
        path.write_bytes(pickle.dumps(zoo, protocol=5))
        assert b"_frombuffer" in path.read_bytes()
    else:
        path = write_pickle(zoo, tmp_path / "model_final.pkl", protocol, numpy_core, py2)
        data = path.read_bytes()
        assert numpy_core.encode() + b".multiarray" in data
        assert (b"_codecs" in data) == (protocol == 2 and not py2)
    cfg, _, report = assert_loads_back(cfg_src, path, sd)
    assert report.kind == "detector" and "model-zoo" in report.file_format
    assert "Mask R-CNN R-18-FPN" in report.architecture and "3 classes" in report.architecture
    m = cfg.model
    assert (m.input_format, m.pixel_scale, m.pixel_mean, m.pixel_std) == (
        "BGR", 255.0, (103.530, 116.280, 123.675), (1.0, 1.0, 1.0))
    assert m.backbone.stride_in_1x1 and m.backbone.norm == "FrozenBN"
    assert m.fpn.out_channels == 64 and m.roi_heads.box_head_fc_dim == 128 and m.mask.conv_dim == 64
    assert m.rpn.pre_nms_topk_test == 1000 and m.rpn.post_nms_topk_test == 1000 and m.rpn.min_size == 0
    assert (m.anchors.sizes, m.anchors.rounded, m.anchors.order) == (
        ((32,), (64,), (128,), (256,), (512,)), False, "size_ratio")
    r = m.roi_heads
    assert (r.pooler_sampling_ratio, r.pooler_aligned, r.pooler_level_mapping, r.test_min_box_side) == (
        0, True, "detectron2", 0.0)
    assert (cfg.input.resize, cfg.input.size_divisibility, cfg.data.first_label, m.mask.paste) == (
        "detectron2", 32, 0, "aligned")
    assert "stride_in_1x1" in str(report) and "pixel_std" in str(report)


def test_checkpointer_pth_c4(tmp_path):
    """A detectron2 Checkpointer file of a Mask R-CNN C4 model, with BN step counters and optimizer state."""
    cfg_src = small_cfg(c4=True)
    sd = random_state_dict(cfg_src, seed=1)
    model_sd = d2_state_dict(sd, fpn=False)
    model_sd["backbone.res2.0.conv1.norm.num_batches_tracked"] = torch.tensor(7)
    path = tmp_path / "model_final.pth"
    torch.save({"model": model_sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.02, "params": [0]}]},
                "scheduler": {"last_epoch": 100, "base_lrs": [0.02]}, "iteration": 89999}, path)
    cfg, _, report = assert_loads_back(cfg_src, path, sd)
    m = cfg.model
    assert not m.fpn.enabled and "C4" in report.architecture and "torch.save" in report.file_format
    assert m.anchors.sizes == ((32, 64, 128, 256, 512),) and m.roi_heads.box_pooler_resolution == 14
    assert (m.rpn.pre_nms_topk_test, m.rpn.post_nms_topk_test) == (6000, 1000)
    assert cfg.input.size_divisibility == 0
    assert any("num_batches_tracked" in n for n in report.ignored)


def test_c4_box_only_legacy_torch_format(tmp_path):
    """Faster R-CNN C4 in torch.save's legacy (non-zip) format, a bare state dict."""
    cfg_src = small_cfg(c4=True, mask=False)
    sd = random_state_dict(cfg_src, seed=2)
    path = tmp_path / "faster_c4.pth"
    torch.save(d2_state_dict(sd, fpn=False), path, _use_new_zipfile_serialization=False)
    cfg, _, report = assert_loads_back(cfg_src, path, sd)
    assert "Faster R-CNN" in report.architecture and not cfg.model.mask.enabled


def test_keypoint_fpn(tmp_path):
    cfg_src = small_cfg(keypoint=True, mask=False, num_classes=1)
    sd = random_state_dict(cfg_src, seed=3)
    path = write_pickle({"model": to_numpy(d2_state_dict(sd, fpn=True)), "__author__": "x"}, tmp_path / "kp.pkl")
    cfg, _, report = assert_loads_back(cfg_src, path, sd)
    k = cfg.model.keypoint
    assert (k.num_keypoints, k.num_convs, k.conv_dim, k.score) == (5, 2, 64, "prob")
    assert cfg.model.rpn.post_nms_topk_train == 1500 and "Keypoint R-CNN" in report.architecture


def test_box_only_fpn(tmp_path):
    """Faster R-CNN FPN; the arrays big-endian and Fortran-ordered (numpy pickles keep both)."""
    cfg_src = small_cfg(mask=False)
    sd = random_state_dict(cfg_src, seed=4)
    arrays = {k: np.asfortranarray(v.astype(">f4")) for k, v in to_numpy(d2_state_dict(sd, fpn=True)).items()}
    path = write_pickle({"model": arrays, "__author__": "x"}, tmp_path / "f.pkl")
    cfg, _, report = assert_loads_back(cfg_src, path, sd)
    assert "Faster R-CNN R-18-FPN" in report.architecture


def test_r101_depth(tmp_path):
    cfg_src = small_cfg(net="resnet101", width=8, mask=False)
    sd = random_state_dict(cfg_src, seed=5)
    path = write_pickle({"model": to_numpy(d2_state_dict(sd, fpn=True)), "__author__": "x"}, tmp_path / "r.pkl")
    cfg, _, _ = assert_loads_back(cfg_src, path, sd)
    assert cfg.model.backbone.name == "resnet101" and cfg.model.backbone.stride_in_1x1
    assert cfg.model.pixel_std == (1.0, 1.0, 1.0)


def test_resnext_groups(tmp_path):
    """ResNeXt-101 32x8d's layout (32 groups in each 3x3) at a small width: depth, groups, and detectron2's
    ResNeXt conventions (stride in the 3x3, FAIR pixel std)."""
    cfg_src = small_cfg(net="resnext101_32x8d", width=16, mask=False)
    sd = random_state_dict(cfg_src, seed=6)
    d2 = d2_state_dict(sd, fpn=True)
    assert d2["backbone.bottom_up.res2.0.conv2.weight"].shape == (64, 2, 3, 3)   # 32 groups
    path = write_pickle({"model": to_numpy(d2), "__author__": "x"}, tmp_path / "x.pkl")
    cfg, _, report = assert_loads_back(cfg_src, path, sd)
    assert cfg.model.backbone.name == "resnext101_32x8d" and not cfg.model.backbone.stride_in_1x1
    assert cfg.model.pixel_std == (57.375, 57.120, 58.395) and "X-101-32x8d" in report.architecture


def test_caffe2_detectron_blobs(tmp_path, fpn_mask):
    """A Detectron1 model: Caffe2 blob names, affine-channel norms (no running statistics), background-first
    predictors, _momentum blobs."""
    cfg_src, sd = fpn_mask
    sd = OrderedDict(sd)
    for k in sd:   # affine-channel norms are identity statistics (detectron2 fills mean 0, variance 1)
        if k.endswith("running_mean"):
            sd[k] = torch.zeros_like(sd[k])
        elif k.endswith("running_var"):
            sd[k] = torch.ones_like(sd[k])
    blobs = {}
    for k, v in sd.items():
        n = c2_name(k, fpn=True)
        if n is not None:
            blobs[n] = v.numpy().copy()
            blobs[n + "_momentum"] = np.zeros_like(blobs[n])
    assert len(set(blobs)) == len(blobs)
    path = write_pickle({"blobs": blobs, "cfg": "MODEL:\n  TYPE: generalized_rcnn\n"}, tmp_path / "d1.pkl",
                        py2=True)
    cfg, _, report = assert_loads_back(cfg_src, path, sd, bg_rows_zero=False)   # Detectron1 keeps background rows
    assert "Caffe2" in report.file_format and any(n.endswith("_momentum") for n in report.ignored)
    assert any("running statistics" in n for n in report.notes)


def test_caffe2_imagenet_backbone(tmp_path):
    """An ImageNet R-50.pkl-style bare dict: trunk weights only, for MaskRCNN.load_backbone_state_dict."""
    cfg_src = small_cfg(net="resnet50", width=16)
    torch.manual_seed(7)
    body = build_model(cfg_src).backbone.body.state_dict()
    blobs = {"fc1000_w": np.zeros((1000, 8), np.float32), "fc1000_b": np.zeros(1000, np.float32)}
    expect = {}
    for k, v in body.items():
        v = torch.zeros_like(v) if k.endswith("running_mean") else (
            torch.ones_like(v) if k.endswith("running_var") else torch.randn(v.shape))
        expect[k] = v
        n = c2_name("backbone.body." + k, fpn=True)
        if n is not None:
            blobs[n] = v.numpy().copy()
    path = write_pickle(blobs, tmp_path / "R-50.pkl")
    cfg, sd, report = load_detectron2(path)
    assert report.kind == "backbone" and "fc1000_w" in report.ignored
    assert cfg.model.backbone.name == "resnet50" and cfg.model.backbone.width == 16
    model = build_model(cfg)
    model.load_backbone_state_dict(sd)
    got = model.backbone.body.state_dict()
    for k, v in expect.items():
        assert torch.equal(got[k], v), k


def test_caffe2_c4(tmp_path):
    cfg_src = small_cfg(c4=True)
    sd = random_state_dict(cfg_src, seed=8)
    for k in sd:
        if k.endswith("running_mean"):
            sd[k].zero_()
        elif k.endswith("running_var"):
            sd[k].fill_(1.0)
    blobs = {c2_name(k, fpn=False): v.numpy().copy() for k, v in sd.items() if c2_name(k, fpn=False)}
    path = write_pickle({"blobs": blobs}, tmp_path / "c4.pkl", protocol=2)
    cfg, _, _ = assert_loads_back(cfg_src, path, sd, bg_rows_zero=False)
    assert not cfg.model.fpn.enabled


def test_old_detectron2_pixel_buffers(tmp_path, fpn_mask):
    """Old detectron2 files kept pixel_mean / pixel_std and cell anchors as buffers: the statistics are used."""
    cfg_src, sd = fpn_mask
    d2 = d2_state_dict(sd, fpn=True)
    d2["pixel_mean"] = torch.tensor([[[102.0]], [[115.0]], [[122.0]]])
    d2["pixel_std"] = torch.tensor([[[58.0]], [[57.0]], [[57.5]]])
    d2["proposal_generator.anchor_generator.cell_anchors.0"] = torch.zeros(3, 4)
    path = tmp_path / "old.pth"
    torch.save({"model": d2}, path)
    cfg, _, report = assert_loads_back(cfg_src, path, sd)
    assert cfg.model.pixel_mean == (102.0, 115.0, 122.0) and cfg.model.pixel_std == (58.0, 57.0, 57.5)


def test_class_agnostic_box_deltas(tmp_path):
    """CLS_AGNOSTIC_BBOX_REG: 4 delta rows shared by every class -> copied into each class's rows."""
    cfg_src = small_cfg(mask=False)
    sd = random_state_dict(cfg_src, seed=9)
    d2 = d2_state_dict(sd, fpn=True)
    for p in ("weight", "bias"):
        d2[f"roi_heads.box_predictor.bbox_pred.{p}"] = d2[f"roi_heads.box_predictor.bbox_pred.{p}"][:4].clone()
    path = tmp_path / "agn.pth"
    torch.save({"model": d2}, path)
    _, out, _ = load_detectron2(path)
    w = out["roi_heads.box_predictor.bbox_pred.weight"]
    assert w.shape[0] == 16 and not w[:4].any()
    for c in range(1, 4):
        assert torch.equal(w[4 * c:4 * c + 4], d2["roi_heads.box_predictor.bbox_pred.weight"])


def test_predictor_layout_same_predictions(tmp_path, fpn_mask):
    """Our permuted predictors give detectron2's per-class probabilities, box deltas and mask logits."""
    _, sd = fpn_mask
    d2 = d2_state_dict(sd, fpn=True)
    path = tmp_path / "m.pth"
    torch.save({"model": d2}, path)
    cfg, ours, _ = load_detectron2(path)
    k = cfg.model.roi_heads.num_classes
    x = torch.randn(20, 128, dtype=torch.float64)

    def lin(sd_, n):
        return x @ sd_[n + ".weight"].double().T + sd_[n + ".bias"].double()

    p_d2 = lin(d2, "roi_heads.box_predictor.cls_score").softmax(1)       # [.., K + 1], background last
    p_ours = lin(ours, "roi_heads.box_predictor.cls_score").softmax(1)   # background first
    torch.testing.assert_close(p_ours[:, 1:], p_d2[:, :k], rtol=0, atol=1e-12)
    torch.testing.assert_close(p_ours[:, 0], p_d2[:, k], rtol=0, atol=1e-12)
    d_d2 = lin(d2, "roi_heads.box_predictor.bbox_pred").reshape(20, k, 4)
    d_ours = lin(ours, "roi_heads.box_predictor.bbox_pred").reshape(20, k + 1, 4)
    # the same products; a GEMM of another shape may sum them in another order
    torch.testing.assert_close(d_ours[:, 1:], d_d2, rtol=0, atol=1e-12)
    f = torch.randn(5, 64, 4, 4, dtype=torch.float64)
    m_d2 = torch.nn.functional.conv2d(f, d2["roi_heads.mask_head.predictor.weight"].double(),
                                      d2["roi_heads.mask_head.predictor.bias"].double())
    m_ours = torch.nn.functional.conv2d(f, ours["roi_heads.mask_head.predictor.weight"].double(),
                                        ours["roi_heads.mask_head.predictor.bias"].double())
    torch.testing.assert_close(m_ours[:, 1:], m_d2, rtol=0, atol=1e-12)


def test_overrides(tmp_path, fpn_mask):
    cfg_src, sd = fpn_mask
    path = tmp_path / "m.pth"
    torch.save({"model": d2_state_dict(sd, fpn=True)}, path)
    over = {"data": {"class_names": ["a", "b", "c"]}, "input": {"min_size_test": 600}}
    cfg, _, report = assert_loads_back(cfg_src, path, sd, overrides=over)
    assert cfg.data.class_names == ("a", "b", "c") and cfg.input.min_size_test == 600
    assert report.overrides == over
    f = tmp_path / "over.json"
    f.write_text(json.dumps({"model": {"pixel_std": [57.375, 57.12, 58.395]}}))
    cfg, _, _ = load_detectron2(path, f)
    assert cfg.model.pixel_std == (57.375, 57.12, 58.395)


def test_looks_like_detectron2(fpn_mask):
    _, sd = fpn_mask
    assert looks_like_detectron2(d2_state_dict(sd, fpn=True))
    assert looks_like_detectron2(["res2_0_branch2a_w", "conv1_w"])
    assert not looks_like_detectron2(sd)


# ---- GroupNorm and conv box heads (modules from the norm / conv-head work) ----------------------------------


def _gn_cfg():
    return merge(small_cfg(), {"model": {
        "backbone": {"norm": "GN", "stride_in_1x1": False}, "fpn": {"norm": "GN"},
        "roi_heads": {"box_head_num_conv": 2, "box_head_num_fc": 1, "box_head_conv_dim": 64, "box_head_norm": "GN"},
        "mask": {"norm": "GN"}}})


def _gn_available():
    try:
        with torch.device("meta"):
            build_model(_gn_cfg())
    except (ValueError, TypeError, NotImplementedError):
        return False
    return True


@pytest.mark.skipif(not _gn_available(), reason="GroupNorm in the ResNet / FPN / heads and the conv box head are "
                    "not in the model yet (they come with the norm and conv-head options of the same issue)")
def test_groupnorm_conv_box_head(tmp_path):
    """detectron2's *_gn configs: GN in the ResNet, FPN, 4conv1fc box head and mask head (here 2conv1fc)."""
    cfg_src = _gn_cfg()
    sd = random_state_dict(cfg_src, seed=10)
    assert any(".norms." in k for k in sd) and "backbone.fpn.inner_blocks.0.1.weight" in sd
    path = write_pickle({"model": to_numpy(d2_state_dict(sd, fpn=True)), "__author__": "x"}, tmp_path / "gn.pkl")
    cfg, _, _ = assert_loads_back(cfg_src, path, sd)
    m = cfg.model
    assert (m.backbone.norm, m.fpn.norm, m.roi_heads.box_head_norm, m.mask.norm) == ("GN", "GN", "GN", "GN")
    assert (m.roi_heads.box_head_num_conv, m.roi_heads.box_head_num_fc) == (2, 1)
    assert not m.backbone.stride_in_1x1


# ---- safety and errors --------------------------------------------------------------------------------


class _RunsCommand:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


@pytest.mark.parametrize("how", ["os.system", "subprocess", "eval"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_pickle_that_runs_code_is_refused(tmp_path, how, protocol):
    marker = tmp_path / "pwned"
    cmd = f"touch {marker}"
    payload = {"os.system": _RunsCommand(os.system, cmd),
               "subprocess": _RunsCommand(subprocess.check_call, ["touch", str(marker)]),
               "eval": _RunsCommand(eval, f"open({str(marker)!r}, 'w').close()")}[how]
    path = tmp_path / "evil.pkl"
    # a plausible model-zoo file with the payload among the weights
    path.write_bytes(pickle.dumps({"model": {"backbone.bottom_up.stem.conv1.weight": np.zeros(3, np.float32),
                                             "x": payload}, "__author__": "x"}, protocol=protocol))
    with pytest.raises(UnsafePickleError) as e:
        load_detectron2(path)
    msg = str(e.value)
    # protocol 2 writes Python 2's module names (fix_imports): subprocess -> commands, builtins -> __builtin__
    names = {"os.system": ("posix.system", "nt.system"), "subprocess": ("subprocess.check_call", "commands.check_call"),
             "eval": ("builtins.eval", "__builtin__.eval")}[how]
    assert str(path) in msg and any(f"global {n}:" in msg for n in names), msg
    with pytest.raises(UnsafePickleError):
        safe_load_pickle(path)
    assert not marker.exists()


def test_pth_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": _RunsCommand(os.system, f"touch {marker}")}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_detectron2(path)
    assert not marker.exists()


def test_codecs_only_latin1(tmp_path):
    """_codecs.encode is admitted for protocol-2 bytes (latin1) only."""
    path = tmp_path / "codec.pkl"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x06\x00\x00\x00rot_13\x86R.")
    with pytest.raises(UnsafePickleError, match="latin1"):
        safe_load_pickle(path)


def _zoo_file(tmp_path, sd):
    return write_pickle({"model": to_numpy(d2_state_dict(sd, fpn=True)), "__author__": "x"}, tmp_path / "m.pkl")


def test_truncated_and_foreign_files(tmp_path, fpn_mask):
    _, sd = fpn_mask
    good = _zoo_file(tmp_path, sd).read_bytes()
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="cut.pkl.*not a readable pickle"):
        load_detectron2(cut)
    pth = tmp_path / "m.pth"
    torch.save({"model": d2_state_dict(sd, fpn=True)}, pth)
    data = pth.read_bytes()
    cut_pth = tmp_path / "cut.pth"
    cut_pth.write_bytes(data[: len(data) - 5000])
    with pytest.raises(ValueError, match="cut.pth"):
        load_detectron2(cut_pth)
    png = tmp_path / "photo.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(ValueError, match="photo.png.*not a readable pickle.*PNG image"):
        load_detectron2(png)
    js = tmp_path / "cfg.json"
    js.write_text('{"model": {"x": 1}}')
    with pytest.raises(ValueError, match="cfg.json.*not a readable pickle"):
        load_detectron2(js)
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.pkl"):
        load_detectron2(empty)
    with pytest.raises(ValueError, match="cannot read"):
        load_detectron2(tmp_path / "missing.pkl")


def test_another_architecture(tmp_path, fpn_mask):
    cfg_src, sd = fpn_mask
    path = tmp_path / "m.pth"
    torch.save({"model": d2_state_dict(sd, fpn=True)}, path)
    # more classes than the file has: the first mismatching tensor, expected and found shapes
    with pytest.raises(ValueError, match=r"m\.pth.*cls_score\.weight.*\(81, \.\.\.\).*found \(4, 128\)"):
        load_detectron2(path, {"model": {"roi_heads": {"num_classes": 80}}})
    # a tensor of another shape inside the model
    d2 = d2_state_dict(sd, fpn=True)
    d2["backbone.fpn_output3.weight"] = torch.zeros(64, 64, 1, 1)
    bad = tmp_path / "bad.pth"
    torch.save({"model": d2}, bad)
    with pytest.raises(ValueError, match=r"bad\.pth: tensor backbone\.fpn_output3\.weight \(ours: "
                       r"backbone\.fpn\.layer_blocks\.1\.0\.weight\): expected shape \(64, 64, 3, 3\), "
                       r"found \(64, 64, 1, 1\)"):
        load_detectron2(bad)
    # a missing tensor
    d2 = d2_state_dict(sd, fpn=True)
    del d2["roi_heads.mask_head.mask_fcn2.bias"]
    torch.save({"model": d2}, bad)
    with pytest.raises(ValueError, match=r"roi_heads\.mask_head\.convs\.1\.bias of shape \(64,\) is missing"):
        load_detectron2(bad)
    # a torchvision state dict is not a detectron2 checkpoint
    tv = tmp_path / "tv.pth"
    torch.save(sd, tv)
    with pytest.raises(ValueError, match="tv.pth.*not a detectron2"):
        load_detectron2(tv)
    # an unknown detectron2 head (cascade stages)
    d2 = d2_state_dict(sd, fpn=True)
    d2["roi_heads.box_head.0.fc1.weight"] = torch.zeros(2, 2)
    torch.save({"model": d2}, bad)
    with pytest.raises(ValueError, match=r"unsupported.*roi_heads\.box_head\.0\.fc1\.weight"):
        load_detectron2(bad)
    # an unknown tensor name
    d2 = d2_state_dict(sd, fpn=True)
    d2["roi_heads.semantic_head.w"] = torch.zeros(2)
    torch.save({"model": d2}, bad)
    with pytest.raises(ValueError, match=r"roi_heads\.semantic_head\.w.*not a weight"):
        load_detectron2(bad)


def test_object_arrays_refused(tmp_path):
    path = tmp_path / "obj.pkl"
    path.write_bytes(pickle.dumps({"model": {"a": np.array([1, "x"], dtype=object)}, "__author__": "x"},
                                  protocol=2))
    with pytest.raises(ValueError, match="obj.pkl.*dtype object"):
        load_detectron2(path)
