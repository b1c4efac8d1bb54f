"""Inference on images in a Python app: `Predictor`.

    from mrcnn_fast import Predictor

    predictor = Predictor("runs/x")                     # a `mrcnn-fast train` run folder
    result = predictor("photo.jpg")                     # a path, PIL image, HxWx3 uint8 array or Tensor[3, H, W]
    result["boxes"], result["labels"], result["scores"], result["masks"], result["class_names"]
    results = predictor(["a.jpg", "b.jpg"], batch_size=2)
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger("mrcnn_fast")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MASK_FORMATS = ("bool", "prob", "rle")

# AP points (0-100 scale) that running the networks in bfloat16 costs against float32: the worst drop measured on
# trained models (bench/results/bf16_accuracy.md, bench/bf16_accuracy.py). None would mean not measured, and
# precision="auto" would then keep float32.
BF16_AP_COST_POINTS: float | None = 0.16
# The most AP points precision="auto" gives up for bfloat16's speed.
AUTO_MAX_AP_COST_POINTS = 0.5


class ImageReadError(ValueError):
    """An image file that is missing, empty, corrupt or not an image. `path` names the file."""

    def __init__(self, path, reason: str):
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = str(path)


# ---------------------------------------------------------------------------------------------- images
def read_image(path: str | os.PathLike) -> np.ndarray:
    """The H x W x 3 uint8 RGB pixels of an image file, in its EXIF orientation (as viewers and the COCO loader
    show it). Raises ImageReadError naming the file when it is missing, empty, corrupt or not an image."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from .data.coco import _rgb_uint8

    p = Path(path)
    if not p.exists():
        raise ImageReadError(p, "file not found")
    if not p.is_file():
        raise ImageReadError(p, "not a file")
    if p.stat().st_size == 0:
        raise ImageReadError(p, "empty file")
    try:
        with Image.open(p) as im:
            im.load()
            if im.getexif().get(0x0112, 1) != 1:
                im = ImageOps.exif_transpose(im)
            arr = _rgb_uint8(im, p)
    except UnidentifiedImageError:
        raise ImageReadError(p, "not an image file (or a format PIL cannot read)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(p, f"corrupt or truncated image ({' '.join(str(e).split()) or type(e).__name__})") \
            from None
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageReadError(p, "the image has no pixels")
    return arr


def _uint8_to_tensor(arr: np.ndarray) -> Tensor:
    # the COCO loader's conversion, so that a file and its pixels give bit-identical inputs
    out = np.empty((3,) + arr.shape[:2], dtype=np.float32)
    np.divide(arr.transpose(2, 0, 1), np.float32(255.0), out=out, dtype=np.float32)
    return torch.from_numpy(out)


def to_image_tensor(image, *, bgr: bool = False, what: str = "image") -> Tensor:
    """Tensor[3, H, W] float32 RGB in [0, 1] from a path, a PIL image, an H x W x 3 uint8 array (RGB, or BGR with
    bgr=True) or a float Tensor[3, H, W] in [0, 1] (RGB, or BGR with bgr=True). `what` names the input in errors.

    Files and PIL images carry their own channel order: bgr applies to arrays and tensors only.
    """
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        return _uint8_to_tensor(read_image(image))
    if isinstance(image, Image.Image):
        from .data.coco import _rgb_uint8

        if image.width == 0 or image.height == 0:
            raise ValueError(f"{what}: the PIL image has no pixels ({image.width}x{image.height})")
        return _uint8_to_tensor(_rgb_uint8(image, what))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"{what}: a numpy image must be uint8 H x W x 3, got dtype {image.dtype} (convert floats "
                            f"in [0, 1] with (a * 255).round().astype(np.uint8), or pass a torch tensor)")
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{what}: a numpy image must be H x W x 3 (RGB), got shape {image.shape}"
                             + (" (drop the alpha channel: a[..., :3])" if image.ndim == 3 and image.shape[2] == 4
                                else ""))
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"{what}: the image has no pixels (shape {image.shape})")
        arr = image[..., ::-1] if bgr else image
        return _uint8_to_tensor(np.ascontiguousarray(arr))
    if torch.is_tensor(image):
        if not image.is_floating_point():
            raise TypeError(f"{what}: a tensor image must be float in [0, 1], got {image.dtype} (use "
                            f"t.float() / 255 for 0..255 pixels)")
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"{what}: a tensor image must be Tensor[3, H, W], got shape {list(image.shape)}"
                             + (" (pass a list of images for a batch)" if image.dim() == 4 else ""))
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(f"{what}: the image has no pixels (shape {list(image.shape)})")
        t = image.detach()
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{what}: the tensor holds NaN or infinite values")
        lo, hi = float(t.min()), float(t.max())
        if lo < 0 or hi > 1:
            raise ValueError(f"{what}: a float tensor image must hold values in [0, 1], got {lo:g}..{hi:g}"
                             + (" (0..255 pixels? divide by 255)" if hi > 1 else ""))
        if bgr:
            t = t.flip(0)
        return t.to(torch.float32)
    raise TypeError(f"{what}: expected a path, a PIL image, an H x W x 3 uint8 numpy array or a float "
                    f"Tensor[3, H, W], got {type(image).__name__}")


# ---------------------------------------------------------------------------------------------- set-up helpers
def resolve_weights(weights, config=None):
    """(weights file, Config) of a `mrcnn-fast train` run folder (model_final.safetensors + config.json; also
    the demo's output folder, whose run is in train/), or of a weights file with config.json beside it; an
    explicit config (preset name, .yaml/.json file or Config) replaces the one beside the weights."""
    from .config import Config, get_config
    from .engine.checkpoint import CONFIG_FILE, FINAL_WEIGHTS

    p = Path(weights)
    if not p.exists():
        raise FileNotFoundError(f"weights not found: {weights}")
    if p.is_dir():
        run = p if (p / FINAL_WEIGHTS).is_file() else p / "train"
        if not (run / FINAL_WEIGHTS).is_file():
            raise FileNotFoundError(f"{p} is not a run folder: it has no {FINAL_WEIGHTS} (nor train/{FINAL_WEIGHTS})")
        p = run / FINAL_WEIGHTS
    if isinstance(config, Config):
        return p, config
    if config is not None:
        if not isinstance(config, (str, os.PathLike)):
            raise TypeError(f"config must be a preset name, a .yaml/.json file or a Config, got "
                            f"{type(config).__name__}")
        if str(config).lower().endswith((".yaml", ".yml", ".json")) and not Path(config).is_file():
            raise FileNotFoundError(f"config file not found: {config}")
        return p, get_config(str(config))
    beside = p.parent / CONFIG_FILE
    if not beside.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} beside {p}: pass the model's config (config=preset name or file)")
    return p, get_config(str(beside))


def _resolve_device(device) -> torch.device:
    import mrcnn_fast

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA device is available (torch.cuda.is_available() is "
                             f"False); use device='cpu'")
        if not mrcnn_fast.has_cuda():
            raise ValueError(f"device {device!r}: this build of mrcnn_fast has no CUDA kernels (rebuild with "
                             f"-DMRCNN_CUDA=ON); use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _bf16_native(device: torch.device) -> bool:
    from .engine.trainer import cpu_has_native_bf16

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def choose_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """(precision, why) for a requested precision on device: "fp32" | "bf16" | "fp16". Raises ValueError for a
    precision the device cannot run."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    where = "this GPU" if device.type == "cuda" else "this CPU"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision 'fp16' needs device='cuda' (CPUs have no fast float16 convolutions); use "
                         "'bf16' or 'fp32'")
    if precision == "bf16" and not _bf16_native(device):
        raise ValueError(f"precision 'bf16': {where} has no native bfloat16 (CPU: AMX or AVX512-BF16; GPU: "
                         f"compute capability 8.0+), where it would be slower than float32; use 'fp32'")
    if precision != "auto":
        return precision, "requested"
    if not _bf16_native(device):
        return "fp32", f"auto: {where} has no native bfloat16"
    cost = BF16_AP_COST_POINTS
    if cost is None:
        return "fp32", "auto: the AP cost of bfloat16 has not been measured"
    if cost > AUTO_MAX_AP_COST_POINTS:
        return "fp32", f"auto: bfloat16 costs {cost:.2f} AP points (> {AUTO_MAX_AP_COST_POINTS})"
    return "bf16", f"auto: native bfloat16 on {where}, measured AP cost {cost:.2f} points"


# ---------------------------------------------------------------------------------------------- Predictor
class Predictor:
    """A trained Mask R-CNN ready for inference: loads the weights once, takes images in any common form and
    returns torchvision-style results at each image's own size.

    predictor(image, *, bgr=False, mask_format=None) -> dict, for one image: a path (str / Path), a PIL image
    (any mode, converted to RGB), an H x W x 3 uint8 numpy array (RGB; bgr=True for OpenCV's BGR) or a float
    Tensor[3, H, W] in [0, 1]. predictor([images], batch_size=B, ...) -> a list of dicts, the images run B at a
    time. Each dict (CPU tensors, D detections sorted by score):
        boxes Tensor[D, 4] (x1, y1, x2, y2 pixels), labels Tensor[D] int64 (1..C; detectron2 weights 0..C-1),
        scores Tensor[D], class_names list of D str (the label as text where no names are known),
        masks: mask_format "bool" -> Tensor[D, H, W] bool; "prob" -> Tensor[D, 1, H, W] float probabilities (as
            torchvision); "rle" -> list of D COCO RLE dicts {"size": [H, W], "counts": bytes} (pycocotools'),
        keypoints Tensor[D, K, 3] (x, y, 1) and keypoints_scores Tensor[D, K] when the model has a keypoint head.

    Args:
        weights: a `mrcnn-fast train` run folder (model_final.safetensors + config.json; the demo's output folder
            works too), a weights file (.safetensors / .pt) with config.json beside it, a torchvision state dict
            (.pth) or a detectron2 checkpoint (.pkl model-zoo file or Checkpointer .pth).
        config: ours: the model's config (preset name, .yaml/.json file or Config) instead of the config.json;
            torchvision / detectron2: overrides (dict or .yaml/.json file) of what the tensors cannot tell.
        weights_format: "auto" (decided from the file; the decision is in `weights_format` and `import_report`) |
            "ours" | "torchvision" | "detectron2". Labels are numbered as the weights' project numbers them:
            1..C for ours and torchvision (whose COCO models predict COCO's category ids), 0..C-1 for detectron2.
        class_names: names of the classes in label order (a list, a .txt / .json file) or "coco"; default: the
            config's data.class_names.
        device: "cpu", "cuda" or "cuda:N".
        precision: "fp32"; "bf16" (networks in bfloat16, everything between them in float32; needs native bfloat16:
            AMX / AVX512-BF16 CPUs or a compute capability 8.0+ GPU); "fp16" (CUDA only); "auto": bf16 where it is
            native and its measured AP cost (BF16_AP_COST_POINTS) is at most AUTO_MAX_AP_COST_POINTS, else fp32.
            The choice is in `self.precision` and logged once (logger "mrcnn_fast").
        score_threshold: detections scoring below it are dropped (default: the config's
            model.roi_heads.score_thresh_test). It replaces the config's threshold, so it also applies before NMS.
        mask_format: the default of the call's mask_format ("bool", "prob" or "rle").
        compile: torch.compile the networks: True (inductor with freezing) or a mode of modeling.fuse.COMPILE_MODES;
            the first call of each new input size pays the compile time.

    Thread safety: one Predictor may be called from several threads at once. Image decoding and conversion run
    in the calling thread; the networks and the stages between them run under a lock (one batch at a time: the
    graph's workspaces and the networks' own threads are shared), so threads get their own results but do not
    run inference in parallel.
    """

    def __init__(self, weights, *, config=None, weights_format: str = "auto", class_names=None, device="cpu",
                 precision: str = "auto", score_threshold: float | None = None, mask_format: str = "bool",
                 compile: bool | str = False):
        from .config import merge
        from .convert.checkpoints import load_checkpoint
        from .engine.checkpoint import load_weights
        from .modeling import build_model

        self.device = _resolve_device(device)
        self.precision, why = choose_precision(precision, self.device)
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"mask_format must be one of {', '.join(MASK_FORMATS)}, got {mask_format!r}")
        if score_threshold is not None:
            if isinstance(score_threshold, bool) or not isinstance(score_threshold, (int, float)) \
                    or not 0.0 <= float(score_threshold) <= 1.0:
                raise ValueError(f"score_threshold must be a number in [0, 1], got {score_threshold!r}")
        from .modeling.fuse import COMPILE_MODES

        if compile not in (False, True) and compile not in COMPILE_MODES:
            raise ValueError(f"compile must be False, True or one of {COMPILE_MODES}, got {compile!r}")
        imported = load_checkpoint(weights, weights_format=weights_format, config=config)
        self.weights, self.weights_format, self.import_report = imported.path, imported.weights_format, \
            imported.report
        cfg = imported.cfg
        if score_threshold is not None:
            cfg = merge(cfg, {"model": {"roi_heads": {"score_thresh_test": float(score_threshold)}}})
        if class_names is not None:
            cfg = with_class_names(cfg, class_names)
        self.cfg = cfg
        self.score_threshold = float(cfg.model.roi_heads.score_thresh_test)
        self.mask_format = mask_format
        self.compile = compile
        num_classes = cfg.model.roi_heads.num_classes
        first = int(cfg.data.first_label)
        if first not in (0, 1):
            raise ValueError(f"data.first_label must be 0 or 1, got {first}")
        # results number the classes as the weights' project does: labels first .. first + C - 1
        self.first_label = first
        names = tuple(str(n) for n in cfg.data.class_names)
        self.class_names = names if len(names) == num_classes else \
            tuple(str(i) for i in range(first, first + num_classes))
        ids = tuple(int(i) for i in cfg.data.category_ids)
        self.category_ids = ids if len(ids) == num_classes else tuple(range(first, first + num_classes))
        self.test_flip = bool(cfg.model.roi_heads.test_flip)

        model = build_model(cfg)
        if imported.state_dict is None:
            load_weights(model, self.weights)
        else:
            _load_imported(model, imported.state_dict, self.weights)
        model.eval().to(self.device)
        self.model = self._optimize(model)
        # the C++ inference graph between the networks; None: the model's torch stages (models it does not support,
        # flip test-time augmentation)
        self.graph = None if self.test_flip else self._build_stages(self.model)
        self._flip = None
        if self.test_flip:
            from .modeling import FlipTTA

            self._flip = FlipTTA.from_config(cfg, self.model).eval()
        self._lock = threading.Lock()
        between = ("flip test-time augmentation (torch stages)" if self.test_flip else
                   "the C++ inference graph" if self.graph is not None else "the torch stages")
        logger.info("Predictor: %s weights %s (%s); precision %s (%s) on %s, %s", self.weights_format, self.weights,
                    self.import_report.splitlines()[0], self.precision, why, self.device, between)

    # ---- set-up ------------------------------------------------------------------------------------

    def _optimize(self, model):
        """The eval model for this precision: BatchNorm folded into the convolutions, channels-last, the networks
        in self.precision with the stages in float32, optionally compiled (modeling.fuse)."""
        from .modeling.fuse import optimize_for_inference

        return optimize_for_inference(model, precision=self.precision, channels_last=True, compile=self.compile)

    def _build_stages(self, model):
        """The C++ inference graph for model, or None (the model's torch stages) where it does not support the
        model (graph.InferenceGraph.from_model raises ValueError, e.g. for inference-time refiners)."""
        from .graph import InferenceGraph

        try:
            return InferenceGraph.from_model(model)
        except ValueError as e:
            logger.info("Predictor: the C++ inference graph does not support this model (%s); using the torch "
                        "stages", e)
            return None

    # ---- inference ---------------------------------------------------------------------------------

    def __call__(self, images, *, bgr: bool = False, mask_format: str | None = None, batch_size: int = 1):
        mask_format = self.mask_format if mask_format is None else mask_format
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"mask_format must be one of {', '.join(MASK_FORMATS)}, got {mask_format!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(images, (list, tuple)):
            out = []
            for start in range(0, len(images), batch_size):
                chunk = images[start:start + batch_size]
                tensors = [to_image_tensor(im, bgr=bgr, what=f"images[{start + i}]") for i, im in enumerate(chunk)]
                out.extend(self.predict_tensors(tensors, mask_format=mask_format))
            return out
        return self.predict_tensors([to_image_tensor(images, bgr=bgr)], mask_format=mask_format)[0]

    def predict_tensors(self, images: Sequence[Tensor], *, mask_format: str | None = None) -> list[dict]:
        """Results (see the class doc) for a batch of Tensor[3, H, W] float32 RGB in [0, 1] (to_image_tensor's
        output; not checked again), run as one batch."""
        mask_format = self.mask_format if mask_format is None else mask_format
        if not images:
            return []
        with self._lock, torch.inference_mode():
            ims = [im.to(self.device, non_blocking=True) for im in images]
            if self._flip is not None:
                raw = self._flip(ims, mask_format=mask_format)
            else:
                m = self.model
                batch, image_sizes, _, input_sizes = m.preprocess(ims)
                raw = m.inference(m.to_model_layout(batch), image_sizes, input_sizes, mask_format=mask_format,
                                  stages=self.graph)
            return [self._result(o) for o in raw]

    def _result(self, out: dict) -> dict:
        scores = out["scores"].float().cpu()
        # refiners and flip TTA re-score detections after the threshold: the results keep to it all the same
        keep = torch.nonzero(scores >= self.score_threshold).flatten()
        whole = keep.numel() == scores.numel()

        def take(t: Tensor) -> Tensor:
            t = t.detach().cpu()
            return t if whole else t[keep]

        labels = take(out["labels"]).to(torch.int64)
        if self.first_label != 1:
            labels = labels + (self.first_label - 1)
        res = {"boxes": take(out["boxes"]).float(), "labels": labels,
               "scores": scores if whole else scores[keep]}
        if "masks_rle" in out:
            res["masks"] = [out["masks_rle"][i] for i in keep.tolist()]
        elif "masks" in out:
            res["masks"] = take(out["masks"])
        if "keypoints" in out:
            res["keypoints"] = take(out["keypoints"]).float()
            if "keypoints_scores" in out:
                res["keypoints_scores"] = take(out["keypoints_scores"]).float()
        res["class_names"] = [self.class_name(int(lab)) for lab in res["labels"].tolist()]
        return res

    def class_name(self, label: int) -> str:
        """The name of a result label (first_label .. first_label + C - 1)."""
        i = label - self.first_label
        return self.class_names[i] if 0 <= i < len(self.class_names) else str(label)

    def category_id(self, label: int) -> int:
        """The category id the weights' training set gave a result label (config data.category_ids; the label
        itself when the config records none: torchvision's labels are COCO ids, detectron2's contiguous)."""
        i = label - self.first_label
        return self.category_ids[i] if 0 <= i < len(self.category_ids) else int(label)

    def __repr__(self) -> str:
        return (f"Predictor(weights={str(self.weights)!r}, weights_format={self.weights_format!r}, "
                f"device={str(self.device)!r}, precision={self.precision!r}, score_threshold={self.score_threshold}, "
                f"mask_format={self.mask_format!r})")


# ---------------------------------------------------------------------------------------------- class names
def _read_class_names(path: Path) -> list[str]:
    import json

    if not path.is_file():
        raise FileNotFoundError(f"class names file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            names = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"class names file {path}: malformed JSON ({e})") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"class names file {path}: expected a JSON list of strings")
        return names
    return [line.strip() for line in text.splitlines() if line.strip()]


def with_class_names(cfg, class_names):
    """cfg with data.class_names (and data.category_ids) set from class_names: a list of C names in label order, a
    .txt (one per line) or .json (list) file, or "coco": the 80 COCO categories as the weights number them
    (torchvision's 90-id space with "N/A" gaps, or 80 contiguous classes, whose results then carry COCO's
    category ids)."""
    from .config import merge
    from .data.coco_names import coco_contiguous, coco_names_by_id

    c = cfg.model.roi_heads.num_classes
    ids: tuple = ()
    if isinstance(class_names, str) and class_names == "coco":
        if c == 90:
            names, ids = coco_names_by_id(90), tuple(range(1, 91))
        elif c == 80:
            names, ids = coco_contiguous()
        else:
            raise ValueError(f"class_names 'coco' needs a model with 80 classes (or torchvision's 90 ids); this one "
                             f"has {c}")
    elif isinstance(class_names, (str, os.PathLike)):
        names = _read_class_names(Path(class_names))
    elif isinstance(class_names, Sequence) and all(isinstance(n, str) for n in class_names):
        names = list(class_names)
    else:
        raise TypeError(f"class_names must be 'coco', a list of str or a .txt/.json file, got "
                        f"{type(class_names).__name__}")
    if len(names) != c:
        raise ValueError(f"class_names has {len(names)} names but the model has {c} classes")
    data = {"class_names": list(names)}
    if ids or len(cfg.data.category_ids) not in (0, c):
        data["category_ids"] = list(ids)
    return merge(cfg, {"data": data})


def _load_imported(model, state_dict: dict, path) -> None:
    """Loads an imported state dict (our names) into model, strictly; the error names the file and the first
    mismatching tensor."""
    from .engine.checkpoint import CheckpointError

    own = model.state_dict()
    for k, v in state_dict.items():
        if k in own and tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{path}: tensor {k}: expected shape {tuple(own[k].shape)}, found {tuple(v.shape)}")
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        first = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CheckpointError(f"{path}: the weights do not fit the architecture built for them ({first}; "
                              f"{len(missing)} missing, {len(unexpected)} unexpected)")
    model.load_state_dict(state_dict, strict=True)


def convert_weights(weights, *, weights_format: str = "auto", config=None, class_names=None):
    """(ImportedWeights, Config, state dict) of a torchvision / detectron2 checkpoint in our format: the config
    with class names applied and the state dict checked by loading it into the model it describes (contiguous CPU
    tensors, ready for engine.checkpoint.save_weights)."""
    from .convert.checkpoints import detect_weights_format, load_checkpoint
    from .engine.checkpoint import model_state
    from .modeling import build_model

    if weights_format in ("auto", "ours"):
        fmt, why = detect_weights_format(weights) if weights_format == "auto" else ("ours", "requested")
        if fmt == "ours":
            raise ValueError(f"{weights} is already in our format ({why})")
    imported = load_checkpoint(weights, weights_format=weights_format, config=config)
    cfg = imported.cfg if class_names is None else with_class_names(imported.cfg, class_names)
    model = build_model(cfg)
    _load_imported(model, imported.state_dict, imported.path)
    return imported, cfg, model_state(model)
