"""detectron2 checkpoints -> an mrcnn_fast config and state dict, without running code from the file.

    cfg, state_dict, report = load_detectron2("model_final_f10217.pkl")
    model = build_model(cfg); model.load_state_dict(state_dict)   # strict
    print(report)

Files read:
- detectron2 model-zoo pickles: {"model": {name: numpy array}, "__author__": ...}, any pickle protocol, written by
  Python 2 or 3 with numpy 1.x (numpy.core) or 2.x (numpy._core). Read by a restricted unpickler that admits only
  what a dict of numpy arrays needs and refuses every other global by name (nothing in the file runs).
- Caffe2 / Detectron1 pickles: {"blobs": {name: array}, ...} (detection models) or a bare {name: array} (ImageNet
  backbones such as R-50.pkl): the names are converted as detectron2 converts them, "_momentum" blobs dropped,
  the predictors kept in Detectron1's background-first layout (which is ours).
- checkpoints written by detectron2's Checkpointer ({"model": state_dict, "optimizer": ..., "iteration": ...}),
  read with torch.load(weights_only=True).

The architecture is read from the tensors (ResNet depth and groups, FPN or C4, heads, class and keypoint counts,
norm kinds, box head layout); the rest (input format, pixel statistics, stride_in_1x1, RPN top-n, ...) follows
detectron2's configs for that architecture, and `overrides` (a nested dict as config.merge takes, or a YAML /
JSON file) applies on top. The report says which is which.

detectron2's class layout differs from ours: its class logits put background last and its class-specific box
deltas (4K rows) and mask channels (K) have no background entry; ours keeps background at 0 with 4 (K + 1) delta
rows and K + 1 mask channels. The logits are permuted and zero background rows inserted (never read at
inference, so the predictions are the same).
"""
from __future__ import annotations

import collections
import dataclasses
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from .. import config as config_mod
from ..config import Config

__all__ = ["load_detectron2", "read_detectron2_weights", "safe_load_pickle", "UnsafePickleError",
           "ImportReport", "looks_like_detectron2"]

# detectron2's conventions (detectron2/config/defaults.py and configs/Base-RCNN-*.yaml)
D2_PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)
D2_PIXEL_STD_MSRA = (1.0, 1.0, 1.0)              # the MSRA (Caffe2) ImageNet models
D2_PIXEL_STD_FAIR_X101 = (57.375, 57.120, 58.395)  # the FAIR ResNeXt-101 32x8d ImageNet model
D2_FPN_ANCHOR_SIZES = ((32,), (64,), (128,), (256,), (512,))
D2_C4_ANCHOR_SIZES = ((32, 64, 128, 256, 512),)
D2_ASPECT_RATIOS = (0.5, 1.0, 2.0)
D2_MIN_SIZE_TRAIN = (640, 672, 704, 736, 768, 800)
# torch.save's legacy (pre-zip) format starts with this number, pickled
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


# ---- reading pickles safely ----------------------------------------------------------------------


class UnsafePickleError(ValueError):
    """A pickle asked for a global outside the allow-list of a numpy-array dict (it was not loaded)."""


def _numpy_module(name: str):
    import importlib

    for prefix in ("numpy._core", "numpy.core"):   # numpy 2, numpy 1.x
        try:
            return importlib.import_module(f"{prefix}.{name}")
        except ImportError:
            continue
    raise ImportError(f"numpy has no core module {name!r}")


_LATIN1 = ("latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1")


def _latin1_encode(obj, encoding="utf-8", errors="strict"):
    """_codecs.encode as protocol-2 pickles of bytes use it (str, "latin1"); no other codec is looked up."""
    if not isinstance(obj, str) or str(encoding).lower() not in _LATIN1 or errors != "strict":
        raise UnsafePickleError(f"_codecs.encode is admitted only as (str, 'latin1'), got encoding {encoding!r}")
    return obj.encode("latin1")


def _safe_globals() -> dict:
    multiarray = _numpy_module("multiarray")
    numeric = _numpy_module("numeric")
    out = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    # numpy 1.x files name numpy.core, numpy 2 files numpy._core: the same functions
    for core in ("numpy.core", "numpy._core"):
        out[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        out[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        out[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer   # protocol 5
    return out


class _RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only the globals a dict of numpy arrays needs."""

    def __init__(self, file, *, source: str):
        super().__init__(file, encoding="latin1")   # Python 2 str (array data, names) -> latin1 str
        self._source = source
        self._allowed = _safe_globals()

    def find_class(self, module: str, name: str):
        fn = self._allowed.get((module, name))
        if fn is None:
            raise UnsafePickleError(
                f"{self._source}: refused to load the global {module}.{name}: a weights pickle needs only dicts "
                f"and numpy arrays, so this file is not loaded (it may try to run code)")
        return fn

    def persistent_load(self, pid):
        # torch.save's storages (handled by torch.load) or a file that is no pickle at all
        raise pickle.UnpicklingError(f"persistent id {pid!r}: not a plain dict of numpy arrays")


_SIGNATURES = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
               (b"\x1f\x8b", "gzip data"), (b"\x89HDF", "an HDF5 file"), (b"{", "JSON or text"),
               (b"[", "JSON or text"))


def _kind_hint(data: bytes) -> str:
    for sig, what in _SIGNATURES:
        if data.startswith(sig):
            return f"; it looks like {what}"
    return ""


def safe_load_pickle(path: str | Path):
    """The first object pickled in `path`, through the restricted unpickler.

    Raises UnsafePickleError (a ValueError) naming module.name for a global outside the allow-list (dict,
    OrderedDict, numpy's array / dtype / scalar reconstruction, latin1 _codecs.encode), ValueError for a file
    that is not a readable pickle (truncated, corrupt, another kind of file)."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    with f:
        head = f.read(16)
        f.seek(0)
        try:
            return _RestrictedUnpickler(f, source=str(path)).load()
        except UnsafePickleError:
            raise
        except Exception as e:   # truncated / corrupt / not a pickle: pickle raises many kinds
            raise ValueError(f"{path}: not a readable pickle ({type(e).__name__}: {e}){_kind_hint(head)}") from None


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: torch.load(weights_only=True) failed (truncated, corrupt, or it holds objects "
                         f"other than tensors and plain containers): {type(e).__name__}: {e}") from None


# ---- the file's tensors under detectron2's names -------------------------------------------------


@dataclasses.dataclass
class _Weights:
    """A checkpoint's tensors under detectron2's full names."""
    tensors: dict                     # d2 name -> torch.Tensor
    file_format: str
    layout: str                       # predictor layout: "bg_last" (detectron2) | "bg_first" (Caffe2 Detectron)
    gn_names: set                     # d2 names of norm parameters that were GroupNorm blobs (Caffe2 files)
    origin: dict                      # d2 name -> the name in the file
    ignored: list                     # names in the file that are not weights of the model


def _to_tensor(value, name: str, path: Path) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value
    elif isinstance(value, np.ndarray):
        if value.dtype.kind not in "fiub":
            raise ValueError(f"{path}: tensor {name} has dtype {value.dtype}, not a number type")
        if not value.dtype.isnative:
            value = value.astype(value.dtype.newbyteorder("="))
        if not (value.flags.writeable and value.flags.c_contiguous):   # e.g. a read-only view of pickled bytes
            value = np.array(value, copy=True, order="C")
        t = torch.from_numpy(value)
    elif isinstance(value, np.generic) and value.dtype.kind in "fiub":
        t = torch.from_numpy(np.array(value))
    else:
        raise ValueError(f"{path}: entry {name} is a {type(value).__name__}, not an array")
    if not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32, torch.uint8, torch.bool)):
        raise ValueError(f"{path}: tensor {name} has dtype {t.dtype}, not a number type")
    return t


def read_detectron2_weights(path: str | Path) -> _Weights:
    """Reads a detectron2 / Caffe2 checkpoint (see the module doc) into tensors under detectron2's full names."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if head == b"PK\x03\x04" or zipfile.is_zipfile(path):
        obj, kind = _torch_load(path), "torch"
    else:
        obj, kind = safe_load_pickle(path), "pickle"
        if isinstance(obj, int) and obj == _TORCH_LEGACY_MAGIC:
            obj, kind = _torch_load(path), "torch"
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of weights at the top level, found a {type(obj).__name__}")

    if kind == "torch":
        raw = obj["model"] if isinstance(obj.get("model"), dict) else obj
        fmt, caffe2 = "detectron2 checkpoint (torch.save)", False
    elif "model" in obj and "__author__" in obj:
        raw = obj["model"]
        fmt, caffe2 = f"detectron2 model-zoo pickle (author {obj['__author__']!r})", False
    elif "blobs" in obj:
        raw = obj["blobs"]
        fmt, caffe2 = "Caffe2 Detectron pickle (blobs)", True
    else:
        raw = obj
        fmt, caffe2 = "Caffe2 pickle (bare name -> array dict)", True
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: the weights entry is not a non-empty dict of arrays")
    for k in raw:
        if not isinstance(k, str):
            raise ValueError(f"{path}: weight names must be strings, found {k!r}")
    if caffe2:
        return _from_caffe2(raw, path, fmt)
    tensors = {k: _to_tensor(v, k, path) for k, v in raw.items()}
    return _Weights(tensors, fmt, "bg_last", set(), {k: k for k in tensors}, [])


# Caffe2 (Detectron1) blob names -> detectron2's module-relative names: the rules of detectron2's
# checkpoint/c2_model_loading.py, applied in order (each a regex substitution on the whole name).
_C2_RULES = [(re.compile(p), r) for p, r in (
    (r"^pred_b$", "linear_b"), (r"^pred_w$", "linear_w"),
    (r"_", "."),
    (r"\.b$", ".bias"), (r"\.w$", ".weight"),
    (r"bn\.s$", "norm.weight"), (r"bn\.bias$", "norm.bias"),
    (r"bn\.rm", "norm.running_mean"), (r"bn\.running\.mean$", "norm.running_mean"),
    (r"bn\.riv$", "norm.running_var"), (r"bn\.running\.var$", "norm.running_var"),
    (r"bn\.gamma$", "norm.weight"), (r"bn\.beta$", "norm.bias"),
    (r"gn\.s$", "norm.weight"), (r"gn\.bias$", "norm.bias"),
    (r"^res\.conv1\.norm\.", "conv1.norm."), (r"^conv1\.", "stem.conv1."),
    (r"\.branch1\.", ".shortcut."), (r"\.branch2a\.", ".conv1."), (r"\.branch2b\.", ".conv2."),
    (r"\.branch2c\.", ".conv3."),
    (r"conv\.rpn\.fpn2", "proposal_generator.rpn_head.conv"), (r"conv\.rpn", "proposal_generator.rpn_head.conv"),
    (r"rpn\.bbox\.pred\.fpn2", "proposal_generator.rpn_head.anchor_deltas"),
    (r"rpn\.cls\.logits\.fpn2", "proposal_generator.rpn_head.objectness_logits"),
    (r"rpn\.bbox\.pred", "proposal_generator.rpn_head.anchor_deltas"),
    (r"rpn\.cls\.logits", "proposal_generator.rpn_head.objectness_logits"),
    (r"^bbox\.pred", "bbox_pred"), (r"^cls\.score", "cls_score"),
    (r"^fc6\.", "box_head.fc1."), (r"^fc7\.", "box_head.fc2."), (r"^head\.conv", "box_head.conv"),
    # FPN: fpn.inner.res{s}.{...}.lateral.* (lateral 1x1), fpn.res{s}.{...}.sum.* (output 3x3)
    (r"^fpn\.inner\.res(\d)\..*?(\.norm)?\.(weight|bias)$", r"fpn_lateral\1\2.\3"),
    (r"^fpn\.res(\d)\..*?(\.norm)?\.(weight|bias)$", r"fpn_output\1\2.\3"),
    (r"\.\[mask\]\.fcn", "mask_head.mask_fcn"), (r"^\.mask\.fcn", "mask_head.mask_fcn"),
    (r"mask\.fcn\.logits", "mask_head.predictor"), (r"conv5\.mask", "mask_head.deconv"),
    (r"conv\.fcn", "roi_heads.keypoint_head.conv_fcn"),
    (r"kps\.score\.lowres", "roi_heads.keypoint_head.score_lowres"),
    (r"kps\.score\.", "roi_heads.keypoint_head.score."),
)]


def _c2_relative_name(name: str) -> str:
    for pattern, repl in _C2_RULES:
        name = pattern.sub(repl, name)
    return name


def _from_caffe2(raw: dict, path: Path, fmt: str) -> _Weights:
    rel, origin, gn_rel, ignored = {}, {}, set(), []
    for k, v in raw.items():
        if k.endswith("_momentum"):
            ignored.append(k)
            continue
        r = _c2_relative_name(k)
        if r in rel:
            raise ValueError(f"{path}: blobs {origin[r]!r} and {k!r} map to the same name {r!r}")
        rel[r], origin[r] = v, k
        if "_gn_" in k:
            gn_rel.add(r)
    # module-relative -> full names; res5 goes to the backbone (FPN) or the C4 box head
    fpn = any(r.startswith("fpn_") for r in rel)
    c4 = not fpn and any(r.startswith(("box_head.", "cls_score.")) for r in rel)
    tensors, full_origin, gn = {}, {}, set()
    for r, v in rel.items():
        if r.startswith("linear.") or r.startswith("fc1000."):   # the ImageNet classifier
            ignored.append(origin[r])
            continue
        if r.startswith(("stem.", "res2.", "res3.", "res4.", "res5.")):
            if c4 and r.startswith("res5."):
                full = "roi_heads." + r
            else:
                full = ("backbone.bottom_up." if fpn else "backbone.") + r
        elif r.startswith("fpn_"):
            full = "backbone." + r
        elif r.startswith(("box_head.", "mask_head.")):
            full = "roi_heads." + r
        elif r.startswith(("cls_score.", "bbox_pred.")):
            full = "roi_heads.box_predictor." + r
        elif r.startswith(("proposal_generator.", "roi_heads.")):
            full = r
        else:
            raise ValueError(f"{path}: blob {origin[r]!r} (renamed {r!r}) is not a weight of a detectron2 Mask / "
                             f"Faster / Keypoint R-CNN (unsupported architecture)")
        tensors[full] = _to_tensor(v, origin[r], path)
        full_origin[full] = origin[r]
        if r in gn_rel:
            gn.add(full)
    return _Weights(tensors, fmt, "bg_first", gn, full_origin, ignored)


def looks_like_detectron2(names) -> bool:
    """True when parameter names look like detectron2's (or Caffe2 Detectron's) rather than torchvision's / ours."""
    for n in names:
        if n.startswith(("backbone.bottom_up.", "proposal_generator.", "roi_heads.res5.", "backbone.res4.")):
            return True
        if re.match(r"^(res\d_\d+_branch|res_conv1_|conv_rpn|rpn_cls_logits|fpn_inner_)", n):
            return True
    return False


# ---- architecture from the tensors ---------------------------------------------------------------


@dataclasses.dataclass
class ImportReport:
    """What load_detectron2 read, built and assumed. str(report) is a readable summary."""
    path: str
    file_format: str
    kind: str                         # "detector" | "backbone" (ImageNet weights: trunk only)
    architecture: str                 # e.g. "Mask R-CNN R-50-FPN"
    detected: dict                    # read from the tensors
    assumed: list                     # detectron2 conventions for this architecture (tensors cannot tell)
    overrides: dict                   # applied on top
    notes: list                       # conversions done (layout, filled statistics, ...)
    ignored: list                     # entries of the file that are not weights of the model

    def __str__(self) -> str:
        lines = [f"{self.path}: {self.file_format}", f"  built: {self.architecture} ({self.kind})"]
        lines.append("  from the tensors: " + ", ".join(f"{k}={v}" for k, v in self.detected.items()))
        lines += [f"  assumed: {a}" for a in self.assumed]
        if self.overrides:
            lines.append(f"  overrides: {self.overrides}")
        lines += [f"  note: {n}" for n in self.notes]
        if self.ignored:
            shown = ", ".join(self.ignored[:8]) + (" ..." if len(self.ignored) > 8 else "")
            lines.append(f"  ignored ({len(self.ignored)}): {shown}")
        return "\n".join(lines)


def _count(tensors: dict, template: str, start: int = 1) -> int:
    """How many consecutive k >= start have template.format(k) in tensors."""
    k = start
    while template.format(k) in tensors:
        k += 1
    return k - start


def _norm_kind(w: _Weights, prefix: str, channels: int) -> str:
    """Norm at `prefix` ("...norm."): FrozenBN (running statistics, or a Caffe2 affine-channel blob), GN (weight
    and bias only) or "" (none)."""
    t = w.tensors
    if prefix + "running_mean" in t or prefix + "running_var" in t:
        return "FrozenBN"
    if prefix + "weight" not in t:
        return ""
    if w.layout == "bg_first":   # Caffe2: GN blobs are named _gn_, affine channel (frozen BN) _bn_
        return "GN" if prefix + "weight" in w.gn_names else "FrozenBN"
    return "GN" if channels % 32 == 0 else "FrozenBN"


def _shape(t: dict, name: str, path: Path) -> tuple:
    if name not in t:
        raise ValueError(f"{path}: tensor {name} is missing")
    return tuple(t[name].shape)


def _detect(w: _Weights, path: Path) -> tuple[dict, dict]:
    """(config overrides for this architecture, what the tensors said)."""
    from ..modeling.backbone import _ARCHS

    t = w.tensors
    fpn = any(k.startswith("backbone.fpn_lateral") for k in t)
    trunk = "backbone.bottom_up." if fpn else "backbone."
    c4 = "roi_heads.res5.0.conv1.weight" in t
    heads = any(k.startswith(("proposal_generator.", "roi_heads.")) for k in t)
    unsupported = [k for k in t if k.startswith(("backbone.top_block.", "roi_heads.box_head.0.",
                                                 "roi_heads.box_predictor.0.",
                                                 "proposal_generator.rpn_head.conv.conv"))]
    if unsupported:
        raise ValueError(f"{path}: unsupported detectron2 architecture (RetinaNet P6/P7, cascade stages or a "
                         f"multi-conv RPN head): first such tensor {unsupported[0]}")
    if trunk + "stem.conv1.weight" not in t:
        raise ValueError(f"{path}: no detectron2 ResNet stem ({trunk}stem.conv1.weight): not a detectron2 R-CNN "
                         f"checkpoint (first tensor: {next(iter(t))})")
    if not fpn and not c4 and heads and trunk + "res5.0.conv1.weight" in t:
        raise ValueError(f"{path}: a dilated-C5 (DC5) model: res5 in the backbone without an FPN is not supported")
    det: dict = {}
    stem_width = _shape(t, trunk + "stem.conv1.weight", path)[0]
    blocks = []
    for s in (2, 3, 4, 5):
        pre = "roi_heads." if (c4 and s == 5) else trunk
        blocks.append(_count(t, pre + f"res{s}.{{}}.conv1.weight", 0))
    bottleneck = trunk + "res2.0.conv3.weight" in t
    c2w = _shape(t, trunk + "res2.0.conv2.weight", path)
    groups = c2w[0] // c2w[1] if c2w[1] else 1
    kind = "bottleneck" if bottleneck else "basic"
    names = [n for n, (k, layers, g, _) in _ARCHS.items()
             if k == kind and tuple(layers) == tuple(blocks) and g == groups]
    if not names:
        raise ValueError(f"{path}: ResNet with {kind} blocks {tuple(blocks)} per stage and {groups} groups is not "
                         f"a supported backbone ({', '.join(_ARCHS)})")
    backbone = names[0]
    norm = _norm_kind(w, trunk + "stem.conv1.norm.", stem_width)
    if not norm:
        raise ValueError(f"{path}: the ResNet stem has no norm ({trunk}stem.conv1.norm.*)")
    resnext = groups > 1
    det.update(backbone=backbone, width=stem_width, norm=norm, fpn=fpn)
    m: dict = {"backbone": {"name": backbone, "width": stem_width, "norm": norm, "freeze_at": 2, "norm_eps": 1e-5,
                            # detectron2: True for the MSRA R50/R101 models, False for ResNeXt and the GN models
                            "stride_in_1x1": not resnext and norm != "GN"}}
    det["heads"] = heads
    if not heads:
        # ImageNet weights: the rest is detectron2's Base-RCNN-FPN Mask R-CNN (80 classes) for training from them
        m.update(fpn={"enabled": True, "out_channels": 256, "in_features": ["res2", "res3", "res4", "res5"],
                      "norm": "GN" if norm == "GN" else ""},
                 anchors={"sizes": D2_FPN_ANCHOR_SIZES, "aspect_ratios": D2_ASPECT_RATIOS, "rounded": False,
                          "order": "size_ratio", "grid_strides": "detectron2"},
                 roi_heads={"num_classes": 80, "box_pooler_resolution": 7, "box_head_fc_dim": 1024,
                            "box_head_num_conv": 0, "box_head_num_fc": 2},
                 mask={"enabled": True, "head": "fcn", "num_convs": 4, "conv_dim": 256, "pooler_resolution": 14,
                       "class_agnostic": False, "loss": "sigmoid"},
                 keypoint={"enabled": False})
        return {"model": m}, det
    fpn_out = 0
    if fpn:
        stages = [s for s in range(2, 7) if f"backbone.fpn_lateral{s}.weight" in t]
        if stages != [2, 3, 4, 5]:
            raise ValueError(f"{path}: FPN laterals on res{stages}: only res2..res5 are supported")
        fpn_out = _shape(t, "backbone.fpn_lateral2.weight", path)[0]
        fpn_norm = _norm_kind(w, "backbone.fpn_lateral2.norm.", fpn_out)
        m["fpn"] = {"enabled": True, "out_channels": fpn_out, "in_features": ["res2", "res3", "res4", "res5"],
                    "norm": fpn_norm}
        det.update(fpn_out_channels=fpn_out, fpn_norm=fpn_norm or "none")
    else:
        m["fpn"] = {"enabled": False}
    a = _shape(t, "proposal_generator.rpn_head.objectness_logits.weight", path)[0]
    det["anchors_per_location"] = a
    if fpn:
        m["anchors"] = {"sizes": D2_FPN_ANCHOR_SIZES, "aspect_ratios": D2_ASPECT_RATIOS}
    else:
        m["anchors"] = {"sizes": D2_C4_ANCHOR_SIZES, "aspect_ratios": D2_ASPECT_RATIOS}
    want = len(m["anchors"]["sizes"][0]) * len(D2_ASPECT_RATIOS)
    if a != want:
        raise ValueError(f"{path}: the RPN predicts {a} anchors per location, detectron2's default anchors for this "
                         f"architecture are {want}: give model.anchors in the overrides")
    m["anchors"].update(rounded=False, order="size_ratio", grid_strides="detectron2")

    # box branch
    cls_rows = _shape(t, "roi_heads.box_predictor.cls_score.weight", path)[0]
    num_classes = cls_rows - 1
    r: dict = {"num_classes": num_classes}
    det["num_classes"] = num_classes
    if c4:
        r["box_pooler_resolution"] = 14
        det["box_head"] = "res5"
    else:
        n_conv = _count(t, "roi_heads.box_head.conv{}.weight")
        n_fc = _count(t, "roi_heads.box_head.fc{}.weight")
        r.update(box_head_num_conv=n_conv, box_head_num_fc=n_fc)
        in_ch = fpn_out
        if n_conv:
            conv_dim = _shape(t, "roi_heads.box_head.conv1.weight", path)[0]
            box_norm = _norm_kind(w, "roi_heads.box_head.conv1.norm.", conv_dim)
            r.update(box_head_conv_dim=conv_dim, box_head_norm=box_norm)
            in_ch = conv_dim
        if n_fc:
            fc1 = _shape(t, "roi_heads.box_head.fc1.weight", path)
            res = round((fc1[1] / in_ch) ** 0.5)
            if res * res * in_ch != fc1[1]:
                raise ValueError(f"{path}: roi_heads.box_head.fc1.weight {fc1}: input size is not "
                                 f"{in_ch} x R x R channels of pooled features")
            r.update(box_head_fc_dim=fc1[0], box_pooler_resolution=res)
        else:
            r["box_pooler_resolution"] = 7
        det["box_head"] = f"{n_conv}conv{n_fc}fc" + (f" {r.get('box_head_norm')}" if r.get("box_head_norm") else "")
    m["roi_heads"] = r

    # mask branch
    mask = "roi_heads.mask_head.predictor.weight" in t
    mk: dict = {"enabled": mask}
    if mask:
        n_mask_conv = _count(t, "roi_heads.mask_head.mask_fcn{}.weight")
        deconv = _shape(t, "roi_heads.mask_head.deconv.weight", path)
        outs = _shape(t, "roi_heads.mask_head.predictor.weight", path)[0]
        mk.update(head="fcn", num_convs=n_mask_conv, conv_dim=deconv[1], pooler_resolution=14,
                  class_agnostic=outs == 1 and num_classes > 1, loss="sigmoid")
        if n_mask_conv:
            mk["norm"] = _norm_kind(w, "roi_heads.mask_head.mask_fcn1.norm.", deconv[1])
        det["mask_head"] = f"{n_mask_conv}conv" + (" class-agnostic" if mk["class_agnostic"] else "") + (
            f" {mk['norm']}" if mk.get("norm") else "")
    m["mask"] = mk

    # keypoint branch
    kp = "roi_heads.keypoint_head.score_lowres.weight" in t
    kk: dict = {"enabled": kp}
    if kp:
        n_kp_conv = _count(t, "roi_heads.keypoint_head.conv_fcn{}.weight")
        score = _shape(t, "roi_heads.keypoint_head.score_lowres.weight", path)
        kp_dim = _shape(t, "roi_heads.keypoint_head.conv_fcn1.weight", path)[0] if n_kp_conv else score[0]
        kk.update(num_keypoints=score[1], num_convs=n_kp_conv, conv_dim=kp_dim, pooler_resolution=14,
                  heatmap_size=56)
        if score[1] != 17:
            kk["flip_pairs"] = ()   # COCO person's left/right pairs do not apply
        det["keypoints"] = score[1]
    m["keypoint"] = kk
    return {"model": m}, det


def _conventions(arch: dict, det: dict, w: _Weights) -> tuple[dict, list]:
    """detectron2's config values for the detected architecture (the tensors cannot tell them)."""
    m = arch["model"]
    b = m["backbone"]
    resnext = b["name"].startswith("resnext")
    t = w.tensors
    assumed = []
    if "pixel_mean" in t and t["pixel_mean"].numel() == 3:   # old detectron2 files saved them
        mean = tuple(float(x) for x in t["pixel_mean"].flatten())
        assumed.append(f"pixel_mean {mean} (BGR) from the file")
    else:
        mean = D2_PIXEL_MEAN_BGR
        assumed.append(f"pixel_mean {mean} (BGR, 0-255): detectron2's default")
    if "pixel_std" in t and t["pixel_std"].numel() == 3:
        std = tuple(float(x) for x in t["pixel_std"].flatten())
        assumed.append(f"pixel_std {std} from the file")
    elif resnext:
        std = D2_PIXEL_STD_FAIR_X101
        assumed.append(f"pixel_std {std}: detectron2's ResNeXt (FAIR X-101-32x8d) configs")
    else:
        std = D2_PIXEL_STD_MSRA
        assumed.append(f"pixel_std {std}: detectron2's MSRA R50/R101 and GN configs")
    assumed.append(f"stride_in_1x1 {b['stride_in_1x1']}: detectron2's "
                   + ("MSRA R50/R101 configs" if b["stride_in_1x1"] else "ResNeXt / GN (Caffe2-trained) configs"))
    m.update(input_format="BGR", pixel_scale=255.0, pixel_mean=mean, pixel_std=std)
    assumed.append("input BGR on a 0-255 scale, shortest edge 800 (max 1333) resized as detectron2 does "
                   "(uint8 PIL bilinear, sides int(x + 0.5))")
    inp = {"min_size_train": D2_MIN_SIZE_TRAIN, "max_size_train": 1333, "min_size_test": 800,
           "max_size_test": 1333, "resize": "detectron2"}
    cfg = {"model": m, "input": inp, "data": {"first_label": 0}}
    if not det["heads"]:
        assumed.append("no detection heads in the file: detectron2's Base-RCNN-FPN Mask R-CNN, 80 classes")
    fpn = m["fpn"]["enabled"]
    keypoint = m["keypoint"]["enabled"]
    inp["size_divisibility"] = 32 if fpn else 0   # detectron2 pads to the FPN's coarsest stride, C4 not at all
    if fpn:
        m["rpn"] = {"pre_nms_topk_train": 2000, "pre_nms_topk_test": 1000,
                    "post_nms_topk_train": 1500 if keypoint else 1000, "post_nms_topk_test": 1000}
        assumed.append("RPN: 1000 proposals per level before NMS, 1000 per image after (Base-RCNN-FPN)")
    else:
        m["rpn"] = {"pre_nms_topk_train": 12000, "pre_nms_topk_test": 6000,
                    "post_nms_topk_train": 2000, "post_nms_topk_test": 1000}
        assumed.append("RPN: 6000 proposals per image before NMS, 1000 after (Base-RCNN-C4)")
    m["rpn"].update(nms_thresh=0.7, min_size=0.0, head_convs=1, score_thresh=0.0, fg_iou_thresh=0.7,
                    bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5)
    sizes = m["anchors"]["sizes"]
    assumed.append(f"anchors: sizes {sizes}, aspect ratios {D2_ASPECT_RATIOS}, offset 0, unrounded, "
                   f"size-major order, spaced by the nominal strides")
    m["roi_heads"].update(pooler="roi_align", pooler_sampling_ratio=0, pooler_aligned=True,
                          pooler_level_mapping="detectron2", box_reg_weights=(10.0, 10.0, 5.0, 5.0),
                          score_thresh_test=0.05, nms_thresh_test=0.5, detections_per_image=100,
                          test_min_box_side=0.0, test_output_clip=True,
                          fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=512,
                          positive_fraction=0.25)
    assumed.append("RoIAlign aligned, adaptive sampling, detectron2's level mapping; score 0.05, NMS 0.5, "
                   "100 detections per image, no small-box filter; boxes clipped to the input image")
    if m["mask"]["enabled"]:
        m["mask"].update(paste="aligned", threshold_inclusive=True)
        if fpn:
            assumed.append("mask pooler 14x14")
    if keypoint:
        m["keypoint"]["score"] = "prob"
        assumed.append("keypoint pooler 14x14 -> 56x56 heatmaps, scores as probabilities")
    assumed.append("labels numbered 0..K-1 (detectron2's contiguous ids); no class names in the file")
    return cfg, assumed


# ---- names and layouts: detectron2 -> ours -------------------------------------------------------


def _name_rules(fpn: bool, box_fc_names: bool):
    """[(regex on detectron2's full name, replacement)] for the detected architecture."""
    trunk = r"backbone\.bottom_up\." if fpn else r"backbone\."
    block = r"(?P<j>\d+)\."

    def stage(m):
        return str(int(m.group("s")) - 1)

    rules = [
        (trunk + r"stem\.conv1\.weight", lambda m: "backbone.body.conv1.weight"),
        (trunk + r"stem\.conv1\.norm\.(?P<p>\w+)", lambda m: f"backbone.body.bn1.{m['p']}"),
        (trunk + r"res(?P<s>[2-5])\." + block + r"conv(?P<k>\d)\.weight",
         lambda m: f"backbone.body.layer{stage(m)}.{m['j']}.conv{m['k']}.weight"),
        (trunk + r"res(?P<s>[2-5])\." + block + r"conv(?P<k>\d)\.norm\.(?P<p>\w+)",
         lambda m: f"backbone.body.layer{stage(m)}.{m['j']}.bn{m['k']}.{m['p']}"),
        (trunk + r"res(?P<s>[2-5])\." + block + r"shortcut\.weight",
         lambda m: f"backbone.body.layer{stage(m)}.{m['j']}.downsample.0.weight"),
        (trunk + r"res(?P<s>[2-5])\." + block + r"shortcut\.norm\.(?P<p>\w+)",
         lambda m: f"backbone.body.layer{stage(m)}.{m['j']}.downsample.1.{m['p']}"),
        # C4: res5 is the box head
        (r"roi_heads\.res5\." + block + r"conv(?P<k>\d)\.weight",
         lambda m: f"roi_heads.box_head.res5.{m['j']}.conv{m['k']}.weight"),
        (r"roi_heads\.res5\." + block + r"conv(?P<k>\d)\.norm\.(?P<p>\w+)",
         lambda m: f"roi_heads.box_head.res5.{m['j']}.bn{m['k']}.{m['p']}"),
        (r"roi_heads\.res5\." + block + r"shortcut\.weight",
         lambda m: f"roi_heads.box_head.res5.{m['j']}.downsample.0.weight"),
        (r"roi_heads\.res5\." + block + r"shortcut\.norm\.(?P<p>\w+)",
         lambda m: f"roi_heads.box_head.res5.{m['j']}.downsample.1.{m['p']}"),
        # FPN: detectron2 names levels by stage (2..5), ours by index from the finest
        (r"backbone\.fpn_lateral(?P<s>[2-5])\.(?P<p>weight|bias)",
         lambda m: f"backbone.fpn.inner_blocks.{int(m['s']) - 2}.0.{m['p']}"),
        (r"backbone\.fpn_lateral(?P<s>[2-5])\.norm\.(?P<p>\w+)",
         lambda m: f"backbone.fpn.inner_blocks.{int(m['s']) - 2}.1.{m['p']}"),
        (r"backbone\.fpn_output(?P<s>[2-5])\.(?P<p>weight|bias)",
         lambda m: f"backbone.fpn.layer_blocks.{int(m['s']) - 2}.0.{m['p']}"),
        (r"backbone\.fpn_output(?P<s>[2-5])\.norm\.(?P<p>\w+)",
         lambda m: f"backbone.fpn.layer_blocks.{int(m['s']) - 2}.1.{m['p']}"),
        (r"proposal_generator\.rpn_head\.conv\.(?P<p>weight|bias)", lambda m: f"rpn.head.conv.{m['p']}"),
        (r"proposal_generator\.rpn_head\.objectness_logits\.(?P<p>weight|bias)",
         lambda m: f"rpn.head.cls_logits.{m['p']}"),
        (r"proposal_generator\.rpn_head\.anchor_deltas\.(?P<p>weight|bias)",
         lambda m: f"rpn.head.bbox_pred.{m['p']}"),
        (r"roi_heads\.box_head\.conv(?P<k>\d+)\.(?P<p>weight|bias)",
         lambda m: f"roi_heads.box_head.convs.{int(m['k']) - 1}.{m['p']}"),
        (r"roi_heads\.box_head\.conv(?P<k>\d+)\.norm\.(?P<p>\w+)",
         lambda m: f"roi_heads.box_head.norms.{int(m['k']) - 1}.{m['p']}"),
        (r"roi_heads\.box_head\.fc(?P<k>\d+)\.(?P<p>weight|bias)",
         (lambda m: f"roi_heads.box_head.fc{int(m['k']) + 5}.{m['p']}") if box_fc_names else
         (lambda m: f"roi_heads.box_head.fcs.{int(m['k']) - 1}.{m['p']}")),
        (r"roi_heads\.box_predictor\.(?P<n>cls_score|bbox_pred)\.(?P<p>weight|bias)",
         lambda m: f"roi_heads.box_predictor.{m['n']}.{m['p']}"),
        (r"roi_heads\.mask_head\.mask_fcn(?P<k>\d+)\.(?P<p>weight|bias)",
         lambda m: f"roi_heads.mask_head.convs.{int(m['k']) - 1}.{m['p']}"),
        (r"roi_heads\.mask_head\.mask_fcn(?P<k>\d+)\.norm\.(?P<p>\w+)",
         lambda m: f"roi_heads.mask_head.norms.{int(m['k']) - 1}.{m['p']}"),
        (r"roi_heads\.mask_head\.(?P<n>deconv|predictor)\.(?P<p>weight|bias)",
         lambda m: f"roi_heads.mask_head.{m['n']}.{m['p']}"),
        (r"roi_heads\.keypoint_head\.conv_fcn(?P<k>\d+)\.(?P<p>weight|bias)",
         lambda m: f"roi_heads.keypoint_head.convs.{int(m['k']) - 1}.{m['p']}"),
        (r"roi_heads\.keypoint_head\.score_lowres\.(?P<p>weight|bias)",
         lambda m: f"roi_heads.keypoint_head.kps_score_lowres.{m['p']}"),
    ]
    return [(re.compile(p), f) for p, f in rules]


def _is_ignorable(name: str) -> bool:
    # pixel statistics and cell anchors were buffers in old detectron2 files; BN step counters mean nothing here
    return (name in ("pixel_mean", "pixel_std") or "anchor_generator.cell_anchors" in name
            or name.endswith("num_batches_tracked"))


def _rename(w: _Weights, cfg: Config, file_fpn: bool, path: Path) -> tuple[dict, dict, list]:
    """(ours -> tensor, ours -> the file's name, ignored file names). file_fpn: the file's trunk is named as an
    FPN model's (backbone.bottom_up.*)."""
    r = cfg.model.roi_heads
    fc_names = r.box_head_num_conv == 0 and r.box_head_num_fc == 2
    rules = _name_rules(file_fpn, fc_names)
    out, origin, ignored = {}, {}, []
    for name, t in w.tensors.items():
        if _is_ignorable(name):
            ignored.append(w.origin.get(name, name))
            continue
        for pattern, fn in rules:
            mt = pattern.fullmatch(name)
            if mt:
                ours = fn(mt)
                break
        else:
            raise ValueError(f"{path}: tensor {w.origin.get(name, name)} (shape {tuple(t.shape)}) is not a weight "
                             f"of a supported detectron2 architecture")
        out[ours] = t
        origin[ours] = w.origin.get(name, name)
    return out, origin, ignored


def _predictor_layout(sd: dict, origin: dict, w: _Weights, cfg: Config, path: Path, notes: list) -> None:
    """Puts the box / mask predictors into our layout (background 0, class-specific rows for it) in place."""
    k = cfg.model.roi_heads.num_classes
    bg_last = w.layout == "bg_last"
    # the file's rows: detectron2 (K + 1 logits, bg last; 4K deltas; K masks), Caffe2 (all bg first, K + 1)
    fg_off = 0 if bg_last else 1

    def check(name, rows_ok, expect):
        if name in sd and sd[name].shape[0] not in rows_ok:
            raise ValueError(f"{path}: tensor {origin[name]}: expected shape ({expect}, ...) for "
                             f"{k} classes, found {tuple(sd[name].shape)}")

    for p in ("weight", "bias"):
        n = f"roi_heads.box_predictor.cls_score.{p}"
        check(n, (k + 1,), k + 1)
        if n in sd and bg_last:
            t = sd[n]
            sd[n] = torch.cat([t[k:], t[:k]])
        n = f"roi_heads.box_predictor.bbox_pred.{p}"
        fg4 = 4 * k + 4 * fg_off
        check(n, (fg4, 4 + 4 * fg_off), f"{fg4} (or {4 + 4 * fg_off}, class-agnostic)")
        if n in sd:
            t = sd[n]
            # the file's background rows (Caffe2) are kept, detectron2's absent ones are zero
            bg = t[:4] if fg_off else torch.zeros_like(t[:4])
            if t.shape[0] == 4 + 4 * fg_off and k > 1:     # class-agnostic: the same deltas for every class
                fg = t[4 * fg_off:].repeat(k, *([1] * (t.dim() - 1)))
                if p == "weight":
                    notes.append("class-agnostic box deltas copied to every class")
            else:
                fg = t[4 * fg_off:]
            sd[n] = torch.cat([bg, fg])
        n = f"roi_heads.mask_head.predictor.{p}"
        if n in sd and not cfg.model.mask.class_agnostic and bg_last:
            check(n, (k,), k)
            t = sd[n]
            sd[n] = torch.cat([torch.zeros_like(t[:1]), t])
    if bg_last:
        notes.append("class logits: background moved from last to first; zero background rows inserted in the box "
                     "deltas and mask channels (never read at inference)")
    else:
        notes.append("Caffe2 Detectron predictors kept in their background-first layout (ours); run as detectron2 "
                     "runs them, with detectron2's box and anchor conventions")


def _expected_state_dict(cfg: Config, path: Path, arch: str) -> tuple[dict, dict]:
    """({name: shape}, {module name: module type name}) of the model cfg builds (on the meta device: no memory, no
    init time)."""
    from ..modeling import build_model

    try:
        with torch.device("meta"):
            model = build_model(cfg)
    except Exception as e:
        raise ValueError(f"{path}: cannot build the model detected for it ({arch}): {type(e).__name__}: {e}") from e
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, {
        k: type(mod).__name__ for k, mod in model.named_modules()}


def _fill_and_check(sd: dict, origin: dict, expected: dict, module_types: dict, path: Path, notes: list,
                    prefix: str = "") -> dict:
    """sd in the model's order, running statistics the file lacks filled as detectron2 fills them (mean 0, var 1);
    ValueError on the first missing / misshapen / unexpected tensor."""
    out = {}
    filled = 0
    for name, shape in expected.items():
        if name in sd:
            t = sd[name]
            if tuple(t.shape) != shape:
                raise ValueError(f"{path}: tensor {origin.get(name, name)} (ours: {prefix}{name}): expected shape "
                                 f"{shape}, found {tuple(t.shape)}")
            out[name] = t
            continue
        owner = module_types.get(prefix + name.rsplit(".", 1)[0], "")
        leaf = name.rsplit(".", 1)[-1]
        if owner in ("FrozenBatchNorm2d", "BatchNorm2d") and leaf in ("running_mean", "running_var"):
            out[name] = torch.zeros(shape) if leaf == "running_mean" else torch.ones(shape)
            filled += 1
        elif owner == "BatchNorm2d" and leaf == "num_batches_tracked":
            out[name] = torch.zeros(shape, dtype=torch.long)
        else:
            raise ValueError(f"{path}: tensor {prefix}{name} of shape {shape} is missing from the file (the "
                             f"detected architecture needs it)")
    for name in sd:
        if name not in expected:
            raise ValueError(f"{path}: tensor {origin.get(name, name)} (ours: {prefix}{name}, shape "
                             f"{tuple(sd[name].shape)}) has no place in the model built for this file")
    if filled:
        notes.append(f"{filled} running statistics absent from the file set to mean 0 / variance 1 (as detectron2 "
                     f"does for affine-only norms)")
    return out


def _describe(cfg: Config, kind: str) -> str:
    m = cfg.model
    b = m.backbone
    net = {"resnet18": "R-18", "resnet34": "R-34", "resnet50": "R-50", "resnet101": "R-101", "resnet152": "R-152",
           "resnext50_32x4d": "X-50-32x4d", "resnext101_32x8d": "X-101-32x8d"}.get(b.name, b.name)
    if kind == "backbone":
        return f"{net} backbone ({b.norm})"
    head = "FPN" if m.fpn.enabled else "C4"
    what = "Keypoint R-CNN" if m.keypoint.enabled else ("Mask R-CNN" if m.mask.enabled else "Faster R-CNN")
    if m.keypoint.enabled and m.mask.enabled:
        what = "Mask + Keypoint R-CNN"
    return (f"{what} {net}-{head} ({b.norm}), {m.roi_heads.num_classes} classes"
            + (f", {m.keypoint.num_keypoints} keypoints" if m.keypoint.enabled else ""))


def load_detectron2(path: str | Path, overrides: dict | str | Path | None = None
                    ) -> tuple[Config, dict, ImportReport]:
    """A detectron2 (or Caffe2 Detectron) checkpoint as (config, state dict, report).

    Args:
        path: a model-zoo .pkl, a Caffe2 .pkl or a Checkpointer .pth (see the module doc). Nothing in the file runs.
        overrides: nested config overrides applied after detection (config.merge), or a YAML / JSON file of them:
            for what the tensors cannot tell (class names, pixel statistics of a custom model, test sizes, ...).
    Returns:
        cfg: the Config to build_model with.
        state_dict: {our name: Tensor}; for a detector, `build_model(cfg).load_state_dict(state_dict)` is strict;
            for ImageNet backbone weights (report.kind == "backbone") it holds the trunk under torchvision's ResNet
            names, for MaskRCNN.load_backbone_state_dict.
        report: an ImportReport (str() gives a summary).
    Raises ValueError naming the file: unreadable / truncated / another kind of file, a pickle that needs a global
    outside the allow-list (UnsafePickleError), an unsupported architecture, or the first tensor whose name or
    shape does not fit the model built for it (expected and found shapes).
    """
    path = Path(path)
    w = read_detectron2_weights(path)
    arch, det = _detect(w, path)
    kind = "detector" if det["heads"] else "backbone"
    conv, assumed = _conventions(arch, det, w)
    if isinstance(overrides, (str, Path)):
        overrides = config_mod.load_file(overrides)
    overrides = dict(overrides or {})
    cfg = config_mod.merge(config_mod.merge(Config(), conv), overrides) if overrides else config_mod.merge(
        Config(), conv)
    notes: list = []
    sd, origin, ignored = _rename(w, cfg, det["fpn"], path)
    expected, module_types = _expected_state_dict(cfg, path, _describe(cfg, kind))
    if kind == "detector":
        _predictor_layout(sd, origin, w, cfg, path, notes)
        state = _fill_and_check(sd, origin, expected, module_types, path, notes)
    else:
        # ImageNet weights: the trunk, under the trunk's own (torchvision) names
        body = {k[len("backbone.body."):]: v for k, v in expected.items() if k.startswith("backbone.body.")}
        if "roi_heads.box_head.res5.0.conv1.weight" in expected:
            body.update({"layer4." + k[len("roi_heads.box_head.res5."):]: v for k, v in expected.items()
                         if k.startswith("roi_heads.box_head.res5.")})
        trunk_sd = {}
        for k, v in sd.items():
            if not k.startswith("backbone.body."):
                raise ValueError(f"{path}: tensor {origin[k]} is not part of a ResNet trunk")
            trunk_sd[k[len("backbone.body."):]] = v
        types = {("backbone.body." + k if k else "backbone.body"): t for k, t in
                 _trunk_module_types(module_types).items()}
        state = _fill_and_check(trunk_sd, {k[len("backbone.body."):]: o for k, o in origin.items()}, body, types,
                                path, notes, prefix="backbone.body.")
        notes.append("backbone weights only (ImageNet): load them with MaskRCNN.load_backbone_state_dict; the "
                     "detection heads start from their initialisation")
    report = ImportReport(path=str(path), file_format=w.file_format, kind=kind, architecture=_describe(cfg, kind),
                          detected=det, assumed=assumed, overrides=overrides, notes=notes,
                          ignored=list(w.ignored) + ignored)
    return cfg, state, report


def _trunk_module_types(module_types: dict) -> dict:
    """Module types keyed by trunk-relative names (layer4 from the C4 box head's res5 too)."""
    out = {}
    for k, t in module_types.items():
        if k.startswith("backbone.body."):
            out[k[len("backbone.body."):]] = t
        elif k.startswith("roi_heads.box_head.res5."):
            out["layer4." + k[len("roi_heads.box_head.res5."):]] = t
    return out
